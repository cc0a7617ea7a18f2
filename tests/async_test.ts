/**
 * Asynchronous GRPO (max_staleness): rollouts run ahead of training by at most k snapshot
 * versions. max_staleness 0 is today's sequential pipeline, metric for metric; over random
 * schedules no batch is ever trained more than k versions after the one that generated it (and a
 * batch an engine mislabels as older is dropped, never trained); with k = 2 training still learns
 * through the in-process engine and through the real server, whose older adapters stay loaded
 * until the rollouts on them have drained.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { Effect, Fiber, Stream } from "effect";
import fc from "fast-check";
import { decodeTrainConfig, type TrainConfig } from "../src/app/config.ts";
import { runTraining, type TrainSummary } from "../src/app/trainer.ts";
import { serverLayer } from "../src/app/server_layer.ts";
import { arithmeticGrpoTask } from "../src/task/arithmetic_task.ts";
import { decodeGrpoConfig, grpoConfigDefaults } from "../src/grpo/config.ts";
import {
  countLossTokens,
  grpoLoss,
  type LossOptions,
  type LossSequence,
} from "../src/grpo/loss.ts";
import { boundedStaleness, type Staled, type Step, steps } from "../src/pipeline/stages.ts";
import type { RolloutResult } from "../src/ports/rollout_engine.ts";
import type { Snapshot } from "../src/snapshot/snapshot.ts";
import { cpuBackend } from "../src/backend/backend.ts";
import { initWeights } from "../src/model/weights.ts";
import { Policy } from "../src/train/policy.ts";
import { makeLocalEngine } from "../src/rollout/local.ts";
import { testOptimizer, tinyConfig } from "./support/tiny.ts";

const quiet = () => {};
const config = (over: Record<string, unknown>): Promise<TrainConfig> =>
  Effect.runPromise(decodeTrainConfig({ backend: "cpu", quiet: true, evalSize: 100, ...over }));
const train = async (
  over: Record<string, unknown>,
  rollout?: typeof serverLayer,
): Promise<TrainSummary> => {
  const cfg = await config(over);
  return await Effect.runPromise(
    runTraining(cfg, arithmeticGrpoTask({ heldOutSize: cfg.evalSize }), {
      log: quiet,
      rollout,
    }) as Effect.Effect<TrainSummary, unknown>,
  );
};
const metrics = async (dir: string): Promise<Record<string, number>[]> =>
  (await readFile(join(dir, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l));
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
/** Wall-clock fields: everything else of a step's metrics is deterministic. */
const timing = (k: string) => k.startsWith("time/") || k === "step_time" || k === "push_latency_ms";
const strip = (x: Record<string, number>) =>
  Object.fromEntries(Object.entries(x).filter(([k]) => !timing(k)));

Deno.test("max_staleness: default 0, TRL's snake_case name, a bad value names the option", async () => {
  assertEquals((await Effect.runPromise(decodeGrpoConfig({}))).maxStaleness, 0);
  assertEquals((await Effect.runPromise(decodeGrpoConfig({ max_staleness: 3 }))).maxStaleness, 3);
  const e = await Effect.runPromise(Effect.flip(decodeGrpoConfig({ max_staleness: -1 })));
  assert(e.message.includes("maxStaleness") && e.message.includes("max_staleness"), e.message);
  assert(e.message.includes("an integer >= 0"), e.message);
});

Deno.test("max_staleness 0 reproduces the sequential pipeline bit for bit (every non-timing metric, the adapter)", async () => {
  const out = await Deno.makeTempDir();
  const common = { steps: 4, promptsPerStep: 4, numGenerations: 4, outputDir: out };
  await train({ ...common, runId: "absent" });
  await train({ ...common, runId: "zero", maxStaleness: 0 });
  const a = await metrics(join(out, "absent"));
  const b = await metrics(join(out, "zero"));
  assertEquals(a.length, 4);
  assertEquals(b.map(strip), a.map(strip));
  // nothing asynchronous is logged, and every rollout is on-policy
  for (const m of b) {
    assert(!Object.keys(m).some((k) => k.startsWith("async/")), JSON.stringify(m));
    assertEquals(m.rollout_policy_version, m.step - 1);
  }
  const wa = await readFile(join(out, "absent", "adapter", "adapter_model.safetensors"));
  const wb = await readFile(join(out, "zero", "adapter", "adapter_model.safetensors"));
  assert(wa.equals(wb), "final adapters differ");
  await Deno.remove(out, { recursive: true });
});

