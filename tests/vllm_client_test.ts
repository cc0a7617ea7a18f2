/**
 * The vLLM client against the vLLM versions it must handle, end to end: a REAL lorafold server
 * process on loopback behind a small recording proxy (a Deno.serve) that makes it look like one
 * vLLM version or another, the way those versions differ on the wire (protocols.md, checked
 * against vLLM's source):
 *
 * - "newest": /pause takes `mode` (PR #32351), FastAPI's /openapi.json lists it;
 * - "middle": /pause without `mode` (PR #28037 .. #32351): the proxy drops `mode` from the query,
 *   as FastAPI ignores an unknown parameter, so a bare `mode=wait` aborts in-flight requests;
 *   `wait_for_inflight_requests=true` waits;
 * - "middle-no-docs": the same, served with --disable-fastapi-docs (no /openapi.json);
 * - "old": dev mode on, but no /pause, /resume, /is_paused (before PR #28037);
 * - "no-dev": VLLM_SERVER_DEV_MODE unset: no dev routes at all.
 *
 * What is checked: the exact request sequence of a full-weight push (pause → reload → reset →
 * resume, then the verification probe); that another client's in-flight request survives the
 * pause on every /pause version (and, as the negative control, that the old client's bare
 * `mode=wait` aborts it on "middle"); the fallback to `wait_for_inflight_requests=true` when
 * `mode=wait` is rejected; a clean refusal with the exact flag or vLLM change needed;
 * LoRA loads retried only where that is safe (a lost answer: retried, recognised as our own load,
 * applied once; a 500: one attempt); finish_reason "repetition" and vLLM's clamped -9999.0
 * logprobs through the rollout engine, verification and the importance-sampling correction.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { Effect, Exit, Scope } from "effect";
import { type BackendShape, cpuBackend } from "../src/backend/backend.ts";
import { initLora, type LoraConfig } from "../src/lora/adapter.ts";
import { Rng } from "../src/model/rng.ts";
import { type BaseModel, loadBase } from "../src/model/loader.ts";
import { Policy } from "../src/train/policy.ts";
import { arithmeticGrpoTask, BUILTIN_MODEL_DIR } from "../src/task/arithmetic_task.ts";
import { makeVllmClient, type VllmClient } from "../src/vllm/client.ts";
import { detectPauseSupport, type PauseForm, pauseFormFromOpenApi } from "../src/vllm/pause.ts";
import { makeFullPusher, reloadCheckpoint } from "../src/push/full.ts";
import { makeLoraPusher } from "../src/push/lora.ts";
import { defaultProbePrompt, probeTokenDiff, type VerifySettings } from "../src/push/verify.ts";
import { makeServerRolloutEngine } from "../src/rollout/server.ts";
import { ReplicaSet } from "../src/vllm/replicas.ts";
import { Routing } from "../src/vllm/routing.ts";
import type { Snapshot } from "../src/snapshot/snapshot.ts";
import { decodeTrainConfig } from "../src/app/config.ts";
import { runTraining } from "../src/app/trainer.ts";
import { makeServerLayer } from "../src/app/server_layer.ts";
import {
  type ServerProcess,
  startServer,
  tinyServerConfig,
  writeTinyCheckpoint,
} from "./support/server_process.ts";
import { testOptimizer } from "./support/tiny.ts";

const run = <A, E>(e: Effect.Effect<A, E>): Promise<A> => Effect.runPromise(e);
const flip = <A, E>(e: Effect.Effect<A, E>): Promise<E> => Effect.runPromise(Effect.flip(e));

const SERVER_ENV = { VLLM_ALLOW_RUNTIME_LORA_UPDATING: "1", VLLM_SERVER_DEV_MODE: "1" };
const FAST_RETRY = { baseMs: 2, factor: 2, maxDelayMs: 20, maxRetries: 3 };
const TOL = 1e-3;

// ---- the version-emulating recording proxy ---------------------------------------------------

type Emulated = "newest" | "middle" | "middle-no-docs" | "old" | "no-dev";

const PAUSE_ROUTES = ["/pause", "/resume", "/is_paused"];
const DEV_ROUTES = [...PAUSE_ROUTES, "/collective_rpc", "/reset_prefix_cache"];

/** The /openapi.json a version serves (only what the client reads: paths and /pause's query). */
const openApi = (kind: Emulated): unknown => {
  const q = (name: string) => ({ name, in: "query", required: false });
  const paths: Record<string, unknown> = {
    "/v1/completions": { post: {} },
    "/v1/models": { get: {} },
    "/version": { get: {} },
  };
  if (kind !== "no-dev") {
    paths["/collective_rpc"] = { post: {} };
    paths["/reset_prefix_cache"] = { post: {} };
  }
  if (kind === "newest") {
    paths["/pause"] = {
      post: { parameters: [q("mode"), q("wait_for_inflight_requests"), q("clear_cache")] },
    };
  }
  if (kind === "middle") {
    paths["/pause"] = { post: { parameters: [q("wait_for_inflight_requests"), q("clear_cache")] } };
  }
  if (kind === "newest" || kind === "middle") {
    paths["/resume"] = { post: {} };
    paths["/is_paused"] = { get: {} };
  }
  return { openapi: "3.1.0", info: { title: "vLLM" }, paths };
};

