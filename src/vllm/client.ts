/**
 * A small client for vLLM-compatible servers (vLLM, the embedded lorafold server): JSON and text
 * requests with a per-attempt timeout, retries with exponential backoff (an effect Schedule), and
 * one typed error, `VllmHttpError`, that carries the status and the fields of whichever error
 * envelope the server used:
 *
 * - `{"error": {message, type, param, code}}` (vLLM >= 0.10.1),
 * - `{"object": "error", message, type, param, code}` (older vLLM),
 * - `{"detail": ...}` (FastAPI: unknown routes, some dev routes, validation lists).
 *
 * What is retried depends on whether repeating the request is safe ({@link isRetryable}):
 * idempotent requests (every GET, and POSTs the caller marks `idempotent`, such as pause/resume or
 * a load whose repeat the caller detects) on connection errors, timeouts and 502/503/504; other
 * POSTs only when the connection was refused, i.e. the request provably never reached the server.
 * A 500 is never retried: recent vLLM answers 500 to deterministic failures (an adapter that cannot
 * load), and 4xx means the request itself is wrong. HTTP goes through effect/http's fetch client;
 * this module is the only client code in src/ that speaks HTTP.
 * @module
 */
import { Duration, Effect, Schedule, Schema } from "effect";
import { FetchHttpClient, HttpClient, HttpClientRequest } from "effect/http";
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";

/** Why a request failed: no answer, no answer in time, an error status, or an unreadable body. */
export type VllmFailureReason = "connection" | "timeout" | "status" | "decode";

/** Fields of VllmHttpError. */
export interface VllmHttpErrorFields {
  readonly method: string;
  /** Path and query, e.g. "/v1/completions". */
  readonly path: string;
  /** The server's base URL; null where it is not known (an answer decoded on its own). */
  readonly server: string | null;
  /** HTTP status; 0 when no response arrived (connection error, timeout). */
  readonly status: number;
  readonly reason: VllmFailureReason;
  /** Envelope fields (null when the body had none). */
  readonly type: string | null;
  readonly param: string | null;
  readonly code: number | string | null;
  /**
   * The failure in words: the envelope's message ("status"), the transport's error
   * ("connection"), what is wrong with the answer ("decode"); "" for "timeout".
   */
  readonly detail: string;
  /** The per-attempt timeout that ran out, ms ("timeout"); null otherwise. */
  readonly timeoutMs: number | null;
  /** The response body (truncated), when there was one. */
  readonly body: string | null;
  /** Attempts made, the first included. */
  readonly attempts: number;
  /**
   * false when the failure proves the request never reached the server (connection refused,
   * name resolution failed); true or absent when it may have (reset, timeout, an answer).
   */
  readonly requestSent?: boolean;
}

const VllmHttpErrorBase: TaggedErrorClass<"VllmHttpError", VllmHttpErrorFields> = taggedError(
  "VllmHttpError",
  (e) => {
    const at = `${e.method} ${e.path}`;
    const server = e.server ?? "the server";
    if (e.reason === "connection") return `${at}: cannot reach ${server}: ${e.detail}`;
    if (e.reason === "timeout") return `${at}: no answer from ${server} in ${e.timeoutMs} ms`;
    if (e.reason === "status") {
      return `${at}: ${e.status}${e.type ? ` ${e.type}` : ""}: ${e.detail}`;
    }
    return `${at}: ${e.detail}`; // decode
  },
);

/** A request to the server failed (after retries, when the failure was retryable). */
export class VllmHttpError extends VllmHttpErrorBase {}

/** The fields of an error envelope. */
export interface ErrorFields {
  readonly message: string;
  readonly type: string | null;
  readonly param: string | null;
  readonly code: number | string | null;
}

const str = (v: unknown): string | null => (typeof v === "string" ? v : null);
const codeOf = (v: unknown): number | string | null =>
  typeof v === "number" || typeof v === "string" ? v : null;

const clip = (s: string, n = 500): string => (s.length > n ? `${s.slice(0, n)}…` : s);

/** FastAPI's `detail`: a string, a list of validation errors, or any JSON value. */
const detailText = (d: unknown): string => {
  if (typeof d === "string") return d;
  if (Array.isArray(d)) {
    return d.map((e) => {
      if (typeof e !== "object" || e === null) return JSON.stringify(e);
      const o = e as Record<string, unknown>;
      const loc = Array.isArray(o.loc) ? o.loc.join(".") : null;
      const msg = str(o.msg) ?? JSON.stringify(o);
      return loc ? `${loc}: ${msg}` : msg;
    }).join("; ");
  }
  return JSON.stringify(d);
};

