/**
 * The GRPO pipeline as composable Effect Stream stages:
 *
 *   steps → rollout → reward → advantage → update → snapshot → push
 *
 * Each stage is a function Stream<In> → Stream<Out> with typed errors and service requirements
 * (RolloutEngine, PushTarget), so users recombine them: swap the reward list, insert a filter
 * between stages, or provide another PushTarget Layer. Stages run one step at a time, in order,
 * so step k+1's rollouts always come from the snapshot pushed at step k (on-policy), unless
 * {@link boundedStaleness} runs the rollout stages ahead of training (asynchronous GRPO).
 * @module
 */
import { Effect, Queue, Stream } from "effect";
import type { BackendError } from "../backend/ops.ts";
import { groupAdvantages } from "../grpo/advantages.ts";
import type { GrpoConfig } from "../grpo/config.ts";
import type { GrpoInputError, GrpoNumericError } from "../grpo/errors.ts";
import { countLossTokens, grpoLoss, type LossSequence } from "../grpo/loss.ts";
import {
  type NamedReward,
  type RewardError,
  rewardMetrics,
  type RewardTable,
  scoreRewards,
} from "../grpo/rewards.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import { Rng } from "../model/rng.ts";
import type { Snapshot } from "../snapshot/snapshot.ts";
import type { NonFiniteStepError, Policy, StepStats, TrainSequence } from "../train/policy.ts";
import {
  RolloutEngine,
  type RolloutError,
  type RolloutRequest,
  type RolloutResult,
} from "../ports/rollout_engine.ts";
import {
  type PushReport,
  PushTarget,
  type SyncError,
  type SyncMismatch,
} from "../ports/push_target.ts";

/** A prompt with its reference answer (null when the task has none). */
export interface PromptItem {
  /** The text the model is prompted with (for chat data: the rendered conversation). */
  readonly prompt: string;
  readonly answer: string | null;
  /**
   * Whether the tokenizer's BOS is prepended (default true). False for text that already holds
   * its special tokens, such as a rendered chat template (TRL tokenizes with
   * `add_special_tokens=False` and lets the template decide).
   */
  readonly addSpecialTokens?: boolean;
  /** The dataset row the prompt came from, every column by name (given to reward functions). */
  readonly row?: Readonly<Record<string, unknown>>;
}

/** Which prompt of the run a draw is: the step and its index among the step's prompts. */
export interface PromptDraw {
  readonly step: number;
  readonly index: number;
  readonly promptsPerStep: number;
}

/**
 * Where prompts come from: a function of the step's random stream (and, for sources that walk a
 * dataset in epochs, of which draw of the run it is).
 */
export type PromptSource = (rng: Rng, draw: PromptDraw) => PromptItem;

/** Per-stage wall time in ms, filled as the step moves through the pipeline. */
export type StageTimes = Record<string, number>;

/** A step entering the pipeline. */
export interface Step {
  readonly step: number;
  readonly times: StageTimes;
}

/** Rollouts of one step: P prompts × G completions, flattened prompt-major. */
export interface Rollouts extends Step {
  readonly prompts: readonly PromptItem[];
  readonly numGenerations: number;
  readonly result: RolloutResult;
  /** Training sequences, prompt-major (index = prompt * G + j). */
  readonly sequences: readonly TrainSequence[];
  readonly completionTexts: readonly string[];
  readonly engineLogp: readonly (readonly number[])[];
  readonly endedWithEos: readonly boolean[];
  /**
   * Per-token loss masks of the completions (1 = trained, 0 = environment / tool output), from
   * the multi-turn rollout stage (multi_turn.ts); absent = every completion token is trained.
   */
  readonly lossMasks?: readonly (readonly number[])[];
  /** Model turns of each episode (multi-turn rollouts only). */
  readonly turns?: readonly number[];
}

/** Rollouts with rewards. */
export interface Scored extends Rollouts {
  readonly rewards: RewardTable;
}

/** Rollouts with rewards and advantages. */
export interface Advantaged extends Scored {
  readonly advantages: Float64Array;
  readonly metrics: Record<string, number>;
}

/** After the optimizer step. */
export interface Updated extends Advantaged {
  readonly stats: StepStats;
}

