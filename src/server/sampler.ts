/**
 * Per-step sampling for the server, on top of `sampleToken` (src/model/sampling.ts, the same
 * sampler the in-process engine uses, so seeded results agree): adds vLLM's min_p, samples from the
 * row the request's logits rules produced (logits_rules.ts: min_tokens, bias, penalties...), and
 * reports logprobs in vLLM's two modes with the top-k alternatives.
 *
 * - raw_logprobs (default): log_softmax of the model's logits, before any masking or temperature.
 * - processed_logprobs: log-probabilities of the distribution actually sampled from (after the
 *   min_tokens mask, temperature, min_p, top-k and top-p; filtered tokens are -inf). At
 *   temperature 0 (greedy) it is log_softmax of the masked logits, as in vLLM.
 * @module
 */
import type { FloatArray } from "../backend/tensor.ts";
import { SAMPLE_CANDIDATES } from "../model/generate.ts";
import {
  type CandidateRow,
  filtersRow,
  keptTokens,
  logSoftmax,
  sampleFromCandidates,
  sampleTokenWith,
  topKKept,
} from "../model/sampling.ts";

/** Logprobs mode of the server (vLLM's --logprobs-mode). */
export type LogprobsMode = "raw_logprobs" | "processed_logprobs";

/** Sampling parameters of one sequence. */
export interface StepParams {
  readonly temperature: number;
  readonly topP: number;
  /** 0 or -1 = off. */
  readonly topK: number;
  /** 0 = off. */
  readonly minP: number;
}

/** The result of one sampling step. */
export interface StepResult {
  readonly token: number;
  /** Logprob of the sampled token in the server's mode. */
  readonly logprob: number;
  /** The `topN` most likely tokens (mode's distribution), best first; null when not asked. */
  readonly top: ReadonlyArray<readonly [number, number]> | null;
}

/** The `n` largest entries of `lp` as [index, value], best first (ties: lower index first). */
export const topEntries = (lp: ArrayLike<number>, n: number): [number, number][] => {
  const out: [number, number][] = [];
  if (n <= 0) return out;
  for (let i = 0; i < lp.length; i++) {
    const v = lp[i];
    if (out.length === n && !(v > out[n - 1][1])) continue;
    let j = out.length < n ? out.length : n - 1;
    if (out.length < n) out.push([i, v]);
    else out[j] = [i, v];
    while (j > 0 && out[j - 1][1] < out[j][1]) {
      [out[j - 1], out[j]] = [out[j], out[j - 1]];
      j--;
    }
  }
  return out;
};

/** 1-based rank of entry `i` in `lp` (1 + number of strictly larger entries). */
export const rankOf = (lp: ArrayLike<number>, i: number): number => {
  const v = lp[i];
  let r = 1;
  for (let j = 0; j < lp.length; j++) if (lp[j] > v) r++;
  return r;
};

/**
 * The tempered, top-k/top-p filtered and renormalised log-distribution that `sampleToken`
 * samples from (same ordering and cut rules), with -Infinity for filtered tokens.
 */
export const processedLogprobs = (logits: ArrayLike<number>, p: StepParams): Float64Array => {
  const lp = logSoftmax(logits, p.temperature);
  if (!filtersRow(p, lp.length)) return lp;
  const order = keptTokens(lp, p);
  let total = 0;
  for (const i of order) total += Math.exp(lp[i]);
  const out = new Float64Array(lp.length).fill(-Infinity);
  const lt = Math.log(total);
  for (const i of order) out[i] = lp[i] - lt;
  return out;
};

/**
 * Samples one token from a row of logits. `processed` is the row after the request's logits
 * rules (logits_rules.ts: allowed ids, bad words, min_tokens bans, bias, penalties), or `row`
 * itself when none apply; `u` is the step's uniform (`drawUniform`); `topN` asks for that many
 * alternatives. Raw logprobs are always of `row` (vLLM computes them before any processing).
 */
