/**
 * The engine replicas a run talks to (several vLLM deployments, or embedded servers), each with
 * its own client, its own Routing (the versions it serves) and its state in the rotation:
 *
 * - `joining`: added, not yet given the current snapshot (verified) — receives no rollouts;
 * - `serving`: in rotation, receives rollouts of the versions it has verified;
 * - `out`: taken out of rotation because it stopped answering (`unreachable`: the health monitor
 *   brings it back with a verified push once it answers) or failed a push or its verification
 *   (`unverified`: every later push is tried on it, and the first verified one brings it back).
 *   Its running requests finish; no new one starts on it;
 * - `removed`: taken out of the set by the user; forgotten once its requests have ended.
 *
 * Every change of state is reported (logged, and passed to an observer): a replica out of
 * rotation is never used silently. Rollouts go to serving replicas that still serve the
 * requested version, the least loaded first (load = sequences in flight), except that requests
 * sharing an affinity key (the samples of one prompt, the turns of one episode) prefer one
 * replica by rendezvous hashing while its load is within one call of the least loaded: its
 * prefix cache already holds their prompt.
 * @module
 */
import { Effect } from "effect";
import type { VllmClient } from "./client.ts";
import { Routing } from "./routing.ts";

/** Where a replica stands in the rotation. */
export type ReplicaState = "joining" | "serving" | "out" | "removed";

/** Why a replica is out of rotation. */
export type OutCause = "unreachable" | "unverified";

/** A state change of a replica, for observers (logs, metrics, tests). */
export type ReplicaEvent =
  | { readonly kind: "added"; readonly url: string }
  | { readonly kind: "serving"; readonly url: string; readonly version: number }
  | {
    readonly kind: "out";
    readonly url: string;
    readonly cause: OutCause;
    readonly reason: string;
  }
  | { readonly kind: "removed"; readonly url: string };

/** Observer of replica state changes. */
export type ReplicaObserver = (event: ReplicaEvent) => Effect.Effect<void>;

/** What a replica looks like now (status lines, metrics, tests). */
export interface ReplicaStatus {
  readonly url: string;
  readonly state: ReplicaState;
  /** Why it is out of rotation; null otherwise. */
  readonly cause: OutCause | null;
  readonly reason: string | null;
  /** The version it routes to; null before its first verified push. */
  readonly version: number | null;
  /** Sequences in flight on it. */
  readonly load: number;
  /** Rollout calls it has answered. */
  readonly calls: number;
}

/** One engine replica. */
export class Replica {
  state: ReplicaState = "joining";
  cause: OutCause | null = null;
  reason: string | null = null;
  /** Sequences in flight. */
  load = 0;
  /** Rollout calls answered. */
  calls = 0;
  /** Health checks missed in a row. */
  missedHealth = 0;
  /** Whether it answered the last check (at start, or the monitor's /health). */
  reachable = false;
  /** Added while the run was under way (its joining is logged). */
  lateJoin = false;
  /** Versions it serves; replaced when it comes back after it stopped answering (it may have lost them). */
  routing: Routing = new Routing();
  constructor(readonly url: string, readonly client: VllmClient) {}

  status(): ReplicaStatus {
    return {
      url: this.url,
      state: this.state,
      cause: this.cause,
      reason: this.reason,
      version: this.routing.current?.version ?? null,
      load: this.load,
      calls: this.calls,
    };
  }
}

/** 32-bit FNV-1a over numbers (affinity keys) and a string (the replica). */
const hash32 = (tokens: readonly number[], salt: string): number => {
  let h = 0x811c9dc5;
  const mix = (x: number) => {
    h ^= x & 0xff;
    h = Math.imul(h, 0x01000193);
    h ^= (x >>> 8) & 0xff;
    h = Math.imul(h, 0x01000193);
    h ^= (x >>> 16) & 0xff;
    h = Math.imul(h, 0x01000193);
    h ^= x >>> 24;
    h = Math.imul(h, 0x01000193);
  };
  for (let i = 0; i < salt.length; i++) mix(salt.charCodeAt(i));
  mix(0x7fffffff);
  for (const t of tokens) mix(t);
  return h >>> 0;
};

