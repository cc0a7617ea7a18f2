/**
 * Hugging Face `tokenizer.json` BPE tokenizers (byte-level: Llama-3, Qwen2/3, DeepSeek-V3,
 * GPT-4o, GPT-2, SmolLM2; SentencePiece-style with byte fallback: Llama-2, Mistral, Gemma-2,
 * Gemma-3), and `loadTokenizer(dir)`, which picks the char or BPE tokenizer for a model directory.
 *
 * The BPE model, the added-token matching and the decoders are Hugging Face's
 * `@huggingface/tokenizers` (pure TypeScript), which also translates the files' Oniguruma regexes
 * to JavaScript. Normalizers and pre-tokenizers are this module's, written to the Rust library's
 * semantics where the TypeScript port departs from them (split behaviors and `invert`, `Digits`
 * on all numeric characters, `Strip` on Unicode White_Space, `Prepend` leaving "" alone,
 * `Lowercase` per character, the GPT-2 regex's `\s`), and so is the ByteFallback decoder's
 * handling of invalid UTF-8 (one U+FFFD a byte). Ids and decodes equal Hugging Face's Rust
 * `tokenizers` on every string of `tests/fixtures/tokenizer/corpus.jsonl` for seven real files
 * and on 14 variants of them (`tests/tokenizer_hf_test.ts`).
 *
 * Supported `tokenizer.json` parts (anything else is a `TokenizerError` naming the field):
 * - `model`: `type: "BPE"`, `vocab`, `merges` (`"a b"` strings or `["a", "b"]` pairs),
 *   `unk_token`, `byte_fallback`, `ignore_merges`, `fuse_unk` (only where every byte that byte
 *   fallback can need has a token, so no unknown symbol can occur). `dropout` is ignored:
 *   encoding is deterministic.
 * - `added_tokens`: matched before normalization (or after it, with `normalized: true`), longest
 *   first; `lstrip` / `rstrip` supported, `single_word: true` refused.
 * - `normalizer`: NFC, NFD, NFKC, NFKD, Lowercase, Prepend, Replace, Strip, Sequence.
 * - `pre_tokenizer`: ByteLevel, Split (every behavior, `invert`), Digits, Sequence.
 * - `decoder`: ByteLevel, Replace, ByteFallback, Fuse, Strip, Sequence (required).
 * - `post_processor` is read only to find the default BOS; `truncation` and `padding` are
 *   ignored (as transformers does for calls that do not ask for them).
 *
 * Input text is made well-formed first: a lone surrogate becomes U+FFFD before anything else, as
 * when a string reaches the Rust library. A symbol with no vocab entry, no byte fallback and no
 * `unk_token` is dropped, as Hugging Face does.
 * @module
 */
import { messageOf } from "../base/tagged_error.ts";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import {
  ReplaceNormalizer,
  SplitPreTokenizer,
  Tokenizer as HfLibTokenizer,
} from "@huggingface/tokenizers";
import { Effect } from "effect";
import {
  CharTokenizer,
  type DecodeOptions,
  isRecord,
  type Tokenizer,
  TokenizerError,
} from "./tokenizer.ts";

/** GPT-2 `bytes_to_unicode`: byte -> printable character. */
export const BYTE_TO_CHAR: readonly string[] = (() => {
  const table: string[] = new Array(256);
  const printable = (b: number) =>
    (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    table[b] = String.fromCharCode(printable(b) ? b : 256 + n++);
  }
  return table;
})();

/**
 * Special-token choices: a token string (looked up among added tokens, then the vocab) or an id.
 * `bos: null` means the model uses no BOS; `pad: null` (or absent) means pad = eos.
 */
export interface SpecialTokens {
  readonly bos?: string | number | null;
  readonly eos?: string | number;
  readonly pad?: string | number | null;
}

/** EOS candidates tried, in order, when neither the caller nor a config names one. */
export const DEFAULT_EOS_CANDIDATES: readonly string[] = [
  "<|endoftext|>",
  "<|end_of_text|>",
  "</s>",
  "<eos>",
  "<|im_end|>",
  "<|eot_id|>",
];

const fail = (field: string, reason: string): never => {
  throw new TokenizerError({ reason, field });
};

const show = (x: unknown): string => {
  const s = JSON.stringify(x);
  return s === undefined ? String(x) : s.length > 60 ? `${s.slice(0, 57)}...` : s;
};

const optBool = (o: Record<string, unknown>, key: string, dflt: boolean, field: string) => {
  const v = o[key];
  if (v === undefined || v === null) return dflt;
  return typeof v === "boolean" ? v : fail(`${field}.${key}`, `${field}.${key} is not a boolean`);
};

