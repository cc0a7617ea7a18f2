/**
 * One generated sequence and vLLM's stop rules: sampling the next token from a logits row
 * (min_tokens bans the stop tokens; the sampler in sampler.ts), then EOS, stop_token_ids, stop
 * strings (only text produced after min_tokens can match, with a look-back of the stop length)
 * and max_tokens, in that order. No device and no scheduling: the batch feeds logits rows in, the
 * scheduler retires sequences whose `done` is set.
 * @module
 */
import type { FloatArray } from "../backend/tensor.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import { checkStopStrings, type CompletionSpec, decodeIds, type SeqResult } from "./completion.ts";
import {
  candidatesNeeded,
  firstCandidates,
  type LogprobsMode,
  sampleStep,
  sampleStepFromCandidates,
  type StepResult,
} from "./sampler.ts";
import { applyLogitsRules, hasRules } from "./logits_rules.ts";
import { Rng } from "../model/rng.ts";
import { type CandidateRow, drawUniform } from "../model/sampling.ts";

/** Why a sequence ended. */
export type FinishReason = "stop" | "length" | "abort";

/** The generation state of one sequence (sample `j` of one prompt of a request). */
export interface SeqState {
  readonly spec: CompletionSpec;
  /** Its prompt's ids (repetition_penalty counts them). */
  readonly promptIds: readonly number[];
  /** Its own generator: seed + j for seeded requests (vLLM), so batching never changes it. */
  readonly rng: Rng;
  readonly tokens: number[];
  readonly logprobs: number[];
  readonly tops: (ReadonlyArray<readonly [number, number]> | null)[];
  done: boolean;
  finishReason: FinishReason;
  stopReason: number | string | null;
  stopText: string | null;
  stoppedByToken: boolean;
  /** Decoded text length at the previous stop-string check. */
  textLen: number;
}

/** A fresh sequence of `spec` drawing from `rng`. */
export const newSeq = (spec: CompletionSpec, rng: Rng, promptIds: readonly number[]): SeqState => ({
  spec,
  promptIds,
  rng,
  tokens: [],
  logprobs: [],
  tops: [],
  done: false,
  finishReason: "length",
  stopReason: null,
  stopText: null,
  stoppedByToken: false,
  textLen: 0,
});

/** Ends a sequence. */
export const finish = (
  s: SeqState,
  reason: FinishReason,
  stopReason: number | string | null = null,
): void => {
  s.done = true;
  s.finishReason = reason;
  s.stopReason = stopReason;
};

/**
 * Tokens the sequence may still feed to the model (each feed yields one more sample), at most:
 * the KV rows it may still need.
 */
export const remainingFeeds = (s: SeqState): number =>
  s.done ? 0 : Math.max(0, s.spec.maxTokens - s.tokens.length);

/** The ids min_tokens bans at this step of `s` (its stop ids and EOS while it is short). */
const bannedOf = (s: SeqState, tokenizer: Tokenizer): number[] => {
  const spec = s.spec;
  const stopIds = spec.eosId === null ? spec.stopTokenIds : [spec.eosId, ...spec.stopTokenIds];
  return s.tokens.length < spec.minTokens ? [...stopIds, tokenizer.eosId] : [];
};

/** The alternatives `s` asks for per token (null: none). */
const topNOf = (s: SeqState): number | null =>
  s.spec.logprobs !== null && s.spec.logprobs > 0 ? s.spec.logprobs : null;

/**
 * The uniform of this step of `s` (one draw when it samples, none when greedy), drawn once and
 * used by whichever path samples it, so both give the same token.
 */
export const stepUniform = (s: SeqState): number => drawUniform(s.spec.sampling, s.rng);

/**
 * Candidates this step of `s` needs to be sampled on the device (`sampleStepFromCandidates`), or
 * null when it needs its whole logits row (logits rules or a min_tokens ban apply, min_p, or
 * processed alternatives; see `candidatesNeeded`).
 */
export const candidatesFor = (
  s: SeqState,
  tokenizer: Tokenizer,
  vocab: number,
  mode: LogprobsMode,
): number | null => {
  const banned = bannedOf(s, tokenizer).some((t) => t >= 0 && t < vocab);
  return candidatesNeeded(
    s.spec.sampling,
    vocab,
    !hasRules(s.spec.rules) && !banned,
    mode,
    topNOf(s),
  );
};

