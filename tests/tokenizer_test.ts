import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import { readFileSync } from "node:fs";
import { Effect, Exit } from "effect";
import fc from "fast-check";
import { CharTokenizer, TokenizerError } from "../src/tokenizer/tokenizer.ts";
import {
  BYTE_TO_CHAR,
  HfTokenizer,
  loadTokenizer,
  specialsFromConfigs,
  tokenizerFromJSON,
} from "../src/tokenizer/bpe.ts";

const FIXTURES = new URL("./fixtures/tokenizer/", import.meta.url).pathname;
const fixtureJson = (): Record<string, unknown> =>
  JSON.parse(readFileSync(`${FIXTURES}bpe/tokenizer.json`, "utf8"));
const bpe = HfTokenizer.fromJSON(fixtureJson());
const id = (token: string): number => {
  const i = bpe.tokenId(token);
  if (i === undefined) throw new Error(`fixture lacks ${token}`);
  return i;
};

/** Asserts `f` throws a TokenizerError whose reason contains `reason` (and field, if given). */
const throwsTokenizerError = (f: () => unknown, reason: string, field?: string) =>
  throws(f, (e: unknown) => {
    assert(e instanceof TokenizerError, `expected TokenizerError, got ${e}`);
    assert(e.reason.includes(reason), `reason ${JSON.stringify(e.reason)} lacks ${reason}`);
    if (field !== undefined) assertEquals(e.field, field);
    assertEquals(e._tag, "TokenizerError");
    return true;
  });

// ----------------------------------------------------------------------------------- char

const ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 \n+-*=?.,";

Deno.test("char: ids, specials, decode skips specials", () => {
  const t = new CharTokenizer(ALPHABET);
  assertEquals([t.padId, t.bosId, t.eosId, t.vocabSize], [0, 1, 2, 3 + ALPHABET.length]);
  assertEquals(t.encode("ab a"), [3, 4, 3 + 36, 3]);
  assertEquals(t.decode([1, 3, 4, 2, 0, 0]), "ab");
  assertEquals(t.decode([1, 3, 2], { skipSpecialTokens: false }), "<bos>a<eos>");
  assertEquals([t.tokenText(2), t.tokenText(3), t.tokenText(0)], ["<eos>", "a", "<pad>"]);
  throwsTokenizerError(() => t.decode([3, t.vocabSize]), "unknown token id");
  throwsTokenizerError(() => t.tokenText(-1), "unknown token id");
});

Deno.test("char: decode(encode(s)) == s over the alphabet (property)", () => {
  const t = new CharTokenizer(`${ALPHABET}é😀`);
  const s = fc.string({ unit: fc.constantFrom(...Array.from(`${ALPHABET}é😀`)), maxLength: 60 });
  fc.assert(fc.property(s, (text) => {
    const ids = t.encode(text);
    assertEquals(ids.length, Array.from(text).length);
    assert(ids.every((i) => i >= 3 && i < t.vocabSize));
    assertEquals(t.decode(ids), text);
  }));
});

Deno.test("char: a character outside the alphabet is a typed error with position and char", () => {
  const t = new CharTokenizer(ALPHABET);
  throws(() => t.encode("ab😀Z"), (e: unknown) => {
    assert(e instanceof TokenizerError);
    assertEquals([e.position, e.char], [2, "😀"]);
    return true;
  });
  throws(() => new CharTokenizer(`${ALPHABET}😀`).encode("😀abZ"), (e: unknown) => {
    assert(e instanceof TokenizerError);
    assertEquals([e.position, e.char], [4, "Z"]); // UTF-16 offset
    return true;
  });
  throwsTokenizerError(() => new CharTokenizer("abca"), "duplicates", "model.alphabet[3]");
});

