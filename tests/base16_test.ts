/**
 * The 16-bit frozen base: bf16 / f16 tensors stored compactly on both backends (two per u32 word
 * on WebGPU, a Uint16Array on the CPU) and widened where the ops that read base weights read
 * them. Every WebGPU result is checked against the CPU float64 reference computing on the very
 * same rounded values: matmul in the decoder's forms (x·Wᵀ, dY·W) on both kernel paths, the
 * embedding gather, row slices at odd offsets and across row blocks (binding limit lowered), the
 * tied vocabulary-chunked head; a tiny model saved as BF16 and loaded for LoRA (forward,
 * backward, generation, a policy step); full fine-tuning still loading f32; and the typed error
 * of every op that cannot take a 16-bit tensor.
 */
import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import { Effect, Exit, Scope } from "effect";
import fc from "fast-check";
import type { BackendShape } from "../src/backend/backend.ts";
import type { Ops } from "../src/backend/ops.ts";
import { type HalfDType, ShapeError, type Tensor } from "../src/backend/tensor.ts";
import type { FloatArray } from "../src/backend/tensor.ts";
import { matmulTuning } from "../src/backend/webgpu/matmul.ts";
import { roundToHalfBits, widenHalfBits } from "../src/io/safetensors.ts";
import type { ModelConfig } from "../src/model/config.ts";
import {
  backwardLogProbs,
  type DeviceModel,
  forwardCached,
  forwardLogProbs,
  type LoraRuntime,
  makeKvCache,
  uploadModel,
} from "../src/model/decoder.ts";
import { generate, type GenerationRequest } from "../src/model/generate.ts";
import { loadFrozenBase, loadModel, saveModel } from "../src/model/loader.ts";
import {
  type BaseWeightMap,
  initWeights,
  isHalfTensor,
  widenWeights,
} from "../src/model/weights.ts";
import { initLora, type LoraConfig, type LoraWeights, uploadLora } from "../src/lora/adapter.ts";
import { FrozenBase, mergedWeights } from "../src/snapshot/snapshot.ts";
import { Policy } from "../src/train/policy.ts";
import { tinyConfig } from "./support/tiny.ts";
import {
  gpuTeardown,
  hasGpu,
  relError,
  seededValues,
  testBackends,
  withOps,
} from "./support/backends.ts";

const { gpu, cpu, ref } = await testBackends();
const both = [cpu, ...(gpu ? [gpu] : [])];
const TOL = 1e-5;
const seed = fc.integer({ min: 1, max: 0x7fffffff });
const halfDType = fc.constantFrom<HalfDType>("bf16", "f16");
const gpuTest = (name: string, fn: () => Promise<void>): void =>
  Deno.test({ name: `webgpu: ${name}`, ignore: !hasGpu, fn });

const vals = (n: number, s: number, scale = 1): Float32Array =>
  Float32Array.from(seededValues(n, s), (v) => v * scale);

/** The exact values a 16-bit tensor made from `v` holds. */
const rounded = (v: Float32Array, dtype: HalfDType): Float32Array =>
  widenHalfBits(roundToHalfBits(v, dtype), dtype);

/** Runs `f` with the GPU's binding limit lowered to `bytes` (a no-op on the CPU). */
const withLimit = async <A>(b: BackendShape, bytes: number | null, f: () => Promise<A>) => {
  b.gpu?.setBindingLimit(bytes);
  try {
    return await f();
  } finally {
    b.gpu?.setBindingLimit(null);
  }
};

const evalOn = (b: BackendShape, f: (ops: Ops) => Tensor[]): Promise<FloatArray[]> =>
  withOps(b, (ops) => ops.read(f(ops)));

const assertClose = (what: string, x: ArrayLike<number>[], y: ArrayLike<number>[], tol = TOL) =>
  x.forEach((v, i) => {
    const e = relError(v, y[i]);
    assert(e <= tol, `${what}: output ${i} rel error ${e}`);
  });

// ---- storage ----------------------------------------------------------------------------------

