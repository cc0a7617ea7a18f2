import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as nodePath from "node:path";
import { Effect } from "effect";
import fc from "fast-check";
import {
  DTYPE_SIZES,
  fromFloat32,
  fromInt32,
  NonFiniteTensorError,
  parseSafetensors,
  requireFinite,
  type SafeDType,
  SafetensorsError,
  serializeSafetensors,
  type TensorEntry,
  toFloat32,
  toInt32,
} from "../src/io/safetensors.ts";
import {
  CheckpointError,
  INDEX_FILE,
  loadCheckpoint,
  readSafetensorsFile,
  saveCheckpoint,
  SINGLE_FILE,
  writeSafetensorsFile,
} from "../src/io/checkpoint.ts";

// ---------------------------------------------------------------------------------------------
// Helpers

const run = <A, E>(eff: Effect.Effect<A, E>): Promise<A> => Effect.runPromise(eff);
const failure = <A, E>(eff: Effect.Effect<A, E>): Promise<E> => Effect.runPromise(Effect.flip(eff));

/** Float32Array holding exactly the given bit patterns. */
const f32FromBits = (...bits: number[]): Float32Array =>
  new Float32Array(new Uint32Array(bits).buffer);
const bitsOf = (a: Float32Array): number[] =>
  Array.from(new Uint32Array(a.buffer, a.byteOffset, a.length));
const u16sOf = (bytes: Uint8Array): number[] => {
  const out: number[] = [];
  for (let i = 0; i < bytes.length; i += 2) out.push(bytes[i] | (bytes[i + 1] << 8));
  return out;
};
const leU16 = (...vals: number[]): Uint8Array =>
  new Uint8Array(vals.flatMap((v) => [v & 0xff, (v >>> 8) & 0xff]));

/** A file built by hand: length prefix (declared or actual), header text, data. */
const rawFile = (
  header: string | object,
  data: Uint8Array | number = 0,
  declared?: number | bigint,
): Uint8Array => {
  const text = typeof header === "string" ? header : JSON.stringify(header);
  const h = new TextEncoder().encode(text);
  const d = typeof data === "number" ? new Uint8Array(data) : data;
  const out = new Uint8Array(8 + h.length + d.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(declared ?? h.length), true);
  out.set(h, 8);
  out.set(d, 8 + h.length);
  return out;
};

/** Parses `buf`, expects a SafetensorsError, checks its fields and message. */
const expectParseError = async (
  buf: Uint8Array,
  tensor: string | null,
  ...words: string[]
): Promise<SafetensorsError> => {
  const e = await failure(parseSafetensors(buf, "bad.safetensors"));
  assert(e instanceof SafetensorsError, `expected SafetensorsError, got ${e}`);
  assertEquals(e._tag, "SafetensorsError");
  assertEquals(e.file, "bad.safetensors");
  assertEquals(e.tensor, tensor);
  assert(e.message.includes("bad.safetensors"), e.message);
  if (tensor !== null) assert(e.message.includes(`"${tensor}"`), e.message);
  for (const w of words) assert(e.message.includes(w), `"${e.message}" should mention "${w}"`);
  return e;
};

const withTempDir = async (body: (dir: string) => Promise<void>): Promise<void> => {
  const dir = await Deno.makeTempDir({ prefix: "lorafold-st-" });
  try {
    await body(dir);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
};

const DTYPES = Object.keys(DTYPE_SIZES) as SafeDType[];
const count = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

const nameArb = fc.oneof(
  fc.string({ unit: "binary", maxLength: 12 }),
  fc.string({ unit: "grapheme-ascii", maxLength: 12 }),
  fc.constantFrom("0", "17", "__proto__", "constructor", "", "a.b.weight", 'é\u0000"\\'),
).filter((s) => s !== "__metadata__");

const entryArb = (name: string): fc.Arbitrary<TensorEntry> =>
  fc.record({
    dtype: fc.constantFrom(...DTYPES),
    shape: fc.array(fc.integer({ min: 0, max: 4 }), { maxLength: 4 }),
  }).chain(({ dtype, shape }) => {
    const n = count(shape) * DTYPE_SIZES[dtype];
    return fc.uint8Array({ minLength: n, maxLength: n }).map((bytes) => ({
      name,
      dtype,
      shape,
      bytes,
    }));
  });

const tensorSetArb: fc.Arbitrary<TensorEntry[]> = fc.uniqueArray(nameArb, { maxLength: 6 })
  .chain((names) => fc.tuple(...names.map(entryArb)));

const metadataArb = fc.option(
  fc.array(fc.tuple(fc.string({ maxLength: 8 }), fc.string({ maxLength: 8 })), { maxLength: 4 }),
  { nil: undefined },
);

const sameTensors = (got: Map<string, TensorEntry>, want: readonly TensorEntry[]): void => {
  assertEquals(got.size, want.length);
  for (const t of want) {
    const g = got.get(t.name);
    assert(g !== undefined, `missing tensor ${JSON.stringify(t.name)}`);
    assertEquals(g.name, t.name);
    assertEquals(g.dtype, t.dtype);
    assertEquals(g.shape, t.shape);
    assertEquals(Array.from(g.bytes), Array.from(t.bytes));
  }
};

// ---------------------------------------------------------------------------------------------
// Round trips

Deno.test("serialize -> parse round-trips random tensor sets bit-exactly", async () => {
  await fc.assert(
    fc.asyncProperty(tensorSetArb, metadataArb, async (tensors, metaPairs) => {
      const metadata = metaPairs === undefined ? undefined : Object.fromEntries(metaPairs);
      const file = serializeSafetensors(tensors, metadata);
      const n = Number(new DataView(file.buffer).getBigUint64(0, true));
      assertEquals(n % 8, 0);
      assertEquals(
        file.length,
        8 + n + tensors.reduce((s, t) => s + t.bytes.length, 0),
      );
      const parsed = await run(parseSafetensors(file));
      sameTensors(parsed.tensors, tensors);
      assertEquals(
        Object.entries(parsed.metadata),
        Object.entries(metadata ?? { format: "pt" }),
      );
      // Data is laid out contiguously in the given order.
      let pos = 8 + n;
      for (const t of tensors) {
        assertEquals(parsed.tensors.get(t.name)!.bytes.byteOffset - file.byteOffset, pos);
        pos += t.bytes.length;
      }
    }),
  );
});

Deno.test("F32 encode/decode keeps every bit pattern, NaN payloads included", async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.integer({ min: 0, max: 0xffffffff }), { maxLength: 64 }),
      async (bits) => {
        const data = f32FromBits(...bits);
        const e = fromFloat32("w", data, [bits.length], "F32");
        const back = await run(parseSafetensors(serializeSafetensors([e])));
        const dec = await run(toFloat32(back.tensors.get("w")!));
        assertEquals(bitsOf(dec), bits);
      },
    ),
  );
});

