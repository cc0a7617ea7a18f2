/**
 * The thin HTTP adapter (effect/http router -> web handler for `Deno.serve`): routes, body
 * decoding with effect Schema (application/json only, bodies capped while read), streamed
 * answers (SSE, stream.ts) and rendering of ApiError as vLLM's error envelope. All serving
 * logic lives in inference_engine.ts (a façade over the scheduler); a completion handler submits
 * its request and awaits the scheduler's answer. Unknown routes answer FastAPI's 404
 * `{"detail":"Not Found"}`; routes of disabled features (runtime LoRA, dev mode) are not
 * registered, so they 404 the same way.
 * @module
 */
import { Effect, Layer } from "effect";
import { HttpRouter, type HttpServerRequest, HttpServerResponse } from "effect/http";
import type { InferenceEngine, PauseMode } from "./inference_engine.ts";
import type { CompletionSpec } from "./completion.ts";
import type { CompletionResponse } from "./schemas.ts";
import { SSE_DONE, sseEvent, type StreamChunk, StreamRenderer } from "./stream.ts";
import { ChatCompletionRequest, ChatStreamMapper, planChat, renderChat } from "./chat.ts";
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
  TokenizeChatRequest,
  TokenizeRequest,
  UnloadLoraRequest,
} from "./schemas.ts";

/**
 * The version GET /version reports (PEP 440): the first vLLM release with every route and
 * behaviour served here (`/pause?mode=keep`, PR #32351, is the newest of them), so a client that
 * gates features on the version sees them all.
 */
export const SERVER_VERSION = "0.15.0+lorafold";

/** Which optional route groups exist. */
export interface HttpOptions {
  /** --api-key: guards /v1/* (Authorization: Bearer KEY). */
  readonly apiKey: string | null;
  /** --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING: the load/unload routes. */
  readonly runtimeLora: boolean;
  /** VLLM_SERVER_DEV_MODE: pause/resume/is_paused/collective_rpc/reset_prefix_cache. */
  readonly devMode: boolean;
  /** Largest request body in bytes (read up to this, then 413). */
  readonly maxBodyBytes?: number;
}

/** Default --max-request-body-mb in bytes. */
export const DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024;

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

/** vLLM's validate_json_request: the OpenAI routes take application/json only. */
const jsonBody = (req: Req): Effect.Effect<unknown, ApiError> => {
  const type = (req.headers["content-type"] ?? "").toLowerCase().split(";")[0].trim();
  return type === "application/json" ? body(req) : Effect.fail(
    new ApiError({
      status: 400,
      reason: "Unsupported Media Type: Only 'application/json' is allowed",
      param: null,
    }),
  );
};

/**
 * A completion response as JSON. Large ones (many choices) are serialised a slice of choices at a
 * time as the client reads, so one response never holds the event loop; the bytes are exactly
 * `JSON.stringify(res)`.
 */
const completionJson = (res: CompletionResponse): HttpServerResponse.HttpServerResponse => {
  if (res.choices.length <= 256) return json(res);
  const enc = new TextEncoder();
  const head = `{"id":${JSON.stringify(res.id)},"object":"text_completion","created":${
    JSON.stringify(res.created)
  },"model":${JSON.stringify(res.model)},"choices":[`;
  const tail = `],"usage":${JSON.stringify(res.usage)}}`;
  let next = -1;
  const body = new ReadableStream<Uint8Array>({
    pull: (c) => {
      if (next === -1) {
        c.enqueue(enc.encode(head));
        next = 0;
        return;
      }
      if (next >= res.choices.length) {
        c.enqueue(enc.encode(tail));
        c.close();
        return;
      }
      const end = Math.min(res.choices.length, next + 128);
      const part = res.choices.slice(next, end).map((x) => JSON.stringify(x)).join(",");
      c.enqueue(enc.encode((next > 0 ? "," : "") + part));
      next = end;
    },
  });
  return HttpServerResponse.fromWeb(
    new Response(body, { status: 200, headers: { "content-type": "application/json" } }),
  );
};

