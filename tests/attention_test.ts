/**
 * Attention ops (Ops.attention / Ops.attentionBackward): WebGPU vs the CPU reference over random
 * geometry, both backends vs finite differences of the float64 reference, hand-computed
 * examples, KV-cache consistency, fully masked rows and shape errors.
 */
import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import { Effect } from "effect";
import fc from "fast-check";
import type { BackendShape } from "../src/backend/backend.ts";
import type { AttentionOptions, FloatArray, Ops, Tensor } from "../mod.ts";
import { ShapeError } from "../mod.ts";
import { attentionTuning } from "../src/backend/webgpu/attention.ts";
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

/** Registers a test for the CPU backend and one for WebGPU (ignored without an adapter). */
const forBackends = (name: string, fn: (b: BackendShape) => Promise<void>): void => {
  Deno.test(`cpu: ${name}`, () => fn(cpu));
  Deno.test({ name: `webgpu: ${name}`, ignore: !hasGpu, fn: () => fn(gpu!) });
};

/** Geometry without the kvStart tensor, plus the host kvStart values (if any). */
interface Case {
  readonly o: Omit<AttentionOptions, "kvStart">;
  readonly starts: readonly number[] | null;
  readonly seed: number;
  readonly amp: number;
}

/** Random f32-representable values in [-amp, amp) (identical inputs for f32 and f64 backends). */
const values = (n: number, seed: number, amp = 1): Float64Array =>
  Float64Array.from(seededValues(n, seed), (x) => Math.fround(x * amp));

const maxAbs = (x: ArrayLike<number>): number => {
  let m = 0;
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i]));
  return m;
};

/**
 * relError with a floor on the reference norm: gradients can cancel to (nearly) zero, where any
 * relative measure is meaningless, so errors are then measured against the natural scale of the
 * terms that cancelled.
 */
const relErrorFloor = (x: ArrayLike<number>, want: ArrayLike<number>, floor: number): number => {
  const den = Math.max(maxAbs(want), 1e-30);
  return (relError(x, want) * den) / Math.max(den, floor);
};

interface Inputs {
  readonly q: Float64Array;
  readonly k: Float64Array;
  readonly v: Float64Array;
  readonly dOut: Float64Array;
}

const inputsOf = (c: Case): Inputs => {
  const { batch, tq, tk, heads, kvHeads, headDim } = c.o;
  const nq = batch * tq * heads * headDim;
  const nk = batch * tk * kvHeads * headDim;
  return {
    q: values(nq, c.seed, c.amp),
    k: values(nk, c.seed + 1, c.amp),
    v: values(nk, c.seed + 2),
    dOut: values(nq, c.seed + 3),
  };
};

const optsOf = (ops: Ops, c: Case): AttentionOptions =>
  c.starts ? { ...c.o, kvStart: ops.fromArray(c.starts, [c.o.batch], "i32") } : c.o;

const tensors = (ops: Ops, c: Case, x: Inputs) => {
  const { batch, tq, tk, heads, kvHeads, headDim } = c.o;
  return {
    q: ops.fromArray(x.q, [batch * tq, heads * headDim]),
    k: ops.fromArray(x.k, [batch * tk, kvHeads * headDim]),
    v: ops.fromArray(x.v, [batch * tk, kvHeads * headDim]),
    dOut: ops.fromArray(x.dOut, [batch * tq, heads * headDim]),
  };
};

/** Forward and backward on one backend: [out, lse, dq, dk, dv]. */
const runCase = (b: BackendShape, c: Case, x: Inputs): Promise<FloatArray[]> =>
  withOps(b, (ops) => {
    const t = tensors(ops, c, x);
    const opts = optsOf(ops, c);
    const { out, lse } = ops.attention(t.q, t.k, t.v, opts);
    const g = ops.attentionBackward(t.dOut, t.q, t.k, t.v, out, lse, opts);
    return ops.read([out, lse, g.dq, g.dk, g.dv]);
  });