Deno.test("a known-good file has the reference byte layout", async () => {
  // What the reference (Python/Rust) safetensors writes for {"a": f32 [1, -2]} with format pt.
  const json =
    '{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}';
  const padded = json + " ".repeat((8 - (json.length % 8)) % 8);
  const expected = new Uint8Array([
    ...[padded.length, 0, 0, 0, 0, 0, 0, 0],
    ...new TextEncoder().encode(padded),
    ...[0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0],
  ]);
  const file = serializeSafetensors([fromFloat32("a", new Float32Array([1, -2]), [2])]);
  assertEquals(Array.from(file), Array.from(expected));
  const parsed = await run(parseSafetensors(expected));
  assertEquals(Array.from(await run(toFloat32(parsed.tensors.get("a")!))), [1, -2]);
});

Deno.test("header-only file with no tensors and scalar/zero-size tensors parse", async () => {
  const empty = await run(parseSafetensors(serializeSafetensors([], {})));
  assertEquals(empty.tensors.size, 0);
  assertEquals(empty.metadata, {});
  const file = serializeSafetensors([
    fromFloat32("z", new Float32Array(0), [3, 0, 2]),
    fromFloat32("s", new Float32Array([7.5]), []),
    fromFloat32("z2", new Float32Array(0), [0]),
  ]);
  const p = await run(parseSafetensors(file));
  assertEquals(p.tensors.get("z")!.shape, [3, 0, 2]);
  assertEquals(Array.from(await run(toFloat32(p.tensors.get("s")!))), [7.5]);
});

// ---------------------------------------------------------------------------------------------
// F16 / BF16 against hand-written bit patterns

const F16_CASES: [string, number, number][] = [
  // [label, f32 input bits, expected f16 bits]
  ["1.0", 0x3f800000, 0x3c00],
  ["-2.0", 0xc0000000, 0xc000],
  ["+0", 0x00000000, 0x0000],
  ["-0", 0x80000000, 0x8000],
  ["65504 (max finite)", 0x477fe000, 0x7bff],
  ["2^-14 (min normal)", 0x38800000, 0x0400],
  ["2^-24 (min subnormal)", 0x33800000, 0x0001],
  ["1023*2^-24 (max subnormal)", 0x387fc000, 0x03ff],
  ["+inf", 0x7f800000, 0x7c00],
  ["-inf", 0xff800000, 0xfc00],
  ["65519 rounds down to 65504", 0x477fef00, 0x7bff],
  ["65520 ties to even -> inf", 0x477ff000, 0x7c00],
  ["1e6 overflows to inf", 0x49742400, 0x7c00],
  ["-1e6 overflows to -inf", 0xc9742400, 0xfc00],
  ["2049 ties to even 2048", 0x45001000, 0x6800],
  ["2051 ties to even 2052", 0x45003000, 0x6802],
  ["1+2^-11 ties to even 1", 0x3f801000, 0x3c00],
  ["1+3*2^-11 ties to even 1+2^-9", 0x3f803000, 0x3c02],
  ["1+2^-11+2^-23 rounds up", 0x3f801001, 0x3c01],
  ["2^-25 ties to even 0", 0x33000000, 0x0000],
  ["1.5*2^-25 rounds up to 2^-24", 0x33400000, 0x0001],
  ["3*2^-25 ties to even 2*2^-24", 0x33c00000, 0x0002],
  ["2^-26 underflows to 0", 0x32800000, 0x0000],
  ["-2^-24", 0xb3800000, 0x8001],
  ["max subnormal + half ulp carries into min normal", 0x387fe000, 0x0400],
  ["f32 subnormal -> 0", 0x00000001, 0x0000],
  ["1/3", 0x3eaaaaab, 0x3555],
];

Deno.test("F16 encoding matches hand-written bit patterns", () => {
  for (const [label, bits, want] of F16_CASES) {
    const e = fromFloat32("h", f32FromBits(bits), [1], "F16");
    assertEquals(e.dtype, "F16");
    assertEquals(u16sOf(e.bytes), [want], label);
  }
  // NaN stays NaN, including a NaN whose payload sits only in the low 13 bits.
  for (const nanBits of [0x7fc00000, 0xffc00000, 0x7f800001, 0x7fa00000]) {
    const [h] = u16sOf(fromFloat32("h", f32FromBits(nanBits), [1], "F16").bytes);
    assertEquals(h & 0x7c00, 0x7c00);
    assert((h & 0x3ff) !== 0, `f32 NaN ${nanBits.toString(16)} became f16 ${h.toString(16)}`);
    assertEquals(h >>> 15, nanBits >>> 31);
  }
});

