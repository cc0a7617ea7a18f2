/**
 * Batched incremental generation with a KV cache: left-padded prompts are prefilled at once,
 * then one token per sequence per step; the host waits once per step (the logits read).
 * @module
 */
import { Effect } from "effect";
import type { BackendShape } from "../backend/backend.ts";
import type { BackendError } from "../backend/ops.ts";
import { type DeviceModel, forwardCached, type LoraRuntime, makeKvCache } from "./decoder.ts";
import { Rng } from "./rng.ts";
import { sampleToken, type SamplingParams } from "./sampling.ts";

/** One generation request (vLLM's per-sequence semantics). */
export interface GenerationRequest extends SamplingParams {
  readonly prompt: readonly number[];
  readonly maxTokens: number;
  readonly stopTokenIds: readonly number[];
  /** Per-sequence seed; null draws one from the generator's fallback stream. */
  readonly seed: number | null;
}

/** A finished sequence. */
export interface Generation {
  readonly tokens: number[];
  readonly rawLogprobs: number[];
  readonly processedLogprobs: number[];
  readonly finishReason: "stop" | "length";
  /** The stop token id that ended the sequence, else null. */
  readonly stopReason: number | null;
}

/**
 * Generates completions for a batch of requests with one model (and optional LoRA). The KV cache
 * lives for the call; each step's temporaries are released when the step ends.
 */
export const generate: (
  backend: BackendShape,
  model: DeviceModel,
  requests: readonly GenerationRequest[],
  lora?: LoraRuntime | null,
  fallbackRng?: Rng,
) => Effect.Effect<Generation[], BackendError> = Effect.fn("generate")(
  function* (
    backend: BackendShape,
    model: DeviceModel,
    requests: readonly GenerationRequest[],
    lora: LoraRuntime | null = null,
    fallbackRng: Rng = new Rng(Date.now()),
  ) {
    const B = requests.length;
    if (B === 0) return [];
    const P = Math.max(...requests.map((r) => r.prompt.length));
    const maxNew = Math.max(...requests.map((r) => r.maxTokens));
    const pad = requests.map((r) => P - r.prompt.length);
    const ids = new Int32Array(B * P);
    requests.forEach((r, b) => ids.set(r.prompt, b * P + pad[b]));
    const rngs = requests.map((r) => new Rng(r.seed ?? fallbackRng.nextU32()));
    const out = requests.map((): Generation => ({
      tokens: [],
      rawLogprobs: [],
      processedLogprobs: [],
      finishReason: "length",
      stopReason: null,
    }));
    const done = requests.map((r) => r.maxTokens <= 0);
    if (maxNew <= 0) return out;
    const ops = yield* backend.ops;
    const cache = makeKvCache(ops, model.config, B, P + maxNew);
    // One scope per step: its activations go back to the pool before the next step.
    const step = (tokens: ArrayLike<number>, tq: number) =>
      Effect.scoped(Effect.gen(function* () {
        const sops = yield* backend.ops;
        const logits = forwardCached(sops, model, cache, tokens, tq, pad, lora);
        return (yield* sops.read([logits]))[0];
      }));
    let host = yield* step(ids, P);
    for (let t = 0; t < maxNew; t++) {
      const V = model.config.vocabSize;
      const next = new Int32Array(B);
      for (let b = 0; b < B; b++) {
        if (done[b]) continue;
        const r = requests[b];
        const s = sampleToken(host.subarray(b * V, (b + 1) * V), r, rngs[b]);
        const g = out[b];
        g.tokens.push(s.token);
        g.rawLogprobs.push(s.rawLogprob);
        g.processedLogprobs.push(s.processedLogprob);
        next[b] = s.token;
        if (r.stopTokenIds.includes(s.token)) {
          out[b] = { ...g, finishReason: "stop", stopReason: s.token };
          done[b] = true;
        } else if (g.tokens.length >= r.maxTokens) done[b] = true;
      }
      if (done.every((d) => d)) break;
      host = yield* step(next, 1);
    }
    return out;
  },
  Effect.scoped,
);
