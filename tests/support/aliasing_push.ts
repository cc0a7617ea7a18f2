/**
 * NEGATIVE CONTROL, used only by tests: a server PushTarget that pushes what TRL v0.15.0's LoRA
 * sync pushed. The adapter is merged IN PLACE into a live copy of the base weights, a state dict
 * of views of those live arrays is taken, the adapter is unmerged in place (so every view now
 * shows the base weights again), and those weights are written as the pushed checkpoint and
 * reloaded by the server (pause → reload_weights → reset_prefix_cache → resume). Verification
 * runs exactly as for the real push, against the snapshot that was trained, so it must catch the
 * bug at the first push whose adapter is non-zero; with verify "warn" the engine keeps serving
 * the base model and the reward stays flat.
 */
import { Effect } from "effect";
import { loraScale } from "../../src/lora/adapter.ts";
import { saveModel } from "../../src/model/loader.ts";
import { type HostTensor, widenTensor } from "../../src/model/weights.ts";
import { type PushReport, type PushTargetShape, SyncError } from "../../src/ports/push_target.ts";
import type { RolloutLayerFactory } from "../../src/app/trainer.ts";
import { describeHttpError } from "../../src/vllm/client.ts";
import { reloadCheckpoint } from "../../src/push/full.ts";
import { adapterName, freshVersionDir, versionSalt } from "../../src/push/lora.ts";
import {
  makeServerLayer,
  type ServerContext,
  type ServerLayerOptions,
} from "../../src/app/server_layer.ts";
import { verifyRoute } from "../../src/push/verify.ts";
import type { Route } from "../../src/vllm/routing.ts";
import { aliasingFold, type LiveWeights } from "./aliasing_fold.ts";

/** The TRL v0.15.0 push over the server context (LoRA snapshots only). */
export const aliasingTarget = (ctx: ServerContext): PushTargetShape => {
  const name = `aliasing-trl-v0.15(${ctx.client.baseUrl})`;
  // the live model: mutable arrays that merge/unmerge write into, kept across pushes
  const live: LiveWeights = new Map(
    [...ctx.base.weights].map((
      [n, t],
    ) => [n, { shape: [...t.shape], data: widenTensor(t).data.slice() }]),
  );
  return {
    name,
    push: (snapshot) =>
      Effect.gen(function* () {
        const t0 = performance.now();
        const version = snapshot.version;
        const fail = (reason: string, cause?: unknown) =>
          new SyncError({ target: name, version, reason, cause });
        const tensors = snapshot.adapter();
        if (!tensors || !snapshot.loraConfig) {
          return yield* Effect.fail(fail("not a LoRA snapshot"));
        }
        const modules = new Map<string, { a: HostTensor; b: HostTensor }>();
        for (const [n, t] of tensors) {
          const path = n.replace(/\.lora_[AB]$/, "");
          const m = modules.get(path) ?? { a: t, b: t };
          modules.set(path, n.endsWith("lora_A") ? { ...m, a: t } : { ...m, b: t });
        }
        // merge_adapter(); state_dict(); unmerge_adapter() — then push the "state dict"
        const stateDict = aliasingFold(live, modules, loraScale(snapshot.loraConfig));
        const { dir, bytes } = yield* freshVersionDir(
          ctx.root,
          adapterName(version),
          (tmp) => saveModel(tmp, snapshot.config, stateDict),
        ).pipe(Effect.mapError((e) => fail(e.message, e)));
        yield* reloadCheckpoint(ctx.client, dir, version).pipe(
          Effect.mapError((e) => fail(describeHttpError(e), e)),
        );
        const route: Route = {
          version,
          kind: "full",
          model: ctx.modelName,
          cacheSalt: versionSalt(version),
          dir,
        };
        const outcome = yield* verifyRoute(
          ctx.client,
          ctx.backend,
          snapshot,
          route,
          ctx.verify,
          name,
        );
        ctx.routing.set(route);
        return {
          version,
          target: name,
          bytes,
          latencyMs: performance.now() - t0,
          logpDiffMean: outcome?.mean ?? null,
          logpDiffMax: outcome?.max ?? null,
        } satisfies PushReport;
      }),
  };
};

/** Server engine whose pushes are TRL v0.15.0's (the rollout side is the real server engine). */
export const aliasingEngineLayer = (options: ServerLayerOptions = {}): RolloutLayerFactory =>
  makeServerLayer({ ...options, makeTarget: (ctx) => aliasingTarget(ctx) });
