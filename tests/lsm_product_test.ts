/**
 * An LM head's vocabulary chunks folded into the streamed log-softmax by their products
 * (Ops.projectLogSoftmaxChunk): on WebGPU where lavapipe has subgroups, the subgroup kernel's
 * `lsm` form reduces each tile to partial states as it stores, lsm_merge_tiles folds them, and
 * no logits tensor is written; elsewhere (the CPU twin, few rows, narrow chunks) the logits
 * then logSoftmaxChunk. A whole vocabulary in random chunks, in a random order, against the
 * float64 reference of projectRows then logSoftmaxChunk: log-probs, lse and entropies after
 * logSoftmaxFinish; the fused store counted exactly where its conditions hold; a bad call
 * raises ShapeError.
 */
import { ok as assert, throws } from "node:assert/strict";
import fc from "fast-check";
import type { Ops } from "../src/backend/ops.ts";
import type { DType, Tensor } from "../src/backend/tensor.ts";
import { ShapeError } from "../src/backend/tensor.ts";
import { matmulTuning } from "../src/backend/webgpu/matmul.ts";
import { NORM_MAX_K4, SUBGROUP_TILE_ROWS } from "../src/backend/webgpu/matmul_subgroup.ts";
import type { BackendShape } from "../src/backend/backend.ts";
import {
  gpuTeardown,
  hasGpu,
  relError,
  seededValues,
  testBackends,
  withOps,
} from "./support/backends.ts";

const { gpu, cpu, ref } = await testBackends();
const lanes = gpu?.gpu?.subgroupLanes ?? null;
const TOL = 1e-5;
/** Products below this many multiply-adds take the direct kernel (matmul.ts SMALL_MACS). */
const SMALL_MACS = 1 << 17;

interface Case {
  readonly m: number;
  readonly k: number;
  readonly vocab: number;
  /** Chunk boundaries inside (0, vocab), and the order the chunks are folded in. */
  readonly cuts: readonly number[];
  readonly reversed: boolean;
  readonly dtype: DType;
  readonly temperature: number;
  readonly seed: number;
}

const chunksOf = (c: Case): [number, number][] => {
  const bounds = [0, ...[...new Set(c.cuts)].sort((a, b) => a - b), c.vocab];
  const out: [number, number][] = [];
  for (let i = 0; i + 1 < bounds.length; i++) out.push([bounds[i], bounds[i + 1] - bounds[i]]);
  return c.reversed ? out.reverse() : out;
};

const setup = (ops: Ops, c: Case) => {
  // logits of a few units (as a trained head's): their f32 rounding stays within TOL of the
  // entropies (an absolute error of about eps·max|z| per logit)
  const x = ops.fromArray(seededValues(c.m * c.k, c.seed), [c.m, c.k]);
  const w = ops.fromArray(seededValues(c.vocab * c.k, c.seed + 1), [c.vocab, c.k], c.dtype);
  const t = seededValues(c.m, c.seed + 2).map((v) => Math.floor((v + 1) / 2 * c.vocab));
  const targets = ops.fromArray(t.map((v) => Math.min(c.vocab - 1, v)), [c.m], "i32");
  return { x, w, targets };
};

/** The chunks folded by `fold`, then the finished log-probs, lse and entropies. */
const streamed = (
  b: BackendShape,
  c: Case,
  fold: (
    ops: Ops,
    acc: Tensor | null,
    s: ReturnType<typeof setup>,
    c0: number,
    n: number,
  ) => Tensor,
) =>
  withOps(b, (ops) => {
    const s = setup(ops, c);
    let acc: Tensor | null = null;
    for (const [c0, n] of chunksOf(c)) acc = fold(ops, acc, s, c0, n);
    const r = ops.logSoftmaxFinish(acc!);
    return ops.read([r.logp, r.lse, r.entropy]);
  });

const fused = (b: BackendShape, c: Case) =>
  streamed(
    b,
    c,
    (ops, acc, s, c0, n) =>
      ops.projectLogSoftmaxChunk(acc, s.x, s.w, c0, n, s.targets, c.temperature),
  );