Deno.test("char: toJSON / fromJSON / tokenizerFromJSON / loadTokenizer", async () => {
  const t = new CharTokenizer(ALPHABET);
  const back = CharTokenizer.fromJSON(JSON.parse(JSON.stringify(t)));
  assertEquals(back.alphabet, t.alphabet);
  assertEquals(back.encode("x = 1"), t.encode("x = 1"));
  const viaDispatch = tokenizerFromJSON({ model: { type: "lorafold-char", alphabet: "xyz" } });
  assertEquals(viaDispatch.encode("zyx"), [5, 4, 3]);
  const loaded = await Effect.runPromise(loadTokenizer(`${FIXTURES}char`));
  assert(loaded instanceof CharTokenizer);
  assertEquals(loaded.alphabet, t.alphabet);
  assertEquals(loaded.decode(loaded.encode("what is 2+2?\n4.")), "what is 2+2?\n4.");
  throwsTokenizerError(() => CharTokenizer.fromJSON({}), "model missing", "model");
  throwsTokenizerError(
    () => CharTokenizer.fromJSON({ model: { type: "lorafold-char" } }),
    "model.alphabet missing",
    "model.alphabet",
  );
  throwsTokenizerError(
    () => CharTokenizer.fromJSON({ model: { type: "lorafold-char", alphabet: ["a", "bc"] } }),
    "alphabet[1] is not a single character",
  );
});

// --------------------------------------------------------------------- BPE, hand-computed

Deno.test("bpe: GPT-2 byte map", () => {
  assertEquals(BYTE_TO_CHAR[0x20], "Ġ");
  assertEquals(BYTE_TO_CHAR[0x0a], "Ċ");
  assertEquals(BYTE_TO_CHAR[0x00], "Ā");
  assertEquals(BYTE_TO_CHAR[0x41], "A");
  assertEquals(BYTE_TO_CHAR[0xe9], "é");
  assertEquals(BYTE_TO_CHAR[0x80], "Ģ");
  assertEquals(BYTE_TO_CHAR[0x9f], "Ł");
  assertEquals(BYTE_TO_CHAR[0xa0], "ł");
  assertEquals(BYTE_TO_CHAR[0xad], "Ń");
  assertEquals(new Set(BYTE_TO_CHAR).size, 256);
});

const BYTE_LEVEL = { type: "ByteLevel", add_prefix_space: false, use_regex: true };

/** A tiny byte-level BPE: GPT-2 pre-tokenizer regex, no byte fallback vocab. */
const tiny = (merges: unknown[], extra: Record<string, unknown> = {}) =>
  HfTokenizer.fromJSON({
    added_tokens: [{ id: 19, content: "</s>", special: true }],
    pre_tokenizer: BYTE_LEVEL,
    decoder: BYTE_LEVEL,
    model: {
      type: "BPE",
      vocab: {
        h: 0,
        e: 1,
        l: 2,
        o: 3,
        "Ġ": 4,
        w: 5,
        r: 6,
        d: 7,
        he: 8,
        hel: 9,
        hell: 10,
        hello: 11,
        "Ġw": 12,
        or: 13,
        "Ġwor": 14,
        ld: 15,
        ll: 16,
        a: 17,
        aa: 18,
      },
      merges,
      ...extra,
    },
  });
// rank: 0 "h e", 1 "he l", 2 "hel l", 3 "hell o", 4 "Ġ w", 5 "o r", 6 "Ġw or", 7 "l d", 8 "l l", 9 "a a"
// deno-fmt-ignore
const TINY_MERGES = [
  "h e", "he l", "hel l", "hell o", "Ġ w", "o r", "Ġw or", "l d", "l l", "a a",
];

Deno.test("bpe: hand-computed merges with the Ġ space prefix", () => {
  for (const merges of [TINY_MERGES, TINY_MERGES.map((m) => m.split(" "))]) {
    const t = tiny(merges);
    // "hello" -> h e l l o: (h,e)#0 beats (l,l)#8 -> he l l o -> (he,l)#1 -> hel l o
    //   -> (hel,l)#2 -> hell o -> (hell,o)#3 -> hello = 11.
    // " world" -> Ġ w o r l d: (Ġ,w)#4 -> Ġw o r l d -> (o,r)#5 -> Ġw or l d -> (Ġw,or)#6
    //   -> Ġwor l d -> (l,d)#7 -> Ġwor ld = [14, 15].
    assertEquals(t.encode("hello world"), [11, 14, 15]);
    // " hello": the space is its own byte token Ġ (no "Ġ h" merge).
    assertEquals(t.encode(" hello"), [4, 11]);
    // Equal-rank overlaps merge leftmost first.
    assertEquals(t.encode("aaa"), [18, 17]);
    assertEquals(t.encode("aaaa"), [18, 18]);
    // "hell" + "lo": "l l"#8 only after the higher-priority merges are exhausted.
    assertEquals(t.encode("lol"), [2, 3, 2]);
    assertEquals(t.encode("llo"), [16, 3]);
    assertEquals(t.decode([11, 14, 15]), "hello world");
    assertEquals(t.decode([4, 11, 19]), " hello");
    assertEquals(t.tokenText(14), " wor");
    assertEquals(t.eosId, 19);
    assertEquals(t.vocabSize, 20);
    // Special tokens are matched before pre-tokenization and never split.
    assertEquals(t.encode("hello</s> world</s>"), [11, 19, 14, 15, 19]);
    assertEquals(t.decode([11, 19], { skipSpecialTokens: false }), "hello</s>");
  }
});

