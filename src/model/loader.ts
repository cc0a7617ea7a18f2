/**
 * Loads and saves Hugging Face checkpoint directories (config.json + safetensors, single or
 * sharded). Every tensor is converted to f32 and checked against the config, except that
 * loadFrozenBase keeps a LoRA base's BF16 / F16 matrices 16-bit.
 * @module
 */
import { Effect } from "effect";
import { join } from "node:path";
import { readFile } from "node:fs/promises";
import {
  loadCheckpoint,
  makeDirectory,
  saveCheckpoint,
  writeFileAtomic,
} from "../io/checkpoint.ts";
import type { CheckpointError } from "../io/errors.ts";
import { fromFloat32, SafetensorsError, toFloat32, toHalfBits } from "../io/safetensors.ts";
import { messageOf, tryTagged } from "../base/tagged_error.ts";
import { type ModelConfig, ModelConfigError, parseHfConfig, toHfConfig } from "./config.ts";
import {
  type BaseTensor,
  type BaseWeightMap,
  type HostTensor,
  validateWeights,
  type WeightMap,
  type WeightsError,
} from "./weights.ts";
import { loadGenerationConfig, mergeEosIds, type SamplingDefaults } from "./generation_config.ts";
import { loadTokenizer } from "../tokenizer/bpe.ts";
import type { Tokenizer, TokenizerError } from "../tokenizer/tokenizer.ts";

/** Errors of loading a model directory. */
export type LoadError = ModelConfigError | WeightsError | CheckpointError | SafetensorsError;

/** Reads and validates dir/config.json. */
export const loadConfig = (dir: string): Effect.Effect<ModelConfig, ModelConfigError> =>
  Effect.tryPromise({
    try: async () => JSON.parse(await readFile(join(dir, "config.json"), "utf8")) as unknown,
    catch: (e) =>
      new ModelConfigError({
        field: "config.json",
        reason: `cannot read ${join(dir, "config.json")}: ${messageOf(e)}`,
      }),
  }).pipe(Effect.flatMap(parseHfConfig));

/** Loads config and weights (f32) of a Hugging Face llama/qwen2 checkpoint directory. */
export const loadModel: (
  dir: string,
) => Effect.Effect<{ config: ModelConfig; weights: WeightMap }, LoadError> = Effect.fn(
  "loadModel",
)(function* (dir: string) {
  const config = yield* loadConfig(dir);
  const ckpt = yield* loadCheckpoint(dir);
  const tensors = new Map<string, HostTensor>();
  for (const [name, entry] of ckpt.tensors) {
    if (name.includes("rotary_emb.inv_freq")) continue; // derived, not a weight
    tensors.set(name, { shape: entry.shape, data: yield* toFloat32(entry, dir) });
  }
  const weights = yield* validateWeights(config, tensors);
  return { config, weights };
});

/**
 * Loads config and weights of a checkpoint directory for a frozen LoRA base: a BF16 / F16
 * matrix (2-D: projections, embeddings, lm_head) keeps its 16-bit bits as stored (half the
 * memory of f32, on the host and on the device); 1-D tensors (norms, biases) and every other
 * dtype are converted to f32 as loadModel does. Checked against the config alike.
 */
export const loadFrozenBase: (
  dir: string,
) => Effect.Effect<{ config: ModelConfig; weights: BaseWeightMap }, LoadError> = Effect.fn(
  "loadFrozenBase",
)(function* (dir: string) {
  const config = yield* loadConfig(dir);
  const ckpt = yield* loadCheckpoint(dir);
  const tensors = new Map<string, BaseTensor>();
  for (const [name, entry] of ckpt.tensors) {
    if (name.includes("rotary_emb.inv_freq")) continue; // derived, not a weight
    if ((entry.dtype === "BF16" || entry.dtype === "F16") && entry.shape.length === 2) {
      const { format, bits } = yield* toHalfBits(entry, dir);
      tensors.set(name, { shape: entry.shape, format, bits });
    } else tensors.set(name, { shape: entry.shape, data: yield* toFloat32(entry, dir) });
  }
  const weights = yield* validateWeights(config, tensors);
  return { config, weights };
});

