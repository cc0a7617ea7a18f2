/**
 * The embedded vLLM-compatible server as a running process: loads the model, serves the HTTP API
 * until SIGINT/SIGTERM, then drains. Started by `deno task serve` (src/cli/main.ts), whose flags
 * are the fields of src/server/config.ts.
 *
 * The whole process is one Effect program (`serveProgram`) run once by `serve`: the backend, the
 * engine (its scheduler fiber), the web handler and the listener are scoped resources, released
 * in reverse order. HTTP requests enter through the web handler (http.ts), which submits them to
 * the engine and awaits their answers.
 *
 * Environment: VLLM_ALLOW_RUNTIME_LORA_UPDATING=1|true (with --enable-lora: the load/unload
 * routes), VLLM_SERVER_DEV_MODE=1|true (pause/resume/collective_rpc/reset_prefix_cache),
 * LORAFOLD_BACKEND (when --backend is absent), LORAFOLD_PREFIX_CACHE_MB (default 256),
 * LORAFOLD_KV_CACHE_MB (default 4096), LORAFOLD_MAX_NUM_SEQS (sequences running at once,
 * default 256), VLLM_MAX_N_SEQUENCES (largest n, default 16384) and VLLM_MAX_COMPLETION_PROMPTS
 * (largest prompt list, default 1024) when their flags are absent.
 * @module
 */
import { Cause, Deferred, Effect, Exit, Option } from "effect";
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

const MB = 1024 * 1024;

/**
 * The server process as an Effect: 0 after a clean shutdown, 1 when the model cannot be loaded
 * (one line on stderr); fails with the listener's error when it cannot listen (port taken, bad
 * host), after releasing the model.
 */
export const serveProgram = (a: ServeConfig): Effect.Effect<number, unknown> =>
  Effect.scoped(Effect.gen(function* () {
    const runtimeLora = a.enableLora && envFlag("VLLM_ALLOW_RUNTIME_LORA_UPDATING");
    if (envFlag("VLLM_ALLOW_RUNTIME_LORA_UPDATING") && !a.enableLora) {
      console.warn(
        "lorafold serve: VLLM_ALLOW_RUNTIME_LORA_UPDATING is set but --enable-lora is not: LoRA routes off",
      );
    }
    const devMode = envFlag("VLLM_SERVER_DEV_MODE");
    const started = yield* Effect.exit(Effect.gen(function* () {
      const choice = a.backend ?? (yield* backendChoiceFromEnv());
      const backend = yield* selectBackend(choice);
      return yield* makeInferenceEngine(backend, {
        modelDir: a.model,
        servedModelName: a.servedModelName ?? a.model,
        enableLora: a.enableLora,
        maxLoraRank: a.maxLoraRank,
        maxLoras: a.maxLoras,
        maxLogprobs: a.maxLogprobs,
        logprobsMode: a.logprobsMode,
        prefixCacheBytes: (a.prefixCacheMb ?? envInt("LORAFOLD_PREFIX_CACHE_MB", 256)) * MB,
        maxBatchSequences: Math.max(1, a.maxNumSeqs ?? envInt("LORAFOLD_MAX_NUM_SEQS", 256)),
        kvCacheBytes: (a.kvCacheMb ?? envInt("LORAFOLD_KV_CACHE_MB", 4096)) * MB,
        limits: {
          maxN: Math.max(1, a.maxNSequences ?? envInt("VLLM_MAX_N_SEQUENCES", 16384)),
          maxPrompts: Math.max(
            1,
            a.maxCompletionPrompts ?? envInt("VLLM_MAX_COMPLETION_PROMPTS", 1024),
          ),
          maxSequences: a.maxRequestSequences,
          maxStopStrings: a.maxStopStrings,
          maxStopLength: a.maxStopStringLength,
        },
        allowedRoot: a.allowedLoraRoot,
        chatTemplatePath: a.chatTemplate,
        generationConfig: a.generationConfig,
      });
    }));
    if (Exit.isFailure(started)) {
      const failure = Cause.findErrorOption(started.cause);
      const msg = Option.isSome(failure) ? failure.value.message : Cause.pretty(started.cause);
      console.error(`lorafold serve: ${msg}`);
      return 1;
    }
    const engine = started.value;
    const web = yield* Effect.acquireRelease(
      Effect.sync(() =>
        makeWebHandler(engine, {
          apiKey: a.apiKey,
          runtimeLora,
          devMode,
          maxBodyBytes: a.maxRequestBodyMb * MB,
        })
      ),
      (w) => Effect.promise(() => w.dispose()),
    );
    console.log(
      `lorafold serve: model ${a.model} served as '${engine.options.servedModelName}' on ${engine.backend.info.name}` +
        ` (lora routes ${runtimeLora ? "on" : "off"}, dev mode ${
          devMode ? "on" : "off"
        }, logprobs ${a.logprobsMode})`,
    );
    // cannot listen (port taken, bad host): the scope releases the model before the error
    const server = yield* Effect.acquireRelease(
      Effect.try({
        try: () =>
          Deno.serve({
            hostname: a.host,
            port: a.port,
            onListen: ({ hostname, port }) =>
              console.log(`lorafold serve: listening on http://${hostname}:${port}`),
          }, (req) => web.handler(req)),
        catch: (e) => e,
      }),
      (s) => Effect.promise(() => s.shutdown()),
    );
    // SIGINT/SIGTERM, or the listener ending by itself
    const stop = Deferred.makeUnsafe<void>();
    const onSignal = () => Deferred.doneUnsafe(stop, Exit.void);
    const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
    yield* Effect.acquireRelease(
      Effect.sync(() => {
        for (const s of signals) Deno.addSignalListener(s, onSignal);
      }),
      () =>
        Effect.sync(() => {
          for (const s of signals) Deno.removeSignalListener(s, onSignal);
        }),
    );
    yield* Effect.raceFirst(Deferred.await(stop), Effect.promise(() => server.finished));
    // the engine first: queued requests get 503, running ones end as aborted, so that the
    // HTTP server's graceful shutdown (the scope's next finalizer) does not wait on requests
    // held by a pause
    yield* engine.close();
    return 0;
  }));

/** Runs the server until SIGINT/SIGTERM; returns the exit code (see `serveProgram`). */
export const serve = (a: ServeConfig): Promise<number> => Effect.runPromise(serveProgram(a));
