/**
 * Weight push to a vLLM-compatible server, end to end with REAL server processes on loopback
 * (CPU backend, the built-in model; no mocks of our components):
 *
 * 1. the server half of the LoRA × engine table: LoRA and full fine-tuning both learn through
 *    the embedded server (the in-process half is in tests/pipeline_test.ts), every push verified;
 *    and the server engine's rollouts equal the in-process engine's for the same snapshot;
 * 2. negative control: TRL v0.15.0's aliasing push (tests/support/aliasing_push.ts) fails
 *    verification with SyncMismatch at the first non-zero adapter, and with verify "warn" the
 *    reward stays flat;
 * 3. faults: a server killed mid-push and restarted gets the snapshot exactly once, verified; a
 *    broken remote (500 / 404 / garbage, a throwaway Deno.serve standing in for it) gives typed
 *    errors and leaves the training state intact; a malformed request to our server is a typed
 *    400 and the server keeps serving;
 * 4. units: the three error envelopes, the retry schedule, completion decoding.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { Duration, Effect, Exit, Schedule, Scope } from "effect";
import { type BackendShape, cpuBackend } from "../src/backend/backend.ts";
import { initLora, type LoraConfig } from "../src/lora/adapter.ts";
import { Rng } from "../src/model/rng.ts";
import { decodeTrainConfig, type TrainConfig } from "../src/app/config.ts";
import { makeLocalEngine } from "../src/rollout/local.ts";
import { Policy } from "../src/train/policy.ts";
import type { RolloutRequest } from "../src/ports/rollout_engine.ts";
import { type RolloutLayerFactory, runTraining, type TrainSummary } from "../src/app/trainer.ts";
import { type BaseModel, loadBase } from "../src/model/loader.ts";
import { arithmeticGrpoTask, BUILTIN_MODEL_DIR } from "../src/task/arithmetic_task.ts";
import {
  decodeCompletion,
  isRetryable,
  makeVllmClient,
  parseErrorEnvelope,
  type RetryPolicy,
  retrySchedule,
  usesNestedErrorEnvelope,
  VllmHttpError,
} from "../src/vllm/client.ts";
import { makeFullPusher } from "../src/push/full.ts";
import { makeLoraPusher, type PushStage } from "../src/push/lora.ts";
import { makeServerLayer, serverLayer } from "../src/app/server_layer.ts";
import { makeServerRolloutEngine } from "../src/rollout/server.ts";
import type { Snapshot } from "../src/snapshot/snapshot.ts";
import { defaultProbePrompt, type VerifySettings } from "../src/push/verify.ts";
import { Routing } from "../src/vllm/routing.ts";
import { ReplicaSet } from "../src/vllm/replicas.ts";
import { aliasingEngineLayer } from "./support/aliasing_push.ts";
import { type ServerProcess, startServer } from "./support/server_process.ts";
import { testOptimizer } from "./support/tiny.ts";

const quiet = () => {};
/** The built-in task, sized as the config says, trained through `rollout` without progress lines. */
const trainOn = (cfg: TrainConfig, rollout: RolloutLayerFactory) =>
  runTraining(cfg, arithmeticGrpoTask({ heldOutSize: cfg.evalSize }), { log: quiet, rollout });
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
const metrics = async (dir: string): Promise<Record<string, number>[]> =>
  (await readFile(join(dir, "metrics.jsonl"), "utf8")).split("\n").filter((l) => l.trim()).map((
    l,
  ) => JSON.parse(l));
const train = async (
  over: Record<string, unknown>,
  layer = serverLayer,
): Promise<TrainSummary> => {
  const cfg = await Effect.runPromise(
    decodeTrainConfig({ backend: "cpu", quiet: true, evalSize: 100, engine: "server", ...over }),
  );
  return await Effect.runPromise(trainOn(cfg, layer));
};
const exactRise = (m: Record<string, number>[]) => {
  const exact = m.map((x) => x["rewards/exact_match/mean"]);
  return mean(exact.slice(-5)) - mean(exact.slice(0, 5));
};
const FAST_RETRY: RetryPolicy = { baseMs: 2, factor: 2, maxDelayMs: 20, maxRetries: 3 };
const TOL = 1e-3;

