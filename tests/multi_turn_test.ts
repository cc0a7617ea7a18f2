/**
 * Multi-turn, tool-using rollouts: episode masks line up with token origins (property, pure and
 * on the real local engine), environment tokens get no loss and no gradient (grpoLoss property,
 * and the update stage on two identical policies), a one-turn environment reproduces the
 * single-turn rollout stage exactly, environments fail typed, bounded staleness composes, and
 * the calculator example learns to call its tool.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { Effect, Layer, type Scope, Stream } from "effect";
import fc from "fast-check";
import { Backend, cpuBackend } from "../src/backend/backend.ts";
import { decodeGrpoConfig, type GrpoConfig } from "../src/grpo/config.ts";
import { grpoLoss, type LossType } from "../src/grpo/loss.ts";
import { loadBase } from "../src/model/loader.ts";
import { Rng } from "../src/model/rng.ts";
import {
  appendModelTurn,
  appendObservation,
  emptyEpisode,
  type Environment,
  type EnvironmentStep,
  fromPromise,
  type ModelTurn,
  multiTurnRollout,
  runEpisodes,
  type TokenOrigin,
} from "../src/pipeline/multi_turn.ts";
import {
  advantage,
  type Advantaged,
  boundedStaleness,
  promptTokens,
  push,
  reward,
  rollout,
  type Rollouts,
  snapshot,
  type Staled,
  type Step,
  steps,
  update,
} from "../src/pipeline/stages.ts";
import { RolloutEngine } from "../src/ports/rollout_engine.ts";
import { PushTarget } from "../src/ports/push_target.ts";
import { LocalEngineLive } from "../src/rollout/local.ts";
import { arithmeticTask } from "../src/task/arithmetic.ts";
import { BUILTIN_MODEL_DIR } from "../src/task/arithmetic_task.ts";
import { calculatorEnvironment, calculatorTask, lastSum } from "../src/task/calculator_env.ts";
import { Policy } from "../src/train/policy.ts";
import type { Projection } from "../src/model/weights.ts";
import type { Tokenizer } from "../src/tokenizer/tokenizer.ts";
import { runExample } from "../examples/calculator_tool.ts";
import { decodeTrainConfig } from "../src/app/config.ts";
import { serverLayer } from "../src/app/server_layer.ts";
import { runTraining } from "../src/app/trainer.ts";
import { join } from "node:path";

const lora = {
  r: 8,
  alpha: 16,
  dropout: 0,
  targetModules: ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"] as Projection[],
  useRslora: false,
};
const optimizer = {
  learningRate: 3e-3,
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
  weightDecay: 0,
  maxGradNorm: 1,
};

/** Runs `body` with the built-in model's first policy pushed to a local engine (CPU backend). */
const withEngine = <A, E>(
  body: (ctx: {
    policy: Policy;
    tok: Tokenizer;
    /** Another policy, identical to the first before any step (same base, seed, options). */
    newPolicy: () => Effect.Effect<Policy, never, Scope.Scope>;
  }) => Effect.Effect<
    A,
    E,
    typeof RolloutEngine.Identifier | typeof PushTarget.Identifier | Scope.Scope
  >,
): Promise<A> =>
  Effect.runPromise(
    Effect.gen(function* () {
      const base = yield* loadBase(BUILTIN_MODEL_DIR);
      const backend = yield* Backend;
      const newPolicy = () =>
        Policy.make(backend, base.config, base.weights, { mode: "lora", lora, seed: 1, optimizer });
      const policy = yield* newPolicy();
      const target = yield* PushTarget;
      yield* target.push(yield* policy.snapshot());
      return yield* body({ policy, tok: base.tokenizer, newPolicy });
    }).pipe(
      Effect.scoped,
      Effect.provide(LocalEngineLive(1)),
      Effect.provide(Layer.succeed(Backend, cpuBackend())),
    ) as Effect.Effect<A, unknown>,
  );

const grpo = (over: Record<string, unknown> = {}): Effect.Effect<GrpoConfig, unknown> =>
  decodeGrpoConfig({ numGenerations: 4, maxCompletionLength: 12, temperature: 1, ...over });

