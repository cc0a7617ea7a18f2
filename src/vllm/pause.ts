/**
 * Which spelling of "pause, but let in-flight requests finish" a server understands. vLLM's
 * POST /pause changed twice, and a wrong guess is silent (FastAPI ignores unknown query
 * parameters), so the form is read from the server before the first full-weight push:
 *
 * - no /pause (404) before vLLM PR #28037, or without VLLM_SERVER_DEV_MODE=1;
 * - `?wait_for_inflight_requests=true` from PR #28037 (no `mode`: `mode=wait` alone would be
 *   ignored and every in-flight request, other clients' too, aborted);
 * - `?mode=wait` from PR #32351, where the deprecated `wait_for_inflight_requests=true` still
 *   forces wait.
 *
 * The route table comes from GET /openapi.json (FastAPI's schema, which lists /pause and its query
 * parameters), else GET /is_paused (added with /pause) tells whether /pause exists. When the
 * parameters are unknown, both spellings are sent: every /pause version waits then.
 * @module
 */
import { Effect } from "effect";
import type { VllmClient, VllmHttpError } from "./client.ts";

/** How to ask a server to pause after its in-flight requests finish. */
export type PauseForm =
  /** `mode=wait` (vLLM with PR #32351, the lorafold server). */
  | "mode"
  /** `wait_for_inflight_requests=true` (vLLM between PR #28037 and #32351). */
  | "legacy"
  /** Both: the parameters are unknown, and every /pause version waits with both. */
  | "both"
  /** The server has no /pause. */
  | "absent";

/** What the server told about its pause route. */
export interface PauseSupport {
  readonly form: PauseForm;
  /** Where the form was read: the OpenAPI schema, the /is_paused probe, or nothing answered. */
  readonly source: "openapi" | "is_paused" | "unknown";
  /** GET /version, null when unknown. */
  readonly version: string | null;
  /**
   * Whether other dev-mode routes (/collective_rpc, /reset_prefix_cache) exist, from the schema;
   * null when the schema was not available. Tells "too old for /pause" from "dev mode off".
   */
  readonly devRoutes: boolean | null;
}

/** The /pause path (with its query) of a form; null for "absent". */
export const pausePath = (form: PauseForm): string | null => {
  switch (form) {
    case "mode":
      return "/pause?mode=wait";
    case "legacy":
      return "/pause?wait_for_inflight_requests=true";
    case "both":
      return "/pause?mode=wait&wait_for_inflight_requests=true";
    case "absent":
      return null;
  }
};

interface OpenApiParam {
  readonly name?: unknown;
  readonly in?: unknown;
}

/** The /pause form an OpenAPI document describes, and whether it has other dev routes. */
export const pauseFormFromOpenApi = (
  doc: unknown,
): { form: PauseForm; devRoutes: boolean } | null => {
  const paths = (doc as { paths?: unknown } | null)?.paths;
  if (typeof paths !== "object" || paths === null) return null;
  const p = paths as Record<string, unknown>;
  const devRoutes = "/collective_rpc" in p || "/reset_prefix_cache" in p;
  const pause = (p["/pause"] as { post?: { parameters?: unknown } } | undefined)?.post;
  if (!pause) return { form: "absent", devRoutes };
  const params = Array.isArray(pause.parameters) ? pause.parameters as OpenApiParam[] : [];
  const names = new Set(
    params.filter((x) => x.in === undefined || x.in === "query").map((x) => x.name),
  );
  const form: PauseForm = names.has("mode")
    ? "mode"
    : names.has("wait_for_inflight_requests")
    ? "legacy"
    : "both";
  return { form, devRoutes };
};

const isNotFound = (e: VllmHttpError): boolean => e.reason === "status" && e.status === 404;

/**
 * Reads the server's pause form: GET /openapi.json, else GET /is_paused. Never fails: what cannot
 * be read is "unknown" (form "both", which waits on every /pause version).
 */
export const detectPauseSupport = (client: VllmClient): Effect.Effect<PauseSupport> =>
  Effect.gen(function* () {
    const version = yield* client.version().pipe(Effect.catch(() => Effect.succeed(null)));
    const quick = { retry: false, timeoutMs: 10_000 } as const;
    const doc = yield* client.getJson("/openapi.json", quick).pipe(
      Effect.map(pauseFormFromOpenApi),
      Effect.catch(() => Effect.succeed(null)),
    );
    if (doc) return { ...doc, source: "openapi", version } satisfies PauseSupport;
    const probe = yield* client.request("GET", "/is_paused", undefined, quick).pipe(
      Effect.as("present" as const),
      Effect.catch((e) => Effect.succeed(isNotFound(e) ? "absent" as const : "unknown" as const)),
    );
    return {
      form: probe === "absent" ? "absent" : "both",
      source: probe === "unknown" ? "unknown" : "is_paused",
      version,
      devRoutes: null,
    } satisfies PauseSupport;
  });

/** Why a server cannot pause, and what it needs: the exact flag or vLLM change. */
export const pauseUnavailableHint = (s: PauseSupport): string => {
  const v = s.version === null ? "" : ` ${s.version}`;
  if (s.devRoutes === true) {
    return `this server (vLLM${v}) runs in dev mode but has no POST /pause: a full-weight push ` +
      `needs a vLLM that includes PR #28037 (POST /pause; mode=wait came with PR #32351)`;
  }
  if (s.devRoutes === false) {
    return `this server (vLLM${v}) has no dev-mode routes: start it with VLLM_SERVER_DEV_MODE=1 ` +
      `(POST /pause, /collective_rpc and /reset_prefix_cache are dev-mode routes)`;
  }
  return `this server (vLLM${v}) has no POST /pause: start it with VLLM_SERVER_DEV_MODE=1; ` +
    `if it is set, this vLLM predates PR #28037 (POST /pause) and cannot pause for a ` +
    `full-weight push`;
};