// ---- 1. the server half of the LoRA × engine table --------------------------------------------

let correctLoraRise: number | null = null;

for (const mode of ["lora", "full"] as const) {
  Deno.test(`server engine, ${mode}: reward and held-out accuracy rise through the real server, every push verified`, async () => {
    const out = await Deno.makeTempDir();
    const s = await train({
      mode,
      steps: 14,
      promptsPerStep: 12,
      outputDir: out,
      runId: "r",
      learningRate: mode === "lora" ? 3e-3 : 3e-4,
    });
    assertEquals(s.engine, "server");
    const m = await metrics(s.runDir);
    assertEquals(m.length, 14);
    // on-policy through the server: step k's rollouts come from the version pushed after step k-1
    m.forEach((x) => assertEquals(x.rollout_policy_version, x.step - 1));
    for (const x of m) {
      const d = x["sync/verify_logp_diff_max"];
      assert(typeof d === "number" && d <= TOL, `step ${x.step}: verify diff ${d}`);
      assert(x.push_bytes > 0 && x.push_latency_ms > 0);
      // the engine's rollout logprobs are the trainer's (same weights, same tempered distribution)
      assert(
        x["sampling/sampling_logp_difference/max"] < 1e-3,
        `step ${x.step}: engine/trainer logp differ`,
      );
    }
    const rise = exactRise(m);
    if (mode === "lora") correctLoraRise = rise;
    assert(rise >= 0.05, `${mode}: exact-match reward rose by only ${rise.toFixed(3)}`);
    assert(
      s.accuracyAfter - s.accuracyBefore >= 0.1,
      `${mode}: accuracy ${s.accuracyBefore} -> ${s.accuracyAfter}`,
    );
    // the push directories of the session were removed with the server
    assertEquals((await readdir(out)).sort(), ["r"]);
    await Deno.remove(out, { recursive: true });
  });
}

// ---- helpers for the process-level tests ------------------------------------------------------

const LORA: LoraConfig = {
  r: 4,
  alpha: 8,
  dropout: 0,
  targetModules: ["q_proj", "v_proj", "down_proj"],
  useRslora: false,
};

/** A policy over the built-in model whose adapter is non-zero (random B), in its own scope. */
const makePolicy = async (
  backend: BackendShape,
  base: BaseModel,
  mode: "lora" | "full",
  seed: number,
) => {
  const scope = await Effect.runPromise(Scope.make());
  const init = initLora(base.config, LORA, seed);
  const rng = new Rng(seed + 99);
  for (const { b } of init.modules.values()) {
    for (let i = 0; i < b.data.length; i++) b.data[i] = (rng.next() - 0.5) * 0.5;
  }
  const policy = await Effect.runPromise(
    Scope.provide(scope)(Policy.make(backend, base.config, base.weights, {
      mode,
      lora: LORA,
      seed,
      optimizer: testOptimizer,
    }, init)),
  );
  return { policy, close: () => Effect.runPromise(Scope.close(scope, Exit.void)) };
};

const snapshotAt = async (policy: Policy, version: number): Promise<Snapshot> => {
  policy.version = version;
  return await Effect.runPromise(policy.snapshot());
};

const freePort = (): number => {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
};

const SERVER_ENV = { VLLM_ALLOW_RUNTIME_LORA_UPDATING: "1", VLLM_SERVER_DEV_MODE: "1" };
const startOn = (port: number): Promise<ServerProcess> =>
  startServer({
    modelDir: BUILTIN_MODEL_DIR,
    args: ["--enable-lora", "--port", String(port), "--logprobs-mode", "processed_logprobs"],
    env: SERVER_ENV,
  });

const verifySettings = (
  base: BaseModel,
  policy: VerifySettings["policy"] = "fail",
): VerifySettings => ({
  policy,
  tolerance: TOL,
  probePrompt: defaultProbePrompt(base.tokenizer),
  probeTokens: 4,
});

const run = <A, E>(e: Effect.Effect<A, E>): Promise<A> => Effect.runPromise(e);
const flip = <A, E>(e: Effect.Effect<A, E>): Promise<E> => Effect.runPromise(Effect.flip(e));

