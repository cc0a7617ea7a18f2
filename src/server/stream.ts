/**
 * Streamed completions (`stream: true`) as vLLM sends them: Server-Sent Events, one
 * `data: {chunk}` line per update and `data: [DONE]` at the end. A chunk is a
 * `text_completion` object whose choices carry only what is new since the previous chunk (text,
 * logprobs entries, token_ids; prompt_token_ids in a choice's first chunk), `finish_reason` and
 * `stop_reason` in its last one; with `stream_options.include_usage` a final chunk with no
 * choices carries the usage (with `continuous_usage_stats` every chunk carries it).
 *
 * Deltas are differences of renderings: each update renders the choice as it stands (completion.ts
 * `renderChoice`, with text that may still become part of a stop string, or an incomplete
 * character, held back) and sends what lies beyond what was sent; the last chunk of a choice is
 * the difference to the final response, so the concatenated deltas equal the non-streamed answer.
 * @module
 */
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import { type CompletionSpec, renderChoice, type SeqResult } from "./completion.ts";
import type { SeqView } from "./scheduler.ts";
import type { CompletionChoice, CompletionLogprobs, CompletionResponse, Usage } from "./schemas.ts";
import { seqResult } from "./stop_rules.ts";

/** One choice of a streamed chunk. */
export interface StreamChoice {
  readonly index: number;
  readonly text: string;
  readonly logprobs: CompletionLogprobs | null;
  readonly finish_reason: CompletionChoice["finish_reason"];
  readonly stop_reason: number | string | null;
  readonly prompt_token_ids: number[] | null;
  readonly token_ids: number[] | null;
}

/** One streamed chunk. */
export interface StreamChunk {
  readonly id: string;
  readonly object: "text_completion";
  readonly created: number;
  readonly model: string;
  readonly choices: StreamChoice[];
  readonly usage: Usage | null;
}

interface Sent {
  chars: number;
  logprobs: number;
  tokens: number;
  started: boolean;
  finished: boolean;
}

const sliceLogprobs = (lp: CompletionLogprobs | null, from: number): CompletionLogprobs | null =>
  lp === null ? null : {
    text_offset: lp.text_offset.slice(from),
    token_logprobs: lp.token_logprobs.slice(from),
    tokens: lp.tokens.slice(from),
    top_logprobs: lp.top_logprobs.slice(from),
  };

/** The SSE framing of one event. */
export const sseEvent = (data: unknown): string =>
  `data: ${typeof data === "string" ? data : JSON.stringify(data)}\n\n`;

/** The SSE terminator vLLM sends. */
export const SSE_DONE = "data: [DONE]\n\n";

/** Turns a streamed request's progress into chunks (one per update with anything new). */
export class StreamRenderer {
  readonly spec: CompletionSpec;
  readonly tokenizer: Tokenizer;
  readonly #sent: Sent[];
  /** Characters that may still turn out to start a stop string (vLLM's output buffer). */
  readonly #holdBack: number;

  constructor(spec: CompletionSpec, tokenizer: Tokenizer) {
    this.spec = spec;
    this.tokenizer = tokenizer;
    this.#sent = Array.from(
      { length: spec.prompts.length * spec.n },
      () => ({ chars: 0, logprobs: 0, tokens: 0, started: false, finished: false }),
    );
    this.#holdBack = spec.stop.length > 0 && !spec.includeStop
      ? Math.max(...spec.stop.map((s) => s.length)) - 1
      : 0;
  }

  #chunk(choices: StreamChoice[], usage: Usage | null): StreamChunk {
    return {
      id: this.spec.id,
      object: "text_completion",
      created: this.spec.created,
      model: this.spec.model,
      choices,
      usage,
    };
  }

  #usageNow(seqs: readonly SeqView[]): Usage {
    const promptTokens = this.spec.prompts.reduce((a, p) => a + p.ids.length, 0);
    let completion = 0;
    for (const s of seqs) completion += s.state.tokens.length;
    return {
      prompt_tokens: promptTokens,
      completion_tokens: completion,
      total_tokens: promptTokens + completion,
      prompt_tokens_details: null,
    };
  }

  /** The delta of choice `full` beyond what was sent; null when there is nothing new. */
  #delta(full: CompletionChoice, final: boolean): StreamChoice | null {
    const sent = this.#sent[full.index];
    if (sent.finished) return null;
    let text = full.text;
    if (!final) {
      // hold back what may become a stop string, and an incomplete character
      text = text.slice(0, Math.max(sent.chars, text.length - this.#holdBack));
      while (text.length > sent.chars && text.endsWith("\ufffd")) text = text.slice(0, -1);
    }
    const dText = text.slice(sent.chars);
    const lpLen = full.logprobs?.tokens.length ?? 0;
    const tokLen = full.token_ids?.length ?? 0;
    const nothing = dText.length === 0 && lpLen <= sent.logprobs && tokLen <= sent.tokens &&
      sent.started;
    if (nothing && !final) return null;
    const out: StreamChoice = {
      index: full.index,
      text: dText,
      logprobs: sliceLogprobs(full.logprobs, sent.logprobs),
      finish_reason: final ? full.finish_reason : null,
      stop_reason: final ? full.stop_reason : null,
      prompt_token_ids: sent.started ? null : full.prompt_token_ids,
      token_ids: full.token_ids === null ? null : full.token_ids.slice(sent.tokens),
    };
    sent.chars += dText.length;
    sent.logprobs = Math.max(sent.logprobs, lpLen);
    sent.tokens = Math.max(sent.tokens, tokLen);
    sent.started = true;
    sent.finished = final;
    return out;
  }

  /** Chunks for the sequences' progress (finished sequences get their last chunk later). */
  progress(seqs: readonly SeqView[]): StreamChunk[] {
    const choices: StreamChoice[] = [];
    const spec = this.spec;
    // echo with logprobs: the prompt's entries come first, so everything waits for the end
    if (spec.echo && spec.logprobs !== null) return [];
    for (const s of seqs) {
      const r: SeqResult = seqResult(s.state);
      const full = renderChoice(spec, this.tokenizer, s.prompt, s.j, r, null, null);
      const d = this.#delta(full, false);
      if (d) choices.push(d);
    }
    if (choices.length === 0) return [];
    return [
      this.#chunk(choices, spec.stream?.continuousUsage ? this.#usageNow(seqs) : null),
    ];
  }

  /** The last chunks: every choice's remaining delta with its finish_reason, then the usage. */
  finish(res: CompletionResponse): StreamChunk[] {
    const choices: StreamChoice[] = [];
    for (const c of res.choices) {
      const d = this.#delta(c, true);
      if (d) choices.push(d);
    }
    const out: StreamChunk[] = [];
    if (choices.length > 0) {
      out.push(this.#chunk(choices, this.spec.stream?.continuousUsage ? res.usage : null));
    }
    if (this.spec.stream?.includeUsage) out.push(this.#chunk([], res.usage));
    return out;
  }
}
