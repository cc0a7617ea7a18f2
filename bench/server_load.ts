/**
 * Load on the embedded vLLM-compatible server: throughput and latency percentiles for 1, 16 and
 * 64 concurrent clients, each sending seeded completions back to back through HTTP against a real
 * server process (the shipped model, assets/arithmetic-base, on the CPU backend by default). A
 * client's latency is from sending a request to having its whole answer.
 *
 *   deno run -A bench/server_load.ts [--backend cpu|webgpu] [--seconds 4] [--max-tokens 8]
 *
 * Writes bench/results/server.json (snake_case keys, machine, adapter, date, and the load average
 * of the machine around the run: the numbers are only comparable at similar load).
 * @module
 */
import { loadavg } from "node:os";
import { startServer } from "../tests/support/server_process.ts";
import { writeResult } from "./common.ts";

const arg = (name: string): string | null => {
  const i = Deno.args.indexOf(name);
  return i >= 0 ? Deno.args[i + 1] ?? null : null;
};
const backend = (arg("--backend") ?? "cpu") as "cpu" | "webgpu";
const seconds = Number(arg("--seconds") ?? 4);
const maxTokens = Number(arg("--max-tokens") ?? 8);
const modelDir = new URL("../assets/arithmetic-base", import.meta.url).pathname;
const CLIENTS = [1, 16, 64] as const;

const percentile = (sorted: readonly number[], q: number): number =>
  sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];

const round = (x: number, d = 2): number => Math.round(x * 10 ** d) / 10 ** d;

const loadBefore = loadavg()[0];
const results: Record<string, number | string | boolean> = {
  model: "assets/arithmetic-base",
  backend,
  max_tokens: maxTokens,
  seconds_per_level: seconds,
  prompt: "12+34=",
};
{
  await using srv = await startServer({
    modelDir,
    backend,
    args: ["--served-model-name", "base"],
    timeoutMs: 120_000,
  });
  let seed = 0;
  const one = async (): Promise<{ ms: number; tokens: number }> => {
    const t0 = performance.now();
    const r = await srv.request("/v1/completions", {
      body: {
        model: "base",
        prompt: "12+34=",
        max_tokens: maxTokens,
        temperature: 1,
        seed: seed++,
        ignore_eos: true,
      },
    });
    const j = await r.json();
    if (r.status !== 200) throw new Error(`completion failed: ${JSON.stringify(j)}`);
    return { ms: performance.now() - t0, tokens: j.usage.completion_tokens };
  };
  for (let i = 0; i < 8; i++) await one(); // warm-up
  for (const clients of CLIENTS) {
    const latencies: number[] = [];
    let tokens = 0;
    const start = performance.now();
    const end = start + seconds * 1000;
    await Promise.all(Array.from({ length: clients }, async () => {
      while (performance.now() < end) {
        const r = await one();
        latencies.push(r.ms);
        tokens += r.tokens;
      }
    }));
    const wall = (performance.now() - start) / 1000;
    latencies.sort((a, b) => a - b);
    const k = `clients_${clients}`;
    results[`${k}_requests`] = latencies.length;
    results[`${k}_requests_per_s`] = round(latencies.length / wall);
    results[`${k}_tokens_per_s`] = round(tokens / wall);
    results[`${k}_latency_p50_ms`] = round(percentile(latencies, 0.5));
    results[`${k}_latency_p99_ms`] = round(percentile(latencies, 0.99));
    console.log(
      `${clients} clients: ${results[`${k}_requests_per_s`]} req/s, ` +
        `${results[`${k}_tokens_per_s`]} tok/s, p50 ${results[`${k}_latency_p50_ms`]} ms, ` +
        `p99 ${results[`${k}_latency_p99_ms`]} ms (${latencies.length} requests)`,
    );
  }
}
results.load_average_1m_before = round(loadBefore);
results.load_average_1m_after = round(loadavg()[0]);
console.log(`wrote ${await writeResult("server", results)}`);
