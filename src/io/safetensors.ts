/**
 * The safetensors format: parsing with full header validation, serialization, and dtype
 * conversion between raw little-endian tensor bytes and Float32Array / Int32Array.
 *
 * Layout: 8-byte little-endian u64 header length N; N bytes of UTF-8 JSON starting with "{" (the
 * writer pads it with spaces to a multiple of 8); then the data region. Each entry is
 * `{dtype, shape, data_offsets: [begin, end)}` relative to the data start; entries tile the data
 * region contiguously from 0 to exactly the end of the file. `__metadata__` holds string values.
 * @module
 */
import { Effect } from "effect";
import { tryTagged } from "../base/tagged_error.ts";
import { NonFiniteTensorError, SafetensorsError } from "./errors.ts";

export { NonFiniteTensorError, SafetensorsError } from "./errors.ts";

/** Element types of the safetensors format. */
export type SafeDType =
  | "BOOL"
  | "U8"
  | "I8"
  | "F8_E5M2"
  | "F8_E4M3"
  | "I16"
  | "U16"
  | "F16"
  | "BF16"
  | "I32"
  | "U32"
  | "F32"
  | "F64"
  | "I64"
  | "U64";

/** Bytes per element of each dtype. */
export const DTYPE_SIZES: Readonly<Record<SafeDType, number>> = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
};

/** True when `s` names a safetensors dtype. */
export const isSafeDType = (s: unknown): s is SafeDType =>
  typeof s === "string" && Object.prototype.hasOwnProperty.call(DTYPE_SIZES, s);

/** One tensor: raw little-endian, row-major bytes (may be a view into a file buffer). */
export interface TensorEntry {
  name: string;
  dtype: SafeDType;
  shape: number[];
  bytes: Uint8Array;
}

/** What a safetensors file holds. */
export interface SafetensorsContents {
  metadata: Record<string, string>;
  tensors: Map<string, TensorEntry>;
}

/** Largest accepted header, as in the reference implementation (100 MB). */
export const MAX_HEADER_BYTES = 100_000_000;

/** Name used in errors for in-memory buffers. */
const BUFFER = "<buffer>";

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

// ---------------------------------------------------------------------------------------------
// Scalar bit conversions (exported for callers that convert single values)

/** Bits of an IEEE binary16 value -> bits of the exactly equal binary32 value (NaN payload kept). */
export const f16BitsToF32Bits = (h: number): number => {
  const sign = (h & 0x8000) << 16;
  const exp = (h >>> 10) & 0x1f;
  let mant = h & 0x3ff;
  if (exp === 0x1f) return (sign | 0x7f800000 | (mant << 13)) >>> 0; // inf / NaN
  if (exp !== 0) return (sign | ((exp - 15 + 127) << 23) | (mant << 13)) >>> 0;
  if (mant === 0) return sign >>> 0; // ±0
  // Subnormal: value = mant * 2^-24; normalise the significand.
  let e = -14;
  while ((mant & 0x400) === 0) {
    mant <<= 1;
    e--;
  }
  return (sign | ((e + 127) << 23) | ((mant & 0x3ff) << 13)) >>> 0;
};

/**
 * Bits of a binary32 value -> bits of binary16, rounding to nearest even; values beyond the
 * largest finite half (65504, after rounding) become ±inf; tiny values become subnormals or ±0.
 * NaN stays NaN (quiet, sign and upper payload bits kept).
 */
export const f32BitsToF16Bits = (x: number): number => {
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign; // below half the smallest subnormal: rounds to ±0
    const m = mant | 0x800000;
    const shift = 14 - e; // 14..24 bits dropped
    let r = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && (r & 1) === 1)) r++;
    return sign | r; // r may carry into the smallest normal: still the right encoding
  }
  let r = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (r & 1) === 1)) r++; // a carry may give inf: correct
  return sign | r;
};

/** Bits of a binary32 value -> bfloat16 bits (round to nearest even; NaN stays a quiet NaN). */
export const f32BitsToBf16Bits = (x: number): number => {
  x >>>= 0;
  if ((x & 0x7f800000) === 0x7f800000 && (x & 0x7fffff) !== 0) return (x >>> 16) | 0x40;
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
};

