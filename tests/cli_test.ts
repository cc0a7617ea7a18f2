/**
 * The command line as a user runs it (real `deno run src/cli/main.ts` processes): every command's
 * --help lists every option with its default and allowed values; flags parse lists and numbers;
 * a config file (TRL's snake_case keys) is merged under the flags; bad flags are one line with
 * exit code 2 and a "did you mean"; a short training run with list flags completes.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { join } from "node:path";
import { Effect } from "effect";
import { kebabCase, optionAllowed, type OptionFields } from "../src/base/options.ts";
import { trainOptionFields } from "../src/app/config.ts";
import { grpoOptionFields } from "../src/grpo/config.ts";
import { serveOptionFields } from "../src/server/config.ts";
import { pretrainOptionFields } from "../src/cli/pretrain.ts";
import { parseTrainArgs } from "../src/cli/main.ts";
import { valueFromText } from "../src/cli/flags.ts";
import { runCli } from "./support/cli.ts";

const cli = runCli;

const helpLists = (help: string, fields: OptionFields) => {
  for (const [key, schema] of Object.entries(fields)) {
    const line = help.split("\n").find((l) => l.trimStart().startsWith(`--${kebabCase(key)} `));
    assert(line !== undefined, `--help lacks --${kebabCase(key)}`);
    assert(/Default: /.test(line) && line.includes(`Allowed: ${optionAllowed(schema)}`), line);
  }
};

Deno.test("cli: train, serve and pretrain --help list every option with default and allowed values", async () => {
  const train = await cli(["train", "--help"]);
  assertEquals(train.code, 0, train.stderr);
  helpLists(train.stdout, { ...trainOptionFields, ...grpoOptionFields });
  assert(train.stdout.includes("--config FILE"));
  // the built-in task's recommended values are the defaults train shows
  assert(/--learning-rate number .*Default: 0\.003\./.test(train.stdout), train.stdout);
  const serve = await cli(["serve", "--help"]);
  assertEquals(serve.code, 0, serve.stderr);
  helpLists(serve.stdout, serveOptionFields);
  assert(/--model string .*Default: none \(required\)/.test(serve.stdout), serve.stdout);
  const pretrain = await cli(["pretrain", "--help"]);
  assertEquals(pretrain.code, 0, pretrain.stderr);
  helpLists(pretrain.stdout, pretrainOptionFields);
});

Deno.test("cli: a bad or unknown flag is one line on stderr, exit code 2, with a did-you-mean", async () => {
  for (
    const [args, mention] of [
      [["train", "--stepz", "3"], "Did you mean this? --steps"],
      [["train", "--steps", "0"], "an integer >= 1"],
      [["train", "--reward-weights", "1,x"], "a list of finite numbers"],
      [["train", "--target-modules", "qkv_proj"], "q_proj"],
      [["train", "--mode", "full", "--push", "lora"], "push"],
      [["pretrain", "--target-accuracy", "2"], "(0, 1]"],
      [["trian"], "train"],
    ] as const
  ) {
    const r = await cli(args);
    assertEquals(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    const lines = r.stderr.trim().split("\n");
    assertEquals(lines.length, 1, r.stderr);
    assert(lines[0].includes(mention), lines[0]);
  }
});

Deno.test("cli: lists and numbers parse from flags; a config file with TRL names is merged under them", async () => {
  const cfg = await Effect.runPromise(
    parseTrainArgs([
      "--reward-weights",
      "1,0.5",
      "--target-modules",
      "q_proj,v_proj",
      "--epsilon-high",
      "null",
      "--no-vllm-importance-sampling-correction",
      "--learning-rate",
      "2e-4",
    ]),
  );
  assertEquals(cfg.grpo.rewardWeights, [1, 0.5]);
  assertEquals(cfg.targetModules, ["q_proj", "v_proj"]);
  assertEquals(cfg.grpo.epsilonHigh, null);
  assertEquals(cfg.grpo.vllmImportanceSamplingCorrection, false);
  assertEquals(cfg.grpo.learningRate, 2e-4);
  // untouched options keep the built-in task's defaults
  assertEquals([cfg.grpo.maxCompletionLength, cfg.steps, cfg.loraR], [5, 60, 8]);

  const dir = await Deno.makeTempDir();
  const file = join(dir, "grpo.json");
  await Deno.writeTextFile(
    file,
    JSON.stringify({
      loss_type: "bnpo",
      num_generations: 4,
      lora_r: 4,
      steps: 9,
      adam_beta2: 0.98,
    }),
  );
  const merged = await Effect.runPromise(parseTrainArgs(["--config", file, "--steps", "3"]));
  assertEquals(
    [
      merged.grpo.lossType,
      merged.grpo.numGenerations,
      merged.loraR,
      merged.steps,
      merged.adamBeta2,
    ],
    ["bnpo", 4, 4, 3, 0.98],
  );
  await Deno.writeTextFile(file, JSON.stringify({ num_generation: 4 }));
  const bad = await cli(["train", "--config", file]);
  assertEquals(bad.code, 2, bad.stderr);
  assert(
    bad.stderr.includes('unknown option "num_generation"; did you mean numGenerations?'),
    bad.stderr,
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("cli: flag text becomes the field's value (null, numbers, literals, lists)", () => {
  const ast = (k: string) => ({ ...trainOptionFields, ...grpoOptionFields })[k].ast;
  assertEquals(valueFromText(ast("rewardWeights"), "1, 0.5,"), [1, 0.5]);
  assertEquals(valueFromText(ast("rewardWeights"), "null"), null);
  assertEquals(valueFromText(ast("targetModules"), "q_proj,v_proj"), ["q_proj", "v_proj"]);
  assertEquals(valueFromText(ast("epsilonHigh"), "0.3"), 0.3);
  assertEquals(valueFromText(ast("steps"), "ten"), "ten"); // left for the schema to reject
  assertEquals(valueFromText(serveOptionFields.maxLoraRank.ast, "32"), 32);
  assertEquals(valueFromText(serveOptionFields.backend.ast, "cpu"), "cpu");
  assertEquals(valueFromText(ast("lossType"), "dapo"), "dapo");
  assertEquals(valueFromText(ast("model"), "null"), null);
});

Deno.test("cli: train --reward-weights 1,0.5 --target-modules q_proj,v_proj --steps 2 runs", async () => {
  const dir = await Deno.makeTempDir();
  const r = await cli([
    "train",
    "--reward-weights",
    "1,0.5",
    "--target-modules",
    "q_proj,v_proj",
    "--steps",
    "2",
    "--eval-size",
    "20",
    "--backend",
    "cpu",
    "--output-dir",
    dir,
    "--run-id",
    "r",
  ]);
  assertEquals(r.code, 0, r.stdout + r.stderr);
  assert(/accuracy \d+\.\d% -> \d+\.\d%/.test(r.stdout), r.stdout);
  const metrics = (await Deno.readTextFile(join(dir, "r", "metrics.jsonl"))).trim().split("\n");
  assertEquals(metrics.length, 2);
  const adapter = JSON.parse(
    await Deno.readTextFile(join(dir, "r", "adapter", "adapter_config.json")),
  );
  assertEquals([...adapter.target_modules].sort(), ["q_proj", "v_proj"]);
  await Deno.remove(dir, { recursive: true });
});
