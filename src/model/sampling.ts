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

/** Tokens top-k keeps of a `vocab` row: `topK` where it cuts (0 < topK < vocab), else all. */
export const topKKept = (topK: number, vocab: number): number =>
  topK > 0 && topK < vocab ? topK : vocab;

/** Whether top-k or top-p removes any token of a `vocab` row. */
export const filtersRow = (p: Pick<SamplingParams, "topK" | "topP">, vocab: number): boolean =>
  topKKept(p.topK, vocab) < vocab || p.topP < 1;

/** Most likely first, ties by lower id: the order every sampling decision walks. */
const byLikelihood = (lp: ArrayLike<number>) => (a: number, b: number): number =>
  lp[b] - lp[a] || a - b;

/** The `m`-th largest of `values` (1-based; NaN-free), by quickselect on a copy: O(n) expected. */
const largest = (values: ArrayLike<number>, m: number): number => {
  const a = Float64Array.from(values);
  let lo = 0;
  let hi = a.length - 1;
  const want = m - 1; // index in descending order
  while (lo < hi) {
    const pivot = a[(lo + hi) >>> 1];
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (a[i] > pivot) i++;
      while (a[j] < pivot) j--;
      if (i <= j) {
        const t = a[i];
        a[i] = a[j];
        a[j] = t;
        i++;
        j--;
      }
    }
    if (want <= j) hi = j;
    else if (want >= i) lo = i;
    else return a[want];
  }
  return a[want];
};

/**
 * The first `m` tokens of the whole row's order (most likely first, ties by id), without sorting
 * the row: the tokens at least as likely as the m-th largest, in id order, then sorted. A
 * SmolLM2-sized row (49,152) sorted whole took ~20 ms; a short prefix is O(vocab).
 */
export const topOrder = (lp: ArrayLike<number>, m: number): Int32Array => {
  const n = lp.length;
  const cmp = byLikelihood(lp);
  if (m <= 0) return new Int32Array(0);
  if (m * 4 >= n) return orderAll(lp).subarray(0, Math.min(m, n));
  const t = largest(lp, m);
  let count = 0;
  for (let i = 0; i < n; i++) if (lp[i] >= t) count++;
  if (count < m) return orderAll(lp).subarray(0, m); // NaN in the row: order it whole
  const kept = new Int32Array(count);
  for (let i = 0, c = 0; i < n; i++) if (lp[i] >= t) kept[c++] = i;
  return kept.sort(cmp).subarray(0, m);
};

/**
 * The whole row's order. A stable LSD radix sort of the indices (id order to start with, so
 * ties stay by id) on the bits of -lp mapped to unsigned order: eight 8-bit passes. On a 49,152
 * row it took ~2 ms where a sort with the comparator took ~14 (Int32Array) or ~21 ms (Array).
 * Rows with a NaN take the comparator sort (a NaN has no place in the order).
 */
const orderAll = (lp: ArrayLike<number>): Int32Array => {
  const n = lp.length;
  let ids = new Int32Array(n);
  for (let i = 0; i < n; i++) ids[i] = i;
  const key = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const v = lp[i];
    if (v !== v) return ids.sort(byLikelihood(lp));
    key[i] = 0 - v; // -lp, with -0 made +0 (the comparator ties them)
  }
  const words = new Uint32Array(key.buffer); // little-endian: [lo, hi] per key
  for (let i = 0; i < n; i++) {
    // IEEE order to unsigned order: negatives all bits flipped, positives the sign bit
    const hi = words[2 * i + 1];
    if (hi & 0x80000000) {
      words[2 * i + 1] = ~hi >>> 0;
      words[2 * i] = ~words[2 * i] >>> 0;
    } else words[2 * i + 1] = (hi | 0x80000000) >>> 0;
  }
  let next = new Int32Array(n);
  const counts = new Uint32Array(256);
  for (let pass = 0; pass < 8; pass++) {
    const word = pass < 4 ? 0 : 1;
    const shift = (pass & 3) * 8;
    counts.fill(0);
    for (let i = 0; i < n; i++) counts[(words[2 * ids[i] + word] >>> shift) & 255]++;
    if (counts.some((c) => c === n)) continue; // every key has this byte: the pass is a no-op
    for (let b = 0, sum = 0; b < 256; b++) {
      const c = counts[b];
      counts[b] = sum;
      sum += c;
    }
    for (let i = 0; i < n; i++) {
      const id = ids[i];
      next[counts[(words[2 * id + word] >>> shift) & 255]++] = id;
    }
    [ids, next] = [next, ids];
  }
  return ids;
};

/** Prefix lengths tried in turn when how many tokens a decision needs is not known up front. */
const prefixLengths = (limit: number): number[] => limit > 256 ? [256, limit] : [limit];

/**
 * Tokens that survive top-k then top-p on a tempered log-distribution, most likely first (ties
 * by id). Top-p keeps the smallest prefix whose mass reaches topP (at least one token). Only
 * the prefix the cut needs is ordered (see `topOrder`), growing until the cut falls within it.
 */
export const keptTokens = (
  lp: ArrayLike<number>,
  p: Pick<SamplingParams, "topK" | "topP">,
): number[] => {
  const k = topKKept(p.topK, lp.length);
  if (!(p.topP < 1)) return Array.from(topOrder(lp, k));
  for (const m of prefixLengths(k)) {
    const order = topOrder(lp, m);
    let mass = 0;
    let keep = 0;
    while (keep < order.length && (keep === 0 || mass < p.topP)) {
      mass += Math.exp(lp[order[keep++]]);
    }
    // the cut fell inside this prefix, or the prefix is all top-k keeps
    if (keep < order.length || !(mass < p.topP) || m === k) {
      return Array.from(order.subarray(0, keep));
    }
  }
  throw new Error("unreachable: the last prefix length is k");
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
  if (filtersRow(p, lp.length)) {
    const order = keptTokens(lp, p);
    let total = 0;
    for (const i of order) total += Math.exp(lp[i]);
    const token = walk(lp, order, u0 * total) ?? order[order.length - 1];
    return { token, rawLogprob: raw[token], processedLogprob: lp[token] - Math.log(total) };
  }
  // the whole vocabulary is kept: its mass is summed in id order, and the walk orders only the
  // prefix it reaches (most draws of a peaked row end in its first few tokens)
  let total = 0;
  for (let i = 0; i < lp.length; i++) total += Math.exp(lp[i]);
  let token = -1;
  for (const m of prefixLengths(lp.length)) {
    const order = topOrder(lp, m);
    const hit = walk(lp, order, u0 * total);
    if (hit !== null || m === lp.length) {
      token = hit ?? order[order.length - 1];
      break;
    }
  }
  return { token, rawLogprob: raw[token], processedLogprob: lp[token] - Math.log(total) };
};

/** The token where the running mass of `order` reaches `target`, or null when it never does. */
const walk = (lp: ArrayLike<number>, order: ArrayLike<number>, target: number): number | null => {
  let u = target;
  for (let j = 0; j < order.length; j++) {
    u -= Math.exp(lp[order[j]]);
    if (u <= 0) return order[j];
  }
  return null;
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
  const k = topKKept(p.topK, c.vocab);
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
