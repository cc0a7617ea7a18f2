/**
 * Bun runs the same npm-only code: the user-composed example pipeline (CPU backend, model, LoRA,
 * snapshots, GRPO update, local engine) gives bit-identical rewards under Bun and under Deno.
 */
import { deepStrictEqual as assertEquals } from "node:assert/strict";
import { Effect } from "effect";
import { runExample } from "../examples/dynamic_sampling.ts";

Deno.test("bun: the example pipeline gives the same results as under Deno", async () => {
  const script = new URL("./support/runtime_example.ts", import.meta.url).pathname;
  const out = await new Deno.Command("npx", {
    args: ["-y", "bun@1.4.4", "run", script],
    cwd: new URL("..", import.meta.url).pathname,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stdout = new TextDecoder().decode(out.stdout).trim();
  if (!out.success) throw new Error(`bun failed: ${new TextDecoder().decode(out.stderr)}`);
  const underBun = JSON.parse(stdout.split("\n").at(-1)!);
  const underDeno = await Effect.runPromise(runExample(3));
  assertEquals(underBun, JSON.parse(JSON.stringify(underDeno)));
});
