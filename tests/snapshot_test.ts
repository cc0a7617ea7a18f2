/**
 * The mission's central properties: every snapshot's merged weights equal W + s·B·A computed
 * independently in float64, B = 0 gives the base bit for bit, and a snapshot stays unchanged
 * however training continues (digest and content, through its device copy and its host copy),
 * while the live weights never hold a merged state. A negative control (TRL v0.15's in-place
 * merge / aliased view / in-place unmerge) must FAIL the same property. And a LoRA snapshot costs
 * O(adapter): it copies, reads and hashes only A and B, whatever the size of the base.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { Effect, Exit, Scope } from "effect";
import fc from "fast-check";
import { type BackendShape, cpuBackend } from "../src/backend/backend.ts";
import type { Ops } from "../src/backend/ops.ts";
import type { ModelConfig } from "../src/model/config.ts";
import { forward, uploadModel } from "../src/model/decoder.ts";
import { type HostTensor, initWeights, type WeightMap } from "../src/model/weights.ts";
import {
  initLora,
  type LoraConfig,
  loraScale,
  type LoraWeights,
  uploadLora,
} from "../src/lora/adapter.ts";
import { Rng } from "../src/model/rng.ts";
import {
  firstNonFiniteWeight,
  FrozenBase,
  loraSnapshot,
  mergedWeights,
  type Snapshot,
  snapshotModel,
} from "../src/snapshot/snapshot.ts";
import { Policy } from "../src/train/policy.ts";
import { makeLocalEngine } from "../src/rollout/local.ts";
import { gpuTeardown, hasGpu, relError, testBackends, withOps } from "./support/backends.ts";
import { testOptimizer, tinyConfig } from "./support/tiny.ts";
import { aliasingFold } from "./support/aliasing_fold.ts";

const { gpu, cpu } = await testBackends();

/** Independent float64 reference of W + s·B·A. */
const mergedRef = (w: HostTensor, a: HostTensor, b: HostTensor, s: number): Float64Array => {
  const [out, r] = b.shape;
  const inp = a.shape[1];
  const res = Float64Array.from(w.data);
  for (let o = 0; o < out; o++) {
    for (let i = 0; i < inp; i++) {
      let acc = 0;
      for (let k = 0; k < r; k++) acc += b.data[o * r + k] * a.data[k * inp + i];
      res[o * inp + i] += s * acc;
    }
  }
  return res;
};

interface Case {
  readonly config: ModelConfig;
  readonly r: number;
  readonly alpha: number;
  readonly rs: boolean;
  readonly targets:
    ("q_proj" | "k_proj" | "v_proj" | "o_proj" | "gate_proj" | "up_proj" | "down_proj")[];
  readonly seed: number;
  readonly zeroB: boolean;
}

const caseArb: fc.Arbitrary<Case> = fc.record({
  heads: fc.constantFrom(1, 2, 4),
  kvDiv: fc.constantFrom(1, 2),
  headDim: fc.constantFrom(2, 4, 6),
  inter: fc.integer({ min: 1, max: 20 }),
  layers: fc.integer({ min: 1, max: 2 }),
  vocab: fc.integer({ min: 3, max: 17 }),
  r: fc.integer({ min: 1, max: 8 }),
  alpha: fc.constantFrom(1, 8, 16, 32),
  rs: fc.boolean(),
  targets: fc.subarray(
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] as const,
    {
      minLength: 1,
    },
  ),
  seed: fc.integer({ min: 1, max: 1 << 30 }),
  zeroB: fc.boolean(),
}).map((x) => {
  const kv = Math.max(1, x.heads / x.kvDiv);
  return {
    config: tinyConfig({
      numHeads: x.heads,
      numKvHeads: kv,
      headDim: x.headDim,
      hiddenSize: x.heads * x.headDim,
      intermediateSize: x.inter,
      numLayers: x.layers,
      vocabSize: x.vocab,
    }),
    r: x.r,
    alpha: x.alpha,
    rs: x.rs,
    targets: [...x.targets],
    seed: x.seed,
    zeroB: x.zeroB,
  };
});

const setup = (c: Case): { base: WeightMap; lora: LoraWeights } => {
  const base = initWeights(c.config, c.seed, 0.5);
  const lora = initLora(c.config, {
    r: c.r,
    alpha: c.alpha,
    dropout: 0,
    targetModules: c.targets,
    useRslora: c.rs,
  }, c.seed + 1);
  if (!c.zeroB) {
    const rng = new Rng(c.seed + 2);
    for (const m of lora.modules.values()) {
      for (let i = 0; i < m.b.data.length; i++) m.b.data[i] = rng.normal();
    }
  }
  return { base, lora };
};

