/**
 * The live, trainable policy: frozen base weights on the device, the trainable parameters (LoRA
 * A/B, or a full copy of the weights), AdamW state, and the version counter. A training step
 * runs forward → token log-probs → (host) loss → backward → clip → AdamW with two host waits.
 * Snapshots are taken out of place (see src/snapshot/snapshot.ts): a LoRA snapshot copies only A
 * and B and refers to the policy's FrozenBase; nothing here merges weights.
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { Effect, Exit, Scope } from "effect";
import type { BackendShape } from "../backend/backend.ts";
import type { BackendError, Ops } from "../backend/ops.ts";
import type { Tensor } from "../backend/tensor.ts";
import type { ModelConfig } from "../model/config.ts";
import {
  backwardLogProbs,
  type DeviceModel,
  forwardLogProbs,
  type GradMode,
  loraGradKey,
  type LoraRuntime,
} from "../model/decoder.ts";
import { type BaseWeightMap, type HostTensor, widenWeights } from "../model/weights.ts";
import { initLora, type LoraConfig, type LoraWeights, uploadLora } from "../lora/adapter.ts";
import { Rng } from "../model/rng.ts";
import {
  copySnapshot,
  firstNonFiniteWeight,
  FrozenBase,
  loraSnapshot,
  type Snapshot,
} from "../snapshot/snapshot.ts";
import { isDecayed } from "./weight_decay.ts";

/** Training-step settings: AdamW, clipping, gradient checkpointing (PyTorch/TRL names in camelCase). */
export interface OptimizerConfig {
  readonly learningRate: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  /** Global gradient-norm clip; 0 disables. */
  readonly maxGradNorm: number;
  /**
   * Recompute each layer's activations in the backward pass instead of keeping them (TRL's
   * gradient_checkpointing): activation memory of one layer, same gradients bit for bit, one
   * more forward pass of compute. Default false.
   */
  readonly gradientCheckpointing?: boolean;
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

/**
 * Supervised fine-tuning's loss: minus the mean log-prob of every completion token, and its
 * gradient (-1/n for each token).
 */
export const meanNllLoss: LossFn<never> = (lp) => {
  const n = lp.logp.reduce((a, x) => a + x.length, 0);
  const loss = -lp.logp.reduce((a, x) => a + x.reduce((u, v) => u + v, 0), 0) / n;
  return Effect.succeed({
    loss,
    dLogp: lp.logp.map((x) => new Float64Array(x.length).fill(-1 / n)),
    metrics: {},
  });
};

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
    /** The frozen base (host copy and digest); LoRA snapshots refer to it. */
    readonly base: FrozenBase,
    /** The frozen base on the device (its resident upload, held by the policy); never written. */
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

  /** The scope holding the latest LoRA snapshot's device copy (until the next snapshot). */
  private latest: Scope.Closeable | null = null;