Deno.test("server engine rollouts equal the in-process engine's for the same snapshot and seeds", async () => {
  const backend = cpuBackend();
  const base = await run(loadBase(BUILTIN_MODEL_DIR));
  const { policy, close } = await makePolicy(backend, base, "lora", 3);
  await using srv = await startOn(freePort());
  const root = await Deno.makeTempDir();
  try {
    const snap = await snapshotAt(policy, 1);
    const routing = new Routing();
    const client = makeVllmClient(srv.url);
    const pusher = makeLoraPusher({
      client,
      backend,
      routing,
      root,
      baseModel: base.dir,
      verify: verifySettings(base),
      keepLoaded: 2,
      target: "t",
    });
    await run(pusher.push(snap));
    const server = makeServerRolloutEngine(ReplicaSet.single(client, routing));
    const requests: RolloutRequest[] = ["12+34=", "57+38=", "99+99="].map((p, i) => ({
      prompt: [1, ...base.tokenizer.encode(p)],
      n: 4,
      maxTokens: 5,
      temperature: 1,
      topP: 1,
      topK: 0,
      seed: 1000 + 4 * i,
      stopTokenIds: [base.tokenizer.eosId],
    }));
    const fromServer = await run(server.generate(requests));
    const local = await run(Effect.scoped(Effect.gen(function* () {
      const { engine, target } = yield* makeLocalEngine(backend, 0);
      yield* target.push(snap);
      return yield* engine.generate(requests);
    })));
    assertEquals(fromServer.policyVersion, 1);
    fromServer.completions.forEach((group, i) =>
      group.forEach((c, j) => {
        const l = local.completions[i][j];
        assertEquals(c.tokens, l.tokens, `request ${i} sample ${j}`);
        assertEquals(c.finishReason, l.finishReason);
        c.logprobs.forEach((x, t) =>
          assert(Math.abs(x - l.logprobs[t]) < 1e-4, `logprob ${x} vs ${l.logprobs[t]}`)
        );
      })
    );
    // unseeded requests with equal settings share one batched call (index = prompt * n + j)
    const unseeded = await run(server.generate(requests.map((r) => ({ ...r, seed: null }))));
    assertEquals(unseeded.completions.map((g) => g.length), [4, 4, 4]);

    // re-pushing the routed version with the same weights only re-verifies it
    const again = await run(pusher.push(snap));
    assertEquals([again.version, again.bytes], [1, 0]);
    assert(again.logpDiffMax !== null && again.logpDiffMax <= TOL);
    // a version number never names two snapshots
    const other = await makePolicy(backend, base, "lora", 4);
    const otherSnap = await snapshotAt(other.policy, 1);
    const dup = await flip(pusher.push(otherSnap));
    assert(
      dup._tag === "SyncError" && dup.message.includes("already pushed with other weights"),
      dup.message,
    );
    // a failed verification leaves nothing loaded and the previous version routed
    const strict = makeLoraPusher({
      client,
      backend,
      routing,
      root,
      baseModel: base.dir,
      // no difference passes (the trainer and the server compute the probe identically now)
      verify: { ...verifySettings(base), tolerance: -1 },
      keepLoaded: 2,
      target: "strict",
    });
    const mismatch = await flip(strict.push(await snapshotAt(policy, 2)));
    assertEquals(mismatch._tag, "SyncMismatch");
    assertEquals(routing.current?.version, 1);
    const names = async () =>
      ((await (await srv.request("/v1/models")).json()) as { data: { id: string }[] }).data.map((
        c,
      ) => c.id);
    assertEquals(await names(), [BUILTIN_MODEL_DIR, "policy-v1"]);
    assertEquals(await readdir(root), ["policy-v1"]);
    // a new session on the same server (a resumed run) replaces a stale adapter of the same name
    const root2 = await Deno.makeTempDir();
    const session2 = makeLoraPusher({
      client,
      backend,
      routing: new Routing(),
      root: root2,
      baseModel: base.dir,
      verify: verifySettings(base),
      keepLoaded: 2,
      target: "t2",
    });
    const replaced = await run(session2.push(otherSnap));
    assert(replaced.logpDiffMax !== null && replaced.logpDiffMax <= TOL);
    assertEquals(await names(), [BUILTIN_MODEL_DIR, "policy-v1"]);
    await other.close();
    await Deno.remove(root2, { recursive: true });
  } finally {
    await close();
    await Deno.remove(root, { recursive: true });
  }
});

