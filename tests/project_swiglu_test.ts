/**
 * Ops.projectSwiglu: an inference MLP's input swiglu(x·gateᵀ, x·upᵀ) with LoRA deltas. WebGPU
 * (the one-product SwiGLU form of the subgroup tile kernel where lavapipe has subgroups, the
 * composed path elsewhere) and the f32 CPU backend against the float64 reference of the parts
 * (projectLora / matmul, then swiglu) on the same 16-bit-rounded weights; the fused path is
 * counted as taken exactly where its conditions hold; bad shapes raise ShapeError.
 */
import { ok as assert, throws } from "node:assert/strict";
import fc from "fast-check";
import type { Ops, SwigluPart } from "../src/backend/ops.ts";
import type { HalfDType, Tensor } from "../src/backend/tensor.ts";
import { ShapeError } from "../src/backend/tensor.ts";
import { matmulTuning } from "../src/backend/webgpu/matmul.ts";
import { SUBGROUP_TILE_ROWS } from "../src/backend/webgpu/matmul_subgroup.ts";
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

interface Case {
  readonly m: number;
  readonly n: number;
  readonly k: number;
  readonly r: number;
  /** Which halves carry a LoRA pair. */
  readonly adapted: "both" | "none" | "gate";
  readonly half: HalfDType | null;
  readonly s: number;
  readonly seed: number;
}

const parts = (ops: Ops, c: Case): [Tensor, SwigluPart, SwigluPart] => {
  const x = ops.fromArray(seededValues(c.m * c.k, c.seed), [c.m, c.k]);
  const part = (i: number, lora: boolean): SwigluPart => ({
    w: ops.fromArray(seededValues(c.n * c.k, c.seed + 10 * i), [c.n, c.k], c.half ?? "f32"),
    lora: lora
      ? {
        a: ops.fromArray(seededValues(c.r * c.k, c.seed + 10 * i + 1), [c.r, c.k]),
        b: ops.fromArray(seededValues(c.n * c.r, c.seed + 10 * i + 2), [c.n, c.r]),
      }
      : null,
  });
  return [x, part(1, c.adapted !== "none"), part(2, c.adapted === "both")];
};

/** The op under test. */
const fused = (b: BackendShape, c: Case) =>
  withOps(b, (ops) => {
    const [x, g, u] = parts(ops, c);
    return ops.read([ops.projectSwiglu(x, g, u, c.s)]);
  });

/** The same from its parts, one op at a time. */
const composed = (b: BackendShape, c: Case) =>
  withOps(b, (ops) => {
    const [x, g, u] = parts(ops, c);
    const proj = (p: SwigluPart) =>
      p.lora
        ? ops.projectLora(x, p.w, ops.matmul(x, p.lora.a, { transB: true }), p.lora.b, c.s)
        : ops.matmul(x, p.w, { transB: true });
    return ops.read([ops.swiglu(proj(g), proj(u))]);
  });

/** Whether WebGPU's one-product form takes the case (see swigluProduct). */
const fusable = (c: Case) =>
  lanes !== null && c.half !== null && c.adapted !== "gate" && c.m >= SUBGROUP_TILE_ROWS &&
  c.n % 4 === 0 && c.k % 4 === 0 && c.n >= 2 * lanes;

const cases: fc.Arbitrary<Case> = fc.record({
  m: fc.integer({ min: 1, max: 3 * SUBGROUP_TILE_ROWS + 9 }),
  n: fc.integer({ min: 2, max: 60 }).map((v) => 4 * v),
  k: fc.oneof(fc.integer({ min: 1, max: 40 }).map((v) => 4 * v), fc.integer({ min: 1, max: 90 })),
  r: fc.constantFrom(4, 8, 16),
  adapted: fc.constantFrom<Case["adapted"]>("both", "both", "none", "gate"),
  half: fc.constantFrom<HalfDType | null>("bf16", "bf16", "f16", null),
  s: fc.constantFrom(1, -0.5, 2),
  seed: fc.integer({ min: 1, max: 0x7fffffff }),
});

