/**
 * Crash consistency of a training run, with REAL processes: `lorafold train` (the CLI, CPU
 * backend, LoRA with dropout so that the RNG state matters, a checkpoint after every step) is
 * killed with SIGKILL again and again — at random moments, and right as it starts writing a
 * checkpoint or the adapter directory (a file-system watcher fires the kill) — and resumed each
 * time from whatever it left. However often and wherever it died, the run must end with exactly
 * the result of an uninterrupted run: the same metrics (timings aside), the same final training
 * state file and the same adapter bytes.
 *
 * After every kill the run directory is inspected the way a reader would see it: a checkpoint
 * that exists always loads (never torn), and the adapter directory, when there is one, is either
 * complete or refused by the server: a real lorafold server process is asked to load it, and it
 * must either load one that equals the final adapter or answer an error (no adapter_config.json,
 * the completion marker written last, or a file that does not parse) — never load half a directory.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { readdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { Effect, Exit } from "effect";
import { loadTrainCheckpoint } from "../src/train/checkpoint.ts";
import { ADAPTER_CONFIG, ADAPTER_WEIGHTS } from "../src/lora/peft.ts";
import { BUILTIN_MODEL_DIR } from "../src/task/arithmetic_task.ts";
import { Rng } from "../src/model/rng.ts";
import { startServer } from "./support/server_process.ts";
import { decodeTrainConfig } from "../src/app/config.ts";
import { runTraining } from "../src/app/trainer.ts";
import { arithmeticGrpoTask } from "../src/task/arithmetic_task.ts";

const MAIN = new URL("../src/cli/main.ts", import.meta.url).pathname;
const STEPS = 6;
/** Where a process is killed. */
type Kill = { at: "random" | "none" } | { at: "checkpoint" | "adapter"; n: number };

const trainArgs = (out: string, runId: string, resume: boolean): string[] => [
  "run",
  "-A",
  MAIN,
  "train",
  "--backend",
  "cpu",
  "--mode",
  "lora",
  "--lora-dropout",
  "0.2",
  "--steps",
  String(STEPS),
  "--prompts-per-step",
  "4",
  "--num-generations",
  "4",
  "--eval-size",
  "8",
  "--checkpoint-every",
  "1",
  "--quiet",
  "--output-dir",
  out,
  "--run-id",
  runId,
  ...(resume ? ["--resume"] : []),
];

const spawnTrain = (args: string[]) =>
  new Deno.Command(Deno.execPath(), { args, stdout: "null", stderr: "piped" }).spawn();

const exists = (p: string) => stat(p).then(() => true, () => false);

/** Temp files of interrupted atomic writes in the run directory and its adapter directory. */
const tempFiles = async (runDir: string): Promise<string[]> => {
  const out: string[] = [];
  for (const d of ["", "adapter"]) {
    const names = await readdir(join(runDir, d)).catch(() => [] as string[]);
    out.push(...names.filter((f) => f.endsWith(".tmp")).map((f) => join(d, f)));
  }
  return out;
};

/** metrics.jsonl without the wall-clock fields. */
const metricsOf = async (runDir: string) =>
  (await readFile(join(runDir, "metrics.jsonl"), "utf8")).split("\n").filter((l) => l.trim())
    .map((l) =>
      Object.fromEntries(
        Object.entries(JSON.parse(l) as Record<string, number>).filter(([k]) =>
          !k.startsWith("time/") && k !== "step_time" && k !== "push_latency_ms"
        ),
      )
    );

