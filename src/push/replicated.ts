/**
 * Pushes to N engine replicas (src/vllm/replicas.ts). Each snapshot fans out to every replica in
 * rotation, and to those out of it for failing verification, concurrently; each replica's push is
 * its own verified push (its own pusher, routing and directory). A replica whose push fails or
 * does not verify is taken out of rotation and reported; the push succeeds while at least one
 * replica took it, and fails (with that replica's own error when there is one replica) when none
 * did. A replica that stopped answering is left to the monitor: once GET /health answers again it
 * gets the newest snapshot (verified; adapters of its earlier life unloaded first) and rejoins.
 * New replicas join the same way; removed ones unload their adapters once their requests end.
 * The trainer's probe log-probs are computed once per snapshot and probe answer, not per replica.
 * @module
 */
import { Effect, Semaphore } from "effect";
import {
  type PushReport,
  type PushTargetShape,
  type ReplicaPushOutcome,
  SyncError,
  type SyncMismatch,
} from "../ports/push_target.ts";
import type { Snapshot } from "../snapshot/snapshot.ts";
import { normalizeUrl, type OutCause, type Replica, type ReplicaSet } from "../vllm/replicas.ts";
import { Routing } from "../vllm/routing.ts";

/** One replica's push target, plus what to do when the replica leaves the set. */
export interface ReplicaTarget extends PushTargetShape {
  /** Unloads what it loaded on the replica (once its requests have ended); best effort. */
  readonly release: Effect.Effect<void>;
}

/**
 * Builds a replica's push target on its current routing; `returning` when the replica comes back
 * after it stopped answering (what it had loaded may be gone, or stale).
 */
export type ReplicaTargetFactory = (
  replica: Replica,
  returning: boolean,
) => Effect.Effect<ReplicaTarget, SyncError>;

/** The fanned-out PushTarget, with the hooks the monitor and the user drive. */
export interface ReplicatedPushTarget extends PushTargetShape {
  readonly replicas: ReplicaSet;
  /** Gives a joining or returning replica the newest snapshot (verified) and admits it. */
  catchUp(replica: Replica): Effect.Effect<void>;
  /** Adds a replica (it joins through `catchUp`). */
  add(url: string): Effect.Effect<void>;
  /** Removes a replica: no new request starts on it; its adapters are unloaded once idle. */
  remove(url: string): Effect.Effect<void>;
  /**
   * Unloads what the run loaded on every replica that answers (at its end: the server keeps
   * serving others without this run's adapters); best effort, bounded in time.
   */
  readonly release: Effect.Effect<void>;
}

interface Slot {
  /** Built at the replica's first push, rebuilt when it returns after it stopped answering. */
  target: ReplicaTarget | null;
  readonly lock: Semaphore.Semaphore;
}

/** Why a failed push takes a replica out: it did not answer, or it answered wrongly. */
const outCauseOf = (e: SyncError | SyncMismatch): OutCause => {
  if (e._tag === "SyncMismatch") return "unverified";
  const c = e.cause as { _tag?: unknown; reason?: unknown } | undefined;
  return c?._tag === "VllmHttpError" && (c.reason === "connection" || c.reason === "timeout")
    ? "unreachable"
    : "unverified";
};

/**
 * Fails once the replica goes out of rotation for not answering (or is removed) during the push;
 * it stays out for that reason (an unreachable replica is not re-labelled unverified).
 */
const lost = (r: Replica, snapshot: Snapshot, target: string): Effect.Effect<never, SyncError> =>
  Effect.gen(function* () {
    const gone = () => (r.state === "out" && r.cause === "unreachable") || r.state === "removed";
    // pushed to although it was out already (no other replica to push to): let the push try
    if (gone()) return yield* Effect.never;
    while (!gone()) {
      yield* Effect.sleep(100);
    }
    return yield* Effect.fail(
      new SyncError({
        target,
        version: snapshot.version,
        reason: `${r.url} ${
          r.state === "removed" ? "was removed" : "stopped answering"
        } during the push`,
      }),
    );
  });