export const sampleStep = (
  row: FloatArray,
  processed: ArrayLike<number>,
  p: StepParams,
  u: number,
  mode: LogprobsMode,
  topN: number | null,
): StepResult => {
  const V = row.length;
  let work: ArrayLike<number> = processed;
  let topK = p.topK;
  if (p.minP > 0 && p.temperature > 0) {
    const lpT = logSoftmax(work, p.temperature);
    let max = -Infinity;
    for (let i = 0; i < V; i++) max = Math.max(max, lpT[i]);
    const threshold = max + Math.log(p.minP);
    const w = Float64Array.from(work);
    let kept = 0;
    for (let i = 0; i < V; i++) {
      if (lpT[i] < threshold) w[i] = -Infinity;
      else kept++;
    }
    work = w;
    // the kept tokens are exactly the `kept` most likely: cap top-k so that no masked token
    // can be drawn through rounding at the tail of the cumulative sum
    topK = topK > 0 ? Math.min(topK, kept) : kept;
  }
  const s = sampleTokenWith(work, { temperature: p.temperature, topP: p.topP, topK }, u);
  if (mode === "raw_logprobs") {
    const raw = logSoftmax(row);
    return {
      token: s.token,
      logprob: raw[s.token],
      top: topN === null ? null : topEntries(raw, topN),
    };
  }
  if (p.temperature <= 0) {
    const lp = logSoftmax(work);
    return {
      token: s.token,
      logprob: lp[s.token],
      top: topN === null ? null : topEntries(lp, topN),
    };
  }
  const top = topN === null || topN === 0
    ? (topN === null ? null : [])
    : topEntries(processedLogprobs(work, { ...p, topK }), topN);
  return { token: s.token, logprob: s.processedLogprob, top };
};

/**
 * Candidates a step of a sequence needs to be sampled from its row's device candidates
 * (`Ops.sampleCandidates`), or null when only its whole row will do: its processed row is its
 * raw row (`unprocessed`: no logits rules, no min_tokens ban this step), min_p is off (it masks
 * by the tempered max over the whole row), a top-k beyond the candidates (of a `vocab` row)
 * comes with a top-p cut, and the alternatives asked fit the candidates and are
 * of the raw distribution (raw mode, or greedy, where the processed row is the raw one). Greedy
 * needs the best only; sampling 16 or its top-k (a kept set within them decides at once).
 */
export const candidatesNeeded = (
  p: StepParams,
  vocab: number,
  unprocessed: boolean,
  mode: LogprobsMode,
  topN: number | null,
): number | null => {
  if (!unprocessed) return null;
  const greedy = p.temperature <= 0;
  if (!greedy && p.minP > 0) return null;
  const kept = topKKept(p.topK, vocab);
  const topK = kept < vocab ? kept : 0; // k >= vocab keeps every token
  // a top-k beyond the candidates with no top-p cut among them is never decided by them
  if (!greedy && topK > SAMPLE_CANDIDATES && !(p.topP < 1)) return null;
  if (topN !== null && (topN > SAMPLE_CANDIDATES || (!greedy && mode !== "raw_logprobs"))) {
    return null;
  }
  const own = greedy ? 1 : Math.min(SAMPLE_CANDIDATES, Math.max(16, topK));
  return Math.max(own, topN ?? 0);
};

/** The first `n` candidates of a row (a step decides from what it asked for only). */
export const firstCandidates = (c: CandidateRow, n: number): CandidateRow =>
  n >= c.values.length ? c : {
    ...c,
    values: Array.from({ length: n }, (_, i) => c.values[i]),
    ids: Array.from({ length: n }, (_, i) => c.ids[i]),
  };

/**
 * `sampleStep` of an unprocessed row from its candidates, for a step `candidatesNeeded` allowed:
 * the same token for the same `u`, logprobs within the device sums' ~1e-6, or null when the
 * candidates cannot decide (the caller samples the read row then, with the same `u`). Top
 * alternatives are the candidates in their order (value descending, ties by lower id, as
 * `topEntries`).
 */
export const sampleStepFromCandidates = (
  c: CandidateRow,
  p: StepParams,
  u: number,
  mode: LogprobsMode,
  topN: number | null,
): StepResult | null => {
  if (topN !== null && topN > c.values.length) return null;
  const s = sampleFromCandidates(c, p, u);
  if (s === null) return null;
  const lse1 = c.max + Math.log(c.s1);
  const top = topN === null
    ? null
    : Array.from({ length: topN }, (_, i): [number, number] => [c.ids[i], c.values[i] - lse1]);
  // greedy: processed logprobs are of the (unprocessed) row itself, as in sampleStep
  const logprob = mode === "raw_logprobs" || p.temperature <= 0 ? s.rawLogprob : s.processedLogprob;
  return { token: s.token, logprob, top };
};
