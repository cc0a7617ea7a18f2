/**
 * Large vocabularies, on small shapes: tensors stored in several blocks beyond the binding limit
 * (WebGPU, with the limit lowered by a test hook), the row/column slices, the streamed
 * log-softmax ops against the whole-row ops, and the decoder's vocabulary-chunked head (token
 * log-probs, entropies and gradients against float64 finite differences; memory bounded by a
 * chunk) on both backends.
 */
import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import { Effect } from "effect";
import fc from "fast-check";
import type { BackendShape } from "../src/backend/backend.ts";
import type { Ops } from "../src/backend/ops.ts";
import { ShapeError, type Tensor } from "../src/backend/tensor.ts";
import type { FloatArray } from "../src/backend/tensor.ts";
import { setRowForm } from "../src/backend/webgpu/layers.ts";
import type { ModelConfig } from "../src/model/config.ts";
import {
  backward,
  backwardLogProbs,
  forward,
  forwardCached,
  forwardLogProbs,
  type LoraRuntime,
  makeKvCache,
  uploadModel,
  vocabChunks,
} from "../src/model/decoder.ts";
import { Rng } from "../src/model/rng.ts";
import { initWeights, type WeightMap } from "../src/model/weights.ts";
import { initLora, type LoraWeights, uploadLora } from "../src/lora/adapter.ts";
import {
  gpuTeardown,
  hasGpu,
  relError,
  seededValues,
  testBackends,
  withOps,
} from "./support/backends.ts";
import { tinyConfig } from "./support/tiny.ts";

const { gpu, cpu, ref } = await testBackends();
const both = [cpu, ...(gpu ? [gpu] : [])];
/** Normwise, against the f64 reference. */
const TOL = 1e-5;
const seed = fc.integer({ min: 1, max: 0x7fffffff });
const gpuTest = (name: string, fn: () => Promise<void>): void =>
  Deno.test({ name: `webgpu: ${name}`, ignore: !hasGpu, fn });

const vals = (n: number, s: number, scale = 1): Float32Array =>
  Float32Array.from(seededValues(n, s), (v) => v * scale);
const ints = (n: number, s: number, k: number): Int32Array =>
  Int32Array.from(seededValues(n, s), (v) => Math.min(k - 1, Math.floor(((v + 1) / 2) * k)));

