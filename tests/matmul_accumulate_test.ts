/**
 * Ops.matmulAccumulate: c += s·op(A)·op(B) in place. Random shapes, every transpose, f32 and
 * 16-bit B (a frozen base weight), on both WebGPU paths (the tiled kernel's accumulating store
 * and the product-then-add fallback) and the CPU, against the float64 reference; it changes only
 * c; and a c of the wrong shape is a ShapeError naming the op. Ops.projectLora (x·Wᵀ + s·xa·Bᵀ,
 * on WebGPU one fused product for more than 64 rows): the same reference checks, and a B
 * changed in place between two calls is seen by the second (its kept texture is dropped); with
 * `into`, exactly the sum an add of the fresh result onto it stores, the inputs unchanged.
 * Ops.projectLoraShared (projections of one input with their deltas; on WebGPU one product for
 * every x·Aᵀ): each output (fresh, or added onto `into` in place) against the reference, before
 * and after A and B change in place; an `into` of the wrong shape or aliasing x is a ShapeError.
 * Its stacked product (on WebGPU, 2-3 16-bit weights of tile-multiple widths in one product
 * with a block-diagonal B): against the reference before and after A, B and W change in place.
 */
import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import fc from "fast-check";
import { Effect } from "effect";
import type { BackendShape } from "../src/backend/backend.ts";
import { type HalfDType, ShapeError } from "../src/backend/tensor.ts";
import { matmulTuning } from "../src/backend/webgpu/matmul.ts";
import {
  gpuTeardown,
  hasGpu,
  relError,
  seededValues,
  testBackends,
  withOps,
} from "./support/backends.ts";

const { gpu, cpu, ref } = await testBackends();
const backends: BackendShape[] = [cpu, ...(gpu ? [gpu] : [])];
const TOL = 1e-5;

interface Case {
  readonly m: number;
  readonly n: number;
  readonly k: number;
  readonly transA: boolean;
  readonly transB: boolean;
  readonly half: HalfDType | null;
  readonly s: number;
  readonly seed: number;
}

/** c after accumulating, and A and B read back (they must not change). */
const run = (b: BackendShape, c: Case) =>
  withOps(b, (ops) => {
    const av = seededValues(c.m * c.k, c.seed);
    const bv = seededValues(c.k * c.n, c.seed + 1);
    const a = ops.fromArray(av, c.transA ? [c.k, c.m] : [c.m, c.k]);
    const bShape = c.transB ? [c.n, c.k] : [c.k, c.n];
    const w = ops.fromArray(bv, bShape, c.half ?? "f32");
    const acc = ops.fromArray(seededValues(c.m * c.n, c.seed + 2), [c.m, c.n]);
    ops.matmulAccumulate(acc, a, w, c.s, { transA: c.transA, transB: c.transB });
    return Effect.map(ops.read([acc, a, ops.widen(w)]), ([x, ar, br]) => ({ x, ar, br, av, bv }));
  });

const cases = fc.record({
  m: fc.integer({ min: 1, max: 70 }),
  n: fc.integer({ min: 1, max: 70 }),
  k: fc.integer({ min: 1, max: 90 }),
  transA: fc.boolean(),
  transB: fc.boolean(),
  half: fc.constantFrom<HalfDType | null>(null, "bf16", "f16"),
  s: fc.constantFrom(1, 2, -0.5, 0.125),
  seed: fc.integer({ min: 1, max: 0x7fffffff }),
});

for (const tiled of [false, true]) {
  Deno.test(`matmulAccumulate equals c + s·op(A)·op(B) of the f64 reference (WebGPU tiled forced: ${tiled})`, async () => {
    await fc.assert(
      fc.asyncProperty(cases, async (c) => {
        // the reference multiplies the very values the 16-bit B holds
        const want = (await run(ref, c)).x;
        matmulTuning.forceTiled = tiled;
        try {
          for (const b of backends) {
            const got = await run(b, c);
            const e = relError(got.x, want);
            assert(e <= TOL, `${b.info.name} ${JSON.stringify(c)}: rel error ${e}`);
            // only c changes
            assertEquals(Array.from(got.ar), Array.from(Float32Array.from(got.av)));
          }
        } finally {
          matmulTuning.forceTiled = false;
        }
      }),
      { numRuns: 30 },
    );
  });
}

