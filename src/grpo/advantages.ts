/**
 * Group-relative advantages (TRL GRPOTrainer): each completion's reward minus the mean reward of
 * the G completions of the same prompt, optionally divided by a standard deviation. One number per
 * sequence, broadcast to its tokens by the loss. The batch is laid out prompt-major: completions
 * [g*G, (g+1)*G) belong to prompt g.
 * @module
 */
import type { Effect } from "effect";
import {
  attempt,
  type GrpoInputError,
  type GrpoNumericError,
  numericError,
  requireInput,
} from "./errors.ts";
import { nanMean, nanStd } from "./metrics.ts";
import { combineRewards } from "./rewards.ts";

/** Which std divides the centred reward: per group (default), whole batch, or none. */
export type ScaleRewards = "group" | "batch" | "none";

/** The added constant in A = (r - mean) / (std + 1e-4): keeps zero-std groups finite. */
export const STD_EPSILON = 1e-4;

/**
 * torch.isclose(std, 0) with its defaults (atol 1e-8, rtol 1e-5): the test TRL uses for
 * `frac_reward_zero_std`.
 */
const isZeroStd = (std: number): boolean => Number.isNaN(std) || Math.abs(std) <= 1e-8;

/** Advantages with the reward statistics TRL logs alongside them. */
export interface Advantages {
  /** One advantage per sequence; NaN results (all-null rewards, n < 2) are replaced by 0. */
  readonly advantages: Float64Array;
  /** The per-sequence reward the advantages were computed from. */
  readonly rewards: Float64Array;
  /**
   * `reward` (mean of the group means), `reward_std` (mean of the std each sequence was scaled by;
   * the group std under "none"), `frac_reward_zero_std`.
   */
  readonly metrics: {
    readonly reward: number;
    readonly reward_std: number;
    readonly frac_reward_zero_std: number;
  };
}

/** Options for {@link groupAdvantages}. */
export interface AdvantageOptions {
  /** G, completions per prompt (>= 1; TRL trains with >= 2). */
  readonly numGenerations: number;
  /** Default "group". */
  readonly scaleRewards?: ScaleRewards;
}

const checkLayout = (op: string, n: number, g: number): void => {
  requireInput(Number.isInteger(g) && g >= 1, op, () => `numGenerations must be >= 1, got ${g}`);
  requireInput(
    n % g === 0,
    op,
    () => `${n} rewards is not a multiple of numGenerations ${g}`,
  );
};

const checkRewards = (rewards: ArrayLike<number>): void => {
  // NaN means "no reward"; an infinity is a broken reward function.
  for (let i = 0; i < rewards.length; i++) {
    const r = rewards[i];
    if (!Number.isNaN(r) && !Number.isFinite(r)) throw numericError("reward", i, null, r);
  }
};

/** NaN-aware mean and Bessel std of each group of G consecutive values. */
const groupStats = (values: ArrayLike<number>, g: number): { mean: number[]; std: number[] } => {
  const mean: number[] = [];
  const std: number[] = [];
  for (let start = 0; start < values.length; start += g) {
    const group = Array.prototype.slice.call(values, start, start + g) as number[];
    mean.push(nanMean(group));
    std.push(nanStd(group));
  }
  return { mean, std };
};

const fracZeroStd = (groupStd: readonly number[]): number =>
  groupStd.length === 0 ? 0 : groupStd.filter(isZeroStd).length / groupStd.length;

const nanToZero = (a: Float64Array): Float64Array => a.map((v) => Number.isNaN(v) ? 0 : v);

/**
 * Sum-then-normalize advantages (TRL's default `multi_objective_aggregation`):
 * A_i = r_i - nanmean_group(r); for "group" divided by (group nanstd + 1e-4), for "batch" by
 * (batch nanstd + 1e-4), for "none" not divided. NaN becomes 0.
 *
 * `frac_reward_zero_std` is the share of groups whose own std is ~0 (or undefined: fewer than two
 * non-null rewards), under every scale mode: such a group carries no learning signal. (TRL
 * tests the batch std under "batch"; we follow the doc's definition.)
 */
