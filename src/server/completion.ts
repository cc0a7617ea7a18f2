/**
 * /v1/completions semantics without state: validating a decoded request into a `CompletionSpec`
 * (vLLM's checks, in vLLM's order and with vLLM's messages: request validators, model, the
 * tokenizer's length checks BEFORE tokenizing where possible, truncation, then SamplingParams
 * and the engine's vocabulary checks) and rendering finished sequences as vLLM's response
 * (choices, logprobs object, prompt_logprobs, usage), plus the per-token stop-string check (used
 * by stop_rules.ts). The scheduler (scheduler.ts) runs the model in between; stream.ts renders
 * the streamed chunks.
 * @module
 */
import { messageOf } from "../base/tagged_error.ts";
import { Effect } from "effect";
import type { ModelConfig } from "../model/config.ts";
import type { DecodeOptions, Tokenizer } from "../tokenizer/tokenizer.ts";
import type { StepParams } from "./sampler.ts";
import type { LogitsRules } from "./logits_rules.ts";
import type { SamplingDefaults } from "../model/generation_config.ts";
import {
  type ApiError,
  badRequest,
  type CompletionChoice,
  type CompletionLogprobs,
  type CompletionRequest,
  type CompletionResponse,
  notFound,
  type PromptLogprobEntry,
  type Usage,
} from "./schemas.ts";

/** Logprobs are clamped to this value in responses (vLLM/OpenAI: no -inf in JSON). */
export const LOGPROB_FLOOR = -9999.0;

/** One prompt of a request. */
export interface PromptSpec {
  readonly ids: readonly number[];
  /** The prompt text when it was given as a string (and not truncated), else null. */
  readonly text: string | null;
}

/** Streaming options of a request (stream: true). */
export interface StreamSpec {
  readonly includeUsage: boolean;
  readonly continuousUsage: boolean;
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
  /** The int64 seed (vLLM: -1 = unseeded, stored as null); sample j uses seed + j. */
  readonly seed: bigint | null;
  /** Tokens generated per sequence (1 for echo with max_tokens 0: vLLM generates one). */
  readonly maxTokens: number;
  /** echo with max_tokens 0: prompt scoring, the generated token is not shown. */
  readonly echoOnly: boolean;
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
  readonly rules: LogitsRules;
  /** null = one JSON answer. */
  readonly stream: StreamSpec | null;
}

/** The request limits of the server (each a `serve` flag). */
export interface CompletionLimits {
  readonly maxN: number;
  readonly maxPrompts: number;
  /** Most sequences (prompts x n) of one request. */
  readonly maxSequences: number;
  readonly maxStopStrings: number;
  readonly maxStopLength: number;
}

