/**
 * POST /v1/chat/completions as vLLM serves it: the messages are rendered with the model's chat
 * template (src/tokenizer/chat_template.ts: `tokenizer_config.json` / `chat_template.jinja`, or
 * `--chat-template`), tokenized without adding special tokens (the template holds them; vLLM's
 * `add_special_tokens` default for chat is false), and run as a completion of those token ids;
 * the answer is rendered as `chat.completion` (and streamed as `chat.completion.chunk`s). Fields
 * are vLLM's: `max_completion_tokens` (or the deprecated `max_tokens`; unset = what is left of the
 * context), `logprobs: true` with `top_logprobs: k`, `add_generation_prompt`,
 * `continue_final_message`, `chat_template_kwargs`, and the sampling extras shared with
 * completions. Tools, response formats and per-request templates are refused with a 400.
 * @module
 */
import { Effect, Schema } from "effect";
import { messageOf } from "../base/tagged_error.ts";
import type { ChatMessage, ChatTemplate } from "../tokenizer/chat_template.ts";
import type { CompletionSpec } from "./completion.ts";
import {
  type ApiError,
  badRequest,
  type CompletionLogprobs,
  type CompletionRequest,
  type CompletionResponse,
  type Usage,
} from "./schemas.ts";
import type { StreamChunk } from "./stream.ts";

const opt = <S extends Schema.Constraint>(s: S) => Schema.optional(Schema.NullOr(s));

/** POST /v1/chat/completions (the completion fields it shares are checked by completion.ts). */
export const ChatCompletionRequest = Schema.Struct({
  messages: Schema.Array(Schema.Record(Schema.String, Schema.Unknown)),
  model: opt(Schema.String),
  max_tokens: opt(Schema.Int),
  max_completion_tokens: opt(Schema.Int),
  logprobs: opt(Schema.Boolean),
  top_logprobs: opt(Schema.Int),
  add_generation_prompt: opt(Schema.Boolean),
  continue_final_message: opt(Schema.Boolean),
  add_special_tokens: opt(Schema.Boolean),
  chat_template_kwargs: opt(Schema.Record(Schema.String, Schema.Unknown)),
  echo: opt(Schema.Boolean),
  // refused when set
  tools: opt(Schema.Unknown),
  tool_choice: opt(Schema.Unknown),
  functions: opt(Schema.Unknown),
  function_call: opt(Schema.Unknown),
  chat_template: opt(Schema.Unknown),
  documents: opt(Schema.Unknown),
  mm_processor_kwargs: opt(Schema.Unknown),
  reasoning_effort: opt(Schema.Unknown),
});
/** Decoded chat body (its completion fields are read from the raw body). */
export type ChatCompletionRequest = typeof ChatCompletionRequest.Type;

