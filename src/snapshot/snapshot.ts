/**
 * Immutable weight snapshots: the only thing that is ever pushed to an inference engine.
 *
 * A LoRA snapshot costs O(adapter), not O(model): it is its own copy of every A and B (fresh
 * device buffers copied from the trainable tensors, and their host copies) plus a reference to
 * the {@link FrozenBase}, the immutable base weights whose digest is taken once, at load. Its
 * digest covers the base's digest and the adapter's bytes. Merged weights W' = W + s·B·A exist
 * only where a consumer needs them (full-weight push, checkpoint export): {@link mergedWeights}
 * writes them into FRESH memory with the device's loraFold op. Engines, verification and
 * evaluation run the resident base with the snapshot's adapter applied at run time
 * ({@link snapshotModel}). A full fine-tuning snapshot is a host copy of every weight (O(model)
 * is inherent there).
 *
 * There is no merge or unmerge of live weights anywhere: the aliasing bug of TRL v0.15 (merge in
 * place, take aliased state_dict views, unmerge in place) cannot be expressed. A snapshot's and a
 * base's arrays are private; callers get copies. Everything that publishes a snapshot re-checks
 * its digest.
 *
 * Device copies (the base's resident upload, a snapshot's adapter) are shared by reference count:
 * each user holds one in an Effect scope of its own (the policy holds the base for its life and
 * its latest snapshot until the next one, the in-process engine the version it serves, a
 * verification or evaluation for its call), and the buffers go back when the last hold ends.
 * A user on a backend without a live copy gets one uploaded from the host copies.
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { Effect, Exit, Scope } from "effect";
import { type BackendShape, cpuBackend } from "../backend/backend.ts";
import type { BackendError, Ops } from "../backend/ops.ts";
import type { Tensor } from "../backend/tensor.ts";
import type { ModelConfig } from "../model/config.ts";
import { type DeviceModel, type LoraRuntime, uploadModel } from "../model/decoder.ts";
import {
  type BaseTensor,
  type BaseWeightMap,
  type HalfTensor,
  type HostTensor,
  isHalfTensor,
  widenTensor,
} from "../model/weights.ts";
import { isNonFiniteHalf, widenHalfBits } from "../io/safetensors.ts";
import { type LoraConfig, loraScale } from "../lora/adapter.ts";

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
/** A snapshot (or the frozen base it refers to) whose bytes no longer match its digest. */
export class SnapshotCorrupted extends SnapshotCorruptedBase {}

/** How a snapshot was made. */
export type SnapshotKind = "lora" | "full";

/** The first NaN/Inf of a set of tensors. */
export interface NonFinite {
  readonly name: string;
  readonly index: number;
  readonly value: number;
}

// ---- digests ----------------------------------------------------------------------------------

const enc = new TextEncoder();

const hex = (b: ArrayBuffer): string =>
  Array.from(new Uint8Array(b), (x) => x.toString(16).padStart(2, "0")).join("");

/** The stored bytes of a tensor: f32 values, or a 16-bit one's bits as kept. */
const storedBytes = (t: BaseTensor): Uint8Array<ArrayBuffer> => {
  const d = isHalfTensor(t) ? t.bits : t.data;
  return new Uint8Array(d.buffer as ArrayBuffer, d.byteOffset, d.byteLength);
};

/**
 * SHA-256 of `header`, then for each tensor of `m` (names sorted) `<prefix><name>[<shape>]`
 * (followed by `:bf16` / `:f16` for a 16-bit tensor) and the 32-byte SHA-256 of its stored bytes
 * (f32 values, or the 16-bit bits). Tensors are hashed concurrently, and never concatenated.
 */
const tensorsDigest = async (
  header: string,
  prefix: string,
  m: ReadonlyMap<string, BaseTensor>,
): Promise<string> => {
  const names = [...m.keys()].sort();
  const hashes = await Promise.all(
    names.map((n) => crypto.subtle.digest("SHA-256", storedBytes(m.get(n)!))),
  );
  const parts: Uint8Array[] = [enc.encode(header)];
  names.forEach((n, i) => {
    const t = m.get(n)!;
    const format = isHalfTensor(t) ? `:${t.format}` : "";
    parts.push(enc.encode(`${prefix}${n}[${t.shape.join(",")}]${format}`));
    parts.push(new Uint8Array(hashes[i]));
  });
  const all = new Uint8Array(parts.reduce((k, p) => k + p.length, 0));
  let o = 0;
  for (const p of parts) {
    all.set(p, o);
    o += p.length;
  }
  return hex(await crypto.subtle.digest("SHA-256", all));
};