Deno.test("bpe: symbols missing from the vocab use unk_token or are dropped (as in HF)", () => {
  // Checked against Hugging Face's Rust tokenizers: "hey" -> [8] and [8, 17].
  assertEquals(tiny(TINY_MERGES).encode("hey"), [8]);
  assertEquals(tiny(TINY_MERGES, { unk_token: "a" }).encode("hey"), [8, 17]);
});

Deno.test("bpe: ignore_merges takes whole vocab words directly", () => {
  // "hello" is in the vocab, but with only "h e" as a merge BPE would give he l l o.
  assertEquals(tiny(["h e"]).encode("hello"), [8, 2, 2, 3]);
  assertEquals(tiny(["h e"], { ignore_merges: true }).encode("hello"), [11]);
});

/** Reference BPE: repeatedly merge the leftmost lowest-rank pair (Hugging Face semantics). */
const naiveBpe = (word: string[], ranks: Map<string, number>): string[] => {
  const s = [...word];
  for (;;) {
    let best = -1;
    let bestRank = Infinity;
    for (let i = 0; i + 1 < s.length; i++) {
      const r = ranks.get(`${s[i]} ${s[i + 1]}`);
      if (r !== undefined && r < bestRank) [best, bestRank] = [i, r];
    }
    if (best < 0) return s;
    s.splice(best, 2, s[best] + s[best + 1]);
  }
};

Deno.test("bpe: the merge loop agrees with the naive reference (property)", () => {
  const arb = fc.record({
    picks: fc.array(fc.tuple(fc.nat(), fc.nat()), { maxLength: 25 }),
    word: fc.string({ unit: fc.constantFrom("a", "b", "c"), minLength: 1, maxLength: 40 }),
  });
  fc.assert(fc.property(arb, ({ picks, word }) => {
    const tokens = ["a", "b", "c"];
    const merges: [string, string][] = [];
    const ranks = new Map<string, number>();
    for (const [i, j] of picks) {
      const a = tokens[i % tokens.length];
      const b = tokens[j % tokens.length];
      if (ranks.has(`${a} ${b}`)) continue;
      ranks.set(`${a} ${b}`, merges.length);
      merges.push([a, b]);
      if (!tokens.includes(a + b)) tokens.push(a + b);
    }
    const t = HfTokenizer.fromJSON({
      added_tokens: [{ id: tokens.length, content: "<eos>", special: true }],
      pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, use_regex: false },
      decoder: BYTE_LEVEL,
      model: { type: "BPE", vocab: Object.fromEntries(tokens.map((x, k) => [x, k])), merges },
    });
    const expected = naiveBpe(Array.from(word), ranks).map((x) => tokens.indexOf(x));
    assertEquals(t.encode(word), expected);
    assertEquals(t.decode(expected), word);
  }));
});

// ----------------------------------------------------------------------- BPE, the fixture

