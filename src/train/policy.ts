/**
 * The live, trainable policy: frozen base weights on the device, the trainable parameters (LoRA
 * A/B, or a full copy of the weights), AdamW state, and the version counter. A training step
 * runs forward → token log-probs → (host) loss → backward → clip → AdamW with three host waits.
 * Snapshots are taken out of place (see src/snapshot/snapshot.ts); nothing here merges weights.
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { Effect, type Scope } from "effect";
import type { BackendShape } from "../backend/backend.ts";
import type { BackendError, Ops } from "../backend/ops.ts";
import type { Tensor } from "../backend/tensor.ts";
import type { ModelConfig } from "../model/config.ts";
import {
  backward,
  type DeviceModel,
  forward,
  type GradMode,
  loraGradKey,
  type LoraRuntime,
  uploadModel,
} from "../model/decoder.ts";
import type { HostTensor, WeightMap } from "../model/weights.ts";
import { initLora, type LoraConfig, type LoraWeights, uploadLora } from "../lora/adapter.ts";
import { Rng } from "../model/rng.ts";
import { copySnapshot, foldSnapshot, type Snapshot } from "../snapshot/snapshot.ts";

/** AdamW and clipping settings (PyTorch/TRL names in camelCase). */
export interface OptimizerConfig {
  readonly learningRate: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  /** Global gradient-norm clip; 0 disables. */
  readonly maxGradNorm: number;
}

const NonFiniteStepErrorBase: TaggedErrorClass<"NonFiniteStepError", {
  /** The optimizer step (for weights: the snapshot version). */
  readonly step: number;
  /** What went non-finite: `logp`, `loss`, `gradient`, `gradient norm` or `weights`. */
  readonly quantity: string;
  /** Where and what: the token, the tensor, or the value. */
  readonly detail: string;
}> = taggedError(
  "NonFiniteStepError",
  (e) => `step ${e.step}: non-finite ${e.quantity} (${e.detail})`,
);
/** NaN or Inf in log-probs, loss or gradients: the step is not applied. */
export class NonFiniteStepError extends NonFiniteStepErrorBase {}

const StateMismatchErrorBase: TaggedErrorClass<"StateMismatchError", {
  /** The checkpoint tensor, as `group/key` (group: param, m or v). */
  readonly tensor: string;
  /** The tensor's shape in the checkpoint, or null when the checkpoint lacks it. */
  readonly found: readonly number[] | null;
  /** The shape the policy expects. */
  readonly expected: readonly number[];
}> = taggedError(
  "StateMismatchError",
  (e) => {
    return e.found === null
      ? `checkpoint lacks ${e.tensor} (was it written with other LoRA settings or mode?)`
      : `checkpoint tensor ${e.tensor} has shape [${e.found}], the policy expects [${e.expected}]`;
  },
);
/** A checkpoint whose tensors do not fit the policy (other LoRA rank, targets or mode). */
export class StateMismatchError extends StateMismatchErrorBase {}

/** One sequence to train on: prompt tokens (with BOS when the model uses one) and completion. */
export interface TrainSequence {
  readonly prompt: readonly number[];
  readonly completion: readonly number[];
}

/** Per-sequence log-probs (and entropies) of the completion tokens. */
export interface SequenceLogProbs {
  readonly logp: Float64Array[];
  readonly entropy: Float64Array[];
}

/** The host side of a step: loss and d loss / d logp per sequence from the log-probs. */
export type LossFn<E> = (lp: SequenceLogProbs) => Effect.Effect<
  { loss: number; dLogp: readonly Float64Array[]; metrics: Record<string, number> },
  E
>;

/** What a step reports. */
export interface StepStats {
  readonly loss: number;
  readonly gradNorm: number;
  readonly tokens: number;
  readonly metrics: Record<string, number>;
}

/** Serializable training state (resume). */
export interface PolicyState {
  readonly version: number;
  readonly params: Map<string, HostTensor>;
  readonly m: Map<string, HostTensor>;
  readonly v: Map<string, HostTensor>;
  readonly rng: number[];
}

