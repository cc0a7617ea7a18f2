/**
 * Loads `src/kernels.wgsl` and splits it into named kernels. The file starts with a shared
 * prelude; each kernel begins at a line `//! kernel <name>` and runs to the next such line.
 * Each kernel compiles as prelude + its own section, so kernels may reuse binding numbers.
 * @module
 */
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";

const KERNELS_URL = new URL("../../kernels.wgsl", import.meta.url);

/** Parses kernel sections: name -> full WGSL source (prelude included). */
export const parseKernels = (text: string): Map<string, string> => {
  const out = new Map<string, string>();
  const parts = text.split(/^\/\/! kernel /m);
  const prelude = parts[0];
  for (const part of parts.slice(1)) {
    const nl = part.indexOf("\n");
    const name = part.slice(0, nl).trim();
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) throw new Error(`bad kernel name "${name}"`);
    if (out.has(name)) throw new Error(`kernel "${name}" defined twice`);
    out.set(name, `${prelude}\n${part.slice(nl + 1)}`);
  }
  return out;
};

/** Reads kernels.wgsl from disk (file: URL) or over HTTP (package served from a registry). */
export const loadKernels = async (): Promise<Map<string, string>> => {
  const text = KERNELS_URL.protocol === "file:"
    ? await readFile(fileURLToPath(KERNELS_URL), "utf8")
    : await (await fetch(KERNELS_URL)).text();
  return parseKernels(text);
};
