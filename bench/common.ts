/**
 * Shared bench plumbing: machine description and writing bench/results/<topic>.json.
 * @module
 */
import { mkdir, writeFile } from "node:fs/promises";
import { cpus } from "node:os";
import { preferWideSoftwareSimd } from "../src/backend/webgpu/software_simd.ts";

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

/** Machine facts recorded next to every result. */
export const machine = async (): Promise<Record<string, string | number>> => {
  const simd = preferWideSoftwareSimd();
  const gpu = (globalThis.navigator as { gpu?: GPU } | undefined)?.gpu;
  const adapter = gpu ? await gpu.requestAdapter() : null;
  return {
    cpus: cpus().length,
    cpu_model: cpus()[0]?.model ?? "unknown",
    gpu_adapter: adapter?.info.description || "none",
    gpu_fallback_adapter: String(adapter?.info.isFallbackAdapter ?? false),
    llvmpipe_simd_width_choice: simd,
    vulkan_icds: vulkanIcds(),
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
