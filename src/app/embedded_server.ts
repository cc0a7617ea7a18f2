/**
 * The embedded lorafold server as a child process: `deno run -A src/cli/main.ts serve ...`
 * started with runtime LoRA updates and dev mode on, waited for (its "listening on" line, then
 * /health), and stopped (SIGTERM, then SIGKILL) when its scope closes.
 * @module
 */
import { Data, Effect, type Scope } from "effect";
import { stat } from "node:fs/promises";
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";
import type { TaggedErrorClass } from "../base/tagged_error.ts";

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
