/**
 * Matmul: hand-computed products for every transpose variant, shape errors, property tests of
 * the CPU f32 backend against the float64 reference and of WebGPU against the CPU (random shapes
 * with edge sizes), and larger cases for the tiled WebGPU kernels (big tile, copied operands,
 * row chunking past the texture limit, odd widths, very long K).
 */
import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import fc from "fast-check";
import { Effect } from "effect";
import type { BackendShape } from "../src/backend/backend.ts";
import type { MatmulOptions } from "../src/backend/ops.ts";
import { type FloatArray, ShapeError } from "../src/backend/tensor.ts";
import { matmulTuning } from "../src/backend/webgpu/matmul.ts";
import { hasGpu, relError, seededValues, testBackends, withOps } from "./support/backends.ts";

const { gpu, cpu, ref } = await testBackends();
const all: BackendShape[] = [cpu, ref, ...(gpu ? [gpu] : [])];
const TOL = 1e-5;

const label = (b: BackendShape): string => b === ref ? "cpu f64" : b.info.name;

const gpuTest = (name: string, fn: () => Promise<void>): void =>
  Deno.test({ name: `webgpu: ${name}`, ignore: !hasGpu, fn });

/** One product: a stored [M,K] ([K,M] with transA), b stored [K,N] ([N,K] with transB). */
interface Case {
  readonly m: number;
  readonly n: number;
  readonly k: number;
  readonly transA: boolean;
  readonly transB: boolean;
  readonly seed: number;
}

const describe = (c: Case): string =>
  `${c.m}x${c.k}·${c.k}x${c.n}${c.transA ? " transA" : ""}${c.transB ? " transB" : ""}`;

/** Runs the product of `c` (values in [-1, 1) from its seed) on `b` and reads C back. */
const product = (b: BackendShape, c: Case): Promise<FloatArray> =>
  withOps(b, (ops) => {
    const a = ops.fromArray(
      seededValues(c.m * c.k, c.seed),
      c.transA ? [c.k, c.m] : [c.m, c.k],
    );
    const w = ops.fromArray(
      seededValues(c.k * c.n, c.seed + 7919),
      c.transB ? [c.n, c.k] : [c.k, c.n],
    );
    const opts: MatmulOptions = { transA: c.transA, transB: c.transB };
    return Effect.map(ops.read([ops.matmul(a, w, opts)]), ([x]) => x);
  });

/** Normwise relative error of `b` against `against` on case `c`. */
const errorOf = async (b: BackendShape, against: BackendShape, c: Case): Promise<number> => {
  const [x, r] = [await product(b, c), await product(against, c)];
  assertEquals(x.length, c.m * c.n);
  return relError(x, r);
};

/** Sizes 1..70 with the edges of the 4-wide vectors and 16/32 tiles over-represented. */
const size = fc.oneof(
  fc.integer({ min: 1, max: 8 }),
  fc.constantFrom(15, 16, 17, 31, 32, 33, 63, 64, 65),
  fc.integer({ min: 1, max: 70 }),
);
const cases: fc.Arbitrary<Case> = fc.record({
  m: size,
  n: size,
  k: size,
  transA: fc.boolean(),
  transB: fc.boolean(),
  seed: fc.integer({ min: 1, max: 1 << 30 }),
});

// ---- hand-computed example -----------------------------------------------------------------

// A = [[1,2,3],[4,5,6]], B = [[7,8],[9,10],[11,12]]: A·B = [[58,64],[139,154]].
const A = [1, 2, 3, 4, 5, 6];
const AT = [1, 4, 2, 5, 3, 6];
const B = [7, 8, 9, 10, 11, 12];
const BT = [7, 9, 11, 8, 10, 12];
const variants: [string, MatmulOptions, number[], number[], number[], number[]][] = [
  ["A·B", {}, A, [2, 3], B, [3, 2]],
  ["A·Bᵀ (transB)", { transB: true }, A, [2, 3], BT, [2, 3]],
  ["Aᵀ·B (transA)", { transA: true }, AT, [3, 2], B, [3, 2]],
  ["Aᵀ·Bᵀ (transA, transB)", { transA: true, transB: true }, AT, [3, 2], BT, [2, 3]],
];