Deno.test("F16 decoding matches hand-written values (subnormals, inf, NaN)", async () => {
  const cases: [number, number][] = [
    [0x3c00, 1],
    [0xc000, -2],
    [0x7bff, 65504],
    [0x0400, 2 ** -14],
    [0x0001, 2 ** -24],
    [0x8001, -(2 ** -24)],
    [0x03ff, 1023 * 2 ** -24],
    [0x0200, 2 ** -15],
    [0x3555, 0.333251953125],
    [0x7c00, Infinity],
    [0xfc00, -Infinity],
    [0x0000, 0],
  ];
  const entry: TensorEntry = {
    name: "h",
    dtype: "F16",
    shape: [cases.length],
    bytes: leU16(...cases.map(([h]) => h)),
  };
  const got = await run(toFloat32(entry));
  assertEquals(Array.from(got), cases.map(([, v]) => v));
  const neg0 = await run(toFloat32({ name: "n", dtype: "F16", shape: [], bytes: leU16(0x8000) }));
  assert(Object.is(neg0[0], -0));
  // NaNs decode to NaN with the payload moved into the top of the f32 mantissa.
  const nans = await run(
    toFloat32({ name: "nan", dtype: "F16", shape: [3], bytes: leU16(0x7e00, 0xfc01, 0x7d55) }),
  );
  assertEquals(bitsOf(nans), [0x7fc00000, 0xff802000, 0x7faaa000]);
});

/** Independent reference: the value of f16 bits by arithmetic. */
const f16Value = (h: number): number => {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m === 0 ? s * Infinity : NaN;
  return s * (1 + m / 1024) * 2 ** (e - 15);
};

Deno.test("F16: all 65536 bit patterns decode exactly and re-encode to themselves", async () => {
  const all = new Uint16Array(65536).map((_, i) => i);
  const bytes = new Uint8Array(all.buffer.slice(0));
  const dec = await run(toFloat32({ name: "all", dtype: "F16", shape: [65536], bytes }));
  const enc = u16sOf(fromFloat32("all", dec, [65536], "F16").bytes);
  for (let h = 0; h < 65536; h++) {
    const want = f16Value(h);
    if (Number.isNaN(want)) {
      assert(Number.isNaN(dec[h]), `f16 ${h.toString(16)} should be NaN`);
      assertEquals(enc[h] | 0x200, h | 0x200); // sign and payload kept, quiet bit set
    } else {
      assert(Object.is(dec[h], want), `f16 ${h.toString(16)}: got ${dec[h]}, want ${want}`);
      assertEquals(enc[h], h);
    }
  }
});

Deno.test("F16 encoding is round-to-nearest-even for random f32 (property)", () => {
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 0xffffffff }), (bits) => {
      const x = f32FromBits(bits)[0];
      const [h] = u16sOf(fromFloat32("x", f32FromBits(bits), [1], "F16").bytes);
      if (Number.isNaN(x)) return assertEquals(Number.isNaN(f16Value(h)), true);
      assertEquals(h >>> 15, bits >>> 31); // sign kept (also for zeros)
      const ax = Math.abs(x);
      const mag = h & 0x7fff;
      const v = f16Value(mag);
      if (ax >= 65520) return assertEquals(mag, 0x7c00);
      assert(mag < 0x7c00, `finite ${x} must not overflow`);
      const next = mag + 1 <= 0x7bff ? f16Value(mag + 1) : 65536;
      const prev = mag > 0 ? f16Value(mag - 1) : -v;
      const hi = (v + next) / 2;
      const lo = (prev + v) / 2;
      assert(ax <= hi && ax >= lo, `${x} -> ${v} is not nearest`);
      if (ax === hi || (ax === lo && mag > 0)) assertEquals(mag & 1, 0, `tie ${x} not to even`);
    }),
    { numRuns: 2000 },
  );
});

const BF16_CASES: [string, number, number][] = [
  ["1.0", 0x3f800000, 0x3f80],
  ["-2.0", 0xc0000000, 0xc000],
  ["+inf", 0x7f800000, 0x7f80],
  ["-inf", 0xff800000, 0xff80],
  ["-0", 0x80000000, 0x8000],
  ["1+2^-8 ties to even 1", 0x3f808000, 0x3f80],
  ["1+3*2^-8 ties to even 1+2^-6", 0x3f818000, 0x3f82],
  ["just above the tie rounds up", 0x3f808001, 0x3f81],
  ["just below the tie rounds down", 0x3f807fff, 0x3f80],
  ["f32 max rounds to inf", 0x7f7fffff, 0x7f80],
  ["65504", 0x477fe000, 0x4780],
  ["pi", 0x40490fdb, 0x4049],
  ["f32 min subnormal -> 0", 0x00000001, 0x0000],
];

Deno.test("BF16 encoding matches hand-written bit patterns; NaN stays NaN", () => {
  for (const [label, bits, want] of BF16_CASES) {
    assertEquals(u16sOf(fromFloat32("b", f32FromBits(bits), [1], "BF16").bytes), [want], label);
  }
  for (const nanBits of [0x7fc00000, 0xffc00000, 0x7f800001, 0xff80ffff, 0x7fffffff]) {
    const [b] = u16sOf(fromFloat32("b", f32FromBits(nanBits), [1], "BF16").bytes);
    assertEquals(b & 0x7f80, 0x7f80);
    assert((b & 0x7f) !== 0, `f32 NaN ${nanBits.toString(16)} became bf16 ${b.toString(16)}`);
    assertEquals(b >>> 15, nanBits >>> 31);
  }
});