Deno.test("16-bit tensors: fromArray rounds to nearest even, fromHalf keeps the bits, read widens exactly (odd sizes, row blocks)", async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 1, max: 9 }),
      fc.integer({ min: 1, max: 7 }),
      halfDType,
      seed,
      fc.constantFrom(null, 16, 20, 28),
      async (rows, cols, dtype, s, limit) => {
        const v = vals(rows * cols, s, 3);
        const want = rounded(v, dtype);
        const bits = roundToHalfBits(v, dtype);
        for (const b of [...both, ref]) {
          // a limit below one row is not storable: keep the default then
          const lim = limit !== null && limit >= cols * 4 ? limit : null;
          const got = await withLimit(b, lim, () =>
            evalOn(b, (ops) => {
              const t = ops.fromArray(v, [rows, cols], dtype);
              assertEquals(t.dtype, dtype);
              return [t, ops.fromHalf(bits, [rows, cols], dtype), ops.copy(t), ops.widen(t)];
            }));
          for (const g of got) assertEquals(Array.from(g), Array.from(want));
        }
      },
    ),
    { numRuns: 25 },
  );
});

Deno.test("16-bit tensors: sliceRows / setRows at odd element offsets and across row blocks are exact", async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 2, max: 9 }),
      fc.integer({ min: 1, max: 5 }),
      halfDType,
      seed,
      fc.constantFrom(null, 16, 24),
      fc.nat(),
      fc.nat(),
      async (rows, cols, dtype, s, limit, a, c) => {
        const start = a % rows;
        const count = 1 + (c % (rows - start));
        const v = vals(rows * cols, s, 2);
        const w = rounded(v, dtype);
        const src = vals(count * cols, s + 1, 2);
        const srcR = rounded(src, dtype);
        const sliced = w.slice(start * cols, (start + count) * cols);
        const set = w.slice();
        set.set(srcR, start * cols);
        for (const b of both) {
          const lim = limit !== null && limit >= cols * 4 ? limit : null;
          const [g1, g2] = await withLimit(b, lim, () =>
            evalOn(b, (ops) => {
              const t = ops.fromArray(v, [rows, cols], dtype);
              const slice = ops.sliceRows(t, start, count);
              const dst = ops.copy(t);
              ops.setRows(dst, start, ops.fromArray(src, [count, cols], dtype));
              return [slice, dst];
            }));
          assertEquals(Array.from(g1), Array.from(sliced));
          assertEquals(Array.from(g2), Array.from(set));
        }
      },
    ),
    { numRuns: 30 },
  );
});

