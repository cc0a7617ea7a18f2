/**
 * The host sampler's definition, written out plainly: sort the whole row most likely first (ties
 * by lower id), cut top-k then top-p, and walk the kept set's mass in that order. The oracle of
 * tests/sampling_order_test.ts and the baseline of bench/sampling.ts; src/model/sampling.ts
 * computes the same while ordering only what a decision needs.
 */
import { logSoftmax, type SamplingParams } from "../../src/model/sampling.ts";

/** The tokens top-k then top-p keep, most likely first, by sorting the whole row. */
export const keptByDefinition = (
  lp: ArrayLike<number>,
  p: Omit<SamplingParams, "temperature">,
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

/** The token a uniform `u0` draws (temperature > 0), and its processed logprob. */
export const sampleByDefinition = (logits: ArrayLike<number>, p: SamplingParams, u0: number) => {
  const lp = logSoftmax(logits, p.temperature);
  const order = keptByDefinition(lp, p);
  let total = 0;
  for (const i of order) total += Math.exp(lp[i]);
  let u = u0 * total;
  let token = order[order.length - 1];
  for (const i of order) {
    u -= Math.exp(lp[i]);
    if (u <= 0) {
      token = i;
      break;
    }
  }
  return { token, processedLogprob: lp[token] - Math.log(total) };
};
