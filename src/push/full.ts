/**
 * Full-weight push to a vLLM-compatible server in dev mode (VLLM_SERVER_DEV_MODE=1):
 *
 * 1. the snapshot is exported (digest re-checked) as a Hugging Face checkpoint into a temporary
 *    directory renamed atomically to a FRESH `policy-v{k}` directory (reload_weights is known to
 *    serve stale weights when a directory is reused);
 * 2. POST /pause in the server's spelling of "wait" (src/vllm/pause.ts: `mode=wait`, or
 *    `wait_for_inflight_requests=true` on vLLM before PR #32351; a server without /pause is refused
 *    before anything is written, with the flag or vLLM version it needs) →
 *    POST /collective_rpc {method: "reload_weights", kwargs: {weights_path, is_checkpoint_format:
 *    true}} → POST /reset_prefix_cache (only effective once drained) → POST /resume. Resume is
 *    attempted even when the reload failed, so a failed push never leaves the server paused;
 * 3. the new weights are verified (src/push/verify.ts) under cache_salt "v{k}" and only then
 *    routed to. A failed reload leaves the previous weights serving; a failed verification
 *    (policy "fail") reloads the previous version's directory, best effort.
 *
 * Directories of versions older than the last `keepDirs` (>= 2) are removed.
 * @module
 */
import { type Cause, Effect, Exit } from "effect";
import type { BackendShape } from "../backend/backend.ts";
import { type PushReport, SyncError, type SyncMismatch } from "../ports/push_target.ts";
import { exportCheckpoint } from "../snapshot/export.ts";
import { describeHttpError, type VllmClient, type VllmHttpError } from "../vllm/client.ts";
import {
  adapterName,
  freshVersionDir,
  PushedVersions,
  removeDir,
  reverify,
  routeHint,
  type StageObserver,
  versionSalt,
} from "./lora.ts";
import type { Snapshot } from "../snapshot/snapshot.ts";
import { verifyRoute, type VerifySettings } from "./verify.ts";
import type { Route, Routing } from "../vllm/routing.ts";
import {
  detectPauseSupport,
  type PauseForm,
  pausePath,
  type PauseSupport,
  pauseUnavailableHint,
} from "../vllm/pause.ts";

const noObserver: StageObserver = () => Effect.void;

/**
 * Every step of the sequence is safe to repeat: pausing a paused server, reloading the same
 * directory, resetting an empty cache and resuming a running server change nothing more.
 */
const repeatable = { idempotent: true } as const;

/** Whether /pause rejected the query itself (a server that does not know `mode`). */
const rejectedQuery = (e: VllmHttpError): boolean =>
  e.reason === "status" && (e.status === 400 || e.status === 422);

/**
 * POST /pause in the server's form; when `mode=wait` is rejected as a bad query, once more as
 * `wait_for_inflight_requests=true` (never as a bare /pause, which aborts in-flight requests).
 */
const pauseWaiting = (client: VllmClient, form: PauseForm): Effect.Effect<void, VllmHttpError> => {
  const path = pausePath(form) ?? pausePath("both")!;
  const post = (p: string) => client.request("POST", p, {}, repeatable).pipe(Effect.asVoid);
  return form === "mode"
    ? post(path).pipe(Effect.catchIf(rejectedQuery, () => post(pausePath("legacy")!)))
    : post(path);
};

/**
 * The dev-mode reload sequence for a checkpoint directory the server can read (null: the
 * server's own model directory): pause(wait, in the server's form) → reload_weights →
 * reset_prefix_cache → resume. Resume runs whatever happened after a successful pause; the first
 * failure is returned.
 */
export const reloadCheckpoint: (
  client: VllmClient,
  dir: string | null,
  version: number,
  onStage?: StageObserver,
  pauseForm?: PauseForm,
) => Effect.Effect<void, VllmHttpError> = Effect.fn("reloadCheckpoint")(
  function* (
    client: VllmClient,
    dir: string | null,
    version: number,
    onStage: StageObserver = noObserver,
    pauseForm: PauseForm = "both",
  ): Effect.fn.Return<void, VllmHttpError> {
    yield* pauseWaiting(client, pauseForm);
    yield* onStage("paused", version);
    const reload = yield* Effect.exit(
      client.request("POST", "/collective_rpc", {
        method: "reload_weights",
        kwargs: dir === null
          ? { is_checkpoint_format: true }
          : { weights_path: dir, is_checkpoint_format: true },
      }, repeatable).pipe(Effect.tap(() => onStage("reloaded", version))),
    );
    const reset = Exit.isSuccess(reload)
      ? yield* Effect.exit(
        client.request("POST", "/reset_prefix_cache", {}, repeatable).pipe(
          Effect.tap(() => onStage("reset", version)),
        ),
      )
      : Exit.void;
    const resume = yield* Effect.exit(
      client.request("POST", "/resume", {}, repeatable).pipe(
        Effect.tap(() => onStage("resumed", version)),
      ),
    );
    const exits: Exit.Exit<unknown, VllmHttpError>[] = [reload, reset, resume];
    for (const ex of exits) {
      if (Exit.isFailure(ex)) {
        return yield* Effect.failCause(ex.cause as Cause.Cause<VllmHttpError>);
      }
    }
  },
);

