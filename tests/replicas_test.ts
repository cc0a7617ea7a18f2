/**
 * N engine replicas (issue 14 item 2): `--server-url` with several URLs or a file of them, every
 * push fanned out and verified per replica, replicas out of rotation when they fail verification
 * or stop answering (reported, never used), rejoining after a verified push, rollouts balanced by
 * load with prompt affinity, replicas added and removed while training runs.
 *
 * The end-to-end tests run real embedded server processes on loopback and the real trainer; the
 * wrong replica is one whose pushes are TRL v0.15.0's aliasing push (tests/support), so it serves
 * the base weights where the snapshot has an adapter.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Effect, Exit, Scope } from "effect";
import fc from "fast-check";
import { decodeTrainConfig, type TrainConfig } from "../src/app/config.ts";
import { runTraining, type TrainSummary } from "../src/app/trainer.ts";
import { makeServerLayer, type ServerLayerOptions } from "../src/app/server_layer.ts";
import { type EmbeddedServer, startEmbeddedServer } from "../src/app/embedded_server.ts";
import { arithmeticGrpoTask, BUILTIN_MODEL_DIR } from "../src/task/arithmetic_task.ts";
import { makeVllmClient } from "../src/vllm/client.ts";
import {
  parseReplicaFile,
  parseReplicaSource,
  type Replica,
  type ReplicaEvent,
  ReplicaSet,
} from "../src/vllm/replicas.ts";
import { Routing } from "../src/vllm/routing.ts";
import type { PushStage } from "../src/push/lora.ts";
import type { ReplicatedPushTarget } from "../src/push/replicated.ts";
import { aliasingTarget } from "./support/aliasing_push.ts";

// ---- parsing ----------------------------------------------------------------------------------

Deno.test("--server-url: several URLs, or a file of them; bad ones are named", () => {
  assertEquals(parseReplicaSource("http://a:8000"), { kind: "urls", urls: ["http://a:8000"] });
  assertEquals(parseReplicaSource(" http://a:8000/, https://b:9000 http://c:1/v "), {
    kind: "urls",
    urls: ["http://a:8000", "https://b:9000", "http://c:1/v"],
  });
  assertEquals(parseReplicaSource("replicas.txt"), { kind: "file", path: "replicas.txt" });
  assertEquals(parseReplicaSource("http://a:8000,ftp://b"), "'ftp://b' is not an http(s) URL");
  assertEquals(parseReplicaSource("http://a:1,http://a:1/"), "'http://a:1' is given twice");
  assertEquals(parseReplicaSource("  "), "an empty server URL");
  assertEquals(
    parseReplicaFile("# replicas\nhttp://a:1\n\n  http://b:2/  # second\nhttp://a:1\n"),
    ["http://a:1", "http://b:2"],
  );
  assertEquals(parseReplicaFile("http://a:1\nb:2\n"), "line 2: 'b:2' is not an http(s) URL");
  assertEquals(parseReplicaFile("# none\n"), []);
});

Deno.test("train config: serverUrl takes several URLs; a bad one is a typed error naming the option", async () => {
  const cfg = await Effect.runPromise(
    decodeTrainConfig({ engine: "server", server_url: "http://127.0.0.1:1,http://127.0.0.1:2" }),
  );
  assertEquals(cfg.serverUrl, "http://127.0.0.1:1,http://127.0.0.1:2");
  const bad = await Effect.runPromise(
    Effect.flip(decodeTrainConfig({ engine: "server", serverUrl: "http://a:1,htp:/b" })),
  );
  assertEquals(bad._tag, "TrainConfigError");
  assert(bad.message.includes("serverUrl") && bad.message.includes("htp:/b"), bad.message);
});

// ---- selection (property) ---------------------------------------------------------------------

const route = (version: number) => ({
  version,
  kind: "lora" as const,
  model: `policy-v${version}`,
  cacheSalt: `v${version}`,
  dir: `/d/${version}`,
});

Deno.test("property: a call goes only to a serving replica that serves its version, within one call of the least load", async () => {
  const states = ["joining", "serving", "out", "removed"] as const;
  const replicaArb = fc.record({
    state: fc.constantFrom(...states),
    versions: fc.subarray([1, 2, 3]),
    retired: fc.subarray([1, 2, 3]),
    load: fc.nat(40),
  });
  await fc.assert(
    fc.asyncProperty(
      fc.array(replicaArb, { minLength: 1, maxLength: 6 }),
      fc.integer({ min: 1, max: 3 }),
      fc.array(fc.nat(60), { maxLength: 300 }),
      fc.integer({ min: 1, max: 16 }),
      async (specs, version, affinity, size) => {
        const set = new ReplicaSet((u) => makeVllmClient(u));
        const made: Replica[] = [];
        for (const [i, s] of specs.entries()) {
          const r = await Effect.runPromise(set.add(`http://127.0.0.1:${9000 + i}`));
          for (const v of s.versions) r.routing.set(route(v));
          for (const v of s.retired) await Effect.runPromise(r.routing.retire(v, Effect.void));
          r.load = s.load;
          if (s.state === "serving") await Effect.runPromise(set.admit(r, 1));
          if (s.state === "out") await Effect.runPromise(set.drain(r, "unverified", "test"));
          made.push(r);
        }
        for (const [i, s] of specs.entries()) {
          if (s.state === "removed") await Effect.runPromise(set.remove(made[i].url));
        }
        const ok = made.filter((_, i) =>
          specs[i].state === "serving" && specs[i].versions.includes(version) &&
          !specs[i].retired.includes(version)
        );
        const picked = set.pick(version, affinity, size);
        if (ok.length === 0) return picked === null;
        if (picked === null || !ok.includes(picked)) return false;
        const least = Math.min(...ok.map((r) => r.load));
        // the same key and loads pick the same replica (prefix-cache affinity)
        return picked.load <= least + size && set.pick(version, affinity, size) === picked;
      },
    ),
    { numRuns: 300 },
  );
});

Deno.test("affinity: equal loads spread distinct prompts over every replica; one prompt stays on one replica", async () => {
  const set = new ReplicaSet((u) => makeVllmClient(u));
  for (let i = 0; i < 3; i++) {
    const r = await Effect.runPromise(set.add(`http://127.0.0.1:${9100 + i}`));
    r.routing.set(route(1));
    await Effect.runPromise(set.admit(r, 1));
  }
  const counts = new Map<string, number>();
  for (let p = 0; p < 300; p++) {
    const prompt = [1, p % 17, Math.floor(p / 17), 5];
    const r = set.pick(1, prompt, 1)!;
    counts.set(r.url, (counts.get(r.url) ?? 0) + 1);
    assertEquals(set.pick(1, prompt, 1), r);
  }
  assertEquals(counts.size, 3);
  for (const n of counts.values()) {
    assert(n >= 50, `uneven affinity spread ${[...counts.values()]}`);
  }
  // a loaded preferred replica gives way to the least loaded one
  const prompt = [1, 2, 3];
  const preferred = set.pick(1, prompt, 4)!;
  preferred.load = 100;
  const other = set.pick(1, prompt, 4)!;
  assert(other !== preferred);
  assertEquals(other.load, 0);
});

Deno.test("routing: a retired version stays servable while a batch still runs on it, then goes", async () => {
  const routing = new Routing();
  routing.set(route(1));
  routing.set(route(2));
  const pin = routing.begin(1)!;
  let cleaned = 0;
  await Effect.runPromise(routing.retire(1, Effect.sync(() => cleaned++)));
  assertEquals([routing.live(1)?.version, cleaned], [1, 0]);
  await Effect.runPromise(routing.end(pin));
  assertEquals([routing.live(1), cleaned], [null, 1]);
  assertEquals(routing.begin(1), null);
  // a full push replaces the weights: older versions are no longer served
  routing.set({ ...route(3), kind: "full" });
  assertEquals([routing.live(2), routing.live(3)?.version], [null, 3]);
});

// ---- end to end -------------------------------------------------------------------------------

const quiet = () => {};
const config = (over: Record<string, unknown>): Promise<TrainConfig> =>
  Effect.runPromise(
    decodeTrainConfig({ backend: "cpu", quiet: true, evalSize: 50, engine: "server", ...over }),
  );
const metricsOf = async (dir: string): Promise<Record<string, number>[]> =>
  (await readFile(join(dir, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l));

/** Starts `n` embedded servers on the built-in base (CPU) in `scope`. */
const startServers = (scope: Scope.Closeable, n: number, port?: number) =>
  Effect.runPromise(
    Effect.forEach(
      Array.from({ length: n }, () => 0),
      () => startEmbeddedServer({ modelDir: BUILTIN_MODEL_DIR, backend: "cpu", port }),
      { concurrency: "unbounded" },
    ).pipe(Scope.provide(scope)),
  );

