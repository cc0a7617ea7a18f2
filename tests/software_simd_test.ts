/**
 * The llvmpipe SIMD width choice (src/backend/webgpu/software_simd.ts), checked in child
 * processes because Mesa reads it once per process: 512 bits on AVX-512 CPUs, a user's own
 * LP_NATIVE_VECTOR_WIDTH kept, LORAFOLD_LLVMPIPE_WIDTH=mesa leaving Mesa's default.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";

const probe = new URL("./support/simd_probe.ts", import.meta.url).pathname;

interface Probe {
  readonly choice: string;
  readonly width: string | null;
  readonly cacheDir: string | null;
  readonly description: string | null;
}

const run = async (env: Record<string, string>): Promise<Probe> => {
  const base = Deno.env.toObject();
  for (const k of ["LP_NATIVE_VECTOR_WIDTH", "LORAFOLD_LLVMPIPE_WIDTH", "MESA_SHADER_CACHE_DIR"]) {
    delete base[k];
  }
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", probe],
    env: { ...base, ...env },
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout).trim();
  assert(out.success, `probe failed: ${new TextDecoder().decode(out.stderr)}`);
  return JSON.parse(text.split("\n").at(-1)!) as Probe;
};

const avx512 = (() => {
  try {
    return /^flags\s*:.*\bavx512f\b/m.test(Deno.readTextFileSync("/proc/cpuinfo"));
  } catch {
    return false;
  }
})();
/** The "N bits" of an llvmpipe adapter description, or null for any other adapter. */
const llvmpipeBits = (d: string | null): string | null =>
  d?.match(/llvmpipe.*?(\d+) bits/)?.[1] ?? null;

Deno.test("software SIMD: 512 bits on an AVX-512 CPU, Mesa's default otherwise", async () => {
  const p = await run({});
  if (avx512) {
    assertEquals([p.choice, p.width], ["512 (avx512f)", "512"]);
    // Its own shader cache: Mesa's cache keys do not include the width.
    assert(p.cacheDir?.endsWith("/lorafold-llvmpipe-512"), `cache dir ${p.cacheDir}`);
    const bits = llvmpipeBits(p.description);
    if (bits !== null) assertEquals(bits, "512");
  } else {
    assertEquals([p.choice, p.width], ["mesa default", null]);
  }
});

Deno.test("software SIMD: a user's LP_NATIVE_VECTOR_WIDTH is kept", async () => {
  const p = await run({ LP_NATIVE_VECTOR_WIDTH: "256" });
  assertEquals([p.choice, p.width, p.cacheDir], ["user LP_NATIVE_VECTOR_WIDTH", "256", null]);
  const bits = llvmpipeBits(p.description);
  if (bits !== null) assertEquals(bits, "256");
});

Deno.test("software SIMD: LORAFOLD_LLVMPIPE_WIDTH=mesa leaves the variable unset", async () => {
  const p = await run({ LORAFOLD_LLVMPIPE_WIDTH: "mesa" });
  assertEquals([p.choice, p.width, p.cacheDir], ["mesa default", null, null]);
});
