/**
 * The server's continuous-batching scheduler, in process (src/server/inference_engine.ts on the
 * CPU backend, tiny checkpoint): requests join a running batch at a token boundary, leave it at
 * their own, give the same tokens and logprobs alone or batched (seeded), respect
 * --max-num-seqs, and an adapter unloaded while its request runs lets that request finish.
 * Ordering is observed through the scheduler's event hook (token-boundary numbers), never clocks;
 * pause(keep) freezes a batch at a chosen boundary so that joins happen exactly there.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Effect, Exit, Scope } from "effect";
import { cpuBackend } from "../src/backend/backend.ts";
import type { LoraConfig, LoraWeights } from "../src/lora/adapter.ts";
import { targetPaths } from "../src/lora/adapter.ts";
import { savePeftAdapter } from "../src/lora/peft.ts";
import type { ModelConfig } from "../src/model/config.ts";
import { setDeviceSampling } from "../src/model/generate.ts";
import { Rng } from "../src/model/rng.ts";
import { type HostTensor, PROJECTIONS, projectionShape } from "../src/model/weights.ts";
import {
  type InferenceEngine,
  type InferenceEngineOptions,
  makeInferenceEngine,
  type SchedulerEvent,
} from "../src/server/inference_engine.ts";
import type { CompletionRequest, CompletionResponse } from "../src/server/schemas.ts";
import { writeTinyCheckpoint } from "./support/server_process.ts";

interface Harness {
  readonly engine: InferenceEngine;
  readonly config: ModelConfig;
  readonly events: SchedulerEvent[];
  /** Called on every event (after it is logged); replace it per test. */
  onEvent: (e: SchedulerEvent) => void;
  complete(req: CompletionRequest): Promise<CompletionResponse>;
  [Symbol.asyncDispose](): Promise<void>;
}

const open = async (over: Partial<InferenceEngineOptions> = {}): Promise<Harness> => {
  const root = await Deno.makeTempDir({ prefix: "lorafold-sched-" });
  const modelDir = join(root, "model");
  const { config } = await writeTinyCheckpoint(modelDir, { seed: 17 });
  const scope = await Effect.runPromise(Scope.make());
  const events: SchedulerEvent[] = [];
  const h: Harness = {
    engine: null as unknown as InferenceEngine,
    config,
    events,
    onEvent: () => {},
    complete: (req) => Effect.runPromise(h.engine.complete(req)),
    [Symbol.asyncDispose]: async () => {
      await Effect.runPromise(Scope.close(scope, Exit.void));
      await Deno.remove(root, { recursive: true });
    },
  };
  const engine = await Effect.runPromise(
    Scope.provide(scope)(makeInferenceEngine(cpuBackend(), {
      modelDir,
      servedModelName: "tiny",
      enableLora: true,
      maxLoraRank: 8,
      maxLoras: 2,
      maxLogprobs: 20,
      logprobsMode: "raw_logprobs",
      prefixCacheBytes: 64 * 1024 * 1024,
      maxBatchSequences: 256,
      kvCacheBytes: 256 * 1024 * 1024,
      onEvent: (e) => {
        events.push(e);
        h.onEvent(e);
      },
      ...over,
    })),
  );
  (h as { engine: InferenceEngine }).engine = engine;
  return h;
};

const run = <A, E>(e: Effect.Effect<A, E>): Promise<A> => Effect.runPromise(e);

/** The boundary of an event of request `id`. */
const stepOf = (h: Harness, kind: "admit" | "finish", id: string): number => {
  const e = h.events.find((x) => x.kind === kind && "id" in x && x.id === id);
  assert.ok(e, `no ${kind} event for ${id}`);
  return e.step;
};

/** Steps (decode boundaries) in which request `id` had a sequence decoded. */
const stepsOf = (h: Harness, id: string): number[] =>
  h.events.flatMap((e) => (e.kind === "step" && e.ids.includes(id) ? [e.step] : []));

/** A promise resolved the first time `pred` holds for an event, then pausing (mode keep). */
const freezeWhen = (h: Harness, pred: (e: SchedulerEvent) => boolean): Promise<void> =>
  new Promise((resolve) => {
    h.onEvent = (e) => {
      if (!pred(e)) return;
      h.onEvent = () => {};
      Effect.runSync(h.engine.pause("keep", false));
      resolve();
    };
  });

/** Waits until `n` requests are queued (they are submitted by fibers started before). */
const waitQueued = async (h: Harness, n: number) => {
  while (h.engine.load().waiting < n) await new Promise((r) => setTimeout(r, 1));
};

/** Everything a client sees of a response but its id and creation time. */
const visible = (r: CompletionResponse) => ({ model: r.model, choices: r.choices, usage: r.usage });