/** A counter of a server's GET /metrics. */
const counter = async (url: string, name: string): Promise<number> => {
  const text = await (await fetch(`${url}/metrics`)).text();
  const m = text.match(new RegExp(`^${name}\\{[^}]*\\} ([0-9.]+)$`, "m"));
  assert(m, `${name} not in /metrics of ${url}`);
  return Number(m[1]);
};

const train = (cfg: TrainConfig, options: ServerLayerOptions): Promise<TrainSummary> =>
  Effect.runPromise(
    runTraining(cfg, arithmeticGrpoTask({ heldOutSize: cfg.evalSize }), {
      log: quiet,
      rollout: makeServerLayer(options),
    }) as Effect.Effect<TrainSummary, unknown>,
  );

/** Runs `f` on the first push stage `stage` of version `version` (each replica reports its own). */
const onceAt = (
  version: number,
  stage: PushStage,
  f: () => Promise<void>,
): (s: PushStage, v: number) => Effect.Effect<void> => {
  let done = false;
  return (s, v) =>
    s === stage && v === version && !done
      ? Effect.promise(() => {
        done = true;
        return f();
      })
      : Effect.void;
};

/** A loopback port nothing listens on. */
const closedPort = (): number => {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
};

const waitFor = async (what: string, cond: () => boolean, ms = 60_000): Promise<void> => {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
};