Deno.test("every bf16 and f16 bit pattern (subnormals, ±0, ±inf, NaN) widens exactly in widen, embedding and matmul", async () => {
  const all = Uint16Array.from({ length: 65536 }, (_, i) => i);
  for (const dtype of ["bf16", "f16"] as const) {
    const want = new Uint32Array(widenHalfBits(all, dtype).buffer);
    for (const b of both) {
      const [w, e] = await evalOn(b, (ops) => {
        const t = ops.fromHalf(all, [256, 256], dtype);
        const ids = ops.fromArray(Int32Array.from({ length: 256 }, (_, i) => i), [256], "i32");
        return [ops.widen(t), ops.embedding(t, ids)];
      });
      for (const got of [w, e]) {
        const bits = new Uint32Array(Float32Array.from(got).buffer);
        const bad = bits.findIndex((x, i) => x !== want[i]);
        assert(
          bad < 0,
          `${b.info.name} ${dtype}: pattern ${bad} -> ${bits[bad]}, want ${want[bad]}`,
        );
      }
    }
    // finite patterns through the tiled and direct matmul paths: x = identity rows pick them
    const finite = all.filter((h) => Number.isFinite(widenHalfBits(Uint16Array.of(h), dtype)[0]));
    // k = 128: a bf16 operand then goes to the device as raw bits (rgba16uint texture)
    const k = 128;
    const rows = Math.floor(finite.length / k);
    const bits = finite.subarray(0, rows * k);
    const picked = widenHalfBits(bits, dtype);
    const eye = new Float32Array(k * k);
    for (let i = 0; i < k; i++) eye[i * k + i] = 1;
    // transposed: pickedT[j, r] = picked[r, j]
    const pickedT = new Float32Array(rows * k);
    for (let r = 0; r < rows; r++) {
      for (let j = 0; j < k; j++) pickedT[j * rows + r] = picked[r * k + j];
    }
    for (const tiled of [false, true]) {
      matmulTuning.forceTiled = tiled;
      try {
        for (const b of both) {
          const [y, yt] = await evalOn(b, (ops) => {
            const w = ops.fromHalf(bits, [rows, k], dtype);
            const i = ops.fromArray(eye, [k, k]);
            // y [rows, k] = W · I (W as A), yt [k, rows] = I · Wᵀ (W as B): every value, exactly
            return [ops.matmul(w, i), ops.matmul(i, w, { transB: true })];
          });
          for (const [got, want, what] of [[y, picked, "A"], [yt, pickedT, "B"]] as const) {
            const bad = Array.from(got).findIndex((x, i) =>
              !Object.is(x, want[i]) && x !== want[i]
            );
            assert(
              bad < 0,
              `${b.info.name} ${dtype} as ${what} tiled=${tiled}: ${bad}: ${got[bad]} vs ${
                want[bad]
              }`,
            );
          }
        }
      } finally {
        matmulTuning.forceTiled = false;
      }
    }
  }
});

// ---- the ops that read base weights -----------------------------------------------------------

/** One matmul with a 16-bit operand in one of the decoder's forms, on `b`. */
const matmul16 = (
  b: BackendShape,
  form: "xWt" | "dyW" | "aHalf",
  m: number,
  n: number,
  k: number,
  dtype: HalfDType,
  s: number,
) =>
  evalOn(b, (ops) => {
    if (form === "xWt") { // y [m, n] = x [m, k] · W [n, k]ᵀ
      const x = ops.fromArray(vals(m * k, s), [m, k]);
      const w = ops.fromArray(vals(n * k, s + 1, 0.5), [n, k], dtype);
      return [ops.matmul(x, w, { transB: true })];
    }
    if (form === "dyW") { // dx [m, n] = dy [m, k] · W [k, n]
      const dy = ops.fromArray(vals(m * k, s), [m, k]);
      const w = ops.fromArray(vals(k * n, s + 1, 0.5), [k, n], dtype);
      return [ops.matmul(dy, w)];
    }
    // a 16-bit left operand, transposed (any operand may be 16-bit)
    const a = ops.fromArray(vals(k * m, s, 0.5), [k, m], dtype);
    const x = ops.fromArray(vals(k * n, s + 1), [k, n]);
    return [ops.matmul(a, x, { transA: true })];
  });

/** A matrix dimension up to `max`, a multiple of 4 half of the time. */
const dim = (max: number) =>
  fc.oneof(fc.integer({ min: 1, max }), fc.integer({ min: 1, max: max >> 2 }).map((x) => 4 * x));

for (const tiled of [false, true]) {
  gpuTest(
    `matmul with a 16-bit operand (x·Wᵀ, dY·W, transposed 16-bit A; ${
      tiled ? "tiled" : "direct"
    } kernel) matches the f64 reference on the rounded values`,
    async () => {
      matmulTuning.forceTiled = tiled;
      try {
        await fc.assert(
          fc.asyncProperty(
            // multiples of 4 take the run-of-four texture fill, other sizes the element pack
            dim(37),
            dim(37),
            dim(70),
            halfDType,
            fc.constantFrom("xWt" as const, "dyW" as const, "aHalf" as const),
            seed,
            async (m, n, k, dtype, form, s) => {
              const want = await matmul16(ref, form, m, n, k, dtype, s);
              assertClose("gpu", await matmul16(gpu!, form, m, n, k, dtype, s), want);
              assertClose("cpu", await matmul16(cpu, form, m, n, k, dtype, s), want);
            },
          ),
          { numRuns: 30 },
        );
      } finally {
        matmulTuning.forceTiled = false;
      }
    },
  );
}