interface ProxyHooks {
  /** Rewrites a /v1/completions answer (the request body is given). */
  completion?: (answer: Record<string, unknown>, request: Record<string, unknown>) => void;
  /** Answers a POST /pause (its query given) instead of the server; null: pass through. */
  pause?: (query: URLSearchParams) => Response | null;
  /** Answers a POST /v1/load_lora_adapter instead of (or after) the server; null: pass through. */
  load?: (attempt: number, forward: () => Promise<Response>) => Promise<Response> | null;
}

const notFound = () => Response.json({ detail: "Not Found" }, { status: 404 });

/** A proxy in front of `upstream` that looks like vLLM `kind` and records every request line. */
const versionProxy = (upstream: string, kind: Emulated, hooks: ProxyHooks = {}) => {
  const lines: string[] = [];
  let loads = 0;
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    const u = new URL(req.url);
    lines.push(`${req.method} ${u.pathname}${u.search}`);
    const body = req.method === "GET" ? undefined : new Uint8Array(await req.arrayBuffer());
    if (u.pathname === "/openapi.json") {
      return kind === "middle-no-docs" ? notFound() : Response.json(openApi(kind));
    }
    if (u.pathname === "/version") return Response.json({ version: `0.0.0+emulated-${kind}` });
    if (
      (kind === "old" && PAUSE_ROUTES.includes(u.pathname)) ||
      (kind === "no-dev" && DEV_ROUTES.includes(u.pathname))
    ) {
      return notFound();
    }
    const search = new URLSearchParams(u.search);
    if (u.pathname === "/pause" && hooks.pause) {
      const answer = hooks.pause(search);
      if (answer) return answer;
    }
    // FastAPI drops query parameters a route does not declare
    if (u.pathname === "/pause" && kind.startsWith("middle")) search.delete("mode");
    const qs = search.toString();
    const forward = () =>
      fetch(`${upstream}${u.pathname}${qs ? `?${qs}` : ""}`, {
        method: req.method,
        headers: { "content-type": req.headers.get("content-type") ?? "application/json" },
        body,
      });
    if (u.pathname === "/v1/load_lora_adapter" && hooks.load) {
      const answer = hooks.load(++loads, forward);
      if (answer) return await answer;
    }
    const res = await forward();
    const type = res.headers.get("content-type") ?? "application/json";
    if (u.pathname === "/v1/completions" && hooks.completion && res.status === 200) {
      const answer = await res.json() as Record<string, unknown>;
      hooks.completion(answer, JSON.parse(new TextDecoder().decode(body)));
      return Response.json(answer);
    }
    return new Response(await res.arrayBuffer(), {
      status: res.status,
      headers: { "content-type": type },
    });
  });
  return {
    url: `http://127.0.0.1:${server.addr.port}`,
    lines,
    /** Requests other than reads and probes: what changed the server. */
    posts: () => lines.filter((l) => l.startsWith("POST ")),
    stop: () => server.shutdown(),
  };
};