/** An environment that answers each turn from a script: observation ids, then done. */
const scripted = (name: string, script: readonly (readonly number[] | null)[]): Environment => ({
  name,
  reset: () =>
    Effect.sync(() => ({
      step: (turn: ModelTurn) =>
        Effect.sync((): EnvironmentStep => {
          const s = script[turn.turn - 1];
          return s === null || s === undefined
            ? { observation: [], done: true }
            : { observation: s, done: false };
        }),
    })),
});

// ---- masks line up with token origins --------------------------------------------------------

Deno.test("episode: the mask is 1 exactly at model tokens, 0 at environment tokens (property)", () => {
  const segment = fc.record({
    origin: fc.constantFrom<TokenOrigin>("model", "environment"),
    tokens: fc.array(fc.integer({ min: 0, max: 14 }), { maxLength: 6 }),
  });
  fc.assert(
    fc.property(fc.array(segment, { maxLength: 8 }), (segments) => {
      const ep = emptyEpisode();
      const origins: TokenOrigin[] = [];
      for (const s of segments) {
        if (s.origin === "model") {
          appendModelTurn(ep, s.tokens, s.tokens.map((t) => -t / 10));
        } else appendObservation(ep, s.tokens);
        origins.push(...s.tokens.map(() => s.origin));
      }
      assertEquals(ep.tokens, segments.flatMap((s) => s.tokens));
      assertEquals(ep.mask, origins.map((o) => (o === "model" ? 1 : 0)));
      ep.engineLogp.forEach((l, t) =>
        assert(origins[t] === "model" ? l === -ep.tokens[t] / 10 : Number.isNaN(l))
      );
      assertEquals(ep.turns, segments.filter((s) => s.origin === "model").length);
    }),
  );
});

Deno.test("runEpisodes on the local engine: turns, observations and masks line up, limits hold (property)", async () => {
  await withEngine(({ tok }) =>
    Effect.gen(function* () {
      const engine = yield* RolloutEngine;
      const task = arithmeticTask();
      const arb = fc.record({
        script: fc.array(
          fc.option(fc.array(fc.integer({ min: 3, max: 14 }), { maxLength: 5 }), {
            freq: 4,
          }),
          { maxLength: 5 },
        ),
        maxTurns: fc.integer({ min: 1, max: 4 }),
        maxTurnTokens: fc.integer({ min: 1, max: 5 }),
        maxEpisodeTokens: fc.integer({ min: 1, max: 16 }),
        seed: fc.integer({ min: 0, max: 1000 }),
      });
      yield* Effect.promise(() =>
        fc.assert(
          fc.asyncProperty(arb, async (c) => {
            const seen: { turn: number; tokens: readonly number[]; at: number }[] = [];
            const base = scripted("script", c.script);
            const env: Environment = {
              name: "recording",
              reset: (item) =>
                Effect.map(base.reset(item), (e) => ({
                  step: (turn: ModelTurn) => {
                    seen.push({
                      turn: turn.turn,
                      tokens: turn.tokens,
                      at: turn.episode.length - turn.tokens.length,
                    });
                    return e.step(turn);
                  },
                })),
            };
            const p = task.sample(new Rng(c.seed));
            const prompt = promptTokens(tok, p);
            const { episodes } = await Effect.runPromise(runEpisodes(
              (reqs) => engine.generate(reqs),
              env,
              tok,
              [{
                item: p,
                prompt,
                request: {
                  prompt,
                  n: 1,
                  maxTokens: 5,
                  temperature: 1,
                  topP: 1,
                  topK: 0,
                  seed: c.seed,
                  stopTokenIds: [tok.eosId],
                },
              }],
              c,
            ));
            const ep = episodes[0];
            assert(ep.tokens.length <= c.maxEpisodeTokens);
            assert(ep.turns <= c.maxTurns && ep.turns === seen.length);
            // every model turn sits where the environment saw it, with mask 1; all else mask 0
            const expected = new Array(ep.tokens.length).fill(0);
            for (const s of seen) {
              assert(s.tokens.length >= 1 && s.tokens.length <= c.maxTurnTokens);
              assertEquals(ep.tokens.slice(s.at, s.at + s.tokens.length), [...s.tokens]);
              for (let t = 0; t < s.tokens.length; t++) expected[s.at + t] = 1;
            }
            assertEquals(ep.mask, expected);
            // the observations fill the gaps, each right after its turn, cut to the budget
            for (let k = 0; k < seen.length; k++) {
              const end = seen[k].at + seen[k].tokens.length;
              const nextAt = k + 1 < seen.length ? seen[k + 1].at : ep.tokens.length;
              const obs = c.script[k] ?? [];
              assertEquals(ep.tokens.slice(end, nextAt), obs.slice(0, nextAt - end));
            }
            // ended by the environment exactly when its script said done at the last turn;
            // otherwise the turns or the token budget ran out
            const last = c.script[seen.length - 1];
            assertEquals(ep.finish === "stop", last === null || last === undefined);
            if (ep.finish === "length") {
              assert(ep.turns === c.maxTurns || ep.tokens.length === c.maxEpisodeTokens);
            }
          }),
          { numRuns: 25 },
        )
      );
    })
  );
});

