import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { Effect } from "effect";
import fc from "fast-check";
import {
  combineRewards,
  countLossTokens,
  decodeGrpoConfig,
  groupAdvantages,
  grpoConfigDefaults,
  GrpoConfigError,
  GrpoInputError,
  grpoLoss,
  GrpoNumericError,
  type LossOptions,
  type LossResult,
  type LossSequence,
  type NamedReward,
  normalizeThenSumAdvantages,
  RewardError,
  rewardMetrics,
  scoreRewards,
} from "../src/grpo/mod.ts";

// ---- helpers ------------------------------------------------------------------------------------

const close = (actual: number, expected: number, tol = 1e-12, what = ""): void =>
  assert(
    Math.abs(actual - expected) <= tol * Math.max(1, Math.abs(expected)),
    `${what} expected ${expected}, got ${actual}`,
  );

const closeAll = (actual: ArrayLike<number>, expected: readonly number[], tol = 1e-12): void => {
  assertEquals(actual.length, expected.length);
  for (let i = 0; i < expected.length; i++) close(actual[i], expected[i], tol, `[${i}]`);
};

/**
 * Options that switch off everything a test does not exercise: TRL's defaults without the engine
 * correction, one accumulation step, and no dapo normalizer (a dapo test passes its own).
 */
const plain: LossOptions = {
  ...grpoConfigDefaults,
  vllmImportanceSamplingCorrection: false,
  dapoNormalizer: NaN,
  gradientAccumulationSteps: 1,
};

const loss = (seqs: readonly LossSequence[], options: Partial<LossOptions>): LossResult =>
  Effect.runSync(grpoLoss(seqs, { ...plain, ...options }));

const lossError = (seqs: readonly LossSequence[], options: Partial<LossOptions>): unknown =>
  Effect.runSync(Effect.flip(grpoLoss(seqs, { ...plain, ...options })));

const adv = (rewards: number[], g: number, scale?: "group" | "batch" | "none") =>
  Effect.runSync(groupAdvantages(rewards, { numGenerations: g, scaleRewards: scale }));

// ---- rewards ------------------------------------------------------------------------------------

Deno.test("combineRewards: weighted nansum, all-NaN rows stay NaN; per-function metrics", () => {
  // row 0: 2*1 + 0.5*0.5 = 2.25; row 1: f0 missing -> 0.5*2 = 1; row 2: both missing -> NaN.
  const per = [[1, NaN, NaN], [0.5, 2, NaN]];
  const r = combineRewards(per, [2, 0.5]);
  close(r[0], 2.25);
  close(r[1], 1);
  assert(Number.isNaN(r[2]));
  const m = rewardMetrics(["a", "b"], per);
  close(m["rewards/a/mean"], 1); // only one value
  assert(Number.isNaN(m["rewards/a/std"])); // Bessel with n = 1: undefined
  close(m["rewards/b/mean"], 1.25); // (0.5 + 2) / 2
  close(m["rewards/b/std"], Math.sqrt(1.125)); // sqrt((0.75^2 * 2) / 1) = 1.06066
});

Deno.test("scoreRewards: sync and Effect functions, null -> NaN, weights from config", () => {
  const exact: NamedReward = {
    name: "exact",
    fn: (cs, ctx) =>
      cs.map((c, i) => ctx.answers[i] === null ? null : c === ctx.answers[i] ? 1 : 0),
  };
  const len: NamedReward = {
    name: "short",
    weight: 0.5,
    fn: (cs) => Effect.succeed(cs.map((c) => c.length <= 2 ? 1 : -1)),
  };
  const ctx = { prompts: ["p", "p", "q"], answers: ["42", "42", null] };
  const t = Effect.runSync(scoreRewards([exact, len], ["42", "417", "x"], ctx));
  assertEquals(t.names, ["exact", "short"]);
  assertEquals(t.weights, [1, 0.5]);
  close(t.perFunction[0][0], 1);
  close(t.perFunction[0][1], 0);
  assert(Number.isNaN(t.perFunction[0][2])); // no answer: null -> NaN
  // 1*1 + 0.5*1 = 1.5; 1*0 + 0.5*-1 = -0.5; exact missing -> 0.5*1 = 0.5
  close(t.combined[0], 1.5);
  close(t.combined[1], -0.5);
  close(t.combined[2], 0.5);
  const w = Effect.runSync(scoreRewards([exact, len], ["42", "417", "x"], ctx, {
    rewardWeights: [2, 1],
  }));
  close(w.combined[0], 3); // 2*1 + 1*1
});

