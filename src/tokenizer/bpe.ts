/**
 * Byte-level BPE tokenizers read from Hugging Face `tokenizer.json` files (Llama-3, Qwen2, GPT-2
 * style), and `loadTokenizer(dir)`, which picks the char or BPE tokenizer for a model directory.
 *
 * Supported `tokenizer.json` parts:
 * - `model`: `type: "BPE"`, `vocab` (token -> id), `merges` as `"a b"` strings or `["a", "b"]`
 *   pairs, `unk_token`, `ignore_merges`. `dropout` is ignored (encoding is deterministic).
 * - `added_tokens`: matched literally (longest first) before normalization and BPE, never split.
 *   `lstrip` / `rstrip` / `single_word` are ignored (false for Llama-3 and Qwen2).
 * - `normalizer`: null, NFC / NFD / NFKC / NFKD, Lowercase, or a Sequence of these.
 * - `pre_tokenizer`: ByteLevel (GPT-2 mapping; `use_regex` splits with the GPT-2 pattern), Split
 *   (regex or string pattern, all split behaviors), Digits, or a Sequence of these. A ByteLevel
 *   step is required. Split regexes use `\p{L}` / `\p{N}` classes (JS `u` flag); scoped
 *   case-insensitive groups `(?i:...)` are rewritten into letter classes so older runtimes work.
 *   JS `\s` differs slightly from Oniguruma's (U+FEFF vs U+0085); that only moves split points.
 * - `decoder` is not read: decoding is always the byte-level inverse, then UTF-8 with invalid
 *   sequences replaced by U+FFFD. `post_processor` is read only to find the default BOS.
 *
 * Lone surrogates in input text are encoded as U+FFFD (as TextEncoder does), so they do not
 * round-trip; all other strings satisfy `decode(encode(s)) === s` when the normalizer is null
 * and `add_prefix_space` is false.
 * @module
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { Effect } from "effect";
import {
  CharTokenizer,
  type DecodeOptions,
  isRecord,
  type Tokenizer,
  TokenizerError,
} from "./tokenizer.ts";

/** The GPT-2 pre-tokenization pattern, used by ByteLevel pre-tokenizers with `use_regex`. */
export const GPT2_PATTERN =
  "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

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

const CHAR_TO_BYTE: ReadonlyMap<string, number> = new Map(BYTE_TO_CHAR.map((c, b) => [c, b]));

const utf8Encoder = new TextEncoder();
/** Replaces invalid sequences with U+FFFD; keeps a leading U+FEFF. */
const utf8Decoder = new TextDecoder("utf-8", { ignoreBOM: true });

/**
 * Maps text to its byte-level form (one printable character per UTF-8 byte). Lone surrogates
 * become U+FFFD, as with TextEncoder.
 */
export const toByteLevel = (text: string): string => {
  const T = BYTE_TO_CHAR;
  let s = "";
  for (let i = 0; i < text.length; i++) {
    let c = text.charCodeAt(i);
    if (c < 0x80) {
      s += T[c];
      continue;
    }
    if (c < 0x800) {
      s += T[0xc0 | (c >> 6)] + T[0x80 | (c & 0x3f)];
      continue;
    }
    if (c >= 0xd800 && c <= 0xdfff) {
      const d = text.charCodeAt(i + 1);
      if (c <= 0xdbff && d >= 0xdc00 && d <= 0xdfff) {
        c = 0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00);
        i++;
        s += T[0xf0 | (c >> 18)] + T[0x80 | ((c >> 12) & 0x3f)] + T[0x80 | ((c >> 6) & 0x3f)] +
          T[0x80 | (c & 0x3f)];
        continue;
      }
      c = 0xfffd;
    }
    s += T[0xe0 | (c >> 12)] + T[0x80 | ((c >> 6) & 0x3f)] + T[0x80 | (c & 0x3f)];
  }
  return s;
};

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

// ---------------------------------------------------------------------------------------------
// Pre-tokenization

type Piece = readonly [text: string, isMatch: boolean];
type Step = (pieces: string[]) => string[];

const escapeRegex = (s: string) => s.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");

