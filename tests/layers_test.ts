/**
 * Decoder layer ops (rmsNorm, rope, embedding, logProbs, entropy and their gradients) on the CPU
 * reference and WebGPU: hand-computed examples, WebGPU vs CPU f32 property tests, every backward
 * op against central finite differences of the f64 CPU forward, and ShapeError cases.
 */
import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import { Effect } from "effect";
import fc from "fast-check";
import type { BackendShape } from "../src/backend/backend.ts";
import type { Ops } from "../src/backend/ops.ts";
import { ShapeError, type Tensor } from "../src/backend/tensor.ts";
import type { FloatArray } from "../src/backend/tensor.ts";
import { setRowForm } from "../src/backend/webgpu/layers.ts";
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
const both = [cpu, ...(gpu ? [gpu] : [])];
const RUNS = 25;
/** WebGPU vs CPU f32, normwise. */
const TOL = 1e-5;
/** WebGPU vs CPU f32 where the CPU result is (nearly) all zero. */
const ABS_TOL = 1e-6;
/** f32 backward vs f64 finite differences, normwise. */
const GRAD_TOL = 1e-4;

// ---- helpers ------------------------------------------------------------------------------------

/** f32-representable values in [-scale, scale) from a seed. */
const vals = (n: number, seed: number, scale = 1): Float32Array =>
  Float32Array.from(seededValues(n, seed), (v) => v * scale);

/** Integers in [0, k) from a seed. */
const ints = (n: number, seed: number, k: number): Int32Array =>
  Int32Array.from(seededValues(n, seed), (v) => Math.min(k - 1, Math.floor(((v + 1) / 2) * k)));

const maxAbs = (a: ArrayLike<number>): number => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
};

const dot = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
};

/** Runs `f` with fresh Ops of `b` and reads its outputs back. */
const evalOn = (b: BackendShape, f: (ops: Ops) => Tensor[]): Promise<FloatArray[]> =>
  withOps(b, (ops) => ops.read(f(ops)));

/** Runs `f` on WebGPU and on the CPU in f32 and checks every output within TOL. */
const gpuMatchesCpu = async (what: string, f: (ops: Ops) => Tensor[]): Promise<void> => {
  const c = await evalOn(cpu, f);
  const g = await evalOn(gpu!, f);
  c.forEach((cv, i) => {
    // An all-zero reference (e.g. the gradient of a one-token vocabulary) has no relative scale:
    // then the rounding noise must stay below ABS_TOL.
    const e = relError(g[i], cv);
    const abs = e * Math.max(maxAbs(cv), 1e-30);
    assert(e <= TOL || abs <= ABS_TOL, `${what}: output ${i} rel error ${e}`);
  });
};

/**
 * Checks a backward op on `b` against central differences of <p, forward(x)> evaluated with the
 * f64 CPU backend: `grad` returns d<p, forward>/dx computed by the backend.
 */
const gradMatches = async (
  b: BackendShape,
  what: string,
  x0: Float32Array,
  shape: number[],
  p: Float32Array,
  forward: (ops: Ops, x: Tensor) => Tensor,
  grad: (ops: Ops, x: Tensor, p: Tensor) => Tensor,
): Promise<void> => {
  const num = await withOps(ref, (ops) =>
    numericGradient((x) => {
      const [y] = Effect.runSync(ops.read([forward(ops, ops.fromArray(x, shape))]));
      return dot(p, y);
    }, Float64Array.from(x0)));
  const [an] = await evalOn(
    b,
    (ops) => [grad(ops, ops.fromArray(x0, shape), ops.fromArray(p, [p.length]))],
  );
  const e = relError(an, num);
  const abs = e * Math.max(maxAbs(num), 1e-30);
  assert(
    e <= GRAD_TOL || abs <= ABS_TOL,
    `${b.info.name} ${what}: rel error ${e} vs finite differences`,
  );
};

const close = (a: ArrayLike<number>, b: ArrayLike<number>, tol = 1e-6, what = ""): void => {
  assertEquals(a.length, b.length, `${what}: length`);
  for (let i = 0; i < a.length; i++) {
    assert(
      Math.abs(a[i] - b[i]) <= tol * Math.max(1, Math.abs(b[i])),
      `${what}[${i}]: ${a[i]} vs ${b[i]}`,
    );
  }
};

const throwsShape = (f: () => unknown, what: string): void =>
  throws(f, (e) => e instanceof ShapeError, `${what} should raise ShapeError`);

