/**
 * Prompt datasets, rewards and options of bring-your-own-data runs: JSONL and Parquet rows (bad
 * rows are typed errors naming file, row and column), seeded epoch order (every epoch a
 * permutation, fast-check), the built-in rewards (boxed / last-number accuracy, think formats,
 * soft length), user reward modules with TRL's arguments, the dataset task's prompts (chat
 * rendered, no added BOS) and TRL's batch options.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Effect } from "effect";
import fc from "fast-check";
import { readDatasetFile } from "../src/io/dataset.ts";
import { scoreRewards } from "../src/grpo/rewards.ts";
import {
  epochSampler,
  loadPromptDataset,
  promptDatasetOf,
  splitDataset,
  stepsForEpochs,
} from "../src/task/dataset.ts";
import {
  accuracyReward,
  extractAnswer,
  lastBoxed,
  lengthReward,
  thinkAnswerFormatReward,
  thinkFormatReward,
} from "../src/task/builtin_rewards.ts";
import { loadRewardModule, userReward } from "../src/task/reward_module.ts";
import { datasetTask } from "../src/task/dataset_task.ts";
import { chatTemplateFromConfig } from "../src/tokenizer/chat_template.ts";
import { decodeTrainConfig } from "../src/app/config.ts";
import { trainTaskOf } from "../src/app/train_task.ts";
import { Rng } from "../src/model/rng.ts";
import { runExample as ownDataset } from "../examples/own_dataset.ts";

const run = <A, E>(e: Effect.Effect<A, E>) => Effect.runPromise(e);
const fail = <A, E>(e: Effect.Effect<A, E>) => Effect.runPromise(Effect.flip(e));

const tmp = async (name: string, text: string) => {
  const dir = await Deno.makeTempDir();
  const p = join(dir, name);
  await writeFile(p, text);
  return p;
};

Deno.test("dataset: JSONL rows; bad lines, non-objects, missing and extra columns name the row", async () => {
  const good = await tmp("d.jsonl", '{"prompt":"a","x":1}\n\n{"prompt":"b","x":2}\n');
  const ds = await run(readDatasetFile(good));
  assertEquals(ds.columns, ["prompt", "x"]);
  assertEquals(ds.rows, [{ prompt: "a", x: 1 }, { prompt: "b", x: 2 }]);
  for (
    const [text, tag] of [
      ['{"prompt":"a"}\n{"prompt":', "row 2: line 2 is not JSON"],
      ['{"prompt":"a"}\n\n[1,2]', "row 2: (line 3) is not an object"],
      ['{"prompt":"a","x":1}\n{"prompt":"b"}', 'row 2 column "x": (line 2) is missing'],
      ['{"prompt":"a"}\n{"prompt":"b","y":0}', 'row 2 column "y": (line 2) is not a column'],
      ["\n\n", "has no rows"],
    ]
  ) {
    const e = await fail(readDatasetFile(await tmp("bad.jsonl", text)));
    assertEquals(e._tag, "DatasetError");
    assert(e.message.includes("bad.jsonl") && e.message.includes(tag), e.message);
  }
  const e = await fail(readDatasetFile(await tmp("d.csv", "prompt\na\n")));
  assert(e.message.includes('unknown format ".csv"'), e.message);
  const missing = await fail(readDatasetFile("/nonexistent/x.jsonl"));
  assert(missing.message.includes("cannot read"), missing.message);
});

/** A Parquet file written by hyparquet-writer in a process that touches no project config. */
const writeParquet = async (path: string) => {
  const code = `import { parquetWriteBuffer } from "npm:hyparquet-writer@0.17.0";
const buf = parquetWriteBuffer({ columnData: [
  { name: "prompt", data: ["What is 2+2?", "What is 3+3?"], type: "STRING" },
  { name: "solution", data: ["4", "\\\\boxed{6}"], type: "STRING" },
  { name: "level", data: [1n, 9007199254740993n], type: "INT64" },
  { name: "weight", data: [0.5, 2], type: "DOUBLE" },
] });
Deno.writeFileSync(${JSON.stringify(path)}, new Uint8Array(buf));
// conversational: a list<struct<content, role>> column, as Hugging Face datasets store messages
const chat = parquetWriteBuffer({
  columnData: [
    { name: "prompt", data: [[{ content: "hi", role: "user" }], [
      { content: "Be brief.", role: "system" },
      { content: "yo", role: "user" },
    ]] },
    { name: "label", data: ["a", "b"] },
  ],
  schema: [
    { name: "root", num_children: 2 },
    { name: "prompt", repetition_type: "OPTIONAL", converted_type: "LIST", num_children: 1 },
    { name: "list", repetition_type: "REPEATED", num_children: 1 },
    { name: "element", repetition_type: "OPTIONAL", num_children: 2 },
    { name: "content", type: "BYTE_ARRAY", converted_type: "UTF8", repetition_type: "OPTIONAL" },
    { name: "role", type: "BYTE_ARRAY", converted_type: "UTF8", repetition_type: "OPTIONAL" },
    { name: "label", type: "BYTE_ARRAY", converted_type: "UTF8", repetition_type: "OPTIONAL" },
  ],
});
Deno.writeFileSync(${
    JSON.stringify(path.replace(".parquet", "_chat.parquet"))
  }, new Uint8Array(chat));`;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--no-config", "--no-lock", "--node-modules-dir=none", code],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) throw new Error(new TextDecoder().decode(out.stderr));
};

