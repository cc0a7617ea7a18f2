/**
 * Token sampling on the host from one row of logits, with vLLM's semantics: temperature 0 is
 * greedy; top-k then top-p filter the tempered distribution; logprobs are reported both raw
 * (log_softmax of the logits) and processed (of the distribution actually sampled).
 * @module
 */
import type { Rng } from "./rng.ts";

/** Sampling parameters of one sequence. */
export interface SamplingParams {
  readonly temperature: number;
  /** Nucleus mass in (0, 1]; 1 = off. */
  readonly topP: number;
  /** Keep the k most likely tokens; 0 or -1 = off. */
  readonly topK: number;
}

/** The chosen token and its log-probabilities. */
export interface Sample {
  readonly token: number;
  /** log_softmax(logits)[token]: vLLM's default "raw_logprobs". */
  readonly rawLogprob: number;
  /** Log-probability under the tempered, filtered distribution ("processed_logprobs"). */
  readonly processedLogprob: number;
}

/** log_softmax of a row. */
export const logSoftmax = (logits: ArrayLike<number>, temperature = 1): Float64Array => {
  const n = logits.length;
  let max = -Infinity;
  for (let i = 0; i < n; i++) max = Math.max(max, logits[i] / temperature);
  let sum = 0;
  for (let i = 0; i < n; i++) sum += Math.exp(logits[i] / temperature - max);
  const lse = max + Math.log(sum);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = logits[i] / temperature - lse;
  return out;
};

/**
 * Tokens that survive top-k then top-p on a tempered log-distribution, most likely first (ties
 * by id). Top-p keeps the smallest prefix whose mass reaches topP (at least one token).
 */
export const keptTokens = (
  lp: ArrayLike<number>,
  p: Pick<SamplingParams, "topK" | "topP">,
): number[] => {
  let order = Array.from({ length: lp.length }, (_, i) => i).sort((a, b) => lp[b] - lp[a] || a - b);
  if (p.topK > 0 && p.topK < order.length) order = order.slice(0, p.topK);
  if (p.topP < 1) {
    let mass = 0;
    let keep = 0;
    while (keep < order.length && (keep === 0 || mass < p.topP)) {
      mass += Math.exp(lp[order[keep++]]);
    }
    order = order.slice(0, keep);
  }
  return order;
};

/** Samples a token; `rng` is the sequence's own stream (seeded per request). */
export const sampleToken = (logits: ArrayLike<number>, p: SamplingParams, rng: Rng): Sample => {
  const raw = logSoftmax(logits);
  if (p.temperature <= 0) {
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
    return { token: best, rawLogprob: raw[best], processedLogprob: 0 };
  }
  const lp = logSoftmax(logits, p.temperature);
  const order = keptTokens(lp, p);
  let total = 0;
  for (const i of order) total += Math.exp(lp[i]);
  let u = rng.next() * total;
  let token = order[order.length - 1];
  for (const i of order) {
    u -= Math.exp(lp[i]);
    if (u <= 0) {
      token = i;
      break;
    }
  }
  return { token, rawLogprob: raw[token], processedLogprob: lp[token] - Math.log(total) };
};
