/**
 * Sliding-window attention (AttentionOptions.window, HF's sliding mask: query i sees keys
 * j > i - window), a score scale and Gemma 2's logit soft-capping (cap · tanh(s / cap)): the
 * CPU reference against a naive float64 masked softmax, and WebGPU against
 * the CPU reference over random geometry (KV-cache offsets, left padding, every tile size and
 * forced key-range splits), forward and backward.
 */
import { ok as assert, throws } from "node:assert/strict";
import { Effect } from "effect";
import fc from "fast-check";
import type { BackendShape } from "../src/backend/backend.ts";
import type { AttentionOptions, Ops } from "../src/backend/ops.ts";
import { attentionTuning } from "../src/backend/webgpu/attention.ts";
import {
  gpuTeardown,
  hasGpu,
  relError,
  seededValues,
  testBackends,
  withOps,
} from "./support/backends.ts";

const { gpu, cpu, ref } = await testBackends();

interface Case {
  readonly o: Omit<AttentionOptions, "kvStart">;
  readonly starts: readonly number[];
  readonly seed: number;
}

const values = (n: number, seed: number): Float64Array =>
  Float64Array.from(seededValues(n, seed), (x) => Math.fround(x));

/** Out, lse and the three gradients of one case on a backend. */
const runCase = (b: BackendShape, c: Case) =>
  withOps(b, (ops: Ops) =>
    Effect.gen(function* () {
      const { batch, tq, tk, heads, kvHeads, headDim } = c.o;
      const q = ops.fromArray(values(batch * tq * heads * headDim, c.seed), [
        batch * tq,
        heads * headDim,
      ]);
      const k = ops.fromArray(values(batch * tk * kvHeads * headDim, c.seed + 1), [
        batch * tk,
        kvHeads * headDim,
      ]);
      const v = ops.fromArray(values(batch * tk * kvHeads * headDim, c.seed + 2), [
        batch * tk,
        kvHeads * headDim,
      ]);
      const dOut = ops.fromArray(values(batch * tq * heads * headDim, c.seed + 3), q.shape);
      const opts: AttentionOptions = { ...c.o, kvStart: ops.fromArray(c.starts, [batch], "i32") };
      const { out, lse } = ops.attention(q, k, v, opts);
      const g = ops.attentionBackward(dOut, q, k, v, out, lse, opts);
      const [o, l, dq, dk, dv] = yield* ops.read([out, lse, g.dq, g.dk, g.dv]);
      return { o, l, dq, dk, dv };
    }));

/** Naive float64 masked attention (out only): the definition of the window. */
const naive = (c: Case): Float64Array => {
  const { batch, tq, tk, heads, kvHeads, headDim: hd, window, softcap } = c.o;
  const scale = c.o.scale ?? 1 / Math.sqrt(hd);
  const qOffset = c.o.qOffset ?? 0;
  const kvLen = c.o.kvLen ?? tk;
  const q = values(batch * tq * heads * hd, c.seed);
  const k = values(batch * tk * kvHeads * hd, c.seed + 1);
  const v = values(batch * tk * kvHeads * hd, c.seed + 2);
  const out = new Float64Array(q.length);
  for (let b = 0; b < batch; b++) {
    for (let i = 0; i < tq; i++) {
      for (let h = 0; h < heads; h++) {
        const g = Math.floor(h / (heads / kvHeads));
        const at = qOffset + i;
        const keys: number[] = [];
        for (let j = c.starts[b]; j <= at && j < kvLen; j++) {
          if (window === undefined || at - j < window) keys.push(j);
        }
        if (keys.length === 0) continue;
        const qo = ((b * tq + i) * heads + h) * hd;
        const s = keys.map((j) => {
          let d = 0;
          for (let x = 0; x < hd; x++) d += q[qo + x] * k[((b * tk + j) * kvHeads + g) * hd + x];
          return softcap ? softcap * Math.tanh((d * scale) / softcap) : d * scale;
        });
        const m = Math.max(...s);
        const p = s.map((z) => Math.exp(z - m));
        const z = p.reduce((a, b) => a + b, 0);
        keys.forEach((j, n) => {
          for (let x = 0; x < hd; x++) {
            out[qo + x] += (p[n] / z) * v[((b * tk + j) * kvHeads + g) * hd + x];
          }
        });
      }
    }
  }
  return out;
};

