/**
 * provideRuntimeDir (src/backend/webgpu/wayland_env.ts), in child processes since it sets the
 * process environment once: with XDG_RUNTIME_DIR unset it points it at a private folder (mode
 * 0700, owned by the user) and a WebGPU backend then opens without Mesa's Wayland warning on
 * stderr; a value already set is kept.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";

const MODULE = new URL("../src/backend/webgpu/wayland_env.ts", import.meta.url).href;
const BACKEND = new URL("../src/backend/backend.ts", import.meta.url).href;

const child = async (code: string, env: Record<string, string>, clear: string[]) => {
  const base = { ...Deno.env.toObject(), ...env };
  for (const k of clear) delete base[k];
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--quiet", code],
    env: base,
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).output();
  return {
    ok: out.success,
    stdout: new TextDecoder().decode(out.stdout).trim(),
    stderr: new TextDecoder().decode(out.stderr),
  };
};

Deno.test({
  name: "provideRuntimeDir: an unset XDG_RUNTIME_DIR becomes a private folder; a set one is kept",
  ignore: Deno.build.os !== "linux",
  fn: async () => {
    const tmp = await Deno.makeTempDir();
    try {
      const show = `import { provideRuntimeDir } from "${MODULE}";
provideRuntimeDir();
const d = Deno.env.get("XDG_RUNTIME_DIR");
console.log(JSON.stringify({ d, mode: d ? Deno.statSync(d).mode! & 0o777 : null, uid: d ? Deno.statSync(d).uid : null }));`;
      const unset = await child(show, { TMPDIR: tmp }, ["XDG_RUNTIME_DIR"]);
      assert(unset.ok, unset.stderr);
      const got = JSON.parse(unset.stdout);
      assertEquals(got.d, `${tmp}/lorafold-runtime-${Deno.uid()}`);
      assertEquals(got.mode, 0o700);
      assertEquals(got.uid, Deno.uid());
      const set = await child(show, { TMPDIR: tmp, XDG_RUNTIME_DIR: tmp }, []);
      assert(set.ok, set.stderr);
      assertEquals(JSON.parse(set.stdout).d, tmp);
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
});

Deno.test({
  name: "webgpu backend opens without XDG_RUNTIME_DIR and prints nothing on stderr",
  ignore: Deno.build.os !== "linux",
  fn: async () => {
    const code = `import { Effect } from "effect";
import { webgpuBackend } from "${BACKEND}";
const b = await Effect.runPromise(Effect.scoped(Effect.map(webgpuBackend, (b) => b.info.name))).catch(() => "none");
console.log(b);`;
    const r = await child(code, {}, ["XDG_RUNTIME_DIR"]);
    assert(r.ok, r.stderr);
    assert(["webgpu", "none"].includes(r.stdout), r.stdout);
    assertEquals(r.stderr.trim(), "");
  },
});