const seed = fc.integer({ min: 1, max: 0x7fffffff });
const gpuTest = (name: string, fn: () => Promise<void>): void =>
  Deno.test({ name: `webgpu: ${name}`, ignore: !hasGpu, fn });

// ---- hand-computed examples (both backends) -----------------------------------------------------

for (const b of both) {
  const n = b.info.name;

  Deno.test(`${n}: rmsNorm of [3, 4] and its rstd`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        const { y, rstd } = ops.rmsNorm(
          ops.fromArray([3, 4, 0, -2], [2, 2]),
          ops.fromArray([2, 0.5], [2]),
          0,
        );
        const [yv, sv] = yield* ops.read([y, rstd]);
        const s = 1 / Math.sqrt(12.5);
        close(sv, [s, 1 / Math.sqrt(2)], 1e-6, "rstd");
        close(yv, [3 * s * 2, 4 * s * 0.5, 0, -2 / Math.sqrt(2) * 0.5], 1e-6, "y");
      })));

  Deno.test(`${n}: rope is the identity at position 0 and rotates pairs by p * theta^(-2i/d)`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        // headDim 4, theta 100: inv_freq = [1, 0.1]; pairs (0, 2) and (1, 3); two heads.
        const x = [1, 2, 3, 4, -1, 0.5, 2, -3];
        const pos = [0, 3];
        const xt = ops.fromArray([...x, ...x], [2, 8]);
        const y = ops.rope(xt, ops.fromArray(pos, [2], "i32"), 2, 4, 100);
        const [yv] = yield* ops.read([y]);
        close(yv.subarray(0, 8), x, 1e-7, "position 0");
        const want: number[] = [];
        for (let h = 0; h < 2; h++) {
          const [a, bb, c, d] = x.slice(h * 4, h * 4 + 4);
          const t0 = 3 * 1;
          const t1 = 3 * Math.fround(0.1);
          want.push(
            a * Math.cos(t0) - c * Math.sin(t0),
            bb * Math.cos(t1) - d * Math.sin(t1),
            c * Math.cos(t0) + a * Math.sin(t0),
            d * Math.cos(t1) + bb * Math.sin(t1),
          );
        }
        close(yv.subarray(8), want, 1e-6, "position 3");
        const back = ops.ropeBackward(y, ops.fromArray(pos, [2], "i32"), 2, 4, 100);
        const [bv] = yield* ops.read([back]);
        close(bv, [...x, ...x], 1e-6, "ropeBackward undoes rope");
      })));

  Deno.test(`${n}: embedding gathers rows and its gradient scatter-adds them`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        const table = ops.fromArray([0, 1, 10, 11, 20, 21], [3, 2]);
        const e = ops.embedding(table, ops.fromArray([2, 0, 2], [3], "i32"));
        const dy = ops.fromArray([1, 2, 3, 4, 5, 6], [3, 2]);
        const g = ops.embeddingBackward(dy, [2, 0, 2], 4);
        const [ev, gv] = yield* ops.read([e, g]);
        assertEquals(Array.from(ev), [20, 21, 0, 1, 20, 21]);
        assertEquals(Array.from(gv), [3, 4, 0, 0, 6, 8, 0, 0]);
      })));

  Deno.test(`${n}: logProbs and entropy of uniform logits are -log V and log V`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        const v = 7;
        const logits = ops.fromArray(new Float32Array(2 * v).fill(3.5), [2, v]);
        const { logp, lse } = ops.logProbs(logits, ops.fromArray([0, 6], [2], "i32"), 0.5);
        const ent = ops.entropy(logits, 0.5);
        const [lp, ls, en] = yield* ops.read([logp, lse, ent]);
        close(lp, [-Math.log(v), -Math.log(v)], 1e-6, "logp");
        close(ls, [7 + Math.log(v), 7 + Math.log(v)], 1e-6, "lse");
        close(en, [Math.log(v), Math.log(v)], 1e-6, "entropy");
      })));

  Deno.test(`${n}: temperature sharpens or flattens; huge and -inf logits stay finite`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        const logits = ops.fromArray([0, 1, 1000, 1000, 0, -Infinity], [3, 2]);
        const t = ops.fromArray([1, 0, 0], [3], "i32");
        const l1 = ops.logProbs(logits, t, 1).logp;
        const l2 = ops.logProbs(logits, t, 2).logp;
        const e1 = ops.entropy(logits, 1);
        const e2 = ops.entropy(logits, 2);
        const [a, bb, c, d] = yield* ops.read([l1, l2, e1, e2]);
        const lsm = (z: number) => z - Math.log(1 + Math.exp(z)); // log p of the larger of [0, z]
        close(a, [lsm(1), -Math.log(2), 0], 1e-6, "T=1");
        close(bb, [lsm(0.5), -Math.log(2), 0], 1e-6, "T=2");
        const h = (z: number) => {
          const p = 1 / (1 + Math.exp(-z));
          return -p * Math.log(p) - (1 - p) * Math.log(1 - p);
        };
        close(c, [h(1), Math.log(2), 0], 1e-6, "entropy T=1");
        close(d, [h(0.5), Math.log(2), 0], 1e-6, "entropy T=2");
        assert(d[0] > c[0], "a higher temperature raises the entropy");
      })));

  Deno.test(`${n}: logProbsBackward is (onehot - softmax) * dlogp / T`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        const logits = ops.fromArray([0, Math.log(3)], [1, 2]);
        const t = ops.fromArray([1], [1], "i32");
        const { lse } = ops.logProbs(logits, t, 1);
        const g = ops.logProbsBackward(ops.fromArray([2], [1]), logits, t, lse, 1);
        const [gv] = yield* ops.read([g]);
        close(gv, [-0.25 * 2, 0.25 * 2], 1e-6, "dlogits");
      })));

  Deno.test(`${n}: logProbsBackward over rows of 8 (vec4 kernel) at T = 0.5`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        const x = vals(16, 9);
        const logits = ops.fromArray(x, [2, 8]);
        const tg = [7, 2];
        const t = ops.fromArray(tg, [2], "i32");
        const { lse } = ops.logProbs(logits, t, 0.5);
        const g = ops.logProbsBackward(ops.fromArray([1.5, -2], [2]), logits, t, lse, 0.5);
        const [gv] = yield* ops.read([g]);
        const want: number[] = [];
        for (const [r, d] of [[0, 1.5], [1, -2]]) {
          const z = Array.from(x.slice(r * 8, r * 8 + 8), (v) => v / 0.5);
          const m = Math.max(...z);
          const s = z.reduce((a, v) => a + Math.exp(v - m), 0);
          z.forEach((v, j) => want.push(((j === tg[r] ? 1 : 0) - Math.exp(v - m) / s) * d / 0.5));
        }
        close(gv, want, 1e-6, "dlogits");
      })));

  Deno.test(`${n}: every op rejects bad shapes with ShapeError`, () =>
    withOps(b, (ops) => {
      const x = ops.fromArray(vals(12, 1), [2, 6]);
      const w = ops.fromArray(vals(6, 2), [6]);
      const r2 = ops.fromArray([1, 1], [2]);
      const pos = ops.fromArray([0, 1], [2], "i32");
      const logits = ops.fromArray(vals(8, 3), [2, 4]);
      const tg = ops.fromArray([0, 3], [2], "i32");
      throwsShape(() => ops.rmsNorm(x, ops.fromArray([1, 2], [2]), 1e-5), "rmsNorm w");
      throwsShape(
        () => ops.rmsNorm(x, ops.fromArray([0, 1, 2, 3, 4, 5], [6], "i32"), 1e-5),
        "rmsNorm i32 w",
      );
      throwsShape(
        () => ops.rmsNormBackward(x, x, w, ops.fromArray([1], [1])),
        "rmsNormBackward rstd",
      );
      throwsShape(
        () => ops.rmsNormBackward(ops.fromArray(vals(6, 4), [1, 6]), x, w, r2),
        "rmsNormBackward dy",
      );
      throwsShape(() => ops.rope(x, pos, 2, 4, 10000), "rope heads*headDim");
      throwsShape(() => ops.rope(x, pos, 2, 3, 10000), "rope odd headDim");
      throwsShape(() => ops.rope(x, r2, 1, 6, 10000), "rope f32 positions");
      throwsShape(
        () => ops.ropeBackward(x, ops.fromArray([0], [1], "i32"), 1, 6, 10000),
        "ropeBackward positions",
      );
      throwsShape(() => ops.embedding(x, r2), "embedding f32 ids");
      throwsShape(() => ops.embedding(w, pos), "embedding 1-D table");
      throwsShape(() => ops.embeddingBackward(x, [0], 4), "embeddingBackward ids length");
      throwsShape(() => ops.embeddingBackward(x, [0, 4], 4), "embeddingBackward id >= vocab");
      throwsShape(() => ops.embeddingBackward(x, [0, -1], 4), "embeddingBackward negative id");
      throwsShape(
        () => ops.logProbs(logits, ops.fromArray([0], [1], "i32"), 1),
        "logProbs targets",
      );
      throwsShape(() => ops.logProbs(logits, tg, 0), "logProbs temperature 0");
      throwsShape(
        () => ops.logProbsBackward(r2, logits, tg, ops.fromArray([1], [1]), 1),
        "logProbsBackward lse",
      );
      throwsShape(
        () => ops.logProbsBackward(ops.fromArray([1], [1]), logits, tg, r2, 1),
        "logProbsBackward dlogp",
      );
      throwsShape(() => ops.entropy(w, 1), "entropy 1-D logits");
      throwsShape(() => ops.entropy(logits, -1), "entropy negative temperature");
    }));
}