const caseArb = fc.record({
  batch: fc.integer({ min: 1, max: 2 }),
  tq: fc.integer({ min: 1, max: 7 }),
  extra: fc.integer({ min: 0, max: 6 }),
  kvHeads: fc.integer({ min: 1, max: 2 }),
  group: fc.integer({ min: 1, max: 3 }),
  headDim: fc.constantFrom(4, 6, 8),
  window: fc.integer({ min: 1, max: 6 }),
  pad: fc.integer({ min: 0, max: 3 }),
  seed: fc.integer({ min: 1, max: 1000 }),
  scale: fc.constantFrom(undefined, 0.3),
  softcap: fc.constantFrom(undefined, 0.5, 2),
  windowed: fc.boolean(),
}).map((r): Case => {
  const tk = r.tq + r.extra;
  return {
    o: {
      batch: r.batch,
      tq: r.tq,
      tk,
      heads: r.kvHeads * r.group,
      kvHeads: r.kvHeads,
      headDim: r.headDim,
      qOffset: r.extra,
      kvLen: tk,
      ...(r.windowed ? { window: r.window } : {}),
      ...(r.scale ? { scale: r.scale } : {}),
      ...(r.softcap ? { softcap: r.softcap } : {}),
    },
    starts: Array.from({ length: r.batch }, (_, b) => Math.min(b * r.pad, tk - 1)),
    seed: r.seed,
  };
});

Deno.test("cpu: windowed, scaled, soft-capped attention matches a naive float64 masked softmax", async () => {
  await fc.assert(
    fc.asyncProperty(caseArb, async (c) => {
      for (const b of [ref, cpu]) {
        const err = relError((await runCase(b, c)).o, naive(c));
        assert(err < (b === ref ? 1e-12 : 1e-5), `${b.info.name}: ${err}`);
      }
    }),
    { numRuns: 40 },
  );
});

Deno.test("attention: a window, scale or cap that is not positive is a ShapeError", async () => {
  await withOps(cpu, (ops) => {
    const q = ops.zeros([2, 4]);
    const o = { batch: 1, tq: 2, tk: 2, heads: 1, kvHeads: 1, headDim: 4 };
    throws(() => ops.attention(q, q, q, { ...o, window: 0 }), /window/);
    throws(() => ops.attention(q, q, q, { ...o, window: 1.5 }), /window/);
    throws(() => ops.attention(q, q, q, { ...o, scale: -1 }), /scale/);
    throws(() => ops.attention(q, q, q, { ...o, softcap: 0 }), /softcap/);
  });
});

Deno.test({
  name:
    "webgpu: windowed, scaled, soft-capped attention and its gradients match the CPU reference (all tiles, splits)",
  ignore: !hasGpu,
  fn: async () => {
    await fc.assert(
      fc.asyncProperty(
        caseArb,
        fc.constantFrom(1, 2, 4),
        fc.constantFrom(undefined, 1, 2, 3),
        async (c, tile, splitLen) => {
          Object.assign(attentionTuning, { tile, splitLen });
          try {
            const [g, r] = [await runCase(gpu!, c), await runCase(ref, c)];
            for (const key of ["o", "l", "dq", "dk", "dv"] as const) {
              const err = relError(g[key], r[key]);
              assert(err < 2e-5, `${key}: relative error ${err} (tile ${tile}, split ${splitLen})`);
            }
          } finally {
            delete attentionTuning.tile;
            delete attentionTuning.splitLen;
          }
        },
      ),
      { numRuns: 40 },
    );
  },
});

Deno.test({
  name:
    "webgpu: head dims above 128 (Gemma's 256) run the wide kernels and match the CPU reference",
  ignore: !hasGpu,
  fn: async () => {
    // one head dim only: llvmpipe compiles these kernels slowly (minutes cold, cached after)
    for (const headDim of [256]) {
      for (const splitLen of [undefined, 2]) {
        const c: Case = {
          o: {
            batch: 2,
            tq: 3,
            tk: 5,
            heads: 2,
            kvHeads: 1,
            headDim,
            qOffset: 2,
            window: 3,
            softcap: 2,
          },
          starts: [0, 1],
          seed: headDim,
        };
        Object.assign(attentionTuning, { splitLen });
        try {
          const [g, r] = [await runCase(gpu!, c), await runCase(ref, c)];
          for (const key of ["o", "l", "dq", "dk", "dv"] as const) {
            const err = relError(g[key], r[key]);
            assert(err < 2e-5, `headDim ${headDim} ${key}: relative error ${err}`);
          }
        } finally {
          delete attentionTuning.splitLen;
        }
      }
    }
  },
});

gpuTeardown();
