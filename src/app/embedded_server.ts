/**
 * The embedded lorafold server as a child process: `deno run -A src/cli/main.ts serve ...`
 * started with runtime LoRA updates and dev mode on, waited for (its "listening on" line, then
 * /health), and stopped (SIGTERM, then SIGKILL) when its scope closes.
 * @module
 */
import { Effect, type Scope } from "effect";
import { stat } from "node:fs/promises";
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { LORA_RANKS } from "../server/config.ts";
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";

/** Why a server did not come up. */
export type ServerStartFailure =
  /** The process could not be started. */
  | "spawn"
  /** It exited before /health answered 200. */
  | "exited"
  /** It printed no "listening on" line before the start timeout. */
  | "no-listening-line"
  /** /health did not answer 200 before the start timeout. */
  | "unhealthy"
  /** GET /v1/models lists no base model (any server, embedded or not). */
  | "no-base-model";

/** Fields of a {@link ServerStartError}. */
export interface ServerStartErrorFields {
  readonly failure: ServerStartFailure;
  /** The server's URL once known; null before its "listening on" line. */
  readonly url: string | null;
  /** More about the failure: the spawn error, or the start of the /v1/models answer; "" when none. */
  readonly detail: string;
  /** The server's output so far ("" for a server not started here). */
  readonly logs: string;
}

const ServerStartErrorBase: TaggedErrorClass<"ServerStartError", ServerStartErrorFields> =
  taggedError(
    "ServerStartError",
    (e) => {
      const didNotStart = "the embedded server did not start";
      const f = e.failure;
      return f === "spawn"
        ? `cannot start the embedded server: ${e.detail}`
        : f === "exited"
        ? `${didNotStart}: it exited
${e.logs}`
        : f === "no-listening-line"
        ? `${didNotStart}: no "listening on" line in time
${e.logs}`
        : f === "unhealthy"
        ? `${didNotStart}: /health did not answer 200 in time
${e.logs}`
        : `GET ${e.url}/v1/models lists no base model: ${e.detail}`;
    },
  );

/** The embedded server did not come up (or a server lists no base model). */
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
  /** Port on 127.0.0.1 (default 0: the OS picks a free one). */
  readonly port?: number;
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
/** The smallest allowed --max-lora-rank that fits rank r. */
export const maxLoraRankFor = (r: number): number => LORA_RANKS.find((x) => x >= r) ?? 512;

/** Polling interval while waiting for the server to come up, ms. */
const POLL_MS = 50;
/** Output kept of a server, chars. */
const LOG_LIMIT = 65536;

const serveArgs = (o: EmbeddedServerOptions, hasConfig: boolean): string[] => [
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
  String(o.port ?? 0), // 0: the OS picks a free port; the "listening on" line names it
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

/** A spawned server process whose output is collected. */
interface ServerChild {
  readonly pid: number;
  /** The last 64 KiB of its stdout and stderr. */
  logs(): string;
  exited(): boolean;
  /** SIGTERM, then SIGKILL after 5 s; waits for the exit and the end of its output. */
  readonly stop: Effect.Effect<void>;
}

const spawnChild = (
  o: EmbeddedServerOptions,
  hasConfig: boolean,
): Effect.Effect<ServerChild, ServerStartError> =>
  Effect.try({
    try: () =>
      new Deno.Command(Deno.execPath(), {
        args: serveArgs(o, hasConfig),
        env: {
          VLLM_ALLOW_RUNTIME_LORA_UPDATING: "1",
          VLLM_SERVER_DEV_MODE: "1",
          NO_COLOR: "1",
          ...(o.env ?? {}),
        },
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).spawn(),
    catch: (e) =>
      new ServerStartError({ failure: "spawn", url: null, detail: String(e), logs: "" }),
  }).pipe(Effect.map((child): ServerChild => {
    let logs = "";
    const pump = async (s: ReadableStream<Uint8Array>) => {
      const dec = new TextDecoder();
      for await (const chunk of s) {
        logs += dec.decode(chunk, { stream: true });
        if (logs.length > LOG_LIMIT) logs = logs.slice(-LOG_LIMIT);
      }
    };
    const pumps = Promise.all([pump(child.stdout), pump(child.stderr)]).catch(() => {});
    let exited = false;
    const status = child.status.then((s) => {
      exited = true;
      return s;
    });
    // cannot fail: kill errors mean the process is gone already
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
    return { pid: child.pid, logs: () => logs, exited: () => exited, stop: Effect.promise(stop) };
  }));

/** Whether GET /health answers 200 (no answer: false; interruption aborts the request). */
const healthy = (url: string): Effect.Effect<boolean> =>
  Effect.promise((signal) =>
    fetch(`${url}/health`, { signal }).then(async (r) => {
      await r.body?.cancel();
      return r.status === 200;
    }).catch(() => false)
  );

/** Why waiting for a child failed (made a ServerStartError once the child is stopped). */
interface StartFailure {
  readonly failure: ServerStartFailure;
  readonly url: string | null;
}

/** Waits for the "listening on" line, then for /health; returns the port. */
const waitForStart = (
  child: ServerChild,
  deadline: number,
): Effect.Effect<number, StartFailure> =>
  Effect.gen(function* () {
    const fail = (failure: ServerStartFailure, url: string | null = null) =>
      Effect.fail<StartFailure>({ failure, url });
    // 1. the listening line
    let port = -1;
    while (port < 0) {
      const m = child.logs().match(/listening on http:\/\/[^:\s]+:(\d+)/);
      if (m) port = Number(m[1]);
      else if (child.exited()) return yield* fail("exited");
      else if (Date.now() > deadline) return yield* fail("no-listening-line");
      else yield* Effect.sleep(POLL_MS);
    }
    // 2. /health
    const url = `http://127.0.0.1:${port}`;
    while (!(yield* healthy(url))) {
      if (child.exited()) return yield* fail("exited", url);
      if (Date.now() > deadline) return yield* fail("unhealthy", url);
      yield* Effect.sleep(POLL_MS);
    }
    return port;
  });

/**
 * Starts `deno run -A src/cli/main.ts serve --model DIR --enable-lora …` with runtime LoRA
 * updates and dev mode on, waits for /health, and stops it (SIGTERM, then SIGKILL) when the
 * scope closes. A server that does not come up is stopped before the error is returned.
 */
export const startEmbeddedServer: (
  options: EmbeddedServerOptions,
) => Effect.Effect<EmbeddedServer, ServerStartError, Scope.Scope> = Effect.fn(
  "startEmbeddedServer",
)(function* (
  options: EmbeddedServerOptions,
): Effect.fn.Return<EmbeddedServer, ServerStartError, Scope.Scope> {
  // cannot fail: a missing config file is simply not passed
  const hasConfig = yield* Effect.promise(() => stat(PACKAGE_CONFIG).then(() => true, () => false));
  const child = yield* Effect.acquireRelease(spawnChild(options, hasConfig), (c) => c.stop);
  const deadline = Date.now() + (options.startTimeoutMs ?? 60_000);
  const port = yield* waitForStart(child, deadline).pipe(
    Effect.catch((f) =>
      Effect.andThen(
        child.stop,
        () => Effect.fail(new ServerStartError({ ...f, detail: "", logs: child.logs() })),
      )
    ),
  );
  return { url: `http://127.0.0.1:${port}`, port, pid: child.pid, logs: child.logs };
});