const long = (seed: number, maxTokens: number): CompletionRequest => ({
  prompt: [1, 3, 4],
  max_tokens: maxTokens,
  temperature: 1,
  seed,
  ignore_eos: true,
  logprobs: 2,
  return_token_ids: true,
});

Deno.test("scheduler: a request submitted while a batch decodes joins it at the next token boundary", async () => {
  await using h = await open();
  const frozen = freezeWhen(h, (e) => e.kind === "step" && e.seqs > 0 && e.step >= 6);
  const a = h.complete(long(1, 100));
  await frozen; // A has decoded a few tokens and is frozen mid-generation
  const b = h.complete(long(2, 60));
  await waitQueued(h, 1);
  assert.equal(h.engine.load().running, 1);
  await run(h.engine.resume());
  const [ra, rb] = await Promise.all([a, b]);
  const [ia, ib] = [ra.id, rb.id];
  // B was admitted (its first token sampled) while A was still decoding, and both decoded in
  // the same steps from then on: B did not wait for A's batch to end
  assert.ok(stepOf(h, "admit", ib) > stepOf(h, "admit", ia));
  assert.ok(stepOf(h, "admit", ib) < stepOf(h, "finish", ia));
  const shared = stepsOf(h, ib).filter((s) => stepsOf(h, ia).includes(s));
  assert.equal(shared.length, 59, "B's 59 decode steps ran in A's batch");
  // B (60 tokens, joined A with more than 60 tokens left) finishes first
  assert.ok(stepOf(h, "finish", ib) < stepOf(h, "finish", ia));
  assert.equal(ra.choices[0].token_ids!.length, 100);
  assert.equal(rb.choices[0].token_ids!.length, 60);
});

Deno.test("scheduler: sequences leave the batch at their own token boundary", async () => {
  await using h = await open();
  // both admitted at the same boundary: queued while paused, then resumed
  await run(h.engine.pause("keep", false));
  const short = h.complete({ ...long(3, 3), n: 2 });
  const longer = h.complete(long(4, 40));
  await waitQueued(h, 2);
  await run(h.engine.resume());
  const [rs, rl] = await Promise.all([short, longer]);
  const admitted = stepOf(h, "admit", rs.id);
  assert.equal(stepOf(h, "admit", rl.id), admitted);
  // at the admission boundary: the first token from the prefill, the second from that
  // boundary's decode step; then one per boundary: 3 tokens end one boundary later
  assert.equal(stepOf(h, "finish", rs.id), admitted + 1);
  assert.ok(stepOf(h, "finish", rl.id) > admitted + 1);
  // the steps after it left decoded only the long request's single sequence
  const after = h.events.filter((e) => e.kind === "step" && e.step > admitted + 1);
  assert.ok(after.length > 0);
  for (const e of after) {
    assert.ok(e.kind === "step" && e.seqs === 1 && e.ids.length === 1 && e.ids[0] === rl.id);
  }
  assert.deepEqual(rs.choices.map((c) => c.token_ids!.length), [3, 3]);
});