Deno.test("BF16 decoding is exact and encoding is nearest-even (property)", async () => {
  const dec = await run(
    toFloat32({
      name: "b",
      dtype: "BF16",
      shape: [4],
      bytes: leU16(0x3f80, 0xc000, 0x0001, 0xff80),
    }),
  );
  assertEquals(Array.from(dec), [1, -2, 2 ** -133, -Infinity]);
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 0xffffffff }), (bits) => {
      const x = f32FromBits(bits)[0];
      const [b] = u16sOf(fromFloat32("x", f32FromBits(bits), [1], "BF16").bytes);
      const v = f32FromBits(b << 16)[0];
      if (Number.isNaN(x)) return assert(Number.isNaN(v));
      // Neighbours: the bf16 values one step towards and away from zero.
      const mag = b & 0x7fff;
      const ax = Math.abs(x);
      const av = Math.abs(v);
      const next = mag < 0x7f80 ? f32FromBits((mag + 1) << 16)[0] : Infinity;
      const prev = mag > 0 ? f32FromBits((mag - 1) << 16)[0] : -av;
      if (av === Infinity) {
        // Only values at or above the tie between f32-max-bf16 (0x7f7f) and 2^128 overflow.
        const maxFinite = f32FromBits(0x7f7f << 16)[0];
        return assert(ax === Infinity || ax >= maxFinite + 2 ** 119);
      }
      assert(ax <= (av + next) / 2 && ax >= (prev + av) / 2, `${x} -> ${v} is not nearest`);
      if (ax === (av + next) / 2 || (ax === (prev + av) / 2 && mag > 0)) {
        assertEquals(mag & 1, 0, `tie ${x} not to even`);
      }
    }),
    { numRuns: 2000 },
  );
});

Deno.test("F64 decodes with float32 rounding; integer dtypes via toInt32", async () => {
  const f64 = new Float64Array([1.5, 1 / 3, 1e300, -0.1]);
  const e64: TensorEntry = {
    name: "d",
    dtype: "F64",
    shape: [4],
    bytes: new Uint8Array(f64.buffer),
  };
  assertEquals(Array.from(await run(toFloat32(e64))), Array.from(new Float32Array(f64)));

  const i64 = new BigInt64Array([0n, -5n, 2147483647n, -2147483648n]);
  const ok = await run(
    toInt32({ name: "ids", dtype: "I64", shape: [2, 2], bytes: new Uint8Array(i64.buffer) }),
  );
  assertEquals(Array.from(ok), [0, -5, 2147483647, -2147483648]);
  const big = new BigInt64Array([1n, 2147483648n]);
  const err = await failure(
    toInt32({ name: "ids", dtype: "I64", shape: [2], bytes: new Uint8Array(big.buffer) }),
  );
  assert(err.message.includes('"ids"') && err.message.includes("index 1"), err.message);

  const bytes = new Uint8Array([0, 1, 255, 128]);
  assertEquals(Array.from(await run(toInt32({ name: "u", dtype: "U8", shape: [4], bytes }))), [
    0,
    1,
    255,
    128,
  ]);
  assertEquals(Array.from(await run(toInt32({ name: "i", dtype: "I8", shape: [4], bytes }))), [
    0,
    1,
    -1,
    -128,
  ]);
  assertEquals(
    Array.from(await run(toInt32({ name: "s", dtype: "I16", shape: [2], bytes }))),
    [256, -32513],
  );
  assertEquals(
    Array.from(await run(toInt32({ name: "s", dtype: "U16", shape: [2], bytes }))),
    [256, 33023],
  );
  const ints = new Int32Array([3, -7, 2 ** 31 - 1]);
  const ie = fromInt32("pos", ints, [3]);
  assertEquals(ie.dtype, "I32");
  assertEquals(Array.from(await run(toInt32(ie))), Array.from(ints));
  // Wrong conversion direction and inconsistent entries are typed errors.
  const wrong = await failure(toFloat32(ie));
  assert(wrong instanceof SafetensorsError && wrong.message.includes('"pos"'), wrong.message);
  const short = await failure(
    toFloat32({ name: "w", dtype: "F32", shape: [3], bytes: new Uint8Array(8) }),
  );
  assert(short.message.includes('"w"') && short.message.includes("12"), short.message);
  // Unaligned views (offset 1 into a buffer) decode correctly.
  const unaligned = new Uint8Array(9).subarray(1);
  unaligned.set([0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]);
  assertEquals(
    Array.from(await run(toFloat32({ name: "u", dtype: "F32", shape: [2], bytes: unaligned }))),
    [1, -2],
  );
});

Deno.test("fromFloat32 rejects a shape that does not match the data", () => {
  let caught: unknown;
  try {
    fromFloat32("w", new Float32Array(5), [2, 2]);
  } catch (e) {
    caught = e;
  }
  assert(caught instanceof SafetensorsError && caught.message.includes('"w"'));
});

Deno.test("requireFinite names the tensor, first bad index and value", async () => {
  const ok = new Float32Array([1, 2, -3]);
  assertEquals(await run(requireFinite("fine", ok)), ok);
  const nan = await failure(requireFinite("lora_A", new Float32Array([0, 1, NaN, Infinity])));
  assert(nan instanceof NonFiniteTensorError);
  assertEquals([nan._tag, nan.tensor, nan.index], ["NonFiniteTensorError", "lora_A", 2]);
  assert(Number.isNaN(nan.value));
  assert(
    nan.message.includes("lora_A") && nan.message.includes("NaN") && nan.message.includes("2"),
  );
  const inf = await failure(requireFinite("lora_B", new Float32Array([0, -Infinity])));
  assertEquals([inf.tensor, inf.index, inf.value], ["lora_B", 1, -Infinity]);
  assert(inf.message.includes("-Infinity") && inf.message.includes("index 1"), inf.message);
});