/** Makes the fanned-out target over `replicas`, building each replica's target with `targetFor`. */
export const makeReplicatedPushTarget: (
  replicas: ReplicaSet,
  targetFor: ReplicaTargetFactory,
  name?: string,
) => Effect.Effect<ReplicatedPushTarget> = Effect.fn("makeReplicatedPushTarget")(function* (
  replicas: ReplicaSet,
  targetFor: ReplicaTargetFactory,
  name: string = `replicas(${replicas.replicas.map((r) => r.url).join(",")})`,
) {
  const order = yield* Semaphore.make(1);
  const slots = new Map<Replica, Slot>();
  let latest: Snapshot | null = null;

  const slotOf = (r: Replica): Slot => {
    let slot = slots.get(r);
    if (!slot) {
      slot = { target: null, lock: Semaphore.makeUnsafe(1) };
      slots.set(r, slot);
    }
    return slot;
  };

  /**
   * Pushes on the replica's own target, one push at a time per replica; `returning`: the replica
   * answers again after it stopped, so it starts over (new routing, new target).
   */
  const pushOn = (r: Replica, snapshot: Snapshot, returning: boolean) => {
    const slot = slotOf(r);
    return slot.lock.withPermits(1)(Effect.gen(function* () {
      if (returning) r.routing = new Routing(); // what it served may be gone
      if (slot.target === null || returning) slot.target = yield* targetFor(r, returning);
      return yield* slot.target.push(snapshot);
    }));
  };

  /** One replica's push; its outcome decides its place in the rotation. */
  const pushOne = (r: Replica, snapshot: Snapshot) =>
    Effect.gen(function* () {
      const t0 = performance.now();
      const exit = yield* pushOn(r, snapshot, false).pipe(
        // a replica the monitor finds gone does not hold up the push while its client retries
        Effect.raceFirst(lost(r, snapshot, name)),
        Effect.result,
      );
      const latencyMs = performance.now() - t0;
      if (exit._tag === "Success") {
        yield* replicas.admit(r, snapshot.version);
        return { r, report: exit.success, error: null, latencyMs };
      }
      yield* replicas.drain(
        r,
        outCauseOf(exit.failure),
        `push of v${snapshot.version}: ${exit.failure.message}`,
      );
      return { r, report: null, error: exit.failure, latencyMs };
    });

  const push = Effect.fn("ReplicatedPushTarget.push")(function* (
    snapshot: Snapshot,
  ): Effect.fn.Return<PushReport, SyncError | SyncMismatch> {
    latest = snapshot;
    // in rotation, joining and answering, or answering but wrong (a verified push brings it
    // back); unreachable ones are the monitor's, unless there is no one else to push to
    const answering = replicas.replicas.filter((r) =>
      r.state === "serving" || (r.state === "joining" && r.reachable) ||
      (r.state === "out" && r.cause === "unverified")
    );
    const targets = answering.length > 0
      ? answering
      : replicas.replicas.filter((r) => r.state !== "removed");
    if (targets.length === 0) {
      return yield* Effect.fail(
        new SyncError({
          target: name,
          version: snapshot.version,
          reason: `no replica to push to (${replicas.describe()})`,
        }),
      );
    }
    const results = yield* Effect.forEach(targets, (r) => pushOne(r, snapshot), {
      concurrency: "unbounded",
    });
    const outcomes: ReplicaPushOutcome[] = results.map((x) => ({
      url: x.r.url,
      ok: x.report !== null,
      reason: x.error?.message ?? null,
      latencyMs: x.latencyMs,
      logpDiffMax: x.report?.logpDiffMax ?? null,
    }));
    const ok = results.flatMap((x) => (x.report ? [x.report] : []));
    if (ok.length === 0) {
      if (results.length === 1 && replicas.size === 1) return yield* Effect.fail(results[0].error!);
      return yield* Effect.fail(
        new SyncError({
          target: name,
          version: snapshot.version,
          reason: `no replica took v${snapshot.version}: ${
            results.map((x) => `${x.r.url}: ${x.error?.message}`).join("; ")
          }`,
          cause: results.map((x) => x.error),
        }),
      );
    }
    const diffs = (pick: (p: PushReport) => number | null) => {
      const xs = ok.map(pick).filter((x): x is number => x !== null);
      return xs.length === 0 ? null : Math.max(...xs);
    };
    return {
      version: snapshot.version,
      target: ok.length === 1 && replicas.size === 1 ? ok[0].target : name,
      bytes: ok.reduce((a, p) => a + p.bytes, 0),
      latencyMs: Math.max(...ok.map((p) => p.latencyMs)),
      logpDiffMean: diffs((p) => p.logpDiffMean),
      logpDiffMax: diffs((p) => p.logpDiffMax),
      ...(replicas.size > 1 ? { replicas: outcomes, metrics: replicas.metrics() } : {}),
    } satisfies PushReport;
  });

  const catchUp = (r: Replica): Effect.Effect<void> =>
    Effect.gen(function* () {
      if (r.state === "serving" || r.state === "removed") return;
      let returning = r.state === "out" && r.cause === "unreachable";
      // the newest snapshot; again if a newer one was pushed meanwhile
      let pushed: Snapshot | null = null;
      while (latest !== null && latest !== pushed) {
        const snap: Snapshot = latest;
        const exit = yield* Effect.result(pushOn(r, snap, returning));
        if (exit._tag === "Failure") {
          yield* replicas.drain(
            r,
            outCauseOf(exit.failure),
            `catching up with v${snap.version}: ${exit.failure.message}`,
          );
          return;
        }
        returning = false;
        pushed = snap;
      }
      if (pushed !== null) yield* replicas.admit(r, pushed.version);
    });

  const add = (url: string) => Effect.asVoid(replicas.add(url));

  const remove = (url: string) =>
    Effect.flatMap(replicas.remove(url), (r) => {
      const slot = r ? slots.get(r) : undefined;
      if (!r || !slot) return Effect.void;
      slots.delete(r);
      return slot.lock.withPermits(1)(slot.target?.release ?? Effect.void);
    });

  const release = Effect.suspend(() =>
    Effect.forEach(
      [...slots.entries()],
      ([r, slot]) =>
        r.state === "out" && r.cause === "unreachable"
          ? Effect.void
          : slot.lock.withPermits(1)(slot.target?.release ?? Effect.void),
      { concurrency: "unbounded", discard: true },
    )
  ).pipe(Effect.timeout(10_000), Effect.ignore);

  return {
    name,
    replicas,
    release,
    push: (snapshot: Snapshot) => order.withPermits(1)(push(snapshot)),
    catchUp,
    add,
    remove,
  } satisfies ReplicatedPushTarget;
});