/** A snapshot implementation under test: returns the snapshot's weights at creation time. */
type FoldImpl = (
  c: Case,
  base: WeightMap,
  lora: LoraWeights,
  train: () => void,
) => Promise<
  {
    weights: Map<string, HostTensor>;
    /** Every view of the snapshot's merged weights after training went on. */
    later: () => Promise<Map<string, HostTensor>[]>;
    live: () => Promise<WeightMap>;
  }
>;

/**
 * The property both implementations face: values equal the float64 merge (bit-exact base when
 * B = 0), unchanged after further training, and the live weights never equal the merged state.
 */
const snapshotProperty = (impl: FoldImpl) =>
  fc.asyncProperty(caseArb, async (c) => {
    const { base, lora } = setup(c);
    const s = loraScale(lora.config);
    const merged = new Map<string, Float64Array>();
    for (const [path, m] of lora.modules) {
      merged.set(path, mergedRef(base.get(`${path}.weight`)!, m.a, m.b, s));
    }
    const rng = new Rng(c.seed + 5);
    // "training": the adapter changes after the snapshot is taken
    const train = () => {
      for (const m of lora.modules.values()) {
        for (let i = 0; i < m.b.data.length; i++) {
          m.b.data[i] += 0.5 * rng.normal();
        }
        for (let i = 0; i < m.a.data.length; i++) m.a.data[i] += 0.5 * rng.normal();
      }
    };
    const snap = await impl(c, base, lora, train);
    const check = (weights: Map<string, HostTensor>) => {
      for (const [name, t] of base) {
        const path = name.replace(/\.weight$/, "");
        const m = merged.get(path);
        const got = weights.get(name)!.data;
        if (!m || c.zeroB) {
          if (!t.data.every((x, i) => Object.is(x, got[i]))) return false; // bit for bit
        } else if (relError(got, m) > 1e-6) return false;
      }
      return true;
    };
    if (!check(snap.weights)) return false;
    for (const w of await snap.later()) if (!check(w)) return false;
    // the live model never holds a merged state: its weights are still the base, bit for bit
    const live = await snap.live();
    for (
      const [name, t] of base
    ) if (!t.data.every((x, i) => Object.is(x, live.get(name)!.data[i]))) return false;
    return true;
  });

/**
 * lorafold's implementation: the frozen base resident on the backend, the trainable adapter
 * uploaded, loraSnapshot, merged weights from mergedWeights, training via AdamW on the live
 * adapter. Afterwards the snapshot is merged again from its device copy (on the same backend)
 * and from its host copy (a fresh CPU backend), and its digest re-checked, base included.
 */
const lorafoldImpl = (b: BackendShape): FoldImpl => (c, base, lora, train) =>
  withOps(b, (ops) =>
    Effect.scoped(Effect.gen(function* () {
      const frozen = yield* FrozenBase.make(c.config, base);
      const device = yield* frozen.device(b);
      const run = uploadLora(ops, lora);
      const snap: Snapshot = yield* loraSnapshot(b, 1, frozen, run, lora.config);
      const weights = yield* mergedWeights(snap, b);
      // further optimiser steps change the device adapter (and the host copy, via `train`)
      train();
      for (const [path, m] of run.modules) {
        const hostA = lora.modules.get(path)!.a.data;
        const g = ops.fromArray(hostA.map((x) => x * 0.3 + 0.1), m.a.shape);
        ops.adamw(m.a, g, ops.zeros(m.a.shape), ops.zeros(m.a.shape), {
          lr: 0.1,
          beta1: 0.9,
          beta2: 0.999,
          eps: 1e-8,
          weightDecay: 0.01,
          step: 1,
        });
        ops.adamw(
          m.b,
          ops.fromArray(new Float32Array(m.b.size).fill(1), m.b.shape),
          ops.zeros(m.b.shape),
          ops.zeros(m.b.shape),
          {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weightDecay: 0,
            step: 1,
          },
        );
      }
      yield* ops.read([run.modules.values().next().value!.a]);
      yield* snap.verify(true);
      const fromDevice = yield* mergedWeights(snap, b);
      const fromHost = yield* mergedWeights(snap, cpuBackend());
      const names = [...device.weights.keys()];
      const liveHost = yield* ops.read(names.map((n) => device.weights.get(n)!));
      const live = new Map(
        names.map((
          n,
          i,
        ) => [n, { shape: base.get(n)!.shape, data: Float32Array.from(liveHost[i]) }]),
      );
      return {
        weights,
        later: () => Promise.resolve([fromDevice, fromHost]),
        live: () => Promise.resolve(live),
      };
    })));