// ---- off-policy sequence masking (TRL off_policy_mask_threshold) -------------------------------

const lossCaseArb = fc.record({
  seqs: fc.array(
    fc.integer({ min: 1, max: 5 }).chain((T) =>
      fc.record({
        logp: fc.array(fc.double({ min: -3, max: -0.01, noNaN: true }), {
          minLength: T,
          maxLength: T,
        }),
        drift: fc.array(fc.double({ min: -1, max: 1, noNaN: true }), {
          minLength: T,
          maxLength: T,
        }),
        mask: fc.array(fc.constantFrom(0, 1), { minLength: T, maxLength: T }),
        advantage: fc.double({ min: -2, max: 2, noNaN: true }),
      })
    ),
    { minLength: 1, maxLength: 5 },
  ),
  threshold: fc.double({ min: 0, max: 0.5, noNaN: true }),
  lossType: fc.constantFrom("grpo", "bnpo", "dr_grpo", "dapo" as const),
  level: fc.constantFrom("token", "sequence" as const),
  mode: fc.constantFrom(
    "token_truncate",
    "token_mask",
    "sequence_truncate",
    "sequence_mask" as const,
  ),
  correction: fc.boolean(),
  beta: fc.constantFrom(0, 0.04),
});

Deno.test("property: off_policy_mask_threshold drops exactly the negative-advantage completions whose mean log(engine / policy) exceeds it", async () => {
  await fc.assert(
    fc.asyncProperty(lossCaseArb, async (c) => {
      const seqs: LossSequence[] = c.seqs.map((q) => ({
        logp: q.logp,
        engineLogp: q.logp.map((l, t) => l + q.drift[t]),
        refLogp: q.logp.map((l) => l - 0.1),
        mask: q.mask,
        advantage: q.advantage,
      }));
      const opts: LossOptions = {
        ...grpoConfigDefaults,
        lossType: c.lossType,
        importanceSamplingLevel: c.level,
        vllmImportanceSamplingMode: c.mode,
        vllmImportanceSamplingCorrection: c.correction,
        beta: c.beta,
        maxCompletionLength: 5,
        dapoNormalizer: countLossTokens(seqs),
        gradientAccumulationSteps: 1,
      };
      // the reference: the dropped completions keep everything but their advantage
      const dropped = seqs.map((q) => {
        const m = Array.from(q.mask).reduce((a, b) => a + b, 0);
        let kl = 0;
        for (let t = 0; t < q.logp.length; t++) {
          kl += (q.engineLogp![t] - q.logp[t]) * q.mask[t];
        }
        return q.advantage < 0 && kl / Math.max(m, 1) > c.threshold;
      });
      const masked = await Effect.runPromise(
        grpoLoss(seqs, { ...opts, offPolicyMaskThreshold: c.threshold }),
      );
      const reference = await Effect.runPromise(
        grpoLoss(seqs.map((q, i) => dropped[i] ? { ...q, advantage: 0 } : q), opts),
      );
      const close = (a: number, b: number) => Math.abs(a - b) <= 1e-12 * (1 + Math.abs(b));
      assert(close(masked.loss, reference.loss), `loss ${masked.loss} vs ${reference.loss}`);
      masked.dLogp.forEach((g, i) =>
        g.forEach((x, t) => assert(close(x, reference.dLogp[i][t]), `dLogp[${i}][${t}]`))
      );
      // off (null or absent) is the loss without the mask, value for value
      const off = await Effect.runPromise(
        grpoLoss(seqs, { ...opts, offPolicyMaskThreshold: null }),
      );
      const absent = await Effect.runPromise(grpoLoss(seqs, opts));
      assertEquals(off, absent);
    }),
    { numRuns: 200 },
  );
});

