/**
 * The trainer's side of push verification computed ahead (PushTarget.prepare): the guessed greedy
 * probe equals plain greedy decoding whatever the guess, a fully right guess costs one forward
 * pass whose log-probs are bit for bit trainerLogProbs', and the probe cache answers a push of an
 * older snapshot after a newer one was primed (asynchronous GRPO) without recomputing.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { Effect, Exit, Scope } from "effect";
import fc from "fast-check";
import { cpuBackend } from "../src/backend/backend.ts";
import { initLora, type LoraConfig } from "../src/lora/adapter.ts";
import { initWeights } from "../src/model/weights.ts";
import { Rng } from "../src/model/rng.ts";
import { Policy } from "../src/train/policy.ts";
import type { Snapshot } from "../src/snapshot/snapshot.ts";
import {
  makeTrainerProbeCache,
  trainerGreedyProbe,
  trainerLogProbs,
  type VerifySettings,
} from "../src/push/verify.ts";
import { testOptimizer, tinyConfig } from "./support/tiny.ts";

const config = tinyConfig({ vocabSize: 13 });
const LORA: LoraConfig = {
  r: 4,
  alpha: 8,
  dropout: 0,
  targetModules: ["q_proj", "v_proj", "down_proj"],
  useRslora: false,
};
const backend = cpuBackend();
const run = <A, E>(e: Effect.Effect<A, E>): Promise<A> => Effect.runPromise(e);

/** Snapshots of one policy at two versions with different random adapters. */
const snapshots = async (seed: number) => {
  const scope = await run(Scope.make());
  const make = (v: number, s: number) => {
    const init = initLora(config, LORA, s);
    const rng = new Rng(s + 7);
    for (const { b } of init.modules.values()) {
      for (let i = 0; i < b.data.length; i++) b.data[i] = (rng.next() - 0.5) * 2;
    }
    return Scope.provide(scope)(Effect.gen(function* () {
      const policy = yield* Policy.make(backend, config, initWeights(config, seed, 0.8), {
        mode: "lora",
        lora: LORA,
        seed: s,
        optimizer: testOptimizer,
      }, init);
      policy.version = v;
      return yield* policy.snapshot();
    }));
  };
  const a = await run(make(1, seed + 1));
  const b = await run(make(2, seed + 2));
  return { a, b, close: () => run(Scope.close(scope, Exit.void)) };
};

/** Greedy decoding one token per forward pass, the definition the guessed probe must match. */
const plainGreedy = async (snap: Snapshot, prompt: number[], n: number): Promise<number[]> => {
  const tokens: number[] = [];
  for (let j = 0; j < n; j++) {
    const g = await run(trainerGreedyProbe(backend, snap, [...prompt, ...tokens], 1));
    tokens.push(g.tokens[0]);
  }
  return tokens;
};

Deno.test("property: the guessed greedy probe is greedy decoding for any guess; a right guess brings trainerLogProbs' exact log-probs", async () => {
  const { a, close } = await snapshots(3);
  try {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.integer({ min: 3, max: 12 }), { minLength: 1, maxLength: 5 }),
        fc.integer({ min: 1, max: 5 }),
        fc.array(fc.integer({ min: 0, max: 12 }), { maxLength: 6 }),
        async (prompt, n, guess) => {
          const want = await plainGreedy(a, prompt, n);
          const g = await run(trainerGreedyProbe(backend, a, prompt, n, guess));
          assertEquals(g.tokens, want);
          const right = await run(trainerGreedyProbe(backend, a, prompt, n, want));
          assertEquals(right.tokens, want);
          // a right guess: one pass, the same numbers as the verification's own forward pass
          assert(right.logprobs !== null);
          assertEquals(right.logprobs, await run(trainerLogProbs(backend, a, prompt, want)));
          if (g.logprobs !== null) assertEquals(g.logprobs, right.logprobs);
        },
      ),
      { numRuns: 60 },
    );
  } finally {
    await close();
  }
});

Deno.test("probe cache: primed snapshots answer their probes without recomputing; an older one survives a newer prime", async () => {
  const { a, b, close } = await snapshots(5);
  try {
    const settings: VerifySettings = {
      policy: "fail",
      tolerance: 1e-4,
      probePrompt: [1, 4, 5, 6],
      probeTokens: 4,
    };
    const cache = makeTrainerProbeCache();
    await run(cache.prime(backend, a, settings));
    await run(cache.prime(backend, b, settings)); // b primed while a's push still verifies
    for (const snap of [a, b]) {
      const tokens = await plainGreedy(snap, settings.probePrompt as number[], 4);
      const expected = await run(trainerLogProbs(backend, snap, settings.probePrompt, tokens));
      // answered from the cache: a backend that cannot run proves no forward pass happens
      const noDevice = { ...backend, ops: Effect.die(new Error("forward pass ran")) };
      const got = await run(cache.trainer(noDevice as never, snap, settings.probePrompt, tokens));
      assertEquals(got, expected);
    }
    // another answer (an engine serving other weights) is computed, as without the cache
    const other = [7, 7, 7, 7];
    assertEquals(
      await run(cache.trainer(backend, a, settings.probePrompt, other)),
      await run(trainerLogProbs(backend, a, settings.probePrompt, other)),
    );
  } finally {
    await close();
  }
});
