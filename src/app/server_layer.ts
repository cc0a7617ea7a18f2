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
import { dirname, join, resolve } from "node:path";
import { Backend, type BackendShape } from "../backend/backend.ts";
import type { TrainConfig } from "./config.ts";
import { type CheckpointError, fsOp, makeDirectory } from "../io/checkpoint.ts";
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
import { makeLoraPusher, type StageObserver, unloadAdaptersUnder } from "../push/lora.ts";
import type { Snapshot } from "../snapshot/snapshot.ts";
import { defaultProbePrompt, makeTrainerProbeCache, type VerifySettings } from "../push/verify.ts";
import {
  parseReplicaFile,
  parseReplicaSource,
  type ReplicaObserver,
  ReplicaSet,
} from "../vllm/replicas.ts";
import type { Routing } from "../vllm/routing.ts";
import {
  makeReplicatedPushTarget,
  monitorReplicas,
  type ReplicaTarget,
  type ReplicaTargetFactory,
  type ReplicatedPushTarget,
} from "../push/replicated.ts";
import { readFile, rm, rmdir } from "node:fs/promises";

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
  /**
   * cache_salt of a version: `<session>-v{k}`, unique per run, so a later run on the same server
   * (same adapter names, same versions) never meets this run's prefix-cache entries (vLLM keys
   * them by adapter name and salt).
   */
  readonly cacheSalt?: (version: number) => string;
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
  /**
   * Replaces the standard PushTarget of a replica (which it receives) with another one built on
   * the replica's context.
   */
  readonly makeTarget?: (ctx: ServerContext, standard: PushTargetShape) => PushTargetShape;
  /** Observer of replica state changes (joined, out of rotation and why, removed). */
  readonly onReplicaEvent?: ReplicaObserver;
  /** Receives the replicated target once built: add, remove, status while training runs. */
  readonly onReplicas?: (target: ReplicatedPushTarget) => Effect.Effect<void>;
  /** Between health rounds of several replicas, ms (default 2000). */
  readonly monitorIntervalMs?: number;
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
): Effect.Effect<ReplicaTarget> =>
  Effect.gen(function* () {
    const sem = yield* Semaphore.make(1);
    const target = `server-${ctx.pushKind}(${ctx.client.baseUrl})`;
    const lora = ctx.pushKind === "lora"
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
        cacheSalt: ctx.cacheSalt,
      })
      : null;
    const pusher = lora ?? makeFullPusher({
      client: ctx.client,
      backend: ctx.backend,
      routing: ctx.routing,
      root: ctx.root,
      modelName: ctx.modelName,
      verify: ctx.verify,
      keepDirs: keep,
      target,
      onStage: ctx.onStage,
      cacheSalt: ctx.cacheSalt,
    });
    return {
      name: target,
      push: (snapshot: Snapshot): Effect.Effect<PushReport, SyncError | SyncMismatch> =>
        sem.withPermits(1)(pusher.push(snapshot)),
      // a full push leaves the weights it loaded; its directories go with the push root
      release: lora?.release ?? Effect.void,
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

/** The replica URLs of a `serverUrl`: the URLs it gives, or those of the file it names. */
const replicaUrlsOf = (serverUrl: string): Effect.Effect<readonly string[], SyncError> =>
  Effect.gen(function* () {
    const source = parseReplicaSource(serverUrl);
    const fail = (reason: string, cause?: unknown) =>
      new SyncError({ target: serverUrl, version: null, reason, cause });
    if (typeof source === "string") return yield* Effect.fail(fail(source));
    if (source.kind === "urls") return source.urls;
    const text = yield* fsOp(
      source.path,
      "cannot read the replica file",
      () => readFile(source.path, "utf8"),
    ).pipe(Effect.mapError((e) => fail(e.message, e)));
    const urls = parseReplicaFile(text);
    if (typeof urls === "string") {
      return yield* Effect.fail(fail(`replica file ${source.path}: ${urls}`));
    }
    if (urls.length === 0) {
      return yield* Effect.fail(fail(`replica file ${source.path} lists no server URL`));
    }
    return urls;
  });

/** The engine and target on already-running servers (URLs, a file) or a started embedded one. */
const buildServerEngine = Effect.fn("makeServerLayer.build")(function* (
  options: ServerLayerOptions,
  cfg: TrainConfig,
  base: BaseModel,
) {
  const backend = yield* Backend;
  const pushKind = pushKindOf(cfg);
  const urls = cfg.serverUrl !== null ? yield* replicaUrlsOf(cfg.serverUrl) : [
    (yield* startEmbeddedServer({
      modelDir: base.dir,
      backend: cfg.backend === "webgpu" ? "webgpu" : "cpu",
      maxLoraRank: maxLoraRankFor(cfg.loraR),
      maxLoras: Math.max(4, (options.keep ?? 2) + 2),
      args: options.serverArgs,
      env: options.serverEnv,
    })).url,
  ];
  const apiKey = options.apiKey === undefined ? envApiKey() : options.apiKey;
  const replicas = new ReplicaSet(
    (url) => makeVllmClient(url, { retry: options.retry, timeoutMs: options.timeoutMs, apiKey }),
    options.onReplicaEvent,
  );
  for (const u of urls) yield* replicas.add(u);
  // every replica that answers now joins with the first push; the others once they answer
  const found = yield* Effect.forEach(
    replicas.replicas,
    (r) => Effect.result(Effect.all([r.client.version(), discoverModelName(r.client)])),
    { concurrency: "unbounded" },
  );
  const first = found.find((x) => x._tag === "Success");
  if (first === undefined) {
    const none = found[0];
    if (none._tag === "Failure") return yield* Effect.fail(none.failure);
  }
  for (const [i, x] of found.entries()) {
    replicas.replicas[i].reachable = x._tag === "Success";
    if (x._tag === "Failure") {
      yield* replicas.drain(
        replicas.replicas[i],
        "unreachable",
        `at start: ${messageOf(x.failure)}`,
      );
    }
  }
  const [version, modelName] = first!._tag === "Success" ? first!.success : [null, ""];
  yield* Effect.logInfo(
    `server rollouts and pushes: ${urls.join(", ")} (version ${
      version ?? "unknown"
    }), model '${modelName}', ${pushKind} pushes, ` +
      `verify ${cfg.verify}`,
  );
  const session = crypto.randomUUID().slice(0, 8);
  const root = options.pushRoot ??
    join(
      resolve(cfg.outputDir),
      ".push",
      `${new Date().toISOString().replace(/[:.]/g, "-")}-${session}`,
    );
  yield* pushDirectory(root, !options.pushRoot);
  const probes = makeTrainerProbeCache();
  const verify: VerifySettings = {
    policy: cfg.verify,
    tolerance: cfg.verifyTolerance,
    probePrompt: options.probePrompt ?? defaultProbePrompt(base.tokenizer),
    probeTokens: options.probeTokens ?? 4,
    trainer: probes.trainer, // replicas serving the same weights share one forward
  };
  // the first replica pushes into the root itself, later ones into replica-<n>/ under it
  const roots = new Map<string, string>();
  const rootOf = (url: string) => {
    const known = roots.get(url);
    if (known) return known;
    const dir = roots.size === 0 ? root : join(root, `replica-${roots.size + 1}`);
    roots.set(url, dir);
    return dir;
  };
  const targetFor: ReplicaTargetFactory = (replica, returning) =>
    Effect.gen(function* () {
      const dir = rootOf(replica.url);
      if (returning && pushKind === "lora") yield* unloadAdaptersUnder(replica.client, dir);
      const name = yield* discoverModelName(replica.client).pipe(
        Effect.mapError((e) =>
          new SyncError({
            target: replica.url,
            version: null,
            reason: e._tag === "VllmHttpError" ? describeHttpError(e) : e.message,
            cause: e,
          })
        ),
      );
      const ctx: ServerContext = {
        cfg,
        base,
        client: replica.client,
        backend,
        routing: replica.routing,
        root: dir,
        modelName: name,
        pushKind,
        verify,
        onStage: options.onStage,
        cacheSalt: (v) => `${session}-v${v}`,
      };
      const standard = yield* makeServerPushTarget(ctx, options.keep ?? 2);
      return options.makeTarget
        ? { ...options.makeTarget(ctx, standard), release: standard.release }
        : standard;
    });
  const fanned = yield* makeReplicatedPushTarget(
    replicas,
    targetFor,
    `server-${pushKind}(${urls.join(",")})`,
  );
  const target: ReplicatedPushTarget = {
    ...fanned,
    prepare: (snapshot) =>
      probes.prime(backend, snapshot, verify).pipe(
        Effect.mapError((e) =>
          new SyncError({
            target: fanned.name,
            version: snapshot.version,
            reason: `verification of v${snapshot.version}: trainer forward failed: ${e.message}`,
            cause: e,
          })
        ),
      ),
  };
  if (cfg.serverUrl !== null && (urls.length > 1 || !cfg.serverUrl.includes("://"))) {
    const file = cfg.serverUrl.includes("://") ? null : cfg.serverUrl;
    let warned = false;
    const refresh = file === null ? undefined : Effect.matchEffect(replicaUrlsOf(file), {
      onSuccess: (u) => Effect.sync(() => ((warned = false), u)),
      onFailure: (e) =>
        Effect.as(
          warned ? Effect.void : Effect.andThen(
            Effect.sync(() => (warned = true)),
            Effect.logWarning(`${e.message}: keeping the replicas as they are`),
          ),
          null,
        ),
    });
    yield* Effect.forkScoped(
      monitorReplicas(target, { intervalMs: options.monitorIntervalMs, refresh }),
    );
  }
  // the servers outlive the run: its adapters are unloaded at its end
  yield* Effect.addFinalizer(() => target.release);
  if (options.onReplicas) yield* options.onReplicas(target);
  const engine = makeServerRolloutEngine(replicas, { concurrency: options.concurrency });
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
