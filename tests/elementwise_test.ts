/**
 * Elementwise ops, reductions, row gather/scatter, SwiGLU, AdamW and the LoRA fold: property tests
 * of WebGPU against the CPU reference, of gradients against finite differences, of AdamW against a
 * hand computation and of loraFold against an independent float64 computation.
 */
import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import fc from "fast-check";
import { Effect } from "effect";
import type { BackendShape } from "../src/backend/backend.ts";
import type { AdamWOptions, Ops } from "../src/backend/ops.ts";
import { type FloatArray, ShapeError, type Tensor } from "../src/backend/tensor.ts";
import {
  gpuTeardown,
  hasGpu,
  numericGradient,
  relError,
  seededValues,
  testBackends,
  withOps,
} from "./support/backends.ts";

const { gpu, cpu, ref } = await testBackends();
/** CPU f32 and WebGPU (when present): the backends whose ops are under test. */
const both: BackendShape[] = [cpu, ...(gpu ? [gpu] : [])];
const RUNS = 25;
const TOL = 1e-5;

/** Test-name prefix of a backend. */
const label = (b: BackendShape): string => b === ref ? "cpu f64" : b.info.name;

const gpuTest = (name: string, fn: () => Promise<void>): void =>
  Deno.test({ name: `webgpu: ${name}`, ignore: !hasGpu, fn });

/** Values in [-amp, amp) rounded to f32 (what the f32 backends store). */
const vals = (n: number, seed: number, amp = 1): number[] =>
  Array.from(seededValues(n, seed), (x) => Math.fround(x * amp));

const maxAbs = (x: ArrayLike<number>): number => {
  let m = 0;
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i]));
  return m;
};

/**
 * Normwise relative error, relError of the support module, with the denominator raised to
 * `floor` where the result is small only through cancellation (floor = size of the terms).
 */
const errTo = (x: ArrayLike<number>, r: ArrayLike<number>, floor = 0): number =>
  relError(x, r) * Math.max(maxAbs(r), 1e-30) / Math.max(maxAbs(r), floor, 1e-30);

/** Runs `f` with fresh Ops of `b` and reads back the tensors it returns. */
const evalOn = (b: BackendShape, f: (ops: Ops) => Tensor[]): Promise<FloatArray[]> =>
  withOps(b, (ops) => ops.read(f(ops)));

/** Asserts WebGPU and CPU f32 agree on every output of `f` within TOL (normwise). */
const gpuMatchesCpu = async (
  what: string,
  f: (ops: Ops) => Tensor[],
  floors: readonly number[] = [],
): Promise<void> => {
  const want = await evalOn(cpu, f);
  const got = await evalOn(gpu!, f);
  assertEquals(got.length, want.length);
  got.forEach((g, i) => {
    const e = errTo(g, want[i], floors[i] ?? 0);
    assert(e <= TOL, `${what}: output ${i} relative error ${e}`);
  });
};

const isShapeError = (e: unknown): boolean => e instanceof ShapeError;

// ---- arbitraries ------------------------------------------------------------------------------
const dim = (max: number) => fc.integer({ min: 1, max });
const seed = fc.integer({ min: 1, max: 0x7fffffff });
const shape = fc.array(dim(13), { minLength: 1, maxLength: 3 });
const scalar = fc.double({ min: -3, max: 3, noNaN: true });
const size = (s: readonly number[]) => s.reduce((a, b) => a * b, 1);

// ---- add, sub, mul, scale, addScaled, addScaledInPlace -----------------------------------------
gpuTest("add / sub / mul / scale / addScaled match the CPU", async () => {
  await fc.assert(
    fc.asyncProperty(shape, seed, scalar, async (s, sd, k) => {
      const n = size(s);
      const x = vals(n, sd, 2);
      const y = vals(n, sd + 1, 2);
      const f = (ops: Ops) => {
        const a = ops.fromArray(x, s);
        const b = ops.fromArray(y, s);
        return [
          ops.add(a, b),
          ops.sub(a, b),
          ops.mul(a, b),
          ops.scale(a, k),
          ops.addScaled(a, b, k),
        ];
      };
      // add, sub and addScaled may cancel: measure against the size of the terms.
      const terms = maxAbs(x) + maxAbs(y) * Math.max(1, Math.abs(k));
      await gpuMatchesCpu(`shape [${s}]`, f, [terms, terms, 0, 0, terms]);
    }),
    { numRuns: RUNS },
  );
});