// ---- 2. negative control: TRL v0.15.0's aliasing push ------------------------------------------

Deno.test("negative control: the aliasing push fails verification with SyncMismatch at the first non-zero adapter", async () => {
  const out = await Deno.makeTempDir();
  const cfg = await run(decodeTrainConfig({
    backend: "cpu",
    quiet: true,
    evalSize: 10,
    engine: "server",
    mode: "lora",
    steps: 3,
    promptsPerStep: 8,
    outputDir: out,
    runId: "alias",
  }));
  const err = await flip(trainOn(cfg, aliasingEngineLayer()));
  assertEquals(err._tag, "SyncMismatch");
  const e = err as unknown as {
    version: number;
    maxAbsDiff: number;
    tolerance: number;
    message: string;
  };
  // v0 (B = 0: base == folded) passes; the first update makes the adapter non-zero
  assertEquals(e.version, 1);
  assert(e.maxAbsDiff > e.tolerance, e.message);
  const m = await metrics(join(out, "alias"));
  assertEquals(m.length, 0); // it stopped at the first push after step 1
  await Deno.remove(out, { recursive: true });
});

Deno.test('negative control: with verify "warn" the aliasing push trains on base-model rollouts and the reward stays flat', async () => {
  const out = await Deno.makeTempDir();
  const s = await train(
    {
      mode: "lora",
      steps: 14,
      promptsPerStep: 12,
      outputDir: out,
      runId: "alias",
      learningRate: 3e-3,
      verify: "warn",
    },
    aliasingEngineLayer(),
  );
  const m = await metrics(s.runDir);
  assertEquals(m.length, 14);
  // every push after the first non-zero adapter is flagged
  for (const x of m) {
    assert(
      x["sync/verify_logp_diff_max"] > TOL,
      `step ${x.step}: ${x["sync/verify_logp_diff_max"]}`,
    );
  }
  const rise = exactRise(m);
  assert(rise < 0.05, `the reward rose by ${rise.toFixed(3)} with base weights served`);
  if (correctLoraRise !== null) {
    assert(
      correctLoraRise - rise >= 0.05,
      `correct push rise ${correctLoraRise} vs aliasing ${rise}`,
    );
  }
  await Deno.remove(out, { recursive: true });
});

// ---- 3. faults ----------------------------------------------------------------------------------