/** Options of a policy. */
export interface PolicyOptions {
  readonly mode: GradMode;
  /** Required for mode "lora". */
  readonly lora?: LoraConfig;
  readonly seed: number;
  readonly optimizer: OptimizerConfig;
}

/** Right-padded batch layout: ids, rows whose logits predict completion tokens, targets. */
export const layoutBatch = (seqs: readonly TrainSequence[], padId: number) => {
  const T = Math.max(1, ...seqs.map((s) => s.prompt.length + s.completion.length));
  const ids = new Int32Array(seqs.length * T).fill(padId);
  const rows: number[] = [];
  const targets: number[] = [];
  seqs.forEach((s, b) => {
    ids.set(s.prompt, b * T);
    ids.set(s.completion, b * T + s.prompt.length);
    for (let j = 0; j < s.completion.length; j++) {
      rows.push(b * T + s.prompt.length - 1 + j);
      targets.push(s.completion[j]);
    }
  });
  return { ids, T, rows, targets };
};

/** The trainable policy (see module doc). Create with `Policy.make` inside a long-lived scope. */
export class Policy {
  private constructor(
    readonly backend: BackendShape,
    readonly config: ModelConfig,
    readonly options: PolicyOptions,
    /** Frozen host copy of the base (snapshots share its untouched tensors). */
    readonly base: WeightMap,
    /** Frozen base on the device; never written. */
    readonly baseDevice: DeviceModel,
    /** The model the policy runs: the base itself (LoRA) or a trainable copy (full). */
    private readonly live: DeviceModel,
    private readonly lora: LoraRuntime | null,
    /** Trainable tensors by gradient key, with AdamW moments. */
    private readonly params: Map<string, { p: Tensor; m: Tensor; v: Tensor }>,
    private rngState: Rng,
  ) {}

  /** The policy's random stream (dropout); restored on resume. */
  get rng(): Rng {
    return this.rngState;
  }

  /** Optimizer steps taken; snapshot k is taken after k steps. */
  version = 0;

  /** Uploads base and trainable state in the current scope. */
  static readonly make: (
    backend: BackendShape,
    config: ModelConfig,
    base: WeightMap,
    options: PolicyOptions,
    initialLora?: LoraWeights,
  ) => Effect.Effect<Policy, never, Scope.Scope> = Effect.fn("Policy.make")(
    function* (
      backend: BackendShape,
      config: ModelConfig,
      base: WeightMap,
      options: PolicyOptions,
      initialLora?: LoraWeights,
    ) {
      const ops = yield* backend.ops;
      const baseDevice = uploadModel(ops, config, base);
      const params = new Map<string, { p: Tensor; m: Tensor; v: Tensor }>();
      const track = (key: string, p: Tensor) =>
        params.set(key, { p, m: ops.zeros(p.shape), v: ops.zeros(p.shape) });
      let live = baseDevice;
      let lora: LoraRuntime | null = null;
      if (options.mode === "lora") {
        if (!options.lora) throw new Error("mode lora needs a LoRA config");
        lora = uploadLora(ops, initialLora ?? initLora(config, options.lora, options.seed));
        for (const [path, m] of lora.modules) {
          track(loraGradKey(path, "A"), m.a);
          track(loraGradKey(path, "B"), m.b);
        }
      } else {
        const w = new Map<string, Tensor>();
        for (const [name, t] of baseDevice.weights) w.set(name, ops.copy(t));
        live = { config, weights: w };
        for (const [name, t] of w) track(name, t);
      }
      return new Policy(
        backend,
        config,
        options,
        base,
        baseDevice,
        live,
        lora,
        params,
        new Rng(options.seed + 1),
      );
    },
  );

  /** Trainable parameter count. */
  get trainableParameters(): number {
    let n = 0;
    for (const { p } of this.params.values()) n += p.size;
    return n;
  }

  private logProbsOn(
    ops: Ops,
    seqs: readonly TrainSequence[],
    temperature: number,
    model: DeviceModel,
    lora: LoraRuntime | null,
    train: boolean,
  ) {
    const { ids, T, rows, targets } = layoutBatch(seqs, 0);
    const out = forward(ops, model, { ids, batch: seqs.length, seqLen: T, logitRows: rows }, {
      lora,
      train,
      rng: this.rng,
    });
    const tgt = ops.fromArray(targets, [targets.length], "i32");
    const lp = ops.logProbs(out.logits, tgt, temperature);
    return { ...out, ...lp, tgt, rows };
  }

