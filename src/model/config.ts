/**
 * Decoder configuration, read from a Hugging Face config.json (llama 1-3.x, qwen2/2.5, qwen3
 * dense, mistral, gemma2 and gemma3 text). Every field that changes the math is read; a value
 * the decoder cannot honour is a ModelConfigError naming the field, never silently dropped.
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { Effect } from "effect";

/** Architectures the decoder implements (HF `model_type`). */
export type ModelType = "llama" | "qwen2" | "qwen3" | "mistral" | "gemma2" | "gemma3_text";

/** The model types parseHfConfig accepts. */
export const MODEL_TYPES: readonly ModelType[] = [
  "llama",
  "qwen2",
  "qwen3",
  "mistral",
  "gemma2",
  "gemma3_text",
];

/**
 * Gemma 2/3: GeLU-tanh MLP, (1 + w) RMSNorms, embeddings scaled by sqrt(hidden), a norm on the
 * attention and MLP outputs besides their inputs (pre/post feed-forward norms).
 */
export const isGemma = (c: { readonly modelType: ModelType }): boolean =>
  c.modelType === "gemma2" || c.modelType === "gemma3_text";

/**
 * Rotary scaling (`rope_scaling` / `rope_parameters` with a rope_type other than "default"), as
 * Hugging Face's modeling_rope_utils defines each type. Optional yarn fields absent from the
 * config stay absent (they round-trip as written).
 */
export type RopeScaling =
  | { readonly type: "linear"; readonly factor: number }
  | { readonly type: "dynamic"; readonly factor: number }
  | {
    readonly type: "llama3";
    readonly factor: number;
    readonly lowFreqFactor: number;
    readonly highFreqFactor: number;
    readonly originalMaxPositionEmbeddings: number;
  }
  | {
    readonly type: "yarn";
    readonly factor: number;
    readonly originalMaxPositionEmbeddings?: number;
    readonly attentionFactor?: number;
    readonly betaFast?: number;
    readonly betaSlow?: number;
    readonly mscale?: number;
    readonly mscaleAllDim?: number;
    readonly truncate?: boolean;
  };

