/**
 * The in-process rollout engine and its push target: rollouts are generated from the most
 * recently pushed snapshot, held in a scope of its own. A newer push retires it; its scope is
 * released once the generations still running on it have finished (asynchronous GRPO overlaps
 * rollouts with the next push), so no generation ever runs on released buffers.
 * A LoRA snapshot runs as the resident base plus the snapshot's own device copy of the adapter,
 * applied at run time: a push moves no model weights. A full snapshot's weights are uploaded.
 * No server is involved; this is the "local engine" half of the LoRA × engine table.
 * @module
 */
import { Context, Effect, Exit, Layer, Scope } from "effect";
import { Backend, type BackendShape } from "../backend/backend.ts";
import type { DeviceModel, LoraRuntime } from "../model/decoder.ts";
import { generate, type GenerationRequest } from "../model/generate.ts";
import { Rng } from "../model/rng.ts";
import { type Snapshot, snapshotModel } from "../snapshot/snapshot.ts";
import {
  RolloutEngine,
  type RolloutEngineShape,
  RolloutError,
  type RolloutRequest,
  type RolloutResult,
} from "../ports/rollout_engine.ts";
import {
  type PushReport,
  PushTarget,
  type PushTargetShape,
  SyncError,
} from "../ports/push_target.ts";

/** Expands requests into one generation per sample (sample j uses seed + j, as vLLM does). */
export const expandRequests = (
  requests: readonly RolloutRequest[],
): GenerationRequest[] =>
  requests.flatMap((r) =>
    Array.from({ length: r.n }, (_, j) => ({
      prompt: r.prompt,
      maxTokens: r.maxTokens,
      stopTokenIds: r.stopTokenIds,
      temperature: r.temperature,
      topP: r.topP,
      topK: r.topK,
      seed: r.seed === null ? null : r.seed + j,
    }))
  );

interface Loaded {
  readonly version: number;
  readonly model: DeviceModel;
  readonly lora: LoraRuntime | null;
  readonly scope: Scope.Closeable;
  /** Generations running on this version. */
  inflight: number;
  /** A newer version was pushed: release the scope when the last generation ends. */
  retired: boolean;
}

/** Releases a retired version once nothing runs on it. */
const releaseIfDrained = (l: Loaded): Effect.Effect<void> =>
  l.retired && l.inflight === 0 ? Scope.close(l.scope, Exit.void) : Effect.void;

/** Builds the in-process rollout engine and its push target over one backend. */
export const makeLocalEngine = (
  backend: BackendShape,
  seed = 0,
): Effect.Effect<{ engine: RolloutEngineShape; target: PushTargetShape }, never, Scope.Scope> =>
  Effect.gen(function* () {
    let current: Loaded | null = null;
    const draining = new Set<Loaded>();
    const rng = new Rng(seed);
    yield* Effect.addFinalizer(() =>
      Effect.forEach(
        [...draining, ...(current ? [current] : [])],
        (l) => Scope.close(l.scope, Exit.void),
        { discard: true },
      )
    );
    const engine: RolloutEngineShape = {
      name: "local",
      generate: Effect.fn("LocalEngine.generate")(function* (
        requests: readonly RolloutRequest[],
      ): Effect.fn.Return<RolloutResult, RolloutError> {
        const loaded = current;
        if (!loaded) {
          return yield* Effect.fail(
            new RolloutError({ engine: "local", reason: "no snapshot pushed yet" }),
          );
        }
        // counted in flight from before it starts until it has ended, however it ends
        const gens = yield* Effect.acquireUseRelease(
          Effect.sync(() => {
            loaded.inflight++;
          }),
          () =>
            generate(backend, loaded.model, expandRequests(requests), loaded.lora, rng).pipe(
              Effect.mapError((e) =>
                new RolloutError({ engine: "local", reason: e.message, cause: e })
              ),
            ),
          () =>
            Effect.suspend(() => {
              loaded.inflight--;
              if (!loaded.retired || loaded.inflight > 0) return Effect.void;
              draining.delete(loaded);
              return releaseIfDrained(loaded);
            }),
        );
        let k = 0;
        const completions = requests.map((r) =>
          Array.from({ length: r.n }, () => {
            const g = gens[k++];
            return {
              tokens: g.tokens,
              logprobs: g.processedLogprobs,
              finishReason: g.finishReason,
            };
          })
        );
        return { completions, policyVersion: loaded.version };
      }),
    };
    const target: PushTargetShape = {
      name: "in-process",
      push: Effect.fn("InProcessTarget.push")(function* (
        snapshot: Snapshot,
      ): Effect.fn.Return<PushReport, SyncError> {
        const t0 = performance.now();
        yield* snapshot.verify().pipe(
          Effect.mapError((e) =>
            new SyncError({
              target: "in-process",
              version: snapshot.version,
              reason: e.message,
              cause: e,
            })
          ),
        );
        // the new version is held before the old one is let go: the base stays resident
        yield* Effect.uninterruptible(Effect.gen(function* () {
          const scope = yield* Scope.make();
          const { model, lora } = yield* Scope.provide(scope)(snapshotModel(snapshot, backend));
          const old = current;
          current = { version: snapshot.version, model, lora, scope, inflight: 0, retired: false };
          if (old) {
            old.retired = true;
            if (old.inflight > 0) draining.add(old);
            else yield* releaseIfDrained(old);
          }
        }));
        return {
          version: snapshot.version,
          target: "in-process",
          // what the engine takes from the snapshot: the adapter (LoRA) or every weight (full)
          bytes: snapshot.ownedBytes,
          latencyMs: performance.now() - t0,
          logpDiffMean: null,
          logpDiffMax: null,
        };
      }),
    };
    return { engine, target };
  });

/** Layer providing RolloutEngine (local) and PushTarget (in-process) over the Backend. */
export const LocalEngineLive = (
  seed = 0,
): Layer.Layer<RolloutEngineShape | PushTargetShape, never, BackendShape> =>
  Layer.effectContext(
    Effect.gen(function* () {
      const { engine, target } = yield* makeLocalEngine(yield* Backend, seed);
      return Context.add(Context.make(RolloutEngine, engine), PushTarget, target);
    }),
  );
