/**
 * `deno task pretrain`: rebuilds the shipped base model (assets/arithmetic-base) deterministically.
 * @module
 */
import { Effect } from "effect";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Backend, BackendLive } from "../backend/backend.ts";
import { saveModel } from "../model/loader.ts";
import { pretrain } from "../task/pretrain.ts";
import { BUILTIN_MODEL_DIR } from "../task/arithmetic_task.ts";

/**
 * Runs pretraining with `--seed` (1), `--steps` (1500), `--out DIR`, `--backend` (cpu) and
 * `--target-accuracy` (1 = never stop early); the defaults rebuild the shipped model bit for bit.
 */
export const pretrainMain = async (args: readonly string[]): Promise<number> => {
  const opt = (name: string, d: string) => {
    const i = args.indexOf(`--${name}`);
    return i >= 0 && args[i + 1] !== undefined ? args[i + 1] : d;
  };
  const seed = Number(opt("seed", "1"));
  const steps = Number(opt("steps", "1500"));
  const out = opt("out", BUILTIN_MODEL_DIR);
  const backend = opt("backend", "cpu") as "cpu" | "webgpu" | "auto";
  const target = Number(opt("target-accuracy", "1"));
  if (
    !Number.isInteger(seed) || !Number.isInteger(steps) || steps < 1 || !(target > 0 && target <= 1)
  ) {
    console.error(
      "pretrain: --seed and --steps must be integers (steps >= 1), --target-accuracy in (0, 1]",
    );
    return 2;
  }
  const t0 = performance.now();
  const r = await Effect.runPromise(
    Effect.gen(function* () {
      const b = yield* Backend;
      return yield* pretrain(b, {
        seed,
        maxSteps: steps,
        batchSize: 64,
        learningRate: 3e-3,
        dropRate: 0.6,
        targetAccuracy: target,
        evalEvery: 50,
        log: (l) => console.log(l),
      });
    }).pipe(Effect.provide(BackendLive(backend))),
  );
  await Effect.runPromise(saveModel(out, r.config, r.weights));
  await writeFile(
    join(out, "tokenizer.json"),
    JSON.stringify(r.tokenizer.toJSON(), null, 2) + "\n",
  );
  await writeFile(
    join(out, "pretrain.json"),
    JSON.stringify(
      {
        seed,
        steps: r.steps,
        held_out_accuracy: r.accuracy,
        wall_s: (performance.now() - t0) / 1000,
      },
      null,
      2,
    ) + "\n",
  );
  console.log(
    `wrote ${out}: ${r.steps} steps, held-out accuracy ${(r.accuracy * 100).toFixed(1)}%`,
  );
  return 0;
};