for (const kind of ["lora", "full"] as const) {
  Deno.test(`fault: server killed mid-${kind}-push and restarted -> applied exactly once, verified`, async () => {
    const backend = cpuBackend();
    const base = await run(loadBase(BUILTIN_MODEL_DIR));
    const { policy, close } = await makePolicy(backend, base, "lora", 5);
    const port = freePort();
    let srv = await startOn(port);
    const root = await Deno.makeTempDir();
    let restarted = null as Promise<ServerProcess> | null;
    const killAt: PushStage = kind === "lora" ? "exported" : "paused";
    const stages: string[] = [];
    try {
      const routing = new Routing();
      const client = makeVllmClient(srv.url, {
        retry: { baseMs: 100, factor: 2, maxDelayMs: 2000, maxRetries: 12 },
      });
      const onStage = (stage: PushStage, version: number) =>
        Effect.promise(async () => {
          stages.push(`${stage}:${version}`);
          if (stage === killAt && version === 7 && restarted === null) {
            srv.child.kill("SIGKILL");
            await srv.stop();
            restarted = new Promise((r) => setTimeout(r, 300)).then(() => startOn(port));
          }
        });
      const common = {
        client,
        backend,
        routing,
        root,
        verify: verifySettings(base),
        target: "t",
        onStage,
      };
      const pusher = kind === "lora"
        ? makeLoraPusher({ ...common, baseModel: base.dir, keepLoaded: 2 })
        : makeFullPusher({ ...common, modelName: BUILTIN_MODEL_DIR, keepDirs: 2 });
      const snap = await snapshotAt(policy, 7);
      const digest = snap.digest;
      const report = await run(pusher.push(snap));
      assert(restarted !== null, "the server was not killed");
      srv = await restarted;
      assertEquals(report.version, 7);
      assert(
        report.logpDiffMax !== null && report.logpDiffMax <= TOL,
        `verify diff ${report.logpDiffMax}`,
      );
      assertEquals(routing.current?.version, 7);
      assertEquals(snap.digest, digest);
      await run(snap.verify());
      // exactly once, nothing half-applied
      const models = await (await srv.request("/v1/models")).json() as {
        data: { id: string; root: string }[];
      };
      const names = models.data.map((c) => c.id);
      if (kind === "lora") {
        assertEquals(names.filter((n) => n === "policy-v7").length, 1);
        assertEquals(models.data.find((c) => c.id === "policy-v7")!.root, routing.current!.dir);
      } else {
        assertEquals(names, [BUILTIN_MODEL_DIR]);
        assertEquals((await (await srv.request("/is_paused")).json()).is_paused, false);
      }
      const entries = await readdir(root);
      assert(!entries.some((e) => e.startsWith(".tmp-")), `temporary directories left: ${entries}`);
      assertEquals(entries, ["policy-v7"]);
      assert(stages.includes(kind === "lora" ? "loaded:7" : "resumed:7"), stages.join(" "));
      // the restarted server keeps taking pushes; the next version replaces the route
      const snap8 = await snapshotAt(policy, 8);
      const report8 = await run(pusher.push(snap8));
      assertEquals([report8.version, routing.current?.version], [8, 8]);
      if (kind === "full") {
        // a push whose verification fails puts the previous version back (here the probe asks
        // for a model the server does not have)
        const broken = makeFullPusher({ ...common, modelName: "no-such-model", keepDirs: 2 });
        const e = await flip(broken.push(await snapshotAt(policy, 9)));
        assert(e._tag === "SyncError" && e.message.includes("probe"), e.message);
        assertEquals(routing.current?.version, 8);
        const back = await run(pusher.push(snap8)); // re-verifies v8 on the server
        assert(
          back.logpDiffMax !== null && back.logpDiffMax <= TOL,
          `v8 not serving: ${back.logpDiffMax}`,
        );
      }
      // a malformed request to our server is a typed 400 with vLLM's envelope; it keeps serving
      const bad = await flip(client.postJson("/v1/completions", { prompt: 5 }));
      assert(bad instanceof VllmHttpError);
      assertEquals([bad.status, bad.reason, bad.type, bad.param, bad.attempts], [
        400,
        "status",
        "BadRequestError",
        "prompt",
        1,
      ]);
      assertEquals(await run(client.healthy()), true);
    } finally {
      if (restarted) await (await restarted).stop();
      await srv.stop();
      await close();
      await Deno.remove(root, { recursive: true });
    }
  });
}

/** A throwaway HTTP server answering every request badly (a broken remote server). */
const brokenServer = (mode: "500" | "503" | "404" | "garbage") => {
  const hits: string[] = [];
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    await req.body?.cancel();
    hits.push(new URL(req.url).pathname);
    if (mode === "500") {
      return Response.json({
        error: {
          message: "CUDA error: an illegal memory access",
          type: "InternalServerError",
          param: null,
          code: 500,
        },
      }, {
        status: 500,
      });
    }
    if (mode === "503") {
      return Response.json({
        error: { message: "engine busy", type: "ServiceUnavailable", param: null, code: 503 },
      }, { status: 503 });
    }
    if (mode === "404") return Response.json({ detail: "Not Found" }, { status: 404 });
    return new Response("<html><body>502 gateway hiccup</body></html>", {
      status: 200,
      headers: { "content-type": "text/html" },
    });
  });
  return { url: `http://127.0.0.1:${server.addr.port}`, hits, stop: () => server.shutdown() };
};

