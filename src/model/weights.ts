/**
 * Weight naming and shapes of a Llama/Qwen2 decoder with Hugging Face tensor names, host-side
 * weight maps, validation and seeded initialisation.
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { Effect } from "effect";
import { isGemma, type ModelConfig } from "./config.ts";
import { Rng } from "./rng.ts";
import { type HalfFormat, isNonFiniteHalf, widenHalfBits } from "../io/safetensors.ts";

/** A host tensor: f32 values and a shape. */
export interface HostTensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

/** Named host tensors (Hugging Face names). */
export type WeightMap = ReadonlyMap<string, HostTensor>;

/**
 * A host tensor kept in its checkpoint's 16-bit format (a LoRA run's frozen base): the raw
 * bf16 / f16 bits, half the memory of f32. Widen with {@link widenTensor} to compute on it.
 */
export interface HalfTensor {
  readonly shape: readonly number[];
  readonly format: HalfFormat;
  readonly bits: Uint16Array;
}

/** A base weight: f32 values, or 16-bit bits kept as stored. */
export type BaseTensor = HostTensor | HalfTensor;

/** Named base weights, some possibly 16-bit (see loadModel's `keepHalf`). */
export type BaseWeightMap = ReadonlyMap<string, BaseTensor>;

/** True for a 16-bit host tensor. */
export const isHalfTensor = (t: BaseTensor): t is HalfTensor => "bits" in t;

/** The f32 values of a base weight: a 16-bit one widened (exactly) into a fresh array. */
export const widenTensor = (t: BaseTensor): HostTensor =>
  isHalfTensor(t) ? { shape: t.shape, data: widenHalfBits(t.bits, t.format) } : t;

/** Every weight as f32 (16-bit ones widened into fresh arrays; f32 ones as they are). */
export const widenWeights = (m: BaseWeightMap): WeightMap =>
  new Map([...m].map(([n, t]) => [n, widenTensor(t)]));

/** The first NaN/Inf of a base weight, or null. */
const firstNonFiniteOf = (t: BaseTensor): { index: number; value: number } | null => {
  if (isHalfTensor(t)) {
    const index = t.bits.findIndex((h) => isNonFiniteHalf(h, t.format));
    return index < 0
      ? null
      : { index, value: widenHalfBits(t.bits.subarray(index, index + 1), t.format)[0] };
  }
  const index = t.data.findIndex((x) => !Number.isFinite(x));
  return index < 0 ? null : { index, value: t.data[index] };
};

/** Linear projections of a decoder layer that LoRA can target. */
export type Projection =
  | "q_proj"
  | "k_proj"
  | "v_proj"
  | "o_proj"
  | "gate_proj"
  | "up_proj"
  | "down_proj";

/** All projections, in layer order. */
export const PROJECTIONS: readonly Projection[] = [
  "q_proj",
  "k_proj",
  "v_proj",
  "o_proj",
  "gate_proj",
  "up_proj",
  "down_proj",
];

/** HF name of a layer's projection weight (without ".weight"). */
export const projectionPath = (layer: number, p: Projection): string =>
  `model.layers.${layer}.${
    p === "gate_proj" || p === "up_proj" || p === "down_proj" ? "mlp" : "self_attn"
  }.${p}`;

/** [out, in] of a projection. */
export const projectionShape = (c: ModelConfig, p: Projection): [number, number] => {
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  switch (p) {
    case "q_proj":
      return [q, c.hiddenSize];
    case "k_proj":
    case "v_proj":
      return [kv, c.hiddenSize];
    case "o_proj":
      return [c.hiddenSize, q];
    case "gate_proj":
    case "up_proj":
      return [c.intermediateSize, c.hiddenSize];
    case "down_proj":
      return [c.hiddenSize, c.intermediateSize];
  }
};

/**
 * Whether a projection carries a bias, as HF builds the module: qwen2 biases q/k/v; llama and
 * qwen3 with attention_bias bias q/k/v and o; llama with mlp_bias biases gate/up/down.
 */
export const projectionHasBias = (c: ModelConfig, p: Projection): boolean => {
  if (p === "gate_proj" || p === "up_proj" || p === "down_proj") return c.mlpBias === true;
  if (p === "o_proj") return c.attentionBias && c.modelType !== "qwen2";
  return c.attentionBias;
};

/** HF names of a layer's per-head query/key RMSNorm weights (qwen3). */
export const qkNormPaths = (layer: number): { q: string; k: string } => ({
  q: `model.layers.${layer}.self_attn.q_norm.weight`,
  k: `model.layers.${layer}.self_attn.k_norm.weight`,
});

