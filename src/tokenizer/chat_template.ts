/**
 * Chat templates: the Jinja `chat_template` a model ships in `tokenizer_config.json` (or in a
 * `chat_template.jinja` file beside it), rendered with `@huggingface/jinja` the way Hugging Face's
 * `apply_chat_template(tokenize=False)` does: the messages, `add_generation_prompt`, the special
 * tokens' strings (`bos_token`, `eos_token`, ...) and any extra keyword arguments the template reads
 * (`enable_thinking`, ...).
 *
 * A rendered prompt already holds every special token the template wants (Llama-3's template
 * starts with `bos_token`), so it is tokenized without adding any: TRL does the same
 * (`add_special_tokens=False`).
 * @module
 */
import { Template } from "@huggingface/jinja";
import { Effect } from "effect";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { messageOf, taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { isRecord } from "./tokenizer.ts";

/** One chat message; templates may read further fields (`reasoning_content`, `tool_calls`). */
export interface ChatMessage {
  readonly role: string;
  readonly content: string;
  readonly [field: string]: unknown;
}

/** How a conversation is rendered. */
export interface RenderOptions {
  /** Append the opening of an assistant turn (the prompt of a completion). Default true. */
  readonly addGenerationPrompt?: boolean;
  /** Further template variables, e.g. `{ enable_thinking: false }` (TRL `chat_template_kwargs`). */
  readonly kwargs?: Readonly<Record<string, unknown>>;
}

const ChatTemplateErrorBase: TaggedErrorClass<"ChatTemplateError", {
  /** Where the template came from (a file path), or `messages` for bad input. */
  readonly source: string;
  readonly reason: string;
}> = taggedError("ChatTemplateError", (e) => `chat template (${e.source}): ${e.reason}`);
/** A template that does not parse or fails to render, or messages it cannot take. */
export class ChatTemplateError extends ChatTemplateErrorBase {}

/** A parsed chat template with the special-token strings it is rendered with. */
export interface ChatTemplate {
  /** Where it came from, for messages. */
  readonly source: string;
  /** The template text. */
  readonly text: string;
  /** The conversation as text; throws ChatTemplateError when the template fails. */
  render(messages: readonly ChatMessage[], options?: RenderOptions): string;
}

/** The string of a special token in tokenizer_config.json: a string or `{ content: "..." }`. */
const tokenString = (v: unknown): string | null =>
  typeof v === "string" ? v : isRecord(v) && typeof v.content === "string" ? v.content : null;

const SPECIAL_KEYS = [
  "bos_token",
  "eos_token",
  "pad_token",
  "unk_token",
  "sep_token",
  "cls_token",
  "mask_token",
] as const;

/**
 * The chat template of a parsed tokenizer_config.json, or null when it has none. `chat_template`
 * may be one string or a list of `{ name, template }` (the one named `name`, default "default").
 */
export const chatTemplateFromConfig = (
  tokenizerConfig: unknown,
  source: string,
  options: { readonly text?: string; readonly name?: string } = {},
): ChatTemplate | null => {
  const cfg = isRecord(tokenizerConfig) ? tokenizerConfig : {};
  let text: string | null = options.text ?? null;
  if (text === null) {
    const raw = cfg.chat_template;
    if (typeof raw === "string") text = raw;
    else if (Array.isArray(raw)) {
      const want = options.name ?? "default";
      const hit = raw.find((t) => isRecord(t) && t.name === want);
      if (hit === undefined) {
        throw new ChatTemplateError({
          source,
          reason: `no template named "${want}" among ${
            raw.map((t) => JSON.stringify(isRecord(t) ? t.name : t)).join(", ")
          }`,
        });
      }
      text = typeof hit.template === "string" ? hit.template : null;
    } else if (raw !== undefined && raw !== null) {
      throw new ChatTemplateError({ source, reason: "chat_template is not a string or a list" });
    }
  }
  if (text === null) return null;
  let template: Template;
  try {
    template = new Template(text);
  } catch (e) {
    throw new ChatTemplateError({ source, reason: `does not parse: ${messageOf(e)}` });
  }
  const specials: Record<string, string> = {};
  for (const k of SPECIAL_KEYS) {
    const s = tokenString(cfg[k]);
    if (s !== null) specials[k] = s;
  }
  const body = text;
  return {
    source,
    text: body,
    render: (messages, o = {}) => {
      checkMessages(messages);
      try {
        return template.render({
          ...specials,
          ...(o.kwargs ?? {}),
          messages,
          add_generation_prompt: o.addGenerationPrompt ?? true,
        });
      } catch (e) {
        throw new ChatTemplateError({ source, reason: `failed to render: ${messageOf(e)}` });
      }
    },
  };
};

/** Throws ChatTemplateError unless `messages` is a non-empty list of {role, content} strings. */
export function checkMessages(messages: unknown): asserts messages is readonly ChatMessage[] {
  const bad = (reason: string) => new ChatTemplateError({ source: "messages", reason });
  if (!Array.isArray(messages)) throw bad("a conversation must be a list of messages");
  if (messages.length === 0) throw bad("a conversation has no messages");
  messages.forEach((m, i) => {
    if (!isRecord(m)) throw bad(`message ${i} is not an object`);
    if (typeof m.role !== "string") throw bad(`message ${i} has no string "role"`);
    if (typeof m.content !== "string") throw bad(`message ${i} has no string "content"`);
  });
}

/**
 * The chat template of a model directory: `chat_template.jinja` when present (newer
 * transformers write it there), else `chat_template` in `tokenizer_config.json`; `path` names a
 * template file that replaces both. Null when the model has none.
 */
export const loadChatTemplate = (
  dir: string,
  path: string | null = null,
): Effect.Effect<ChatTemplate | null, ChatTemplateError> =>
  Effect.gen(function* () {
    const read = (p: string) =>
      Effect.promise(() => readFile(p, "utf8").then((t) => t as string | null, () => null));
    const configPath = join(dir, "tokenizer_config.json");
    const configText = yield* read(configPath);
    const config = configText === null ? {} : yield* Effect.try({
      try: () => JSON.parse(configText) as unknown,
      catch: (e) => new ChatTemplateError({ source: configPath, reason: messageOf(e) }),
    });
    let text: string | undefined;
    let source = configPath;
    for (const p of path === null ? [join(dir, "chat_template.jinja")] : [path]) {
      const t = yield* read(p);
      if (t !== null) [text, source] = [t, p];
      else if (path !== null) {
        return yield* Effect.fail(new ChatTemplateError({ source: p, reason: "cannot read it" }));
      }
    }
    return yield* Effect.try({
      try: () => chatTemplateFromConfig(config, source, { text }),
      catch: (e) =>
        e instanceof ChatTemplateError
          ? e
          : new ChatTemplateError({ source, reason: messageOf(e) }),
    });
  });