Deno.test("fault: a broken remote (503 / 500 / 404 / garbage) gives typed errors; policy version and snapshot digest intact", async () => {
  const backend = cpuBackend();
  const base = await run(loadBase(BUILTIN_MODEL_DIR));
  const { policy, close } = await makePolicy(backend, base, "lora", 9);
  const root = await Deno.makeTempDir();
  try {
    const snap = await snapshotAt(policy, 4);
    const digest = snap.digest;
    const pusherOn = (url: string, kind: "lora" | "full", routing: Routing) => {
      const client = makeVllmClient(url, { retry: FAST_RETRY });
      const common = { client, backend, routing, root, verify: verifySettings(base), target: "t" };
      return kind === "lora"
        ? makeLoraPusher({ ...common, baseModel: base.dir, keepLoaded: 2 })
        : makeFullPusher({ ...common, modelName: "m", keepDirs: 2 });
    };
    const intact = async (routing: Routing) => {
      assertEquals(policy.version, 4);
      assertEquals(snap.digest, digest);
      await run(snap.verify());
      assertEquals(routing.current, null);
      assertEquals((await readdir(root)).filter((e) => !e.startsWith(".")), []); // nothing half-applied
      assertEquals((await readdir(root)).filter((e) => e.startsWith(".tmp-")), []);
    };

    // 503 (not now): load and pause are safe to repeat, so retried (FAST_RETRY: 3 retries);
    // 500 with vLLM's envelope (what recent vLLM answers to an adapter it cannot load, however
    // often it is sent): one attempt; both end in a typed SyncError
    for (const status of ["503", "500"] as const) {
      const broken = brokenServer(status);
      for (const kind of ["lora", "full"] as const) {
        broken.hits.length = 0;
        const routing = new Routing();
        const e = await flip(pusherOn(broken.url, kind, routing).push(snap));
        assertEquals(e._tag, "SyncError");
        const cause = (e as { cause?: unknown }).cause;
        assert(cause instanceof VllmHttpError, String(cause));
        const attempts = status === "503" ? 4 : 1;
        assertEquals(
          [cause.status, cause.type, cause.attempts],
          status === "503"
            ? [503, "ServiceUnavailable", attempts]
            : [500, "InternalServerError", attempts],
        );
        assert(
          e.message.includes(status === "503" ? "engine busy" : "illegal memory access"),
          e.message,
        );
        const route = kind === "lora" ? "/v1/load_lora_adapter" : "/pause";
        assertEquals(broken.hits.filter((h) => h === route).length, attempts);
        await intact(routing);
      }
      if (status === "503") await broken.stop();
    }
    const s500 = brokenServer("500");
    // a whole training run against it fails typed before any step, with the server's message
    const out = await Deno.makeTempDir();
    const cfg = await run(
      decodeTrainConfig({
        backend: "cpu",
        quiet: true,
        evalSize: 10,
        engine: "server",
        serverUrl: s500.url,
        steps: 1,
        outputDir: out,
      }),
    );
    const te = await flip(trainOn(cfg, makeServerLayer({ retry: FAST_RETRY })));
    assertEquals(te._tag, "SyncError");
    assert(te.message.includes("500"), te.message);
    await Deno.remove(out, { recursive: true });
    await s500.stop();

    // 404 {"detail": "Not Found"}: not retried, with a hint about the server's flags
    const s404 = brokenServer("404");
    {
      const routing = new Routing();
      const e = await flip(pusherOn(s404.url, "lora", routing).push(snap));
      const cause = (e as { cause?: unknown }).cause as VllmHttpError;
      assertEquals([e._tag, cause.status, cause.message.includes("Not Found"), cause.attempts], [
        "SyncError",
        404,
        true,
        1,
      ]);
      assert(e.message.includes("--enable-lora"), e.message);
      const ef = await flip(pusherOn(s404.url, "full", routing).push(snap));
      assert(ef.message.includes("VLLM_SERVER_DEV_MODE"), ef.message);
      await intact(routing);
    }
    await s404.stop();

    // garbage with status 200: rollouts fail typed (decode), a full push fails at verification
    const sg = brokenServer("garbage");
    {
      const routing = new Routing();
      routing.set({ version: 3, kind: "full", model: "m", cacheSalt: "v3", dir: "/nonexistent" });
      const engine = makeServerRolloutEngine(
        ReplicaSet.single(makeVllmClient(sg.url, { retry: FAST_RETRY }), routing),
      );
      const re = await flip(
        engine.generate([{
          prompt: [1, 3],
          n: 2,
          maxTokens: 2,
          temperature: 1,
          topP: 1,
          topK: 0,
          seed: 1,
          stopTokenIds: [2],
        }]),
      );
      assertEquals(re._tag, "RolloutError");
      const rc = re.cause as VllmHttpError;
      assertEquals([rc.reason, rc.status], ["decode", 200]);
      assertEquals(routing.inflight(3), 0);
      const fe = await flip(pusherOn(sg.url, "full", routing).push(snap));
      assertEquals(fe._tag, "SyncError");
      assert(fe.message.includes("not JSON"), fe.message);
      assertEquals(routing.current?.version, 3); // the previous route stays
      assertEquals(policy.version, 4);
      await run(snap.verify());
    }
    await sg.stop();
  } finally {
    await close();
    await Deno.remove(root, { recursive: true });
  }
});