Deno.test("cpu: ids and targets outside [0, V) raise ShapeError", () =>
  withOps(cpu, (ops) => {
    const table = ops.fromArray(vals(6, 1), [3, 2]);
    throwsShape(
      () => ops.embedding(table, ops.fromArray([0, 3], [2], "i32")),
      "embedding id 3 of 3",
    );
    throwsShape(() => ops.embedding(table, ops.fromArray([-1], [1], "i32")), "embedding id -1");
    const logits = ops.fromArray(vals(4, 2), [2, 2]);
    throwsShape(
      () => ops.logProbs(logits, ops.fromArray([0, 2], [2], "i32"), 1),
      "logProbs target 2 of 2",
    );
  }));

gpuTest(
  "ids and targets outside [0, V) read nothing out of bounds (zero row, NaN logp)",
  () =>
    withOps(gpu!, (ops) =>
      Effect.gen(function* () {
        const table = ops.fromArray([1, 2, 3, 4, 5, 6], [3, 2]);
        const e = ops.embedding(table, ops.fromArray([3, 1, -1, 1 << 30], [4], "i32"));
        const { logp, lse } = ops.logProbs(
          ops.fromArray([0, 0, 0, 0], [2, 2]),
          ops.fromArray([2, 1], [2], "i32"),
          1,
        );
        const [ev, lp, ls] = yield* ops.read([e, logp, lse]);
        assertEquals(Array.from(ev), [0, 0, 3, 4, 0, 0, 0, 0]);
        assert(Number.isNaN(lp[0]), `logp of target 2 of 2 is ${lp[0]}`);
        close([lp[1], ls[0]], [-Math.log(2), Math.log(2)], 1e-6, "valid row");
      })),
);