let f16Table: Int32Array | undefined;
const f16ToF32Table = (): Int32Array => {
  if (f16Table === undefined) {
    f16Table = new Int32Array(65536);
    for (let h = 0; h < 65536; h++) f16Table[h] = f16BitsToF32Bits(h);
  }
  return f16Table;
};

// ---------------------------------------------------------------------------------------------
// Helpers

/** Number of elements of a shape (product of dims; 1 for a scalar). Dims must be validated. */
export const elementCount = (shape: readonly number[]): number => {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
};

const validDims = (shape: unknown): shape is number[] =>
  Array.isArray(shape) &&
  shape.every((d) => typeof d === "number" && Number.isSafeInteger(d) && d >= 0);

/** Exact byte size as a BigInt (no overflow for huge shapes). */
const byteSizeBig = (shape: readonly number[], dtype: SafeDType): bigint => {
  let n = BigInt(DTYPE_SIZES[dtype]);
  for (const d of shape) n *= BigInt(d);
  return n;
};

const show = (v: unknown): string => {
  let s: string;
  try {
    s = JSON.stringify(v) ?? String(v);
  } catch {
    s = String(v);
  }
  return s.length > 80 ? `${s.slice(0, 77)}...` : s;
};

/** Runs a synchronous body that signals failure by throwing SafetensorsError. */
const guard = <A>(body: () => A): Effect.Effect<A, SafetensorsError> =>
  tryTagged(body, SafetensorsError);

/** Copy of `bytes` into a fresh (aligned) buffer in native element order. */
const nativeCopy = (bytes: Uint8Array, elemSize: number): ArrayBuffer => {
  const copy = new Uint8Array(bytes.length);
  copy.set(bytes);
  if (!LITTLE_ENDIAN && elemSize > 1) {
    for (let i = 0; i < copy.length; i += elemSize) copy.subarray(i, i + elemSize).reverse();
  }
  return copy.buffer;
};

/** Little-endian bytes of a native typed array (copied). */
const leBytes = (arr: ArrayBufferView, elemSize: number): Uint8Array => {
  const out = new Uint8Array(arr.byteLength);
  out.set(new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength));
  if (!LITTLE_ENDIAN && elemSize > 1) {
    for (let i = 0; i < out.length; i += elemSize) out.subarray(i, i + elemSize).reverse();
  }
  return out;
};

/** Checks an entry's shape and byte length (entries may be built by hand). */
const checkEntry = (entry: TensorEntry, file: string): number => {
  const fail = (reason: string): never => {
    throw new SafetensorsError({ file, tensor: entry.name, reason });
  };
  if (!isSafeDType(entry.dtype)) fail(`unknown dtype ${show(entry.dtype)}`);
  if (!validDims(entry.shape)) {
    fail(`shape must be an array of non-negative integers, got ${show(entry.shape)}`);
  }
  if (!(entry.bytes instanceof Uint8Array)) fail("bytes must be a Uint8Array");
  const need = byteSizeBig(entry.shape, entry.dtype);
  if (BigInt(entry.bytes.length) !== need) {
    fail(
      `holds ${entry.bytes.length} bytes but shape [${entry.shape}] of ${entry.dtype} needs ${need}`,
    );
  }
  return elementCount(entry.shape);
};

// ---------------------------------------------------------------------------------------------
// Parsing

interface RawEntry {
  name: string;
  dtype: SafeDType;
  shape: number[];
  begin: number;
  end: number;
}