const swapCase = (c: string) => c === c.toLowerCase() ? c.toUpperCase() : c.toLowerCase();

/**
 * Rewrites a Hugging Face (Oniguruma) regex for JS: scoped case-insensitive groups `(?i:...)`
 * become non-capturing groups whose ASCII letters are expanded to `[xX]` classes.
 */
export const translateRegex = (src: string): string => {
  let out = "";
  const groups: boolean[] = [];
  let ci = 0;
  let inClass = false;
  let i = 0;
  while (i < src.length) {
    const c = src[i];
    if (c === "\\") {
      const n = src[i + 1];
      if ((n === "p" || n === "P" || n === "x" || n === "u") && src[i + 2] === "{") {
        const end = src.indexOf("}", i);
        if (end > 0) {
          out += src.slice(i, end + 1);
          i = end + 1;
          continue;
        }
      }
      out += src.slice(i, i + 2);
      i += 2;
      continue;
    }
    if (inClass) {
      if (c === "]") inClass = false;
      else if (ci > 0 && /[A-Za-z]/.test(c) && src[i - 1] !== "-" && src[i + 1] !== "-") {
        out += c + swapCase(c);
        i++;
        continue;
      }
      out += c;
      i++;
      continue;
    }
    if (c === "[") {
      inClass = true;
      out += c;
      i++;
      if (src[i] === "^") out += src[i++];
      if (src[i] === "]") out += src[i++]; // a leading ']' is literal
      continue;
    }
    if (c === "(") {
      if (src.startsWith("(?i:", i)) {
        groups.push(true);
        ci++;
        out += "(?:";
        i += 4;
        continue;
      }
      groups.push(false);
      const named = /^\(\?<(?![=!])[^>]*>/.exec(src.slice(i));
      const len = named ? named[0].length : 1;
      out += src.slice(i, i + len);
      i += len;
      continue;
    }
    if (c === ")") {
      if (groups.pop()) ci--;
      out += c;
      i++;
      continue;
    }
    out += ci > 0 && /[A-Za-z]/.test(c) ? `[${c.toLowerCase()}${c.toUpperCase()}]` : c;
    i++;
  }
  return out;
};

const compileRegex = (src: string, field: string): RegExp => {
  try {
    return new RegExp(translateRegex(src), "gu");
  } catch (e) {
    return fail(field, `${field}: unsupported regex ${show(src)}: ${(e as Error).message}`);
  }
};

/** Splits `s` into matches and the gaps between them, in order. */
const findMatches = (s: string, re: RegExp): Piece[] => {
  const out: Piece[] = [];
  let last = 0;
  re.lastIndex = 0;
  for (let m = re.exec(s); m !== null; m = re.exec(s)) {
    if (m[0].length === 0) {
      re.lastIndex += (s.codePointAt(re.lastIndex) ?? 0) > 0xffff ? 2 : 1;
      continue;
    }
    if (m.index > last) out.push([s.slice(last, m.index), false]);
    out.push([m[0], true]);
    last = m.index + m[0].length;
  }
  if (last < s.length) out.push([s.slice(last), false]);
  return out;
};

/** Matches and gaps as strings (the "Isolated" behavior), without intermediate tuples. */
const isolate = (s: string, re: RegExp): string[] => {
  const out: string[] = [];
  let last = 0;
  re.lastIndex = 0;
  for (let m = re.exec(s); m !== null; m = re.exec(s)) {
    const len = m[0].length;
    if (len === 0) {
      re.lastIndex += (s.codePointAt(re.lastIndex) ?? 0) > 0xffff ? 2 : 1;
      continue;
    }
    if (m.index > last) out.push(s.slice(last, m.index));
    out.push(m[0]);
    last = m.index + len;
  }
  if (last < s.length) out.push(s.slice(last));
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

/** Hugging Face `split` with a delimiter behavior (same folding rules as tokenizers' Rust). */
const splitWith = (s: string, re: RegExp, behavior: Behavior, invert: boolean): string[] => {
  if (behavior === "Isolated") return isolate(s, re);
  const ms = findMatches(s, re).map(([t, m]) => [t, invert ? !m : m] as const);
  switch (behavior) {
    case "Removed":
      return ms.filter(([, m]) => !m).map(([t]) => t);
    case "MergedWithPrevious": {
      const acc: string[] = [];
      let prev = false;
      for (const [t, m] of ms) {
        if (m && !prev && acc.length > 0) acc[acc.length - 1] += t;
        else acc.push(t);
        prev = m;
      }
      return acc;
    }
    case "MergedWithNext": {
      const acc: string[] = [];
      let prev = false;
      for (let k = ms.length - 1; k >= 0; k--) {
        const [t, m] = ms[k];
        if (m && !prev && acc.length > 0) acc[acc.length - 1] = t + acc[acc.length - 1];
        else acc.push(t);
        prev = m;
      }
      return acc.reverse();
    }
    case "Contiguous": {
      const acc: string[] = [];
      let prev = false;
      for (const [t, m] of ms) {
        if (m === prev && acc.length > 0) acc[acc.length - 1] += t;
        else acc.push(t);
        prev = m;
      }
      return acc;
    }
  }
};

const optBool = (o: Record<string, unknown>, key: string, dflt: boolean, field: string) => {
  const v = o[key];
  if (v === undefined || v === null) return dflt;
  return typeof v === "boolean" ? v : fail(`${field}.${key}`, `${field}.${key} is not a boolean`);
};

const parsePreTokenizer = (
  x: unknown,
  field: string,
  state: { byteLevel: boolean },
): Step[] => {
  if (x === null || x === undefined) return [];
  if (!isRecord(x)) return fail(field, `${field} is not an object`);
  switch (x.type) {
    case "Sequence": {
      const list = x.pretokenizers;
      if (!Array.isArray(list)) {
        return fail(`${field}.pretokenizers`, `${field}.pretokenizers is not an array`);
      }
      return list.flatMap((p, i) => parsePreTokenizer(p, `${field}.pretokenizers[${i}]`, state));
    }
    case "ByteLevel": {
      state.byteLevel = true;
      const prefix = optBool(x, "add_prefix_space", true, field);
      const useRegex = optBool(x, "use_regex", true, field);
      const re = useRegex ? compileRegex(GPT2_PATTERN, field) : null;
      return [(pieces) =>
        pieces.flatMap((p) => {
          const s = prefix && !p.startsWith(" ") ? ` ${p}` : p;
          return (re ? splitWith(s, re, "Isolated", false) : [s]).map(toByteLevel);
        })];
    }
    case "Split": {
      const pattern = x.pattern;
      let re: RegExp;
      if (isRecord(pattern) && typeof pattern.Regex === "string") {
        re = compileRegex(pattern.Regex, `${field}.pattern.Regex`);
      } else if (isRecord(pattern) && typeof pattern.String === "string") {
        re = new RegExp(escapeRegex(pattern.String), "gu");
      } else {
        return fail(
          `${field}.pattern`,
          `${field}.pattern is not {"Regex": string} or {"String": string}`,
        );
      }
      const behavior = (x.behavior ?? "Isolated") as Behavior;
      if (!BEHAVIORS.includes(behavior)) {
        return fail(`${field}.behavior`, `${field}.behavior: unsupported ${show(x.behavior)}`);
      }
      const invert = optBool(x, "invert", false, field);
      return [(pieces) => pieces.flatMap((p) => splitWith(p, re, behavior, invert))];
    }
    case "Digits": {
      const individual = optBool(x, "individual_digits", false, field);
      const re = new RegExp(individual ? "\\p{N}" : "\\p{N}+", "gu");
      return [(pieces) => pieces.flatMap((p) => splitWith(p, re, "Isolated", false))];
    }
    default:
      return fail(`${field}.type`, `${field}.type: unsupported pre-tokenizer ${show(x.type)}`);
  }
};

const parseNormalizer = (x: unknown, field: string): ((s: string) => string) | null => {
  if (x === null || x === undefined) return null;
  if (!isRecord(x)) return fail(field, `${field} is not an object`);
  switch (x.type) {
    case "NFC":
    case "NFD":
    case "NFKC":
    case "NFKD": {
      const form = x.type;
      return (s) => s.normalize(form);
    }
    case "Lowercase":
      return (s) => s.toLowerCase();
    case "Sequence": {
      if (!Array.isArray(x.normalizers)) {
        return fail(`${field}.normalizers`, `${field}.normalizers is not an array`);
      }
      const fs = x.normalizers.map((n, i) => parseNormalizer(n, `${field}.normalizers[${i}]`))
        .filter((f): f is (s: string) => string => f !== null);
      return fs.length === 0 ? null : (s) => fs.reduce((acc, f) => f(acc), s);
    }
    default:
      return fail(`${field}.type`, `${field}.type: unsupported normalizer ${show(x.type)}`);
  }
};

// ---------------------------------------------------------------------------------------------
// BPE merge loop

const SEP = "\u0000";

/** Min-heap of candidate merges ordered by (rank, position): HF's leftmost-lowest-rank order. */
class PairHeap {
  readonly rank: number[] = [];
  readonly pos: number[] = [];
  readonly left: string[] = [];
  readonly right: string[] = [];
  get size(): number {
    return this.rank.length;
  }
  #less(a: number, b: number): boolean {
    return this.rank[a] < this.rank[b] ||
      (this.rank[a] === this.rank[b] && this.pos[a] < this.pos[b]);
  }
  #swap(a: number, b: number): void {
    for (const arr of [this.rank, this.pos, this.left, this.right] as unknown[][]) {
      const t = arr[a];
      arr[a] = arr[b];
      arr[b] = t;
    }
  }
  push(rank: number, pos: number, left: string, right: string): void {
    this.rank.push(rank);
    this.pos.push(pos);
    this.left.push(left);
    this.right.push(right);
    let i = this.rank.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.#less(i, p)) break;
      this.#swap(i, p);
      i = p;
    }
  }
  /** Moves the minimum to the end, pops it, and returns its [pos, left, right]. */
  pop(): [number, string, string] {
    const last = this.rank.length - 1;
    this.#swap(0, last);
    const out: [number, string, string] = [this.pos[last], this.left[last], this.right[last]];
    this.rank.pop();
    this.pos.pop();
    this.left.pop();
    this.right.pop();
    let i = 0;
    const n = this.rank.length;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < n && this.#less(l, m)) m = l;
      if (r < n && this.#less(r, m)) m = r;
      if (m === i) break;
      this.#swap(i, m);
      i = m;
    }
    return out;
  }
}

