/**
 * Model benches: the out-of-place fold of a LoRA snapshot into merged weights (mergedWeights)
 * vs a plain copy of the same tensors (ratio; target <= 2x for r <= 16), the time of a LoRA
 * snapshot itself (A and B only), and forward / forward+backward tokens per second of the
 * built-in model on each backend. Run: deno run -A bench/model.ts (writes bench/results/model.json).
 * @module
 */
import { Effect, Exit, Scope } from "effect";
import { type BackendShape, cpuBackend, webgpuBackend } from "../src/backend/backend.ts";
import { backward, forward, uploadModel } from "../src/model/decoder.ts";
import { initWeights } from "../src/model/weights.ts";
import type { ModelConfig } from "../src/model/config.ts";
import { initLora, uploadLora } from "../src/lora/adapter.ts";
import { copySnapshot, FrozenBase, loraSnapshot, mergedWeights } from "../src/snapshot/snapshot.ts";
import { loadBase } from "../src/model/loader.ts";
import { BUILTIN_MODEL_DIR } from "../src/task/arithmetic_task.ts";
import { median, writeResult } from "./common.ts";

const time = async (f: () => Promise<unknown>, reps: number): Promise<number> => {
  await f(); // warm-up: compiles pipelines
  const xs: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    await f();
    xs.push(performance.now() - t0);
  }
  return median(xs);
};

const run1 = <A>(e: Effect.Effect<A, unknown, Scope.Scope>) =>
  Effect.runPromise(Effect.scoped(e) as Effect.Effect<A>);

/** Fold (r) vs copy of the same model on one backend, and the LoRA snapshot: ms each. */
const foldVsCopy = async (b: BackendShape, c: ModelConfig, r: number) => {
  const base = initWeights(c, 1);
  const lora = initLora(c, {
    r,
    alpha: 2 * r,
    dropout: 0,
    targetModules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    useRslora: false,
  }, 1);
  return await run1(Effect.gen(function* () {
    const ops = yield* b.ops;
    const frozen = yield* FrozenBase.make(c, base);
    const device = yield* frozen.device(b);
    const run = uploadLora(ops, lora);
    const snap = yield* loraSnapshot(b, 1, frozen, run, lora.config);
    const snapshot = yield* Effect.promise(() =>
      time(() => run1(loraSnapshot(b, 1, frozen, run, lora.config)), 5)
    );
    const fold = yield* Effect.promise(() =>
      time(() => Effect.runPromise(mergedWeights(snap, b)), 5)
    );
    const copy = yield* Effect.promise(() =>
      time(() => Effect.runPromise(copySnapshot(b, 1, device)), 5)
    );
    return { fold, copy, snapshot };
  }));
};

/** Forward and forward+backward (LoRA grads) tokens/s for a batch of sequences. */
const throughput = async (b: BackendShape, c: ModelConfig, batch: number, seqLen: number) => {
  const base = initWeights(c, 2);
  const lora = initLora(c, {
    r: 8,
    alpha: 16,
    dropout: 0,
    targetModules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    useRslora: false,
  }, 2);
  const ids = Array.from({ length: batch * seqLen }, (_, i) => (i * 7) % c.vocabSize);
  return await run1(Effect.gen(function* () {
    const ops = yield* b.ops;
    const model = uploadModel(ops, c, base);
    const run = uploadLora(ops, lora);
    const step = (train: boolean) => () =>
      Effect.runPromise(Effect.scoped(Effect.gen(function* () {
        const o = yield* b.ops;
        const { logits, tape } = forward(o, model, { ids, batch, seqLen }, { lora: run, train });
        if (!train) return yield* o.read([o.sumSquares(logits)]);
        const grads = backward(o, tape!, logits, "lora");
        return yield* o.read([o.sumSquares(grads.values().next().value!)]);
      })) as Effect.Effect<unknown>);
    const fwd = yield* Effect.promise(() => time(step(false), 3));
    const fb = yield* Effect.promise(() => time(step(true), 3));
    return { fwd: (batch * seqLen) / (fwd / 1000), fb: (batch * seqLen) / (fb / 1000) };
  }));
};

/** Runs the model benches. */
export async function run(): Promise<Record<string, number | string>> {
  const { config } = await Effect.runPromise(loadBase(BUILTIN_MODEL_DIR));
  const large: ModelConfig = {
    ...config,
    hiddenSize: 512,
    intermediateSize: 1376,
    numLayers: 8,
    numHeads: 8,
    numKvHeads: 8,
    headDim: 64,
  };
  const out: Record<string, number | string> = {};
  const gpuScope = Scope.makeUnsafe();
  const gpu = await Effect.runPromise(
    Scope.provide(gpuScope)(webgpuBackend).pipe(Effect.catch(() => Effect.succeed(null))),
  );
  const backends: [string, BackendShape][] = [
    ["cpu", cpuBackend()],
    ...(gpu ? [["webgpu", gpu] as [string, BackendShape]] : []),
  ];
  for (const [name, b] of backends) {
    for (const r of [8, 16]) {
      const d = await foldVsCopy(b, large, r);
      out[`${name}_fold_ms_large_r${r}`] = +d.fold.toFixed(2);
      out[`${name}_copy_ms_large_r${r}`] = +d.copy.toFixed(2);
      out[`${name}_fold_vs_copy_ratio_large_r${r}`] = +(d.fold / d.copy).toFixed(3);
      out[`${name}_lora_snapshot_ms_large_r${r}`] = +d.snapshot.toFixed(2);
    }
    const d = await foldVsCopy(b, config, 8);
    out[`${name}_fold_vs_copy_ratio_default_r8`] = +(d.fold / d.copy).toFixed(3);
    const t = await throughput(b, config, 64, 10);
    out[`${name}_forward_tokens_per_s_default`] = Math.round(t.fwd);
    out[`${name}_forward_backward_tokens_per_s_default`] = Math.round(t.fb);
    const tl = await throughput(b, large, 8, 64);
    out[`${name}_forward_tokens_per_s_large`] = Math.round(tl.fwd);
    out[`${name}_forward_backward_tokens_per_s_large`] = Math.round(tl.fb);
    console.log(name, JSON.stringify(out));
  }
  out.fold_vs_copy_ratio =
    out[gpu ? "webgpu_fold_vs_copy_ratio_large_r16" : "cpu_fold_vs_copy_ratio_large_r16"];
  out.large_config =
    "hidden 512, 8 layers, intermediate 1376, 8 heads, head_dim 64, all 7 projections adapted";
  await Effect.runPromise(Scope.close(gpuScope, Exit.void));
  return out;
}

if (import.meta.main) console.log(await writeResult("model", await run()));
