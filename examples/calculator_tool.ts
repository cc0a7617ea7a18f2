/**
 * Example: multi-turn, tool-using GRPO. The built-in model (pretrained only on two-number sums)
 * is asked three-number sums, which it cannot do; a calculator environment answers them when the
 * model calls it (an empty turn), and the model learns to call it and accept its answer. The
 * calculator's tokens are masked out of the loss; the reward sees the whole episode.
 *
 *   deno run -A examples/calculator_tool.ts [steps]
 */
import { Effect, Layer, Stream } from "effect";
import {
  advantage,
  Backend,
  type BackendShape,
  type BaseModel,
  BUILTIN_MODEL_DIR,
  calculatorTask,
  cpuBackend,
  decodeGrpoConfig,
  episodeAccuracy,
  loadBase,
  LocalEngineLive,
  multiTurnRollout,
  Policy,
  push,
  PushTarget,
  type PushTargetShape,
  reward,
  type RolloutEngineShape,
  snapshot,
  snapshotModel,
  steps,
  update,
} from "../mod.ts";

/** What a run of the example reports. */
export interface CalculatorRun {
  /** Mean episode reward (exact match) per step. */
  readonly rewards: number[];
  /** Share of episodes per step that called the calculator. */
  readonly callRates: number[];
  /** The policy version each step's rollouts came from. */
  readonly rolloutVersions: number[];
  /** Greedy held-out exact match before and after training. */
  readonly accuracyBefore: number;
  readonly accuracyAfter: number;
  readonly version: number;
}

/** The rollout engine and push target of a run (default the in-process engine). */
export type EngineLayer<E> = (
  base: BaseModel,
) => Layer.Layer<RolloutEngineShape | PushTargetShape, E, BackendShape>;

const localEngine: EngineLayer<never> = () => LocalEngineLive(1);

/** Trains `n` steps of `promptsPerStep` prompts with the calculator. */
export const runExample = <E = never>(
  n: number,
  promptsPerStep = 8,
  heldOutSize = 50,
  engine: EngineLayer<E> = localEngine as EngineLayer<E>,
) =>
  Effect.gen(function* () {
    const base = yield* loadBase(BUILTIN_MODEL_DIR);
    return yield* train(base, n, promptsPerStep, heldOutSize).pipe(
      Effect.scoped,
      Effect.provide(engine(base)),
    );
  }).pipe(Effect.provide(Layer.succeed(Backend, cpuBackend())));

const train = (base: BaseModel, n: number, promptsPerStep: number, heldOutSize: number) =>
  Effect.gen(function* () {
    const backend = yield* Backend;
    const tok = base.tokenizer;
    const task = calculatorTask(tok, { heldOutSize });
    const config = yield* decodeGrpoConfig({
      numGenerations: 8,
      maxCompletionLength: task.limits.maxEpisodeTokens,
      learningRate: 3e-3,
      epsilonHigh: 0.28,
    });
    const policy = yield* Policy.make(backend, base.config, base.weights, {
      mode: "lora",
      lora: {
        r: 8,
        alpha: 16,
        dropout: 0,
        targetModules: ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        useRslora: false,
      },
      seed: 1,
      optimizer: {
        learningRate: config.learningRate,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weightDecay: 0,
        maxGradNorm: 1,
      },
    });
    const heldOutAccuracy = () =>
      Effect.scoped(Effect.gen(function* () {
        const snap = yield* policy.snapshot();
        const m = yield* snapshotModel(snap, backend);
        return yield* episodeAccuracy(backend, m.model, m.lora, tok, task.heldOut, task.limits);
      }));
    const accuracyBefore = yield* heldOutAccuracy();
    const target = yield* PushTarget;
    yield* target.push(yield* policy.snapshot());
    const rewards: number[] = [];
    const callRates: number[] = [];
    const rolloutVersions: number[] = [];
    yield* steps(1, n).pipe(
      multiTurnRollout({
        tokenizer: tok,
        prompts: task.prompts,
        promptsPerStep,
        config,
        seed: 1,
        environment: task.environment,
        ...task.limits,
      }),
      reward(task.rewards),
      advantage(config),
      update({ policy, config }),
      snapshot(policy),
      push,
      Stream.runForEach((b) =>
        Effect.sync(() => {
          rewards.push(b.metrics.reward);
          rolloutVersions.push(b.result.policyVersion);
          // a call is answered by the environment: the episode holds tokens of mask 0
          const calls = (b.lossMasks ?? []).filter((m) => m.includes(0)).length;
          callRates.push(calls / b.sequences.length);
        })
      ),
    );
    const accuracyAfter = yield* heldOutAccuracy();
    return {
      rewards,
      callRates,
      rolloutVersions,
      accuracyBefore,
      accuracyAfter,
      version: policy.version,
    };
  });

if (import.meta.main) {
  const r = await Effect.runPromise(runExample(Number(Deno.args[0] ?? 30)));
  const f = (xs: number[]) => xs.map((x) => x.toFixed(2)).join(" ");
  console.log(`reward per step:    ${f(r.rewards)}`);
  console.log(`call rate per step: ${f(r.callRates)}`);
  console.log(`held-out greedy exact match: ${r.accuracyBefore} -> ${r.accuracyAfter}`);
}
