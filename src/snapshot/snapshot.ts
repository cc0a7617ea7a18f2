/**
 * Immutable weight snapshots: the only thing that is ever pushed to an inference engine.
 *
 * `foldSnapshot` writes W' = W + s·B·A for every targeted matrix into FRESH memory (the device's
 * loraFold op, then a host copy); untouched tensors are shared with the frozen base, which nothing
 * mutates. There is no merge or unmerge of live weights anywhere: the aliasing bug of TRL v0.15
 * (merge in place, take aliased state_dict views, unmerge in place) cannot be expressed.
 * A snapshot's arrays are private; callers get copies. Its SHA-256 digest is computed at
 * creation and re-checked by everything that publishes it.
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { Effect } from "effect";
import type { BackendShape } from "../backend/backend.ts";
import type { BackendError } from "../backend/ops.ts";
import type { ModelConfig } from "../model/config.ts";
import type { DeviceModel, LoraRuntime } from "../model/decoder.ts";
import type { HostTensor, WeightMap } from "../model/weights.ts";
import type { LoraConfig } from "../lora/adapter.ts";

const SnapshotCorruptedBase: TaggedErrorClass<"SnapshotCorrupted", {
  readonly version: number;
  /** The digest taken at creation. */
  readonly expected: string;
  /** The digest of the bytes now. */
  readonly actual: string;
}> = taggedError(
  "SnapshotCorrupted",
  (e) => {
    return `snapshot v${e.version} changed after creation (digest ${e.actual.slice(0, 12)} != ${
      e.expected.slice(0, 12)
    })`;
  },
);
/** A snapshot whose bytes no longer match the digest taken at its creation. */
export class SnapshotCorrupted extends SnapshotCorruptedBase {}

/** How a snapshot was made. */
export type SnapshotKind = "lora" | "full";

interface Store {
  readonly weights: ReadonlyMap<string, HostTensor>;
  readonly adapter: ReadonlyMap<string, HostTensor> | null;
}

// Raw arrays live here, out of reach of every module but this one.
const stores = new WeakMap<Snapshot, Store>();

/** An immutable set of weights (and, for LoRA, the adapter that produced them). */
export class Snapshot {
  private constructor(
    /** Monotonic version (policy-v{version} on the server). */
    readonly version: number,
    readonly kind: SnapshotKind,
    readonly config: ModelConfig,
    readonly loraConfig: LoraConfig | null,
    /** Hex SHA-256 over names, shapes and bytes of weights and adapter. */
    readonly digest: string,
  ) {}

  /** @internal Builds a snapshot from arrays nobody else holds (or frozen base arrays). */
  static create(
    version: number,
    kind: SnapshotKind,
    config: ModelConfig,
    loraConfig: LoraConfig | null,
    store: Store,
  ): Effect.Effect<Snapshot> {
    return Effect.map(digestOf(store), (digest) => {
      const s = new Snapshot(version, kind, config, loraConfig, digest);
      stores.set(s, store);
      Object.freeze(s);
      return s;
    });
  }

  private get store(): Store {
    return stores.get(this)!;
  }

  /** Names of the model weights (Hugging Face names). */
  weightNames(): string[] {
    return [...this.store.weights.keys()];
  }

  /** Shape of a weight. */
  shape(name: string): readonly number[] {
    const t = this.store.weights.get(name);
    if (!t) throw new Error(`snapshot v${this.version} has no tensor ${name}`);
    return t.shape;
  }

  /** A fresh copy of one weight. */
  weight(name: string): HostTensor {
    const t = this.store.weights.get(name);
    if (!t) throw new Error(`snapshot v${this.version} has no tensor ${name}`);
    return { shape: [...t.shape], data: t.data.slice() };
  }

  /** Fresh copies of all weights. */
  weights(): Map<string, HostTensor> {
    return new Map(this.weightNames().map((n) => [n, this.weight(n)]));
  }

  /** Fresh copies of the adapter tensors (PEFT names without prefix: `<path>.lora_A`), or null. */
  adapter(): Map<string, HostTensor> | null {
    const a = this.store.adapter;
    return a
      ? new Map([...a].map(([n, t]) => [n, { shape: [...t.shape], data: t.data.slice() }]))
      : null;
  }

  /** The first NaN/Inf among weights and adapter, or null when every value is finite. */
  firstNonFinite(): { name: string; index: number; value: number } | null {
    const { weights, adapter } = this.store;
    for (const m of adapter ? [weights, adapter] : [weights]) {
      for (const [name, t] of m) {
        const d = t.data;
        for (let i = 0; i < d.length; i++) {
          if (!Number.isFinite(d[i])) return { name, index: i, value: d[i] };
        }
      }
    }
    return null;
  }

