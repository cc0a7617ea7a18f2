/**
 * Prefill and decode of a running batch, with its KV cache slots.
 *
 * Prefill: one prompt at a time through the prefix cache (prefix_cache.ts): an exact hit skips the
 * forward pass, a cached strict prefix is reused and only the rest is prefilled; the result (every
 * layer's K/V rows of the prompt and its last logits) lives on the host.
 *
 * Decode: a `DecodeBatch` holds one KV cache of `slots` sequences x `maxLen` rows per layer, in
 * the decoder's layout (src/model/decoder.ts `KvCache`): every slot has been fed the same number
 * of rows `len`, a sequence's rows are right-aligned at `len` and the rows before its `kvStart`
 * are masked (left padding). One `step` feeds each live slot its pending token (one
 * `forwardCached` call for the whole batch); slots whose step the device's sampling candidates
 * decide are sampled from those alone, and the others get their logits row. Sequences join at
 * a step boundary: their prefill rows are written into a free slot, right-aligned at `len`, when
 * they fit; otherwise (no free slot, prompt longer than `len`, or not enough rows left) the cache
 * is rebuilt: a fresh one sized for the live and the joining sequences, the live rows copied over
 * (shifted, their positions unchanged). Finished sequences leave at once; their slots are reused
 * by the next joiners, and the cache is compacted when a quarter of its slots are dead (a dead
 * slot still costs a row of every matmul). Every sequence attends only its own rows, so its
 * logits do not depend on the others in the batch (bit-identical on the CPU backend).
 * @module
 */
import { Effect, Exit, Scope } from "effect";
import type { BackendShape } from "../backend/backend.ts";
import type { BackendError, Ops } from "../backend/ops.ts";
import type { FloatArray } from "../backend/tensor.ts";
import type { ModelConfig } from "../model/config.ts";
import {
  type DeviceModel,
  forward,
  forwardCached,
  type KvCache,
  type LoraRuntime,
  makeKvCache,
} from "../model/decoder.ts";
import { samplesOnDevice } from "../model/generate.ts";
import { type CandidateRow, candidateRow, logSoftmax } from "../model/sampling.ts";
import type { PromptPosition } from "./completion.ts";
import type { PrefixCache, PrefixEntry } from "./prefix_cache.ts";
import { rankOf, topEntries } from "./sampler.ts";
import { remainingFeeds, type SeqState } from "./stop_rules.ts";

/** The weights of one step: the base model and, for an adapter's batch, its LoRA. */
export interface StepWeights {
  readonly model: DeviceModel;
  readonly lora: LoraRuntime | null;
}

/**
 * How a decode step samples members on the device (the scheduler's sampler and stop rules): a
 * member with a need is sampled from its row's `Ops.sampleCandidates` output, and only its
 * candidates come back, never its logits row, unless they cannot decide.
 */
export interface DeviceSampling<M> {
  /** Candidates member `m` needs this step, or null: its whole row is read. */
  readonly need: (m: M) => number | null;
  /** The temperature of `m`'s row in the candidates kernel. */
  readonly temperature: (m: M) => number;
  /** Samples `m` from its candidates; false when they cannot decide (its row is read then). */
  readonly take: (m: M, c: CandidateRow, need: number) => boolean;
}

/** What a decode step leaves to the host: the rows of members still to sample, and who was sampled. */
export interface StepOutcome<M> {
  readonly rows: Map<M, FloatArray>;
  readonly sampled: readonly M[];
}

/** Bytes of one KV row (all layers, K and V, f32). */
export const kvRowBytes = (c: ModelConfig): number =>
  c.numLayers * 2 * c.numKvHeads * c.headDim * 4;

