/**
 * Process entry of the vLLM-compatible server:
 *
 *   deno run -A src/server/main.ts --model DIR [--port 8000] [--host 127.0.0.1] [--enable-lora]
 *     [--max-lora-rank 16] [--max-loras 4] [--max-logprobs 20]
 *     [--logprobs-mode raw_logprobs|processed_logprobs] [--served-model-name NAME]
 *     [--api-key KEY] [--backend auto|cpu|webgpu]
 *
 * Environment: VLLM_ALLOW_RUNTIME_LORA_UPDATING=1|true (with --enable-lora: the load/unload
 * routes), VLLM_SERVER_DEV_MODE=1|true (pause/resume/collective_rpc/reset_prefix_cache),
 * LORAFOLD_BACKEND (when --backend is absent), LORAFOLD_PREFIX_CACHE_MB (default 256),
 * LORAFOLD_MAX_NUM_SEQS (sequences per batch, default 256). `--port 0` picks a free port; the
 * "listening on" line on stdout names it.
 * @module
 */
import { Effect, Exit, Scope } from "effect";
import { type BackendChoice, backendChoiceFromEnv, selectBackend } from "../backend/backend.ts";
import { makeInferenceEngine } from "./inference_engine.ts";
import { makeWebHandler } from "./http.ts";
import type { LogprobsMode } from "./sampler.ts";

/** Parsed command line of `serve`. */
export interface ServeArgs {
  readonly model: string;
  readonly port: number;
  readonly host: string;
  readonly enableLora: boolean;
  readonly maxLoraRank: number;
  readonly maxLoras: number;
  readonly maxLogprobs: number;
  readonly logprobsMode: LogprobsMode;
  readonly servedModelName: string | null;
  readonly apiKey: string | null;
  readonly backend: BackendChoice | null;
}

/** A bad command line: `message` is one line naming the flag and what is allowed. */
export class ServeArgsError extends Error {
  override readonly name = "ServeArgsError";
}

/** vLLM's allowed --max-lora-rank values. */
export const LORA_RANKS: readonly number[] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

const VALUE_FLAGS = [
  "--model",
  "--port",
  "--host",
  "--max-lora-rank",
  "--max-loras",
  "--max-logprobs",
  "--logprobs-mode",
  "--served-model-name",
  "--api-key",
  "--backend",
] as const;
const BOOL_FLAGS = ["--enable-lora"] as const;

const int = (flag: string, v: string, min: number, max: number): number => {
  const n = /^-?\d+$/.test(v) ? Number(v) : NaN;
  if (!Number.isInteger(n) || n < min || n > max) {
    throw new ServeArgsError(`${flag} must be an integer in ${min}..${max}, got '${v}'`);
  }
  return n;
};

const oneOf = <T extends string>(flag: string, v: string, allowed: readonly T[]): T => {
  if (!(allowed as readonly string[]).includes(v)) {
    throw new ServeArgsError(`${flag} must be one of ${allowed.join(", ")}, got '${v}'`);
  }
  return v as T;
};

/** Parses the serve flags (`--flag value` or `--flag=value`); throws ServeArgsError. */
export const parseServeArgs = (args: readonly string[]): ServeArgs => {
  const values = new Map<string, string>();
  const bools = new Set<string>();
  const allowed = [...VALUE_FLAGS, ...BOOL_FLAGS].join(", ");
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    const eq = a.indexOf("=");
    const name = a.startsWith("--") && eq > 0 ? a.slice(0, eq) : a;
    if ((BOOL_FLAGS as readonly string[]).includes(name)) {
      if (eq > 0) throw new ServeArgsError(`${name} takes no value (got '${a}')`);
      bools.add(name);
    } else if ((VALUE_FLAGS as readonly string[]).includes(name)) {
      const v = eq > 0 && a.startsWith("--") ? a.slice(eq + 1) : args[++i];
      if (v === undefined) throw new ServeArgsError(`${name} needs a value`);
      values.set(name, v);
    } else if (a.startsWith("-")) {
      throw new ServeArgsError(`unknown flag ${name} (allowed: ${allowed})`);
    } else {
      throw new ServeArgsError(`unexpected argument '${a}' (allowed flags: ${allowed})`);
    }
  }
  const model = values.get("--model");
  if (!model) {
    throw new ServeArgsError("--model DIR is required (a Hugging Face checkpoint directory)");
  }
  const get = (f: string) => values.get(f);
  return {
    model,
    port: get("--port") === undefined ? 8000 : int("--port", get("--port")!, 0, 65535),
    host: get("--host") ?? "127.0.0.1",
    enableLora: bools.has("--enable-lora"),
    maxLoraRank: get("--max-lora-rank") === undefined ? 16 : (() => {
      const v = get("--max-lora-rank")!;
      const n = /^\d+$/.test(v) ? Number(v) : NaN;
      if (!LORA_RANKS.includes(n)) {
        throw new ServeArgsError(
          `--max-lora-rank must be one of ${LORA_RANKS.join(", ")}, got '${v}'`,
        );
      }
      return n;
    })(),
    maxLoras: get("--max-loras") === undefined
      ? 4
      : int("--max-loras", get("--max-loras")!, 1, 1024),
    maxLogprobs: get("--max-logprobs") === undefined
      ? 20
      : int("--max-logprobs", get("--max-logprobs")!, 0, 1 << 20),
    logprobsMode: get("--logprobs-mode") === undefined ? "raw_logprobs" : oneOf(
      "--logprobs-mode",
      get("--logprobs-mode")!,
      ["raw_logprobs", "processed_logprobs"] as const,
    ),
    servedModelName: get("--served-model-name") ?? null,
    apiKey: get("--api-key") ?? null,
    backend: get("--backend") === undefined
      ? null
      : oneOf("--backend", get("--backend")!, ["auto", "cpu", "webgpu"] as const),
  };
};