const reference = (c: Case) =>
  streamed(
    ref,
    c,
    (ops, acc, s, c0, n) =>
      ops.logSoftmaxChunk(acc, ops.projectRows(s.x, s.w, c0, n), s.targets, c0, c.temperature),
  );

/** Chunks WebGPU folds in their products (see matmul.ts projectLogSoftmaxChunk). */
const stores = (c: Case): number => {
  if (lanes === null || c.m < SUBGROUP_TILE_ROWS || c.k / 4 > NORM_MAX_K4) return 0;
  return chunksOf(c).filter(([, n]) => n % 4 === 0 && n >= 2 * lanes && c.m * n * c.k >= SMALL_MACS)
    .length;
};

const cases: fc.Arbitrary<Case> = fc.integer({ min: 40, max: 700 }).chain((vocab) =>
  fc.record({
    m: fc.oneof(
      fc.integer({ min: 1, max: 20 }),
      fc.integer({ min: SUBGROUP_TILE_ROWS, max: 2 * SUBGROUP_TILE_ROWS + 9 }),
    ),
    k: fc.oneof(fc.integer({ min: 8, max: 40 }).map((v) => 4 * v), fc.integer({ min: 9, max: 99 })),
    vocab: fc.constant(vocab),
    cuts: fc.array(
      fc.oneof(
        fc.integer({ min: 1, max: Math.floor((vocab - 1) / 4) }).map((v) => 4 * v),
        fc.integer({ min: 1, max: vocab - 1 }),
      ),
      { maxLength: 3 },
    ),
    reversed: fc.boolean(),
    dtype: fc.constantFrom<DType>("bf16", "bf16", "f16", "f32"),
    temperature: fc.constantFrom(1, 0.7, 2),
    seed: fc.integer({ min: 1, max: 0x7fffffff }),
  })
);

for (const [name, b] of [["cpu", cpu], ["webgpu", gpu]] as const) {
  Deno.test({
    name:
      `${name}: projectLogSoftmaxChunk over a vocabulary equals projectRows then logSoftmaxChunk (f64)`,
    ignore: b === null,
    fn: async () => {
      let stored = 0;
      await fc.assert(
        fc.asyncProperty(cases, async (c) => {
          const want = await reference(c);
          const before = matmulTuning.lsmStores;
          const got = await fused(b!, c);
          const taken = matmulTuning.lsmStores - before;
          const expect = b === gpu ? stores(c) : 0;
          stored += taken;
          assert(taken === expect, `${JSON.stringify(c)}: ${taken} fused chunks, not ${expect}`);
          ["logp", "lse", "entropy"].forEach((what, i) => {
            const e = relError(got[i], want[i]);
            assert(e <= TOL, `${JSON.stringify(c)}: ${what} rel error ${e}`);
          });
        }),
        { numRuns: name === "cpu" ? 15 : 40 },
      );
      // the property saw the kernel's form, not only the logits path
      if (b === gpu && lanes !== null) assert(stored > 0, "no chunk folded in its product");
    },
  });

  Deno.test({
    name:
      `${name}: projectLogSoftmaxChunk with bad rows, targets, state or temperature raises ShapeError`,
    ignore: b === null || (name === "webgpu" && !hasGpu),
    fn: () =>
      withOps(b!, (ops) => {
        const c: Case = {
          m: SUBGROUP_TILE_ROWS,
          k: 64,
          vocab: 256,
          cuts: [],
          reversed: false,
          dtype: "bf16",
          temperature: 1,
          seed: 3,
        };
        const { x, w, targets } = setup(ops, c);
        const call = (acc: Tensor | null, n: number, t: Tensor, temp: number) => () =>
          ops.projectLogSoftmaxChunk(acc, x, w, 0, n, t, temp);
        throws(call(null, 300, targets, 1), ShapeError);
        throws(call(null, 128, ops.fromArray([1, 2], [2], "i32"), 1), ShapeError);
        throws(call(ops.zeros([3, 4]), 128, targets, 1), ShapeError);
        throws(call(null, 128, targets, 0), ShapeError);
        return Promise.resolve();
      }),
  });
}

gpuTeardown();