Deno.test({
  name:
    "crash consistency: SIGKILL at random points and during checkpoint/adapter writes, resumed each time, ends exactly as an uninterrupted run; checkpoints never torn; the server never loads a half-written adapter",
  // the child processes' stderr pipes are read to their end; the watcher is closed
  sanitizeResources: true,
  fn: async () => {
    const out = await Deno.makeTempDir();
    const seed = Number(Deno.env.get("CRASH_SEED") ?? Date.now() % 1_000_000);
    const rng = new Rng(seed);
    const why = (s: string) => `${s} (CRASH_SEED=${seed})`;
    await using srv = await startServer({
      modelDir: BUILTIN_MODEL_DIR,
      args: ["--enable-lora"],
      env: { VLLM_ALLOW_RUNTIME_LORA_UPDATING: "1" },
    });
    try {
      // the reference: one uninterrupted run, timed to place the random kills
      const t0 = performance.now();
      const ref = await spawnTrain(trainArgs(out, "ref", false)).output();
      assert(ref.success, new TextDecoder().decode(ref.stderr));
      const refMs = performance.now() - t0;
      const refDir = join(out, "ref");
      const refAdapter = await readFile(join(refDir, "adapter", ADAPTER_WEIGHTS));

      const runDir = join(out, "crash");
      await Deno.mkdir(runDir, { recursive: true });
      const landed: string[] = [];
      let loads = 0;
      // where each process dies: at a random moment, on its n-th checkpoint write event, on the
      // n-th event of its adapter export, or not at all ("none")
      const plan: Kill[] = [
        { at: "checkpoint", n: 1 + Math.floor(rng.next() * 2) },
        { at: "random" },
        { at: "checkpoint", n: 1 + Math.floor(rng.next() * 2) },
        { at: "random" },
        { at: "checkpoint", n: 1 },
        // the adapter export (after the last step's checkpoint; a finished run resumed exports
        // it again, over the complete directory): its first file-system event, then later ones
        // (the weights' temp file, its rename, the config's temp file, ...)
        { at: "adapter", n: 1 },
        { at: "adapter", n: 2 + Math.floor(rng.next() * 4) },
        { at: "adapter", n: 1 + Math.floor(rng.next() * 5) },
        { at: "random" },
        // left to finish; then re-exports over the complete directory, killed midway: the
        // directory stays complete (each file replaced atomically) and loadable throughout
        { at: "none" },
        { at: "adapter", n: 1 + Math.floor(rng.next() * 5) },
        { at: "adapter", n: 1 + Math.floor(rng.next() * 5) },
      ];
      for (const [k, target] of plan.entries()) {
        const resume = await exists(join(runDir, "checkpoint.safetensors"));
        const child = spawnTrain(trainArgs(out, "crash", resume));
        const stderr = new Response(child.stderr).text();
        const watcher = Deno.watchFs(runDir, { recursive: true });
        let killed = "";
        const kill = (what: string) => {
          if (killed) return;
          killed = what;
          try {
            child.kill("SIGKILL");
          } catch { /* already exited */ }
        };
        let checkpointWrites = 0;
        let adapterEvents = 0;
        const tempsBefore = await tempFiles(runDir);
        const watching = (async () => {
          for await (const ev of watcher) {
            for (const p of ev.paths) {
              const rel = p.slice(runDir.length + 1);
              // a write starting: the temp file of an atomic write (or, were the write not
              // atomic, the checkpoint file itself being written)
              const checkpointWrite = (ev.kind === "create" &&
                /^\.checkpoint\.safetensors\..*\.tmp$/.test(rel)) ||
                (rel === "checkpoint.safetensors" && ev.kind !== "remove");
              if (target.at === "checkpoint" && checkpointWrite) {
                if (++checkpointWrites === target.n) {
                  kill(`on checkpoint write ${target.n} (${ev.kind} ${rel})`);
                }
              }
              if (target.at === "adapter" && ev.kind !== "remove" && /^adapter(\/|$)/.test(rel)) {
                if (++adapterEvents === target.n) {
                  kill(`on adapter event ${target.n} (${ev.kind} ${rel})`);
                }
              }
            }
          }
        })();
        const delay = (0.1 + 0.3 * rng.next()) * refMs;
        const timer = target.at === "random"
          ? setTimeout(() => kill(`after ${Math.round(delay)} ms`), delay)
          : undefined;
        const status = await child.status;
        clearTimeout(timer);
        watcher.close();
        await watching;
        const log = await stderr;
        // (a kill that comes as the process ends on its own does not count as one)
        if (status.signal !== "SIGKILL") {
          // it finished first (a later process resumes the finished run: evaluation and export)
          assert(status.success, why(`train exited ${status.code}: ${log}`));
          landed.push("finished");
          continue;
        }
        const temps = (await tempFiles(runDir)).filter((f) => !tempsBefore.includes(f));
        landed.push(`${killed}${temps.length ? ` [mid-write: left ${temps.join(", ")}]` : ""}`);
        // what a reader sees now: a checkpoint that exists loads
        if (await exists(join(runDir, "checkpoint.safetensors"))) {
          const ck = await Effect.runPromise(
            Effect.exit(loadTrainCheckpoint(join(runDir, "checkpoint.safetensors"))),
          );
          assert(Exit.isSuccess(ck), why(`torn checkpoint after a kill ${killed}: ${ck}`));
        }
        // and the server loads the adapter directory only when it is complete
        const adapterDir = join(runDir, "adapter");
        if (await exists(adapterDir)) {
          const name = `crash-${k}`;
          const res = await srv.request("/v1/load_lora_adapter", {
            method: "POST",
            body: { lora_name: name, lora_path: adapterDir },
          });
          await res.body?.cancel();
          const complete = await exists(join(adapterDir, ADAPTER_CONFIG));
          if (res.status === 200) {
            loads++;
            assert(complete, why("the server loaded an adapter directory without its config"));
            assert(
              (await readFile(join(adapterDir, ADAPTER_WEIGHTS))).equals(refAdapter),
              why("the server loaded an adapter that is not the final one"),
            );
            const un = await srv.request("/v1/unload_lora_adapter", {
              method: "POST",
              body: { lora_name: name },
            });
            await un.body?.cancel();
          } else {
            assert(!complete || res.status >= 400, why(`load answered ${res.status}`));
          }
        }
      }
      const kills = landed.filter((l) => l !== "finished").length;
      // resume until done (no more kills)
      if (landed.at(-1) !== "finished") {
        const resume = await exists(join(runDir, "checkpoint.safetensors"));
        const last = await spawnTrain(trainArgs(out, "crash", resume)).output();
        assert(last.success, why(new TextDecoder().decode(last.stderr)));
      }
      // the finished directory is complete: the server loads it
      const done = await srv.request("/v1/load_lora_adapter", {
        method: "POST",
        body: { lora_name: "crash-final", lora_path: join(runDir, "adapter") },
      });
      assertEquals(done.status, 200, why(await done.text()));
      await done.body?.cancel().catch(() => {});
      console.log(
        `kills (seed ${seed}): ${landed.join("; ")}; complete adapters loaded mid-way: ${loads}`,
      );
      assert(kills >= 5, why(`only ${kills} kills`));
      assert(landed.includes("finished"), why("the run never finished between the kills"));
      // nothing left of the interrupted writes
      assertEquals(await tempFiles(runDir), [], why("temp files left"));
      // the identical result
      assertEquals(await metricsOf(runDir), await metricsOf(refDir), why("metrics differ"));
      assert(
        (await readFile(join(runDir, "checkpoint.safetensors"))).equals(
          await readFile(join(refDir, "checkpoint.safetensors")),
        ),
        why("final training state differs"),
      );
      assert(
        (await readFile(join(runDir, "adapter", ADAPTER_WEIGHTS))).equals(refAdapter),
        why("final adapter differs"),
      );
      const summary = async (d: string) => {
        const s = JSON.parse(await readFile(join(d, "summary.json"), "utf8"));
        return [s.accuracyBefore, s.accuracyAfter, s.rewardFirst, s.rewardLast];
      };
      assertEquals(await summary(runDir), await summary(refDir), why("summary differs"));
    } finally {
      await Deno.remove(out, { recursive: true });
    }
  },
});