Deno.test("off_policy_mask_threshold: TRL's name decodes, default off, negative rejected", async () => {
  assertEquals(grpoConfigDefaults.offPolicyMaskThreshold, null);
  const c = await Effect.runPromise(decodeGrpoConfig({ off_policy_mask_threshold: 0.5 }));
  assertEquals(c.offPolicyMaskThreshold, 0.5);
  const e = await Effect.runPromise(
    Effect.flip(decodeGrpoConfig({ off_policy_mask_threshold: -1 })),
  );
  assert(e.message.includes("off_policy_mask_threshold"), e.message);
});

// ---- the staleness bound over random schedules ------------------------------------------------

interface Schedule {
  readonly k: number;
  readonly steps: number;
  /** Per step: ms the rollout, the training step and the publish (push) take. */
  readonly rolloutMs: readonly number[];
  readonly trainMs: readonly number[];
  readonly publishMs: readonly number[];
  /** Per step: the engine reports a version this many pushes older than the one it used. */
  readonly mislabel: readonly number[];
}

const scheduleArb: fc.Arbitrary<Schedule> = fc
  .record({ k: fc.integer({ min: 1, max: 4 }), steps: fc.integer({ min: 1, max: 10 }) })
  .chain(({ k, steps }) => {
    const perStep = (arb: fc.Arbitrary<number>) =>
      fc.array(arb, { minLength: steps, maxLength: steps });
    return fc.record({
      k: fc.constant(k),
      steps: fc.constant(steps),
      rolloutMs: perStep(fc.integer({ min: 0, max: 6 })),
      trainMs: perStep(fc.integer({ min: 0, max: 6 })),
      publishMs: perStep(fc.integer({ min: 0, max: 6 })),
      mislabel: perStep(fc.oneof(fc.constant(0), fc.constant(0), fc.integer({ min: 0, max: 6 }))),
    });
  });

/**
 * Runs boundedStaleness with an "engine" that generates from the latest published version, a
 * "trainer" that makes version v + 1 at each step and a "publisher" that hands it to the engine
 * later; records what was trained on, and at which version.
 */
const runSchedule = (s: Schedule) =>
  Effect.gen(function* () {
    const made = [0]; // the trainer's versions
    const served = [0]; // the versions the engine has received
    const trained: { step: number; generatedFrom: number; trainerVersion: number }[] = [];
    const produce = (src: Stream.Stream<Step>) =>
      Stream.mapEffect(src, (st) =>
        Effect.gen(function* () {
          const used = served.length - 1; // the engine's current version when the call starts
          yield* Effect.sleep(s.rolloutMs[st.step - 1]);
          const reported = served[Math.max(0, used - s.mislabel[st.step - 1])];
          const result: RolloutResult = { completions: [], policyVersion: reported };
          return { ...st, result };
        }));
    const trainStage = (
      src: Stream.Stream<Step & { result: RolloutResult } & Staled>,
    ) =>
      Stream.mapEffect(src, (a) =>
        Effect.gen(function* () {
          const version = made[made.length - 1];
          // what the stage reports is what the trainer really is at
          assertEquals(a.stale.trainerVersion, version);
          assertEquals(a.stale.generatedFrom, a.result.policyVersion);
          trained.push({
            step: a.step,
            generatedFrom: a.result.policyVersion,
            trainerVersion: version,
          });
          yield* Effect.sleep(s.trainMs[a.step - 1]);
          made.push(version + 1);
          return { ...a, snapshot: { version: version + 1 } as Snapshot };
        }));
    const publish = <A extends { step: number; snapshot: Snapshot }, E, R>(
      src: Stream.Stream<A, E, R>,
    ) =>
      Stream.mapEffect(src, (b) =>
        Effect.gen(function* () {
          yield* Effect.sleep(s.publishMs[b.step - 1]);
          served.push(b.snapshot.version);
          return b;
        }));
    const out = yield* Stream.runCollect(
      boundedStaleness(
        { maxStaleness: s.k, initialVersion: 0 },
        steps(1, s.steps),
        produce,
        trainStage,
        publish,
      ),
    );
    return { out: [...out], trained };
  });

