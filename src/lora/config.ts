/**
 * The LoRA options of a training run as annotated fields (TRL's ModelConfig names: lora_r,
 * lora_alpha, lora_dropout, lora_target_modules, use_rslora), and their conversion to the
 * adapter's {@link LoraConfig}.
 * @module
 */
import { Schema } from "effect";
import { finite, flag, integer, option, type OptionFields } from "../base/options.ts";
import { type Projection, PROJECTIONS } from "../model/weights.ts";
import type { LoraConfig } from "./adapter.ts";

/** Decoded LoRA options. */
export interface LoraOptions {
  /** Adapter rank r. */
  readonly loraR: number;
  /** Scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA). */
  readonly loraAlpha: number;
  readonly loraDropout: number;
  /** The projections that get an adapter. */
  readonly targetModules: readonly Projection[];
  readonly useRslora: boolean;
}

/** The LoRA option fields. */
export const loraOptionFields: OptionFields = {
  loraR: integer({ min: 1 }, { default: 8, description: "LoRA rank r" }),
  loraAlpha: finite({ min: 0, exclusiveMin: true }, {
    default: 16,
    description: "LoRA alpha: updates are scaled by alpha / r",
  }),
  loraDropout: finite({ min: 0, max: 1, exclusiveMax: true }, {
    default: 0,
    description: "Dropout on the LoRA input",
  }),
  targetModules: option(Schema.Array(Schema.Literals(PROJECTIONS)), {
    default: [...PROJECTIONS],
    description: "Projections that get an adapter",
    allowed: `a list of ${PROJECTIONS.join(", ")}`,
  }),
  useRslora: flag({
    default: false,
    description: "rsLoRA: scale by alpha / sqrt(r) instead of alpha / r",
  }),
};

/** TRL's other spellings of LoRA options. */
export const loraOptionAliases: Readonly<Record<string, string>> = {
  lora_target_modules: "targetModules",
  loraTargetModules: "targetModules",
};

/** The adapter configuration of decoded options. */
export const loraConfigOf = (o: LoraOptions): LoraConfig => ({
  r: o.loraR,
  alpha: o.loraAlpha,
  dropout: o.loraDropout,
  targetModules: o.targetModules,
  useRslora: o.useRslora,
});