/** The affinity key length: enough of the prompt to tell prompts apart, cheap to hash. */
const AFFINITY_TOKENS = 256;

/** The replicas of a run and their states. */
export class ReplicaSet {
  readonly #replicas: Replica[] = [];

  constructor(
    readonly makeClient: (url: string) => VllmClient,
    readonly observer: ReplicaObserver = () => Effect.void,
  ) {}

  /** A set of one replica, already serving, over an existing client and routing. */
  static single(client: VllmClient, routing: Routing): ReplicaSet {
    const set = new ReplicaSet(() => client);
    const r = new Replica(client.baseUrl, client);
    r.routing = routing;
    r.state = "serving";
    set.#replicas.push(r);
    return set;
  }

  /** The replicas not removed, in the order they were added. */
  get replicas(): readonly Replica[] {
    return this.#replicas;
  }

  get size(): number {
    return this.#replicas.length;
  }

  find(url: string): Replica | null {
    const u = normalizeUrl(url);
    return this.#replicas.find((r) => r.url === u) ?? null;
  }

  /** Adds a replica (joining); an URL already in the set is returned as it is. */
  add(url: string): Effect.Effect<Replica> {
    return Effect.suspend(() => {
      const known = this.find(url);
      if (known) return Effect.succeed(known);
      const u = normalizeUrl(url);
      const r = new Replica(u, this.makeClient(u));
      // the replicas a run starts with are named by its first log line; later ones are news
      r.lateJoin = this.currentVersion() !== null;
      this.#replicas.push(r);
      return Effect.as(this.#report({ kind: "added", url: u }, r.lateJoin), r);
    });
  }

  /** Removes a replica: no new request starts on it; running ones finish. */
  remove(url: string): Effect.Effect<Replica | null> {
    return Effect.suspend(() => {
      const r = this.find(url);
      if (!r) return Effect.succeed(null);
      this.#replicas.splice(this.#replicas.indexOf(r), 1);
      r.state = "removed";
      return Effect.as(this.#report({ kind: "removed", url: r.url }), r);
    });
  }

  /** Puts a replica in rotation after a verified push of `version`. */
  admit(r: Replica, version: number): Effect.Effect<void> {
    return Effect.suspend(() => {
      if (r.state === "removed") return Effect.void;
      const was = r.state;
      r.state = "serving";
      r.cause = null;
      r.reason = null;
      return was === "serving"
        ? Effect.void
        : this.#report({ kind: "serving", url: r.url, version }, was === "out" || r.lateJoin);
    });
  }

  /** Takes a replica out of rotation (reported; repeated reports of the same reason are not). */
  drain(r: Replica, cause: OutCause, reason: string): Effect.Effect<void> {
    return Effect.suspend(() => {
      if (r.state === "removed") return Effect.void;
      // an unreachable replica stays unreachable until the monitor sees it answer again
      if (r.state === "out" && r.cause === "unreachable" && cause === "unverified") {
        return Effect.void;
      }
      const same = r.state === "out" && r.cause === cause && r.reason === reason;
      r.state = "out";
      r.cause = cause;
      r.reason = reason;
      return same ? Effect.void : this.#report({ kind: "out", url: r.url, cause, reason });
    });
  }

  /** The newest version a serving replica routes to; null before the first verified push. */
  currentVersion(): number | null {
    let v: number | null = null;
    for (const r of this.#replicas) {
      const c = r.state === "serving" ? r.routing.current : null;
      if (c && (v === null || c.version > v)) v = c.version;
    }
    return v;
  }

  /** Serving replicas that still serve `version`. */
  eligible(version: number, exclude: ReadonlySet<Replica> = new Set()): Replica[] {
    return this.#replicas.filter((r) =>
      r.state === "serving" && !exclude.has(r) && r.routing.live(version) !== null
    );
  }

  /**
   * The replica for a call of `size` sequences on `version`: the affinity key's rendezvous
   * choice while its load is at most the least load plus `size`, else the least loaded (the
   * earlier added on a tie). Null when no serving replica serves that version.
   */
  pick(
    version: number,
    affinity: readonly number[],
    size: number,
    exclude: ReadonlySet<Replica> = new Set(),
  ): Replica | null {
    const candidates = this.eligible(version, exclude);
    if (candidates.length === 0) return null;
    let least = candidates[0];
    for (const r of candidates) if (r.load < least.load) least = r;
    if (candidates.length === 1) return least;
    const key = affinity.length > AFFINITY_TOKENS ? affinity.slice(0, AFFINITY_TOKENS) : affinity;
    let preferred = candidates[0];
    let best = -1;
    for (const r of candidates) {
      const h = hash32(key, r.url);
      if (h > best) {
        best = h;
        preferred = r;
      }
    }
    return preferred.load <= least.load + size ? preferred : least;
  }

  status(): ReplicaStatus[] {
    return this.#replicas.map((r) => r.status());
  }

  /** One line per replica not serving, for errors and logs. */
  describe(): string {
    return this.#replicas.map((r) =>
      `${r.url} ${r.state}${r.reason ? ` (${r.reason})` : ""}${
        r.routing.current ? ` at v${r.routing.current.version}` : ""
      }`
    ).join("; ") || "no replicas";
  }