const optString = (o: Record<string, unknown>, key: string, field: string): string | null => {
  const v = o[key];
  if (v === undefined || v === null) return null;
  return typeof v === "string" ? v : fail(`${field}.${key}`, `${field}.${key} is not a string`);
};

const requireType = (x: unknown, field: string): Record<string, unknown> => {
  if (!isRecord(x)) return fail(field, `${field} is not an object`);
  if (typeof x.type !== "string") return fail(`${field}.type`, `${field}.type is not a string`);
  return x;
};

const unsupported = (field: string, what: string, type: unknown): never =>
  fail(`${field}.type`, `${field}.type: unsupported ${what} ${show(type)}`);

// ---------------------------------------------------------------------------------------------
// Patterns and splitting (the Rust library's `NormalizedString::split`)

const escapeRegex = (s: string) => s.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");

/**
 * A `{"Regex": ...}` or `{"String": ...}` pattern as a global unicode RegExp; regexes go through
 * `@huggingface/tokenizers`' Oniguruma translation. null: the empty string (matches nothing).
 */
const compilePattern = (pattern: unknown, field: string): RegExp | null => {
  if (isRecord(pattern) && typeof pattern.Regex === "string") {
    const source = pattern.Regex;
    let re: RegExp | null = null;
    try {
      re = new SplitPreTokenizer({
        type: "Split",
        pattern: { Regex: source },
        behavior: "Isolated",
        invert: false,
      }).pattern;
    } catch (e) {
      fail(`${field}.Regex`, `${field}.Regex: unsupported regex ${show(source)}: ${messageOf(e)}`);
    }
    return re ?? fail(`${field}.Regex`, `${field}.Regex: unsupported regex ${show(source)}`);
  }
  if (isRecord(pattern) && typeof pattern.String === "string") {
    return pattern.String === "" ? null : new RegExp(escapeRegex(pattern.String), "gu");
  }
  return fail(field, `${field} is not {"Regex": string} or {"String": string}`);
};

/** One span of a split: [start, end) in UTF-16 units, and whether the pattern matched it. */
type Span = readonly [start: number, end: number, isMatch: boolean];

/**
 * Matches of `re` in `s` and the gaps between them, covering `s` (Rust `Pattern::find_matches`
 * over Oniguruma's `find_iter`: an empty match right after a match is skipped).
 */
const findMatches = (s: string, re: RegExp | null): Span[] => {
  if (re === null || s === "") return [[0, s.length, false]];
  const out: Span[] = [];
  let prev = 0;
  let lastMatchEnd = -1;
  re.lastIndex = 0;
  for (let m = re.exec(s); m !== null; m = re.exec(s)) {
    const start = m.index;
    const end = start + m[0].length;
    if (start === end) {
      re.lastIndex = end + ((s.codePointAt(end) ?? 0) > 0xffff ? 2 : 1);
      if (end === lastMatchEnd) continue;
    }
    if (prev !== start) out.push([prev, start, false]);
    out.push([start, end, true]);
    prev = end;
    lastMatchEnd = end;
    if (re.lastIndex > s.length) break;
  }
  if (prev !== s.length) out.push([prev, s.length, false]);
  return out;
};

type Behavior = "Removed" | "Isolated" | "MergedWithPrevious" | "MergedWithNext" | "Contiguous";
const BEHAVIORS: readonly Behavior[] = [
  "Removed",
  "Isolated",
  "MergedWithPrevious",
  "MergedWithNext",
  "Contiguous",
];

/** Rust `NormalizedString::split(pattern, behavior)` (with `Invert` when `invert`). */
const splitWith = (s: string, re: RegExp | null, behavior: Behavior, invert: boolean): string[] => {
  const spans = findMatches(s, re).map(([a, b, m]) => [a, b, invert ? !m : m] as const);
  const kept: [number, number][] = [];
  switch (behavior) {
    case "Isolated":
      for (const [a, b] of spans) kept.push([a, b]);
      break;
    case "Removed":
      for (const [a, b, m] of spans) if (!m) kept.push([a, b]);
      break;
    case "Contiguous": {
      let prev = false;
      for (const [a, b, m] of spans) {
        if (m === prev && kept.length > 0) kept[kept.length - 1][1] = b;
        else kept.push([a, b]);
        prev = m;
      }
      break;
    }
    case "MergedWithPrevious": {
      let prev = false;
      for (const [a, b, m] of spans) {
        if (m && !prev && kept.length > 0) kept[kept.length - 1][1] = b;
        else kept.push([a, b]);
        prev = m;
      }
      break;
    }
    case "MergedWithNext": {
      let prev = false;
      for (let k = spans.length - 1; k >= 0; k--) {
        const [a, b, m] = spans[k];
        if (m && !prev && kept.length > 0) kept[kept.length - 1][0] = a;
        else kept.push([a, b]);
        prev = m;
      }
      kept.reverse();
      break;
    }
  }
  const out: string[] = [];
  for (const [a, b] of kept) if (b > a) out.push(s.slice(a, b));
  return out;
};

