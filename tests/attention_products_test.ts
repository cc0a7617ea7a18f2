/**
 * The WebGPU attention product path (batched texture matmuls + masked-softmax row kernels, taken
 * by the backward for training / log-probs geometry, tq >= 16, and by the forward when forced) against the CPU
 * reference over random geometry: padding (kvStart, kvLen), causal offsets, sliding windows,
 * score scale, soft-capping, grouped heads, head dims up to 256; also against the online-softmax
 * kernels on the SmolLM2-135M training shape.
 */
import { ok as assert } from "node:assert/strict";
import fc from "fast-check";
import type { BackendShape } from "../src/backend/backend.ts";
import type { AttentionOptions, FloatArray, Ops } from "../mod.ts";
import { attentionPathCounts, attentionTuning } from "../src/backend/webgpu/attention.ts";
import { Effect } from "effect";
import { backward, forward, uploadModel } from "../src/model/decoder.ts";
import { Rng } from "../src/model/rng.ts";
import { initWeights } from "../src/model/weights.ts";
import { tinyConfig } from "./support/tiny.ts";
import {
  gpuTeardown,
  hasGpu,
  relError,
  seededValues,
  testBackends,
  withOps,
} from "./support/backends.ts";

const { gpu, cpu } = await testBackends();

interface Case {
  readonly o: Omit<AttentionOptions, "kvStart">;
  readonly starts: readonly number[] | null;
  readonly seed: number;
}

const values = (n: number, seed: number, amp = 1): Float64Array =>
  Float64Array.from(seededValues(n, seed), (x) => Math.fround(x * amp));

const maxAbs = (x: ArrayLike<number>): number => {
  let m = 0;
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i]));
  return m;
};

/** relError against max(|want|, floor): gradients may cancel to nearly zero. */
const relErrorFloor = (x: ArrayLike<number>, want: ArrayLike<number>, floor: number): number => {
  const den = Math.max(maxAbs(want), 1e-30);
  return (relError(x, want) * den) / Math.max(den, floor);
};

const inputsOf = (c: Case) => {
  const { batch, tq, tk, heads, kvHeads, headDim } = c.o;
  const nq = batch * tq * heads * headDim;
  const nk = batch * tk * kvHeads * headDim;
  return {
    q: values(nq, c.seed, 2),
    k: values(nk, c.seed + 1, 2),
    v: values(nk, c.seed + 2),
    dOut: values(nq, c.seed + 3),
  };
};

/** Forward and backward on one backend: [out, lse, dq, dk, dv]. */
const runCase = (b: BackendShape, c: Case, x: ReturnType<typeof inputsOf>) =>
  withOps(b, (ops: Ops) => {
    const { batch, tq, tk, heads, kvHeads, headDim } = c.o;
    const opts: AttentionOptions = c.starts
      ? { ...c.o, kvStart: ops.fromArray(c.starts, [batch], "i32") }
      : c.o;
    const q = ops.fromArray(x.q, [batch * tq, heads * headDim]);
    const k = ops.fromArray(x.k, [batch * tk, kvHeads * headDim]);
    const v = ops.fromArray(x.v, [batch * tk, kvHeads * headDim]);
    const dOut = ops.fromArray(x.dOut, [batch * tq, heads * headDim]);
    const { out, lse } = ops.attention(q, k, v, opts);
    const g = ops.attentionBackward(dOut, q, k, v, out, lse, opts);
    return ops.read([out, lse, g.dq, g.dk, g.dv]);
  });

const NAMES = ["out", "lse", "dq", "dk", "dv"];

/** Asserts got ≈ want for every result (floors: the natural scale of cancelling gradients). */
const assertClose = (
  got: FloatArray[],
  want: FloatArray[],
  x: ReturnType<typeof inputsOf>,
  at: string,
  tol: number,
) => {
  const dvScale = maxAbs(x.dOut);
  const dqkScale = dvScale * maxAbs(x.v) * Math.max(maxAbs(x.q), maxAbs(x.k));
  const floors = [0, 0, dqkScale, dqkScale, dvScale];
  got.forEach((g, i) => {
    assert(g.every(Number.isFinite), `${NAMES[i]}: not finite for ${at}`);
    const err = relErrorFloor(g, want[i], floors[i]);
    assert(err <= tol, `${NAMES[i]}: error ${err} for ${at}`);
  });
};