Deno.test("scoreRewards: wrong length, throwing, failing and infinite rewards are RewardErrors", () => {
  const ctx = { prompts: ["p", "p"], answers: [null, null] };
  const run = (fn: NamedReward["fn"]) =>
    Effect.runSync(Effect.flip(scoreRewards([{ name: "bad", fn }], ["a", "b"], ctx)));
  const cases = [
    run(() => [1]),
    run(() => {
      throw new Error("boom");
    }),
    run(() => Effect.fail("nope")),
    run(() => [1, Infinity]),
  ];
  for (const e of cases) {
    assert(e instanceof RewardError);
    assertEquals(e.reward, "bad");
  }
  assert(cases[1].message.includes("boom"));
  assert(cases[3].message.includes("completion 1"));
});

// ---- advantages ---------------------------------------------------------------------------------

Deno.test("advantages: [1,0,1,0] in one group of 4", () => {
  // mean 0.5; Bessel std = sqrt(4 * 0.25 / 3) = 0.57735; A = ±0.5 / (0.57735 + 1e-4) = ±0.865875
  const a = adv([1, 0, 1, 0], 4);
  const s = Math.sqrt(1 / 3);
  closeAll(a.advantages, [
    0.5 / (s + 1e-4),
    -0.5 / (s + 1e-4),
    0.5 / (s + 1e-4),
    -0.5 / (s + 1e-4),
  ]);
  close(a.advantages[0], 0.8658754297607016);
  close(a.metrics.reward, 0.5);
  close(a.metrics.reward_std, s);
  assertEquals(a.metrics.frac_reward_zero_std, 0);
});

Deno.test("advantages: scale_rewards group vs batch vs none", () => {
  const r = [1, 0, 1, 0, 2, 2, 2, 2];
  // group: group 0 as above; group 1 all 2 -> std 0 -> A = 0 / (0 + 1e-4) = 0
  const g = adv(r, 4, "group");
  const s = Math.sqrt(1 / 3);
  const a0 = 0.5 / (s + 1e-4);
  closeAll(g.advantages, [a0, -a0, a0, -a0, 0, 0, 0, 0]);
  close(g.metrics.frac_reward_zero_std, 0.5); // one of two groups has no signal
  close(g.metrics.reward_std, s / 2); // mean over sequences of group std (0.57735 and 0)
  // batch: mean stays per group; std over all 8: mean 1.25, squares 2*0.0625 + 2*1.5625 +
  // 4*0.5625 = 5.5, std = sqrt(5.5 / 7) = 0.886405; A = ±0.5 / (0.886405 + 1e-4) = ±0.564012
  const b = adv(r, 4, "batch");
  const bs = Math.sqrt(5.5 / 7);
  closeAll(b.advantages, [0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0].map((x) => x / (bs + 1e-4)));
  close(b.advantages[0], 0.5640124456324701);
  close(b.metrics.reward_std, bs);
  close(b.metrics.frac_reward_zero_std, 0.5); // still per group (doc's definition)
  // none: centred only
  const n = adv(r, 4, "none");
  closeAll(n.advantages, [0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0]);
  close(n.metrics.reward, 1.25); // mean of group means (0.5 and 2)
});

Deno.test("advantages: NaN rewards are skipped in mean/std and get advantage 0", () => {
  // valid [1, 0, 0.5]: mean 0.5, ss = 0.25 + 0.25 + 0 = 0.5, std = sqrt(0.5 / 2) = 0.5
  const a = adv([1, NaN, 0, 0.5], 4);
  closeAll(a.advantages, [0.5 / 0.5001, 0, -0.5 / 0.5001, 0]);
  // an all-NaN group: A = 0 and it counts as a zero-std group; other group [1, 3]: mean 2,
  // std sqrt(2), A = ±1 / (1.41421 + 1e-4) = ±0.707057
  const b = adv([NaN, NaN, 1, 3], 2);
  closeAll(b.advantages, [0, 0, -1 / (Math.SQRT2 + 1e-4), 1 / (Math.SQRT2 + 1e-4)]);
  close(b.advantages[3], 0.7070567847218314);
  close(b.metrics.frac_reward_zero_std, 0.5);
  close(b.metrics.reward, 2);
  // an infinite reward is a numeric error naming the sequence
  const e = Effect.runSync(Effect.flip(groupAdvantages([0, Infinity], { numGenerations: 2 })));
  assert(e instanceof GrpoNumericError && e.quantity === "reward" && e.sequence === 1);
  const l = Effect.runSync(Effect.flip(groupAdvantages([0, 1, 2], { numGenerations: 2 })));
  assert(l instanceof GrpoInputError);
});

