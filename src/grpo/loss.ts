/**
 * The GRPO policy loss of one micro-batch, computed on the host in float64 from per-token
 * log-probabilities, with its exact derivative d loss / d logp for every completion token. The
 * model's backward pass starts from that derivative, so this module is the whole of TRL's
 * `_compute_loss` after the forward pass: ratio, clipping, KL, engine importance correction,
 * entropy masking, aggregation and the logged metrics.
 *
 * Per token t of sequence i (mask m, advantage A, all log-probs at the sampling temperature):
 *   log_ratio = logp - old_logp                      (sequence level: masked mean per sequence)
 *   c1 = exp(log_ratio), c2 = clamp(c1, 1 - eps_low, 1 + eps_high), c1 = min(c1, delta) if set
 *   policy = -min(c1 * A, c2 * A) * entropy_mask * rho * keep   (rho: engine importance ratio)
 *   keep = 0 when A < 0 and mean_t (engine - logp) > off_policy_mask_threshold, else 1
 *   per_token = policy + beta * (exp(ref - logp) - (ref - logp) - 1)
 *   loss = sum_i,t per_token * m * s_i               (s_i from loss_type, see {@link LossType})
 *
 * Gradients follow torch: clamp passes gradient only inside [lo, hi] (inclusive), so a clipped
 * branch contributes 0; min sends the gradient to the smaller argument and splits it evenly on a
 * tie (which, outside degenerate delta settings, equals the first argument's gradient because both
 * branches then have the same derivative). old_logp, ref_logp, engine_logp and rho are constants.
 * @module
 */
import type { Effect } from "effect";
import type { GrpoConfig } from "./config.ts";
import {
  attempt,
  type GrpoInputError,
  type GrpoNumericError,
  numericError,
  type NumericQuantity,
  requireInput,
} from "./errors.ts";
import { type GrpoMetrics, minMeanMax } from "./metrics.ts";

/**
 * How per-token losses are reduced (s_i is the weight of each masked token of sequence i; B the
 * micro-batch size; gas the gradient accumulation steps):
 * - grpo: mean over sequences of the per-sequence token mean, s_i = 1 / (B * max(M_i, 1) * gas)
 * - bnpo: token mean over the micro-batch, s = 1 / (max(sum M, 1) * gas)
 * - dr_grpo: s = 1 / (B * max_completion_length * gas)
 * - dapo: s = 1 / dapoNormalizer (masked tokens of the whole generation batch / processes), so the
 *   micro-batch losses of one generation batch add up to its token mean; no gas division.
 */
export type LossType = "grpo" | "bnpo" | "dr_grpo" | "dapo";

/** Ratio per token, or one ratio per sequence from the masked mean log-ratio (GSPO). */
export type ImportanceSamplingLevel = "token" | "sequence";

/**
 * Rollout-engine importance correction. token_* modes use exp(old - engine) per token;
 * sequence_* modes exp(sum over the sequence). *_truncate clamps to [clipMin, clipMax];
 * *_mask sets it to 0 outside that range.
 */
export type VllmImportanceSamplingMode =
  | "token_truncate"
  | "token_mask"
  | "sequence_truncate"
  | "sequence_mask";

/** One completion of the micro-batch. All per-token arrays have the completion's length. */
export interface LossSequence {
  /** log p(token) under the current policy (at temperature), the variable being differentiated. */
  readonly logp: ArrayLike<number>;
  /** Log-probs of the policy that generated the batch; null means logp itself, detached. */
  readonly oldLogp?: ArrayLike<number> | null;
  /** Reference-model log-probs (adapters disabled); required when beta != 0. */
  readonly refLogp?: ArrayLike<number> | null;
  /** The rollout engine's log-probs of the sampled tokens; required when the correction is on. */
  readonly engineLogp?: ArrayLike<number> | null;
  /** 1 for tokens that count, 0 for padding / tool output. */
  readonly mask: ArrayLike<number>;
  /** Per-token entropy of the policy; required when topEntropyQuantile < 1, logged when given. */
  readonly entropy?: ArrayLike<number> | null;
  /** The sequence's advantage, broadcast to its tokens. */
  readonly advantage: number;
  /** Whether the completion ended with EOS; required when maskTruncatedCompletions is on. */
  readonly endedWithEos?: boolean;
}