  /** Recomputes the digest; fails with SnapshotCorrupted when the bytes changed. */
  verify(): Effect.Effect<void, SnapshotCorrupted> {
    return Effect.flatMap(
      digestOf(this.store),
      (actual) =>
        actual === this.digest ? Effect.void : Effect.fail(
          new SnapshotCorrupted({ version: this.version, expected: this.digest, actual }),
        ),
    );
  }
}

const digestOf = (store: Store): Effect.Effect<string> =>
  Effect.promise(async () => {
    const enc = new TextEncoder();
    const parts: Uint8Array[] = [];
    const add = (prefix: string, m: ReadonlyMap<string, HostTensor>) => {
      for (const name of [...m.keys()].sort()) {
        const t = m.get(name)!;
        parts.push(enc.encode(`${prefix}${name}[${t.shape.join(",")}]`));
        parts.push(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
      }
    };
    add("w:", store.weights);
    if (store.adapter) add("a:", store.adapter);
    const total = parts.reduce((n, p) => n + p.length, 0);
    const all = new Uint8Array(total);
    let o = 0;
    for (const p of parts) {
      all.set(p, o);
      o += p.length;
    }
    const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", all));
    return Array.from(hash, (b) => b.toString(16).padStart(2, "0")).join("");
  });

/**
 * Folds a LoRA adapter into a fresh snapshot: for each adapted projection the device computes
 * W + s·B·A into a new buffer, which is copied to the host (one wait for all of them). Base
 * weights that no adapter touches are shared with `base`, the frozen host copy of the model.
 */
export const foldSnapshot: (
  backend: BackendShape,
  version: number,
  base: WeightMap,
  device: DeviceModel,
  lora: LoraRuntime,
  loraConfig: LoraConfig,
) => Effect.Effect<Snapshot, BackendError> = Effect.fn("foldSnapshot")(
  function* (
    backend: BackendShape,
    version: number,
    base: WeightMap,
    device: DeviceModel,
    lora: LoraRuntime,
    loraConfig: LoraConfig,
  ) {
    const ops = yield* backend.ops;
    const paths = [...lora.modules.keys()];
    const folded = paths.map((p) => {
      const m = lora.modules.get(p)!;
      return ops.loraFold(device.weights.get(`${p}.weight`)!, m.b, m.a, lora.scale);
    });
    const adapterTensors = paths.flatMap((p) => [lora.modules.get(p)!.a, lora.modules.get(p)!.b]);
    const host = yield* ops.read([...folded, ...adapterTensors]);
    const weights = new Map<string, HostTensor>();
    for (const [name, t] of base) weights.set(name, t);
    const adapter = new Map<string, HostTensor>();
    paths.forEach((p, i) => {
      weights.set(`${p}.weight`, { shape: base.get(`${p}.weight`)!.shape, data: toF32(host[i]) });
      const a = lora.modules.get(p)!.a;
      const b = lora.modules.get(p)!.b;
      adapter.set(`${p}.lora_A`, { shape: a.shape, data: toF32(host[paths.length + 2 * i]) });
      adapter.set(`${p}.lora_B`, { shape: b.shape, data: toF32(host[paths.length + 2 * i + 1]) });
    });
    return yield* Snapshot.create(version, "lora", device.config, loraConfig, { weights, adapter });
  },
  Effect.scoped,
);

/** A full fine-tuning snapshot: a fresh host copy of every live weight. */
export const copySnapshot: (
  backend: BackendShape,
  version: number,
  device: DeviceModel,
) => Effect.Effect<Snapshot, BackendError> = Effect.fn("copySnapshot")(
  function* (backend: BackendShape, version: number, device: DeviceModel) {
    const ops = yield* backend.ops;
    const names = [...device.weights.keys()];
    const host = yield* ops.read(names.map((n) => device.weights.get(n)!));
    const weights = new Map<string, HostTensor>();
    names.forEach((n, i) =>
      weights.set(n, { shape: [...device.weights.get(n)!.shape], data: toF32(host[i]) })
    );
    return yield* Snapshot.create(version, "full", device.config, null, { weights, adapter: null });
  },
  Effect.scoped,
);

// Backends hand back fresh arrays; f64 reference arrays are narrowed to the f32 storage format.
const toF32 = (a: Float32Array | Float64Array): Float32Array =>
  a instanceof Float32Array ? a : Float32Array.from(a);
