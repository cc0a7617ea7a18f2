/**
 * A rotary embedding joined to the projection it follows (Ops.projectLoraShared with a part's
 * `rope`): on WebGPU where lavapipe has subgroups, the subgroup kernel's `rope` form rotates its
 * tiles as it stores them; elsewhere (the CPU twin, decoding-sized batches, head dims not a
 * multiple of 4) rope runs after the product. Both against the float64 reference of the plain
 * projections then Ops.rope, on the same 16-bit-rounded weights, with and without a folded
 * norm, a theta or an inverse-frequency table, positions into the thousands; the store is
 * counted as taken exactly where its conditions hold; bad folds raise ShapeError.
 */
import { ok as assert, throws } from "node:assert/strict";
import fc from "fast-check";
import type { LoraProjection, Ops, RmsNormFold, RopeFold } from "../src/backend/ops.ts";
import type { HalfDType } from "../src/backend/tensor.ts";
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

interface Part {
  readonly heads: number;
  /** Rotated, or a plain projection (v). */
  readonly rope: boolean;
}

interface Case {
  readonly m: number;
  readonly k: number;
  readonly headDim: number;
  readonly parts: readonly Part[];
  readonly r: number;
  readonly half: HalfDType | null;
  readonly s: number;
  readonly norm: boolean;
  /** A theta, or an inverse-frequency table (as scaled RoPE passes). */
  readonly table: boolean;
  /** Largest position. */
  readonly maxPos: number;
  readonly seed: number;
}

const setup = (ops: Ops, c: Case) => {
  const x = ops.fromArray(seededValues(c.m * c.k, c.seed).map((v) => 3 * v), [c.m, c.k]);
  const w = ops.fromArray(seededValues(c.k, c.seed + 1).map((v) => 1 + 1.5 * v), [c.k]);
  const pos = seededValues(c.m, c.seed + 2).map((v) => Math.floor((v + 1) / 2 * c.maxPos));
  const positions = ops.fromArray(pos, [c.m], "i32");
  const half = c.headDim / 2;
  const theta = c.table
    ? Float32Array.from({ length: half }, (_, i) => 10000 ** (-i / half) * (i % 3 === 0 ? 0.25 : 1))
    : 100000;
  const parts: LoraProjection[] = c.parts.map((p, i) => {
    const n = p.heads * c.headDim;
    const fold: RopeFold = { positions, heads: p.heads, headDim: c.headDim, theta };
    return {
      w: ops.fromArray(seededValues(n * c.k, c.seed + 10 * i + 3), [n, c.k], c.half ?? "f32"),
      a: ops.fromArray(seededValues(c.r * c.k, c.seed + 10 * i + 4), [c.r, c.k]),
      b: ops.fromArray(seededValues(n * c.r, c.seed + 10 * i + 5), [n, c.r]),
      ...(p.rope ? { rope: fold } : {}),
    };
  });
  return { x, norm: { w, eps: 1e-5 } as RmsNormFold, parts };
};

/** The projections with their rotations, as the backend runs them; and the input after. */
const joined = (b: BackendShape, c: Case) =>
  withOps(b, (ops) => {
    const { x, norm, parts } = setup(ops, c);
    return ops.read([x, ...ops.projectLoraShared(x, parts, c.s, c.norm ? norm : undefined)]);
  });

/** rmsNorm, the plain projections, then Ops.rope on the rotated ones. */
const reference = (c: Case) =>
  withOps(ref, (ops) => {
    const { x, norm, parts } = setup(ops, c);
    const input = c.norm ? ops.rmsNorm(x, norm.w, norm.eps).y : x;
    const ys = ops.projectLoraShared(input, parts.map(({ rope: _, ...p }) => p), c.s);
    return ops.read(ys.map((y, i) => {
      const f = parts[i].rope;
      return f ? ops.rope(y, f.positions, f.heads, f.headDim, f.theta) : y;
    }));
  });