for (const b of [cpu, ref]) {
  Deno.test(`${label(b)}: add / sub / mul / scale / addScaled on a hand example`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        const a = ops.fromArray([1, -2, 3.5], [3]);
        const c = ops.fromArray([0.5, 4, -1], [3]);
        const r = yield* ops.read([
          ops.add(a, c),
          ops.sub(a, c),
          ops.mul(a, c),
          ops.scale(a, -2),
          ops.addScaled(a, c, 2),
        ]);
        assertEquals(r.map((x) => Array.from(x)), [
          [1.5, 2, 2.5],
          [0.5, -6, 4.5],
          [0.5, -8, -3.5],
          [-2, 4, -7],
          [2, 6, 1.5],
        ]);
      })));
}

gpuTest("addScaledInPlace matches the CPU and changes only dst", async () => {
  await fc.assert(
    fc.asyncProperty(shape, seed, scalar, async (s, sd, k) => {
      const n = size(s);
      const x = vals(n, sd);
      const y = vals(n, sd + 7);
      const f = (ops: Ops) => {
        const dst = ops.fromArray(x, s);
        const src = ops.fromArray(y, s);
        ops.addScaledInPlace(dst, src, k);
        return [dst, src];
      };
      await gpuMatchesCpu(`shape [${s}]`, f, [1 + Math.abs(k), 0]);
      const [, src] = await evalOn(gpu!, f);
      assertEquals(Array.from(src), y);
    }),
    { numRuns: RUNS },
  );
});

for (const b of both) {
  Deno.test(`${b.info.name}: addScaledInPlace accumulates, also with dst as its own src`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        const dst = ops.fromArray([1, 2, 3, 4], [2, 2]);
        const src = ops.fromArray([1, 1, -1, 0.5], [2, 2]);
        ops.addScaledInPlace(dst, src, 2);
        ops.addScaledInPlace(dst, src, 2);
        const self = ops.fromArray([1, -2, 3], [3]);
        ops.addScaledInPlace(self, ops.reshape(self, [3]), 0.5);
        const [d, s, t] = yield* ops.read([dst, src, self]);
        assertEquals(Array.from(d), [5, 6, -1, 6]);
        assertEquals(Array.from(s), [1, 1, -1, 0.5]);
        assertEquals(Array.from(t), [1.5, -3, 4.5]);
      })));

  Deno.test(`${b.info.name}: elementwise ops reject mismatched shapes and i32 tensors`, () =>
    withOps(b, (ops) => {
      const a = ops.zeros([2, 3]);
      const c = ops.zeros([3, 2]);
      const ids = ops.zeros([2, 3], "i32");
      throws(() => ops.add(a, c), isShapeError);
      throws(() => ops.sub(a, ops.zeros([6])), isShapeError);
      throws(() => ops.mul(a, ids), isShapeError);
      throws(() => ops.scale(ids, 2), isShapeError);
      throws(() => ops.addScaled(a, c, 1), isShapeError);
      throws(() => ops.addScaledInPlace(a, c, 1), isShapeError);
    }));
}

// ---- addRow, sumRows, sumSquares --------------------------------------------------------------
const rowsArb = fc.oneof(dim(9), dim(300));

gpuTest("addRow and sumRows match the CPU (single- and two-pass sums)", async () => {
  await fc.assert(
    fc.asyncProperty(rowsArb, dim(37), seed, async (r, c, sd) => {
      const x = vals(r * c, sd);
      const row = vals(c, sd + 3);
      const f = (ops: Ops) => {
        const a = ops.fromArray(x, [r, c]);
        return [ops.addRow(a, ops.fromArray(row, [c])), ops.sumRows(a)];
      };
      // Column sums may cancel: measure against the sum of magnitudes (r terms of size <= 1).
      await gpuMatchesCpu(`[${r}, ${c}]`, f, [2, r]);
    }),
    { numRuns: RUNS },
  );
});

gpuTest("sumSquares matches the CPU", async () => {
  await fc.assert(
    fc.asyncProperty(fc.oneof(dim(50), dim(5000)), seed, async (n, sd) => {
      const x = vals(n, sd);
      await gpuMatchesCpu(`n ${n}`, (ops) => [ops.sumSquares(ops.fromArray(x, [n]))]);
    }),
    { numRuns: RUNS },
  );
});

