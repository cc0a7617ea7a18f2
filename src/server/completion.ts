/**
 * /v1/completions semantics without state: validating a decoded request into a `CompletionSpec`
 * (tokenizing string prompts, vLLM's range checks and messages) and rendering finished sequences
 * as vLLM's response (choices, logprobs object, prompt_logprobs, usage), plus the per-token
 * stop-string check (used by stop_rules.ts). The scheduler (scheduler.ts) runs the model in
 * between.
 * @module
 */
import { messageOf } from "../base/tagged_error.ts";
import { Effect } from "effect";
import type { ModelConfig } from "../model/config.ts";
import type { DecodeOptions, Tokenizer } from "../tokenizer/tokenizer.ts";
import type { StepParams } from "./sampler.ts";
import {
  type ApiError,
  badRequest,
  type CompletionChoice,
  type CompletionLogprobs,
  type CompletionRequest,
  type CompletionResponse,
  notFound,
  type PromptLogprobEntry,
} from "./schemas.ts";

/** Logprobs are clamped to this value in responses (vLLM/OpenAI: no -inf in JSON). */
export const LOGPROB_FLOOR = -9999.0;

/** One prompt of a request. */
export interface PromptSpec {
  readonly ids: readonly number[];
  /** The prompt text when it was given as a string, else null. */
  readonly text: string | null;
}

/** A validated completion request. */
export interface CompletionSpec {
  readonly id: string;
  readonly created: number;
  /** The model name the request asked for (echoed in the response, prefix-cache namespace). */
  readonly model: string;
  /** The adapter name, or null for the base model. */
  readonly adapter: string | null;
  readonly prompts: readonly PromptSpec[];
  readonly n: number;
  readonly sampling: StepParams;
  readonly seed: number | null;
  readonly maxTokens: number;
  readonly minTokens: number;
  /** Explicit stop token ids plus the model's extra EOS ids (unless ignore_eos). */
  readonly stopTokenIds: readonly number[];
  /** The tokenizer's EOS, or null with ignore_eos. */
  readonly eosId: number | null;
  readonly stop: readonly string[];
  readonly includeStop: boolean;
  readonly skipSpecial: boolean;
  readonly logprobs: number | null;
  readonly promptLogprobs: number | null;
  readonly echo: boolean;
  readonly returnAsIds: boolean;
  readonly returnTokenIds: boolean;
  readonly cacheSalt: string | null;
}

/** What validation needs to know about the server. */
export interface CompletionContext {
  readonly tokenizer: Tokenizer;
  readonly config: ModelConfig;
  readonly maxLogprobs: number;
  readonly servedModelName: string;
  /** The adapter for a model name: null = base model, undefined = unknown name. */
  readonly resolveModel: (name: string) => { adapter: string | null } | undefined;
}

const randomHex = (bytes: number): string =>
  Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, "0"))
    .join("");

/** Safe decode: ids the tokenizer does not know are dropped. */
export const decodeIds = (tok: Tokenizer, ids: readonly number[], skipSpecial = true): string => {
  const known = ids.filter((i) => Number.isInteger(i) && i >= 0 && i < tok.vocabSize);
  return (tok.decode as (ids: readonly number[], o?: DecodeOptions) => string)(known, {
    skipSpecialTokens: skipSpecial,
  });
};

/** Display text of one token (vLLM logprob `tokens`); "" for ids the tokenizer does not know. */
export const tokenText = (tok: Tokenizer, id: number): string => {
  try {
    return tok.tokenText(id);
  } catch {
    return "";
  }
};

/** Token ids of a string prompt (BOS first when add_special_tokens and the tokenizer has one). */
export const tokenizeText = (
  tok: Tokenizer,
  text: string,
  addSpecial: boolean,
  param = "prompt",
): Effect.Effect<number[], ApiError> =>
  Effect.try({
    try: () => [...(addSpecial && tok.bosId !== null ? [tok.bosId] : []), ...tok.encode(text)],
    catch: (e) => badRequest(`cannot tokenize ${param}: ${messageOf(e)}`, param),
  });

const codePoints = (s: string): number => {
  let n = 0;
  for (const _ of s) n++;
  return n;
};