// ---- environment tokens: no loss, no gradient -------------------------------------------------

Deno.test("grpoLoss: perturbing environment tokens' log-probs changes neither loss nor gradient; their gradient is 0 (property)", async () => {
  const base = await Effect.runPromise(grpo({ numGenerations: 2 }));
  const lp = fc.double({ min: -6, max: -0.01, noNaN: true });
  const seq = fc.integer({ min: 1, max: 8 }).chain((T) =>
    fc.record({
      mask: fc.array(fc.integer({ min: 0, max: 1 }), { minLength: T, maxLength: T }),
      logp: fc.array(lp, { minLength: T, maxLength: T }),
      old: fc.array(lp, { minLength: T, maxLength: T }),
      ref: fc.array(lp, { minLength: T, maxLength: T }),
      engine: fc.array(lp, { minLength: T, maxLength: T }),
      noise: fc.array(lp, { minLength: T, maxLength: T }),
      advantage: fc.double({ min: -2, max: 2, noNaN: true }),
    })
  );
  fc.assert(
    fc.property(
      fc.array(seq, { minLength: 1, maxLength: 4 }),
      fc.constantFrom<LossType>("grpo", "bnpo", "dr_grpo", "dapo"),
      fc.constantFrom(0, 0.04),
      fc.boolean(),
      fc.constantFrom<"token" | "sequence">("token", "sequence"),
      (seqs, lossType, beta, correction, level) => {
        const opts = {
          ...base,
          lossType,
          beta,
          importanceSamplingLevel: level,
          vllmImportanceSamplingCorrection: correction,
          dapoNormalizer: seqs.reduce((a, s) => a + s.mask.reduce((x, y) => x + y, 0), 0),
          gradientAccumulationSteps: 1,
        };
        const run = (perturb: boolean) =>
          Effect.runSync(grpoLoss(
            seqs.map((s) => {
              const at = (xs: number[]) =>
                xs.map((x, t) => (perturb && s.mask[t] === 0 ? s.noise[t] : x));
              return {
                logp: at(s.logp),
                oldLogp: at(s.old),
                refLogp: at(s.ref),
                engineLogp: at(s.engine),
                mask: s.mask,
                advantage: s.advantage,
              };
            }),
            opts,
          ));
        const a = run(false);
        const b = run(true);
        assertEquals(b.loss, a.loss);
        assertEquals(b.dLogp, a.dLogp);
        a.dLogp.forEach((d, i) => d.forEach((g, t) => seqs[i].mask[t] === 0 && assert(g === 0)));
      },
    ),
    { numRuns: 300 },
  );
});

/** Multi-turn rollouts of one step with the calculator: episodes with environment tokens. */
const calculatorBatch = (tok: Tokenizer, config: GrpoConfig) => {
  const task = calculatorTask(tok, { heldOutSize: 10 });
  return steps(1, 1).pipe(
    multiTurnRollout({
      tokenizer: tok,
      prompts: task.prompts,
      promptsPerStep: 4,
      config,
      seed: 3,
      environment: task.environment,
      ...task.limits,
    }),
    // the episode text's length: a reward that varies within groups (the base model's exact
    // match on three-number sums is ~0, which would give no advantage to train on)
    reward([{ name: "length", fn: (texts) => texts.map((t) => t.length) }]),
    advantage(config),
  );
};