Deno.test("matmulAccumulate adds onto what c holds (twice is 2·s·AB), at a tiled size", async () => {
  // 64 x 96 x 128: the tiled kernel's accumulating store without forcing it
  const [m, n, k] = [64, 96, 128];
  for (const b of backends) {
    const [once, twice] = await withOps(b, (ops) => {
      const a = ops.fromArray(seededValues(m * k, 3), [m, k]);
      const w = ops.fromArray(seededValues(n * k, 4), [n, k], "bf16");
      const c1 = ops.zeros([m, n]);
      const c2 = ops.zeros([m, n]);
      ops.matmulAccumulate(c1, a, w, 2, { transB: true });
      ops.matmulAccumulate(c2, a, w, 1, { transB: true });
      ops.matmulAccumulate(c2, a, w, 1, { transB: true });
      return ops.read([c1, c2]);
    });
    assert(relError(twice, once) <= TOL, `${b.info.name}: ${relError(twice, once)}`);
    assert(once.some((v) => v !== 0));
  }
});

Deno.test("matmulAccumulate: a c that is not [M, N] is a ShapeError naming the op", async () => {
  for (const b of backends) {
    await withOps(b, (ops) => {
      const a = ops.fromArray(seededValues(6, 1), [2, 3]);
      const w = ops.fromArray(seededValues(12, 2), [3, 4]);
      throws(
        () => ops.matmulAccumulate(ops.zeros([2, 5]), a, w, 1),
        (e: unknown) => e instanceof ShapeError && e.message.includes("matmulAccumulate"),
      );
    });
  }
});

interface LoraCase {
  readonly m: number;
  readonly n: number;
  readonly k: number;
  readonly r: number;
  readonly half: HalfDType | null;
  readonly s: number;
  readonly seed: number;
}

/** Shapes of projectLora: past 64 rows the WebGPU product is fused; n a multiple of 4 mostly. */
const loraCase: fc.Arbitrary<LoraCase> = fc.record({
  m: fc.oneof(fc.integer({ min: 1, max: 64 }), fc.integer({ min: 65, max: 160 })),
  n: fc.oneof(
    fc.integer({ min: 1, max: 24 }).map((v) => v * 4),
    fc.integer({ min: 1, max: 70 }),
  ),
  k: fc.integer({ min: 1, max: 80 }),
  r: fc.constantFrom(1, 3, 8, 16, 64),
  half: fc.constantFrom<HalfDType | null>(null, "bf16", "f16"),
  s: fc.constantFrom(1, 2, -0.5),
  seed: fc.integer({ min: 1, max: 0x7fffffff }),
});

const project = (b: BackendShape, c: LoraCase) =>
  withOps(b, (ops) => {
    const x = ops.fromArray(seededValues(c.m * c.k, c.seed), [c.m, c.k]);
    const w = ops.fromArray(seededValues(c.n * c.k, c.seed + 1), [c.n, c.k], c.half ?? "f32");
    const xa = ops.fromArray(seededValues(c.m * c.r, c.seed + 2), [c.m, c.r]);
    const lb = ops.fromArray(seededValues(c.n * c.r, c.seed + 3), [c.n, c.r]);
    const first = ops.projectLora(x, w, xa, lb, c.s);
    // B changes in place (as AdamW updates it): the next product must use the new values
    ops.addScaledInPlace(lb, ops.fromArray(seededValues(c.n * c.r, c.seed + 4), [c.n, c.r]), 1);
    const second = ops.projectLora(x, w, xa, lb, c.s);
    return ops.read([first, second]);
  });

