// deno-lint-ignore-file no-explicit-any
/**
 * Where a real-size step's device time goes, kernel by kernel: SmolLM2-135M (or Qwen2.5-0.5B)
 * from its published config with random bf16 weights, LoRA r=16 on all 7 projections, as
 * bench/scale.ts builds it, then one workload run REPS times (default 2); the last run is
 * profiled. A development tool, not a benchmark: it writes no results file, and it reaches into
 * GpuContext's private members (each dispatch gets a compute pass of its own with timestamp
 * writes, the device is opened with `timestamp-query`), which adds ~50 us per dispatch.
 *
 * Prints per kernel (with its pipeline constants; SHAPES=1 adds the grid) the summed device
 * time and calls, TOP=N rows; then the device-idle gaps between two timed dispatches by what
 * was encoded between them (copies, clears, texture copies, batch flushes): host work, queue
 * copies and per-submit costs. NOPROF=1 times the runs without the profiler.
 *
 *   deno run -A bench/kernel_profile.ts train | logprobs | snapshot | gen [batch prompt new]
 *   MODEL=qwen25_05b GC=1 deno run -A bench/kernel_profile.ts train   (gradient checkpointing)
 * @module
 */
import { Effect, Scope } from "effect";
import {
  generate,
  type GenerationRequest,
  initLora,
  parseHfConfig,
  Rng,
  uploadLora,
  webgpuBackend,
} from "../mod.ts";
import { initWeights16, LORA, loraPolicy, MODELS } from "./scale.ts";
import { meanNllLoss } from "../src/train/policy.ts";
import { GpuContext } from "../src/backend/webgpu/context.ts";

const env = (k: string): string | undefined => Deno.env.get(k);
const PROFILE = env("NOPROF") !== "1";
const QUERIES = 4096;

// ---- the profiler: patches of GpuContext (private members, by name) ------------------------
if (PROFILE) {
  const request = GPUAdapter.prototype.requestDevice;
  GPUAdapter.prototype.requestDevice = function (desc?: GPUDeviceDescriptor) {
    const features = [...(desc?.requiredFeatures ?? []), "timestamp-query" as GPUFeatureName];
    return request.call(this, { ...desc, requiredFeatures: features });
  };
}
interface QuerySet {
  readonly set: GPUQuerySet;
  readonly names: string[];
  /** What was encoded between dispatch i - 1 and i. */
  readonly between: string[][];
}
const sets: QuerySet[] = [];
let active = false;
let device: GPUDevice | null = null;
let between: string[] = [];
const P = GpuContext.prototype as any;
const dispatch = P.dispatchResources;
P.dispatchResources = function (
  kernel: string,
  res: unknown,
  groups: readonly number[],
  params: unknown,
  constants?: Record<string, number>,
) {
  if (!active || !PROFILE) return dispatch.call(this, kernel, res, groups, params, constants);
  if ((groups[0] ?? 0) === 0 || (groups[1] ?? 1) === 0 || (groups[2] ?? 1) === 0) return;
  device = this.device;
  let cur = sets[sets.length - 1];
  if (!cur || cur.names.length * 2 >= QUERIES) {
    cur = {
      set: this.device.createQuerySet({ type: "timestamp", count: QUERIES }),
      names: [],
      between: [],
    };
    sets.push(cur);
  }
  // the context's own flush rule first, so the pass below is not split by it
  if (this.slots >= 256 || this.dispatches >= this.batchLimit) this.flush();
  this.endPass();
  const i = cur.names.length;
  this.pass = this.enc().beginComputePass({
    timestampWrites: {
      querySet: cur.set,
      beginningOfPassWriteIndex: 2 * i,
      endOfPassWriteIndex: 2 * i + 1,
    },
  });
  const shape = env("SHAPES") ? ` ${groups[0]}x${groups[1] ?? 1}x${groups[2] ?? 1}` : "";
  cur.names.push(kernel + (constants ? JSON.stringify(constants) : "") + shape);
  cur.between.push(between);
  between = [];
  dispatch.call(this, kernel, res, groups, params, constants);
  this.endPass();
};
for (const name of ["copy", "clear", "copyToTexture", "flush"]) {
  const original = P[name];
  P[name] = function (...args: unknown[]) {
    if (active) between.push(name);
    return original.apply(this, args);
  };
}

const add = (m: Map<string, { ns: number; n: number }>, key: string, ns: number) => {
  const r = m.get(key) ?? { ns: 0, n: 0 };
  r.ns += ns;
  r.n++;
  m.set(key, r);
};