/** Prefill of one prompt through the prefix cache; the entry is inserted into the cache. */
export const prefill = (
  backend: BackendShape,
  cache: PrefixCache,
  ns: string,
  ids: readonly number[],
  w: StepWeights,
  lookup: boolean,
): Effect.Effect<PrefixEntry, BackendError> =>
  Effect.gen(function* () {
    const hit = lookup ? cache.lookup(ns, ids) : null;
    if (hit?.exact) return hit.entry;
    const c = w.model.config;
    const L = ids.length;
    const kvdim = c.numKvHeads * c.headDim;
    const start = hit ? hit.entry.ids.length : 0;
    const entry = yield* Effect.scoped(Effect.gen(function* () {
      const ops = yield* backend.ops;
      const fill = (src: FloatArray | undefined) => {
        if (!src || start === 0) return ops.zeros([L, kvdim]);
        const host = new Float32Array(L * kvdim);
        host.set(src.subarray(0, start * kvdim));
        return ops.fromArray(host, [L, kvdim]);
      };
      const kv: KvCache = {
        k: Array.from({ length: c.numLayers }, (_, l) => fill(hit?.entry.k[l])),
        v: Array.from({ length: c.numLayers }, (_, l) => fill(hit?.entry.v[l])),
        batch: 1,
        maxLen: L,
        len: start,
      };
      const logits = forwardCached(ops, w.model, kv, ids.slice(start), L - start, [0], w.lora);
      const host = yield* ops.read([logits, ...kv.k, ...kv.v]);
      return {
        ns,
        ids: [...ids],
        logits: host[0],
        k: host.slice(1, 1 + c.numLayers),
        v: host.slice(1 + c.numLayers),
      } satisfies PrefixEntry;
    }));
    cache.insert(entry);
    return entry;
  });

/** Raw prompt scores (full forward with the current weights; never cached). */
export const promptScores = (
  backend: BackendShape,
  ids: readonly number[],
  k: number,
  w: StepWeights,
): Effect.Effect<PromptPosition[], BackendError> =>
  Effect.scoped(Effect.gen(function* () {
    const ops = yield* backend.ops;
    const { logits } = forward(ops, w.model, { ids, batch: 1, seqLen: ids.length }, {
      lora: w.lora,
    });
    const host = (yield* ops.read([logits]))[0];
    const V = w.model.config.vocabSize;
    const out: PromptPosition[] = [];
    for (let i = 1; i < ids.length; i++) {
      const lp = logSoftmax(host.subarray((i - 1) * V, i * V));
      out.push({
        token: ids[i],
        logprob: lp[ids[i]],
        rank: rankOf(lp, ids[i]),
        top: topEntries(lp, k),
      });
    }
    return out;
  }));

/** A sequence a batch decodes: its state and the prefill it started from. */
export interface BatchMember {
  readonly state: SeqState;
  readonly prefill: PrefixEntry;
}

/** A cache geometry. */
interface Layout {
  readonly slots: number;
  readonly len: number;
  readonly maxLen: number;
}

interface Cache {
  readonly kv: KvCache;
  readonly scope: Scope.Closeable;
}

/** The KV rows a sequence needs: those it has filled and those it may still fill. */
export interface Shape {
  readonly rows: number;
  readonly remaining: number;
}

/** A member's rows: its prompt and every token fed since (all sampled tokens but the last). */
export const shapeOf = (m: BatchMember): Shape => ({
  rows: m.prefill.ids.length + Math.max(0, m.state.tokens.length - 1),
  remaining: remainingFeeds(m.state),
});

/** One running batch (one set of weights): KV slots, joins, leaves and decode steps. */
export class DecodeBatch<M extends BatchMember> {
  readonly backend: BackendShape;
  readonly config: ModelConfig;
  #members: (M | null)[] = [];
  #kvStart: number[] = [];
  #cache: Cache | null = null;

  constructor(backend: BackendShape, config: ModelConfig) {
    this.backend = backend;
    this.config = config;
  }

  /** Sequences in the batch (finished ones until `leave`). */
  get members(): M[] {
    return this.#members.filter((m): m is M => m !== null);
  }

  /** Device bytes of the KV cache now. */
  get bytes(): number {
    const c = this.#cache;
    return c ? c.kv.batch * c.kv.maxLen * kvRowBytes(this.config) : 0;
  }