/** TRL v0.15.0's sequence on host arrays (the negative control). */
const aliasingImpl: FoldImpl = (_c, base, lora, train) => {
  const live = new Map([...base].map(([n, t]) => [n, { shape: t.shape, data: t.data.slice() }]));
  const weights = aliasingFold(live, lora.modules, loraScale(lora.config));
  train();
  return Promise.resolve({
    weights,
    later: () => Promise.resolve([weights]),
    live: () => Promise.resolve(live),
  });
};

for (const b of [cpu, ...(gpu ? [gpu] : [])]) {
  Deno.test({
    name:
      `${b.info.name}: snapshots equal W + s·B·A (float64), stay unchanged under training, live weights never merged`,
    ignore: b.info.name === "webgpu" && !hasGpu,
    fn: () =>
      fc.assert(snapshotProperty(lorafoldImpl(b)), { numRuns: b.info.name === "cpu" ? 40 : 25 }),
  });
}

Deno.test("negative control: TRL v0.15's in-place merge / aliased view / unmerge FAILS the property", async () => {
  const out = await fc.check(snapshotProperty(aliasingImpl), { numRuns: 40 });
  assert(out.failed, "the aliasing implementation passed: the property cannot see the bug");
  // and the counterexample is a real adapter (B != 0), where the aliased view shows the base again
  assertEquals((out.counterexample![0] as Case).zeroB, false);
});

Deno.test("snapshot: digest fixed at creation; tensors only as copies; re-check catches nothing on a clean snapshot", () =>
  withOps(cpu, (ops) =>
    Effect.scoped(Effect.gen(function* () {
      const c = tinyConfig();
      const base = initWeights(c, 3);
      const lora = initLora(c, {
        r: 2,
        alpha: 4,
        dropout: 0,
        targetModules: ["q_proj"],
        useRslora: false,
      }, 3);
      const frozen = yield* FrozenBase.make(c, base);
      base.get("model.norm.weight")!.data.fill(9); // the caller's arrays are not the base's
      const snap = yield* loraSnapshot(cpu, 7, frozen, uploadLora(ops, lora), lora.config);
      assertEquals(snap.version, 7);
      assert(/^[0-9a-f]{64}$/.test(snap.digest));
      const name = "model.layers.0.self_attn.q_proj.weight";
      const w = (yield* mergedWeights(snap)).get(name)!;
      w.data.fill(123); // mutating a copy cannot reach the snapshot
      snap.adapter()!.get("model.layers.0.self_attn.q_proj.lora_A")!.data.fill(123);
      frozen.weights().get(name)!.data.fill(123);
      yield* snap.verify(true);
      assert((yield* mergedWeights(snap)).get(name)!.data[0] !== 123);
      assert(snap.adapter()!.get("model.layers.0.self_attn.q_proj.lora_A")!.data[0] !== 123);
      assert(frozen.weights().get("model.norm.weight")!.data[0] !== 9);
      assert(Object.isFrozen(snap) && Object.isFrozen(frozen));
    }))));

// ---- O(adapter): what a LoRA snapshot does, counted -----------------------------------------------

/** Element counts of the ops a backend ran (per op name, plus elements copied, uploaded, read). */
interface Counts {
  calls: Record<string, number>;
  copied: number;
  uploaded: number;
  read: number;
}

/** `inner` with every op counted into `counts`. */
const counting = (inner: BackendShape, counts: Counts): BackendShape => ({
  ...inner,
  ops: Effect.map(inner.ops, (ops) =>
    new Proxy(ops, {
      get(target, prop, receiver) {
        const v = Reflect.get(target, prop, receiver);
        if (typeof v !== "function") return v;
        return (...args: unknown[]) => {
          const name = String(prop);
          counts.calls[name] = (counts.calls[name] ?? 0) + 1;
          if (name === "copy") counts.copied += (args[0] as { size: number }).size;
          if (name === "fromArray") counts.uploaded += (args[0] as ArrayLike<number>).length;
          if (name === "read") {
            for (const t of args[0] as { size: number }[]) counts.read += t.size;
          }
          return v.apply(target, args);
        };
      },
    }) as Ops),
});