/** [heads, kvHeads] pairs: multi-head, grouped-query and multi-query attention. */
const HEADS: readonly (readonly [number, number])[] = [
  [1, 1],
  [2, 1],
  [2, 2],
  [4, 1],
  [4, 2],
  [4, 4],
];

/** Random geometry: qOffset = tk - tq or any smaller offset; optional kvLen and kvStart. */
const caseArb = (p: {
  maxBatch: number;
  maxTq: number;
  maxExtra: number;
  dims: readonly number[];
}): fc.Arbitrary<Case> =>
  fc.record({
    batch: fc.integer({ min: 1, max: p.maxBatch }),
    tq: fc.integer({ min: 1, max: p.maxTq }),
    extra: fc.integer({ min: 0, max: p.maxExtra }),
    hk: fc.constantFrom(...HEADS),
    headDim: fc.constantFrom(...p.dims),
    offsetFrac: fc.option(fc.double({ min: 0, max: 1, noNaN: true }), { freq: 3 }),
    lenFrac: fc.option(fc.double({ min: 0, max: 1, noNaN: true }), { freq: 2 }),
    starts: fc.option(fc.array(fc.integer({ min: -1, max: 5 }), { minLength: 3, maxLength: 3 }), {
      freq: 2,
    }),
    seed: fc.integer({ min: 1, max: 2 ** 30 }),
    amp: fc.constantFrom(0.5, 1, 3),
  }).map((r): Case => {
    const tk = r.tq + r.extra;
    const qOffset = r.offsetFrac === null ? tk - r.tq : Math.floor(r.offsetFrac * (tk - r.tq));
    const kvLen = r.lenFrac === null ? undefined : Math.round(r.lenFrac * tk);
    return {
      o: {
        batch: r.batch,
        tq: r.tq,
        tk,
        heads: r.hk[0],
        kvHeads: r.hk[1],
        headDim: r.headDim,
        qOffset,
        ...(kvLen === undefined ? {} : { kvLen }),
      },
      starts: r.starts ? r.starts.slice(0, r.batch) : null,
      seed: r.seed,
      amp: r.amp,
    };
  });

const NAMES = ["out", "lse", "dq", "dk", "dv"];

Deno.test({
  name: "webgpu: attention forward and backward match the CPU reference (random geometry)",
  ignore: !hasGpu,
  fn: () =>
    fc.assert(
      fc.asyncProperty(
        caseArb({ maxBatch: 3, maxTq: 9, maxExtra: 6, dims: [1, 2, 3, 4, 6, 8, 16, 32] }),
        // Kernel tile sizes and key-range splits chosen by the host, or forced (every code path).
        fc.constantFrom(undefined, 1, 2, 4),
        fc.option(fc.integer({ min: 1, max: 4 }), { nil: undefined }),
        // operands staged in textures (default) or read from storage buffers (the fallback)
        fc.constantFrom(undefined, true),
        async (c, tile, splitLen, buffers) => {
          const x = inputsOf(c);
          const want = await runCase(cpu, c, x);
          Object.assign(attentionTuning, { tile, splitLen, buffers });
          const got = await runCase(gpu!, c, x).finally(() => {
            delete attentionTuning.tile;
            delete attentionTuning.splitLen;
            delete attentionTuning.buffers;
          });
          // Natural scales of the gradients (the terms of dP - D, times q or k, cancel).
          const dvScale = maxAbs(x.dOut);
          const dqkScale = dvScale * maxAbs(x.v) * Math.max(maxAbs(x.q), maxAbs(x.k));
          const floors = [0, 0, dqkScale, dqkScale, dvScale];
          got.forEach((g, i) => {
            const err = relErrorFloor(g, want[i], floors[i]);
            const at = JSON.stringify({ ...c, tile, splitLen, buffers });
            assert(err <= 1e-5, `${NAMES[i]}: error ${err} for ${at}`);
          });
        },
      ),
      { numRuns: 40 },
    ),
});