Deno.test("advantages: normalize_then_sum z-scores each function per group, then the batch", () => {
  // f0 groups [1,0] (mean .5, std sqrt(.5)) and [1,1] (std 0 -> z 0);
  // f1 groups [0,2] (mean 1, std sqrt(2)) and [4,0] (mean 2, std sqrt(8)).
  const f0 = [1, 0, 1, 1];
  const f1 = [0, 2, 4, 0];
  const za = 0.5 / (Math.sqrt(0.5) + 1e-4);
  const zb = 1 / (Math.SQRT2 + 1e-4);
  const zc = 2 / (Math.sqrt(8) + 1e-4);
  const summed = [za - zb, -za + zb, zc, -zc]; // weights 1, 1; batch mean is 0
  const std = Math.sqrt(summed.reduce((s, v) => s + v * v, 0) / 3);
  const a = Effect.runSync(normalizeThenSumAdvantages([f0, f1], [1, 1], 2));
  closeAll(a.advantages, summed.map((v) => v / (std + 1e-4)), 1e-9);
  closeAll(a.rewards, [1, 2, 5, 1]); // raw weighted sum for the reward metric
});

// ---- loss: aggregation --------------------------------------------------------------------------

// Two on-policy sequences (ratio 1, so the per-token loss is -A): seq 0 has 2 tokens, A = 1;
// seq 1 has 4 tokens of which 3 are masked in, A = -0.5. Per-token losses: -1, -1 | .5, .5, .5.
const twoSeqs: LossSequence[] = [
  { logp: [-1, -2], mask: [1, 1], advantage: 1 },
  { logp: [-0.5, -1.5, -1, -3], mask: [1, 1, 1, 0], advantage: -0.5 },
];

Deno.test("loss_type grpo: mean over sequences of per-sequence token means", () => {
  // (mean(-1, -1) + mean(.5, .5, .5)) / 2 = (-1 + 0.5) / 2 = -0.25
  // d/dlogp = -A * s_i: seq 0: -1 / (2*2) = -0.25; seq 1: 0.5 / (2*3) = 0.08333, masked token 0
  const r = loss(twoSeqs, { lossType: "grpo" });
  close(r.loss, -0.25);
  closeAll(r.dLogp[0], [-0.25, -0.25]);
  closeAll(r.dLogp[1], [1 / 12, 1 / 12, 1 / 12, 0]);
  assertEquals(r.tokenCount, 5);
  // TRL divides by the gradient accumulation steps for grpo / bnpo / dr_grpo
  close(loss(twoSeqs, { lossType: "grpo", gradientAccumulationSteps: 2 }).loss, -0.125);
});

Deno.test("loss_type bnpo: token mean over the micro-batch", () => {
  // (-2 + 1.5) / 5 = -0.1; grads -1/5 and 0.5/5
  const r = loss(twoSeqs, { lossType: "bnpo" });
  close(r.loss, -0.1);
  closeAll(r.dLogp[0], [-0.2, -0.2]);
  closeAll(r.dLogp[1], [0.1, 0.1, 0.1, 0]);
});

Deno.test("loss_type dr_grpo: sum / (B * max_completion_length)", () => {
  // -0.5 / (2 * 8) = -0.03125; grads -1/16 and 0.5/16
  const r = loss(twoSeqs, { lossType: "dr_grpo", maxCompletionLength: 8 });
  close(r.loss, -0.03125);
  closeAll(r.dLogp[0], [-1 / 16, -1 / 16]);
  closeAll(r.dLogp[1], [0.5 / 16, 0.5 / 16, 0.5 / 16, 0]);
});

Deno.test("loss_type dapo: sum / (generation-batch tokens / processes), no gas division", () => {
  // 20 tokens in the generation batch over 2 processes -> normalizer 10: -0.5 / 10 = -0.05
  const r = loss(twoSeqs, { lossType: "dapo", dapoNormalizer: 10, gradientAccumulationSteps: 4 });
  close(r.loss, -0.05);
  closeAll(r.dLogp[0], [-0.1, -0.1]);
  closeAll(r.dLogp[1], [0.05, 0.05, 0.05, 0]);
  const e = lossError(twoSeqs, { lossType: "dapo" });
  assert(e instanceof GrpoInputError && e.message.includes("dapoNormalizer"));
});

// ---- loss: clipping -----------------------------------------------------------------------------

