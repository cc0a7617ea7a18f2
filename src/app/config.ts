/**
 * Training options: one flat, Schema-validated record (CLI flags in kebab-case, config files in
 * camelCase or snake_case). GRPO options (TRL's names) are decoded by src/grpo/config.ts; a bad
 * value gives one line naming the option and the allowed values.
 * @module
 */
import type { TaggedErrorClass } from "../base/tagged_error.ts";
import { Data, Effect, Exit, Schema } from "effect";
import { decodeGrpoConfig, type GrpoConfig, trlOptionNames } from "../grpo/config.ts";
import { type Projection, PROJECTIONS } from "../model/weights.ts";
import { arithmeticTaskDefaults } from "../task/arithmetic_task.ts";

/** Everything `train` needs besides the GRPO options. */
export interface TrainOptions {
  /** HF checkpoint directory of the base model; null = the built-in arithmetic model. */
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
  readonly loraR: number;
  readonly loraAlpha: number;
  readonly loraDropout: number;
  readonly targetModules: readonly Projection[];
  readonly useRslora: boolean;
  readonly weightDecay: number;
  readonly maxGradNorm: number;
  readonly adamBeta1: number;
  readonly adamBeta2: number;
  readonly adamEpsilon: number;
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

/** Decoded training configuration. */
export interface TrainConfig extends TrainOptions {
  readonly grpo: GrpoConfig;
}

const TrainConfigErrorBase: TaggedErrorClass<"TrainConfigError", {
  readonly option: string;
  readonly message: string;
}> = Data.TaggedError("TrainConfigError");
/** A bad option: one line naming it and what is allowed. */
export class TrainConfigError extends TrainConfigErrorBase {}

interface Spec {
  readonly schema: Schema.Top;
  readonly default: unknown;
  readonly allowed: string;
}

const int = (min: number) => Schema.Int.check(Schema.isGreaterThanOrEqualTo(min));
const num = (min: number, exclusive = false) =>
  Schema.Finite.check(exclusive ? Schema.isGreaterThan(min) : Schema.isGreaterThanOrEqualTo(min));
const lit = <const L extends readonly string[]>(values: L, d: L[number]): Spec => ({
  schema: Schema.Literals(values),
  default: d,
  allowed: values.map((v) => JSON.stringify(v)).join(" | "),
});

const specs: { readonly [K in keyof TrainOptions]: Spec } = {
  model: {
    schema: Schema.NullOr(Schema.String),
    default: null,
    allowed: "a directory path, or null (built-in)",
  },
  mode: lit(["lora", "full"], "lora"),
  engine: lit(["local", "server"], "local"),
  serverUrl: {
    schema: Schema.NullOr(Schema.String),
    default: null,
    allowed: "an http(s) URL, or null",
  },
  push: lit(["auto", "lora", "full"], "auto"),
  steps: { schema: int(1), default: 60, allowed: "an integer >= 1" },
  promptsPerStep: { schema: int(1), default: 16, allowed: "an integer >= 1" },
  seed: { schema: int(0), default: 0, allowed: "an integer >= 0" },
  backend: lit(["auto", "cpu", "webgpu"], "auto"),
  loraR: { schema: int(1), default: 8, allowed: "an integer >= 1" },
  loraAlpha: { schema: num(0, true), default: 16, allowed: "a number > 0" },
  loraDropout: {
    schema: Schema.Finite.check(
      Schema.isBetween({ minimum: 0, maximum: 1, exclusiveMaximum: true }),
    ),
    default: 0,
    allowed: "a number in [0, 1)",
  },
  targetModules: {
    schema: Schema.Array(Schema.Literals(PROJECTIONS)),
    default: [...PROJECTIONS],
    allowed: `a list of ${PROJECTIONS.join(", ")}`,
  },
  useRslora: { schema: Schema.Boolean, default: false, allowed: "true | false" },
  weightDecay: { schema: num(0), default: 0, allowed: "a number >= 0" },
  maxGradNorm: { schema: num(0), default: 1, allowed: "a number >= 0 (0 = no clipping)" },
  adamBeta1: {
    schema: Schema.Finite.check(
      Schema.isBetween({ minimum: 0, maximum: 1, exclusiveMaximum: true }),
    ),
    default: 0.9,
    allowed: "a number in [0, 1)",
  },
  adamBeta2: {
    schema: Schema.Finite.check(
      Schema.isBetween({ minimum: 0, maximum: 1, exclusiveMaximum: true }),
    ),
    default: 0.999,
    allowed: "a number in [0, 1)",
  },
  adamEpsilon: { schema: num(0, true), default: 1e-8, allowed: "a number > 0" },
  outputDir: { schema: Schema.String, default: "runs", allowed: "a directory path" },
  runId: {
    schema: Schema.NullOr(Schema.String.check(Schema.isPattern(/^[A-Za-z0-9._-]+$/))),
    default: null,
    allowed: "letters, digits, . _ -",
  },
  checkpointEvery: { schema: int(0), default: 10, allowed: "an integer >= 0" },
  resume: { schema: Schema.Boolean, default: false, allowed: "true | false" },
  evalSize: { schema: int(1), default: 200, allowed: "an integer >= 1" },
  verify: lit(["fail", "warn", "off"], "fail"),
  verifyTolerance: { schema: num(0, true), default: 1e-3, allowed: "a number > 0" },
  quiet: { schema: Schema.Boolean, default: false, allowed: "true | false" },
};

const camel = (k: string): string =>
  k.replace(/[-_]([a-z0-9])/g, (_, c: string) => c.toUpperCase());

const trainKeys = new Set(Object.keys(specs));
const grpoKeys = new Map<string, string>(
  Object.entries(trlOptionNames).flatMap(([k, snake]) => [[k, k], [snake, k], [camel(snake), k]]),
);

/** Decodes options (any key spelling), filling defaults; errors are one line. */
export const decodeTrainConfig = (
  input: Record<string, unknown>,
  taskDefaults: Readonly<Record<string, unknown>> = arithmeticTaskDefaults,
): Effect.Effect<TrainConfig, TrainConfigError> =>
  Effect.gen(function* () {
    const train: Record<string, unknown> = {};
    const grpo: Record<string, unknown> = { ...taskDefaults };
    for (let [rawKey, value] of Object.entries(input)) {
      const key = camel(rawKey);
      if (key === "targetModules" && typeof value === "string") value = [value]; // one module on the CLI
      if (trainKeys.has(key)) {
        const spec = specs[key as keyof TrainOptions];
        if (Exit.isFailure(Schema.decodeUnknownExit(spec.schema as Schema.Codec<unknown>)(value))) {
          return yield* Effect.fail(
            new TrainConfigError({
              option: key,
              message: `option ${key}: got ${JSON.stringify(value)}; allowed: ${spec.allowed}`,
            }),
          );
        }
        train[key] = value;
      } else if (grpoKeys.has(rawKey) || grpoKeys.has(key)) {
        grpo[grpoKeys.get(rawKey) ?? grpoKeys.get(key)!] = value;
      } else {
        return yield* Effect.fail(
          new TrainConfigError({
            option: rawKey,
            message: `unknown option "${rawKey}"; options: ${
              [...trainKeys, ...new Set(grpoKeys.values())].join(", ")
            }`,
          }),
        );
      }
    }
    const g = yield* decodeGrpoConfig(grpo).pipe(
      Effect.mapError((e) => new TrainConfigError({ option: e.option, message: e.message })),
    );
    const out: Record<string, unknown> = {};
    for (const k of trainKeys) {
      out[k] = k in train ? train[k] : specs[k as keyof TrainOptions].default;
    }
    const cfg = { ...(out as unknown as TrainOptions), grpo: g };
    if (cfg.engine === "local" && cfg.serverUrl !== null) {
      return yield* Effect.fail(
        new TrainConfigError({
          option: "serverUrl",
          message: 'option serverUrl needs engine "server"',
        }),
      );
    }
    if (cfg.push === "lora" && cfg.mode === "full") {
      return yield* Effect.fail(
        new TrainConfigError({
          option: "push",
          message: 'option push: "lora" needs mode "lora" (full fine-tuning has no adapter)',
        }),
      );
    }
    return cfg;
  });

/** Parses CLI arguments `--key value`, `--flag`, `--no-flag`, `--config FILE` into raw options. */
export const parseArgs = (
  args: readonly string[],
): Effect.Effect<Record<string, unknown>, TrainConfigError> =>
  Effect.gen(function* () {
    const out: Record<string, unknown> = {};
    let file: string | null = null;
    for (let i = 0; i < args.length; i++) {
      const a = args[i];
      if (!a.startsWith("--")) {
        return yield* Effect.fail(
          new TrainConfigError({
            option: a,
            message: `unexpected argument "${a}" (options look like --steps 20)`,
          }),
        );
      }
      let [key, value] = a.slice(2).split(/=(.*)/s, 2) as [string, string | undefined];
      if (value === undefined) {
        const next = args[i + 1];
        if (next === undefined || next.startsWith("--")) {
          value = key.startsWith("no-") ? "false" : "true";
          if (key.startsWith("no-")) key = key.slice(3);
        } else {
          value = next;
          i++;
        }
      }
      if (key === "config") {
        file = value;
        continue;
      }
      out[key] = parseValue(value);
    }
    if (file !== null) {
      const text = yield* Effect.tryPromise({
        try: () => import("node:fs/promises").then((fs) => fs.readFile(file!, "utf8")),
        catch: (e) =>
          new TrainConfigError({
            option: "config",
            message: `cannot read config file ${file}: ${e}`,
          }),
      });
      const json = yield* Effect.try({
        try: () => JSON.parse(text) as unknown,
        catch: (e) =>
          new TrainConfigError({
            option: "config",
            message: `config file ${file} is not JSON: ${e}`,
          }),
      });
      if (typeof json !== "object" || json === null || Array.isArray(json)) {
        return yield* Effect.fail(
          new TrainConfigError({
            option: "config",
            message: `config file ${file} must hold an object`,
          }),
        );
      }
      return { ...(json as Record<string, unknown>), ...out }; // flags win over the file
    }
    return out;
  });

const parseValue = (v: string): unknown => {
  if (v === "true") return true;
  if (v === "false") return false;
  if (v === "null") return null;
  if (/^-?(\d+\.?\d*|\.\d+)(e-?\d+)?$/i.test(v)) return Number(v);
  if (v.includes(",")) return v.split(",").map((x) => x.trim()).filter((x) => x.length > 0);
  if (v.startsWith("[")) {
    try {
      return JSON.parse(v);
    } catch {
      return v;
    }
  }
  return v;
};
