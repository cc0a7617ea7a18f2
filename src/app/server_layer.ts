/**
 * The server half of the LoRA × engine table: a RolloutEngine over a vLLM-compatible server's
 * /v1/completions and a SyncTarget that pushes snapshots to it (PEFT adapter or full weights),
 * verifying every push. `serverEngineLayer` is an `EngineLayerFactory` for runTraining: with
 * `serverUrl` null it starts the embedded lorafold server as a child process (a scoped resource,
 * killed on release), else it talks to the given URL.
 *
 * Rollouts: token-id prompts, every sampling field sent explicitly (omitted fields would take the
 * model's generation_config defaults), logprobs 0, return_token_ids, stop_token_ids, the routed
 * version's model name and cache_salt. Requests with a seed go one per HTTP request (sample j of
 * a request uses seed + j, exactly as the in-process engine), concurrently, so the server
 * batches them; unseeded requests with equal settings share one batched request. Choices map
 * back by index = prompt * n + j. `policyVersion` is the version routed when the call started.
 * @module
 */
import { Context, Data, Effect, Layer, type Scope, Semaphore } from "effect";
import { mkdir, rm, rmdir, stat } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Backend, type BackendShape } from "../backend/backend.ts";
import type { TrainConfig } from "./config.ts";
import {
  type PushReport,
  type RolloutCompletion,
  RolloutEngine,
  type RolloutEngineShape,
  RolloutError,
  type RolloutRequest,
  SyncError,
  type SyncMismatch,
  SyncTarget,
  type SyncTargetShape,
} from "../ports/rollout_engine.ts";
import type { BaseModel, EngineLayerFactory } from "./trainer.ts";
import type { TaggedErrorClass } from "../base/tagged_error.ts";
import {
  type CompletionChoiceData,
  decodeCompletion,
  describeHttpError,
  makeVllmClient,
  type RetryPolicy,
  type VllmClient,
  type VllmHttpError,
} from "../vllm/client.ts";
import { makeFullPusher } from "../push/full.ts";
import { makeLoraPusher, type StageObserver } from "../push/lora.ts";
import type { Snapshot } from "../snapshot/snapshot.ts";
import { defaultProbePrompt, type Route, Routing, type VerifySettings } from "../push/verify.ts";

// ---- the rollout engine ---------------------------------------------------------------------------

/** The /v1/completions body of one call (prompts share the request's sampling settings). */
export const completionBody = (
  route: Route,
  prompts: readonly (readonly number[])[],
  r: RolloutRequest,
): Record<string, unknown> => ({
  model: route.model,
  prompt: prompts.length === 1 ? [...prompts[0]] : prompts.map((p) => [...p]),
  n: r.n,
  max_tokens: r.maxTokens,
  min_tokens: 0,
  temperature: r.temperature,
  top_p: r.topP,
  top_k: r.topK > 0 ? r.topK : -1,
  min_p: 0,
  seed: r.seed,
  presence_penalty: 0,
  frequency_penalty: 0,
  repetition_penalty: 1,
  logprobs: 0,
  return_token_ids: true,
  return_tokens_as_token_ids: true,
  stop_token_ids: [...r.stopTokenIds],
  ignore_eos: false,
  skip_special_tokens: true,
  cache_salt: route.cacheSalt,
});

/** Groups requests into calls: seeded ones alone, unseeded ones by equal settings. */
export const groupRequests = (requests: readonly RolloutRequest[]): number[][] => {
  const groups = new Map<string, number[]>();
  const out: number[][] = [];
  requests.forEach((r, i) => {
    if (r.n <= 0) return;
    if (r.seed !== null) {
      out.push([i]);
      return;
    }
    const key = JSON.stringify([r.n, r.maxTokens, r.temperature, r.topP, r.topK, r.stopTokenIds]);
    const g = groups.get(key);
    if (g) g.push(i);
    else {
      const ng = [i];
      groups.set(key, ng);
      out.push(ng);
    }
  });
  return out;
};

/** Settings of the server rollout engine. */
export interface ServerRolloutOptions {
  /** HTTP calls in flight at once (default 32). */
  readonly concurrency?: number;
}

