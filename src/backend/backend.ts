/**
 * The Backend service: where tensors live and ops run. Implementations: the CPU reference and
 * WebGPU (src/backend/webgpu/*.wgsl). Selection: WebGPU when an adapter exists, CPU otherwise; override
 * with LORAFOLD_BACKEND=cpu|webgpu|auto. The choice is logged once.
 * @module
 */

import { Context, Effect, Layer } from "effect";
import type { Scope } from "effect";
import { messageOf } from "../base/tagged_error.ts";
import { makeCpuOps } from "./cpu/ops.ts";
import type { CpuPrecision } from "./cpu/scope.ts";
import { BackendError, type BackendInfo, type Ops } from "./ops.ts";
import { GpuContext } from "./webgpu/context.ts";
import { loadKernels } from "./webgpu/kernels.ts";
import { subgroupLanesSupported } from "./webgpu/matmul_subgroup.ts";
import { makeGpuOps } from "./webgpu/ops.ts";
import { preferWideSoftwareSimd } from "./webgpu/software_simd.ts";
import { provideRuntimeDir } from "./webgpu/wayland_env.ts";

/** Backend shape: static info plus a way to open scoped Ops. */
export interface BackendShape {
  readonly info: BackendInfo;
  /** Ops whose tensors are released when the enclosing Scope closes. */
  readonly ops: Effect.Effect<Ops, never, Scope.Scope>;
  /** Waits for all submitted device work (for timing); a no-op on the CPU. */
  readonly sync: Effect.Effect<void, BackendError>;
  /** The GPU context, when the backend is WebGPU (counters for benches and tests). */
  readonly gpu: GpuContext | null;
}

/** The Backend service key. */
export const Backend: Context.Key<BackendShape, BackendShape> = Context.Service<BackendShape>(
  "lorafold/Backend",
);

export { BackendError, type BackendOperation } from "./ops.ts";

/** Which backend to use. */
export type BackendChoice = "auto" | "cpu" | "webgpu";

/** The CPU reference backend (f64 precision serves tests as a float64 reference). */
export const cpuBackend = (precision: CpuPrecision = "f32"): BackendShape => {
  const ops = makeCpuOps(precision).ops.info;
  return {
    info: ops,
    ops: Effect.acquireRelease(
      Effect.sync(() => makeCpuOps(precision)),
      ({ scope }) => Effect.sync(() => scope.release()),
    ).pipe(Effect.map(({ ops }) => ops)),
    sync: Effect.void,
    gpu: null,
  };
};

/**
 * navigator.gpu, after the software adapter's SIMD width is chosen (see software_simd.ts) and a
 * runtime folder is there for Mesa's Vulkan driver (see wayland_env.ts).
 */
const gpuApi = (): GPU | undefined => {
  preferWideSoftwareSimd();
  provideRuntimeDir();
  return (globalThis.navigator as { gpu?: GPU } | undefined)?.gpu;
};

/** An environment variable under Node/Bun (process.env) or Deno; undefined without env permission. */
const envValue = (name: string): string | undefined => {
  try {
    return (globalThis as { process?: { env: Record<string, string | undefined> } }).process?.env[
      name
    ] ?? (globalThis as { Deno?: { env: { get(k: string): string | undefined } } }).Deno?.env.get(
      name,
    );
  } catch {
    return undefined;
  }
};

/**
 * The subgroup size a software adapter runs every subgroup at (its SIMD width: min = max),
 * when the subgroup tile matmul supports it and LORAFOLD_SUBGROUPS is not "off"; else null.
 * Real GPUs take the GPU kernel variant (matmul_gpu.ts) instead.
 */
const fixedSubgroupLanes = (info: GPUAdapterInfo, fallback: boolean): number | null => {
  const { subgroupMinSize: min, subgroupMaxSize: max } = info as GPUAdapterInfo & {
    subgroupMinSize?: number;
    subgroupMaxSize?: number;
  };
  if (!fallback || min === undefined || min !== max || !subgroupLanesSupported(min)) return null;
  return envValue("LORAFOLD_SUBGROUPS") === "off" ? null : min;
};

