/**
 * The WebGPU backend batches work: a full training step (forward, token log-probs, host loss,
 * backward, clipping, AdamW) waits on the device twice, a LoRA snapshot (A and B copied and read
 * back) once, and its in-process push not at all (the engine runs the resident base with the
 * snapshot's own device adapter).
 */
import { deepStrictEqual as assertEquals } from "node:assert/strict";
import { Effect } from "effect";
import { Policy } from "../src/train/policy.ts";
import { makeLocalEngine } from "../src/rollout/local.ts";
import { initWeights } from "../src/model/weights.ts";
import { gpuTeardown, hasGpu, openGpu } from "./support/backends.ts";
import { testOptimizer, tinyConfig } from "./support/tiny.ts";

Deno.test({
  name: "webgpu: one training step waits on the GPU twice, one snapshot once, its push never",
  ignore: !hasGpu,
  fn: async () => {
    const gpu = (await openGpu())!;
    const ctx = gpu.gpu!;
    const c = tinyConfig();
    await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
      const policy = yield* Policy.make(gpu, c, initWeights(c, 1), {
        mode: "lora",
        lora: {
          r: 2,
          alpha: 4,
          dropout: 0,
          targetModules: ["q_proj", "v_proj", "down_proj"],
          useRslora: false,
        },
        seed: 1,
        optimizer: testOptimizer,
      });
      const seqs = [{ prompt: [1, 3, 4], completion: [5, 6, 2] }, {
        prompt: [1, 7],
        completion: [8, 2],
      }];
      const before = ctx.waits;
      yield* policy.step(
        seqs,
        1,
        (lp) =>
          Effect.succeed({
            loss: 0,
            dLogp: lp.logp.map((x) => new Float64Array(x.length).fill(-0.1)),
            metrics: {},
          }),
      );
      assertEquals(ctx.waits - before, 2);
      const mid = ctx.waits;
      const snap = yield* policy.snapshot();
      assertEquals(ctx.waits - mid, 1);
      const { target } = yield* makeLocalEngine(gpu, 0);
      const pushed = ctx.waits;
      yield* target.push(snap);
      assertEquals(ctx.waits - pushed, 0);
    })));
  },
});

gpuTeardown();