const envFlag = (name: string): boolean => {
  const v = Deno.env.get(name);
  return v !== undefined && ["1", "true"].includes(v.trim().toLowerCase());
};

const envInt = (name: string, fallback: number): number => {
  const v = Deno.env.get(name);
  const n = v === undefined ? NaN : Number(v);
  return Number.isFinite(n) && n >= 0 ? n : fallback;
};

/**
 * Runs the server until SIGINT/SIGTERM. A bad flag prints one line and exits with code 2; a model
 * that cannot be loaded exits with code 1.
 */
export const serveMain = async (args: string[]): Promise<void> => {
  let a: ServeArgs;
  try {
    a = parseServeArgs(args);
  } catch (e) {
    if (!(e instanceof ServeArgsError)) throw e;
    console.error(`lorafold serve: ${e.message}`);
    Deno.exit(2);
  }
  const runtimeLora = a.enableLora && envFlag("VLLM_ALLOW_RUNTIME_LORA_UPDATING");
  if (envFlag("VLLM_ALLOW_RUNTIME_LORA_UPDATING") && !a.enableLora) {
    console.warn(
      "lorafold serve: VLLM_ALLOW_RUNTIME_LORA_UPDATING is set but --enable-lora is not: LoRA routes off",
    );
  }
  const devMode = envFlag("VLLM_SERVER_DEV_MODE");
  const scope = await Effect.runPromise(Scope.make());
  const started = await Effect.runPromiseExit(Effect.gen(function* () {
    const choice = a.backend ?? (yield* backendChoiceFromEnv());
    const backend = yield* Scope.provide(scope)(selectBackend(choice));
    return yield* makeInferenceEngine(backend, {
      modelDir: a.model,
      servedModelName: a.servedModelName ?? a.model,
      enableLora: a.enableLora,
      maxLoraRank: a.maxLoraRank,
      maxLoras: a.maxLoras,
      maxLogprobs: a.maxLogprobs,
      logprobsMode: a.logprobsMode,
      prefixCacheBytes: envInt("LORAFOLD_PREFIX_CACHE_MB", 256) * 1024 * 1024,
      maxBatchSequences: Math.max(1, envInt("LORAFOLD_MAX_NUM_SEQS", 256)),
    });
  }));
  if (Exit.isFailure(started)) {
    const err = started.cause.reasons[0];
    const msg = err && "error" in err
      ? (err.error as { message?: string }).message
      : String(started.cause);
    console.error(`lorafold serve: ${msg}`);
    await Effect.runPromise(Scope.close(scope, Exit.void));
    Deno.exit(1);
  }
  const engine = started.value;
  const web = makeWebHandler(engine, { apiKey: a.apiKey, runtimeLora, devMode });
  console.log(
    `lorafold serve: model ${a.model} served as '${engine.options.servedModelName}' on ${engine.backend.info.name}` +
      ` (lora routes ${runtimeLora ? "on" : "off"}, dev mode ${
        devMode ? "on" : "off"
      }, logprobs ${a.logprobsMode})`,
  );
  const server = Deno.serve({
    hostname: a.host,
    port: a.port,
    onListen: ({ hostname, port }) =>
      console.log(`lorafold serve: listening on http://${hostname}:${port}`),
  }, (req) => web.handler(req));
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    // the engine first: queued requests get 503, running ones end as aborted, so that the
    // HTTP server's graceful shutdown does not wait on requests held by a pause
    await engine.close();
    await server.shutdown();
  };
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
  for (const s of signals) Deno.addSignalListener(s, stop);
  await server.finished;
  for (const s of signals) Deno.removeSignalListener(s, stop);
  if (!stopping) await engine.close();
  await web.dispose();
  await Effect.runPromise(Scope.close(scope, Exit.void));
};

if (import.meta.main) {
  await serveMain(Deno.args);
  Deno.exit(0);
}
