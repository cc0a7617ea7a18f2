/**
 * The embedded vLLM-compatible server as a running process: loads the model, serves the HTTP API
 * until SIGINT/SIGTERM, then drains. Started by `deno task serve` (src/cli/main.ts), whose flags
 * are the fields of src/server/config.ts.
 *
 * Environment: VLLM_ALLOW_RUNTIME_LORA_UPDATING=1|true (with --enable-lora: the load/unload
 * routes), VLLM_SERVER_DEV_MODE=1|true (pause/resume/collective_rpc/reset_prefix_cache),
 * LORAFOLD_BACKEND (when --backend is absent), LORAFOLD_PREFIX_CACHE_MB (default 256) and
 * LORAFOLD_MAX_NUM_SEQS (sequences per batch, default 256) when their flags are absent.
 * @module
 */
import { Cause, Effect, Exit, Option, Scope } from "effect";
import { backendChoiceFromEnv, selectBackend } from "../backend/backend.ts";
import type { ServeConfig } from "./config.ts";
import { makeInferenceEngine } from "./inference_engine.ts";
import { makeWebHandler } from "./http.ts";

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
 * Runs the server until SIGINT/SIGTERM; returns the exit code: 0 after a clean shutdown, 1 when
 * the model cannot be loaded (one line on stderr).
 */
export const serve = async (a: ServeConfig): Promise<number> => {
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
      prefixCacheBytes: (a.prefixCacheMb ?? envInt("LORAFOLD_PREFIX_CACHE_MB", 256)) * 1024 * 1024,
      maxBatchSequences: Math.max(1, a.maxNumSeqs ?? envInt("LORAFOLD_MAX_NUM_SEQS", 256)),
    });
  }));
  if (Exit.isFailure(started)) {
    const failure = Cause.findErrorOption(started.cause);
    const msg = Option.isSome(failure) ? failure.value.message : Cause.pretty(started.cause);
    console.error(`lorafold serve: ${msg}`);
    await Effect.runPromise(Scope.close(scope, Exit.void));
    return 1;
  }
  const engine = started.value;
  const web = makeWebHandler(engine, { apiKey: a.apiKey, runtimeLora, devMode });
  console.log(
    `lorafold serve: model ${a.model} served as '${engine.options.servedModelName}' on ${engine.backend.info.name}` +
      ` (lora routes ${runtimeLora ? "on" : "off"}, dev mode ${
        devMode ? "on" : "off"
      }, logprobs ${a.logprobsMode})`,
  );
  let server: Deno.HttpServer;
  try {
    server = Deno.serve({
      hostname: a.host,
      port: a.port,
      onListen: ({ hostname, port }) =>
        console.log(`lorafold serve: listening on http://${hostname}:${port}`),
    }, (req) => web.handler(req));
  } catch (e) {
    // cannot listen (port taken, bad host): release the model before reporting
    await engine.close();
    await web.dispose();
    await Effect.runPromise(Scope.close(scope, Exit.void));
    throw e;
  }
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
  return 0;
};
