/**
 * The thin HTTP adapter (effect/http router -> web handler for `Deno.serve`): routes, body
 * decoding with effect Schema, and rendering of ApiError as vLLM's error envelope. All serving
 * logic lives in inference_engine.ts (a façade over the scheduler); a completion handler submits
 * its request and awaits the scheduler's answer. Unknown routes answer FastAPI's 404
 * `{"detail":"Not Found"}`; routes of disabled features (runtime LoRA, dev mode) are not
 * registered, so they 404 the same way.
 * @module
 */
import { Effect, Layer } from "effect";
import { HttpRouter, type HttpServerRequest, HttpServerResponse } from "effect/http";
import type { InferenceEngine, PauseMode } from "./inference_engine.ts";
import {
  ApiError,
  badRequest,
  CollectiveRpcRequest,
  CompletionRequest,
  decodeBody,
  DetokenizeRequest,
  errorEnvelope,
  internalError,
  LoadLoraRequest,
  parseJson,
  ReloadWeightsKwargs,
  TokenizeRequest,
  UnloadLoraRequest,
} from "./schemas.ts";

/** The version GET /version reports (a vLLM-like, PEP 440 parsable string). */
export const SERVER_VERSION = "0.11.0+lorafold";

/** Which optional route groups exist. */
export interface HttpOptions {
  /** --api-key: guards /v1/* (Authorization: Bearer KEY). */
  readonly apiKey: string | null;
  /** --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING: the load/unload routes. */
  readonly runtimeLora: boolean;
  /** VLLM_SERVER_DEV_MODE: pause/resume/is_paused/collective_rpc/reset_prefix_cache. */
  readonly devMode: boolean;
}

type Req = HttpServerRequest.HttpServerRequest;
type Handler = (req: Req) => Effect.Effect<HttpServerResponse.HttpServerResponse>;

const json = (body: unknown, status = 200): HttpServerResponse.HttpServerResponse =>
  HttpServerResponse.jsonUnsafe(body, { status });

const errorResponse = (e: ApiError): HttpServerResponse.HttpServerResponse =>
  json(errorEnvelope(e), e.status);

/** Runs a handler body; typed errors become envelopes, defects a 500 envelope. */
const handle =
  (f: (req: Req) => Effect.Effect<HttpServerResponse.HttpServerResponse, ApiError>): Handler =>
  (req) =>
    f(req).pipe(
      Effect.catch((e) => Effect.succeed(errorResponse(e))),
      Effect.catchDefect((d) =>
        Effect.sync(() => {
          console.error("lorafold serve: internal error:", d);
          return errorResponse(
            internalError(`internal error: ${d instanceof Error ? d.message : String(d)}`),
          );
        })
      ),
    );

const body = (req: Req): Effect.Effect<unknown, ApiError> =>
  req.text.pipe(
    Effect.mapError((e) => badRequest(`cannot read the request body: ${e.message}`)),
    Effect.flatMap(parseJson),
  );

const query = (req: Req): URLSearchParams => new URL(req.url, "http://localhost").searchParams;

const flag = (v: string | null, fallback: boolean): boolean =>
  v === null ? fallback : !["false", "0", "no", "off"].includes(v.toLowerCase());

