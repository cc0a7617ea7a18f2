/**
 * The server half of the LoRA × engine table: the Layer that gives the trainer a RolloutEngine over
 * a vLLM-compatible server (src/rollout/server.ts) and a PushTarget that pushes snapshots to it
 * (PEFT adapter or full weights, src/push/), verifying every push. `serverLayer` is an
 * `RolloutLayerFactory` for runTraining: with `serverUrl` null it starts the embedded lorafold
 * server as a child process (src/app/embedded_server.ts), else it talks to the given URL.
 * @module
 */
import { messageOf } from "../base/tagged_error.ts";
import { Context, Effect, Layer, type Scope, Semaphore } from "effect";
import { rm, rmdir } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { Backend, type BackendShape } from "../backend/backend.ts";
import type { TrainConfig } from "./config.ts";
import { type CheckpointError, makeDirectory } from "../io/checkpoint.ts";
import { RolloutEngine } from "../ports/rollout_engine.ts";
import {
  type PushReport,
  PushTarget,
  type PushTargetShape,
  SyncError,
  type SyncMismatch,
} from "../ports/push_target.ts";
import type { RolloutLayerFactory } from "./trainer.ts";
import type { BaseModel } from "../model/loader.ts";
import { maxLoraRankFor, ServerStartError, startEmbeddedServer } from "./embedded_server.ts";
import { makeServerRolloutEngine } from "../rollout/server.ts";
import {
  describeHttpError,
  makeVllmClient,
  type RetryPolicy,
  type VllmClient,
  type VllmHttpError,
} from "../vllm/client.ts";
import { makeFullPusher } from "../push/full.ts";
import { makeLoraPusher, type StageObserver } from "../push/lora.ts";
import type { Snapshot } from "../snapshot/snapshot.ts";
import { defaultProbePrompt, type VerifySettings } from "../push/verify.ts";
import { Routing } from "../vllm/routing.ts";

/** Everything a server PushTarget is built from (for custom targets, see `makeTarget`). */
export interface ServerContext {
  readonly cfg: TrainConfig;
  readonly base: BaseModel;
  readonly client: VllmClient;
  readonly backend: BackendShape;
  readonly routing: Routing;
  /** Absolute directory receiving the pushed versions. */
  readonly root: string;
  /** The server's name for its base model. */
  readonly modelName: string;
  readonly pushKind: "lora" | "full";
  readonly verify: VerifySettings;
  readonly onStage?: StageObserver;
}

/** Options of the server layer. */
export interface ServerLayerOptions {
  readonly retry?: RetryPolicy;
  /** Per-attempt HTTP timeout, ms (default 120 s). */
  readonly timeoutMs?: number;
  /** --api-key of the server (default: env VLLM_API_KEY). */
  readonly apiKey?: string | null;
  /** Probe prompt token ids (default: BOS + "57+38=" or a few ids). */
  readonly probePrompt?: readonly number[];
  /** Probe completion length (default 4). */
  readonly probeTokens?: number;
  /** Versions kept loaded / on disk (default 2, at least 2). */
  readonly keep?: number;
  /** Rollout calls in flight (default 32). */
  readonly concurrency?: number;
  /** Where versions are written (default <outputDir>/.push/<session>, removed at the end). */
  readonly pushRoot?: string;
  /** Observer of push steps. */
  readonly onStage?: StageObserver;
  /** Extra flags and environment of the embedded server. */
  readonly serverArgs?: readonly string[];
  readonly serverEnv?: Readonly<Record<string, string>>;
  /** Replaces the standard PushTarget (which it receives) with another one built on the context. */
  readonly makeTarget?: (ctx: ServerContext, standard: PushTargetShape) => PushTargetShape;
}

const envApiKey = (): string | null => {
  try {
    return Deno.env.get("VLLM_API_KEY") ?? null;
  } catch {
    return null; // no env permission
  }
};

/** The push kind of a config: "auto" = the training mode. */
export const pushKindOf = (cfg: TrainConfig): "lora" | "full" =>
  cfg.push === "auto" ? cfg.mode : cfg.push;

/** The standard PushTarget of a context: LoRA or full pushes, one at a time, each verified. */
export const makeServerPushTarget = (
  ctx: ServerContext,
  keep = 2,
): Effect.Effect<PushTargetShape> =>
  Effect.gen(function* () {
    const sem = yield* Semaphore.make(1);
    const target = `server-${ctx.pushKind}(${ctx.client.baseUrl})`;
    const pusher = ctx.pushKind === "lora"
      ? makeLoraPusher({
        client: ctx.client,
        backend: ctx.backend,
        routing: ctx.routing,
        root: ctx.root,
        baseModel: ctx.base.dir,
        verify: ctx.verify,
        keepLoaded: keep,
        target,
        onStage: ctx.onStage,
      })
      : makeFullPusher({
        client: ctx.client,
        backend: ctx.backend,
        routing: ctx.routing,
        root: ctx.root,
        modelName: ctx.modelName,
        verify: ctx.verify,
        keepDirs: keep,
        target,
        onStage: ctx.onStage,
      });
    return {
      name: target,
      push: (snapshot: Snapshot): Effect.Effect<PushReport, SyncError | SyncMismatch> =>
        sem.withPermits(1)(pusher.push(snapshot)),
    };
  });