/** Resolves every query set; prints kernels by device time, then gaps by what came between. */
const report = async (label: string, wallMs: number) => {
  const kernels = new Map<string, { ns: number; n: number }>();
  const gaps = new Map<string, { ns: number; n: number }>();
  for (const s of sets.splice(0)) {
    const n = s.names.length * 2;
    const resolved = device!.createBuffer({
      size: n * 8,
      usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
    });
    const staging = device!.createBuffer({
      size: n * 8,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    const e = device!.createCommandEncoder();
    e.resolveQuerySet(s.set, 0, n, resolved, 0);
    e.copyBufferToBuffer(resolved, 0, staging, 0, n * 8);
    device!.queue.submit([e.finish()]);
    await staging.mapAsync(GPUMapMode.READ);
    const t = new BigUint64Array(staging.getMappedRange());
    for (let i = 0; i < s.names.length; i++) {
      add(kernels, s.names[i], Number(t[2 * i + 1] - t[2 * i]));
      if (i === 0) continue;
      const gap = Number(t[2 * i] - t[2 * i - 1]);
      const kinds = [...new Set(s.between[i])].sort().join("+") || "nothing";
      // a gap across a resolved set or a clock jump is not a gap
      if (gap > 0 && gap < 1e10) add(gaps, kinds, gap);
    }
    staging.unmap();
    for (const b of [resolved, staging, s.set]) b.destroy();
  }
  const byTime = (m: Map<string, { ns: number; n: number }>) =>
    [...m.entries()].sort((a, b) => b[1].ns - a[1].ns);
  const all = byTime(kernels);
  const total = all.reduce((a, [, r]) => a + r.ns, 0);
  const calls = all.reduce((a, [, r]) => a + r.n, 0);
  const ms = (ns: number) => (ns / 1e6).toFixed(1).padStart(9);
  console.log(
    `== ${label}: wall ${wallMs.toFixed(0)} ms, device ${
      (total / 1e6).toFixed(0)
    } ms in ${calls} dispatches`,
  );
  for (const [k, r] of all.slice(0, Number(env("TOP") ?? 30))) {
    console.log(`${ms(r.ns)} ms ${String(r.n).padStart(6)}  ${k}`);
  }
  console.log("-- device idle between two dispatches, by what was encoded between them");
  for (const [k, r] of byTime(gaps)) console.log(`${ms(r.ns)} ms ${String(r.n).padStart(6)}  ${k}`);
};

// ---- the workload ----------------------------------------------------------------------------
const mode = Deno.args[0] ?? "train";
const model = (env("MODEL") ?? "smollm2_135m") as keyof typeof MODELS;
const scope = Scope.makeUnsafe();
const inScope = <A, E>(e: Effect.Effect<A, E, Scope.Scope>) =>
  Effect.runPromise(Scope.provide(scope)(e));
const config = await Effect.runPromise(parseHfConfig(MODELS[model].hf));
const backend = await inScope(webgpuBackend);
const policy = await inScope(
  loraPolicy(backend, config, initWeights16(config, 1, "bf16"), env("GC") === "1"),
);
const rng = new Rng(11);
const ids = (n: number) => Array.from({ length: n }, () => rng.int(config.vocabSize));
const batch = Array.from({ length: 8 }, () => ({ prompt: ids(64), completion: ids(64) }));
let work: () => Promise<unknown>;
if (mode === "train") work = () => Effect.runPromise(policy.step(batch, 1, meanNllLoss));
else if (mode === "logprobs") work = () => Effect.runPromise(policy.logProbs(batch, 1));
else if (mode === "snapshot") work = () => Effect.runPromise(policy.snapshot());
else if (mode === "gen") {
  const ops = await inScope(backend.ops);
  const lora = uploadLora(ops, initLora(config, LORA, 1));
  const [b, p, n] = [1, 2, 3].map((i, j) => Number(Deno.args[i] ?? [64, 64, 32][j]));
  const requests = (): GenerationRequest[] =>
    Array.from({ length: b }, () => ({
      prompt: ids(p),
      maxTokens: n,
      stopTokenIds: [],
      seed: 0,
      temperature: 0,
      topP: 1,
      topK: 0,
    }));
  work = () => Effect.runPromise(generate(backend, policy.baseDevice, requests(), lora));
} else throw new Error(`unknown workload ${mode}: train, logprobs, snapshot or gen`);
const reps = Number(env("REPS") ?? 2);
for (let r = 0; r < reps; r++) {
  active = r === reps - 1;
  const t = performance.now();
  await work();
  const wall = performance.now() - t;
  if (active && PROFILE) await report(`${mode} run ${r + 1} of ${reps}`, wall);
  else console.log(`${mode} run ${r + 1} of ${reps}: wall ${wall.toFixed(0)} ms`);
}
Deno.exit(0);