/** Validates a decoded request (vLLM's checks and messages) into a spec. */
export const normalizeCompletion = (
  req: CompletionRequest,
  cx: CompletionContext,
): Effect.Effect<CompletionSpec, ApiError> =>
  Effect.gen(function* () {
    const model = req.model ?? cx.servedModelName;
    const resolved = cx.resolveModel(model);
    if (!resolved) {
      return yield* Effect.fail(notFound(`The model \`${model}\` does not exist.`, "model"));
    }
    if (req.stream === true) {
      return yield* Effect.fail(
        badRequest("stream=true is not supported by the lorafold server", "stream"),
      );
    }
    if (req.suffix != null) {
      return yield* Effect.fail(badRequest("suffix is not currently supported", "suffix"));
    }
    const n = req.n ?? 1;
    if (n < 1) return yield* Effect.fail(badRequest(`n must be at least 1, got ${n}.`, "n"));
    if (req.best_of != null && req.best_of !== n) {
      return yield* Effect.fail(
        badRequest("best_of is not supported (it must equal n)", "best_of"),
      );
    }
    const temperature = req.temperature ?? 1.0;
    if (!(temperature >= 0)) {
      return yield* Effect.fail(
        badRequest(`temperature must be non-negative, got ${temperature}.`, "temperature"),
      );
    }
    const topP = req.top_p ?? 1.0;
    if (!(topP > 0 && topP <= 1)) {
      return yield* Effect.fail(badRequest(`top_p must be in (0, 1], got ${topP}.`, "top_p"));
    }
    const topK = req.top_k ?? 0;
    if (topK < -1) {
      return yield* Effect.fail(
        badRequest(`top_k must be 0 (disable), or at least 1, got ${topK}.`, "top_k"),
      );
    }
    const minP = req.min_p ?? 0;
    if (!(minP >= 0 && minP <= 1)) {
      return yield* Effect.fail(badRequest(`min_p must be in [0, 1], got ${minP}.`, "min_p"));
    }
    for (
      const [field, v, neutral] of [
        ["presence_penalty", req.presence_penalty, 0],
        ["frequency_penalty", req.frequency_penalty, 0],
        ["repetition_penalty", req.repetition_penalty, 1],
      ] as const
    ) {
      if (v != null && v !== neutral) {
        return yield* Effect.fail(
          badRequest(`${field} is not supported by the lorafold server`, field),
        );
      }
    }
    if (req.logit_bias != null && Object.keys(req.logit_bias).length > 0) {
      return yield* Effect.fail(
        badRequest("logit_bias is not supported by the lorafold server", "logit_bias"),
      );
    }
    const maxTokens = req.max_tokens ?? 16;
    if (maxTokens < 1) {
      return yield* Effect.fail(
        badRequest(`max_tokens must be at least 1, got ${maxTokens}.`, "max_tokens"),
      );
    }
    const minTokens = req.min_tokens ?? 0;
    if (minTokens < 0) {
      return yield* Effect.fail(
        badRequest(
          `min_tokens must be greater than or equal to 0, got ${minTokens}.`,
          "min_tokens",
        ),
      );
    }
    if (minTokens > maxTokens) {
      return yield* Effect.fail(
        badRequest(
          `min_tokens must be less than or equal to max_tokens=${maxTokens}, got ${minTokens}.`,
          "min_tokens",
        ),
      );
    }
    const echo = req.echo ?? false;
    const logprobs = req.logprobs ?? null;
    for (
      const [field, v] of [["logprobs", logprobs], [
        "prompt_logprobs",
        req.prompt_logprobs ?? null,
      ]] as const
    ) {
      if (v !== null && v < 0) {
        return yield* Effect.fail(badRequest(`${field} must be non-negative, got ${v}.`, field));
      }
      if (v !== null && v > cx.maxLogprobs) {
        return yield* Effect.fail(
          badRequest(
            `Requested ${
              field === "logprobs" ? "sample" : "prompt"
            } logprobs of ${v}, which is greater than max allowed: ${cx.maxLogprobs}`,
            field,
          ),
        );
      }
    }
    const promptLogprobs = req.prompt_logprobs ?? (echo && logprobs !== null ? logprobs : null);
    const cacheSalt = req.cache_salt ?? null;
    if (cacheSalt !== null && cacheSalt === "") {
      return yield* Effect.fail(
        badRequest("Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt"),
      );
    }
    // prompts
    const p = req.prompt;
    const addSpecial = req.add_special_tokens ?? true;
    const prompts: PromptSpec[] = [];
    if (typeof p === "string") {
      prompts.push({ ids: yield* tokenizeText(cx.tokenizer, p, addSpecial), text: p });
    } else if (p.length > 0 && typeof p[0] === "string") {
      for (const s of p as readonly string[]) {
        prompts.push({ ids: yield* tokenizeText(cx.tokenizer, s, addSpecial), text: s });
      }
    } else if (p.length > 0 && typeof p[0] === "number") {
      prompts.push({ ids: [...(p as readonly number[])], text: null });
    } else {for (const ids of p as readonly (readonly number[])[]) {
        prompts.push({ ids: [...ids], text: null });
      }}
    if (prompts.length === 0) {
      return yield* Effect.fail(badRequest("prompt cannot be empty", "prompt"));
    }
    const V = cx.config.vocabSize;
    const maxLen = cx.config.maxPositionEmbeddings;
    for (const { ids } of prompts) {
      if (ids.length === 0) {
        return yield* Effect.fail(badRequest("prompt cannot be empty", "prompt"));
      }
      const bad = ids.find((t) => t < 0 || t >= V);
      if (bad !== undefined) {
        return yield* Effect.fail(
          badRequest(`Token id ${bad} is out of vocabulary (size ${V})`, "prompt"),
        );
      }
      if (ids.length + maxTokens > maxLen) {
        return yield* Effect.fail(
          badRequest(
            `This model's maximum context length is ${maxLen} tokens. However, you requested ` +
              `${
                ids.length + maxTokens
              } tokens (${ids.length} in the messages, ${maxTokens} in the completion). ` +
              "Please reduce the length of the messages or completion.",
            "max_tokens",
          ),
        );
      }
    }
    const ignoreEos = req.ignore_eos ?? false;
    const explicitStops = [...(req.stop_token_ids ?? [])];
    const tokEos = cx.tokenizer.eosId;
    const extraEos = ignoreEos ? [] : cx.config.eosTokenIds.filter((t) => t !== tokEos);
    const stop = req.stop == null ? [] : typeof req.stop === "string" ? [req.stop] : [...req.stop];
    return {
      id: `cmpl-${randomHex(16)}`,
      created: Math.floor(Date.now() / 1000),
      model,
      adapter: resolved.adapter,
      prompts,
      n,
      sampling: { temperature, topP, topK, minP },
      seed: req.seed ?? null,
      maxTokens,
      minTokens,
      stopTokenIds: [...new Set([...explicitStops, ...extraEos])],
      eosId: ignoreEos ? null : tokEos,
      stop: stop.filter((s) => s.length > 0),
      includeStop: req.include_stop_str_in_output ?? false,
      skipSpecial: req.skip_special_tokens ?? true,
      logprobs,
      promptLogprobs,
      echo,
      returnAsIds: req.return_tokens_as_token_ids ?? false,
      returnTokenIds: req.return_token_ids ?? false,
      cacheSalt,
    } satisfies CompletionSpec;
  });