gpuTest("sumSquares of 4M elements is accurate and deterministic", async () => {
  const n = 4 * 1024 * 1024 + 17;
  const x = new Float32Array(seededValues(n, 12345));
  let want = 0;
  for (let i = 0; i < n; i++) want += x[i] * x[i];
  const [a, b] = await withOps(gpu!, (ops) => {
    const t = ops.fromArray(x, [n]);
    return ops.read([ops.sumSquares(t), ops.sumSquares(t)]);
  });
  assert(Math.abs(a[0] - want) / want <= 1e-6, `sum ${a[0]} vs ${want}`);
  assertEquals(a[0], b[0]);
});

/** Each tensor's sum of squares in f64, from the f32 values it holds. */
const sumsOf = (xs: readonly number[][]): number[] =>
  xs.map((x) => x.reduce((a, v) => a + v * v, 0));

for (const b of both) {
  Deno.test(`${b.info.name}: sumSquaresEach equals each tensor's f64 sum of squares, the same on every call`, async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.oneof(fc.integer({ min: 0, max: 40 }), dim(5000)), { maxLength: 12 }),
        seed,
        async (sizes, sd) => {
          const xs = sizes.map((n, i) => vals(n, sd + i));
          const [once, again] = await withOps(b, (ops) => {
            const ts = xs.map((x) => ops.fromArray(x, [x.length]));
            return ops.read([ops.sumSquaresEach(ts), ops.sumSquaresEach(ts)]);
          });
          const want = sumsOf(xs);
          assertEquals(once.length, xs.length);
          once.forEach((v, i) => {
            assert(
              Math.abs(v - want[i]) <= 1e-6 * want[i],
              `tensor ${i} (${sizes[i]}): ${v} vs ${want[i]}`,
            );
          });
          assertEquals(Array.from(again), Array.from(once));
        },
      ),
      { numRuns: RUNS },
    );
  });
}

gpuTest(
  "sumSquaresEach: a tensor split by the binding limit and the others around it",
  async () => {
    const shapes = [[3, 100], [50, 100], [16, 128], [1, 7]];
    const xs = shapes.map(([r, c], i) => vals(r * c, 77 + i));
    gpu!.gpu?.setBindingLimit(4096); // 1024 floats: the [50, 100] and [16, 128] tensors split
    try {
      const [got] = await withOps(gpu!, (ops) => {
        const ts = xs.map((x, i) => ops.fromArray(x, shapes[i]));
        return ops.read([ops.sumSquaresEach(ts)]);
      });
      const want = sumsOf(xs);
      got.forEach((v, i) =>
        assert(Math.abs(v - want[i]) <= 1e-6 * want[i], `tensor ${i}: ${v} vs ${want[i]}`)
      );
    } finally {
      gpu!.gpu?.setBindingLimit(null);
    }
  },
);

for (const b of both) {
  Deno.test(`${b.info.name}: addRow / sumRows / sumSquares on a hand example`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        const a = ops.fromArray([1, -2, 3, 4, 5, -6], [2, 3]);
        const [y, s, q, e] = yield* ops.read([
          ops.addRow(a, ops.fromArray([10, 20, 30], [3])),
          ops.sumRows(a),
          ops.sumSquares(a),
          ops.sumSquares(ops.zeros([0])),
        ]);
        assertEquals(Array.from(y), [11, 18, 33, 14, 25, 24]);
        assertEquals(Array.from(s), [5, 3, -3]);
        assertEquals(Array.from(q), [91]);
        assertEquals(Array.from(e), [0]);
      })));

  Deno.test(`${b.info.name}: addRow and sumRows reject wrong shapes`, () =>
    withOps(b, (ops) => {
      throws(() => ops.addRow(ops.zeros([2, 3]), ops.zeros([2])), isShapeError);
      throws(() => ops.addRow(ops.zeros([2, 3]), ops.zeros([1, 3])), isShapeError);
      throws(() => ops.sumRows(ops.zeros([])), isShapeError);
      throws(() => ops.sumSquares(ops.zeros([4], "i32")), isShapeError);
      throws(() => ops.sumSquaresEach([ops.zeros([4]), ops.zeros([4], "i32")]), isShapeError);
    }));
}