/**
 * Samples this step of `s` from its row's candidates (the first `candidatesFor` of them, so the
 * result never depends on what the batch's other rows asked) and applies the stop rules; false
 * when they cannot decide: the caller reads the row and calls `sampleNextFromRow` with `u`.
 */
export const sampleNextFromCandidates = (
  s: SeqState,
  c: CandidateRow,
  need: number,
  u: number,
  tokenizer: Tokenizer,
  mode: LogprobsMode,
): boolean => {
  const r = sampleStepFromCandidates(firstCandidates(c, need), s.spec.sampling, u, mode, topNOf(s));
  if (r === null) return false;
  accept(s, r, tokenizer);
  return true;
};

/** Samples this step of `s` from its logits row, with the step's uniform `u`, and applies the stop rules. */
export const sampleNextFromRow = (
  s: SeqState,
  row: FloatArray,
  u: number,
  tokenizer: Tokenizer,
  mode: LogprobsMode,
): void => {
  const processed = applyLogitsRules(
    row,
    s.spec.rules,
    s.promptIds,
    s.tokens,
    bannedOf(s, tokenizer),
  );
  accept(s, sampleStep(row, processed, s.spec.sampling, u, mode, topNOf(s)), tokenizer);
};

/** Samples the next token of `s` from its logits row and applies vLLM's stop rules. */
export const sampleNext = (
  s: SeqState,
  row: FloatArray,
  tokenizer: Tokenizer,
  mode: LogprobsMode,
): void => sampleNextFromRow(s, row, stepUniform(s), tokenizer, mode);

/** Appends a sampled token to `s`, then EOS, stop_token_ids, stop strings and max_tokens. */
const accept = (s: SeqState, r: StepResult, tokenizer: Tokenizer): void => {
  const spec = s.spec;
  s.tokens.push(r.token);
  s.logprobs.push(r.logprob);
  s.tops.push(r.top);
  if (spec.eosId !== null && r.token === spec.eosId) {
    s.stoppedByToken = true;
    return finish(s, "stop", null);
  }
  if (spec.stopTokenIds.includes(r.token)) {
    s.stoppedByToken = true;
    return finish(s, "stop", r.token);
  }
  if (spec.stop.length > 0) {
    // like vLLM: only text produced after min_tokens can match (look-back = stop length)
    const text = decodeIds(tokenizer, s.tokens, spec.skipSpecial);
    const newChars = text.length - s.textLen;
    s.textLen = text.length;
    const hit = s.tokens.length > spec.minTokens
      ? checkStopStrings(text, newChars, spec.stop, spec.includeStop)
      : null;
    if (hit) {
      s.stopText = hit.text;
      return finish(s, "stop", hit.stop);
    }
  }
  if (s.tokens.length >= spec.maxTokens) finish(s, "length", null);
};

const MASK64 = (1n << 64n) - 1n;

/**
 * The generator of sample `j` of a seeded request: seed + j (vLLM), over all 64 bits. Seeds in
 * [0, 2^32) seed the stream exactly as the in-process engine's `new Rng(seed)` does; any other
 * int64 (negative, or 2^32 and above) expands both halves into the state, so s and s + 2^32 give
 * different streams.
 */
export const seededRng = (seed: bigint, j: number): Rng => {
  const s = seed + BigInt(j);
  if (s >= 0n && s < 0x100000000n) return new Rng(Number(s));
  const u = s & MASK64;
  const lo = Number(u & 0xffffffffn);
  const hi = Number(u >> 32n);
  // splitmix32 over (lo, hi, lo^hi, golden): four non-zero words
  const words: number[] = [lo, hi, (lo ^ hi) >>> 0, 0x9e3779b9].map((x, i): number => {
    let z = (x + Math.imul(i + 1, 0x9e3779b9)) >>> 0;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  });
  if (!words.some((w) => w !== 0)) words[0] = 1;
  return new Rng(words);
};

/** What the response renders of a sequence. */
export const seqResult = (s: SeqState): SeqResult => ({
  tokens: s.tokens,
  logprobs: s.logprobs,
  tops: s.tops,
  finishReason: s.finishReason,
  stopReason: s.stopReason,
  stopText: s.stopText,
  stoppedByToken: s.stoppedByToken,
});

/** The result of a sequence that never ran (aborted while queued). */
export const ABORTED: SeqResult = {
  tokens: [],
  logprobs: [],
  tops: [],
  finishReason: "abort",
  stopReason: null,
  stopText: null,
  stoppedByToken: false,
};
