/**
 * WebGPU matmul keeps the packed texture of a 16-bit operand (a frozen base weight) with its
 * buffer, so that later products skip the packing. A kept copy must never outlive the contents
 * it mirrors: products before and after an in-place write (setRows) into the 16-bit tensor, and
 * products with row slices whose pooled buffers are reused by the next slice, all give the exact
 * values (W seen through an identity, so every element is compared bit for bit), on both the
 * staged-row layout (rows of a width that is not a multiple of 128 elements) and the
 * directly-copied one (kept for products of few rows).
 */
import { ok as assert } from "node:assert/strict";
import { Effect } from "effect";
import fc from "fast-check";
import type { Ops } from "../src/backend/ops.ts";
import type { HalfDType, Tensor } from "../src/backend/tensor.ts";
import { matmulTuning } from "../src/backend/webgpu/matmul.ts";
import { roundToHalfBits, widenHalfBits } from "../src/io/safetensors.ts";
import { gpuTeardown, hasGpu, seededValues, testBackends, withOps } from "./support/backends.ts";

const { gpu, cpu } = await testBackends();

/** I [m, k] with ones on the diagonal: I·Wᵀ [m, rows] holds W[r, i] at (i, r). */
const eye = (m: number, k: number): Float32Array => {
  const e = new Float32Array(m * k);
  for (let i = 0; i < Math.min(m, k); i++) e[i * k + i] = 1;
  return e;
};

/** The values I·Wᵀ must hold for W [rows, k] of exact values `w`. */
const picked = (w: Float32Array, rows: number, k: number, m: number): Float32Array => {
  const out = new Float32Array(m * rows);
  for (let i = 0; i < m; i++) for (let r = 0; r < rows; r++) out[i * rows + r] = w[r * k + i];
  return out;
};

const firstMismatch = (got: ArrayLike<number>, want: ArrayLike<number>): number =>
  Array.from(got).findIndex((x, i) => !Object.is(x, want[i]));

Deno.test({
  name: "webgpu: a kept 16-bit operand texture follows its buffer (reuse, setRows, pooled slices)",
  ignore: !hasGpu,
  fn: async () => {
    await fc.assert(
      fc.asyncProperty(
        // k = 72: rows staged through a 256-byte pitch; k = 128: copied directly
        fc.constantFrom(72, 128),
        fc.integer({ min: 8, max: 40 }).map((r) => r * 4),
        fc.constantFrom<HalfDType>("bf16", "f16"),
        fc.integer({ min: 1, max: 0x7fffffff }),
        async (k, rows, dtype, s) => {
          // few rows of A (a decoding batch), so that the directly-copied layout is kept too
          const m = 32;
          const v1 = Float32Array.from(seededValues(rows * k, s), (x) => x * 3);
          const v2 = Float32Array.from(seededValues(rows * k, s + 1), (x) => x * 3);
          const b1 = roundToHalfBits(v1, dtype);
          const b2 = roundToHalfBits(v2, dtype);
          const w1 = widenHalfBits(b1, dtype);
          const w2 = widenHalfBits(b2, dtype);
          // w after setRows(w, 2, rows 2.. of the second tensor)
          const w12 = Float32Array.from(w1);
          w12.set(w2.subarray(2 * k), 2 * k);
          const sliceRows = rows - 4;
          const want = [
            picked(w1, rows, k, m),
            picked(w1, rows, k, m),
            picked(w12, rows, k, m),
            picked(w12.subarray(k), sliceRows, k, m),
            picked(w2.subarray(3 * k), sliceRows, k, m),
          ];
          matmulTuning.forceTiled = true;
          try {
            for (const b of [cpu, gpu!]) {
              const got = await withOps(b, async (ops: Ops) => {
                const i = ops.fromArray(eye(m, k), [m, k]);
                const w = ops.fromHalf(b1, [rows, k], dtype);
                const other = ops.fromHalf(b2, [rows, k], dtype);
                const prod = (o: Ops, t: Tensor) => o.matmul(i, t, { transB: true });
                const first = prod(ops, w);
                const again = prod(ops, w);
                const [r0, r1] = await Effect.runPromise(ops.read([first, again]));
                ops.setRows(w, 2, ops.sliceRows(other, 2, rows - 2));
                const after = (await Effect.runPromise(ops.read([prod(ops, w)])))[0];
                // slices are fresh pooled buffers: the second reuses the first's buffer
                const s1 = await withOps(b, (t) => t.read([prod(t, t.sliceRows(w, 1, sliceRows))]));
                const s2 = await withOps(
                  b,
                  (t) => t.read([prod(t, t.sliceRows(other, 3, sliceRows))]),
                );
                return [r0, r1, after, s1[0], s2[0]];
              });
              got.forEach((g, j) => {
                const bad = firstMismatch(g, want[j]);
                assert(
                  bad < 0,
                  `${b.info.name} ${dtype} k=${k} rows=${rows} product ${j}: element ${bad}: ${
                    g[bad]
                  } vs ${want[j][bad]}`,
                );
              });
            }
          } finally {
            matmulTuning.forceTiled = false;
          }
        },
      ),
      { numRuns: 12 },
    );
  },
});

Deno.test({
  name:
    "webgpu: projectLoraShared's kept stack of LoRA A follows its buffers (reuse, then an in-place update)",
  ignore: !hasGpu,
  fn: async () => {
    const [m, k, n, r] = [80, 64, 48, 16];
    const t = (len: number, seed: number, shape: number[]) => (ops: Ops) =>
      ops.fromArray(seededValues(len, seed), shape);
    const x = t(m * k, 1, [m, k]);
    const parts = [0, 1, 2].map((i) => ({
      w: t(n * k, 10 + i, [n, k]),
      a: t(r * k, 20 + i, [r, k]),
      b: t(n * r, 30 + i, [n, r]),
    }));
    const delta = t(r * k, 40, [r, k]);
    /** Two calls on the same A, then A[1] += delta and a third; each checked against the CPU. */
    const run = (b: typeof gpu) =>
      withOps(b!, (ops) =>
        Effect.gen(function* () {
          const xx = x(ops);
          const ps = parts.map((p) => ({ w: p.w(ops), a: p.a(ops), b: p.b(ops) }));
          const first = ops.projectLoraShared(xx, ps, 0.5);
          const second = ops.projectLoraShared(xx, ps, 0.5);
          ops.addScaledInPlace(ps[1].a, delta(ops), 1);
          const third = ops.projectLoraShared(xx, ps, 0.5);
          return yield* ops.read([...first, ...second, ...third]);
        }));
    const got = await run(gpu);
    const want = await run(cpu);
    got.forEach((g, i) => {
      const e = Math.max(...Array.from(g, (v, j) => Math.abs(v - want[i][j])));
      assert(e < 1e-4, `output ${i}: max error ${e}`);
    });
    // the update reached the adapted projection only
    assert(got[7].some((v, j) => v !== got[4][j]), "the third call saw the old A");
    assert(got[6].every((v, j) => v === got[3][j]));
  },
});

gpuTeardown();