// ---- gatherRows, scatterRowsInPlace -----------------------------------------------------------
gpuTest("gatherRows and scatterRowsInPlace match the CPU exactly; only dst changes", async () => {
  await fc.assert(
    fc.asyncProperty(dim(40), dim(33), seed, async (r, c, sd) => {
      const x = vals(r * c, sd);
      const pick = Array.from(
        seededValues(1 + (sd % 50), sd + 1),
        (u) => Math.floor((u + 1) / 2 * r),
      );
      // Distinct destination rows: a seeded shuffle of 0..r-1, truncated.
      const perm = Array.from({ length: r }, (_, i) => i);
      const u = seededValues(r, sd + 2);
      for (let i = r - 1; i > 0; i--) {
        const j = Math.floor((u[i] + 1) / 2 * (i + 1));
        [perm[i], perm[j]] = [perm[j], perm[i]];
      }
      const dstRows = perm.slice(0, 1 + (sd % r));
      const y = vals(dstRows.length * c, sd + 3);
      const f = (ops: Ops) => {
        const src = ops.fromArray(x, [r, c]);
        const g = ops.gatherRows(src, pick);
        const dst = ops.copy(src);
        const upd = ops.fromArray(y, [dstRows.length, c]);
        ops.scatterRowsInPlace(dst, upd, dstRows);
        return [g, dst, src, upd];
      };
      const want = await evalOn(cpu, f);
      const got = await evalOn(gpu!, f);
      got.forEach((g, i) => assertEquals(Array.from(g), Array.from(want[i])));
      // Gathered rows are the picked rows; unscattered rows of dst keep their values.
      const expectG = pick.flatMap((p) => x.slice(p * c, p * c + c));
      assertEquals(Array.from(got[0]), expectG);
      const expectD = x.slice();
      dstRows.forEach((d, i) => expectD.splice(d * c, c, ...y.slice(i * c, i * c + c)));
      assertEquals(Array.from(got[1]), expectD);
      assertEquals(Array.from(got[2]), x);
      assertEquals(Array.from(got[3]), y);
    }),
    { numRuns: RUNS },
  );
});

for (const b of both) {
  Deno.test(`${b.info.name}: gatherRows / scatterRowsInPlace hand example and empty index lists`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        const src = ops.fromArray([1, 2, 3, 4, 5, 6], [3, 2]);
        const dst = ops.zeros([4, 2]);
        ops.scatterRowsInPlace(dst, ops.fromArray([7, 8, 9, 10], [2, 2]), [3, 1]);
        ops.scatterRowsInPlace(dst, ops.zeros([0, 2]), []);
        const g = ops.gatherRows(src, [2, 0, 2]);
        const e = ops.gatherRows(src, []);
        const [gv, dv, ev] = yield* ops.read([g, dst, e]);
        assertEquals(Array.from(gv), [5, 6, 1, 2, 5, 6]);
        assertEquals(Array.from(dv), [0, 0, 9, 10, 0, 0, 7, 8]);
        assertEquals(e.shape, [0, 2]);
        assertEquals(ev.length, 0);
      })));

  Deno.test(`${b.info.name}: gatherRows / scatterRowsInPlace reject bad rows and shapes`, () =>
    withOps(b, (ops) => {
      const src = ops.zeros([3, 2]);
      throws(() => ops.gatherRows(src, [3]), isShapeError);
      throws(() => ops.gatherRows(src, [-1]), isShapeError);
      throws(() => ops.gatherRows(src, [0.5]), isShapeError);
      throws(() => ops.gatherRows(ops.zeros([6]), [0]), isShapeError);
      throws(() => ops.scatterRowsInPlace(src, ops.zeros([2, 2]), [0]), isShapeError);
      throws(() => ops.scatterRowsInPlace(src, ops.zeros([1, 3]), [0]), isShapeError);
      throws(() => ops.scatterRowsInPlace(src, ops.zeros([1, 2]), [5]), isShapeError);
      throws(() => ops.scatterRowsInPlace(src, ops.zeros([2, 2]), [1, 1]), isShapeError);
    }));
}

