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
export const sampleToken = (logits: ArrayLike<number>, p: SamplingParams, rng: Rng): Sample =>
  sampleTokenWith(logits, p, drawUniform(p, rng));

/**
 * The uniform a sampling step consumes: one `rng.next()` when the temperature is positive (the
 * step samples), none when greedy (NaN). Drawn before the device or the host picks the token,
 * so both paths see the same number and the stream advances the same way.
 */
export const drawUniform = (p: Pick<SamplingParams, "temperature">, rng: Rng): number =>
  p.temperature > 0 ? rng.next() : NaN;

/** `sampleToken` with its uniform `u` (from `drawUniform`) given. */
export const sampleTokenWith = (
  logits: ArrayLike<number>,
  p: SamplingParams,
  u0: number,
): Sample => {
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
  let u = u0 * total;
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

/**
 * One row of `Ops.sampleCandidates` (src/backend/ops.ts): the row max, the two exp-sums, and the
 * `n` largest logits with their ids (value descending, ties by lower id).
 */
export interface CandidateRow {
  /** Vocabulary size of the row. */
  readonly vocab: number;
  readonly max: number;
  /** Σ exp(x − max). */
  readonly s1: number;
  /** Σ exp((x − max) / T) at the row's temperature. */
  readonly sT: number;
  readonly values: ArrayLike<number>;
  readonly ids: ArrayLike<number>;
}

/** Row `b` of a host copy of `Ops.sampleCandidates`' output with `count` candidates. */
export const candidateRow = (
  host: ArrayLike<number>,
  b: number,
  count: number,
  vocab: number,
): CandidateRow => {
  const w = 4 + 2 * count;
  const o = b * w;
  const n = host[o + 3];
  const values = new Float64Array(n);
  const ids = new Int32Array(n);
  for (let c = 0; c < n; c++) {
    values[c] = host[o + 4 + c];
    ids[c] = host[o + 4 + count + c];
  }
  return { vocab, max: host[o], s1: host[o + 1], sT: host[o + 2], values, ids };
};

/**
 * Relative error allowed on the device's exp-sums (f32, compensated): a decision closer than
 * this to a threshold is left to the host path. Far above the observed error (~1e-7).
 */
const SUM_MARGIN = 1e-5;
/** Relative margin of decisions where the sums cancel (ratios of the candidates' own exps). */
const RATIO_MARGIN = 1e-11;

/**
 * `sampleTokenWith` from a row's candidates instead of the row: returns the same token for the
 * same `u` (and logprobs within ~1e-6: the sums are the device's f32), or null when the
 * candidates cannot prove it (the choice lies beyond them, or within a rounding margin of a
 * threshold): the caller then reads that row and runs `sampleTokenWith` on it.
 *
 * Why it is the same token: `sampleTokenWith` walks the tokens most likely first (ties by id),
 * which are the candidates in their order; its probabilities are exp(x/T − lse) in float64 and
 * ours differ from them by one common factor exp(lse − lse'), within SUM_MARGIN. A cut (top-p
 * mass) or a draw against the whole vocabulary's mass is decided here only when it is further
 * than that from the threshold; a draw within a kept set held by the candidates compares ratios
 * of the same exps, in which the factor cancels.
 */
export const sampleFromCandidates = (
  c: CandidateRow,
  p: SamplingParams,
  u: number,
): Sample | null => {
  const n = c.values.length;
  if (n === 0) return null;
  const lse1 = c.max + Math.log(c.s1);
  if (p.temperature <= 0) {
    return { token: c.ids[0], rawLogprob: c.values[0] - lse1, processedLogprob: 0 };
  }
  const T = p.temperature;
  const lseT = c.max / T + Math.log(c.sT);
  const complete = n === c.vocab;
  const lp = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    lp[i] = c.values[i] / T - lseT;
    // distinct logits whose tempered log-probs nearly tie: the host's order may differ
    if (i > 0 && c.values[i] !== c.values[i - 1] && lp[i - 1] - lp[i] < 1e-12) return null;
  }
  const k = p.topK > 0 && p.topK < c.vocab ? p.topK : c.vocab;
  let keep = Math.min(k, n);
  // the kept set is a prefix of the candidates when k fits them or the top-p cut falls in them
  let held = k <= n;
  if (p.topP < 1) {
    let mass = 0;
    let i = 0;
    let cut = false;
    while (i < keep) {
      if (i > 0) {
        if (Math.abs(mass - p.topP) <= SUM_MARGIN * p.topP) return null;
        if (!(mass < p.topP)) {
          cut = true;
          break;
        }
      }
      mass += Math.exp(lp[i++]);
    }
    if (!cut && !held) {
      // the loop ran off the candidates: decided only when the next step would stop it
      if (complete) held = true;
      else if (Math.abs(mass - p.topP) <= SUM_MARGIN * p.topP || mass < p.topP) return null;
      else held = true;
    }
    if (cut || held) keep = i;
    held = true;
  }
  if (held || complete) {
    let total = 0;
    for (let i = 0; i < keep; i++) total += Math.exp(lp[i]);
    const target = u * total;
    let rem = target;
    let token = keep - 1;
    for (let i = 0; i < keep; i++) {
      const e = Math.exp(lp[i]);
      if (Math.abs(rem - e) <= RATIO_MARGIN * total) return null;
      rem -= e;
      if (rem <= 0) {
        token = i;
        break;
      }
    }
    return {
      token: c.ids[token],
      rawLogprob: c.values[token] - lse1,
      processedLogprob: lp[token] - Math.log(total),
    };
  }
  // the whole vocabulary is kept (or a top-k beyond the candidates): its mass is 1 up to the
  // device's error, so a draw is decided here only when it falls well inside the candidates
  if (k < c.vocab) return null;
  let cum = 0;
  for (let i = 0; i < n; i++) {
    const e = Math.exp(lp[i]);
    if (cum + e > u * (1 + SUM_MARGIN) && cum < u * (1 - SUM_MARGIN)) {
      return { token: c.ids[i], rawLogprob: c.values[i] - lse1, processedLogprob: lp[i] };
    }
    if (cum + e >= u * (1 - SUM_MARGIN)) return null;
    cum += e;
  }
  return null;
};
