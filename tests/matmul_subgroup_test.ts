/**
 * The subgroup tile matmul (src/backend/webgpu/matmul_subgroup.ts), taken on a software adapter
 * whose device has subgroups (lavapipe): plain products, accumulating ones and the fused LoRA
 * projection, f32 and 16-bit B in both texture layouts, shapes that end inside a 64-row tile and
 * inside a lane's columns, against the float64 reference; the same products with the kernel
 * switched off agree with them; the path is counted as taken. Its generator's text: one name per
 * spec, lane counts it cannot serve refused. Without such a device the kernel tests are ignored
 * (the generator tests still run).
 */
import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import fc from "fast-check";
import type { Tensor } from "../src/backend/tensor.ts";
import type { HalfDType } from "../src/backend/tensor.ts";
import { matmulTuning } from "../src/backend/webgpu/matmul.ts";
import {
  SUBGROUP_TILE_ROWS,
  subgroupKernelName,
  subgroupKernelSource,
  subgroupLanesSupported,
} from "../src/backend/webgpu/matmul_subgroup.ts";
import type { Ops } from "../src/backend/ops.ts";
import { gpuTeardown, relError, seededValues, testBackends, withOps } from "./support/backends.ts";
import type { BackendShape } from "../src/backend/backend.ts";

const { gpu, ref } = await testBackends();
const lanes = gpu?.gpu?.subgroupLanes ?? null;
const TOL = 1e-5;

interface Case {
  readonly m: number;
  readonly n: number;
  readonly k: number;
  readonly r: number;
  readonly transB: boolean;
  readonly half: HalfDType | null;
  readonly op: "matmul" | "accumulate" | "lora";
  readonly s: number;
  readonly seed: number;
}

/** The case's product (A = x [m, k], k-contiguous as the subgroup kernel needs). */
const product = (ops: Ops, c: Case): Tensor => {
  const x = ops.fromArray(seededValues(c.m * c.k, c.seed), [c.m, c.k]);
  const w = ops.fromArray(
    seededValues(c.n * c.k, c.seed + 1),
    c.transB ? [c.n, c.k] : [c.k, c.n],
    c.half ?? "f32",
  );
  if (c.op === "matmul") return ops.matmul(x, w, { transB: c.transB });
  if (c.op === "accumulate") {
    const acc = ops.fromArray(seededValues(c.m * c.n, c.seed + 2), [c.m, c.n]);
    ops.matmulAccumulate(acc, x, w, c.s, { transB: c.transB });
    return acc;
  }
  const xa = ops.fromArray(seededValues(c.m * c.r, c.seed + 3), [c.m, c.r]);
  const lb = ops.fromArray(seededValues(c.n * c.r, c.seed + 4), [c.n, c.r]);
  return ops.projectLora(x, w, xa, lb, c.s);
};

const run = (b: BackendShape, c: Case) => withOps(b, (ops) => ops.read([product(ops, c)]));

const cases: fc.Arbitrary<Case> = fc.record({
  // from one tile's rows to a few tiles ending anywhere inside one
  m: fc.integer({ min: SUBGROUP_TILE_ROWS, max: 3 * SUBGROUP_TILE_ROWS + 17 }),
  // multiples of 4 (the tiled path's vector stores) ending inside a lane's columns or a tile,
  // from half a tile's columns at 16 lanes (narrower products keep matmul_t16x16)
  n: fc.integer({ min: 8, max: 80 }).map((v) => 4 * v),
  k: fc.integer({ min: 1, max: 200 }),
  r: fc.constantFrom(4, 8, 16),
  transB: fc.boolean(),
  half: fc.constantFrom<HalfDType | null>(null, "bf16", "f16"),
  op: fc.constantFrom<Case["op"]>("matmul", "accumulate", "lora"),
  s: fc.constantFrom(1, -0.5, 0.125),
  seed: fc.integer({ min: 1, max: 0x7fffffff }),
}).filter((c) => c.op !== "lora" || c.transB);