/**
 * Parses an error body in any of the three envelope shapes; anything else (HTML, plain text,
 * other JSON) becomes the message itself, or "HTTP <status>" when the body is empty.
 */
export const parseErrorEnvelope = (status: number, body: string): ErrorFields => {
  let json: unknown = undefined;
  try {
    json = JSON.parse(body);
  } catch { /* not JSON */ }
  if (typeof json === "object" && json !== null && !Array.isArray(json)) {
    const o = json as Record<string, unknown>;
    if (typeof o.error === "object" && o.error !== null) {
      const e = o.error as Record<string, unknown>;
      return {
        message: str(e.message) ?? JSON.stringify(e),
        type: str(e.type),
        param: str(e.param),
        code: codeOf(e.code),
      };
    }
    if (typeof o.error === "string") {
      return { message: o.error, type: str(o.type), param: str(o.param), code: codeOf(o.code) };
    }
    if (o.object === "error" || (typeof o.message === "string" && "type" in o)) {
      return {
        message: str(o.message) ?? JSON.stringify(o),
        type: str(o.type),
        param: str(o.param),
        code: codeOf(o.code),
      };
    }
    if ("detail" in o) {
      return { message: detailText(o.detail), type: null, param: null, code: null };
    }
  }
  const text = body.trim();
  return {
    message: text ? clip(text, 200) : `HTTP ${status}`,
    type: null,
    param: null,
    code: null,
  };
};

/** Exponential backoff: delay_i = min(baseMs * factor^i, maxDelayMs), at most maxRetries. */
export interface RetryPolicy {
  readonly baseMs: number;
  readonly factor: number;
  readonly maxDelayMs: number;
  /** Retries after the first attempt (0 = none). */
  readonly maxRetries: number;
}

/** Default: 100 ms, ×2, capped at 5 s, 8 retries (about 16 s of waiting in all). */
export const defaultRetryPolicy: RetryPolicy = {
  baseMs: 100,
  factor: 2,
  maxDelayMs: 5000,
  maxRetries: 8,
};

/** The backoff Schedule of a policy (outputs the delay before each retry). */
export const retrySchedule = (p: RetryPolicy): Schedule.Schedule<Duration.Duration> =>
  Schedule.exponential(Duration.millis(p.baseMs), p.factor).pipe(
    Schedule.modifyDelay(({ duration }) =>
      Effect.succeed(Duration.millis(Math.min(Duration.toMillis(duration), p.maxDelayMs)))
    ),
    Schedule.upTo({ times: p.maxRetries }),
  );

/** Statuses that say "not now" rather than "not this request": a proxy or an overloaded server. */
const TRANSIENT_STATUS = new Set([502, 503, 504]);

/** Whether a failure proves the request never reached the server (so it can be sent again). */
export const neverReachedServer = (e: VllmHttpError): boolean =>
  e.reason === "connection" && e.requestSent === false;

/**
 * Whether a failed attempt may be repeated. An idempotent request (repeating it leaves the server
 * as one success would) is retried on connection errors, timeouts and 502/503/504; any other
 * request only when it never reached the server. 500, other statuses and bad bodies never are.
 */
export const isRetryable = (e: VllmHttpError, idempotent = true): boolean =>
  idempotent
    ? e.reason === "connection" || e.reason === "timeout" ||
      (e.reason === "status" && TRANSIENT_STATUS.has(e.status))
    : neverReachedServer(e);

/** Client settings. */
export interface VllmClientOptions {
  /** Per-attempt timeout (request and body), ms. */
  readonly timeoutMs?: number;
  readonly retry?: RetryPolicy;
  /** Sent as `Authorization: Bearer` (vLLM's --api-key). */
  readonly apiKey?: string | null;
}

/** Per-request settings. */
export interface RequestOptions {
  readonly timeoutMs?: number;
  /** false: a single attempt. */
  readonly retry?: boolean | RetryPolicy;
  /**
   * Whether sending the request twice is safe (see {@link isRetryable}). Default: true for GET,
   * false for POST.
   */
  readonly idempotent?: boolean;
}

/** A successful answer. */
export interface VllmResponse {
  readonly status: number;
  readonly text: string;
}

