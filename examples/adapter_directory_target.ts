/**
 * Example: swapping the PushTarget. Every snapshot is still pushed to the in-process engine, and
 * additionally written as a PEFT adapter directory (policy-v{k}) — the layout vLLM's
 * /v1/load_lora_adapter reads — by a user-defined target that wraps the built-in one.
 *
 *   deno run -A examples/adapter_directory_target.ts
 */
import { Context, Effect, Layer, Stream } from "effect";
import { join } from "node:path";
import {
  advantage,
  arithmeticTask,
  Backend,
  BUILTIN_MODEL_DIR,
  cpuBackend,
  decodeGrpoConfig,
  exactMatchReward,
  exportAdapter,
  loadBase,
  makeLocalEngine,
  Policy,
  push,
  PushTarget,
  type PushTargetShape,
  reward,
  rollout,
  RolloutEngine,
  snapshot,
  steps,
  SyncError,
  update,
} from "../mod.ts";

/** Local engine + a target that also exports each snapshot's adapter under `dir`. */
const AdapterDirectoryLive = (dir: string) =>
  Layer.effectContext(Effect.gen(function* () {
    const { engine, target } = yield* makeLocalEngine(yield* Backend, 2);
    const wrapped: PushTargetShape = {
      name: "in-process+adapter-dir",
      push: (snap) =>
        Effect.gen(function* () {
          yield* exportAdapter(
            snap,
            join(dir, `policy-v${snap.version}`),
            "lorafold-arithmetic-base",
          ).pipe(
            Effect.mapError((e) =>
              new SyncError({
                target: "adapter-dir",
                version: snap.version,
                reason: e.message,
                cause: e,
              })
            ),
          );
          return yield* target.push(snap);
        }),
    };
    return Context.add(Context.make(RolloutEngine, engine), PushTarget, wrapped);
  }));

/** Trains `n` steps, writing adapters to `dir`; returns the versions written. */
export const runExample = (n: number, dir: string) =>
  Effect.gen(function* () {
    const base = yield* loadBase(BUILTIN_MODEL_DIR);
    const backend = yield* Backend;
    const config = yield* decodeGrpoConfig({
      numGenerations: 4,
      maxCompletionLength: 5,
      learningRate: 3e-3,
    });
    const policy = yield* Policy.make(backend, base.config, base.weights, {
      mode: "lora",
      lora: { r: 4, alpha: 8, dropout: 0, targetModules: ["q_proj", "v_proj"], useRslora: false },
      seed: 2,
      optimizer: {
        learningRate: config.learningRate,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weightDecay: 0,
        maxGradNorm: 1,
      },
    });
    yield* (yield* PushTarget).push(yield* policy.snapshot());
    const task = arithmeticTask();
    const versions: number[] = [];
    yield* steps(1, n).pipe(
      rollout({
        tokenizer: base.tokenizer,
        prompts: (rng) => task.sample(rng),
        promptsPerStep: 4,
        config,
        seed: 2,
      }),
      reward([exactMatchReward]),
      advantage(config),
      update({ policy, config }),
      snapshot(policy),
      push,
      Stream.runForEach((b) => Effect.sync(() => versions.push(b.push.version))),
    );
    return versions;
  }).pipe(
    Effect.scoped,
    Effect.provide(AdapterDirectoryLive(dir)),
    Effect.provide(Layer.succeed(Backend, cpuBackend())),
  );

if (import.meta.main) {
  const dir = await Deno.makeTempDir();
  console.log(await Effect.runPromise(runExample(3, dir)), "written under", dir);
}
