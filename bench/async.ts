/**
 * Asynchronous GRPO (max_staleness 2) against the sequential pipeline (max_staleness 0) on the
 * built-in task through lorafold's server, measured as two machines would run it: the trainer
 * and the server are separate processes pinned to different cores (`taskset -c 0` / `-c 1`),
 * each with one llvmpipe thread (`LP_NUM_THREADS=1`), both modes under the same pinning and the
 * same steps. Writes bench/results/async.json: steps/s of each mode, the speedup, the share of
 * the training wall time the trainer waited for rollouts, staleness and reward figures.
 *
 * Run: deno run -A bench/async.ts [--steps N] [--max-staleness K] [--repeats R] [train flags]
 * (needs `taskset`, util-linux; on a machine with fewer than 2 cores both pin to core 0).
 * @module
 */
import { Effect } from "effect";
import { readFile } from "node:fs/promises";
import { cpus } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseTrainArgs } from "../src/cli/main.ts";
import { runTraining, type TrainSummary } from "../src/app/trainer.ts";
import { serverLayer } from "../src/app/server_layer.ts";
import { arithmeticGrpoTask } from "../src/task/arithmetic_task.ts";
import { writeResult } from "./common.ts";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const SELF = fileURLToPath(import.meta.url);
const CLI = join(ROOT, "src/cli/main.ts");
const MODEL = join(ROOT, "assets/arithmetic-base");
const PIN_ENV = { LP_NUM_THREADS: "1", NO_COLOR: "1" };

const loadAverage = async (): Promise<string> =>
  (await readFile("/proc/loadavg", "utf8").catch(() => "?")).split(" ").slice(0, 3).join(" ");

const flagValue = (args: readonly string[], name: string): string | null => {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : null;
};
const without = (args: readonly string[], name: string): string[] => {
  const i = args.indexOf(name);
  return i < 0 ? [...args] : [...args.slice(0, i), ...args.slice(i + 2)];
};

// ---- child: one training run against the given server --------------------------------------

const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
const mean = (xs: number[]) => sum(xs) / Math.max(1, xs.length);

/** What one training run reports to the parent. */
interface RunResult {
  readonly max_staleness: number;
  readonly steps: number;
  readonly backend: string;
  readonly train_wall_s: number;
  readonly steps_per_s: number;
  readonly trainer_idle_fraction: number;
  readonly staleness_mean: number;
  readonly staleness_max: number;
  readonly exact_match_first5: number;
  readonly exact_match_last5: number;
  readonly accuracy_before: number;
  readonly accuracy_after: number;
  readonly is_ratio_mean: number;
  readonly is_ratio_min: number;
  readonly step_ms: Record<string, number>;
}
type NumericKey = {
  [K in keyof RunResult]: RunResult[K] extends number ? K : never;
}[keyof RunResult];

async function child(args: readonly string[]): Promise<void> {
  const out = await Deno.makeTempDir();
  const cfg = await Effect.runPromise(
    parseTrainArgs([
      "--quiet",
      "--engine",
      "server",
      "--output-dir",
      out,
      "--run-id",
      "r",
      ...args,
    ]),
  );
  const s = await Effect.runPromise(
    runTraining(cfg, arithmeticGrpoTask({ heldOutSize: cfg.evalSize }), {
      log: () => {},
      rollout: serverLayer,
    }) as Effect.Effect<TrainSummary>,
  );
  const m = (await readFile(join(s.runDir, "metrics.jsonl"), "utf8")).trim().split("\n").map(
    (l) => JSON.parse(l) as Record<string, number>,
  );
  const wallMs = s.trainWallS * 1000;
  const async = cfg.grpo.maxStaleness > 0;
  // time the trainer had nothing to train on: sequentially it waits for every step's rollouts,
  // asynchronously only when the buffer is empty
  const idleMs = async
    ? sum(m.map((x) => x["async/trainer_wait_ms"]))
    : sum(m.map((x) => x["time/rollout_ms"]));
  const exact = m.map((x) => x["rewards/exact_match/mean"]);
  const n = Math.min(5, m.length);
  const result: RunResult = {
    max_staleness: cfg.grpo.maxStaleness,
    steps: m.length,
    backend: s.backend,
    train_wall_s: s.trainWallS,
    steps_per_s: m.length / s.trainWallS,
    trainer_idle_fraction: idleMs / wallMs,
    staleness_mean: async ? mean(m.map((x) => x["async/staleness_mean"])) : 0,
    staleness_max: async ? Math.max(...m.map((x) => x["async/staleness_max"])) : 0,
    exact_match_first5: mean(exact.slice(0, n)),
    exact_match_last5: mean(exact.slice(-n)),
    accuracy_before: s.accuracyBefore,
    accuracy_after: s.accuracyAfter,
    is_ratio_mean: mean(m.map((x) => x["sampling/importance_sampling_ratio/mean"])),
    is_ratio_min: Math.min(...m.map((x) => x["sampling/importance_sampling_ratio/min"])),
    step_ms: Object.fromEntries(Object.entries(s.stageMs).map(([k, v]) => [k, +v.toFixed(1)])),
  };
  await Deno.remove(out, { recursive: true });
  console.log(`RESULT ${JSON.stringify(result)}`);
}