/**
 * Loss options: the decoded {@link GrpoConfig} fields the loss reads (a decoded config spreads
 * into it), plus the dapo normalizer (counted from the generation batch) and the gradient
 * accumulation steps (a trainer setting). Every field is required and taken as given: defaults
 * and validation are decodeGrpoConfig's, so nothing is defaulted or re-checked here. `epsilonHigh`,
 * `delta` and the clip bounds keep GrpoConfig's meaning of null (= epsilon, off, unbounded).
 */
export interface LossOptions extends
  Pick<
    GrpoConfig,
    | "lossType"
    | "epsilon"
    | "epsilonHigh"
    | "delta"
    | "beta"
    | "importanceSamplingLevel"
    | "maxCompletionLength"
    | "vllmImportanceSamplingCorrection"
    | "vllmImportanceSamplingMode"
    | "vllmImportanceSamplingClipMax"
    | "vllmImportanceSamplingClipMin"
    | "topEntropyQuantile"
    | "maskTruncatedCompletions"
  > {
  /** GrpoConfig's off-policy mask threshold; absent or null = off. */
  readonly offPolicyMaskThreshold?: number | null;
  /**
   * dapo denominator: masked tokens in the whole generation batch divided by the number of
   * processes (TRL `num_items_in_batch / num_processes`), see {@link countLossTokens}; read only
   * by dapo, which fails unless it is a finite number >= 0. It may be 0 only when the micro-batch
   * has no masked tokens (loss 0, where TRL would compute 0/0).
   */
  readonly dapoNormalizer: number;
  /** grpo / bnpo / dr_grpo losses are divided by this integer >= 1 (TRL does so per micro-batch). */
  readonly gradientAccumulationSteps: number;
}

/** The loss, its gradient and TRL's metrics for one micro-batch. */
export interface LossResult {
  /** The micro-batch loss, as TRL would backpropagate it. */
  readonly loss: number;
  /** d loss / d logp, one array per sequence, the length of its logp. */
  readonly dLogp: readonly Float64Array[];
  /**
   * TRL's names: `clip_ratio/low_mean`, `clip_ratio/low_min`, `clip_ratio/high_mean`,
   * `clip_ratio/high_max`, `clip_ratio/region_mean`; `kl` when beta != 0; `entropy` when entropies
   * are given; `sampling/sampling_logp_difference/{mean,max}` and
   * `sampling/importance_sampling_ratio/{min,mean,max}` when the engine correction is on.
   */
  readonly metrics: GrpoMetrics;
  /** Masked tokens of this micro-batch after truncation masking (what dapo's normalizer counts). */
  readonly tokenCount: number;
}

/**
 * Masked tokens of some sequences, after truncation masking: sum this over every micro-batch of a
 * generation batch (and divide by the number of processes) to get the dapo normalizer.
 */
export const countLossTokens = (
  sequences: readonly Pick<LossSequence, "mask" | "endedWithEos">[],
  maskTruncatedCompletions = false,
): number => {
  let n = 0;
  for (const s of sequences) {
    if (maskTruncatedCompletions && s.endedWithEos !== true) continue;
    for (let t = 0; t < s.mask.length; t++) n += s.mask[t];
  }
  return n;
};

const OP = "grpoLoss";