const zeroCounts = (c: Counts) => {
  c.calls = {};
  c.copied = c.uploaded = c.read = 0;
};

const hex = (b: ArrayBuffer) =>
  Array.from(new Uint8Array(b), (x) => x.toString(16).padStart(2, "0")).join("");

/** SHA-256 of concatenated parts, computed here (independently of the library). */
const sha256 = async (parts: Uint8Array[]): Promise<ArrayBuffer> => {
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    all.set(p, o);
    o += p.length;
  }
  return await crypto.subtle.digest("SHA-256", all);
};

/**
 * The documented digest: SHA-256 of `header`, then per tensor (names sorted)
 * `<prefix><name>[<shape>]` and the SHA-256 of its f32 bytes.
 */
const documentedDigest = async (
  header: string,
  prefix: string,
  m: ReadonlyMap<string, HostTensor>,
): Promise<string> => {
  const enc = new TextEncoder();
  const parts = [enc.encode(header)];
  for (const n of [...m.keys()].sort()) {
    const t = m.get(n)!;
    parts.push(enc.encode(`${prefix}${n}[${t.shape.join(",")}]`));
    parts.push(
      new Uint8Array(
        await sha256([new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength)]),
      ),
    );
  }
  return hex(await sha256(parts));
};

/** Runs `f` while counting the bytes given to crypto.subtle.digest. */
const hashedBytes = async <A>(f: () => Promise<A>): Promise<{ result: A; bytes: number }> => {
  const subtle = crypto.subtle;
  const original = subtle.digest;
  let bytes = 0;
  subtle.digest = function (algorithm: AlgorithmIdentifier, data: BufferSource) {
    bytes += data.byteLength;
    return original.call(subtle, algorithm, data);
  } as typeof subtle.digest;
  try {
    return { result: await f(), bytes };
  } finally {
    subtle.digest = original;
  }
};

const COST_LORA: LoraConfig = {
  r: 3,
  alpha: 6,
  dropout: 0,
  targetModules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
  useRslora: false,
};

/**
 * Takes snapshot v1 of a LoRA policy over a base of `vocab` tokens (the adapter's shapes do not
 * depend on it), pushes it to the in-process engine and runs it as engines and verification
 * do; returns what each of these did on the backend and what the snapshot is made of.
 */
const snapshotCost = (b: BackendShape, vocab: number) => {
  const c = tinyConfig({ vocabSize: vocab });
  const counts: Counts = { calls: {}, copied: 0, uploaded: 0, read: 0 };
  const cb = counting(b, counts);
  const init = initLora(c, COST_LORA, 5);
  const rng = new Rng(6);
  for (const m of init.modules.values()) {
    for (let i = 0; i < m.b.data.length; i++) m.b.data[i] = rng.normal();
  }
  const adapterElements = [...init.modules.values()].reduce(
    (n, m) => n + m.a.data.length + m.b.data.length,
    0,
  );
  const base = initWeights(c, 4);
  return Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const policy = yield* Policy.make(cb, c, base, {
      mode: "lora",
      lora: COST_LORA,
      seed: 1,
      optimizer: testOptimizer,
    }, init);
    policy.version = 1;
    zeroCounts(counts);
    const { result: snap, bytes: hashed } = yield* Effect.promise(() =>
      hashedBytes(() => Effect.runPromise(policy.snapshot()))
    );
    const snapshotCounts = structuredClone(counts);
    // an in-process push and a verification-style forward reuse the resident base and the
    // snapshot's own device adapter: nothing is copied or uploaded but the forward's inputs
    zeroCounts(counts);
    const { engine, target } = yield* makeLocalEngine(cb, 0);
    const report = yield* target.push(snap);
    const pushCounts = structuredClone(counts);
    yield* engine.generate([{
      prompt: [1, 3],
      n: 1,
      maxTokens: 2,
      temperature: 0,
      topP: 1,
      topK: 0,
      seed: 0,
      stopTokenIds: [],
    }]);
    zeroCounts(counts);
    const runnable = yield* snapshotModel(snap, cb);
    const runCounts = structuredClone(counts);
    // the digest, recomputed here from its definition
    const baseDigest = yield* Effect.promise(() => documentedDigest("", "w:", base));
    const digest = yield* Effect.promise(() =>
      documentedDigest(
        `lora-snapshot base:${policy.base.digest} scale:${loraScale(COST_LORA)}\n`,
        "a:",
        snap.adapter()!,
      )
    );
    return {
      snap,
      policy,
      adapterElements,
      hashed,
      snapshotCounts,
      pushCounts,
      runCounts,
      report,
      baseDigest,
      digest,
      runnable,
      baseBytes: [...base.values()].reduce((n, t) => n + t.data.byteLength, 0),
    };
  })));
};

