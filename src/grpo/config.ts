/**
 * GRPO options as an Effect Schema: TRL GRPOConfig's names in camelCase with TRL's defaults.
 * {@link decodeGrpoConfig} accepts either spelling (`lossType` or `loss_type`) and turns the first
 * bad entry into one line naming the option and what it accepts, e.g.
 * `GRPO option lossType (TRL loss_type): got "ppo"; allowed: "grpo" | "bnpo" | "dr_grpo" | "dapo"`.
 * Only the GRPO-specific options live here; optimizer and batch settings belong to the trainer.
 * @module
 */
import { Effect, Schema } from "effect";
import {
  choice,
  decodeOptions,
  finite,
  flag,
  integer,
  type InvalidOptionFields,
  option,
  type OptionFields,
  optionsSchema,
  renderValue,
  snakeCase,
} from "../base/options.ts";
import type { ScaleRewards } from "./advantages.ts";
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import type { ImportanceSamplingLevel, LossType, VllmImportanceSamplingMode } from "./loss.ts";

/** How several reward functions become one advantage (TRL `multi_objective_aggregation`). */
export type MultiObjectiveAggregation = "sum_then_normalize" | "normalize_then_sum";

/** Decoded GRPO options. Field names mirror {@link LossOptions} so a config can be spread into it. */
export interface GrpoConfig {
  /** G, completions sampled per prompt; >= 2. TRL default 8. */
  readonly numGenerations: number;
  /** Token budget of a completion; also dr_grpo's denominator. Default 512. */
  readonly maxCompletionLength: number;
  /** Sampling temperature; logits are divided by it before log_softmax everywhere. Default 1. */
  readonly temperature: number;
  /** Nucleus sampling; 1 = off. */
  readonly topP: number;
  /** Top-k sampling; 0 = off. */
  readonly topK: number;
  /** Lower clip eps (ratio >= 1 - epsilon). Default 0.2. */
  readonly epsilon: number;
  /** Upper clip eps; null = epsilon. DAPO suggests 0.28. */
  readonly epsilonHigh: number | null;
  /** Upper bound on the unclipped ratio (two-sided clipping); null = off. */
  readonly delta: number | null;
  /** KL coefficient; 0 = no reference pass. */
  readonly beta: number;
  /** Optimisation passes over each generation batch. Default 1. */
  readonly numIterations: number;
  /** Default "dapo". */
  readonly lossType: LossType;
  /** Default "group". */
  readonly scaleRewards: ScaleRewards;
  /** Default "token"; "sequence" is GSPO. */
  readonly importanceSamplingLevel: ImportanceSamplingLevel;
  /** Default "sum_then_normalize". */
  readonly multiObjectiveAggregation: MultiObjectiveAggregation;
  /** One weight per reward function; null = each function's own weight (1). */
  readonly rewardWeights: readonly number[] | null;
  /** TRL default 1e-6; LoRA usually wants ~10x more (reported PEFT runs used 2e-5 and 2e-4). */
  readonly learningRate: number;
  /** Completions without EOS train on nothing (their rewards still count). Default false. */
  readonly maskTruncatedCompletions: boolean;
  /** Fraction of highest-entropy tokens that keep the policy term; 1 = all. */
  readonly topEntropyQuantile: number;
  /** Correct for rollout-engine / trainer log-prob mismatch. Default true. */
  readonly vllmImportanceSamplingCorrection: boolean;
  /** Default "sequence_mask". */
  readonly vllmImportanceSamplingMode: VllmImportanceSamplingMode;
  /** Upper bound of the engine importance ratio (TRL `_clip_max`, formerly `_cap`). Default 3. */
  readonly vllmImportanceSamplingClipMax: number | null;
  /** Lower bound of the engine importance ratio; null = none. */
  readonly vllmImportanceSamplingClipMin: number | null;
  /**
   * Off-policy sequence masking (DeepSeek-V3.2, TRL `off_policy_mask_threshold`): a completion
   * with a negative advantage whose mean per-token log(engine / policy) exceeds this is left out
   * of the policy term. null = off.
   */
  readonly offPolicyMaskThreshold: number | null;
  /**
   * Rollouts may run this many snapshot versions ahead of training (asynchronous GRPO); every
   * trained sample was generated at most this many versions before the policy it updates. 0 (the
   * default) = on-policy, one step at a time. The off-policy gap is corrected by the engine
   * importance ratio (vllmImportanceSamplingCorrection). A resumed asynchronous run regenerates
   * the rollouts that were ahead of its checkpoint, so it does not replay bit for bit.
   */
  readonly maxStaleness: number;
}

