/**
 * Which pushed version a server's rollouts go to (its model name and cache_salt), with per-version
 * in-flight request counts that decide when an older version may be unloaded. Shared by the
 * server rollout engine (reads the route) and the push targets (set and retire routes).
 * @module
 */
import { Effect } from "effect";

/** What the engine serves for one pushed version. */
export interface Route {
  readonly version: number;
  readonly kind: "lora" | "full";
  /** The `model` rollouts ask for: policy-v{k} (LoRA) or the base model's served name (full). */
  readonly model: string;
  /** Mixed into the server's prefix-cache key: a new version never reuses older KV. */
  readonly cacheSalt: string;
  /** The directory the server loaded this version from. */
  readonly dir: string;
}

/**
 * The version rollouts go to, the versions still servable (a LoRA push keeps its predecessors
 * loaded until they are retired; a full push replaces the weights, so only it is), plus
 * per-version in-flight counts: a retired version's cleanup (unloading its adapter) runs when its
 * last in-flight request ends.
 */
export class Routing {
  #current: Route | null = null;
  readonly #live = new Map<number, Route>();
  readonly #inflight = new Map<number, number>();
  readonly #retired = new Map<number, Effect.Effect<void>>();

  /** The routed version, or null before the first successful push. */
  get current(): Route | null {
    return this.#current;
  }

  /** Routes new requests to `route`. */
  set(route: Route): void {
    this.#current = route;
    if (route.kind === "full") this.#live.clear(); // the weights of older versions are gone
    this.#live.set(route.version, route);
  }

  /**
   * The route of a version the engine still serves (routed, kept, or retired while requests
   * still run on it); else null.
   */
  live(version: number): Route | null {
    return this.#live.get(version) ?? null;
  }

  /** Requests running on a version. */
  inflight(version: number): number {
    return this.#inflight.get(version) ?? 0;
  }

  /** Versions whose cleanup waits for requests to finish. */
  get pendingRetirements(): number[] {
    return [...this.#retired.keys()];
  }

  /**
   * Takes a route for a request: the current one, or that of `version` while it is still served
   * (null when nothing was pushed yet, or that version is no longer served).
   */
  begin(version?: number): Route | null {
    const r = version === undefined ? this.#current : this.live(version);
    if (r) this.#inflight.set(r.version, this.inflight(r.version) + 1);
    return r;
  }

  /** A request on `route` ended; runs the version's cleanup when it was retired and is idle. */
  end(route: Route): Effect.Effect<void> {
    return Effect.suspend(() => {
      const n = this.inflight(route.version) - 1;
      if (n > 0) {
        this.#inflight.set(route.version, n);
        return Effect.void;
      }
      this.#inflight.delete(route.version);
      const cleanup = this.#retired.get(route.version);
      if (!cleanup) return Effect.void;
      this.#retired.delete(route.version);
      this.#live.delete(route.version);
      return cleanup;
    });
  }

  /** Retires a version: its cleanup runs now when it is idle, else when its last request ends. */
  retire(version: number, cleanup: Effect.Effect<void>): Effect.Effect<void> {
    return Effect.suspend(() => {
      // a rollout batch already running on it may still start calls on it until it drains
      if (this.inflight(version) > 0) {
        this.#retired.set(version, cleanup);
        return Effect.void;
      }
      this.#live.delete(version);
      return cleanup;
    });
  }
}
