/**
 * Test support: the real backends (no mocks) opened once per test file, scoped Ops per case,
 * and the error measures the property tests share.
 */
import { Effect, Exit, Scope } from "effect";
import { type BackendShape, cpuBackend, webgpuBackend } from "../../src/backend/backend.ts";
import type { Ops } from "../../src/backend/ops.ts";

/** Backends under test: WebGPU (null when no adapter), CPU f32, and the CPU f64 reference. */
export interface TestBackends {
  readonly gpu: BackendShape | null;
  readonly cpu: BackendShape;
  readonly ref: BackendShape;
}

const gpuScope = Scope.makeUnsafe();
let opened: Promise<BackendShape | null> | undefined;

/** Opens the WebGPU backend once per process (null when the runtime has no adapter). */
export const openGpu = (): Promise<BackendShape | null> => {
  opened ??= Effect.runPromise(
    Scope.provide(gpuScope)(webgpuBackend).pipe(
      Effect.catch(() => Effect.succeed(null)),
    ),
  );
  return opened;
};

/** All backends under test. */
export const testBackends = async (): Promise<TestBackends> => ({
  gpu: await openGpu(),
  cpu: cpuBackend("f32"),
  ref: cpuBackend("f64"),
});

/** True when a WebGPU adapter exists (CI: Mesa llvmpipe). GPU tests are ignored, not passed, without one. */
export const hasGpu: boolean = (await openGpu()) !== null;

/** Closes the shared GPU device (call from the last test of a file, or let the process exit). */
export const closeGpu = (): Promise<void> => Effect.runPromise(Scope.close(gpuScope, Exit.void));

/**
 * Registers the last test of a file that uses the GPU: every scope has returned its buffers
 * (nothing leaked), then the device is destroyed while the test worker is still alive (letting
 * the worker end with a live llvmpipe device crashes the process now and then).
 */
export const gpuTeardown = (): void =>
  Deno.test({
    name: "webgpu: every scope released its buffers; device closes cleanly",
    ignore: !hasGpu,
    fn: async () => {
      const ctx = (await openGpu())!.gpu!;
      await ctx.sync();
      if (ctx.outstanding !== 0) {
        throw new Error(`${ctx.outstanding} GPU buffers were never released`);
      }
      await closeGpu();
    },
  });

/** Runs `f` with Ops of `b` whose tensors are released afterwards. */
export const withOps = <A>(
  b: BackendShape,
  f: (ops: Ops) => Effect.Effect<A, unknown> | Promise<A> | A,
): Promise<A> =>
  Effect.runPromise(
    Effect.scoped(
      Effect.flatMap(b.ops, (ops) =>
        Effect.flatMap(
          Effect.promise(() => Promise.resolve(f(ops))),
          (r) => Effect.isEffect(r) ? (r as Effect.Effect<A, unknown>) : Effect.succeed(r as A),
        )),
    ) as Effect.Effect<A, unknown>,
  );

/** A host copy of `Ops.sampleCandidates` of `data` [rows, vocab] on `b`. */
export const candidatesOn = (
  b: BackendShape,
  data: Float32Array,
  shape: [number, number],
  temps: number[],
  count: number,
): Promise<Float32Array | Float64Array> =>
  withOps(b, (ops) =>
    Effect.map(
      ops.read([ops.sampleCandidates(ops.fromArray(data, shape), temps, count)]),
      (r) => r[0],
    ));

/** Normwise relative error: max|x - ref| / max(max|ref|, tiny). */
export const relError = (x: ArrayLike<number>, ref: ArrayLike<number>): number => {
  if (x.length !== ref.length) throw new Error(`length ${x.length} vs ${ref.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < x.length; i++) {
    num = Math.max(num, Math.abs(x[i] - ref[i]));
    den = Math.max(den, Math.abs(ref[i]));
  }
  return num / Math.max(den, 1e-30);
};

/**
 * Central finite differences of a scalar function of `x` (float64): the numeric gradient the
 * backward ops are checked against.
 */
export const numericGradient = (
  f: (x: Float64Array) => number,
  x: Float64Array,
  h = 1e-5,
): Float64Array => {
  const g = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const keep = x[i];
    x[i] = keep + h;
    const up = f(x);
    x[i] = keep - h;
    const down = f(x);
    x[i] = keep;
    g[i] = (up - down) / (2 * h);
  }
  return g;
};

/** Random float64 values in [-1, 1) from a seed (for values fast-check shapes). */
export const seededValues = (n: number, seed: number): Float64Array => {
  let s = (seed >>> 0) || 1;
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    out[i] = (s / 4294967296) * 2 - 1;
  }
  return out;
};