/** Prometheus text of GET /metrics (vLLM's request gauges plus prefix-cache counters). */
const metricsText = (engine: InferenceEngine): string => {
  const { running, waiting } = engine.load();
  const counts = engine.scheduler.counters();
  const c = engine.prefixCache.stats();
  const label = `{model_name=${JSON.stringify(engine.options.servedModelName)}}`;
  const lines: string[] = [];
  const metric = (
    name: string,
    type: "gauge" | "counter",
    help: string,
    value: number,
    labels = label,
  ) =>
    lines.push(
      `# HELP ${name} ${help}`,
      `# TYPE ${name} ${type}`,
      `${name}${labels} ${value.toFixed(1)}`,
    );
  metric(
    "vllm:num_requests_running",
    "gauge",
    "Number of requests in model execution batches.",
    running,
  );
  metric(
    "vllm:num_requests_waiting",
    "gauge",
    "Number of requests waiting to be processed.",
    waiting,
  );
  metric(
    "vllm:prompt_tokens_total",
    "counter",
    "Number of prefill tokens processed.",
    counts.promptTokens,
  );
  metric(
    "vllm:generation_tokens_total",
    "counter",
    "Number of generation tokens processed.",
    counts.generationTokens,
  );
  metric("lorafold:prefix_cache_entries", "gauge", "Cached prompt prefills.", c.entries);
  metric("lorafold:prefix_cache_bytes", "gauge", "Host bytes held by the prefix cache.", c.bytes);
  metric(
    "lorafold:prefix_cache_hits_total",
    "counter",
    "Prompts served entirely from the cache.",
    c.hits,
  );
  metric(
    "lorafold:prefix_cache_partial_hits_total",
    "counter",
    "Prompts whose cached prefix was reused.",
    c.partialHits,
  );
  metric(
    "lorafold:prefix_cache_misses_total",
    "counter",
    "Prompts prefilled from scratch.",
    c.misses,
  );
  metric(
    "lorafold:prefix_cache_resets_total",
    "counter",
    "Effective prefix-cache resets.",
    c.resets,
  );
  metric(
    "lorafold:kv_cache_rebuilds_total",
    "counter",
    "KV caches built: new batches, joins that did not fit, compactions.",
    counts.kvRebuilds,
  );
  metric(
    "lorafold:kv_cache_in_place_joins_total",
    "counter",
    "Token boundaries where sequences joined a batch in free KV slots.",
    counts.kvInPlaceJoins,
  );
  return lines.join("\n") + "\n";
};