/** One single-token sequence with ratio `ratio` = exp(logp - old) and advantage `a`. */
const oneToken = (ratio: number, a: number): LossSequence => ({
  logp: [Math.log(ratio) - 1],
  oldLogp: [-1],
  mask: [1],
  advantage: a,
});

Deno.test("epsilon clipping on both sides, positive and negative advantages", () => {
  // eps 0.2 -> clip range [0.8, 1.2]; per token -min(c1*A, clamp(c1)*A):
  //  c1 1.5, A +1: min(1.5, 1.2) = 1.2 (clipped, grad 0)        -> -1.2, high-clipped
  //  c1 1.5, A -1: min(-1.5, -1.2) = -1.5 (unclipped, grad -A*c1) -> 1.5, d = 1.5
  //  c1 0.5, A +1: min(0.5, 0.8) = 0.5 (unclipped)              -> -0.5, d = -0.5
  //  c1 0.5, A -1: min(-0.5, -0.8) = -0.8 (clipped, grad 0)     -> 0.8, low-clipped
  // bnpo over 4 tokens: (-1.2 + 1.5 - 0.5 + 0.8) / 4 = 0.15; grads / 4
  const seqs = [oneToken(1.5, 1), oneToken(1.5, -1), oneToken(0.5, 1), oneToken(0.5, -1)];
  const r = loss(seqs, { lossType: "bnpo", epsilon: 0.2 });
  close(r.loss, 0.15);
  closeAll(r.dLogp.map((d) => d[0]), [0, 0.375, -0.125, 0]);
  close(r.metrics["clip_ratio/low_mean"], 0.25);
  close(r.metrics["clip_ratio/low_min"], 0.25);
  close(r.metrics["clip_ratio/high_mean"], 0.25);
  close(r.metrics["clip_ratio/high_max"], 0.25);
  close(r.metrics["clip_ratio/region_mean"], 0.5);
});

Deno.test("epsilon_high widens only the upper clip", () => {
  // c1 1.25, A +1: eps_high 0.2 clips at 1.2 (loss -1.2, grad 0); eps_high 0.28 does not
  // (1.25 < 1.28: loss -1.25, grad -1.25). c1 0.75, A -1 is clipped at 0.8 either way.
  const seqs = [oneToken(1.25, 1), oneToken(0.75, -1)];
  const a = loss(seqs, { lossType: "bnpo" });
  close(a.loss, (-1.2 + 0.8) / 2);
  closeAll(a.dLogp.map((d) => d[0]), [0, 0]);
  const b = loss(seqs, { lossType: "bnpo", epsilonHigh: 0.28 });
  close(b.loss, (-1.25 + 0.8) / 2);
  closeAll(b.dLogp.map((d) => d[0]), [-1.25 / 2, 0]);
  close(b.metrics["clip_ratio/high_mean"], 0);
  close(b.metrics["clip_ratio/low_mean"], 0.5);
});

Deno.test("delta caps the unclipped ratio (zero gradient above it)", () => {
  // c1 1.5, A -1: without delta -> 1.5, d 1.5; delta 1.4 -> -min(-1.4, -1.2) = 1.4, d 0
  const r = loss([oneToken(1.5, -1)], { lossType: "bnpo", delta: 1.4 });
  close(r.loss, 1.4);
  close(r.dLogp[0][0], 0);
});

Deno.test("importance_sampling_level sequence (GSPO): one ratio from the masked mean", () => {
  // log-ratios [0.1, 0.3, 5 (masked)] -> mean 0.2, c1 = e^0.2 = 1.22140 > 1.2
  const seq = (a: number): LossSequence => ({
    logp: [-0.9, -0.7, 4],
    oldLogp: [-1, -1, -1],
    mask: [1, 1, 0],
    advantage: a,
  });
  // A = +1: clipped at 1.2: loss -1.2 (grpo: token mean of a constant), grad 0, high-clipped
  const pos = loss([seq(1)], { lossType: "grpo", importanceSamplingLevel: "sequence" });
  close(pos.loss, -1.2);
  closeAll(pos.dLogp[0], [0, 0, 0]);
  close(pos.metrics["clip_ratio/high_mean"], 1);
  // A = -1: unclipped: loss = e^0.2 = 1.221403; d/dlogp_t = c1 * (m_t / M) = e^0.2 / 2
  const neg = loss([seq(-1)], { lossType: "grpo", importanceSamplingLevel: "sequence" });
  close(neg.loss, Math.exp(0.2));
  closeAll(neg.dLogp[0], [Math.exp(0.2) / 2, Math.exp(0.2) / 2, 0]);
  // token level on the same data: ratios e^0.1 = 1.10517 and e^0.3 = 1.34986 (both unclipped for
  // A = -1) -> loss (e^0.1 + e^0.3) / 2, grads e^0.1 / 2 and e^0.3 / 2
  const tok = loss([seq(-1)], { lossType: "grpo" });
  close(tok.loss, (Math.exp(0.1) + Math.exp(0.3)) / 2);
  closeAll(tok.dLogp[0], [Math.exp(0.1) / 2, Math.exp(0.3) / 2, 0]);
});