/** What the server needs for a failed step of the sequence (404: a route it lacks). */
const fullPushHint = (e: VllmHttpError, pause: PauseSupport): string => {
  if (!(e.reason === "status" && e.status === 404)) return "";
  if (e.path.startsWith("/pause")) return ` (${pauseUnavailableHint(pause)})`;
  if (e.path === "/collective_rpc") {
    return " (POST /collective_rpc is missing: start the server with VLLM_SERVER_DEV_MODE=1; " +
      "it needs a vLLM that includes PR #23075, and reload_weights with weights_path)";
  }
  return routeHint(e, "dev");
};

/** What a full-weight push needs. */
export interface FullPushContext {
  readonly client: VllmClient;
  /** The trainer's backend (verification forward pass; merging a LoRA snapshot). */
  readonly backend: BackendShape;
  readonly routing: Routing;
  /** Absolute directory receiving policy-v{k}/; must be readable by the server. */
  readonly root: string;
  /** The server's name for its (reloaded) model: the `model` of rollouts. */
  readonly modelName: string;
  readonly verify: VerifySettings;
  /** Version directories kept on disk (at least 2: the routed one and the rollback). */
  readonly keepDirs: number;
  readonly target: string;
  readonly onStage?: StageObserver;
  /** cache_salt of a version (default "v{k}"). */
  readonly cacheSalt?: (version: number) => string;
  /** Checkpoint dtype (default F32: verification then compares like with like). */
  readonly dtype?: "F32" | "F16" | "BF16";
}

/** A full-weight pusher. */
export interface FullPusher {
  push(snapshot: Snapshot): Effect.Effect<PushReport, SyncError | SyncMismatch>;
}

/** Makes the full-weight pusher to a vLLM-compatible server. */
export const makeFullPusher = (ctx: FullPushContext): FullPusher => {
  const stage = ctx.onStage ?? noObserver;
  const salt = ctx.cacheSalt ?? versionSalt;
  const keep = Math.max(2, ctx.keepDirs);
  const dirs: string[] = [];
  const pushed = new PushedVersions();
  // read once per pusher: the server's pause form (a restarted server is the same binary)
  let pauseSupport: PauseSupport | null = null;
  const pauseOf = Effect.suspend(() =>
    pauseSupport
      ? Effect.succeed(pauseSupport)
      : Effect.tap(detectPauseSupport(ctx.client), (s) =>
        Effect.sync(() => {
          if (s.form !== "absent" && s.source !== "unknown") pauseSupport = s;
        }))
  );

  const push = Effect.fn("FullPusher.push")(function* (
    snapshot: Snapshot,
  ): Effect.fn.Return<PushReport, SyncError | SyncMismatch> {
    const t0 = performance.now();
    const version = snapshot.version;
    const syncError = (reason: string, cause?: unknown) =>
      new SyncError({ target: ctx.target, version, reason, cause });
    const routed = yield* pushed.check(snapshot, ctx.routing, ctx.target);
    if (routed) {
      return yield* reverify(ctx.client, ctx.backend, snapshot, routed, ctx.verify, ctx.target);
    }
    const pause = yield* pauseOf;
    if (pause.form === "absent") {
      // nothing written, nothing sent: the previous version keeps serving
      return yield* Effect.fail(
        syncError(`full-weight push of v${version} impossible: ${pauseUnavailableHint(pause)}`),
      );
    }
    const { dir, bytes } = yield* freshVersionDir(
      ctx.root,
      adapterName(version),
      // a LoRA snapshot is merged (out of place) on the trainer's backend
      (tmp) => exportCheckpoint(snapshot, tmp, ctx.dtype ?? "F32", ctx.backend),
    ).pipe(
      Effect.mapError((e) =>
        syncError(`exporting the weights of v${version} failed: ${e.message}`, e)
      ),
    );
    yield* stage("exported", version);
    const previous = ctx.routing.current;
    yield* reloadCheckpoint(ctx.client, dir, version, stage, pause.form).pipe(
      Effect.mapError((e) =>
        syncError(
          `full-weight push of v${version} failed: ${describeHttpError(e)}${
            fullPushHint(e, pause)
          }; ` +
            `the previous version (${
              previous ? `v${previous.version}` : "the base model"
            }) keeps serving`,
          e,
        )
      ),
      Effect.onError(() => removeDir(dir)),
    );
    const route: Route = {
      version,
      kind: "full",
      model: ctx.modelName,
      cacheSalt: salt(version),
      dir,
    };
    const outcome = yield* verifyRoute(
      ctx.client,
      ctx.backend,
      snapshot,
      route,
      ctx.verify,
      ctx.target,
    ).pipe(
      Effect.onError(() =>
        // the server holds weights we will not route to: put the previous version back
        reloadCheckpoint(
          ctx.client,
          previous?.kind === "full" ? previous.dir : null,
          version,
          noObserver,
          pause.form,
        )
          .pipe(
            Effect.catch((e) =>
              Effect.logWarning(
                `rollback after a failed verification failed: ${describeHttpError(e)}`,
              )
            ),
            Effect.andThen(removeDir(dir)),
          )
      ),
    );
    const latencyMs = performance.now() - t0;
    yield* stage("verified", version);
    ctx.routing.set(route);
    pushed.add(snapshot, route);
    yield* stage("routed", version);
    dirs.push(dir);
    while (dirs.length > keep) yield* removeDir(dirs.shift()!);
    return {
      version,
      target: ctx.target,
      bytes,
      latencyMs,
      logpDiffMean: outcome?.mean ?? null,
      logpDiffMax: outcome?.max ?? null,
    } satisfies PushReport;
  });

  return { push };
};