const parseSync = (buf: Uint8Array, file: string): SafetensorsContents => {
  const fail = (reason: string, tensor: string | null = null): never => {
    throw new SafetensorsError({ file, tensor, reason });
  };
  if (buf.length < 8) fail(`file is ${buf.length} bytes, shorter than the 8-byte header length`);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const n64 = dv.getBigUint64(0, true);
  if (n64 > BigInt(MAX_HEADER_BYTES)) {
    fail(`header length ${n64} exceeds the ${MAX_HEADER_BYTES}-byte limit`);
  }
  const n = Number(n64);
  if (8 + n > buf.length) {
    fail(`header length ${n} extends past the end of the file (${buf.length} bytes)`);
  }
  if (n === 0 || buf[8] !== 0x7b) fail(`header does not start with "{"`);
  let text = "";
  try {
    text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(
      buf.subarray(8, 8 + n),
    );
  } catch {
    fail("header is not valid UTF-8");
  }
  let header: unknown;
  try {
    header = JSON.parse(text);
  } catch (e) {
    fail(`header is not valid JSON: ${(e as Error).message}`);
  }
  if (typeof header !== "object" || header === null || Array.isArray(header)) {
    fail("header is not a JSON object");
  }
  const dataStart = 8 + n;
  const dataLen = buf.length - dataStart;
  const metadata: Record<string, string> = {};
  const entries: RawEntry[] = [];
  for (const [name, v] of Object.entries(header as Record<string, unknown>)) {
    if (name === "__metadata__") {
      if (typeof v !== "object" || v === null || Array.isArray(v)) {
        fail(`"__metadata__" must be an object of strings, got ${show(v)}`);
      }
      for (const [k, s] of Object.entries(v as Record<string, unknown>)) {
        if (typeof s !== "string") {
          fail(`"__metadata__" value for key ${show(k)} must be a string, got ${show(s)}`);
        }
        Object.defineProperty(metadata, k, {
          value: s,
          enumerable: true,
          writable: true,
          configurable: true,
        });
      }
      continue;
    }
    const t = (reason: string): never => fail(reason, name);
    if (typeof v !== "object" || v === null || Array.isArray(v)) {
      t(`entry must be an object, got ${show(v)}`);
    }
    const o = v as Record<string, unknown>;
    for (const key of ["dtype", "shape", "data_offsets"]) {
      if (!Object.prototype.hasOwnProperty.call(o, key)) t(`entry is missing "${key}"`);
    }
    if (typeof o.dtype !== "string") t(`"dtype" must be a string, got ${show(o.dtype)}`);
    if (!isSafeDType(o.dtype)) t(`unknown dtype ${show(o.dtype)}`);
    const dtype = o.dtype as SafeDType;
    if (!validDims(o.shape)) {
      t(`"shape" must be an array of non-negative integers, got ${show(o.shape)}`);
    }
    const shape = (o.shape as number[]).slice();
    const offs = o.data_offsets;
    if (!Array.isArray(offs) || offs.length !== 2 || !validDims(offs)) {
      t(`"data_offsets" must be [begin, end] of two non-negative integers, got ${show(offs)}`);
    }
    const [begin, end] = offs as [number, number];
    if (begin > end) t(`data_offsets [${begin}, ${end}] have begin > end`);
    const need = byteSizeBig(shape, dtype);
    if (BigInt(end - begin) !== need) {
      t(
        `data_offsets [${begin}, ${end}] span ${end - begin} bytes but shape [${shape}] of ` +
          `${dtype} needs ${need} bytes (length mismatch)`,
      );
    }
    if (end > dataLen) {
      t(`data_offsets [${begin}, ${end}] are out of bounds: the data region is ${dataLen} bytes`);
    }
    entries.push({ name, dtype, shape, begin, end });
  }
  const sorted = entries.slice().sort((a, b) => a.begin - b.begin || a.end - b.end);
  let pos = 0;
  let prev: RawEntry | undefined;
  for (const e of sorted) {
    if (e.begin < pos && prev !== undefined) {
      fail(
        `data_offsets [${e.begin}, ${e.end}] overlap tensor "${prev.name}" at ` +
          `[${prev.begin}, ${prev.end}]`,
        e.name,
      );
    }
    if (e.begin > pos) {
      fail(
        `gap of ${e.begin - pos} bytes before data_offsets [${e.begin}, ${e.end}] ` +
          `(the previous tensor ends at ${pos})`,
        e.name,
      );
    }
    pos = e.end;
    prev = e;
  }
  if (pos !== dataLen) {
    fail(
      `${dataLen - pos} trailing bytes after the last tensor: data ends at ${pos} but the ` +
        `data region is ${dataLen} bytes`,
    );
  }
  const tensors = new Map<string, TensorEntry>();
  for (const e of entries) {
    tensors.set(e.name, {
      name: e.name,
      dtype: e.dtype,
      shape: e.shape,
      bytes: buf.subarray(dataStart + e.begin, dataStart + e.end),
    });
  }
  return { metadata, tensors };
};

