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
import { messageOf } from "../base/tagged_error.ts";
import { Effect, Exit, Scope } from "effect";
import { join } from "node:path";
import type { BackendShape } from "../backend/backend.ts";
import { type LoraWeights, uploadLora } from "../lora/adapter.ts";
import { ADAPTER_CONFIG, loadPeftAdapter } from "../lora/peft.ts";
import type { ModelConfig } from "../model/config.ts";
import type { LoraRuntime } from "../model/decoder.ts";
import { type ApiError, badRequest, notFound } from "./schemas.ts";
import { pathExists } from "./weights.ts";
import { checkAllowedPath, redactFileText } from "./file_policy.ts";
import { readFile } from "node:fs/promises";

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

  /**
   * Reads and checks an adapter directory (host only; nothing changes). Like vLLM, adapters with
   * `modules_to_save`, DoRA, a rank above --max-lora-rank or `bias` other than "none" are refused
   * with vLLM's messages (joined, in vLLM's order), before any tensor is read; messages never
   * quote the files.
   */
  prepare(
    name: string,
    path: string,
    inplace: boolean,
    ctx: {
      readonly config: ModelConfig;
      readonly maxRank: number;
      readonly baseName: string;
      readonly allowedRoot?: string | null;
    },
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
      yield* checkAllowedPath(path, ctx.allowedRoot ?? null, "lora_path");
      const configPath = join(path, ADAPTER_CONFIG);
      if (!(yield* pathExists(configPath))) {
        return yield* Effect.fail(
          notFound(
            `Loading lora ${name} failed: No adapter found for ${path}`,
            "lora_path",
          ),
        );
      }
      const failed = (why: string) =>
        badRequest(`Failed to load LoRA adapter '${name}' from ${path}: ${why}`, "lora_path");
      const text = yield* Effect.tryPromise({
        try: () => readFile(configPath, "utf8"),
        catch: () => failed(`cannot read ${ADAPTER_CONFIG}`),
      });
      const json = yield* Effect.try({
        try: () => JSON.parse(text) as unknown,
        catch: () => failed(`${ADAPTER_CONFIG} is not valid JSON`),
      });
      if (typeof json !== "object" || json === null || Array.isArray(json)) {
        return yield* Effect.fail(failed(`${ADAPTER_CONFIG} must be a JSON object`));
      }
      const j = json as Record<string, unknown>;
      // vLLM's PEFTHelper.validate_legal
      const problems: string[] = [];
      const mts = j.modules_to_save;
      if (mts !== undefined && mts !== null && !(Array.isArray(mts) && mts.length === 0)) {
        problems.push("vLLM only supports modules_to_save being None.");
      }
      if (j.use_dora === true) problems.push("vLLM does not yet support DoRA.");
      if (typeof j.r === "number" && j.r > ctx.maxRank) {
        problems.push(`LoRA rank ${j.r} is greater than max_lora_rank ${ctx.maxRank}.`);
      }
      if (j.bias !== undefined && j.bias !== null && j.bias !== "none") {
        problems.push("Adapter bias is not supported.");
      }
      if (problems.length > 0) {
        return yield* Effect.fail(badRequest(problems.join(" "), "lora_path"));
      }
      const w = yield* loadPeftAdapter(path, ctx.config).pipe(
        Effect.mapError((e) => failed(redactFileText(messageOf(e)))),
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