Deno.test("update stage: environment tokens are masked: engine log-probs there do not change the step; the loss is the masked one", async () => {
  await withEngine(({ policy, tok, newPolicy }) =>
    Effect.gen(function* () {
      const config = yield* grpo({
        numGenerations: 8,
        maxCompletionLength: 10,
        vllmImportanceSamplingCorrection: true,
        beta: 0.04,
      });
      const [batch] = yield* Stream.runCollect(calculatorBatch(tok, config));
      const envTokens = batch.lossMasks!.flat().filter((m) => m === 0).length;
      assert(envTokens > 0, "no episode called the calculator");
      assertEquals(batch.metrics["multi_turn/env_tokens_mean"], envTokens / 32);
      assertEquals(
        batch.metrics["multi_turn/turns_mean"],
        batch.turns!.reduce((a, b) => a + b) / 32,
      );
      assert(batch.advantages.some((a) => a !== 0), "no learning signal in the batch");
      // the same batch with other engine log-probs at environment tokens (NaN before)
      const perturbed: Advantaged = {
        ...batch,
        engineLogp: batch.engineLogp.map((l, i) =>
          l.map((x, t) => (batch.lossMasks![i][t] === 0 ? -3 - t : x))
        ),
      };
      const run = (p: Policy, b: Advantaged) =>
        Effect.map(
          Stream.runCollect(Stream.make(b).pipe(update({ policy: p, config }))),
          ([u]) => u.stats,
        );
      const other = yield* newPolicy();
      const expectedLogp = yield* other.logProbs(batch.sequences, config.temperature);
      const ref = yield* other.logProbs(batch.sequences, config.temperature, true);
      const a = yield* run(policy, batch);
      const b = yield* run(other, perturbed);
      assertEquals([b.loss, b.gradNorm], [a.loss, a.gradNorm]);
      // the step's loss is grpoLoss with the episode masks (and not with all-ones masks)
      const lossWith = (masks: readonly (readonly number[])[]) =>
        Effect.map(
          grpoLoss(
            expectedLogp.map((logp, i) => ({
              logp,
              refLogp: ref[i],
              engineLogp: batch.engineLogp[i].map((e, t) => (Number.isNaN(e) ? logp[t] : e)),
              mask: masks[i],
              advantage: batch.advantages[i],
              endedWithEos: batch.endedWithEos[i],
            })),
            {
              ...config,
              dapoNormalizer: masks.flat().reduce((x, y) => x + y, 0),
              gradientAccumulationSteps: 1,
            },
          ),
          (r) => r.loss,
        );
      const masked = yield* lossWith(batch.lossMasks!);
      const unmasked = yield* lossWith(batch.sequences.map((q) => q.completion.map(() => 1)));
      assert(
        Math.abs(a.loss - masked) <= 1e-9 * Math.max(1, Math.abs(masked)),
        `${a.loss} vs ${masked}`,
      );
      assert(Math.abs(a.loss - unmasked) > 1e-6, "the unmasked loss is the same: test is vacuous");
    })
  );
});

// ---- single-turn equivalence, typed failures, staleness -----------------------------------------

Deno.test("multiTurnRollout with a one-turn environment is the single-turn rollout stage, token for token", async () => {
  await withEngine(({ tok }) =>
    Effect.gen(function* () {
      const config = yield* grpo({ maxCompletionLength: 5 });
      const task = arithmeticTask();
      const common = {
        tokenizer: tok,
        prompts: (rng: Rng) => task.sample(rng),
        promptsPerStep: 3,
        config,
        seed: 9,
      };
      const [single] = yield* Stream.runCollect(steps(2, 2).pipe(rollout(common)));
      const [multi] = yield* Stream.runCollect(
        steps(2, 2).pipe(multiTurnRollout({ ...common, environment: scripted("once", []) })),
      );
      const pick = (r: Rollouts) => ({
        prompts: r.prompts,
        sequences: r.sequences.map((q) => ({
          prompt: [...q.prompt],
          completion: [...q.completion],
        })),
        texts: r.completionTexts,
        logp: r.engineLogp.map((l) => [...l]),
        ended: r.endedWithEos,
        version: r.result.policyVersion,
      });
      assertEquals(pick(multi), pick(single));
      assertEquals(multi.lossMasks, single.sequences.map((q) => q.completion.map(() => 1)));
      assertEquals(multi.turns, single.sequences.map(() => 1));
    })
  );
});