interface Resolved {
  readonly lossType: LossType;
  readonly epsLow: number;
  readonly epsHigh: number;
  readonly delta: number | null;
  readonly beta: number;
  readonly level: ImportanceSamplingLevel;
  readonly maxCompletionLength: number;
  readonly dapoNormalizer: number;
  readonly gas: number;
  readonly correction: boolean;
  readonly isMode: VllmImportanceSamplingMode;
  readonly clipMax: number;
  readonly clipMin: number;
  readonly topEntropyQuantile: number;
  readonly maskTruncated: boolean;
  readonly offPolicyMask: number | null;
}

/**
 * The options in the form the math uses (null bounds as ±Infinity). Only the two numbers that do
 * not come from the decoded config are checked: the dapo normalizer (counted from the batch) and
 * the gradient accumulation steps.
 */
const resolve = (o: LossOptions): Resolved => {
  requireInput(
    o.lossType !== "dapo" || (Number.isFinite(o.dapoNormalizer) && o.dapoNormalizer >= 0),
    OP,
    () =>
      `lossType "dapo" needs dapoNormalizer (masked tokens in the generation batch / processes), ` +
      `got ${o.dapoNormalizer}`,
  );
  const gas = o.gradientAccumulationSteps;
  requireInput(
    Number.isInteger(gas) && gas >= 1,
    OP,
    () => `gradientAccumulationSteps must be an integer >= 1, got ${gas}`,
  );
  return {
    lossType: o.lossType,
    epsLow: o.epsilon,
    epsHigh: o.epsilonHigh ?? o.epsilon,
    delta: o.delta,
    beta: o.beta,
    level: o.importanceSamplingLevel,
    maxCompletionLength: o.maxCompletionLength,
    dapoNormalizer: o.dapoNormalizer,
    gas,
    correction: o.vllmImportanceSamplingCorrection,
    isMode: o.vllmImportanceSamplingMode,
    clipMax: o.vllmImportanceSamplingClipMax ?? Infinity,
    clipMin: o.vllmImportanceSamplingClipMin ?? -Infinity,
    topEntropyQuantile: o.topEntropyQuantile,
    maskTruncated: o.maskTruncatedCompletions,
    offPolicyMask: o.offPolicyMaskThreshold ?? null,
  };
};

/** Checks every value of an optional per-token array: present when needed, right length, finite. */
const checkArray = (
  arr: ArrayLike<number> | null | undefined,
  quantity: NumericQuantity,
  i: number,
  length: number,
  needed: string | null,
): ArrayLike<number> | null => {
  if (arr == null) {
    requireInput(needed === null, OP, () => `sequence ${i} has no ${quantity}, needed ${needed}`);
    return null;
  }
  requireInput(
    arr.length === length,
    OP,
    () => `sequence ${i}: ${quantity} has ${arr.length} tokens, logp has ${length}`,
  );
  for (let t = 0; t < length; t++) {
    if (!Number.isFinite(arr[t])) throw numericError(quantity, i, t, arr[t]);
  }
  return arr;
};

/** torch.quantile's default linear interpolation over sorted values. */
const quantile = (sorted: Float64Array, q: number): number => {
  const pos = q * (sorted.length - 1);
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
};

/**
 * -min(c1' * A, c2 * A) and its derivative with respect to c1 (before delta), where
 * c2 = clamp(c1, lo, hi) and c1' = min(c1, delta) (TRL clamps c1 by delta after computing c2).
 */
const clippedTerm = (
  c1: number,
  a: number,
  lo: number,
  hi: number,
  delta: number | null,
): { value: number; dc1: number; c1d: number } => {
  const c2 = Math.min(Math.max(c1, lo), hi);
  const dc2 = c1 >= lo && c1 <= hi ? 1 : 0;
  const c1d = delta === null ? c1 : Math.min(c1, delta);
  const dc1d = delta === null || c1 <= delta ? 1 : 0;
  const l1 = c1d * a;
  const l2 = c2 * a;
  if (l1 < l2) return { value: -l1, dc1: -a * dc1d, c1d };
  if (l1 > l2) return { value: -l2, dc1: -a * dc2, c1d };
  return { value: -l1, dc1: -0.5 * a * (dc1d + dc2), c1d };
};