interface AddedToken {
  readonly id: number;
  readonly content: string;
  readonly special: boolean;
}

interface BpeParts {
  readonly vocab: ReadonlyMap<string, number>;
  readonly merges: ReadonlyMap<string, number>;
  readonly added: readonly AddedToken[];
  readonly normalize: ((s: string) => string) | null;
  readonly steps: readonly Step[];
  readonly unkId: number | null;
  readonly ignoreMerges: boolean;
  readonly defaultBos: string | null;
}

const CACHE_LIMIT = 20_000;

/** A Hugging Face byte-level BPE tokenizer (Llama-3 / Qwen2 / GPT-2 `tokenizer.json`). */
export class ByteLevelBpeTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosId: number;
  readonly padId: number;
  readonly #p: BpeParts;
  /** id -> byte-level token string (vocab) */
  readonly #tokens: (string | undefined)[] = [];
  readonly #addedById = new Map<number, AddedToken>();
  readonly #addedByContent = new Map<string, number>();
  readonly #addedRe: RegExp | null;
  readonly #cache = new Map<string, number[]>();

  private constructor(p: BpeParts, specials: SpecialTokens) {
    this.#p = p;
    let max = -1;
    for (const [tok, id] of p.vocab) {
      this.#tokens[id] = tok;
      max = Math.max(max, id);
    }
    for (const a of p.added) {
      this.#addedById.set(a.id, a);
      if (!this.#addedByContent.has(a.content)) this.#addedByContent.set(a.content, a.id);
      max = Math.max(max, a.id);
    }
    this.vocabSize = max + 1;
    const contents = [...this.#addedByContent.keys()].sort((a, b) => b.length - a.length);
    this.#addedRe = contents.length ? new RegExp(contents.map(escapeRegex).join("|"), "g") : null;

    const resolve = (which: string, v: string | number): number => {
      if (typeof v === "number") {
        return Number.isInteger(v) && v >= 0 && v < this.vocabSize ? v : fail(
          which,
          `${which}: id ${v} is outside the vocabulary (size ${this.vocabSize})`,
        );
      }
      return this.tokenId(v) ?? fail(which, `${which}: token ${show(v)} is not in the vocabulary`);
    };
    const eos = specials.eos ?? DEFAULT_EOS_CANDIDATES.find((c) => this.tokenId(c) !== undefined);
    if (eos === undefined) {
      fail(
        "eos_token",
        "eos_token: none configured and no known EOS token (" +
          `${DEFAULT_EOS_CANDIDATES.join(", ")}) in the vocabulary`,
      );
    }
    this.eosId = resolve("eos_token", eos!);
    const bos = specials.bos === undefined ? p.defaultBos : specials.bos;
    this.bosId = bos === null ? null : resolve("bos_token", bos);
    this.padId = specials.pad === undefined || specials.pad === null
      ? this.eosId
      : resolve("pad_token", specials.pad);
  }

  /**
   * Parses a Hugging Face `tokenizer.json` object. Special tokens come from `specials`; missing
   * ones default to: eos = first of DEFAULT_EOS_CANDIDATES present, bos = the leading special
   * token of the TemplateProcessing post-processor (else null), pad = eos.
   * Throws TokenizerError naming the malformed field.
   */
  static fromJSON(json: unknown, specials: SpecialTokens = {}): ByteLevelBpeTokenizer {
    if (!isRecord(json)) return fail("", "tokenizer JSON is not an object");
    const model = json.model;
    if (model === undefined || model === null) return fail("model", "model missing");
    if (!isRecord(model)) return fail("model", "model is not an object");
    if (model.type !== "BPE") {
      return fail("model.type", `model.type: expected "BPE", got ${show(model.type)}`);
    }
    for (const k of ["continuing_subword_prefix", "end_of_word_suffix"]) {
      if (model[k] !== undefined && model[k] !== null && model[k] !== "") {
        fail(`model.${k}`, `model.${k}: not supported for byte-level BPE`);
      }
    }

    // vocab
    const rawVocab = model.vocab;
    if (rawVocab === undefined || rawVocab === null) {
      return fail("model.vocab", "model.vocab missing");
    }
    if (!isRecord(rawVocab)) return fail("model.vocab", "model.vocab is not an object");
    const vocab = new Map<string, number>();
    const seen = new Map<number, string>();
    for (const [tok, id] of Object.entries(rawVocab)) {
      const f = `model.vocab[${show(tok)}]`;
      if (typeof id !== "number" || !Number.isInteger(id) || id < 0) {
        fail(f, `${f} is not a non-negative integer id`);
      }
      const other = seen.get(id as number);
      if (other !== undefined) fail(f, `${f}: id ${id} already used by ${show(other)}`);
      seen.set(id as number, tok);
      vocab.set(tok, id as number);
    }

    // merges
    const rawMerges = model.merges;
    if (rawMerges === undefined || rawMerges === null) {
      return fail("model.merges", "model.merges missing");
    }
    if (!Array.isArray(rawMerges)) return fail("model.merges", "model.merges is not an array");
    const merges = new Map<string, number>();
    rawMerges.forEach((m, i) => {
      const f = `model.merges[${i}]`;
      let pair: string[] | null = null;
      if (typeof m === "string") {
        const parts = m.split(" ");
        if (parts.length === 2 && parts[0] !== "" && parts[1] !== "") pair = parts;
      } else if (
        Array.isArray(m) && m.length === 2 && typeof m[0] === "string" &&
        typeof m[1] === "string" && m[0] !== "" && m[1] !== ""
      ) pair = m;
      if (pair === null) return fail(f, `${f} is not a pair: ${show(m)}`);
      const [a, b] = pair;
      for (const t of [a, b, a + b]) {
        if (!vocab.has(t)) fail(f, `${f}: token ${show(t)} is not in model.vocab`);
      }
      const key = a + SEP + b;
      if (!merges.has(key)) merges.set(key, i);
    });

    let unkId: number | null = null;
    if (model.unk_token !== undefined && model.unk_token !== null) {
      if (typeof model.unk_token !== "string") {
        fail("model.unk_token", "model.unk_token is not a string");
      }
      unkId = vocab.get(model.unk_token as string) ??
        fail("model.unk_token", `model.unk_token ${show(model.unk_token)} is not in model.vocab`);
    }
    const ignoreMerges = optBool(model, "ignore_merges", false, "model");

    // added tokens
    const added: AddedToken[] = [];
    const rawAdded = json.added_tokens ?? [];
    if (!Array.isArray(rawAdded)) return fail("added_tokens", "added_tokens is not an array");
    rawAdded.forEach((t, i) => {
      const f = `added_tokens[${i}]`;
      if (!isRecord(t)) return fail(f, `${f} is not an object`);
      if (typeof t.id !== "number" || !Number.isInteger(t.id) || t.id < 0) {
        fail(`${f}.id`, `${f}.id is not a non-negative integer`);
      }
      if (typeof t.content !== "string") fail(`${f}.content`, `${f}.content is not a string`);
      if (t.content === "") fail(`${f}.content`, `${f}.content is empty`);
      const special = optBool(t, "special", false, f);
      added.push({ id: t.id as number, content: t.content as string, special });
    });

    const normalize = parseNormalizer(json.normalizer, "normalizer");
    const state = { byteLevel: false };
    const steps = parsePreTokenizer(json.pre_tokenizer, "pre_tokenizer", state);
    if (!state.byteLevel) {
      fail(
        "pre_tokenizer",
        "pre_tokenizer: no ByteLevel pre-tokenizer (only byte-level BPE is supported)",
      );
    }

    return new ByteLevelBpeTokenizer({
      vocab,
      merges,
      added,
      normalize,
      steps,
      unkId,
      ignoreMerges,
      defaultBos: templateBos(json.post_processor),
    }, specials);
  }

  /** Id of an added token's content, or of a vocab entry in byte-level form (`Ġthe`). */
  tokenId(token: string): number | undefined {
    return this.#addedByContent.get(token) ?? this.#p.vocab.get(token);
  }

  /** Whether `id` is an added token marked special (skipped by decode). */
  isSpecial(id: number): boolean {
    return this.#addedById.get(id)?.special ?? false;
  }

  encode(text: string): number[] {
    const out: number[] = [];
    const re = this.#addedRe;
    let last = 0;
    if (re) {
      re.lastIndex = 0;
      for (let m = re.exec(text); m !== null; m = re.exec(text)) {
        if (m.index > last) this.#encodeSegment(text.slice(last, m.index), out);
        out.push(this.#addedByContent.get(m[0])!);
        last = m.index + m[0].length;
      }
    }
    if (last < text.length) this.#encodeSegment(text.slice(last), out);
    return out;
  }

  #encodeSegment(text: string, out: number[]): void {
    let pieces = [this.#p.normalize ? this.#p.normalize(text) : text];
    for (const step of this.#p.steps) pieces = step(pieces);
    for (const piece of pieces) {
      if (piece === "") continue;
      let ids = this.#cache.get(piece);
      if (ids === undefined) {
        ids = this.#bpe(piece);
        if (this.#cache.size >= CACHE_LIMIT) this.#cache.clear();
        this.#cache.set(piece, ids);
      }
      for (const id of ids) out.push(id);
    }
  }

  #bpe(word: string): number[] {
    const { vocab, merges, unkId } = this.#p;
    if (this.#p.ignoreMerges) {
      const whole = vocab.get(word);
      if (whole !== undefined) return [whole];
    }
    const sym = Array.from(word);
    const n = sym.length;
    const next = new Int32Array(n);
    const prev = new Int32Array(n);
    for (let i = 0; i < n; i++) {
      next[i] = i + 1 < n ? i + 1 : -1;
      prev[i] = i - 1;
    }
    const heap = new PairHeap();
    const candidate = (i: number) => {
      const j = next[i];
      if (j < 0) return;
      const rank = merges.get(sym[i] + SEP + sym[j]);
      if (rank !== undefined) heap.push(rank, i, sym[i], sym[j]);
    };
    for (let i = 0; i < n - 1; i++) candidate(i);
    while (heap.size > 0) {
      const [i, left, right] = heap.pop();
      const j = next[i];
      // Stale entries: a side was merged away (dead symbols are "") or changed since the push.
      if (j < 0 || sym[i] !== left || sym[j] !== right) continue;
      sym[i] = left + right;
      sym[j] = "";
      next[i] = next[j];
      if (next[j] >= 0) prev[next[j]] = i;
      if (prev[i] >= 0) candidate(prev[i]);
      candidate(i);
    }
    const ids: number[] = [];
    for (let i = 0; i >= 0; i = next[i]) {
      const id = vocab.get(sym[i]) ?? unkId;
      if (id === null) {
        throw new TokenizerError({
          reason: `symbol ${show(sym[i])} is not in model.vocab and model.unk_token is not set`,
          char: sym[i],
        });
      }
      ids.push(id);
    }
    return ids;
  }

  /** Text of `ids`: byte-level inverse, then UTF-8 (invalid sequences become U+FFFD). */
  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    const skip = options.skipSpecialTokens ?? true;
    let s = "";
    let bytes: number[] = [];
    const flush = () => {
      if (bytes.length > 0) s += utf8Decoder.decode(Uint8Array.from(bytes));
      bytes = [];
    };
    ids.forEach((id, position) => {
      const a = this.#addedById.get(id);
      if (a !== undefined) {
        if (a.special && skip) return;
        flush();
        s += a.content;
        return;
      }
      const tok = Number.isInteger(id) ? this.#tokens[id] : undefined;
      if (tok === undefined) {
        throw new TokenizerError({ reason: `unknown token id ${id}`, position });
      }
      for (const c of tok) {
        const b = CHAR_TO_BYTE.get(c);
        if (b !== undefined) bytes.push(b);
        else bytes.push(...utf8Encoder.encode(c));
      }
    });
    flush();
    return s;
  }

  tokenText(id: number): string {
    const a = this.#addedById.get(id);
    return a !== undefined ? a.content : this.decode([id]);
  }
}

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

// ---------------------------------------------------------------------------------------------
// Loading

/**
 * Builds the tokenizer a `tokenizer.json` object describes: `model.type` "lorafold-char" gives a
 * CharTokenizer (fixed specials; `specials` ignored), "BPE" a ByteLevelBpeTokenizer.
 */
export const tokenizerFromJSON = (json: unknown, specials: SpecialTokens = {}): Tokenizer => {
  const type = isRecord(json) && isRecord(json.model) ? json.model.type : undefined;
  if (type === CharTokenizer.MODEL_TYPE) return CharTokenizer.fromJSON(json);
  if (type === "BPE" || type === undefined) return ByteLevelBpeTokenizer.fromJSON(json, specials);
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

const errorText = (e: unknown): string => e instanceof Error ? e.message : String(e);

/** Reads and parses a JSON file; a missing optional file is undefined. */
const readJson = (path: string, required: boolean): Effect.Effect<unknown, TokenizerError> =>
  Effect.tryPromise({
    try: () =>
      readFile(path, "utf8").catch((e: unknown) => {
        if (!required && (e as { code?: string }).code === "ENOENT") return undefined;
        throw e;
      }),
    catch: (e) => new TokenizerError({ reason: `cannot read ${path}: ${errorText(e)}` }),
  }).pipe(Effect.flatMap((text) =>
    text === undefined ? Effect.succeed(undefined) : Effect.try({
      try: () => JSON.parse(text) as unknown,
      catch: (e) => new TokenizerError({ reason: `${path}: invalid JSON: ${errorText(e)}` }),
    })
  ));

/**
 * Loads `dir/tokenizer.json` (char or byte-level BPE). For BPE, special tokens come from, in
 * order: `overrides`, `dir/tokenizer_config.json`, `dir/config.json`, then the defaults of
 * `ByteLevelBpeTokenizer.fromJSON`. The two config files are optional; an unparsable one fails.
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
