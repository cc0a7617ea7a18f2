/**
 * One generated sequence and vLLM's stop rules: sampling the next token from a logits row
 * (min_tokens bans the stop tokens; the sampler in sampler.ts), then EOS, stop_token_ids, stop
 * strings (only text produced after min_tokens can match, with a look-back of the stop length)
 * and max_tokens, in that order. No device and no scheduling: the batch feeds logits rows in, the
 * scheduler retires sequences whose `done` is set.
 * @module
 */
import type { FloatArray } from "../backend/tensor.ts";
import type { Rng } from "../model/rng.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import { checkStopStrings, type CompletionSpec, decodeIds, type SeqResult } from "./completion.ts";
import { type LogprobsMode, sampleStep } from "./sampler.ts";

/** Why a sequence ended. */
export type FinishReason = "stop" | "length" | "abort";

/** The generation state of one sequence (sample `j` of one prompt of a request). */
export interface SeqState {
  readonly spec: CompletionSpec;
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
export const newSeq = (spec: CompletionSpec, rng: Rng): SeqState => ({
  spec,
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

/** Samples the next token of `s` from its logits row and applies vLLM's stop rules. */
export const sampleNext = (
  s: SeqState,
  row: FloatArray,
  tokenizer: Tokenizer,
  mode: LogprobsMode,
): void => {
  const spec = s.spec;
  const stopIds = spec.eosId === null ? spec.stopTokenIds : [spec.eosId, ...spec.stopTokenIds];
  const banned = s.tokens.length < spec.minTokens ? [...stopIds, tokenizer.eosId] : [];
  const topN = spec.logprobs !== null && spec.logprobs > 0 ? spec.logprobs : null;
  const r = sampleStep(row, spec.sampling, s.rng, banned, mode, topN);
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