// ---- swiglu -----------------------------------------------------------------------------------
gpuTest("swiglu and swigluBackward match the CPU (gates up to ±12)", async () => {
  await fc.assert(
    fc.asyncProperty(shape, seed, async (s, sd) => {
      const n = size(s);
      const g = vals(n, sd, 12);
      const u = vals(n, sd + 1);
      const dh = vals(n, sd + 2);
      const f = (ops: Ops) => {
        const gt = ops.fromArray(g, s);
        const ut = ops.fromArray(u, s);
        const { dGate, dUp } = ops.swigluBackward(ops.fromArray(dh, s), gt, ut);
        return [ops.swiglu(gt, ut), dGate, dUp];
      };
      // d silu/dg vanishes near g = -1.28: measure dGate against max |dh·u|.
      const du = Math.max(...dh.map((d, i) => Math.abs(d * u[i])));
      await gpuMatchesCpu(`shape [${s}]`, f, [0, du, 0]);
    }),
    { numRuns: RUNS },
  );
});

/** dh·swiglu(g, u) on the float64 reference: the scalar the finite differences differentiate. */
const swigluLoss = (
  ops: Ops,
  g: ArrayLike<number>,
  u: ArrayLike<number>,
  dh: readonly number[],
) => {
  const h = ops.swiglu(ops.fromArray(g, [g.length]), ops.fromArray(u, [u.length]));
  const [hv] = Effect.runSync(ops.read([h]));
  return dh.reduce((acc, d, i) => acc + d * hv[i], 0);
};

for (const b of [...both, ref]) {
  Deno.test({
    name: `${label(b)}: swigluBackward equals finite differences`,
    ignore: b === gpu && !hasGpu,
    fn: async () => {
      await fc.assert(
        fc.asyncProperty(dim(24), seed, async (n, sd) => {
          const g = vals(n, sd, 3);
          const u = vals(n, sd + 1, 2);
          const dh = vals(n, sd + 2);
          const [dGate, dUp] = await withOps(b, (ops) => {
            const r = ops.swigluBackward(
              ops.fromArray(dh, [n]),
              ops.fromArray(g, [n]),
              ops.fromArray(u, [n]),
            );
            return ops.read([r.dGate, r.dUp]);
          });
          const [ng, nu] = await withOps(ref, (ops) => [
            numericGradient((x) => swigluLoss(ops, x, u, dh), Float64Array.from(g)),
            numericGradient((x) => swigluLoss(ops, g, x, dh), Float64Array.from(u)),
          ]);
          const tol = b === ref ? 1e-7 : TOL;
          const floor = Math.max(...dh.map((d, i) => Math.abs(d * u[i])));
          const eg = errTo(dGate, ng, floor);
          const eu = errTo(dUp, nu);
          assert(eg <= tol && eu <= tol, `n ${n}: dGate error ${eg}, dUp error ${eu}`);
        }),
        { numRuns: 20 },
      );
    },
  });
}

for (const b of both) {
  Deno.test(`${b.info.name}: swiglu on a hand example; swiglu ops reject mismatched shapes`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        const [h] = yield* ops.read([
          ops.swiglu(
            ops.fromArray([0, 1, -1, 100, -100], [5]),
            ops.fromArray([3, 2, 2, 1, 1], [5]),
          ),
        ]);
        const silu = (x: number) => x / (1 + Math.exp(-x));
        const want = [0, 2 * silu(1), 2 * silu(-1), 100, silu(-100)];
        assert(relError(h, want) <= 1e-6, `${Array.from(h)}`);
        const a = ops.zeros([2, 3]);
        throws(() => ops.swiglu(a, ops.zeros([3, 2])), isShapeError);
        throws(() => ops.swigluBackward(ops.zeros([6]), a, a), isShapeError);
        throws(() => ops.swigluBackward(a, a, ops.zeros([2, 2])), isShapeError);
      })));
}

// ---- adamw ------------------------------------------------------------------------------------
const adamOpts = (step: number, gradScale?: number): AdamWOptions => ({
  lr: 0.1,
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
  weightDecay: 0.01,
  step,
  gradScale,
});