// ---------------------------------------------------------------------------------------------
// Normalizers and pre-tokenizers

type Normalize = (s: string) => string;
type PreTokenize = (pieces: string[]) => string[];

const LEADING_WS = /^\p{White_Space}+/u;
const TRAILING_WS = /\p{White_Space}+$/u;

const parseNormalizer = (x: unknown, field: string): Normalize | null => {
  if (x === null || x === undefined) return null;
  const n = requireType(x, field);
  switch (n.type) {
    case "NFC":
    case "NFD":
    case "NFKC":
    case "NFKD": {
      const form = n.type;
      return (s) => s.normalize(form);
    }
    case "Lowercase":
      // Per character, as Rust's `char::to_lowercase` (no final-sigma context).
      return (s) => {
        let out = "";
        for (const c of s) out += c.toLowerCase();
        return out;
      };
    case "Prepend": {
      const prepend = optString(n, "prepend", field) ?? "";
      return (s) => s === "" ? s : prepend + s;
    }
    case "Replace": {
      compilePattern(n.pattern, `${field}.pattern`); // field-named errors
      const content = optString(n, "content", field) ?? "";
      const re = new ReplaceNormalizer(n as never).pattern;
      return re === null ? null : (s) => s.replace(re, () => content);
    }
    case "Strip": {
      const left = optBool(n, "strip_left", false, field);
      const right = optBool(n, "strip_right", false, field);
      return (s) => {
        const a = left ? s.replace(LEADING_WS, "") : s;
        return right ? a.replace(TRAILING_WS, "") : a;
      };
    }
    case "Sequence": {
      if (!Array.isArray(n.normalizers)) {
        return fail(`${field}.normalizers`, `${field}.normalizers is not an array`);
      }
      const fs = n.normalizers.map((m, i) => parseNormalizer(m, `${field}.normalizers[${i}]`))
        .filter((f): f is Normalize => f !== null);
      return fs.length === 0 ? null : (s) => fs.reduce((acc, f) => f(acc), s);
    }
    default:
      return unsupported(field, "normalizer", n.type);
  }
};

/** The GPT-2 pre-tokenization regex, used by ByteLevel pre-tokenizers with `use_regex`. */
const GPT2_REGEX =
  "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

const utf8 = new TextEncoder();
/** Text in byte-level form: one printable character per UTF-8 byte. */
const toByteLevel = (text: string): string => {
  let s = "";
  for (const b of utf8.encode(text)) s += BYTE_TO_CHAR[b];
  return s;
};

const parsePreTokenizer = (x: unknown, field: string): PreTokenize | null => {
  if (x === null || x === undefined) return null;
  const p = requireType(x, field);
  switch (p.type) {
    case "Sequence": {
      const list = p.pretokenizers;
      if (!Array.isArray(list)) {
        return fail(`${field}.pretokenizers`, `${field}.pretokenizers is not an array`);
      }
      const steps = list.map((q, i) => parsePreTokenizer(q, `${field}.pretokenizers[${i}]`))
        .filter((f): f is PreTokenize => f !== null);
      return (pieces) => steps.reduce((acc, f) => f(acc), pieces);
    }
    case "ByteLevel": {
      const prefix = optBool(p, "add_prefix_space", true, field);
      const re = optBool(p, "use_regex", true, field)
        ? compilePattern({ Regex: GPT2_REGEX }, field)
        : null;
      return (pieces) =>
        pieces.flatMap((piece) => {
          const s = prefix && !piece.startsWith(" ") ? ` ${piece}` : piece;
          return (re ? splitWith(s, re, "Isolated", false) : [s]).map(toByteLevel);
        });
    }
    case "Split": {
      const re = compilePattern(p.pattern, `${field}.pattern`);
      const behavior = (p.behavior ?? "Isolated") as Behavior;
      if (!BEHAVIORS.includes(behavior)) {
        return fail(`${field}.behavior`, `${field}.behavior: unsupported ${show(p.behavior)}`);
      }
      const invert = optBool(p, "invert", false, field);
      return (pieces) => pieces.flatMap((s) => splitWith(s, re, behavior, invert));
    }
    case "Digits": {
      // Rust: `char::is_numeric` (Nd, Nl, No), each digit alone or in runs.
      const individual = optBool(p, "individual_digits", false, field);
      const re = /\p{N}/gu;
      const behavior = individual ? "Isolated" : "Contiguous";
      return (pieces) => pieces.flatMap((s) => splitWith(s, re, behavior, false));
    }
    default:
      return unsupported(field, "pre-tokenizer", p.type);
  }
};