Deno.test("property: over random schedules every trained batch is within max_staleness versions; mislabelled ones are dropped", async () => {
  await fc.assert(
    fc.asyncProperty(scheduleArb, async (s) => {
      const { out, trained } = await Effect.runPromise(runSchedule(s));
      for (const t of trained) {
        assert(
          t.generatedFrom >= t.trainerVersion - s.k,
          `step ${t.step}: generated from v${t.generatedFrom}, trained at v${t.trainerVersion}`,
        );
      }
      // in order, and a batch is missing only when its engine reported a too-old version
      const order = trained.map((t) => t.step);
      assertEquals(order, [...order].sort((a, b) => a - b));
      const droppedSteps: number[] = [];
      for (let step = 1; step <= s.steps; step++) {
        if (order.includes(step)) continue;
        assert(s.mislabel[step - 1] > 0, `step ${step} was dropped`);
        droppedSteps.push(step);
      }
      // without mislabelling every step trains
      if (s.mislabel.every((m) => m === 0)) assertEquals(order.length, s.steps);
      assertEquals(out.map((o) => o.step), order);
      for (const o of out) {
        assertEquals(o.asyncMetrics["async/staleness_max"], o.stale.staleness);
        assert(o.stale.staleness <= s.k);
        // the dropped count a step reports: the batches dropped before it
        assertEquals(
          o.asyncMetrics["async/dropped_stale"],
          droppedSteps.filter((d) => d < o.step).length,
        );
      }
    }),
    { numRuns: 60 },
  );
});

Deno.test("the bound is reached: a slow trainer and a fast engine train k versions stale", async () => {
  const k = 2;
  const s: Schedule = {
    k,
    steps: 8,
    rolloutMs: Array(8).fill(0),
    trainMs: Array(8).fill(5),
    publishMs: Array(8).fill(0),
    mislabel: Array(8).fill(0),
  };
  const { trained } = await Effect.runPromise(runSchedule(s));
  assertEquals(trained.length, 8);
  // the first batches come from v0; from step k + 1 on the engine is k versions ahead
  assertEquals(trained.map((t) => t.trainerVersion - t.generatedFrom), [0, 1, 2, 2, 2, 2, 2, 2]);
});

Deno.test("in-process engine: a push while a generation runs keeps the older version until it drains", async () => {
  const c = tinyConfig({ eosTokenIds: [], maxPositionEmbeddings: 4096 });
  const backend = cpuBackend();
  const attempt = (maxTokens: number) => {
    const request = {
      prompt: [1, 3],
      n: 16,
      maxTokens,
      temperature: 1,
      topP: 1,
      topK: 0,
      seed: 7,
      stopTokenIds: [],
    };
    return Effect.runPromise(Effect.scoped(Effect.gen(function* () {
      const policy = yield* Policy.make(backend, c, initWeights(c, 4), {
        mode: "lora",
        lora: {
          r: 2,
          alpha: 4,
          dropout: 0,
          targetModules: ["q_proj", "v_proj"],
          useRslora: false,
        },
        seed: 1,
        optimizer: testOptimizer,
      });
      const { engine, target } = yield* makeLocalEngine(backend, 0);
      yield* target.push(yield* policy.snapshot());
      // the same request alone, for reference
      const alone = yield* engine.generate([request]);
      const running = yield* Effect.forkChild(engine.generate([request]));
      yield* Effect.yieldNow; // let it start on v0
      policy.version = 1;
      yield* target.push(yield* policy.snapshot()); // retires v0 while it generates
      const inFlightAtPush = running.pollUnsafe() === undefined;
      const during = yield* Fiber.join(running);
      const after = yield* engine.generate([request]);
      return { alone, during, after, inFlightAtPush };
    })));
  };
  // on a loaded machine the snapshot's digest can take longer than a short generation: longer
  // generations until one is still running when the push lands
  let out = await attempt(400);
  for (let t = 800; !out.inFlightAtPush && t <= 3200; t *= 2) out = await attempt(t);
  assert(out.inFlightAtPush, "the generation had finished before the push: nothing was tested");
  // it ran to the end on v0's buffers, token for token what v0 gives alone
  assertEquals(out.during.policyVersion, 0);
  assertEquals(out.during.completions, out.alone.completions);
  assertEquals(out.after.policyVersion, 1);
});