// ---- policies over the built-in model ----------------------------------------------------------

const LORA: LoraConfig = {
  r: 4,
  alpha: 8,
  dropout: 0,
  targetModules: ["q_proj", "v_proj", "down_proj"],
  useRslora: false,
};

/** A LoRA policy over the built-in model with a non-zero (random) B, in its own scope. */
const makePolicy = async (backend: BackendShape, base: BaseModel, seed: number) => {
  const scope = await run(Scope.make());
  const init = initLora(base.config, LORA, seed);
  const rng = new Rng(seed + 99);
  for (const { b } of init.modules.values()) {
    for (let i = 0; i < b.data.length; i++) b.data[i] = (rng.next() - 0.5) * 0.5;
  }
  const policy = await run(
    Scope.provide(scope)(Policy.make(backend, base.config, base.weights, {
      mode: "lora",
      lora: LORA,
      seed,
      optimizer: testOptimizer,
    }, init)),
  );
  return { policy, close: () => run(Scope.close(scope, Exit.void)) };
};

const snapshotAt = async (policy: Policy, version: number): Promise<Snapshot> => {
  policy.version = version;
  return await run(policy.snapshot());
};

const verifySettings = (base: BaseModel): VerifySettings => ({
  policy: "fail",
  tolerance: TOL,
  probePrompt: defaultProbePrompt(base.tokenizer),
  probeTokens: 4,
});

const startBuiltin = (): Promise<ServerProcess> =>
  startServer({ modelDir: BUILTIN_MODEL_DIR, args: ["--enable-lora"], env: SERVER_ENV });

// ---- units ---------------------------------------------------------------------------------------

Deno.test("pause form from the OpenAPI schema of each vLLM version; unknown clamped probe tokens", () => {
  const forms = (["newest", "middle", "old", "no-dev"] as const).map((k) =>
    pauseFormFromOpenApi(openApi(k))
  );
  assertEquals(forms, [
    { form: "mode", devRoutes: true },
    { form: "legacy", devRoutes: true },
    { form: "absent", devRoutes: true },
    { form: "absent", devRoutes: false },
  ]);
  assertEquals(pauseFormFromOpenApi({ detail: "Not Found" }), null);
  // a clamped engine value (NaN) is no number: it agrees only with a trainer logprob at the clamp
  assertEquals(
    [probeTokenDiff(-2.5, -2.25), probeTokenDiff(-2.5, NaN), probeTokenDiff(-1e5, NaN)],
    [0.25, Infinity, 0],
  );
});

// ---- full-weight pushes across versions --------------------------------------------------------