/** Checks attentionBackward of `b` against central differences of the f64 reference forward. */
const checkGradients = async (b: BackendShape, tol: number): Promise<void> => {
  await fc.assert(
    fc.asyncProperty(
      caseArb({ maxBatch: 2, maxTq: 4, maxExtra: 3, dims: [1, 2, 3, 4, 8] }),
      async (c) => {
        const x = inputsOf(c);
        const [, , dq, dk, dv] = await runCase(b, c, x);
        const { batch, tq, tk, heads, kvHeads, headDim } = c.o;
        // Loss = sum(dOut ⊙ out): its gradients are attentionBackward with that dOut.
        const numeric = await withOps(ref, (ops) => {
          const opts = optsOf(ops, c);
          const loss = (q: Float64Array, k: Float64Array, v: Float64Array): number => {
            const { out } = ops.attention(
              ops.fromArray(q, [batch * tq, heads * headDim]),
              ops.fromArray(k, [batch * tk, kvHeads * headDim]),
              ops.fromArray(v, [batch * tk, kvHeads * headDim]),
              opts,
            );
            const [o] = Effect.runSync(ops.read([out]));
            let s = 0;
            for (let i = 0; i < o.length; i++) s += o[i] * x.dOut[i];
            return s;
          };
          const q = x.q.slice();
          const k = x.k.slice();
          const v = x.v.slice();
          return [
            numericGradient((z) => loss(z, k, v), q),
            numericGradient((z) => loss(q, z, v), k),
            numericGradient((z) => loss(q, k, z), v),
          ];
        });
        const dvScale = maxAbs(x.dOut);
        const dqkScale = dvScale * maxAbs(x.v) * Math.max(maxAbs(x.q), maxAbs(x.k));
        [[dq, numeric[0], dqkScale], [dk, numeric[1], dqkScale], [dv, numeric[2], dvScale]]
          .forEach(([g, n, floor], i) => {
            const err = relErrorFloor(g as FloatArray, n as Float64Array, floor as number);
            assert(err <= tol, `${NAMES[i + 2]}: error ${err} vs finite differences`);
          });
      },
    ),
    { numRuns: 20 },
  );
};

Deno.test("cpu f64: attentionBackward matches finite differences", () => checkGradients(ref, 1e-7));
Deno.test("cpu f32: attentionBackward matches finite differences", () => checkGradients(cpu, 3e-5));
Deno.test({
  name: "webgpu: attentionBackward matches finite differences",
  ignore: !hasGpu,
  fn: () => checkGradients(gpu!, 3e-5),
});

/** Runs the forward on host arrays. */
const forward = (
  b: BackendShape,
  q: ArrayLike<number>,
  k: ArrayLike<number>,
  v: ArrayLike<number>,
  o: AttentionOptions,
  starts?: readonly number[],
): Promise<FloatArray[]> =>
  withOps(b, (ops) => {
    const { out, lse } = ops.attention(
      ops.fromArray(q, [o.batch * o.tq, o.heads * o.headDim]),
      ops.fromArray(k, [o.batch * o.tk, o.kvHeads * o.headDim]),
      ops.fromArray(v, [o.batch * o.tk, o.kvHeads * o.headDim]),
      starts ? { ...o, kvStart: ops.fromArray(starts, [o.batch], "i32") } : o,
    );
    return ops.read([out, lse]);
  });

const near = (got: ArrayLike<number>, want: readonly number[], tol = 1e-6): void =>
  assert(
    got.length === want.length &&
      want.every((w, i) => Math.abs(got[i] - w) <= tol * (1 + Math.abs(w))),
    `got [${Array.from(got)}], want [${want}]`,
  );

forBackends("attention of a single key returns its value", async (b) => {
  const o = { batch: 1, tq: 1, tk: 1, heads: 1, kvHeads: 1, headDim: 2 };
  const [out, lse] = await forward(b, [1, 2], [3, -1], [5, 7], o);
  near(out, [5, 7]);
  near(lse, [(1 * 3 + 2 * -1) / Math.SQRT2]);
});