Deno.test("bpe fixture: Llama-3 pre-tokenization and merges, worked by hand", () => {
  assertEquals(bpe.encode("hello world"), [id("hello"), id("Ġworld")]);
  // " thing" -> Ġ t h i n g: (Ġ,t)#0 and (i,n)#3 -> Ġt h in g -> (in,g)#4 -> Ġt h ing.
  assertEquals(bpe.encode("the thing"), [0x74, id("he"), id("Ġt"), 0x68, id("ing")]);
  // Digits split in runs of at most three: "123" "45".
  assertEquals(bpe.encode("12345"), [id("123"), 0x34, 0x35]);
  // "\n\n" is one piece (\s*[\r\n]+) and one token.
  assertEquals(bpe.encode("a\n\nb"), [0x61, id("ĊĊ"), 0x62]);
  // Contractions are case-insensitive: "'S" is its own piece.
  assertEquals(bpe.encode("he's"), [id("he"), id("'s")]);
  assertEquals(bpe.encode("HE'S"), [0x48, 0x45, 0x27, 0x53]);
  // Multi-byte characters: é = C3 A9 -> "Ã©"; 😀 = F0 9F 98 80 -> "ðŁ" + bytes 98 80.
  assertEquals(bpe.encode("é"), [id("Ã©")]);
  assertEquals(bpe.encode("😀"), [id("ðŁ"), 0x98, 0x80]);
  assertEquals(bpe.encode("你好"), [id("ä½ł"), id("å¥½")]);
  assertEquals(bpe.tokenText(id("ä½ł")), "你");
  assertEquals(bpe.tokenText(id("Ġworld")), " world");
  assertEquals(bpe.tokenText(0x98), "\uFFFD");
  assertEquals(bpe.decode([id("ðŁ"), 0x98]), "\uFFFD"); // truncated sequence: replaced
  assertEquals(bpe.decode([0x98, 0x61]), "\uFFFDa");
});

Deno.test("bpe fixture: added tokens are kept whole; specials skipped by decode", () => {
  const text = "<|begin_of_text|>hello<|eot_id|><|eot_id|> world<tool><|end_of_text|>";
  const ids = bpe.encode(text);
  assertEquals(ids, [300, id("hello"), 302, 302, id("Ġworld"), 303, 301]);
  assertEquals(bpe.decode(ids), "hello world<tool>");
  assertEquals(bpe.decode(ids, { skipSpecialTokens: false }), text);
  assertEquals(bpe.tokenText(302), "<|eot_id|>");
  assert(bpe.isSpecial(302) && !bpe.isSpecial(303) && !bpe.isSpecial(id("hello")));
  // A partial special token is ordinary text.
  assertEquals(bpe.decode(bpe.encode("<|eot_id|")), "<|eot_id|");
  // ids without a token (a hole in the vocabulary, a model's padding rows) are skipped, as HF
  // tokenizers' decode does; ids that are no token id at all are errors
  assertEquals(bpe.decode([id("hello"), 290, id("Ġworld"), bpe.vocabSize + 7]), "hello world");
  assertEquals(bpe.decode([290]), "");
  throwsTokenizerError(() => bpe.decode([id("hello"), -1]), "unknown token id -1");
  throwsTokenizerError(() => bpe.decode([1.5]), "unknown token id 1.5");
});

/** Any Unicode scalar value (no lone surrogates); cheaper than fc's "binary" unit. */
const codePoint = fc.integer({ min: 0, max: 0x10ffff - 0x800 })
  .map((n) => String.fromCodePoint(n >= 0xd800 ? n + 0x800 : n));

Deno.test("bpe: a lone surrogate is read as U+FFFD before anything else", () => {
  assertEquals(bpe.encode("a\uD800b"), bpe.encode("a\uFFFDb"));
  assertEquals(bpe.encode("\uDFFF\uD800"), bpe.encode("\uFFFD\uFFFD"));
  assertEquals(bpe.decode(bpe.encode("x\uDBFF")), "x\uFFFD");
  assertEquals(bpe.encode("\uDBFF\uDFFF"), bpe.encode(String.fromCodePoint(0x10ffff)));
});

Deno.test("bpe fixture: decode(encode(s)) == s for random unicode (property)", () => {
  const pieces = fc.constantFrom(
    "hello",
    " world",
    "😀",
    "é",
    "\n",
    "\r\n",
    "  ",
    "\t",
    "123",
    "4567",
    "'s",
    "'LL",
    "你好",
    "<tool>",
    "👩‍👩‍👧",
    "\uFEFF",
    "\u0000",
    "ﬁ",
    "e\u0301",
  );
  const unit = fc.oneof(pieces, fc.string({ unit: codePoint, maxLength: 3 }));
  const arb = fc.oneof(fc.string({ unit: codePoint }), fc.array(unit).map((xs) => xs.join("")));
  fc.assert(
    fc.property(arb, (s) => {
      const ids = bpe.encode(s);
      assert(ids.every((i) => Number.isInteger(i) && i >= 0 && i < bpe.vocabSize));
      assertEquals(bpe.decode(ids), s);
    }),
    { numRuns: 300 },
  );
});