for (const b of all) {
  Deno.test({
    name: `${label(b)}: matmul 2x3·3x2 by hand, every transpose variant`,
    ignore: b === gpu && !hasGpu,
    fn: () =>
      withOps(b, (ops) =>
        Effect.gen(function* () {
          for (const [name, opts, a, aShape, w, wShape] of variants) {
            const c = ops.matmul(ops.fromArray(a, aShape), ops.fromArray(w, wShape), opts);
            assertEquals(c.shape, [2, 2], name);
            const [x] = yield* ops.read([c]);
            assertEquals(Array.from(x), [58, 64, 139, 154], name);
          }
        })),
  });

  Deno.test({
    name: `${label(b)}: matmul raises ShapeError on mismatched inner dims and non-2-D operands`,
    ignore: b === gpu && !hasGpu,
    fn: () =>
      withOps(b, (ops) => {
        const a = ops.fromArray(A, [2, 3]);
        const isShapeError = (e: unknown) => e instanceof ShapeError;
        throws(() => ops.matmul(a, ops.fromArray([1, 2, 3, 4, 5, 6, 7, 8], [4, 2])), isShapeError);
        throws(() => ops.matmul(a, ops.fromArray(B, [2, 3]), { transB: false }), isShapeError);
        throws(() => ops.matmul(a, ops.fromArray(B, [3, 2]), { transA: true }), isShapeError);
        throws(
          () => ops.matmul(ops.fromArray(A, [1, 2, 3]), ops.fromArray(B, [3, 2])),
          isShapeError,
        );
        throws(() => ops.matmul(a, ops.fromArray([1, 2, 3], [3])), isShapeError);
      }),
  });

  Deno.test({
    name: `${label(b)}: matmul with K = 0 gives zeros, with M = 0 an empty result`,
    ignore: b === gpu && !hasGpu,
    fn: () =>
      withOps(b, (ops) =>
        Effect.gen(function* () {
          const c = ops.matmul(ops.zeros([3, 0]), ops.zeros([0, 2]));
          const e = ops.matmul(ops.zeros([0, 4]), ops.zeros([4, 5]));
          assertEquals(e.shape, [0, 5]);
          const [x] = yield* ops.read([c]);
          assertEquals(Array.from(x), [0, 0, 0, 0, 0, 0]);
        })),
  });
}

// ---- properties ----------------------------------------------------------------------------

Deno.test("cpu f32: matmul matches the float64 reference on random shapes (all variants)", () =>
  fc.assert(
    fc.asyncProperty(cases, async (c) => {
      const err = await errorOf(cpu, ref, c);
      assert(err <= TOL, `${describe(c)}: relative error ${err}`);
    }),
    { numRuns: 40 },
  ));

gpuTest("matmul matches the CPU on random shapes (all variants)", () =>
  fc.assert(
    fc.asyncProperty(cases, async (c) => {
      const err = await errorOf(gpu!, cpu, c);
      assert(err <= TOL, `${describe(c)}: relative error ${err}`);
    }),
    { numRuns: 30 },
  ));

// ---- larger cases for the tiled kernels ----------------------------------------------------

const checkAgainstCpu = async (c: Case): Promise<void> => {
  const err = await errorOf(gpu!, ref, c);
  assert(err <= TOL, `${describe(c)}: relative error ${err}`);
};
const base = { transA: false, transB: false, seed: 17 };

/** Runs `f` with every product the tiled kernel can take forced onto it, however small. */
const forcingTiled = async (f: () => Promise<void>): Promise<void> => {
  matmulTuning.forceTiled = true;
  try {
    await f();
  } finally {
    matmulTuning.forceTiled = false;
  }
};