/** What validation needs to know about the server. */
export interface CompletionContext {
  readonly tokenizer: Tokenizer;
  readonly config: ModelConfig;
  readonly maxLogprobs: number;
  readonly servedModelName: string;
  /** The adapter for a model name: null = base model, undefined = unknown name. */
  readonly resolveModel: (name: string) => { adapter: string | null } | undefined;
  readonly limits: CompletionLimits;
  /** The longest token text (vLLM's max_chars_per_token): bounds a prompt's characters. */
  readonly maxCharsPerToken: number;
  /** The X-Request-Id header, when given (vLLM prefers it to the body's request_id). */
  readonly headerRequestId?: string | null;
  /**
   * The model's generation_config.json sampling values: they replace OpenAI's defaults for the
   * fields a request omits (vLLM's --generation-config auto); {} = OpenAI's defaults.
   */
  readonly samplingDefaults?: SamplingDefaults;
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

/** vLLM's max_chars_per_token: the longest token text of the vocabulary (at least 1). */
export const maxCharsPerToken = (tok: Tokenizer): number => {
  let m = 1;
  for (let i = 0; i < tok.vocabSize; i++) m = Math.max(m, tokenText(tok, i).length);
  return m;
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

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;

/** Python's repr of a list of strings (vLLM quotes offending keys that way). */
const pyList = (xs: readonly string[]): string =>
  `[${xs.map((x) => `'${x.replaceAll("\\", "\\\\").replaceAll("'", "\\'")}'`).join(", ")}]`;

/** Python's str of a float, for vLLM's messages (`2.5`, `3.0`, `inf`). */
const pyFloat = (x: number): string =>
  Number.isNaN(x)
    ? "nan"
    : !Number.isFinite(x)
    ? (x > 0 ? "inf" : "-inf")
    : Number.isInteger(x) && Math.abs(x) < 1e16
    ? `${x}.0`
    : String(x);

/** Fields vLLM honours that this server does not implement: refused, never ignored. */
const UNSUPPORTED_FIELDS = [
  "prompt_embeds",
  "response_format",
  "structured_outputs",
  "logprob_token_ids",
  "kv_transfer_params",
  "ec_transfer_params",
  "vllm_xargs",
  "repetition_detection",
  "thinking_token_budget",
  "watermarking",
] as const;

/**
 * Validates a decoded request into a spec, in vLLM's order: request validators (cache_salt,
 * logprobs, stream_options, empty prompt, prompt list length), the model (404), beam search and
 * suffix, the length checks of the tokenizer (max_tokens against the context, truncation size,
 * the character bound of each text prompt BEFORE tokenizing), tokenization and truncation, then
 * SamplingParams' checks and the engine's vocabulary checks.
 */
export const normalizeCompletion = (
  req: CompletionRequest,
  cx: CompletionContext,
): Effect.Effect<CompletionSpec, ApiError> =>
  Effect.gen(function* () {
    const fail = (msg: string, param: string | null = null) => Effect.fail(badRequest(msg, param));
    const raw = req as Record<string, unknown>;
    const lim = cx.limits;
    // ---- request validators (pydantic model validators, before anything else)
    const cacheSalt = req.cache_salt ?? null;
    if (cacheSalt !== null && cacheSalt === "") {
      return yield* fail(
        "Parameter 'cache_salt' must be a non-empty string if provided.",
        "cache_salt",
      );
    }
    if (cacheSalt !== null && cacheSalt.length > 1024) {
      return yield* fail("String should have at most 1024 characters", "cache_salt");
    }
    const stream = req.stream === true;
    for (const field of ["prompt_logprobs", "logprobs"] as const) {
      const v = req[field];
      if (v != null && v < 0 && v !== -1) {
        return yield* fail(`\`${field}\` must be a positive value or -1.`, field);
      }
    }
    if (
      stream && req.prompt_logprobs != null &&
      (req.prompt_logprobs > 0 || req.prompt_logprobs === -1)
    ) {
      return yield* fail(
        "`prompt_logprobs` are not available when `stream=True`.",
        "prompt_logprobs",
      );
    }
    // (vLLM tests the raw value's truth: an empty object passes)
    const so = raw.stream_options;
    if (so != null && typeof so === "object" && Object.keys(so).length > 0 && !stream) {
      return yield* fail(
        "Stream options can only be defined when `stream=True`.",
        "stream_options",
      );
    }
    const p = req.prompt;
    if (p === undefined || p === null || p === "") {
      return yield* fail(
        "Either prompt or prompt_embeds must be provided and non-empty.",
        "prompt",
      );
    }
    if (Array.isArray(p) && p.length > 0 && typeof p[0] !== "number" && p.length > lim.maxPrompts) {
      return yield* fail(
        `prompt list length ${p.length} exceeds the maximum allowed count of ${lim.maxPrompts}. ` +
          "To increase this limit, set the VLLM_MAX_COMPLETION_PROMPTS environment variable.",
        "prompt",
      );
    }
    // ---- the model (vLLM: an omitted or empty name is the base model)
    const model = req.model == null || req.model === "" ? cx.servedModelName : req.model;
    const resolved = cx.resolveModel(model);
    if (!resolved) {
      return yield* Effect.fail(notFound(`The model \`${model}\` does not exist.`, "model"));
    }
    if (req.use_beam_search === true) {
      return yield* fail(
        "use_beam_search is not supported by the lorafold server",
        "use_beam_search",
      );
    }
    for (const field of UNSUPPORTED_FIELDS) {
      if (raw[field] != null && raw[field] !== false) {
        return yield* fail(`${field} is not supported by the lorafold server`, field);
      }
    }
    if (req.priority != null && req.priority !== 0) {
      return yield* fail(
        "Priority scheduling is not enabled on this server: priority must be 0",
        "priority",
      );
    }
    if (req.suffix != null) return yield* fail("suffix is not currently supported", "suffix");
    // ---- the tokenizer's length checks (vLLM's TokenizeParams), then tokenization
    const echo = req.echo ?? false;
    const requestedMax = req.max_tokens ?? 16;
    const echoOnly = echo && requestedMax === 0;
    const maxLen = cx.config.maxPositionEmbeddings;
    const outTokens = Math.max(0, requestedMax);
    if (outTokens > maxLen) {
      return yield* fail(
        `max_tokens=${outTokens}cannot be greater than max_model_len=max_total_tokens=${maxLen}. ` +
          "Please request fewer output tokens.",
        "max_tokens",
      );
    }
    const maxInput = maxLen - outTokens;
    const truncate = req.truncate_prompt_tokens ?? null;
    if (truncate !== null && truncate < -1) {
      return yield* fail(
        "Input should be greater than or equal to -1",
        "truncate_prompt_tokens",
      );
    }
    if (truncate !== null && truncate > maxInput) {
      return yield* fail(
        `truncate_prompt_tokens=${truncate} cannot be greater than max_model_len - max_tokens = ` +
          `${maxInput}. Please request a smaller truncation size.`,
        "truncate_prompt_tokens",
      );
    }
    const keep = truncate === null ? null : truncate < 0 ? maxInput : truncate;
    const side = req.truncation_side ?? "left";
    const addSpecial = req.add_special_tokens ?? true;
    const V = cx.config.vocabSize;
    const finishPrompt = (ids: number[], text: string | null) =>
      Effect.gen(function* () {
        let out = ids;
        let shownText = text;
        if (keep !== null && keep < out.length) {
          out = keep === 0 ? [] : side === "left" ? out.slice(-keep) : out.slice(0, keep);
          shownText = null;
        }
        if (out.length > maxInput) {
          return yield* fail(
            `You passed ${out.length} input tokens and requested ${outTokens} output tokens. ` +
              `However, the model's context length is only ${maxLen} tokens, resulting in a ` +
              `maximum input length of ${maxInput} tokens. Please reduce the length of the input prompt.`,
            "input_tokens",
          );
        }
        return { ids: out, text: shownText } satisfies PromptSpec;
      });
    const fromText = (text: string) =>
      Effect.gen(function* () {
        const maxChars = maxInput * cx.maxCharsPerToken;
        if (keep === null && text.length > maxChars) {
          // fail outright without tokenizing (vLLM's character bound)
          return yield* fail(
            `You passed ${text.length} input characters and requested ${outTokens} output ` +
              `tokens. However, the model's context length is only ${maxLen} tokens, resulting ` +
              `in a maximum input length of ${maxInput} tokens (at most ${maxChars} characters). ` +
              "Please reduce the length of the input prompt.",
            "input_text",
          );
        }
        return yield* finishPrompt(yield* tokenizeText(cx.tokenizer, text, addSpecial), text);
      });
    const fromIds = (ids: readonly number[]) =>
      Effect.gen(function* () {
        const bad = ids.find((t) => t < 0 || t >= V);
        if (bad !== undefined) {
          return yield* fail(`Token id ${bad} is out of vocabulary (size ${V})`, "prompt");
        }
        return yield* finishPrompt([...ids], null);
      });
    const prompts: PromptSpec[] = [];
    if (typeof p === "string") prompts.push(yield* fromText(p));
    else if (p.length > 0 && typeof p[0] === "string") {
      for (const s of p as readonly string[]) prompts.push(yield* fromText(s));
    } else if (p.length > 0 && typeof p[0] === "number") {
      prompts.push(yield* fromIds(p as readonly number[]));
    } else {
      for (const ids of p as readonly (readonly number[])[]) prompts.push(yield* fromIds(ids));
    }
    if (prompts.length === 0 || prompts.some((q) => q.ids.length === 0)) {
      return yield* fail("prompt cannot be empty", "prompt");
    }
    // ---- SamplingParams (vLLM's _verify_args, in its order and words)
    // omitted fields: the model's generation_config.json, then OpenAI's defaults (vLLM)
    const dflt = cx.samplingDefaults ?? {};
    const n = req.n ?? 1;
    if (n < 1) return yield* fail(`n must be at least 1, got ${n}.`, "n");
    if (n > lim.maxN) {
      return yield* fail(
        `n must be at most ${lim.maxN}, got ${n}. To increase this limit, set the ` +
          "VLLM_MAX_N_SEQUENCES environment variable.",
        "n",
      );
    }
    if (prompts.length * n > lim.maxSequences) {
      return yield* fail(
        `the request asks for ${prompts.length} prompts x n=${n} = ${prompts.length * n} ` +
          `sequences, more than this server allows (${lim.maxSequences}; --max-request-sequences).`,
        "n",
      );
    }
    if (req.best_of != null && req.best_of !== n) {
      return yield* fail("best_of is not supported (it must equal n)", "best_of");
    }
    const presence = req.presence_penalty ?? 0;
    if (!(presence >= -2 && presence <= 2)) {
      return yield* fail(
        `presence_penalty must be in [-2, 2], got ${pyFloat(presence)}.`,
        "presence_penalty",
      );
    }
    const frequency = req.frequency_penalty ?? 0;
    if (!(frequency >= -2 && frequency <= 2)) {
      return yield* fail(
        `frequency_penalty must be in [-2, 2], got ${pyFloat(frequency)}.`,
        "frequency_penalty",
      );
    }
    const repetition = req.repetition_penalty ?? dflt.repetitionPenalty ?? 1;
    if (!Number.isFinite(repetition)) {
      return yield* fail(
        `repetition_penalty must be a finite number, got ${pyFloat(repetition)}.`,
        "repetition_penalty",
      );
    }
    if (repetition <= 0) {
      return yield* fail(
        `repetition_penalty must be greater than zero, got ${pyFloat(repetition)}.`,
        "repetition_penalty",
      );
    }
    let temperature = req.temperature ?? dflt.temperature ?? 1.0;
    if (!Number.isFinite(temperature)) {
      return yield* fail(
        `temperature must be a finite number, got ${pyFloat(temperature)}.`,
        "temperature",
      );
    }
    if (temperature < 0) {
      return yield* fail(
        `temperature must be non-negative, got ${pyFloat(temperature)}.`,
        "temperature",
      );
    }
    if (temperature > 2) {
      return yield* fail(
        `temperature must be in [0, 2], got ${pyFloat(temperature)}.`,
        "temperature",
      );
    }
    // vLLM raises tiny positive temperatures to 0.01 (numerical safety)
    if (temperature > 0 && temperature < 1e-2) temperature = 1e-2;
    const greedy = temperature < 1e-5;
    let topP = req.top_p ?? dflt.topP ?? 1.0;
    if (!(topP > 0 && topP <= 1)) {
      return yield* fail(`top_p must be in (0, 1], got ${pyFloat(topP)}.`, "top_p");
    }
    let topK = req.top_k ?? dflt.topK ?? 0;
    if (topK < -1) {
      return yield* fail(`top_k must be 0 (disable), or at least 1, got ${topK}.`, "top_k");
    }
    let minP = req.min_p ?? dflt.minP ?? 0;
    if (!(minP >= 0 && minP <= 1)) {
      return yield* fail(`min_p must be in [0, 1], got ${pyFloat(minP)}.`, "min_p");
    }
    const maxTokens = echoOnly ? 1 : requestedMax;
    if (maxTokens < 1) {
      return yield* fail(`max_tokens must be at least 1, got ${maxTokens}.`, "max_tokens");
    }
    const minTokens = req.min_tokens ?? 0;
    if (minTokens < 0) {
      return yield* fail(
        `min_tokens must be greater than or equal to 0, got ${minTokens}.`,
        "min_tokens",
      );
    }
    if (minTokens > maxTokens) {
      return yield* fail(
        `min_tokens must be less than or equal to max_tokens=${maxTokens}, got ${minTokens}.`,
        "min_tokens",
      );
    }
    const stop = req.stop == null ? [] : typeof req.stop === "string" ? [req.stop] : [...req.stop];
    if (stop.length > lim.maxStopStrings) {
      return yield* fail(
        `stop has ${stop.length} strings, more than this server allows (${lim.maxStopStrings}; ` +
          "--max-stop-strings).",
        "stop",
      );
    }
    if (stop.some((s) => s.length === 0)) {
      return yield* fail("stop cannot contain an empty string.", "stop");
    }
    if (stop.some((s) => s.length > lim.maxStopLength)) {
      return yield* fail(
        `a stop string is longer than this server allows (${lim.maxStopLength} characters; ` +
          "--max-stop-string-length).",
        "stop",
      );
    }
    const badWordsIn = req.bad_words ?? [];
    if (badWordsIn.length > lim.maxStopStrings) {
      return yield* fail(
        `bad_words has ${badWordsIn.length} entries, more than this server allows (${lim.maxStopStrings}).`,
        "bad_words",
      );
    }
    if (badWordsIn.some((w) => w.length === 0)) {
      return yield* fail(
        `bad_words cannot contain an empty string. Got bad_words=${pyList(badWordsIn)}`,
        "bad_words",
      );
    }
    if (greedy) {
      topP = 1;
      topK = 0;
      minP = 0;
    }
    // seed: int64, -1 = unseeded
    let seed: bigint | null = null;
    if (req.seed != null) {
      const s = BigInt(req.seed);
      if (s < INT64_MIN) {
        return yield* fail("Input should be greater than or equal to -9223372036854775808", "seed");
      }
      if (s > INT64_MAX) {
        return yield* fail("Input should be less than or equal to 9223372036854775807", "seed");
      }
      seed = s === -1n ? null : s;
    }
    // ---- the engine's checks (logprobs against --max-logprobs, vocabulary ids)
    const logprobs = req.logprobs == null ? null : req.logprobs === -1 ? V : req.logprobs;
    const promptLogprobsIn = req.prompt_logprobs == null
      ? null
      : req.prompt_logprobs === -1
      ? V
      : req.prompt_logprobs;
    if (logprobs !== null && logprobs > cx.maxLogprobs) {
      return yield* fail(
        `Requested sample logprobs of ${logprobs}, which is greater than max allowed: ${cx.maxLogprobs}`,
        "logprobs",
      );
    }
    if (promptLogprobsIn !== null && promptLogprobsIn > cx.maxLogprobs) {
      return yield* fail(
        `Requested prompt logprobs of ${promptLogprobsIn}, which is greater than max allowed: ${cx.maxLogprobs}`,
        "prompt_logprobs",
      );
    }
    const bias: [number, number][] = [];
    if (req.logit_bias != null) {
      const invalid: string[] = [];
      for (const [k, v] of Object.entries(req.logit_bias)) {
        if (!/^\s*[+-]?\d+\s*$/.test(k)) invalid.push(k);
        else bias.push([Number(k.trim()), Math.min(100, Math.max(-100, v))]);
      }
      if (invalid.length > 0) {
        return yield* fail(
          `logit_bias contains key(s) that cannot be converted to integer token IDs: ${
            pyList(invalid)
          }`,
          "logit_bias",
        );
      }
      const out = bias.filter(([t]) => t < 0 || t >= V).map(([t]) => t);
      if (out.length > 0) {
        return yield* fail(
          `token_id(s) [${
            out.join(", ")
          }] in logit_bias contain out-of-vocab token ids. Vocabulary size: ${V}`,
          "logit_bias",
        );
      }
    }
    const explicitStops = [...new Set(req.stop_token_ids ?? [])];
    const badStops = explicitStops.filter((t) => t < 0 || t >= V);
    if (badStops.length > 0) {
      return yield* fail(
        `token_id(s) [${
          badStops.join(", ")
        }] in stop_token_ids contain out-of-vocab token ids. Vocabulary size: ${V}`,
        "stop_token_ids",
      );
    }
    let allowed: Int32Array | null = null;
    if (req.allowed_token_ids != null) {
      if (req.allowed_token_ids.length === 0) {
        return yield* fail("allowed_token_ids is not None and empty!", "allowed_token_ids");
      }
      if (req.allowed_token_ids.some((t) => t < 0 || t >= V)) {
        return yield* fail(
          "allowed_token_ids contains out-of-vocab token id!",
          "allowed_token_ids",
        );
      }
      allowed = Int32Array.from(new Set(req.allowed_token_ids)).sort();
    }
    // bad_words -> token sequences, as vLLM's update_from_tokenizer (with and without a space)
    const badWords: number[][] = [];
    for (const word of badWordsIn) {
      for (const prefixed of [false, true]) {
        const text = (prefixed ? " " : "") + word.trimStart();
        const ids = yield* Effect.try({
          try: () => cx.tokenizer.encode(text),
          catch: () => null,
        }).pipe(Effect.orElseSucceed(() => null));
        if (ids === null || ids.length === 0) {
          if (!prefixed) {
            return yield* fail(
              "bad_words entries must tokenize to at least one token.",
              "bad_words",
            );
          }
          continue;
        }
        const last = badWords[badWords.length - 1];
        if (!prefixed || (ids[0] !== last[0] && ids.length === last.length)) badWords.push(ids);
      }
    }
    const promptLogprobs = promptLogprobsIn ?? (echo && logprobs !== null ? logprobs : null);
    const ignoreEos = req.ignore_eos ?? false;
    const tokEos = cx.tokenizer.eosId;
    const extraEos = ignoreEos ? [] : cx.config.eosTokenIds.filter((t) => t !== tokEos);
    const requestId = cx.headerRequestId ?? req.request_id ?? null;
    return {
      id: `cmpl-${requestId ?? randomHex(16)}`,
      created: Math.floor(Date.now() / 1000),
      model,
      adapter: resolved.adapter,
      prompts,
      n,
      sampling: { temperature, topP, topK, minP },
      seed,
      maxTokens,
      echoOnly,
      minTokens,
      stopTokenIds: [...new Set([...explicitStops, ...extraEos])],
      eosId: ignoreEos ? null : tokEos,
      stop,
      includeStop: req.include_stop_str_in_output ?? false,
      skipSpecial: req.skip_special_tokens ?? true,
      logprobs,
      promptLogprobs,
      echo,
      returnAsIds: req.return_tokens_as_token_ids ?? false,
      returnTokenIds: req.return_token_ids ?? false,
      cacheSalt,
      rules: { allowed, bias, badWords, presence, frequency, repetition },
      stream: stream
        ? {
          includeUsage: req.stream_options?.include_usage ?? false,
          continuousUsage: req.stream_options?.continuous_usage_stats ?? false,
        }
        : null,
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

/** prompt_logprobs of one prompt (vLLM: null for the first position). */
export const renderPromptLogprobs = (
  spec: CompletionSpec,
  tok: Tokenizer,
  scores: readonly PromptPosition[] | null,
): (PromptLogprobEntry | null)[] | null =>
  spec.promptLogprobs !== null && scores
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
            e[String(id)] = { logprob: clamp(lp), rank: r + 1, decoded_token: tokenText(tok, id) };
          }
        });
        return e;
      }),
    ]
    : null;