// ---- WebGPU vs CPU f32 (property tests) ---------------------------------------------------------

const rmsArb = fc.record({
  rows: fc.integer({ min: 1, max: 6 }),
  // h >= 2: with h = 1 the output is sign(x)·w and dx is pure rounding noise.
  h: fc.integer({ min: 2, max: 40 }),
  eps: fc.constantFrom(0, 1e-6, 1e-5, 0.1),
  scale: fc.constantFrom(1, 30),
  seed,
});

/** rmsNorm forward and backward on one backend, as in a training step. */
const rmsAll =
  (a: { rows: number; h: number; eps: number; scale: number; seed: number }) =>
  (ops: Ops): Tensor[] => {
    const x = ops.fromArray(vals(a.rows * a.h, a.seed, a.scale), [a.rows, a.h]);
    const w = ops.fromArray(vals(a.h, a.seed + 1), [a.h]);
    const dy = ops.fromArray(vals(a.rows * a.h, a.seed + 2), [a.rows, a.h]);
    const { y, rstd } = ops.rmsNorm(x, w, a.eps);
    const { dx, dw } = ops.rmsNormBackward(dy, x, w, rstd);
    return [y, rstd, dx, dw, ops.rmsNormBackwardInput(dy, x, w, rstd)];
  };

gpuTest(
  "rmsNorm, rmsNormBackward and rmsNormBackwardInput match the CPU (rows of any width: vec4 kernels where a multiple of 4)",
  () =>
    fc.assert(fc.asyncProperty(rmsArb, (a) => gpuMatchesCpu("rmsNorm", rmsAll(a))), {
      numRuns: RUNS,
    }),
);