Deno.test("full push: the exact request sequence (pause in the version's form → reload → reset → resume, then the probe) on every /pause version; no /pause is refused before anything is written or sent", async () => {
  const backend = cpuBackend();
  const base = await run(loadBase(BUILTIN_MODEL_DIR));
  const { policy, close } = await makePolicy(backend, base, 3);
  await using srv = await startBuiltin();
  const root = await Deno.makeTempDir();
  try {
    const expectedPause: Record<string, string> = {
      newest: "POST /pause?mode=wait",
      middle: "POST /pause?wait_for_inflight_requests=true",
      "middle-no-docs": "POST /pause?mode=wait&wait_for_inflight_requests=true",
    };
    let version = 1;
    for (const kind of ["newest", "middle", "middle-no-docs"] as const) {
      const proxy = versionProxy(srv.url, kind);
      const routing = new Routing();
      const pusher = makeFullPusher({
        client: makeVllmClient(proxy.url, { retry: FAST_RETRY }),
        backend,
        routing,
        root,
        modelName: BUILTIN_MODEL_DIR,
        verify: verifySettings(base),
        keepDirs: 2,
        target: kind,
      });
      const report = await run(pusher.push(await snapshotAt(policy, version)));
      assert(report.logpDiffMax !== null && report.logpDiffMax <= TOL, `${kind}: verify diff`);
      assertEquals(proxy.posts(), [
        expectedPause[kind],
        "POST /collective_rpc",
        "POST /reset_prefix_cache",
        "POST /resume",
        "POST /v1/completions", // the verification probe, after the resume
      ]);
      // the form was read (schema, else the /is_paused probe) before the pause was sent
      const pauseAt = proxy.lines.indexOf(expectedPause[kind]);
      assert(proxy.lines.slice(0, pauseAt).includes("GET /openapi.json"), proxy.lines.join(" "));
      if (kind === "middle-no-docs") {
        assert(proxy.lines.slice(0, pauseAt).includes("GET /is_paused"), proxy.lines.join(" "));
      }
      assertEquals(routing.current?.version, version);
      assertEquals((await (await srv.request("/is_paused")).json()).is_paused, false);
      await proxy.stop();
      version++;
    }
    const before = (await readdir(root)).sort();
    for (const [kind, needs] of [["old", "PR #28037"], ["no-dev", "VLLM_SERVER_DEV_MODE=1"]]) {
      const proxy = versionProxy(srv.url, kind as Emulated);
      const routing = new Routing();
      const pusher = makeFullPusher({
        client: makeVllmClient(proxy.url, { retry: FAST_RETRY }),
        backend,
        routing,
        root,
        modelName: BUILTIN_MODEL_DIR,
        verify: verifySettings(base),
        keepDirs: 2,
        target: kind,
      });
      const e = await flip(pusher.push(await snapshotAt(policy, version++)));
      assertEquals(e._tag, "SyncError");
      assert(e.message.includes(needs), `${kind}: ${e.message}`);
      assert(e.message.includes("0.0.0+emulated-"), `${kind}: no version in ${e.message}`);
      assertEquals(proxy.posts(), []); // nothing sent that changes the server
      assertEquals((await readdir(root)).sort(), before); // nothing written
      assertEquals(routing.current, null);
      await proxy.stop();
    }
  } finally {
    await close();
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("pause waits for another client's in-flight request on every /pause version; the old client's bare mode=wait aborts it on a vLLM without mode", async () => {
  const dir = await Deno.makeTempDir();
  await writeTinyCheckpoint(dir, { config: tinyServerConfig({ maxPositionEmbeddings: 4096 }) });
  await using srv = await startServer({ modelDir: dir, args: [], env: SERVER_ENV });
  const LONG = 1500;
  /** Another client's long completion, sent straight to the server. */
  const longRequest = async () => {
    const r = await srv.request("/v1/completions", {
      method: "POST",
      body: { model: dir, prompt: [1, 5, 6], max_tokens: LONG, ignore_eos: true, temperature: 0 },
    });
    const j = await r.json() as { choices: { finish_reason: string; text: string }[] };
    return { status: r.status, finish: j.choices?.[0]?.finish_reason };
  };
  /** Runs `pause` while a long request is in flight; the request's outcome. */
  const during = async (pause: (client: VllmClient) => Promise<void>, proxyUrl: string) => {
    const other = longRequest();
    await new Promise((r) => setTimeout(r, 400)); // admitted and generating (it runs for seconds)
    await pause(makeVllmClient(proxyUrl, { retry: FAST_RETRY }));
    return await other;
  };
  try {
    for (const kind of ["newest", "middle", "middle-no-docs"] as const) {
      const proxy = versionProxy(srv.url, kind);
      const forms: PauseForm[] = [];
      const outcome = await during(async (client) => {
        const support = await run(detectPauseSupport(client));
        forms.push(support.form);
        // the server's own model directory reloaded: pause(wait) → reload → reset → resume
        await run(reloadCheckpoint(client, null, 0, undefined, support.form));
      }, proxy.url);
      assertEquals(outcome, { status: 200, finish: "length" }, `${kind} (form ${forms[0]})`);
      await proxy.stop();
    }
    // negative control: what a client that always sends mode=wait does to a vLLM without mode
    const middle = versionProxy(srv.url, "middle");
    const aborted = await during(async (client) => {
      await run(client.request("POST", "/pause?mode=wait", {}));
      await run(client.request("POST", "/resume", {}));
    }, middle.url);
    assertEquals(aborted.finish, "abort");
    assertEquals(middle.posts(), ["POST /pause?mode=wait", "POST /resume"]);
    await middle.stop();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("pause fallback: a server that rejects mode=wait as a bad query is paused with wait_for_inflight_requests=true, never with a bare (aborting) /pause", async () => {
  await using srv = await startBuiltin();
  const proxy = versionProxy(srv.url, "newest", {
    pause: (q) =>
      q.has("mode")
        ? Response.json({
          detail: [{
            loc: ["query", "mode"],
            msg: "Input should be 'abort'",
            type: "literal_error",
          }],
        }, { status: 422 })
        : null,
  });
  try {
    const client = makeVllmClient(proxy.url, { retry: FAST_RETRY });
    await run(reloadCheckpoint(client, null, 0, undefined, "mode"));
    assertEquals(proxy.posts(), [
      "POST /pause?mode=wait",
      "POST /pause?wait_for_inflight_requests=true",
      "POST /collective_rpc",
      "POST /reset_prefix_cache",
      "POST /resume",
    ]);
    assertEquals((await (await srv.request("/is_paused")).json()).is_paused, false);
  } finally {
    await proxy.stop();
  }
});

// ---- LoRA loads: retried only where that is safe -------------------------------------------------

Deno.test("LoRA load: a lost answer is retried and recognised as our own load (applied once); a 500 is sent once", async () => {
  const backend = cpuBackend();
  const base = await run(loadBase(BUILTIN_MODEL_DIR));
  const { policy, close } = await makePolicy(backend, base, 7);
  await using srv = await startBuiltin();
  const root = await Deno.makeTempDir();
  try {
    // the first load reaches the server, its answer is lost (a 503 from the proxy in its place)
    const lost = versionProxy(srv.url, "newest", {
      load: (attempt, forward) =>
        attempt === 1
          ? forward().then(() =>
            Response.json({
              error: { message: "upstream timed out", type: "ServiceUnavailable", code: 503 },
            }, { status: 503 })
          )
          : null,
    });
    const routing = new Routing();
    const pusher = makeLoraPusher({
      client: makeVllmClient(lost.url, { retry: FAST_RETRY }),
      backend,
      routing,
      root,
      baseModel: base.dir,
      verify: verifySettings(base),
      keepLoaded: 2,
      target: "t",
    });
    const report = await run(pusher.push(await snapshotAt(policy, 1)));
    assert(report.logpDiffMax !== null && report.logpDiffMax <= TOL);
    // sent twice, the second answered "already loaded" and checked against the card's root
    assertEquals(lost.posts().filter((l) => l === "POST /v1/load_lora_adapter").length, 2);
    assert(lost.lines.includes("GET /v1/models"), lost.lines.join(" "));
    const cards = (await (await srv.request("/v1/models")).json() as {
      data: { id: string; root: string }[];
    }).data;
    assertEquals(cards.filter((c) => c.id === "policy-v1").map((c) => c.root), [
      routing.current!.dir,
    ]);
    await lost.stop();

    // a 500 (recent vLLM's answer to an adapter it cannot load, e.g. rank > --max-lora-rank)
    const failing = versionProxy(srv.url, "newest", {
      load: () =>
        Promise.resolve(Response.json({
          error: {
            message: "LoRA rank 64 is greater than max_lora_rank 16.",
            type: "InternalServerError",
            param: null,
            code: 500,
          },
        }, { status: 500 })),
    });
    const strict = makeLoraPusher({
      client: makeVllmClient(failing.url, { retry: FAST_RETRY }),
      backend,
      routing,
      root,
      baseModel: base.dir,
      verify: verifySettings(base),
      keepLoaded: 2,
      target: "t",
    });
    const e = await flip(strict.push(await snapshotAt(policy, 2)));
    assert(e._tag === "SyncError" && e.message.includes("max_lora_rank"), e.message);
    assertEquals(failing.posts(), ["POST /v1/load_lora_adapter"]);
    assertEquals(routing.current?.version, 1); // the previous version keeps serving
    await failing.stop();
  } finally {
    await close();
    await Deno.remove(root, { recursive: true });
  }
});

// ---- finish_reason "repetition" and clamped logprobs ---------------------------------------------

Deno.test('finish_reason "repetition" and vLLM\'s clamped -9999.0 logprob: kept distinct by the rollout engine; a clamped probe token fails verification instead of counting as -9999', async () => {
  const backend = cpuBackend();
  const base = await run(loadBase(BUILTIN_MODEL_DIR));
  const { policy, close } = await makePolicy(backend, base, 11);
  await using srv = await startBuiltin();
  const root = await Deno.makeTempDir();
  let clamp = false;
  const proxy = versionProxy(srv.url, "newest", {
    completion: (answer) => {
      if (!clamp) return;
      const c = (answer.choices as Record<string, unknown>[])[0];
      c.finish_reason = "repetition";
      (c.logprobs as { token_logprobs: number[] }).token_logprobs[0] = -9999.0;
    },
  });
  try {
    const routing = new Routing();
    const client = makeVllmClient(proxy.url, { retry: FAST_RETRY });
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
    await run(pusher.push(await snapshotAt(policy, 1)));
    clamp = true;
    const engine = makeServerRolloutEngine(ReplicaSet.single(client, routing));
    const r = await run(engine.generate([{
      prompt: [1, ...base.tokenizer.encode("12+34=")],
      n: 2,
      maxTokens: 5,
      temperature: 1,
      topP: 1,
      topK: 0,
      seed: 5,
      stopTokenIds: [base.tokenizer.eosId],
    }]));
    const c0 = r.completions[0][0];
    assertEquals(c0.finishReason, "repetition");
    assert(Number.isNaN(c0.logprobs[0]), `clamped logprob read as ${c0.logprobs[0]}`);
    assert(c0.logprobs.slice(1).every(Number.isFinite));
    // the probe's first token "clamped": the engine claims it impossible, the trainer does not
    const e = await flip(pusher.push(await snapshotAt(policy, 2)));
    assertEquals(e._tag, "SyncMismatch");
    assertEquals((e as unknown as { maxAbsDiff: number }).maxAbsDiff, Infinity);
    assertEquals(routing.current?.version, 1);
  } finally {
    await proxy.stop();
    await close();
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("importance-sampling correction: rollout tokens whose engine logprob vLLM clamped get no correction (ratio 1), instead of exp(old + 9999)", async () => {
  await using srv = await startBuiltin();
  // every rollout's first token clamped (rollouts ask ignore_eos false; the probe true)
  const proxy = versionProxy(srv.url, "newest", {
    completion: (answer, request) => {
      if (request.ignore_eos !== false) return;
      for (const c of answer.choices as { logprobs: { token_logprobs: number[] } }[]) {
        c.logprobs.token_logprobs[0] = -9999.0;
      }
    },
  });
  const out = await Deno.makeTempDir();
  try {
    const cfg = await run(decodeTrainConfig({
      backend: "cpu",
      quiet: true,
      evalSize: 10,
      engine: "server",
      serverUrl: proxy.url,
      mode: "lora",
      steps: 2,
      promptsPerStep: 4,
      numGenerations: 4,
      outputDir: out,
      runId: "is",
      vllmImportanceSamplingCorrection: true,
    }));
    await run(
      runTraining(cfg, arithmeticGrpoTask({ heldOutSize: cfg.evalSize }), {
        log: () => {},
        rollout: makeServerLayer({ retry: FAST_RETRY }),
      }),
    );
    const m = (await readFile(join(out, "is", "metrics.jsonl"), "utf8")).trim().split("\n").map(
      (l) => JSON.parse(l) as Record<string, number>,
    );
    assertEquals(m.length, 2);
    for (const x of m) {
      // the known tokens agree (same weights); the clamped ones are not compared as -9999
      assert(
        x["sampling/sampling_logp_difference/max"] < TOL,
        `step ${x.step}: logp difference ${x["sampling/sampling_logp_difference/max"]}`,
      );
      assert(
        Math.abs(x["sampling/importance_sampling_ratio/max"] - 1) < 1e-2,
        `step ${x.step}: importance ratio max ${x["sampling/importance_sampling_ratio/max"]}`,
      );
    }
  } finally {
    await proxy.stop();
    await Deno.remove(out, { recursive: true });
  }
});
