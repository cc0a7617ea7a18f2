/**
 * Shared bench plumbing: machine description and writing bench/results/<topic>.json.
 * @module
 */
import { mkdir, writeFile } from "node:fs/promises";
import { cpus } from "node:os";
import { preferWideSoftwareSimd } from "../src/backend/webgpu/software_simd.ts";
import { provideRuntimeDir } from "../src/backend/webgpu/wayland_env.ts";

/**
 * Vulkan drivers (ICD manifests) installed: without one, wgpu runs WebGPU on OpenGL ES (on a
 * machine without a GPU, both are Mesa llvmpipe, with different per-command costs).
 */
const vulkanIcds = (): string => {
  const found: string[] = [];
  for (const dir of ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]) {
    try {
      for (const e of Deno.readDirSync(dir)) if (e.name.endsWith(".json")) found.push(e.name);
    } catch {
      // no such folder
    }
  }
  return found.length ? found.sort().join(", ") : "none (wgpu uses OpenGL ES)";
};

/** The adapter's subgroup sizes, "min-max" ("none" without an adapter). */
const subgroupSizes = (adapter: GPUAdapter | null): string => {
  const info = adapter?.info as
    | (GPUAdapterInfo & { subgroupMinSize?: number; subgroupMaxSize?: number })
    | undefined;
  return info ? `${info.subgroupMinSize ?? "?"}-${info.subgroupMaxSize ?? "?"}` : "none";
};

/**
 * The CPU's family / model / stepping from /proc/cpuinfo ("unknown" elsewhere): "AMD EPYC"
 * alone has named machines whose sgemm peers differ 2x (OpenBLAS on 2 cores ~181 GFLOP/s in
 * scale.json of 2026-12-05, ~390 on a family 26, Zen 5, on 2026-12-08), and every ratio to a
 * peer moves with them.
 */
const cpuFamily = (): string => {
  try {
    const text = Deno.readTextFileSync("/proc/cpuinfo");
    const field = (name: string) => new RegExp(`^${name}\\s*:\\s*(.+)$`, "m").exec(text)?.[1];
    const f = field("cpu family");
    return f === undefined ? "unknown" : `${f} / ${field("model")} / ${field("stepping")}`;
  } catch {
    return "unknown";
  }
};

/** Machine facts recorded next to every result. */
export const machine = async (): Promise<Record<string, string | number>> => {
  const simd = preferWideSoftwareSimd();
  provideRuntimeDir();
  const gpu = (globalThis.navigator as { gpu?: GPU } | undefined)?.gpu;
  const adapter = gpu ? await gpu.requestAdapter() : null;
  return {
    cpus: cpus().length,
    cpu_model: cpus()[0]?.model ?? "unknown",
    cpu_family_model_stepping: cpuFamily(),
    gpu_adapter: adapter?.info.description || "none",
    gpu_fallback_adapter: String(adapter?.info.isFallbackAdapter ?? false),
    llvmpipe_simd_width_choice: simd,
    vulkan_icds: vulkanIcds(),
    // lavapipe (Vulkan) reports one subgroup size and gets the subgroup tile matmul; llvmpipe
    // on OpenGL ES has no subgroups
    gpu_subgroup_sizes: subgroupSizes(adapter),
    lorafold_subgroups: Deno.env.get("LORAFOLD_SUBGROUPS") === "off" ? "off" : "auto",
    deno_webgpu_backend: Deno.env.get("DENO_WEBGPU_BACKEND") ?? "default",
    runtime: `deno ${Deno.version.deno}`,
    date: new Date().toISOString(),
  };
};

/** Writes results (plus machine facts) to bench/results/<topic>.json and returns the path. */
export const writeResult = async (
  topic: string,
  results: Record<string, number | string | boolean>,
): Promise<string> => {
  const dir = new URL("./results/", import.meta.url);
  await mkdir(dir, { recursive: true });
  const path = new URL(`${topic}.json`, dir);
  await writeFile(path, JSON.stringify({ ...results, ...(await machine()) }, null, 2) + "\n");
  return path.pathname;
};

/** Median of samples. */
export const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

/** Deterministic floats in [-1, 1) (an LCG), the operands of the benches. */
export const randomFloats = (n: number, seed: number): Float32Array<ArrayBuffer> => {
  const out = new Float32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s / 2 ** 31 - 1;
  }
  return out;
};

/** This process's environment without the two OpenBLAS tuning variables (for peers only). */
export const peerEnv = (): Record<string, string> => {
  const env = Deno.env.toObject();
  delete env.OPENBLAS_CORETYPE;
  delete env.OPENBLAS_L2_SIZE;
  return env;
};

const NUMPY_MATMUL = `
import json, time, numpy as np
n = 1024
a = np.random.default_rng(1).random((n, n), dtype=np.float32)
b = np.random.default_rng(2).random((n, n), dtype=np.float32)
a @ b
best = 1e9
for _ in range(20):
    t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
print(json.dumps({"gflop_s": 2 * n**3 / best / 1e9, "numpy": np.__version__}))
`;

/**
 * numpy's sgemm at n=1024 (the OpenBLAS peer) with each python3 that has numpy, the best one
 * kept: `openblas_matmul_1024_gflop_s` (null when none ran) and what each python3 gave.
 */
export const openblas = async (): Promise<
  { openblas_matmul_1024_gflop_s: number | null; openblas_numpy: string }
> => {
  const round = (x: number) => Math.round(x * 100) / 100;
  const seen: string[] = [];
  let best: number | null = null;
  for (const py of ["python3", "/usr/bin/python3"]) {
    try {
      const o = await new Deno.Command(py, {
        args: ["-c", NUMPY_MATMUL],
        stdout: "piped",
        stderr: "piped",
        env: peerEnv(),
        clearEnv: true,
      }).output();
      if (!o.success) {
        seen.push(`${py}: no numpy`);
        continue;
      }
      const r = JSON.parse(new TextDecoder().decode(o.stdout)) as {
        gflop_s: number;
        numpy: string;
      };
      seen.push(`${py} (numpy ${r.numpy}): ${round(r.gflop_s)} GFLOP/s`);
      best = Math.max(best ?? 0, r.gflop_s);
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      seen.push(`${py}: ${msg.replace(/\s+/g, " ").slice(0, 400)}`);
    }
  }
  return {
    openblas_matmul_1024_gflop_s: best === null ? null : round(best),
    openblas_numpy: seen.join("; ") + " (OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE unset)",
  };
};
