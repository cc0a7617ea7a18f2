/**
 * The composed GRPO trainer behind `deno task train`: loads the base model, evaluates it, then
 * runs rollout → reward → advantage → update → snapshot → push for each step, logging TRL's
 * metrics to runs/<id>/metrics.jsonl, checkpointing atomically, and finally writing the adapter
 * (PEFT) or the full model, an SVG reward plot and a summary.
 * @module
 */
import { Effect, type Layer, Stream } from "effect";
import { appendFile, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Backend, BackendLive, type BackendShape } from "../backend/backend.ts";
import { type BaseModel, loadBase, type LoadError } from "../model/loader.ts";
import type { TokenizerError } from "../tokenizer/tokenizer.ts";
import type { BackendError } from "../backend/backend.ts";
import type { RewardError } from "../grpo/rewards.ts";
import type { GrpoInputError, GrpoNumericError } from "../grpo/errors.ts";
import { CheckpointError, type SafetensorsError } from "../io/errors.ts";
import {
  errorText,
  fsOp,
  makeDirectory,
  removeStaleTempFiles,
  writeFileAtomic,
} from "../io/checkpoint.ts";
import { type SnapshotCorrupted, snapshotModel } from "../snapshot/snapshot.ts";
import type { Task } from "../task/task.ts";
import { exportAdapter, exportCheckpoint } from "../snapshot/export.ts";
import { lineChartSvg } from "../io/svg_plot.ts";
import { type TrainConfig, TrainConfigError } from "./config.ts";
import { loraConfigOf } from "../lora/config.ts";
import { optimizerConfigOf } from "../train/optimizer_config.ts";
import { loadTrainCheckpoint, saveTrainCheckpoint } from "../train/checkpoint.ts";
import { type NonFiniteStepError, Policy, type StateMismatchError } from "../train/policy.ts";
import { LocalEngineLive } from "../rollout/local.ts";
import { PushTarget } from "../ports/push_target.ts";
import type { RolloutEngineShape, RolloutError } from "../ports/rollout_engine.ts";
import type { PushTargetShape, SyncError, SyncMismatch } from "../ports/push_target.ts";
import {
  advantage,
  type Advantaged,
  boundedStaleness,
  preparePush,
  push,
  type Pushed,
  reward,
  rollout,
  snapshot,
  type Staled,
  type Step,
  steps,
  update,
} from "../pipeline/stages.ts";
import { type EnvironmentError, multiTurnRollout } from "../pipeline/multi_turn.ts";

/** What a finished run reports (also written to runs/<id>/summary.json). */
export interface TrainSummary {
  readonly runDir: string;
  readonly backend: string;
  readonly mode: "lora" | "full";
  readonly engine: string;
  readonly steps: number;
  readonly accuracyBefore: number;
  readonly accuracyAfter: number;
  readonly rewardFirst: number;
  readonly rewardLast: number;
  readonly trainWallS: number;
  readonly trainedTokensPerS: number;
  /** Mean ms per step of each stage. */
  readonly stageMs: Record<string, number>;
  readonly trainableParameters: number;
}

/** The Layer of a run's rollout engine and push target (default in-process; see serverLayer). */
export type RolloutLayerFactory = (
  cfg: TrainConfig,
  base: BaseModel,
) => Layer.Layer<RolloutEngineShape | PushTargetShape, RolloutError | SyncError, BackendShape>;

/** Everything a training run can fail with (each a typed, tagged error). */
export type TrainError =
  | TrainConfigError
  | LoadError
  | TokenizerError
  | BackendError
  | RolloutError
  | EnvironmentError
  | RewardError
  | GrpoInputError
  | GrpoNumericError
  | NonFiniteStepError
  | StateMismatchError
  | SyncError
  | SyncMismatch
  | SnapshotCorrupted
  | CheckpointError
  | SafetensorsError;

const localEngine: RolloutLayerFactory = (cfg) => LocalEngineLive(cfg.seed);

const fmtTime = (s: number): string =>
  !Number.isFinite(s)
    ? "?"
    : s >= 60
    ? `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s`
    : `${s.toFixed(0)}s`;