export const groupAdvantages = (
  rewards: ArrayLike<number>,
  options: AdvantageOptions,
): Effect.Effect<Advantages, GrpoInputError | GrpoNumericError> =>
  attempt(() => {
    const g = options.numGenerations;
    const scale = options.scaleRewards ?? "group";
    const n = rewards.length;
    checkLayout("groupAdvantages", n, g);
    requireInput(
      scale === "group" || scale === "batch" || scale === "none",
      "groupAdvantages",
      () => `scaleRewards must be "group" | "batch" | "none", got ${JSON.stringify(scale)}`,
    );
    checkRewards(rewards);
    const { mean, std } = groupStats(rewards, g);
    const batchStd = nanStd(rewards);
    const adv = new Float64Array(n);
    const meanPerSeq = new Float64Array(n);
    const stdPerSeq = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      const grp = Math.floor(i / g);
      meanPerSeq[i] = mean[grp];
      stdPerSeq[i] = scale === "batch" ? batchStd : std[grp];
      const centred = rewards[i] - mean[grp];
      adv[i] = scale === "none" ? centred : centred / (stdPerSeq[i] + STD_EPSILON);
    }
    return {
      advantages: nanToZero(adv),
      rewards: Float64Array.from(rewards),
      metrics: {
        reward: nanMean(meanPerSeq),
        reward_std: nanMean(stdPerSeq),
        frac_reward_zero_std: fracZeroStd(std),
      },
    };
  });

/**
 * Normalize-then-sum advantages (TRL `multi_objective_aggregation="normalize_then_sum"`): z-score
 * each reward function within its group (nanmean, nanstd + 1e-4), take the weighted NaN-aware sum,
 * then z-score that over the whole batch. Keeps one high-variance reward from drowning the others.
 *
 * Metrics `reward` / `reward_std` describe the raw weighted reward (as under sum-then-normalize),
 * so they stay comparable across the two modes; `frac_reward_zero_std` tests the groups of the
 * normalized sum.
 */
export const normalizeThenSumAdvantages = (
  perFunction: readonly ArrayLike<number>[],
  weights: readonly number[],
  numGenerations: number,
): Effect.Effect<Advantages, GrpoInputError | GrpoNumericError> =>
  attempt(() => {
    const op = "normalizeThenSumAdvantages";
    const g = numGenerations;
    requireInput(perFunction.length >= 1, op, () => "no reward functions");
    requireInput(
      weights.length === perFunction.length,
      op,
      () => `${weights.length} weights for ${perFunction.length} reward functions`,
    );
    const n = perFunction[0].length;
    requireInput(
      perFunction.every((col) => col.length === n),
      op,
      () => "reward columns differ in length",
    );
    checkLayout(op, n, g);
    perFunction.forEach(checkRewards);
    const normalized = perFunction.map((col) => {
      const { mean, std } = groupStats(col, g);
      const z = new Float64Array(n);
      for (let i = 0; i < n; i++) {
        const grp = Math.floor(i / g);
        z[i] = (col[i] - mean[grp]) / (std[grp] + STD_EPSILON);
      }
      return z;
    });
    const summed = combineRewards(normalized, weights);
    const batchMean = nanMean(summed);
    const batchStd = nanStd(summed);
    const adv = summed.map((r) => (r - batchMean) / (batchStd + STD_EPSILON));
    const raw = combineRewards(perFunction, weights);
    const rawStats = groupStats(raw, g);
    return {
      advantages: nanToZero(adv),
      rewards: raw,
      metrics: {
        reward: nanMean(rawStats.mean),
        reward_std: nanMean(rawStats.std),
        frac_reward_zero_std: fracZeroStd(groupStats(summed, g).std),
      },
    };
  });
