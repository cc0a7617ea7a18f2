/**
 * GRPO options as an Effect Schema: TRL GRPOConfig's names in camelCase with TRL's defaults.
 * {@link decodeGrpoConfig} accepts either spelling (`lossType` or `loss_type`) and turns the first
 * bad entry into one line naming the option and what it accepts, e.g.
 * `GRPO option lossType (TRL loss_type): got "ppo"; allowed: "grpo" | "bnpo" | "dr_grpo" | "dapo"`.
 * Only the GRPO-specific options live here; optimizer and batch settings belong to the trainer.
 * @module
 */
import { Data, Effect, Exit, Schema } from "effect";
import type { ScaleRewards } from "./advantages.ts";
import type { TaggedErrorClass } from "./errors.ts";
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
}

/** What decoding accepts: any subset of the options (camelCase), the rest take TRL's defaults. */
export type GrpoConfigInput = { readonly [K in keyof GrpoConfig]?: GrpoConfig[K] };

const GrpoConfigErrorBase: TaggedErrorClass<"GrpoConfigError", {
  readonly option: string;
  readonly message: string;
}> = Data.TaggedError("GrpoConfigError");
/** A bad option value or name, as one line. `option` is the camelCase name (or the unknown key). */
export class GrpoConfigError extends GrpoConfigErrorBase {}

// ---- field specs: schema without default, the default, and the allowed values in words -------

interface Spec {
  readonly schema: Schema.Top;
  readonly default: unknown;
  readonly allowed: string;
}

const nonNegative = Schema.Finite.check(Schema.isGreaterThanOrEqualTo(0));
const positive = Schema.Finite.check(Schema.isGreaterThan(0));
const unit = Schema.Finite.check(Schema.isBetween({ minimum: 0, maximum: 1 }));
const intAtLeast = (n: number) => Schema.Int.check(Schema.isGreaterThanOrEqualTo(n));
const literals = <const L extends readonly string[]>(values: L) => ({
  schema: Schema.Literals(values),
  allowed: values.map((v) => JSON.stringify(v)).join(" | "),
});

const specs: { readonly [K in keyof GrpoConfig]: Spec } = {
  numGenerations: { schema: intAtLeast(2), default: 8, allowed: "an integer >= 2" },
  maxCompletionLength: { schema: intAtLeast(1), default: 512, allowed: "an integer >= 1" },
  temperature: { schema: positive, default: 1.0, allowed: "a number > 0" },
  topP: {
    schema: Schema.Finite.check(
      Schema.isBetween({ minimum: 0, maximum: 1, exclusiveMinimum: true }),
    ),
    default: 1.0,
    allowed: "a number in (0, 1]",
  },
  topK: { schema: intAtLeast(0), default: 0, allowed: "an integer >= 0 (0 = off)" },
  epsilon: { schema: nonNegative, default: 0.2, allowed: "a number >= 0" },
  epsilonHigh: {
    schema: Schema.NullOr(nonNegative),
    default: null,
    allowed: "a number >= 0, or null (= epsilon)",
  },
  delta: { schema: Schema.NullOr(positive), default: null, allowed: "a number > 0, or null (off)" },
  beta: { schema: nonNegative, default: 0.0, allowed: "a number >= 0" },
  numIterations: { schema: intAtLeast(1), default: 1, allowed: "an integer >= 1" },
  lossType: { ...literals(["grpo", "bnpo", "dr_grpo", "dapo"]), default: "dapo" },
  scaleRewards: { ...literals(["group", "batch", "none"]), default: "group" },
  importanceSamplingLevel: { ...literals(["token", "sequence"]), default: "token" },
  multiObjectiveAggregation: {
    ...literals(["sum_then_normalize", "normalize_then_sum"]),
    default: "sum_then_normalize",
  },
  rewardWeights: {
    schema: Schema.NullOr(Schema.Array(Schema.Finite)),
    default: null,
    allowed: "an array of finite numbers, or null",
  },
  learningRate: { schema: positive, default: 1e-6, allowed: "a number > 0" },
  maskTruncatedCompletions: { schema: Schema.Boolean, default: false, allowed: "true | false" },
  topEntropyQuantile: { schema: unit, default: 1.0, allowed: "a number in [0, 1]" },
  vllmImportanceSamplingCorrection: {
    schema: Schema.Boolean,
    default: true,
    allowed: "true | false",
  },
  vllmImportanceSamplingMode: {
    ...literals(["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]),
    default: "sequence_mask",
  },
  vllmImportanceSamplingClipMax: {
    schema: Schema.NullOr(positive),
    default: 3.0,
    allowed: "a number > 0, or null (no upper bound)",
  },
  vllmImportanceSamplingClipMin: {
    schema: Schema.NullOr(nonNegative),
    default: null,
    allowed: "a number >= 0, or null (no lower bound)",
  },
};

const optionNames = Object.keys(specs) as (keyof GrpoConfig)[];

const snake = (camel: string): string => camel.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

/** TRL's (snake_case) name of every option. */
export const trlOptionNames: { readonly [K in keyof GrpoConfig]: string } = Object.fromEntries(
  optionNames.map((k) => [k, snake(k)]),
) as { readonly [K in keyof GrpoConfig]: string };

/** Input keys that mean an option: camelCase, TRL's snake_case, and TRL's deprecated alias. */
const keyToOption: ReadonlyMap<string, keyof GrpoConfig> = new Map<string, keyof GrpoConfig>([
  ...optionNames.map((k) => [k, k] as const),
  ...optionNames.map((k) => [snake(k), k] as const),
  ["vllm_importance_sampling_cap", "vllmImportanceSamplingClipMax"],
  ["vllmImportanceSamplingCap", "vllmImportanceSamplingClipMax"],
]);

/**
 * The options as an Effect Schema (camelCase keys, each optional with TRL's default). Decoding
 * with it directly gives Effect's own error text; {@link decodeGrpoConfig} gives one clear line.
 */
export const GrpoConfigSchema: Schema.Codec<GrpoConfig, GrpoConfigInput> = Schema.Struct(
  Object.fromEntries(
    optionNames.map((k) => [
      k,
      specs[k].schema.pipe(
        Schema.withDecodingDefaultKey(Effect.succeed(specs[k].default as never)),
      ),
    ]),
  ),
) as unknown as Schema.Codec<GrpoConfig, GrpoConfigInput>;

const render = (v: unknown): string => {
  if (v === undefined) return "undefined";
  let s: string;
  try {
    s = JSON.stringify(v) ?? String(v);
  } catch {
    s = String(v);
  }
  return s.length > 60 ? `${s.slice(0, 57)}...` : s;
};

const editDistance = (a: string, b: string): number => {
  const row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let prev = row[0];
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const cur = row[j];
      row[j] = Math.min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = cur;
    }
  }
  return row[b.length];
};