const ropeArb = fc.record({
  rows: fc.integer({ min: 1, max: 5 }),
  heads: fc.integer({ min: 1, max: 3 }),
  half: fc.integer({ min: 1, max: 8 }),
  theta: fc.constantFrom(10, 10000, 500000),
  maxPos: fc.constantFrom(8, 4096),
  seed,
});

gpuTest("rope and ropeBackward match the CPU (positions up to 4096)", () =>
  fc.assert(
    fc.asyncProperty(ropeArb, (a) =>
      gpuMatchesCpu("rope", (ops) => {
        const d = 2 * a.half;
        const x = ops.fromArray(vals(a.rows * a.heads * d, a.seed), [a.rows, a.heads * d]);
        const pos = ops.fromArray(ints(a.rows, a.seed + 1, a.maxPos), [a.rows], "i32");
        return [
          ops.rope(x, pos, a.heads, d, a.theta),
          ops.ropeBackward(x, pos, a.heads, d, a.theta),
        ];
      })),
    { numRuns: RUNS },
  ));

gpuTest(
  "rope stays accurate at long positions (headDim 128, positions to 8191) vs the f64 CPU",
  async () => {
    const rows = 64;
    const heads = 2;
    const d = 128;
    const x = vals(rows * heads * d, 5);
    const pos = Int32Array.from({ length: rows }, (_, i) => i === 0 ? 8191 : Math.floor(i * 127.3));
    const f = (
      ops: Ops,
    ) => [
      ops.rope(
        ops.fromArray(x, [rows, heads * d]),
        ops.fromArray(pos, [rows], "i32"),
        heads,
        d,
        10000,
      ),
    ];
    const [r] = await evalOn(ref, f);
    const [g] = await evalOn(gpu!, f);
    const e = relError(g, r);
    assert(e <= 2e-6, `rel error ${e}`);
  },
);

const embArb = fc.record({
  v: fc.integer({ min: 1, max: 20 }),
  h: fc.integer({ min: 1, max: 16 }),
  n: fc.integer({ min: 0, max: 40 }),
  seed,
});

gpuTest("embedding and embeddingBackward match the CPU", () =>
  fc.assert(
    fc.asyncProperty(embArb, (a) => {
      const ids = ints(a.n, a.seed, a.v);
      return gpuMatchesCpu("embedding", (ops) => {
        const table = ops.fromArray(vals(a.v * a.h, a.seed + 1), [a.v, a.h]);
        const dy = ops.fromArray(vals(a.n * a.h, a.seed + 2), [a.n, a.h]);
        return [
          ops.embedding(table, ops.fromArray(ids, [a.n], "i32")),
          ops.embeddingBackward(dy, ids, a.v),
        ];
      });
    }),
    { numRuns: RUNS },
  ));

const lpArb = fc.record({
  n: fc.integer({ min: 1, max: 6 }),
  v: fc.integer({ min: 1, max: 300 }),
  t: fc.constantFrom(0.5, 1, 1.7),
  scale: fc.constantFrom(1, 10),
  seed,
});

/** logProbs, logProbsBackward and entropy on one backend. */
const lpAll =
  (a: { n: number; v: number; t: number; scale: number; seed: number }) => (ops: Ops): Tensor[] => {
    const logits = ops.fromArray(vals(a.n * a.v, a.seed, a.scale), [a.n, a.v]);
    const targets = ops.fromArray(ints(a.n, a.seed + 1, a.v), [a.n], "i32");
    const { logp, lse } = ops.logProbs(logits, targets, a.t);
    const dl = ops.logProbsBackward(
      ops.fromArray(vals(a.n, a.seed + 2), [a.n]),
      logits,
      targets,
      lse,
      a.t,
    );
    return [logp, lse, dl, ops.entropy(logits, a.t)];
  };

gpuTest(
  "logProbs, logProbsBackward and entropy match the CPU",
  () =>
    fc.assert(fc.asyncProperty(lpArb, (a) => gpuMatchesCpu("logProbs", lpAll(a))), {
      numRuns: RUNS,
    }),
);

for (const b of both) {
  Deno.test(`${b.info.name}: rmsNormBackwardInput is the dx of rmsNormBackward, exactly`, () =>
    fc.assert(
      fc.asyncProperty(rmsArb, async (a) => {
        const [, , dx, , dxOnly] = await evalOn(b, rmsAll(a));
        assertEquals(Array.from(dxOnly), Array.from(dx));
      }),
      { numRuns: RUNS },
    ));
}