  /**
   * Uploads base and trainable state in the current scope. `base` is a FrozenBase to share, or
   * host weights to freeze: taken over without a copy (FrozenBase.adopt; the caller must not
   * write to those arrays afterwards) and hashed once, here. 16-bit base weights (LoRA from a
   * BF16 / F16 checkpoint, see loadFrozenBase) stay 16-bit on the host and the device; LoRA A/B,
   * their gradients and AdamW state are f32. Full fine-tuning trains f32 master weights: given
   * 16-bit host weights it widens them first, and its live copy of a 16-bit FrozenBase is widened.
   */
  static readonly make: (
    backend: BackendShape,
    config: ModelConfig,
    base: BaseWeightMap | FrozenBase,
    options: PolicyOptions,
    initialLora?: LoraWeights,
  ) => Effect.Effect<Policy, never, Scope.Scope> = Effect.fn("Policy.make")(
    function* (
      backend: BackendShape,
      config: ModelConfig,
      base: BaseWeightMap | FrozenBase,
      options: PolicyOptions,
      initialLora?: LoraWeights,
    ) {
      const ops = yield* backend.ops;
      // host weights are taken over, not copied (FrozenBase.adopt): one model's worth less
      const frozen = base instanceof FrozenBase
        ? base
        : yield* FrozenBase.adopt(config, options.mode === "full" ? widenWeights(base) : base);
      const baseDevice = yield* frozen.device(backend);
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
        // f32 master weights (a 16-bit base widened), never the resident base itself
        for (const [name, t] of baseDevice.weights) w.set(name, ops.widen(t));
        live = { config, weights: w };
        for (const [name, t] of w) track(name, t);
      }
      const policy = new Policy(
        backend,
        config,
        options,
        frozen,
        baseDevice,
        live,
        lora,
        params,
        new Rng(options.seed + 1),
      );
      yield* Effect.addFinalizer(() => policy.releaseLatest(null));
      return policy;
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
    // Streamed over vocabulary chunks: no [tokens, vocab] logits beyond one chunk are held.
    const input = { ids, batch: seqs.length, seqLen: T, logitRows: rows };
    const out = forwardLogProbs(ops, model, input, targets, temperature, {
      lora,
      train,
      rng: this.rng,
      entropy: train,
      gradientCheckpointing: train && !!this.options.optimizer.gradientCheckpointing,
    });
    return { ...out, rows };
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
      const [lpFlat, entFlat] = yield* ops.read([r.logp, r.entropy!]);
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
      const grads = backwardLogProbs(
        ops,
        r.tape!,
        ops.fromArray(flat, [flat.length]),
        this.options.mode,
      );
      const keys = [...this.params.keys()];
      const [sq] = yield* ops.read([
        ops.sumSquaresEach(keys.map((k) => grads.get(k) ?? ops.zeros([1]))),
      ]);
      let total = 0;
      for (let i = 0; i < keys.length; i++) {
        if (!Number.isFinite(sq[i])) return yield* Effect.fail(nonFinite("gradient", keys[i]));
        total += sq[i];
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
          weightDecay: isDecayed(k) ? o2.weightDecay : 0,
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

  /** Replaces the held latest snapshot scope, closing the previous one. */
  private releaseLatest(next: Scope.Closeable | null): Effect.Effect<void> {
    return Effect.suspend(() => {
      const old = this.latest;
      this.latest = next;
      return old ? Scope.close(old, Exit.void) : Effect.void;
    });
  }

  /**
   * An immutable snapshot of the current weights: LoRA copies A and B (device and host, one
   * wait) and refers to the frozen base; full fine-tuning copies every weight to the host. The
   * policy holds a LoRA snapshot's device copy until its next snapshot (or its scope's end);
   * consumers that keep it longer take their own hold. Weights that an update drove to NaN/Inf
   * fail here, so they are never pushed or checkpointed.
   */
  readonly snapshot: () => Effect.Effect<Snapshot, BackendError | NonFiniteStepError> = Effect.fn(
    "Policy.snapshot",
  )({ self: this }, function* (this: Policy) {
    if (!this.lora) {
      return yield* this.checked(yield* copySnapshot(this.backend, this.version, this.live));
    }
    const take = loraSnapshot(this.backend, this.version, this.base, this.lora, this.options.lora!);
    // the new snapshot's scope replaces the held one only once the snapshot is good
    return yield* Effect.uninterruptibleMask((restore) =>
      Effect.flatMap(
        Scope.make(),
        (scope) =>
          restore(Effect.flatMap(Scope.provide(scope)(take), (snap) => this.checked(snap))).pipe(
            Effect.onExit((ex) =>
              Exit.isFailure(ex) ? Scope.close(scope, Exit.void) : this.releaseLatest(scope)
            ),
          ),
      )
    );
  });

  /** Fails with NonFiniteStepError when the snapshot's weights (merged, for LoRA) hold a NaN/Inf. */
  private checked(snap: Snapshot): Effect.Effect<Snapshot, BackendError | NonFiniteStepError> {
    return Effect.flatMap(firstNonFiniteWeight(snap, this.backend), (bad) =>
      bad
        ? Effect.fail(
          new NonFiniteStepError({
            step: snap.version,
            quantity: "weights",
            detail: `${bad.name}[${bad.index}] = ${bad.value}`,
          }),
        )
        : Effect.succeed(snap));
  }

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