/** Digest of a weight map (a full snapshot, a frozen base): tensorsDigest, no header, `w:`. */
const weightsDigest = (m: ReadonlyMap<string, BaseTensor>): Promise<string> =>
  tensorsDigest("", "w:", m);

/**
 * Digest of a LoRA snapshot: tensorsDigest with header
 * `lora-snapshot base:<base digest> scale:<s>\n` over the adapter tensors, prefix `a:`. The base
 * enters by its digest only, so it costs O(adapter).
 */
const loraDigest = (
  baseDigest: string,
  scale: number,
  adapter: ReadonlyMap<string, HostTensor>,
): Promise<string> =>
  tensorsDigest(`lora-snapshot base:${baseDigest} scale:${scale}\n`, "a:", adapter);

const F32_MAX = 3.4028234663852886e38;

/** One pass over tensors: the first NaN/Inf, and the largest |value| of each tensor. */
interface Scan {
  readonly nonFinite: NonFinite | null;
  readonly maxAbs: ReadonlyMap<string, number>;
}

/**
 * A 16-bit tensor's first NaN/Inf and largest |value|, from its bits: magnitudes of finite
 * bf16 / f16 values order as their bits without the sign, so nothing is widened (a base's
 * embedding in f32 would be a transient of hundreds of MB).
 */
const scanHalf = (name: string, t: HalfTensor) => {
  let nonFinite: NonFinite | null = null;
  let top = 0;
  const b = t.bits;
  for (let i = 0; i < b.length; i++) {
    const h = b[i];
    if (isNonFiniteHalf(h, t.format)) {
      nonFinite ??= { name, index: i, value: widenHalfBits(b.subarray(i, i + 1), t.format)[0] };
    } else if ((h & 0x7fff) > top) top = h & 0x7fff;
  }
  return { nonFinite, maxAbs: widenHalfBits(Uint16Array.of(top), t.format)[0] };
};

const scan = (m: ReadonlyMap<string, BaseTensor>): Scan => {
  let nonFinite: NonFinite | null = null;
  const maxAbs = new Map<string, number>();
  for (const [name, t] of m) {
    if (isHalfTensor(t)) {
      const h = scanHalf(name, t);
      nonFinite ??= h.nonFinite;
      maxAbs.set(name, h.maxAbs);
      continue;
    }
    const d = t.data;
    let mx = 0;
    for (let i = 0; i < d.length; i++) {
      const x = d[i];
      const a = x < 0 ? -x : x;
      if (a > mx) mx = a;
      if (!(a <= F32_MAX) && nonFinite === null) nonFinite = { name, index: i, value: x };
    }
    maxAbs.set(name, mx);
  }
  return { nonFinite, maxAbs };
};

const firstNonFiniteOf = (m: ReadonlyMap<string, HostTensor>): NonFinite | null =>
  scan(m).nonFinite;

/** Awaits a digest under way (hashing runs off this thread) while scanning the same tensors. */
const hashWhileScanning = (
  digest: Promise<string>,
  m: ReadonlyMap<string, BaseTensor>,
): Effect.Effect<{ digest: string; scan: Scan }> =>
  Effect.promise(async () => {
    const sc = scan(m);
    return { digest: await digest, scan: sc };
  });

const copyTensor = (t: HostTensor): HostTensor => ({ shape: [...t.shape], data: t.data.slice() });

/** A fresh f32 copy of a base weight (a 16-bit one widened). */
const copyWidened = (t: BaseTensor): HostTensor =>
  isHalfTensor(t) ? { shape: [...t.shape], data: widenTensor(t).data } : copyTensor(t);

const bytesOf = (m: ReadonlyMap<string, BaseTensor>): number => {
  let n = 0;
  for (const t of m.values()) n += storedBytes(t).byteLength;
  return n;
};