/** A client bound to one server. */
export interface VllmClient {
  readonly baseUrl: string;
  /** Any method; 2xx resolves with the body text, anything else fails typed. */
  request(
    method: "GET" | "POST",
    path: string,
    body?: unknown,
    options?: RequestOptions,
  ): Effect.Effect<VllmResponse, VllmHttpError>;
  /** POST a JSON body, parse a JSON answer. */
  postJson(
    path: string,
    body?: unknown,
    options?: RequestOptions,
  ): Effect.Effect<unknown, VllmHttpError>;
  /** GET a JSON answer. */
  getJson(path: string, options?: RequestOptions): Effect.Effect<unknown, VllmHttpError>;
  /** POST a JSON body, return the (plain-text) answer: /v1/load_lora_adapter answers text. */
  postText(
    path: string,
    body?: unknown,
    options?: RequestOptions,
  ): Effect.Effect<string, VllmHttpError>;
  /** GET /version: the server's version string, null when it has no such route (cached). */
  version(): Effect.Effect<string | null, VllmHttpError>;
  /** GET /health answered 200 (one attempt, short timeout). */
  healthy(): Effect.Effect<boolean>;
}

/**
 * Parses "0.10.1", "0.11.0+lorafold", "0.9.2rc1" into [major, minor, patch]; null when it is not
 * a version.
 */
export const parseVersion = (v: string): [number, number, number] | null => {
  const m = /^v?(\d+)\.(\d+)(?:\.(\d+))?/.exec(v.trim());
  return m ? [Number(m[1]), Number(m[2]), Number(m[3] ?? 0)] : null;
};

/** Whether a server version renders errors as `{"error": {...}}` (vLLM >= 0.10.1). */
export const usesNestedErrorEnvelope = (version: string | null): boolean | null => {
  const v = version === null ? null : parseVersion(version);
  if (!v) return null;
  const [a, b, c] = v;
  return a > 0 || b > 10 || (b === 10 && c >= 1);
};

const message = (e: unknown): string =>
  e instanceof Error
    ? e.message
    : typeof e === "object" && e !== null && "message" in e
    ? String((e as { message: unknown }).message)
    : String(e);

/**
 * The messages of an error and its causes, outermost first, without repeats: effect/http's
 * "Transport error" wraps fetch's "fetch failed", which wraps what actually happened.
 */
const causeChain = (e: unknown): string[] => {
  const out: string[] = [];
  const seen = new Set<unknown>();
  let cur: unknown = e;
  while (cur !== undefined && cur !== null && !seen.has(cur) && out.length < 8) {
    seen.add(cur);
    const m = message(cur);
    if (m && !out.includes(m)) out.push(m);
    const o = cur as { cause?: unknown; reason?: unknown };
    cur = typeof cur === "object"
      ? (o.reason !== undefined && typeof o.reason === "object" ? o.reason : o.cause)
      : undefined;
  }
  return out;
};

/**
 * A transport failure before any byte of the request left: the TCP connect (hyper's "client error
 * (Connect)"), a refused connection, a failed name lookup.
 */
const NOT_SENT =
  /client error \(Connect\)|connection refused|ECONNREFUSED|os error 111|dns error|failed to lookup address/i;