  /** Removes finished sequences; their slots are free from now on. Returns them. */
  leave(): M[] {
    const out: M[] = [];
    this.#members = this.#members.map((m) => {
      if (m && m.state.done) {
        out.push(m);
        return null;
      }
      return m;
    });
    return out;
  }

  /** Where sequences of these shapes would go: in place (free slots, rows fit), else rebuilt. */
  #plan(joining: readonly Shape[]): { inPlace: boolean; layout: Layout } {
    const live = this.members;
    const c = this.#cache;
    const free = this.#members.length - live.length;
    if (c && joining.length <= free) {
      const len = c.kv.len;
      const fits = joining.every((s) => s.rows <= len && len + s.remaining <= c.kv.maxLen);
      // compact instead when a quarter of the slots would stay dead
      const dead = free - joining.length;
      if (fits && dead * 4 < this.#members.length) {
        return { inPlace: true, layout: { slots: c.kv.batch, len, maxLen: c.kv.maxLen } };
      }
    }
    const all = [...live.map(shapeOf), ...joining];
    const len = all.reduce((m, s) => Math.max(m, s.rows), 0);
    const need = all.reduce((m, s) => Math.max(m, s.remaining), 0);
    // a quarter of the remaining length as headroom: later joiners fit without a rebuild
    const maxLen = len + need + Math.ceil(need / 4);
    return { inPlace: false, layout: { slots: all.length, len, maxLen } };
  }

  /** KV bytes after sequences of these shapes joined (for the scheduler's budget). */
  bytesWith(joining: readonly Shape[]): number {
    const p = this.#plan(joining);
    return p.layout.slots * p.layout.maxLen * kvRowBytes(this.config);
  }

  /**
   * Places sequences that have sampled their first token from their prefill logits (none done)
   * into the batch, and compacts the cache when many slots are dead. Returns what it did.
   */
  join(joining: readonly M[]): Effect.Effect<"none" | "in-place" | "rebuilt" | "closed"> {
    return Effect.gen({ self: this }, function* () {
      const live = this.members;
      if (live.length === 0 && joining.length === 0) {
        yield* this.close();
        return "closed" as const;
      }
      const { inPlace, layout } = this.#plan(joining.map(shapeOf));
      if (inPlace && joining.length === 0) return "none" as const;
      const c = this.config;
      const kvdim = c.numKvHeads * c.headDim;
      const old = this.#cache;
      let cache: Cache;
      let slotOf: (m: M, i: number) => number;
      if (inPlace) {
        cache = old!;
        const free: number[] = [];
        this.#members.forEach((m, b) => m === null && free.push(b));
        slotOf = (_m, i) => free[i];
      } else {
        const scope = yield* Scope.make();
        const ops: Ops = yield* Scope.provide(scope)(this.backend.ops);
        const kv = makeKvCache(ops, c, layout.slots, layout.maxLen);
        kv.len = layout.len;
        cache = { kv, scope };
        // the live rows, shifted to end at the new len (positions are relative to kvStart)
        // slot of each live member (a map: indexOf per member would be quadratic in the batch)
        const slotOfLive = new Map<M, number>();
        this.#members.forEach((m, b) => m !== null && slotOfLive.set(m, b));
        if (old && live.length > 0) {
          const from: number[] = [];
          const to: number[] = [];
          live.forEach((m, nb) => {
            const b = slotOfLive.get(m)!;
            const rows = old.kv.len - this.#kvStart[b];
            for (let t = 0; t < rows; t++) {
              from.push(b * old.kv.maxLen + this.#kvStart[b] + t);
              to.push(nb * layout.maxLen + layout.len - rows + t);
            }
          });
          yield* Effect.scoped(Effect.gen({ self: this }, function* () {
            const sops = yield* this.backend.ops;
            for (let l = 0; l < c.numLayers; l++) {
              ops.scatterRowsInPlace(kv.k[l], sops.gatherRows(old.kv.k[l], from), to);
              ops.scatterRowsInPlace(kv.v[l], sops.gatherRows(old.kv.v[l], from), to);
            }
            sops.flush();
          }));
        }
        const kvStart = live.map((m) =>
          layout.len - (old!.kv.len - this.#kvStart[slotOfLive.get(m)!])
        );
        this.#members = [...live];
        this.#kvStart = kvStart;
        slotOf = (_m, i) => live.length + i;
        this.#cache = cache;
        if (old) yield* Scope.close(old.scope, Exit.void);
      }
      // the joiners' prompt rows, right-aligned at len
      const kv = cache.kv;
      yield* Effect.scoped(Effect.gen({ self: this }, function* () {
        const sops = yield* this.backend.ops;
        const byEntry = new Map<PrefixEntry, number[]>();
        joining.forEach((m, i) => {
          const b = slotOf(m, i);
          this.#members[b] = m;
          this.#kvStart[b] = kv.len - m.prefill.ids.length;
          const list = byEntry.get(m.prefill);
          if (list) list.push(b);
          else byEntry.set(m.prefill, [b]);
        });
        for (const [entry, slots] of byEntry) {
          const L = entry.ids.length;
          const rows = slots.flatMap((b) =>
            Array.from({ length: L }, (_, t) => b * kv.maxLen + kv.len - L + t)
          );
          for (let l = 0; l < c.numLayers; l++) {
            const k = sops.fromArray(entry.k[l], [L, kvdim]);
            const v = sops.fromArray(entry.v[l], [L, kvdim]);
            const kk = slots.length === 1 ? k : sops.gatherRows(k, repeatRows(L, slots.length));
            const vv = slots.length === 1 ? v : sops.gatherRows(v, repeatRows(L, slots.length));
            sops.scatterRowsInPlace(kv.k[l], kk, rows);
            sops.scatterRowsInPlace(kv.v[l], vv, rows);
          }
        }
        sops.flush();
      }));
      return inPlace ? "in-place" as const : "rebuilt" as const;
    });
  }

  /**
   * One decode step: feeds every live sequence its last sampled token. Members `sampling` can
   * sample from their candidates are sampled on the device (batches of at least
   * SOFTWARE_DEVICE_SAMPLING_ROWS on a software adapter, see `samplesOnDevice`); the logits row
   * of every other live member is returned (by slot; free and finished slots are fed a padding
   * token). One wait for the candidates, and one more only for rows they could not decide.
   */
  step(
    w: StepWeights,
    sampling: DeviceSampling<M> | null = null,
  ): Effect.Effect<StepOutcome<M>, BackendError> {
    return Effect.gen({ self: this }, function* () {
      const cache = this.#cache;
      const rows = new Map<M, FloatArray>();
      const sampled: M[] = [];
      if (!cache) return { rows, sampled };
      const B = cache.kv.batch;
      const next = new Int32Array(B);
      const live: number[] = [];
      this.#members.forEach((m, b) => {
        if (m && !m.state.done) {
          next[b] = m.state.tokens[m.state.tokens.length - 1];
          live.push(b);
        }
      });
      const kvStart = this.#kvStart.map((s) => Math.min(s, cache.kv.len));
      const backend = this.backend;
      const members = this.#members;
      const V = this.config.vocabSize;
      yield* Effect.scoped(Effect.gen(function* () {
        const ops = yield* backend.ops;
        const logits = forwardCached(ops, w.model, cache.kv, next, 1, kvStart, w.lora);
        const needs = new Map<number, number>();
        if (sampling && samplesOnDevice(ops.info, B)) {
          for (const b of live) {
            const n = sampling.need(members[b]!);
            if (n !== null) needs.set(b, Math.min(n, V));
          }
        }
        if (needs.size === 0) {
          const host = (yield* ops.read([logits]))[0];
          for (const b of live) rows.set(members[b]!, host.subarray(b * V, (b + 1) * V));
          return;
        }
        const count = Math.max(...needs.values());
        const temps = members.map((m, b) => needs.has(b) ? sampling!.temperature(m!) : 0);
        while (temps.length < B) temps.push(0);
        const cand = (yield* ops.read([ops.sampleCandidates(logits, temps, count)]))[0];
        const rest = live.filter((b) => !needs.has(b));
        for (const [b, n] of needs) {
          const m = members[b]!;
          if (sampling!.take(m, candidateRow(cand, b, count, V), n)) sampled.push(m);
          else rest.push(b);
        }
        if (rest.length === 0) return;
        const host = yield* ops.read(rest.map((b) => ops.sliceRows(logits, b, 1)));
        rest.forEach((b, i) => rows.set(members[b]!, host[i]));
      }));
      return { rows, sampled };
    });
  }

  /** Releases the KV cache (the batch is empty or shutting down). */
  close(): Effect.Effect<void> {
    return Effect.suspend(() => {
      const c = this.#cache;
      this.#cache = null;
      this.#members = [];
      this.#kvStart = [];
      return c ? Scope.close(c.scope, Exit.void) : Effect.void;
    });
  }
}

/** Row indices 0..L-1 repeated `times` times (one prefill copied into several slots). */
const repeatRows = (L: number, times: number): Int32Array => {
  const out = new Int32Array(L * times);
  for (let i = 0; i < times; i++) for (let t = 0; t < L; t++) out[i * L + t] = t;
  return out;
};
