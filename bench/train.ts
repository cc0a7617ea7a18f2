/**
 * The default `train` run, measured: held-out accuracy before/after, wall time, trained tokens/s
 * and the step time split by stage. Run: deno run -A bench/train.ts (writes bench/results/train.json).
 * Options are the CLI's (e.g. --backend cpu); the default is exactly `deno task train`.
 * @module
 */
import { Effect } from "effect";
import { parseTrainArgs } from "../src/cli/main.ts";
import { runTraining } from "../src/app/trainer.ts";
import { arithmeticGrpoTask } from "../src/task/arithmetic_task.ts";
import { writeResult } from "./common.ts";

/** Runs one training with the given CLI args. */
export async function run(args: readonly string[] = []): Promise<Record<string, number | string>> {
  const t0 = performance.now();
  const s = await Effect.runPromise(
    parseTrainArgs(["--quiet", ...args]).pipe(
      Effect.flatMap((c) =>
        runTraining(c, arithmeticGrpoTask({ heldOutSize: c.evalSize }), {
          log: (l) => l && console.log(l),
        })
      ),
    ) as Effect.Effect<import("../src/app/trainer.ts").TrainSummary>,
  );
  const out: Record<string, number | string> = {
    args: args.join(" ") || "(defaults)",
    backend: s.backend,
    mode: s.mode,
    steps: s.steps,
    accuracy_before: s.accuracyBefore,
    accuracy_after: s.accuracyAfter,
    accuracy_gain_points: +((s.accuracyAfter - s.accuracyBefore) * 100).toFixed(1),
    reward_first_step: +s.rewardFirst.toFixed(4),
    reward_last_step: +s.rewardLast.toFixed(4),
    train_wall_s: +s.trainWallS.toFixed(1),
    total_wall_s_incl_eval: +((performance.now() - t0) / 1000).toFixed(1),
    trained_tokens_per_s: Math.round(s.trainedTokensPerS),
    trainable_parameters: s.trainableParameters,
  };
  for (const [k, v] of Object.entries(s.stageMs)) out[`step_ms_${k}`] = +v.toFixed(1);
  return out;
}

if (import.meta.main) {
  const topic = Deno.args.includes("--backend")
    ? `train_${Deno.args[Deno.args.indexOf("--backend") + 1]}`
    : "train";
  console.log(await writeResult(topic, await run(Deno.args)));
}
