/**
 * Per-request logits processing of the server, in vLLM v1's order (its `Sampler`
 * `apply_logits_processors`): allowed_token_ids (everything else -inf), bad_words, min_tokens
 * (stop tokens -inf) and logit_bias, then the penalties (repetition over prompt and output,
 * frequency and presence over the output). The model layer's sampler (src/model/sampling.ts)
 * stays unchanged for the trainer: this runs before it, on a copy of the row, and only when a
 * request asks for something (the raw row is used as it is otherwise).
 * @module
 */
import type { FloatArray } from "../backend/tensor.ts";

/** What a request asks of the logits. */
export interface LogitsRules {
  /** Sorted unique allowed ids, or null (all allowed). */
  readonly allowed: Int32Array | null;
  /** logit_bias as [id, bias] (bias clamped to [-100, 100] like vLLM). */
  readonly bias: ReadonlyArray<readonly [number, number]>;
  /** Token sequences of bad_words (vLLM bans the last token once the rest was generated). */
  readonly badWords: ReadonlyArray<readonly number[]>;
  readonly presence: number;
  readonly frequency: number;
  readonly repetition: number;
}

/** Rules that change nothing. */
export const NO_RULES: LogitsRules = {
  allowed: null,
  bias: [],
  badWords: [],
  presence: 0,
  frequency: 0,
  repetition: 1,
};

/** Whether `r` changes any logits. */
export const hasRules = (r: LogitsRules): boolean =>
  r.allowed !== null || r.bias.length > 0 || r.badWords.length > 0 || r.presence !== 0 ||
  r.frequency !== 0 || r.repetition !== 1;

/**
 * The processed row: `raw` itself when nothing applies, else a fresh Float64Array. `banned` are
 * the min_tokens bans (stop tokens while fewer than min_tokens were generated).
 */
export const applyLogitsRules = (
  raw: FloatArray,
  r: LogitsRules,
  promptIds: readonly number[],
  output: readonly number[],
  banned: readonly number[],
): ArrayLike<number> => {
  const V = raw.length;
  const inV = (t: number) => t >= 0 && t < V;
  if (!hasRules(r) && !banned.some(inV)) return raw;
  const w = Float64Array.from(raw);
  if (r.allowed !== null) {
    const keep = new Float64Array(V).fill(-Infinity);
    for (const t of r.allowed) if (inV(t)) keep[t] = w[t];
    w.set(keep);
  }
  for (const seq of r.badWords) {
    const last = seq[seq.length - 1];
    if (!inV(last)) continue;
    const k = seq.length - 1;
    if (k > output.length) continue;
    let match = true;
    for (let i = 0; i < k && match; i++) match = output[output.length - k + i] === seq[i];
    if (match) w[last] = -Infinity;
  }
  for (const t of banned) if (inV(t)) w[t] = -Infinity;
  for (const [t, b] of r.bias) if (inV(t)) w[t] += b;
  if (r.presence !== 0 || r.frequency !== 0 || r.repetition !== 1) {
    const counts = new Map<number, number>();
    for (const t of output) counts.set(t, (counts.get(t) ?? 0) + 1);
    if (r.repetition !== 1) {
      const seen = new Set<number>(promptIds);
      for (const t of counts.keys()) seen.add(t);
      for (const t of seen) {
        if (!inV(t)) continue;
        w[t] = w[t] > 0 ? w[t] / r.repetition : w[t] * r.repetition;
      }
    }
    for (const [t, c] of counts) {
      if (!inV(t)) continue;
      w[t] -= r.frequency * c + r.presence;
    }
  }
  return w;
};