Deno.test("scheduler: seeded results are identical alone and batched (joins in free slots and into rebuilt caches)", async () => {
  await using h = await open();
  const reqs: CompletionRequest[] = [
    // the first two start together (7 slots); the short one leaves a free slot at once
    { prompt: [1, 3, 4], n: 6, max_tokens: 30, seed: 11, ignore_eos: true, logprobs: 3 },
    { prompt: [1, 22], max_tokens: 2, seed: 13, ignore_eos: true, logprobs: 0 },
    // joins at boundary 4 into the free slot (its prompt fits the rows the batch has)
    {
      prompt: [[1, 23, 24, 25, 26]],
      max_tokens: 9,
      seed: 14,
      top_k: 5,
      min_tokens: 3,
      logprobs: 1,
    },
    // join at boundary 8: no free slot, and a prompt longer than the batch's rows
    {
      prompt: [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24],
      n: 2,
      max_tokens: 12,
      seed: 12,
      temperature: 0.8,
      top_p: 0.9,
    },
    { prompt: "ab ", max_tokens: 16, seed: 15, stop: ["e"], temperature: 1.2, min_p: 0.05 },
    {
      prompt: [[1, 27, 28, 29, 30, 31, 32], [1, 33]],
      n: 2,
      max_tokens: 20,
      temperature: 0,
      logprobs: 4,
      ignore_eos: true,
    },
  ].map((r) => ({ ...r, return_token_ids: true }));
  const alone: CompletionResponse[] = [];
  for (const [i, r] of reqs.entries()) {
    alone.push(await h.complete({ ...r, cache_salt: `alone-${i}` }));
  }
  const origin = h.events.at(-1)!.step; // boundaries are counted since the engine started
  h.events.length = 0;
  const before = h.engine.scheduler.counters();
  const submit = (from: number, to: number) =>
    reqs.slice(from, to).map((r, i) => h.complete({ ...r, cache_salt: `batch-${from + i}` }));
  await run(h.engine.pause("keep", false));
  const first = submit(0, 2);
  await waitQueued(h, 2);
  let frozen = freezeWhen(h, (e) => e.kind === "step" && e.seqs > 0 && e.step >= origin + 4);
  await run(h.engine.resume());
  await frozen;
  const second = submit(2, 3);
  await waitQueued(h, 1);
  frozen = freezeWhen(h, (e) => e.kind === "step" && e.seqs > 0 && e.step >= origin + 8);
  await run(h.engine.resume());
  await frozen;
  const inPlace = h.engine.scheduler.counters().kvInPlaceJoins - before.kvInPlaceJoins;
  assert.equal(inPlace, 1, "the third request joined in the free slot");
  const rest = submit(3, 6);
  await waitQueued(h, 3);
  await run(h.engine.resume());
  const batched = await Promise.all([...first, ...second, ...rest]);
  const admits = batched.map((r) => stepOf(h, "admit", r.id));
  const finish0 = stepOf(h, "finish", batched[0].id);
  assert.ok(admits[2] > admits[0] && admits[3] > admits[2] && admits[5] < finish0);
  assert.ok(h.engine.scheduler.counters().kvRebuilds - before.kvRebuilds >= 2);
  for (const [i, r] of batched.entries()) {
    assert.deepEqual(visible(r), visible(alone[i]), `request ${i}`);
  }
  assert.ok(batched[5].choices[0].logprobs!.top_logprobs.every((t) => Object.keys(t!).length >= 4));
});

Deno.test("scheduler: --max-num-seqs bounds the running sequences; a larger request runs alone", async () => {
  await using h = await open({ maxBatchSequences: 4 });
  await run(h.engine.pause("keep", false));
  const pending = [
    h.complete({ ...long(5, 8), n: 2 }),
    h.complete({ ...long(6, 8), n: 2 }),
    h.complete({ ...long(7, 8), n: 2 }),
    h.complete({ ...long(8, 8), n: 6 }),
  ];
  await waitQueued(h, 4);
  await run(h.engine.resume());
  const res = await Promise.all(pending);
  const steps = h.events.filter((e) => e.kind === "step");
  for (const e of steps) {
    assert.ok(e.kind === "step" && (e.seqs <= 4 || (e.ids.length === 1 && e.ids[0] === res[3].id)));
  }
  // the third waits for a slot: admitted when the first two finished
  assert.ok(stepOf(h, "admit", res[2].id) > stepOf(h, "admit", res[0].id));
  assert.ok(stepOf(h, "admit", res[2].id) >= stepOf(h, "finish", res[0].id));
  assert.ok(steps.some((e) => e.kind === "step" && e.seqs === 6));
});

// ---- adapters ----------------------------------------------------------------------------------

const randomLora = (config: ModelConfig, seed: number, r = 4): LoraWeights => {
  const rng = new Rng(seed);
  const c: LoraConfig = {
    r,
    alpha: 2 * r,
    dropout: 0,
    targetModules: [...PROJECTIONS],
    useRslora: false,
  };
  const modules = new Map<string, { a: HostTensor; b: HostTensor }>();
  for (const { path, p } of targetPaths(config, c)) {
    const [out, inp] = projectionShape(config, p);
    const a = Float32Array.from({ length: r * inp }, () => rng.normal() * 0.5);
    const b = Float32Array.from({ length: out * r }, () => rng.normal() * 0.5);
    modules.set(path, { a: { shape: [r, inp], data: a }, b: { shape: [out, r], data: b } });
  }
  return { config: c, modules };
};

