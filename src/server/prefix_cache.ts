/**
 * The server's prefix cache: prompt-prefill results (every layer's K and V rows of the prompt and
 * the logits of its last position), keyed like vLLM's by (model or adapter NAME, cache_salt,
 * prompt token ids). Because the key is the name and not the weights, a name reused after an
 * in-place adapter reload, or base weights reloaded without /reset_prefix_cache, serve the old
 * prefill: exactly the staleness vLLM shows.
 *
 * Lookups return an exact entry or the longest cached prompt that is a strict prefix of the new
 * one (whose K/V are reused; only the remaining tokens are prefilled). Entries live on the host
 * (backend-independent) and are evicted least-recently-used beyond a byte budget.
 * @module
 */
import type { FloatArray } from "../backend/tensor.ts";

/** One cached prompt prefill. */
export interface PrefixEntry {
  /** Namespace: model/adapter name and cache_salt. */
  readonly ns: string;
  readonly ids: readonly number[];
  /** Per layer, K rows of the prompt [ids.length, kvHeads*headDim] (row-major). */
  readonly k: readonly FloatArray[];
  /** Per layer, V rows of the prompt. */
  readonly v: readonly FloatArray[];
  /** Logits of the prompt's last position [vocab]. */
  readonly logits: FloatArray;
}

/** A lookup result: the entry and whether it covers the whole prompt. */
export interface PrefixHit {
  readonly entry: PrefixEntry;
  readonly exact: boolean;
}

/** Counters of the cache (for logs and tests). */
export interface PrefixCacheStats {
  readonly entries: number;
  readonly bytes: number;
  readonly hits: number;
  readonly partialHits: number;
  readonly misses: number;
  readonly resets: number;
}

interface Slot {
  readonly entry: PrefixEntry;
  readonly bytes: number;
  lastUse: number;
}

const keyOf = (ns: string, ids: readonly number[]): string => `${ns}\u0000${ids.join(",")}`;

/** The namespace of a request: model (or adapter) name and cache salt. */
export const prefixNamespace = (modelName: string, cacheSalt: string | null): string =>
  `${modelName}\u0001${cacheSalt ?? ""}`;

const isPrefix = (p: readonly number[], ids: readonly number[]): boolean => {
  if (p.length >= ids.length) return false;
  for (let i = 0; i < p.length; i++) if (p[i] !== ids[i]) return false;
  return true;
};

/** LRU prefix cache bounded by `maxBytes` (0 disables caching). */
export class PrefixCache {
  readonly #slots = new Map<string, Slot>();
  readonly #byNs = new Map<string, Set<string>>();
  #bytes = 0;
  #clock = 0;
  #hits = 0;
  #partial = 0;
  #misses = 0;
  #resets = 0;

  constructor(readonly maxBytes: number) {}

  /** The exact entry for (ns, ids), else the longest cached strict prefix, else null. */
  lookup(ns: string, ids: readonly number[]): PrefixHit | null {
    const exact = this.#slots.get(keyOf(ns, ids));
    if (exact) {
      exact.lastUse = ++this.#clock;
      this.#hits++;
      return { entry: exact.entry, exact: true };
    }
    let best: Slot | null = null;
    for (const key of this.#byNs.get(ns) ?? []) {
      const s = this.#slots.get(key)!;
      if (isPrefix(s.entry.ids, ids) && (!best || s.entry.ids.length > best.entry.ids.length)) {
        best = s;
      }
    }
    if (best) {
      best.lastUse = ++this.#clock;
      this.#partial++;
      return { entry: best.entry, exact: false };
    }
    this.#misses++;
    return null;
  }

  /** Stores an entry (replacing one with the same key), then evicts LRU entries over budget. */
  insert(entry: PrefixEntry): void {
    let bytes = entry.logits.byteLength;
    for (const t of entry.k) bytes += t.byteLength;
    for (const t of entry.v) bytes += t.byteLength;
    if (bytes > this.maxBytes) return;
    const key = keyOf(entry.ns, entry.ids);
    this.#remove(key);
    this.#slots.set(key, { entry, bytes, lastUse: ++this.#clock });
    let set = this.#byNs.get(entry.ns);
    if (!set) this.#byNs.set(entry.ns, set = new Set());
    set.add(key);
    this.#bytes += bytes;
    while (this.#bytes > this.maxBytes) {
      let oldest: string | null = null;
      let t = Infinity;
      for (const [k, s] of this.#slots) {
        if (s.lastUse < t) {
          t = s.lastUse;
          oldest = k;
        }
      }
      if (oldest === null) break;
      this.#remove(oldest);
    }
  }

  #remove(key: string): void {
    const s = this.#slots.get(key);
    if (!s) return;
    this.#slots.delete(key);
    this.#bytes -= s.bytes;
    const set = this.#byNs.get(s.entry.ns);
    set?.delete(key);
    if (set && set.size === 0) this.#byNs.delete(s.entry.ns);
  }

  /** Drops every entry. */
  reset(): void {
    this.#slots.clear();
    this.#byNs.clear();
    this.#bytes = 0;
    this.#resets++;
  }

  /** Current counters. */
  stats(): PrefixCacheStats {
    return {
      entries: this.#slots.size,
      bytes: this.#bytes,
      hits: this.#hits,
      partialHits: this.#partial,
      misses: this.#misses,
      resets: this.#resets,
    };
  }
}