// ---------------------------------------------------------------------------------------------
// Malformed input: one test per failure

const f32Entry = (begin: number, end: number, shape: number[] = [(end - begin) / 4]) => ({
  dtype: "F32",
  shape,
  data_offsets: [begin, end],
});

Deno.test("malformed: file shorter than 8 bytes", async () => {
  await expectParseError(new Uint8Array(5), null, "shorter than");
  await expectParseError(new Uint8Array(0), null, "0 bytes");
});

Deno.test("malformed: header length past end of file", async () => {
  await expectParseError(rawFile("{}", 0, 1000), null, "1000", "past the end");
});

Deno.test("malformed: header length over 100 MB", async () => {
  await expectParseError(rawFile("{}", 0, 100_000_008), null, "100000008", "limit");
  await expectParseError(rawFile("{}", 0, 2n ** 64n - 1n), null, "limit");
});

Deno.test("malformed: header not starting with '{'", async () => {
  await expectParseError(rawFile("[]"), null, 'start with "{"');
  await expectParseError(rawFile(" {}"), null, 'start with "{"');
  await expectParseError(rawFile(""), null, 'start with "{"');
  await expectParseError(rawFile("\uFEFF{}"), null, 'start with "{"');
});

Deno.test("malformed: header not valid UTF-8", async () => {
  const buf = rawFile("{  }");
  buf[9] = 0xff;
  await expectParseError(buf, null, "UTF-8");
});

Deno.test("malformed: header not valid JSON", async () => {
  await expectParseError(rawFile('{"a":'), null, "not valid JSON");
  await expectParseError(rawFile('{"a":1} x'), null, "not valid JSON");
});

Deno.test("malformed: entry missing or mistyped dtype/shape/data_offsets", async () => {
  await expectParseError(rawFile({ w: { shape: [1], data_offsets: [0, 4] } }, 4), "w", '"dtype"');
  await expectParseError(rawFile({ w: { dtype: "F32", data_offsets: [0, 4] } }, 4), "w", '"shape"');
  await expectParseError(rawFile({ w: { dtype: "F32", shape: [1] } }, 4), "w", '"data_offsets"');
  await expectParseError(
    rawFile({ w: { dtype: 4, shape: [1], data_offsets: [0, 4] } }, 4),
    "w",
    '"dtype"',
  );
  await expectParseError(
    rawFile({ w: { dtype: "F32", shape: "1", data_offsets: [0, 4] } }, 4),
    "w",
    '"shape"',
  );
  await expectParseError(
    rawFile({ w: { dtype: "F32", shape: [1], data_offsets: [0] } }, 4),
    "w",
    '"data_offsets"',
  );
  await expectParseError(
    rawFile({ w: { dtype: "F32", shape: [1], data_offsets: [0, "4"] } }, 4),
    "w",
    '"data_offsets"',
  );
  await expectParseError(rawFile({ w: [1, 2] }, 0), "w", "must be an object");
  await expectParseError(rawFile({ w: null }, 0), "w", "must be an object");
});

Deno.test("malformed: unknown dtype", async () => {
  await expectParseError(
    rawFile({ w: { dtype: "F128", shape: [1], data_offsets: [0, 16] } }, 16),
    "w",
    "unknown dtype",
    "F128",
  );
  await expectParseError(
    rawFile({ w: { dtype: "f32", shape: [1], data_offsets: [0, 4] } }, 4),
    "w",
    "unknown dtype",
  );
});

Deno.test("malformed: negative or non-integer dims", async () => {
  await expectParseError(rawFile({ w: f32Entry(0, 4, [-1]) }, 4), "w", '"shape"', "-1");
  await expectParseError(rawFile({ w: f32Entry(0, 4, [1.5]) }, 4), "w", '"shape"', "1.5");
});

Deno.test("malformed: data_offsets with begin > end or negative", async () => {
  await expectParseError(
    rawFile({ w: { dtype: "F32", shape: [1], data_offsets: [8, 4] } }, 8),
    "w",
    "begin > end",
  );
  await expectParseError(
    rawFile({ w: { dtype: "F32", shape: [1], data_offsets: [-4, 0] } }, 8),
    "w",
    '"data_offsets"',
  );
});

Deno.test("malformed: shape/length mismatch", async () => {
  await expectParseError(rawFile({ w: f32Entry(0, 8, [3]) }, 8), "w", "length mismatch", "12");
  await expectParseError(
    rawFile({ w: { dtype: "BF16", shape: [2, 2], data_offsets: [0, 4] } }, 4),
    "w",
    "length mismatch",
  );
});

Deno.test("malformed: offsets out of bounds", async () => {
  await expectParseError(rawFile({ w: f32Entry(0, 8) }, 4), "w", "out of bounds");
  await expectParseError(
    rawFile({ a: f32Entry(0, 4), b: f32Entry(4, 8) }, 6),
    "b",
    "out of bounds",
  );
});

Deno.test("malformed: overlapping tensors", async () => {
  const e = await expectParseError(
    rawFile({ a: f32Entry(0, 8), b: f32Entry(4, 12) }, 12),
    "b",
    "overlap",
    '"a"',
  );
  assertEquals(e.tensor, "b");
  await expectParseError(rawFile({ a: f32Entry(0, 8), b: f32Entry(0, 8) }, 8), "b", "overlap");
  // A zero-size tensor placed inside another one also overlaps it.
  await expectParseError(rawFile({ a: f32Entry(0, 8), z: f32Entry(4, 4) }, 8), "z", "overlap");
});