/** The server's base model name: the first card of GET /v1/models without a parent. */
export const discoverModelName = (
  client: VllmClient,
): Effect.Effect<string, VllmHttpError | ServerStartError> =>
  Effect.flatMap(client.getJson("/v1/models"), (j) => {
    const data = (j as { data?: unknown } | null)?.data;
    const cards = Array.isArray(data) ? data as { id?: unknown; parent?: unknown }[] : [];
    const card = cards.find((c) =>
      typeof c?.id === "string" && (c.parent === null || c.parent === undefined)
    );
    return card ? Effect.succeed(card.id as string) : Effect.fail(
      new ServerStartError({
        failure: "no-base-model",
        url: client.baseUrl,
        detail: JSON.stringify(j).slice(0, 200),
        logs: "",
      }),
    );
  });

/**
 * The directory pushed versions are written to, created now; removed with its scope unless the
 * caller named it (`owned` false). Removal is best effort: a failure is logged.
 */
const pushDirectory = (
  root: string,
  owned: boolean,
): Effect.Effect<void, CheckpointError, Scope.Scope> =>
  Effect.acquireRelease(
    makeDirectory(root),
    () =>
      !owned ? Effect.void : Effect.tryPromise(async () => {
        await rm(root, { recursive: true, force: true });
        await rmdir(dirname(root)).catch(() => {}); // .push/, unless another session uses it
      }).pipe(
        Effect.catch((e) =>
          Effect.logWarning(`cannot remove the push directory ${root}: ${messageOf(e.cause)}`)
        ),
      ),
  );

/** The engine and target on an already-running server (URL) or a started embedded one. */
const buildServerEngine = Effect.fn("makeServerLayer.build")(function* (
  options: ServerLayerOptions,
  cfg: TrainConfig,
  base: BaseModel,
) {
  const backend = yield* Backend;
  const pushKind = pushKindOf(cfg);
  const url = cfg.serverUrl ?? (yield* startEmbeddedServer({
    modelDir: base.dir,
    backend: cfg.backend === "webgpu" ? "webgpu" : "cpu",
    maxLoraRank: maxLoraRankFor(cfg.loraR),
    maxLoras: Math.max(4, (options.keep ?? 2) + 2),
    args: options.serverArgs,
    env: options.serverEnv,
  })).url;
  const client = makeVllmClient(url, {
    retry: options.retry,
    timeoutMs: options.timeoutMs,
    apiKey: options.apiKey === undefined ? envApiKey() : options.apiKey,
  });
  const version = yield* client.version();
  const modelName = yield* discoverModelName(client);
  yield* Effect.logInfo(
    `server rollouts and pushes: ${url} (version ${
      version ?? "unknown"
    }), model '${modelName}', ${pushKind} pushes, ` +
      `verify ${cfg.verify}`,
  );
  const root = options.pushRoot ??
    join(
      resolve(cfg.outputDir),
      ".push",
      `${new Date().toISOString().replace(/[:.]/g, "-")}-${crypto.randomUUID().slice(0, 8)}`,
    );
  yield* pushDirectory(root, !options.pushRoot);
  const routing = new Routing();
  const ctx: ServerContext = {
    cfg,
    base,
    client,
    backend,
    routing,
    root,
    modelName,
    pushKind,
    verify: {
      policy: cfg.verify,
      tolerance: cfg.verifyTolerance,
      probePrompt: options.probePrompt ?? defaultProbePrompt(base.tokenizer),
      probeTokens: options.probeTokens ?? 4,
    },
    onStage: options.onStage,
  };
  const standard = yield* makeServerPushTarget(ctx, options.keep ?? 2);
  const target = options.makeTarget ? options.makeTarget(ctx, standard) : standard;
  const engine = makeServerRolloutEngine(client, routing, {
    concurrency: options.concurrency,
  });
  return Context.add(Context.make(RolloutEngine, engine), PushTarget, target);
});

/** Builds the engine and target on an already-running server (URL) or a started embedded one. */
export const makeServerLayer =
  (options: ServerLayerOptions = {}): RolloutLayerFactory => (cfg, base) =>
    Layer.effectContext(
      buildServerEngine(options, cfg, base).pipe(
        Effect.mapError((e) =>
          new SyncError({
            target: cfg.serverUrl ?? "embedded server",
            version: null,
            reason: e._tag === "VllmHttpError"
              ? `cannot use the server: ${describeHttpError(e)}`
              : e.message,
            cause: e,
          })
        ),
      ),
    );

/** RolloutLayerFactory of a vLLM-compatible server with default options (for runTraining). */
export const serverLayer: RolloutLayerFactory = makeServerLayer();