Deno.test("projectLora equals x·Wᵀ + s·xa·Bᵀ of the f64 reference, before and after B changes in place", async () => {
  await fc.assert(
    fc.asyncProperty(
      loraCase,
      async (c) => {
        const [w1, w2] = await project(ref, c);
        for (const b of backends) {
          const [g1, g2] = await project(b, c);
          for (const [g, w, what] of [[g1, w1, "first"], [g2, w2, "after B changed"]] as const) {
            const e = relError(g, w);
            assert(e <= TOL, `${b.info.name} ${JSON.stringify(c)} ${what}: rel error ${e}`);
          }
        }
      },
    ),
    { numRuns: 30 },
  );
});

Deno.test("projectLora: a delta of another shape, or an `into` not [M, N] or aliasing x, is a ShapeError naming the op", async () => {
  for (const b of backends) {
    await withOps(b, (ops) => {
      const x = ops.fromArray(seededValues(6, 1), [2, 3]);
      const w = ops.fromArray(seededValues(12, 2), [4, 3]);
      const xa = ops.fromArray(seededValues(4, 3), [2, 2]);
      const lb = ops.fromArray(seededValues(10, 4), [5, 2]);
      const shapeError = (e: unknown) =>
        e instanceof ShapeError && e.message.includes("projectLora");
      throws(() => ops.projectLora(x, w, xa, lb, 1), shapeError);
      // a well-formed delta, with an `into` of another shape or that is the input x
      const w3 = ops.fromArray(seededValues(9, 2), [3, 3]);
      const lb3 = ops.fromArray(seededValues(6, 4), [3, 2]);
      for (const into of [ops.zeros([3, 2]), x]) {
        throws(() => ops.projectLora(x, w3, xa, lb3, 1, into), shapeError);
      }
    });
  }
});

Deno.test("projectLora with `into` adds the projection onto it in place: the sum an add pass stores, exactly", async () => {
  await fc.assert(
    fc.asyncProperty(
      loraCase,
      async (c) => {
        for (const b of backends) {
          const [y, res, summed, xAfter] = await withOps(b, (ops) => {
            const x = ops.fromArray(seededValues(c.m * c.k, c.seed), [c.m, c.k]);
            const w = ops.fromArray(
              seededValues(c.n * c.k, c.seed + 1),
              [c.n, c.k],
              c.half ?? "f32",
            );
            const xa = ops.fromArray(seededValues(c.m * c.r, c.seed + 2), [c.m, c.r]);
            const lb = ops.fromArray(seededValues(c.n * c.r, c.seed + 3), [c.n, c.r]);
            const res = ops.fromArray(seededValues(c.m * c.n, c.seed + 4), [c.m, c.n]);
            const y = ops.projectLora(x, w, xa, lb, c.s);
            const into = ops.copy(res);
            const back = ops.projectLora(x, w, xa, lb, c.s, into);
            assert(back === into, "projectLora returns `into`");
            return ops.read([y, res, into, x]);
          });
          const want = Float32Array.from(y, (v, i) => res[i] + v);
          assertEquals(Array.from(summed), Array.from(want), `${b.info.name} ${JSON.stringify(c)}`);
          // the inputs are read only
          assertEquals(
            Array.from(xAfter),
            Array.from(Float32Array.from(seededValues(c.m * c.k, c.seed))),
          );
        }
      },
    ),
    { numRuns: 25 },
  );
});

interface SharedCase {
  readonly m: number;
  readonly k: number;
  readonly parts: readonly { readonly n: number; readonly r: number; readonly into: boolean }[];
  readonly half: HalfDType | null;
  readonly s: number;
  readonly seed: number;
}