Deno.test("malformed: gaps between or before tensors", async () => {
  await expectParseError(rawFile({ a: f32Entry(0, 4), b: f32Entry(8, 12) }, 12), "b", "gap of 4");
  await expectParseError(rawFile({ a: f32Entry(4, 8) }, 8), "a", "gap of 4");
  const u8 = (begin: number) => ({ dtype: "U8", shape: [1], data_offsets: [begin, begin + 1] });
  await expectParseError(rawFile({ a: u8(0), b: u8(2) }, 3), "b", "gap of 1");
});

Deno.test("malformed: trailing bytes after the last tensor", async () => {
  await expectParseError(rawFile({ a: f32Entry(0, 4) }, 8), null, "4 trailing bytes");
  await expectParseError(rawFile({}, 3), null, "3 trailing bytes");
  // Out-of-order entries that do tile the region are fine.
  const ok = await run(parseSafetensors(rawFile({ b: f32Entry(4, 8), a: f32Entry(0, 4) }, 8)));
  assertEquals([...ok.tensors.keys()].sort(), ["a", "b"]);
});

Deno.test("malformed: __metadata__ not an object of strings", async () => {
  await expectParseError(rawFile({ __metadata__: { format: 1 } }), null, "__metadata__", "format");
  await expectParseError(rawFile({ __metadata__: ["pt"] }), null, "__metadata__");
  await expectParseError(rawFile({ __metadata__: "pt" }), null, "__metadata__");
  await expectParseError(rawFile({ __metadata__: { a: null } }), null, "__metadata__");
});

Deno.test("serialize rejects duplicate/reserved names and inconsistent entries", () => {
  const a = fromFloat32("a", new Float32Array([1]), [1]);
  const cases: [TensorEntry[], string][] = [
    [[a, a], "duplicate"],
    [[{ ...a, name: "__metadata__" }], "reserved"],
    [[{ ...a, shape: [2] }], "needs 8"],
    [[{ ...a, shape: [-1] }], "shape"],
    [[{ ...a, dtype: "F17" as SafeDType }], "unknown dtype"],
  ];
  for (const [tensors, word] of cases) {
    let caught: unknown;
    try {
      serializeSafetensors(tensors);
    } catch (e) {
      caught = e;
    }
    assert(caught instanceof SafetensorsError, `${word}: ${caught}`);
    assert(caught.message.includes(word), caught.message);
  }
});

// ---------------------------------------------------------------------------------------------
// Files and checkpoints

const sampleTensors = (): TensorEntry[] => [
  fromFloat32("model.embed_tokens.weight", new Float32Array([1, 2, 3, 4, 5, 6]), [3, 2]),
  fromFloat32("model.norm.weight", new Float32Array([0.5, -0.25]), [2], "BF16"),
  fromFloat32("lm_head.weight", new Float32Array(10).map((_, i) => i / 7), [5, 2], "F16"),
  fromInt32("positions", new Int32Array([0, 1, 2]), [3]),
  fromFloat32("empty", new Float32Array(0), [0, 4]),
  fromFloat32("big", new Float32Array(40).map((_, i) => i - 20), [40]),
];

const listDir = async (dir: string): Promise<string[]> => (await fs.readdir(dir)).sort();

Deno.test("writeSafetensorsFile/readSafetensorsFile round-trip, atomic, no temp files", () =>
  withTempDir(async (dir) => {
    const p = nodePath.join(dir, "adapter_model.safetensors");
    const tensors = sampleTensors();
    await run(writeSafetensorsFile(p, tensors, { format: "pt", step: "3" }));
    assertEquals(await listDir(dir), ["adapter_model.safetensors"]);
    const back = await run(readSafetensorsFile(p));
    sameTensors(back.tensors, tensors);
    assertEquals(back.metadata, { format: "pt", step: "3" });
    // Overwrite replaces the file, still no temp files.
    await run(writeSafetensorsFile(p, tensors.slice(0, 1)));
    assertEquals(await listDir(dir), ["adapter_model.safetensors"]);
    sameTensors((await run(readSafetensorsFile(p))).tensors, tensors.slice(0, 1));
  }));

Deno.test("plain writes (a pushed version's files): the same bytes as atomic ones, one file, never over an existing one", () =>
  withTempDir(async (dir) => {
    const tensors = sampleTensors();
    const atomic = nodePath.join(dir, "a.safetensors");
    const plain = nodePath.join(dir, "p.safetensors");
    await run(writeSafetensorsFile(atomic, tensors, { format: "pt" }));
    await run(writeSafetensorsFile(plain, tensors, { format: "pt" }, "plain"));
    assertEquals(await fs.readFile(plain), await fs.readFile(atomic));
    assertEquals(await listDir(dir), ["a.safetensors", "p.safetensors"]);
    // a fresh directory is written once: an existing file is a typed error, left as it was
    const e = await run(Effect.flip(writeSafetensorsFile(plain, tensors.slice(0, 1), {}, "plain")));
    assert(e instanceof CheckpointError, String(e));
    assert(e.message.includes("p.safetensors"), e.message);
    assertEquals(await fs.readFile(plain), await fs.readFile(atomic));
  }));