Deno.test("environments fail typed: a bad observation id, a rejecting async environment and bad limits are named", async () => {
  const errors = await withEngine(({ tok }) =>
    Effect.gen(function* () {
      const config = yield* grpo({ numGenerations: 2 });
      const task = arithmeticTask();
      const stage = (environment: Environment) =>
        Effect.flip(Stream.runCollect(
          steps(1, 1).pipe(multiTurnRollout({
            tokenizer: tok,
            prompts: (rng) => task.sample(rng),
            promptsPerStep: 1,
            config,
            seed: 1,
            environment,
          })),
        ));
      const bad = yield* stage(scripted("bad-ids", [[3, 99]]));
      const rejecting = yield* stage(fromPromise("flaky", () =>
        Promise.resolve(() =>
          Promise.reject(new Error("tool timed out"))
        )));
      const limits = yield* Effect.flip(Stream.runCollect(
        steps(1, 1).pipe(multiTurnRollout({
          tokenizer: tok,
          prompts: (rng) =>
            task.sample(rng),
          promptsPerStep: 1,
          config,
          seed: 1,
          environment: scripted("fine", []),
          maxTurns: 0,
        })),
      ));
      return [bad, rejecting, limits];
    })
  );
  assertEquals(errors.map((e) => (e as { _tag: string })._tag), [
    "EnvironmentError",
    "EnvironmentError",
    "EnvironmentError",
  ]);
  const [bad, rejecting, limits] = errors.map((e) => (e as Error).message);
  assert(limits.includes("maxTurns") && limits.includes("got 0"), limits);
  assert(bad.includes("bad-ids") && bad.includes("99") && bad.includes("0..14"), bad);
  assert(rejecting.includes("flaky") && rejecting.includes("tool timed out"), rejecting);
});

Deno.test("bounded staleness composes with multi-turn rollouts", async () => {
  const seen = await withEngine(({ policy, tok }) =>
    Effect.gen(function* () {
      const config = yield* grpo({ numGenerations: 4, maxCompletionLength: 10 });
      const task = calculatorTask(tok, { heldOutSize: 10 });
      const produce = (s: Stream.Stream<Step>) =>
        s.pipe(
          multiTurnRollout({
            tokenizer: tok,
            prompts: task.prompts,
            promptsPerStep: 2,
            config,
            seed: 5,
            environment: task.environment,
            ...task.limits,
          }),
          reward(task.rewards),
          advantage(config),
        );
      const out = yield* Stream.runCollect(boundedStaleness(
        { maxStaleness: 1, initialVersion: policy.version },
        steps(1, 4),
        produce,
        <A extends Advantaged & Staled, E, R>(s: Stream.Stream<A, E, R>) =>
          s.pipe(update({ policy, config }), snapshot(policy)),
        push,
      ));
      return out.map((b) => ({ step: b.step, stale: b.stale.staleness, masks: b.lossMasks! }));
    })
  );
  assertEquals(seen.map((s) => s.step), [1, 2, 3, 4]);
  seen.forEach((s) => assert(s.stale <= 1 && s.masks.length === 8));
});

// ---- the calculator -------------------------------------------------------------------------