/** After the snapshot. */
export interface Snapshotted extends Updated {
  readonly snapshot: Snapshot;
}

/** After the push. */
export interface Pushed extends Snapshotted {
  readonly push: PushReport;
}

/**
 * One stage's per-step effect as a traced function: a span named after the stage, and the
 * stage's wall time recorded in the step's `times` under the same name.
 */
export const timedStage = <A extends Step, B, E, R>(
  name: string,
  f: (a: A) => Effect.Effect<B, E, R>,
): (a: A) => Effect.Effect<B & { times: StageTimes }, E, R> =>
  Effect.fn(name)(function* (a: A): Effect.fn.Return<B & { times: StageTimes }, E, R> {
    const t0 = performance.now();
    const b = yield* f(a);
    return { ...b, times: { ...a.times, [name]: performance.now() - t0 } };
  });

/** Steps first..last as a stream (one element per chunk, so stages interleave per step). */
export const steps = (first: number, last: number): Stream.Stream<Step> =>
  Stream.range(first, last).pipe(Stream.rechunk(1), Stream.map((step) => ({ step, times: {} })));

/** Rollout stage options. */
export interface RolloutOptions {
  readonly tokenizer: Tokenizer;
  readonly prompts: PromptSource;
  readonly promptsPerStep: number;
  readonly config: GrpoConfig;
  /** Prompts and sampling seeds are derived from (seed, step): a resumed run replays exactly. */
  readonly seed: number;
  /** Longer prompts keep their last this many tokens (TRL max_prompt_length); null = no limit. */
  readonly maxPromptLength?: number | null;
}

/** A prompt's token ids: BOS first unless the item says not, left-truncated to `max` tokens. */
export const promptTokens = (
  tok: Tokenizer,
  item: PromptItem,
  max: number | null = null,
): number[] => {
  const ids = [
    ...(tok.bosId === null || item.addSpecialTokens === false ? [] : [tok.bosId]),
    ...tok.encode(item.prompt),
  ];
  return max !== null && ids.length > max ? ids.slice(ids.length - max) : ids;
};

/** Samples prompts and asks the RolloutEngine for G completions of each. */
export const rollout = (o: RolloutOptions) =>
<E, R>(
  s: Stream.Stream<Step, E, R>,
): Stream.Stream<Rollouts, E | RolloutError, R | typeof RolloutEngine.Identifier> =>
  Stream.mapEffect(
    s,
    timedStage("rollout", (st: Step) =>
      Effect.gen(function* () {
        const engine = yield* RolloutEngine;
        const rng = new Rng([o.seed >>> 0, st.step >>> 0, 0x9e3779b9, 7]);
        const prompts = Array.from(
          { length: o.promptsPerStep },
          (_, index) => o.prompts(rng, { step: st.step, index, promptsPerStep: o.promptsPerStep }),
        );
        const G = o.config.numGenerations;
        const requests: RolloutRequest[] = prompts.map((p, i) => ({
          prompt: promptTokens(o.tokenizer, p, o.maxPromptLength ?? null),
          n: G,
          maxTokens: o.config.maxCompletionLength,
          temperature: o.config.temperature,
          topP: o.config.topP,
          topK: o.config.topK,
          seed: ((o.seed * 1_000_003 + st.step * 10_007 + i * G) >>> 0) % 2147483647,
          stopTokenIds: [o.tokenizer.eosId],
        }));
        const result = yield* engine.generate(requests);
        const sequences: TrainSequence[] = [];
        const texts: string[] = [];
        const engineLogp: number[][] = [];
        const ended: boolean[] = [];
        result.completions.forEach((group, i) =>
          group.forEach((c) => {
            sequences.push({ prompt: requests[i].prompt, completion: c.tokens });
            texts.push(o.tokenizer.decode(c.tokens));
            engineLogp.push([...c.logprobs]);
            ended.push(c.finishReason === "stop");
          })
        );
        return {
          ...st,
          prompts,
          numGenerations: G,
          result,
          sequences,
          completionTexts: texts,
          engineLogp,
          endedWithEos: ended,
        };
      })),
  );

