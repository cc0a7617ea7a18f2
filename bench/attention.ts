/**
 * Attention op timing (Ops.attention, Ops.attentionBackward) on the WebGPU backend at the
 * SmolLM2-135M shapes of bench/scale.ts: log-probs / training (batch 8 x 128 tokens, 9 heads,
 * 3 kv heads, head dim 64, causal) and KV-cached decoding (batch 64, one query row, a 96-row
 * cache holding 80 keys). Each shape runs three variants (VARIANTS) alternately in the same
 * process, so that the ratios are robust to other tenants of the shared host.
 *
 * Timing: a warm-up call per variant compiles the pipelines; then rounds of `reps` calls, each
 * in its own scope, one sync per round; median per-call time over the rounds.
 *
 * Run: deno run -A bench/attention.ts (writes bench/results/attention.json).
 * @module
 */
import { Effect, Exit, Scope } from "effect";
import { type BackendShape, webgpuBackend } from "../src/backend/backend.ts";
import type { AttentionOptions, Ops } from "../src/backend/ops.ts";
import type { Tensor } from "../src/backend/tensor.ts";
import { attentionTuning } from "../src/backend/webgpu/attention.ts";
import { median, randomFloats, writeResult } from "./common.ts";

interface Case {
  readonly key: string;
  readonly o: AttentionOptions;
  readonly backward: boolean;
  readonly reps: number;
}

const smol = { heads: 9, kvHeads: 3, headDim: 64 };
const train = { batch: 8, tq: 128, tk: 128, ...smol };
const decode = { batch: 64, tq: 1, tk: 96, qOffset: 79, kvLen: 80, ...smol };
const CASES: readonly Case[] = [
  { key: "fwd_b8_t128", o: train, backward: false, reps: 4 },
  { key: "bwd_b8_t128", o: train, backward: true, reps: 2 },
  { key: "decode_b64_k80", o: decode, backward: false, reps: 8 },
];

const scoped = <A>(b: BackendShape, f: (ops: Ops) => Promise<A>): Promise<A> =>
  Effect.runPromise(Effect.scoped(Effect.flatMap(b.ops, (ops) => Effect.promise(() => f(ops)))));

const sync = (b: BackendShape): Promise<void> => Effect.runPromise(b.sync);

interface Inputs {
  q: Tensor;
  k: Tensor;
  v: Tensor;
  dOut: Tensor;
  out: Tensor;
  lse: Tensor;
}

/** Encodes one call of the case (forward, or backward given the forward's out and lse). */
const call = (ops: Ops, c: Case, x: Inputs): void => {
  if (c.backward) ops.attentionBackward(x.dOut, x.q, x.k, x.v, x.out, x.lse, c.o);
  else ops.attention(x.q, x.k, x.v, c.o);
};

/**
 * The variants: the path the backend picks; the online-softmax kernels as the host runs them
 * without the product path (operands staged in textures in the forward, storage buffers in the
 * backward); those kernels reading storage buffers throughout (the path before).
 */
const VARIANTS = ["default", "kernels", "buffers"] as const;
type Variant = typeof VARIANTS[number];

const select = (v: Variant): void => {
  attentionTuning.products = v === "default" ? undefined : false;
  attentionTuning.buffers = v === "buffers" ? true : undefined;
};

/** Milliseconds per call of each variant, rounds alternating. */
const measure = async (b: BackendShape, c: Case): Promise<Record<Variant, number>> =>
  await scoped(b, async (ops) => {
    const { batch, tq, tk, heads, kvHeads, headDim } = c.o;
    const q = ops.fromArray(randomFloats(batch * tq * heads * headDim, 1), [
      batch * tq,
      heads * headDim,
    ]);
    const kv = [batch * tk, kvHeads * headDim];
    const k = ops.fromArray(randomFloats(kv[0] * kv[1], 2), kv);
    const v = ops.fromArray(randomFloats(kv[0] * kv[1], 3), kv);
    const dOut = ops.fromArray(randomFloats(batch * tq * heads * headDim, 4), q.shape);
    attentionTuning.buffers = true;
    const { out, lse } = ops.attention(q, k, v, c.o);
    const x = { q, k, v, dOut, out, lse };
    const times: Record<Variant, number[]> = { default: [], kernels: [], buffers: [] };
    for (let round = 0; round < 7; round++) {
      for (const variant of VARIANTS) {
        select(variant);
        const t = performance.now();
        for (let i = 0; i < c.reps; i++) {
          await scoped(b, (inner) => Promise.resolve(call(inner, c, x)));
        }
        await sync(b);
        // round 0 compiles the pipelines and allocates the textures: not timed
        if (round > 0) times[variant].push((performance.now() - t) / c.reps);
      }
    }
    select("default");
    return {
      default: median(times.default),
      kernels: median(times.kernels),
      buffers: median(times.buffers),
    };
  });

/**
 * Measures every case; returns `webgpu_attention_<case>_{after,kernels,before}_ms` (see
 * VARIANTS) and before / after.
 */
export async function run(): Promise<Record<string, number>> {
  const results: Record<string, number> = {};
  const gpuScope = Scope.makeUnsafe();
  const gpu = await Effect.runPromise(Scope.provide(gpuScope)(webgpuBackend));
  try {
    for (const c of CASES) {
      const t = await measure(gpu, c);
      const key = `webgpu_attention_${c.key}`;
      results[`${key}_after_ms`] = round(t.default);
      results[`${key}_kernels_ms`] = round(t.kernels);
      results[`${key}_before_ms`] = round(t.buffers);
      results[`${key}_speedup`] = round(t.buffers / t.default);
    }
    results.load_average_1min = round(Deno.loadavg()[0]);
  } finally {
    await Effect.runPromise(Scope.close(gpuScope, Exit.void));
  }
  return results;
}

const round = (x: number): number => Math.round(x * 100) / 100;

if (import.meta.main) {
  const results = await run();
  console.table(results);
  console.log(await writeResult("attention", results));
}