const suggest = (key: string): string => {
  const norm = key.toLowerCase().replace(/[-_]/g, "");
  let best: keyof GrpoConfig | null = null;
  let bestD = Infinity;
  for (const k of optionNames) {
    const d = editDistance(norm, k.toLowerCase());
    if (d < bestD) [best, bestD] = [k, d];
  }
  return best !== null && bestD <= 3 ? `; did you mean ${best}?` : "";
};

const label = (k: keyof GrpoConfig): string => `GRPO option ${k} (TRL ${trlOptionNames[k]})`;

const fail = (option: string, message: string): Effect.Effect<never, GrpoConfigError> =>
  Effect.fail(new GrpoConfigError({ option, message }));

/**
 * Decodes GRPO options from camelCase or TRL snake_case keys, filling TRL's defaults. Fails with a
 * GrpoConfigError whose message is one line: the option (both spellings), the value given and the
 * values allowed; an unknown key is named with the closest known option. `undefined` and a missing
 * input mean "use the default".
 */
export const decodeGrpoConfig = (input: unknown): Effect.Effect<GrpoConfig, GrpoConfigError> =>
  Effect.gen(function* () {
    if (input === undefined || input === null) input = {};
    if (typeof input !== "object" || Array.isArray(input)) {
      return yield* fail("*", `GRPO options must be an object, got ${render(input)}`);
    }
    const normalized: Record<string, unknown> = {};
    const source: Record<string, string> = {};
    for (const [key, value] of Object.entries(input as Record<string, unknown>)) {
      const option = keyToOption.get(key);
      if (option === undefined) {
        return yield* fail(key, `unknown GRPO option "${key}"${suggest(key)}`);
      }
      if (value === undefined) continue;
      if (option in source) {
        return yield* fail(
          option,
          `${label(option)} is given twice, as "${source[option]}" and "${key}"`,
        );
      }
      source[option] = key;
      const spec = specs[option];
      const exit = Schema.decodeUnknownExit(spec.schema as Schema.Codec<unknown>)(value);
      if (Exit.isFailure(exit)) {
        return yield* fail(
          option,
          `${label(option)}: got ${render(value)}; allowed: ${spec.allowed}`,
        );
      }
      normalized[option] = value;
    }
    const config = yield* Schema.decodeUnknownEffect(GrpoConfigSchema)(normalized).pipe(
      Effect.mapError((e) =>
        new GrpoConfigError({ option: "*", message: e.message.replace(/\s+/g, " ") })
      ),
    );
    const { vllmImportanceSamplingClipMin: min, vllmImportanceSamplingClipMax: max } = config;
    if (min !== null && max !== null && min > max) {
      return yield* fail(
        "vllmImportanceSamplingClipMin",
        `${label("vllmImportanceSamplingClipMin")}: got ${min}; allowed: at most ` +
          `vllmImportanceSamplingClipMax (${max})`,
      );
    }
    return config;
  });

/** TRL's defaults, decoded once. */
export const grpoConfigDefaults: GrpoConfig = Effect.runSync(decodeGrpoConfig({}));
