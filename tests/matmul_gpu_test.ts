/**
 * The matmul variant for real GPUs (matmul_gpu.ts: workgroup-memory tiling straight from the
 * storage buffers), forced onto this machine's adapter and checked against the CPU backend:
 * random shapes with ragged edges around its 64x64x16 tiles (M, N, K not multiples, K = 1,
 * tall and skinny), every transpose variant, f32, bf16 and f16 operands on either side (read
 * as u32 words, element by element or four at once when aligned), the accumulate form with
 * alpha, the LoRA projections, and operands stored in several blocks past a lowered binding
 * limit. Selection: llvmpipe (a fallback adapter) gets the texture variant unless forced.
 */
import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import fc from "fast-check";
import { Effect } from "effect";
import type { BackendShape } from "../src/backend/backend.ts";
import type { MatmulOptions } from "../src/backend/ops.ts";
import { type HalfDType, ShapeError } from "../src/backend/tensor.ts";
import { matmulVariant, usesGpuKernels } from "../src/backend/webgpu/matmul_gpu.ts";
import {
  gpuTeardown,
  hasGpu,
  relError,
  seededValues,
  testBackends,
  withOps,
} from "./support/backends.ts";

const { gpu, cpu } = await testBackends();
const TOL = 1e-5;

type Dt = "f32" | HalfDType;

interface Case {
  readonly m: number;
  readonly n: number;
  readonly k: number;
  readonly transA: boolean;
  readonly transB: boolean;
  readonly da: Dt;
  readonly db: Dt;
  readonly seed: number;
}

const describe = (c: Case): string =>
  `${c.m}x${c.k}·${c.k}x${c.n}${c.transA ? " transA" : ""}${c.transB ? " transB" : ""} ` +
  `a ${c.da} b ${c.db} seed ${c.seed}`;

const gpuTest = (name: string, fn: () => Promise<void>): void =>
  Deno.test({ name: `webgpu gpu variant: ${name}`, ignore: !hasGpu, fn });

/** Runs `f` with the GPU variant forced. */
const forcingGpu = async <A>(f: () => Promise<A>): Promise<A> => {
  matmulVariant.force = "gpu";
  try {
    return await f();
  } finally {
    matmulVariant.force = undefined;
  }
};

const operands = (c: Case) => ({
  av: seededValues(c.m * c.k, c.seed),
  aShape: c.transA ? [c.k, c.m] : [c.m, c.k],
  bv: seededValues(c.k * c.n, c.seed + 7919),
  bShape: c.transB ? [c.n, c.k] : [c.k, c.n],
  opts: { transA: c.transA, transB: c.transB } as MatmulOptions,
});

/** op(A)·op(B) of case `c` on backend `b` (values in [-1, 1), rounded to the operand dtypes). */
const product = (b: BackendShape, c: Case) =>
  withOps(b, (ops) => {
    const o = operands(c);
    const a = ops.fromArray(o.av, o.aShape, c.da);
    const w = ops.fromArray(o.bv, o.bShape, c.db);
    return Effect.map(ops.read([ops.matmul(a, w, o.opts)]), ([x]) => x);
  });

const errorOf = async (c: Case): Promise<number> => {
  const want = await product(cpu, c);
  const got = await forcingGpu(() => product(gpu!, c));
  assertEquals(got.length, c.m * c.n);
  return relError(got, want);
};

/** Sizes around the 64-wide blocks, the 16-deep k panels and the runs of four. */
const size = fc.oneof(
  fc.integer({ min: 1, max: 8 }),
  fc.constantFrom(15, 16, 17, 31, 33, 63, 64, 65, 127, 128, 129),
  fc.integer({ min: 1, max: 140 }),
);
const dtype = fc.constantFrom<Dt>("f32", "bf16", "f16");
const cases: fc.Arbitrary<Case> = fc.record({
  m: size,
  n: size,
  k: size,
  transA: fc.boolean(),
  transB: fc.boolean(),
  da: dtype,
  db: dtype,
  seed: fc.integer({ min: 1, max: 1 << 30 }),
});

gpuTest(
  "matmul matches the CPU on random shapes, every variant and operand format",
  () =>
    fc.assert(
      fc.asyncProperty(cases, async (c) => {
        const err = await errorOf(c);
        assert(err <= TOL, `${describe(c)}: relative error ${err}`);
      }),
      { numRuns: 25 },
    ),
);

