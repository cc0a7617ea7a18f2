/**
 * Child process for tests/software_simd_test.ts: prints what preferWideSoftwareSimd chose, the
 * resulting LP_NATIVE_VECTOR_WIDTH and the adapter's description, as one JSON line.
 * @module
 */
import { preferWideSoftwareSimd } from "../../src/backend/webgpu/software_simd.ts";

const choice = preferWideSoftwareSimd();
const adapter = await navigator.gpu?.requestAdapter();
console.log(JSON.stringify({
  choice,
  width: Deno.env.get("LP_NATIVE_VECTOR_WIDTH") ?? null,
  cacheDir: Deno.env.get("MESA_SHADER_CACHE_DIR") ?? null,
  description: adapter?.info.description ?? null,
}));