Deno.test("crash consistency: a metrics line torn by a kill mid-append, or the temp file of a killed metrics rewrite, does not stop the resume, and the run still ends as an uninterrupted one with no temp file left", async () => {
  const out = await Deno.makeTempDir();
  const quiet = () => {};
  const train = async (over: Record<string, unknown>) => {
    const cfg = await Effect.runPromise(decodeTrainConfig({
      backend: "cpu",
      quiet: true,
      evalSize: 8,
      steps: 3,
      promptsPerStep: 4,
      numGenerations: 4,
      checkpointEvery: 1,
      outputDir: out,
      ...over,
    }));
    return await Effect.runPromise(
      runTraining(cfg, arithmeticGrpoTask({ heldOutSize: cfg.evalSize }), { log: quiet }),
    );
  };
  try {
    await train({ runId: "ref" });
    await train({ runId: "torn", steps: 2 });
    // the kill hit step 3's append: half a line, no newline, no step-3 checkpoint
    const path = join(out, "torn", "metrics.jsonl");
    const line = JSON.stringify({ step: 3, reward: 0.5, loss: 0.25 });
    await Deno.writeTextFile(path, line.slice(0, line.length >> 1), { append: true });
    // and an earlier resume was killed while it rewrote the metrics file: its temp file remains
    await Deno.writeTextFile(join(out, "torn", ".metrics.jsonl.0123456789ab.tmp"), '{"step"');
    await train({ runId: "torn", resume: true });
    assertEquals(await metricsOf(join(out, "torn")), await metricsOf(join(out, "ref")));
    assertEquals(await tempFiles(join(out, "torn")), [], "temp files left");
    assert(
      (await readFile(join(out, "torn", "adapter", ADAPTER_WEIGHTS))).equals(
        await readFile(join(out, "ref", "adapter", ADAPTER_WEIGHTS)),
      ),
      "final adapters differ",
    );
  } finally {
    await Deno.remove(out, { recursive: true });
  }
});
