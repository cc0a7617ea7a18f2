/**
 * Training options: the run's own fields here, the LoRA fields (src/lora/config.ts), the
 * optimizer fields (src/train/optimizer_config.ts) and the GRPO options (src/grpo/config.ts, TRL's
 * names), each an annotated Schema field with its default and help text. Files and the CLI give
 * them flat, in camelCase, snake_case (TRL) or kebab-case; the CLI's flags are derived from the
 * same fields (src/cli/flags.ts). A bad value gives one line naming the option and what is
 * allowed.
 * @module
 */
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
      "Base URL of a vLLM-compatible server (engine server); null = start the embedded one",
    allowed: "an http(s) URL, or null",
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
};

/** Every flat option of `train` but the GRPO ones: run, LoRA and optimizer fields. */
export const trainOptionFields: OptionFields = {
  ...runOptionFields,
  ...loraOptionFields,
  ...optimizerOptionFields,
};

/** Other input spellings of train options (TRL's). */
export const trainOptionAliases: Readonly<Record<string, string>> = loraOptionAliases;

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
    for (const [key, value] of Object.entries(input)) {
      const trainKey = optionKey(trainOptionFields, key, trainOptionAliases);
      if (trainKey !== undefined) {
        // PEFT accepts one module name as a plain string
        train[key] = trainKey === "targetModules" && typeof value === "string" ? [value] : value;
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
    const cfg: TrainConfig = { ...(options as unknown as TrainOptions), grpo: g };
    if (cfg.engine === "local" && cfg.serverUrl !== null) {
      return yield* invalid("serverUrl", 'option serverUrl needs engine "server"');
    }
    if (cfg.push === "lora" && cfg.mode === "full") {
      return yield* invalid(
        "push",
        'option push: "lora" needs mode "lora" (full fine-tuning has no adapter)',
      );
    }
    return cfg;
  });

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
