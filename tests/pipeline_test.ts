/**
 * The GRPO pipeline end to end on the CPU backend (deterministic): LoRA and full fine-tuning both
 * learn with the local engine, rollouts are on-policy, a resumed run continues bit-identically,
 * non-finite steps fail typed without touching saved state, and options are validated.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { Effect } from "effect";
import { decodeTrainConfig, type TrainConfig } from "../src/app/config.ts";
import { parseTrainArgs } from "../src/cli/main.ts";
import { runTraining, type TrainSummary } from "../src/app/trainer.ts";
import { arithmeticGrpoTask } from "../src/task/arithmetic_task.ts";
import { runExample as dynamicSampling } from "../examples/dynamic_sampling.ts";
import { runExample as adapterDirectory } from "../examples/adapter_directory_target.ts";

const quiet = () => {};
const config = (over: Record<string, unknown>): Promise<TrainConfig> =>
  Effect.runPromise(decodeTrainConfig({ backend: "cpu", quiet: true, evalSize: 100, ...over }));
/** The built-in task, sized as the config says, trained without progress lines. */
const trainOn = (cfg: TrainConfig) =>
  runTraining(cfg, arithmeticGrpoTask({ heldOutSize: cfg.evalSize }), { log: quiet });
const train = async (over: Record<string, unknown>): Promise<TrainSummary> =>
  Effect.runPromise(trainOn(await config(over)) as Effect.Effect<TrainSummary, unknown>);
