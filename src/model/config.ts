/**
 * Decoder configuration, read from a Hugging Face config.json (llama and qwen2 families).
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { Effect } from "effect";

/** Architecture of a Llama-style decoder. */
export interface ModelConfig {
  readonly modelType: "llama" | "qwen2";
  readonly hiddenSize: number;
  readonly intermediateSize: number;
  readonly numLayers: number;
  readonly numHeads: number;
  readonly numKvHeads: number;
  readonly headDim: number;
  readonly rmsNormEps: number;
  readonly ropeTheta: number;
  readonly vocabSize: number;
  readonly maxPositionEmbeddings: number;
  readonly tieWordEmbeddings: boolean;
  /** q/k/v projections carry biases (Qwen2). */
  readonly attentionBias: boolean;
  readonly bosTokenId: number | null;
  readonly eosTokenIds: readonly number[];
}

const ModelConfigErrorBase: TaggedErrorClass<"ModelConfigError", {
  /** The config.json key at fault (`(root)` for the whole object, `config.json` for the file). */
  readonly field: string;
  /** What is wrong, in words; it names the key and the value given. */
  readonly reason: string;
}> = taggedError(
  "ModelConfigError",
  (e) => e.reason,
);
/** A config.json field that is missing, of the wrong type, or inconsistent. */
export class ModelConfigError extends ModelConfigErrorBase {}

type Json = Record<string, unknown>;

const fail = (field: string, reason: string) =>
  Effect.fail(new ModelConfigError({ field, reason }));

const posInt = (
  j: Json,
  field: string,
  fallback?: number,
): Effect.Effect<number, ModelConfigError> => {
  const v = j[field] ?? fallback;
  if (v === undefined) return fail(field, `config.json: "${field}" is missing`);
  if (typeof v !== "number" || !Number.isInteger(v) || v <= 0) {
    return fail(
      field,
      `config.json: "${field}" must be a positive integer, got ${JSON.stringify(v)}`,
    );
  }
  return Effect.succeed(v);
};

const posNum = (v: unknown, field: string): Effect.Effect<number, ModelConfigError> =>
  typeof v === "number" && Number.isFinite(v) && v > 0
    ? Effect.succeed(v)
    : fail(field, `config.json: "${field}" must be a positive number, got ${JSON.stringify(v)}`);

const tokenIds = (v: unknown, field: string): Effect.Effect<number[], ModelConfigError> => {
  if (v === undefined || v === null) return Effect.succeed([]);
  const list = Array.isArray(v) ? v : [v];
  return list.every((x) => Number.isInteger(x) && x >= 0)
    ? Effect.succeed(list as number[])
    : fail(field, `config.json: "${field}" must be a token id or a list of them`);
};

/** Parses and validates a Hugging Face config.json object. */
export const parseHfConfig = (json: unknown): Effect.Effect<ModelConfig, ModelConfigError> =>
  Effect.gen(function* () {
    if (typeof json !== "object" || json === null || Array.isArray(json)) {
      return yield* fail("(root)", "config.json must hold a JSON object");
    }
    const j = json as Json;
    const modelType = j.model_type;
    if (modelType !== "llama" && modelType !== "qwen2") {
      return yield* fail(
        "model_type",
        `unknown architecture model_type=${JSON.stringify(modelType)}: expected "llama" or "qwen2"`,
      );
    }
    if (j.hidden_act !== undefined && j.hidden_act !== "silu") {
      return yield* fail("hidden_act", `hidden_act ${JSON.stringify(j.hidden_act)}: only "silu"`);
    }
    const hiddenSize = yield* posInt(j, "hidden_size");
    const numHeads = yield* posInt(j, "num_attention_heads");
    const numKvHeads = yield* posInt(j, "num_key_value_heads", numHeads);
    if (numHeads % numKvHeads !== 0) {
      return yield* fail(
        "num_key_value_heads",
        `num_attention_heads ${numHeads} is not a multiple of num_key_value_heads ${numKvHeads}`,
      );
    }
    if (j.head_dim === undefined && hiddenSize % numHeads !== 0) {
      return yield* fail(
        "head_dim",
        `hidden_size ${hiddenSize} not divisible by ${numHeads} heads`,
      );
    }
    const headDim = yield* posInt(j, "head_dim", hiddenSize / numHeads);
    if (headDim % 2 !== 0) {
      return yield* fail("head_dim", `head_dim ${headDim} must be even (rotary)`);
    }
    const rope = j.rope_parameters as Json | undefined;
    const ropeTheta = yield* posNum(
      j.rope_theta ?? (rope && typeof rope === "object" ? rope.rope_theta : undefined) ?? 10000,
      "rope_theta",
    );
    const scaling = j.rope_scaling ?? (rope && typeof rope === "object" ? rope.rope_type : null);
    if (scaling !== undefined && scaling !== null && scaling !== "default") {
      return yield* fail(
        "rope_scaling",
        `rope scaling ${JSON.stringify(scaling)} is not supported`,
      );
    }
    const eos = yield* tokenIds(j.eos_token_id, "eos_token_id");
    const bos = yield* tokenIds(j.bos_token_id, "bos_token_id");
    return {
      modelType,
      hiddenSize,
      intermediateSize: yield* posInt(j, "intermediate_size"),
      numLayers: yield* posInt(j, "num_hidden_layers"),
      numHeads,
      numKvHeads,
      headDim,
      rmsNormEps: yield* posNum(j.rms_norm_eps ?? 1e-6, "rms_norm_eps"),
      ropeTheta,
      vocabSize: yield* posInt(j, "vocab_size"),
      maxPositionEmbeddings: yield* posInt(j, "max_position_embeddings", 2048),
      tieWordEmbeddings: j.tie_word_embeddings === true,
      attentionBias: modelType === "qwen2" || j.attention_bias === true,
      bosTokenId: bos[0] ?? null,
      eosTokenIds: eos,
    } satisfies ModelConfig;
  });

/** The config.json a snapshot export writes (loadable by transformers and vLLM). */
export const toHfConfig = (c: ModelConfig): Record<string, unknown> => ({
  architectures: [c.modelType === "qwen2" ? "Qwen2ForCausalLM" : "LlamaForCausalLM"],
  model_type: c.modelType,
  hidden_size: c.hiddenSize,
  intermediate_size: c.intermediateSize,
  num_hidden_layers: c.numLayers,
  num_attention_heads: c.numHeads,
  num_key_value_heads: c.numKvHeads,
  head_dim: c.headDim,
  hidden_act: "silu",
  rms_norm_eps: c.rmsNormEps,
  rope_theta: c.ropeTheta,
  vocab_size: c.vocabSize,
  max_position_embeddings: c.maxPositionEmbeddings,
  tie_word_embeddings: c.tieWordEmbeddings,
  ...(c.modelType === "llama" ? { attention_bias: c.attentionBias } : {}),
  bos_token_id: c.bosTokenId,
  eos_token_id: c.eosTokenIds.length === 1 ? c.eosTokenIds[0] : c.eosTokenIds,
  torch_dtype: "float32",
});
