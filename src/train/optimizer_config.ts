/**
 * The optimizer options of a training run as annotated fields (transformers' TrainingArguments
 * names: weight_decay, max_grad_norm, adam_beta1, adam_beta2, adam_epsilon,
 * gradient_checkpointing; the learning rate is a GRPO option, as in TRL's GRPOConfig), and their
 * conversion to the Policy's OptimizerConfig.
 * @module
 */
import { finite, flag, type OptionFields } from "../base/options.ts";
import type { OptimizerConfig } from "./policy.ts";

/** Decoded optimizer options. */
export interface OptimizerOptions {
  readonly weightDecay: number;
  /** Global gradient-norm clip; 0 disables. */
  readonly maxGradNorm: number;
  readonly adamBeta1: number;
  readonly adamBeta2: number;
  readonly adamEpsilon: number;
  /** Recompute activations in the backward pass (TRL: gradient_checkpointing). */
  readonly gradientCheckpointing: boolean;
}

/** The optimizer option fields (transformers' defaults). */
export const optimizerOptionFields: OptionFields = {
  weightDecay: finite({ min: 0 }, { default: 0, description: "AdamW weight decay" }),
  maxGradNorm: finite({ min: 0 }, {
    default: 1,
    description: "Global gradient-norm clip",
    note: "0 = no clipping",
  }),
  adamBeta1: finite({ min: 0, max: 1, exclusiveMax: true }, {
    default: 0.9,
    description: "AdamW beta1",
  }),
  adamBeta2: finite({ min: 0, max: 1, exclusiveMax: true }, {
    default: 0.999,
    description: "AdamW beta2",
  }),
  adamEpsilon: finite({ min: 0, exclusiveMin: true }, {
    default: 1e-8,
    description: "AdamW epsilon",
  }),
  gradientCheckpointing: flag({
    default: false,
    description: "Recompute each layer's activations in the backward pass instead of keeping " +
      "them (activation memory of one layer, same gradients, one more forward pass of compute)",
  }),
};

/** The Policy's optimizer settings of decoded options and a learning rate. */
export const optimizerConfigOf = (o: OptimizerOptions, learningRate: number): OptimizerConfig => ({
  learningRate,
  beta1: o.adamBeta1,
  beta2: o.adamBeta2,
  eps: o.adamEpsilon,
  weightDecay: o.weightDecay,
  maxGradNorm: o.maxGradNorm,
  gradientCheckpointing: o.gradientCheckpointing,
});