Deno.test("3 replicas, one pushed a wrong adapter: verification takes it out at its first wrong push, rollouts never reach it again, training runs on the other two", async () => {
  const scope = Scope.makeUnsafe();
  const out = await Deno.makeTempDir();
  try {
    const [a, b, bad] = await startServers(scope, 3) as EmbeddedServer[];
    const events: ReplicaEvent[] = [];
    let badTokensAtOut: number | null = null;
    const probeTokens = 4;
    const steps = 6;
    const cfg = await config({
      serverUrl: [a.url, b.url, bad.url].join(","),
      steps,
      promptsPerStep: 8,
      outputDir: out,
      runId: "r",
      verify: "fail",
    });
    const s = await train(cfg, {
      probeTokens,
      makeTarget: (ctx, standard) =>
        ctx.client.baseUrl === bad.url ? aliasingTarget(ctx) : standard,
      onReplicaEvent: (e) =>
        Effect.promise(async () => {
          events.push(e);
          if (e.kind === "out" && e.url === bad.url && badTokensAtOut === null) {
            badTokensAtOut = await counter(bad.url, "vllm:generation_tokens_total");
          }
        }),
    });
    assertEquals(s.steps, steps);
    const outs = events.filter((e) => e.kind === "out");
    assert(outs.length >= 1 && outs.every((e) => e.url === bad.url), JSON.stringify(outs));
    const first = outs[0] as Extract<ReplicaEvent, { kind: "out" }>;
    assertEquals(first.cause, "unverified");
    assert(
      first.reason.includes("push of v1") && first.reason.includes("does not serve"),
      first.reason,
    );
    assert(
      !events.some((e) =>
        e.kind === "serving" && e.url === bad.url && events.indexOf(e) > events.indexOf(first)
      ),
    );
    const m = await metricsOf(s.runDir);
    assertEquals(m.length, steps);
    for (const x of m) {
      // every step: two replicas verified, the wrong one out and reported
      assertEquals([x["replicas/serving"], x["replicas/out"]], [2, 1]);
      assert(x["sync/verify_logp_diff_max"] <= cfg.verifyTolerance, `step ${x.step}`);
    }
    // after it was taken out the wrong server generated only the verification probes of the
    // later pushes (each tried on it, each failed): no rollout reached it
    const badTokens = await counter(bad.url, "vllm:generation_tokens_total");
    assert(badTokensAtOut !== null);
    assert(
      badTokens - badTokensAtOut! <= probeTokens * steps,
      `${badTokens - badTokensAtOut!} tokens generated on the wrong replica after it was out`,
    );
    // the good ones shared the rollouts; the run's adapters were unloaded at its end
    for (const u of [a.url, b.url]) {
      const g = await counter(u, "vllm:generation_tokens_total");
      assert(g > probeTokens * (steps + 1) * 4, `${u} generated only ${g} tokens`);
      const models = await (await fetch(`${u}/v1/models`)).json() as { data: { id: string }[] };
      assertEquals(models.data.filter((c) => c.id.startsWith("policy-v")), []);
    }
  } finally {
    await Effect.runPromise(Scope.close(scope, Exit.void));
    await Deno.remove(out, { recursive: true });
  }
});