gpuTest("matmul, aligned operands (four-element loads) and K = 1, every variant", async () => {
  for (const transA of [false, true]) {
    for (const transB of [false, true]) {
      for (const [da, db] of [["f32", "f32"], ["f32", "bf16"], ["f16", "f32"], ["bf16", "f16"]]) {
        // multiples of 4: vec4 / vec2<u32> bindings; 100 rows end inside a block
        const c: Case = { m: 100, n: 72, k: 48, transA, transB, da, db, seed: 5 } as Case;
        const err = await errorOf(c);
        assert(err <= TOL, `${describe(c)}: relative error ${err}`);
        const one: Case = { ...c, k: 1, m: 65, n: 3 };
        const e1 = await errorOf(one);
        assert(e1 <= TOL, `${describe(one)}: relative error ${e1}`);
      }
    }
  }
});

gpuTest("matmul, tall and skinny shapes (SmolLM2-like widths, decoding rows)", async () => {
  const shapes: [number, number, number, boolean, boolean][] = [
    [300, 8, 576, false, true], // LoRA x·Aᵀ, r = 8
    [1, 576, 576, false, true], // one decoding row
    [3, 1536, 96, false, true],
    [576, 16, 300, true, false], // dYᵀ·X, few columns
    [2, 2, 1000, false, false],
  ];
  for (const [m, n, k, transA, transB] of shapes) {
    for (const db of ["f32", "bf16"] as const) {
      const c: Case = { m, n, k, transA, transB, da: "f32", db, seed: m + n + k };
      const err = await errorOf(c);
      assert(err <= TOL, `${describe(c)}: relative error ${err}`);
    }
  }
});

// ---- accumulate ----------------------------------------------------------------------------

interface AccCase extends Case {
  readonly s: number;
}

const accumulate = (b: BackendShape, c: AccCase) =>
  withOps(b, (ops) => {
    const o = operands(c);
    const a = ops.fromArray(o.av, o.aShape, c.da);
    const w = ops.fromArray(o.bv, o.bShape, c.db);
    const acc = ops.fromArray(seededValues(c.m * c.n, c.seed + 2), [c.m, c.n]);
    ops.matmulAccumulate(acc, a, w, c.s, o.opts);
    return Effect.map(ops.read([acc, a, w]), ([x, ar, wr]) => ({ x, ar, wr }));
  });

gpuTest("matmulAccumulate equals c + s·op(A)·op(B) of the CPU, and changes only c", () =>
  fc.assert(
    fc.asyncProperty(
      cases.chain((c) => fc.constantFrom(1, 2, -0.5, 0.125).map((s) => ({ ...c, s }))),
      async (c) => {
        const want = await accumulate(cpu, c);
        const got = await forcingGpu(() => accumulate(gpu!, c));
        const e = relError(got.x, want.x);
        assert(e <= TOL, `${describe(c)} s ${c.s}: relative error ${e}`);
        assertEquals(Array.from(got.ar), Array.from(want.ar));
        assertEquals(Array.from(got.wr), Array.from(want.wr));
      },
    ),
    { numRuns: 20 },
  ));

gpuTest("matmulAccumulate with c also an operand goes through a fresh product", async () => {
  // c += 2·c·I: 3·c
  const m = 20;
  const cv = seededValues(m * m, 9);
  const eye = Array.from({ length: m * m }, (_, i) => (i % (m + 1) === 0 ? 1 : 0));
  const [got] = await forcingGpu(() =>
    withOps(gpu!, (ops) => {
      const c = ops.fromArray(cv, [m, m]);
      ops.matmulAccumulate(c, c, ops.fromArray(eye, [m, m]), 2);
      return ops.read([c]);
    })
  );
  const want = Float32Array.from(cv, (v) => 3 * Math.fround(v));
  assert(relError(got, want) <= TOL, `relative error ${relError(got, want)}`);
});

// ---- LoRA projections ----------------------------------------------------------------------

