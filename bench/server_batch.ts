/**
 * Per-token generation throughput of the embedded server at batch 8 vs batch 64, through HTTP
 * against a real server process: the built-in model (assets/arithmetic-base) and a larger random
 * checkpoint. Each batch runs two ways: ONE request with n = B, and B concurrent requests with
 * n = 1 (distinct seeds), both seeded with ignore_eos so every sequence yields max_tokens tokens.
 *
 *   deno run -A bench/server_batch.ts [--backend cpu|webgpu] [--large-only|--small-only]
 *     [--hidden 256] [--layers 4] [--vocab 512] [--max-tokens 64] [--reps 3] [--temperature 1]
 *
 * Prints one line per case (wall-clock tokens/s, and tokens per CPU-second of the server process,
 * which a shared machine disturbs less) and a JSON summary (not written to bench/results).
 * @module
 */
import { join } from "node:path";
import type { ModelConfig } from "../src/model/config.ts";
import {
  startServer,
  tinyServerConfig,
  writeTinyCheckpoint,
} from "../tests/support/server_process.ts";

const arg = (name: string): string | null => {
  const i = Deno.args.indexOf(name);
  return i >= 0 ? Deno.args[i + 1] ?? null : null;
};
const backend = (arg("--backend") ?? "cpu") as "cpu" | "webgpu";
const reps = Number(arg("--reps") ?? 3);

interface Case {
  readonly name: string;
  readonly modelDir: string;
  readonly prompt: readonly number[];
  readonly maxTokens: number;
}

const measure = async (c: Case): Promise<Record<string, number>> => {
  await using srv = await startServer({ modelDir: c.modelDir, backend, timeoutMs: 120_000 });
  const body = (n: number, seed: number) => ({
    prompt: [...c.prompt],
    n,
    max_tokens: c.maxTokens,
    temperature: Number(arg("--temperature") ?? 1),
    seed,
    ignore_eos: true,
    logprobs: 0,
    return_token_ids: true,
  });
  const call = async (b: Record<string, unknown>): Promise<number> => {
    const r = await srv.request("/v1/completions", { body: b });
    const j = await r.json();
    if (r.status !== 200) throw new Error(JSON.stringify(j));
    return j.usage.completion_tokens as number;
  };
  // CPU time of the server process (user + system, ms): robust on a shared machine
  const tick = 1000 / 100; // USER_HZ
  const cpuMs = async (): Promise<number> => {
    const f = (await Deno.readTextFile(`/proc/${srv.child.pid}/stat`)).split(") ")[1].split(" ");
    return (Number(f[11]) + Number(f[12])) * tick;
  };
  const out: Record<string, number> = {};
  // warm-up (kernels, caches)
  await call(body(8, 1));
  for (const B of [8, 64]) {
    for (const mode of ["one", "concurrent"] as const) {
      let best = Infinity;
      let cpu = 0;
      let tokens = 0;
      for (let r = 0; r < reps; r++) {
        const c0 = await cpuMs();
        const t0 = performance.now();
        tokens = mode === "one"
          ? await call(body(B, 100 + r))
          : (await Promise.all(Array.from({ length: B }, (_, i) => call(body(1, 1000 * r + i)))))
            .reduce((a, b) => a + b, 0);
        best = Math.min(best, performance.now() - t0);
        cpu += (await cpuMs()) - c0;
      }
      const tps = tokens / (best / 1000);
      const cpuTps = (tokens * reps) / (cpu / 1000);
      out[`${mode}_b${B}_tokens_per_s`] = Math.round(tps);
      out[`${mode}_b${B}_tokens_per_cpu_s`] = Math.round(cpuTps);
      console.log(
        `${c.name} ${mode === "one" ? `n=${B}` : `${B} x n=1`}: ${tokens} tokens in ${
          best.toFixed(0)
        } ms = ${tps.toFixed(0)} tokens/s (${(best / c.maxTokens).toFixed(2)} ms/step); ` +
          `server CPU ${(cpu / reps).toFixed(0)} ms = ${cpuTps.toFixed(0)} tokens per CPU-second`,
      );
    }
  }
  for (const mode of ["one", "concurrent"]) {
    for (const unit of ["s", "cpu_s"]) {
      out[`${mode}_speedup_b64_over_b8_per_${unit}`] = Math.round(
        out[`${mode}_b64_tokens_per_${unit}`] / out[`${mode}_b8_tokens_per_${unit}`] * 100,
      ) / 100;
    }
  }
  return out;
};

const root = await Deno.makeTempDir({ prefix: "lorafold-bench-" });
const results: Record<string, Record<string, number>> = {};
try {
  if (!Deno.args.includes("--large-only")) {
    const modelDir = new URL("../assets/arithmetic-base", import.meta.url).pathname;
    // 7 prompt tokens + 24 new = 31 <= max_position_embeddings 32
    results["arithmetic-base"] = await measure({
      name: "arithmetic-base",
      modelDir,
      prompt: [1, 4, 5, 13, 6, 7, 14],
      maxTokens: 24,
    });
  }
  if (!Deno.args.includes("--small-only")) {
    const config: ModelConfig = tinyServerConfig({
      hiddenSize: Number(arg("--hidden") ?? 256),
      intermediateSize: Number(arg("--hidden") ?? 256) * 3,
      numLayers: Number(arg("--layers") ?? 4),
      numHeads: 8,
      numKvHeads: 4,
      headDim: Number(arg("--hidden") ?? 256) / 8,
      vocabSize: Number(arg("--vocab") ?? 512),
      maxPositionEmbeddings: 512,
    });
    const dir = join(root, "large");
    await writeTinyCheckpoint(dir, { config, std: 0.05 });
    results[`hidden${config.hiddenSize}-layers${config.numLayers}`] = await measure({
      name: `hidden ${config.hiddenSize}, ${config.numLayers} layers`,
      modelDir: dir,
      prompt: [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
      maxTokens: Number(arg("--max-tokens") ?? 64),
    });
  }
  console.log(JSON.stringify({ backend, results }, null, 2));
} finally {
  await Deno.remove(root, { recursive: true });
}
