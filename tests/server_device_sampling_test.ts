/**
 * The server's sampling step from device candidates (src/server/sampler.ts
 * `sampleStepFromCandidates`, used by a decode step for sequences `candidatesNeeded` allows):
 * whenever the candidates decide, the token, its logprob in either logprobs mode and the top
 * alternatives are those of the whole-row step (`sampleStep`) for the same uniform, with
 * candidates from the CPU and WebGPU kernels, and a step decides from the candidates it asked for
 * only, whatever the batch's largest count was. Sequences needing their whole row are refused.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import fc from "fast-check";
import { SAMPLE_CANDIDATES } from "../src/model/generate.ts";
import { candidateRow } from "../src/model/sampling.ts";
import { Rng } from "../src/model/rng.ts";
import {
  candidatesNeeded,
  firstCandidates,
  type LogprobsMode,
  sampleStep,
  sampleStepFromCandidates,
  type StepParams,
} from "../src/server/sampler.ts";
import { candidatesOn, gpuTeardown, seededValues, testBackends } from "./support/backends.ts";

const { gpu, cpu } = await testBackends();
const both = [cpu, ...(gpu ? [gpu] : [])];

Deno.test("candidatesNeeded: only steps whose result the candidates can hold", () => {
  const V = 49152;
  const p: StepParams = { temperature: 1, topP: 1, topK: 0, minP: 0 };
  const raw: LogprobsMode = "raw_logprobs";
  const processed: LogprobsMode = "processed_logprobs";
  assertEquals(candidatesNeeded({ ...p, temperature: 0 }, V, true, raw, null), 1);
  assertEquals(candidatesNeeded({ ...p, temperature: 0 }, V, true, processed, 5), 5);
  assertEquals(candidatesNeeded(p, V, true, raw, null), 16);
  assertEquals(candidatesNeeded({ ...p, topK: 40 }, V, true, raw, null), 40);
  assertEquals(
    candidatesNeeded({ ...p, topK: 500, topP: 0.9 }, V, true, raw, null),
    SAMPLE_CANDIDATES,
  );
  assertEquals(candidatesNeeded({ ...p, topK: 500 }, 300, true, raw, null), 16); // k >= vocab: off
  assertEquals(candidatesNeeded(p, V, true, raw, 20), 20);
  assertEquals(candidatesNeeded(p, V, true, processed, null), 16);
  // the whole row: logits rules or bans, min_p, processed alternatives, too many alternatives
  assertEquals(candidatesNeeded(p, V, false, raw, null), null);
  assertEquals(candidatesNeeded({ ...p, minP: 0.1 }, V, true, raw, null), null);
  assertEquals(candidatesNeeded({ ...p, minP: 0.1, temperature: 0 }, V, true, raw, null), 1);
  assertEquals(candidatesNeeded(p, V, true, processed, 3), null);
  assertEquals(candidatesNeeded(p, V, true, raw, SAMPLE_CANDIDATES + 1), null);
  // a top-k beyond the candidates without a top-p cut: the candidates never decide it
  assertEquals(candidatesNeeded({ ...p, topK: 500 }, V, true, raw, null), null);
});

Deno.test("sampleStepFromCandidates: the whole-row step's token, logprob (1e-6) and alternatives", async () => {
  let decided = 0;
  let total = 0;
  for (const b of both) {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 4 }),
        fc.constantFrom(7, 64, 500, 3000),
        fc.integer({ min: 1, max: 1 << 30 }),
        fc.constantFrom(1, 5, 12),
        fc.record({
          temperature: fc.constantFrom(0, 0.5, 1, 1.4),
          topK: fc.constantFrom(0, 1, 5, 40, 100),
          topP: fc.constantFrom(1, 0.9, 0.5),
          minP: fc.constant(0),
        }),
        fc.constantFrom<LogprobsMode>("raw_logprobs", "processed_logprobs"),
        fc.constantFrom(null, 1, 4, 20),
        fc.integer({ min: 0, max: SAMPLE_CANDIDATES }),
        async (n, v, seed, scale, p: StepParams, mode, topN, other) => {
          const need = candidatesNeeded(p, v, true, mode, topN);
          if (need === null) return;
          // the batch's count: this step's need or another row's larger one
          const count = Math.min(v, Math.max(need, other));
          const data = Float32Array.from(seededValues(n * v, seed), (x) => x * scale);
          const cand = await candidatesOn(b, data, [n, v], new Array(n).fill(p.temperature), count);
          const rng = new Rng(seed);
          for (let i = 0; i < n; i++) {
            const u = p.temperature > 0 ? rng.next() : NaN;
            const row = data.subarray(i * v, (i + 1) * v);
            const want = sampleStep(row, row, p, u, mode, topN);
            const c = firstCandidates(candidateRow(cand, i, count, v), Math.min(need, v));
            const got = sampleStepFromCandidates(c, p, u, mode, topN);
            total++;
            if (got === null) continue;
            decided++;
            assertEquals(got.token, want.token);
            assert(
              Math.abs(got.logprob - want.logprob) <= 1e-6,
              `${got.logprob} vs ${want.logprob}`,
            );
            assertEquals(got.top === null, want.top === null);
            if (got.top === null || want.top === null) continue;
            assertEquals(got.top.map((e) => e[0]), want.top.map((e) => e[0]));
            got.top.forEach(([, lp], k) => assert(Math.abs(lp - want.top![k][1]) <= 1e-6, "top"));
          }
        },
      ),
      { numRuns: 60 },
    );
  }
  assert(decided > total / 2, `${decided} / ${total} decided`);
});

gpuTeardown();