Deno.test("a replica killed mid-run: training continues on the other, nothing is lost, and it rejoins after its restart", async () => {
  const scope = Scope.makeUnsafe();
  const restarted = Scope.makeUnsafe();
  const out = await Deno.makeTempDir();
  try {
    const [a, b] = await startServers(scope, 2) as EmbeddedServer[];
    const events: ReplicaEvent[] = [];
    const steps = 10;
    const cfg = await config({
      serverUrl: `${a.url},${b.url}`,
      steps,
      promptsPerStep: 8,
      outputDir: out,
      runId: "k",
    });
    let back: EmbeddedServer | null = null;
    const stages = [
      // during step 3's rollouts (the kill lands while its calls run or are about to)
      onceAt(2, "routed", () => {
        setTimeout(() => Deno.kill(b.pid, "SIGKILL"), 20);
        return Promise.resolve();
      }),
      // restart on the same port
      onceAt(5, "routed", async () => {
        await waitFor("b out", () => events.some((e) => e.kind === "out" && e.url === b.url));
        [back] = await startServers(restarted, 1, b.port) as EmbeddedServer[];
      }),
      // before the last steps, b must be back in rotation
      onceAt(
        7,
        "routed",
        () =>
          waitFor(
            "b serving again",
            () =>
              events.some((e, i) =>
                e.kind === "serving" && e.url === b.url &&
                events.findIndex((x) => x.kind === "out" && x.url === b.url) < i
              ),
          ),
      ),
    ];
    const s = await train(cfg, {
      monitorIntervalMs: 200,
      onStage: (st, v) => Effect.forEach(stages, (f) => f(st, v), { discard: true }),
      onReplicaEvent: (e) => Effect.sync(() => events.push(e)),
    });
    assertEquals(s.steps, steps);
    const m = await metricsOf(s.runDir);
    assertEquals(m.length, steps);
    const outB = events.find((e) => e.kind === "out" && e.url === b.url) as Extract<
      ReplicaEvent,
      { kind: "out" }
    >;
    assertEquals(outB.cause, "unreachable");
    assert(!events.some((e) => e.kind === "out" && e.url === a.url), JSON.stringify(events));
    assert(
      m.some((x) => x["replicas/serving"] === 1),
      "b was never out of rotation in the metrics",
    );
    assertEquals(m.at(-1)!["replicas/serving"], 2);
    // the restarted process served rollouts, not only its catch-up probe
    assert(back !== null);
    const g = await counter((back as EmbeddedServer).url, "vllm:generation_tokens_total");
    assert(g > 4 * (steps + 1), `the restarted replica generated only ${g} tokens`);
  } finally {
    await Effect.runPromise(Scope.close(restarted, Exit.void));
    await Effect.runPromise(Scope.close(scope, Exit.void));
    await Deno.remove(out, { recursive: true });
  }
});

