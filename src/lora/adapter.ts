/**
 * LoRA adapters: configuration, PEFT-style initialisation (A ~ Kaiming-uniform, B = 0), and the
 * host/device forms of the A [r, in] and B [out, r] matrices for each targeted projection.
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import type { Ops } from "../backend/ops.ts";
import type { LoraRuntime } from "../model/decoder.ts";
import type { ModelConfig } from "../model/config.ts";
import { Rng } from "../model/rng.ts";
import {
  type HostTensor,
  type Projection,
  projectionPath,
  PROJECTIONS,
  projectionShape,
} from "../model/weights.ts";

/** LoRA hyper-parameters (PEFT's names in camelCase). */
export interface LoraConfig {
  readonly r: number;
  readonly alpha: number;
  readonly dropout: number;
  readonly targetModules: readonly Projection[];
  /** rsLoRA: scale alpha/√r instead of alpha/r. */
  readonly useRslora: boolean;
}

const LoraConfigErrorBase: TaggedErrorClass<"LoraConfigError", {
  /** The PEFT config key at fault (`(root)`, `adapter_config.json`), or the adapter tensor's name. */
  readonly field: string;
  /** What is wrong, in words; it names the key or tensor and the value given. */
  readonly reason: string;
}> = taggedError(
  "LoraConfigError",
  (e) => e.reason,
);
/** An invalid LoRA configuration, or an adapter whose tensors do not fit it. */
export class LoraConfigError extends LoraConfigErrorBase {}

/** Checks a LoRA config; throws nothing, returns the first problem or null. */
export const loraConfigProblem = (c: LoraConfig): LoraConfigError | null => {
  if (!Number.isInteger(c.r) || c.r < 1) {
    return new LoraConfigError({ field: "r", reason: `r must be a positive integer, got ${c.r}` });
  }
  if (!(Number.isFinite(c.alpha) && c.alpha > 0)) {
    return new LoraConfigError({
      field: "lora_alpha",
      reason: `lora_alpha must be positive, got ${c.alpha}`,
    });
  }
  if (!(c.dropout >= 0 && c.dropout < 1)) {
    return new LoraConfigError({
      field: "lora_dropout",
      reason: `lora_dropout must be in [0, 1), got ${c.dropout}`,
    });
  }
  if (c.targetModules.length === 0) {
    return new LoraConfigError({ field: "target_modules", reason: "target_modules is empty" });
  }
  const bad = c.targetModules.find((m) => !PROJECTIONS.includes(m));
  if (bad) {
    return new LoraConfigError({
      field: "target_modules",
      reason: `unknown target module "${bad}": expected any of ${PROJECTIONS.join(", ")}`,
    });
  }
  return null;
};

/** The adapter's output scale s in W + s·B·A. */
export const loraScale = (c: LoraConfig): number =>
  c.useRslora ? c.alpha / Math.sqrt(c.r) : c.alpha / c.r;

/** Host adapter: per projection path, A [r, in] and B [out, r]. */
export interface LoraWeights {
  readonly config: LoraConfig;
  readonly modules: ReadonlyMap<string, { readonly a: HostTensor; readonly b: HostTensor }>;
}

/** Paths of every targeted projection of a model, in layer order. */
export const targetPaths = (m: ModelConfig, c: LoraConfig): { path: string; p: Projection }[] => {
  const out: { path: string; p: Projection }[] = [];
  for (let l = 0; l < m.numLayers; l++) {
    for (const p of PROJECTIONS) {
      if (c.targetModules.includes(p)) out.push({ path: projectionPath(l, p), p });
    }
  }
  return out;
};

/**
 * PEFT initialisation: A ~ U(-1/√in, 1/√in) (kaiming_uniform with a = √5), B = 0, so the
 * adapted model starts equal to the base.
 */
export const initLora = (m: ModelConfig, c: LoraConfig, seed: number): LoraWeights => {
  const rng = new Rng(seed);
  const modules = new Map<string, { a: HostTensor; b: HostTensor }>();
  for (const { path, p } of targetPaths(m, c)) {
    const [out, inp] = projectionShape(m, p);
    const bound = 1 / Math.sqrt(inp);
    const a = new Float32Array(c.r * inp);
    for (let i = 0; i < a.length; i++) a[i] = (rng.next() * 2 - 1) * bound;
    modules.set(path, {
      a: { shape: [c.r, inp], data: a },
      b: { shape: [out, c.r], data: new Float32Array(out * c.r) },
    });
  }
  return { config: c, modules };
};

/** Uploads an adapter as a LoraRuntime (device tensors owned by `ops`' scope). */
export const uploadLora = (ops: Ops, w: LoraWeights): LoraRuntime => {
  const modules = new Map<
    string,
    { a: ReturnType<Ops["fromArray"]>; b: ReturnType<Ops["fromArray"]> }
  >();
  for (const [path, { a, b }] of w.modules) {
    modules.set(path, { a: ops.fromArray(a.data, a.shape), b: ops.fromArray(b.data, b.shape) });
  }
  return { scale: loraScale(w.config), dropout: w.config.dropout, modules };
};