const DECODERS = new Set(["ByteLevel", "Replace", "ByteFallback", "Fuse", "Strip", "Sequence"]);

const checkDecoder = (x: unknown, field: string): void => {
  if (x === null || x === undefined) {
    fail(field, `${field} missing (needed to decode; supported: ${[...DECODERS].join(", ")})`);
  }
  const d = requireType(x, field);
  if (!DECODERS.has(d.type as string)) unsupported(field, "decoder", d.type);
  if (d.type === "Replace") compilePattern(d.pattern, `${field}.pattern`);
  if (d.type === "Sequence") {
    if (!Array.isArray(d.decoders)) {
      fail(`${field}.decoders`, `${field}.decoders is not an array`);
    }
    (d.decoders as unknown[]).forEach((e, i) => checkDecoder(e, `${field}.decoders[${i}]`));
  }
};

const fatalUtf8 = new TextDecoder("utf-8", { fatal: true });

/**
 * Makes the port's ByteFallback decoders (found in a decoder tree) decode a run of byte tokens
 * as Rust does: valid UTF-8 as its text, otherwise one U+FFFD per byte (the port decodes lossily,
 * so `<0x05><0x96>` gave "\u0005\uFFFD" instead of "\uFFFD\uFFFD").
 */
const exactByteFallback = (x: unknown): void => {
  // The port's decoders are callable objects (functions).
  if (typeof x !== "function" && !isRecord(x)) return;
  const decoder = x as { decoders?: unknown; config?: unknown; text_decoder?: unknown };
  if (Array.isArray(decoder.decoders)) decoder.decoders.forEach(exactByteFallback);
  if (isRecord(decoder.config) && decoder.config.type === "ByteFallback") {
    if (!("text_decoder" in decoder)) {
      // Another version of the port: refuse rather than decode inexactly.
      fail("decoder", "decoder: cannot make this @huggingface/tokenizers ByteFallback exact");
    }
    decoder.text_decoder = {
      decode: (bytes: Uint8Array): string => {
        try {
          return fatalUtf8.decode(bytes);
        } catch {
          return "\uFFFD".repeat(bytes.length);
        }
      },
    };
  }
};

// ---------------------------------------------------------------------------------------------
// The model and added tokens

interface AddedToken {
  readonly id: number;
  readonly content: string;
  readonly special: boolean;
  readonly lstrip: boolean;
  readonly rstrip: boolean;
  /** Matched in the normalized text (else in the input, before normalization). */
  readonly normalized: boolean;
}

interface TrieNode {
  readonly next: Map<string, TrieNode>;
  token?: AddedToken;
}

/**
 * Splits text on added tokens, leftmost-longest (the Rust library's aho-corasick match), with
 * `lstrip` / `rstrip` taking the Unicode White_Space next to a token along with it.
 */
class AddedTokenSplitter {
  readonly #root: TrieNode = { next: new Map() };

  constructor(tokens: readonly AddedToken[]) {
    for (const t of tokens) {
      let node = this.#root;
      for (let i = 0; i < t.content.length; i++) {
        const c = t.content[i];
        let child = node.next.get(c);
        if (child === undefined) node.next.set(c, child = { next: new Map() });
        node = child;
      }
      node.token ??= t;
    }
  }

  /** Text sections (strings) and matched tokens, in order. */
  split(text: string): (string | AddedToken)[] {
    const out: (string | AddedToken)[] = [];
    let start = 0;
    for (let i = 0; i < text.length;) {
      let node: TrieNode | undefined = this.#root;
      let match: AddedToken | undefined;
      for (let j = i; j < text.length; j++) {
        node = node.next.get(text[j]);
        if (node === undefined) break;
        if (node.token !== undefined) match = node.token;
      }
      if (match === undefined) {
        i++;
        continue;
      }
      let before = text.slice(start, i);
      if (match.lstrip) before = before.replace(TRAILING_WS, "");
      out.push(before, match);
      i += match.content.length;
      if (match.rstrip) {
        const ws = LEADING_WS.exec(text.slice(i));
        if (ws !== null) i += ws[0].length;
      }
      start = i;
    }
    out.push(text.slice(start));
    return out;
  }
}

