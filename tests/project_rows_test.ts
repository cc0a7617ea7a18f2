/**
 * Ops.projectRows: x·w[start, start + count)ᵀ equals the product with the sliced rows, on the
 * CPU and on WebGPU (where the rows are read in place from their storage block), for f32 and
 * 16-bit w, tiled and direct shapes, and a w split into storage blocks (ranges inside one block
 * and across two); a second range of the same 16-bit w reuses nothing stale; bad ranges are
 * ShapeErrors naming the op.
 */
import { ok as assert, throws } from "node:assert/strict";
import fc from "fast-check";
import type { BackendShape } from "../src/backend/backend.ts";
import { type HalfDType, ShapeError } from "../src/backend/tensor.ts";
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
  readonly rows: number;
  readonly k: number;
  readonly ranges: readonly (readonly [number, number])[];
  readonly half: HalfDType | null;
  readonly seed: number;
}

/** Each range's product, and (on the reference) the same through sliceRows. */
const run = (b: BackendShape, c: Case, sliced = false) =>
  withOps(b, (ops) => {
    const x = ops.fromArray(seededValues(c.m * c.k, c.seed), [c.m, c.k]);
    const w = ops.fromArray(seededValues(c.rows * c.k, c.seed + 1), [c.rows, c.k], c.half ?? "f32");
    return ops.read(c.ranges.map(([s, n]) =>
      sliced ? ops.matmul(x, ops.sliceRows(w, s, n), { transB: true }) : ops.projectRows(x, w, s, n)
    ));
  });

const cases = fc.record({
  m: fc.oneof(fc.integer({ min: 1, max: 8 }), fc.integer({ min: 60, max: 130 })),
  rows: fc.integer({ min: 4, max: 300 }),
  k: fc.oneof(fc.integer({ min: 1, max: 20 }).map((v) => v * 4), fc.integer({ min: 1, max: 50 })),
  picks: fc.array(
    fc.tuple(
      fc.double({ min: 0, max: 1, noNaN: true }),
      fc.double({ min: 0, max: 1, noNaN: true }),
    ),
    { minLength: 1, maxLength: 3 },
  ),
  half: fc.constantFrom<HalfDType | null>(null, "bf16", "f16"),
  seed: fc.integer({ min: 1, max: 0x7fffffff }),
}).map(({ picks, ...c }): Case => ({
  ...c,
  // ranges inside [0, rows), counts mostly multiples of 4 (the in-place path)
  ranges: picks.map(([a, b]) => {
    const start = Math.floor(a * (c.rows - 1));
    const left = c.rows - start;
    const n = Math.max(1, Math.floor(b * left));
    return [start, n % 4 === 0 || n < 4 ? n : n - (n % 4)] as const;
  }),
}));

const check = async (c: Case) => {
  const want = await run(ref, c, true);
  for (const b of backends) {
    const got = await run(b, c);
    got.forEach((g, i) => {
      const e = relError(g, want[i]);
      assert(e <= TOL, `${b.info.name} ${JSON.stringify(c)} range ${i}: rel error ${e}`);
    });
  }
};

Deno.test("projectRows equals x·sliceRows(w)ᵀ of the f64 reference, several ranges of one w", async () => {
  await fc.assert(fc.asyncProperty(cases, check), { numRuns: 30 });
});

Deno.test({
  name: "projectRows on a w split into storage blocks: ranges inside one block and across two",
  ignore: !hasGpu,
  fn: async () => {
    // rows of 64 floats (256 bytes, 128 in 16-bit): 16 KiB blocks of 64 (128) rows of w; x fits one
    gpu!.gpu?.setBindingLimit(16384);
    try {
      for (const half of [null, "bf16"] as const) {
        const ranges = [[8, 48], [40, 48], [0, 64], [100, 60]] as const;
        await check({ m: 60, rows: 200, k: 64, ranges, half, seed: 9 });
      }
    } finally {
      gpu!.gpu?.setBindingLimit(null);
    }
  },
});

Deno.test("projectRows: a range outside w or an x of another width is a ShapeError naming the op", async () => {
  for (const b of backends) {
    await withOps(b, (ops) => {
      const x = ops.fromArray(seededValues(8, 1), [2, 4]);
      const w = ops.fromArray(seededValues(40, 2), [10, 4]);
      for (
        const f of [
          () => ops.projectRows(x, w, 8, 4),
          () => ops.projectRows(ops.zeros([2, 3]), w, 0, 4),
        ]
      ) {
        throws(f, (e: unknown) => e instanceof ShapeError && e.message.includes("projectRows"));
      }
    });
  }
});

if (hasGpu) gpuTeardown();
