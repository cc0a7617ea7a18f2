/**
 * Gradient checkpointing (TRL's gradient_checkpointing) through the Policy: training steps with
 * it give bit-identical losses, gradient norms, parameters and AdamW moments (LoRA with dropout,
 * and full fine-tuning; both backends), its tape keeps only the layer inputs, a WebGPU step still
 * waits twice, and the option decodes from the training options (default off).
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { Effect } from "effect";
import type { BackendShape } from "../src/backend/backend.ts";
import { forwardLogProbs, uploadModel } from "../src/model/decoder.ts";
import { initWeights } from "../src/model/weights.ts";
import { Rng } from "../src/model/rng.ts";
import { type OptimizerConfig, Policy, type PolicyState } from "../src/train/policy.ts";
import {
  optimizerConfigOf,
  optimizerOptionFields,
  type OptimizerOptions,
} from "../src/train/optimizer_config.ts";
import { decodeOptions } from "../src/base/options.ts";
import { gpuTeardown, hasGpu, openGpu, testBackends, withOps } from "./support/backends.ts";
import { tinyConfig } from "./support/tiny.ts";

const { gpu, cpu } = await testBackends();
const c = tinyConfig({ modelType: "qwen2", attentionBias: true, numLayers: 3, vocabSize: 13 });

const optimizer = (gradientCheckpointing: boolean): OptimizerConfig => ({
  learningRate: 1e-2,
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
  weightDecay: 0.01,
  maxGradNorm: 1,
  gradientCheckpointing,
});

const seqs = [
  { prompt: [1, 3, 4], completion: [5, 6, 2] },
  { prompt: [1, 7], completion: [8, 9, 10, 2] },
];

/** Three steps of a policy; the stats and the final state. */
const train = (b: BackendShape, mode: "lora" | "full", gc: boolean) =>
  Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const policy = yield* Policy.make(b, c, initWeights(c, 3, 0.3), {
      mode,
      lora: {
        r: 2,
        alpha: 4,
        dropout: 0.2,
        targetModules: [
          "q_proj",
          "k_proj",
          "v_proj",
          "o_proj",
          "gate_proj",
          "up_proj",
          "down_proj",
        ],
        useRslora: false,
      },
      seed: 4,
      optimizer: optimizer(gc),
    });
    const stats = [];
    for (let s = 0; s < 3; s++) {
      stats.push(
        yield* policy.step(seqs, 0.9, (lp) =>
          Effect.succeed({
            loss: -lp.logp.reduce((a, x) => a + x.reduce((u, v) => u + v, 0), 0),
            dLogp: lp.logp.map((x) => x.map((_, j) => -1 - 0.1 * j)),
            metrics: {},
          })),
      );
    }
    return { stats, state: yield* policy.exportState() };
  })));

const sameState = (a: PolicyState, b: PolicyState) => {
  for (const group of ["params", "m", "v"] as const) {
    assertEquals([...a[group].keys()], [...b[group].keys()]);
    for (const [k, t] of a[group]) assertEquals(b[group].get(k)!.data, t.data, `${group}/${k}`);
  }
  assertEquals(a.rng, b.rng);
};

for (const b of [cpu, ...(gpu ? [gpu] : [])]) {
  for (const mode of ["lora", "full"] as const) {
    Deno.test(`${b.info.name}: ${mode} steps with gradient checkpointing are bit-identical`, async () => {
      const plain = await train(b, mode, false);
      const ck = await train(b, mode, true);
      assertEquals(ck.stats, plain.stats);
      sameState(ck.state, plain.state);
    });
  }
}

Deno.test("cpu: a checkpointed tape keeps each layer's input and no layer activations", () =>
  withOps(cpu, (ops) =>
    Effect.sync(() => {
      const model = uploadModel(ops, c, initWeights(c, 1));
      const input = { ids: [1, 3, 4, 5, 6, 2], batch: 2, seqLen: 3, logitRows: [0, 1, 3] };
      const run = (gradientCheckpointing: boolean) =>
        forwardLogProbs(ops, model, input, [3, 4, 6], 1, {
          train: true,
          rng: new Rng(1),
          gradientCheckpointing,
        }).tape!.tape;
      const ck = run(true);
      assertEquals(ck.layers.length, 0);
      assertEquals(ck.checkpoints!.length, c.numLayers);
      assert(ck.checkpoints!.every((p) => p.x.shape[0] === 6 && p.x.shape[1] === c.hiddenSize));
      const plain = run(false);
      assertEquals(plain.layers.length, c.numLayers);
      assertEquals(plain.checkpoints, null);
    })));

Deno.test({
  name: "webgpu: a checkpointed training step still waits on the GPU twice",
  ignore: !hasGpu,
  fn: async () => {
    const g = (await openGpu())!;
    await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
      const policy = yield* Policy.make(g, c, initWeights(c, 1), {
        mode: "lora",
        lora: { r: 2, alpha: 4, dropout: 0.1, targetModules: ["q_proj"], useRslora: false },
        seed: 1,
        optimizer: optimizer(true),
      });
      const before = g.gpu!.waits;
      yield* policy.step(seqs, 1, (lp) =>
        Effect.succeed({
          loss: 0,
          dLogp: lp.logp.map((x) => new Float64Array(x.length).fill(-0.1)),
          metrics: {},
        }));
      assertEquals(g.gpu!.waits - before, 2);
    })));
  },
});

Deno.test("options: gradient_checkpointing decodes (default false) into the Policy's config", async () => {
  // the fields are declared as a plain OptionFields record: the decoded type is generic
  const decode = (input: unknown) =>
    Effect.runPromise(decodeOptions(optimizerOptionFields, input)) as Promise<
      unknown
    > as Promise<OptimizerOptions>;
  const off = await decode({});
  assertEquals(optimizerConfigOf(off, 1e-3).gradientCheckpointing, false);
  const on = await decode({ gradient_checkpointing: true });
  assertEquals(optimizerConfigOf(on, 1e-3).gradientCheckpointing, true);
});

gpuTeardown();
