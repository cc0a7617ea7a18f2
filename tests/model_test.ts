/**
 * Decoder tests: config parsing, gradient checks of LoRA and full fine-tuning against float64
 * finite differences on both backends (with and without gradient checkpointing, which must also
 * give bit-identical gradients), and KV-cached decoding against the full forward pass.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { Effect } from "effect";
import type { BackendShape } from "../src/backend/backend.ts";
import type { Ops } from "../src/backend/ops.ts";
import {
  type ModelConfig,
  ModelConfigError,
  parseHfConfig,
  toHfConfig,
} from "../src/model/config.ts";
import {
  backward,
  type DeviceModel,
  forward,
  forwardCached,
  type LoraRuntime,
  makeKvCache,
  uploadModel,
} from "../src/model/decoder.ts";
import { Rng } from "../src/model/rng.ts";
import {
  initWeights,
  validateWeights,
  type WeightMap,
  WeightsError,
} from "../src/model/weights.ts";
import { initLora, type LoraWeights, uploadLora } from "../src/lora/adapter.ts";
import { gpuTeardown, hasGpu, relError, testBackends, withOps } from "./support/backends.ts";
import { matmulTuning } from "../src/backend/webgpu/matmul.ts";
import { roundToHalfBits } from "../src/io/safetensors.ts";
import type { BaseWeightMap } from "../src/model/weights.ts";
import { tinyConfig } from "./support/tiny.ts";

const { gpu, cpu, ref } = await testBackends();

Deno.test("config: llama and qwen2 config.json parse, with defaults and rope_parameters", async () => {
  const llama = await Effect.runPromise(parseHfConfig({
    model_type: "llama",
    hidden_size: 64,
    intermediate_size: 128,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    vocab_size: 100,
    rms_norm_eps: 1e-5,
    rope_parameters: { rope_theta: 500000, rope_type: "default" },
    tie_word_embeddings: true,
    eos_token_id: [5, 6],
  }));
  assertEquals(llama.headDim, 16);
  assertEquals(llama.ropeTheta, 500000);
  assertEquals(llama.eosTokenIds, [5, 6]);
  assertEquals(llama.attentionBias, false);
  const qwen = await Effect.runPromise(parseHfConfig({
    model_type: "qwen2",
    hidden_size: 32,
    intermediate_size: 64,
    num_hidden_layers: 1,
    num_attention_heads: 4,
    vocab_size: 50,
  }));
  assertEquals(qwen.numKvHeads, 4);
  assertEquals(qwen.attentionBias, true);
  assertEquals(qwen.ropeTheta, 10000);
  // round trip through the exported config.json
  assertEquals(await Effect.runPromise(parseHfConfig(toHfConfig(qwen))), qwen);
});

Deno.test("config: bad config.json -> ModelConfigError naming the field", async () => {
  const bad = async (j: unknown, field: string) => {
    const e = await Effect.runPromise(Effect.flip(parseHfConfig(j)));
    assert(e instanceof ModelConfigError);
    assertEquals(e.field, field);
    assert(e.message.includes(field === "(root)" ? "object" : field), e.message);
  };
  const base = {
    model_type: "llama",
    hidden_size: 64,
    intermediate_size: 128,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    vocab_size: 100,
  };
  await bad({ ...base, model_type: "gpt2" }, "model_type");
  await bad({ ...base, hidden_size: undefined }, "hidden_size");
  await bad({ ...base, num_key_value_heads: 3 }, "num_key_value_heads");
  await bad({ ...base, vocab_size: -1 }, "vocab_size");
  await bad({ ...base, hidden_act: "gelu" }, "hidden_act");
  await bad([1, 2], "(root)");
});

Deno.test("weights: missing tensor, wrong shape and NaN are typed errors naming the tensor", async () => {
  const c = tinyConfig();
  const w = initWeights(c, 1);
  const missing = new Map(w);
  missing.delete("model.layers.1.mlp.up_proj.weight");
  const e1 = await Effect.runPromise(Effect.flip(validateWeights(c, missing)));
  assert(e1 instanceof WeightsError && e1.tensor === "model.layers.1.mlp.up_proj.weight");
  const shaped = new Map(w);
  shaped.set("model.norm.weight", { shape: [9], data: new Float32Array(9) });
  const e2 = await Effect.runPromise(Effect.flip(validateWeights(c, shaped)));
  assert(e2 instanceof WeightsError && e2.message.includes("[9]"));
  const nan = new Map(w);
  const d = new Float32Array(w.get("lm_head.weight")!.data);
  d[7] = NaN;
  nan.set("lm_head.weight", { shape: w.get("lm_head.weight")!.shape, data: d });
  const e3 = await Effect.runPromise(Effect.flip(validateWeights(c, nan)));
  assert(e3 instanceof WeightsError && e3.tensor === "lm_head.weight" && e3.message.includes("7"));
});

/** A model with non-trivial weights (std 0.4) so every path carries signal. */
const makeWeights = (c: ModelConfig, seed: number): WeightMap => {
  const w = initWeights(c, seed, 0.4);
  const rng = new Rng(seed + 7);
  for (const [name, t] of w) {
    if (name.endsWith("norm.weight") || name.endsWith(".bias")) {
      for (let i = 0; i < t.data.length; i++) {
        t.data[i] = (name.endsWith(".bias") ? 0 : 1) + 0.3 * rng.normal();
      }
    }
  }
  return w;
};