/** rmsNormBackwardInput with and without a residual, and the residual after the call. */
const rmsResidual =
  (a: { rows: number; h: number; eps: number; scale: number; seed: number }) =>
  (ops: Ops): Tensor[] => {
    const x = ops.fromArray(vals(a.rows * a.h, a.seed, a.scale), [a.rows, a.h]);
    const w = ops.fromArray(vals(a.h, a.seed + 1), [a.h]);
    const dy = ops.fromArray(vals(a.rows * a.h, a.seed + 2), [a.rows, a.h]);
    const res = ops.fromArray(vals(a.rows * a.h, a.seed + 3), [a.rows, a.h]);
    const { rstd } = ops.rmsNorm(x, w, a.eps);
    const dx = ops.rmsNormBackwardInput(dy, x, w, rstd);
    const fused = ops.rmsNormBackwardInput(dy, x, w, rstd, res);
    return [dx, fused, res];
  };

Deno.test("cpu: rmsNormBackwardInput with a residual is residual + dx exactly, the residual unchanged", () =>
  fc.assert(
    fc.asyncProperty(rmsArb, async (a) => {
      const [dx, fused, res] = await evalOn(cpu, rmsResidual(a));
      const want = Float32Array.from(dx, (v, i) => res[i] + v);
      assertEquals(Array.from(fused), Array.from(want));
      assertEquals(Array.from(res), Array.from(vals(a.rows * a.h, a.seed + 3)));
    }),
    { numRuns: RUNS },
  ));

// One pass on WebGPU (rows of a multiple of 4 in the row form), an add after the others: the
// compiler may round the fused pass's expression differently in the last bit, so against the CPU.
gpuTest("rmsNormBackwardInput with a residual matches the CPU in every row form", async () => {
  try {
    for (const form of [undefined, "row", "wg"] as const) {
      setRowForm(form);
      await fc.assert(
        fc.asyncProperty(rmsArb, (a) => gpuMatchesCpu(`residual ${form}`, rmsResidual(a))),
        { numRuns: RUNS },
      );
    }
  } finally {
    setRowForm(undefined);
  }
});

for (const b of both) {
  Deno.test(`${b.info.name}: rmsNormBackwardInput rejects a residual of another shape`, () =>
    withOps(b, (ops) => {
      const x = ops.fromArray(vals(8, 1), [2, 4]);
      const w = ops.fromArray(vals(4, 2), [4]);
      const { rstd } = ops.rmsNorm(x, w, 1e-5);
      throwsShape(
        () => ops.rmsNormBackwardInput(x, x, w, rstd, ops.zeros([4, 2])),
        "rmsNormBackwardInput residual",
      );
    }));
}

gpuTest("the workgroup-per-row and per-row-loop kernels both match the CPU", async () => {
  try {
    for (const form of ["row", "wg"] as const) {
      setRowForm(form);
      await fc.assert(
        fc.asyncProperty(rmsArb, lpArb, async (r, l) => {
          await gpuMatchesCpu(`rmsNorm ${form}`, rmsAll({ ...r, h: r.h * 7 }));
          await gpuMatchesCpu(`logProbs ${form}`, lpAll(l));
        }),
        { numRuns: 10 },
      );
      // Masked (-inf) and huge logits, and rows shorter than a workgroup.
      await gpuMatchesCpu(`extreme logits ${form}`, (ops) => {
        const logits = ops.fromArray([0, 1, -Infinity, 1000, 1000, 999, -Infinity, 0, -Infinity], [
          3,
          3,
        ]);
        const targets = ops.fromArray([1, 2, 1], [3], "i32");
        const { logp, lse } = ops.logProbs(logits, targets, 1);
        const dl = ops.logProbsBackward(ops.fromArray([1, -1, 2], [3]), logits, targets, lse, 1);
        return [logp, dl, ops.entropy(logits, 1), ops.entropy(logits, 3)];
      });
    }
  } finally {
    setRowForm(undefined);
  }
});

