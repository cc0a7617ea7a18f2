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
  /** Largest `n`; null = VLLM_MAX_N_SEQUENCES, else 16384 (vLLM's default). */
  readonly maxNSequences: number | null;
  /** Largest prompt list; null = VLLM_MAX_COMPLETION_PROMPTS, else 1024 (vLLM's default). */
  readonly maxCompletionPrompts: number | null;
  /** Most sequences (prompts x n) one request may ask for. */
  readonly maxRequestSequences: number;
  /** Largest request body in MiB (checked while reading it). */
  readonly maxRequestBodyMb: number;
  /** Most stop strings a request may give. */
  readonly maxStopStrings: number;
  /** Longest stop string, in characters. */
  readonly maxStopStringLength: number;
  /** Adapters and reload_weights checkpoints must lie under this directory; null = anywhere. */
  readonly allowedLoraRoot: string | null;
  /** A chat template file replacing the model's; null = the model's own. */
  readonly chatTemplate: string | null;
  /** "auto": the model's generation_config.json gives the defaults; "vllm": OpenAI's. */
  readonly generationConfig: "auto" | "vllm";
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
  maxNSequences: integer<number | null>({ min: 1, max: 1 << 24 }, {
    default: null,
    description: "Largest n (samples per prompt) a request may ask for; larger n is a 400",
    nullable: "VLLM_MAX_N_SEQUENCES, else 16384",
  }),
  maxCompletionPrompts: integer<number | null>({ min: 1, max: 1 << 20 }, {
    default: null,
    description: "Largest prompt list of one request; a longer list is a 400",
    nullable: "VLLM_MAX_COMPLETION_PROMPTS, else 1024",
  }),
  maxRequestSequences: integer({ min: 1, max: 1 << 26 }, {
    default: 65536,
    description:
      "Most sequences (prompts x n) one request may ask for: bounds a request's memory; more is a 400",
  }),
  maxRequestBodyMb: integer({ min: 1, max: 1 << 12 }, {
    default: 32,
    description: "Largest request body in MiB (checked while reading; larger is a 413)",
  }),
  maxStopStrings: integer({ min: 0, max: 1 << 16 }, {
    default: 64,
    description: "Most stop strings one request may give",
  }),
  maxStopStringLength: integer({ min: 1, max: 1 << 20 }, {
    default: 1024,
    description: "Longest stop string, in characters",
  }),
  allowedLoraRoot: option(Schema.NullOr(Schema.String.check(Schema.isMinLength(1))), {
    default: null,
    description:
      "lora_path and reload_weights' weights_path must resolve under this directory; null = any readable path (vLLM)",
    allowed: "a directory path, or null",
  }),
  chatTemplate: option(Schema.NullOr(Schema.String.check(Schema.isMinLength(1))), {
    default: null,
    description:
      "Jinja chat template file for /v1/chat/completions; null = the model's (tokenizer_config.json or chat_template.jinja)",
    allowed: "a file path, or null",
  }),
  generationConfig: choice(["auto", "vllm"], {
    default: "auto",
    description:
      "auto: the model's generation_config.json sets the defaults of omitted sampling fields and adds its eos ids (vLLM's default); vllm: ignore it",
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