const hasByteLevel = (p: unknown): boolean =>
  isRecord(p) &&
  (p.type === "ByteLevel" ||
    (Array.isArray(p.pretokenizers) && p.pretokenizers.some(hasByteLevel)));

/** Validates `model`, returning its vocab (token -> id) and the tokens by id. */
const checkModel = (
  json: Record<string, unknown>,
): { vocab: Map<string, number>; byId: (string | undefined)[] } => {
  const model = json.model;
  if (model === undefined || model === null) return fail("model", "model missing");
  if (!isRecord(model)) return fail("model", "model is not an object");
  if (model.type !== "BPE") {
    return fail("model.type", `model.type: expected "BPE", got ${show(model.type)}`);
  }
  for (const k of ["continuing_subword_prefix", "end_of_word_suffix"]) {
    if (model[k] !== undefined && model[k] !== null && model[k] !== "") {
      fail(`model.${k}`, `model.${k}: not supported`);
    }
  }
  const rawVocab = model.vocab;
  if (rawVocab === undefined || rawVocab === null) {
    return fail("model.vocab", "model.vocab missing");
  }
  if (!isRecord(rawVocab)) return fail("model.vocab", "model.vocab is not an object");
  const vocab = new Map<string, number>();
  const byId: (string | undefined)[] = [];
  for (const tok in rawVocab) {
    const id = rawVocab[tok];
    if (typeof id !== "number" || !Number.isInteger(id) || id < 0) {
      const f = `model.vocab[${show(tok)}]`;
      fail(f, `${f} is not a non-negative integer id`);
    }
    const other = byId[id as number];
    if (other !== undefined) {
      const f = `model.vocab[${show(tok)}]`;
      fail(f, `${f}: id ${id} already used by ${show(other)}`);
    }
    byId[id as number] = tok;
    vocab.set(tok, id as number);
  }

  const merges = model.merges;
  if (merges === undefined || merges === null) return fail("model.merges", "model.merges missing");
  if (!Array.isArray(merges)) return fail("model.merges", "model.merges is not an array");
  const asStrings = typeof merges[0] === "string";
  for (let i = 0; i < merges.length; i++) {
    const m: unknown = merges[i];
    let a = "", b = "";
    if (asStrings && typeof m === "string") {
      const sp = m.indexOf(" ");
      if (sp > 0 && sp < m.length - 1 && m.indexOf(" ", sp + 1) < 0) {
        a = m.slice(0, sp);
        b = m.slice(sp + 1);
      }
    } else if (
      !asStrings && Array.isArray(m) && m.length === 2 && typeof m[0] === "string" &&
      typeof m[1] === "string"
    ) [a, b] = m;
    if (a === "" || b === "") {
      fail(`model.merges[${i}]`, `model.merges[${i}] is not a pair: ${show(m)}`);
    }
    const missing = !vocab.has(a) ? a : !vocab.has(b) ? b : !vocab.has(a + b) ? a + b : null;
    if (missing !== null) {
      fail(
        `model.merges[${i}]`,
        `model.merges[${i}]: token ${show(missing)} is not in model.vocab`,
      );
    }
  }

  const unk = optString(model, "unk_token", "model");
  if (unk !== null && !vocab.has(unk)) {
    fail("model.unk_token", `model.unk_token ${show(unk)} is not in model.vocab`);
  }
  const byteFallback = optBool(model, "byte_fallback", false, "model");
  optBool(model, "ignore_merges", false, "model");
  if (optBool(model, "fuse_unk", false, "model") && unk !== null) {
    const hex = (b: number) => `<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`;
    const allBytes = (name: (b: number) => string) =>
      BYTE_TO_CHAR.every((_, b) => vocab.has(name(b)));
    // With byte fallback, an ASCII byte is needed only for its own character when that
    // character has no token (Gemma-2 has "\t" but no <0x09>); bytes >= 0x80 always are.
    const covered = byteFallback
      ? BYTE_TO_CHAR.every((_, b) =>
        vocab.has(hex(b)) || (b < 0x80 && vocab.has(String.fromCharCode(b)))
      )
      : hasByteLevel(json.pre_tokenizer) && allBytes((b) => BYTE_TO_CHAR[b]);
    if (!covered) {
      fail(
        "model.fuse_unk",
        "model.fuse_unk: supported only when every byte that byte fallback can need has a token",
      );
    }
  }
  return { vocab, byId };
};