// ---- shared device copies ---------------------------------------------------------------------

interface Held<A> {
  readonly value: A;
  refs: number;
  readonly scope: Scope.Closeable;
}

/**
 * Device copies of one immutable host value, at most one live per backend, each shared by
 * reference count: a hold lasts for the scope that took it, the buffers are released when the
 * last hold ends. A later hold on that backend makes a new copy from the host value.
 */
class DeviceCopies<A> {
  readonly #on = new Map<BackendShape, Held<A>>();

  /** True while a copy is live on `backend`. */
  live(backend: BackendShape): boolean {
    return this.#on.has(backend);
  }

  /** A hold for the current scope on the live copy, or on a new one made by `make`. */
  hold(backend: BackendShape, make: (ops: Ops) => A): Effect.Effect<A, never, Scope.Scope> {
    return Effect.map(
      Effect.acquireRelease(
        Effect.suspend(() => {
          const live = this.#on.get(backend);
          if (live) {
            live.refs++;
            return Effect.succeed(live);
          }
          return Effect.flatMap(Scope.make(), (scope) =>
            Scope.provide(scope)(backend.ops).pipe(
              Effect.flatMap((ops) => Effect.sync(() => make(ops))),
              Effect.map((value) => this.#add(backend, value, scope)),
              Effect.onExit((ex) =>
                Exit.isFailure(ex) ? Scope.close(scope, Exit.void) : Effect.void
              ),
            ));
        }),
        (held) => this.#release(backend, held),
      ),
      (held) => held.value,
    );
  }

  /** Registers a copy made by the caller in `scope` (now owned here), held by the current scope. */
  adopt(
    backend: BackendShape,
    value: A,
    scope: Scope.Closeable,
  ): Effect.Effect<void, never, Scope.Scope> {
    return Effect.asVoid(Effect.acquireRelease(
      Effect.sync(() => {
        const prior = this.#on.get(backend);
        if (prior) throw new Error("a device copy is already live on this backend");
        return this.#add(backend, value, scope);
      }),
      (held) => this.#release(backend, held),
    ));
  }

  #add(backend: BackendShape, value: A, scope: Scope.Closeable): Held<A> {
    const held: Held<A> = { value, refs: 1, scope };
    this.#on.set(backend, held);
    return held;
  }

  #release(backend: BackendShape, held: Held<A>): Effect.Effect<void> {
    return Effect.suspend(() => {
      held.refs--;
      if (held.refs > 0) return Effect.void;
      if (this.#on.get(backend) === held) this.#on.delete(backend);
      return Scope.close(held.scope, Exit.void);
    });
  }
}

// ---- the frozen base --------------------------------------------------------------------------

interface BaseStore {
  /** As given: f32, or (a LoRA base loaded from a 16-bit checkpoint) 16-bit matrices. */
  readonly weights: BaseWeightMap;
  readonly nonFinite: NonFinite | null;
  /** max |w| of each weight (bounds the merged weights without merging). */
  readonly maxAbs: ReadonlyMap<string, number>;
  readonly device: DeviceCopies<DeviceModel>;
}

const baseStores = new WeakMap<FrozenBase, BaseStore>();

/**
 * The frozen base model: a private host copy of its weights, their digest (taken once, at
 * creation), and its resident device uploads. Shared by reference by the policy and every LoRA
 * snapshot; nothing writes to it. 16-bit weights (see loadFrozenBase) stay 16-bit here and on
 * the device (half the memory); the digest covers their bits.
 */
export class FrozenBase {
  private constructor(
    readonly config: ModelConfig,
    /** Hex SHA-256 over names, shapes and bytes of the weights (see weightsDigest). */
    readonly digest: string,
  ) {}

  /** Copies `weights` (private from then on) and takes their digest: O(model), once. */
  static make(config: ModelConfig, weights: BaseWeightMap): Effect.Effect<FrozenBase> {
    return Effect.suspend(() =>
      FrozenBase.adopt(
        config,
        new Map(
          [...weights].map((
            [n, t],
          ) => [
            n,
            isHalfTensor(t) ? { ...t, shape: [...t.shape], bits: t.bits.slice() } : copyTensor(t),
          ]),
        ),
      )
    );
  }