forBackends("two keys with equal scores average their values (both query heads)", async (b) => {
  // heads 2 share the single kv head; query row 0 sits at position 1 (qOffset) and sees both keys.
  const o = { batch: 1, tq: 1, tk: 2, heads: 2, kvHeads: 1, headDim: 2, qOffset: 1 };
  const [out, lse] = await forward(b, [0.5, 0.5, -1, 2], [1, 1, 1, 1], [1, 2, 3, 6], o);
  near(out, [2, 4, 2, 4]);
  near(lse, [1 / Math.SQRT2 + Math.LN2, 1 / Math.SQRT2 + Math.LN2]);
});

forBackends("causal mask: the first query sees only the first key", async (b) => {
  const o = { batch: 1, tq: 2, tk: 2, heads: 1, kvHeads: 1, headDim: 1 };
  const [out, lse] = await forward(b, [2, 0], [0.5, 10], [3, -4], o);
  near(out.slice(0, 1), [3]);
  near(lse.slice(0, 1), [1]);
  // Query 1 has score 0 for both keys: the mean.
  near(out.slice(1), [-0.5]);
  near(lse.slice(1), [Math.LN2]);
});

forBackends("KV cache: decoding one query over a prefix equals the full causal pass", async (b) => {
  const [batch, T, heads, kvHeads] = [2, 7, 4, 2];
  for (const headDim of [8, 6]) {
    const full = { batch, tq: T, tk: T, heads, kvHeads, headDim };
    const q = values(batch * T * heads * headDim, 11);
    const k = values(batch * T * kvHeads * headDim, 12, 2);
    const v = values(batch * T * kvHeads * headDim, 13);
    const starts = [0, 2];
    const [out, lse] = await forward(b, q, k, v, full, starts);
    // A cache allocated at C > T rows whose tail holds garbage that kvLen must hide.
    const C = T + 3;
    const w = kvHeads * headDim;
    const cache = (x: Float64Array) => {
      const c = values(batch * C * w, 99, 1e3);
      for (let s = 0; s < batch; s++) c.set(x.subarray(s * T * w, (s + 1) * T * w), s * C * w);
      return c;
    };
    const [kc, vc] = [cache(k), cache(v)];
    const qw = heads * headDim;
    for (const i of [0, 3, T - 1]) {
      const qi = new Float64Array(batch * qw);
      for (let s = 0; s < batch; s++) {
        qi.set(q.subarray((s * T + i) * qw, (s * T + i + 1) * qw), s * qw);
      }
      const o = { batch, tq: 1, tk: C, heads, kvHeads, headDim, qOffset: i, kvLen: i + 1 };
      const [oi, li] = await forward(b, qi, kc, vc, o, starts);
      for (let s = 0; s < batch; s++) {
        const r = s * T + i;
        const wantOut = out.slice(r * qw, (r + 1) * qw);
        assert(relError(oi.slice(s * qw, (s + 1) * qw), wantOut) <= 1e-6, `out row ${i} seq ${s}`);
        assert(
          relError(li.slice(s * heads, (s + 1) * heads), lse.slice(r * heads, (r + 1) * heads)) <=
            1e-6,
        );
      }
    }
  }
});