Deno.test("bpe: NFC normalizer applies before BPE", () => {
  const json = {
    ...fixtureJson(),
    normalizer: { type: "Sequence", normalizers: [{ type: "NFC" }] },
  };
  const t = HfTokenizer.fromJSON(json);
  assertEquals(t.encode("e\u0301"), [id("Ã©")]);
  fc.assert(fc.property(fc.string({ unit: "grapheme" }), (s) => {
    assertEquals(t.decode(t.encode(s)), s.normalize("NFC"));
  }));
});

// ------------------------------------------------------------------------ special tokens

Deno.test("bpe: special token resolution (defaults, configs, overrides)", async () => {
  // Defaults: eos = first known EOS name; bos = TemplateProcessing's leading token; pad = eos.
  assertEquals([bpe.bosId, bpe.eosId, bpe.padId, bpe.vocabSize], [300, 301, 301, 304]);
  // tokenizer_config.json (eos <|eot_id|>) wins over config.json (eos_token_id [301, 302]).
  const loaded = await Effect.runPromise(loadTokenizer(`${FIXTURES}bpe`));
  assert(loaded instanceof HfTokenizer);
  assertEquals([loaded.bosId, loaded.eosId, loaded.padId], [300, 302, 302]);
  const over = await Effect.runPromise(
    loadTokenizer(`${FIXTURES}bpe`, { bos: null, eos: 301, pad: "<tool>" }),
  );
  assertEquals([over.bosId, over.eosId, over.padId], [null, 301, 303]);
  // Qwen2 style: bos_token null in tokenizer_config beats config.json's bos_token_id.
  assertEquals(
    specialsFromConfigs(
      { bos_token: null, eos_token: "<|im_end|>", pad_token: "<|endoftext|>" },
      { bos_token_id: 151643, eos_token_id: 151645 },
    ),
    { bos: null, eos: "<|im_end|>", pad: "<|endoftext|>" },
  );
  assertEquals(specialsFromConfigs(undefined, { eos_token_id: [7, 8], bos_token_id: 1 }), {
    bos: 1,
    eos: 7,
  });
  throwsTokenizerError(
    () => HfTokenizer.fromJSON(fixtureJson(), { eos: "<|im_end|>" }),
    "not in the vocabulary",
    "eos_token",
  );
  throwsTokenizerError(
    () => HfTokenizer.fromJSON({ ...fixtureJson(), added_tokens: [] }),
    "no known EOS token",
    "eos_token",
  );
  const missing = await Effect.runPromiseExit(loadTokenizer(`${FIXTURES}nope`));
  assert(Exit.isFailure(missing));
  assert(String(missing.cause).includes("cannot read"));
});

// ------------------------------------------------------------------------- typed errors