/** What decoding accepts: any subset of the options (camelCase), the rest take TRL's defaults. */
export type GrpoConfigInput = { readonly [K in keyof GrpoConfig]?: GrpoConfig[K] };

const GrpoConfigErrorBase: TaggedErrorClass<"GrpoConfigError", InvalidOptionFields> = taggedError(
  "GrpoConfigError",
  (e) => e.reason,
);
/** A bad option value or name, as one line. `option` is the camelCase name (or the unknown key). */
export class GrpoConfigError extends GrpoConfigErrorBase {}

// ---- the fields: schema, TRL's default, help text and the allowed values in words ------------

const fields = {
  numGenerations: integer({ min: 2 }, {
    default: 8,
    description: "Completions sampled per prompt (the group size G)",
  }),
  maxCompletionLength: integer({ min: 1 }, {
    default: 512,
    description: "Token budget of a completion; also dr_grpo's denominator",
  }),
  temperature: finite({ min: 0, exclusiveMin: true }, {
    default: 1.0,
    description: "Sampling temperature; logits are divided by it before log_softmax everywhere",
  }),
  topP: finite({ min: 0, max: 1, exclusiveMin: true }, {
    default: 1.0,
    description: "Nucleus sampling; 1 = off",
  }),
  topK: integer({ min: 0 }, { default: 0, description: "Top-k sampling", note: "0 = off" }),
  epsilon: finite({ min: 0 }, {
    default: 0.2,
    description: "Lower clip epsilon (ratio >= 1 - epsilon)",
  }),
  epsilonHigh: finite<number | null>({ min: 0 }, {
    default: null,
    description: "Upper clip epsilon (DAPO suggests 0.28)",
    nullable: "= epsilon",
  }),
  delta: finite<number | null>({ min: 0, exclusiveMin: true }, {
    default: null,
    description: "Upper bound on the unclipped ratio (two-sided clipping)",
    nullable: "off",
  }),
  beta: finite({ min: 0 }, { default: 0.0, description: "KL coefficient; 0 = no reference pass" }),
  numIterations: integer({ min: 1 }, {
    default: 1,
    description: "Optimisation passes over each generation batch",
  }),
  lossType: choice(["grpo", "bnpo", "dr_grpo", "dapo"], {
    default: "dapo",
    description: "Loss normalisation",
  }),
  scaleRewards: choice(["group", "batch", "none"], {
    default: "group",
    description: "Standard deviation the advantages are divided by",
  }),
  importanceSamplingLevel: choice(["token", "sequence"], {
    default: "token",
    description: 'Importance ratio per token, or per sequence ("sequence" is GSPO)',
  }),
  multiObjectiveAggregation: choice(["sum_then_normalize", "normalize_then_sum"], {
    default: "sum_then_normalize",
    description: "How several reward functions become one advantage",
  }),
  rewardWeights: option(Schema.NullOr(Schema.Array(Schema.Finite)), {
    default: null,
    description: "One weight per reward function; null = each function's own weight",
    allowed: "a list of finite numbers, or null",
  }),
  learningRate: finite({ min: 0, exclusiveMin: true }, {
    default: 1e-6,
    description: "AdamW learning rate (TRL's default is 1e-6; LoRA usually wants ~10x more)",
  }),
  maskTruncatedCompletions: flag({
    default: false,
    description: "Completions without EOS train on nothing (their rewards still count)",
  }),
  topEntropyQuantile: finite({ min: 0, max: 1 }, {
    default: 1.0,
    description: "Fraction of highest-entropy tokens that keep the policy term; 1 = all",
  }),
  vllmImportanceSamplingCorrection: flag({
    default: true,
    description: "Correct for the rollout engine's log-prob mismatch with the trainer",
  }),
  vllmImportanceSamplingMode: choice(
    ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"],
    { default: "sequence_mask", description: "How the engine importance ratio is bounded" },
  ),
  vllmImportanceSamplingClipMax: finite<number | null>({ min: 0, exclusiveMin: true }, {
    default: 3.0,
    description: "Upper bound of the engine importance ratio (TRL's _clip_max, formerly _cap)",
    nullable: "no upper bound",
  }),
  vllmImportanceSamplingClipMin: finite<number | null>({ min: 0 }, {
    default: null,
    description: "Lower bound of the engine importance ratio",
    nullable: "no lower bound",
  }),
  offPolicyMaskThreshold: finite<number | null>({ min: 0 }, {
    default: null,
    description: "Negative-advantage completions whose mean log(engine / policy) per token " +
      "exceeds this leave the policy term (off-policy sequence masking)",
    nullable: "off",
  }),
  maxStaleness: integer({ min: 0 }, {
    default: 0,
    description: "Snapshot versions rollouts may run ahead of training (asynchronous GRPO)",
    note: "0 = on-policy, one step at a time",
  }),
};

