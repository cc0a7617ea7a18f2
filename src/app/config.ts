/**
 * Training options: the run's own fields here, the LoRA fields (src/lora/config.ts), the
 * optimizer fields (src/train/optimizer_config.ts) and the GRPO options (src/grpo/config.ts, TRL's
 * names), each an annotated Schema field with its default and help text. Files and the CLI give
 * them flat, in camelCase, snake_case (TRL) or kebab-case; the CLI's flags are derived from the
 * same fields (src/cli/flags.ts). A bad value gives one line naming the option and what is
 * allowed.
 * @module
 */
import { parseReplicaSource } from "../vllm/replicas.ts";
import { messageOf, taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { Effect, Schema } from "effect";
import { readFile } from "node:fs/promises";
import {
  choice,
  closestName,
  decodeOptions,
  finite,
  flag,
  integer,
  type InvalidOptionFields,
  option,
  type OptionFields,
  optionKey,
} from "../base/options.ts";
import {
  decodeGrpoConfig,
  type GrpoConfig,
  grpoOptionAliases,
  grpoOptionFields,
} from "../grpo/config.ts";
import { loraOptionAliases, loraOptionFields, type LoraOptions } from "../lora/config.ts";
import { optimizerOptionFields, type OptimizerOptions } from "../train/optimizer_config.ts";
import { arithmeticTaskDefaults } from "../task/arithmetic_task.ts";
import { PROJECTIONS } from "../model/weights.ts";

/** Everything `train` needs besides the LoRA, optimizer and GRPO options. */
export interface RunOptions {
  /** HF checkpoint directory of the base model; null = the task's own base model. */
  readonly model: string | null;
  readonly mode: "lora" | "full";
  readonly engine: "local" | "server";
  /** Base URL of a vLLM-compatible server (engine "server"); null = start the embedded one. */
  readonly serverUrl: string | null;
  /** How snapshots reach a server: PEFT adapter (LoRA mode only) or full weights. */
  readonly push: "lora" | "full" | "auto";
  readonly steps: number;
  readonly promptsPerStep: number;
  readonly seed: number;
  readonly backend: "auto" | "cpu" | "webgpu";
  readonly outputDir: string;
  /** Run directory name; null = a timestamp. */
  readonly runId: string | null;
  /** Save a resumable checkpoint every N steps (0 = only at the end). */
  readonly checkpointEvery: number;
  /** Resume the run in outputDir/runId from its last checkpoint. */
  readonly resume: boolean;
  /** Held-out problems evaluated before and after. */
  readonly evalSize: number;
  /** What a failed post-push verification does. */
  readonly verify: "fail" | "warn" | "off";
  /** Largest |engine logp - trainer logp| accepted by the verification probe. */
  readonly verifyTolerance: number;
  /** Print no progress line. */
  readonly quiet: boolean;
  /** What to train on: a built-in task ("arithmetic") or a .jsonl / .parquet prompt dataset. */
  readonly dataset: string;
  /** Evaluation dataset file; null = `evalSplit` of the training rows, or none. */
  readonly evalDataset: string | null;
  /** Share of the training rows held out (seeded) for evaluation when no eval file is given. */
  readonly evalSplit: number;
  /** Reward functions: built-in names and module paths; null = the task's own. */
  readonly rewardFuncs: readonly string[] | null;
  /** A multi-turn environment module (`./env.ts`, `./envs.ts#name`); null = single-turn. */
  readonly environment: string | null;
  /** Model turns of an episode at most (with an environment). */
  readonly maxTurns: number;
  /** Tokens of one model turn at most; null = max_completion_length. */
  readonly maxTurnTokens: number | null;
  /** A Jinja chat template file replacing the model's; null = the model's. */
  readonly chatTemplatePath: string | null;
  /** Extra chat template variables as `key=value` (values read as JSON when they parse). */
  readonly chatTemplateKwargs: readonly string[] | null;
  /** Shuffle the dataset each epoch. */
  readonly shuffleDataset: boolean;
  /** Prompt tokens kept (the last ones); null = no limit. */
  readonly maxPromptLength: number | null;
  /** Passes over the dataset; sets steps when given. */
  readonly numTrainEpochs: number | null;
  /** Write a metrics.jsonl line (and a progress line) every N steps. */
  readonly loggingSteps: number;
  /** Completions per micro-batch (TRL); with gradientAccumulationSteps sets the generation batch. */
  readonly perDeviceTrainBatchSize: number | null;
  /** Micro-batches per optimizer step (TRL). */
  readonly gradientAccumulationSteps: number;
  /** Completions per step (TRL generation_batch_size); sets promptsPerStep when given. */
  readonly generationBatchSize: number | null;
}

/** The flat options of a run (everything but the GRPO options). */
export interface TrainOptions extends RunOptions, LoraOptions, OptimizerOptions {}

/** The run's own option fields. */
export const runOptionFields: OptionFields = {
  model: option(Schema.NullOr(Schema.String), {
    default: null,
    description: "Hugging Face checkpoint directory of the base model",
    allowed: "a directory path, or null (the task's base model)",
  }),
  mode: choice(["lora", "full"], {
    default: "lora",
    description: "LoRA adapters or full fine-tuning",
  }),
  engine: choice(["local", "server"], {
    default: "local",
    description: "Where rollouts come from: in-process, or a vLLM-compatible server",
  }),
  serverUrl: option(Schema.NullOr(Schema.String), {
    default: null,
    description:
      "Base URL of a vLLM-compatible server (engine server), or several (replicas: pushes fan out, rollouts balance), or a file listing them (re-read while training: add or remove replicas); null = start the embedded one",
    allowed: "http(s) URLs separated by commas, a file path, or null",
  }),
  push: choice(["auto", "lora", "full"], {
    default: "auto",
    description: "How snapshots reach a server: PEFT adapter or full weights; auto = the mode",
  }),
  steps: integer({ min: 1 }, { default: 60, description: "GRPO steps" }),
  promptsPerStep: integer({ min: 1 }, {
    default: 16,
    description: "Prompts per step (each completed num_generations times)",
  }),
  seed: integer({ min: 0 }, {
    default: 0,
    description: "Seed of prompts, sampling, LoRA init and dropout",
  }),
  backend: choice(["auto", "cpu", "webgpu"], {
    default: "auto",
    description: "Tensor backend: WebGPU when an adapter exists, else the CPU",
  }),
  outputDir: option(Schema.String, {
    default: "runs",
    description: "Directory of run directories",
    allowed: "a directory path",
  }),
  runId: option(Schema.NullOr(Schema.String.check(Schema.isPattern(/^[A-Za-z0-9._-]+$/))), {
    default: null,
    description: "Run directory name; null = a timestamp",
    allowed: "letters, digits, . _ -",
  }),
  checkpointEvery: integer({ min: 0 }, {
    default: 10,
    description: "Save a resumable checkpoint every N steps (0 = only at the end)",
  }),
  resume: flag({
    default: false,
    description: "Resume the run in output_dir/run_id from its last checkpoint",
  }),
  evalSize: integer({ min: 1 }, {
    default: 200,
    description: "Held-out problems evaluated before and after training",
  }),
  verify: choice(["fail", "warn", "off"], {
    default: "fail",
    description: "What a failed post-push verification does",
  }),
  verifyTolerance: finite({ min: 0, exclusiveMin: true }, {
    default: 1e-3,
    description: "Largest |engine logp - trainer logp| the verification probe accepts",
  }),
  quiet: flag({ default: false, description: "Print no progress line" }),
  dataset: option(Schema.String, {
    default: "arithmetic",
    description: "What to train on: the built-in task, or a prompt dataset file (TRL dataset_name)",
    allowed: '"arithmetic", or a .jsonl / .parquet file with a prompt column',
  }),
  evalDataset: option(Schema.NullOr(Schema.String), {
    default: null,
    description: "Evaluation dataset file (same columns as the training set)",
    allowed: "a .jsonl / .parquet file, or null (eval_split of the training rows, or none)",
  }),
  evalSplit: finite({ min: 0, max: 1, exclusiveMax: true }, {
    default: 0,
    description: "Share of the training rows held out (seeded) for evaluation",
    note: "0 = none: without an eval file the first eval_size training rows are evaluated",
  }),
  rewardFuncs: option(Schema.NullOr(Schema.Array(Schema.String)), {
    default: null,
    description:
      "Reward functions: accuracy, think_format, think_answer_format, length, or module paths " +
      "(./my_reward.ts, ./r.ts#name)",
    allowed: "a list of built-in names and module paths, or null (the task's own)",
  }),
  environment: option(Schema.NullOr(Schema.String), {
    default: null,
    description:
      "Multi-turn rollouts: a module whose default export (or ./envs.ts#name) starts an episode, " +
      "async (item) => async (turn) => ({ observation, done }); observations are masked out of " +
      "the loss, and max_completion_length bounds the whole episode",
    allowed: "a module path, or null (single-turn)",
  }),
  maxTurns: integer({ min: 1 }, {
    default: 4,
    description: "Model turns of an episode at most (with --environment)",
  }),
  maxTurnTokens: integer<number | null>({ min: 1 }, {
    default: null,
    description:
      "Tokens of one model turn at most (with --environment); null = max_completion_length",
  }),
  chatTemplatePath: option(Schema.NullOr(Schema.String), {
    default: null,
    description: "Jinja chat template file used instead of the model's",
    allowed: "a file path, or null (the model's tokenizer_config.json chat_template)",
  }),
  chatTemplateKwargs: option(Schema.NullOr(Schema.Array(Schema.String)), {
    default: null,
    description: "Extra chat template variables, e.g. enable_thinking=false",
    allowed: "a list of key=value (values read as JSON when they parse), or null",
  }),
  shuffleDataset: flag({ default: true, description: "Shuffle the dataset each epoch" }),
  maxPromptLength: integer<number | null>({ min: 1 }, {
    default: 512,
    description: "Prompt tokens kept (the last ones; longer prompts are cut on the left)",
    nullable: "no limit",
  }),
  numTrainEpochs: finite<number | null>({ min: 0, exclusiveMin: true }, {
    default: null,
    description: "Passes over the dataset; sets the number of steps (give this or steps)",
    nullable: "steps decides",
  }),
  loggingSteps: integer({ min: 1 }, {
    default: 1,
    description: "Write a metrics.jsonl line and a progress line every N steps (and the last)",
  }),
  perDeviceTrainBatchSize: integer<number | null>({ min: 1 }, {
    default: null,
    description: "Completions per micro-batch; times gradient_accumulation_steps = completions " +
      "per step",
    nullable: "prompts_per_step decides",
  }),
  gradientAccumulationSteps: integer({ min: 1 }, {
    default: 1,
    description: "Micro-batches per optimizer step (with per_device_train_batch_size)",
  }),
  generationBatchSize: integer<number | null>({ min: 1 }, {
    default: null,
    description: "Completions per step (prompts_per_step x num_generations)",
    nullable: "prompts_per_step decides",
  }),
};

/** Every flat option of `train` but the GRPO ones: run, LoRA and optimizer fields. */
export const trainOptionFields: OptionFields = {
  ...runOptionFields,
  ...loraOptionFields,
  ...optimizerOptionFields,
};

/** Other input spellings of train options (TRL's and its scripts'). */
export const trainOptionAliases: Readonly<Record<string, string>> = {
  ...loraOptionAliases,
  model_name_or_path: "model",
  modelNameOrPath: "model",
  dataset_name: "dataset",
  datasetName: "dataset",
  max_steps: "steps",
  maxSteps: "steps",
  save_steps: "checkpointEvery",
  saveSteps: "checkpointEvery",
};

/** Flags under TRL's names where ours differ: flag key (kebab-cased) -> option. */
export const trainFlagAliases: Readonly<Record<string, string>> = {
  modelNameOrPath: "model",
  datasetName: "dataset",
  maxSteps: "steps",
  saveSteps: "checkpointEvery",
  loraTargetModules: "targetModules",
};

/** PEFT's `all-linear` (as a string or the only list entry) is every projection. */
export const expandTargetModules = (value: unknown): unknown =>
  value === "all-linear" ||
    (Array.isArray(value) && value.length === 1 && value[0] === "all-linear")
    ? [...PROJECTIONS]
    : typeof value === "string"
    ? [value] // PEFT accepts one module name as a plain string
    : value;

/** Decoded training configuration. */
export interface TrainConfig extends TrainOptions {
  readonly grpo: GrpoConfig;
}

const TrainConfigErrorBase: TaggedErrorClass<"TrainConfigError", InvalidOptionFields> = taggedError(
  "TrainConfigError",
  (e) => e.reason,
);
/** A bad option: one line naming it and what is allowed. */
export class TrainConfigError extends TrainConfigErrorBase {}

const invalid = (option: string, reason: string) =>
  Effect.fail(new TrainConfigError({ option, reason }));

/**
 * Decodes flat options (any key spelling) into a TrainConfig: run, LoRA and optimizer fields
 * take their defaults, GRPO options start from TRL's defaults overridden by `taskDefaults` (the
 * task's recommended values; the built-in task's by default). Errors are one line.
 */
export const decodeTrainConfig = (
  input: Readonly<Record<string, unknown>>,
  taskDefaults: Readonly<Record<string, unknown>> = arithmeticTaskDefaults,
): Effect.Effect<TrainConfig, TrainConfigError> =>
  Effect.gen(function* () {
    const train: Record<string, unknown> = {};
    const grpo: Record<string, unknown> = {};
    const given = new Set<string>();
    for (const [key, value] of Object.entries(input)) {
      const trainKey = optionKey(trainOptionFields, key, trainOptionAliases);
      if (trainKey !== undefined) {
        if (value !== undefined) given.add(trainKey);
        train[key] = trainKey === "targetModules" ? expandTargetModules(value) : value;
      } else if (optionKey(grpoOptionFields, key, grpoOptionAliases) !== undefined) {
        grpo[key] = value;
      } else {
        const near = closestName(key, [
          ...Object.keys(trainOptionFields),
          ...Object.keys(grpoOptionFields),
        ]);
        return yield* invalid(
          key,
          `unknown option "${key}"${near ? `; did you mean ${near}?` : ""}`,
        );
      }
    }
    const options = yield* decodeOptions(trainOptionFields, train, {
      aliases: trainOptionAliases,
    }).pipe(Effect.mapError((e) => new TrainConfigError({ option: e.option, reason: e.reason })));
    const g = yield* decodeGrpoConfig(grpo, taskDefaults).pipe(
      Effect.mapError((e) => new TrainConfigError({ option: e.option, reason: e.reason })),
    );
    const decoded: TrainConfig = { ...(options as unknown as TrainOptions), grpo: g };
    const promptsPerStep = yield* promptsPerStepOf(decoded, given);
    if (decoded.numTrainEpochs !== null && given.has("steps")) {
      return yield* invalid(
        "numTrainEpochs",
        "option numTrainEpochs: give it or steps (max_steps), not both",
      );
    }
    const cfg: TrainConfig = { ...decoded, promptsPerStep };
    if (cfg.engine === "local" && cfg.serverUrl !== null) {
      return yield* invalid("serverUrl", 'option serverUrl needs engine "server"');
    }
    const source = cfg.serverUrl === null ? null : parseReplicaSource(cfg.serverUrl);
    if (typeof source === "string") {
      return yield* invalid("serverUrl", `option serverUrl: ${source}`);
    }
    if (cfg.push === "lora" && cfg.mode === "full") {
      return yield* invalid(
        "push",
        'option push: "lora" needs mode "lora" (full fine-tuning has no adapter)',
      );
    }
    return cfg;
  });

/**
 * Prompts per step from TRL's batch options: generation_batch_size completions, or
 * per_device_train_batch_size x gradient_accumulation_steps, divided by num_generations (one
 * optimizer step per generation batch, as TRL takes with steps_per_generation =
 * gradient_accumulation_steps); else prompts_per_step itself.
 */
const promptsPerStepOf = (
  cfg: TrainConfig,
  given: ReadonlySet<string>,
): Effect.Effect<number, TrainConfigError> => {
  const G = cfg.grpo.numGenerations;
  let completions: number | null = null;
  let from = "";
  if (cfg.generationBatchSize !== null) {
    if (cfg.perDeviceTrainBatchSize !== null) {
      return invalid(
        "generationBatchSize",
        "option generationBatchSize: give it or per_device_train_batch_size, not both",
      );
    }
    [completions, from] = [cfg.generationBatchSize, "generation_batch_size"];
  } else if (cfg.perDeviceTrainBatchSize !== null) {
    completions = cfg.perDeviceTrainBatchSize * cfg.gradientAccumulationSteps;
    from = `per_device_train_batch_size x gradient_accumulation_steps (${completions})`;
  } else if (given.has("gradientAccumulationSteps") && cfg.gradientAccumulationSteps !== 1) {
    return invalid(
      "gradientAccumulationSteps",
      "option gradientAccumulationSteps needs per_device_train_batch_size " +
        "(completions per step are their product)",
    );
  }
  if (completions === null) return Effect.succeed(cfg.promptsPerStep);
  const option = cfg.generationBatchSize !== null
    ? "generationBatchSize"
    : "perDeviceTrainBatchSize";
  if (given.has("promptsPerStep")) {
    return invalid(option, `option ${option}: give it or prompts_per_step, not both`);
  }
  if (completions % G !== 0) {
    return invalid(
      option,
      `option ${option}: ${from} must be a multiple of num_generations (${G})`,
    );
  }
  return Effect.succeed(completions / G);
};

/** Reads a JSON config file of flat options (any key spelling); flags are merged over it. */
export const readTrainConfigFile = (
  path: string,
): Effect.Effect<Record<string, unknown>, TrainConfigError> =>
  Effect.gen(function* () {
    const text = yield* Effect.tryPromise({
      try: () => readFile(path, "utf8"),
      catch: (e) =>
        new TrainConfigError({
          option: "config",
          reason: `cannot read config file ${path}: ${messageOf(e)}`,
        }),
    });
    const json = yield* Effect.try({
      try: () => JSON.parse(text) as unknown,
      catch: (e) =>
        new TrainConfigError({
          option: "config",
          reason: `config file ${path} is not JSON: ${messageOf(e)}`,
        }),
    });
    if (typeof json !== "object" || json === null || Array.isArray(json)) {
      return yield* invalid("config", `config file ${path} must hold an object`);
    }
    return json as Record<string, unknown>;
  });