gpuTest(
  "projectLora and projectLoraShared (with and without into) equal the CPU (16-bit W, any rank)",
  () =>
    fc.assert(
      fc.asyncProperty(
        fc.record({
          m: fc.integer({ min: 1, max: 130 }),
          n: fc.integer({ min: 1, max: 90 }),
          k: fc.integer({ min: 1, max: 80 }),
          r: fc.constantFrom(1, 3, 8, 16),
          half: fc.constantFrom<Dt>("f32", "bf16", "f16"),
          s: fc.constantFrom(1, 2, -0.5),
          seed: fc.integer({ min: 1, max: 0x7fffffff }),
        }),
        async (c) => {
          const run = (b: BackendShape) =>
            withOps(b, (ops) => {
              const x = ops.fromArray(seededValues(c.m * c.k, c.seed), [c.m, c.k]);
              const w = ops.fromArray(seededValues(c.n * c.k, c.seed + 1), [c.n, c.k], c.half);
              const la = ops.fromArray(seededValues(c.r * c.k, c.seed + 2), [c.r, c.k]);
              const lb = ops.fromArray(seededValues(c.n * c.r, c.seed + 3), [c.n, c.r]);
              const xa = ops.matmul(x, la, { transB: true });
              const one = ops.projectLora(x, w, xa, lb, c.s);
              const [shared] = ops.projectLoraShared(x, [{ w, a: la, b: lb }], c.s);
              const into = ops.fromArray(seededValues(c.m * c.n, c.seed + 4), [c.m, c.n]);
              const [added] = ops.projectLoraShared(x, [{ w, a: la, b: lb, into }], c.s);
              assert(added === into, "a part with into returns it");
              return ops.read([one, shared, added]);
            });
          const [w1, w2, w3] = await run(cpu);
          const [g1, g2, g3] = await forcingGpu(() => run(gpu!));
          const pairs = [[g1, w1, "projectLora"], [g2, w2, "shared"], [g3, w3, "into"]] as const;
          for (const [g, w, what] of pairs) {
            const e = relError(g, w);
            assert(e <= TOL, `${JSON.stringify(c)} ${what}: relative error ${e}`);
          }
        },
      ),
      { numRuns: 12 },
    ),
);

// ---- operands past the binding limit -------------------------------------------------------

gpuTest("operands stored in several blocks (lowered binding limit), every variant", async () => {
  const ctx = gpu!.gpu!;
  // 512 floats per binding: A and B (16 x 60 .. 60 x 24) split into 2 or 3 row blocks, along
  // the rows of op(A) / columns of op(B) or along k with different cuts; C (16 x 24) fits.
  ctx.setBindingLimit(2048);
  try {
    for (const transA of [false, true]) {
      for (const transB of [false, true]) {
        for (const db of ["f32", "bf16"] as const) {
          const c: Case = { m: 16, n: 24, k: 60, transA, transB, da: "f32", db, seed: 11 };
          const err = await errorOf(c);
          assert(err <= TOL, `${describe(c)}: relative error ${err}`);
          const acc = { ...c, s: -0.5 };
          const want = await accumulate(cpu, acc);
          const got = await forcingGpu(() => accumulate(gpu!, acc));
          const e = relError(got.x, want.x);
          assert(e <= TOL, `${describe(c)} accumulate: relative error ${e}`);
        }
      }
    }
    // the texture variant takes one block per operand only: a typed error naming the op
    matmulVariant.force = "software";
    await withOps(gpu!, (ops) => {
      const a = ops.fromArray(seededValues(16 * 60, 1), [16, 60]);
      const w = ops.fromArray(seededValues(60 * 24, 2), [60, 24]);
      throws(
        () => ops.matmul(a, w),
        (e: unknown) => e instanceof ShapeError && e.message.includes("matmul"),
      );
    });
  } finally {
    matmulVariant.force = undefined;
    ctx.setBindingLimit(null);
  }
});

// ---- selection and bad input ---------------------------------------------------------------

gpuTest("the variant follows the adapter: texture kernels on a software adapter", () => {
  const ctx = gpu!.gpu!;
  assertEquals(usesGpuKernels(ctx), !ctx.info.fallback);
  matmulVariant.force = "gpu";
  assert(usesGpuKernels(ctx));
  matmulVariant.force = "software";
  assert(!usesGpuKernels(ctx));
  matmulVariant.force = undefined;
  return Promise.resolve();
});

gpuTest(
  "an i32 operand or a mismatched c is a ShapeError naming the op",
  () =>
    forcingGpu(() =>
      withOps(gpu!, (ops) => {
        const a = ops.fromArray([1, 2, 3, 4, 5, 6], [2, 3]);
        const ids = ops.fromArray([1, 2, 3, 4, 5, 6], [3, 2], "i32");
        const isError = (op: string) => (e: unknown) =>
          e instanceof ShapeError && e.message.includes(op);
        throws(() => ops.matmul(a, ids), isError("matmul"));
        throws(
          () =>
            ops.matmulAccumulate(
              ops.zeros([2, 3]),
              a,
              ops.fromArray([1, 2, 3, 4, 5, 6], [3, 2]),
              1,
            ),
          isError("matmulAccumulate"),
        );
      })
    ),
);

if (hasGpu) gpuTeardown();
