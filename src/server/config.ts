/**
 * The options of `serve` as annotated fields, with vLLM's flag names (`--max-lora-rank`,
 * `--max-loras`, `--max-logprobs`, `--logprobs-mode`, `--served-model-name`, `--api-key`,
 * `--max-num-seqs`, and lorafold's `--prefix-cache-mb`, `--kv-cache-mb`); the CLI's flags are
 * derived from them (src/cli/flags.ts).
 * @module
 */
import { Effect, Schema } from "effect";
import {
  choice,
  decodeOptions,
  flag,
  integer,
  type InvalidOptionFields,
  option,
  type OptionFields,
} from "../base/options.ts";
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import type { BackendChoice } from "../backend/backend.ts";
import type { LogprobsMode } from "./sampler.ts";

/** vLLM's allowed --max-lora-rank values. */
export const LORA_RANKS: readonly [number, ...number[]] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

/** Decoded options of `serve`. */
export interface ServeConfig {
  /** Hugging Face checkpoint directory served as the base model. */
  readonly model: string;
  readonly port: number;
  readonly host: string;
  readonly enableLora: boolean;
  readonly maxLoraRank: number;
  readonly maxLoras: number;
  readonly maxLogprobs: number;
  readonly logprobsMode: LogprobsMode;
  /** The base model's name in the API; null = the model path, as vLLM. */
  readonly servedModelName: string | null;
  readonly apiKey: string | null;
  /** null = LORAFOLD_BACKEND, else auto. */
  readonly backend: BackendChoice | null;
  /** Sequences running at once; null = LORAFOLD_MAX_NUM_SEQS, else 256. */
  readonly maxNumSeqs: number | null;
  /** Prefix-cache budget in MiB; null = LORAFOLD_PREFIX_CACHE_MB, else 256. */
  readonly prefixCacheMb: number | null;
  /** KV-cache budget of the running batches in MiB; null = LORAFOLD_KV_CACHE_MB, else 4096. */
  readonly kvCacheMb: number | null;
}

/** The `serve` option fields. */
export const serveOptionFields: OptionFields = {
  model: option(Schema.String.check(Schema.isMinLength(1)), {
    description: "Hugging Face checkpoint directory served as the base model",
    allowed: "a directory path",
  }),
  port: integer({ min: 0, max: 65535 }, {
    default: 8000,
    description: "Port to listen on; 0 = a free one (the 'listening on' line names it)",
  }),
  host: option(Schema.String, {
    default: "127.0.0.1",
    description: "Address to listen on",
    allowed: "a host name or address",
  }),
  enableLora: flag({
    default: false,
    description:
      "Serve LoRA adapters (runtime loading also needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)",
  }),
  maxLoraRank: option(Schema.Literals(LORA_RANKS), {
    default: 16,
    description: "Largest adapter rank accepted",
    allowed: LORA_RANKS.join(" | "),
  }),
  maxLoras: integer({ min: 1, max: 1024 }, {
    default: 4,
    description: "Adapters resident at once",
  }),
  maxLogprobs: integer({ min: 0, max: 1 << 20 }, {
    default: 20,
    description: "Largest logprobs / prompt_logprobs a request may ask for",
  }),
  logprobsMode: choice(["raw_logprobs", "processed_logprobs"], {
    default: "raw_logprobs",
    description: "Log-probs of the raw logits, or of the distribution sampled from",
  }),
  servedModelName: option(Schema.NullOr(Schema.String), {
    default: null,
    description: "The base model's name in the API; null = the model path",
    allowed: "a name, or null",
  }),
  apiKey: option(Schema.NullOr(Schema.String), {
    default: null,
    description: "Bearer token every /v1 request must carry; null = none",
    allowed: "a string, or null",
  }),
  backend: option(Schema.NullOr(Schema.Literals(["auto", "cpu", "webgpu"])), {
    default: null,
    description: "Tensor backend; null = LORAFOLD_BACKEND, else auto",
    allowed: '"auto" | "cpu" | "webgpu", or null',
  }),
  maxNumSeqs: integer<number | null>({ min: 1, max: 1 << 20 }, {
    default: null,
    description: "Sequences running at once (continuous batching; a request is never split)",
    nullable: "LORAFOLD_MAX_NUM_SEQS, else 256",
  }),
  prefixCacheMb: integer<number | null>({ min: 0, max: 1 << 20 }, {
    default: null,
    description: "Prefix-cache budget in MiB",
    nullable: "LORAFOLD_PREFIX_CACHE_MB, else 256",
  }),
  kvCacheMb: integer<number | null>({ min: 1, max: 1 << 20 }, {
    default: null,
    description: "KV-cache budget of the running sequences in MiB (a request is never split)",
    nullable: "LORAFOLD_KV_CACHE_MB, else 4096",
  }),
};

const ServeConfigErrorBase: TaggedErrorClass<"ServeConfigError", InvalidOptionFields> = taggedError(
  "ServeConfigError",
  (e) => e.reason,
);
/** A bad `serve` option: one line naming it and what is allowed. */
export class ServeConfigError extends ServeConfigErrorBase {}

/** Decodes `serve` options (any key spelling), filling defaults. */
export const decodeServeConfig = (
  input: Readonly<Record<string, unknown>>,
): Effect.Effect<ServeConfig, ServeConfigError> =>
  decodeOptions(serveOptionFields, input, { label: (n) => `option ${n}` }).pipe(
    Effect.map((v) => v as unknown as ServeConfig),
    Effect.mapError((e) => new ServeConfigError({ option: e.option, reason: e.reason })),
  );