// ---- loss: KL, truncation, engine correction, entropy -------------------------------------------

Deno.test("beta: k3 KL = exp(ref - logp) - (ref - logp) - 1", () => {
  // token 0: ref - logp = -0.5: k3 = e^-0.5 + 0.5 - 1 = 0.1065307; token 1: ref = logp: 0.
  // A = 0, so only beta * k3 remains: grpo mean = 0.1 * 0.1065307 / 2 = 0.00532653
  // d/dlogp = beta * (1 - e^(ref - logp)) * s: 0.1 * 0.3934693 / 2 = 0.01967347, and 0
  const r = loss([{ logp: [-1, -2], refLogp: [-1.5, -2], mask: [1, 1], advantage: 0 }], {
    lossType: "grpo",
    beta: 0.1,
  });
  const k3 = Math.exp(-0.5) + 0.5 - 1;
  close(k3, 0.10653065971263342);
  close(r.loss, 0.1 * k3 / 2);
  closeAll(r.dLogp[0], [0.1 * (1 - Math.exp(-0.5)) / 2, 0]);
  close(r.metrics["kl"], k3 / 2); // masked token mean of k3
  assert(!("kl" in loss(twoSeqs, { lossType: "grpo" }).metrics)); // not logged at beta 0
  const e = lossError(twoSeqs, { lossType: "grpo", beta: 0.1 });
  assert(e instanceof GrpoInputError && e.message.includes("refLogp"));
});

Deno.test("mask_truncated_completions: a completion without EOS trains on nothing", () => {
  const seqs: LossSequence[] = [
    { logp: [-1, -2], mask: [1, 1], advantage: 1, endedWithEos: true },
    { logp: [-1, -1, -1], mask: [1, 1, 1], advantage: -1, endedWithEos: false },
  ];
  // off: (-1 + 1) / 2 = 0; on: (-1 + 0) / 2 = -0.5 (seq 1's mean over max(0, 1) tokens is 0)
  close(loss(seqs, { lossType: "grpo" }).loss, 0);
  const r = loss(seqs, { lossType: "grpo", maskTruncatedCompletions: true });
  close(r.loss, -0.5);
  closeAll(r.dLogp[0], [-0.25, -0.25]);
  closeAll(r.dLogp[1], [0, 0, 0]);
  assertEquals(r.tokenCount, 2);
  assertEquals(countLossTokens(seqs, true), 2);
  assertEquals(countLossTokens(seqs), 5);
  const e = lossError([{ logp: [-1], mask: [1], advantage: 1 }], {
    lossType: "grpo",
    maskTruncatedCompletions: true,
  });
  assert(e instanceof GrpoInputError && e.message.includes("endedWithEos"));
});

