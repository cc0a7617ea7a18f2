/**
 * SIMD width of Mesa llvmpipe, the software WebGPU adapter of machines without a GPU.
 *
 * llvmpipe compiles every shader for one vector width, 256 bits unless LP_NATIVE_VECTOR_WIDTH
 * says otherwise. On a CPU with AVX-512, 512 bits runs our register-tiled kernels 1.2x to 1.45x
 * faster (matmul at 1024³, A·B and A·Bᵀ). Mesa reads the variable once, when the
 * driver loads, so `preferWideSoftwareSimd` must run before the process's first
 * `requestAdapter`. It never overrides a value already set, does nothing on a real GPU's
 * driver (which ignores the variable), and can be turned off with LORAFOLD_LLVMPIPE_WIDTH=mesa.
 *
 * Mesa 22.3's shader disk cache does not key its entries on that width: a process of one width
 * would load machine code compiled for the other (it ran correctly in our tests, but at the
 * other width's speed, which makes measurements lie). So the 512-bit setting also gets a cache
 * folder of its own, unless MESA_SHADER_CACHE_DIR is already set.
 * @module
 */

/** What `preferWideSoftwareSimd` did, for logs and bench records. */
export type SoftwareSimdChoice =
  | "512 (avx512f)"
  | "user LP_NATIVE_VECTOR_WIDTH"
  | "mesa default"
  | "unavailable";

let choice: SoftwareSimdChoice | null = null;

interface DenoEnvLike {
  readonly env: { get(k: string): string | undefined; set(k: string, v: string): void };
  readonly build: { readonly os: string };
  readTextFileSync(path: string): string;
}

/** True when /proc/cpuinfo lists avx512f (Linux only; false when it cannot be read). */
const hasAvx512f = (deno: DenoEnvLike): boolean => {
  if (deno.build.os !== "linux") return false;
  try {
    return /^flags\s*:.*\bavx512f\b/m.test(deno.readTextFileSync("/proc/cpuinfo"));
  } catch {
    return false;
  }
};

/**
 * Asks llvmpipe for 512-bit vectors when the CPU has AVX-512F and nobody chose a width.
 * Idempotent; returns what was decided. Runtimes other than Deno are left alone.
 */
export const preferWideSoftwareSimd = (): SoftwareSimdChoice => {
  if (choice !== null) return choice;
  const deno = (globalThis as { Deno?: DenoEnvLike }).Deno;
  try {
    if (!deno) choice = "unavailable";
    else if (deno.env.get("LP_NATIVE_VECTOR_WIDTH") !== undefined) {
      choice = "user LP_NATIVE_VECTOR_WIDTH";
    } else if (deno.env.get("LORAFOLD_LLVMPIPE_WIDTH") === "mesa" || !hasAvx512f(deno)) {
      choice = "mesa default";
    } else {
      deno.env.set("LP_NATIVE_VECTOR_WIDTH", "512");
      const cacheHome = deno.env.get("XDG_CACHE_HOME") ??
        (deno.env.get("HOME") ? `${deno.env.get("HOME")}/.cache` : undefined);
      if (deno.env.get("MESA_SHADER_CACHE_DIR") === undefined && cacheHome !== undefined) {
        deno.env.set("MESA_SHADER_CACHE_DIR", `${cacheHome}/lorafold-llvmpipe-512`);
      }
      choice = "512 (avx512f)";
    }
  } catch {
    // No env permission: keep Mesa's default.
    choice = "unavailable";
  }
  return choice;
};