/** How a run is carried out besides its options. */
export interface TrainRunOptions {
  /** Receives progress lines (transient ones overwrite each other) and result lines. */
  readonly log?: (line: string, transient?: boolean) => void;
  /** Rollout engine and push target; default the in-process engine. */
  readonly rollout?: RolloutLayerFactory;
}

const noLog = (): void => {};

/** The records of a metrics.jsonl file (one JSON object a line; blank lines skipped). */
const parseMetrics = (
  path: string,
  text: string,
): Effect.Effect<Record<string, number>[], CheckpointError> =>
  Effect.forEach(
    text.split("\n").map((l, i) => [l, i] as const).filter(([l]) => l.trim()),
    ([l, i]) =>
      Effect.try({
        try: () => JSON.parse(l) as Record<string, number>,
        catch: (e) =>
          new CheckpointError({
            path,
            tensor: null,
            reason: `line ${i + 1} is not JSON: ${errorText(e)}`,
          }),
      }),
  );

/**
 * Trains `task` with GRPO: evaluates the base model, runs the configured steps through the
 * pipeline stages, evaluates the trained policy and writes the run directory.
 */
export const runTraining: (
  cfg: TrainConfig,
  task: Task,
  options?: TrainRunOptions,
) => Effect.Effect<TrainSummary, TrainError> = Effect.fn("runTraining")(
  function* (
    cfg: TrainConfig,
    task: Task,
    options: TrainRunOptions = {},
  ): Effect.fn.Return<TrainSummary, TrainError> {
    const log = options.log ?? noLog;
    const engineLayer = options.rollout ?? localEngine;
    const modelDir = cfg.model ?? task.baseModelDir;
    if (modelDir === null) {
      return yield* Effect.fail(
        new TrainConfigError({
          option: "model",
          reason: `option model: task "${task.name}" has no base model; give --model DIR`,
        }),
      );
    }
    // a LoRA run keeps a BF16 / F16 checkpoint's matrices 16-bit (its base is frozen)
    const base = yield* loadBase(modelDir, { keepHalf: cfg.mode === "lora" });
    const program = Effect.gen(function* () {
      const backend = yield* Backend;
      const tok = base.tokenizer;
      const runId = cfg.runId ?? new Date().toISOString().replace(/[:.]/g, "-");
      const runDir = join(cfg.outputDir, runId);
      yield* makeDirectory(runDir);
      const metricsPath = join(runDir, "metrics.jsonl");
      const ckptPath = join(runDir, "checkpoint.safetensors");
      const policy = yield* Policy.make(backend, base.config, base.weights, {
        mode: cfg.mode,
        lora: loraConfigOf(cfg),
        seed: cfg.seed,
        optimizer: optimizerConfigOf(cfg, cfg.grpo.learningRate),
      });
      let first = 1;
      const history: Record<string, number>[] = [];
      if (cfg.resume) {
        const ck = yield* loadTrainCheckpoint(ckptPath);
        yield* policy.importState(ck.state);
        first = ck.step + 1;
        // keep the metrics of the steps the checkpoint covers; later lines are replayed
        // cannot fail: a missing or unreadable metrics file counts as empty
        const text = yield* Effect.promise(() => readFile(metricsPath, "utf8").catch(() => ""));
        // a last line without its newline is an append a kill cut short (a step after the
        // checkpoint's): dropped, not an error
        const whole = text.endsWith("\n") ? text : text.slice(0, text.lastIndexOf("\n") + 1);
        const kept = (yield* parseMetrics(metricsPath, whole)).filter((m) => m.step <= ck.step);
        history.push(...kept);
        // atomically: a kill during the rewrite must not lose the kept lines; the temp file
        // of a rewrite an earlier kill cut short goes first (as the checkpoint's does)
        yield* removeStaleTempFiles(metricsPath);
        yield* writeFileAtomic(
          metricsPath,
          new TextEncoder().encode(kept.map((m) => JSON.stringify(m) + "\n").join("")),
        );
        log(`resumed ${runDir} at step ${ck.step} (policy v${ck.state.version})`);
      } else {
        yield* fsOp(
          metricsPath,
          "cannot create the metrics file",
          () => writeFile(metricsPath, ""),
        );
      }
      const maxTokens = cfg.grpo.maxCompletionLength;
      // evaluations run the resident base (with the snapshot's adapter): no model upload
      const evaluate = (label: string) =>
        Effect.scoped(Effect.gen(function* () {
          const snap = yield* policy.snapshot();
          const acc = yield* task.evaluation.run(
            backend,
            yield* snapshotModel(snap, backend),
            tok,
            maxTokens,
          );
          log(`${label}: ${evaluationLine(acc)}`);
          return acc;
        }));
      const evaluationLine = (acc: number) =>
        `${task.evaluation.metric} ${
          task.evaluation.format?.(acc) ?? `${(acc * 100).toFixed(1)}%`
        } (${task.evaluation.detail})`;
      const accBefore = yield* Effect.scoped(Effect.gen(function* () {
        const acc = yield* task.evaluation.run(
          backend,
          { model: yield* policy.base.device(backend), lora: null },
          tok,
          maxTokens,
        );
        log(`base model: ${evaluationLine(acc)}`);
        return acc;
      }));
      const target = yield* PushTarget;
      yield* target.push(yield* policy.snapshot());
      const initialVersion = policy.version;
      const t0 = performance.now();
      let tokens = 0;
      const stageTotals: Record<string, number> = {};
      const total = cfg.steps - first + 1;
      const checkpoint = (step: number) =>
        (cfg.checkpointEvery > 0 && step % cfg.checkpointEvery === 0) || step === cfg.steps
          ? Effect.flatMap(
            policy.exportState(),
            (state) => saveTrainCheckpoint(ckptPath, { step, state }),
          )
          : Effect.void;
      const onStep = (p: Pushed & Partial<Staled>) =>
        Effect.gen(function* () {
          const stepTime = Object.values(p.times).reduce((a, b) => a + b, 0) / 1000;
          const trained = p.sequences.reduce(
            (a, s) => a + s.prompt.length + s.completion.length,
            0,
          );
          tokens += trained;
          for (const [k, v] of Object.entries(p.times)) stageTotals[k] = (stageTotals[k] ?? 0) + v;
          const m: Record<string, number> = {
            step: p.step,
            ...p.metrics,
            ...p.stats.metrics,
            loss: p.stats.loss,
            grad_norm: p.stats.gradNorm,
            learning_rate: cfg.grpo.learningRate,
            num_tokens: (history.at(-1)?.num_tokens ?? 0) + trained,
            step_time: stepTime,
            policy_version: p.snapshot.version,
            rollout_policy_version: p.result.policyVersion,
            ...Object.fromEntries(Object.entries(p.times).map(([k, v]) => [`time/${k}_ms`, v])),
            push_bytes: p.push.bytes,
            push_latency_ms: p.push.latencyMs,
            ...(p.push.logpDiffMax !== null
              ? { "sync/verify_logp_diff_max": p.push.logpDiffMax }
              : {}),
            ...p.push.metrics,
            ...p.asyncMetrics,
          };
          history.push(m);
          // logging_steps thins the log; checkpointed steps are always logged (resume reads them)
          const logged = p.step % cfg.loggingSteps === 0 || p.step === cfg.steps ||
            (cfg.checkpointEvery > 0 && p.step % cfg.checkpointEvery === 0);
          if (logged) {
            yield* fsOp(
              metricsPath,
              "cannot append to the metrics",
              () => appendFile(metricsPath, JSON.stringify(m) + "\n"),
            );
          }
          const done = p.step - first + 1;
          const elapsed = (performance.now() - t0) / 1000;
          if (!cfg.quiet && logged) {
            log(
              `step ${p.step}/${cfg.steps} | reward ${m.reward.toFixed(3)} | reward_std ${
                m.reward_std.toFixed(3)
              } | kl ${(m.kl ?? 0).toFixed(4)} | ${Math.round(tokens / elapsed)} tok/s | ETA ${
                fmtTime((elapsed / done) * (total - done))
              }`,
              true,
            );
          }
          // asynchronously the policy is a step ahead by now: its checkpoint follows its snapshot
          if (cfg.grpo.maxStaleness === 0) yield* checkpoint(p.step);
        });
      const rolloutOptions = {
        tokenizer: tok,
        prompts: task.prompts,
        promptsPerStep: cfg.promptsPerStep,
        config: cfg.grpo,
        seed: cfg.seed,
        maxPromptLength: cfg.maxPromptLength,
      };
      // a task with an environment rolls out multi-turn episodes; the stages after are the same
      const rolloutStage = task.environment
        ? multiTurnRollout({ ...rolloutOptions, environment: task.environment, ...task.limits })
        : rollout(rolloutOptions);
      const produce = <E, R>(s: Stream.Stream<Step, E, R>) =>
        s.pipe(
          rolloutStage,
          reward(task.rewards, cfg.grpo.rewardWeights),
          advantage(cfg.grpo),
        );
      const train = <A extends Advantaged, E, R>(s: Stream.Stream<A, E, R>) =>
        s.pipe(update({ policy, config: cfg.grpo }), snapshot(policy));
      // max_staleness 0: the sequential, on-policy pipeline, exactly as composed before
      const stream = cfg.grpo.maxStaleness === 0
        ? push(train(produce(steps(first, cfg.steps))))
        : boundedStaleness(
          { maxStaleness: cfg.grpo.maxStaleness, initialVersion },
          steps(first, cfg.steps),
          produce,
          // the trainer's side of verification is computed on its own path (preparePush), so
          // the push runs beside the next update and waits only on the engine
          (s) => preparePush(train(s)).pipe(Stream.tap((a) => checkpoint(a.step))),
          push,
        );
      yield* Stream.runDrain(Stream.tap(stream, onStep));
      const trainWallS = (performance.now() - t0) / 1000;
      log("");
      const accAfter = yield* evaluate("trained policy");
      const final = yield* policy.snapshot();
      if (cfg.mode === "lora") yield* exportAdapter(final, join(runDir, "adapter"), base.dir);
      else yield* exportCheckpoint(final, join(runDir, "model"));
      const rewards = history.map((h) => [h.step, h.reward] as const);
      const svg = lineChartSvg(`GRPO ${cfg.mode} — reward per step`, "step", "reward", [
        { label: "reward", points: rewards, color: "#1f77b4" },
        // the first reward function's mean (exact_match for the built-in task)
        ...task.rewards.slice(0, 1).map((r) => ({
          label: `rewards/${r.name}/mean`,
          points: history.map((h) => [h.step, h[`rewards/${r.name}/mean`]] as const),
          color: "#2ca02c",
        })),
      ]);
      const svgPath = join(runDir, "reward.svg");
      yield* fsOp(svgPath, "cannot write the reward plot", () => writeFile(svgPath, svg));
      const steps_ = Math.max(1, total);
      const summary: TrainSummary = {
        runDir,
        backend: `${backend.info.name} (${backend.info.description})`,
        mode: cfg.mode,
        engine: cfg.engine,
        steps: cfg.steps,
        accuracyBefore: accBefore,
        accuracyAfter: accAfter,
        rewardFirst: history[0]?.reward ?? NaN,
        rewardLast: history.at(-1)?.reward ?? NaN,
        trainWallS,
        trainedTokensPerS: tokens / trainWallS,
        stageMs: Object.fromEntries(Object.entries(stageTotals).map(([k, v]) => [k, v / steps_])),
        trainableParameters: policy.trainableParameters,
      };
      const summaryPath = join(runDir, "summary.json");
      yield* fsOp(
        summaryPath,
        "cannot write the summary",
        () => writeFile(summaryPath, JSON.stringify(summary, null, 2) + "\n"),
      );
      // a task's own score format (e.g. a mean reward) names its metric; else an accuracy
      const shown = task.evaluation.format ?? ((x: number) => `${(x * 100).toFixed(1)}%`);
      log(
        `${task.evaluation.format ? task.evaluation.metric : "accuracy"} ${shown(accBefore)} -> ${
          shown(accAfter)
        } in ${trainWallS.toFixed(1)} s; run in ${runDir}`,
      );
      return summary;
    });
    return yield* program.pipe(
      Effect.scoped,
      Effect.provide(engineLayer(cfg, base)),
      Effect.provide(BackendLive(cfg.backend)),
    );
  },
);