  /**
   * Takes over `weights` without copying them (a model's worth of host memory saved) and takes
   * their digest. The caller must not write to those arrays afterwards (reading is fine); a write
   * would show as a digest mismatch wherever a snapshot of this base is published or verified.
   */
  static adopt(config: ModelConfig, weights: BaseWeightMap): Effect.Effect<FrozenBase> {
    return Effect.suspend(() => {
      const own = new Map(weights);
      return Effect.map(hashWhileScanning(weightsDigest(own), own), ({ digest, scan }) => {
        const b = new FrozenBase(config, digest);
        const { nonFinite, maxAbs } = scan;
        baseStores.set(b, {
          weights: own,
          nonFinite,
          maxAbs,
          device: new DeviceCopies(),
        });
        Object.freeze(b);
        return b;
      });
    });
  }

  private get store(): BaseStore {
    return baseStores.get(this)!;
  }

  /** Names of the weights (Hugging Face names). */
  weightNames(): string[] {
    return [...this.store.weights.keys()];
  }

  /** Shape of a weight. */
  shape(name: string): readonly number[] {
    const t = this.store.weights.get(name);
    if (!t) throw new Error(`the base has no tensor ${name}`);
    return t.shape;
  }

  /** Fresh f32 copies of all weights (O(model); 16-bit ones widened). */
  weights(): Map<string, HostTensor> {
    return new Map([...this.store.weights].map(([n, t]) => [n, copyWidened(t)]));
  }

  /** True when some weights are kept 16-bit (bf16 / f16). */
  get hasHalfWeights(): boolean {
    return [...this.store.weights.values()].some(isHalfTensor);
  }

  /** Bytes of the host copy. */
  get bytes(): number {
    return bytesOf(this.store.weights);
  }

  /** The first NaN/Inf among the weights (found at creation), or null. */
  firstNonFinite(): NonFinite | null {
    return this.store.nonFinite;
  }

  /** True while the base is resident (held by someone) on `backend`. */
  isResident(backend: BackendShape): boolean {
    return this.store.device.live(backend);
  }

  /**
   * The base on `backend`, held for the current scope: the resident upload when there is one,
   * else a new upload that stays resident while anyone holds it. Never written to.
   */
  device(backend: BackendShape): Effect.Effect<DeviceModel, never, Scope.Scope> {
    // straight from the private host copy: uploading copies (fromArray never aliases its input)
    return this.store.device.hold(
      backend,
      (ops) => uploadModel(ops, this.config, this.store.weights),
    );
  }

  /** Re-hashes the weights (O(model)): the digest of the bytes now. */
  currentDigest(): Effect.Effect<string> {
    return Effect.promise(() => weightsDigest(this.store.weights));
  }
}

// ---- snapshots --------------------------------------------------------------------------------

interface Store {
  /** Full snapshots: every weight. LoRA: null (the base holds them). */
  readonly weights: ReadonlyMap<string, HostTensor> | null;
  /** LoRA: `<path>.lora_A` [r, in] and `<path>.lora_B` [out, r]. Full: null. */
  readonly adapter: ReadonlyMap<string, HostTensor> | null;
  /** NaN/Inf and max |value| of the owned tensors, found once at creation (they never change). */
  readonly scan: Scan;
  readonly device: DeviceCopies<LoraRuntime>;
}

// Raw arrays live here, out of reach of every module but this one.
const stores = new WeakMap<Snapshot, Store>();

/** An immutable policy state: a LoRA adapter over a frozen base, or a full set of weights. */
export class Snapshot {
  private constructor(
    /** Monotonic version (policy-v{version} on the server). */
    readonly version: number,
    readonly kind: SnapshotKind,
    readonly config: ModelConfig,
    readonly loraConfig: LoraConfig | null,
    /** LoRA: the frozen base the adapter applies to, shared by reference. Full: null. */
    readonly base: FrozenBase | null,
    /**
     * Hex SHA-256 taken at creation. LoRA: over the base's digest, the scale and the adapter
     * tensors; full: over names, shapes and bytes of every weight.
     */
    readonly digest: string,
  ) {}