/** LoRA with a non-zero B so its gradient paths are exercised. */
const makeLora = (c: ModelConfig, seed: number): LoraWeights => {
  const l = initLora(c, {
    r: 2,
    alpha: 4,
    dropout: 0,
    targetModules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    useRslora: false,
  }, seed);
  const rng = new Rng(seed + 3);
  for (const m of l.modules.values()) {
    for (let i = 0; i < m.b.data.length; i++) m.b.data[i] = 0.3 * rng.normal();
  }
  return l;
};

const input = { ids: [1, 4, 7, 3, 9, 0, 2, 5, 10, 6], batch: 2, seqLen: 5, kvStart: [0, 1] };

/** Scalar loss Σ R ⊙ logits on the f64 reference, as a function of one host parameter array. */
const lossOn = (
  b: BackendShape,
  c: ModelConfig,
  weights: WeightMap,
  lora: LoraWeights | null,
  proj: Float64Array,
): Promise<number> =>
  withOps(b, (ops: Ops) =>
    Effect.gen(function* () {
      const model = uploadModel(ops, c, weights);
      const { logits } = forward(ops, model, input, { lora: lora ? uploadLora(ops, lora) : null });
      const [l] = yield* ops.read([logits]);
      let s = 0;
      for (let i = 0; i < l.length; i++) s += proj[i] * l[i];
      return s;
    }));

const gradsOn = (
  b: BackendShape,
  c: ModelConfig,
  weights: WeightMap,
  lora: LoraWeights | null,
  proj: Float64Array,
  mode: "lora" | "full",
  opts: { readonly gradientCheckpointing?: boolean; readonly dropout?: number } = {},
): Promise<Map<string, Float64Array>> =>
  withOps(b, (ops: Ops) =>
    Effect.gen(function* () {
      const model = uploadModel(ops, c, weights);
      const run = lora ? { ...uploadLora(ops, lora), dropout: opts.dropout ?? 0 } : null;
      const { logits, tape } = forward(ops, model, input, {
        lora: run,
        train: true,
        rng: new Rng(42),
        gradientCheckpointing: opts.gradientCheckpointing,
      });
      const grads = backward(ops, tape!, ops.fromArray(proj, logits.shape), mode);
      const names = [...grads.keys()];
      const host = yield* ops.read(names.map((n) => grads.get(n)!));
      return new Map(names.map((n, i) => [n, Float64Array.from(host[i])]));
    }));