/** Makes a client for the server at `baseUrl` (e.g. "http://127.0.0.1:8000"). */
export const makeVllmClient = (baseUrl: string, options: VllmClientOptions = {}): VllmClient => {
  const root = baseUrl.replace(/\/+$/, "");
  const defaultTimeout = options.timeoutMs ?? 120_000;
  const defaultRetry = options.retry ?? defaultRetryPolicy;
  let cachedVersion: string | null | undefined = undefined;

  const attempt = (
    method: "GET" | "POST",
    path: string,
    body: unknown,
    timeoutMs: number,
    attempts: () => number,
  ): Effect.Effect<VllmResponse, VllmHttpError> => {
    const fail = (
      reason: VllmFailureReason,
      status: number,
      fields: ErrorFields,
      text: string | null,
      timeout: number | null = null,
    ) =>
      new VllmHttpError({
        method,
        path,
        server: root,
        status,
        reason,
        type: fields.type,
        param: fields.param,
        code: fields.code,
        detail: fields.message,
        timeoutMs: timeout,
        body: text === null ? null : clip(text),
        attempts: attempts(),
      });
    let req = method === "GET"
      ? HttpClientRequest.get(`${root}${path}`)
      : HttpClientRequest.post(`${root}${path}`);
    if (body !== undefined) req = HttpClientRequest.bodyJsonUnsafe(req, body);
    if (options.apiKey) req = HttpClientRequest.bearerToken(req, options.apiKey);
    const noFields = (m: string): ErrorFields => ({
      message: m,
      type: null,
      param: null,
      code: null,
    });
    return Effect.gen(function* () {
      const client = yield* HttpClient.HttpClient;
      const res = yield* client.execute(req);
      const text = yield* res.text;
      return { status: res.status, text };
    }).pipe(
      Effect.provide(FetchHttpClient.layer),
      Effect.mapError((e) => {
        const chain = causeChain(e);
        const err = fail("connection", 0, noFields(chain.join(": ")), null);
        return new VllmHttpError({ ...err, requestSent: !chain.some((m) => NOT_SENT.test(m)) });
      }),
      Effect.timeoutOrElse({
        duration: Duration.millis(timeoutMs),
        orElse: () => Effect.fail(fail("timeout", 0, noFields(""), null, timeoutMs)),
      }),
      Effect.flatMap((r) =>
        r.status >= 200 && r.status < 300
          ? Effect.succeed(r)
          : Effect.fail(fail("status", r.status, parseErrorEnvelope(r.status, r.text), r.text))
      ),
    );
  };

  const request: VllmClient["request"] = (method, path, body, opts = {}) =>
    Effect.suspend(() => {
      let n = 0;
      const once = Effect.suspend(() => {
        n++;
        return attempt(method, path, body, opts.timeoutMs ?? defaultTimeout, () => n);
      });
      const policy = opts.retry === false
        ? null
        : opts.retry === undefined || opts.retry === true
        ? defaultRetry
        : opts.retry;
      if (!policy || policy.maxRetries <= 0) return once;
      const idempotent = opts.idempotent ?? method === "GET";
      const retryable = (e: VllmHttpError) => isRetryable(e, idempotent);
      return once.pipe(
        Effect.tapError((e) =>
          retryable(e) && n <= policy.maxRetries
            ? Effect.logWarning(`${e.message} (attempt ${n}; retrying)`)
            : Effect.void
        ),
        Effect.retry({ schedule: retrySchedule(policy), while: retryable }),
      );
    });

  const parse = (method: string, path: string) => (r: VllmResponse) =>
    Effect.try({
      try: () => JSON.parse(r.text) as unknown,
      catch: () =>
        new VllmHttpError({
          method,
          path,
          server: root,
          status: r.status,
          reason: "decode",
          detail: `the answer is not JSON: ${JSON.stringify(clip(r.text, 120))}`,
          timeoutMs: null,
          type: null,
          param: null,
          code: null,
          body: clip(r.text),
          attempts: 1,
        }),
    });

  return {
    baseUrl: root,
    request,
    postJson: (path, body, opts) =>
      Effect.flatMap(request("POST", path, body ?? {}, opts), parse("POST", path)),
    getJson: (path, opts) =>
      Effect.flatMap(request("GET", path, undefined, opts), parse("GET", path)),
    postText: (path, body, opts) =>
      Effect.map(request("POST", path, body ?? {}, opts), (r) => r.text),
    version: () =>
      cachedVersion !== undefined ? Effect.succeed(cachedVersion) : request("GET", "/version").pipe(
        Effect.flatMap(parse("GET", "/version")),
        Effect.map((j) => str((j as { version?: unknown } | null)?.version) ?? null),
        Effect.catchIf(
          (e) => e.reason === "status" && e.status === 404,
          () => Effect.succeed(null),
        ),
        Effect.tap((v) => Effect.sync(() => (cachedVersion = v))),
      ),
    healthy: () =>
      request("GET", "/health", undefined, { retry: false, timeoutMs: 2000 }).pipe(
        Effect.as(true),
        Effect.catch(() => Effect.succeed(false)),
      ),
  };
};

/**
 * The fields every lorafold /v1/completions body sends explicitly, so that no server default
 * (vLLM takes omitted sampling fields from the model's generation_config) changes the sampled
 * distribution: no penalties, no min_p or min_tokens, the sampled tokens' log-probs and their ids.
 */
export const explicitCompletionFields: Readonly<Record<string, unknown>> = {
  min_tokens: 0,
  min_p: 0,
  presence_penalty: 0,
  frequency_penalty: 0,
  repetition_penalty: 1,
  logprobs: 0,
  return_token_ids: true,
  return_tokens_as_token_ids: true,
};

/** A short description of an error for SyncError/RolloutError messages. */
export const describeHttpError = (e: VllmHttpError): string =>
  e.attempts > 1 ? `${e.message} (after ${e.attempts} attempts)` : e.message;

// ---- /v1/completions answers ------------------------------------------------------------------