for (const [name, b] of [["cpu", cpu], ["webgpu", gpu]] as const) {
  Deno.test({
    name: `${name}: projectSwiglu equals projectLora / matmul then swiglu (f64 reference)`,
    ignore: b === null,
    fn: async () => {
      await fc.assert(
        fc.asyncProperty(cases, async (c) => {
          const [want] = await composed(ref, c);
          const before = matmulTuning.swigluProducts;
          const [got] = await fused(b!, c);
          const e = relError(got, want);
          assert(e <= TOL, `${JSON.stringify(c)}: rel error ${e}`);
          const taken = matmulTuning.swigluProducts - before;
          const expect = b === gpu && fusable(c) ? 1 : 0;
          assert(taken === expect, `${JSON.stringify(c)}: one-product form ran ${taken} times`);
        }),
        { numRuns: name === "cpu" ? 20 : 40 },
      );
    },
  });
}

Deno.test({
  name: "webgpu: projectSwiglu at SmolLM2's MLP shape (bf16, rank 16), fused and composed agree",
  ignore: lanes === null,
  fn: async () => {
    const c: Case = {
      m: 128,
      n: 1536,
      k: 576,
      r: 16,
      adapted: "both",
      half: "bf16",
      s: 2,
      seed: 3,
    };
    const before = matmulTuning.swigluProducts;
    const [got] = await fused(gpu!, c);
    assert(matmulTuning.swigluProducts - before === 1);
    const [want] = await composed(gpu!, c);
    const e = relError(got, want);
    assert(e <= TOL, `rel error ${e}`);
    assert(got.some((v) => v !== 0));
  },
});

Deno.test({
  name:
    "webgpu: projectSwiglu after a decode-sized projectLoraShared of the same halves (one kept texture)",
  ignore: lanes === null,
  fn: async () => {
    // a decode step's gate/up (8 rows, stackedProjections) keeps the stacked weights and LoRA B
    // that a prefill's projectSwiglu then finds: both must read them in the same layout
    const c: Case = { m: 96, n: 64, k: 192, r: 8, adapted: "both", half: "bf16", s: 0.5, seed: 9 };
    const [want] = await composed(ref, c);
    const stackedBefore = matmulTuning.stackedProducts;
    const before = matmulTuning.swigluProducts;
    const [got] = await withOps(gpu!, (ops) => {
      const [x, g, u] = parts(ops, c);
      const small = ops.fromArray(seededValues(8 * c.k, 4), [8, c.k]);
      // a product this small would go to the direct kernel; the tiled one stacks
      matmulTuning.forceTiled = true;
      try {
        ops.projectLoraShared(small, [
          { w: g.w, a: g.lora!.a, b: g.lora!.b },
          { w: u.w, a: u.lora!.a, b: u.lora!.b },
        ], c.s);
      } finally {
        matmulTuning.forceTiled = false;
      }
      return ops.read([ops.projectSwiglu(x, g, u, c.s)]);
    });
    assert(matmulTuning.stackedProducts - stackedBefore === 1, "decode-sized product not stacked");
    assert(matmulTuning.swigluProducts - before === 1);
    const e = relError(got, want);
    assert(e <= TOL, `rel error ${e}`);
  },
});

for (const [name, b] of [["cpu", cpu], ["webgpu", gpu]] as const) {
  Deno.test({
    name: `${name}: projectSwiglu rejects halves of other shapes`,
    ignore: b === null || (name === "webgpu" && !hasGpu),
    fn: () =>
      withOps(b!, (ops) => {
        const x = ops.fromArray(seededValues(8 * 4, 1), [8, 4]);
        const w = (n: number, k = 4) => ops.fromArray(seededValues(n * k, 2), [n, k]);
        const bad = (f: () => unknown, what: string) =>
          throws(f, (e) => e instanceof ShapeError, `${what} should raise ShapeError`);
        bad(() => ops.projectSwiglu(x, { w: w(8), lora: null }, { w: w(12), lora: null }, 1), "n");
        bad(
          () => ops.projectSwiglu(x, { w: w(8, 5), lora: null }, { w: w(8), lora: null }, 1),
          "k",
        );
        bad(
          () =>
            ops.projectSwiglu(x, { w: w(8), lora: { a: w(4), b: w(8, 3) } }, {
              w: w(8),
              lora: null,
            }, 1),
          "rank",
        );
      }),
  });
}

gpuTeardown();