/** The outcome of one sequence. */
export interface SeqResult {
  readonly tokens: readonly number[];
  /** Logprob of each sampled token (server mode). */
  readonly logprobs: readonly number[];
  /** Top alternatives per step (when logprobs > 0), else null entries. */
  readonly tops: ReadonlyArray<ReadonlyArray<readonly [number, number]> | null>;
  readonly finishReason: "stop" | "length" | "abort";
  readonly stopReason: number | string | null;
  /** The text when a stop string ended the sequence, else null (decode the tokens). */
  readonly stopText: string | null;
  /** The last token is a stop token (EOS or stop_token_ids). */
  readonly stoppedByToken: boolean;
}

/** Raw scores of one prompt position i >= 1 (predicting ids[i] from ids[..i]). */
export interface PromptPosition {
  readonly token: number;
  readonly logprob: number;
  readonly rank: number;
  readonly top: ReadonlyArray<readonly [number, number]>;
}

/**
 * vLLM's stop-string check after a new token: searches the text produced since the previous
 * check (with a look-back of the stop length). Returns the truncated text and the stop string.
 */
export const checkStopStrings = (
  text: string,
  newChars: number,
  stops: readonly string[],
  includeStop: boolean,
): { text: string; stop: string } | null => {
  for (const s of stops) {
    const from = Math.max(0, text.length - newChars - s.length + 1);
    const idx = text.indexOf(s, from);
    if (idx >= 0) return { text: text.slice(0, includeStop ? idx + s.length : idx), stop: s };
  }
  return null;
};

