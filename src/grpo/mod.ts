/**
 * GRPO math as TRL's GRPOTrainer computes it, on the host in float64: rewards -> group advantages
 * -> per-token policy loss with its gradient d loss / d logp, which the device's backward pass
 * consumes. Options: {@link GrpoConfig} (TRL names in camelCase, TRL defaults); a decoded config
 * can be spread into {@link LossOptions} together with the dapo normalizer and the gradient
 * accumulation steps.
 * @module
 */
export {
  type AdvantageOptions,
  type Advantages,
  groupAdvantages,
  normalizeThenSumAdvantages,
  type ScaleRewards,
  STD_EPSILON,
} from "./advantages.ts";
export {
  decodeGrpoConfig,
  type GrpoConfig,
  grpoConfigDefaults,
  GrpoConfigError,
  type GrpoConfigInput,
  GrpoConfigSchema,
  type MultiObjectiveAggregation,
  trlOptionNames,
} from "./config.ts";
export { GrpoInputError, GrpoNumericError, type NumericQuantity } from "./errors.ts";
export {
  countLossTokens,
  grpoLoss,
  type ImportanceSamplingLevel,
  type LossOptions,
  type LossResult,
  type LossSequence,
  type LossType,
  type VllmImportanceSamplingMode,
} from "./loss.ts";
export { type GrpoMetrics, minMeanMax, nanMean, nanStd } from "./metrics.ts";
export {
  combineRewards,
  type NamedReward,
  type RewardContext,
  RewardError,
  type RewardFn,
  rewardMetrics,
  type RewardTable,
  type RewardValues,
  type ScoreOptions,
  scoreRewards,
} from "./rewards.ts";