/** A RolloutEngine over /v1/completions, generating from the version `routing` points to. */
export const makeServerRolloutEngine = (
  client: VllmClient,
  routing: Routing,
  options: ServerRolloutOptions = {},
): RolloutEngineShape => {
  const name = `server(${client.baseUrl})`;
  const rolloutError = (message: string, cause?: unknown) =>
    new RolloutError({ engine: name, message, cause });
  const call = (route: Route, requests: readonly RolloutRequest[], group: readonly number[]) => {
    const r = requests[group[0]];
    return client.postJson(
      "/v1/completions",
      completionBody(route, group.map((i) => requests[i].prompt), r),
    ).pipe(
      Effect.flatMap((j) => decodeCompletion(j)),
      Effect.mapError((e: VllmHttpError) => rolloutError(describeHttpError(e), e)),
      Effect.flatMap((choices) => {
        const slots: (RolloutCompletion | null)[][] = group.map(() =>
          Array.from({ length: r.n }, () => null)
        );
        for (const c of choices as CompletionChoiceData[]) {
          const p = Math.floor(c.index / r.n);
          const j = c.index % r.n;
          if (p >= group.length || slots[p][j] !== null) {
            return Effect.fail(rolloutError(`unexpected or duplicate choice index ${c.index}`));
          }
          if (c.logprobs === null || c.logprobs.some((x) => x === null)) {
            return Effect.fail(
              rolloutError(`choice ${c.index} has no logprobs (the request asked for logprobs 0)`),
            );
          }
          slots[p][j] = {
            tokens: c.tokens,
            logprobs: c.logprobs as number[],
            finishReason: c.finishReason,
          };
        }
        const missing = slots.findIndex((s) => s.some((x) => x === null));
        if (missing >= 0) {
          return Effect.fail(rolloutError(`the answer lacks choices of prompt ${missing}`));
        }
        return Effect.succeed(slots as RolloutCompletion[][]);
      }),
    );
  };
  return {
    name,
    generate: (requests) =>
      Effect.suspend(() => {
        const route = routing.begin();
        if (!route) return Effect.fail(rolloutError("no snapshot pushed yet"));
        const groups = groupRequests(requests);
        return Effect.forEach(groups, (g) => call(route, requests, g), {
          concurrency: options.concurrency ?? 32,
        }).pipe(
          Effect.map((answers) => {
            const completions: RolloutCompletion[][] = requests.map(() => []);
            groups.forEach((g, gi) => g.forEach((ri, p) => (completions[ri] = answers[gi][p])));
            return { completions, policyVersion: route.version };
          }),
          Effect.ensuring(routing.end(route)),
        );
      }),
  };
};

// ---- the embedded server process -----------------------------------------------------------------

const ServerStartErrorBase: TaggedErrorClass<"ServerStartError", {
  readonly message: string;
  /** The server's output so far. */
  readonly logs: string;
}> = Data.TaggedError("ServerStartError");

/** The embedded server did not come up. */
export class ServerStartError extends ServerStartErrorBase {}

/** How to start the embedded server. */
export interface EmbeddedServerOptions {
  /** Hugging Face checkpoint directory served as the base model. */
  readonly modelDir: string;
  readonly backend?: "cpu" | "webgpu" | "auto";
  readonly maxLoraRank?: number;
  /** Adapters resident at once (>= 2). */
  readonly maxLoras?: number;
  /** Further `serve` flags. */
  readonly args?: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
  /** Default 60 s. */
  readonly startTimeoutMs?: number;
}

/** A running embedded server. */
export interface EmbeddedServer {
  readonly url: string;
  readonly port: number;
  readonly pid: number;
  /** The last 64 KiB of its stdout and stderr. */
  logs(): string;
}

const CLI_MAIN = fileURLToPath(new URL("../cli/main.ts", import.meta.url));
const PACKAGE_CONFIG = fileURLToPath(new URL("../../deno.json", import.meta.url));

/** vLLM's allowed --max-lora-rank values. */
const LORA_RANKS = [1, 8, 16, 32, 64, 128, 256, 320, 512];

/** The smallest allowed --max-lora-rank that fits rank r. */
export const maxLoraRankFor = (r: number): number => LORA_RANKS.find((x) => x >= r) ?? 512;