  /** @internal Builds a snapshot from arrays nobody else holds. */
  static create(
    version: number,
    config: ModelConfig,
    content:
      | { kind: "full"; weights: ReadonlyMap<string, HostTensor> }
      | {
        kind: "lora";
        base: FrozenBase;
        loraConfig: LoraConfig;
        adapter: ReadonlyMap<string, HostTensor>;
      },
  ): Effect.Effect<Snapshot> {
    return Effect.suspend(() => {
      const owned = content.kind === "full" ? content.weights : content.adapter;
      const digest = content.kind === "full"
        ? weightsDigest(content.weights)
        : loraDigest(content.base.digest, loraScale(content.loraConfig), content.adapter);
      return Effect.map(hashWhileScanning(digest, owned), ({ digest: d, scan }) => {
        const s = content.kind === "full"
          ? new Snapshot(version, "full", config, null, null, d)
          : new Snapshot(version, "lora", config, content.loraConfig, content.base, d);
        stores.set(s, {
          weights: content.kind === "full" ? content.weights : null,
          adapter: content.kind === "lora" ? content.adapter : null,
          scan,
          device: new DeviceCopies(),
        });
        Object.freeze(s);
        return s;
      });
    });
  }

  private get store(): Store {
    return stores.get(this)!;
  }

  /** Names of the model's weights (Hugging Face names; for LoRA those of the base). */
  weightNames(): string[] {
    const w = this.store.weights;
    return w ? [...w.keys()] : this.base!.weightNames();
  }

  /** Shape of a weight. */
  shape(name: string): readonly number[] {
    const w = this.store.weights;
    if (!w) return this.base!.shape(name);
    const t = w.get(name);
    if (!t) throw new Error(`snapshot v${this.version} has no tensor ${name}`);
    return t.shape;
  }

  /** Fresh copies of the adapter tensors (PEFT names without prefix: `<path>.lora_A`), or null. */
  adapter(): Map<string, HostTensor> | null {
    const a = this.store.adapter;
    return a ? new Map([...a].map(([n, t]) => [n, copyTensor(t)])) : null;
  }

  /** Names of the host tensors this snapshot owns (LoRA: only A and B; the base is shared). */
  ownedTensorNames(): string[] {
    return [...(this.store.weights ?? this.store.adapter!).keys()];
  }

  /** Bytes this snapshot owns on the host (LoRA: the adapter's; the base is shared). */
  get ownedBytes(): number {
    return bytesOf(this.store.weights ?? this.store.adapter!);
  }

  /**
   * The first NaN/Inf among the snapshot's own tensors (LoRA: adapter, then base), or null. The
   * merged weights of a LoRA snapshot can overflow with finite A and B: see firstNonFiniteWeight.
   */
  firstNonFinite(): NonFinite | null {
    return this.store.scan.nonFinite ?? this.base?.firstNonFinite() ?? null;
  }

  /**
   * Recomputes the digest; fails with SnapshotCorrupted when the bytes changed. O(adapter) for
   * LoRA; with `deep`, also re-hashes the frozen base (O(model), for publishing merged weights).
   */
  verify(deep = false): Effect.Effect<void, SnapshotCorrupted> {
    const { weights, adapter } = this.store;
    const corrupted = (expected: string, actual: string) =>
      Effect.fail(new SnapshotCorrupted({ version: this.version, expected, actual }));
    const own = Effect.promise(() =>
      weights
        ? weightsDigest(weights)
        : loraDigest(this.base!.digest, loraScale(this.loraConfig!), adapter!)
    );
    return Effect.flatMap(own, (actual) => {
      if (actual !== this.digest) return corrupted(this.digest, actual);
      if (!deep || !this.base) return Effect.void;
      const base = this.base;
      return Effect.flatMap(
        base.currentDigest(),
        (b) => b === base.digest ? Effect.void : corrupted(base.digest, b),
      );
    });
  }
}

// ---- making snapshots -------------------------------------------------------------------------

// Backends hand back fresh arrays; f64 reference arrays are narrowed to the f32 storage format.
const toF32 = (a: Float32Array | Float64Array): Float32Array =>
  a instanceof Float32Array ? a : Float32Array.from(a);