for (const b of [...both, ref]) {
  Deno.test(`${label(b)}: adamw on a hand-computed two-step example`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        const p = ops.fromArray([1, -2, 0.5], [3]);
        const m = ops.zeros([3]);
        const v = ops.zeros([3]);
        const g1 = ops.fromArray([0.5, -1, 0], [3]);
        ops.adamw(p, g1, m, v, adamOpts(1));
        // Step 1: m = 0.1 g, v = 0.001 g², m̂ = g, v̂ = g²: p = 0.999 p - 0.1 g / (|g| + 1e-8).
        const p1 = [0.999 - 0.05 / (0.5 + 1e-8), -1.998 + 0.1 / (1 + 1e-8), 0.4995];
        const [r1, m1, v1] = yield* ops.read([p, m, v]);
        // Step 2 with gradScale 2: effective g = [0.5, 1, 0].
        // m = [0.095, 0.01, 0], v = [0.00049975, 0.001999, 0], 1 - β1² = 0.19, 1 - β2² = 0.001999:
        // m̂ = [0.5, 0.01 / 0.19, 0], v̂ = [0.25, 1, 0].
        ops.adamw(p, ops.fromArray([0.25, 0.5, 0], [3]), m, v, adamOpts(2, 2));
        const p2 = [
          p1[0] * 0.999 - 0.1 * 0.5 / (0.5 + 1e-8),
          p1[1] * 0.999 - 0.1 * (0.01 / 0.19) / (1 + 1e-8),
          p1[2] * 0.999,
        ];
        const [r2, m2, v2, gv] = yield* ops.read([p, m, v, g1]);
        const tol = b === ref ? 1e-12 : 1e-6;
        const check = (x: FloatArray, want: number[], what: string) =>
          assert(relError(x, want) <= tol, `${what}: ${Array.from(x)} vs ${want}`);
        check(r1, p1, "p after step 1");
        check(m1, [0.05, -0.1, 0], "m after step 1");
        check(v1, [0.00025, 0.001, 0], "v after step 1");
        check(r2, p2, "p after step 2");
        check(m2, [0.095, 0.01, 0], "m after step 2");
        check(v2, [0.00049975, 0.001999, 0], "v after step 2");
        assertEquals(Array.from(gv), [0.5, -1, 0]);
      })));

  Deno.test(`${label(b)}: adamw rejects bad shapes, steps and aliasing`, () =>
    withOps(b, (ops) => {
      const p = ops.zeros([2, 3]);
      const g = ops.zeros([2, 3]);
      const m = ops.zeros([2, 3]);
      const v = ops.zeros([2, 3]);
      throws(() => ops.adamw(p, ops.zeros([3, 2]), m, v, adamOpts(1)), isShapeError);
      throws(() => ops.adamw(p, g, ops.zeros([6]), v, adamOpts(1)), isShapeError);
      throws(() => ops.adamw(p, g, m, v, adamOpts(0)), isShapeError);
      throws(() => ops.adamw(p, g, m, v, adamOpts(1.5)), isShapeError);
      throws(() => ops.adamw(p, g, m, m, adamOpts(1)), isShapeError);
      throws(() => ops.adamw(p, ops.reshape(p, [2, 3]), m, v, adamOpts(1)), isShapeError);
    }));
}

gpuTest("adamw matches the CPU over several steps; grad is unchanged", async () => {
  await fc.assert(
    fc.asyncProperty(
      shape,
      seed,
      fc.double({ min: 1e-4, max: 0.1, noNaN: true }),
      fc.double({ min: 0, max: 0.1, noNaN: true }),
      fc.double({ min: 0.1, max: 2, noNaN: true }),
      async (s, sd, lr, wd, gs) => {
        const n = size(s);
        const p0 = vals(n, sd);
        const steps = 5;
        const grads = Array.from({ length: steps }, (_, t) => vals(n, sd + 1 + t));
        const f = (ops: Ops) => {
          const p = ops.fromArray(p0, s);
          const m = ops.zeros(s);
          const v = ops.zeros(s);
          const gs0 = grads.map((g) => ops.fromArray(g, s));
          gs0.forEach((g, t) =>
            ops.adamw(p, g, m, v, {
              lr,
              beta1: 0.9,
              beta2: 0.999,
              eps: 1e-8,
              weightDecay: wd,
              step: t + 1,
              gradScale: gs,
            })
          );
          return [p, m, v, gs0[0]];
        };
        await gpuMatchesCpu(`shape [${s}]`, f);
        const [, , , g] = await evalOn(gpu!, f);
        assertEquals(Array.from(g), grads[0]);
      },
    ),
    { numRuns: RUNS },
  );
});

// ---- loraFold ---------------------------------------------------------------------------------
/** Independent float64 W + s·(B·A). */
const foldF64 = (
  w: number[],
  b: number[],
  a: number[],
  rows: number,
  cols: number,
  r: number,
  s: number,
) => {
  const out = new Float64Array(rows * cols);
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) {
      let acc = 0;
      for (let k = 0; k < r; k++) acc += b[i * r + k] * a[k * cols + j];
      out[i * cols + j] = w[i * cols + j] + s * acc;
    }
  }
  return out;
};