/** The projections of projectLoraShared, then again after every A and B changed in place. */
const projectShared = (b: BackendShape, c: SharedCase) =>
  withOps(b, (ops) => {
    const x = ops.fromArray(seededValues(c.m * c.k, c.seed), [c.m, c.k]);
    const parts = c.parts.map((p, i) => ({
      w: ops.fromArray(seededValues(p.n * c.k, c.seed + 10 * i + 1), [p.n, c.k], c.half ?? "f32"),
      a: ops.fromArray(seededValues(p.r * c.k, c.seed + 10 * i + 2), [p.r, c.k]),
      b: ops.fromArray(seededValues(p.n * p.r, c.seed + 10 * i + 3), [p.n, p.r]),
      into: p.into
        ? ops.fromArray(seededValues(c.m * p.n, c.seed + 10 * i + 6), [c.m, p.n])
        : undefined,
    }));
    // a part with `into` returns it, updated in place: read its value now, before the next call
    const first = ops.projectLoraShared(x, parts, c.s).map((y, i) => {
      if (parts[i].into && y !== parts[i].into) throw new Error("into was not returned");
      return ops.copy(y);
    });
    parts.forEach((p, i) => {
      ops.addScaledInPlace(
        p.a,
        ops.fromArray(seededValues(p.a.size, c.seed + 10 * i + 4), p.a.shape),
        1,
      );
      ops.addScaledInPlace(
        p.b,
        ops.fromArray(seededValues(p.b.size, c.seed + 10 * i + 5), p.b.shape),
        1,
      );
    });
    const second = ops.projectLoraShared(x, parts, c.s);
    return ops.read([...first, ...second]);
  });

for (const tiled of [false, true]) {
  Deno.test(`projectLoraShared equals each x·Wᵀ + s·(x·Aᵀ)·Bᵀ (added onto \`into\` when given) of the f64 reference, before and after A and B change in place (WebGPU tiled forced: ${tiled})`, async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.record({
          // decoding (≤ 8 rows: 8-row tiles; ≤ 64) and prefill sizes; ranks and widths mostly
          // multiples of 4 (one product for every xa), sometimes not (projection by projection)
          m: fc.oneof(
            fc.integer({ min: 1, max: 8 }),
            fc.integer({ min: 9, max: 64 }),
            fc.integer({ min: 65, max: 140 }),
          ),
          k: fc.oneof(
            fc.integer({ min: 1, max: 20 }).map((v) => v * 4),
            fc.integer({ min: 1, max: 70 }),
          ),
          parts: fc.array(
            fc.record({
              n: fc.oneof(
                fc.integer({ min: 1, max: 24 }).map((v) => v * 4),
                fc.integer({ min: 1, max: 40 }),
              ),
              r: fc.constantFrom(4, 8, 16, 24, 3),
              into: fc.boolean(),
            }),
            { minLength: 1, maxLength: 3 },
          ),
          half: fc.constantFrom<HalfDType | null>(null, "bf16", "f16"),
          s: fc.constantFrom(1, 2, -0.5),
          seed: fc.integer({ min: 1, max: 0x7fffffff }),
        }),
        async (c) => {
          const want = await projectShared(ref, c);
          matmulTuning.forceTiled = tiled;
          try {
            for (const b of backends) {
              const got = await projectShared(b, c);
              assertEquals(got.length, 2 * c.parts.length);
              got.forEach((g, i) => {
                const e = relError(g, want[i]);
                assert(e <= TOL, `${b.info.name} ${JSON.stringify(c)} output ${i}: rel error ${e}`);
              });
            }
          } finally {
            matmulTuning.forceTiled = false;
          }
        },
      ),
      { numRuns: 25 },
    );
  });
}