/** Scores every completion with the weighted reward functions. */
export const reward =
  (rewards: readonly NamedReward[], weights?: readonly number[] | null) =>
  <E, R>(
    s: Stream.Stream<Rollouts, E, R>,
  ): Stream.Stream<Scored, E | RewardError, R> =>
    Stream.mapEffect(
      s,
      timedStage("reward", (r: Rollouts) =>
        Effect.map(
          scoreRewards(rewards, r.completionTexts, {
            prompts: r.prompts.flatMap((p) => Array(r.numGenerations).fill(p.prompt)),
            answers: r.prompts.flatMap((p) => Array(r.numGenerations).fill(p.answer)),
            completionIds: r.sequences.map((q) => q.completion),
            rows: r.prompts.flatMap((p) => Array(r.numGenerations).fill(p.row ?? null)),
          }, { rewardWeights: weights ?? null }),
          (table) => ({ ...r, rewards: table }),
        )),
    );

/** `multi_turn/turns_mean` and `multi_turn/env_tokens_mean` (environment tokens per episode). */
const multiTurnMetrics = (
  turns: readonly number[],
  masks: readonly (readonly number[])[],
): Record<string, number> => {
  const n = Math.max(1, turns.length);
  const env = masks.reduce((a, m) => a + m.filter((x) => x === 0).length, 0);
  return {
    "multi_turn/turns_mean": turns.reduce((a, b) => a + b, 0) / n,
    "multi_turn/env_tokens_mean": env / n,
  };
};

/** Group-relative advantages (scale_rewards as configured) and the rollout metrics. */
export const advantage = (config: GrpoConfig) =>
<E, R>(
  s: Stream.Stream<Scored, E, R>,
): Stream.Stream<Advantaged, E | GrpoInputError | GrpoNumericError, R> =>
  Stream.mapEffect(
    s,
    timedStage("advantage", (r: Scored) =>
      Effect.map(
        groupAdvantages(r.rewards.combined, {
          numGenerations: r.numGenerations,
          scaleRewards: config.scaleRewards,
        }),
        (a) => {
          const lengths = r.sequences.map((q) => q.completion.length);
          const metrics: Record<string, number> = {
            ...a.metrics,
            ...rewardMetrics(r.rewards.names, r.rewards.perFunction),
            "completions/mean_length": lengths.reduce((x, y) => x + y, 0) /
              Math.max(1, lengths.length),
            "completions/min_length": Math.min(...lengths),
            "completions/max_length": Math.max(...lengths),
            "completions/clipped_ratio": r.endedWithEos.filter((e) => !e).length /
              Math.max(1, lengths.length),
            ...(r.turns && r.lossMasks ? multiTurnMetrics(r.turns, r.lossMasks) : {}),
          };
          return { ...r, advantages: a.advantages, metrics };
        },
      )),
  );

/** Update stage options. */
export interface UpdateOptions {
  readonly policy: Policy;
  readonly config: GrpoConfig;
}

/**
 * One GRPO optimizer step per generation batch for each of num_iterations (old log-probs are
 * recorded before the first pass when they are needed); the loss is computed on the host from
 * the device's token log-probs and its gradient flows back through the model.
 */
export const update = (o: UpdateOptions) =>
<A extends Advantaged, E, R>(
  s: Stream.Stream<A, E, R>,
): Stream.Stream<
  A & Updated,
  E | BackendError | NonFiniteStepError | GrpoInputError | GrpoNumericError,
  R
