/**
 * An RMSNorm folded into the projections it feeds (Ops.projectLoraShared / Ops.projectSwiglu
 * with `norm`): on WebGPU where lavapipe has subgroups, the subgroup kernel's `norm` form
 * normalises the rows as it reads them and the normed input is never stored; elsewhere (the CPU
 * twin, small batches, other shapes) the norm runs first. Both against the float64 reference of
 * rmsNorm then the same op, on the same 16-bit-rounded weights; the fold is counted as taken
 * exactly where its conditions hold; inputs are left as they were; a bad norm weight raises
 * ShapeError.
 */
import { ok as assert, throws } from "node:assert/strict";
import fc from "fast-check";
import type { LoraProjection, Ops, RmsNormFold, SwigluPart } from "../src/backend/ops.ts";
import type { HalfDType } from "../src/backend/tensor.ts";
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
/** Products below this many multiply-adds take the direct kernel (matmul.ts SMALL_MACS). */
const SMALL_MACS = 1 << 17;

interface Case {
  readonly m: number;
  readonly k: number;
  /** Output widths of the projections (projectLoraShared: 1 to 3; projectSwiglu: the first). */
  readonly ns: readonly number[];
  readonly r: number;
  readonly half: HalfDType | null;
  readonly s: number;
  readonly eps: number;
  /** projectSwiglu only: the halves carry LoRA pairs. */
  readonly adapted: boolean;
  readonly seed: number;
}

const inputs = (ops: Ops, c: Case) => {
  const x = ops.fromArray(seededValues(c.m * c.k, c.seed).map((v) => 3 * v), [c.m, c.k]);
  // a norm weight around 1, as trained ones are, with a few negative entries
  const w = ops.fromArray(seededValues(c.k, c.seed + 1).map((v) => 1 + 1.5 * v), [c.k]);
  const weight = (n: number, i: number) =>
    ops.fromArray(seededValues(n * c.k, c.seed + 10 * i), [n, c.k], c.half ?? "f32");
  const lora = (n: number, i: number) => ({
    a: ops.fromArray(seededValues(c.r * c.k, c.seed + 10 * i + 1), [c.r, c.k]),
    b: ops.fromArray(seededValues(n * c.r, c.seed + 10 * i + 2), [n, c.r]),
  });
  return { x, norm: { w, eps: c.eps } as RmsNormFold, weight, lora };
};

const loraParts = (ops: Ops, c: Case) => {
  const t = inputs(ops, c);
  const parts: LoraProjection[] = c.ns.map((n, i) => ({
    w: t.weight(n, i + 1),
    ...t.lora(n, i + 1),
  }));
  return { ...t, parts };
};

const swigluParts = (ops: Ops, c: Case) => {
  const t = inputs(ops, c);
  const n = c.ns[0];
  const half = (i: number): SwigluPart => ({
    w: t.weight(n, i),
    lora: c.adapted ? t.lora(n, i) : null,
  });
  return { ...t, gate: half(1), up: half(2) };
};

/** What the WebGPU fold needs of every product (see matmul.ts subgroupRuns). */
const subgroupRuns = (c: Case, n: number) =>
  lanes !== null && c.m >= SUBGROUP_TILE_ROWS && n >= 2 * lanes && c.k <= 4096;

const foldsShared = (c: Case) =>
  subgroupRuns(c, c.r * c.ns.length) &&
  c.ns.every((n) => subgroupRuns(c, n) && c.m * n * c.k >= SMALL_MACS);

const foldsSwiglu = (c: Case) =>
  c.half !== null && c.k % 4 === 0 && subgroupRuns(c, c.ns[0]) &&
  (!c.adapted || subgroupRuns(c, 2 * c.r));

const cases = (maxParts: number): fc.Arbitrary<Case> =>
  fc.record({
    m: fc.oneof(
      fc.integer({ min: 1, max: 20 }),
      fc.integer({ min: SUBGROUP_TILE_ROWS, max: 2 * SUBGROUP_TILE_ROWS + 9 }),
    ),
    k: fc.oneof(fc.integer({ min: 8, max: 72 }).map((v) => 4 * v), fc.integer({ min: 9, max: 99 })),
    ns: fc.array(fc.integer({ min: 2, max: 40 }).map((v) => 4 * v), {
      minLength: 1,
      maxLength: maxParts,
    }),
    r: fc.constantFrom(4, 8, 16),
    half: fc.constantFrom<HalfDType | null>("bf16", "bf16", "f16", null),
    s: fc.constantFrom(1, -0.5, 2),
    eps: fc.constantFrom(1e-5, 1e-6, 0.1),
    adapted: fc.boolean(),
    seed: fc.integer({ min: 1, max: 0x7fffffff }),
  });

const sharedFolded = (b: BackendShape, c: Case) =>
  withOps(b, (ops) => {
    const { x, norm, parts } = loraParts(ops, c);
    return ops.read([x, ...ops.projectLoraShared(x, parts, c.s, norm)]);
  });