forBackends("KV cache grown by scatterRowsInPlace, step by step, then overwritten", async (b) => {
  // kvHeads * headDim = 64: on WebGPU the cache is staged through its texture mirror
  // (texture_mirror.ts), which each scatter updates and any other write drops.
  const [batch, T, heads, kvHeads, headDim] = [2, 6, 4, 2, 32];
  const full = { batch, tq: T, tk: T, heads, kvHeads, headDim };
  const q = values(batch * T * heads * headDim, 21);
  const k = values(batch * T * kvHeads * headDim, 22, 2);
  const v = values(batch * T * kvHeads * headDim, 23);
  const k2 = values(batch * T * kvHeads * headDim, 24, 2);
  const [out] = await forward(b, q, k, v, full);
  const [out2] = await forward(b, q, k2, v, full);
  const C = T + 2;
  const w = kvHeads * headDim;
  const qw = heads * headDim;
  const rowsOf = (x: Float64Array, i: number, width: number) => {
    const r = new Float64Array(batch * width);
    for (let s = 0; s < batch; s++) {
      r.set(x.subarray((s * T + i) * width, (s * T + i + 1) * width), s * width);
    }
    return r;
  };
  const check = (got: ArrayLike<number>, want: ArrayLike<number>, i: number, what: string) => {
    for (let s = 0; s < batch; s++) {
      const r = s * T + i;
      const err = relError(
        Array.from(got).slice(s * qw, (s + 1) * qw),
        Array.from(want).slice(r * qw, (r + 1) * qw),
      );
      assert(err <= 1e-6, `${what}: row ${i} seq ${s}: error ${err}`);
    }
  };
  await withOps(b, async (ops) => {
    const kc = ops.zeros([batch * C, w]);
    const vc = ops.zeros([batch * C, w]);
    const step = (i: number) => {
      const o = { batch, tq: 1, tk: C, heads, kvHeads, headDim, qOffset: i, kvLen: i + 1 };
      return ops.attention(ops.fromArray(rowsOf(q, i, qw), [batch, qw]), kc, vc, o).out;
    };
    for (let i = 0; i < T; i++) {
      const at = Array.from({ length: batch }, (_, s) => s * C + i);
      ops.scatterRowsInPlace(kc, ops.fromArray(rowsOf(k, i, w), [batch, w]), at);
      ops.scatterRowsInPlace(vc, ops.fromArray(rowsOf(v, i, w), [batch, w]), at);
      check((await Effect.runPromise(ops.read([step(i)])))[0], out, i, "scattered");
    }
    // a write that is not a scatter: the keys become k2, which the next read must see
    for (let s = 0; s < batch; s++) {
      ops.setRows(kc, s * C, ops.fromArray(k2.subarray(s * T * w, (s + 1) * T * w), [T, w]));
    }
    check((await Effect.runPromise(ops.read([step(T - 1)])))[0], out2, T - 1, "overwritten");
    // and scatters after it keep the cache current again
    const at = Array.from({ length: batch }, (_, s) => s * C + T - 1);
    ops.scatterRowsInPlace(kc, ops.fromArray(rowsOf(k, T - 1, w), [batch, w]), at);
    const mixed = Float64Array.from(k2);
    for (let s = 0; s < batch; s++) {
      const r = (s * T + T - 1) * w;
      mixed.set(k.subarray(r, r + w), r);
    }
    const [outMixed] = await forward(b, q, mixed, v, full);
    check((await Effect.runPromise(ops.read([step(T - 1)])))[0], outMixed, T - 1, "re-scattered");
  });
});

Deno.test({
  name: "webgpu: long decode (split key range) matches the CPU reference",
  ignore: !hasGpu,
  fn: async () => {
    for (const [batch, headDim, kvLen] of [[1, 64, 300], [2, 8, 150], [3, 6, 97]]) {
      const c: Case = {
        o: { batch, tq: 1, tk: 320, heads: 4, kvHeads: 2, headDim, qOffset: kvLen - 1, kvLen },
        starts: [0, 40, 3].slice(0, batch),
        seed: 5 + batch,
        amp: 2,
      };
      const x = inputsOf(c);
      const want = await runCase(cpu, c, x);
      const got = await runCase(gpu!, c, x);
      got.forEach((g, i) => {
        const err = relError(g, want[i]);
        assert(err <= 1e-5, `${NAMES[i]} (batch ${batch}, headDim ${headDim}): error ${err}`);
      });
    }
  },
});