/** Central differences at sampled coordinates of every parameter tensor (float64 forward). */
const checkGradients = async (
  b: BackendShape,
  c: ModelConfig,
  mode: "lora" | "full",
  tol: number,
  gradientCheckpointing = false,
) => {
  const weights = makeWeights(c, 11);
  const lora = mode === "lora" ? makeLora(c, 5) : null;
  const proj = Float64Array.from(
    { length: input.ids.length * c.vocabSize },
    (_, i) => Math.sin(i * 1.7),
  );
  const grads = await gradsOn(b, c, weights, lora, proj, mode, { gradientCheckpointing });
  const params: [string, Float32Array][] = mode === "full"
    ? [...weights].map(([n, t]) => [n, t.data])
    : [...lora!.modules].flatMap(([p, m]) =>
      [[`${p}.lora_A`, m.a.data], [`${p}.lora_B`, m.b.data]] as [string, Float32Array][]
    );
  assertEquals(new Set(grads.keys()), new Set(params.map(([n]) => n)));
  const rng = new Rng(3);
  let worst = 0;
  for (const [name, data] of params) {
    const g = grads.get(name)!;
    for (let k = 0; k < 3; k++) {
      const i = rng.int(data.length);
      const keep = data[i];
      const h = 1e-3;
      data[i] = keep + h;
      const up = await lossOn(ref, c, weights, lora, proj);
      data[i] = keep - h;
      const down = await lossOn(ref, c, weights, lora, proj);
      data[i] = keep;
      // the perturbation is exact in f32 storage: use the stored step
      const fd = (up - down) / (Math.fround(keep + h) - Math.fround(keep - h));
      const err = Math.abs(g[i] - fd) / Math.max(1, Math.abs(fd));
      worst = Math.max(worst, err);
      assert(
        err < tol,
        `${b.info.name} ${mode} d/d ${name}[${i}]: analytic ${g[i]} vs numeric ${fd}`,
      );
    }
  }
  return worst;
};

const variants: [string, ModelConfig][] = [
  ["llama GQA", tinyConfig()],
  [
    "qwen2 biases, tied head",
    tinyConfig({ modelType: "qwen2", attentionBias: true, tieWordEmbeddings: true, numKvHeads: 2 }),
  ],
];

for (const b of [cpu, ...(gpu ? [gpu] : [])]) {
  for (const [label, c] of variants) {
    for (const mode of ["lora", "full"] as const) {
      Deno.test(`${b.info.name}: ${mode} gradients match float64 finite differences (${label})`, async () => {
        await checkGradients(b, c, mode, b.info.name === "cpu" ? 2e-3 : 5e-3);
      });
    }
  }
}

// Gradient checkpointing recomputes each layer in the backward pass: the same ops on the same
// inputs (and, with LoRA dropout, the same masks), so the gradients are bit-identical.
for (const b of [cpu, ...(gpu ? [gpu] : [])]) {
  Deno.test(`${b.info.name}: gradient checkpointing matches float64 finite differences (lora, full)`, async () => {
    const c = variants[1][1];
    await checkGradients(b, c, "lora", b.info.name === "cpu" ? 2e-3 : 5e-3, true);
    await checkGradients(b, c, "full", b.info.name === "cpu" ? 2e-3 : 5e-3, true);
  });
  for (const [label, c] of variants) {
    Deno.test(`${b.info.name}: gradient checkpointing gives bit-identical gradients (${label}, lora with dropout, full)`, async () => {
      const weights = makeWeights(c, 13);
      const lora = makeLora(c, 6);
      const proj = Float64Array.from(
        { length: input.ids.length * c.vocabSize },
        (_, i) => Math.cos(i * 0.9),
      );
      for (
        const [mode, l, dropout] of [["lora", lora, 0.3], ["lora", lora, 0], [
          "full",
          null,
          0,
        ]] as const
      ) {
        const plain = await gradsOn(b, c, weights, l, proj, mode, { dropout });
        const ck = await gradsOn(b, c, weights, l, proj, mode, {
          dropout,
          gradientCheckpointing: true,
        });
        assertEquals([...ck.keys()].sort(), [...plain.keys()].sort());
        for (const [k, g] of plain) {
          assertEquals(ck.get(k), g, `${mode} dropout ${dropout}: ${k} differs`);
        }
      }
    });
  }
}

const decodeMatchesForward = async (b: BackendShape) => {
  const c = tinyConfig();
  const weights = makeWeights(c, 2);
  const lora = makeLora(c, 9);
  const ids = [3, 5, 7, 9, 4, 6];
  await withOps(b, (ops) =>
    Effect.gen(function* () {
      const model: DeviceModel = uploadModel(ops, c, weights);
      const run: LoraRuntime = uploadLora(ops, lora);
      const full = forward(ops, model, { ids, batch: 1, seqLen: ids.length }, { lora: run }).logits;
      const cache = makeKvCache(ops, c, 1, 8);
      const step1 = forwardCached(ops, model, cache, ids.slice(0, 4), 4, [0], run);
      const step2 = forwardCached(ops, model, cache, ids.slice(4, 5), 1, [0], run);
      const step3 = forwardCached(ops, model, cache, ids.slice(5, 6), 1, [0], run);
      const [f, s1, s2, s3] = yield* ops.read([full, step1, step2, step3]);
      const V = c.vocabSize;
      assert(relError(s1, f.subarray(3 * V, 4 * V)) < 1e-5);
      assert(relError(s2, f.subarray(4 * V, 5 * V)) < 1e-5);
      assert(relError(s3, f.subarray(5 * V, 6 * V)) < 1e-5);
    }));
};