// ---- end to end -------------------------------------------------------------------------------

/**
 * Two versions behind, the policy the rollouts came from differs more from the trained one the
 * larger each step is: at the sequential tests' 3e-3 the importance ratios collapse (mean
 * |trainer - engine logp| ~0.3 per token) and the reward falls; 1e-3 keeps it ~0.05.
 */
const ASYNC_LR = 1e-3;

const checkAsyncRun = (m: Record<string, number>[], k: number, steps: number) => {
  assertEquals(m.map((x) => x.step), Array.from({ length: steps }, (_, i) => i + 1));
  for (const x of m) {
    const st = x["async/staleness_max"];
    assert(typeof st === "number" && st >= 0 && st <= k, `step ${x.step}: staleness ${st}`);
    // the version the rollouts came from, seen from the trainer (one push per step)
    assertEquals(x.rollout_policy_version, x.step - 1 - st);
    assertEquals(x["async/dropped_stale"], 0);
    for (const key of ["mean", "max"]) {
      assert(Number.isFinite(x[`sampling/importance_sampling_ratio/${key}`]), `IS ${key}`);
    }
  }
};

Deno.test("max_staleness 2, in-process engine: staleness within the bound and the reward still rises", async () => {
  const out = await Deno.makeTempDir();
  const k = 2;
  const s = await train({
    steps: 20,
    promptsPerStep: 12,
    outputDir: out,
    runId: "a",
    learningRate: ASYNC_LR,
    maxStaleness: k,
  });
  const m = await metrics(s.runDir);
  checkAsyncRun(m, k, 20);
  const exact = m.map((x) => x["rewards/exact_match/mean"]);
  const rise = mean(exact.slice(-5)) - mean(exact.slice(0, 5));
  assert(rise >= 0.05, `exact-match reward rose by only ${rise.toFixed(3)}`);
  assert(s.accuracyAfter - s.accuracyBefore >= 0.1, `${s.accuracyBefore} -> ${s.accuracyAfter}`);
  await Deno.remove(out, { recursive: true });
});

Deno.test("max_staleness 2, server engine: rollouts overlap training, every push verified, the reward rises", async () => {
  const out = await Deno.makeTempDir();
  const k = 2;
  const s = await train({
    engine: "server",
    steps: 20,
    promptsPerStep: 12,
    outputDir: out,
    runId: "a",
    learningRate: ASYNC_LR,
    maxStaleness: k,
  }, serverLayer);
  const m = await metrics(s.runDir);
  checkAsyncRun(m, k, 20);
  // the producer really ran ahead of the trainer at some step
  assert(m.some((x) => x["async/staleness_max"] > 0), "no step trained on older rollouts");
  for (const x of m) {
    const d = x["sync/verify_logp_diff_max"];
    assert(typeof d === "number" && d <= 1e-3, `step ${x.step}: verify diff ${d}`);
  }
  const exact = m.map((x) => x["rewards/exact_match/mean"]);
  const rise = mean(exact.slice(-5)) - mean(exact.slice(0, 5));
  assert(rise >= 0.05, `exact-match reward rose by only ${rise.toFixed(3)}`);
  // the push directories of the session were removed with the server
  assertEquals((await readdir(out)).sort(), ["a"]);
  await Deno.remove(out, { recursive: true });
});