const Choice = Schema.Struct({
  index: Schema.Int,
  finish_reason: Schema.optional(Schema.NullOr(Schema.String)),
  token_ids: Schema.optional(Schema.NullOr(Schema.Array(Schema.Int))),
  logprobs: Schema.optional(Schema.NullOr(Schema.Struct({
    token_logprobs: Schema.Array(Schema.NullOr(Schema.Number)),
    tokens: Schema.optional(Schema.NullOr(Schema.Array(Schema.String))),
  }))),
});

const CompletionAnswer = Schema.Struct({
  model: Schema.optional(Schema.NullOr(Schema.String)),
  choices: Schema.Array(Choice),
});

/**
 * Why a completion ended: EOS or a stop condition ("stop"), max_tokens ("length"), aborted by the
 * server, e.g. a pause in abort mode ("abort"), or vLLM's repetition detection ("repetition").
 */
export type FinishReason = "stop" | "length" | "abort" | "repetition";

/**
 * The floor vLLM puts on logprobs in its OpenAI answers: -inf (and, in newer versions, NaN) is
 * sent as -9999.0, because JSON has no -inf. A value at or below it is not a log-probability but
 * "clamped: at most this, exact value unknown".
 */
export const CLAMPED_LOGPROB = -9999;

const FINISH_REASONS: ReadonlySet<string> = new Set(["stop", "length", "abort", "repetition"]);

/** Whether a logprob from the server is vLLM's clamp value rather than a real log-probability. */
export const isClampedLogprob = (x: number): boolean => x <= CLAMPED_LOGPROB;

/** One choice of a /v1/completions answer, as token ids and the logprobs of those tokens. */
export interface CompletionChoiceData {
  readonly index: number;
  readonly tokens: readonly number[];
  /**
   * Logprob of each token: null where the server gave none; NaN where it sent vLLM's clamp value
   * (see {@link CLAMPED_LOGPROB}): unknown, never to be used as a number.
   */
  readonly logprobs: readonly (number | null)[] | null;
  readonly finishReason: FinishReason;
}

const tokenIdOf = (s: string): number | null => {
  const m = /^token_id:(\d+)$/.exec(s);
  return m ? Number(m[1]) : null;
};

/**
 * Decodes a /v1/completions answer: token ids from `token_ids` (return_token_ids), else from the
 * logprob tokens rendered as "token_id:N" (return_tokens_as_token_ids, for servers without
 * return_token_ids). A malformed answer fails with reason "decode".
 */
export const decodeCompletion = (
  json: unknown,
  path = "/v1/completions",
): Effect.Effect<CompletionChoiceData[], VllmHttpError> => {
  const bad = (why: string) =>
    new VllmHttpError({
      method: "POST",
      path,
      server: null,
      status: 200,
      reason: "decode",
      detail: `unexpected answer: ${why}`,
      timeoutMs: null,
      type: null,
      param: null,
      code: null,
      body: clip(JSON.stringify(json) ?? String(json)),
      attempts: 1,
    });
  return Schema.decodeUnknownEffect(CompletionAnswer)(json).pipe(
    Effect.mapError((e) => bad(clip(e.message, 300))),
    Effect.flatMap((a) =>
      Effect.forEach(a.choices, (c) => {
        const lps = c.logprobs?.token_logprobs ?? null;
        let tokens: readonly number[] | null = c.token_ids ?? null;
        if (tokens === null && c.logprobs?.tokens) {
          const ids = c.logprobs.tokens.map(tokenIdOf);
          if (ids.every((x) => x !== null)) tokens = ids as number[];
        }
        if (tokens === null) {
          return Effect.fail(
            bad(`choice ${c.index} has neither token_ids nor token-id logprob tokens`),
          );
        }
        if (lps !== null && lps.length !== tokens.length) {
          return Effect.fail(
            bad(`choice ${c.index}: ${tokens.length} tokens but ${lps.length} logprobs`),
          );
        }
        // a finished choice always has a reason; an absent one is read as "length" (old servers)
        const fr = c.finish_reason ?? "length";
        if (!FINISH_REASONS.has(fr)) {
          // e.g. "error": mapping it to "length" would hide a failed generation
          return Effect.fail(bad(`choice ${c.index}: unknown finish_reason ${JSON.stringify(fr)}`));
        }
        const finishReason = fr as FinishReason;
        return Effect.succeed({
          index: c.index,
          tokens: [...tokens],
          logprobs: lps ? lps.map((x) => (x !== null && isClampedLogprob(x) ? NaN : x)) : null,
          finishReason,
        });
      })
    ),
  );
};