Deno.test("cpu: KV-cached decoding reproduces the full forward's logits", () =>
  decodeMatchesForward(cpu));
Deno.test({
  name: "webgpu: KV-cached decoding reproduces the full forward's logits",
  ignore: !hasGpu,
  fn: () => decodeMatchesForward(gpu!),
});

Deno.test({
  name: "webgpu: forward logits match the CPU reference",
  ignore: !hasGpu,
  fn: async () => {
    const c = tinyConfig({ modelType: "qwen2", attentionBias: true });
    const weights = makeWeights(c, 4);
    const lora = makeLora(c, 4);
    const run = (b: BackendShape) =>
      withOps(b, (ops) =>
        Effect.gen(function* () {
          const model = uploadModel(ops, c, weights);
          const { logits } = forward(ops, model, input, { lora: uploadLora(ops, lora) });
          return (yield* ops.read([logits]))[0];
        }));
    const err = relError(await run(gpu!), await run(cpu));
    assert(err < 1e-5, `relative error ${err}`);
  },
});

for (const bias of [true, false]) {
  Deno.test({
    name: `webgpu: an inference forward whose norms${
      bias ? "" : " and rotations"
    } fold into its products matches the CPU reference`,
    ignore: !hasGpu || gpu?.gpu?.subgroupLanes == null,
    fn: async () => {
      // widths, ranks and rows the subgroup kernel takes (see folded_norm_test): both norms of
      // each layer fold (Ops.projectLoraShared, Ops.projectSwiglu); q/k/v biases after the fold
      // (qwen2), or without biases q and k rotate in their products' stores (llama)
      const c = tinyConfig({
        modelType: bias ? "qwen2" : "llama",
        attentionBias: bias,
        hiddenSize: 64,
        intermediateSize: 96,
        numHeads: 4,
        numKvHeads: 2,
        headDim: 16,
        vocabSize: 40,
      });
      // the projections in bf16 (the one-product SwiGLU form takes 16-bit weights), the rest f32
      const weights: BaseWeightMap = new Map(
        [...makeWeights(c, 6)].map(([n, t]) => [
          n,
          n.endsWith("_proj.weight")
            ? { shape: t.shape, format: "bf16" as const, bits: roundToHalfBits(t.data, "bf16") }
            : t,
        ]),
      );
      const lora = initLora(c, {
        r: 16,
        alpha: 8,
        dropout: 0,
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
      }, 6);
      const rng = new Rng(17);
      for (const m of lora.modules.values()) {
        for (let i = 0; i < m.b.data.length; i++) m.b.data[i] = 0.2 * rng.normal();
      }
      const seqLen = 40;
      const ids = Array.from({ length: 2 * seqLen }, (_, i) => (i * 7 + 3) % c.vocabSize);
      const long = { ids, batch: 2, seqLen, kvStart: [0, 3] };
      const run = (b: BackendShape) =>
        withOps(b, (ops) =>
          Effect.gen(function* () {
            const model = uploadModel(ops, c, weights);
            const { logits } = forward(ops, model, long, { lora: uploadLora(ops, lora) });
            return (yield* ops.read([logits]))[0];
          }));
      const before = matmulTuning.foldedNorms;
      const ropesBefore = matmulTuning.ropeStores;
      const got = await run(gpu!);
      const folds = matmulTuning.foldedNorms - before;
      assert(folds === 2 * c.numLayers, `norms folded ${folds} times`);
      const ropes = matmulTuning.ropeStores - ropesBefore;
      assert(ropes === (bias ? 0 : 2 * c.numLayers), `${ropes} rotating stores`);
      const err = relError(got, await run(cpu));
      assert(err < 1e-5, `relative error ${err}`);
    },
  });
}

gpuTeardown();