Deno.test("engine importance correction: sequence_mask keeps rho at the cap, zeroes above", () => {
  // seq 0: old - engine = [0.5, 0.25] -> rho = e^0.75 = 2.117000 = cap (kept: mask is rho > cap)
  // seq 1: old - engine = [0.5, 0.3]  -> rho = e^0.8 = 2.2255 > cap -> 0
  const cap = Math.exp(0.75);
  const seqs: LossSequence[] = [
    { logp: [-1, -2], oldLogp: [-1, -2], engineLogp: [-1.5, -2.25], mask: [1, 1], advantage: 1 },
    { logp: [-1, -2], oldLogp: [-1, -2], engineLogp: [-1.5, -2.3], mask: [1, 1], advantage: 1 },
  ];
  const opts: Partial<LossOptions> = {
    lossType: "grpo",
    vllmImportanceSamplingCorrection: true,
    vllmImportanceSamplingClipMax: cap,
  };
  // per-token policy loss -1 (ratio 1, A 1) times rho: grpo = (-cap + 0) / 2 = -1.0585000
  const r = loss(seqs, opts); // default mode: sequence_mask
  close(r.loss, -cap / 2);
  closeAll(r.dLogp[0], [-cap / 4, -cap / 4]);
  closeAll(r.dLogp[1], [0, 0]);
  // |old - engine| over masked tokens: [0.5, 0.25, 0.5, 0.3] -> mean 0.3875, max 0.5
  close(r.metrics["sampling/sampling_logp_difference/mean"], 0.3875);
  close(r.metrics["sampling/sampling_logp_difference/max"], 0.5);
  close(r.metrics["sampling/importance_sampling_ratio/min"], 0);
  close(r.metrics["sampling/importance_sampling_ratio/mean"], cap / 2);
  close(r.metrics["sampling/importance_sampling_ratio/max"], cap);
  // sequence_truncate clamps seq 1 to the cap instead: (-cap - cap) / 2
  const t = loss(seqs, { ...opts, vllmImportanceSamplingMode: "sequence_truncate" });
  close(t.loss, -cap);
  // token_mask with cap 1.5: per token e^0.5 = 1.6487 (> 1.5 -> 0) and e^0.25 = 1.2840 (kept);
  // seq 1: e^0.5 -> 0, e^0.3 = 1.3499: grpo ((-1.2840) / 2 + (-1.3499) / 2) / 2
  const k = loss(seqs, {
    ...opts,
    vllmImportanceSamplingMode: "token_mask",
    vllmImportanceSamplingClipMax: 1.5,
  });
  close(k.loss, -(Math.exp(0.25) + Math.exp(-2 + 2.3)) / 4);
  const missing = lossError([{ logp: [-1], mask: [1], advantage: 1 }], {
    lossType: "grpo",
    vllmImportanceSamplingCorrection: true,
  });
  assert(missing instanceof GrpoInputError && missing.message.includes("engineLogp"));
});

Deno.test("top_entropy_quantile: policy term only on the highest-entropy tokens", () => {
  // entropies [0.1, 0.5, 0.3, 0.9, 0.7], keep top 40%: threshold = quantile(0.6) with linear
  // interpolation over [0.1, 0.3, 0.5, 0.7, 0.9]: pos 2.4 -> 0.5 + 0.4 * 0.2 = 0.58 -> keep 0.9, 0.7
  const seq: LossSequence = {
    logp: [-1, -1, -1, -1, -1],
    mask: [1, 1, 1, 1, 1],
    entropy: [0.1, 0.5, 0.3, 0.9, 0.7],
    advantage: 1,
  };
  // bnpo: (-1 - 1) / 5 = -0.4; grads -0.2 on kept tokens
  const r = loss([seq], { lossType: "bnpo", topEntropyQuantile: 0.4 });
  close(r.loss, -0.4);
  closeAll(r.dLogp[0], [0, 0, 0, -0.2, -0.2]);
  close(r.metrics["entropy"], 0.5); // masked mean of all entropies
  // the KL term is not entropy-masked: ref - logp = -0.5 everywhere adds beta * k3 on all tokens
  const k3 = Math.exp(-0.5) + 0.5 - 1;
  const b = loss([{ ...seq, refLogp: [-1.5, -1.5, -1.5, -1.5, -1.5] }], {
    lossType: "bnpo",
    topEntropyQuantile: 0.4,
    beta: 0.1,
  });
  close(b.loss, -0.4 + 0.1 * k3);
});

Deno.test("NaN / Inf in log-probs, ratios and KL are GrpoNumericErrors with their place", () => {
  const base = (): LossSequence[] => [
    { logp: [-1, -1], mask: [1, 1], advantage: 1 },
    { logp: [-1, -1, -1], mask: [1, 1, 1], advantage: 1 },
  ];
  const check = (
    seqs: LossSequence[],
    opts: Partial<LossOptions>,
    q: string,
    seq: number,
    tok: number,
  ) => {
    const e = lossError(seqs, { lossType: "grpo", ...opts });
    assert(e instanceof GrpoNumericError, `expected GrpoNumericError, got ${e}`);
    assertEquals([e.quantity, e.sequence, e.token], [q, seq, tok]);
    assert(e.message.includes(`sequence ${seq}, token ${tok}`));
  };
  const a = base();
  a[1] = { ...a[1], logp: [-1, -1, NaN] };
  check(a, {}, "logp", 1, 2);
  const b = base();
  b[0] = { ...b[0], oldLogp: [-1, -800] }; // ratio exp(799) overflows
  check(b, {}, "ratio", 0, 1);
  const c = base();
  c[0] = { ...c[0], refLogp: [-1, -Infinity] };
  c[1] = { ...c[1], refLogp: [-1, -1, -1] };
  check(c, { beta: 0.1 }, "refLogp", 0, 1);
  const d = base().map((s) => ({ ...s, refLogp: [800, ...Array(s.logp.length - 1).fill(-1)] }));
  check(d, { beta: 0.1 }, "kl", 0, 0); // exp(801) overflows
  const e = base().map((s) => ({ ...s, engineLogp: s.logp }));
  e[0] = { ...e[0], engineLogp: [NaN, -1] };
  check(e, { vllmImportanceSamplingCorrection: true }, "engineLogp", 0, 0);
});