/** The GRPO option fields (for deriving flags and documentation). */
export const grpoOptionFields: OptionFields = fields;

const optionNames = Object.keys(fields) as (keyof GrpoConfig)[];

/** TRL's (snake_case) name of every option. */
export const trlOptionNames: { readonly [K in keyof GrpoConfig]: string } = Object.fromEntries(
  optionNames.map((k) => [k, snakeCase(k)]),
) as { readonly [K in keyof GrpoConfig]: string };

/** TRL's deprecated spellings, still accepted. */
export const grpoOptionAliases: Readonly<Record<string, string>> = {
  vllm_importance_sampling_cap: "vllmImportanceSamplingClipMax",
  vllmImportanceSamplingCap: "vllmImportanceSamplingClipMax",
};

/**
 * The options as an Effect Schema (camelCase keys, each optional with TRL's default). Decoding
 * with it directly gives Effect's own error text; {@link decodeGrpoConfig} gives one clear line.
 */
export const GrpoConfigSchema: Schema.Codec<GrpoConfig, GrpoConfigInput> = optionsSchema(
  fields,
) as unknown as Schema.Codec<GrpoConfig, GrpoConfigInput>;

const label = (k: string): string =>
  `GRPO option ${k} (TRL ${trlOptionNames[k as keyof GrpoConfig]})`;

/**
 * Decodes GRPO options from camelCase or TRL snake_case keys, filling TRL's defaults (or
 * `defaults`, e.g. a task's recommended values). Fails with a GrpoConfigError whose message is
 * one line: the option (both spellings), the value given and the values allowed; an unknown key
 * is named with the closest known option. `undefined` and a missing input mean "use the default".
 */
export const decodeGrpoConfig = (
  input: unknown,
  defaults: Readonly<Record<string, unknown>> = {},
): Effect.Effect<GrpoConfig, GrpoConfigError> =>
  Effect.gen(function* () {
    if (
      input !== undefined && input !== null && (typeof input !== "object" || Array.isArray(input))
    ) {
      return yield* Effect.fail(
        new GrpoConfigError({
          option: "*",
          reason: `GRPO options must be an object, got ${renderValue(input)}`,
        }),
      );
    }
    const config = (yield* decodeOptions(fields, input, {
      label,
      noun: "GRPO option",
      aliases: grpoOptionAliases,
      defaults,
    }).pipe(
      Effect.mapError((e) => new GrpoConfigError({ option: e.option, reason: e.reason })),
    )) as GrpoConfig;
    const { vllmImportanceSamplingClipMin: min, vllmImportanceSamplingClipMax: max } = config;
    if (min !== null && max !== null && min > max) {
      return yield* Effect.fail(
        new GrpoConfigError({
          option: "vllmImportanceSamplingClipMin",
          reason: `${label("vllmImportanceSamplingClipMin")}: got ${min}; allowed: at most ` +
            `vllmImportanceSamplingClipMax (${max})`,
        }),
      );
    }
    return config;
  });

/** TRL's defaults, decoded once. */
export const grpoConfigDefaults: GrpoConfig = Effect.runSync(decodeGrpoConfig({}));
