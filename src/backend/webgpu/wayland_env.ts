/**
 * A runtime folder for Mesa's Vulkan driver on machines without a desktop session.
 *
 * When lavapipe (llvmpipe's Vulkan driver) loads, its window-system layer asks libwayland for a
 * display, and libwayland prints "error: XDG_RUNTIME_DIR is invalid or not set in the
 * environment." twice when that variable is unset (containers, CI, ssh). The lines are harmless
 * but land in every lorafold command's stderr, between its own messages (a failed run must
 * print one line). `provideRuntimeDir` points the variable at a private folder
 * (`<tmp>/lorafold-runtime-<uid>`, mode 0700) before the process's first `requestAdapter`;
 * there is no Wayland socket in it, so the display lookup fails quietly. A value already set is
 * never changed; off Linux, or without env or file permission, it does nothing.
 * @module
 */

let done = false;

interface DenoLike {
  readonly env: { get(k: string): string | undefined; set(k: string, v: string): void };
  readonly build: { readonly os: string };
  uid(): number | null;
  mkdirSync(path: string, options?: { recursive?: boolean; mode?: number }): void;
  statSync(path: string): { isDirectory: boolean; uid: number | null };
}

/** Sets XDG_RUNTIME_DIR to a private folder when it is unset (Linux, Deno); idempotent. */
export const provideRuntimeDir = (): void => {
  if (done) return;
  done = true;
  const deno = (globalThis as { Deno?: DenoLike }).Deno;
  try {
    if (!deno || deno.build.os !== "linux" || deno.env.get("XDG_RUNTIME_DIR") !== undefined) {
      return;
    }
    const uid = deno.uid();
    const dir = `${deno.env.get("TMPDIR") ?? "/tmp"}/lorafold-runtime-${uid ?? "user"}`;
    try {
      deno.mkdirSync(dir, { mode: 0o700 });
    } catch {
      // it exists already: used only if it is ours
    }
    const st = deno.statSync(dir);
    if (st.isDirectory && (uid === null || st.uid === uid)) deno.env.set("XDG_RUNTIME_DIR", dir);
  } catch {
    // no permission: Mesa may print its warning
  }
};
