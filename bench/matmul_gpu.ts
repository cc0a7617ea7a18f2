/**
 * The two WebGPU matmul variants side by side (GFLOP/s = 2·M·N·K / time): the texture kernels
 * tuned for a software adapter (`software`, matmul.ts) and the workgroup-memory tiling written
 * for real GPUs (`gpu`, matmul_gpu.ts), each forced through `matmulVariant.force`. Shapes:
 * squares n = 1024, 2048, 4096 (f32) and the SmolLM2-135M projections of a 1024-row batch,
 * x [1024, in]·W [out, in]ᵀ with W in f32 and bf16 (a frozen base weight).
 *
 * Timing as bench/matmul.ts: warm-up products (pipeline compile), then batches of products with
 * one host sync each, best batch kept. On a software adapter (llvmpipe) only the shapes up to
 * 1024 run, with fewer rounds (pass --all for every shape): the machine is shared and the GPU
 * variant's barriers make it slow there, as expected. The result records the adapter and
 * whether it is a software one.
 *
 * Run: deno run -A bench/matmul_gpu.ts [--all] (writes bench/results/matmul_gpu.json).
 * @module
 */
import { Effect, Exit, Scope } from "effect";
import { type BackendShape, webgpuBackend } from "../src/backend/backend.ts";
import type { MatmulOptions, Ops } from "../src/backend/ops.ts";
import type { DType } from "../src/backend/tensor.ts";
import { type MatmulVariant, matmulVariant } from "../src/backend/webgpu/matmul_gpu.ts";
import { randomFloats, writeResult } from "./common.ts";

interface Shape {
  readonly key: string;
  readonly m: number;
  readonly k: number;
  readonly n: number;
  readonly opts?: MatmulOptions;
  readonly wDtype: DType;
  /** Runs on a software adapter without --all. */
  readonly small: boolean;
}

/** SmolLM2-135M: hidden 576, 9 query heads and 3 KV heads of 64, MLP 1536. */
const SMOL: readonly [string, number, number][] = [
  ["q_o_proj", 576, 576],
  ["k_v_proj", 576, 192],
  ["gate_up_proj", 576, 1536],
  ["down_proj", 1536, 576],
];

const SHAPES: readonly Shape[] = [
  ...[1024, 2048, 4096].map((s) => ({
    key: `${s}`,
    m: s,
    k: s,
    n: s,
    wDtype: "f32" as DType,
    small: s <= 1024,
  })),
  ...SMOL.flatMap(([name, k, n]) =>
    (["f32", "bf16"] as const).map((wDtype) => ({
      key: `smollm2_${name}_1024x${k}x${n}_${wDtype}`,
      m: 1024,
      k,
      n,
      opts: { transB: true },
      wDtype,
      small: true,
    }))
  ),
];

const scoped = <A>(b: BackendShape, f: (ops: Ops) => Promise<A>): Promise<A> =>
  Effect.runPromise(Effect.scoped(Effect.flatMap(b.ops, (ops) => Effect.promise(() => f(ops)))));

const sync = (b: BackendShape): Promise<void> => Effect.runPromise(b.sync);

/** Best GFLOP/s of batched products of `s` with `variant` forced. */
const measure = async (
  b: BackendShape,
  s: Shape,
  variant: MatmulVariant,
  rounds: number,
): Promise<number> => {
  const flops = 2 * s.m * s.n * s.k;
  const aShape = s.opts?.transA ? [s.k, s.m] : [s.m, s.k];
  const bShape = s.opts?.transB ? [s.n, s.k] : [s.k, s.n];
  matmulVariant.force = variant;
  try {
    return await scoped(b, async (ops) => {
      const a = ops.fromArray(randomFloats(s.m * s.k, 1), aShape);
      const w = ops.fromArray(randomFloats(s.k * s.n, 2), bShape, s.wDtype);
      // warm-up (compile), then one timed product to size the batches
      ops.matmul(a, w, s.opts);
      await sync(b);
      let t = performance.now();
      ops.matmul(a, w, s.opts);
      await sync(b);
      const first = performance.now() - t;
      const reps = Math.max(1, Math.min(64, Math.round(300 / Math.max(first, 0.05))));
      let best = Infinity;
      for (let round = 0; round < rounds; round++) {
        t = performance.now();
        for (let i = 0; i < reps; i++) {
          await scoped(b, (inner) => Promise.resolve(inner.matmul(a, w, s.opts)));
        }
        await sync(b);
        best = Math.min(best, (performance.now() - t) / reps);
      }
      return flops / best / 1e6;
    });
  } finally {
    matmulVariant.force = undefined;
  }
};

const round = (x: number): number => Math.round(x * 100) / 100;

/** Measures both variants on every shape the adapter runs. */
export async function run(all = false): Promise<Record<string, number | string | boolean>> {
  const results: Record<string, number | string | boolean> = {};
  const gpuScope = Scope.makeUnsafe();
  const gpu = await Effect.runPromise(Scope.provide(gpuScope)(webgpuBackend));
  try {
    const software = gpu.info.fallback;
    results.adapter = gpu.info.description;
    results.software_adapter = software;
    results.note = software
      ? "llvmpipe (software adapter): the gpu variant is written for real GPUs and is expected " +
        "to be slower here" + (all ? "" : "; shapes above 1024 skipped (pass --all)")
      : "hardware adapter";
    for (const s of SHAPES) {
      if (software && !all && !s.small) continue;
      for (const v of ["software", "gpu"] as const) {
        const g = round(await measure(gpu, s, v, software ? 3 : 6));
        results[`${v}_matmul_${s.key}_gflop_s`] = g;
        console.log(`${v} ${s.key}: ${g} GFLOP/s`);
      }
      results[`gpu_vs_software_${s.key}_ratio`] = round(
        (results[`gpu_matmul_${s.key}_gflop_s`] as number) /
          (results[`software_matmul_${s.key}_gflop_s`] as number),
      );
    }
    results.load_average_1min = round(Deno.loadavg()[0]);
  } finally {
    await Effect.runPromise(Scope.close(gpuScope, Exit.void));
  }
  return results;
}

if (import.meta.main) {
  const results = await run(Deno.args.includes("--all"));
  console.table(results);
  console.log(await writeResult("matmul_gpu", results));
}