/**
 * Parses a whole safetensors file held in memory. Tensor bytes are views into `buf`.
 * Fails with a SafetensorsError naming `file`, the tensor (when one is at fault) and the problem.
 */
export const parseSafetensors = (
  buf: Uint8Array,
  file: string = BUFFER,
): Effect.Effect<SafetensorsContents, SafetensorsError> => guard(() => parseSync(buf, file));

// ---------------------------------------------------------------------------------------------
// Serialization

/**
 * The 8-byte length prefix plus the space-padded JSON header for `tensors` laid out contiguously
 * in the given order. Throws SafetensorsError (a programming error) on duplicate or reserved
 * names, invalid shapes, byte lengths that do not match the shape, or non-string metadata.
 */
export const serializeHeader = (
  tensors: readonly TensorEntry[],
  metadata: Record<string, string> = { format: "pt" },
): Uint8Array => {
  const file = "<serialize>";
  const parts: string[] = [];
  const metaEntries = Object.entries(metadata);
  for (const [k, v] of metaEntries) {
    if (typeof v !== "string") {
      throw new SafetensorsError({
        file,
        tensor: null,
        reason: `"__metadata__" value for key ${show(k)} must be a string, got ${show(v)}`,
      });
    }
  }
  if (metaEntries.length > 0) {
    parts.push(
      `"__metadata__":{${
        metaEntries.map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v)}`).join(",")
      }}`,
    );
  }
  const seen = new Set<string>();
  let offset = 0;
  for (const t of tensors) {
    if (typeof t.name !== "string") {
      throw new SafetensorsError({ file, tensor: null, reason: `tensor name ${show(t.name)}` });
    }
    if (t.name === "__metadata__" || seen.has(t.name)) {
      throw new SafetensorsError({
        file,
        tensor: t.name,
        reason: t.name === "__metadata__" ? "reserved tensor name" : "duplicate tensor name",
      });
    }
    seen.add(t.name);
    checkEntry(t, file);
    const end = offset + t.bytes.length;
    parts.push(
      `${JSON.stringify(t.name)}:{"dtype":"${t.dtype}","shape":[${t.shape.join(",")}],` +
        `"data_offsets":[${offset},${end}]}`,
    );
    offset = end;
  }
  const json = new TextEncoder().encode(`{${parts.join(",")}}`);
  const n = Math.ceil(json.length / 8) * 8;
  if (n > MAX_HEADER_BYTES) {
    throw new SafetensorsError({
      file,
      tensor: null,
      reason: `header of ${n} bytes exceeds the ${MAX_HEADER_BYTES}-byte limit`,
    });
  }
  const out = new Uint8Array(8 + n).fill(0x20, 8 + json.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(n), true);
  out.set(json, 8);
  return out;
};

/**
 * A complete safetensors file: header (metadata defaults to {format:"pt"}; an empty object omits
 * `__metadata__`), then each tensor's bytes in the given order. Throws SafetensorsError on
 * invalid input (see {@link serializeHeader}).
 */
export const serializeSafetensors = (
  tensors: readonly TensorEntry[],
  metadata?: Record<string, string>,
): Uint8Array => {
  const header = serializeHeader(tensors, metadata);
  let total = header.length;
  for (const t of tensors) total += t.bytes.length;
  const out = new Uint8Array(total);
  out.set(header, 0);
  let pos = header.length;
  for (const t of tensors) {
    out.set(t.bytes, pos);
    pos += t.bytes.length;
  }
  return out;
};

// ---------------------------------------------------------------------------------------------
// Conversion

/**
 * Decodes an F32 / F16 / BF16 / F64 tensor into a fresh Float32Array. F16 and BF16 are exact
 * (subnormals, ±inf and NaN payloads kept); F64 rounds to nearest even. Other dtypes fail.
 */
export const toFloat32 = (
  entry: TensorEntry,
  file: string = BUFFER,
): Effect.Effect<Float32Array, SafetensorsError> =>
  guard(() => {
    const n = checkEntry(entry, file);
    switch (entry.dtype) {
      case "F32":
        return new Float32Array(nativeCopy(entry.bytes, 4));
      case "F16": {
        const src = new Uint16Array(nativeCopy(entry.bytes, 2));
        const table = f16ToF32Table();
        const out = new Int32Array(n);
        for (let i = 0; i < n; i++) out[i] = table[src[i]];
        return new Float32Array(out.buffer);
      }
      case "BF16": {
        const src = new Uint16Array(nativeCopy(entry.bytes, 2));
        const out = new Int32Array(n);
        for (let i = 0; i < n; i++) out[i] = src[i] << 16;
        return new Float32Array(out.buffer);
      }
      case "F64": {
        const src = new Float64Array(nativeCopy(entry.bytes, 8));
        const out = new Float32Array(n);
        for (let i = 0; i < n; i++) out[i] = src[i];
        return out;
      }
      default:
        throw new SafetensorsError({
          file,
          tensor: entry.name,
          reason: `cannot decode dtype ${entry.dtype} as float32 (use toInt32 for integers)`,
        });
    }
  });

/** A 16-bit float format, as the backends name it (safetensors: BF16 / F16). */
export type HalfFormat = "bf16" | "f16";

/**
 * The raw bits of a BF16 / F16 tensor as a fresh Uint16Array (no widening: a frozen base keeps
 * its checkpoint's format), with the format. Other dtypes fail.
 */
export const toHalfBits = (
  entry: TensorEntry,
  file: string = BUFFER,
): Effect.Effect<{ format: HalfFormat; bits: Uint16Array }, SafetensorsError> =>
  guard(() => {
    checkEntry(entry, file);
    if (entry.dtype !== "BF16" && entry.dtype !== "F16") {
      throw new SafetensorsError({
        file,
        tensor: entry.name,
        reason: `${entry.dtype} is not a 16-bit float dtype (BF16 or F16)`,
      });
    }
    return {
      format: entry.dtype === "BF16" ? "bf16" : "f16",
      bits: new Uint16Array(nativeCopy(entry.bytes, 2)),
    };
  });

/** Widens 16-bit float bits to the exactly equal f32 values (into `out` when given). */
export const widenHalfBits = (
  bits: Uint16Array,
  format: HalfFormat,
  out: Float32Array = new Float32Array(bits.length),
): Float32Array => {
  const o = new Int32Array(out.buffer, out.byteOffset, bits.length);
  if (format === "bf16") {
    for (let i = 0; i < bits.length; i++) o[i] = bits[i] << 16;
  } else {
    const table = f16ToF32Table();
    for (let i = 0; i < bits.length; i++) o[i] = table[bits[i]];
  }
  return out;
};

/** Rounds f32 values to 16-bit float bits (nearest even; see f32BitsToBf16Bits / F16Bits). */
export const roundToHalfBits = (data: ArrayLike<number>, format: HalfFormat): Uint16Array => {
  const f = data instanceof Float32Array ? data : Float32Array.from(data);
  const x = new Uint32Array(f.buffer, f.byteOffset, f.length);
  const out = new Uint16Array(f.length);
  const round = format === "bf16" ? f32BitsToBf16Bits : f32BitsToF16Bits;
  for (let i = 0; i < out.length; i++) out[i] = round(x[i]);
  return out;
};

/** True when 16-bit float bits encode ±inf or NaN (exponent all ones). */
export const isNonFiniteHalf = (h: number, format: HalfFormat): boolean =>
  format === "bf16" ? (h & 0x7f80) === 0x7f80 : (h & 0x7c00) === 0x7c00;

/**
 * Decodes an integer tensor (I32, I64 and U32 within the i32 range, U8, I8, I16, U16, BOOL as
 * 0/1) into a fresh Int32Array. Out-of-range values fail naming the index and value.
 */
export const toInt32 = (
  entry: TensorEntry,
  file: string = BUFFER,
): Effect.Effect<Int32Array, SafetensorsError> =>
  guard(() => {
    const n = checkEntry(entry, file);
    const bad = (i: number, v: number | bigint): never => {
      throw new SafetensorsError({
        file,
        tensor: entry.name,
        reason: `${entry.dtype} value ${v} at index ${i} does not fit in int32`,
      });
    };
    switch (entry.dtype) {
      case "I32":
        return new Int32Array(nativeCopy(entry.bytes, 4));
      case "U8":
        return Int32Array.from(entry.bytes);
      case "BOOL": {
        const out = new Int32Array(n);
        for (let i = 0; i < n; i++) {
          const b = entry.bytes[i];
          if (b > 1) {
            throw new SafetensorsError({
              file,
              tensor: entry.name,
              reason: `BOOL byte ${b} at index ${i} is neither 0 nor 1`,
            });
          }
          out[i] = b;
        }
        return out;
      }
      case "I8":
        return Int32Array.from(
          new Int8Array(entry.bytes.buffer, entry.bytes.byteOffset, entry.bytes.length),
        );
      case "I16":
        return Int32Array.from(new Int16Array(nativeCopy(entry.bytes, 2)));
      case "U16":
        return Int32Array.from(new Uint16Array(nativeCopy(entry.bytes, 2)));
      case "U32": {
        const src = new Uint32Array(nativeCopy(entry.bytes, 4));
        const out = new Int32Array(n);
        for (let i = 0; i < n; i++) {
          if (src[i] > 0x7fffffff) bad(i, src[i]);
          out[i] = src[i];
        }
        return out;
      }
      case "I64": {
        const src = new BigInt64Array(nativeCopy(entry.bytes, 8));
        const out = new Int32Array(n);
        for (let i = 0; i < n; i++) {
          const v = src[i];
          if (v < -2147483648n || v > 2147483647n) bad(i, v);
          out[i] = Number(v);
        }
        return out;
      }
      default:
        throw new SafetensorsError({
          file,
          tensor: entry.name,
          reason: `cannot decode dtype ${entry.dtype} as int32 (use toFloat32 for floats)`,
        });
    }
  });

const checkCount = (name: string, length: number, shape: readonly number[]): void => {
  if (!validDims(shape) || elementCount(shape) !== length) {
    throw new SafetensorsError({
      file: "<encode>",
      tensor: name,
      reason: `${length} values do not match shape ${show(shape)}`,
    });
  }
};

/**
 * Encodes float32 values as an F32 (bit-exact), F16 or BF16 (round to nearest even; NaN stays
 * NaN; F16 overflows to ±inf and underflows through subnormals) tensor entry. Throws
 * SafetensorsError when `data.length` does not match `shape`.
 */
export const fromFloat32 = (
  name: string,
  data: Float32Array,
  shape: readonly number[],
  dtype: "F32" | "F16" | "BF16" = "F32",
): TensorEntry => {
  checkCount(name, data.length, shape);
  if (dtype === "F32") return { name, dtype, shape: shape.slice(), bytes: leBytes(data, 4) };
  const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
  const out = new Uint16Array(data.length);
  if (dtype === "F16") {
    for (let i = 0; i < bits.length; i++) out[i] = f32BitsToF16Bits(bits[i]);
  } else {
    for (let i = 0; i < bits.length; i++) out[i] = f32BitsToBf16Bits(bits[i]);
  }
  return { name, dtype, shape: shape.slice(), bytes: leBytes(out, 2) };
};

/** Encodes int32 values as an I32 tensor entry. Throws SafetensorsError on a shape mismatch. */
export const fromInt32 = (
  name: string,
  data: Int32Array,
  shape: readonly number[],
): TensorEntry => {
  checkCount(name, data.length, shape);
  return { name, dtype: "I32", shape: shape.slice(), bytes: leBytes(data, 4) };
};

/** Succeeds with `data` when every value is finite; else names the first bad index and value. */
export const requireFinite = (
  name: string,
  data: Float32Array,
): Effect.Effect<Float32Array, NonFiniteTensorError> =>
  Effect.suspend(() => {
    for (let i = 0; i < data.length; i++) {
      const v = data[i];
      if (!Number.isFinite(v)) {
        return Effect.fail(new NonFiniteTensorError({ tensor: name, index: i, value: v }));
      }
    }
    return Effect.succeed(data);
  });
