/**
 * Reward functions and their weighted, NaN-aware combination (TRL's `reward_funcs` and
 * `reward_weights`). A function scores a whole batch of completions at once; it may return null
 * for a sample it does not apply to (multi-task data), which becomes NaN and is skipped by the
 * weighted sum. A row where every function returned null stays NaN, and its advantage becomes 0.
 * @module
 */
import { Effect } from "effect";
import { messageOf, taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { type GrpoMetrics, nanMean, nanStd } from "./metrics.ts";

/** What a reward function sees besides the completions; arrays are parallel to the completions. */
export interface RewardContext {
  /** The prompt each completion answers (repeated num_generations times). */
  readonly prompts: readonly string[];
  /** The reference answer for each completion's prompt, or null when the dataset has none. */
  readonly answers: readonly (string | null)[];
  /** Token ids of each completion (TRL's `completion_ids`); absent where a caller has none. */
  readonly completionIds?: readonly (readonly number[])[];
  /**
   * The dataset row of each completion's prompt, every column by name (TRL passes the columns
   * to reward functions as keyword arguments); null for a prompt without one (built-in tasks).
   */
  readonly rows?: readonly (Readonly<Record<string, unknown>> | null)[];
}

/** One reward per completion; null means "does not apply to this sample". */
export type RewardValues = readonly (number | null)[];

/**
 * Scores a batch of completions. It may be synchronous (return the array) or effectful (return an
 * Effect of the array, e.g. a remote judge); both are accepted, so simple string checks need no
 * Effect ceremony. A synchronous function that throws, or an Effect that fails, becomes a
 * RewardError naming the function.
 */
export type RewardFn = (
  completions: readonly string[],
  ctx: RewardContext,
) => RewardValues | Effect.Effect<RewardValues, unknown>;

/** A reward function with the name used in metrics (`rewards/<name>/mean`) and its weight. */
export interface NamedReward {
  /** Unique; the metric key is `rewards/<name>/mean`. */
  readonly name: string;
  /** The scoring function. */
  readonly fn: RewardFn;
  /** Weight in the sum; default 1. Overridden by `rewardWeights` when that is given. */
  readonly weight?: number;
}

const RewardErrorBase: TaggedErrorClass<"RewardError", {
  /** The reward function at fault, or `*` for a problem of the whole set (weights, context). */
  readonly reward: string;
  /** What went wrong, in words (for a named function: what it did, e.g. `threw: boom`). */
  readonly reason: string;
  /** What the function threw or failed with, if anything. */
  readonly cause?: unknown;
}> = taggedError(
  "RewardError",
  (e) => e.reward === "*" ? e.reason : `reward "${e.reward}" ${e.reason}`,
);
/** A reward function misbehaved: threw, failed, or returned the wrong length or a bad value. */
export class RewardError extends RewardErrorBase {}

/** Scores of every function on every completion, and their weighted combination. */
export interface RewardTable {
  /** Function names, in the order given. */
  readonly names: readonly string[];
  /** The weight applied to each function. */
  readonly weights: readonly number[];
  /** perFunction[f][i]: reward of function f on completion i; NaN where it returned null. */
  readonly perFunction: readonly Float64Array[];
  /** r_i = nansum_f(w_f * r_f,i); NaN where every function returned null. */
  readonly combined: Float64Array;
}

/** Options for {@link scoreRewards}. */
export interface ScoreOptions {
  /** Per-function weights (TRL `reward_weights`); default each function's own weight, else 1. */
  readonly rewardWeights?: readonly number[] | null;
  /** How many Effect-returning functions run at once; default 1 (in order). */
  readonly concurrency?: number;
}

const asRewardError = (e: unknown): RewardError =>
  e instanceof RewardError ? e : new RewardError({ reward: "*", reason: messageOf(e), cause: e });

const toColumn = (name: string, values: unknown, n: number): Float64Array => {
  if (!Array.isArray(values)) {
    throw new RewardError({ reward: name, reason: "returned a non-array" });
  }
  if (values.length !== n) {
    throw new RewardError({
      reward: name,
      reason: `returned ${values.length} values for ${n} completions`,
    });
  }
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const v: unknown = values[i];
    if (v === null || v === undefined || (typeof v === "number" && Number.isNaN(v))) {
      out[i] = NaN; // "does not apply to this sample"
    } else if (typeof v === "number" && Number.isFinite(v)) {
      out[i] = v;
    } else {
      // An infinite reward would make the group std infinite and every advantage 0 or NaN.
      throw new RewardError({
        reward: name,
        reason: `returned ${String(v)} for completion ${i} (need a finite number or null)`,
      });
    }
  }
  return out;
};