/** Runs `f` with the GPU's binding limit lowered to `bytes` (a no-op on the CPU). */
const withLimit = async <A>(b: BackendShape, bytes: number, f: () => Promise<A>): Promise<A> => {
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

/**
 * Mixed error: max |x - y| over max(|y|, 1). f32 log-softmax quantities carry an absolute error
 * of about eps·max|logit/t| (1e-6 here), so near-zero entropies of peaked rows (logits ×10 at
 * t = 0.5), their gradients (1 - p rounds to 0 in f32) and the exactly-zero gradient of a
 * one-entry vocabulary have no meaningful relative error; elsewhere this is the normwise relative
 * error.
 */
const assertCloseMixed = (what: string, x: ArrayLike<number>[], y: ArrayLike<number>[]) =>
  x.forEach((v, i) => {
    let num = 0;
    let den = 1;
    for (let j = 0; j < v.length; j++) {
      num = Math.max(num, Math.abs(v[j] - y[i][j]));
      den = Math.max(den, Math.abs(y[i][j]));
    }
    assert(num / den <= TOL, `${what}: output ${i} mixed error ${num / den}`);
  });

const bitEqual = (what: string, x: ArrayLike<number>[], y: ArrayLike<number>[]) =>
  x.forEach((v, i) => {
    assertEquals(v.length, y[i].length, `${what}: output ${i} length`);
    for (let j = 0; j < v.length; j++) {
      if (!Object.is(v[j], y[i][j])) {
        throw new Error(`${what}: output ${i}[${j}] ${v[j]} vs ${y[i][j]}`);
      }
    }
  });

/** Splits [0, v) at sorted cut points into chunks [start, count]. */
const chunksOf = (v: number, cuts: readonly number[]): [number, number][] => {
  const pts = [
    0,
    ...[...new Set(cuts.map((c) => c % v))].filter((c) => c > 0).sort((a, b) => a - b),
    v,
  ];
  return pts.slice(1).map((e, i) => [pts[i], e - pts[i]]);
};

// ---- streamed log-softmax ops -------------------------------------------------------------------

const lsmArb = fc.record({
  n: fc.integer({ min: 1, max: 5 }),
  v: fc.integer({ min: 1, max: 300 }),
  cuts: fc.array(fc.integer({ min: 0, max: 299 }), { maxLength: 4 }),
  reverse: fc.boolean(),
  t: fc.constantFrom(0.5, 1, 1.7),
  scale: fc.constantFrom(1, 10),
  seed,
});
interface LsmCase {
  readonly n: number;
  readonly v: number;
  readonly cuts: readonly number[];
  readonly reverse: boolean;
  readonly t: number;
  readonly scale: number;
  readonly seed: number;
}

/** logSoftmaxChunk over the chunks (any order) + finish, and the chunked logProbsBackward. */
const streamed = (a: LsmCase, logits0?: Float32Array, t0?: number[]) => (ops: Ops): Tensor[] => {
  const x = logits0 ?? vals(a.n * a.v, a.seed, a.scale);
  const full = ops.fromArray(x, [a.n, a.v]);
  const targets = ops.fromArray(t0 ?? ints(a.n, a.seed + 1, a.v), [a.n], "i32");
  const chunks = chunksOf(a.v, a.cuts);
  const order = a.reverse ? [...chunks].reverse() : chunks;
  let acc: Tensor | null = null;
  for (const [c0, cn] of order) {
    acc = ops.logSoftmaxChunk(acc, ops.sliceColumns(full, c0, cn), targets, c0, a.t);
  }
  const r = ops.logSoftmaxFinish(acc!);
  const dlogp = ops.fromArray(vals(a.n, a.seed + 2), [a.n]);
  const dl = ops.zeros([a.n, a.v]);
  for (const [c0, cn] of chunks) {
    const g = ops.logProbsBackward(dlogp, ops.sliceColumns(full, c0, cn), targets, r.lse, a.t, c0);
    ops.setColumns(dl, c0, g);
  }
  return [r.logp, r.lse, r.entropy, dl];
};

/** The same quantities from the whole-row ops. */
const whole = (a: LsmCase, logits0?: Float32Array, t0?: number[]) => (ops: Ops): Tensor[] => {
  const logits = ops.fromArray(logits0 ?? vals(a.n * a.v, a.seed, a.scale), [a.n, a.v]);
  const targets = ops.fromArray(t0 ?? ints(a.n, a.seed + 1, a.v), [a.n], "i32");
  const { logp, lse } = ops.logProbs(logits, targets, a.t);
  const dlogp = ops.fromArray(vals(a.n, a.seed + 2), [a.n]);
  const dl = ops.logProbsBackward(dlogp, logits, targets, lse, a.t);
  return [logp, lse, ops.entropy(logits, a.t), dl];
};

for (const b of both) {
  Deno.test(`${b.info.name}: logSoftmaxChunk over any chunking (and order) equals the whole-row ops`, () =>
    fc.assert(
      fc.asyncProperty(lsmArb, async (a) => {
        const want = await evalOn(ref, whole(a));
        assertCloseMixed(
          `chunks ${JSON.stringify(chunksOf(a.v, a.cuts))}`,
          await evalOn(b, streamed(a)),
          want,
        );
      }),
      { numRuns: 25 },
    ));
}

gpuTest("logSoftmaxChunk: the per-row-loop and workgroup kernels both match the CPU", async () => {
  try {
    for (const form of ["row", "wg"] as const) {
      setRowForm(form);
      await fc.assert(
        fc.asyncProperty(lsmArb, async (a) => {
          assertCloseMixed(form, await evalOn(gpu!, streamed(a)), await evalOn(ref, whole(a)));
        }),
        { numRuns: 10 },
      );
      // A chunk of masked (-inf) logits, huge logits, a row masked but for one entry.
      const x = Float32Array.from([
        ...[-Infinity, -Infinity, -Infinity, 2, 0.5, 1],
        ...[1000, 999, -Infinity, 3, -Infinity, 998],
        ...[-Infinity, -Infinity, -Infinity, -Infinity, -Infinity, 0],
      ]);
      const tg = [4, 1, 5]; // finite logits (a masked target has logp -inf)
      for (const t of [0.5, 1, 3]) {
        const a = { n: 3, v: 6, cuts: [3], reverse: false, t, scale: 1, seed: 5 };
        const want = await evalOn(ref, whole(a, x, tg));
        assertClose(`${form} extreme T=${t}`, await evalOn(gpu!, streamed(a, x, tg)), want);
        assertClose(`cpu extreme T=${t}`, await evalOn(cpu, streamed(a, x, tg)), want);
      }
      // the same in chunks of 4 and 12 columns (the vec4 row kernel, lsm_chunk_row4)
      const x4 = Float32Array.from([
        ...[-Infinity, -Infinity, -Infinity, -Infinity, 2, 0.5, 1, -1, 0, 3, -2, 1, 1, 1, 1, 4],
        ...[30, 29, -Infinity, 3, -Infinity, 28, 1, 2, 3, 4, 5, 6, 7, 8, 9, 27],
        ...Array.from({ length: 15 }, () => -Infinity),
        0,
      ]);
      const tg4 = [6, 1, 15];
      for (const t of [0.5, 1, 3]) {
        const a = { n: 3, v: 16, cuts: [4], reverse: false, t, scale: 1, seed: 5 };
        const want = await evalOn(ref, whole(a, x4, tg4));
        assertClose(`${form} extreme x4 T=${t}`, await evalOn(gpu!, streamed(a, x4, tg4)), want);
      }
    }
  } finally {
    setRowForm(undefined);
  }
});

for (const b of both) {
  Deno.test(`${b.info.name}: streamed log-softmax ops reject bad shapes and offsets`, () =>
    withOps(b, (ops) => {
      const x = ops.fromArray([1, 2, 3, 4], [2, 2]);
      const t = ops.fromArray([0, 1], [2], "i32");
      const bad = (f: () => unknown, what: string) =>
        throws(f, (e) => e instanceof ShapeError, `${what} should raise ShapeError`);
      bad(() => ops.logSoftmaxChunk(ops.zeros([3, 4]), x, t, 0, 1), "acc rows");
      bad(() => ops.logSoftmaxChunk(null, x, t, -1, 1), "negative offset");
      bad(() => ops.logSoftmaxChunk(null, x, t, 0, 0), "temperature 0");
      bad(() => ops.logSoftmaxChunk(null, x, ops.fromArray([0, 1], [2]), 0, 1), "f32 targets");
      bad(() => ops.logSoftmaxFinish(ops.zeros([2, 3])), "finish width");
      const lse = ops.fromArray([0, 0], [2]);
      bad(() => ops.logProbsBackward(lse, x, t, lse, 1, 0.5), "fractional offset");
      bad(() => ops.sliceRows(x, 1, 2), "rows out of range");
      bad(() => ops.sliceColumns(x, 1, 2), "columns out of range");
      bad(() => ops.setRows(x, 0, ops.zeros([1, 3])), "setRows width");
      bad(() => ops.setColumns(x, 1, ops.zeros([2, 2])), "setColumns range");
      bad(() => ops.setColumns(x, 0, ops.zeros([3, 1])), "setColumns rows");
    }));
}

// ---- slices and split storage ---------------------------------------------------------------------

const sliceArb = fc.record({
  r: fc.integer({ min: 1, max: 40 }),
  c: fc.integer({ min: 1, max: 9 }),
  a: fc.nat(),
  b: fc.nat(),
  limit: fc.constantFrom(null, 64, 100, 256),
  seed,
});

/** Row and column slices and writes, reading back every result. */
const sliceAll = (s: typeof sliceArb extends fc.Arbitrary<infer A> ? A : never) => {
  const r0 = s.a % s.r;
  const rn = s.b % (s.r - r0 + 1);
  const c0 = s.a % s.c;
  const cn = s.b % (s.c - c0 + 1);
  return (ops: Ops): Tensor[] => {
    const x = ops.fromArray(vals(s.r * s.c, s.seed), [s.r, s.c]);
    const ids = ops.fromArray(ints(s.r * s.c, s.seed + 1, 1000), [s.r, s.c], "i32");
    const rows = ops.sliceRows(x, r0, rn);
    const cols = ops.sliceColumns(x, c0, cn);
    const y = ops.copy(x);
    ops.setRows(y, s.r - rn, rows);
    ops.setColumns(y, s.c - cn, cols);
    const z = ops.copy(x);
    ops.setRows(z, 0, ops.sliceRows(z, r0, rn)); // a source that shares storage with dst
    return [rows, cols, y, z, ops.sliceColumns(ids, c0, cn)];
  };
};

const readMixed = (b: BackendShape, f: (ops: Ops) => Tensor[]) =>
  withOps(b, (ops) =>
    Effect.gen(function* () {
      const ts = f(ops);
      const fl = yield* ops.read(ts.slice(0, 4));
      const [ids] = yield* ops.readInt(ts.slice(4));
      return [...fl, ids];
    }));

gpuTest("slices of split and whole tensors equal the CPU's bit for bit", () =>
  fc.assert(
    fc.asyncProperty(sliceArb, async (s) => {
      const want = await readMixed(cpu, sliceAll(s));
      const got = await withLimit(gpu!, s.limit ?? 1 << 30, () => readMixed(gpu!, sliceAll(s)));
      bitEqual(`slices ${JSON.stringify(s)}`, got, want);
    }),
    { numRuns: 30 },
  ));

Deno.test("vocabChunks: tile every block, stay within maxRows, and are multiples of 4 but a block's last", () => {
  fc.assert(
    fc.property(
      fc.array(fc.integer({ min: 1, max: 40_000 }), { minLength: 1, maxLength: 6 }),
      fc.integer({ min: 1, max: 9_000 }),
      (sizes, maxRows) => {
        const bounds = [0];
        for (const n of sizes) bounds.push(bounds[bounds.length - 1] + n);
        const chunks = vocabChunks(bounds, maxRows);
        let at = 0;
        for (let i = 0; i < sizes.length; i++) {
          const inBlock = chunks.filter(([s]) => s >= bounds[i] && s < bounds[i + 1]);
          // contiguous, covering the block exactly, as few chunks as maxRows allows
          for (const [s, n] of inBlock) {
            assertEquals(s, at);
            assert(n >= 1 && n <= maxRows, `chunk ${n} rows, bound ${maxRows}`);
            at += n;
          }
          assertEquals(at, bounds[i + 1]);
          assertEquals(
            inBlock.length,
            Math.ceil(sizes[i] / (maxRows >= 4 ? maxRows - (maxRows % 4) : maxRows)),
          );
          if (maxRows >= 4) {
            for (const [, n] of inBlock.slice(0, -1)) assertEquals(n % 4, 0);
          }
        }
      },
    ),
    { numRuns: 300 },
  );
  // Qwen2.5's head: 151,936 rows in 5 blocks of 30,388, for 512 rows of 4M logits (8,192 rows)
  const qwen = vocabChunks([0, 30388, 60776, 91164, 121552, 151936], 8192);
  assertEquals(qwen.length, 20);
  assertEquals(qwen.slice(0, 4), [[0, 7600], [7600, 7600], [15200, 7600], [22800, 7588]]);
});

Deno.test("cpu: slices on a hand example; sliceRows is a view", () =>
  withOps(cpu, (ops) =>
    Effect.gen(function* () {
      const x = ops.fromArray([1, 2, 3, 4, 5, 6], [3, 2]);
      assertEquals(ops.rowBlocks(x), [0, 3]);
      const v = ops.sliceRows(x, 1, 2);
      ops.setColumns(x, 1, ops.fromArray([7, 8, 9], [3, 1]));
      const [a, b] = yield* ops.read([v, ops.sliceColumns(x, 0, 1)]);
      assertEquals([...a], [3, 8, 5, 9]);
      assertEquals([...b], [1, 3, 5]);
    })));

/** Every op that takes split tensors, on inputs the GPU stores split (when the limit is low). */
const splitOps = (ops: Ops): Tensor[] => {
  const [v, h, n] = [37, 6, 9];
  const table = ops.fromArray(vals(v * h, 1), [v, h]);
  const ids = Int32Array.from([0, 36, 5, 5, 20, 36, 1, 12, 19]);
  const idsT = ops.fromArray(ids, [n], "i32");
  const dy = ops.fromArray(vals(n * h, 2), [n, h]);
  const b2 = ops.fromArray(vals(v * h, 3), [v, h]);
  const emb = ops.embedding(table, idsT);
  const eg = ops.embeddingBackward(dy, ids, v);
  const flat = ops.reshape(ops.add(table, b2), [v * h / 3, 3]);
  const acc = ops.copy(table);
  ops.addScaledInPlace(acc, b2, 0.25);
  ops.addScaledInPlace(acc, acc, -0.5);
  const [p, m, s] = [ops.copy(table), ops.zeros([v, h]), ops.zeros([v, h])];
  ops.adamw(p, b2, m, s, {
    lr: 0.01,
    beta1: 0.9,
    beta2: 0.99,
    eps: 1e-8,
    weightDecay: 0.1,
    step: 2,
    gradScale: 0.5,
  });
  const logits = ops.fromArray(vals(n * v, 4, 5), [n, v]);
  const tg = ops.fromArray(ints(n, 5, v), [n], "i32");
  const lp = ops.logProbs(logits, tg, 0.8);
  const dl = ops.logProbsBackward(ops.fromArray(vals(n, 6), [n]), logits, tg, lp.lse, 0.8);
  return [
    emb,
    eg,
    flat,
    ops.sub(table, b2),
    ops.mul(table, b2),
    ops.scale(table, -3),
    ops.addScaled(table, b2, 0.5),
    acc,
    p,
    m,
    s,
    lp.logp,
    lp.lse,
    dl,
    ops.entropy(logits, 0.8),
    ops.sumSquares(b2),
  ];
};

gpuTest(
  "tensors split into blocks: every op that takes them equals the unsplit result",
  async () => {
    const whole = await evalOn(gpu!, splitOps);
    const split = await withLimit(gpu!, 256, () =>
      withOps(gpu!, (ops) => {
        const t = ops.fromArray(vals(37 * 6, 1), [37, 6]);
        const blocks = ops.rowBlocks(t);
        assert(blocks.length > 3, `expected several blocks, got ${blocks}`);
        assertEquals(blocks.at(-1), 37);
        return ops.read(splitOps(ops));
      }));
    // sumSquares adds in another order when split; everything else is the same kernels per row.
    bitEqual("split vs whole", split.slice(0, -1), whole.slice(0, -1));
    assertClose("sumSquares", split.slice(-1), whole.slice(-1), 1e-6);
    assertClose("vs cpu", split, await evalOn(cpu, splitOps), 1e-5);
  },
);

gpuTest(
  "ops that take one block refuse split tensors and too-large results with a ShapeError",
  () =>
    withLimit(gpu!, 256, () =>
      withOps(gpu!, (ops) => {
        const big = ops.fromArray(vals(40 * 4, 1), [40, 4]);
        assert(ops.rowBlocks(big).length > 2);
        const small = ops.fromArray(vals(4 * 4, 2), [4, 4]);
        const bad = (f: () => unknown, what: string) =>
          throws(f, (e) => e instanceof ShapeError, `${what} should raise ShapeError`);
        bad(() => ops.matmul(big, small), "matmul of a split tensor");
        const a = ops.fromArray(vals(16 * 4, 3), [16, 4]); // exactly one binding
        bad(() => ops.matmul(a, ops.zeros([8, 4]), { transB: true }), "a result over the limit");
        bad(() => ops.rmsNorm(big, ops.zeros([4]), 1e-5), "rmsNorm of a split tensor");
        ops.reshape(big, [20, 8]); // blocks of 14 rows of 4 hold whole rows of 8
        bad(() => ops.reshape(big, [32, 5]), "reshape across blocks");
        const other = ops.reshape(ops.fromArray(vals(160, 4), [10, 16]), [40, 4]);
        bad(() => ops.add(big, other), "differently split operands");
        bad(() => ops.fromArray(vals(100, 1), [1, 100]), "a row over the limit");
      })),
);

// ---- the decoder's chunked head -------------------------------------------------------------------

/** A model with non-trivial weights (std 0.4) so every path carries signal. */
const makeWeights = (c: ModelConfig, s: number): WeightMap => {
  const w = initWeights(c, s, 0.4);
  const rng = new Rng(s + 7);
  for (const [name, t] of w) {
    if (name.endsWith("norm.weight") || name.endsWith(".bias")) {
      for (let i = 0; i < t.data.length; i++) {
        t.data[i] = (name.endsWith(".bias") ? 0 : 1) + 0.3 * rng.normal();
      }
    }
  }
  return w;
};

const makeLora = (c: ModelConfig, s: number): LoraWeights => {
  const l = initLora(c, {
    r: 2,
    alpha: 4,
    dropout: 0,
    targetModules: ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    useRslora: false,
  }, s);
  const rng = new Rng(s + 3);
  for (const m of l.modules.values()) {
    for (let i = 0; i < m.b.data.length; i++) m.b.data[i] = 0.3 * rng.normal();
  }
  return l;
};

const V = 61;
const configs: [string, ModelConfig][] = [
  ["llama", tinyConfig({ vocabSize: V })],
  [
    "qwen2 tied",
    tinyConfig({ vocabSize: V, modelType: "qwen2", attentionBias: true, tieWordEmbeddings: true }),
  ],
];
const input = {
  ids: [1, 4, 60, 3, 9, 0, 2, 5, 33, 6],
  batch: 2,
  seqLen: 5,
  kvStart: [0, 1],
  logitRows: [0, 1, 2, 3, 6, 7, 8],
};
const targets = [4, 60, 3, 9, 5, 33, 6];
const dlogp = [1, -2, 0.5, 1.5, -1, 2, 0.25];
const TEMP = 0.8;

/** log-probs, lse and entropies of forwardLogProbs (chunkRows: vocabulary rows per chunk). */
const logProbsOn = (
  b: BackendShape,
  c: ModelConfig,
  w: WeightMap,
  lora: LoraWeights | null,
  chunkRows?: number,
): Promise<FloatArray[]> =>
  withOps(b, (ops) => {
    const model = uploadModel(ops, c, w);
    const run = lora ? uploadLora(ops, lora) : null;
    const r = forwardLogProbs(ops, model, input, targets, TEMP, {
      lora: run,
      entropy: true,
      chunkRows,
    });
    return ops.read([r.logp, r.lse, r.entropy!]);
  });

/** The same from the plain forward's logits and the whole-row ops. */
const logProbsPlain = (
  b: BackendShape,
  c: ModelConfig,
  w: WeightMap,
  lora: LoraWeights | null,
): Promise<FloatArray[]> =>
  withOps(b, (ops) => {
    const model = uploadModel(ops, c, w);
    const { logits } = forward(ops, model, input, { lora: lora ? uploadLora(ops, lora) : null });
    const t = ops.fromArray(targets, [targets.length], "i32");
    const { logp, lse } = ops.logProbs(logits, t, TEMP);
    return ops.read([logp, lse, ops.entropy(logits, TEMP)]);
  });

const gradsOn = (
  b: BackendShape,
  c: ModelConfig,
  w: WeightMap,
  lora: LoraWeights | null,
  mode: "lora" | "full",
  chunkRows?: number,
): Promise<Map<string, Float64Array>> =>
  withOps(b, (ops) =>
    Effect.gen(function* () {
      const model = uploadModel(ops, c, w);
      const run = lora ? uploadLora(ops, lora) : null;
      const r = forwardLogProbs(ops, model, input, targets, TEMP, {
        lora: run,
        train: true,
        chunkRows,
      });
      const g = backwardLogProbs(ops, r.tape!, ops.fromArray(dlogp, [dlogp.length]), mode);
      const names = [...g.keys()];
      const host = yield* ops.read(names.map((n) => g.get(n)!));
      return new Map(names.map((n, i) => [n, Float64Array.from(host[i])]));
    }));

for (const b of both) {
  for (const [label, c] of configs) {
    Deno.test(`${b.info.name}: forwardLogProbs over 1, 2 and 9 vocabulary chunks equals the plain logits (${label})`, async () => {
      const w = makeWeights(c, 3);
      const lora = makeLora(c, 4);
      const want = await logProbsPlain(ref, c, w, lora);
      for (const rows of [undefined, 31, 7]) {
        assertClose(`chunkRows ${rows}`, await logProbsOn(b, c, w, lora, rows), want);
      }
    });

    for (const mode of ["lora", "full"] as const) {
      Deno.test(`${b.info.name}: chunked ${mode} gradients of Σ dlogp·logp match float64 finite differences (${label})`, async () => {
        const w = makeWeights(c, 11);
        const lora = mode === "lora" ? makeLora(c, 5) : null;
        const grads = await gradsOn(b, c, w, lora, mode, 7);
        // The chunked gradients equal the one-chunk ones (f64), and the one-chunk ones the
        // finite differences at sampled coordinates.
        const whole = await gradsOn(ref, c, w, lora, mode);
        assertEquals(new Set(grads.keys()), new Set(whole.keys()));
        for (const [k, g] of grads) {
          const e = relError(g, whole.get(k)!);
          assert(e < (b.info.name === "cpu" ? 1e-5 : 1e-4), `${k}: rel error ${e} vs one chunk`);
        }
        const loss = async () => {
          const [lp] = await logProbsOn(ref, c, w, lora, 7);
          let s = 0;
          for (let i = 0; i < lp.length; i++) s += dlogp[i] * lp[i];
          return s;
        };
        const params: [string, Float32Array][] = mode === "full"
          ? [...w].map(([n, t]) => [n, t.data])
          : [...lora!.modules].flatMap(([p, m]) =>
            [[`${p}.lora_A`, m.a.data], [`${p}.lora_B`, m.b.data]] as [string, Float32Array][]
          );
        const rng = new Rng(3);
        for (const [name, data] of params) {
          if (mode === "full" && !/embed|lm_head|norm\.weight$|layers\.1\.mlp/.test(name)) continue;
          const g = grads.get(name)!;
          for (let k = 0; k < 2; k++) {
            const i = rng.int(data.length);
            const keep = data[i];
            const h = 1e-3;
            data[i] = keep + h;
            const up = await loss();
            data[i] = keep - h;
            const down = await loss();
            data[i] = keep;
            const fd = (up - down) / (Math.fround(keep + h) - Math.fround(keep - h));
            const err = Math.abs(g[i] - fd) / Math.max(1, Math.abs(fd));
            assert(err < 5e-3, `${name}[${i}]: analytic ${g[i]} vs numeric ${fd}`);
          }
        }
      });
    }
  }

  Deno.test(`${b.info.name}: forward, backward and forwardCached over vocabulary chunks equal one chunk`, async () => {
    const c = configs[1][1];
    const w = makeWeights(c, 6);
    const lora = makeLora(c, 2);
    const proj = Float32Array.from({ length: input.logitRows.length * V }, (_, i) => Math.sin(i));
    const run = (be: BackendShape, chunkRows?: number) =>
      withOps(be, (ops) =>
        Effect.gen(function* () {
          const model = uploadModel(ops, c, w);
          const l: LoraRuntime = uploadLora(ops, lora);
          const f = forward(ops, model, input, { lora: l, train: true, chunkRows });
          const g = backward(ops, f.tape!, ops.fromArray(proj, f.logits.shape), "full");
          const cache = makeKvCache(ops, c, 2, 7);
          const d1 = forwardCached(ops, model, cache, input.ids, 5, [0, 1], l, { chunkRows });
          const d2 = forwardCached(ops, model, cache, [7, 8], 1, [0, 1], l, { chunkRows });
          const keys = [...g.keys()].sort();
          return yield* ops.read([f.logits, d1, d2, ...keys.map((k) => g.get(k)!)]);
        }));
    const want = await run(ref);
    assertClose("one chunk", await run(b), want, b.info.name === "cpu" ? 1e-5 : 1e-4);
    assertClose("chunks of 9", await run(b, 9), want, b.info.name === "cpu" ? 1e-5 : 1e-4);
  });

  Deno.test(`${b.info.name}: the chunked head never creates a tensor of [tokens, vocab] size`, () =>
    withOps(b, (ops) => {
      const c = configs[1][1];
      const model = uploadModel(ops, c, makeWeights(c, 1));
      const n = input.logitRows.length;
      const largest = (chunkRows?: number) => {
        const sizes: number[] = [];
        const o = spy(ops, sizes);
        const r = forwardLogProbs(o, model, input, targets, 1, {
          train: true,
          entropy: true,
          chunkRows,
        });
        backwardLogProbs(o, r.tape!, o.fromArray(dlogp, [n]), "full");
        return Math.max(...sizes.filter((s) => s !== V * c.hiddenSize)); // full mode: d head
      };
      assert(largest() >= n * V, "one chunk holds the logits");
      const m = largest(7);
      assert(m < n * V && m <= Math.max(n * 7, 10 * c.intermediateSize), `largest ${m}`);
    }));
}

/** Ops that record the size of every tensor they (and their transient scopes) create. */
const spy = (ops: Ops, sizes: number[]): Ops => {
  const record = (r: unknown) => {
    if (r && typeof r === "object") {
      if ("shape" in r && "backend" in r) sizes.push((r as Tensor).size);
      else if (!Effect.isEffect(r)) Object.values(r).forEach((v) => record(v));
    }
  };
  return new Proxy(ops, {
    get(target, prop) {
      const v = Reflect.get(target, prop);
      if (typeof v !== "function") return v;
      if (prop === "transient") {
        return (f: (o: Ops) => unknown) => target.transient((inner) => f(spy(inner, sizes)));
      }
      return (...args: unknown[]) => {
        const r = (v as (...a: unknown[]) => unknown).apply(target, args);
        record(r);
        return r;
      };
    },
  });
};

gpuTest(
  "a model whose embedding and logits exceed the binding limit runs, and matches the CPU",
  async () => {
    const c = configs[1][1]; // tied: the embedding is the head
    const w = makeWeights(c, 8);
    const lora = makeLora(c, 1);
    // 61 x 8 floats = 1952 bytes: 512 bytes per binding splits it into 4+ blocks; activations
    // (at most 10 x 12 floats) still fit.
    const limit = 512;
    const run = (b: BackendShape) =>
      withOps(b, (ops) =>
        Effect.gen(function* () {
          const model = uploadModel(ops, c, w);
          const blocks = ops.rowBlocks(model.weights.get("model.embed_tokens.weight")!);
          const l = uploadLora(ops, lora);
          const r = forwardLogProbs(ops, model, input, targets, TEMP, {
            lora: l,
            train: true,
            entropy: true,
          });
          const g = backwardLogProbs(ops, r.tape!, ops.fromArray(dlogp, [dlogp.length]), "lora");
          const full = forwardLogProbs(ops, model, input, targets, TEMP, { train: true });
          const gf = backwardLogProbs(
            ops,
            full.tape!,
            ops.fromArray(dlogp, [dlogp.length]),
            "full",
          );
          const f = forward(ops, model, input, { lora: l });
          const cache = makeKvCache(ops, c, 2, 6);
          const d = forwardCached(ops, model, cache, input.ids, 5, [0, 1], l);
          const keys = [...g.keys()].sort();
          const fkeys = [...gf.keys()].sort();
          const out = yield* ops.read([
            r.logp,
            r.entropy!,
            f.logits,
            d,
            ...keys.map((k) => g.get(k)!),
            ...fkeys.map((k) => gf.get(k)!),
          ]);
          return { out, blocks: blocks.length - 1 };
        }));
    const want = await run(ref);
    const got = await withLimit(gpu!, limit, () => run(gpu!));
    assert(got.blocks >= 4, `embedding in ${got.blocks} blocks`);
    assertClose("split model", got.out, want.out, 1e-4);
  },
);

gpuTeardown();
