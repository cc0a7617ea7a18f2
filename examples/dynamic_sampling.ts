/**
 * Example: a user-composed GRPO pipeline with a custom reward (exact match minus a penalty for
 * answers longer than needed) and an inserted filter stage that drops steps whose groups carry no
 * learning signal (every group's rewards equal, as in DAPO's dynamic sampling), before the update.
 *
 *   deno run -A examples/dynamic_sampling.ts
 */
import { Effect, Layer, Stream } from "effect";
import {
  advantage,
  arithmeticTask,
  Backend,
  BUILTIN_MODEL_DIR,
  cpuBackend,
  decodeGrpoConfig,
  loadBase,
  LocalEngineLive,
  type NamedReward,
  Policy,
  push,
  PushTarget,
  reward,
  rollout,
  snapshot,
  steps,
  update,
} from "../mod.ts";

/** Exact match, minus 0.5 per extra character. */
const exactWithLengthPenalty: NamedReward = {
  name: "exact_len",
  fn: (completions, ctx) =>
    completions.map((c, i) =>
      (c === ctx.answers[i] ? 1 : 0) - 0.5 * Math.max(0, c.length - (ctx.answers[i]?.length ?? 0))
    ),
};

/** Runs `n` steps and returns per-step reward and how many steps the filter dropped. */
export const runExample = (n: number) =>
  Effect.gen(function* () {
    const base = yield* loadBase(BUILTIN_MODEL_DIR);
    const backend = yield* Backend;
    const config = yield* decodeGrpoConfig({
      numGenerations: 8,
      maxCompletionLength: 5,
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
    const target = yield* PushTarget;
    yield* target.push(yield* policy.snapshot());
    const task = arithmeticTask();
    let dropped = 0;
    const rewards: number[] = [];
    yield* steps(1, n).pipe(
      rollout({
        tokenizer: base.tokenizer,
        prompts: (rng) => task.sample(rng),
        promptsPerStep: 8,
        config,
        seed: 1,
      }),
      reward([exactWithLengthPenalty]),
      advantage(config),
      // the inserted stage: skip batches where no group has reward variance
      Stream.filter((b) => {
        const keep = b.metrics.frac_reward_zero_std < 1;
        if (!keep) dropped++;
        return keep;
      }),
      update({ policy, config }),
      snapshot(policy),
      push,
      Stream.runForEach((b) => Effect.sync(() => rewards.push(b.metrics.reward))),
    );
    return { rewards, dropped, version: policy.version };
  }).pipe(
    Effect.scoped,
    Effect.provide(LocalEngineLive(1)),
    Effect.provide(Layer.succeed(Backend, cpuBackend())),
  );

if (import.meta.main) {
  const r = await Effect.runPromise(runExample(10));
  console.log(r);
}
