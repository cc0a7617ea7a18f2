/**
 * WebGPU matmul copies an operand into a shared texture once for consecutive products that read
 * it (q/k/v and their LoRA x·Aᵀ, gate/up): a later product finds the texture already holding
 * that buffer's rows and skips the copy. That must never serve stale contents: random programs
 * of products interleaved with in-place writes of the operand (an accumulating product into it,
 * setRows), other operands through the same textures, and pooled temporaries whose buffers are
 * reused by the next temporary, give what the CPU backend gives after every step.
 */
import { ok as assert } from "node:assert/strict";
import { Effect } from "effect";
import fc from "fast-check";
import type { Ops } from "../src/backend/ops.ts";
import type { Tensor } from "../src/backend/tensor.ts";
import { matmulTuning } from "../src/backend/webgpu/matmul.ts";
import { roundToHalfBits } from "../src/io/safetensors.ts";
import {
  gpuTeardown,
  hasGpu,
  relError,
  seededValues,
  testBackends,
  withOps,
} from "./support/backends.ts";

const { gpu, cpu } = await testBackends();

type Step = "w" | "w16" | "wT" | "shared" | "accInto" | "setRows" | "temp" | "other";
const STEPS: readonly Step[] = ["w", "w16", "wT", "shared", "accInto", "setRows", "temp", "other"];

/** Runs the program on one backend; returns every product's values, in order. */
const run = (ops: Ops, m: number, k: number, n: number, program: readonly Step[], seed: number) =>
  Effect.gen(function* () {
    const vals = (len: number, s: number) => seededValues(len, seed + s);
    const x = ops.fromArray(vals(m * k, 1), [m, k]);
    const y = ops.fromArray(vals(m * k, 2), [m, k]);
    const w = ops.fromArray(vals(n * k, 3), [n, k]);
    const w16 = ops.fromHalf(roundToHalfBits(vals(n * k, 4), "bf16"), [n, k], "bf16");
    const v = ops.fromArray(vals(m * n, 5), [m, n]);
    const u = ops.fromArray(vals(k * k, 6), [k, k]);
    const lora = (s: number) => ({
      a: ops.fromArray(vals(4 * k, 10 + s), [4, k]),
      b: ops.fromArray(vals(n * 4, 20 + s), [n, 4]),
    });
    const l1 = lora(1);
    const l2 = lora(2);
    const out: Tensor[] = [];
    for (const [i, step] of program.entries()) {
      if (step === "w") out.push(ops.matmul(x, w, { transB: true }));
      else if (step === "w16") out.push(ops.matmul(x, w16, { transB: true }));
      // x as op(A) transposed: xᵀ·v, [k, n]
      else if (step === "wT") out.push(ops.matmul(x, v, { transA: true }));
      else if (step === "shared") {
        out.push(...ops.projectLoraShared(x, [{ w, ...l1 }, { w: w16, ...l2 }], 0.5));
      } // x written in place by a kernel: x += 0.25·y·u
      else if (step === "accInto") ops.matmulAccumulate(x, y, u, 0.25, { transB: true });
      else if (step === "setRows") ops.setRows(x, 1, ops.scale(ops.sliceRows(y, 0, 2), i + 1));
      // another operand through the same textures, then x again
      else if (step === "other") out.push(ops.matmul(y, w, { transB: true }));
      else {
        // a pooled temporary (its buffer reused by the next temporary) as the operand
        const keep = ops.fromArray(new Float32Array(m * n), [m, n]);
        ops.transient((t) => t.setRows(keep, 0, t.matmul(t.scale(y, i + 1), w, { transB: true })));
        out.push(keep);
      }
    }
    return yield* ops.read(out);
  });

Deno.test({
  name: "webgpu: an operand texture reused across products never serves stale contents",
  ignore: !hasGpu,
  fn: async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(8, 24, 70),
        // k = 64: copied straight in; 72: packed
        fc.constantFrom(64, 72),
        fc.constantFrom(16, 36),
        fc.array(fc.constantFrom(...STEPS), { minLength: 3, maxLength: 10 }),
        fc.integer({ min: 1, max: 1 << 30 }),
        async (m, k, n, program, seed) => {
          matmulTuning.forceTiled = true;
          try {
            const want = await withOps(cpu, (ops) => run(ops, m, k, n, program, seed));
            const got = await withOps(gpu!, (ops) => run(ops, m, k, n, program, seed));
            assert(got.length === want.length);
            got.forEach((g, j) => {
              const e = relError(g, want[j]);
              assert(e < 1e-4, `m=${m} k=${k} n=${n} [${program}] product ${j}: error ${e}`);
            });
          } finally {
            matmulTuning.forceTiled = false;
          }
        },
      ),
      { numRuns: 40 },
    );
  },
});

gpuTeardown();
