/**
 * The built-in GRPO task: multi-digit addition on the shipped base model, rewarded by exact match
 * plus a light format reward, evaluated by greedy held-out exact-match accuracy.
 * @module
 */
import { fileURLToPath } from "node:url";
import { arithmeticTask, exactMatchReward, formatReward } from "./arithmetic.ts";
import { accuracy } from "./evaluate.ts";
import type { Task } from "./task.ts";

/** Directory of the shipped base model (built by `deno task pretrain`). */
export const BUILTIN_MODEL_DIR: string = fileURLToPath(
  new URL("../../assets/arithmetic-base/", import.meta.url),
);

/**
 * Option values the built-in task trains well with, where they differ from TRL's GRPOConfig
 * defaults (short completions, small groups, a LoRA-sized learning rate). Config decoding starts
 * from these; anything the user gives wins.
 */
export const arithmeticTaskDefaults: Readonly<Record<string, unknown>> = {
  numGenerations: 8,
  maxCompletionLength: 5,
  learningRate: 3e-3,
  epsilonHigh: 0.28,
  temperature: 1,
};

/** Settings of the built-in task. */
export interface ArithmeticTaskOptions {
  /** Operand digits (default 2). */
  readonly digits?: number;
  /** Held-out problems evaluated before and after training (default 200). */
  readonly heldOutSize?: number;
}

/** The built-in task as a GRPO {@link Task}. */
export const arithmeticGrpoTask = (options: ArithmeticTaskOptions = {}): Task => {
  const problems = arithmeticTask(options.digits ?? 2, options.heldOutSize ?? 200);
  return {
    name: "arithmetic",
    prompts: (rng) => problems.sample(rng),
    rewards: [exactMatchReward, formatReward(problems.digits)],
    evaluation: {
      metric: "held-out exact-match accuracy",
      detail: `${problems.heldOut.length} problems, greedy`,
      run: (backend, { model, lora }, tokenizer, maxTokens) =>
        accuracy(backend, model, tokenizer, problems.heldOut, maxTokens, lora),
    },
    baseModelDir: BUILTIN_MODEL_DIR,
  };
};
