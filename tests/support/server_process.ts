/**
 * Test helpers for the vLLM-compatible server: write a tiny checkpoint directory (config.json,
 * safetensors, char tokenizer.json), and start the server as a REAL separate process
 * (`deno run -A src/server/main.ts … --port 0`) on a free loopback port, wait for /health, and
 * stop it (SIGTERM, then SIGKILL) at the end. Logs of the process are kept for failure messages.
 */
import { Effect } from "effect";
import { join } from "node:path";
import type { ModelConfig } from "../../src/model/config.ts";
import { saveModel } from "../../src/model/loader.ts";
import { CharTokenizer } from "../../src/tokenizer/tokenizer.ts";
import { initWeights, type WeightMap } from "../../src/model/weights.ts";

/** Alphabet of the tiny test tokenizer (ids 3.. after <pad>, <bos>, <eos>). */
export const TINY_ALPHABET = "abcdefghijklmnopqrstuvwxyz 0123456789+-=?.";

/** The tiny model config matching TINY_ALPHABET's tokenizer. */
export const tinyServerConfig = (over: Partial<ModelConfig> = {}): ModelConfig => ({
  modelType: "llama",
  hiddenSize: 16,
  intermediateSize: 24,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 4,
  rmsNormEps: 1e-5,
  ropeTheta: 10000,
  vocabSize: 3 + [...TINY_ALPHABET].length,
  maxPositionEmbeddings: 128,
  tieWordEmbeddings: false,
  attentionBias: false,
  bosTokenId: 1,
  eosTokenIds: [2],
  ...over,
});

/** Writes a tiny checkpoint (seeded random weights) with its tokenizer.json into `dir`. */
export const writeTinyCheckpoint = async (
  dir: string,
  options: { seed?: number; std?: number; config?: ModelConfig } = {},
): Promise<{ config: ModelConfig; weights: WeightMap; tokenizer: CharTokenizer }> => {
  const config = options.config ?? tinyServerConfig();
  const weights = initWeights(config, options.seed ?? 1, options.std ?? 0.4);
  await Effect.runPromise(saveModel(dir, config, weights));
  const tokenizer = new CharTokenizer(TINY_ALPHABET);
  await Deno.writeTextFile(join(dir, "tokenizer.json"), JSON.stringify(tokenizer.toJSON()));
  return { config, weights, tokenizer };
};

/** A running server process. */
export interface ServerProcess {
  readonly url: string;
  readonly port: number;
  readonly child: Deno.ChildProcess;
  /** stdout and stderr so far. */
  logs(): string;
  /** fetch relative to the server URL (JSON body when `body` is an object). */
  request(
    path: string,
    init?: { method?: string; body?: unknown; headers?: Record<string, string> },
  ): Promise<Response>;
  /** Stops the process (SIGTERM, SIGKILL after 5 s) and waits for it. */
  stop(): Promise<Deno.CommandStatus>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Options of startServer. */
export interface StartServerOptions {
  readonly modelDir: string;
  /** Extra flags (e.g. ["--enable-lora"]). `--backend cpu` is the default backend. */
  readonly args?: readonly string[];
  /** Environment for the process (VLLM_* default to unset/"0"). */
  readonly env?: Readonly<Record<string, string>>;
  readonly timeoutMs?: number;
  /** Default `cpu` (deterministic and fast for tiny models). */
  readonly backend?: "cpu" | "webgpu" | "auto";
}

/** The CLI entry; the server is its `serve` command. */
const MAIN = new URL("../../src/cli/main.ts", import.meta.url).pathname;

const pump = async (
  stream: ReadableStream<Uint8Array>,
  sink: (s: string) => void,
): Promise<void> => {
  const dec = new TextDecoder();
  for await (const chunk of stream) sink(dec.decode(chunk, { stream: true }));
};

/** Runs the server entry with `args` to completion (for command-line error tests). */
export const runServeCli = async (
  args: readonly string[],
): Promise<{ code: number; stdout: string; stderr: string }> => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, "serve", ...args],
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
};

/** Starts the server process on a free loopback port and waits until /health answers 200. */
export const startServer = async (opts: StartServerOptions): Promise<ServerProcess> => {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      MAIN,
      "serve",
      "--model",
      opts.modelDir,
      "--host",
      "127.0.0.1",
      // a flag may be given once: a port in `args` replaces the free-port default
      ...(opts.args?.includes("--port") ? [] : ["--port", "0"]),
      "--backend",
      opts.backend ?? "cpu",
      ...(opts.args ?? []),
    ],
    env: {
      VLLM_ALLOW_RUNTIME_LORA_UPDATING: "0",
      VLLM_SERVER_DEV_MODE: "0",
      NO_COLOR: "1",
      ...(opts.env ?? {}),
    },
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
  }).spawn();
  let logs = "";
  let resolvePort: (p: number) => void = () => {};
  const portFound = new Promise<number>((r) => (resolvePort = r));
  const pumps = Promise.all([
    pump(child.stdout, (s) => {
      logs += s;
      const m = logs.match(/listening on http:\/\/[^:\s]+:(\d+)/);
      if (m) resolvePort(Number(m[1]));
    }),
    pump(child.stderr, (s) => (logs += s)),
  ]).catch(() => {});
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  let stopped: Promise<Deno.CommandStatus> | null = null;
  const stop = (): Promise<Deno.CommandStatus> => {
    if (stopped) return stopped;
    stopped = (async () => {
      if (!exited) {
        try {
          child.kill("SIGTERM");
        } catch { /* already gone */ }
        const timer = setTimeout(() => {
          try {
            child.kill("SIGKILL");
          } catch { /* already gone */ }
        }, 5000);
        await status;
        clearTimeout(timer);
      }
      await pumps;
      return await status;
    })();
    return stopped;
  };
  const deadline = Date.now() + (opts.timeoutMs ?? 30_000);
  const fail = async (why: string): Promise<never> => {
    await stop();
    throw new Error(`server did not start: ${why}\n--- server logs ---\n${logs}`);
  };
  let timer: ReturnType<typeof setTimeout> | undefined;
  const port = await Promise.race([
    portFound,
    status.then(() => -1),
    new Promise<number>((
      r,
    ) => (timer = setTimeout(() => r(-2), Math.max(0, deadline - Date.now())))),
  ]);
  clearTimeout(timer);
  if (port === -1) return await fail("the process exited");
  if (port === -2) return await fail("timed out waiting for the listening line");
  const url = `http://127.0.0.1:${port}`;
  for (;;) {
    try {
      const r = await fetch(`${url}/health`);
      await r.body?.cancel();
      if (r.status === 200) break;
    } catch { /* not yet */ }
    if (exited) return await fail("the process exited");
    if (Date.now() > deadline) return await fail("timed out waiting for /health");
    await new Promise((r) => setTimeout(r, 50));
  }
  const request: ServerProcess["request"] = (path, init = {}) =>
    fetch(`${url}${path}`, {
      method: init.method ?? (init.body === undefined ? "GET" : "POST"),
      headers: {
        ...(init.body !== undefined && typeof init.body !== "string"
          ? { "content-type": "application/json" }
          : {}),
        ...init.headers,
      },
      body: init.body === undefined
        ? undefined
        : typeof init.body === "string"
        ? init.body
        : JSON.stringify(init.body),
    });
  return {
    url,
    port,
    child,
    logs: () => logs,
    request,
    stop,
    [Symbol.asyncDispose]: async () => {
      await stop();
    },
  };
};
