/**
 * A user's multi-turn environment through the real command line (`deno run src/cli/main.ts train
 * --environment ./env.ts` processes) on the built-in task: its observations join the episodes
 * (counted by the multi_turn/* metrics), the run finishes; a module with no usable environment
 * and bad episode limits are one clear line and a non-zero exit.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { runCli } from "./support/cli.ts";

const cli = (args: readonly string[], cwd: string) => runCli(["train", ...args], cwd);

/** After the model's first turn the environment answers "=" and lets it go on; then it ends. */
const ENV = `export default async (item) => {
  if (typeof item.prompt !== "string") throw new Error("no prompt text");
  return async ({ turn, text }) =>
    turn === 1 ? { observation: "=", done: false } : { observation: "", done: true };
};
`;

/** A class instance with a reset method works too. */
const CLASS_ENV = `class Echo {
  constructor() { this.episodes = 0; }
  async reset(_item) {
    this.episodes++;
    return async ({ turn }) => ({ observation: turn < 2 ? "+" : "", done: turn >= 2 });
  }
}
export const echo = new Echo();
`;

Deno.test("cli environment e2e: a user module's episodes train on the built-in task", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await writeFile(join(dir, "env.ts"), ENV);
    await writeFile(join(dir, "envs.ts"), CLASS_ENV);
    for (const [spec, runId] of [["./env.ts", "f"], ["./envs.ts#echo", "c"]]) {
      const r = await cli([
        "--environment",
        spec,
        "--max-turns",
        "2",
        "--max-turn-tokens",
        "4",
        "--max-completion-length",
        "12",
        "--steps",
        "2",
        "--prompts-per-step",
        "4",
        "--eval-size",
        "10",
        "--output-dir",
        dir,
        "--run-id",
        runId,
      ], dir);
      assertEquals(r.code, 0, r.stderr);
      const m = (await readFile(join(dir, runId, "metrics.jsonl"), "utf8")).trim().split("\n")
        .map((l) => JSON.parse(l) as Record<string, number>);
      assertEquals(m.length, 2);
      // some episodes took the environment's turn: more than one model turn, observation tokens
      assert(m.some((x) => x["multi_turn/turns_mean"] > 1), JSON.stringify(m));
      assert(m.some((x) => x["multi_turn/env_tokens_mean"] > 0), JSON.stringify(m));
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("cli environment e2e: no usable export, a missing module, bad limits: one line, no run", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await writeFile(join(dir, "bad.ts"), "export default 42;\n");
    for (
      const [args, mention] of [
        [["--environment", "./bad.ts"], "environment ./bad.ts: its default export is neither"],
        [["--environment", "./none.ts"], "environment ./none.ts: cannot import"],
        [
          ["--environment", "./bad.ts#nothing"],
          'environment ./bad.ts#nothing: has no export "nothing"',
        ],
        [["--max-turns", "0"], "max-turns"],
      ] as const
    ) {
      const r = await cli([...args, "--steps", "1", "--output-dir", dir, "--run-id", "x"], dir);
      assert(r.code !== 0, `${args.join(" ")}: exit 0`);
      assert((r.stderr + r.stdout).includes(mention), `${args.join(" ")}:\n${r.stderr}`);
    }
    assertEquals((await readdir(dir)).sort(), ["bad.ts"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