/**
 * A LoRA snapshot of the trainable adapter `lora` over `base`: every A and B is copied into
 * fresh device buffers (the snapshot's device copy, held by the current scope) and those copies
 * are read to the host (one wait); the digest covers the base's digest and the adapter bytes.
 * Nothing of the base is copied, folded or hashed: O(adapter).
 */
export const loraSnapshot: (
  backend: BackendShape,
  version: number,
  base: FrozenBase,
  lora: LoraRuntime,
  loraConfig: LoraConfig,
) => Effect.Effect<Snapshot, BackendError, Scope.Scope> = Effect.fn("loraSnapshot")(
  function* (
    backend: BackendShape,
    version: number,
    base: FrozenBase,
    lora: LoraRuntime,
    loraConfig: LoraConfig,
  ) {
    const paths = [...lora.modules.keys()];
    const body = (scope: Scope.Closeable) =>
      Effect.gen(function* () {
        const dev = yield* Scope.provide(scope)(backend.ops);
        const modules = new Map(paths.map((p) => {
          const m = lora.modules.get(p)!;
          return [p, { a: dev.copy(m.a), b: dev.copy(m.b) }] as const;
        }));
        const runtime: LoraRuntime = { scale: lora.scale, dropout: 0, modules };
        // the host copy is read from the device copy: both hold the same bytes
        const host = yield* Effect.scoped(Effect.flatMap(
          backend.ops,
          (ops) => ops.read(paths.flatMap((p) => [modules.get(p)!.a, modules.get(p)!.b])),
        ));
        const adapter = new Map<string, HostTensor>();
        paths.forEach((p, i) => {
          const m = modules.get(p)!;
          adapter.set(`${p}.lora_A`, { shape: [...m.a.shape], data: toF32(host[2 * i]) });
          adapter.set(`${p}.lora_B`, { shape: [...m.b.shape], data: toF32(host[2 * i + 1]) });
        });
        const snap = yield* Snapshot.create(version, base.config, {
          kind: "lora",
          base,
          loraConfig,
          adapter,
        });
        yield* stores.get(snap)!.device.adopt(backend, runtime, scope);
        return snap;
      });
    // the device copy's scope is closed on any failure or interruption before it is adopted
    return yield* Effect.uninterruptibleMask((restore) =>
      Effect.flatMap(Scope.make(), (scope) =>
        restore(body(scope)).pipe(
          Effect.onExit((ex) => Exit.isFailure(ex) ? Scope.close(scope, Exit.void) : Effect.void),
        ))
    );
  },
);

/** A full fine-tuning snapshot: a fresh host copy of every live weight (one wait). */
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
    return yield* Snapshot.create(version, device.config, { kind: "full", weights });
  },
  Effect.scoped,
);

// ---- using snapshots --------------------------------------------------------------------------

/** A model ready to run on a backend: weights, plus a LoRA adapter applied at run time or null. */
export interface SnapshotModel {
  readonly model: DeviceModel;
  readonly lora: LoraRuntime | null;
}

/**
 * The snapshot's adapter on `backend`, held for the current scope: its own device copy when one
 * is live there, else one uploaded from its host copies. Null for full snapshots.
 */
export const snapshotAdapter = (
  snapshot: Snapshot,
  backend: BackendShape,
): Effect.Effect<LoraRuntime | null, never, Scope.Scope> => {
  const { adapter, device } = stores.get(snapshot)!;
  if (!adapter) return Effect.succeed(null);
  return device.hold(backend, (ops) => {
    const out = new Map<string, { a: Tensor; b: Tensor }>();
    for (const [name, a] of adapter) {
      if (!name.endsWith(".lora_A")) continue;
      const path = name.slice(0, -".lora_A".length);
      const b = adapter.get(`${path}.lora_B`)!;
      out.set(path, { a: ops.fromArray(a.data, a.shape), b: ops.fromArray(b.data, b.shape) });
    }
    return { scale: loraScale(snapshot.loraConfig!), dropout: 0, modules: out };
  });
};

/**
 * The snapshot as a runnable model on `backend`, held for the current scope. LoRA: the resident
 * base (uploaded only when nobody holds it there) with the snapshot's adapter at run time, no
 * copy of the model. Full: its weights uploaded into the current scope (O(model)).
 */