const costTest = async (b: BackendShape) => {
  const small = await snapshotCost(b, 11);
  const large = await snapshotCost(b, 3000); // a base ~40x larger, the same adapter
  assert(large.baseBytes > 20 * small.baseBytes);
  for (const x of [small, large]) {
    const { snap, policy, adapterElements: n } = x;
    // it refers to the policy's frozen base, whose digest was taken once, at load
    assert(snap.base === policy.base);
    assertEquals(x.baseDigest, policy.base.digest);
    // its host store holds only A and B
    const paths = [...initLora(snap.config, COST_LORA, 0).modules.keys()];
    assertEquals(
      snap.ownedTensorNames().sort(),
      paths.flatMap((p) => [`${p}.lora_A`, `${p}.lora_B`]).sort(),
    );
    assertEquals(snap.ownedBytes, 4 * n);
    // its digest is SHA-256 over the base's digest and the adapter bytes only
    assertEquals(snap.digest, x.digest);
    assert(x.hashed > 4 * n && x.hashed < 4 * n + 4096, `hashed ${x.hashed} bytes`);
    // on the device: A and B copied to fresh buffers and read back, nothing folded or uploaded
    assertEquals(x.snapshotCounts.copied, n);
    assertEquals(x.snapshotCounts.read, n);
    assertEquals(x.snapshotCounts.uploaded, 0);
    assertEquals(x.snapshotCounts.calls.loraFold ?? 0, 0);
    assertEquals(x.snapshotCounts.calls.read, 1);
    // an in-process push and running the snapshot move no weights at all
    assertEquals([x.pushCounts.copied, x.pushCounts.uploaded, x.pushCounts.read], [0, 0, 0]);
    assertEquals([x.runCounts.copied, x.runCounts.uploaded], [0, 0]);
    assert(x.runnable.model === policy.baseDevice && x.runnable.lora !== null);
    assertEquals(x.report.bytes, 4 * n);
  }
  // and so it is the same work for a base 40x the size
  assertEquals(large.snapshotCounts, small.snapshotCounts);
  assertEquals(large.hashed, small.hashed);
};

Deno.test("cpu: a LoRA snapshot costs O(adapter): it copies, reads and hashes only A and B, whatever the base", () =>
  costTest(cpu));
Deno.test({
  name:
    "webgpu: a LoRA snapshot costs O(adapter): it copies, reads and hashes only A and B, whatever the base",
  ignore: !hasGpu,
  fn: () => costTest(gpu!),
});

Deno.test("snapshot device copies are shared by hold and released with the last one; a later hold uploads the host copy", async () => {
  const c = tinyConfig();
  const base = initWeights(c, 8);
  const lora = initLora(c, COST_LORA, 8);
  const counts: Counts = { calls: {}, copied: 0, uploaded: 0, read: 0 };
  const cb = counting(cpu, counts);
  const frozen = await Effect.runPromise(FrozenBase.make(c, base));
  const snap = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const ops = yield* cpu.ops;
    // the creator (as the policy does) holds the base and the snapshot it takes
    const creator = yield* Scope.make();
    yield* Scope.provide(creator)(frozen.device(cb));
    const snap = yield* Scope.provide(creator)(
      loraSnapshot(cb, 1, frozen, uploadLora(ops, lora), lora.config),
    );
    const user = yield* Scope.make();
    zeroCounts(counts);
    const held = yield* Scope.provide(user)(snapshotModel(snap, cb));
    assertEquals([counts.copied, counts.uploaded], [0, 0]); // the creator's device copies
    assert(frozen.isResident(cb));
    yield* Scope.close(creator, Exit.void); // the user still holds it
    const again = yield* snapshotModel(snap, cb);
    assert(again.lora!.modules === held.lora!.modules && again.model === held.model);
    assertEquals(counts.uploaded, 0);
    yield* Scope.close(user, Exit.void); // this scope still holds it
    assertEquals(counts.uploaded, 0);
    assert(frozen.isResident(cb));
    // another backend gets an upload of the host copies
    const elsewhere = yield* snapshotModel(snap, cpuBackend());
    assert(elsewhere.lora!.modules !== held.lora!.modules);
    return snap;
  })));
  // every hold ended: nothing is resident; a new hold uploads base and adapter from the host
  assert(!frozen.isResident(cb));
  zeroCounts(counts);
  await Effect.runPromise(Effect.scoped(snapshotModel(snap, cb)));
  const elements = [...base.values()].reduce((n, t) => n + t.data.length, 0) +
    [...lora.modules.values()].reduce((n, m) => n + m.a.data.length + m.b.data.length, 0);
  assertEquals(counts.uploaded, elements);
});