/** Opens the WebGPU device with the adapter's raised limits; released with the scope. */
export const webgpuBackend: Effect.Effect<BackendShape, BackendError, Scope.Scope> = Effect
  .acquireRelease(
    Effect.tryPromise({
      try: async () => {
        const gpu = gpuApi();
        if (!gpu) throw new Error("navigator.gpu is not available in this runtime");
        const adapter = await gpu.requestAdapter({ powerPreference: "high-performance" });
        if (!adapter) throw new Error("no WebGPU adapter");
        const l = adapter.limits;
        const requiredLimits = {
          maxBufferSize: l.maxBufferSize,
          maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
          maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
          maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
          maxComputeWorkgroupSizeX: l.maxComputeWorkgroupSizeX,
          maxComputeWorkgroupSizeY: l.maxComputeWorkgroupSizeY,
          maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
          // lavapipe offers 16,384 (the default is 8,192): Qwen2.5-0.5B's stacked gate/up
          // weight texture is 9,728 rows high, and a tile product's row chunk is this limit
          maxTextureDimension2D: l.maxTextureDimension2D,
        };
        const info = adapter.info;
        const fallback = info.isFallbackAdapter ?? false;
        const lanes = fixedSubgroupLanes(info, fallback);
        // Deno 2.9 leaves "subgroups" out of adapter.features even where requestDevice grants
        // it (lavapipe), so it is asked for and the device opened without it if refused.
        const withSubgroups = lanes === null ? null : await adapter
          .requestDevice({ requiredFeatures: ["subgroups" as GPUFeatureName], requiredLimits })
          .catch(() => null);
        const device = withSubgroups ?? await adapter.requestDevice({ requiredLimits });
        const description = info.description || `${info.vendor} ${info.device}`.trim();
        return new GpuContext(
          device,
          { name: "webgpu", description, fallback },
          await loadKernels(),
          withSubgroups ? lanes : null,
        );
      },
      catch: (e) => new BackendError({ operation: "setup", reason: messageOf(e) }),
    }),
    (ctx) => Effect.sync(() => ctx.destroy()),
  ).pipe(Effect.map((ctx): BackendShape => ({
    info: ctx.info,
    ops: Effect.acquireRelease(
      Effect.sync(() => makeGpuOps(ctx)),
      ({ scope }) => Effect.sync(() => scope.release()),
    ).pipe(Effect.map(({ ops }) => ops)),
    sync: Effect.tryPromise({
      try: () => ctx.sync(),
      catch: (e) => new BackendError({ operation: "sync", reason: messageOf(e) }),
    }),
    gpu: ctx,
  })));

/** Reads LORAFOLD_BACKEND (auto when unset); an unknown value is an error naming the choices. */
export const backendChoiceFromEnv = (): Effect.Effect<BackendChoice, BackendError> =>
  Effect.suspend(() => {
    const v = envValue("LORAFOLD_BACKEND");
    const c = (v ?? "auto").trim().toLowerCase();
    return c === "auto" || c === "cpu" || c === "webgpu"
      ? Effect.succeed(c as BackendChoice)
      : Effect.fail(
        new BackendError({
          operation: "config",
          reason: `LORAFOLD_BACKEND="${v}": expected one of auto, cpu, webgpu`,
        }),
      );
  });

/** Chooses a backend: `webgpu` fails without an adapter; `auto` falls back to the CPU. */
export const selectBackend = (
  choice: BackendChoice,
): Effect.Effect<BackendShape, BackendError, Scope.Scope> => {
  const chosen = choice === "cpu"
    ? Effect.succeed(cpuBackend())
    : choice === "webgpu"
    ? webgpuBackend
    : webgpuBackend.pipe(
      Effect.catch((e) =>
        Effect.logWarning(`WebGPU unavailable (${e.message}); using the CPU backend`).pipe(
          Effect.as(cpuBackend()),
        )
      ),
    );
  return chosen.pipe(
    Effect.tap((b) => Effect.logInfo(`backend: ${b.info.name} — ${b.info.description}`)),
  );
};

/** Layer providing the Backend chosen by `choice` (default: from LORAFOLD_BACKEND). */
export const BackendLive = (choice?: BackendChoice): Layer.Layer<BackendShape, BackendError> =>
  Layer.effect(
    Backend,
    Effect.flatMap(
      choice ? Effect.succeed(choice) : backendChoiceFromEnv(),
      selectBackend,
    ),
  );