/** The router layer of the server. */
export const routes = (
  engine: InferenceEngine,
  opts: HttpOptions,
): Layer.Layer<never, never, HttpRouter.HttpRouter> => {
  const known = new Set<string>();
  const r = (method: "GET" | "POST", path: `/${string}`, h: Handler) => {
    known.add(path);
    return HttpRouter.add(method, path, h);
  };
  const base = [
    r(
      "GET",
      "/health",
      () => Effect.sync(() => HttpServerResponse.empty({ status: engine.healthy ? 200 : 503 })),
    ),
    r("GET", "/ping", () => Effect.succeed(HttpServerResponse.empty({ status: 200 }))),
    r("GET", "/version", () => Effect.succeed(json({ version: SERVER_VERSION }))),
    r("GET", "/metrics", () => Effect.sync(() => HttpServerResponse.text(metricsText(engine)))),
    r("GET", "/v1/models", () => Effect.succeed(json({ object: "list", data: engine.models() }))),
    r(
      "POST",
      "/v1/completions",
      handle((req) =>
        body(req).pipe(
          Effect.flatMap((j) => decodeBody(CompletionRequest, j)),
          Effect.flatMap((c) => engine.complete(c)),
          Effect.map((res) => json(res)),
        )
      ),
    ),
    r(
      "POST",
      "/tokenize",
      handle((req) =>
        body(req).pipe(
          Effect.flatMap((j) => decodeBody(TokenizeRequest, j)),
          Effect.flatMap((t) =>
            engine.tokenize(
              t.model,
              t.prompt,
              t.add_special_tokens ?? true,
              t.return_token_strs ?? false,
            )
          ),
          Effect.map((res) => json(res)),
        )
      ),
    ),
    r(
      "POST",
      "/detokenize",
      handle((req) =>
        body(req).pipe(
          Effect.flatMap((j) => decodeBody(DetokenizeRequest, j)),
          Effect.flatMap((t) => engine.detokenize(t.model, t.tokens)),
          Effect.map((res) => json(res)),
        )
      ),
    ),
  ];
  const lora = !opts.runtimeLora ? [] : [
    r(
      "POST",
      "/v1/load_lora_adapter",
      handle((req) =>
        body(req).pipe(
          Effect.flatMap((j) => decodeBody(LoadLoraRequest, j)),
          Effect.flatMap((b) =>
            !b.lora_name || !b.lora_path
              ? Effect.fail(
                badRequest("Both 'lora_name' and 'lora_path' must be provided.", "lora_name"),
              )
              : engine.loadLora(b.lora_name, b.lora_path, b.load_inplace ?? false).pipe(
                Effect.as(
                  HttpServerResponse.text(
                    `Success: LoRA adapter '${b.lora_name}' added successfully.`,
                  ),
                ),
              )
          ),
        )
      ),
    ),
    r(
      "POST",
      "/v1/unload_lora_adapter",
      handle((req) =>
        body(req).pipe(
          Effect.flatMap((j) => decodeBody(UnloadLoraRequest, j)),
          Effect.flatMap((b) =>
            !b.lora_name
              ? Effect.fail(
                badRequest(
                  "'lora_name' needs to be provided to unload a LoRA adapter.",
                  "lora_name",
                ),
              )
              : engine.unloadLora(b.lora_name).pipe(
                Effect.as(
                  HttpServerResponse.text(
                    `Success: LoRA adapter '${b.lora_name}' removed successfully.`,
                  ),
                ),
              )
          ),
        )
      ),
    ),
  ];
  const dev = !opts.devMode ? [] : [
    r(
      "POST",
      "/pause",
      handle((req) => {
        const q = query(req);
        const legacyWait = q.get("wait_for_inflight_requests");
        const mode = q.get("mode") ??
          (legacyWait !== null && flag(legacyWait, false) ? "wait" : "abort");
        if (mode !== "abort" && mode !== "wait" && mode !== "keep") {
          return Effect.fail(
            badRequest(`mode must be one of abort, wait, keep; got '${mode}'`, "mode"),
          );
        }
        const clear = flag(q.get("clear_cache"), true);
        return engine.pause(mode as PauseMode, clear).pipe(Effect.as(json({ status: "paused" })));
      }),
    ),
    r("POST", "/resume", () => engine.resume().pipe(Effect.as(json({ status: "resumed" })))),
    r("GET", "/is_paused", () => Effect.sync(() => json({ is_paused: engine.paused }))),
    r(
      "POST",
      "/reset_prefix_cache",
      () =>
        Effect.sync(() => {
          if (!engine.resetPrefixCache()) {
            console.warn(
              "lorafold serve: reset_prefix_cache ignored: requests are holding the cache",
            );
          }
          return HttpServerResponse.empty({ status: 200 });
        }),
    ),
    r(
      "POST",
      "/collective_rpc",
      handle((req) =>
        body(req).pipe(
          Effect.flatMap((j) => decodeBody(CollectiveRpcRequest, j)),
          Effect.flatMap((rpc) => {
            if (rpc.method !== "reload_weights") {
              return Effect.fail(
                badRequest(
                  `unsupported collective_rpc method '${rpc.method}': only 'reload_weights'`,
                  "method",
                ),
              );
            }
            return decodeBody(ReloadWeightsKwargs, rpc.kwargs ?? {}, "kwargs").pipe(
              Effect.flatMap((kw) =>
                kw.is_checkpoint_format === false
                  ? Effect.fail(
                    badRequest(
                      "reload_weights: only is_checkpoint_format=true (a Hugging Face checkpoint directory) is supported",
                      "kwargs.is_checkpoint_format",
                    ),
                  )
                  : engine.reloadWeights(kw.weights_path ?? null)
              ),
              Effect.as(json({ results: [null] })),
            );
          }),
        )
      ),
    ),
  ];
  // FastAPI's answers for an unknown path (404) and a known path with another method (405)
  const notFoundRoute = HttpRouter.add(
    "*",
    "*",
    (req: Req) =>
      Effect.sync(() =>
        known.has(new URL(req.url, "http://localhost").pathname)
          ? json({ detail: "Method Not Allowed" }, 405)
          : json({ detail: "Not Found" }, 404)
      ),
  );
  return Layer.mergeAll(notFoundRoute, ...base, ...lora, ...dev);
};

/** A web handler (Request -> Response) for Deno.serve, with the --api-key guard on /v1/*. */
export const makeWebHandler = (
  engine: InferenceEngine,
  opts: HttpOptions,
): { handler: (req: Request) => Promise<Response>; dispose: () => Promise<void> } => {
  const web = HttpRouter.toWebHandler(routes(engine, opts), { disableLogger: true });
  const unauthorized = () =>
    Response.json(
      errorEnvelope(new ApiError({ status: 401, reason: "Unauthorized", param: null })),
      {
        status: 401,
      },
    );
  return {
    handler: (req) => {
      if (opts.apiKey !== null && req.method !== "OPTIONS") {
        const path = new URL(req.url).pathname;
        if (
          path.startsWith("/v1") && req.headers.get("authorization") !== `Bearer ${opts.apiKey}`
        ) {
          return Promise.resolve(unauthorized());
        }
      }
      // A fresh Request: Deno's legacy `request.signal` aborts even after successful responses
      // (and warns when read); requests are not cancelled on disconnect anyway (the scheduler
      // owns them).
      return web.handler(
        new Request(req.url, { method: req.method, headers: req.headers, body: req.body }),
      );
    },
    dispose: web.dispose,
  };
};