gpuTest(
  "matmul with a 16-bit weight at decoder-like sizes (tiled: raw bf16 bits, run fill, transposing pack, padded n)",
  async () => {
    // bf16 with k (xWt) or n (dyW; aHalf: m) a multiple of 128 goes as raw bits (rgba16uint)
    for (
      const [m, n, k, dtype] of [
        [64, 130, 96, "bf16"],
        [33, 64, 256, "f16"],
        [40, 256, 128, "bf16"],
        [128, 72, 256, "bf16"],
      ] as const
    ) {
      for (const form of ["xWt", "dyW", "aHalf"] as const) {
        const want = await matmul16(ref, form, m, n, k, dtype, 5);
        assertClose(`${form} ${m}x${n}x${k}`, await matmul16(gpu!, form, m, n, k, dtype, 5), want);
      }
    }
  },
);

gpuTest(
  "matmul with a 16-bit weight wider than the texture limit (column chunks from a row offset)",
  async () => {
    const limit = gpu!.gpu!.device.limits.maxTextureDimension2D;
    matmulTuning.forceTiled = true;
    try {
      // n > limit: B is loaded in chunks starting at rows > 0, through the staging pitch (k = 4,
      // m-major n % 4 = 0) and as a direct copy (k = 128)
      for (
        const [m, n, k, dtype] of [[3, limit + 100, 4, "bf16"], [
          2,
          limit + 36,
          128,
          "f16",
        ]] as const
      ) {
        for (const form of ["xWt", "dyW"] as const) {
          const want = await matmul16(ref, form, m, n, k, dtype, 9);
          assertClose(
            `${form} ${m}x${n}x${k}`,
            await matmul16(gpu!, form, m, n, k, dtype, 9),
            want,
          );
        }
      }
    } finally {
      matmulTuning.forceTiled = false;
    }
  },
);

Deno.test("few-row x·Wᵀ with a wide 16-bit W (a decode step over a vocabulary-sized head): the f32 product of the widened W, bit for bit", async () => {
  const [m, n, k] = [3, 2500, 7];
  const x = vals(m * k, 1);
  const w = vals(n * k, 2);
  for (const b of [...both, ref]) {
    for (const dtype of ["bf16", "f16"] as const) {
      const [half, wide] = await evalOn(b, (ops) => {
        const xt = ops.fromArray(x, [m, k]);
        return [
          ops.matmul(xt, ops.fromArray(w, [n, k], dtype), { transB: true }),
          ops.matmul(xt, ops.fromArray(rounded(w, dtype), [n, k]), { transB: true }),
        ];
      });
      assertEquals(Array.from(half), Array.from(wide), `${b.info.name} ${dtype}`);
    }
  }
});

Deno.test("embedding gather from a 16-bit table (split into row blocks) equals the widened rows", async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 1, max: 13 }),
      fc.integer({ min: 1, max: 7 }),
      fc.integer({ min: 1, max: 4 }),
      halfDType,
      seed,
      fc.constantFrom(null, 16, 36, 112),
      async (vocab, h, n, dtype, s, limit) => {
        const table = vals(vocab * h, s);
        const ids = Int32Array.from(
          seededValues(n, s + 3),
          (x) => Math.min(vocab - 1, Math.floor(((x + 1) / 2) * vocab)),
        );
        const w = rounded(table, dtype);
        const want = new Float32Array(n * h);
        ids.forEach((id, i) => want.set(w.subarray(id * h, (id + 1) * h), i * h));
        for (const b of [...both, ref]) {
          // the result [n, h] is one block: a limit must hold it
          const lim = limit !== null && limit >= n * h * 4 ? limit : null;
          const [got] = await withLimit(b, lim, () =>
            evalOn(b, (ops) => [
              ops.embedding(
                ops.fromArray(table, [vocab, h], dtype),
                ops.fromArray(ids, [n], "i32"),
              ),
            ]));
          assertEquals(Array.from(got), Array.from(want));
        }
      },
    ),
    { numRuns: 25 },
  );
});