/** projectLoraShared three times: as given, after A and B change in place, after W does too. */
const projectStackedThrice = (b: BackendShape, c: SharedCase) =>
  withOps(b, (ops) => {
    const x = ops.fromArray(seededValues(c.m * c.k, c.seed), [c.m, c.k]);
    const parts = c.parts.map((p, i) => ({
      w: ops.fromArray(seededValues(p.n * c.k, c.seed + 10 * i + 1), [p.n, c.k], c.half!),
      a: ops.fromArray(seededValues(p.r * c.k, c.seed + 10 * i + 2), [p.r, c.k]),
      b: ops.fromArray(seededValues(p.n * p.r, c.seed + 10 * i + 3), [p.n, p.r]),
    }));
    const first = ops.projectLoraShared(x, parts, c.s).map((y) => ops.copy(y));
    parts.forEach((p, i) => {
      for (const [t, seed] of [[p.a, 4], [p.b, 5]] as const) {
        ops.addScaledInPlace(
          t,
          ops.fromArray(seededValues(t.size, c.seed + 10 * i + seed), t.shape),
          1,
        );
      }
    });
    const second = ops.projectLoraShared(x, parts, c.s).map((y) => ops.copy(y));
    // the last part's weight: rows 1.. from another 16-bit tensor
    const last = parts[parts.length - 1];
    const [n] = last.w.shape;
    const other = ops.fromArray(seededValues(n * c.k, c.seed + 7), [n, c.k], c.half!);
    ops.setRows(last.w, 1, ops.sliceRows(other, 1, n - 1));
    const third = ops.projectLoraShared(x, parts, c.s);
    return ops.read([...first, ...second, ...third]);
  });

Deno.test("projectLoraShared's stacked product (16-bit weights of tile-multiple widths) equals the f64 reference, before and after A, B and W change in place", async () => {
  const stackedBefore = matmulTuning.stackedProducts;
  await fc.assert(
    fc.asyncProperty(
      fc.record({
        // rows of a decoding step: 8-row tiles, one 16-row tile
        m: fc.integer({ min: 1, max: 16 }),
        // k·2 bytes a multiple of 256 (copied as is) or not (through a pitch)
        k: fc.oneof(fc.constant(128), fc.integer({ min: 1, max: 24 }).map((v) => v * 4)),
        parts: fc.array(
          fc.record({
            n: fc.integer({ min: 1, max: 6 }).map((v) => v * 16),
            r: fc.constantFrom(4, 8, 16),
            into: fc.constant(false),
          }),
          { minLength: 2, maxLength: 3 },
        ),
        half: fc.constantFrom<HalfDType | null>("bf16", "f16"),
        s: fc.constantFrom(1, -0.5),
        seed: fc.integer({ min: 1, max: 0x7fffffff }),
      }),
      async (c) => {
        const want = await projectStackedThrice(ref, c);
        matmulTuning.forceTiled = true;
        try {
          for (const b of backends) {
            const got = await projectStackedThrice(b, c);
            assertEquals(got.length, 3 * c.parts.length);
            got.forEach((g, i) => {
              const e = relError(g, want[i]);
              assert(e <= TOL, `${b.info.name} ${JSON.stringify(c)} output ${i}: rel error ${e}`);
            });
          }
        } finally {
          matmulTuning.forceTiled = false;
        }
      },
    ),
    { numRuns: 30 },
  );
  // on llvmpipe every call of the property took the stacked product
  if (gpu) assert(matmulTuning.stackedProducts - stackedBefore >= 30 * 3, "stacked path not taken");
});

Deno.test("projectLoraShared: a B that is not [N, R] for its projection and A, an into that is not [M, N] or is x: ShapeErrors naming the op", async () => {
  for (const b of backends) {
    await withOps(b, (ops) => {
      const x = ops.fromArray(seededValues(8, 1), [2, 4]);
      const w = ops.fromArray(seededValues(16, 2), [4, 4]);
      const a = ops.fromArray(seededValues(8, 3), [2, 4]);
      throws(
        () =>
          ops.projectLoraShared(x, [{ w, a, b: ops.fromArray(seededValues(12, 4), [4, 3]) }], 1),
        (e: unknown) => e instanceof ShapeError && e.message.includes("projectLoraShared"),
      );
      const b4 = ops.fromArray(seededValues(8, 5), [4, 2]);
      for (const into of [ops.zeros([2, 3]), x]) {
        throws(
          () => ops.projectLoraShared(x, [{ w, a, b: b4, into }], 1),
          (e: unknown) => e instanceof ShapeError && e.message.includes("into"),
        );
      }
    });
  }
});

if (hasGpu) gpuTeardown();