/** Every tensor a checkpoint of this config must hold, with its shape. */
export const weightSpecs = (c: ModelConfig): { name: string; shape: number[] }[] => {
  const specs: { name: string; shape: number[] }[] = [
    { name: "model.embed_tokens.weight", shape: [c.vocabSize, c.hiddenSize] },
  ];
  for (let i = 0; i < c.numLayers; i++) {
    specs.push({ name: `model.layers.${i}.input_layernorm.weight`, shape: [c.hiddenSize] });
    for (const p of PROJECTIONS) {
      specs.push({ name: `${projectionPath(i, p)}.weight`, shape: projectionShape(c, p) });
      if (projectionHasBias(c, p)) {
        specs.push({ name: `${projectionPath(i, p)}.bias`, shape: [projectionShape(c, p)[0]] });
      }
    }
    if (c.qkNorm) {
      const n = qkNormPaths(i);
      specs.push({ name: n.q, shape: [c.headDim] }, { name: n.k, shape: [c.headDim] });
    }
    specs.push({
      name: `model.layers.${i}.post_attention_layernorm.weight`,
      shape: [c.hiddenSize],
    });
    if (isGemma(c)) {
      for (const n of ["pre_feedforward_layernorm", "post_feedforward_layernorm"]) {
        specs.push({ name: `model.layers.${i}.${n}.weight`, shape: [c.hiddenSize] });
      }
    }
  }
  specs.push({ name: "model.norm.weight", shape: [c.hiddenSize] });
  if (!c.tieWordEmbeddings) {
    specs.push({ name: "lm_head.weight", shape: [c.vocabSize, c.hiddenSize] });
  }
  return specs;
};

const WeightsErrorBase: TaggedErrorClass<"WeightsError", {
  /** The Hugging Face name of the tensor at fault. */
  readonly tensor: string;
  /** What is wrong with it, in words (missing, shape, value). */
  readonly reason: string;
}> = taggedError(
  "WeightsError",
  (e) => `tensor ${e.tensor} ${e.reason}`,
);
/** A checkpoint that does not fit its config: missing tensor, wrong shape, non-finite value. */
export class WeightsError extends WeightsErrorBase {}

/**
 * Checks that `tensors` holds exactly the config's weights with the right shapes and finite
 * values. A tensor the model would not consume (a bias the config does not declare, a norm of
 * another architecture) is an error naming it: dropping it would change the model's output.
 * Returns the validated map.
 */
export const validateWeights = <T extends BaseTensor = HostTensor>(
  c: ModelConfig,
  tensors: ReadonlyMap<string, T>,
): Effect.Effect<ReadonlyMap<string, T>, WeightsError> =>
  Effect.gen(function* () {
    const out = new Map<string, T>();
    for (const { name, shape } of weightSpecs(c)) {
      const t = tensors.get(name);
      if (!t) {
        return yield* Effect.fail(
          new WeightsError({ tensor: name, reason: "is missing" }),
        );
      }
      if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
        return yield* Effect.fail(
          new WeightsError({
            tensor: name,
            reason: `has shape [${t.shape}], config expects [${shape}]`,
          }),
        );
      }
      const bad = firstNonFiniteOf(t);
      if (bad) {
        return yield* Effect.fail(
          new WeightsError({ tensor: name, reason: `holds ${bad.value} at index ${bad.index}` }),
        );
      }
      out.set(name, t);
    }
    for (const name of tensors.keys()) {
      if (!out.has(name)) {
        return yield* Effect.fail(
          new WeightsError({
            tensor: name,
            reason:
              `is not used by a ${c.modelType} decoder with this config.json (an unread bias, norm or layer would change the output)`,
          }),
        );
      }
    }
    return out;
  });

/**
 * Seeded initialisation (normal(0, 0.02) matrices, unit norms: weight 1, or 0 for Gemma's
 * (1 + w) norms), for pretraining and tests.
 */
export const initWeights = (c: ModelConfig, seed: number, std = 0.02): WeightMap => {
  const rng = new Rng(seed);
  const out = new Map<string, HostTensor>();
  for (const { name, shape } of weightSpecs(c)) {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    if (name.endsWith("norm.weight")) data.fill(isGemma(c) ? 0 : 1);
    else if (!name.endsWith(".bias")) { for (let i = 0; i < n; i++) data[i] = rng.normal() * std; }
    out.set(name, { shape, data });
  }
  return out;
};