Deno.test("bpe: malformed tokenizer.json fields are typed errors naming the field", () => {
  const base = fixtureJson();
  const model = base.model as Record<string, unknown>;
  const withModel = (patch: Record<string, unknown>) => ({
    ...base,
    model: { ...model, ...patch },
  });
  // deno-fmt-ignore
  const cases: [unknown, string, string][] = [
    [null, "not an object", ""],
    [{}, "model missing", "model"],
    [withModel({ type: "WordPiece" }), 'model.type: expected "BPE"', "model.type"],
    [withModel({ vocab: undefined }), "model.vocab missing", "model.vocab"],
    [withModel({ vocab: [] }), "model.vocab is not an object", "model.vocab"],
    [withModel({ vocab: { a: 0, b: -1 } }), 'model.vocab["b"] is not a non-negative', 'model.vocab["b"]'],
    [withModel({ vocab: { a: 0, b: 0 } }), "already used", 'model.vocab["b"]'],
    [withModel({ merges: undefined }), "model.merges missing", "model.merges"],
    [withModel({ merges: {} }), "model.merges is not an array", "model.merges"],
    [withModel({ merges: ["h e", "h e l"] }), "model.merges[1] is not a pair", "model.merges[1]"],
    [withModel({ merges: ["h e", ["h"]] }), "model.merges[1] is not a pair", "model.merges[1]"],
    [withModel({ merges: [42] }), "model.merges[0] is not a pair", "model.merges[0]"],
    [withModel({ merges: ["h é"] }), "model.merges[0]: token", "model.merges[0]"],
    [withModel({ merges: ["x y"] }), 'token "xy" is not in model.vocab', "model.merges[0]"],
    [withModel({ unk_token: "<unk>" }), "model.unk_token", "model.unk_token"],
    [withModel({ continuing_subword_prefix: "##" }), "not supported", "model.continuing_subword_prefix"],
    [{ ...base, added_tokens: [{ id: 5 }] }, "added_tokens[0].content is not a string", "added_tokens[0].content"],
    [{ ...base, added_tokens: [{ id: -1, content: "x" }] }, "added_tokens[0].id", "added_tokens[0].id"],
    [{ ...base, added_tokens: {} }, "added_tokens is not an array", "added_tokens"],
    [{ ...base, pre_tokenizer: { type: "Metaspace" } }, "unsupported pre-tokenizer", "pre_tokenizer.type"],
    [
      { ...base, pre_tokenizer: { type: "Sequence", pretokenizers: [{ type: "Split", pattern: { Regex: "(" } }, { type: "ByteLevel" }] } },
      "unsupported regex",
      "pre_tokenizer.pretokenizers[0].pattern.Regex",
    ],
    [
      { ...base, pre_tokenizer: { type: "Sequence", pretokenizers: [{ type: "Split", pattern: "x" }] } },
      "pattern is not",
      "pre_tokenizer.pretokenizers[0].pattern",
    ],
    [{ ...base, normalizer: { type: "Precompiled" } }, "unsupported normalizer", "normalizer.type"],
    [
      { ...base, normalizer: { type: "Sequence", normalizers: [{ type: "NFC" }, { type: "BertNormalizer" }] } },
      "unsupported normalizer",
      "normalizer.normalizers[1].type",
    ],
    [
      { ...base, normalizer: { type: "Replace", pattern: { Regex: "[" }, content: "" } },
      "unsupported regex",
      "normalizer.pattern.Regex",
    ],
    [{ ...base, decoder: null }, "decoder missing", "decoder"],
    [{ ...base, decoder: { type: "WordPiece" } }, "unsupported decoder", "decoder.type"],
    [
      { ...base, decoder: { type: "Sequence", decoders: [{ type: "Fuse" }, { type: "CTC" }] } },
      "unsupported decoder",
      "decoder.decoders[1].type",
    ],
    [
      { ...base, added_tokens: [{ id: 300, content: "<x>", single_word: true }] },
      "not supported",
      "added_tokens[0].single_word",
    ],
    [withModel({ unk_token: "h", fuse_unk: true, byte_fallback: true }), "fuse_unk", "model.fuse_unk"],
    [{ ...base, pre_tokenizer: { type: "Split", pattern: { String: " " }, behavior: "Nope" } }, "behavior", "pre_tokenizer.behavior"],
  ];
  for (const [json, reason, field] of cases) {
    throwsTokenizerError(() => HfTokenizer.fromJSON(json), reason, field);
  }
  throwsTokenizerError(
    () => tokenizerFromJSON({ model: { type: "Unigram" } }),
    "unsupported tokenizer model",
    "model.type",
  );
});

Deno.test("bpe: other Split behaviors and Digits", () => {
  const make = (pre: unknown) =>
    HfTokenizer.fromJSON({
      ...fixtureJson(),
      pre_tokenizer: {
        type: "Sequence",
        pretokenizers: [pre, { type: "ByteLevel", use_regex: false, add_prefix_space: false }],
      },
    });
  // Without splitting, " hello" stays one piece and ignore_merges finds Ġhello.
  const merged = make({ type: "Split", pattern: { String: " " }, behavior: "MergedWithNext" });
  assertEquals(merged.encode("a hello"), [0x61, id("Ġhello")]);
  const isolated = make({ type: "Split", pattern: { String: " " }, behavior: "Isolated" });
  assertEquals(isolated.encode("a hello"), [0x61, 0x20, id("hello")]);
  const removed = make({ type: "Split", pattern: { String: " " }, behavior: "Removed" });
  assertEquals(removed.decode(removed.encode("a hello")), "ahello");
  const digits = make({ type: "Digits", individual_digits: true });
  assertEquals(digits.encode("123"), [0x31, 0x32, 0x33]);
});
