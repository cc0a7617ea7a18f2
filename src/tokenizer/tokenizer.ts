/**
 * Tokenizers: the `Tokenizer` interface every model uses, and `CharTokenizer`, a character-level
 * tokenizer over a fixed alphabet for small models trained from scratch. Hugging Face
 * `tokenizer.json` BPE tokenizers (byte-level: Llama-3, Qwen, DeepSeek-V3, GPT-4o;
 * SentencePiece-style with byte fallback: Llama-2, Gemma-2, Gemma-3) live in `./bpe.ts`, which
 * also has `loadTokenizer(dir)`.
 *
 * Conventions shared by all tokenizers:
 * - `encode` never adds BOS/EOS; callers prepend `bosId` (when not null) and append `eosId`.
 * - `decode` skips special tokens unless `{ skipSpecialTokens: false }` is passed.
 * - `tokenText(id)` is the display string of one token (special tokens show their literal
 *   content, e.g. `<eos>`), as used for vLLM-style logprob `tokens`.
 * - Failures (unknown characters, unknown ids, malformed JSON) throw `TokenizerError`
 *   synchronously; loading from disk returns it in the Effect error channel.
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";

/** A tokenizer failure. `reason` names the problem (and the JSON field, for malformed files). */
const TokenizerErrorBase: TaggedErrorClass<"TokenizerError", {
  readonly reason: string;
  /** UTF-16 offset in the text (encode), or index in the id array (decode). */
  readonly position?: number;
  /** The offending character (encode). */
  readonly char?: string;
  /** The offending JSON field path, e.g. `model.merges[12]` (fromJSON / loadTokenizer). */
  readonly field?: string;
}> = taggedError(
  "TokenizerError",
  (e) => e.reason,
);
export class TokenizerError extends TokenizerErrorBase {}

/** Text <-> token ids. */
export interface Tokenizer {
  /** One past the largest token id. */
  readonly vocabSize: number;
  /** Beginning-of-sequence id, or null when the model uses none (e.g. Qwen2). */
  readonly bosId: number | null;
  readonly eosId: number;
  readonly padId: number;
  /** Token ids of `text`; never adds BOS/EOS. */
  encode(text: string): number[];
  /** Text of `ids`; special tokens are skipped. */
  decode(ids: readonly number[]): string;
  /** Display string of one token (special tokens: their literal content). */
  tokenText(id: number): string;
}

/** Options of `decode`. */
export interface DecodeOptions {
  /** Skip special tokens (default true). */
  readonly skipSpecialTokens?: boolean;
}

/** The JSON form of a CharTokenizer (written as `tokenizer.json` next to a model). */
export interface CharTokenizerJSON {
  readonly version: "1.0";
  readonly added_tokens: ReadonlyArray<
    { readonly id: number; readonly content: string; readonly special: true }
  >;
  readonly model: { readonly type: "lorafold-char"; readonly alphabet: readonly string[] };
}

const SPECIALS = ["<pad>", "<bos>", "<eos>"] as const;

/**
 * Character tokenizer: `<pad>`=0, `<bos>`=1, `<eos>`=2, then one id per alphabet character (by
 * Unicode code point) in the order given.
 */
export class CharTokenizer implements Tokenizer {
  static readonly MODEL_TYPE = "lorafold-char";
  readonly padId = 0;
  readonly bosId = 1;
  readonly eosId = 2;
  readonly vocabSize: number;
  /** The alphabet, one code point per entry. */
  readonly alphabet: readonly string[];
  readonly #ids = new Map<string, number>();

  /** `alphabet`: a string (split by code point) or an array of single code points. */
  constructor(alphabet: string | readonly string[]) {
    const chars = typeof alphabet === "string" ? Array.from(alphabet) : [...alphabet];
    chars.forEach((c, i) => {
      if (typeof c !== "string" || Array.from(c).length !== 1) {
        throw new TokenizerError({
          reason: `alphabet[${i}] is not a single character`,
          field: `model.alphabet[${i}]`,
        });
      }
      if (this.#ids.has(c)) {
        throw new TokenizerError({
          reason: `alphabet[${i}] duplicates character ${JSON.stringify(c)}`,
          char: c,
          field: `model.alphabet[${i}]`,
        });
      }
      this.#ids.set(c, SPECIALS.length + i);
    });
    this.alphabet = chars;
    this.vocabSize = SPECIALS.length + chars.length;
  }

  encode(text: string): number[] {
    const out: number[] = [];
    let pos = 0;
    for (const c of text) {
      const id = this.#ids.get(c);
      if (id === undefined) {
        throw new TokenizerError({
          reason: `character ${JSON.stringify(c)} at offset ${pos} is outside the alphabet`,
          position: pos,
          char: c,
        });
      }
      out.push(id);
      pos += c.length;
    }
    return out;
  }

  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    const skip = options.skipSpecialTokens ?? true;
    let s = "";
    ids.forEach((id, i) => {
      if (id < SPECIALS.length && id >= 0 && Number.isInteger(id)) {
        if (!skip) s += SPECIALS[id];
      } else s += this.#text(id, i);
    });
    return s;
  }

  tokenText(id: number): string {
    return id >= 0 && id < SPECIALS.length && Number.isInteger(id)
      ? SPECIALS[id]
      : this.#text(id, 0);
  }

  #text(id: number, position: number): string {
    const c = Number.isInteger(id) ? this.alphabet[id - SPECIALS.length] : undefined;
    if (c === undefined) {
      throw new TokenizerError({
        reason: `unknown token id ${id} (vocabSize ${this.vocabSize})`,
        position,
      });
    }
    return c;
  }

  toJSON(): CharTokenizerJSON {
    return {
      version: "1.0",
      added_tokens: SPECIALS.map((content, id) => ({ id, content, special: true as const })),
      model: { type: "lorafold-char", alphabet: [...this.alphabet] },
    };
  }

  /** Parses the `toJSON` form; `model.alphabet` may also be a plain string. */
  static fromJSON(json: unknown): CharTokenizer {
    const model = isRecord(json) ? json.model : undefined;
    if (!isRecord(model)) {
      throw new TokenizerError({
        reason: isRecord(json) ? "model missing" : "tokenizer JSON is not an object",
        field: "model",
      });
    }
    if (model.type !== CharTokenizer.MODEL_TYPE) {
      throw new TokenizerError({
        reason: `model.type: expected "${CharTokenizer.MODEL_TYPE}", got ${
          JSON.stringify(model.type)
        }`,
        field: "model.type",
      });
    }
    const alphabet = model.alphabet;
    if (alphabet === undefined) {
      throw new TokenizerError({ reason: "model.alphabet missing", field: "model.alphabet" });
    }
    if (typeof alphabet !== "string" && !Array.isArray(alphabet)) {
      throw new TokenizerError({
        reason: "model.alphabet is not a string or an array of characters",
        field: "model.alphabet",
      });
    }
    return new CharTokenizer(alphabet as string | string[]);
  }
}

/** @internal */
export const isRecord = (x: unknown): x is Record<string, unknown> =>
  typeof x === "object" && x !== null && !Array.isArray(x);
