/**
 * Wire shapes of the vLLM-compatible server: request bodies as effect Schemas (decoded with
 * `decodeBody`, which turns any failure into a 400 naming the field), response types, and the
 * error envelope `{"error":{message,type,param,code}}` (vLLM >= 0.10.1).
 * @module
 */
import { Effect, Schema, SchemaIssue } from "effect";
import { messageOf, taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";

// ---- errors ----------------------------------------------------------------------------------

/** Fields of an {@link ApiError}. */
export interface ApiErrorFields {
  /** The HTTP status answered (also the envelope's `code`). */
  readonly status: number;
  /** The envelope's message, exactly as vLLM words it (clients match on it). */
  readonly reason: string;
  /** The request field at fault, or null. */
  readonly param: string | null;
}

const ApiErrorBase: TaggedErrorClass<"ApiError", ApiErrorFields> = taggedError(
  "ApiError",
  (e) => e.reason,
);
/**
 * An API error: rendered as the vLLM error envelope with `code` = HTTP status. Its message is the
 * envelope's, with no context added: the wire text is the datum.
 */
export class ApiError extends ApiErrorBase {}

/** 400 BadRequestError. */
export const badRequest = (reason: string, param: string | null = null): ApiError =>
  new ApiError({ status: 400, reason, param });

/** 404 NotFoundError. */
export const notFound = (reason: string, param: string | null = null): ApiError =>
  new ApiError({ status: 404, reason, param });

/** 500 InternalServerError. */
export const internalError = (reason: string): ApiError =>
  new ApiError({ status: 500, reason, param: null });

/** vLLM's error `type` for an HTTP status. */
export const errorType = (status: number): string =>
  status === 400
    ? "BadRequestError"
    : status === 401
    ? "AuthenticationError"
    : status === 404
    ? "NotFoundError"
    : status === 413
    ? "RequestEntityTooLarge"
    : status === 503
    ? "ServiceUnavailableError"
    : status >= 500
    ? "InternalServerError"
    : "BadRequestError";

/** The JSON error envelope. */
export interface ErrorEnvelope {
  readonly error: {
    readonly message: string;
    readonly type: string;
    readonly param: string | null;
    readonly code: number;
  };
}

/** Renders an ApiError as the envelope. */
export const errorEnvelope = (e: ApiError): ErrorEnvelope => ({
  error: { message: e.reason, type: errorType(e.status), param: e.param, code: e.status },
});

// ---- request bodies --------------------------------------------------------------------------

const opt = <S extends Schema.Constraint>(s: S) => Schema.optional(Schema.NullOr(s));

const TokenId = Schema.Int.check(Schema.isGreaterThanOrEqualTo(0));

/** A prompt: one string, strings, one token-id list, or token-id lists (ids >= 0, as vLLM). */
export const PromptInput = Schema.Union([
  Schema.String,
  Schema.Array(Schema.String),
  Schema.Array(TokenId),
  Schema.Array(Schema.Array(TokenId)),
]);

/** A seed: an integer, or a bigint for integers beyond 2^53 (see `parseJson`). */
const Seed = Schema.Union([Schema.Int, Schema.BigInt]);

/** stream_options of a streamed request. */
export const StreamOptions = Schema.Struct({
  include_usage: opt(Schema.Boolean),
  continuous_usage_stats: opt(Schema.Boolean),
});

/**
 * POST /v1/completions: the fields vLLM accepts. Unknown fields are ignored like vLLM does; every
 * vLLM field is implemented or refused by `normalizeCompletion` (completion.ts), none ignored.
 */
export const CompletionRequest = Schema.Struct({
  model: opt(Schema.String),
  prompt: PromptInput,
  max_tokens: opt(Schema.Int),
  n: opt(Schema.Int),
  best_of: opt(Schema.Int),
  temperature: opt(Schema.Number),
  top_p: opt(Schema.Number),
  top_k: opt(Schema.Int),
  min_p: opt(Schema.Number),
  seed: opt(Seed),
  logprobs: opt(Schema.Int),
  prompt_logprobs: opt(Schema.Int),
  echo: opt(Schema.Boolean),
  stream: opt(Schema.Boolean),
  stream_options: opt(StreamOptions),
  use_beam_search: opt(Schema.Boolean),
  truncate_prompt_tokens: opt(Schema.Int),
  truncation_side: opt(Schema.Literals(["left", "right"])),
  allowed_token_ids: opt(Schema.Array(Schema.Int)),
  bad_words: opt(Schema.Array(Schema.String)),
  session_id: opt(Schema.String),
  // vLLM fields this server refuses when set (normalizeCompletion names them)
  prompt_embeds: opt(Schema.Unknown),
  response_format: opt(Schema.Unknown),
  structured_outputs: opt(Schema.Unknown),
  logprob_token_ids: opt(Schema.Unknown),
  kv_transfer_params: opt(Schema.Unknown),
  ec_transfer_params: opt(Schema.Unknown),
  vllm_xargs: opt(Schema.Unknown),
  repetition_detection: opt(Schema.Unknown),
  thinking_token_budget: opt(Schema.Unknown),
  watermarking: opt(Schema.Unknown),
  return_tokens_as_token_ids: opt(Schema.Boolean),
  return_token_ids: opt(Schema.Boolean),
  stop: opt(Schema.Union([Schema.String, Schema.Array(Schema.String)])),
  stop_token_ids: opt(Schema.Array(Schema.Int)),
  include_stop_str_in_output: opt(Schema.Boolean),
  ignore_eos: opt(Schema.Boolean),
  min_tokens: opt(Schema.Int),
  skip_special_tokens: opt(Schema.Boolean),
  spaces_between_special_tokens: opt(Schema.Boolean),
  add_special_tokens: opt(Schema.Boolean),
  cache_salt: opt(Schema.String),
  presence_penalty: opt(Schema.Number),
  frequency_penalty: opt(Schema.Number),
  repetition_penalty: opt(Schema.Number),
  length_penalty: opt(Schema.Number),
  logit_bias: opt(Schema.Record(Schema.String, Schema.Number)),
  suffix: opt(Schema.String),
  user: opt(Schema.String),
  priority: opt(Schema.Int),
  request_id: opt(Schema.String),
});
/** Decoded /v1/completions body. */
export type CompletionRequest = typeof CompletionRequest.Type;

/** POST /tokenize. */
export const TokenizeRequest = Schema.Struct({
  model: opt(Schema.String),
  prompt: Schema.String,
  add_special_tokens: opt(Schema.Boolean),
  return_token_strs: opt(Schema.Boolean),
});
/** Decoded /tokenize body. */
export type TokenizeRequest = typeof TokenizeRequest.Type;

/** POST /tokenize, chat form (vLLM's TokenizeChatRequest). */
export const TokenizeChatRequest = Schema.Struct({
  model: opt(Schema.String),
  messages: Schema.Array(Schema.Record(Schema.String, Schema.Unknown)),
  add_generation_prompt: opt(Schema.Boolean),
  continue_final_message: opt(Schema.Boolean),
  add_special_tokens: opt(Schema.Boolean),
  return_token_strs: opt(Schema.Boolean),
  chat_template_kwargs: opt(Schema.Record(Schema.String, Schema.Unknown)),
});

/** POST /detokenize. */
export const DetokenizeRequest = Schema.Struct({
  model: opt(Schema.String),
  tokens: Schema.Array(Schema.Int),
});
/** Decoded /detokenize body. */
export type DetokenizeRequest = typeof DetokenizeRequest.Type;

/** POST /v1/load_lora_adapter (missing names are checked by the handler: vLLM's 400 text). */
export const LoadLoraRequest = Schema.Struct({
  lora_name: opt(Schema.String),
  lora_path: opt(Schema.String),
  load_inplace: opt(Schema.Boolean),
});
/** Decoded /v1/load_lora_adapter body. */
export type LoadLoraRequest = typeof LoadLoraRequest.Type;

/** POST /v1/unload_lora_adapter. */
export const UnloadLoraRequest = Schema.Struct({
  lora_name: opt(Schema.String),
  lora_int_id: opt(Schema.Int),
});
/** Decoded /v1/unload_lora_adapter body. */
export type UnloadLoraRequest = typeof UnloadLoraRequest.Type;

/** POST /collective_rpc (dev mode). */
export const CollectiveRpcRequest = Schema.Struct({
  method: Schema.String,
  args: opt(Schema.Array(Schema.Unknown)),
  kwargs: opt(Schema.Record(Schema.String, Schema.Unknown)),
  timeout: opt(Schema.Number),
});
/** Decoded /collective_rpc body. */
export type CollectiveRpcRequest = typeof CollectiveRpcRequest.Type;

/** kwargs of collective_rpc "reload_weights". */
export const ReloadWeightsKwargs = Schema.Struct({
  weights_path: opt(Schema.String),
  is_checkpoint_format: opt(Schema.Boolean),
});

const formatter = SchemaIssue.makeFormatterStandardSchemaV1();

const pathText = (path: ReadonlyArray<unknown>): string =>
  path.map((p, i) =>
    typeof p === "number"
      ? `[${p}]`
      : i === 0
      ? String(p)
      : `.${String((p as { key?: unknown })?.key ?? p)}`
  ).join("");

/** Turns a SchemaError into a 400 naming the first offending field. */
export const schemaErrorToApi = (e: Schema.SchemaError, prefix = ""): ApiError => {
  const issues = formatter(e.issue).issues;
  const first = issues[0];
  if (!first) return badRequest(`invalid request: ${e.message}`);
  const path = (first.path ?? []).map((p) =>
    typeof p === "object" && p !== null && "key" in p ? (p as { key: PropertyKey }).key : p
  );
  const field = prefix + pathText(path);
  const all = [
    ...new Set(
      issues.filter((i) => pathText(i.path ?? []) === pathText(first.path ?? [])).map((i) =>
        i.message
      ),
    ),
  ];
  return badRequest(
    field
      ? `invalid field '${field}': ${all.join("; ")}`
      : `invalid request body: ${all.join("; ")}`,
    field || null,
  );
};

/**
 * JSON.parse keeping an integer `seed` beyond 2^53 exact (a bigint from its source text): vLLM
 * accepts any int64 seed, and a rounded one would silently change the sampled stream.
 */
const seedReviver = function (
  this: unknown,
  key: string,
  value: unknown,
  context?: { source?: string },
): unknown {
  if (
    key === "seed" && typeof value === "number" && !Number.isSafeInteger(value) &&
    typeof context?.source === "string" && /^-?\d+$/.test(context.source)
  ) return BigInt(context.source);
  return value;
};

/** Where a JSON syntax error is (never the text itself: bodies and files are not echoed). */
export const jsonErrorText = (e: unknown): string => {
  const m = /position (\d+)/.exec(messageOf(e));
  return m ? `invalid JSON at position ${m[1]}` : "invalid JSON";
};

/** Parses a JSON body text: malformed JSON -> 400. */
export const parseJson = (text: string): Effect.Effect<unknown, ApiError> =>
  Effect.try({
    try: () => (text.trim() === "" ? undefined : JSON.parse(text, seedReviver as never)) as unknown,
    catch: (e) => badRequest(`JSON decode error: ${jsonErrorText(e)}`),
  }).pipe(
    Effect.flatMap((v) =>
      v === undefined
        ? Effect.fail(badRequest("request body is empty: expected a JSON object"))
        : Effect.succeed(v)
    ),
  );

/** Decodes a parsed JSON value with `schema`; any failure is a 400 naming the field. */
export const decodeBody = <S extends Schema.ConstraintDecoder<unknown>>(
  schema: S,
  json: unknown,
  prefix = "",
): Effect.Effect<S["Type"], ApiError> =>
  typeof json !== "object" || json === null || Array.isArray(json)
    ? Effect.fail(badRequest(`${prefix || "request body"} must be a JSON object`, prefix || null))
    : (Schema.decodeUnknownEffect(schema)(json, { errors: "all" }) as Effect.Effect<
      S["Type"],
      Schema.SchemaError
    >).pipe(Effect.mapError((e) => schemaErrorToApi(e, prefix ? `${prefix}.` : "")));

// ---- responses -------------------------------------------------------------------------------

/** The OpenAI/vLLM logprobs object of a completion choice. */
export interface CompletionLogprobs {
  readonly text_offset: number[];
  readonly token_logprobs: (number | null)[];
  readonly tokens: string[];
  readonly top_logprobs: (Record<string, number> | null)[];
}

/** One prompt position of `prompt_logprobs`. */
export type PromptLogprobEntry = Record<
  string,
  { readonly logprob: number; readonly rank: number; readonly decoded_token: string }
>;

/** One choice of a completion. */
export interface CompletionChoice {
  readonly index: number;
  readonly text: string;
  readonly logprobs: CompletionLogprobs | null;
  readonly finish_reason: "stop" | "length" | "abort" | null;
  readonly stop_reason: number | string | null;
  readonly token_ids: number[] | null;
  readonly prompt_logprobs: (PromptLogprobEntry | null)[] | null;
  readonly prompt_token_ids: number[] | null;
}

/** Token counts of a completion. */
export interface Usage {
  readonly prompt_tokens: number;
  readonly completion_tokens: number;
  readonly total_tokens: number;
  readonly prompt_tokens_details: null;
}

/** The /v1/completions response. */
export interface CompletionResponse {
  readonly id: string;
  readonly object: "text_completion";
  readonly created: number;
  readonly model: string;
  readonly choices: CompletionChoice[];
  readonly usage: Usage;
}

/** One card of GET /v1/models. */
export interface ModelCard {
  readonly id: string;
  readonly object: "model";
  readonly created: number;
  readonly owned_by: "vllm";
  readonly root: string;
  readonly parent: string | null;
  readonly max_model_len: number | null;
}
