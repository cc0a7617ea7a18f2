/**
 * The layering of src/: each folder is one layer, and every import points down (to the same
 * folder or to a lower layer). Walks every .ts file of src/, reads its static, re-export and
 * dynamic imports, and fails on an import that points up, on a cycle between folders, on a
 * folder missing from the order below, and on a module outside any folder.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { dirname, join, normalize, relative } from "node:path";
import { fileURLToPath } from "node:url";

/** The layers, lowest first. */
export const LAYERS: readonly string[] = [
  "base", // error helpers and option schemas: effect only
  "io", // safetensors, checkpoint files, plots
  "tokenizer", // text <-> token ids
  "backend", // tensors and ops: CPU reference, WebGPU kernels
  "model", // decoder forward/backward, generation, checkpoint loading
  "lora", // adapters and PEFT directories
  "snapshot", // immutable weight snapshots and their export
  "grpo", // GRPO math on the host
  "train", // trainable state: Policy, optimizer, training checkpoints
  "ports", // RolloutEngine and PushTarget: what the pipeline runs against
  "vllm", // the vLLM protocol client and version routing
  "rollout", // rollout engines: in-process, over a server
  "push", // push targets: LoRA and full-weight pushes, verification
  "pipeline", // the GRPO stages as Stream stages
  "task", // what is trained on: prompts, rewards, evaluation
  "server", // the embedded vLLM-compatible server and its inference engine
  "app", // the trainer, its config, the server layer, the embedded server process
  "cli", // commands
];

const SRC = fileURLToPath(new URL("../src/", import.meta.url));

const IMPORT =
  /(?:^|[^.\w])(?:import|export)\s*(?:type\s+)?(?:[\w*{}\s,]+?\s+from\s+)?["']([^"']+)["']|import\(\s*["']([^"']+)["']\s*\)/g;

/** Relative module specifiers a source text imports (comments are not stripped: none quote one). */
export const importsOf = (text: string): string[] =>
  [...text.matchAll(IMPORT)].map((m) => m[1] ?? m[2]).filter((s) => s.startsWith("."));

const walk = async (dir: string): Promise<string[]> => {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...await walk(p));
    else if (e.name.endsWith(".ts")) out.push(p);
  }
  return out;
};

/** The layer (top folder under src/) of a path inside src/, or null for a file in src/ itself. */
const layerOf = (file: string): string | null => {
  const parts = relative(SRC, file).split(/[\\/]/);
  return parts.length > 1 ? parts[0] : null;
};

interface Edge {
  readonly from: string;
  readonly to: string;
  readonly file: string;
  readonly spec: string;
}

/** Every import of src/ as an edge between layers. */
export const layerEdges = async (): Promise<Edge[]> => {
  const edges: Edge[] = [];
  for (const file of await walk(SRC)) {
    const text = await readFile(file, "utf8");
    for (const spec of importsOf(text)) {
      const target = normalize(join(dirname(file), spec));
      const from = layerOf(file) ?? "(src root)";
      const to = relative(SRC, target).startsWith("..")
        ? "(outside src)"
        : layerOf(target) ?? "(src root)";
      edges.push({ from, to, file: relative(SRC, file), spec });
    }
  }
  return edges;
};

/** Import rule violations: upward imports, unknown folders, imports leaving src/. */
export const violations = (edges: readonly Edge[], layers: readonly string[]): string[] => {
  const rank = new Map(layers.map((l, i) => [l, i]));
  const out: string[] = [];
  for (const e of edges) {
    const a = rank.get(e.from);
    const b = rank.get(e.to);
    if (a === undefined) out.push(`${e.file}: folder "${e.from}" is not in the layer order`);
    else if (b === undefined) out.push(`${e.file}: imports ${e.spec} in "${e.to}", not a layer`);
    else if (b > a) out.push(`${e.file}: imports ${e.spec}, up from ${e.from} to ${e.to}`);
  }
  return out;
};

/** Cycles in the folder graph (each as a path a -> b -> ... -> a), self-loops excluded. */
export const folderCycles = (edges: readonly Edge[]): string[][] => {
  const next = new Map<string, Set<string>>();
  for (const e of edges) {
    if (e.from === e.to) continue;
    if (!next.has(e.from)) next.set(e.from, new Set());
    next.get(e.from)!.add(e.to);
  }
  const cycles: string[][] = [];
  const state = new Map<string, "open" | "done">();
  const stack: string[] = [];
  const visit = (n: string) => {
    state.set(n, "open");
    stack.push(n);
    for (const m of next.get(n) ?? []) {
      if (state.get(m) === "open") cycles.push([...stack.slice(stack.indexOf(m)), m]);
      else if (!state.has(m)) visit(m);
    }
    stack.pop();
    state.set(n, "done");
  };
  for (const n of next.keys()) if (!state.has(n)) visit(n);
  return cycles;
};

Deno.test("layering: every import in src/ points down the layer order, no folder cycles", async () => {
  const edges = await layerEdges();
  assert(edges.length > 100, `only ${edges.length} imports found: the walk or the pattern broke`);
  const folders = new Set(
    (await readdir(SRC, { withFileTypes: true })).filter((e) => e.isDirectory()).map((e) => e.name),
  );
  assertEquals([...folders].sort(), [...LAYERS].sort());
  const roots = (await readdir(SRC)).filter((n) => n.endsWith(".ts"));
  assertEquals(roots, [], "every module lives in a layer folder");
  assertEquals(violations(edges, LAYERS), []);
  assertEquals(folderCycles(edges), []);
});

Deno.test("layering: the checks catch an upward import and a cycle", () => {
  const edge = (from: string, to: string): Edge => ({ from, to, file: `${from}/x.ts`, spec: to });
  // the shape of the old tangle: sync (here push) importing pipeline, pipeline importing snapshot
  assertEquals(violations([edge("push", "pipeline")], LAYERS), [
    "push/x.ts: imports pipeline, up from push to pipeline",
  ]);
  assertEquals(violations([edge("model", "model"), edge("app", "base")], LAYERS), []);
  assertEquals(violations([edge("nowhere", "base")], LAYERS).length, 1);
  assertEquals(folderCycles([edge("a", "b"), edge("b", "c"), edge("c", "a")]), [[
    "a",
    "b",
    "c",
    "a",
  ]]);
  assertEquals(folderCycles([edge("a", "b"), edge("a", "a")]), []);
  assertEquals(
    importsOf(
      'import { a } from "../x.ts";\nimport type { B } from "./y.ts";\nexport * from "../z.ts";\n' +
        'const m = await import("../w.ts");\nimport { Effect } from "effect";\n' +
        'export {\n  c,\n  type D,\n} from "./v.ts";',
    ),
    ["../x.ts", "./y.ts", "../z.ts", "../w.ts", "./v.ts"],
  );
});