/**
 * One choice: sample `j` of prompt `p`. `promptLogprobs` is the rendered prompt_logprobs of its
 * prompt (shared by its n choices).
 */
export const renderChoice = (
  spec: CompletionSpec,
  tok: Tokenizer,
  p: number,
  j: number,
  r: SeqResult,
  scores: readonly PromptPosition[] | null,
  promptLogprobs: (PromptLogprobEntry | null)[] | null,
): CompletionChoice => {
  const prompt = spec.prompts[p];
  const show = (id: number): string => (spec.returnAsIds ? `token_id:${id}` : tokenText(tok, id));
  const promptText = spec.echo ? (prompt.text ?? decodeIds(tok, prompt.ids, false)) : "";
  let text = r.stopText ??
    decodeIds(
      tok,
      r.stoppedByToken && !spec.includeStop ? r.tokens.slice(0, -1) : r.tokens,
      spec.skipSpecial,
    );
  if (spec.echoOnly) text = promptText;
  else if (spec.echo) text = promptText + text;
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
      for (const s of scores ?? []) {
        const top: Record<string, number> = { [show(s.token)]: clamp(s.logprob) };
        for (const [id, v] of s.top.slice(0, k)) if (!(show(id) in top)) top[show(id)] = clamp(v);
        push(show(s.token), clamp(s.logprob), top);
      }
    }
    if (!spec.echoOnly) {
      r.tokens.forEach((t, i) => {
        const top: Record<string, number> = { [show(t)]: clamp(r.logprobs[i]) };
        for (const [id, v] of (r.tops[i] ?? []).slice(0, k)) {
          if (!(show(id) in top)) top[show(id)] = clamp(v);
        }
        push(show(t), clamp(r.logprobs[i]), top);
      });
    }
    logprobs = lp;
  }
  return {
    index: p * spec.n + j,
    text,
    logprobs,
    finish_reason: r.finishReason,
    stop_reason: r.stopReason,
    token_ids: spec.returnTokenIds ? [...r.tokens] : null,
    prompt_logprobs: promptLogprobs,
    prompt_token_ids: spec.returnTokenIds ? [...prompt.ids] : null,
  };
};