Deno.test("loraFold of a 16-bit base weight: a fresh f32 W + s·B·A on the widened W", async () => {
  for (const b of both) {
    for (const dtype of ["bf16", "f16"] as const) {
      const [rows, cols, r] = [7, 5, 2];
      const w = vals(rows * cols, 4);
      const bm = vals(rows * r, 5);
      const am = vals(r * cols, 6);
      const run = (be: BackendShape) =>
        evalOn(be, (ops) => [
          ops.loraFold(
            ops.fromArray(w, [rows, cols], dtype),
            ops.fromArray(bm, [rows, r]),
            ops.fromArray(am, [r, cols]),
            0.5,
          ),
        ]);
      assertClose(`${b.info.name} ${dtype}`, await run(b), await run(ref));
      // a zero update leaves the widened W bit for bit
      const [same] = await evalOn(b, (ops) => [
        ops.loraFold(
          ops.fromArray(w, [rows, cols], dtype),
          ops.zeros([rows, r]),
          ops.fromArray(am, [r, cols]),
          0.5,
        ),
      ]);
      assertEquals(Array.from(same), Array.from(rounded(w, dtype)));
    }
  }
});

Deno.test("ops that cannot take a 16-bit tensor refuse it with a ShapeError naming the op", async () => {
  for (const b of both) {
    await withOps(b, (ops) => {
      const h = ops.fromArray(vals(12, 1), [3, 4], "bf16");
      const f = ops.fromArray(vals(12, 2), [3, 4]);
      const row = ops.fromArray(vals(4, 3), [4], "f16");
      const refuse = (op: string, run: () => unknown) =>
        throws(run, (e: unknown) => e instanceof ShapeError && e.op === op, `${b.info.name} ${op}`);
      refuse("add", () => ops.add(h, f));
      refuse("addScaledInPlace", () => ops.addScaledInPlace(h, f, 1));
      refuse("scale", () => ops.scale(h, 2));
      refuse("rmsNorm", () => ops.rmsNorm(f, row, 1e-5));
      refuse("addRow", () => ops.addRow(f, row));
      refuse("sumSquares", () => ops.sumSquares(h));
      refuse("gatherRows", () => ops.gatherRows(h, [0]));
      refuse("sliceColumns", () => ops.sliceColumns(h, 0, 2));
      refuse("setColumns", () => ops.setColumns(f, 0, ops.sliceRows(h, 0, 3)));
      refuse("logProbs", () => ops.logProbs(h, ops.fromArray([0, 1, 2], [3], "i32"), 1));
      refuse("adamw", () =>
        ops.adamw(h, f, ops.zeros([3, 4]), ops.zeros([3, 4]), {
          lr: 1e-3,
          beta1: 0.9,
          beta2: 0.999,
          eps: 1e-8,
          weightDecay: 0,
          step: 1,
        }));
      refuse("fromHalf", () => ops.fromHalf(new Uint16Array(3), [3], "f32" as HalfDType));
    });
  }
});

// ---- a tiny model from a 16-bit checkpoint ------------------------------------------------------

const run = <A, E>(e: Effect.Effect<A, E>): Promise<A> => Effect.runPromise(e);

/** A qwen2-style tiny model with biases and a tied head (the head runs over vocabulary chunks). */
const CONFIG: ModelConfig = tinyConfig({
  modelType: "qwen2",
  attentionBias: true,
  tieWordEmbeddings: true,
  numKvHeads: 2,
  vocabSize: 37,
  hiddenSize: 12,
  headDim: 6,
  intermediateSize: 18,
});