const checkAddedTokens = (raw: unknown): AddedToken[] => {
  if (raw === undefined || raw === null) return [];
  if (!Array.isArray(raw)) return fail("added_tokens", "added_tokens is not an array");
  return raw.map((t, i) => {
    const f = `added_tokens[${i}]`;
    if (!isRecord(t)) return fail(f, `${f} is not an object`);
    if (typeof t.id !== "number" || !Number.isInteger(t.id) || t.id < 0) {
      fail(`${f}.id`, `${f}.id is not a non-negative integer`);
    }
    if (typeof t.content !== "string") fail(`${f}.content`, `${f}.content is not a string`);
    if (t.content === "") fail(`${f}.content`, `${f}.content is empty`);
    if (optBool(t, "single_word", false, f)) {
      fail(`${f}.single_word`, `${f}.single_word: not supported`);
    }
    const special = optBool(t, "special", false, f);
    return {
      id: t.id as number,
      content: t.content as string,
      special,
      lstrip: optBool(t, "lstrip", false, f),
      rstrip: optBool(t, "rstrip", false, f),
      normalized: optBool(t, "normalized", !special, f),
    };
  });
};

/** The special token a TemplateProcessing post-processor puts first in `single`, if any. */
const templateBos = (pp: unknown): string | null => {
  if (!isRecord(pp)) return null;
  if (pp.type === "Sequence" && Array.isArray(pp.processors)) {
    for (const p of pp.processors) {
      const b = templateBos(p);
      if (b !== null) return b;
    }
    return null;
  }
  if (pp.type !== "TemplateProcessing" || !Array.isArray(pp.single)) return null;
  const first = pp.single[0];
  return isRecord(first) && isRecord(first.SpecialToken) &&
      typeof first.SpecialToken.id === "string"
    ? first.SpecialToken.id
    : null;
};