/** How the monitor watches the replicas. */
export interface ReplicaMonitorOptions {
  /** Between rounds, ms (default 2000). */
  readonly intervalMs?: number;
  /** Per health check, ms (default 2000). */
  readonly healthTimeoutMs?: number;
  /**
   * The replica URLs as they should be now (e.g. a file re-read), or null when unchanged;
   * replicas missing from it are removed and new ones added.
   */
  readonly refresh?: Effect.Effect<readonly string[] | null>;
}

/** Whether GET /health answers 2xx in time. */
const answers = (r: Replica, timeoutMs: number): Effect.Effect<boolean> =>
  r.client.request("GET", "/health", undefined, { retry: false, timeoutMs }).pipe(
    Effect.as(true),
    Effect.catch(() => Effect.succeed(false)),
  );

/**
 * One round of the monitor: applies `refresh`, takes serving replicas that stopped answering out
 * of rotation, and catches up joining replicas and returning ones that answer again.
 */
export const monitorRound = (
  target: ReplicatedPushTarget,
  options: ReplicaMonitorOptions = {},
): Effect.Effect<void> =>
  Effect.gen(function* () {
    const set = target.replicas;
    const urls = options.refresh ? yield* options.refresh : null;
    if (urls !== null) {
      const wanted = new Set(urls.map(normalizeUrl));
      for (const r of [...set.replicas]) if (!wanted.has(r.url)) yield* target.remove(r.url);
      for (const u of wanted) yield* target.add(u);
    }
    const timeout = options.healthTimeoutMs ?? 2000;
    yield* Effect.forEach(set.replicas, (r) =>
      Effect.gen(function* () {
        const up = yield* answers(r, timeout);
        r.reachable = up;
        r.missedHealth = up ? 0 : r.missedHealth + 1;
        // two misses in a row: one slow answer of a busy server is not an outage
        if ((r.state === "serving" || r.state === "joining") && r.missedHealth >= 2) {
          yield* set.drain(r, "unreachable", "GET /health does not answer");
        } else if (
          up && (r.state === "joining" || (r.state === "out" && r.cause === "unreachable"))
        ) {
          yield* target.catchUp(r);
        }
      }), { concurrency: "unbounded", discard: true });
  });

/** Runs monitor rounds forever (fork it in the run's scope). */
export const monitorReplicas = (
  target: ReplicatedPushTarget,
  options: ReplicaMonitorOptions = {},
): Effect.Effect<never> =>
  Effect.forever(
    Effect.andThen(monitorRound(target, options), Effect.sleep(options.intervalMs ?? 2000)),
  );
