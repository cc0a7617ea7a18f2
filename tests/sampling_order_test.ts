/**
 * The host sampler orders only the prefix of a row a decision needs (src/model/sampling.ts
 * `topOrder`, `keptTokens`, `sampleTokenWith`). Checked against the plain definition
 * (tests/support/sampling_reference.ts): sort the whole row most likely first (ties by lower
 * id), cut top-k then top-p, and walk the kept set's mass in that order. Rows have ties, -inf
 * entries and SmolLM2's vocabulary size. Kept sets must be identical; a top-k or top-p row's
 * token and logprob exactly the same; an unfiltered row's mass is summed in id order, not sorted
 * order, so its logprob is within 1e-10 and a draw within that rounding of a boundary may pick a
 * neighbour.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import fc from "fast-check";
import { keptTokens, logSoftmax, sampleTokenWith, topOrder } from "../src/model/sampling.ts";
import { seededValues } from "./support/backends.ts";
import { keptByDefinition, sampleByDefinition } from "./support/sampling_reference.ts";

/** A row of `v` logits times `scale`: quantised (ties) when `quant`, some -inf. */
const rowOf = (v: number, seed: number, scale: number, quant: boolean) =>
  Float32Array.from(seededValues(v, seed), (x, i) => {
    if (i > 0 && (i * 7919 + seed) % 97 === 0) return -Infinity; // one finite logit at least
    const y = x * scale;
    return quant ? Math.round(y * 2) / 2 : y;
  });

const rowArb = fc.record({
  v: fc.constantFrom(1, 5, 300, 3000, 49152),
  seed: fc.integer({ min: 1, max: 1 << 30 }),
  scale: fc.constantFrom(0.05, 1, 5, 20),
  quant: fc.boolean(),
});
const paramsArb = fc.record({
  temperature: fc.constantFrom(0.3, 0.7, 1, 1.5),
  topK: fc.constantFrom(0, 1, 5, 40, 300, 1000, 100000),
  topP: fc.constantFrom(1, 0.99, 0.9, 0.5, 0.1),
});

Deno.test("topOrder: the whole row's order, cut to its first m (log-probs, and raw logits of both signs)", () => {
  fc.assert(
    fc.property(rowArb, fc.integer({ min: 0, max: 60000 }), ({ v, seed, scale, quant }, m) => {
      const logits = rowOf(v, seed, scale, quant);
      for (const row of [logSoftmax(logits), logits]) {
        const want = keptByDefinition(row, { topK: 0, topP: 1 }).slice(0, m);
        assertEquals(Array.from(topOrder(row, m)), want);
      }
    }),
    { numRuns: 80 },
  );
});

Deno.test("keptTokens and sampleTokenWith: the same kept set and token as sorting the whole row", () => {
  fc.assert(
    fc.property(rowArb, paramsArb, fc.double({ min: 0, max: 1, noNaN: true }), (r, p, u) => {
      const logits = rowOf(r.v, r.seed, r.scale, r.quant);
      const lp = logSoftmax(logits, p.temperature);
      assertEquals(keptTokens(lp, p), keptByDefinition(lp, p));
      const got = sampleTokenWith(logits, p, u);
      const want = sampleByDefinition(logits, p, u);
      // a filtered row sums and walks its kept set in sorted order, as the definition does:
      // the same token and logprob exactly; an unfiltered row's id-order mass is within 1e-10
      const filtered = (p.topK > 0 && p.topK < r.v) || p.topP < 1;
      if (got.token === want.token) {
        // equal values (-Infinity too: a walk that rounds past the end takes the last token)
        const err = got.processedLogprob === want.processedLogprob
          ? 0
          : Math.abs(got.processedLogprob - want.processedLogprob);
        assert(filtered ? err === 0 : err <= 1e-10, `processed logprob off by ${err}`);
        return;
      }
      assert(!filtered, `filtered row: token ${got.token} vs ${want.token}`);
      // another token only where the walk ends in rounding: an unfiltered row's mass is summed
      // in id order, so the two targets differ by the sums' rounding (~vocab x 1e-16 of the
      // mass). Then the later choice starts within that of the target, with no more than that
      // between the two choices.
      const order = keptByDefinition(lp, p);
      const total = order.reduce((a, i) => a + Math.exp(lp[i]), 0);
      const [g, w] = [order.indexOf(got.token), order.indexOf(want.token)];
      assert(g >= 0, "a kept token");
      const [lo, hi] = [Math.min(g, w), Math.max(g, w)];
      let before = 0;
      let between = 0;
      for (let j = 0; j < hi; j++) {
        const e = Math.exp(lp[order[j]]);
        before += e;
        if (j > lo) between += e;
      }
      const tol = 1e-10 * total;
      assert(between <= tol, `${between / total} of the mass between the two choices`);
      assert(
        Math.abs(before - u * total) <= tol,
        `${Math.abs(before / total - u)} from the target`,
      );
    }),
    { numRuns: 120 },
  );
});

Deno.test("topOrder: a NaN in the row still gives m distinct tokens (the row is ordered whole)", () => {
  const lp = Float64Array.from({ length: 4000 }, (_, i) => (i === 7 ? NaN : -(i % 50)));
  const got = Array.from(topOrder(lp, 10));
  assertEquals(got.length, 10);
  assertEquals(new Set(got).size, 10);
  assert(got.every((i) => Number.isInteger(i) && i >= 0 && i < lp.length));
});