gpuTest(
  "long reductions: rmsNorm dw over 2500 rows, an id repeated 2100 times, V = 70000",
  async () => {
    await gpuMatchesCpu(
      "rmsNorm 2500 rows",
      rmsAll({ rows: 2500, h: 3, eps: 1e-5, scale: 1, seed: 9 }),
    );
    const ids = Int32Array.from({ length: 2300 }, (_, i) => i % 11 === 0 ? 1 : 0);
    await gpuMatchesCpu("embeddingBackward", (ops) => [
      ops.embeddingBackward(ops.fromArray(vals(2300 * 3, 3), [2300, 3]), ids, 3),
    ]);
    await gpuMatchesCpu("logProbs V=70000", lpAll({ n: 3, v: 70000, t: 1, scale: 10, seed: 4 }));
  },
);

// ---- backward ops vs finite differences of the f64 forward (both backends) ----------------------

for (const b of both) {
  const n = b.info.name;
  const runs = { numRuns: 20 };

  Deno.test(`${n}: rmsNormBackward dx and dw match finite differences`, () =>
    fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 3 }),
        fc.integer({ min: 2, max: 8 }),
        fc.constantFrom(1e-5, 0.1),
        seed,
        async (rows, h, eps, s) => {
          const x0 = vals(rows * h, s);
          const w0 = vals(h, s + 1);
          const p = vals(rows * h, s + 2);
          await gradMatches(b, "rmsNorm dx", x0, [rows, h], p, (ops, x) =>
            ops.rmsNorm(x, ops.fromArray(w0, [h]), eps).y, (ops, x, pt) => {
            const w = ops.fromArray(w0, [h]);
            const { rstd } = ops.rmsNorm(x, w, eps);
            return ops.rmsNormBackward(ops.reshape(pt, [rows, h]), x, w, rstd).dx;
          });
          await gradMatches(b, "rmsNorm dw", w0, [h], p, (ops, w) =>
            ops.rmsNorm(ops.fromArray(x0, [rows, h]), w, eps).y, (ops, w, pt) => {
            const x = ops.fromArray(x0, [rows, h]);
            const { rstd } = ops.rmsNorm(x, w, eps);
            return ops.rmsNormBackward(ops.reshape(pt, [rows, h]), x, w, rstd).dw;
          });
        },
      ),
      runs,
    ));

  Deno.test(`${n}: ropeBackward matches finite differences`, () =>
    fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 3 }),
        fc.integer({ min: 1, max: 2 }),
        fc.integer({ min: 1, max: 4 }),
        seed,
        async (rows, heads, half, s) => {
          const d = 2 * half;
          const cols = heads * d;
          const pos = ints(rows, s + 3, 2048);
          await gradMatches(
            b,
            "rope",
            vals(rows * cols, s),
            [rows, cols],
            vals(rows * cols, s + 1),
            (ops, x) => ops.rope(x, ops.fromArray(pos, [rows], "i32"), heads, d, 10000),
            (ops, _x, pt) =>
              ops.ropeBackward(
                ops.reshape(pt, [rows, cols]),
                ops.fromArray(pos, [rows], "i32"),
                heads,
                d,
                10000,
              ),
          );
        },
      ),
      runs,
    ));

  Deno.test(`${n}: embeddingBackward matches finite differences`, () =>
    fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 6 }),
        fc.integer({ min: 1, max: 4 }),
        fc.integer({ min: 1, max: 10 }),
        seed,
        async (v, h, count, s) => {
          const ids = ints(count, s + 3, v);
          await gradMatches(
            b,
            "embedding",
            vals(v * h, s),
            [v, h],
            vals(count * h, s + 1),
            (ops, table) => ops.embedding(table, ops.fromArray(ids, [count], "i32")),
            (ops, _t, pt) => ops.embeddingBackward(ops.reshape(pt, [count, h]), ids, v),
          );
        },
      ),
      runs,
    ));

  Deno.test(`${n}: logProbsBackward matches finite differences`, () =>
    fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 3 }),
        fc.integer({ min: 2, max: 12 }),
        fc.constantFrom(0.5, 1, 1.7),
        seed,
        async (rows, v, t, s) => {
          const targets = ints(rows, s + 3, v);
          await gradMatches(
            b,
            "logProbs",
            vals(rows * v, s, 3),
            [rows, v],
            vals(rows, s + 1),
            (ops, x) => ops.logProbs(x, ops.fromArray(targets, [rows], "i32"), t).logp,
            (ops, x, pt) => {
              const tg = ops.fromArray(targets, [rows], "i32");
              const { lse } = ops.logProbs(x, tg, t);
              return ops.logProbsBackward(pt, x, tg, lse, t);
            },
          );
        },
      ),
      runs,
    ));
}

gpuTeardown();