const sharedReference = (c: Case) =>
  withOps(ref, (ops) => {
    const { x, norm, parts } = loraParts(ops, c);
    return ops.read(ops.projectLoraShared(ops.rmsNorm(x, norm.w, norm.eps).y, parts, c.s));
  });

const swigluFolded = (b: BackendShape, c: Case) =>
  withOps(b, (ops) => {
    const { x, norm, gate, up } = swigluParts(ops, c);
    return ops.read([x, ops.projectSwiglu(x, gate, up, c.s, norm)]);
  });

const swigluReference = (c: Case) =>
  withOps(ref, (ops) => {
    const { x, norm, gate, up } = swigluParts(ops, c);
    return ops.read([ops.projectSwiglu(ops.rmsNorm(x, norm.w, norm.eps).y, gate, up, c.s)]);
  });

const inputOf = (c: Case) => withOps(cpu, (ops) => ops.read([inputs(ops, c).x]));

for (const [name, b] of [["cpu", cpu], ["webgpu", gpu]] as const) {
  Deno.test({
    name: `${name}: projectLoraShared with a norm equals rmsNorm then the projections (f64)`,
    ignore: b === null,
    fn: async () => {
      await fc.assert(
        fc.asyncProperty(cases(3), async (c) => {
          const want = await sharedReference(c);
          const before = matmulTuning.foldedNorms;
          const [x, ...got] = await sharedFolded(b!, c);
          const taken = matmulTuning.foldedNorms - before;
          const expect = b === gpu && foldsShared(c) ? 1 : 0;
          assert(taken === expect, `${JSON.stringify(c)}: norm folded ${taken} times`);
          got.forEach((g, i) => {
            const e = relError(g, want[i]);
            assert(e <= TOL, `${JSON.stringify(c)}: part ${i} rel error ${e}`);
          });
          const [x0] = await inputOf(c);
          assert(relError(x, x0) === 0, "the input was changed");
        }),
        { numRuns: name === "cpu" ? 15 : 40 },
      );
    },
  });

  Deno.test({
    name: `${name}: projectSwiglu with a norm equals rmsNorm then projectSwiglu (f64)`,
    ignore: b === null,
    fn: async () => {
      await fc.assert(
        fc.asyncProperty(cases(1), async (c) => {
          const [want] = await swigluReference(c);
          const before = matmulTuning.foldedNorms;
          const [x, got] = await swigluFolded(b!, c);
          const taken = matmulTuning.foldedNorms - before;
          const expect = b === gpu && foldsSwiglu(c) ? 1 : 0;
          assert(taken === expect, `${JSON.stringify(c)}: norm folded ${taken} times`);
          const e = relError(got, want);
          assert(e <= TOL, `${JSON.stringify(c)}: rel error ${e}`);
          const [x0] = await inputOf(c);
          assert(relError(x, x0) === 0, "the input was changed");
        }),
        { numRuns: name === "cpu" ? 15 : 40 },
      );
    },
  });

  Deno.test({
    name: `${name}: a folded norm's weight of another length raises ShapeError`,
    ignore: b === null || (name === "webgpu" && !hasGpu),
    fn: () =>
      withOps(b!, (ops) => {
        // a folding shape (WebGPU takes the fold's own check) and a small one (rmsNorm's)
        for (const m of [SUBGROUP_TILE_ROWS, 4]) {
          const c: Case = {
            m,
            k: 64,
            ns: [64, 32],
            r: 16,
            half: "bf16",
            s: 1,
            eps: 1e-5,
            adapted: true,
            seed: 5,
          };
          const { x, parts, gate, up } = { ...loraParts(ops, c), ...swigluParts(ops, c) };
          const norm = { w: ops.fromArray(seededValues(60, 2), [60]), eps: 1e-5 };
          throws(
            () => ops.projectLoraShared(x, parts, 1, norm),
            (e) => e instanceof ShapeError,
            `m ${m}: projectLoraShared`,
          );
          throws(
            () => ops.projectSwiglu(x, gate, up, 1, norm),
            (e) => e instanceof ShapeError,
            `m ${m}: projectSwiglu`,
          );
        }
      }),
  });
}

Deno.test({
  name: "webgpu: SmolLM2's q/k/v and MLP shapes (bf16, rank 16) fold their norms and match",
  ignore: lanes === null,
  fn: async () => {
    const qkv: Case = {
      m: 128,
      k: 576,
      ns: [576, 192, 192],
      r: 16,
      half: "bf16",
      s: 2,
      eps: 1e-5,
      adapted: true,
      seed: 7,
    };
    const before = matmulTuning.foldedNorms;
    const [, ...got] = await sharedFolded(gpu!, qkv);
    const want = await sharedReference(qkv);
    got.forEach((g, i) => assert(relError(g, want[i]) <= TOL, `qkv part ${i}`));
    const mlp: Case = { ...qkv, ns: [1536], seed: 8 };
    const [, act] = await swigluFolded(gpu!, mlp);
    const [wantAct] = await swigluReference(mlp);
    assert(relError(act, wantAct) <= TOL, "mlp");
    assert(matmulTuning.foldedNorms - before === 2);
    assert(act.some((v) => v !== 0));
  },
});

gpuTeardown();