  private split(seqs: readonly TrainSequence[], flat: ArrayLike<number>): Float64Array[] {
    let o = 0;
    return seqs.map((s) => {
      const a = Float64Array.from({ length: s.completion.length }, (_, j) => flat[o + j]);
      o += s.completion.length;
      return a;
    });
  }

  /**
   * Log-probs of completion tokens without gradients: of the policy, or of the reference
   * (`reference: true`: adapters disabled for LoRA, the frozen base for full fine-tuning).
   */
  readonly logProbs: (
    seqs: readonly TrainSequence[],
    temperature: number,
    reference?: boolean,
  ) => Effect.Effect<Float64Array[], BackendError> = Effect.fn("Policy.logProbs")(
    { self: this },
    function* (
      this: Policy,
      seqs: readonly TrainSequence[],
      temperature: number,
      reference = false,
    ) {
      const ops = yield* this.backend.ops;
      const r = reference
        ? this.logProbsOn(ops, seqs, temperature, this.baseDevice, null, false)
        : this.logProbsOn(ops, seqs, temperature, this.live, this.lora, false);
      const [lp] = yield* ops.read([r.logp]);
      return this.split(seqs, lp);
    },
    Effect.scoped,
  );

  /** One optimizer step; NaN/Inf anywhere fails with NonFiniteStepError before any weight changes. */
  readonly step: <E>(
    seqs: readonly TrainSequence[],
    temperature: number,
    lossFn: LossFn<E>,
  ) => Effect.Effect<StepStats, E | BackendError | NonFiniteStepError> = Effect.fn("Policy.step")(
    { self: this },
    function* <E>(
      this: Policy,
      seqs: readonly TrainSequence[],
      temperature: number,
      lossFn: LossFn<E>,
    ) {
      const stepNo = this.version + 1;
      const nonFinite = (quantity: string, detail: string) =>
        new NonFiniteStepError({ step: stepNo, quantity, detail });
      const ops = yield* this.backend.ops;
      const r = this.logProbsOn(ops, seqs, temperature, this.live, this.lora, true);
      const ent = ops.entropy(r.logits, temperature);
      const [lpFlat, entFlat] = yield* ops.read([r.logp, ent]);
      const bad = lpFlat.findIndex((x) => !Number.isFinite(x));
      if (bad >= 0) return yield* Effect.fail(nonFinite("logp", `token ${bad}: ${lpFlat[bad]}`));
      const res = yield* lossFn({
        logp: this.split(seqs, lpFlat),
        entropy: this.split(seqs, entFlat),
      });
      if (!Number.isFinite(res.loss)) {
        return yield* Effect.fail(nonFinite("loss", String(res.loss)));
      }
      const flat = new Float32Array(lpFlat.length);
      let o = 0;
      for (const d of res.dLogp) {
        flat.set(d, o);
        o += d.length;
      }
      const dLogits = ops.logProbsBackward(
        ops.fromArray(flat, [flat.length]),
        r.logits,
        r.tgt,
        r.lse,
        temperature,
      );
      const grads = backward(ops, r.tape!, dLogits, this.options.mode);
      const keys = [...this.params.keys()];
      const sq = yield* ops.read(keys.map((k) => ops.sumSquares(grads.get(k) ?? ops.zeros([1]))));
      let total = 0;
      for (let i = 0; i < keys.length; i++) {
        if (!Number.isFinite(sq[i][0])) return yield* Effect.fail(nonFinite("gradient", keys[i]));
        total += sq[i][0];
      }
      const gradNorm = Math.sqrt(total);
      if (!Number.isFinite(gradNorm)) {
        return yield* Effect.fail(nonFinite("gradient norm", String(gradNorm)));
      }
      const o2 = this.options.optimizer;
      const clip = o2.maxGradNorm > 0 ? Math.min(1, o2.maxGradNorm / (gradNorm + 1e-6)) : 1;
      for (const k of keys) {
        const g = grads.get(k);
        if (!g) continue;
        const s = this.params.get(k)!;
        ops.adamw(s.p, g, s.m, s.v, {
          lr: o2.learningRate,
          beta1: o2.beta1,
          beta2: o2.beta2,
          eps: o2.eps,
          weightDecay: o2.weightDecay,
          step: stepNo,
          gradScale: clip,
        });
      }
      ops.flush();
      this.version = stepNo;
      return { loss: res.loss, gradNorm, tokens: flat.length, metrics: res.metrics };
    },
    Effect.scoped,
  );