Deno.test("a replica file: replicas added and removed while training runs join after a verified push and leave without losing a call", async () => {
  const scope = Scope.makeUnsafe();
  const out = await Deno.makeTempDir();
  try {
    const [a, b] = await startServers(scope, 2) as EmbeddedServer[];
    const dead = `http://127.0.0.1:${closedPort()}`;
    const file = join(out, "replicas.txt");
    await writeFile(file, `# the run's replicas\n${a.url}\n`);
    const events: ReplicaEvent[] = [];
    let control: ReplicatedPushTarget | null = null;
    let aTokensAfterRemoval: number | null = null;
    const steps = 10;
    const cfg = await config({
      serverUrl: file,
      steps,
      promptsPerStep: 8,
      outputDir: out,
      runId: "f",
    });
    const stages = [
      // b, and a URL nothing answers on (a typo in the file: reported, never waited for)
      onceAt(2, "routed", () => writeFile(file, `${a.url}\n${b.url}\n${dead}\n`)),
      onceAt(4, "routed", async () => {
        await waitFor(
          "b serving",
          () => events.some((e) => e.kind === "serving" && e.url === b.url),
        );
        // the monitor's verdict on the dead URL (a tick every 200 ms; a loaded machine can
        // bring b in before the first), so that removing it below cannot come first
        await waitFor(
          "dead reported out",
          () => events.some((e) => e.kind === "out" && e.url === dead),
        );
        await writeFile(file, `${b.url}\n`);
        await waitFor(
          "a removed",
          () => events.some((e) => e.kind === "removed" && e.url === a.url),
        );
      }),
      // a's last calls (started before its removal) have ended by the next push
      onceAt(6, "routed", async () => {
        aTokensAfterRemoval = await counter(a.url, "vllm:generation_tokens_total");
      }),
    ];
    const s = await train(cfg, {
      monitorIntervalMs: 200,
      onStage: (st, v) => Effect.forEach(stages, (f) => f(st, v), { discard: true }),
      onReplicaEvent: (e) => Effect.sync(() => events.push(e)),
      onReplicas: (t) => Effect.sync(() => (control = t)),
    });
    assertEquals(s.steps, steps);
    assertEquals((await metricsOf(s.runDir)).length, steps);
    assert(control !== null);
    assertEquals((control as ReplicatedPushTarget).replicas.status().map((r) => r.url), [b.url]);
    assertEquals(events.filter((e) => e.kind === "added").map((e) => e.url), [a.url, b.url, dead]);
    const outDead = events.find((e) => e.kind === "out" && e.url === dead) as
      | Extract<ReplicaEvent, { kind: "out" }>
      | undefined;
    assert(outDead !== undefined, JSON.stringify(events));
    assertEquals([outDead.cause, outDead.reason], ["unreachable", "GET /health does not answer"]);
    assert(!events.some((e) => e.kind === "serving" && e.url === dead));
    // b joined with a verified push, then served rollouts; a got nothing after it left
    const g = await counter(b.url, "vllm:generation_tokens_total");
    assert(g > 4 * steps * 2, `b generated only ${g} tokens`);
    assert(aTokensAfterRemoval !== null);
    assertEquals(await counter(a.url, "vllm:generation_tokens_total"), aTokensAfterRemoval);
    // its adapters were unloaded once idle
    const models = await (await fetch(`${a.url}/v1/models`)).json() as { data: { id: string }[] };
    assertEquals(models.data.filter((c) => c.id.startsWith("policy-v")), []);
  } finally {
    await Effect.runPromise(Scope.close(scope, Exit.void));
    await Deno.remove(out, { recursive: true });
  }
});

Deno.test("two runs on one long-lived server: the second run's pushes verify (its own cache_salt: no prefix-cache entry of the first run's same-named versions is reused)", async () => {
  const scope = Scope.makeUnsafe();
  const out = await Deno.makeTempDir();
  try {
    const [srv] = await startServers(scope, 1) as EmbeddedServer[];
    const salts: string[][] = [];
    // other seeds: the same version numbers name other weights in the two runs
    for (const [runId, seed] of [["first", 1], ["second", 2]] as const) {
      const cfg = await config({
        serverUrl: srv.url,
        steps: 4,
        promptsPerStep: 8,
        outputDir: out,
        runId,
        seed,
        verify: "fail",
      });
      const seen: string[] = [];
      const s = await train(cfg, {
        makeTarget: (ctx, standard) => ({
          ...standard,
          push: (snap) =>
            Effect.tap(
              standard.push(snap),
              () => Effect.sync(() => seen.push(ctx.routing.current!.cacheSalt)),
            ),
        }),
      });
      assertEquals(s.steps, 4);
      for (const x of await metricsOf(s.runDir)) {
        assert(x["sync/verify_logp_diff_max"] <= cfg.verifyTolerance, `${runId} step ${x.step}`);
      }
      salts.push(seen);
    }
    // same versions, other salts
    assertEquals(salts[0].length, salts[1].length);
    for (const [i, salt] of salts[0].entries()) {
      assert(salt.endsWith(`-v${i}`) && salts[1][i].endsWith(`-v${i}`), salt);
      assert(salt !== salts[1][i], salt);
    }
  } finally {
    await Effect.runPromise(Scope.close(scope, Exit.void));
    await Deno.remove(out, { recursive: true });
  }
});