/** A BPE tokenizer read from a Hugging Face `tokenizer.json` (see the module doc). */
export class HfTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosId: number;
  readonly padId: number;
  readonly #hf: HfLibTokenizer;
  /** id -> token (vocab or added), for validating ids. */
  readonly #known: (string | undefined)[];
  readonly #added = new Map<number, AddedToken>();
  /** Added tokens matched before normalization. */
  readonly #splitter: AddedTokenSplitter;
  /** An ordinary token decoding to one whole character, and its text: `tokenText`'s context. */
  readonly #context: readonly [id: number, text: string] | null;

  private constructor(
    json: Record<string, unknown>,
    known: (string | undefined)[],
    added: AddedToken[],
    specials: SpecialTokens,
  ) {
    const normalize = parseNormalizer(json.normalizer, "normalizer");
    const preTokenize = parsePreTokenizer(json.pre_tokenizer, "pre_tokenizer");
    checkDecoder(json.decoder, "decoder");
    try {
      // The port's own normalizer is built (it normalizes `normalized: true` added tokens), then
      // replaced by ours; the pre-tokenizer and post-processor are ours or unused.
      this.#hf = new HfLibTokenizer({
        ...json,
        added_tokens: added.map((a, i) => ({ ...(json.added_tokens as object[])[i], ...a })),
        normalizer: json.normalizer ?? null,
        pre_tokenizer: null,
        post_processor: null,
        decoder: json.decoder,
      }, { clean_up_tokenization_spaces: false });
    } catch (e) {
      throw new TokenizerError({ reason: `tokenizer.json: ${messageOf(e)}`, field: "" });
    }
    const patched = this.#hf as unknown as {
      normalizer: unknown;
      pre_tokenizer: unknown;
      decoder: unknown;
    };
    patched.normalizer = normalize;
    exactByteFallback(patched.decoder);
    patched.pre_tokenizer = preTokenize === null
      ? null
      : (text: string) => preTokenize([text]).filter((p) => p !== "");

    this.#known = known;
    for (const a of added) {
      this.#added.set(a.id, a);
      known[a.id] = a.content;
    }
    this.vocabSize = known.length;
    // Tokens matched in the normalized text stay with the port (which normalizes their content).
    this.#splitter = new AddedTokenSplitter(
      added.filter((a) => !(a.normalized && normalize !== null)),
    );

    const tokenId = (t: string) => this.tokenId(t);
    const resolve = (which: string, v: string | number): number => {
      if (typeof v === "number") {
        return Number.isInteger(v) && v >= 0 && v < this.vocabSize ? v : fail(
          which,
          `${which}: id ${v} is outside the vocabulary (size ${this.vocabSize})`,
        );
      }
      return tokenId(v) ?? fail(which, `${which}: token ${show(v)} is not in the vocabulary`);
    };
    const eos = specials.eos ?? DEFAULT_EOS_CANDIDATES.find((c) => tokenId(c) !== undefined);
    if (eos === undefined) {
      fail(
        "eos_token",
        "eos_token: none configured and no known EOS token (" +
          `${DEFAULT_EOS_CANDIDATES.join(", ")}) in the vocabulary`,
      );
    }
    this.eosId = resolve("eos_token", eos!);
    const bos = specials.bos === undefined ? templateBos(json.post_processor) : specials.bos;
    this.bosId = bos === null ? null : resolve("bos_token", bos);
    this.padId = specials.pad === undefined || specials.pad === null
      ? this.eosId
      : resolve("pad_token", specials.pad);

    const a = this.encode("a");
    this.#context = a.length === 1 && !this.#added.has(a[0]) && this.decode(a) === "a"
      ? [a[0], "a"]
      : null;
  }

  /**
   * Parses a Hugging Face `tokenizer.json` object. Special tokens come from `specials`; missing
   * ones default to: eos = first of DEFAULT_EOS_CANDIDATES present, bos = the leading special
   * token of the TemplateProcessing post-processor (else null), pad = eos.
   * Throws TokenizerError naming the malformed or unsupported field.
   */
  static fromJSON(json: unknown, specials: SpecialTokens = {}): HfTokenizer {
    if (!isRecord(json)) return fail("", "tokenizer JSON is not an object");
    const { byId } = checkModel(json);
    const added = checkAddedTokens(json.added_tokens);
    return new HfTokenizer(json, byId, added, specials);
  }

  /** Id of an added token's content, or of a vocab entry in its stored form (`Ġthe`, `▁the`). */
  tokenId(token: string): number | undefined {
    return this.#hf.token_to_id(token);
  }

  /** Whether `id` is an added token marked special (skipped by decode). */
  isSpecial(id: number): boolean {
    return this.#added.get(id)?.special ?? false;
  }

  /** Token ids of `text` (lone surrogates read as U+FFFD); never adds BOS/EOS. */
  encode(text: string): number[] {
    const out: number[] = [];
    for (const section of this.#splitter.split(text.toWellFormed())) {
      if (typeof section !== "string") out.push(section.id);
      else if (section !== "") {
        for (const id of this.#hf.encode(section, { add_special_tokens: false }).ids) {
          if (id === undefined) throw new TokenizerError({ reason: "a symbol has no token id" });
          out.push(id);
        }
      }
    }
    return out;
  }

  /**
   * Text of `ids`, through the file's decoder; special tokens are skipped by default. An id with
   * no token is skipped too, as HF tokenizers' decode does: a model's embedding may have more
   * rows than its tokenizer has tokens (Qwen2.5 and Qwen3 pad 151,669 to 151,936), and a
   * sampled padding id must not end a run. An id that is not a non-negative integer is a
   * TokenizerError.
   */
  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    const skip = options.skipSpecialTokens ?? true;
    const kept: number[] = [];
    ids.forEach((id, position) => {
      if (!Number.isInteger(id) || id < 0) {
        throw new TokenizerError({ reason: `unknown token id ${id}`, position });
      }
      if (this.#known[id] === undefined) return;
      if (!(skip && this.isSpecial(id))) kept.push(id);
    });
    return kept.length === 0 ? "" : this.#hf.decode(kept, {
      skip_special_tokens: false,
      clean_up_tokenization_spaces: false,
    });
  }

  /**
   * Display string of one token: an added token's content, else the text the token adds after
   * an ordinary one-character token (so `▁the` shows " the" although a leading-space Strip
   * decoder removes that space from a text's first token; a lone byte shows U+FFFD).
   */
  tokenText(id: number): string {
    const a = this.#added.get(id);
    if (a !== undefined) return a.content;
    if (this.#context === null) return this.decode([id]);
    const [ctx, text] = this.#context;
    const both = this.decode([ctx, id]);
    return both.startsWith(text) ? both.slice(text.length) : this.decode([id]);
  }
}

/** @deprecated The former name of {@link HfTokenizer} (which also reads non-byte-level BPE). */
export const ByteLevelBpeTokenizer: typeof HfTokenizer = HfTokenizer;
/** @deprecated The former name of {@link HfTokenizer}. */
export type ByteLevelBpeTokenizer = HfTokenizer;