/** Architecture of a Llama-style decoder. */
export interface ModelConfig {
  readonly modelType: ModelType;
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
  /**
   * Attention projections carry biases: q/k/v for qwen2 (always), q/k/v/o for llama and qwen3
   * with `attention_bias: true` (see projectionHasBias).
   */
  readonly attentionBias: boolean;
  readonly bosTokenId: number | null;
  readonly eosTokenIds: readonly number[];
  /** Llama `mlp_bias: true`: gate/up/down carry biases. Absent means false. */
  readonly mlpBias?: boolean;
  /** Qwen3: RMSNorm over head_dim of each query and key head before RoPE. Absent means false. */
  readonly qkNorm?: boolean;
  /** Rotary scaling; absent means plain RoPE. */
  readonly ropeScaling?: RopeScaling;
  /**
   * Sliding-window attention: a query at position i sees keys at positions > i - window (HF's
   * sliding mask), on the layers `slidingLayers` marks (all layers when absent).
   */
  readonly slidingWindow?: number;
  /** Per layer: true where the sliding window applies (HF `layer_types`). */
  readonly slidingLayers?: readonly boolean[];
  /** Gemma: attention scores scaled by query_pre_attn_scalar^-0.5 instead of head_dim^-0.5. */
  readonly queryPreAttnScalar?: number;
  /** Gemma 2: attention logit soft-capping (cap · tanh(s / cap)). */
  readonly attnLogitSoftcap?: number;
  /** Gemma 2: final logit soft-capping. */
  readonly finalLogitSoftcap?: number;
  /** Gemma 3: the sliding layers' RoPE base (plain RoPE there; ropeTheta/ropeScaling: global). */
  readonly ropeLocalTheta?: number;
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
/** A config.json field that is missing, of the wrong type, inconsistent or not implemented. */
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

const bool = (
  v: unknown,
  field: string,
  fallback: boolean,
): Effect.Effect<boolean, ModelConfigError> =>
  v === undefined || v === null
    ? Effect.succeed(fallback)
    : typeof v === "boolean"
    ? Effect.succeed(v)
    : fail(field, `config.json: "${field}" must be true or false, got ${JSON.stringify(v)}`);

const tokenIds = (v: unknown, field: string): Effect.Effect<number[], ModelConfigError> => {
  if (v === undefined || v === null) return Effect.succeed([]);
  const list = Array.isArray(v) ? v : [v];
  return list.every((x) => Number.isInteger(x) && x >= 0)
    ? Effect.succeed(list as number[])
    : fail(field, `config.json: "${field}" must be a token id or a list of them`);
};

/** HF's defaults of max_position_embeddings per architecture (rope scaling reads it). */
const DEFAULT_MAX_POSITIONS: Record<ModelType, number> = {
  llama: 2048,
  qwen2: 32768,
  qwen3: 32768,
  mistral: 131072,
  gemma2: 8192,
  gemma3_text: 131072,
};

/** Gemma-only fields of UNSUPPORTED_FIELDS, read by the gemma families. */
const GEMMA_FIELDS = new Set([
  "attn_logit_softcapping",
  "final_logit_softcapping",
  "query_pre_attn_scalar",
]);

/**
 * Fields that change the math of some architecture but that none of ours implements: refused when
 * set to anything but their neutral value (null, or the value given here).
 */
const UNSUPPORTED_FIELDS: readonly [field: string, neutral: unknown][] = [
  ["partial_rotary_factor", 1],
  ["attention_dropout", 0],
  ["attn_logit_softcapping", null],
  ["final_logit_softcapping", null],
  ["query_pre_attn_scalar", null],
  ["logits_scaling", 1],
  ["embedding_multiplier", 1],
  ["residual_multiplier", 1],
  ["attention_multiplier", null],
  ["no_rope_layers", null],
  ["num_experts", null],
  ["num_local_experts", null],
  ["use_qk_norm", null],
  ["qk_layernorm", null],
  ["use_bidirectional_attention", null],
  ["altup_num_inputs", null],
  ["laurel_rank", null],
];

const ropeScalingOf = (
  j: Json,
  modelType: ModelType,
  maxPositions: number,
  path?: string,
): Effect.Effect<RopeScaling | undefined, ModelConfigError> =>
  Effect.gen(function* () {
    const field = path ??
      (j.rope_scaling !== undefined && j.rope_scaling !== null
        ? "rope_scaling"
        : "rope_parameters");
    const raw = path
      ? (j.rope_parameters as Json)[path.slice("rope_parameters.".length)]
      : j[field];
    if (raw === undefined || raw === null) return undefined;
    if (typeof raw !== "object" || Array.isArray(raw)) {
      return yield* fail(
        field,
        `config.json: "${field}" must be an object, got ${JSON.stringify(raw)}`,
      );
    }
    const r = raw as Json;
    // "type" is the field's old name
    const type = r.rope_type ?? r.type ?? "default";
    const num = (key: string, fallback?: number) => posNum(r[key] ?? fallback, `${field}.${key}`);
    const known = (keys: readonly string[]) => {
      const extra = Object.keys(r).find(
        (k) => !["rope_type", "type", "rope_theta", ...keys].includes(k),
      );
      return extra === undefined ? Effect.void : fail(
        `${field}.${extra}`,
        `config.json: "${field}.${extra}" is not a field of rope_type ${
          JSON.stringify(type)
        } that the decoder implements`,
      );
    };
    switch (type) {
      case "default":
        yield* known([]);
        return undefined;
      case "linear":
      case "dynamic":
        yield* known([
          "factor",
          ...(type === "dynamic" ? ["original_max_position_embeddings"] : []),
        ]);
        if (
          type === "dynamic" && r.original_max_position_embeddings !== undefined &&
          r.original_max_position_embeddings !== maxPositions
        ) {
          // HF's dynamic NTK scales against max_position_embeddings, not this field
          return yield* fail(
            `${field}.original_max_position_embeddings`,
            `config.json: "${field}.original_max_position_embeddings" ${r.original_max_position_embeddings} differs from max_position_embeddings ${maxPositions}; HF's dynamic rope ignores it, so the checkpoint's intent is unclear`,
          );
        }
        return { type: type as "linear" | "dynamic", factor: yield* num("factor") };
      case "llama3": {
        yield* known([
          "factor",
          "low_freq_factor",
          "high_freq_factor",
          "original_max_position_embeddings",
        ]);
        const lowFreqFactor = yield* num("low_freq_factor");
        const highFreqFactor = yield* num("high_freq_factor");
        if (highFreqFactor <= lowFreqFactor) {
          return yield* fail(
            `${field}.high_freq_factor`,
            `config.json: "${field}.high_freq_factor" ${highFreqFactor} must exceed low_freq_factor ${lowFreqFactor}`,
          );
        }
        return {
          type: "llama3",
          factor: yield* num("factor"),
          lowFreqFactor,
          highFreqFactor,
          originalMaxPositionEmbeddings: yield* num("original_max_position_embeddings"),
        };
      }
      case "yarn": {
        yield* known([
          "factor",
          "original_max_position_embeddings",
          "attention_factor",
          "beta_fast",
          "beta_slow",
          "mscale",
          "mscale_all_dim",
          "truncate",
        ]);
        const opt = (key: string) =>
          r[key] === undefined || r[key] === null ? Effect.succeed(undefined) : num(key);
        const original = yield* opt("original_max_position_embeddings");
        const factor = r.factor === undefined || r.factor === null
          ? original === undefined
            ? yield* fail(`${field}.factor`, `config.json: "${field}.factor" is missing`)
            : maxPositions / original
          : yield* num("factor");
        const out: Record<string, unknown> = { type, factor };
        const put = (k: string, v: unknown) => v !== undefined && (out[k] = v);
        put("originalMaxPositionEmbeddings", original);
        put("attentionFactor", yield* opt("attention_factor"));
        put("betaFast", yield* opt("beta_fast"));
        put("betaSlow", yield* opt("beta_slow"));
        put("mscale", yield* opt("mscale"));
        put("mscaleAllDim", yield* opt("mscale_all_dim"));
        if (r.truncate !== undefined) {
          put("truncate", yield* bool(r.truncate, `${field}.truncate`, true));
        }
        return out as RopeScaling;
      }
      default:
        return yield* fail(
          `${field}.rope_type`,
          `config.json: "${field}.rope_type" ${
            JSON.stringify(type)
          } (${modelType}) is not implemented: expected default, linear, dynamic, llama3 or yarn`,
        );
    }
  });

/** HF `layer_types`: one "full_attention" or "sliding_attention" per layer; true where sliding. */
const slidingLayerTypes = (
  lt: unknown,
  numLayers: number,
): Effect.Effect<boolean[], ModelConfigError> =>
  Array.isArray(lt) && lt.length === numLayers &&
    lt.every((t) => t === "full_attention" || t === "sliding_attention")
    ? Effect.succeed(lt.map((t) => t === "sliding_attention"))
    : fail(
      "layer_types",
      `config.json: "layer_types" must list "full_attention" or "sliding_attention" for each of ${numLayers} layers`,
    );

/**
 * Which layers use sliding-window attention, HF's way: mistral applies `sliding_window` to every
 * layer; qwen2/qwen3 only with `use_sliding_window`, from layer `max_window_layers` on; an
 * explicit `layer_types` list wins. Undefined: no sliding window anywhere.
 */
const slidingOf = (
  j: Json,
  modelType: ModelType,
  numLayers: number,
): Effect.Effect<{ window: number; layers: boolean[] } | undefined, ModelConfigError> =>
  Effect.gen(function* () {
    if (isGemma({ modelType })) {
      // every gemma layer type list is explicit or the published pattern: gemma2 alternates
      // (even layers slide), gemma3 slides on all but every sliding_window_pattern-th layer
      const window = yield* posInt(j, "sliding_window", 4096);
      let layers: boolean[];
      if (j.layer_types !== undefined && j.layer_types !== null) {
        layers = yield* slidingLayerTypes(j.layer_types, numLayers);
      } else {
        const pattern = modelType === "gemma2" ? 2 : yield* posInt(j, "sliding_window_pattern", 6);
        layers = Array.from({ length: numLayers }, (_, i) => (i + 1) % pattern !== 0);
      }
      return layers.some((x) => x) ? { window, layers } : undefined;
    }
    if (modelType === "llama") {
      if (j.sliding_window !== undefined && j.sliding_window !== null) {
        return yield* fail(
          "sliding_window",
          `config.json: llama has no "sliding_window" (got ${JSON.stringify(j.sliding_window)})`,
        );
      }
      return undefined;
    }
    // MistralConfig defaults sliding_window to 4096 (null turns it off)
    if (modelType === "mistral" && j.sliding_window === undefined) {
      j = { ...j, sliding_window: 4096 };
    }
    if (
      modelType === "mistral" && Array.isArray(j.layer_types) &&
      j.layer_types.some((t) => t !== "sliding_attention") && j.sliding_window !== null
    ) {
      // HF's MistralModel ignores layer_types (it warns to use Ministral): not implemented
      return yield* fail(
        "layer_types",
        `config.json: mistral with mixed "layer_types" (a Ministral model) is not implemented`,
      );
    }
    const enabled = modelType === "mistral" ||
      (yield* bool(j.use_sliding_window, "use_sliding_window", false));
    if (!enabled || j.sliding_window === undefined || j.sliding_window === null) {
      if (Array.isArray(j.layer_types) && j.layer_types.some((t) => t !== "full_attention")) {
        return yield* fail(
          "layer_types",
          `config.json: "layer_types" marks sliding layers but no sliding window is enabled`,
        );
      }
      return undefined;
    }
    const window = yield* posInt(j, "sliding_window");
    let layers: boolean[];
    if (j.layer_types !== undefined && j.layer_types !== null) {
      layers = yield* slidingLayerTypes(j.layer_types, numLayers);
    } else if (modelType === "mistral") {
      layers = Array.from({ length: numLayers }, () => true);
    } else {
      const first = j.max_window_layers === undefined || j.max_window_layers === null
        ? 28
        : yield* posInt(j, "max_window_layers");
      layers = Array.from({ length: numLayers }, (_, i) => i >= first);
    }
    return layers.some((s) => s) ? { window, layers } : undefined;
  });

/** Parses and validates a Hugging Face config.json object. */
export const parseHfConfig = (json: unknown): Effect.Effect<ModelConfig, ModelConfigError> =>
  Effect.gen(function* () {
    if (typeof json !== "object" || json === null || Array.isArray(json)) {
      return yield* fail("(root)", "config.json must hold a JSON object");
    }
    const j = json as Json;
    const modelType = j.model_type as ModelType;
    if (!MODEL_TYPES.includes(modelType)) {
      return yield* fail(
        "model_type",
        `unknown architecture model_type=${JSON.stringify(j.model_type)}: expected one of ${
          MODEL_TYPES.join(", ")
        }`,
      );
    }
    const gemma = isGemma({ modelType });
    if (gemma) {
      // Gemma 2/3's MLP reads hidden_activation only (default gelu_pytorch_tanh)
      const field = "hidden_activation";
      const act = j.hidden_activation ?? "gelu_pytorch_tanh";
      if (act !== "gelu_pytorch_tanh") {
        return yield* fail(
          field,
          `${field} ${
            JSON.stringify(act)
          }: ${modelType} is implemented with "gelu_pytorch_tanh" only`,
        );
      }
    } else if (j.hidden_act !== undefined && j.hidden_act !== "silu") {
      return yield* fail("hidden_act", `hidden_act ${JSON.stringify(j.hidden_act)}: only "silu"`);
    }
    for (const [field, neutral] of UNSUPPORTED_FIELDS) {
      if (gemma && GEMMA_FIELDS.has(field)) continue;
      const v = j[field];
      if (v !== undefined && v !== null && v !== neutral && !(v === false && neutral === null)) {
        return yield* fail(
          field,
          `config.json: "${field}" = ${
            JSON.stringify(v)
          } changes the model's math and is not implemented for ${modelType}`,
        );
      }
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
    if (
      !gemma && (j.head_dim === undefined || j.head_dim === null) && hiddenSize % numHeads !== 0
    ) {
      return yield* fail(
        "head_dim",
        `hidden_size ${hiddenSize} not divisible by ${numHeads} heads`,
      );
    }
    // HF's Gemma configs default head_dim to 256, the others to hidden_size / heads
    const headDim = yield* posInt(j, "head_dim", gemma ? 256 : hiddenSize / numHeads);
    if (headDim % 2 !== 0) {
      return yield* fail("head_dim", `head_dim ${headDim} must be even (rotary)`);
    }
    const rope = j.rope_parameters as Json | undefined;
    // gemma3 (transformers v5) keys rope_parameters by layer type
    const perLayerType = modelType === "gemma3_text" && !!rope && typeof rope === "object" &&
      ("full_attention" in rope || "sliding_attention" in rope);
    const globalRope = perLayerType ? rope.full_attention as Json | undefined : rope;
    const ropeTheta = yield* posNum(
      j.rope_theta ??
        (globalRope && typeof globalRope === "object" ? globalRope.rope_theta : undefined) ??
        (modelType === "gemma3_text" ? 1e6 : 10000),
      "rope_theta",
    );
    const numLayers = yield* posInt(j, "num_hidden_layers");
    const maxPositionEmbeddings = yield* posInt(
      j,
      "max_position_embeddings",
      DEFAULT_MAX_POSITIONS[modelType],
    );
    const ropeScaling = yield* ropeScalingOf(
      j,
      modelType,
      maxPositionEmbeddings,
      perLayerType ? "rope_parameters.full_attention" : undefined,
    );
    let ropeLocalTheta: number | undefined;
    if (modelType === "gemma3_text") {
      if (perLayerType) {
        const local = (rope!.sliding_attention ?? {}) as Json;
        const type = local.rope_type ?? local.type ?? "default";
        if (type !== "default") {
          return yield* fail(
            "rope_parameters.sliding_attention.rope_type",
            `config.json: "rope_parameters.sliding_attention.rope_type" ${
              JSON.stringify(type)
            }: gemma3's sliding layers are implemented with plain RoPE only`,
          );
        }
        ropeLocalTheta = yield* posNum(
          local.rope_theta ?? 10000,
          "rope_parameters.sliding_attention.rope_theta",
        );
      } else {
        ropeLocalTheta = yield* posNum(j.rope_local_base_freq ?? 10000, "rope_local_base_freq");
      }
    }
    const softcap = (field: string) =>
      j[field] === undefined || j[field] === null
        ? Effect.succeed(undefined)
        : posNum(j[field], field);
    const queryPreAttnScalar = gemma
      ? yield* posNum(j.query_pre_attn_scalar ?? 256, "query_pre_attn_scalar")
      : undefined;
    const attnLogitSoftcap = gemma ? yield* softcap("attn_logit_softcapping") : undefined;
    const finalLogitSoftcap = gemma ? yield* softcap("final_logit_softcapping") : undefined;
    if (ropeScaling?.type === "dynamic" && headDim <= 2) {
      return yield* fail("head_dim", `dynamic rope needs head_dim > 2, got ${headDim}`);
    }
    // HF reads attention_bias for llama and qwen3, mlp_bias for llama only; qwen2 always has
    // q/k/v biases, mistral none.
    const attentionBias = modelType === "qwen2" ||
      ((modelType === "llama" || modelType === "qwen3" || gemma) &&
        (yield* bool(j.attention_bias, "attention_bias", false)));
    const mlpBias = modelType === "llama" && (yield* bool(j.mlp_bias, "mlp_bias", false));
    const sliding = yield* slidingOf(j, modelType, numLayers);
    const eos = yield* tokenIds(j.eos_token_id, "eos_token_id");
    const bos = yield* tokenIds(j.bos_token_id, "bos_token_id");
    const config: ModelConfig = {
      modelType,
      hiddenSize,
      intermediateSize: yield* posInt(j, "intermediate_size"),
      numLayers,
      numHeads,
      numKvHeads,
      headDim,
      rmsNormEps: yield* posNum(j.rms_norm_eps ?? 1e-6, "rms_norm_eps"),
      ropeTheta,
      vocabSize: yield* posInt(j, "vocab_size"),
      maxPositionEmbeddings,
      // HF's default: tied for gemma, untied for the others
      tieWordEmbeddings: yield* bool(j.tie_word_embeddings, "tie_word_embeddings", gemma),
      attentionBias,
      bosTokenId: bos[0] ?? null,
      eosTokenIds: eos,
      // optional fields only when they differ from the plain decoder
      ...(mlpBias ? { mlpBias } : {}),
      ...(modelType === "qwen3" || modelType === "gemma3_text" ? { qkNorm: true } : {}),
      ...(ropeScaling ? { ropeScaling } : {}),
      ...(sliding
        ? {
          slidingWindow: sliding.window,
          ...(sliding.layers.every((s) => s) ? {} : { slidingLayers: sliding.layers }),
        }
        : {}),
      ...(queryPreAttnScalar !== undefined ? { queryPreAttnScalar } : {}),
      ...(attnLogitSoftcap !== undefined ? { attnLogitSoftcap } : {}),
      ...(finalLogitSoftcap !== undefined ? { finalLogitSoftcap } : {}),
      ...(ropeLocalTheta !== undefined ? { ropeLocalTheta } : {}),
    };
    return config;
  });

const ARCHITECTURES: Record<ModelType, string> = {
  llama: "LlamaForCausalLM",
  qwen2: "Qwen2ForCausalLM",
  qwen3: "Qwen3ForCausalLM",
  mistral: "MistralForCausalLM",
  gemma2: "Gemma2ForCausalLM",
  gemma3_text: "Gemma3ForCausalLM",
};

const ropeScalingJson = (s: RopeScaling): Record<string, unknown> => {
  switch (s.type) {
    case "linear":
    case "dynamic":
      return { rope_type: s.type, factor: s.factor };
    case "llama3":
      return {
        rope_type: s.type,
        factor: s.factor,
        low_freq_factor: s.lowFreqFactor,
        high_freq_factor: s.highFreqFactor,
        original_max_position_embeddings: s.originalMaxPositionEmbeddings,
      };
    case "yarn": {
      const out: Record<string, unknown> = { rope_type: s.type, factor: s.factor };
      const put = (k: string, v: unknown) => v !== undefined && (out[k] = v);
      put("original_max_position_embeddings", s.originalMaxPositionEmbeddings);
      put("attention_factor", s.attentionFactor);
      put("beta_fast", s.betaFast);
      put("beta_slow", s.betaSlow);
      put("mscale", s.mscale);
      put("mscale_all_dim", s.mscaleAllDim);
      put("truncate", s.truncate);
      return out;
    }
  }
};

/** The config.json a snapshot export writes (loadable by transformers and vLLM). */
export const toHfConfig = (c: ModelConfig): Record<string, unknown> => ({
  architectures: [ARCHITECTURES[c.modelType]],
  model_type: c.modelType,
  hidden_size: c.hiddenSize,
  intermediate_size: c.intermediateSize,
  num_hidden_layers: c.numLayers,
  num_attention_heads: c.numHeads,
  num_key_value_heads: c.numKvHeads,
  head_dim: c.headDim,
  ...(isGemma(c)
    ? {
      hidden_act: "gelu_pytorch_tanh",
      hidden_activation: "gelu_pytorch_tanh",
      query_pre_attn_scalar: c.queryPreAttnScalar,
      attn_logit_softcapping: c.attnLogitSoftcap ?? null,
      final_logit_softcapping: c.finalLogitSoftcap ?? null,
      sliding_window: c.slidingWindow ?? null,
      layer_types: Array.from(
        { length: c.numLayers },
        (_, i) => isSlidingLayer(c, i) ? "sliding_attention" : "full_attention",
      ),
      attention_bias: c.attentionBias,
      ...(c.modelType === "gemma3_text" ? { rope_local_base_freq: c.ropeLocalTheta } : {}),
    }
    : { hidden_act: "silu" }),
  rms_norm_eps: c.rmsNormEps,
  rope_theta: c.ropeTheta,
  rope_scaling: c.ropeScaling ? ropeScalingJson(c.ropeScaling) : null,
  vocab_size: c.vocabSize,
  max_position_embeddings: c.maxPositionEmbeddings,
  tie_word_embeddings: c.tieWordEmbeddings,
  ...(c.modelType === "llama" || c.modelType === "qwen3"
    ? { attention_bias: c.attentionBias }
    : {}),
  ...(c.modelType === "llama" ? { mlp_bias: c.mlpBias === true } : {}),
  ...(c.modelType === "qwen2" || c.modelType === "qwen3"
    ? {
      use_sliding_window: c.slidingWindow !== undefined,
      sliding_window: c.slidingWindow ?? null,
      ...(c.slidingWindow !== undefined
        ? {
          // older transformers read only this: the first sliding layer (exact for a suffix)
          max_window_layers: Math.max(
            0,
            Array.from({ length: c.numLayers }, (_, i) => isSlidingLayer(c, i)).indexOf(true),
          ),
          layer_types: Array.from(
            { length: c.numLayers },
            (_, i) => c.slidingLayers?.[i] ?? true ? "sliding_attention" : "full_attention",
          ),
        }
        : {}),
    }
    : {}),
  ...(c.modelType === "mistral" ? { sliding_window: c.slidingWindow ?? null } : {}),
  bos_token_id: c.bosTokenId,
  eos_token_id: c.eosTokenIds.length === 1 ? c.eosTokenIds[0] : c.eosTokenIds,
  torch_dtype: "float32",
});

/** Layers of `c` that use the sliding window: true per sliding layer. */
export const isSlidingLayer = (c: ModelConfig, layer: number): boolean =>
  c.slidingWindow !== undefined && (c.slidingLayers?.[layer] ?? true);