forBackends("a query row with no visible key gets 0 output, 0 lse and 0 gradients", async (b) => {
  // Sequence 1 starts at key 2 (left padding): its query rows 0 and 1 see nothing.
  const c: Case = {
    o: { batch: 2, tq: 4, tk: 4, heads: 2, kvHeads: 1, headDim: 4 },
    starts: [0, 2],
    seed: 21,
    amp: 1,
  };
  const [out, lse, dq, dk, dv] = await runCase(b, c, inputsOf(c));
  const w = 2 * 4;
  for (const row of [4, 5]) {
    assertEquals(Array.from(out.slice(row * w, (row + 1) * w)), new Array(w).fill(0));
    assertEquals(Array.from(lse.slice(row * 2, row * 2 + 2)), [0, 0]);
    assertEquals(Array.from(dq.slice(row * w, (row + 1) * w)), new Array(w).fill(0));
  }
  // Masked keys 0 and 1 of sequence 1 get no gradient; visible ones do.
  assertEquals(Array.from(dk.slice(4 * 4, 6 * 4)), new Array(8).fill(0));
  assertEquals(Array.from(dv.slice(4 * 4, 6 * 4)), new Array(8).fill(0));
  assert(maxAbs(dv.slice(6 * 4)) > 0 && maxAbs(out.slice(6 * w)) > 0);
  // kvLen = 0 hides every key.
  const none: Case = { ...c, o: { ...c.o, kvLen: 0 }, starts: null };
  for (const t of await runCase(b, none, inputsOf(none))) assert(maxAbs(t) === 0);
});

forBackends("inconsistent shapes and options raise ShapeError", (b) =>
  withOps(b, (ops) => {
    const base = { batch: 2, tq: 3, tk: 4, heads: 4, kvHeads: 2, headDim: 2, qOffset: 1 };
    const t = (rows: number, cols: number, dtype: "f32" | "i32" = "f32"): Tensor =>
      ops.zeros([rows, cols], dtype);
    const q = t(6, 8);
    const k = t(8, 4);
    const v = t(8, 4);
    const bad = (f: () => unknown) => throws(f, ShapeError);
    ops.attention(q, k, v, base); // consistent
    bad(() => ops.attention(q, k, v, { ...base, heads: 3 }));
    bad(() => ops.attention(q, k, v, { ...base, kvHeads: 3 }));
    bad(() => ops.attention(t(5, 8), k, v, base));
    bad(() => ops.attention(q, t(8, 6), v, base));
    bad(() => ops.attention(q, k, t(6, 4), base));
    bad(() => ops.attention(q, k, v, { ...base, qOffset: 2 }));
    bad(() => ops.attention(q, k, v, { ...base, qOffset: -1 }));
    bad(() => ops.attention(q, k, v, { ...base, kvLen: 5 }));
    bad(() => ops.attention(q, k, v, { ...base, tq: 1.5 }));
    bad(() => ops.attention(q, k, v, { ...base, kvStart: ops.zeros([3], "i32") }));
    bad(() => ops.attention(q, k, v, { ...base, kvStart: ops.zeros([2]) }));
    bad(() => ops.attention(t(6, 8, "i32"), k, v, base));
    const { out, lse } = ops.attention(q, k, v, base);
    ops.attentionBackward(q, q, k, v, out, lse, base); // consistent
    bad(() => ops.attentionBackward(q, q, k, v, out, t(6, 2), base));
    bad(() => ops.attentionBackward(t(6, 4), q, k, v, out, lse, base));
    bad(() => ops.attentionBackward(q, q, k, v, t(3, 8), lse, base));
  }));

Deno.test({
  name: "webgpu: headDim above the kernels' limit raises ShapeError",
  ignore: !hasGpu,
  fn: () =>
    withOps(gpu!, (ops) => {
      const o = { batch: 1, tq: 1, tk: 1, heads: 1, kvHeads: 1, headDim: 260 };
      const x = ops.zeros([1, 260]);
      throws(() => ops.attention(x, x, x, o), ShapeError);
    }),
});

gpuTeardown();