// ---- finite differences -------------------------------------------------------------------------

interface Case {
  readonly seqs: LossSequence[];
  readonly options: LossOptions;
}

const small = (min: number, max: number) =>
  fc.double({ min, max, noNaN: true, noDefaultInfinity: true });

const caseArb: fc.Arbitrary<Case> = fc
  .record({
    lossType: fc.constantFrom("grpo", "bnpo", "dr_grpo", "dapo" as const),
    level: fc.constantFrom("token", "sequence" as const),
    beta: fc.oneof(fc.constant(0), small(0.01, 0.5)),
    correction: fc.boolean(),
    mode: fc.constantFrom(
      "token_truncate",
      "token_mask",
      "sequence_truncate",
      "sequence_mask" as const,
    ),
    epsilonHigh: fc.oneof(fc.constant(null), fc.constant(0.28)),
    delta: fc.oneof(fc.constant(null), fc.constant(1.35)),
    topEntropyQuantile: fc.oneof(fc.constant(1), fc.constant(0.5)),
    maskTruncated: fc.boolean(),
    seqs: fc.array(
      fc.integer({ min: 1, max: 5 }).chain((T) =>
        fc.record({
          logp: fc.array(small(-3, -0.05), { minLength: T, maxLength: T }),
          oldShift: fc.option(fc.array(small(-0.4, 0.4), { minLength: T, maxLength: T })),
          refShift: fc.array(small(-1, 1), { minLength: T, maxLength: T }),
          engineShift: fc.array(small(-0.6, 0.6), { minLength: T, maxLength: T }),
          mask: fc.array(fc.constantFrom(0, 1, 1, 1), { minLength: T, maxLength: T }),
          entropy: fc.array(small(0, 3), { minLength: T, maxLength: T }),
          advantage: fc.oneof(small(-2, -0.05), small(0.05, 2)),
          endedWithEos: fc.boolean(),
        })
      ),
      { minLength: 1, maxLength: 3 },
    ),
  })
  .map((r) => ({
    seqs: r.seqs.map((s) => ({
      logp: s.logp,
      oldLogp: s.oldShift === null ? null : s.logp.map((v, t) => v + s.oldShift![t]),
      refLogp: s.logp.map((v, t) => v + s.refShift[t]),
      engineLogp: s.logp.map((v, t) => v + s.engineShift[t]),
      mask: s.mask,
      entropy: s.entropy,
      advantage: s.advantage,
      endedWithEos: s.endedWithEos,
    })),
    options: {
      lossType: r.lossType,
      importanceSamplingLevel: r.level,
      beta: r.beta,
      epsilon: 0.2,
      epsilonHigh: r.epsilonHigh,
      delta: r.delta,
      maxCompletionLength: 7,
      dapoNormalizer: 6.5,
      gradientAccumulationSteps: 2,
      vllmImportanceSamplingCorrection: r.correction,
      vllmImportanceSamplingMode: r.mode,
      vllmImportanceSamplingClipMax: 1.6,
      vllmImportanceSamplingClipMin: 0.5,
      topEntropyQuantile: r.topEntropyQuantile,
      maskTruncatedCompletions: r.maskTruncated,
    },
  }));

/** Distance of every ratio that feeds a clamp/min to the nearest kink (relative). */
const nearKink = ({ seqs, options: o }: Case): boolean => {
  const kinks = [0.8, 1 + (o.epsilonHigh ?? 0.2), ...(o.delta == null ? [] : [o.delta])];
  const near = (c: number) => kinks.some((k) => Math.abs(c - k) < 1e-4);
  return seqs.some((s) => {
    const old = s.oldLogp ?? s.logp;
    const m = Array.from(s.mask, (v) => o.maskTruncatedCompletions && !s.endedWithEos ? 0 : v);
    if (o.importanceSamplingLevel === "sequence") {
      const M = Math.max(m.reduce((a, b) => a + b, 0), 1);
      let lr = 0;
      for (let t = 0; t < m.length; t++) lr += (s.logp[t] - old[t]) * m[t];
      return near(Math.exp(lr / M));
    }
    return Array.from(s.logp).some((v, t) => m[t] === 1 && near(Math.exp(v - old[t])));
  });
};