Deno.test("snapshot: merged weights that overflow with finite A and B are found (bounded first, merged only then)", () =>
  withOps(cpu, (ops) =>
    Effect.scoped(Effect.gen(function* () {
      const c = tinyConfig();
      const frozen = yield* FrozenBase.make(c, initWeights(c, 2));
      const lora = initLora(c, { ...COST_LORA, targetModules: ["v_proj"] }, 2);
      for (const m of lora.modules.values()) {
        m.a.data.fill(1e20);
        m.b.data.fill(1e20); // finite, but s·B·A = 2·3·1e40: beyond f32
      }
      const counts: Counts = { calls: {}, copied: 0, uploaded: 0, read: 0 };
      const cb = counting(cpu, counts);
      const bad = yield* loraSnapshot(cpu, 1, frozen, uploadLora(ops, lora), lora.config);
      assertEquals(bad.firstNonFinite(), null);
      const found = yield* firstNonFiniteWeight(bad, cb);
      assert(found !== null && found.name === "model.layers.0.self_attn.v_proj.weight", `${found}`);
      assertEquals(found.value, Infinity);
      assertEquals(counts.calls.loraFold, 2); // both layers' v_proj, merged to look
      zeroCounts(counts);
      const good = yield* loraSnapshot(
        cpu,
        2,
        frozen,
        uploadLora(
          ops,
          setup({
            config: c,
            r: 3,
            alpha: 6,
            rs: false,
            targets: ["v_proj"],
            seed: 3,
            zeroB: false,
          }).lora,
        ),
        lora.config,
      );
      assertEquals(yield* firstNonFiniteWeight(good, cb), null);
      assertEquals(counts.calls.loraFold ?? 0, 0); // the bound alone settles it
    }))));

const runtimeVsFolded = async (b: BackendShape) => {
  const c = tinyConfig({ modelType: "qwen2", attentionBias: true });
  const { base, lora } = setup({
    config: c,
    r: 3,
    alpha: 6,
    rs: true,
    targets: ["q_proj", "v_proj", "o_proj", "down_proj"],
    seed: 17,
    zeroB: false,
  });
  const ids = { ids: [1, 5, 3, 8, 2, 9, 4, 7], batch: 2, seqLen: 4 };
  await withOps(b, (ops) =>
    Effect.scoped(Effect.gen(function* () {
      const frozen = yield* FrozenBase.make(c, base);
      const device = yield* frozen.device(b);
      const run = uploadLora(ops, lora);
      const withAdapter = forward(ops, device, ids, { lora: run }).logits;
      const snap = yield* loraSnapshot(b, 1, frozen, run, lora.config);
      const folded = forward(ops, uploadModel(ops, c, yield* mergedWeights(snap, b)), ids).logits;
      // what engines, verification and evaluation run: the resident base + the snapshot's adapter
      const engine = yield* snapshotModel(snap, b);
      const served = forward(ops, engine.model, ids, { lora: engine.lora }).logits;
      const plain = forward(ops, device, ids).logits;
      const [x, y, w, z] = yield* ops.read([withAdapter, folded, served, plain]);
      const err = relError(y, x);
      assert(err < 1e-5, `runtime-adapter vs folded logits: relative error ${err}`);
      assert(relError(w, y) < 1e-5, `served vs folded logits: ${relError(w, y)}`);
      assert(
        relError(z, x) > 1e-3,
        "the adapter must change the logits for this check to mean anything",
      );
    })));
};

Deno.test("cpu: logits with the adapter applied at run time equal the folded snapshot's", () =>
  runtimeVsFolded(cpu));
Deno.test({
  name: "webgpu: logits with the adapter applied at run time equal the folded snapshot's",
  ignore: !hasGpu,
  fn: () => runtimeVsFolded(gpu!),
});

gpuTeardown();