const spawnServer = async (
  o: EmbeddedServerOptions,
): Promise<EmbeddedServer & { stop(): Promise<void> }> => {
  const hasConfig = await stat(PACKAGE_CONFIG).then(() => true, () => false);
  const args = [
    "run",
    "-A",
    ...(hasConfig ? ["--config", PACKAGE_CONFIG] : []),
    CLI_MAIN,
    "serve",
    "--model",
    resolve(o.modelDir),
    "--enable-lora",
    "--backend",
    o.backend ?? "cpu",
    "--host",
    "127.0.0.1",
    "--port",
    "0", // the OS picks a free port; the "listening on" line names it
    "--max-lora-rank",
    String(o.maxLoraRank ?? 16),
    "--max-loras",
    String(Math.max(2, o.maxLoras ?? 4)),
    // rollout logprobs of the distribution sampled from (the trainer's old_logp convention);
    // at temperature 0 (verification) both modes give log_softmax of the logits
    "--logprobs-mode",
    "processed_logprobs",
    ...(o.args ?? []),
  ];
  const child = new Deno.Command(Deno.execPath(), {
    args,
    env: {
      VLLM_ALLOW_RUNTIME_LORA_UPDATING: "1",
      VLLM_SERVER_DEV_MODE: "1",
      NO_COLOR: "1",
      ...(o.env ?? {}),
    },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let logs = "";
  let onLine: (() => void) | null = null;
  const pump = async (s: ReadableStream<Uint8Array>) => {
    const dec = new TextDecoder();
    for await (const chunk of s) {
      logs += dec.decode(chunk, { stream: true });
      if (logs.length > 65536) logs = logs.slice(-65536);
      onLine?.();
    }
  };
  const pumps = Promise.all([pump(child.stdout), pump(child.stderr)]).catch(() => {});
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    onLine?.();
    return s;
  });
  const stop = async () => {
    if (!exited) {
      try {
        child.kill("SIGTERM");
      } catch { /* gone */ }
      const timer = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch { /* gone */ }
      }, 5000);
      await status;
      clearTimeout(timer);
    }
    await pumps;
  };
  const deadline = Date.now() + (o.startTimeoutMs ?? 60_000);
  const failStart = async (why: string): Promise<never> => {
    await stop();
    throw new ServerStartError({ message: `the embedded server did not start: ${why}`, logs });
  };
  // 1. the listening line
  let port = -1;
  while (port < 0) {
    const m = logs.match(/listening on http:\/\/[^:\s]+:(\d+)/);
    if (m) port = Number(m[1]);
    else if (exited) return await failStart(`it exited\n${logs}`);
    else if (Date.now() > deadline) {
      return await failStart(`no "listening on" line in time\n${logs}`);
    } else {
      await new Promise<void>((r) => {
        const t = setTimeout(r, 200);
        onLine = () => {
          clearTimeout(t);
          r();
        };
      });
      onLine = null;
    }
  }
  // 2. /health
  const url = `http://127.0.0.1:${port}`;
  for (;;) {
    try {
      const r = await fetch(`${url}/health`);
      await r.body?.cancel();
      if (r.status === 200) break;
    } catch { /* not yet */ }
    if (exited) return await failStart(`it exited\n${logs}`);
    if (Date.now() > deadline) {
      return await failStart(`/health did not answer 200 in time\n${logs}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return { url, port, pid: child.pid, logs: () => logs, stop };
};

/**
 * Starts `deno run -A src/cli/main.ts serve --model DIR --enable-lora …` with runtime LoRA
 * updates and dev mode on, waits for /health, and stops it (SIGTERM, then SIGKILL) when the
 * scope closes.
 */
export const startEmbeddedServer = (
  options: EmbeddedServerOptions,
): Effect.Effect<EmbeddedServer, ServerStartError, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.tryPromise({
      try: () => spawnServer(options),
      catch: (e) =>
        e instanceof ServerStartError
          ? e
          : new ServerStartError({ message: `cannot start the embedded server: ${e}`, logs: "" }),
    }),
    (s) => Effect.promise(() => s.stop()),
  ).pipe(Effect.map(({ url, port, pid, logs }): EmbeddedServer => ({ url, port, pid, logs })));

// ---- the layer ------------------------------------------------------------------------------------

/** Everything a server SyncTarget is built from (for custom targets, see `makeTarget`). */
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

/** Options of the server engine layer. */
export interface ServerEngineOptions {
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
  /** Replaces the standard SyncTarget (which it receives) with another one built on the context. */
  readonly makeTarget?: (ctx: ServerContext, standard: SyncTargetShape) => SyncTargetShape;
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

/** The standard SyncTarget of a context: LoRA or full pushes, one at a time, each verified. */
export const makeServerSyncTarget = (
  ctx: ServerContext,
  keep = 2,
): Effect.Effect<SyncTargetShape> =>
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
        message: `GET ${client.baseUrl}/v1/models lists no base model: ${
          JSON.stringify(j).slice(0, 200)
        }`,
        logs: "",
      }),
    );
  });

/** Builds the engine and target on an already-running server (URL) or a started embedded one. */
export const makeServerEngineLayer =
  (options: ServerEngineOptions = {}): EngineLayerFactory => (cfg, base) =>
    Layer.effectContext(
      Effect.gen(function* () {
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
          `server engine: ${url} (version ${
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
        yield* Effect.acquireRelease(
          Effect.promise(() => mkdir(root, { recursive: true })),
          () =>
            options.pushRoot ? Effect.void : Effect.promise(async () => {
              await rm(root, { recursive: true, force: true });
              await rmdir(dirname(root)).catch(() => {}); // .push/, unless another session uses it
            }),
        );
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
        const standard = yield* makeServerSyncTarget(ctx, options.keep ?? 2);
        const target = options.makeTarget ? options.makeTarget(ctx, standard) : standard;
        const engine = makeServerRolloutEngine(client, routing, {
          concurrency: options.concurrency,
        });
        return Context.add(Context.make(RolloutEngine, engine), SyncTarget, target);
      }).pipe(
        Effect.mapError((e) =>
          new SyncError({
            target: cfg.serverUrl ?? "embedded server",
            version: -1,
            message: e._tag === "VllmHttpError"
              ? `cannot use the server: ${describeHttpError(e)}`
              : e.message,
            cause: e,
          })
        ),
      ),
    );

/** EngineLayerFactory of the server engine with default options (for runTraining). */
export const serverEngineLayer: EngineLayerFactory = makeServerEngineLayer();