/** Token counts of a request's results. */
export const usageOf = (
  spec: CompletionSpec,
  results: readonly (readonly SeqResult[])[],
): Usage => {
  let promptTokens = 0;
  let completionTokens = 0;
  spec.prompts.forEach((prompt, p) => {
    promptTokens += prompt.ids.length;
    for (const r of results[p]) completionTokens += r.tokens.length;
  });
  return {
    prompt_tokens: promptTokens,
    completion_tokens: completionTokens,
    total_tokens: promptTokens + completionTokens,
    prompt_tokens_details: null,
  };
};

/** Renders finished sequences (results[p][j]) as the /v1/completions response (linear). */
export const renderCompletion = (
  spec: CompletionSpec,
  tok: Tokenizer,
  results: readonly (readonly SeqResult[])[],
  promptScores: readonly (readonly PromptPosition[] | null)[],
): CompletionResponse => {
  const choices: CompletionChoice[] = [];
  spec.prompts.forEach((_, p) => {
    const scores = promptScores[p] ?? null;
    const promptLogprobs = renderPromptLogprobs(spec, tok, scores);
    results[p].forEach((r, j) =>
      choices.push(renderChoice(spec, tok, p, j, r, scores, promptLogprobs))
    );
  });
  return {
    id: spec.id,
    object: "text_completion",
    created: spec.created,
    model: spec.model,
    choices,
    usage: usageOf(spec, results),
  };
};