const compute = (sequences: readonly LossSequence[], options: LossOptions): LossResult => {
  const o = resolve(options);
  const B = sequences.length;
  requireInput(B >= 1, OP, () => "empty micro-batch");

  // ---- validate inputs, effective masks -------------------------------------------------------
  const masks: Float64Array[] = [];
  const hasEntropy = sequences.map((s) => s.entropy != null);
  const anyEntropy = hasEntropy.some((h) => h);
  requireInput(
    !anyEntropy || hasEntropy.every((h) => h),
    OP,
    () => "entropy given for some sequences but not all",
  );
  const inputs = sequences.map((s, i) => {
    const T = s.logp.length;
    checkArray(s.logp, "logp", i, T, null);
    requireInput(
      s.mask.length === T,
      OP,
      () => `sequence ${i}: mask has ${s.mask.length} tokens, logp has ${T}`,
    );
    requireInput(
      !o.maskTruncated || typeof s.endedWithEos === "boolean",
      OP,
      () => `sequence ${i} has no endedWithEos flag, needed by maskTruncatedCompletions`,
    );
    if (!Number.isFinite(s.advantage)) throw numericError("advantage", i, null, s.advantage);
    // A truncated completion keeps its reward in the group statistics but trains on nothing.
    const truncated = o.maskTruncated && s.endedWithEos === false;
    const m = new Float64Array(T);
    for (let t = 0; t < T; t++) {
      const v = s.mask[t];
      requireInput(v === 0 || v === 1, OP, () => `sequence ${i}: mask[${t}] is ${v}, not 0 or 1`);
      m[t] = truncated ? 0 : v;
    }
    masks.push(m);
    return {
      logp: s.logp,
      old: checkArray(s.oldLogp, "oldLogp", i, T, null) ?? s.logp,
      ref: o.beta !== 0 ? checkArray(s.refLogp, "refLogp", i, T, "when beta != 0") : null,
      // the off-policy mask uses the engine's log-probs when given (else old_logp, as TRL)
      engine: o.correction || o.offPolicyMask !== null
        ? checkArray(
          s.engineLogp,
          "engineLogp",
          i,
          T,
          o.correction ? "by vllmImportanceSamplingCorrection" : null,
        )
        : null,
      entropy: checkArray(
        s.entropy,
        "entropy",
        i,
        T,
        o.topEntropyQuantile < 1 ? "when topEntropyQuantile < 1" : null,
      ),
      a: s.advantage,
      T,
    };
  });
  const seqTokens = masks.map((m) => m.reduce((x, y) => x + y, 0));
  const tokenCount = seqTokens.reduce((x, y) => x + y, 0);
  requireInput(
    o.lossType !== "dapo" || o.dapoNormalizer > 0 || tokenCount === 0,
    OP,
    () => `dapoNormalizer is 0 but this micro-batch has ${tokenCount} masked tokens`,
  );

  // ---- entropy mask: keep tokens at or above the (1 - q) quantile of masked entropies ---------
  let entropyMask: Float64Array[] | null = null;
  if (o.topEntropyQuantile < 1) {
    const pool: number[] = [];
    inputs.forEach((s, i) => {
      for (let t = 0; t < s.T; t++) if (masks[i][t] === 1) pool.push(s.entropy![t]);
    });
    const sorted = Float64Array.from(pool).sort();
    const threshold = sorted.length === 0 ? Infinity : quantile(sorted, 1 - o.topEntropyQuantile);
    entropyMask = inputs.map((s, i) =>
      Float64Array.from(
        { length: s.T },
        (_, t) => masks[i][t] === 1 && s.entropy![t] >= threshold ? 1 : 0,
      )
    );
  }

  // ---- engine importance ratio rho (a constant: old and engine log-probs carry no gradient) ---
  const metrics: Record<string, number> = {};
  let rho: Float64Array[] | null = null;
  if (o.correction) {
    const seqMode = o.isMode === "sequence_mask" || o.isMode === "sequence_truncate";
    const truncate = o.isMode === "sequence_truncate" || o.isMode === "token_truncate";
    const bound = (r: number): number =>
      truncate
        ? Math.min(Math.max(r, o.clipMin), o.clipMax)
        : r < o.clipMin || r > o.clipMax
        ? 0
        : r;
    const diffs: number[] = [];
    const ratios: number[] = [];
    rho = inputs.map((s, i) => {
      const m = masks[i];
      const out = new Float64Array(s.T);
      let sum = 0;
      for (let t = 0; t < s.T; t++) {
        const d = (s.old[t] - s.engine![t]) * m[t];
        sum += d;
        if (m[t] === 1) diffs.push(Math.abs(s.old[t] - s.engine![t]));
        if (!seqMode) {
          out[t] = bound(Math.exp(d));
          if (!Number.isFinite(out[t])) throw numericError("importanceSamplingRatio", i, t, out[t]);
          if (m[t] === 1) ratios.push(out[t]);
        }
      }
      if (seqMode) {
        const r = bound(Math.exp(sum));
        if (!Number.isFinite(r)) throw numericError("importanceSamplingRatio", i, null, r);
        out.fill(r);
        ratios.push(r); // TRL flattens the (B, 1) ratio: every sequence counts, masked or not.
      }
      return out;
    });
    const d = minMeanMax(diffs);
    const r = minMeanMax(ratios);
    metrics["sampling/sampling_logp_difference/mean"] = d.mean;
    metrics["sampling/sampling_logp_difference/max"] = d.max;
    metrics["sampling/importance_sampling_ratio/min"] = r.min;
    metrics["sampling/importance_sampling_ratio/mean"] = r.mean;
    metrics["sampling/importance_sampling_ratio/max"] = r.max;
  }

  // ---- off-policy sequence mask (a constant: it reads only detached log-probs) ----------------
  const keep = o.offPolicyMask === null ? null : inputs.map((s, i) => {
    if (s.a >= 0) return 1;
    const sampling = s.engine ?? s.old;
    let kl = 0;
    for (let t = 0; t < s.T; t++) kl += (sampling[t] - s.logp[t]) * masks[i][t];
    return kl / Math.max(seqTokens[i], 1) <= o.offPolicyMask! ? 1 : 0;
  });

  // ---- aggregation weight of each masked token of sequence i ----------------------------------
  const scale = (i: number): number => {
    switch (o.lossType) {
      case "grpo":
        return 1 / (B * Math.max(seqTokens[i], 1) * o.gas);
      case "bnpo":
        return 1 / (Math.max(tokenCount, 1) * o.gas);
      case "dr_grpo":
        return 1 / (B * o.maxCompletionLength * o.gas);
      case "dapo":
        // A zero normalizer is only legal for a batch with no tokens: loss 0 instead of 0/0.
        return o.dapoNormalizer > 0 ? 1 / o.dapoNormalizer : 0;
    }
  };

  // ---- loss and gradient ----------------------------------------------------------------------
  const lo = 1 - o.epsLow;
  const hi = 1 + o.epsHigh;
  let loss = 0;
  let klSum = 0;
  let lowClipped = 0;
  let highClipped = 0;
  const dLogp = inputs.map((s, i) => {
    const m = masks[i];
    const s_i = scale(i);
    const grad = new Float64Array(s.T);
    const weight = (t: number): number =>
      m[t] * s_i * (entropyMask ? entropyMask[i][t] : 1) * (rho ? rho[i][t] : 1) *
      (keep ? keep[i] : 1);
    if (o.level === "token") {
      for (let t = 0; t < s.T; t++) {
        if (m[t] === 0) continue;
        const c1 = Math.exp(s.logp[t] - s.old[t]);
        if (!Number.isFinite(c1)) throw numericError("ratio", i, t, c1);
        const term = clippedTerm(c1, s.a, lo, hi, o.delta);
        // TRL tests the delta-clamped c1 against the clip range (masked token mean).
        if (term.c1d < lo && s.a < 0) lowClipped++;
        if (term.c1d > hi && s.a > 0) highClipped++;
        const w = weight(t);
        loss += w * term.value;
        grad[t] += w * term.dc1 * c1;
      }
    } else {
      // GSPO: one ratio from the masked mean log-ratio; every masked token shares its gradient.
      const M = Math.max(seqTokens[i], 1);
      let lr = 0;
      for (let t = 0; t < s.T; t++) lr += (s.logp[t] - s.old[t]) * m[t];
      const c1 = Math.exp(lr / M);
      if (!Number.isFinite(c1)) throw numericError("ratio", i, null, c1);
      const term = clippedTerm(c1, s.a, lo, hi, o.delta);
      // TRL's masked_batch_mean takes a plain mean over sequences for (B, 1) tensors.
      if (term.c1d < lo && s.a < 0) lowClipped++;
      if (term.c1d > hi && s.a > 0) highClipped++;
      let wSum = 0;
      for (let t = 0; t < s.T; t++) wSum += weight(t);
      loss += wSum * term.value;
      const g = wSum * term.dc1 * c1 / M;
      for (let t = 0; t < s.T; t++) grad[t] += g * m[t];
    }
    if (o.beta !== 0) {
      for (let t = 0; t < s.T; t++) {
        if (m[t] === 0) continue;
        const d = s.ref![t] - s.logp[t];
        const e = Math.exp(d);
        const kl = e - d - 1;
        if (!Number.isFinite(kl)) throw numericError("kl", i, t, kl);
        klSum += kl;
        loss += m[t] * s_i * o.beta * kl;
        grad[t] += m[t] * s_i * o.beta * (1 - e);
      }
    }
    for (let t = 0; t < s.T; t++) {
      if (!Number.isFinite(grad[t])) throw numericError("dLogp", i, t, grad[t]);
    }
    return grad;
  });
  if (!Number.isFinite(loss)) throw numericError("loss", -1, null, loss);

  // ---- metrics --------------------------------------------------------------------------------
  const tokenMean = (x: number): number => x / Math.max(tokenCount, 1);
  const clipMean = (x: number): number => o.level === "token" ? tokenMean(x) : x / B;
  // One process: the min / max over processes TRL takes are the micro-batch values themselves.
  const low = clipMean(lowClipped);
  const high = clipMean(highClipped);
  // low and high clipping exclude each other (they need A < 0 and A > 0), so region = low + high.
  metrics["clip_ratio/low_mean"] = low;
  metrics["clip_ratio/low_min"] = low;
  metrics["clip_ratio/high_mean"] = high;
  metrics["clip_ratio/high_max"] = high;
  metrics["clip_ratio/region_mean"] = clipMean(lowClipped + highClipped);
  if (o.beta !== 0) metrics["kl"] = tokenMean(klSum);
  if (anyEntropy) {
    let sum = 0;
    inputs.forEach((s, i) => {
      for (let t = 0; t < s.T; t++) sum += masks[i][t] * s.entropy![t];
    });
    metrics["entropy"] = tokenMean(sum);
  }
  return { loss, dLogp, metrics, tokenCount };
};

/**
 * The GRPO loss of one micro-batch with d loss / d logp per token and TRL's metrics. Fails with
 * GrpoNumericError on any NaN / infinity in the inputs or derived values (naming the quantity,
 * sequence and token), GrpoInputError on inconsistent inputs (or a missing dapo normalizer).
 */
export const grpoLoss = (
  sequences: readonly LossSequence[],
  options: LossOptions,
): Effect.Effect<LossResult, GrpoNumericError | GrpoInputError> =>
  attempt(() => compute(sequences, options));