// ---- 4. units -----------------------------------------------------------------------------------

Deno.test("envelopes: nested, flat and FastAPI detail shapes, and non-JSON bodies", () => {
  assertEquals(
    parseErrorEnvelope(
      400,
      JSON.stringify({
        error: { message: "bad n", type: "BadRequestError", param: "n", code: 400 },
      }),
    ),
    { message: "bad n", type: "BadRequestError", param: "n", code: 400 },
  );
  assertEquals(
    parseErrorEnvelope(
      400,
      JSON.stringify({
        object: "error",
        message: "old style",
        type: "BadRequestError",
        param: null,
        code: 400,
      }),
    ),
    { message: "old style", type: "BadRequestError", param: null, code: 400 },
  );
  assertEquals(parseErrorEnvelope(404, JSON.stringify({ detail: "Not Found" })), {
    message: "Not Found",
    type: null,
    param: null,
    code: null,
  });
  assertEquals(
    parseErrorEnvelope(
      422,
      JSON.stringify({
        detail: [{ loc: ["body", "prompt"], msg: "field required", type: "missing" }],
      }),
    ).message,
    "body.prompt: field required",
  );
  assertEquals(
    parseErrorEnvelope(502, "<html>bad gateway</html>").message,
    "<html>bad gateway</html>",
  );
  assertEquals(parseErrorEnvelope(503, "").message, "HTTP 503");
  assertEquals(parseErrorEnvelope(500, "[1,2]").message, "[1,2]");
  assertEquals([
    usesNestedErrorEnvelope("0.10.1"),
    usesNestedErrorEnvelope("0.9.2"),
    usesNestedErrorEnvelope("0.11.0+lorafold"),
    usesNestedErrorEnvelope("x"),
  ], [
    true,
    false,
    true,
    null,
  ]);
});

