/**
 * Host sampling of one logits row of SmolLM2's vocabulary (49,152): `sampleTokenWith`, which
 * orders only what a decision needs (src/model/sampling.ts), next to the plain definition that
 * sorts the whole row (tests/support/sampling_reference.ts), in the same run. The server samples
 * a row on the host when logits rules, min_p or processed alternatives apply, or when the device
 * candidates cannot decide; the first token of every sequence too. Rows are Gaussian logits of
 * three spreads (a random-weight model is flat; trained ones are peaked), with three settings.
 *
 *   deno run -A bench/sampling.ts   (writes bench/results/sampling.json)
 * @module
 */
import { sampleTokenWith, type SamplingParams } from "../src/model/sampling.ts";
import { sampleByDefinition } from "../tests/support/sampling_reference.ts";
import { median, randomFloats, writeResult } from "./common.ts";

const V = 49_152;
const ROUNDS = 5;
const PER_ROUND = 10;

/** Gaussian logits (Box-Muller over the bench LCG) of standard deviation `std`. */
const gaussianRow = (std: number, seed: number): Float32Array => {
  const u = randomFloats(2 * V, seed);
  return Float32Array.from({ length: V }, (_, i) => {
    const a = (u[2 * i] + 1.000001) / 2.000002;
    const b = (u[2 * i + 1] + 1) / 2;
    return std * Math.sqrt(-2 * Math.log(a)) * Math.cos(2 * Math.PI * b);
  });
};

const SPREADS = { flat: 0.05, std1: 1, peaked: 3 } as const;
const SETTINGS: Record<string, SamplingParams> = {
  t1: { temperature: 1, topK: 0, topP: 1 },
  t1_top_p_09: { temperature: 1, topK: 0, topP: 0.9 },
  t07_top_k_50: { temperature: 0.7, topK: 50, topP: 1 },
};

/** Median over rounds of the mean ms per row; both samplers alternate within a round. */
const timeBoth = (row: Float32Array, p: SamplingParams) => {
  const ours: number[] = [];
  const whole: number[] = [];
  let u = 0.37;
  for (let r = 0; r < ROUNDS; r++) {
    for (const [f, out] of [[sampleTokenWith, ours], [sampleByDefinition, whole]] as const) {
      const t0 = performance.now();
      for (let i = 0; i < PER_ROUND; i++) {
        u = (u * 7.31 + 0.113) % 1;
        f(row, p, u);
      }
      out.push((performance.now() - t0) / PER_ROUND);
    }
  }
  return { ours: median(ours), whole: median(whole) };
};

const results: Record<string, number | string> = {
  vocab: V,
  rounds: ROUNDS,
  rows_per_round: PER_ROUND,
};
for (const [spread, std] of Object.entries(SPREADS)) {
  const row = gaussianRow(std, 7);
  for (const [name, p] of Object.entries(SETTINGS)) {
    sampleTokenWith(row, p, 0.5); // warm-up (JIT)
    sampleByDefinition(row, p, 0.5);
    const { ours, whole } = timeBoth(row, p);
    const key = `${spread}_${name}`;
    results[`${key}_host_sample_ms_per_row`] = Math.round(ours * 100) / 100;
    results[`${key}_whole_row_sort_ms_per_row`] = Math.round(whole * 100) / 100;
    results[`${key}_speedup_vs_whole_row_sort`] = Math.round(whole / ours * 100) / 100;
    console.log(`${key}: ${ours.toFixed(2)} ms vs ${whole.toFixed(2)} ms sorting the whole row`);
  }
}
console.log(await writeResult("sampling", results));
