/**
 * Batched incremental generation with a KV cache: left-padded prompts are prefilled at once,
 * then one token per sequence per step. The logits stay on the device: per step the host reads
 * only each row's sampling candidates (`Ops.sampleCandidates`, O(batch) values) and finishes
 * the choice from them (`sampleFromCandidates`, the same token as `sampleToken` for the same
 * uniform); a row whose choice the candidates cannot prove (it lies in the tail of a flat
 * distribution, or within rounding of a threshold) is read whole, in a second wait that step.
 * @module
 */
import { Effect } from "effect";
import type { BackendShape } from "../backend/backend.ts";
import type { BackendError, BackendInfo } from "../backend/ops.ts";
import { type DeviceModel, forwardCached, type LoraRuntime, makeKvCache } from "./decoder.ts";
import { Rng } from "./rng.ts";
import {
  candidateRow,
  drawUniform,
  type Sample,
  sampleFromCandidates,
  sampleTokenWith,
  type SamplingParams,
} from "./sampling.ts";

/**
 * Most candidates per row a decode step reads back: 1 for an all-greedy batch, else 16 or the
 * largest top-k up to this (fewer merge rounds in the kernel; a row they cannot decide is read).
 */
export const SAMPLE_CANDIDATES = 64;

let forcedSampling: boolean | undefined;

/**
 * Batches from this many rows sample on the device on a software adapter too: the host path's
 * read-back and per-row softmax grow with rows x vocabulary. SmolLM2-135M decode step on
 * llvmpipe (Intel Xeon, 2 cores), device vs host, mean of two alternating pairs: batch 16 224
 * vs 260 ms, 32 352 vs 376, 64 583 vs 620.
 */
export const SOFTWARE_DEVICE_SAMPLING_ROWS = 16;

/**
 * Forces sampling on the device (true) or on the host from the read-back logits (false);
 * `undefined` restores the default: the device, except for a batch of fewer than
 * SOFTWARE_DEVICE_SAMPLING_ROWS rows on a software adapter (llvmpipe), where the candidate
 * kernel's barriers cost about what reading the logits does (the report of issue 11 item 4
 * measured the host faster there). Tests and benchmarks set it.
 */
export const setDeviceSampling = (on: boolean | undefined): void => {
  forcedSampling = on;
};

/** Whether a decode step of `rows` rows samples on the device (see setDeviceSampling). */
export const samplesOnDevice = (info: BackendInfo, rows: number): boolean =>
  forcedSampling ?? (!info.fallback || rows >= SOFTWARE_DEVICE_SAMPLING_ROWS);

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
    const V = model.config.vocabSize;
    // greedy needs the best only; sampling a kept set within the candidates decides at once
    const sampling = requests.filter((r) => r.temperature > 0);
    const count = Math.min(
      V,
      sampling.length === 0 ? 1 : Math.min(
        SAMPLE_CANDIDATES,
        Math.max(16, ...sampling.map((r) => r.topK > 0 ? r.topK : 0)),
      ),
    );
    const temps = requests.map((r) => r.temperature);
    // One scope per step: its activations go back to the pool before the next step. Returns
    // the sample of every live row (null for finished ones).
    const step = (tokens: ArrayLike<number>, tq: number) =>
      Effect.scoped(Effect.gen(function* () {
        const sops = yield* backend.ops;
        const logits = forwardCached(sops, model, cache, tokens, tq, pad, lora);
        if (!samplesOnDevice(sops.info, B)) {
          const host = (yield* sops.read([logits]))[0];
          return requests.map((r, b) =>
            done[b]
              ? null
              : sampleTokenWith(host.subarray(b * V, (b + 1) * V), r, drawUniform(r, rngs[b]))
          );
        }
        const cand = (yield* sops.read([sops.sampleCandidates(logits, temps, count)]))[0];
        const samples: (Sample | null)[] = new Array(B).fill(null);
        const us: number[] = new Array(B).fill(NaN);
        const rest: number[] = [];
        for (let b = 0; b < B; b++) {
          if (done[b]) continue;
          us[b] = drawUniform(requests[b], rngs[b]);
          samples[b] = sampleFromCandidates(candidateRow(cand, b, count, V), requests[b], us[b]);
          if (samples[b] === null) rest.push(b);
        }
        if (rest.length > 0) {
          const rows = yield* sops.read(rest.map((b) => sops.sliceRows(logits, b, 1)));
          rest.forEach((b, i) => samples[b] = sampleTokenWith(rows[i], requests[b], us[b]));
        }
        return samples;
      }));
    let samples = yield* step(ids, P);
    for (let t = 0; t < maxNew; t++) {
      const next = new Int32Array(B);
      for (let b = 0; b < B; b++) {
        if (done[b]) continue;
        const r = requests[b];
        const s = samples[b]!;
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
      samples = yield* step(next, 1);
    }
    return out;
  },
  Effect.scoped,
);