/** Fields a chat body shares with /v1/completions (passed on as they are). */
const SHARED = [
  "model",
  "n",
  "temperature",
  "top_p",
  "top_k",
  "min_p",
  "seed",
  "stream",
  "stream_options",
  "stop",
  "stop_token_ids",
  "include_stop_str_in_output",
  "ignore_eos",
  "min_tokens",
  "skip_special_tokens",
  "spaces_between_special_tokens",
  "cache_salt",
  "presence_penalty",
  "frequency_penalty",
  "repetition_penalty",
  "length_penalty",
  "logit_bias",
  "allowed_token_ids",
  "bad_words",
  "truncate_prompt_tokens",
  "truncation_side",
  "use_beam_search",
  "prompt_logprobs",
  "return_token_ids",
  "return_tokens_as_token_ids",
  "request_id",
  "user",
  "priority",
  "best_of",
  "session_id",
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

const REFUSED = [
  "tools",
  "tool_choice",
  "functions",
  "function_call",
  "chat_template",
  "documents",
  "mm_processor_kwargs",
  "reasoning_effort",
] as const;

/** OpenAI content parts -> text (vLLM's "string" content format joins text parts with "\n"). */
const contentText = (content: unknown, i: number): Effect.Effect<string, ApiError> => {
  if (typeof content === "string") return Effect.succeed(content);
  if (content === null || content === undefined) return Effect.succeed("");
  if (Array.isArray(content)) {
    const parts: string[] = [];
    for (const p of content) {
      if (
        typeof p === "object" && p !== null && (p as { type?: unknown }).type === "text" &&
        typeof (p as { text?: unknown }).text === "string"
      ) {
        parts.push((p as { text: string }).text);
      } else {
        return Effect.fail(
          badRequest(`messages[${i}].content: only text parts are supported`, "messages"),
        );
      }
    }
    return Effect.succeed(parts.join("\n"));
  }
  return Effect.fail(
    badRequest(`messages[${i}].content must be a string or a list of parts`, "messages"),
  );
};

/** What a chat request becomes: a completion request of token ids, plus how to render it. */
export interface ChatPlan {
  readonly completion: CompletionRequest;
  /** top_logprobs when logprobs is true, else null. */
  readonly topLogprobs: number | null;
}

/**
 * Renders the conversation with `template` and builds the completion request it runs as
 * (vLLM's checks on the chat-only fields first).
 */
export const planChat = (
  req: ChatCompletionRequest,
  raw: Readonly<Record<string, unknown>>,
  template: ChatTemplate | null,
  encode: (text: string) => number[],
  bosId: number | null,
  maxModelLen: number,
): Effect.Effect<ChatPlan, ApiError> =>
  Effect.gen(function* () {
    for (const f of REFUSED) {
      if (raw[f] != null) {
        return yield* Effect.fail(badRequest(`${f} is not supported by the lorafold server`, f));
      }
    }
    if (req.echo === true) {
      return yield* Effect.fail(
        badRequest("echo is not supported by the lorafold server for chat completions", "echo"),
      );
    }
    const topLogprobs = req.top_logprobs ?? null;
    if (topLogprobs !== null && topLogprobs > 0 && req.logprobs !== true) {
      return yield* Effect.fail(
        badRequest("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs"),
      );
    }
    if (topLogprobs !== null && topLogprobs < 0 && topLogprobs !== -1) {
      return yield* Effect.fail(
        badRequest("`top_logprobs` must be a positive value or -1.", "top_logprobs"),
      );
    }
    const ids = yield* chatPromptIds(req, template, encode, bosId);
    const shared: Record<string, unknown> = {};
    for (const f of SHARED) if (raw[f] !== undefined) shared[f] = raw[f];
    const maxTokens = req.max_completion_tokens ?? req.max_tokens ??
      Math.max(1, maxModelLen - ids.length);
    const completion = {
      ...shared,
      prompt: ids.length > 0 ? ids : "",
      max_tokens: maxTokens,
      logprobs: req.logprobs === true ? (topLogprobs === -1 ? -1 : topLogprobs ?? 0) : null,
      add_special_tokens: false,
    } as unknown as CompletionRequest;
    return { completion, topLogprobs: req.logprobs === true ? topLogprobs ?? 0 : null };
  });

/** The fields of a conversation (chat completions and /tokenize's chat form). */
export interface ConversationFields {
  readonly messages: ReadonlyArray<Readonly<Record<string, unknown>>>;
  readonly add_generation_prompt?: boolean | null;
  readonly continue_final_message?: boolean | null;
  readonly add_special_tokens?: boolean | null;
  readonly chat_template_kwargs?: Readonly<Record<string, unknown>> | null;
}

/** The token ids of a conversation rendered with `template` (vLLM's chat preprocessing). */
export const chatPromptIds = (
  req: ConversationFields,
  template: ChatTemplate | null,
  encode: (text: string) => number[],
  bosId: number | null,
): Effect.Effect<number[], ApiError> =>
  Effect.gen(function* () {
    if (template === null) {
      return yield* Effect.fail(
        badRequest(
          "As of transformers v4.44, default chat template is no longer allowed, so you must " +
            "provide a chat template if the tokenizer does not define one.",
        ),
      );
    }
    const addGen = req.add_generation_prompt ?? true;
    const cont = req.continue_final_message ?? false;
    if (addGen && cont) {
      return yield* Effect.fail(
        badRequest(
          "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        ),
      );
    }
    if (req.messages.length === 0) {
      return yield* Effect.fail(badRequest("messages must not be empty", "messages"));
    }
    const messages: ChatMessage[] = [];
    for (const [i, m] of req.messages.entries()) {
      if (typeof m.role !== "string") {
        return yield* Effect.fail(badRequest(`messages[${i}].role must be a string`, "messages"));
      }
      messages.push({ ...m, role: m.role, content: yield* contentText(m.content, i) });
    }
    let text = yield* Effect.try({
      try: () =>
        template.render(messages, {
          addGenerationPrompt: addGen,
          kwargs: req.chat_template_kwargs ?? {},
        }),
      catch: (e) => badRequest(messageOf(e), "messages"),
    });
    if (cont) {
      // vLLM: the rendered conversation ends inside the final (assistant) message
      const last = messages[messages.length - 1].content;
      const at = last === "" ? -1 : text.lastIndexOf(last);
      if (at >= 0) text = text.slice(0, at + last.length);
    }
    return yield* Effect.try({
      try: () => [
        ...(req.add_special_tokens === true && bosId !== null ? [bosId] : []),
        ...encode(text),
      ],
      catch: (e) => badRequest(`cannot tokenize the conversation: ${messageOf(e)}`, "messages"),
    });
  });

/** One token of a chat logprobs object. */
export interface ChatTokenLogprob {
  readonly token: string;
  readonly logprob: number;
  readonly bytes: number[];
  readonly top_logprobs: { token: string; logprob: number; bytes: number[] }[];
}

const bytesOf = (s: string): number[] => Array.from(new TextEncoder().encode(s));

/** A completion logprobs object as chat's `{content: [...]}` (top_logprobs: the k best). */
export const chatLogprobs = (
  lp: CompletionLogprobs | null,
  k: number,
): { content: ChatTokenLogprob[] } | null =>
  lp === null ? null : {
    content: lp.tokens.map((token, i) => ({
      token,
      logprob: lp.token_logprobs[i] ?? -9999,
      bytes: bytesOf(token),
      top_logprobs: Object.entries(lp.top_logprobs[i] ?? {})
        .sort((a, b) => b[1] - a[1])
        .slice(0, k)
        .map(([t, v]) => ({ token: t, logprob: v, bytes: bytesOf(t) })),
    })),
  };

/** The chat response of a finished completion. */
export const renderChat = (res: CompletionResponse, spec: CompletionSpec, k: number | null) => ({
  id: res.id.replace(/^cmpl-/, "chatcmpl-"),
  object: "chat.completion" as const,
  created: res.created,
  model: res.model,
  choices: res.choices.map((c) => ({
    index: c.index,
    message: { role: "assistant", content: c.text, reasoning_content: null, tool_calls: [] },
    logprobs: k === null ? null : chatLogprobs(c.logprobs, k),
    finish_reason: c.finish_reason,
    stop_reason: c.stop_reason,
    token_ids: c.token_ids,
  })),
  usage: res.usage,
  prompt_logprobs: res.choices[0]?.prompt_logprobs ?? null,
  prompt_token_ids: spec.returnTokenIds ? [...spec.prompts[0].ids] : null,
});

/** Turns completion stream chunks into `chat.completion.chunk`s (role in each choice's first). */
export class ChatStreamMapper {
  readonly #started = new Set<number>();
  readonly #k: number | null;

  constructor(k: number | null) {
    this.#k = k;
  }

  map(chunk: StreamChunk): {
    id: string;
    object: "chat.completion.chunk";
    created: number;
    model: string;
    choices: unknown[];
    usage: Usage | null;
  } {
    return {
      id: chunk.id.replace(/^cmpl-/, "chatcmpl-"),
      object: "chat.completion.chunk",
      created: chunk.created,
      model: chunk.model,
      choices: chunk.choices.map((c) => {
        const first = !this.#started.has(c.index);
        this.#started.add(c.index);
        return {
          index: c.index,
          delta: first ? { role: "assistant", content: c.text } : { content: c.text },
          logprobs: this.#k === null ? null : chatLogprobs(c.logprobs, this.#k),
          finish_reason: c.finish_reason,
          stop_reason: c.stop_reason,
          token_ids: c.token_ids,
        };
      }),
      usage: chunk.usage,
    };
  }
}
