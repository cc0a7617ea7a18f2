/**
 * Example: GRPO on your own dataset with your own reward, the lorafold spelling of TRL's
 * `GRPOTrainer(model, reward_funcs, train_dataset, peft_config)`. The dataset is a JSONL file
 * with a `prompt` column and a `target` column; the reward reads `target` by name, as a TRL
 * reward function reads its `**kwargs`. It trains the shipped base model (whose tokenizer knows
 * only digits, "+" and "="), so the run is short and the effect is visible.
 *
 *   deno run -A examples/own_dataset.ts
 *
 * The same run from the command line, with the reward in its own module (`./sum_reward.ts`
 * exporting the function below as default):
 *
 *   deno task train --model assets/arithmetic-base --dataset sums.jsonl \
 *     --reward-funcs ./sum_reward.ts --max-steps 30
 */
import { Effect } from "effect";
import { join } from "node:path";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import {
  arithmeticTaskDefaults,
  BUILTIN_MODEL_DIR,
  datasetTask,
  decodeTrainConfig,
  loadPromptDataset,
  type RewardArgs,
  runTraining,
  splitDataset,
  userReward,
} from "../mod.ts";

/** The user's rows: distinct "a+b=" prompts, the expected digits in their own column. */
const rows = (n: number) =>
  Array.from({ length: n }, (_, i) => {
    const k = (i * 7919) % 10000; // 7919 is prime to 10000: n <= 10000 distinct pairs
    const [a, b] = [Math.floor(k / 100), k % 100];
    const pad = (x: number, w: number) => String(x).padStart(w, "0");
    return { prompt: `${pad(a, 2)}+${pad(b, 2)}=`, target: pad(a + b, 3) };
  });

/** A TRL-style reward: completions and the row's columns by name; 1 for the exact digits. */
export const sumReward = ({ completions, target }: RewardArgs): number[] =>
  completions.map((c, i) => (c === target[i] ? 1 : 0));

/** Writes the dataset, trains `steps` steps into `outputDir`, returns the run's summary. */
export const runExample = (outputDir: string, steps = 30) =>
  Effect.gen(function* () {
    const file = join(outputDir, "sums.jsonl");
    yield* Effect.promise(() =>
      writeFile(file, rows(600).map((r) => JSON.stringify(r)).join("\n") + "\n")
    );
    const { train, eval: held } = yield* splitDataset(yield* loadPromptDataset(file), 0.2, 0);
    const task = yield* datasetTask({
      train,
      eval: held,
      rewards: [userReward("sum", sumReward)],
      chatTemplate: null, // text prompts; a chat model's template renders message prompts
      addSpecialTokens: true, // the shipped model was pretrained with BOS-first lines
      seed: 0,
      evalSize: 100,
      baseModelDir: BUILTIN_MODEL_DIR,
    });
    const config = yield* decodeTrainConfig(
      { steps, outputDir, runId: "own-dataset", quiet: true },
      arithmeticTaskDefaults,
    );
    return yield* runTraining(config, task, { log: console.log });
  });

if (import.meta.main) {
  const dir = await mkdtemp(join(tmpdir(), "lorafold-own-"));
  const s = await Effect.runPromise(runExample(dir));
  console.log(`mean reward ${s.accuracyBefore.toFixed(3)} -> ${s.accuracyAfter.toFixed(3)}`);
}