> =>
  Stream.mapEffect(
    s,
    timedStage("update", (r: A) =>
      Effect.gen(function* () {
        const c = o.config;
        const needOld = c.numIterations > 1;
        const old = needOld ? yield* o.policy.logProbs(r.sequences, c.temperature) : null;
        const ref = c.beta !== 0
          ? yield* o.policy.logProbs(r.sequences, c.temperature, true)
          : null;
        // multi-turn episodes train only the model's own tokens (environment tokens: mask 0)
        const masks = r.sequences.map((q, i) =>
          r.lossMasks
            ? Float64Array.from(r.lossMasks[i])
            : new Float64Array(q.completion.length).fill(1)
        );
        const dapoNormalizer = countLossTokens(
          masks.map((mask, i) => ({ mask, endedWithEos: r.endedWithEos[i] })),
          c.maskTruncatedCompletions,
        );
        let stats: StepStats | null = null;
        for (let it = 0; it < c.numIterations; it++) {
          stats = yield* o.policy.step(r.sequences, c.temperature, (lp) =>
            Effect.map(
              grpoLoss(
                lp.logp.map((logp, i): LossSequence => ({
                  logp,
                  oldLogp: old ? old[i] : null,
                  refLogp: ref ? ref[i] : null,
                  // a token whose engine logprob is unknown (NaN: vLLM's clamp) gets no
                  // correction: its engine logp is taken as the old policy's, ratio 1
                  engineLogp: c.vllmImportanceSamplingCorrection ||
                      c.offPolicyMaskThreshold !== null
                    ? r.engineLogp[i].map((e, t) =>
                      Number.isNaN(e) ? (old ? old[i][t] : logp[t]) : e
                    )
                    : null,
                  mask: masks[i],
                  entropy: lp.entropy[i],
                  advantage: r.advantages[i],
                  endedWithEos: r.endedWithEos[i],
                })),
                { ...c, dapoNormalizer, gradientAccumulationSteps: 1 },
              ),
              (res) => ({
                loss: res.loss,
                dLogp: res.dLogp,
                metrics: res.metrics as Record<string, number>,
              }),
            ));
        }
        return { ...r, stats: stats! };
      })),
  );

/** Takes an immutable snapshot of the policy after its update. */
export const snapshot = (policy: Policy) =>
<A extends Step, E, R>(
  s: Stream.Stream<A, E, R>,
): Stream.Stream<A & { snapshot: Snapshot }, E | BackendError | NonFiniteStepError, R> =>
  Stream.mapEffect(
    s,
    timedStage(
      "snapshot",
      (a: A) => Effect.map(policy.snapshot(), (snap) => ({ ...a, snapshot: snap })),
    ),
  );

/**
 * Does the trainer-device part of each snapshot's push ahead (PushTarget.prepare, when the target
 * has one), so that a push running beside the next update waits only on the engine.
 */
export const preparePush = <A extends Step & { snapshot: Snapshot }, E, R>(
  s: Stream.Stream<A, E, R>,
): Stream.Stream<A, E | SyncError, R | typeof PushTarget.Identifier> =>
  Stream.mapEffect(
    s,
    timedStage("prepare_push", (a: A) =>
      Effect.gen(function* () {
        const target = yield* PushTarget;
        if (target.prepare) yield* target.prepare(a.snapshot);
        return a;
      })),
  );

/** Publishes each snapshot to the PushTarget (which verifies it). */
export const push = <A extends Step & { snapshot: Snapshot }, E, R>(
  s: Stream.Stream<A, E, R>,
): Stream.Stream<
  A & { push: PushReport },
  E | SyncError | SyncMismatch,
  R | typeof PushTarget.Identifier
> =>
  Stream.mapEffect(
    s,
    timedStage("push", (a: A) =>
      Effect.gen(function* () {
        const target = yield* PushTarget;
        return { ...a, push: yield* target.push(a.snapshot) };
      })),
  );

// ---- asynchronous GRPO: rollouts ahead of training, bounded staleness -------------------------

/** Options of {@link boundedStaleness}. */
export interface StalenessOptions {
  /** Versions rollouts may run ahead of training, >= 1 (0 is the plain, sequential pipeline). */
  readonly maxStaleness: number;
  /** The version pushed before the first step (the policy the first rollouts come from). */
  readonly initialVersion: number;
}

/** What the trainer knows about a batch's staleness when it starts training on it. */
export interface StalenessInfo {
  /** The snapshot version the batch was generated from. */
  readonly generatedFrom: number;
  /** The version the trainer is about to update (its latest snapshot). */
  readonly trainerVersion: number;
  /** Snapshots between the two (0 = on-policy). */
  readonly staleness: number;
}

