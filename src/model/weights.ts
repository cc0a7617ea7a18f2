/**
 * Weight naming and shapes of a Llama/Qwen2 decoder with Hugging Face tensor names, host-side
 * weight maps, validation and seeded initialisation.
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { Effect } from "effect";
import type { ModelConfig } from "./config.ts";
import { Rng } from "./rng.ts";

/** A host tensor: f32 values and a shape. */
export interface HostTensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

/** Named host tensors (Hugging Face names). */
export type WeightMap = ReadonlyMap<string, HostTensor>;

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

/** Every tensor a checkpoint of this config must hold, with its shape. */
export const weightSpecs = (c: ModelConfig): { name: string; shape: number[] }[] => {
  const specs: { name: string; shape: number[] }[] = [
    { name: "model.embed_tokens.weight", shape: [c.vocabSize, c.hiddenSize] },
  ];
  for (let i = 0; i < c.numLayers; i++) {
    specs.push({ name: `model.layers.${i}.input_layernorm.weight`, shape: [c.hiddenSize] });
    for (const p of PROJECTIONS) {
      specs.push({ name: `${projectionPath(i, p)}.weight`, shape: projectionShape(c, p) });
      if (c.attentionBias && (p === "q_proj" || p === "k_proj" || p === "v_proj")) {
        specs.push({ name: `${projectionPath(i, p)}.bias`, shape: [projectionShape(c, p)[0]] });
      }
    }
    specs.push({
      name: `model.layers.${i}.post_attention_layernorm.weight`,
      shape: [c.hiddenSize],
    });
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
 * values (extra tensors such as rotary caches are ignored). Returns the validated map.
 */
export const validateWeights = (
  c: ModelConfig,
  tensors: ReadonlyMap<string, HostTensor>,
): Effect.Effect<WeightMap, WeightsError> =>
  Effect.gen(function* () {
    const out = new Map<string, HostTensor>();
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
      const bad = t.data.findIndex((x) => !Number.isFinite(x));
      if (bad >= 0) {
        return yield* Effect.fail(
          new WeightsError({ tensor: name, reason: `holds ${t.data[bad]} at index ${bad}` }),
        );
      }
      out.set(name, t);
    }
    return out;
  });

/** Seeded initialisation (normal(0, 0.02) matrices, unit norms), for pretraining and tests. */
export const initWeights = (c: ModelConfig, seed: number, std = 0.02): WeightMap => {
  const rng = new Rng(seed);
  const out = new Map<string, HostTensor>();
  for (const { name, shape } of weightSpecs(c)) {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    if (name.endsWith("norm.weight")) data.fill(1);
    else if (!name.endsWith(".bias")) { for (let i = 0; i < n; i++) data[i] = rng.normal() * std; }
    out.set(name, { shape, data });
  }
  return out;
};