/** A streamed completion: SSE chunks as the scheduler advances it, then `data: [DONE]`. */
const streamed = (
  engine: InferenceEngine,
  spec: CompletionSpec,
  shape: (chunk: StreamChunk) => unknown = (c) => c,
): HttpServerResponse.HttpServerResponse => {
  const renderer = new StreamRenderer(spec, engine.tokenizer);
  const enc = new TextEncoder();
  let out: ReadableStreamDefaultController<Uint8Array> | null = null;
  let open = true;
  // the client going away aborts the request (vLLM does the same)
  const gone = new AbortController();
  const send = (text: string) => {
    if (!open || !out) return;
    try {
      out.enqueue(enc.encode(text));
    } catch {
      open = false;
      gone.abort();
    }
  };
  const end = () => {
    send(SSE_DONE);
    if (open && out) {
      try {
        out.close();
      } catch { /* already closed */ }
    }
    open = false;
  };
  const stream = new ReadableStream<Uint8Array>({
    start: (c) => {
      out = c;
    },
    cancel: () => {
      open = false;
      gone.abort();
    },
  });
  Effect.runFork(
    engine.run(spec, (seqs) => {
      for (const chunk of renderer.progress(seqs)) send(sseEvent(shape(chunk)));
    }, gone.signal).pipe(
      Effect.match({
        onSuccess: (res) => {
          for (const chunk of renderer.finish(res)) send(sseEvent(shape(chunk)));
          end();
        },
        onFailure: (e) => {
          send(sseEvent(errorEnvelope(e)));
          end();
        },
      }),
    ),
  );
  return HttpServerResponse.fromWeb(
    new Response(stream, {
      status: 200,
      headers: { "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache" },
    }),
  );
};

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
  metric(
    "lorafold:device_sampled_tokens_total",
    "counter",
    "Decode tokens sampled from device candidates, without reading their logits row.",
    counts.deviceSampledTokens,
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
        jsonBody(req).pipe(
          Effect.flatMap((j) => decodeBody(CompletionRequest, j)),
          Effect.flatMap((c) => engine.validate(c, req.headers["x-request-id"] ?? null)),
          Effect.flatMap((spec) =>
            spec.stream ? Effect.succeed(streamed(engine, spec)) : engine.run(spec).pipe(
              Effect.map((res) => completionJson(res)),
            )
          ),
        )
      ),
    ),
    r(
      "POST",
      "/v1/chat/completions",
      handle((req) =>
        jsonBody(req).pipe(
          Effect.flatMap((j) =>
            decodeBody(ChatCompletionRequest, j).pipe(
              Effect.flatMap((c) =>
                planChat(
                  c,
                  j as Record<string, unknown>,
                  engine.chatTemplate,
                  (t) => engine.tokenizer.encode(t),
                  engine.tokenizer.bosId,
                  engine.config.maxPositionEmbeddings,
                )
              ),
            )
          ),
          Effect.flatMap((plan) =>
            decodeBody(CompletionRequest, plan.completion).pipe(
              Effect.flatMap((c) => engine.validate(c, req.headers["x-request-id"] ?? null)),
              Effect.flatMap((spec) => {
                if (spec.stream) {
                  const mapper = new ChatStreamMapper(plan.topLogprobs);
                  return Effect.succeed(streamed(engine, spec, (c) => mapper.map(c)));
                }
                return engine.run(spec).pipe(
                  Effect.map((res) => json(renderChat(res, spec, plan.topLogprobs))),
                );
              }),
            )
          ),
        )
      ),
    ),
    r(
      "POST",
      "/tokenize",
      handle((req) =>
        jsonBody(req).pipe(
          Effect.flatMap((j) =>
            typeof j === "object" && j !== null && "messages" in j
              ? decodeBody(TokenizeChatRequest, j).pipe(
                Effect.flatMap((t) => engine.tokenizeChat(t)),
              )
              : decodeBody(TokenizeRequest, j).pipe(
                Effect.flatMap((t) =>
                  engine.tokenize(
                    t.model,
                    t.prompt,
                    t.add_special_tokens ?? true,
                    t.return_token_strs ?? false,
                  )
                ),
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
        jsonBody(req).pipe(
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

/** The body of `req`, or null as soon as it is known to exceed `limit` bytes. */
const readCapped = async (req: Request, limit: number): Promise<Uint8Array<ArrayBuffer> | null> => {
  const declared = Number(req.headers.get("content-length") ?? NaN);
  if (Number.isFinite(declared) && declared > limit) {
    await req.body?.cancel().catch(() => {});
    return null;
  }
  const reader = req.body!.getReader();
  const parts: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    let r: ReadableStreamReadResult<Uint8Array>;
    try {
      r = await reader.read();
    } catch {
      break; // a broken upload: the route sees what arrived (and fails to parse it)
    }
    if (r.done) break;
    total += r.value.length;
    if (total > limit) {
      await reader.cancel().catch(() => {});
      return null;
    }
    parts.push(r.value);
  }
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
};

const tooLarge = (limit: number): Response =>
  Response.json(
    errorEnvelope(
      new ApiError({
        status: 413,
        reason: `the request body exceeds ${limit} bytes (--max-request-body-mb)`,
        param: null,
      }),
    ),
    { status: 413 },
  );

/** A web handler (Request -> Response) for Deno.serve, with the --api-key guard on /v1/*. */
export const makeWebHandler = (
  engine: InferenceEngine,
  opts: HttpOptions,
): { handler: (req: Request) => Promise<Response>; dispose: () => Promise<void> } => {
  const web = HttpRouter.toWebHandler(routes(engine, opts), { disableLogger: true });
  const maxBody = opts.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
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
      // owns them). The body is read here, up to the cap, before any route sees it.
      if (req.body === null) {
        return web.handler(new Request(req.url, { method: req.method, headers: req.headers }));
      }
      return readCapped(req, maxBody).then((bytes) =>
        bytes === null ? tooLarge(maxBody) : web.handler(
          new Request(req.url, { method: req.method, headers: req.headers, body: bytes }),
        )
      );
    },
    dispose: web.dispose,
  };
};