Deno.test("property: dLogp equals central finite differences of the loss", () => {
  const h = 1e-6;
  fc.assert(
    fc.property(caseArb, (c) => {
      fc.pre(!nearKink(c));
      const r = Effect.runSync(grpoLoss(c.seqs, c.options));
      // "old = null" means logp detached: hold it at the unperturbed values while perturbing.
      const detached = c.seqs.map((s) => ({ ...s, oldLogp: s.oldLogp ?? Array.from(s.logp) }));
      c.seqs.forEach((s, i) => {
        for (let t = 0; t < s.logp.length; t++) {
          const at = (dx: number) => {
            const seqs = detached.map((d, j) =>
              j !== i ? d : { ...d, logp: Array.from(d.logp, (v, k) => k === t ? v + dx : v) }
            );
            return Effect.runSync(grpoLoss(seqs, c.options)).loss;
          };
          const fd = (at(h) - at(-h)) / (2 * h);
          const g = r.dLogp[i][t];
          if (Math.abs(fd - g) > 1e-6 * Math.max(1, Math.abs(g))) {
            throw new Error(`seq ${i} token ${t}: analytic ${g}, finite difference ${fd}`);
          }
        }
      });
    }),
    { numRuns: 400 },
  );
});

// ---- config -------------------------------------------------------------------------------------

Deno.test("config: TRL defaults, snake_case and camelCase names, deprecated cap alias", () => {
  const d = grpoConfigDefaults;
  assertEquals(
    [d.numGenerations, d.maxCompletionLength, d.temperature, d.topP, d.topK, d.epsilon],
    [8, 512, 1, 1, 0, 0.2],
  );
  assertEquals([d.epsilonHigh, d.beta, d.numIterations, d.lossType, d.scaleRewards], [
    null,
    0,
    1,
    "dapo",
    "group",
  ]);
  assertEquals([d.importanceSamplingLevel, d.learningRate], ["token", 1e-6]);
  assertEquals(
    [d.vllmImportanceSamplingMode, d.vllmImportanceSamplingClipMax, d.topEntropyQuantile],
    ["sequence_mask", 3, 1],
  );
  const c = Effect.runSync(decodeGrpoConfig({
    loss_type: "grpo",
    epsilonHigh: 0.28,
    vllm_importance_sampling_cap: 2,
    scale_rewards: "batch",
  }));
  assertEquals(
    [c.lossType, c.epsilonHigh, c.vllmImportanceSamplingClipMax, c.scaleRewards, c.beta],
    ["grpo", 0.28, 2, "batch", 0],
  );
  // a decoded config spreads into the loss options
  close(loss(twoSeqs, { ...c, vllmImportanceSamplingCorrection: false }).loss, -0.25);
});

Deno.test("config: a bad value or name is one line naming the option and the allowed values", () => {
  const err = (input: unknown): GrpoConfigError => {
    const e = Effect.runSync(Effect.flip(decodeGrpoConfig(input)));
    assert(e instanceof GrpoConfigError);
    assert(!e.message.includes("\n"), e.message);
    return e;
  };
  assertEquals(
    err({ loss_type: "ppo" }).message,
    'GRPO option lossType (TRL loss_type): got "ppo"; allowed: "grpo" | "bnpo" | "dr_grpo" | "dapo"',
  );
  assertEquals(
    err({ numGenerations: 1 }).message,
    "GRPO option numGenerations (TRL num_generations): got 1; allowed: an integer >= 2",
  );
  assertEquals(
    err({ vllm_importance_sampling_mode: "seq" }).message,
    "GRPO option vllmImportanceSamplingMode (TRL vllm_importance_sampling_mode): " +
      'got "seq"; allowed: "token_truncate" | "token_mask" | "sequence_truncate" | "sequence_mask"',
  );
  assertEquals(
    err({ lossTyp: "grpo" }).message,
    'unknown GRPO option "lossTyp"; did you mean lossType?',
  );
  assertEquals(err({ beta: -1 }).option, "beta");
  assert(err({ topEntropyQuantile: 1.5 }).message.includes("[0, 1]"));
  assert(err({ loss_type: "grpo", lossType: "dapo" }).message.includes("twice"));
});