const metrics = async (dir: string): Promise<Record<string, number>[]> =>
  (await readFile(join(dir, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l));
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

for (const mode of ["lora", "full"] as const) {
  Deno.test(`local engine, ${mode}: reward and held-out accuracy rise (LoRA × engine table, in-process half)`, async () => {
    const out = await Deno.makeTempDir();
    const s = await train({
      mode,
      steps: 14,
      promptsPerStep: 12,
      outputDir: out,
      runId: "r",
      learningRate: mode === "lora" ? 3e-3 : 3e-4,
    });
    const m = await metrics(s.runDir);
    assertEquals(m.length, 14);
    // on-policy: step k's rollouts come from the snapshot pushed after step k-1
    m.forEach((x) => assertEquals(x.rollout_policy_version, x.step - 1));
    const exact = m.map((x) => x["rewards/exact_match/mean"]);
    const rise = mean(exact.slice(-5)) - mean(exact.slice(0, 5));
    assert(rise >= 0.05, `${mode}: exact-match reward rose by only ${rise.toFixed(3)}`);
    assert(
      s.accuracyAfter - s.accuracyBefore >= 0.1,
      `${mode}: accuracy ${s.accuracyBefore} -> ${s.accuracyAfter}`,
    );
    const files = [...Deno.readDirSync(s.runDir)].map((e) => e.name).sort();
    for (
      const f of [
        "metrics.jsonl",
        "reward.svg",
        "summary.json",
        mode === "lora" ? "adapter" : "model",
      ]
    ) {
      assert(files.includes(f), `run dir lacks ${f}: ${files}`);
    }
    assert((await readFile(join(s.runDir, "reward.svg"), "utf8")).includes("<path"));
    for (
      const k of [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "clip_ratio/region_mean",
        "num_tokens",
      ]
    ) {
      assert(typeof m[0][k] === "number", `metric ${k} missing`);
    }
    await Deno.remove(out, { recursive: true });
  });
}

Deno.test("resume: a run interrupted after its checkpoint continues identically", async () => {
  const out = await Deno.makeTempDir();
  const common = {
    steps: 4,
    promptsPerStep: 4,
    numGenerations: 4,
    checkpointEvery: 2,
    outputDir: out,
  };
  await train({ ...common, runId: "straight" });
  // "killed" after step 2: the checkpoint of step 2 is the last thing it wrote
  await train({ ...common, runId: "resumed", steps: 2 });
  await train({ ...common, runId: "resumed", resume: true });
  const a = await metrics(join(out, "straight"));
  const b = await metrics(join(out, "resumed"));
  const strip = (x: Record<string, number>) =>
    Object.fromEntries(
      Object.entries(x).filter(([k]) =>
        !k.startsWith("time/") && k !== "step_time" && k !== "push_latency_ms"
      ),
    );
  assertEquals(b.map(strip), a.map(strip));
  const wa = await readFile(join(out, "straight", "adapter", "adapter_model.safetensors"));
  const wb = await readFile(join(out, "resumed", "adapter", "adapter_model.safetensors"));
  assert(wa.equals(wb), "final adapters differ");
  await Deno.remove(out, { recursive: true });
});

Deno.test("NaN/Inf: a diverging step fails with NonFiniteStepError naming it; the saved checkpoint is intact", async () => {
  const out = await Deno.makeTempDir();
  await train({
    steps: 1,
    promptsPerStep: 4,
    numGenerations: 4,
    outputDir: out,
    runId: "n",
    checkpointEvery: 1,
  });
  const ckpt = join(out, "n", "checkpoint.safetensors");
  const before = await readFile(ckpt);
  const cfg = await config({
    steps: 4,
    promptsPerStep: 4,
    numGenerations: 4,
    outputDir: out,
    runId: "n",
    resume: true,
    checkpointEvery: 1,
    learningRate: 1e38,
    maxGradNorm: 0,
  });
  const err = await Effect.runPromise(
    Effect.flip(
      trainOn(cfg) as Effect.Effect<
        TrainSummary,
        { _tag: string; step?: number; message: string }
      >,
    ),
  );
  assertEquals(err._tag, "NonFiniteStepError");
  assertEquals(err.step, 2); // the first step after resuming overflows the weights
  assert(err.message.startsWith("step 2: non-finite"), err.message);
  // the failing step wrote nothing: the checkpoint of step 1 is on disk, byte for byte
  assert((await readFile(ckpt)).equals(before), "checkpoint changed");
  await Deno.remove(out, { recursive: true });
});

Deno.test("options: bad values give one line naming the option and the allowed values", async () => {
  const bad = async (raw: Record<string, unknown>, needle: string) => {
    const e = await Effect.runPromise(Effect.flip(decodeTrainConfig(raw)));
    assertEquals(e._tag, "TrainConfigError");
    assert(e.message.includes(needle) && !e.message.includes("\n"), e.message);
  };
  await bad({ mode: "qlora" }, `"lora" | "full"`);
  await bad({ steps: 0 }, "an integer >= 1");
  await bad({ loss_type: "ppo" }, `"grpo" | "bnpo" | "dr_grpo" | "dapo"`);
  await bad({ targetModules: ["qkv"] }, "q_proj");
  await bad({ stepz: 3 }, "unknown option");
  await bad({ mode: "full", push: "lora" }, "push");
  const cfg = await Effect.runPromise(
    parseTrainArgs([
      "--steps",
      "5",
      "--loss-type",
      "bnpo",
      "--use-rslora",
      "--target-modules",
      "q_proj,v_proj",
    ]),
  );
  assertEquals([cfg.steps, cfg.grpo.lossType, cfg.useRslora, cfg.targetModules], [5, "bnpo", true, [
    "q_proj",
    "v_proj",
  ]]);
});

Deno.test("example: user pipeline with a custom reward and an inserted filter stage runs", async () => {
  const r = await Effect.runPromise(dynamicSampling(4));
  assertEquals(r.rewards.length + r.dropped, 4);
  assertEquals(r.version, r.rewards.length);
  r.rewards.forEach((x) => assert(Number.isFinite(x)));
});

Deno.test("example: user PushTarget writing PEFT adapter directories runs", async () => {
  const dir = await Deno.makeTempDir();
  const versions = await Effect.runPromise(adapterDirectory(3, dir));
  assertEquals(versions, [1, 2, 3]);
  for (const v of [0, 1, 2, 3]) {
    const cfg = JSON.parse(
      await Deno.readTextFile(join(dir, `policy-v${v}`, "adapter_config.json")),
    );
    assertEquals(cfg.peft_type, "LORA");
  }
  await Deno.remove(dir, { recursive: true });
});

Deno.test("resume: a checkpoint written with another LoRA rank is a typed error naming the tensor", async () => {
  const out = await Deno.makeTempDir();
  await train({
    steps: 1,
    promptsPerStep: 2,
    numGenerations: 2,
    outputDir: out,
    runId: "r",
    checkpointEvery: 1,
  });
  const cfg = await config({
    steps: 2,
    promptsPerStep: 2,
    numGenerations: 2,
    outputDir: out,
    runId: "r",
    resume: true,
    loraR: 4,
  });
  const err = await Effect.runPromise(
    Effect.flip(
      trainOn(cfg) as Effect.Effect<
        TrainSummary,
        { _tag: string; tensor?: string; message: string }
      >,
    ),
  );
  assertEquals(err._tag, "StateMismatchError");
  assert(err.tensor!.startsWith("param/") && err.message.includes("[8,"), err.message);
  await Deno.remove(out, { recursive: true });
});