/** A batch on its way through training, with its staleness and the step's async metrics. */
export interface Staled {
  readonly stale: StalenessInfo;
  /**
   * `async/staleness_mean`, `async/staleness_max` (in versions, over the batch's samples),
   * `async/trainer_wait_ms` (the trainer idle before this batch was ready) and
   * `async/dropped_stale` (batches dropped so far for being too stale).
   */
  readonly asyncMetrics: Record<string, number>;
}

/**
 * Asynchronous GRPO as three stages joined by bounded buffers, each running in a fiber of its
 * own: `produce` (rollout → reward → advantage) runs ahead of `train` (update → snapshot), which
 * consumes its batches in order and hands each snapshot to `publish` (push), so the next update
 * can start while the engine loads and verifies the last snapshot (the push's own work on the
 * trainer's device, the verification probe's forward pass, belongs at the end of `train`:
 * {@link preparePush}). Staleness is bounded by
 * credits: the producer takes one credit per batch before it asks the engine for rollouts; there
 * are `maxStaleness + 1` to begin with and one comes back after each publish. So the batch trained
 * at step s was started after the publish of step s - maxStaleness - 1 and comes from that
 * version or a newer one, while the trainer is at version s - 1: at most `maxStaleness` apart.
 * The trainer still checks every batch against the versions it has made and drops (never trains
 * on) one that is too stale or comes from a version it did not make, returning its credit; with
 * the credits that never happens, the check makes the bound hold whatever the engine reports.
 */
export const boundedStaleness = <
  A extends Step & { readonly result: RolloutResult },
  B extends Step & { readonly snapshot: Snapshot },
  C,
  E1,
  R1,
  E2,
  R2,
  E3,
  R3,
>(
  options: StalenessOptions,
  source: Stream.Stream<Step>,
  produce: (s: Stream.Stream<Step>) => Stream.Stream<A, E1, R1>,
  train: (s: Stream.Stream<A & Staled, E1, R1>) => Stream.Stream<B, E2, R2>,
  publish: (s: Stream.Stream<B, E2, R1 | R2>) => Stream.Stream<C, E3, R3>,
): Stream.Stream<C, E3, R1 | R2 | R3> =>
  Stream.unwrap(Effect.gen(function* () {
    const k = options.maxStaleness;
    const credits = yield* Queue.unbounded<void>();
    yield* Queue.offerAll(credits, Array.from({ length: k + 1 }, () => undefined));
    // the trainer's snapshot versions, oldest first: staleness counts them, not optimizer steps
    const versions: number[] = [options.initialVersion];
    let dropped = 0;
    let idleSince = performance.now();
    const gated = Stream.mapEffect(source, (st) => Effect.as(Queue.take(credits), st));
    const checked = produce(gated).pipe(
      Stream.buffer({ capacity: k }),
      // one batch at a time from here: its staleness is measured right before it trains
      Stream.rechunk(1),
      Stream.mapEffect((a) =>
        Effect.gen(function* () {
          const at = versions.lastIndexOf(a.result.policyVersion);
          const staleness = at < 0 ? Infinity : versions.length - 1 - at;
          if (staleness > k) {
            dropped++;
            yield* Queue.offer(credits, undefined);
            return null;
          }
          const waitMs = performance.now() - idleSince;
          const stale: StalenessInfo = {
            generatedFrom: a.result.policyVersion,
            trainerVersion: versions[versions.length - 1],
            staleness,
          };
          // one engine call per batch: every sample of it shares the batch's version
          const asyncMetrics = {
            "async/staleness_mean": staleness,
            "async/staleness_max": staleness,
            "async/trainer_wait_ms": waitMs,
            "async/dropped_stale": dropped,
          };
          return { ...a, stale, asyncMetrics } as A & Staled;
        })
      ),
      Stream.filter((a): a is A & Staled => a !== null),
    );
    const trained = train(checked).pipe(
      Stream.tap((b) =>
        Effect.sync(() => {
          versions.push(b.snapshot.version);
          idleSince = performance.now();
        })
      ),
      // one snapshot may wait for its publish while the next update runs
      Stream.buffer({ capacity: 1 }),
      Stream.rechunk(1),
    );
    return publish(trained).pipe(Stream.tap(() => Queue.offer(credits, undefined)));
  }));
