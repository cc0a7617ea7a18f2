/**
 * What a GRPO run trains on, given to the trainer as input: where prompts come from, the reward
 * functions that score completions, how a model is evaluated before and after, and the option
 * values the task is known to train well with. The built-in arithmetic task
 * (src/task/arithmetic_task.ts) is one such task; a user's task is another value of this type.
 * @module
 */
import type { Effect } from "effect";
import type { BackendShape } from "../backend/backend.ts";
import type { BackendError } from "../backend/ops.ts";
import type { NamedReward, RewardError } from "../grpo/rewards.ts";
import type { SnapshotModel } from "../snapshot/snapshot.ts";
import type { PromptSource } from "../pipeline/stages.ts";
import type { Environment, EpisodeLimits } from "../pipeline/multi_turn.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";

/** A held-out evaluation: a score (an accuracy in [0, 1], or a mean reward) on fixed items. */
export interface TaskEvaluation {
  /** What the score measures, for log lines ("held-out exact-match accuracy"). */
  readonly metric: string;
  /** How it is measured, for log lines ("200 problems, greedy"). */
  readonly detail: string;
  /** The score as log lines show it; default a percentage. */
  readonly format?: (score: number) => string;
  /**
   * Scores `policy`: its weights on `backend`, with the LoRA adapter to apply at run time (null:
   * none; the trainer passes the resident base and a snapshot's adapter, or the base alone).
   * Completions are at most `maxTokens` long.
   */
  run(
    backend: BackendShape,
    policy: SnapshotModel,
    tokenizer: Tokenizer,
    maxTokens: number,
  ): Effect.Effect<number, BackendError | RewardError>;
}

/** A GRPO task. */
export interface Task {
  readonly name: string;
  /** Training prompts, drawn from the step's random stream (never a held-out item). */
  readonly prompts: PromptSource;
  /** Reward functions, in order; their weights are each reward's own or `rewardWeights`. */
  readonly rewards: readonly NamedReward[];
  readonly evaluation: TaskEvaluation;
  /** Checkpoint directory trained when the run names no model; null = the run must name one. */
  readonly baseModelDir: string | null;
  /**
   * A multi-turn task's environment: rollouts are episodes (generate, environment step, ...)
   * within `limits`, trained with the environment's tokens masked out of the loss. Absent: one
   * completion per rollout.
   */
  readonly environment?: Environment;
  /** Episode limits of a multi-turn task (defaults: see multiTurnRollout). */
  readonly limits?: Partial<EpisodeLimits>;
}