Deno.test("dataset: Parquet rows read with hyparquet: text and message-list prompts, INT64 as numbers", async () => {
  const dir = await Deno.makeTempDir();
  const p = join(dir, "d.parquet");
  await writeParquet(p);
  const ds = await run(loadPromptDataset(p));
  assertEquals(ds.conversational, false);
  assertEquals(ds.columns, ["prompt", "solution", "level", "weight"]);
  assertEquals(ds.rows, [
    { prompt: "What is 2+2?", solution: "4", level: 1, weight: 0.5 },
    { prompt: "What is 3+3?", solution: "\\boxed{6}", level: "9007199254740993", weight: 2 },
  ]);
  const chat = await run(loadPromptDataset(join(dir, "d_chat.parquet")));
  assertEquals(chat.conversational, true);
  assertEquals(chat.rows, [
    { prompt: [{ content: "hi", role: "user" }], label: "a" },
    {
      prompt: [{ content: "Be brief.", role: "system" }, { content: "yo", role: "user" }],
      label: "b",
    },
  ]);
  const bad = await fail(readDatasetFile(await tmp("x.parquet", "not parquet at all")));
  assert(bad.message.includes("is not a readable Parquet file"), bad.message);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("dataset: prompts must be text or conversations, alike in every row", async () => {
  const conv = [{ role: "user", content: "hi" }];
  assertEquals((await run(promptDatasetOf("m", [{ prompt: conv }]))).conversational, true);
  for (
    const [rows, mention] of [
      [[{ text: "a" }], 'column "prompt": is missing (columns: text)'],
      [[{ prompt: "a" }, { prompt: conv }], 'row 2 column "prompt": is a list of messages'],
      [[{ prompt: conv }, { prompt: "a" }], 'row 2 column "prompt": is text'],
      [[{ prompt: "" }], 'row 1 column "prompt": is empty'],
      [[{ prompt: 3 }], "must be text or a list of messages, got number"],
      [[{ prompt: [{ role: 1, content: "x" }] }], 'message 0 has no string "role"'],
      [[{ prompt: [] }], "has no messages"],
      [[{ prompt: "a", completions: 1 }], 'column "completions": is a reserved name'],
    ] as const
  ) {
    const e = await fail(promptDatasetOf("m", rows as never));
    assert(e.message.includes(mention), e.message);
  }
});

Deno.test("dataset: every epoch visits every row once, in a seeded order", () => {
  fc.assert(fc.property(
    fc.integer({ min: 1, max: 40 }),
    fc.integer({ min: 0, max: 1000 }),
    fc.boolean(),
    (n, seed, shuffle) => {
      const a = epochSampler(n, seed, shuffle);
      const b = epochSampler(n, seed, shuffle);
      for (let epoch = 0; epoch < 3; epoch++) {
        const rows = Array.from({ length: n }, (_, i) => a(epoch * n + i));
        assert(rows.every((r) => r.epoch === epoch));
        assertEquals([...rows.map((r) => r.row)].sort((x, y) => x - y), [...Array(n).keys()]);
        if (!shuffle) assertEquals(rows.map((r) => r.row), [...Array(n).keys()]);
      }
      // random access (a resumed run) draws what a sequential walk drew
      assertEquals(b(2 * n + (seed % n)), a(2 * n + (seed % n)));
    },
  ));
  const orders = [0, 1].map((e) =>
    Array.from({ length: 20 }, (_, i) => epochSampler(20, 3, true)(e * 20 + i).row)
  );
  assert(orders[0].join() !== orders[1].join(), "epochs are shuffled differently");
  assertEquals(stepsForEpochs(2, 10, 4), 5);
  assertEquals(stepsForEpochs(0.1, 3, 16), 1);
});

Deno.test("dataset: an eval split holds out a seeded share, disjoint from training", async () => {
  const ds = await run(
    promptDatasetOf("d", Array.from({ length: 10 }, (_, i) => ({ prompt: `p${i}` }))),
  );
  const { train, eval: ev } = await run(splitDataset(ds, 0.3, 1));
  assertEquals(ev.rows.length, 3);
  assertEquals(train.rows.length, 7);
  assertEquals(new Set([...train.rows, ...ev.rows].map((r) => r.prompt)).size, 10);
  assertEquals((await run(splitDataset(ds, 0.3, 1))).eval.rows, ev.rows);
  const e = await fail(splitDataset(ds, 0.01, 1));
  assert(e.message.includes("cannot hold out"), e.message);
});

const ctx = (answers: (string | null)[], ids?: number[][]) => ({
  prompts: answers.map(() => "p"),
  answers,
  completionIds: ids,
});

Deno.test("rewards: accuracy reads \\boxed{}, <answer>, the last number; null without a reference", async () => {
  assertEquals(lastBoxed("so \\boxed{\\frac{1}{2}} and"), "\\frac{1}{2}");
  assertEquals(lastBoxed("\\boxed{1} then \\boxed {2}"), "2");
  assertEquals(lastBoxed("\\boxed{unclosed"), null);
  assertEquals(extractAnswer("<answer> 7 </answer>"), "7");
  assertEquals(extractAnswer("it costs 1,200 dollars, not 3"), "3");
  assertEquals(extractAnswer("no digits"), null);
  const completions = [
    "The answer is \\boxed{72}.",
    "72.0",
    "<think>36+36</think><answer>72</answer>",
    "I think 70",
    "\\boxed{\\frac{1}{2}}",
    "anything",
    "1,000 apples",
  ];
  const answers = ["#### 72", "72", "\\boxed{72}", "72", "$\\frac{1}{2}$", null, "1000"];
  const out = await run(scoreRewards([accuracyReward], completions, ctx(answers)));
  assertEquals([...out.perFunction[0]], [1, 1, 1, 0, 1, NaN, 1]);
});

Deno.test("rewards: think formats and the soft length punishment", async () => {
  const cs = [
    "<think>\nwhy\n</think>\n<answer>\n4\n</answer>",
    "<think>why</think> so 4",
    "<think>a<think>b</think>",
    "4",
  ];
  const t = await run(
    scoreRewards([thinkFormatReward, thinkAnswerFormatReward], cs, ctx(cs.map(() => null))),
  );
  assertEquals([...t.perFunction[0]], [1, 1, 0, 0]);
  assertEquals([...t.perFunction[1]], [1, 0, 0, 0]);
  // budget 10: free up to 8 tokens, then -0.5 per token to -1 at 10
  const ids = [8, 9, 10].map((n) => Array(n).fill(1));
  const l = await run(
    scoreRewards([lengthReward(10)], ["a", "b", "c"], ctx([null, null, null], ids)),
  );
  assertEquals([...l.perFunction[0]], [0, -0.5, -1]);
});

Deno.test("rewards: user functions get TRL's arguments, may be async and return null", async () => {
  const rows = [
    { prompt: [{ role: "user", content: "q1" }], label: "a" },
    { prompt: [{ role: "user", content: "q2" }], label: "b" },
  ];
  let seen: Record<string, unknown> = {};
  const r = userReward("mine", async (args) => {
    seen = { ...args };
    await Promise.resolve();
    return args.completions.map((c, i) =>
      i === 1 ? null : (c as readonly { content: string }[])[0].content === args.label[i] ? 1 : 0
    );
  });
  const out = await run(scoreRewards([r], ["a", "x"], {
    prompts: ["r1", "r2"],
    answers: [null, null],
    completionIds: [[5], [6, 7]],
    rows,
  }));
  assertEquals([...out.perFunction[0]], [1, NaN]);
  assertEquals(seen.prompts, rows.map((x) => x.prompt));
  assertEquals(seen.completions, [[{ role: "assistant", content: "a" }], [{
    role: "assistant",
    content: "x",
  }]]);
  assertEquals(seen.completionIds, [[5], [6, 7]]);
  assertEquals(seen.completion_ids, [[5], [6, 7]]);
  assertEquals(seen.label, ["a", "b"]);
  assert(!("prompt" in seen));
  // text data: completions stay text; a null for the whole batch is "does not apply"
  const none = userReward("none", (args) => (args.completions[0] === "t" ? null : [1]));
  const n = await run(scoreRewards([none], ["t"], {
    prompts: ["p"],
    answers: [null],
    rows: [{ prompt: "p" }],
  }));
  assertEquals([...n.perFunction[0]], [NaN]);
  const boom = userReward("boom", () => Promise.reject(new Error("judge down")));
  const e = await fail(scoreRewards([boom], ["t"], { prompts: ["p"], answers: [null] }));
  assertEquals(e.message, 'reward "boom" failed: judge down');
});

Deno.test("rewards: modules load by path (default or #named export), with typed failures", async () => {
  const dir = await Deno.makeTempDir();
  await writeFile(
    join(dir, "r.ts"),
    `export const columns = ["label"];
export default ({ completions }) => completions.map(() => 1);
export const other = ({ completions }) => completions.map(() => 0);
export const notFn = 3;`,
  );
  const d = await run(loadRewardModule("./r.ts", dir));
  assertEquals(d.reward.name, "r");
  assertEquals(d.columns, ["label"]);
  const o = await run(loadRewardModule("./r.ts#other", dir));
  assertEquals(o.reward.name, "other");
  const out = await run(
    scoreRewards([d.reward, o.reward], ["x"], { prompts: ["p"], answers: [null] }),
  );
  assertEquals([...out.combined], [1]);
  for (
    const [spec, mention] of [
      ["./r.ts#notFn", 'has no exported function "notFn"'],
      ["./missing.ts", "cannot import"],
    ]
  ) {
    const e = await fail(loadRewardModule(spec, dir));
    assertEquals(e._tag, "RewardModuleError");
    assert(e.message.startsWith(`reward function ${spec}: ${mention}`), e.message);
  }
  await Deno.remove(dir, { recursive: true });
});

Deno.test("dataset task: chat-rendered prompts without added BOS, rows and answers, epoch order", async () => {
  const template = chatTemplateFromConfig({
    chat_template: "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}" +
      "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}{{ suffix }}",
    bos_token: "<s>",
  }, "test")!;
  const rows = Array.from({ length: 5 }, (_, i) => ({
    prompt: [{ role: "user", content: `q${i}` }],
    answer: i,
  }));
  const train = await run(promptDatasetOf("t", rows));
  const task = await run(datasetTask({
    train,
    eval: null,
    rewards: [accuracyReward],
    chatTemplate: template,
    chatTemplateKwargs: { suffix: "!" },
    seed: 4,
    baseModelDir: null,
  }));
  const rng = new Rng(0);
  const drawn = Array.from(
    { length: 10 },
    (_, k) => task.prompts(rng, { step: Math.floor(k / 2) + 1, index: k % 2, promptsPerStep: 2 }),
  );
  for (const epoch of [drawn.slice(0, 5), drawn.slice(5)]) {
    assertEquals(
      epoch.map((p) => p.prompt).sort(),
      rows.map((_, i) => `<s>[user]q${i}[assistant]!`),
    );
  }
  const first = drawn[0];
  assertEquals(first.addSpecialTokens, false);
  assertEquals(first.answer, String(first.row!.answer));
  assertEquals(task.evaluation.metric, "held-out accuracy");
  assert(task.evaluation.detail.includes("first 5 training rows (no eval set given)"));
  // conversations need a template; one the template cannot render names the row
  const e = await fail(
    datasetTask({
      train,
      eval: null,
      rewards: [],
      chatTemplate: null,
      seed: 0,
      baseModelDir: null,
    }),
  );
  assert(e.message.includes("holds conversations, but the model has no chat template"), e.message);
  const strict = chatTemplateFromConfig({
    chat_template: "{% if messages[0].content == 'q3' %}{{ raise_exception('no q3') }}{% endif %}x",
  }, "strict")!;
  const e2 = await fail(
    datasetTask({
      train,
      eval: null,
      rewards: [],
      chatTemplate: strict,
      seed: 0,
      baseModelDir: null,
    }),
  );
  assert(
    e2.message.startsWith('dataset t row 4 column "prompt"') && e2.message.includes("no q3"),
    e2.message,
  );
});

Deno.test("options: TRL's batch, step and naming options", async () => {
  const cfg = (input: Record<string, unknown>) => run(decodeTrainConfig(input, {}));
  const c = await cfg({
    model_name_or_path: "m",
    dataset_name: "d.jsonl",
    max_steps: 7,
    save_steps: 3,
    per_device_train_batch_size: 8,
    gradient_accumulation_steps: 4,
    num_generations: 4,
    lora_target_modules: "all-linear",
    reward_funcs: ["accuracy", "./r.ts"],
    max_prompt_length: 256,
    logging_steps: 5,
  });
  assertEquals([c.model, c.dataset, c.steps, c.checkpointEvery], ["m", "d.jsonl", 7, 3]);
  assertEquals(c.promptsPerStep, 8); // 8 x 4 completions / 4 generations
  assertEquals(c.targetModules.length, 7);
  assertEquals([c.maxPromptLength, c.loggingSteps], [256, 5]);
  assertEquals((await cfg({ generation_batch_size: 24, num_generations: 8 })).promptsPerStep, 3);
  for (
    const [input, mention] of [
      [
        { generation_batch_size: 20, num_generations: 8 },
        "must be a multiple of num_generations (8)",
      ],
      [{ gradient_accumulation_steps: 2 }, "needs per_device_train_batch_size"],
      [{ per_device_train_batch_size: 8, prompts_per_step: 2 }, "not both"],
      [{ num_train_epochs: 1, max_steps: 3 }, "give it or steps"],
      [{ steps: 3, max_steps: 4 }, "steps"],
    ] as const
  ) {
    const e = await fail(decodeTrainConfig(input, {}));
    assertEquals(e._tag, "TrainConfigError");
    assert(e.message.includes(mention), e.message);
  }
});

Deno.test("examples/own_dataset.ts: a user's JSONL and reward train the shipped model end to end", async () => {
  const dir = await Deno.makeTempDir();
  const s = await run(ownDataset(dir, 30));
  // held-out share of exact sums, greedy: the user's reward is the exact match
  assert(s.accuracyAfter > s.accuracyBefore + 0.1, `${s.accuracyBefore} -> ${s.accuracyAfter}`);
  const lines = (await Deno.readTextFile(join(s.runDir, "metrics.jsonl"))).trim().split("\n");
  assertEquals(lines.length, 30);
  assert("rewards/sum/mean" in JSON.parse(lines[0]));
  await Deno.remove(dir, { recursive: true });
});

Deno.test("trainTaskOf: the built-in task is one dataset; files get epochs, splits and checked rewards", async () => {
  const cfg = (input: Record<string, unknown>) => run(decodeTrainConfig(input, {}));
  const builtin = await run(trainTaskOf(await cfg({ reward_funcs: ["accuracy", "think_format"] })));
  assertEquals(builtin.task.name, "arithmetic");
  assertEquals(builtin.task.rewards.map((r) => r.name), ["accuracy", "think_format"]);
  const noEpochs = await fail(trainTaskOf(await cfg({ num_train_epochs: 1 })));
  assert(noEpochs.message.includes("the built-in task has no epochs"), noEpochs.message);
  const dir = await Deno.makeTempDir();
  const file = join(dir, "d.jsonl");
  await writeFile(
    file,
    Array.from({ length: 20 }, (_, i) => JSON.stringify({ prompt: `${i}+1=`, answer: i + 1 }))
      .join("\n"),
  );
  const base = { model: dir, dataset: file, prompts_per_step: 4 };
  const t = await run(trainTaskOf(await cfg({ ...base, num_train_epochs: 2, eval_split: 0.25 })));
  assertEquals(t.config.steps, 8); // 2 epochs x 15 training rows / 4 prompts a step, rounded up
  assertEquals(t.task.rewards.map((r) => r.name), ["accuracy"]); // the answer column's default
  assert(t.task.evaluation.detail.startsWith("5 rows of"), t.task.evaluation.detail);
  for (
    const [input, mention] of [
      [{ ...base, model: null }, "needs a model"],
      [{ ...base, reward_funcs: ["accuracy", "nope"] }, 'unknown reward function "nope"'],
      [{ ...base, reward_funcs: ["length", "length"] }, '"length" is named twice'],
      [{ ...base, reward_funcs: ["accuracy"], reward_weights: [1, 2] }, "2 weights for 1"],
      [{ ...base, eval_split: 0.5, eval_dataset: file }, "not both"],
      [{ ...base, chat_template_kwargs: ["novalue"] }, "key=value"],
    ] as const
  ) {
    const e = await fail(trainTaskOf(await cfg(input)));
    assert(e.message.includes(mention), e.message);
  }
  await writeFile(file, JSON.stringify({ prompt: "no answer column" }));
  const e = await fail(trainTaskOf(await cfg(base)));
  assert(e.message.includes("has no answer / solution / ground_truth column"), e.message);
  const e2 = await fail(trainTaskOf(await cfg({ ...base, reward_funcs: ["accuracy"] })));
  assert(e2.message.includes('column "answer | solution | ground_truth": is missing'), e2.message);
  await Deno.remove(dir, { recursive: true });
});
