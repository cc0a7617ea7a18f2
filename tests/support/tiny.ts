/** Tiny model configurations and helpers shared by the model, LoRA and snapshot tests. */
import type { ModelConfig } from "../../src/model/config.ts";
import type { OptimizerConfig } from "../../src/train/policy.ts";

/** A tiny decoder; `qwen` adds q/k/v biases, `tied` ties lm_head to the embeddings. */
export const tinyConfig = (over: Partial<ModelConfig> = {}): ModelConfig => ({
  modelType: "llama",
  hiddenSize: 8,
  intermediateSize: 12,
  numLayers: 2,
  numHeads: 2,
  numKvHeads: 1,
  headDim: 4,
  rmsNormEps: 1e-5,
  ropeTheta: 10000,
  vocabSize: 11,
  maxPositionEmbeddings: 64,
  tieWordEmbeddings: false,
  attentionBias: false,
  bosTokenId: null,
  eosTokenIds: [2],
  ...over,
});

/** AdamW settings of the tests that train a step or two (no weight decay, clipping at 1). */
export const testOptimizer: OptimizerConfig = {
  learningRate: 1e-3,
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
  weightDecay: 0,
  maxGradNorm: 1,
};