const HEADS: readonly (readonly [number, number])[] = [[1, 1], [2, 1], [4, 2], [3, 3], [9, 3]];

const caseArb: fc.Arbitrary<Case> = fc.record({
  batch: fc.integer({ min: 1, max: 3 }),
  tq: fc.integer({ min: 16, max: 41 }),
  extra: fc.integer({ min: 0, max: 21 }),
  hk: fc.constantFrom(...HEADS),
  headDim: fc.constantFrom(3, 4, 8, 16, 64, 80, 128, 256),
  offsetFrac: fc.option(fc.double({ min: 0, max: 1, noNaN: true }), { freq: 3 }),
  lenFrac: fc.option(fc.double({ min: 0.3, max: 1, noNaN: true }), { freq: 3 }),
  starts: fc.option(fc.array(fc.integer({ min: -1, max: 9 }), { minLength: 3, maxLength: 3 }), {
    freq: 2,
  }),
  window: fc.option(fc.integer({ min: 1, max: 20 }), { freq: 3 }),
  softcap: fc.option(fc.constantFrom(0.5, 2, 30), { freq: 3 }),
  scale: fc.option(fc.constantFrom(0.05, 0.3), { freq: 4 }),
  seed: fc.integer({ min: 1, max: 2 ** 30 }),
}).map((r): Case => {
  const tq = r.tq;
  const tk = tq + r.extra;
  const qOffset = r.offsetFrac === null ? tk - tq : Math.floor(r.offsetFrac * (tk - tq));
  const kvLen = r.lenFrac === null ? undefined : Math.round(r.lenFrac * tk);
  return {
    o: {
      batch: r.batch,
      tq,
      tk,
      heads: r.hk[0],
      kvHeads: r.hk[1],
      headDim: r.headDim,
      qOffset,
      ...(kvLen === undefined ? {} : { kvLen }),
      ...(r.window === null ? {} : { window: r.window }),
      ...(r.softcap === null ? {} : { softcap: r.softcap }),
      ...(r.scale === null ? {} : { scale: r.scale }),
    },
    starts: r.starts ? r.starts.slice(0, r.batch) : null,
    seed: r.seed,
  };
});

Deno.test({
  name: "webgpu: the attention product path matches the CPU reference (random geometry)",
  ignore: !hasGpu,
  fn: () =>
    fc.assert(
      fc.asyncProperty(caseArb, async (c) => {
        const x = inputsOf(c);
        const want = await runCase(cpu, c, x);
        // default: the forward's online-softmax kernel, the backward's products
        const before = { ...attentionPathCounts };
        const mixed = await runCase(gpu!, c, x);
        assert(attentionPathCounts.forward === before.forward);
        assert(attentionPathCounts.backward === before.backward + 1);
        assertClose(mixed, want, x, JSON.stringify(c), 2e-5);
        // products both ways
        attentionTuning.products = true;
        const got = await runCase(gpu!, c, x).finally(() => delete attentionTuning.products);
        assert(attentionPathCounts.forward === before.forward + 1);
        assert(attentionPathCounts.backward === before.backward + 2);
        assertClose(got, want, x, JSON.stringify(c), 2e-5);
      }),
      { numRuns: 40 },
    ),
});

Deno.test({
  name: "webgpu: SmolLM2-135M training shape: product path = online-softmax kernels = CPU",
  ignore: !hasGpu,
  fn: async () => {
    const c: Case = {
      o: { batch: 2, tq: 128, tk: 128, heads: 9, kvHeads: 3, headDim: 64 },
      starts: [0, 37],
      seed: 11,
    };
    const x = inputsOf(c);
    const want = await runCase(cpu, c, x);
    const before = { ...attentionPathCounts };
    const mixed = await runCase(gpu!, c, x);
    attentionTuning.products = true;
    const products = await runCase(gpu!, c, x).finally(() => delete attentionTuning.products);
    attentionTuning.products = false;
    const kernels = await runCase(gpu!, c, x).finally(() => delete attentionTuning.products);
    assert(attentionPathCounts.forward === before.forward + 1);
    assert(attentionPathCounts.backward === before.backward + 2);
    assertClose(mixed, want, x, "default", 2e-5);
    assertClose(products, want, x, "products", 2e-5);
    assertClose(kernels, want, x, "kernels", 2e-5);
  },
});