  /**
   * An immutable snapshot of the current weights (folded out of place, or copied). Weights that
   * an update drove to NaN/Inf fail here, so they are never pushed or checkpointed.
   */
  readonly snapshot: () => Effect.Effect<Snapshot, BackendError | NonFiniteStepError> = Effect.fn(
    "Policy.snapshot",
  )({ self: this }, function* (this: Policy) {
    const snap = this.lora
      ? yield* foldSnapshot(
        this.backend,
        this.version,
        this.base,
        this.baseDevice,
        this.lora,
        this.options.lora!,
      )
      : yield* copySnapshot(this.backend, this.version, this.live);
    const bad = snap.firstNonFinite();
    if (bad) {
      return yield* Effect.fail(
        new NonFiniteStepError({
          step: snap.version,
          quantity: "weights",
          detail: `${bad.name}[${bad.index}] = ${bad.value}`,
        }),
      );
    }
    return snap;
  });

  /** Host copies of parameters and optimizer moments (one wait), for checkpoints. */
  readonly exportState: () => Effect.Effect<PolicyState, BackendError> = Effect.fn(
    "Policy.exportState",
  )(
    { self: this },
    function* (this: Policy) {
      const ops = yield* this.backend.ops;
      const keys = [...this.params.keys()];
      const all = yield* ops.read(keys.flatMap((k) => {
        const s = this.params.get(k)!;
        return [s.p, s.m, s.v];
      }));
      const pick = (j: number) =>
        new Map(
          keys.map((
            k,
            i,
          ) => [k, {
            shape: [...this.params.get(k)!.p.shape],
            data: Float32Array.from(all[3 * i + j]),
          }]),
        );
      return {
        version: this.version,
        params: pick(0),
        m: pick(1),
        v: pick(2),
        rng: this.rng.state(),
      };
    },
    Effect.scoped,
  );

  /** Restores parameters, moments, version and RNG from a checkpoint (shapes must match). */
  readonly importState: (
    state: PolicyState,
  ) => Effect.Effect<void, BackendError | StateMismatchError> = Effect.fn("Policy.importState")(
    { self: this },
    function* (this: Policy, state: PolicyState) {
      // Check everything before writing anything: a mismatched checkpoint changes no weight.
      for (const [k, s] of this.params) {
        for (
          const [group, m] of [["param", state.params], ["m", state.m], ["v", state.v]] as const
        ) {
          const t = m.get(k);
          if (
            !t || t.shape.length !== s.p.shape.length || t.shape.some((d, i) => d !== s.p.shape[i])
          ) {
            return yield* Effect.fail(
              new StateMismatchError({
                tensor: `${group}/${k}`,
                found: t ? t.shape : null,
                expected: s.p.shape,
              }),
            );
          }
        }
      }
      const ops = yield* this.backend.ops;
      for (const [k, s] of this.params) {
        const get = (m: Map<string, HostTensor>) => ops.fromArray(m.get(k)!.data, s.p.shape);
        // bit-exact copies into the long-lived tensors (one row covering the whole tensor)
        const assign = (dst: Tensor, src: Tensor) =>
          ops.scatterRowsInPlace(ops.reshape(dst, [1, dst.size]), ops.reshape(src, [1, src.size]), [
            0,
          ]);
        assign(s.p, get(state.params));
        assign(s.m, get(state.m));
        assign(s.v, get(state.v));
      }
      yield* ops.read([ops.zeros([1])]);
      this.version = state.version;
      this.rngState = new Rng(state.rng);
    },
    Effect.scoped,
  );
}