gpuTest(
  "matmul_t16x16 matches the CPU on random shapes (all variants)",
  () =>
    forcingTiled(() =>
      fc.assert(
        fc.asyncProperty(cases, async (c) => {
          const err = await errorOf(gpu!, cpu, c);
          assert(err <= TOL, `${describe(c)}: relative error ${err}`);
        }),
        { numRuns: 15 },
      )
    ),
);

gpuTest(
  "matmul_t16x16, operands copied or packed, every variant",
  () =>
    forcingTiled(async () => {
      for (const transA of [false, true]) {
        for (const transB of [false, true]) {
          // 64-multiples: both operands copied into textures as stored (either layout).
          await checkAgainstCpu({ m: 128, k: 128, n: 192, transA, transB, seed: 3 });
          // Rows past the last whole tile and K not a multiple of 4: packed.
          await checkAgainstCpu({ m: 100, k: 70, n: 52, transA, transB, seed: 4 });
          // Few tiles over a long K (a decoding step's x·Aᵀ): K split into parts, then summed.
          await checkAgainstCpu({ m: 8, k: 576, n: 48, transA, transB, seed: 8 });
          await checkAgainstCpu({ m: 5, k: 301, n: 20, transA, transB, seed: 9 });
          // At most 8 rows (decoding a few sequences): tiles of 8 rows (HALF_M).
          await checkAgainstCpu({ m: 8, k: 128, n: 192, transA, transB, seed: 6 });
          await checkAgainstCpu({ m: 5, k: 70, n: 52, transA, transB, seed: 7 });
        }
      }
    }),
);

// Tiles are walked in bands of WG/4 tile rows and strips of 4 tile columns (`tile_order`), with
// narrower bands and strips at the edges; a tile missed would leave stale memory in C.
// Workgroups of 64 (256 tiles or more): 19 x 27 tiles end in a band of 3 rows and a strip of 3
// columns; 257 x 1 has strips one column wide, 1 x 257 a single band one row high.
// Workgroups of 16: 3 x 5 tiles end in a band of 3 rows and a strip of 1 column.
gpuTest("matmul tile order covers partial bands and strips", async () => {
  await checkAgainstCpu({ ...base, m: 300, k: 40, n: 420 });
  await checkAgainstCpu({ ...base, m: 300, k: 40, n: 420, transB: true });
  await checkAgainstCpu({ ...base, m: 4100, k: 8, n: 16 });
  await checkAgainstCpu({ ...base, m: 16, k: 8, n: 4100 });
  await forcingTiled(() => checkAgainstCpu({ ...base, m: 40, k: 12, n: 72 }));
});

gpuTest("matmul with 64-multiple dims (operands copied into textures), every variant", async () => {
  for (const transA of [false, true]) {
    for (const transB of [false, true]) {
      await checkAgainstCpu({ m: 64, k: 128, n: 128, transA, transB, seed: 5 });
    }
  }
});

gpuTest(
  "matmul with an odd output width (padded then unpadded) matches the CPU",
  () => checkAgainstCpu({ ...base, m: 100, k: 64, n: 97, transA: true }),
);

gpuTest("matmul past the texture size limit (row chunks) matches the CPU", async () => {
  await checkAgainstCpu({ ...base, m: 8200, k: 64, n: 16, transB: true });
  await checkAgainstCpu({ ...base, m: 16, k: 64, n: 8200 });
});

gpuTest(
  "matmul with K beyond the texture limit (direct kernel) matches the CPU",
  () => checkAgainstCpu({ ...base, m: 3, k: 33000, n: 2, transA: true }),
);

gpuTest("matmul LoRA-rank shapes (K or N = 8..16) match the CPU", async () => {
  await checkAgainstCpu({ ...base, m: 512, k: 256, n: 16, transB: true });
  await checkAgainstCpu({ ...base, m: 512, k: 8, n: 256, transB: true });
  await checkAgainstCpu({ ...base, m: 16, k: 512, n: 256, transA: true });
});