export const snapshotModel = (
  snapshot: Snapshot,
  backend: BackendShape,
): Effect.Effect<SnapshotModel, never, Scope.Scope> => {
  const { weights } = stores.get(snapshot)!;
  if (weights) {
    return Effect.map(backend.ops, (ops) => ({
      model: uploadModel(ops, snapshot.config, weights),
      lora: null,
    }));
  }
  return Effect.gen(function* () {
    const model = yield* snapshot.base!.device(backend);
    const lora = yield* snapshotAdapter(snapshot, backend);
    return { model, lora };
  });
};

/**
 * The snapshot's merged weights as fresh host arrays, for consumers of plain checkpoints
 * (full-weight push, export). Full: copies. LoRA: W + s·B·A for every adapted projection,
 * written out of place by the loraFold op on `backend` (default: the CPU reference backend)
 * from the resident base and the snapshot's adapter, one wait; every other tensor a copy of the
 * base's. Nothing is cached: each call computes them anew, and nothing live is written.
 */
export const mergedWeights: (
  snapshot: Snapshot,
  backend?: BackendShape,
) => Effect.Effect<Map<string, HostTensor>, BackendError> = Effect.fn("mergedWeights")(
  function* (snapshot: Snapshot, backend: BackendShape = cpuBackend()) {
    const { weights } = stores.get(snapshot)!;
    if (weights) return new Map([...weights].map(([n, t]) => [n, copyTensor(t)]));
    const base = snapshot.base!;
    const { model, lora } = yield* snapshotModel(snapshot, backend);
    const ops = yield* backend.ops;
    const paths = [...lora!.modules.keys()];
    const folded = yield* ops.read(paths.map((p) => {
      const m = lora!.modules.get(p)!;
      return ops.loraFold(model.weights.get(`${p}.weight`)!, m.b, m.a, lora!.scale);
    }));
    const merged = new Map(paths.map((p, i) => [`${p}.weight`, toF32(folded[i])]));
    const out = new Map<string, HostTensor>();
    // 16-bit base weights are widened: consumers of merged weights get f32 throughout
    for (const [name, t] of baseStores.get(base)!.weights) {
      const f = merged.get(name);
      out.set(name, f ? { shape: [...t.shape], data: f } : copyWidened(t));
    }
    return out;
  },
  Effect.scoped,
);

/**
 * True unless every merged weight of the LoRA snapshot provably stays finite:
 * |W + s·B·A| <= max|W| + |s|·r·max|A|·max|B|, which must stay well inside the f32 range. O(modules),
 * from the maxima found at creation.
 */
const mayOverflow = (snapshot: Snapshot): boolean => {
  const { adapter, scan } = stores.get(snapshot)!;
  const baseMax = baseStores.get(snapshot.base!)!.maxAbs;
  const s = Math.abs(loraScale(snapshot.loraConfig!));
  for (const [name, a] of adapter!) {
    if (!name.endsWith(".lora_A")) continue;
    const path = name.slice(0, -".lora_A".length);
    const bound = baseMax.get(`${path}.weight`)! +
      s * a.shape[0] * scan.maxAbs.get(name)! * scan.maxAbs.get(`${path}.lora_B`)!;
    if (!(bound < F32_MAX / 2)) return true;
  }
  return false;
};

/**
 * The first NaN/Inf of the weights the snapshot stands for, or null: its own tensors and the
 * base, and for a LoRA snapshot the merged W + s·B·A as well. Those are bounded from A, B and
 * the base's largest values (O(adapter)); only when the bound leaves the f32 range are they
 * merged on `backend` (out of place, O(model)) and scanned.
 */
export const firstNonFiniteWeight = (
  snapshot: Snapshot,
  backend: BackendShape = cpuBackend(),
): Effect.Effect<NonFinite | null, BackendError> => {
  const own = snapshot.firstNonFinite();
  if (own || snapshot.kind === "full" || !mayOverflow(snapshot)) return Effect.succeed(own);
  return Effect.map(mergedWeights(snapshot, backend), firstNonFiniteOf);
};