const clamp = (x: number): number => (x > LOGPROB_FLOOR ? x : LOGPROB_FLOOR);

/** Renders finished sequences (results[p][j]) as the /v1/completions response. */
export const renderCompletion = (
  spec: CompletionSpec,
  tok: Tokenizer,
  results: readonly (readonly SeqResult[])[],
  promptScores: readonly (readonly PromptPosition[] | null)[],
): CompletionResponse => {
  const show = (id: number): string => (spec.returnAsIds ? `token_id:${id}` : tokenText(tok, id));
  const choices: CompletionChoice[] = [];
  let promptTokens = 0;
  let completionTokens = 0;
  spec.prompts.forEach((prompt, p) => {
    promptTokens += prompt.ids.length;
    const scores = promptScores[p];
    const promptLogprobs = spec.promptLogprobs !== null && scores
      ? [
        null,
        ...scores.map((s): PromptLogprobEntry => {
          const e: Record<string, { logprob: number; rank: number; decoded_token: string }> = {};
          e[String(s.token)] = {
            logprob: clamp(s.logprob),
            rank: s.rank,
            decoded_token: tokenText(tok, s.token),
          };
          s.top.slice(0, spec.promptLogprobs!).forEach(([id, lp], r) => {
            if (!(String(id) in e)) {
              e[String(id)] = {
                logprob: clamp(lp),
                rank: r + 1,
                decoded_token: tokenText(tok, id),
              };
            }
          });
          return e;
        }),
      ]
      : null;
    const promptText = spec.echo ? (prompt.text ?? decodeIds(tok, prompt.ids, false)) : "";
    results[p].forEach((r, j) => {
      completionTokens += r.tokens.length;
      let text = r.stopText ??
        decodeIds(
          tok,
          r.stoppedByToken && !spec.includeStop ? r.tokens.slice(0, -1) : r.tokens,
          spec.skipSpecial,
        );
      if (spec.echo) text = promptText + text;
      let logprobs: CompletionLogprobs | null = null;
      if (spec.logprobs !== null) {
        const k = spec.logprobs;
        const lp: CompletionLogprobs = {
          text_offset: [],
          token_logprobs: [],
          tokens: [],
          top_logprobs: [],
        };
        let offset = 0;
        const push = (token: string, value: number | null, top: Record<string, number> | null) => {
          lp.text_offset.push(offset);
          lp.tokens.push(token);
          lp.token_logprobs.push(value);
          lp.top_logprobs.push(top);
          offset += codePoints(token);
        };
        if (spec.echo) {
          push(show(prompt.ids[0]), null, null);
          (scores ?? []).forEach((s) => {
            const top: Record<string, number> = { [show(s.token)]: clamp(s.logprob) };
            for (const [id, v] of s.top.slice(0, k)) {
              if (!(show(id) in top)) top[show(id)] = clamp(v);
            }
            push(show(s.token), clamp(s.logprob), top);
          });
        }
        r.tokens.forEach((t, i) => {
          const top: Record<string, number> = { [show(t)]: clamp(r.logprobs[i]) };
          for (const [id, v] of (r.tops[i] ?? []).slice(0, k)) {
            if (!(show(id) in top)) top[show(id)] = clamp(v);
          }
          push(show(t), clamp(r.logprobs[i]), top);
        });
        logprobs = lp;
      }
      choices.push({
        index: p * spec.n + j,
        text,
        logprobs,
        finish_reason: r.finishReason,
        stop_reason: r.stopReason,
        token_ids: spec.returnTokenIds ? [...r.tokens] : null,
        prompt_logprobs: promptLogprobs,
        prompt_token_ids: spec.returnTokenIds ? [...prompt.ids] : null,
      });
    });
  });
  return {
    id: spec.id,
    object: "text_completion",
    created: spec.created,
    model: spec.model,
    choices,
    usage: {
      prompt_tokens: promptTokens,
      completion_tokens: completionTokens,
      total_tokens: promptTokens + completionTokens,
      prompt_tokens_details: null,
    },
  };
};
