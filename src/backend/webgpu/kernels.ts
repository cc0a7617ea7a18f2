/**
 * Loads the WGSL kernels and splits them into named kernels. Each kernel family has its own file
 * beside its host module (`attention.wgsl`, `elementwise.wgsl`, `layers.wgsl`, `matmul.wgsl`);
 * `common.wgsl` is the shared include (structs, helpers). In a family file each kernel begins at
 * a line `//! kernel <name>` and runs to the next such line; text before the first marker may
 * only be comments. Each kernel compiles as the include + its own section, so kernels may reuse
 * binding numbers. Kernel names are unique across all files.
 * @module
 */
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";

/** The shared include, prepended to every kernel. */
const COMMON_URL = new URL("./common.wgsl", import.meta.url);
/** One file per kernel family, beside its host module. */
const FAMILY_URLS: readonly URL[] = [
  "activations",
  "attention",
  "elementwise",
  "layers",
  "matmul",
  "matmul_gpu",
].map((f) => new URL(`./${f}.wgsl`, import.meta.url));

/**
 * Parses the kernel sections of one family file into `out`: name -> full WGSL source (`common`
 * prepended). Throws on a bad or duplicate name, or on code before the first kernel.
 */
export const parseKernels = (
  text: string,
  common: string,
  file = "kernels",
  out: Map<string, string> = new Map(),
): Map<string, string> => {
  const parts = text.split(/^\/\/! kernel /m);
  const header = parts[0].split("\n").filter((l) => l.trim() !== "" && !l.startsWith("//"));
  if (header.length > 0) {
    throw new Error(`${file}: code before the first kernel: "${header[0]}" (put it in common)`);
  }
  for (const part of parts.slice(1)) {
    const nl = part.indexOf("\n");
    const name = part.slice(0, nl).trim();
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) {
      throw new Error(`${file}: bad kernel name "${name}"`);
    }
    if (out.has(name)) throw new Error(`${file}: kernel "${name}" defined twice`);
    out.set(name, `${common}\n${part.slice(nl + 1)}`);
  }
  return out;
};

/**
 * The attention kernels keep per-invocation vectors of at most MAXD4 vec4s (head dim 128), a
 * compile-time size; `<name>_wide` variants with room for head dim 256 (Gemma) are derived from
 * the same source, so that smaller head dims keep their small (fast to compile) state.
 */
export const WIDE_ATTENTION_KERNELS: readonly string[] = [
  "attn_fwd",
  "attn_fwd_combine",
  "attn_bwd_dq",
  "attn_bwd_dkdv",
];

const addWideAttention = (out: Map<string, string>): void => {
  for (const name of WIDE_ATTENTION_KERNELS) {
    const src = out.get(name);
    const narrow = "const MAXD4: u32 = 32u;";
    if (!src || !src.includes(narrow)) throw new Error(`attention.wgsl: ${name} lacks "${narrow}"`);
    out.set(`${name}_wide`, src.replace(narrow, "const MAXD4: u32 = 64u;"));
  }
};

/**
 * sample_cand_wg4: sample_cand_wg for rows of a multiple of 4 logits, which binds them as vec4s
 * and loads each group of 4 at once (its text between the `//! ld4` markers swapped).
 */
const addVec4Candidates = (out: Map<string, string>): void => {
  const src = out.get("sample_cand_wg");
  const at = src?.match(/\/\/! ld4 begin\n[^]*?\/\/! ld4 end\n/);
  const binding = "var<storage, read> logits: array<f32>;";
  if (!src || !at || !src.includes(binding)) {
    throw new Error("layers.wgsl: sample_cand_wg lacks its ld4 markers or logits binding");
  }
  const ld4 = `fn ld4(base: u32, g: u32, v: u32) -> vec4<f32> { return logits[base / 4u + g]; }\n`;
  out.set(
    "sample_cand_wg4",
    src.replace(at[0], ld4).replace(binding, "var<storage, read> logits: array<vec4<f32>>;"),
  );
};

/** Reads a file next to this module from disk (file: URL) or over HTTP (served package). */
const readText = async (url: URL): Promise<string> =>
  url.protocol === "file:"
    ? await readFile(fileURLToPath(url), "utf8")
    : await (await fetch(url)).text();

/** Reads the include and every family file; name -> full WGSL source. */
export const loadKernels = async (): Promise<Map<string, string>> => {
  const [common, ...families] = await Promise.all([COMMON_URL, ...FAMILY_URLS].map(readText));
  const out = new Map<string, string>();
  families.forEach((text, i) => {
    const file = FAMILY_URLS[i].pathname.split("/").pop()!;
    parseKernels(text, common, file, out);
  });
  addWideAttention(out);
  addVec4Candidates(out);
  return out;
};