/** Writes config.json and the weights (F32 by default) as a checkpoint directory. */
export const saveModel: (
  dir: string,
  config: ModelConfig,
  weights: ReadonlyMap<string, HostTensor>,
  options?: { dtype?: "F32" | "F16" | "BF16"; maxShardBytes?: number },
) => Effect.Effect<void, CheckpointError | SafetensorsError> = Effect.fn("saveModel")(function* (
  dir: string,
  config: ModelConfig,
  weights: ReadonlyMap<string, HostTensor>,
  options: { dtype?: "F32" | "F16" | "BF16"; maxShardBytes?: number } = {},
) {
  yield* makeDirectory(dir);
  const entries = yield* tryTagged(
    () => [...weights].map(([n, t]) => fromFloat32(n, t.data, t.shape, options.dtype ?? "F32")),
    SafetensorsError,
  );
  yield* saveCheckpoint(dir, entries, { maxShardBytes: options.maxShardBytes });
  const cfg = { ...toHfConfig(config), torch_dtype: dtypeName(options.dtype ?? "F32") };
  yield* writeFileAtomic(
    join(dir, "config.json"),
    new TextEncoder().encode(JSON.stringify(cfg, null, 2) + "\n"),
  );
});

const dtypeName = (d: "F32" | "F16" | "BF16"): string =>
  d === "F32" ? "float32" : d === "F16" ? "float16" : "bfloat16";

/** A base model with its tokenizer. */
export interface BaseModel {
  readonly dir: string;
  readonly config: ModelConfig;
  /** f32, or with `keepHalf` 16-bit matrices as the checkpoint stores them (see loadFrozenBase). */
  readonly weights: BaseWeightMap;
  readonly tokenizer: Tokenizer;
  /**
   * Default sampling values of the checkpoint's generation_config.json (only those it sets);
   * its eos ids are already merged into `config.eosTokenIds`.
   */
  readonly samplingDefaults: SamplingDefaults;
}

/** Options of loadBase. */
export interface LoadBaseOptions {
  /**
   * Keep BF16 / F16 matrices 16-bit (loadFrozenBase): for a LoRA run, whose base is frozen.
   * Default false: every weight f32 (full fine-tuning trains f32 master weights).
   */
  readonly keepHalf?: boolean;
}

/** Loads a checkpoint directory with its tokenizer, checking that they fit each other. */
export const loadBase: (
  d: string,
  options?: LoadBaseOptions,
) => Effect.Effect<BaseModel, LoadError | TokenizerError> = Effect.fn("loadBase")(
  function* (d: string, options: LoadBaseOptions = {}) {
    const { config, weights } = options.keepHalf ? yield* loadFrozenBase(d) : yield* loadModel(d);
    const tokenizer = yield* loadTokenizer(d);
    // HF configs may pad the vocabulary beyond the tokenizer; the reverse would index past the
    // embedding table.
    if (tokenizer.vocabSize > config.vocabSize) {
      return yield* Effect.fail(
        new ModelConfigError({
          field: "vocab_size",
          reason:
            `vocab_size ${config.vocabSize} in ${d}/config.json is smaller than the tokenizer's ${tokenizer.vocabSize} tokens`,
        }),
      );
    }
    // generation_config.json: its eos ids end generation too; its sampling values are defaults
    const generation = yield* loadGenerationConfig(d);
    return {
      dir: d,
      config: {
        ...config,
        eosTokenIds: mergeEosIds(config.eosTokenIds, generation.eosTokenIds),
      },
      weights,
      tokenizer,
      samplingDefaults: generation.defaults,
    } satisfies BaseModel;
  },
);
