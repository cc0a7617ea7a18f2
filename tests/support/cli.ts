/** Test support: runs the real command line (`deno run -A src/cli/main.ts ...`) as a process. */

const MAIN = new URL("../../src/cli/main.ts", import.meta.url).pathname;

/** What a command-line process printed and its exit code. */
export interface CliResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs `main.ts <args>` in `cwd` on the CPU backend, without colours. */
export const runCli = async (args: readonly string[], cwd?: string): Promise<CliResult> => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
    cwd,
    env: { NO_COLOR: "1", LORAFOLD_BACKEND: "cpu" },
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
};
