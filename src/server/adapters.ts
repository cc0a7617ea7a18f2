/**
 * The runtime LoRA adapter registry: adapters by served name (in load order, for GET /v1/models),
 * their host weights, and which of them are resident on the device (at most --max-loras; the
 * least recently used unpinned one is evicted to make room, re-uploaded on its next use).
 *
 * A running batch PINS its adapter: a pinned adapter stays resident, and unloading it only removes
 * the name (new requests get 404) while its running sequences finish with it; its device memory
 * is released when the last pin goes. An in-place reload (load_inplace) swaps the weights of the
 * same entry, so running sequences continue with the new weights from their next step. Reading
 * and checking an adapter directory happens on the host (`prepare`); everything that touches the
 * device runs under the scheduler's device permit (between two decode steps).
 * @module
 */
import { Effect, Exit, Scope } from "effect";
import { join } from "node:path";
import type { BackendShape } from "../backend/backend.ts";
import { type LoraWeights, uploadLora } from "../lora/adapter.ts";
import { ADAPTER_CONFIG, loadPeftAdapter } from "../lora/peft.ts";
import type { ModelConfig } from "../model/config.ts";
import type { LoraRuntime } from "../model/decoder.ts";
import { type ApiError, badRequest, notFound } from "./schemas.ts";
import { message, pathExists } from "./weights.ts";

/** One loaded adapter. */
export interface Adapter {
  readonly name: string;
  path: string;
  weights: LoraWeights;
  created: number;
  /** Device copy (null while evicted) and the scope that owns it. */
  runtime: LoraRuntime | null;
  scope: Scope.Closeable | null;
  lastUse: number;
  /** Running batches using it. */
  pins: number;
  /** Unloaded while pinned: released when the last pin goes. */
  unloaded: boolean;
}

/** Adapters by name, with at most `maxResident` on the device. */
export class AdapterRegistry {
  readonly backend: BackendShape;
  readonly maxResident: number;
  readonly #byName = new Map<string, Adapter>();
  #clock = 0;

  constructor(backend: BackendShape, maxResident: number) {
    this.backend = backend;
    this.maxResident = Math.max(1, maxResident);
  }

  /** The adapter served under `name`. */
  get(name: string): Adapter | undefined {
    return this.#byName.get(name);
  }