Deno.test("calculator: an empty turn calls it, its answer is the last sum, the next turn ends the episode", async () => {
  assertEquals(lastSum("47+20+49="), 116);
  assertEquals(lastSum("12+3=015"), 15);
  assertEquals(lastSum("0123"), null);
  await withEngine(({ tok }) =>
    Effect.gen(function* () {
      const env = calculatorEnvironment(tok);
      const item = { prompt: "47+20+49=", answer: "116" };
      const e = yield* env.reset(item);
      const eos = tok.eosId;
      const turn = (n: number, tokens: number[], episode: number[]): ModelTurn => ({
        turn: n,
        tokens,
        text: tok.decode(tokens),
        finishReason: "stop",
        episode,
      });
      assertEquals(yield* e.step(turn(1, [eos], [eos])), { observation: "116", done: false });
      const obs = tok.encode("116");
      assertEquals((yield* e.step(turn(2, [eos], [eos, ...obs, eos]))).done, true);
      const direct = yield* env.reset(item);
      const answer = tok.encode("115");
      assertEquals((yield* direct.step(turn(1, [...answer, eos], [...answer, eos]))).done, true);
    })
  );
});

Deno.test("example: the model learns to call the calculator; episode reward and held-out accuracy rise", async () => {
  const r = await Effect.runPromise(runExample(40, 8, 50));
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
  assertEquals(r.rewards.length, 40);
  assertEquals(r.version, 40);
  const rise = mean(r.rewards.slice(-10)) - mean(r.rewards.slice(0, 10));
  assert(rise >= 0.1, `episode reward rose by only ${rise.toFixed(3)}: ${r.rewards}`);
  const calls = mean(r.callRates.slice(-10)) - mean(r.callRates.slice(0, 10));
  assert(calls >= 0.3, `call rate rose by only ${calls.toFixed(3)}: ${r.callRates}`);
  assert(
    r.accuracyAfter - r.accuracyBefore >= 0.15,
    `held-out accuracy ${r.accuracyBefore} -> ${r.accuracyAfter}`,
  );
});

Deno.test("example through the embedded vLLM-compatible server: every turn over HTTP, on-policy, the calls are learned", async () => {
  const out = await Deno.makeTempDir();
  const cfg = await Effect.runPromise(
    decodeTrainConfig({ backend: "cpu", engine: "server", quiet: true, outputDir: out }),
  );
  const steps = 12;
  const r = await Effect.runPromise(runExample(steps, 8, 20, (base) => serverLayer(cfg, base)));
  const local = await Effect.runPromise(runExample(steps, 8, 20));
  assertEquals(r.rolloutVersions, Array.from({ length: steps }, (_, k) => k));
  // the server samples what the in-process engine samples for the same snapshot and seeds, turn
  // after turn: the two runs train alike
  assertEquals(r.callRates, local.callRates);
  assertEquals(r.rewards, local.rewards);
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
  assert(
    mean(r.callRates.slice(-4)) - mean(r.callRates.slice(0, 4)) >= 0.2,
    `call rate over the server: ${r.callRates}`,
  );
  await Deno.remove(out, { recursive: true });
});

Deno.test("runTraining rolls out a task with an environment as multi-turn episodes", async () => {
  const out = await Deno.makeTempDir();
  try {
    const base = await Effect.runPromise(loadBase(BUILTIN_MODEL_DIR));
    const task = calculatorTask(base.tokenizer, { heldOutSize: 10 });
    const cfg = await Effect.runPromise(decodeTrainConfig({
      backend: "cpu",
      quiet: true,
      evalSize: 10,
      steps: 2,
      promptsPerStep: 4,
      numGenerations: 4,
      maxCompletionLength: task.limits.maxEpisodeTokens,
      outputDir: out,
    }));
    const summary = await Effect.runPromise(runTraining(cfg, task, { log: () => {} }));
    const lines = (await Deno.readTextFile(join(summary.runDir, "metrics.jsonl"))).trim()
      .split("\n").map((l) => JSON.parse(l) as Record<string, number>);
    assertEquals(lines.map((m) => m.step), [1, 2]);
    for (const m of lines) {
      // the multi-turn stage ran: its metrics are there, with episodes of at least one turn
      assert(m["multi_turn/turns_mean"] >= 1, `turns_mean ${m["multi_turn/turns_mean"]}`);
      assert(Number.isFinite(m["multi_turn/env_tokens_mean"]));
    }
  } finally {
    await Deno.remove(out, { recursive: true });
  }
});