Deno.test({
  name:
    "webgpu: the product path never reads stale or next-sequence rows (NaN left in the staging textures, inf next door)",
  ignore: !hasGpu,
  fn: async () => {
    // a call whose operands are all NaN leaves NaN in the shared staging textures
    const big: Case = {
      o: { batch: 2, tq: 24, tk: 24, heads: 2, kvHeads: 1, headDim: 8 },
      starts: null,
      seed: 3,
    };
    const nan = inputsOf(big);
    for (const a of [nan.q, nan.k, nan.v, nan.dOut]) a.fill(NaN);
    await runCase(gpu!, big, nan);
    // rows of 19: products reach past each sequence's last row into stale texture rows
    const c: Case = {
      o: { batch: 1, tq: 19, tk: 19, heads: 2, kvHeads: 1, headDim: 8 },
      starts: null,
      seed: 5,
    };
    const x = inputsOf(c);
    assertClose(await runCase(gpu!, c, x), await runCase(cpu, c, x), x, "after NaN", 2e-5);
    // the second sequence's first rows hold inf: the first sequence's results stay exact
    const two: Case = { ...c, o: { ...c.o, batch: 2 } };
    const y = inputsOf(two);
    const [gpuOut, cpuOut] = [await runCase(gpu!, two, y), await runCase(cpu, two, y)];
    const w = inputsOf(two);
    const rowQ = 2 * 8;
    const rowK = 8;
    for (let r = 19; r < 23; r++) {
      w.v.fill(Infinity, r * rowK, (r + 1) * rowK);
      w.dOut.fill(Infinity, r * rowQ, (r + 1) * rowQ);
      w.q.fill(Infinity, r * rowQ, (r + 1) * rowQ);
    }
    const poisoned = await runCase(gpu!, two, w);
    const firstRows = [19 * rowQ, 19 * 2, 19 * rowQ, 19 * rowK, 19 * rowK];
    poisoned.forEach((got, i) => {
      const n = firstRows[i];
      assert(
        got.subarray(0, n).every((z, e) => z === gpuOut[i][e]),
        `${NAMES[i]}: the first sequence changed when the second held inf`,
      );
    });
    assertClose(gpuOut, cpuOut, y, "two sequences", 2e-5);
  },
});

Deno.test({
  name:
    "webgpu: a decoder's full-weight gradients through the product path match the CPU (seqLen 21, left padding)",
  ignore: !hasGpu,
  fn: async () => {
    const c = tinyConfig({ hiddenSize: 16, numHeads: 4, numKvHeads: 2, headDim: 4 });
    const weights = initWeights(c, 7, 0.4);
    const seqLen = 21;
    const rng = new Rng(9);
    const input = {
      ids: Array.from({ length: 2 * seqLen }, () => rng.int(c.vocabSize)),
      batch: 2,
      seqLen,
      kvStart: [0, 3],
    };
    const proj = Float64Array.from({ length: 2 * seqLen * c.vocabSize }, (_, i) => Math.sin(i));
    const grads = (b: BackendShape) =>
      withOps(b, (ops: Ops) =>
        Effect.gen(function* () {
          const model = uploadModel(ops, c, weights);
          const { logits, tape } = forward(ops, model, input, { train: true, rng: new Rng(1) });
          const g = backward(ops, tape!, ops.fromArray(proj, logits.shape), "full");
          const names = [...g.keys()].sort();
          return { names, values: yield* ops.read(names.map((n) => g.get(n)!)) };
        }));
    const want = await grads(cpu);
    const before = attentionPathCounts.backward;
    const got = await grads(gpu!);
    assert(attentionPathCounts.backward === before + c.numLayers);
    got.names.forEach((n, i) => {
      const err = relError(got.values[i], want.values[i]);
      assert(err < 1e-4, `${n}: relative error ${err}`);
    });
  },
});

gpuTeardown();