Deno.test("retry schedule: exponential, capped, bounded; idempotent requests retry transport failures and 502/503/504, other POSTs only when never sent, 500 never", async () => {
  const delays = await run(Effect.gen(function* () {
    const step = yield* Schedule.toStep(
      retrySchedule({ baseMs: 100, factor: 2, maxDelayMs: 1000, maxRetries: 6 }),
    );
    const out: number[] = [];
    for (let i = 0; i < 10; i++) {
      const ex = yield* Effect.exit(step(0, undefined));
      if (Exit.isFailure(ex)) break;
      out.push(Duration.toMillis(ex.value[1]));
    }
    return out;
  }));
  assertEquals(delays, [100, 200, 400, 800, 1000, 1000]);
  const err = (reason: VllmHttpError["reason"], status: number) =>
    new VllmHttpError({
      method: "POST",
      path: "/x",
      server: null,
      status,
      reason,
      type: null,
      param: null,
      code: null,
      detail: "m",
      timeoutMs: null,
      body: null,
      attempts: 1,
    });
  const failures = [
    err("connection", 0),
    new VllmHttpError({ ...err("connection", 0), requestSent: false }),
    err("timeout", 0),
    err("status", 500),
    err("status", 502),
    err("status", 503),
    err("status", 504),
    err("status", 400),
    err("status", 404),
    err("decode", 200),
  ];
  // idempotent requests: transport failures and "not now" statuses; never 500 or 4xx
  assertEquals(failures.map((e) => isRetryable(e, true)), [
    true,
    true,
    true,
    false,
    true,
    true,
    true,
    false,
    false,
    false,
  ]);
  // other requests: only when the request provably never reached the server
  assertEquals(failures.map((e) => isRetryable(e, false)), [
    false,
    true,
    false,
    false,
    false,
    false,
    false,
    false,
    false,
    false,
  ]);
  // against a real socket: a refused connection is retried maxRetries times, then typed; a POST
  // that is not idempotent is too (it never left), and says so
  const port = freePort();
  const refused = makeVllmClient(`http://127.0.0.1:${port}`, { retry: FAST_RETRY });
  const e = await flip(refused.getJson("/v1/models"));
  assertEquals([e.reason, e.status, e.attempts], ["connection", 0, 4]);
  const ep = await flip(refused.postJson("/collective_rpc", {}));
  assertEquals([ep.reason, ep.requestSent, ep.attempts], ["connection", false, 4]);
  // a connection closed after the request was read: the POST may have been applied, so it is
  // sent once; marked idempotent, it is retried
  let accepted = 0;
  const closer = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const closing = (async () => {
    for await (const c of closer) {
      accepted++;
      await c.read(new Uint8Array(4096)).catch(() => null);
      c.close();
    }
  })();
  const resetting = makeVllmClient(`http://127.0.0.1:${(closer.addr as Deno.NetAddr).port}`, {
    retry: FAST_RETRY,
  });
  const once = await flip(resetting.postJson("/v1/load_lora_adapter", {}));
  assertEquals([once.reason, once.requestSent, once.attempts, accepted], [
    "connection",
    true,
    1,
    1,
  ]);
  const again = await flip(resetting.postJson("/resume", {}, { idempotent: true }));
  assertEquals([again.reason, again.attempts], ["connection", 4]);
  closer.close();
  await closing.catch(() => {});
  // a slow answer times out per attempt
  const slow = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async () => {
    await new Promise((r) => setTimeout(r, 300));
    return new Response("{}");
  });
  const t = await flip(
    makeVllmClient(`http://127.0.0.1:${slow.addr.port}`, { timeoutMs: 50 }).getJson("/x", {
      retry: false,
    }),
  );
  assertEquals([t.reason, t.attempts], ["timeout", 1]);
  await new Promise((r) => setTimeout(r, 350));
  await slow.shutdown();
});

Deno.test("completion decoding: token_ids, token-id logprob tokens, and malformed answers", async () => {
  const ok = await run(decodeCompletion({
    choices: [
      {
        index: 1,
        finish_reason: "stop",
        token_ids: [5, 2],
        logprobs: { token_logprobs: [-0.5, -0.1], tokens: ["a", "b"] },
      },
      {
        index: 0,
        finish_reason: "length",
        token_ids: null,
        logprobs: { token_logprobs: [-1], tokens: ["token_id:7"] },
      },
    ],
  }));
  assertEquals(ok.map((c) => [c.index, c.tokens, c.logprobs, c.finishReason]), [
    [1, [5, 2], [-0.5, -0.1], "stop"],
    [0, [7], [-1], "length"],
  ]);
  // vLLM's repetition detection keeps its own finish reason; -9999.0 (clamped -inf) is unknown
  const rep = await run(decodeCompletion({
    choices: [{
      index: 0,
      finish_reason: "repetition",
      token_ids: [5, 5, 5],
      logprobs: { token_logprobs: [-0.5, -9999.0, -1e5] },
    }],
  }));
  assertEquals(rep[0].finishReason, "repetition");
  assertEquals(rep[0].logprobs!.map((x) => Number.isNaN(x)), [false, true, true]);
  for (
    const bad of [
      {},
      {
        choices: [{ index: 0, token_ids: [1, 2], logprobs: { token_logprobs: [-1] } }],
      },
      { choices: [{ index: 0 }] },
      {
        // an unknown reason (a failed generation) is not silently "length"
        choices: [{ index: 0, finish_reason: "error", token_ids: [1], logprobs: null }],
      },
    ]
  ) {
    const e = await flip(decodeCompletion(bad));
    assertEquals([e._tag, e.reason], ["VllmHttpError", "decode"]);
  }
});