  /** Metrics of the rotation: replicas/serving, replicas/out, replicas/joining. */
  metrics(): Record<string, number> {
    const count = (s: ReplicaState) => this.#replicas.filter((r) => r.state === s).length;
    return {
      "replicas/serving": count("serving"),
      "replicas/out": count("out"),
      "replicas/joining": count("joining"),
    };
  }

  #report(event: ReplicaEvent, news = true): Effect.Effect<void> {
    const line = event.kind === "out"
      ? Effect.logWarning(
        `replica ${event.url} out of rotation (${event.cause}): ${event.reason}`,
      )
      : !news
      ? Effect.void
      : event.kind === "serving"
      ? Effect.logInfo(`replica ${event.url} serving from v${event.version}`)
      : Effect.logInfo(`replica ${event.url} ${event.kind}`);
    return Effect.andThen(line, this.observer(event));
  }
}

/** The URL a replica is known by: no trailing slash. */
export const normalizeUrl = (url: string): string => url.trim().replace(/\/+$/, "");

/** Where the replica URLs come from: given URLs, or a file of them (re-read while training). */
export type ReplicaSource =
  | { readonly kind: "urls"; readonly urls: readonly string[] }
  | { readonly kind: "file"; readonly path: string };

/** Whether a text is an http(s) URL with a host. */
const isHttpUrl = (text: string): boolean => {
  try {
    const u = new URL(text);
    return (u.protocol === "http:" || u.protocol === "https:") && u.host !== "";
  } catch {
    return false;
  }
};

/**
 * Reads `--server-url`: one or more http(s) URLs separated by commas (or whitespace), or else
 * the path of a file listing them. Fails with what is wrong, in words.
 */
export const parseReplicaSource = (text: string): ReplicaSource | string => {
  const t = text.trim();
  if (t === "") return "an empty server URL";
  if (!t.includes("://")) return { kind: "file", path: t };
  const urls = t.split(/[\s,]+/).filter((x) => x !== "").map(normalizeUrl);
  const bad = urls.find((u) => !isHttpUrl(u));
  if (bad !== undefined) return `'${bad}' is not an http(s) URL`;
  const dup = urls.find((u, i) => urls.indexOf(u) !== i);
  if (dup !== undefined) return `'${dup}' is given twice`;
  return { kind: "urls", urls };
};

/**
 * The URLs of a replica file: one per line; blank lines and `#` comments are skipped. Fails with
 * the first bad line, numbered from 1.
 */
export const parseReplicaFile = (text: string): readonly string[] | string => {
  const urls: string[] = [];
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].replace(/#.*$/, "").trim();
    if (line === "") continue;
    const u = normalizeUrl(line);
    if (!isHttpUrl(u)) return `line ${i + 1}: '${line}' is not an http(s) URL`;
    if (!urls.includes(u)) urls.push(u);
  }
  return urls;
};