Deno.test("atomic write failures are typed and leave no temp file or torn target", () =>
  withTempDir(async (dir) => {
    // Target is a non-empty directory: the rename fails after the temp file was written.
    const target = nodePath.join(dir, "target.safetensors");
    await fs.mkdir(target);
    await fs.writeFile(nodePath.join(target, "keep"), "x");
    const e = await failure(writeSafetensorsFile(target, sampleTensors()));
    assert(e instanceof CheckpointError, String(e));
    assertEquals(e.path, target);
    assert(e.message.includes(target), e.message);
    assertEquals(await listDir(dir), ["target.safetensors"]);
    // Missing parent directory.
    const missing = nodePath.join(dir, "no", "such", "x.safetensors");
    const e2 = await failure(writeSafetensorsFile(missing, sampleTensors()));
    assert(e2 instanceof CheckpointError && e2.reason.includes("ENOENT"), e2.message);
    // Invalid tensors fail before anything is written; an existing file stays intact.
    const good = nodePath.join(dir, "good.safetensors");
    await run(writeSafetensorsFile(good, sampleTensors()));
    const before = await fs.readFile(good);
    const a = sampleTensors()[0];
    const e3 = await failure(writeSafetensorsFile(good, [a, a]));
    assert(e3 instanceof SafetensorsError && e3.message.includes("duplicate"), e3.message);
    assertEquals(Array.from(await fs.readFile(good)), Array.from(before));
    assertEquals(await listDir(dir), ["good.safetensors", "target.safetensors"]);
  }));

Deno.test("readSafetensorsFile: missing file and corrupt file are typed errors", () =>
  withTempDir(async (dir) => {
    const p = nodePath.join(dir, "nope.safetensors");
    const e = await failure(readSafetensorsFile(p));
    assert(e instanceof CheckpointError && e.path === p && e.reason.includes("ENOENT"), e.message);
    await fs.writeFile(p, rawFile({ a: f32Entry(0, 4) }, 8));
    const e2 = await failure(readSafetensorsFile(p));
    assert(e2 instanceof SafetensorsError && e2.file === p && e2.message.includes(p), e2.message);
  }));

Deno.test("saveCheckpoint/loadCheckpoint: single file", () =>
  withTempDir(async (dir) => {
    const tensors = sampleTensors();
    const saved = await run(saveCheckpoint(dir, tensors));
    assertEquals(saved, { files: [SINGLE_FILE], totalSize: 220, sharded: false });
    assertEquals(await listDir(dir), [SINGLE_FILE]);
    const loaded = await run(loadCheckpoint(dir));
    assertEquals(loaded.sharded, false);
    assertEquals(loaded.files, [SINGLE_FILE]);
    assertEquals(loaded.metadata, { format: "pt" });
    sameTensors(loaded.tensors, tensors);
  }));

Deno.test("saveCheckpoint/loadCheckpoint: shards plus index round-trip", () =>
  withTempDir(async (dir) => {
    const tensors = sampleTensors();
    const sub = nodePath.join(dir, "ckpt"); // created by saveCheckpoint
    const saved = await run(
      saveCheckpoint(sub, tensors, { maxShardBytes: 40, metadata: { v: "1" } }),
    );
    // Greedy in order, 40-byte limit: [24+4] [20+12+0] [160].
    const names = [1, 2, 3].map((i) => `model-0000${i}-of-00003.safetensors`);
    assertEquals(saved, { files: names, totalSize: 220, sharded: true });
    assertEquals(await listDir(sub), [...names, INDEX_FILE].sort());
    const index = JSON.parse(await fs.readFile(nodePath.join(sub, INDEX_FILE), "utf8"));
    assertEquals(index.metadata, { total_size: 220 });
    assertEquals(index.weight_map, {
      "big": names[2],
      "empty": names[1],
      "lm_head.weight": names[1],
      "model.embed_tokens.weight": names[0],
      "model.norm.weight": names[0],
      "positions": names[1],
    });
    assertEquals(Object.keys(index.weight_map), Object.keys(index.weight_map).sort());
    const loaded = await run(loadCheckpoint(sub));
    assertEquals(loaded.sharded, true);
    assertEquals(loaded.files, names);
    assertEquals(loaded.metadata, { v: "1" });
    sameTensors(loaded.tensors, tensors);
  }));

Deno.test("saveCheckpoint: random tensor sets and shard limits round-trip (property)", () =>
  withTempDir(async (root) => {
    let k = 0;
    await fc.assert(
      fc.asyncProperty(tensorSetArb, fc.integer({ min: 1, max: 200 }), async (tensors, max) => {
        const dir = nodePath.join(root, `c${k++}`);
        const saved = await run(saveCheckpoint(dir, tensors, { maxShardBytes: max }));
        for (const f of saved.files) {
          const c = await run(readSafetensorsFile(nodePath.join(dir, f)));
          const bytes = [...c.tensors.values()].reduce((s, t) => s + t.bytes.length, 0);
          assert(bytes <= max || c.tensors.size === 1, `${f} holds ${bytes} > ${max} bytes`);
        }
        sameTensors((await run(loadCheckpoint(dir))).tensors, tensors);
        await fs.rm(dir, { recursive: true });
      }),
      { numRuns: 40 },
    );
  }));

Deno.test("saveCheckpoint removes stale files of an earlier save in the same directory", () =>
  withTempDir(async (dir) => {
    const tensors = sampleTensors();
    await run(saveCheckpoint(dir, tensors, { maxShardBytes: 40 }));
    await fs.writeFile(nodePath.join(dir, "config.json"), "{}");
    await run(saveCheckpoint(dir, tensors));
    assertEquals(await listDir(dir), ["config.json", SINGLE_FILE]);
    await run(saveCheckpoint(dir, tensors, { maxShardBytes: 100 }));
    assertEquals(await listDir(dir), [
      "config.json",
      "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors",
      INDEX_FILE,
    ]);
    sameTensors((await run(loadCheckpoint(dir))).tensors, tensors);
    const bad = await failure(saveCheckpoint(dir, tensors, { maxShardBytes: 0 }));
    assert(bad instanceof CheckpointError && bad.message.includes("maxShardBytes"));
  }));