Deno.test("scheduler: adapters decode concurrently in batches of their own; unloading one lets its running request finish", async () => {
  await using h = await open();
  const dir = await Deno.makeTempDir({ prefix: "lorafold-sched-lora-" });
  try {
    for (const [name, seed] of [["a", 1], ["b", 2]] as const) {
      const w = randomLora(h.config, seed);
      await run(savePeftAdapter(join(dir, name), w.config, w.modules, "tiny"));
      await run(h.engine.loadLora(name, join(dir, name), false));
    }
    const onA = { ...long(9, 50), model: "a" };
    const onB = { ...long(10, 20), model: "b" };
    const aloneA = await h.complete({ ...onA, cache_salt: "alone" });
    const aloneB = await h.complete({ ...onB, cache_salt: "alone" });
    h.events.length = 0;
    await run(h.engine.pause("keep", false));
    const pa = h.complete(onA);
    const pb = h.complete(onB);
    await waitQueued(h, 2);
    const frozen = freezeWhen(h, (e) => e.kind === "step" && e.seqs > 0);
    await run(h.engine.resume());
    await frozen;
    // both adapters decode at every boundary, in separate batches
    const first = h.events.find((e) => e.kind === "step");
    assert.ok(first && first.kind === "step" && first.ids.length === 2 && first.seqs === 2);
    // unloading "a" while its request runs: new requests 404, the running one finishes with it
    await run(h.engine.unloadLora("a"));
    const refused = await Effect.runPromise(Effect.flip(h.engine.complete(onA)));
    assert.equal(refused.status, 404);
    assert.deepEqual(h.engine.models().map((m) => m.id), ["tiny", "b"]);
    await run(h.engine.resume());
    const [ra, rb] = await Promise.all([pa, pb]);
    assert.deepEqual(ra.choices, aloneA.choices);
    assert.deepEqual(rb.choices, aloneB.choices);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("scheduler: decode steps sample from device candidates with the tokens of whole-row sampling (logprobs within 1e-5), in both logprobs modes", async () => {
  for (const mode of ["raw_logprobs", "processed_logprobs"] as const) {
    await using h = await open({ logprobsMode: mode });
    await sameAsRows(h, mode);
  }
});

/** Runs a mix of requests with whole-row sampling forced, then by default, and compares them. */
const sameAsRows = async (h: Harness, mode: string) => {
  const base = { prompt: [1, 3, 4], max_tokens: 14, ignore_eos: true, return_token_ids: true };
  const reqs: CompletionRequest[] = [
    { ...base, temperature: 1, seed: 21, logprobs: 3, n: 2 },
    { ...base, temperature: 0.7, top_k: 5, seed: 22, logprobs: 0 },
    { ...base, temperature: 1.3, top_p: 0.8, seed: 23 },
    { ...base, temperature: 0, logprobs: 4 },
    // whole rows: min_p, a logits rule, and min_tokens bans for their first 5 tokens
    { ...base, temperature: 1, min_p: 0.1, seed: 24, logprobs: 1 },
    { ...base, temperature: 1, seed: 25, logit_bias: { "7": 5 } },
    { ...base, prompt: "ab ", temperature: 0.9, seed: 26, min_tokens: 5, ignore_eos: false },
  ];
  const runAll = async (device: boolean | undefined, salt: string) => {
    setDeviceSampling(device);
    try {
      const before = h.engine.scheduler.counters();
      await run(h.engine.pause("keep", false));
      const pending = reqs.map((r, i) => h.complete({ ...r, cache_salt: `${salt}-${i}` }));
      await waitQueued(h, reqs.length);
      await run(h.engine.resume());
      const out = await Promise.all(pending);
      const after = h.engine.scheduler.counters();
      return {
        out,
        device: after.deviceSampledTokens - before.deviceSampledTokens,
        generated: after.generationTokens - before.generationTokens,
      };
    } finally {
      setDeviceSampling(undefined);
    }
  };
  const rows = await runAll(false, "rows");
  const cands = await runAll(undefined, "candidates");
  assert.equal(rows.device, 0, "forced off: every token from its row");
  // the first token of each sequence comes from its prefill row; the rule-bound ones stay on rows
  assert.ok(
    cands.device > 0 && cands.device < cands.generated,
    `${cands.device} of ${cands.generated}`,
  );
  const close = (a: number | null, b: number | null, what: string) =>
    assert.ok(
      a === b || (a !== null && b !== null && Math.abs(a - b) <= 1e-5),
      `${what}: ${a} vs ${b}`,
    );
  for (const [i, r] of cands.out.entries()) {
    const ref = rows.out[i];
    assert.equal(r.choices.length, ref.choices.length);
    for (const [j, c] of r.choices.entries()) {
      const e = ref.choices[j];
      const what = `${mode}: request ${i} choice ${j}`;
      assert.deepEqual(c.token_ids, e.token_ids, what);
      assert.equal(c.text, e.text, what);
      assert.equal(c.finish_reason, e.finish_reason, what);
      assert.equal(c.logprobs === null, e.logprobs === null, what);
      if (!c.logprobs || !e.logprobs) continue;
      c.logprobs.token_logprobs.forEach((lp, t) =>
        close(lp, e.logprobs!.token_logprobs[t], `${what} token ${t}`)
      );
      c.logprobs.top_logprobs?.forEach((top, t) => {
        const want = e.logprobs!.top_logprobs![t];
        assert.deepEqual(Object.keys(top ?? {}), Object.keys(want ?? {}), `${what} top ${t}`);
        for (const k of Object.keys(top ?? {})) close(top![k], want![k], `${what} top ${t} ${k}`);
      });
    }
  }
};