// ---- parent: a pinned server and a pinned trainer per mode ----------------------------------

/** Starts `serve` pinned to `core`; resolves with its URL and a stop function. */
async function startPinnedServer(core: number, backend: string) {
  const proc = new Deno.Command("taskset", {
    args: [
      "-c",
      String(core),
      Deno.execPath(),
      "run",
      "-A",
      CLI,
      "serve",
      "--model",
      MODEL,
      "--enable-lora",
      "--backend",
      backend,
      "--host",
      "127.0.0.1",
      "--port",
      "0",
      "--max-lora-rank",
      "16",
      "--max-loras",
      "4",
      "--logprobs-mode",
      "processed_logprobs",
    ],
    env: { ...PIN_ENV, VLLM_ALLOW_RUNTIME_LORA_UPDATING: "1", VLLM_SERVER_DEV_MODE: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let logs = "";
  const decoder = new TextDecoder();
  const drain = async (r: ReadableStream<Uint8Array>) => {
    for await (const c of r) logs += decoder.decode(c, { stream: true });
  };
  drain(proc.stdout);
  drain(proc.stderr);
  const t0 = Date.now();
  let url: string | null = null;
  while (url === null) {
    const m = logs.match(/listening on (http:\/\/[^\s]+?:\d+)/);
    if (m) url = m[1];
    else if (Date.now() - t0 > 120_000) throw new Error(`server did not start:\n${logs}`);
    else await new Promise((r) => setTimeout(r, 100));
  }
  for (;;) {
    const ok = await fetch(`${url}/health`).then((r) => (r.body?.cancel(), r.ok), () => false);
    if (ok) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    url,
    stop: async () => {
      try {
        proc.kill("SIGTERM");
      } catch { /* already gone */ }
      await proc.status;
    },
  };
}

async function runMode(
  k: number,
  args: readonly string[],
  cores: [number, number],
  serverBackend: string,
): Promise<RunResult> {
  const server = await startPinnedServer(cores[1], serverBackend);
  try {
    const out = await new Deno.Command("taskset", {
      args: [
        "-c",
        String(cores[0]),
        Deno.execPath(),
        "run",
        "-A",
        SELF,
        "--child",
        "--server-url",
        server.url,
        "--max-staleness",
        String(k),
        ...args,
      ],
      env: PIN_ENV,
      stdout: "piped",
      stderr: "inherit",
    }).output();
    const text = new TextDecoder().decode(out.stdout);
    const line = text.split("\n").find((l) => l.startsWith("RESULT "));
    if (!out.success || !line) throw new Error(`trainer (max_staleness ${k}) failed:\n${text}`);
    return JSON.parse(line.slice("RESULT ".length)) as RunResult;
  } finally {
    await server.stop();
  }
}

const median = (xs: readonly number[]): number => {
  const v = [...xs].sort((a, b) => a - b);
  return v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
};

async function main(argv: readonly string[]): Promise<void> {
  const k = Number(flagValue(argv, "--max-staleness") ?? 2);
  // pairs of runs; the order alternates (sync first, then async first) so that a load drifting
  // over the bench weighs on both modes alike
  const repeats = Number(flagValue(argv, "--repeats") ?? 2);
  const rest = without(without(argv, "--max-staleness"), "--repeats");
  const args = flagValue(rest, "--steps") === null ? ["--steps", "40", ...rest] : rest;
  const cores: [number, number] = cpus().length >= 2 ? [0, 1] : [0, 0];
  // the embedded server runs the CPU backend unless the trainer is told --backend webgpu
  const serverBackend = flagValue(args, "--backend") === "webgpu" ? "webgpu" : "cpu";
  const loads: string[] = [await loadAverage()];
  const syncs: RunResult[] = [];
  const asyncs: RunResult[] = [];
  for (let r = 0; r < repeats; r++) {
    for (const mode of r % 2 === 0 ? [0, k] : [k, 0]) {
      (mode === 0 ? syncs : asyncs).push(await runMode(mode, args, cores, serverBackend));
      loads.push(await loadAverage());
    }
  }
  const sync = syncs[0];
  const med = (rs: RunResult[], key: NumericKey) => median(rs.map((x) => x[key]));
  const fixed = (xs: number[], d = 3) => xs.map((x) => x.toFixed(d)).join(", ");
  const speedups = syncs.map((s, i) => asyncs[i].steps_per_s / s.steps_per_s);
  const result: Record<string, number | string | boolean> = {
    args: args.join(" "),
    pinning: `trainer taskset -c ${cores[0]}, server taskset -c ${cores[1]}, LP_NUM_THREADS=1`,
    server_backend: serverBackend,
    trainer_backend: sync.backend,
    steps: sync.steps,
    max_staleness: k,
    repeats,
    sync_steps_per_s: +med(syncs, "steps_per_s").toFixed(3),
    async_steps_per_s: +med(asyncs, "steps_per_s").toFixed(3),
    async_speedup: +(med(asyncs, "steps_per_s") / med(syncs, "steps_per_s")).toFixed(3),
    trainer_idle_fraction_sync: +med(syncs, "trainer_idle_fraction").toFixed(3),
    trainer_idle_fraction_async: +med(asyncs, "trainer_idle_fraction").toFixed(3),
    sync_steps_per_s_each: fixed(syncs.map((x) => x.steps_per_s)),
    async_steps_per_s_each: fixed(asyncs.map((x) => x.steps_per_s)),
    async_speedup_each_pair: fixed(speedups),
    async_staleness_mean: +med(asyncs, "staleness_mean").toFixed(3),
    async_staleness_max: Math.max(...asyncs.map((x) => x.staleness_max)),
    sync_exact_match_first5_last5: syncs.map((x) =>
      `${x.exact_match_first5.toFixed(3)} -> ${x.exact_match_last5.toFixed(3)}`
    ).join(", "),
    async_exact_match_first5_last5: asyncs.map((x) =>
      `${x.exact_match_first5.toFixed(3)} -> ${x.exact_match_last5.toFixed(3)}`
    ).join(", "),
    sync_accuracy: syncs.map((x) => `${x.accuracy_before} -> ${x.accuracy_after}`).join(", "),
    async_accuracy: asyncs.map((x) => `${x.accuracy_before} -> ${x.accuracy_after}`).join(", "),
    async_is_ratio_mean: +med(asyncs, "is_ratio_mean").toFixed(4),
    async_is_ratio_min: Math.min(...asyncs.map((x) => x.is_ratio_min)),
    sync_step_ms: syncs.map((x) => JSON.stringify(x.step_ms)).join(" "),
    async_step_ms: asyncs.map((x) => JSON.stringify(x.step_ms)).join(" "),
    load_averages: loads.join(" | "),
  };
  console.log(await writeResult("async", result));
  console.log(JSON.stringify(result, null, 2));
}

if (import.meta.main) {
  if (Deno.args[0] === "--child") await child(Deno.args.slice(1));
  else await main(Deno.args);
}