// ---------------------------------------------------------------------------------------------
// Loading

/**
 * Builds the tokenizer a `tokenizer.json` object describes: `model.type` "lorafold-char" gives a
 * CharTokenizer (fixed specials; `specials` ignored), "BPE" an HfTokenizer.
 */
export const tokenizerFromJSON = (json: unknown, specials: SpecialTokens = {}): Tokenizer => {
  const type = isRecord(json) && isRecord(json.model) ? json.model.type : undefined;
  if (type === CharTokenizer.MODEL_TYPE) return CharTokenizer.fromJSON(json);
  if (type === "BPE" || type === undefined) return HfTokenizer.fromJSON(json, specials);
  return fail("model.type", `model.type: unsupported tokenizer model ${show(type)}`);
};

const tokenName = (v: unknown): string | null | undefined => {
  if (typeof v === "string") return v;
  if (v === null) return null;
  if (isRecord(v) && typeof v.content === "string") return v.content;
  return undefined;
};

const tokenIdOf = (v: unknown): number | null | undefined => {
  if (typeof v === "number") return v;
  if (Array.isArray(v) && typeof v[0] === "number") return v[0];
  if (v === null) return null;
  return undefined;
};

/**
 * Special tokens named by `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`: a
 * string or `{content}`; `add_bos_token: false` means no BOS) and, for whatever it leaves unset,
 * `config.json` (`bos_token_id`, `eos_token_id` (a number or the first of a list),
 * `pad_token_id`). Best effort: fields of other types are ignored.
 */
export const specialsFromConfigs = (tokenizerConfig: unknown, config: unknown): SpecialTokens => {
  const tc = isRecord(tokenizerConfig) ? tokenizerConfig : {};
  const c = isRecord(config) ? config : {};
  const pick = <T>(a: T | undefined, b: T | undefined): T | undefined => a !== undefined ? a : b;
  const bos = tc.add_bos_token === false
    ? null
    : pick<string | number | null>(tokenName(tc.bos_token), tokenIdOf(c.bos_token_id));
  const eos = pick<string | number | null>(tokenName(tc.eos_token), tokenIdOf(c.eos_token_id));
  const pad = pick<string | number | null>(tokenName(tc.pad_token), tokenIdOf(c.pad_token_id));
  return {
    ...(bos !== undefined ? { bos } : {}),
    ...(eos !== undefined && eos !== null ? { eos } : {}),
    ...(pad !== undefined ? { pad } : {}),
  };
};

/** Reads and parses a JSON file; a missing optional file is undefined. */
const readJson = (path: string, required: boolean): Effect.Effect<unknown, TokenizerError> =>
  Effect.tryPromise({
    try: () =>
      readFile(path, "utf8").catch((e: unknown) => {
        if (!required && (e as { code?: string }).code === "ENOENT") return undefined;
        throw e;
      }),
    catch: (e) => new TokenizerError({ reason: `cannot read ${path}: ${messageOf(e)}` }),
  }).pipe(Effect.flatMap((text) =>
    text === undefined ? Effect.succeed(undefined) : Effect.try({
      try: () => JSON.parse(text) as unknown,
      catch: (e) => new TokenizerError({ reason: `${path}: invalid JSON: ${messageOf(e)}` }),
    })
  ));

/**
 * Loads `dir/tokenizer.json` (char or BPE). For BPE, special tokens come from, in order:
 * `overrides`, `dir/tokenizer_config.json`, `dir/config.json`, then the defaults of
 * `HfTokenizer.fromJSON`. The two config files are optional; an unparsable one fails.
 */
export const loadTokenizer: (
  dir: string,
  overrides?: SpecialTokens,
) => Effect.Effect<Tokenizer, TokenizerError> = Effect.fn("loadTokenizer")(
  function* (dir: string, overrides: SpecialTokens = {}) {
    const json = yield* readJson(join(dir, "tokenizer.json"), true);
    const tc = yield* readJson(join(dir, "tokenizer_config.json"), false);
    const cfg = yield* readJson(join(dir, "config.json"), false);
    const specials: SpecialTokens = { ...specialsFromConfigs(tc, cfg) };
    for (const k of ["bos", "eos", "pad"] as const) {
      if (overrides[k] !== undefined) Object.assign(specials, { [k]: overrides[k] });
    }
    return yield* Effect.try({
      try: () => tokenizerFromJSON(json, specials),
      catch: (e) => e instanceof TokenizerError ? e : new TokenizerError({ reason: String(e) }),
    });
  },
);