for (const be of both) {
  Deno.test({
    name: `${be.info.name}: loraFold equals float64 W + s·B·A, never writes W, B, A; B = 0 gives W`,
    ignore: be === gpu && !hasGpu,
    fn: async () => {
      await fc.assert(
        fc.asyncProperty(
          fc.oneof(dim(9), dim(150)),
          fc.oneof(dim(9), dim(150)),
          fc.integer({ min: 0, max: 70 }),
          seed,
          scalar,
          async (rows, cols, r, sd, s) => {
            const w = vals(rows * cols, sd);
            const b = vals(rows * r, sd + 1);
            const a = vals(r * cols, sd + 2);
            const [out, zero, wv, bv, av] = await withOps(be, (ops) => {
              const wt = ops.fromArray(w, [rows, cols]);
              const bt = ops.fromArray(b, [rows, r]);
              const at = ops.fromArray(a, [r, cols]);
              const folded = ops.loraFold(wt, bt, at, s);
              const same = ops.loraFold(wt, ops.zeros([rows, r]), at, s);
              return ops.read([folded, same, wt, bt, at]);
            });
            const want = foldF64(w, b, a, rows, cols, r, s);
            const e = relError(out, want);
            assert(e <= 1e-6, `[${rows}x${cols}] rank ${r}: relative error ${e}`);
            assertEquals(Array.from(zero), w);
            assertEquals(Array.from(wv), w);
            assertEquals(Array.from(bv), b);
            assertEquals(Array.from(av), a);
          },
        ),
        { numRuns: RUNS },
      );
    },
  });

  Deno.test(`${be.info.name}: loraFold rejects mismatched shapes`, () =>
    withOps(be, (ops) => {
      const w = ops.zeros([4, 5]);
      throws(() => ops.loraFold(w, ops.zeros([3, 2]), ops.zeros([2, 5]), 1), isShapeError);
      throws(() => ops.loraFold(w, ops.zeros([4, 2]), ops.zeros([3, 5]), 1), isShapeError);
      throws(() => ops.loraFold(w, ops.zeros([4, 2]), ops.zeros([2, 4]), 1), isShapeError);
      throws(
        () => ops.loraFold(ops.zeros([20]), ops.zeros([4, 2]), ops.zeros([2, 5]), 1),
        isShapeError,
      );
    }));
}

gpuTest("loraFold matches the CPU; B = 0 reproduces W bit for bit, -0 included", async () => {
  await fc.assert(
    fc.asyncProperty(dim(130), dim(130), dim(64), seed, scalar, async (rows, cols, r, sd, s) => {
      const w = vals(rows * cols, sd);
      const b = vals(rows * r, sd + 1);
      const a = vals(r * cols, sd + 2);
      await gpuMatchesCpu(`[${rows}x${cols}] rank ${r}`, (ops) => [
        ops.loraFold(
          ops.fromArray(w, [rows, cols]),
          ops.fromArray(b, [rows, r]),
          ops.fromArray(a, [r, cols]),
          s,
        ),
      ]);
    }),
    { numRuns: RUNS },
  );
  for (const be of both) {
    const w = [-0, 0, 1.5, -2];
    const [out] = await withOps(
      be,
      (ops) =>
        ops.read([
          ops.loraFold(
            ops.fromArray(w, [2, 2]),
            ops.zeros([2, 3]),
            ops.fromArray([1, 2, 3, 4, 5, 6], [3, 2]),
            -1,
          ),
        ]),
    );
    assertEquals(
      new Uint8Array(new Float32Array(out).buffer),
      new Uint8Array(new Float32Array(w).buffer),
    );
  }
});

// ---- large launches ---------------------------------------------------------------------------
gpuTest("elementwise launches beyond 65535 workgroups use the 2-D grid", async () => {
  const n = 65535 * 256 + 1000;
  const x = new Float32Array(seededValues(n, 99));
  const [y] = await withOps(gpu!, (ops) => ops.read([ops.scale(ops.fromArray(x, [n]), -2)]));
  for (let i = 0; i < n; i++) {
    if (y[i] !== -2 * x[i]) assert(false, `element ${i}: ${y[i]} vs ${-2 * x[i]}`);
  }
});

gpuTeardown();