/** Writes a sharded checkpoint, lets `mutate` break it, returns loadCheckpoint's error. */
const brokenIndex = async (
  mutate: (dir: string, index: { weight_map: Record<string, unknown> }) => Promise<unknown>,
): Promise<{ dir: string; error: CheckpointError | SafetensorsError }> => {
  const dir = await Deno.makeTempDir({ prefix: "lorafold-idx-" });
  try {
    await run(saveCheckpoint(dir, sampleTensors(), { maxShardBytes: 40 }));
    const ip = nodePath.join(dir, INDEX_FILE);
    const index = JSON.parse(await fs.readFile(ip, "utf8"));
    const replaced = await mutate(dir, index);
    await fs.writeFile(ip, typeof replaced === "string" ? replaced : JSON.stringify(index));
    return { dir, error: await failure(loadCheckpoint(dir)) };
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
};

const SHARD1 = "model-00001-of-00003.safetensors";
const SHARD2 = "model-00002-of-00003.safetensors";

Deno.test("sharded index: invalid JSON or wrong shape", async () => {
  for (
    const [text, word] of [
      ["{not json", "not valid UTF-8 JSON"],
      ["[1,2]", "must be a JSON object"],
      ['{"metadata":{}}', '"weight_map"'],
      ['{"weight_map":[]}', '"weight_map"'],
      ['{"metadata":[],"weight_map":{}}', '"metadata"'],
      ['{"metadata":{"total_size":"12"},"weight_map":{}}', "total_size"],
    ]
  ) {
    const { dir, error } = await brokenIndex(() => Promise.resolve(text));
    assert(error instanceof CheckpointError, `${text}: ${error}`);
    assertEquals(error.path, nodePath.join(dir, INDEX_FILE));
    assert(error.message.includes(word) && error.message.includes(INDEX_FILE), error.message);
  }
  const { error } = await brokenIndex((_, index) => {
    index.weight_map["big"] = 7;
    return Promise.resolve();
  });
  assert(error instanceof CheckpointError && error.tensor === "big", error.message);
  const { error: trav } = await brokenIndex((_, index) => {
    index.weight_map["big"] = "../model-00003-of-00003.safetensors";
    return Promise.resolve();
  });
  assert(trav instanceof CheckpointError && trav.message.includes("not a plain file name"));
});

Deno.test("sharded index: a listed shard does not exist", async () => {
  const { dir, error } = await brokenIndex((dir) => fs.rm(nodePath.join(dir, SHARD2)));
  assert(error instanceof CheckpointError, String(error));
  assertEquals(error.path, nodePath.join(dir, SHARD2));
  assert(error.message.includes(SHARD2) && error.message.includes("does not exist"), error.message);
});

Deno.test("sharded index: weight_map entry not found in its shard", async () => {
  const { dir, error } = await brokenIndex((_, index) => {
    index.weight_map["big"] = SHARD1;
    return Promise.resolve();
  });
  assert(error instanceof CheckpointError, String(error));
  assertEquals([error.tensor, error.path], ["big", nodePath.join(dir, SHARD1)]);
  assert(error.message.includes('"big"') && error.message.includes(SHARD1), error.message);
  const { error: ghost } = await brokenIndex((_, index) => {
    index.weight_map["ghost.weight"] = SHARD2;
    return Promise.resolve();
  });
  assert(ghost instanceof CheckpointError && ghost.tensor === "ghost.weight", ghost.message);
});

Deno.test("sharded index: a tensor stored in two shards", async () => {
  const { error } = await brokenIndex(async (dir) => {
    // Shard 2 gains a copy of shard 1's "model.norm.weight".
    const s1 = await run(readSafetensorsFile(nodePath.join(dir, SHARD1)));
    const s2 = await run(readSafetensorsFile(nodePath.join(dir, SHARD2)));
    const dup = s1.tensors.get("model.norm.weight")!;
    await run(writeSafetensorsFile(nodePath.join(dir, SHARD2), [...s2.tensors.values(), dup]));
  });
  assert(error instanceof CheckpointError, String(error));
  assertEquals(error.tensor, "model.norm.weight");
  assert(
    error.message.includes("two shards") && error.message.includes(SHARD1) &&
      error.message.includes(SHARD2),
    error.message,
  );
});

Deno.test("sharded index: a corrupt shard is a SafetensorsError naming the shard", async () => {
  const { dir, error } = await brokenIndex((dir) =>
    fs.writeFile(nodePath.join(dir, SHARD2), new Uint8Array(3))
  );
  assert(error instanceof SafetensorsError, String(error));
  assertEquals(error.file, nodePath.join(dir, SHARD2));
});

Deno.test("loadCheckpoint: directory with neither or both layouts", () =>
  withTempDir(async (dir) => {
    const none = await failure(loadCheckpoint(dir));
    assert(none instanceof CheckpointError && none.message.includes("no checkpoint"), none.message);
    const gone = await failure(loadCheckpoint(nodePath.join(dir, "missing")));
    assert(gone instanceof CheckpointError, String(gone));
    await run(saveCheckpoint(dir, sampleTensors(), { maxShardBytes: 40 }));
    await run(writeSafetensorsFile(nodePath.join(dir, SINGLE_FILE), sampleTensors()));
    const both = await failure(loadCheckpoint(dir));
    assert(both instanceof CheckpointError && both.message.includes("ambiguous"), both.message);
  }));