/** Parts rotated in their product's store on WebGPU (see matmul.ts ropeStores). */
const stores = (c: Case): number => {
  if (lanes === null || c.m < SUBGROUP_TILE_ROWS || c.k / 4 > NORM_MAX_K4) return 0;
  const ns = c.parts.map((p) => p.heads * c.headDim);
  // every part's product tiled (else all go projection by projection)
  if (!ns.every((n) => n % 4 === 0 && c.m * n * c.k >= SMALL_MACS)) return 0;
  return c.parts.filter((p, i) => p.rope && c.headDim % 4 === 0 && ns[i] >= 2 * lanes).length;
};

const cases: fc.Arbitrary<Case> = fc.record({
  m: fc.oneof(
    fc.integer({ min: 1, max: 20 }),
    fc.integer({ min: SUBGROUP_TILE_ROWS, max: 2 * SUBGROUP_TILE_ROWS + 9 }),
  ),
  k: fc.oneof(fc.integer({ min: 8, max: 48 }).map((v) => 4 * v), fc.integer({ min: 9, max: 99 })),
  headDim: fc.constantFrom(4, 8, 16, 32, 64, 64, 6),
  parts: fc.array(
    fc.record({ heads: fc.integer({ min: 1, max: 6 }), rope: fc.boolean() }),
    { minLength: 1, maxLength: 3 },
  ),
  r: fc.constantFrom(4, 8, 16),
  half: fc.constantFrom<HalfDType | null>("bf16", "bf16", "f16", null),
  s: fc.constantFrom(1, -0.5, 2),
  norm: fc.boolean(),
  table: fc.boolean(),
  maxPos: fc.constantFrom(1, 200, 5000),
  seed: fc.integer({ min: 1, max: 0x7fffffff }),
});

const inputOf = (c: Case) => withOps(cpu, (ops) => ops.read([setup(ops, c).x]));

for (const [name, b] of [["cpu", cpu], ["webgpu", gpu]] as const) {
  Deno.test({
    name: `${name}: projectLoraShared with rotated parts equals the projections then rope (f64)`,
    ignore: b === null,
    fn: async () => {
      let stored = 0;
      await fc.assert(
        fc.asyncProperty(cases, async (c) => {
          const want = await reference(c);
          const before = matmulTuning.ropeStores;
          const [x, ...got] = await joined(b!, c);
          const taken = matmulTuning.ropeStores - before;
          const expect = b === gpu ? stores(c) : 0;
          stored += taken;
          assert(taken === expect, `${JSON.stringify(c)}: ${taken} rotating stores, not ${expect}`);
          got.forEach((g, i) => {
            const e = relError(g, want[i]);
            assert(e <= TOL, `${JSON.stringify(c)}: part ${i} rel error ${e}`);
          });
          const [x0] = await inputOf(c);
          assert(relError(x, x0) === 0, "the input was changed");
        }),
        { numRuns: name === "cpu" ? 15 : 40 },
      );
      // the property saw the kernel's form, not only the rotation after the product
      if (b === gpu && lanes !== null) assert(stored > 0, "no case rotated in a product's store");
    },
  });

  Deno.test({
    name: `${name}: a rotated part added onto a tensor, or of the wrong width, raises ShapeError`,
    ignore: b === null || (name === "webgpu" && !hasGpu),
    fn: () =>
      withOps(b!, (ops) => {
        const c: Case = {
          m: SUBGROUP_TILE_ROWS,
          k: 64,
          headDim: 16,
          parts: [{ heads: 4, rope: true }],
          r: 8,
          half: "bf16",
          s: 1,
          norm: false,
          table: false,
          maxPos: 100,
          seed: 9,
        };
        const { x, parts } = setup(ops, c);
        const [p] = parts;
        const into = ops.zeros([c.m, 64]);
        throws(() => ops.projectLoraShared(x, [{ ...p, into }], 1), ShapeError);
        throws(
          () => ops.projectLoraShared(x, [{ ...p, rope: { ...p.rope!, heads: 3 } }], 1),
          ShapeError,
        );
        const short = ops.fromArray([1, 2, 3], [3], "i32");
        throws(
          () => ops.projectLoraShared(x, [{ ...p, rope: { ...p.rope!, positions: short } }], 1),
          ShapeError,
        );
        return Promise.resolve();
      }),
  });
}

gpuTeardown();