Deno.test({
  name:
    "subgroup tile matmul equals the f64 reference (products, accumulate, LoRA; f32 and 16-bit B)",
  ignore: lanes === null,
  fn: async () => {
    matmulTuning.forceTiled = true;
    try {
      await fc.assert(
        fc.asyncProperty(cases, async (c) => {
          // the reference multiplies the very values the 16-bit B holds
          const [want] = await run(ref, c);
          const before = matmulTuning.subgroupProducts;
          const [got] = await run(gpu!, c);
          const e = relError(got, want);
          assert(e <= TOL, `${JSON.stringify(c)}: rel error ${e}`);
          // every case ran the subgroup kernel, but an accumulate of a skinny inner dimension
          // over at most 64 rows, which matmulAccumulate sends to the direct kernel
          if (!(c.op === "accumulate" && c.k <= 32 && c.m <= 64)) {
            assert(matmulTuning.subgroupProducts > before, `${JSON.stringify(c)}: not taken`);
          }
        }),
        { numRuns: 40 },
      );
    } finally {
      matmulTuning.forceTiled = false;
    }
  },
});

Deno.test({
  name:
    "subgroup tile matmul and matmul_t16x16 agree on a projection-sized product, and only the first counts",
  ignore: lanes === null,
  fn: async () => {
    // SmolLM2's q projection over 8 x 24 tokens: bf16 W, both layouts of B
    for (const transB of [true, false]) {
      const c: Case = {
        m: 192,
        n: 576,
        k: 576,
        r: 16,
        transB,
        half: "bf16",
        op: "matmul",
        s: 1,
        seed: 11,
      };
      const before = matmulTuning.subgroupProducts;
      const [withSg] = await run(gpu!, c);
      const taken = matmulTuning.subgroupProducts - before;
      matmulTuning.subgroupTiles = false;
      let without: Float32Array | Float64Array;
      try {
        [without] = await run(gpu!, c);
      } finally {
        matmulTuning.subgroupTiles = true;
      }
      assertEquals(taken, 1);
      assertEquals(matmulTuning.subgroupProducts - before, 1);
      assert(relError(withSg, without) <= TOL, `transB ${transB}: ${relError(withSg, without)}`);
      assert(withSg.some((v) => v !== 0));
    }
  },
});

Deno.test({
  name: "a product narrower than half a subgroup tile (a rank-16 LoRA x·Aᵀ) keeps matmul_t16x16",
  ignore: lanes === null,
  fn: async () => {
    const c: Case = {
      m: 192,
      n: 2 * lanes! - 4,
      k: 384,
      r: 16,
      transB: true,
      half: null,
      op: "matmul",
      s: 1,
      seed: 5,
    };
    const before = matmulTuning.subgroupProducts;
    const [want] = await run(ref, c);
    const [got] = await run(gpu!, c);
    assertEquals(matmulTuning.subgroupProducts - before, 0);
    assert(relError(got, want) <= TOL, `${relError(got, want)}`);
  },
});

Deno.test("subgroup kernel text: one name per spec, and lane counts it cannot serve are refused", () => {
  const specs = [4, 8, 16, 32, 64].flatMap((l) =>
    (["rgba32float", "rgba16uint", "rgba16float"] as const).flatMap((fb) =>
      [false, true].flatMap((lora) =>
        [false, true].map((glu) => ({ lanes: l, fa: "rgba32float" as const, fb, lora, glu }))
      )
    )
  );
  const names = new Set(specs.map(subgroupKernelName));
  assertEquals(names.size, specs.length);
  for (const s of specs) {
    const code = subgroupKernelSource(s);
    // every row of the tile is broadcast from its lane, each once per pass
    const broadcasts = code.match(/subgroupBroadcast\(/g)?.length ?? 0;
    assertEquals(broadcasts, SUBGROUP_TILE_ROWS * (s.lora ? 2 : 1));
    assert(code.includes(`@workgroup_size(${s.lanes})`));
  }
  for (const bad of [0, 3, 6, 128, 2.5]) {
    assert(!subgroupLanesSupported(bad));
    throws(
      () => subgroupKernelSource({ lanes: bad, fa: "rgba32float", fb: "rgba32float", lora: false }),
      /unsupported/,
    );
  }
});

gpuTeardown();
