/**
 * LoRA push to a vLLM-compatible server, the safe way round every known failure of same-name
 * reloading:
 *
 * 1. the snapshot's adapter is exported (digest re-checked) into a temporary directory that is
 *    renamed atomically to a FRESH versioned directory `policy-v{k}` (the server never sees a
 *    half-written adapter, and no directory is ever rewritten);
 * 2. POST /v1/load_lora_adapter {lora_name: "policy-v{k}", lora_path} (a new name per version:
 *    the server's prefix cache is keyed by adapter name, and load_inplace re-reads from disk);
 * 3. the new version is verified (src/push/verify.ts) and only then routed to, with
 *    cache_salt "v{k}";
 * 4. versions older than the last `keepLoaded` (>= 2) are unloaded once their in-flight
 *    requests have finished, and their directories removed.
 *
 * A failure at any step leaves the previous version routed and serving. A load retried after a
 * lost answer ("already loaded") is recognised by the adapter's path in GET /v1/models, so a
 * snapshot is applied exactly once; a 500 (vLLM's answer to an adapter it cannot load, however
 * often it is sent) is not retried.
 * @module
 */
import { Effect } from "effect";
import { readdir, rename, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import type { BackendShape } from "../backend/backend.ts";
import { type CheckpointError, fsOp, makeDirectory } from "../io/checkpoint.ts";
import { type PushReport, SyncError, type SyncMismatch } from "../ports/push_target.ts";
import { exportAdapter } from "../snapshot/export.ts";
import { describeHttpError, type VllmClient, type VllmHttpError } from "../vllm/client.ts";
import type { Snapshot } from "../snapshot/snapshot.ts";
import { verifyRoute, type VerifySettings } from "./verify.ts";
import type { Route, Routing } from "../vllm/routing.ts";

/** Steps of a push, reported to an observer (logging, benches, fault-injection tests). */
export type PushStage =
  | "exported"
  | "loaded"
  | "paused"
  | "reloaded"
  | "reset"
  | "resumed"
  | "verified"
  | "routed";

/** Observer of push steps. */
export type StageObserver = (stage: PushStage, version: number) => Effect.Effect<void>;

const noObserver: StageObserver = () => Effect.void;

/** The adapter name of version k on the server. */
export const adapterName = (version: number): string => `policy-v${version}`;

/** The default cache_salt of version k. */
export const versionSalt = (version: number): string => `v${version}`;

const randomSuffix = (): string =>
  Array.from(crypto.getRandomValues(new Uint8Array(6)), (b) => b.toString(16).padStart(2, "0"))
    .join("");

const exists = (p: string): Promise<boolean> => stat(p).then(() => true, () => false);

/** Total size of the files directly inside `dir`. */
export const directoryBytes = async (dir: string): Promise<number> => {
  let n = 0;
  for (const e of await readdir(dir, { withFileTypes: true })) {
    if (e.isFile()) n += (await stat(join(dir, e.name))).size;
  }
  return n;
};

/**
 * Writes a directory through `write(tmp)` into a temporary sibling, then renames it atomically to
 * a fresh `root/name` (`name.1`, `name.2`, … when an earlier attempt left that name). Returns the
 * final path and the bytes written; the temporary directory is removed on failure.
 */
export const freshVersionDir: <E>(
  root: string,
  name: string,
  write: (tmp: string) => Effect.Effect<void, E>,
) => Effect.Effect<{ dir: string; bytes: number }, E | CheckpointError> = Effect.fn(
  "freshVersionDir",
)(
  function* <E>(
    root: string,
    name: string,
    write: (tmp: string) => Effect.Effect<void, E>,
  ): Effect.fn.Return<{ dir: string; bytes: number }, E | CheckpointError> {
    yield* makeDirectory(root);
    const tmp = join(root, `.tmp-${name}-${randomSuffix()}`);
    yield* Effect.onError(write(tmp), () => removeDir(tmp));
    const dir = yield* fsOp(tmp, `cannot publish ${name}`, async () => {
      for (let i = 0;; i++) {
        const d = join(root, i === 0 ? name : `${name}.${i}`);
        if (await exists(d)) continue;
        // no fsync: a pushed version is used once and removed; a crash loses nothing of value
        await rename(tmp, d);
        return d;
      }
    }).pipe(Effect.onError(() => removeDir(tmp)));
    const bytes = yield* fsOp(dir, "cannot stat the directory", () => directoryBytes(dir));
    return { dir, bytes };
  },
);

/** Removes a version directory (best effort: a failure to remove it is ignored). */
export const removeDir = (dir: string): Effect.Effect<void> =>
  Effect.promise(() => rm(dir, { recursive: true, force: true }).catch(() => {}));

/** Hint for a 404 from a control route: the feature is off on the server. */
export const routeHint = (e: VllmHttpError, feature: "lora" | "dev"): string =>
  e.reason === "status" && e.status === 404 && /not found/i.test(e.message) && e.param === null
    ? feature === "lora"
      ? " (is the server started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=1?)"
      : " (is the server started with VLLM_SERVER_DEV_MODE=1?)"
    : "";

/** Versions a pusher has routed: their digests, so that a version number never names two snapshots. */
export class PushedVersions {
  readonly #pushed = new Map<number, { digest: string; route: Route }>();

  /**
   * Checks a snapshot against earlier pushes: null when its version is new (or was pushed with the
   * same weights but is not routed now); the route when the same weights are routed already (re-verify
   * only); a SyncError when the version was pushed with other weights (its adapter name and
   * cache_salt would alias the older version's prefix cache).
   */
  check(
    snapshot: Snapshot,
    routing: Routing,
    target: string,
  ): Effect.Effect<Route | null, SyncError> {
    const prior = this.#pushed.get(snapshot.version);
    if (!prior) return Effect.succeed(null);
    if (prior.digest !== snapshot.digest) {
      return Effect.fail(
        new SyncError({
          target,
          version: snapshot.version,
          reason: `version ${snapshot.version} was already pushed with other weights (digest ` +
            `${prior.digest.slice(0, 12)}, now ${
              snapshot.digest.slice(0, 12)
            }): a version number must name one snapshot`,
        }),
      );
    }
    return Effect.succeed(routing.current?.version === snapshot.version ? prior.route : null);
  }

  /** Records a routed push. */
  add(snapshot: Snapshot, route: Route): void {
    this.#pushed.set(snapshot.version, { digest: snapshot.digest, route });
  }
}

/** A PushReport for a re-push of the routed version: verification only, nothing written. */
export const reverify = (
  client: VllmClient,
  backend: BackendShape,
  snapshot: Snapshot,
  route: Route,
  verify: VerifySettings,
  target: string,
): Effect.Effect<PushReport, SyncError | SyncMismatch> =>
  Effect.suspend(() => {
    const t0 = performance.now();
    return Effect.map(verifyRoute(client, backend, snapshot, route, verify, target), (o) => ({
      version: snapshot.version,
      target,
      bytes: 0,
      latencyMs: performance.now() - t0,
      logpDiffMean: o?.mean ?? null,
      logpDiffMax: o?.max ?? null,
    }));
  });

/** What a LoRA push needs. */
export interface LoraPushContext {
  readonly client: VllmClient;
  /** The trainer's backend (verification forward pass). */
  readonly backend: BackendShape;
  readonly routing: Routing;
  /** Absolute directory receiving policy-v{k}/; must be readable by the server. */
  readonly root: string;
  /** base_model_name_or_path of the written adapter_config.json. */
  readonly baseModel: string;
  readonly verify: VerifySettings;
  /** Adapters kept loaded: the routed one and its predecessors (at least 2). */
  readonly keepLoaded: number;
  /** Target name in reports and errors. */
  readonly target: string;
  readonly onStage?: StageObserver;
  /** cache_salt of a version (default "v{k}"). */
  readonly cacheSalt?: (version: number) => string;
}

/** A LoRA pusher: `push` for the PushTarget, `loaded` lists the versions it keeps loaded. */
export interface LoraPusher {
  push(snapshot: Snapshot): Effect.Effect<PushReport, SyncError | SyncMismatch>;
  loaded(): readonly number[];
  /** Unloads every version it loaded (each once its requests have ended); best effort. */
  readonly release: Effect.Effect<void>;
}

interface LoadedVersion {
  readonly version: number;
  readonly name: string;
  readonly dir: string;
}

interface ModelCardLite {
  readonly id: string;
  readonly root?: string;
}

const cards = (client: VllmClient): Effect.Effect<ModelCardLite[], VllmHttpError> =>
  Effect.map(client.getJson("/v1/models"), (j) => {
    const data = (j as { data?: unknown } | null)?.data;
    return Array.isArray(data)
      ? data.filter((c): c is ModelCardLite =>
        typeof c === "object" && c !== null && typeof c.id === "string"
      )
      : [];
  });

/** Makes the LoRA pusher to a vLLM-compatible server. */
export const makeLoraPusher = (ctx: LoraPushContext): LoraPusher => {
  const loaded: LoadedVersion[] = [];
  const pushed = new PushedVersions();
  const stage = ctx.onStage ?? noObserver;
  const salt = ctx.cacheSalt ?? versionSalt;
  const keep = Math.max(2, ctx.keepLoaded);

  const unload = (v: LoadedVersion): Effect.Effect<void> =>
    // a repeat that finds the adapter gone answers 404, taken as done below
    ctx.client.request("POST", "/v1/unload_lora_adapter", { lora_name: v.name }, {
      idempotent: true,
    }).pipe(
      Effect.asVoid,
      Effect.catch((e) =>
        e.reason === "status" && e.status === 404
          ? Effect.void // already gone (e.g. the server restarted)
          : Effect.logWarning(`unloading ${v.name} failed: ${describeHttpError(e)}`)
      ),
      Effect.andThen(removeDir(v.dir)),
    );

  /** POST load; an "already loaded" answer is ours when the card's root is our directory. */
  const load = (name: string, dir: string, version: number): Effect.Effect<void, SyncError> => {
    const fail = (what: string, e: VllmHttpError) =>
      new SyncError({
        target: ctx.target,
        version,
        reason: `loading adapter ${name} from ${dir} failed: ${describeHttpError(e)}${
          routeHint(e, "lora")
        }${what}`,
        cause: e,
      });
    // Retried like an idempotent request (never on 500: vLLM's answer to an adapter it cannot
    // load): a repeat whose first attempt landed gets "already loaded", recognised below by the
    // card's root, so the versioned name makes the load idempotent.
    const post = ctx.client.postText(
      "/v1/load_lora_adapter",
      { lora_name: name, lora_path: dir },
      { idempotent: true },
    );
    return post.pipe(
      Effect.asVoid,
      Effect.catch((e) => {
        if (!(e.reason === "status" && e.status === 400 && /already/i.test(e.message))) {
          return Effect.fail(fail("", e));
        }
        return cards(ctx.client).pipe(
          Effect.mapError((e2) => fail(`; listing models failed: ${describeHttpError(e2)}`, e)),
          Effect.flatMap((cs) => {
            const card = cs.find((c) => c.id === name);
            if (card?.root === dir) return Effect.void; // our own earlier attempt landed
            // a stale adapter of that name (an earlier run on this server): replace it, and
            // drop the prefix cache it may have filled under the same name and salt
            return Effect.logWarning(
              `adapter ${name} is already loaded from ${card?.root ?? "elsewhere"}: replacing it`,
            ).pipe(
              Effect.andThen(
                ctx.client.request("POST", "/v1/unload_lora_adapter", { lora_name: name }),
              ),
              Effect.andThen(post),
              Effect.andThen(
                ctx.client.request("POST", "/reset_prefix_cache", undefined, { retry: false }).pipe(
                  Effect.ignore,
                ),
              ),
              Effect.asVoid,
              Effect.mapError((e2) => fail("", e2)),
            );
          }),
        );
      }),
    );
  };

  const push = Effect.fn("LoraPusher.push")(function* (
    snapshot: Snapshot,
  ): Effect.fn.Return<PushReport, SyncError | SyncMismatch> {
    const t0 = performance.now();
    const version = snapshot.version;
    const name = adapterName(version);
    const syncError = (reason: string, cause?: unknown) =>
      new SyncError({ target: ctx.target, version, reason, cause });
    if (snapshot.kind !== "lora" || snapshot.loraConfig === null) {
      return yield* Effect.fail(
        syncError(`snapshot v${version} is a full-weight snapshot: it has no adapter to push`),
      );
    }
    const routed = yield* pushed.check(snapshot, ctx.routing, ctx.target);
    if (routed) {
      return yield* reverify(ctx.client, ctx.backend, snapshot, routed, ctx.verify, ctx.target);
    }
    const { dir, bytes } = yield* freshVersionDir(
      ctx.root,
      name,
      // plain writes: the directory is published by one rename and removed after use
      (tmp) => exportAdapter(snapshot, tmp, ctx.baseModel, "plain"),
    ).pipe(
      Effect.mapError((e) =>
        syncError(`exporting the adapter of v${version} failed: ${e.message}`, e)
      ),
    );
    yield* stage("exported", version);
    yield* load(name, dir, version).pipe(Effect.onError(() => removeDir(dir)));
    yield* stage("loaded", version);
    const route: Route = { version, kind: "lora", model: name, cacheSalt: salt(version), dir };
    const outcome = yield* verifyRoute(
      ctx.client,
      ctx.backend,
      snapshot,
      route,
      ctx.verify,
      ctx.target,
    ).pipe(
      // never routed: take it off the server again (the previous version keeps serving)
      Effect.onError(() => unload({ version, name, dir })),
    );
    const latencyMs = performance.now() - t0;
    yield* stage("verified", version);
    ctx.routing.set(route);
    pushed.add(snapshot, route);
    yield* stage("routed", version);
    loaded.push({ version, name, dir });
    while (loaded.length > keep) {
      const old = loaded.shift()!;
      yield* ctx.routing.retire(old.version, unload(old));
    }
    return {
      version,
      target: ctx.target,
      bytes,
      latencyMs,
      logpDiffMean: outcome?.mean ?? null,
      logpDiffMax: outcome?.max ?? null,
    } satisfies PushReport;
  });

  const release = Effect.suspend(() =>
    Effect.forEach(loaded.splice(0), (v) => ctx.routing.retire(v.version, unload(v)), {
      discard: true,
    })
  );

  return { push, loaded: () => loaded.map((v) => v.version), release };
};

/**
 * Unloads the adapters a server lists whose directory lies under `root` (versions an earlier
 * pusher of this run loaded there, before the server stopped answering); best effort.
 */
export const unloadAdaptersUnder = (client: VllmClient, root: string): Effect.Effect<void> =>
  cards(client).pipe(
    Effect.flatMap((cs) =>
      Effect.forEach(
        cs.filter((c) => typeof c.root === "string" && c.root.startsWith(root + "/")),
        (c) =>
          client.request("POST", "/v1/unload_lora_adapter", { lora_name: c.id }, {
            idempotent: true,
          }),
        { discard: true },
      )
    ),
    Effect.catch((e) => Effect.logWarning(`unloading stale adapters: ${describeHttpError(e)}`)),
  );