  /** Loaded adapters in load order. */
  list(): Adapter[] {
    return [...this.#byName.values()];
  }

  /** Reads and checks an adapter directory (host only; nothing changes). */
  prepare(
    name: string,
    path: string,
    inplace: boolean,
    ctx: { readonly config: ModelConfig; readonly maxRank: number; readonly baseName: string },
  ): Effect.Effect<LoraWeights, ApiError> {
    const loaded = this.#byName.has(name);
    return Effect.gen(function* () {
      if (loaded && !inplace) {
        return yield* Effect.fail(
          badRequest(`The lora adapter '${name}' has already been loaded.`, "lora_name"),
        );
      }
      if (name === ctx.baseName) {
        return yield* Effect.fail(
          badRequest(`The lora adapter name '${name}' is the base model's name.`, "lora_name"),
        );
      }
      if (!(yield* pathExists(join(path, ADAPTER_CONFIG)))) {
        return yield* Effect.fail(
          notFound(
            `No adapter found for ${path}: ${join(path, ADAPTER_CONFIG)} does not exist.`,
            "lora_path",
          ),
        );
      }
      const w = yield* loadPeftAdapter(path, ctx.config).pipe(
        Effect.mapError((e) =>
          badRequest(
            `Failed to load LoRA adapter '${name}' from ${path}: ${message(e)}`,
            "lora_path",
          )
        ),
      );
      if (w.config.r > ctx.maxRank) {
        return yield* Effect.fail(
          badRequest(
            `LoRA rank ${w.config.r} is greater than max_lora_rank ${ctx.maxRank}.`,
            "lora_path",
          ),
        );
      }
      return w;
    });
  }

  /**
   * Registers prepared weights under `name` (replacing the weights of a loaded entry in place) and
   * uploads them when a device slot is free or the entry is pinned (device permit held).
   */
  install(name: string, path: string, weights: LoraWeights): Effect.Effect<void> {
    return Effect.gen({ self: this }, function* () {
      const created = Math.floor(Date.now() / 1000);
      let a = this.#byName.get(name);
      if (a) {
        yield* this.#evict(a);
        a.path = path;
        a.weights = weights;
        a.created = created;
      } else {
        a = {
          name,
          path,
          weights,
          created,
          runtime: null,
          scope: null,
          lastUse: 0,
          pins: 0,
          unloaded: false,
        };
        this.#byName.set(name, a);
      }
      if (a.pins > 0 || this.#residentCount() < this.maxResident) yield* this.#upload(a);
    });
  }

  /**
   * Removes `name`; false when unknown. A pinned adapter keeps its device copy until its last
   * pin is released (device permit held).
   */
  remove(name: string): Effect.Effect<boolean> {
    return Effect.gen({ self: this }, function* () {
      const a = this.#byName.get(name);
      if (!a) return false;
      this.#byName.delete(name);
      a.unloaded = true;
      if (a.pins === 0) yield* this.#evict(a);
      return true;
    });
  }

  /**
   * Pins `a` for a running batch and makes it resident (evicting the least recently used unpinned
   * adapter when the device is full). False when every resident adapter is pinned: the caller
   * waits for a batch to end (vLLM: at most max_loras adapters run at once). Device permit held.
   */
  pin(a: Adapter): Effect.Effect<boolean> {
    return Effect.gen({ self: this }, function* () {
      a.lastUse = ++this.#clock;
      if (!a.runtime) {
        while (this.#residentCount() >= this.maxResident) {
          let lru: Adapter | null = null;
          for (const b of this.#resident()) {
            if (b.pins === 0 && (!lru || b.lastUse < lru.lastUse)) lru = b;
          }
          if (!lru) return false;
          yield* this.#evict(lru);
        }
        yield* this.#upload(a);
      }
      a.pins++;
      return true;
    });
  }

  /** Whether `pin(a)` would succeed now. */
  canPin(a: Adapter): boolean {
    if (a.runtime) return true;
    return this.#residentCount() < this.maxResident || this.#resident().some((b) => b.pins === 0);
  }

  /** Releases a pin; an unloaded adapter's device copy goes with its last pin. */
  unpin(a: Adapter): Effect.Effect<void> {
    return Effect.suspend(() => {
      a.pins = Math.max(0, a.pins - 1);
      return a.pins === 0 && a.unloaded ? this.#evict(a) : Effect.void;
    });
  }

  /** The device copy of a pinned adapter. */
  runtime(a: Adapter): LoraRuntime {
    if (!a.runtime) throw new Error(`adapter ${a.name} is not resident`);
    return a.runtime;
  }

  /** Releases every device copy (at shutdown). */
  close(): Effect.Effect<void> {
    return Effect.gen({ self: this }, function* () {
      for (const a of this.#resident()) yield* this.#evict(a);
    });
  }

  /** Resident adapters, the unloaded-but-pinned ones included. */
  #resident(): Adapter[] {
    return [...this.#residentSet];
  }

  readonly #residentSet = new Set<Adapter>();

  #residentCount(): number {
    return this.#residentSet.size;
  }

  #upload(a: Adapter): Effect.Effect<void> {
    return Effect.gen({ self: this }, function* () {
      const scope = yield* Scope.make();
      const ops = yield* Scope.provide(scope)(this.backend.ops);
      a.runtime = uploadLora(ops, a.weights);
      a.scope = scope;
      this.#residentSet.add(a);
    });
  }

  #evict(a: Adapter): Effect.Effect<void> {
    return Effect.suspend(() => {
      const s = a.scope;
      a.runtime = null;
      a.scope = null;
      this.#residentSet.delete(a);
      return s ? Scope.close(s, Exit.void) : Effect.void;
    });
  }
}