/** Saves random weights with saveModel in `dtype` and loads them back both ways. */
const checkpoint = async (dtype: "BF16" | "F16") => {
  const dir = await Deno.makeTempDir({ prefix: "base16_" });
  try {
    await run(saveModel(dir, CONFIG, initWeights(CONFIG, 7, 0.3), { dtype }));
    const half = await run(loadFrozenBase(dir));
    const full = await run(loadModel(dir));
    return { half: half.weights, full: full.weights };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
};
const bf16 = await checkpoint("BF16");
const f16 = await checkpoint("F16");

const LORA: LoraConfig = {
  r: 2,
  alpha: 4,
  dropout: 0,
  targetModules: ["q_proj", "v_proj", "o_proj", "down_proj"],
  useRslora: false,
};
/** LoRA weights with a non-zero B (initLora's B is zero, which would hide A's gradient). */
const loraWeights = (): LoraWeights => {
  const w = initLora(CONFIG, LORA, 3);
  let s = 9;
  for (const m of w.modules.values()) m.b.data.set(vals(m.b.data.length, s++, 0.2));
  return w;
};
const LORA_W = loraWeights();

Deno.test("loadFrozenBase keeps a BF16 / F16 checkpoint's matrices 16-bit, norms and biases f32; loadModel (full fine-tuning) loads all f32, the same values", () => {
  for (const [what, ck, format] of [["bf16", bf16, "bf16"], ["f16", f16, "f16"]] as const) {
    let halfBytes = 0;
    let fullBytes = 0;
    for (const [name, t] of ck.half) {
      const f = ck.full.get(name)!;
      assert(!isHalfTensor(f), `${what} ${name}: loadModel gives f32`);
      fullBytes += f.data.byteLength;
      if (t.shape.length === 2) {
        assert(isHalfTensor(t) && t.format === format, `${what} ${name} stays ${format}`);
        halfBytes += t.bits.byteLength;
        assertEquals(Array.from(widenHalfBits(t.bits, t.format)), Array.from(f.data));
      } else {
        assert(!isHalfTensor(t), `${what} ${name} (1-D) is f32`);
        halfBytes += t.data.byteLength;
        assertEquals(Array.from(t.data), Array.from(f.data));
      }
    }
    assert(halfBytes < 0.55 * fullBytes, `${what}: ${halfBytes} host bytes vs ${fullBytes}`);
  }
});

/** Log-probs, entropies and LoRA gradients of one batch, and cached-decoding logits, on `b`. */
const modelRun = (b: BackendShape, weights: BaseWeightMap, chunkRows?: number) =>
  withOps(b, (ops) =>
    Effect.gen(function* () {
      const model = uploadModel(ops, CONFIG, weights);
      const lora = uploadLora(ops, LORA_W);
      const batch = 2;
      const seqLen = 7;
      const ids = Int32Array.from(
        seededValues(batch * seqLen, 21),
        (x) => Math.min(CONFIG.vocabSize - 1, Math.floor(((x + 1) / 2) * CONFIG.vocabSize)),
      );
      const logitRows = [0, 2, 3, 6, 7, 9, 13];
      const targets = logitRows.map((r) => ids[(r + 1) % ids.length]);
      const lp = forwardLogProbs(ops, model, { ids, batch, seqLen, logitRows }, targets, 0.9, {
        lora,
        train: true,
        entropy: true,
        chunkRows,
      });
      const dlogp = ops.fromArray(logitRows.map((_, i) => Math.cos(i)), [logitRows.length]);
      const grads = backwardLogProbs(ops, lp.tape!, dlogp, "lora");
      const names = [...grads.keys()].sort();
      // cached decoding: a prefill of 5 tokens, then one more
      const cache = makeKvCache(ops, CONFIG, batch, 8);
      const pre = forwardCached(ops, model, cache, ids.subarray(0, 10), 5, [0, 1], lora, {
        chunkRows,
      });
      const next = forwardCached(ops, model, cache, [3, 5], 1, [0, 1], lora, { chunkRows });
      const out = yield* ops.read([
        lp.logp,
        lp.entropy!,
        ...names.map((n) => grads.get(n)!),
        pre,
        next,
      ]);
      return { names, out: out.map((x) => Float64Array.from(x)) };
    }));

for (const [what, ck] of [["bf16", bf16], ["f16", f16]] as const) {
  Deno.test(`LoRA on a ${what} base: log-probs, entropies, gradients and cached logits match the f64 reference on the rounded weights (tied head in vocabulary chunks, row blocks)`, async () => {
    // the reference on the widened weights, and on the 16-bit ones: the very same numbers
    const want = await modelRun(ref, widenWeights(ck.half));
    const refHalf = await modelRun(ref, ck.half);
    assertEquals(refHalf, want);
    for (const b of both) {
      for (const chunkRows of [undefined, 5]) {
        // WebGPU: the 37-row table in several storage blocks
        for (const limit of b.gpu ? [null, 1024] : [null]) {
          const got = await withLimit(b, limit, () => modelRun(b, ck.half, chunkRows));
          assertEquals(got.names, want.names);
          assertClose(
            `${b.info.name} chunkRows=${chunkRows} limit=${limit}`,
            got.out,
            want.out,
            1e-4,
          );
          // against f32 weights holding the same values on the same backend: bit for bit
          const widened = await withLimit(
            b,
            limit,
            () => modelRun(b, widenWeights(ck.half), chunkRows),
          );
          assertEquals(got, widened);
        }
      }
    }
  });
}

Deno.test("generation on a 16-bit base gives the tokens of the widened f32 base (both backends)", async () => {
  const requests: GenerationRequest[] = [0, 1, 2].map((i) => ({
    prompt: [1 + i, 4, 9, 16 + i],
    maxTokens: 6,
    stopTokenIds: [],
    seed: 5 + i,
    temperature: i === 0 ? 0 : 0.8,
    topP: 1,
    topK: 0,
  }));
  for (const b of both) {
    const gen = (weights: BaseWeightMap) =>
      withOps(b, (ops) => {
        const model: DeviceModel = uploadModel(ops, CONFIG, weights);
        const lora: LoraRuntime = uploadLora(ops, LORA_W);
        return generate(b, model, requests, lora);
      });
    const half = await gen(bf16.half);
    assertEquals(
      half.map((g) => g.tokens),
      (await gen(widenWeights(bf16.half))).map((g) => g.tokens),
    );
    assert(half.every((g) => g.tokens.length === 6));
  }
});

/** Runs `f` with a Policy made in a scope that closes afterwards. */
const withPolicy = async <A>(
  b: BackendShape,
  base: BaseWeightMap,
  mode: "lora" | "full",
  f: (p: Policy) => Promise<A>,
): Promise<A> => {
  const scope = Scope.makeUnsafe();
  try {
    const p = await run(
      Scope.provide(scope)(Policy.make(b, CONFIG, base, {
        mode,
        lora: LORA,
        seed: 1,
        optimizer: {
          learningRate: 1e-2,
          beta1: 0.9,
          beta2: 0.999,
          eps: 1e-8,
          weightDecay: 0.01,
          maxGradNorm: 1,
          gradientCheckpointing: true,
        },
      }, LORA_W)),
    );
    return await f(p);
  } finally {
    await run(Scope.close(scope, Exit.void));
  }
};

const SEQS = [{ prompt: [1, 2, 3], completion: [4, 5, 6] }, { prompt: [7], completion: [8, 9] }];
const lossFn = (lp: { logp: Float64Array[] }) =>
  Effect.succeed({
    loss: -lp.logp.reduce((a, x) => a + x.reduce((u, v) => u + v, 0), 0),
    dLogp: lp.logp.map((x) => new Float64Array(x.length).fill(-1)),
    metrics: {},
  });

Deno.test("Policy on a 16-bit base: the base stays 16-bit (host and device), trainables and AdamW f32; steps, snapshots and merged weights equal those on the widened f32 base", async () => {
  for (const b of both) {
    const trace = (base: BaseWeightMap) =>
      withPolicy(b, base, "lora", async (p) => {
        const dtypes = new Set([...p.baseDevice.weights.values()].map((t) => t.dtype));
        const stats = [];
        for (let i = 0; i < 2; i++) stats.push(await run(p.step(SEQS, 1, lossFn)));
        const snap = await run(Effect.scoped(p.snapshot()));
        const merged = await run(mergedWeights(snap, b));
        const state = await run(p.exportState());
        return { dtypes, stats, merged, state, bytes: p.base.bytes, half: p.base.hasHalfWeights };
      });
    const half = await trace(bf16.half);
    const full = await trace(widenWeights(bf16.half));
    assertEquals(half.dtypes, new Set(["bf16", "f32"]));
    assert(half.half && !full.half);
    assert(half.bytes < 0.55 * full.bytes, `${half.bytes} vs ${full.bytes} host bytes`);
    assertEquals(half.stats, full.stats);
    assertEquals(half.state.params, full.state.params);
    assertEquals(half.state.m, full.state.m);
    for (const [n, t] of half.merged) {
      assertEquals(Array.from(t.data), Array.from(full.merged.get(n)!.data), n);
    }
  }
});

Deno.test("full fine-tuning given a 16-bit base trains f32 master weights (widened), as on the f32 base", async () => {
  for (const b of both) {
    const trace = (base: BaseWeightMap) =>
      withPolicy(b, base, "full", async (p) => {
        const dtypes = new Set([...p.baseDevice.weights.values()].map((t) => t.dtype));
        const stats = await run(p.step(SEQS, 1, lossFn));
        return { dtypes, stats, state: await run(p.exportState()) };
      });
    const half = await trace(bf16.half);
    assertEquals(half.dtypes, new Set(["f32"]));
    assertEquals(half, await trace(widenWeights(bf16.half)));
  }
});

Deno.test("FrozenBase of 16-bit weights: the digest covers the bits and the format, taken once; make copies, verify holds", async () => {
  const a = await run(FrozenBase.make(CONFIG, bf16.half));
  const b = await run(FrozenBase.make(CONFIG, bf16.half));
  const w = await run(FrozenBase.make(CONFIG, widenWeights(bf16.half)));
  assertEquals(a.digest, b.digest);
  assert(a.digest !== w.digest, "16-bit and f32 bases of equal values differ in digest");
  assertEquals(await run(a.currentDigest()), a.digest);
  // f16 bits of other values: another digest
  const c = await run(FrozenBase.make(CONFIG, f16.half));
  assert(c.digest !== a.digest);
  // the host copy is private: writing to the source does not reach it
  const name = "model.layers.0.self_attn.q_proj.weight";
  const src = bf16.half.get(name)!;
  assert(isHalfTensor(src));
  const keep = src.bits[0];
  src.bits[0] ^= 1;
  assertEquals(await run(a.currentDigest()), a.digest);
  src.bits[0] = keep;
  // widened copies for consumers of plain weights
  const copies = a.weights();
  assertEquals(Array.from(copies.get(name)!.data), Array.from(widenHalfBits(src.bits, "bf16")));
  assertEquals(a.firstNonFinite(), null);
});

Deno.test("loadFrozenBase names a non-finite 16-bit value with its tensor and index", async () => {
  const dir = await Deno.makeTempDir({ prefix: "base16_bad_" });
  try {
    const w = new Map(initWeights(CONFIG, 2));
    const name = "model.layers.1.mlp.up_proj.weight";
    const t = w.get(name)!;
    const data = t.data.slice();
    data[5] = Infinity;
    w.set(name, { shape: t.shape, data });
    await run(saveModel(dir, CONFIG, w, { dtype: "BF16" }));
    const exit = await Effect.runPromiseExit(loadFrozenBase(dir));
    assert(Exit.isFailure(exit));
    const msg = String(exit.cause);
    assert(msg.includes(name) && msg.includes("index 5") && msg.includes("Infinity"), msg);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

gpuTeardown();