/**
 * Weighted NaN-aware sum over functions: r_i = nansum_f(w_f * r_f,i). Unlike torch.nansum, a row
 * where every function returned NaN stays NaN (the doc's rule), so it is not mistaken for a real 0.
 * Throws RewardError when the weights or column lengths do not match (a programming error).
 */
export const combineRewards = (
  perFunction: readonly ArrayLike<number>[],
  weights: readonly number[],
): Float64Array => {
  if (perFunction.length !== weights.length) {
    throw new RewardError({
      reward: "*",
      reason: `${weights.length} weights for ${perFunction.length} reward functions`,
    });
  }
  const n = perFunction.length === 0 ? 0 : perFunction[0].length;
  if (perFunction.some((col) => col.length !== n)) {
    throw new RewardError({ reward: "*", reason: "reward columns differ in length" });
  }
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    let sum = 0;
    let any = false;
    for (let f = 0; f < perFunction.length; f++) {
      const v = weights[f] * perFunction[f][i];
      if (!Number.isNaN(v)) {
        sum += v;
        any = true;
      }
    }
    out[i] = any ? sum : NaN;
  }
  return out;
};

/** `rewards/<name>/mean` and `rewards/<name>/std` (NaN-aware, Bessel), as TRL logs them. */
export const rewardMetrics = (
  names: readonly string[],
  perFunction: readonly ArrayLike<number>[],
): GrpoMetrics => {
  const out: Record<string, number> = {};
  names.forEach((name, f) => {
    out[`rewards/${name}/mean`] = nanMean(perFunction[f]);
    out[`rewards/${name}/std`] = nanStd(perFunction[f]);
  });
  return out;
};

const resolveWeights = (
  rewards: readonly NamedReward[],
  override: readonly number[] | null | undefined,
): number[] => {
  if (override != null && override.length !== rewards.length) {
    throw new RewardError({
      reward: "*",
      reason: `rewardWeights has ${override.length} entries for ${rewards.length} reward functions`,
    });
  }
  return rewards.map((r, f) => {
    const w = override != null ? override[f] : r.weight ?? 1;
    if (!Number.isFinite(w)) {
      throw new RewardError({ reward: r.name, reason: `has weight ${w}` });
    }
    return w;
  });
};

/** Runs every reward function on the batch, validates the results and combines them. */
export const scoreRewards: (
  rewards: readonly NamedReward[],
  completions: readonly string[],
  ctx: RewardContext,
  options?: ScoreOptions,
) => Effect.Effect<RewardTable, RewardError> = Effect.fn("scoreRewards")(
  function* (
    rewards: readonly NamedReward[],
    completions: readonly string[],
    ctx: RewardContext,
    options: ScoreOptions = {},
  ) {
    const n = completions.length;
    const setup = yield* Effect.try({
      try: () => {
        if (rewards.length === 0) {
          throw new RewardError({ reward: "*", reason: "no reward functions" });
        }
        const seen = new Set<string>();
        for (const r of rewards) {
          if (seen.has(r.name)) {
            throw new RewardError({
              reward: r.name,
              reason: "is named twice (names must be unique)",
            });
          }
          seen.add(r.name);
        }
        if (
          ctx.prompts.length !== n || ctx.answers.length !== n ||
          (ctx.completionIds !== undefined && ctx.completionIds.length !== n) ||
          (ctx.rows !== undefined && ctx.rows.length !== n)
        ) {
          throw new RewardError({
            reward: "*",
            reason: `context has ${ctx.prompts.length} prompts and ${ctx.answers.length} answers ` +
              `for ${n} completions`,
          });
        }
        return resolveWeights(rewards, options.rewardWeights);
      },
      catch: asRewardError,
    });
    const columns = yield* Effect.forEach(
      rewards,
      (r) => {
        const raw: Effect.Effect<unknown, RewardError> = Effect.suspend(() => {
          let out: RewardValues | Effect.Effect<RewardValues, unknown>;
          try {
            out = r.fn(completions, ctx);
          } catch (e) {
            return Effect.fail(
              new RewardError({
                reward: r.name,
                reason: `threw: ${messageOf(e)}`,
                cause: e,
              }),
            );
          }
          if (!Effect.isEffect(out)) return Effect.succeed(out);
          return out.pipe(Effect.mapError((e) =>
            new RewardError({
              reward: r.name,
              reason: `failed: ${messageOf(e)}`,
              cause: e,
            })
          ));
        });
        return raw.pipe(
          Effect.flatMap((values) =>
            Effect.try({ try: () => toColumn(r.name, values, n), catch: asRewardError })
          ),
        );
      },
      { concurrency: options.concurrency ?? 1 },
    );
    return {
      names: rewards.map((r) => r.name),
      weights: setup,
      perFunction: columns,
      combined: combineRewards(columns, setup),
    };
  },
);
