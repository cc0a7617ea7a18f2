/**
 * Model families beyond the plain Llama/Qwen2 decoder: Llama with attention and MLP biases and
 * explicit head_dim, Llama rope scaling (linear, dynamic, llama3, yarn), Qwen3 dense (per-head
 * q/k norm), Mistral and Qwen2 sliding windows. Each tiny random config is built from a
 * config.json as Hugging Face writes it, saved in HF's checkpoint layout and loaded back, and
 * checked on both backends against an independent float64 reference written here from HF's
 * definitions (plain loops, none of the backend ops): forward logits, gradients (LoRA and full)
 * against float64 finite differences, KV-cached decoding against the full forward, and the LoRA
 * fold of a snapshot export. Configs and tensors the decoder cannot honour are refused by name.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { join } from "node:path";
import { Effect } from "effect";
import type { BackendShape } from "../src/backend/backend.ts";
import type { Ops } from "../src/backend/ops.ts";
import { type ModelConfig, ModelConfigError, parseHfConfig } from "../src/model/config.ts";
import {
  backward,
  backwardLogProbs,
  forward,
  forwardCached,
  forwardLogProbs,
  makeKvCache,
  uploadModel,
} from "../src/model/decoder.ts";
import { generate } from "../src/model/generate.ts";
import { loadModel, saveModel } from "../src/model/loader.ts";
import { Rng } from "../src/model/rng.ts";
import { ropePlan } from "../src/model/rope.ts";
import {
  initWeights,
  validateWeights,
  type WeightMap,
  WeightsError,
  weightSpecs,
} from "../src/model/weights.ts";
import { initLora, type LoraWeights, uploadLora } from "../src/lora/adapter.ts";
import { loadPeftAdapter, savePeftAdapter } from "../src/lora/peft.ts";
import { exportCheckpoint } from "../src/snapshot/export.ts";
import { FrozenBase, loraSnapshot } from "../src/snapshot/snapshot.ts";
import { fromFloat32 } from "../src/io/safetensors.ts";
import { writeSafetensorsFile } from "../src/io/checkpoint.ts";
import { gpuTeardown, relError, testBackends, withOps } from "./support/backends.ts";

const { gpu, cpu, ref } = await testBackends();
const backends = [cpu, ...(gpu ? [gpu] : [])];
const run = <A, E>(e: Effect.Effect<A, E>) => Effect.runPromise(e);
const fail = <A, E>(e: Effect.Effect<A, E>) => Effect.runPromise(Effect.flip(e));

// ---- configs as config.json holds them ---------------------------------------------------------

const tinyJson = (over: Record<string, unknown>): Record<string, unknown> => ({
  model_type: "llama",
  hidden_size: 8,
  intermediate_size: 12,
  num_hidden_layers: 2,
  num_attention_heads: 2,
  num_key_value_heads: 1,
  vocab_size: 11,
  rms_norm_eps: 1e-5,
  rope_theta: 10000,
  max_position_embeddings: 64,
  tie_word_embeddings: false,
  hidden_act: "silu",
  eos_token_id: 2,
  ...over,
});

/** Family variants: a label and the config.json of a tiny random model. */
const families: [string, Record<string, unknown>][] = [
  // head_dim 6 != hidden/heads, and a bias on every projection (o_proj too, as HF builds it)
  [
    "llama attention+mlp bias, head_dim 6",
    tinyJson({ attention_bias: true, mlp_bias: true, head_dim: 6 }),
  ],
  // inv_freq 1, 0.1, 0.01, 0.001: wavelengths 6.3 (high), 63 (medium), 628 and 6283 (low)
  [
    "llama rope llama3",
    tinyJson({
      rope_scaling: {
        rope_type: "llama3",
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
      },
      max_position_embeddings: 512,
      head_dim: 8,
    }),
  ],
  ["llama rope linear", tinyJson({ rope_scaling: { type: "linear", factor: 2.0 } })],
  // max_position_embeddings 4 < the 5 positions used: the NTK base is rescaled
  [
    "llama rope dynamic",
    tinyJson({ rope_scaling: { rope_type: "dynamic", factor: 3.0 }, max_position_embeddings: 4 }),
  ],
  [
    "llama rope yarn",
    tinyJson({
      rope_scaling: { rope_type: "yarn", factor: 4.0, original_max_position_embeddings: 16 },
      head_dim: 8,
    }),
  ],
  [
    "qwen3 q/k norm, head_dim 6, tied",
    tinyJson({
      model_type: "qwen3",
      head_dim: 6,
      tie_word_embeddings: true,
      attention_bias: false,
      use_sliding_window: false,
      sliding_window: null,
      max_window_layers: 28,
    }),
  ],
  ["qwen3 with attention_bias", tinyJson({ model_type: "qwen3", attention_bias: true })],
  ["mistral sliding window 3", tinyJson({ model_type: "mistral", sliding_window: 3 })],
  [
    "qwen2 sliding window 2 from layer 1",
    tinyJson({
      model_type: "qwen2",
      use_sliding_window: true,
      sliding_window: 2,
      max_window_layers: 1,
      num_key_value_heads: 2,
    }),
  ],
];

const gemmaJson = (over: Record<string, unknown>) =>
  tinyJson({
    hidden_act: "gelu_pytorch_tanh",
    hidden_activation: "gelu_pytorch_tanh",
    head_dim: 6,
    num_key_value_heads: 1,
    rms_norm_eps: 1e-6,
    attention_bias: false,
    tie_word_embeddings: undefined, // gemma's default: tied
    ...over,
  });
families.push(
  [
    "gemma2 softcaps, sliding layer 0, query_pre_attn_scalar",
    gemmaJson({
      model_type: "gemma2",
      query_pre_attn_scalar: 5,
      attn_logit_softcapping: 1.0,
      final_logit_softcapping: 2.0,
      sliding_window: 2,
      cache_implementation: "hybrid",
    }),
  ],
  [
    "gemma3 q/k norm, local rope, linear global rope",
    gemmaJson({
      model_type: "gemma3_text",
      num_hidden_layers: 3,
      sliding_window: 3,
      sliding_window_pattern: 3,
      query_pre_attn_scalar: 4,
      rope_theta: 10000,
      rope_local_base_freq: 100,
      rope_scaling: { rope_type: "linear", factor: 2.0 },
      final_logit_softcapping: null,
      attn_logit_softcapping: null,
    }),
  ],
  // Gemma's published head_dim 256 (head_dim absent: Gemma's default), the wide GPU kernels
  [
    "gemma3 default head_dim 256",
    gemmaJson({
      model_type: "gemma3_text",
      head_dim: undefined,
      num_hidden_layers: 1,
      sliding_window: 2,
      query_pre_attn_scalar: 256,
    }),
  ],
  [
    "gemma3 transformers-v5 rope_parameters, explicit layer_types",
    gemmaJson({
      model_type: "gemma3_text",
      rope_theta: undefined,
      sliding_window: 2,
      layer_types: ["full_attention", "sliding_attention"],
      rope_parameters: {
        full_attention: { rope_type: "default", rope_theta: 5000 },
        sliding_attention: { rope_type: "default", rope_theta: 50 },
      },
    }),
  ],
);

const configOf = (json: Record<string, unknown>): Promise<ModelConfig> => run(parseHfConfig(json));

/** Random weights with non-trivial norms and biases, so every path carries signal. */
const makeWeights = (c: ModelConfig, seed: number): WeightMap => {
  const w = initWeights(c, seed, 0.4);
  const rng = new Rng(seed + 7);
  for (const [name, t] of w) {
    if (name.endsWith("norm.weight") || name.endsWith(".bias")) {
      for (let i = 0; i < t.data.length; i++) {
        const gemma = c.modelType === "gemma2" || c.modelType === "gemma3_text";
        t.data[i] = (name.endsWith(".bias") || gemma ? 0 : 1) + 0.3 * rng.normal();
      }
    }
  }
  return w;
};

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

// ---- the independent float64 reference ---------------------------------------------------------

/**
 * HF's inverse frequencies and attention scaling in float64, straight from the definitions in
 * transformers' modeling_rope_utils (the decoder's own table rounds to f32 as torch does).
 */
const refRope = (c: ModelConfig, seqLen: number): { inv: number[]; scale: number } => {
  const d = c.headDim;
  const plain = (base: number) => Array.from({ length: d / 2 }, (_, i) => base ** (-(2 * i) / d));
  const s = c.ropeScaling;
  if (!s) return { inv: plain(c.ropeTheta), scale: 1 };
  if (s.type === "linear") return { inv: plain(c.ropeTheta).map((x) => x / s.factor), scale: 1 };
  if (s.type === "dynamic") {
    const m = c.maxPositionEmbeddings;
    const L = Math.max(seqLen, m);
    return {
      inv: plain(c.ropeTheta * ((s.factor * L) / m - (s.factor - 1)) ** (d / (d - 2))),
      scale: 1,
    };
  }
  if (s.type === "llama3") {
    const old = s.originalMaxPositionEmbeddings;
    return {
      inv: plain(c.ropeTheta).map((f) => {
        const wl = (2 * Math.PI) / f;
        if (wl < old / s.highFreqFactor) return f;
        if (wl > old / s.lowFreqFactor) return f / s.factor;
        const t = (old / wl - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        return (1 - t) * f / s.factor + t * f;
      }),
      scale: 1,
    };
  }
  const orig = s.originalMaxPositionEmbeddings ?? c.maxPositionEmbeddings;
  const dimOf = (rot: number) =>
    (d * Math.log(orig / (rot * 2 * Math.PI))) / (2 * Math.log(c.ropeTheta));
  const lo = Math.max(Math.floor(dimOf(s.betaFast ?? 32)), 0);
  let hi = Math.min(Math.ceil(dimOf(s.betaSlow ?? 1)), d - 1);
  if (hi === lo) hi += 0.001;
  return {
    inv: plain(c.ropeTheta).map((f, i) => {
      const extrapolate = 1 - Math.min(1, Math.max(0, (i - lo) / (hi - lo)));
      return (f / s.factor) * (1 - extrapolate) + f * extrapolate;
    }),
    scale: s.attentionFactor ?? (s.factor <= 1 ? 1 : 0.1 * Math.log(s.factor) + 1),
  };
};

/** Logits [batch*seqLen, vocab] of HF's decoder in float64 (left padding via kvStart). */
const refLogits = (
  c: ModelConfig,
  w: WeightMap,
  ids: readonly number[],
  batch: number,
  seqLen: number,
  kvStart: readonly number[] = new Array(batch).fill(0),
): Float64Array => {
  const H = c.hiddenSize;
  const hd = c.headDim;
  const rows = batch * seqLen;
  const pos = Array.from(
    { length: rows },
    (_, r) => Math.max(0, (r % seqLen) - kvStart[Math.floor(r / seqLen)]),
  );
  const globalRope = refRope(c, Math.max(...pos) + 1);
  const gemma = c.modelType === "gemma2" || c.modelType === "gemma3_text";
  // Gemma's norms scale by 1 + w
  const get = (n: string): Float64Array | undefined => {
    const d = w.get(n)?.data;
    if (!d) return undefined;
    return Float64Array.from(d, (x) => gemma && n.endsWith("norm.weight") ? 1 + x : x);
  };
  const linear = (x: Float64Array[], name: string, out: number, inp: number) => {
    const W = get(`${name}.weight`)!;
    const b = get(`${name}.bias`);
    return x.map((row) => {
      const y = new Float64Array(out);
      for (let o = 0; o < out; o++) {
        let s = b ? b[o] : 0;
        for (let i = 0; i < inp; i++) s += W[o * inp + i] * row[i];
        y[o] = s;
      }
      return y;
    });
  };
  const rms = (row: Float64Array, weight: ArrayLike<number>, off = 0, n = row.length) => {
    let ss = 0;
    for (let i = 0; i < n; i++) ss += row[off + i] ** 2;
    const r = 1 / Math.sqrt(ss / n + c.rmsNormEps);
    for (let i = 0; i < n; i++) row[off + i] = row[off + i] * r * weight[i];
  };
  let rope = globalRope;
  const rotate = (row: Float64Array, heads: number, p: number) => {
    for (let h = 0; h < heads; h++) {
      for (let i = 0; i < hd / 2; i++) {
        const a = p * rope.inv[i];
        const [x1, x2] = [row[h * hd + i], row[h * hd + i + hd / 2]];
        row[h * hd + i] = (x1 * Math.cos(a) - x2 * Math.sin(a)) * rope.scale;
        row[h * hd + i + hd / 2] = (x2 * Math.cos(a) + x1 * Math.sin(a)) * rope.scale;
      }
    }
  };
  const E = get("model.embed_tokens.weight")!;
  let x = ids.map((id) =>
    Float64Array.from(E.subarray(id * H, (id + 1) * H), (v) => gemma ? v * Math.sqrt(H) : v)
  );
  for (let l = 0; l < c.numLayers; l++) {
    const pre = `model.layers.${l}`;
    const h = x.map((r) => Float64Array.from(r));
    h.forEach((r) => rms(r, get(`${pre}.input_layernorm.weight`)!));
    const q = linear(h, `${pre}.self_attn.q_proj`, c.numHeads * hd, H);
    const k = linear(h, `${pre}.self_attn.k_proj`, c.numKvHeads * hd, H);
    const v = linear(h, `${pre}.self_attn.v_proj`, c.numKvHeads * hd, H);
    if (c.qkNorm) {
      q.forEach((r) => {
        for (let hh = 0; hh < c.numHeads; hh++) {
          rms(r, get(`${pre}.self_attn.q_norm.weight`)!, hh * hd, hd);
        }
      });
      k.forEach((r) => {
        for (let hh = 0; hh < c.numKvHeads; hh++) {
          rms(r, get(`${pre}.self_attn.k_norm.weight`)!, hh * hd, hd);
        }
      });
    }
    const sliding = c.slidingWindow !== undefined && (c.slidingLayers?.[l] ?? true);
    // Gemma 3's sliding layers rotate with plain RoPE of their own base
    rope = sliding && c.ropeLocalTheta
      ? {
        inv: Array.from({ length: hd / 2 }, (_, i) => c.ropeLocalTheta! ** (-(2 * i) / hd)),
        scale: 1,
      }
      : globalRope;
    q.forEach((r, i) => rotate(r, c.numHeads, pos[i]));
    k.forEach((r, i) => rotate(r, c.numKvHeads, pos[i]));
    const scale = c.queryPreAttnScalar ? c.queryPreAttnScalar ** -0.5 : 1 / Math.sqrt(hd);
    const cap = c.attnLogitSoftcap;
    const att = q.map((qr, row) => {
      const b = Math.floor(row / seqLen);
      const i = row % seqLen;
      const out = new Float64Array(c.numHeads * hd);
      for (let hh = 0; hh < c.numHeads; hh++) {
        const g = Math.floor(hh / (c.numHeads / c.numKvHeads));
        const keys: number[] = [];
        for (let j = kvStart[b]; j <= i; j++) {
          if (!sliding || i - j < c.slidingWindow!) keys.push(j);
        }
        if (keys.length === 0) continue;
        const s = keys.map((j) => {
          let dot = 0;
          for (let d = 0; d < hd; d++) dot += qr[hh * hd + d] * k[b * seqLen + j][g * hd + d];
          return cap ? cap * Math.tanh((dot * scale) / cap) : dot * scale;
        });
        const m = Math.max(...s);
        const p = s.map((z) => Math.exp(z - m));
        const z = p.reduce((a, b) => a + b, 0);
        keys.forEach((j, n) => {
          for (let d = 0; d < hd; d++) {
            out[hh * hd + d] += (p[n] / z) * v[b * seqLen + j][g * hd + d];
          }
        });
      }
      return out;
    });
    const o = linear(att, `${pre}.self_attn.o_proj`, H, c.numHeads * hd);
    // Gemma: post-attention norm on the attention output, pre/post feed-forward norms
    if (gemma) o.forEach((r) => rms(r, get(`${pre}.post_attention_layernorm.weight`)!));
    x = x.map((r, i) => r.map((v, j) => v + o[i][j]));
    const h2 = x.map((r) => Float64Array.from(r));
    const mlpNorm = gemma ? "pre_feedforward_layernorm" : "post_attention_layernorm";
    h2.forEach((r) => rms(r, get(`${pre}.${mlpNorm}.weight`)!));
    const gate = linear(h2, `${pre}.mlp.gate_proj`, c.intermediateSize, H);
    const up = linear(h2, `${pre}.mlp.up_proj`, c.intermediateSize, H);
    const gelu = (z: number) =>
      0.5 * z * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (z + 0.044715 * z ** 3)));
    const act = gate.map((g, i) =>
      g.map((z, j) => (gemma ? gelu(z) : z / (1 + Math.exp(-z))) * up[i][j])
    );
    const down = linear(act, `${pre}.mlp.down_proj`, H, c.intermediateSize);
    if (gemma) down.forEach((r) => rms(r, get(`${pre}.post_feedforward_layernorm.weight`)!));
    x = x.map((r, i) => r.map((v, j) => v + down[i][j]));
  }
  x.forEach((r) => rms(r, get("model.norm.weight")!));
  const head = c.tieWordEmbeddings ? "model.embed_tokens" : "lm_head";
  const fc = c.finalLogitSoftcap;
  const logits = linear(x, head, c.vocabSize, H).map((r) =>
    fc ? r.map((z) => fc * Math.tanh(z / fc)) : r
  );
  const out = new Float64Array(rows * c.vocabSize);
  logits.forEach((r, i) => out.set(r, i * c.vocabSize));
  return out;
};

// ---- checks ------------------------------------------------------------------------------------

const input = { ids: [1, 4, 7, 3, 9, 0, 2, 5, 10, 6], batch: 2, seqLen: 5, kvStart: [0, 1] };

const logitsOn = (b: BackendShape, c: ModelConfig, w: WeightMap, lora: LoraWeights | null) =>
  withOps(b, (ops: Ops) =>
    Effect.gen(function* () {
      const model = uploadModel(ops, c, w);
      const { logits } = forward(ops, model, input, { lora: lora ? uploadLora(ops, lora) : null });
      return (yield* ops.read([logits]))[0];
    }));

const lossOn = async (
  c: ModelConfig,
  w: WeightMap,
  lora: LoraWeights | null,
  proj: Float64Array,
) => {
  const l = await logitsOn(ref, c, w, lora);
  let s = 0;
  for (let i = 0; i < l.length; i++) s += proj[i] * l[i];
  return s;
};

const checkGradients = async (b: BackendShape, c: ModelConfig, mode: "lora" | "full") => {
  const weights = makeWeights(c, 11);
  const lora = mode === "lora" ? makeLora(c, 5) : null;
  const proj = Float64Array.from(
    { length: input.ids.length * c.vocabSize },
    (_, i) => Math.sin(i * 1.7),
  );
  const grads = await withOps(b, (ops: Ops) =>
    Effect.gen(function* () {
      const model = uploadModel(ops, c, weights);
      const { logits, tape } = forward(ops, model, input, {
        lora: lora ? uploadLora(ops, lora) : null,
        train: true,
        rng: new Rng(1),
      });
      const g = backward(ops, tape!, ops.fromArray(proj, logits.shape), mode);
      const names = [...g.keys()];
      const host = yield* ops.read(names.map((n) => g.get(n)!));
      return new Map(names.map((n, i) => [n, Float64Array.from(host[i])]));
    }));
  const params: [string, Float32Array][] = mode === "full"
    ? [...weights].map(([n, t]) => [n, t.data])
    : [...lora!.modules].flatMap(([p, m]) =>
      [[`${p}.lora_A`, m.a.data], [`${p}.lora_B`, m.b.data]] as [string, Float32Array][]
    );
  assertEquals(new Set(grads.keys()), new Set(params.map(([n]) => n)));
  const rng = new Rng(3);
  const tol = b.info.name === "cpu" ? 2e-3 : 5e-3;
  for (const [name, data] of params) {
    const g = grads.get(name)!;
    for (let k = 0; k < 2; k++) {
      const i = rng.int(data.length);
      const keep = data[i];
      data[i] = keep + 1e-3;
      const up = await lossOn(c, weights, lora, proj);
      data[i] = keep - 1e-3;
      const down = await lossOn(c, weights, lora, proj);
      data[i] = keep;
      const fd = (up - down) / (Math.fround(keep + 1e-3) - Math.fround(keep - 1e-3));
      const err = Math.abs(g[i] - fd) / Math.max(1, Math.abs(fd));
      assert(
        err < tol,
        `${b.info.name} ${mode} d/d ${name}[${i}]: analytic ${g[i]} vs numeric ${fd}`,
      );
    }
  }
};

const decodeMatchesForward = (b: BackendShape, c: ModelConfig) => {
  const weights = makeWeights(c, 2);
  const lora = makeLora(c, 9);
  const ids = [3, 5, 7, 9, 4, 6];
  return withOps(b, (ops) =>
    Effect.gen(function* () {
      const model = uploadModel(ops, c, weights);
      const rt = uploadLora(ops, lora);
      const full = forward(ops, model, { ids, batch: 1, seqLen: ids.length }, { lora: rt }).logits;
      const cache = makeKvCache(ops, c, 1, 8);
      const s1 = forwardCached(ops, model, cache, ids.slice(0, 4), 4, [0], rt);
      const s2 = forwardCached(ops, model, cache, ids.slice(4, 5), 1, [0], rt);
      const s3 = forwardCached(ops, model, cache, ids.slice(5, 6), 1, [0], rt);
      const [f, a, bb, cc] = yield* ops.read([full, s1, s2, s3]);
      const V = c.vocabSize;
      for (const [got, row] of [[a, 3], [bb, 4], [cc, 5]] as const) {
        const err = relError(got, f.subarray(row * V, (row + 1) * V));
        assert(err < 1e-5, `${b.info.name}: cached step at row ${row}: relative error ${err}`);
      }
    }));
};

/** Writes config.json and model.safetensors by hand, as a Hugging Face checkpoint holds them. */
const writeHfCheckpoint = async (dir: string, json: Record<string, unknown>, w: WeightMap) => {
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(join(dir, "config.json"), JSON.stringify(json));
  await run(writeSafetensorsFile(
    join(dir, "model.safetensors"),
    [...w].map(([n, t]) => fromFloat32(n, t.data, t.shape)),
    { format: "pt" },
  ));
};

for (const [label, json] of families) {
  const c = await configOf(json);
  const dynamicBeyond = c.ropeScaling?.type === "dynamic";
  for (const b of backends) {
    Deno.test(`${b.info.name}: ${label}: forward logits match the independent f64 reference`, async () => {
      const w = makeWeights(c, 4);
      const expected = refLogits(c, w, input.ids, input.batch, input.seqLen, input.kvStart);
      const err = relError(await logitsOn(b, c, w, null), expected);
      assert(err < 2e-5, `relative error ${err}`);
    });
    for (const mode of ["lora", "full"] as const) {
      Deno.test(`${b.info.name}: ${label}: ${mode} gradients match f64 finite differences`, () =>
        checkGradients(b, c, mode));
    }
    // dynamic NTK rescales with the call's length (HF's cached decode does the same step by
    // step), so cached decoding equals the full forward only within max_position_embeddings
    if (!dynamicBeyond) {
      Deno.test(`${b.info.name}: ${label}: KV-cached decoding reproduces the full forward`, () =>
        decodeMatchesForward(b, c));
    }
  }
  Deno.test(`${label}: an HF-layout checkpoint loads, saves and loads back exactly`, async () => {
    const dir = await Deno.makeTempDir();
    const w = makeWeights(c, 6);
    await writeHfCheckpoint(join(dir, "hf"), json, w);
    const loaded = await run(loadModel(join(dir, "hf")));
    assertEquals(loaded.config, c);
    assertEquals(new Set(loaded.weights.keys()), new Set(w.keys()));
    await run(saveModel(join(dir, "ours"), loaded.config, loaded.weights));
    const back = await run(loadModel(join(dir, "ours")));
    assertEquals(back.config, c);
    for (const [n, t] of w) assertEquals(Array.from(back.weights.get(n)!.data), Array.from(t.data));
    const written = JSON.parse(await Deno.readTextFile(join(dir, "ours", "config.json")));
    assertEquals(written.model_type, json.model_type);
    await Deno.remove(dir, { recursive: true });
  });
  Deno.test(`${label}: snapshot fold and PEFT export cover every projection`, async () => {
    const dir = await Deno.makeTempDir();
    const w = makeWeights(c, 8);
    const lora = makeLora(c, 2);
    const frozen = await run(FrozenBase.make(c, w));
    await run(Effect.scoped(Effect.gen(function* () {
      const ops = yield* cpu.ops;
      const snap = yield* loraSnapshot(cpu, 1, frozen, uploadLora(ops, lora), lora.config);
      yield* exportCheckpoint(snap, join(dir, "merged"));
    })));
    const merged = await run(loadModel(join(dir, "merged")));
    assertEquals(merged.config, c);
    const err = relError(
      await logitsOn(ref, c, merged.weights, null),
      await logitsOn(ref, c, w, lora),
    );
    assert(err < 1e-5, `folded checkpoint vs base + adapter: relative error ${err}`);
    await run(savePeftAdapter(join(dir, "peft"), lora.config, lora.modules, "tiny"));
    const peft = await run(loadPeftAdapter(join(dir, "peft"), c));
    assertEquals(new Set(peft.modules.keys()), new Set(lora.modules.keys()));
    assertEquals(lora.modules.size, c.numLayers * 7);
    await Deno.remove(dir, { recursive: true });
  });
}

// ---- gradient checkpointing recomputes every family's layers exactly ---------------------------

for (
  const label of [
    "gemma3 q/k norm, local rope, linear global rope",
    "gemma2 softcaps, sliding layer 0, query_pre_attn_scalar",
    "llama rope yarn",
  ]
) {
  const c = await configOf(families.find(([l]) => l === label)![1]);
  for (const b of backends) {
    Deno.test(`${b.info.name}: ${label}: gradient checkpointing gives bit-identical gradients (lora, full)`, async () => {
      const weights = makeWeights(c, 31);
      const lora = makeLora(c, 32);
      const proj = Float64Array.from(
        { length: input.ids.length * c.vocabSize },
        (_, i) => Math.cos(i),
      );
      const grads = (mode: "lora" | "full", gradientCheckpointing: boolean) =>
        withOps(b, (ops: Ops) =>
          Effect.gen(function* () {
            const model = uploadModel(ops, c, weights);
            const { logits, tape } = forward(ops, model, input, {
              lora: mode === "lora" ? uploadLora(ops, lora) : null,
              train: true,
              rng: new Rng(1),
              gradientCheckpointing,
            });
            const g = backward(ops, tape!, ops.fromArray(proj, logits.shape), mode);
            const names = [...g.keys()].sort();
            const host = yield* ops.read(names.map((n) => g.get(n)!));
            return new Map(names.map((n, i) => [n, Array.from(host[i])]));
          }));
      for (const mode of ["lora", "full"] as const) {
        assertEquals(await grads(mode, true), await grads(mode, false));
      }
    });
  }
}

// ---- a chunked head with final soft-capping --------------------------------------------------

{
  const label = "gemma2 softcaps, sliding layer 0, query_pre_attn_scalar";
  const c = await configOf(families.find(([l]) => l === label)![1]);
  for (const b of backends) {
    Deno.test(`${b.info.name}: ${label}: a chunked head gives the same capped logits and gradients`, async () => {
      const weights = makeWeights(c, 41);
      const lora = makeLora(c, 42);
      const proj = Float64Array.from(
        { length: input.ids.length * c.vocabSize },
        (_, i) => Math.sin(i),
      );
      const runWith = (chunkRows: number | undefined) =>
        withOps(b, (ops: Ops) =>
          Effect.gen(function* () {
            const model = uploadModel(ops, c, weights);
            const { logits, tape } = forward(ops, model, input, {
              lora: uploadLora(ops, lora),
              train: true,
              chunkRows,
            });
            const g = backward(ops, tape!, ops.fromArray(proj, logits.shape), "full");
            const names = [...g.keys()].sort();
            const host = yield* ops.read([logits, ...names.map((n) => g.get(n)!)]);
            return { logits: host[0], grads: new Map(names.map((n, i) => [n, host[i + 1]])) };
          }));
      const [plain, chunked] = [await runWith(undefined), await runWith(4)];
      assert(relError(chunked.logits, plain.logits) < 1e-6);
      assertEquals([...chunked.grads.keys()], [...plain.grads.keys()]);
      for (const [n, g] of plain.grads) {
        const err = relError(chunked.grads.get(n)!, g);
        assert(err < 1e-5, `${n}: relative error ${err}`);
      }
    });
  }
}

// ---- log-probs (streamed head, soft-capped logits) and generation ----------------------------

/** log_softmax(row)[t] in float64. */
const logSoftmaxAt = (row: ArrayLike<number>, t: number): number => {
  const m = Math.max(...Array.from(row));
  const lse = m + Math.log(Array.from(row).reduce((a, z) => a + Math.exp(z - m), 0));
  return row[t] - lse;
};

for (
  const label of [
    "gemma2 softcaps, sliding layer 0, query_pre_attn_scalar",
    "qwen3 q/k norm, head_dim 6, tied",
  ]
) {
  const c = await configOf(families.find(([l]) => l === label)![1]);
  const targets = input.ids.map((id) => (id * 7 + 3) % c.vocabSize);
  const weights = makeWeights(c, 21);
  const lora = makeLora(c, 22);
  const dl = Float64Array.from(targets, (_, i) => Math.cos(i + 0.5));
  for (const b of backends) {
    for (const chunkRows of [undefined, 4]) {
      Deno.test(`${b.info.name}: ${label}: forwardLogProbs/backwardLogProbs (chunkRows ${chunkRows}) match the f64 reference and finite differences`, async () => {
        const expected = refLogits(c, weights, input.ids, input.batch, input.seqLen, input.kvStart);
        const V = c.vocabSize;
        const run1 = (bk: BackendShape) =>
          withOps(bk, (ops: Ops) =>
            Effect.gen(function* () {
              const model = uploadModel(ops, c, weights);
              const r = forwardLogProbs(ops, model, input, targets, 1, {
                lora: uploadLora(ops, lora),
                train: true,
                chunkRows,
              });
              const g = backwardLogProbs(ops, r.tape!, ops.fromArray(dl, [targets.length]), "lora");
              const names = [...g.keys()].sort();
              const host = yield* ops.read([r.logp, ...names.map((n) => g.get(n)!)]);
              return { logp: host[0], grads: new Map(names.map((n, i) => [n, host[i + 1]])) };
            }));
        // logp of the base (no adapter) against the reference's logits
        const base = await withOps(b, (ops: Ops) =>
          Effect.gen(function* () {
            const model = uploadModel(ops, c, weights);
            const r = forwardLogProbs(ops, model, input, targets, 1, { chunkRows });
            return (yield* ops.read([r.logp]))[0];
          }));
        const want = targets.map((t, i) => logSoftmaxAt(expected.subarray(i * V, (i + 1) * V), t));
        assert(relError(base, want) < 2e-5, `logp relative error ${relError(base, want)}`);
        // gradients of Σ dl·logp w.r.t. LoRA B of one projection, against f64 differences
        const got = await run1(b);
        const key = "model.layers.1.mlp.down_proj.lora_B";
        const data = lora.modules.get("model.layers.1.mlp.down_proj")!.b.data;
        const loss = async () => {
          const r = await withOps(ref, (ops: Ops) =>
            Effect.gen(function* () {
              const model = uploadModel(ops, c, weights);
              const lp = forwardLogProbs(ops, model, input, targets, 1, {
                lora: uploadLora(ops, lora),
              });
              return (yield* ops.read([lp.logp]))[0];
            }));
          return Array.from(r).reduce((a, v, i) => a + v * dl[i], 0);
        };
        for (const i of [0, 5, data.length - 1]) {
          const keep = data[i];
          data[i] = keep + 1e-3;
          const up = await loss();
          data[i] = keep - 1e-3;
          const down = await loss();
          data[i] = keep;
          const fd = (up - down) / (Math.fround(keep + 1e-3) - Math.fround(keep - 1e-3));
          const g = got.grads.get(key)![i];
          assert(
            Math.abs(g - fd) / Math.max(1, Math.abs(fd)) < 5e-3,
            `${key}[${i}]: ${g} vs ${fd}`,
          );
        }
      });
    }
    Deno.test(`${b.info.name}: ${label}: greedy generate() follows the full forward's argmax`, async () => {
      const prompt = [3, 5, 7];
      const out = await run(Effect.scoped(Effect.gen(function* () {
        const ops = yield* b.ops;
        const model = uploadModel(ops, c, weights);
        return yield* generate(b, model, [{
          prompt,
          maxTokens: 4,
          stopTokenIds: [],
          seed: 1,
          temperature: 0,
          topP: 1,
          topK: 0,
        }]);
      })));
      const seq = [...prompt];
      for (let t = 0; t < 4; t++) {
        const logits = refLogits(c, weights, seq, 1, seq.length);
        const last = logits.subarray((seq.length - 1) * c.vocabSize, seq.length * c.vocabSize);
        seq.push(last.indexOf(Math.max(...last)));
      }
      assertEquals(out[0].tokens, seq.slice(prompt.length));
    });
  }
}

// ---- HF's rope tables --------------------------------------------------------------------------

Deno.test("rope: scaled inverse frequencies match HF's definitions (Llama-3.2-1B's llama3, yarn, dynamic)", async () => {
  const base = {
    hidden_size: 2048,
    intermediate_size: 8192,
    num_hidden_layers: 1,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    vocab_size: 128256,
    rope_theta: 500000,
    max_position_embeddings: 131072,
  };
  // Llama-3.2-1B's published rope_scaling
  const llama3 = await configOf(tinyJson({
    ...base,
    rope_scaling: {
      rope_type: "llama3",
      factor: 32.0,
      low_freq_factor: 1.0,
      high_freq_factor: 4.0,
      original_max_position_embeddings: 8192,
    },
  }));
  const yarn = await configOf(tinyJson({
    ...base,
    rope_scaling: { rope_type: "yarn", factor: 4.0, original_max_position_embeddings: 32768 },
  }));
  const dynamic = await configOf(
    tinyJson({ ...base, rope_scaling: { type: "dynamic", factor: 2.0 } }),
  );
  for (const [c, seqLen] of [[llama3, 1], [yarn, 1], [dynamic, 1], [dynamic, 200000]] as const) {
    const plan = ropePlan(c, seqLen - 1);
    const want = refRope(c, seqLen);
    const got = Array.from(plan.freqs as Float32Array);
    assertEquals(got.length, 32);
    for (let i = 0; i < 32; i++) {
      assert(
        Math.abs(got[i] - want.inv[i]) <= 2e-6 * want.inv[i],
        `${c.ropeScaling!.type} inv_freq[${i}]: ${got[i]} vs ${want.inv[i]}`,
      );
    }
    assert(Math.abs(plan.scale - want.scale) < 1e-12);
  }
  // llama3: the highest frequencies are kept, the lowest divided by the factor
  const plain = ropePlan(await configOf(tinyJson(base)), 0).freqs;
  assertEquals(plain, 500000);
  const l3 = ropePlan(llama3, 0).freqs as Float32Array;
  assertEquals(l3[0], 1);
  assert(Math.abs(l3[31] - 500000 ** (-62 / 64) / 32) < 1e-12);
  assertEquals(ropePlan(yarn, 0).scale, 0.1 * Math.log(4) + 1);
});

// ---- published configs --------------------------------------------------------------------------

Deno.test("published configs: Llama-3.2-1B, Qwen3-0.6B, Gemma-3-1B, Gemma-2-2B, Mistral-7B parse to their architectures", async () => {
  // the math-deciding fields as we believe the published config.json files hold them; the
  // parameter counts follow from the shapes (Llama 1,235,814,400; Qwen3 596,049,920; Gemma-3
  // 999,885,952 are the published totals)
  const params = (c: ModelConfig) =>
    weightSpecs(c).reduce((a, s) => a + s.shape.reduce((x, y) => x * y, 1), 0);
  const llama = await configOf({
    model_type: "llama",
    hidden_size: 2048,
    intermediate_size: 8192,
    num_hidden_layers: 16,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    head_dim: 64,
    vocab_size: 128256,
    rope_theta: 500000.0,
    rope_scaling: {
      factor: 32.0,
      high_freq_factor: 4.0,
      low_freq_factor: 1.0,
      original_max_position_embeddings: 8192,
      rope_type: "llama3",
    },
    max_position_embeddings: 131072,
    tie_word_embeddings: true,
    attention_bias: false,
    attention_dropout: 0.0,
    mlp_bias: false,
    hidden_act: "silu",
    pretraining_tp: 1,
    rms_norm_eps: 1e-5,
    bos_token_id: 128000,
    eos_token_id: 128001,
  });
  assertEquals(params(llama), 1235814400);
  assertEquals(llama.ropeScaling?.type, "llama3");
  const qwen3 = await configOf({
    model_type: "qwen3",
    hidden_size: 1024,
    intermediate_size: 3072,
    num_hidden_layers: 28,
    num_attention_heads: 16,
    num_key_value_heads: 8,
    head_dim: 128,
    vocab_size: 151936,
    rope_theta: 1000000,
    rope_scaling: null,
    max_position_embeddings: 40960,
    tie_word_embeddings: true,
    attention_bias: false,
    attention_dropout: 0.0,
    use_sliding_window: false,
    sliding_window: null,
    max_window_layers: 28,
    hidden_act: "silu",
    rms_norm_eps: 1e-6,
    eos_token_id: 151645,
  });
  assertEquals(params(qwen3), 596049920);
  assertEquals([qwen3.qkNorm, qwen3.headDim, qwen3.slidingWindow], [true, 128, undefined]);
  const gemma3 = await configOf({
    model_type: "gemma3_text",
    hidden_size: 1152,
    intermediate_size: 6912,
    num_hidden_layers: 26,
    num_attention_heads: 4,
    num_key_value_heads: 1,
    head_dim: 256,
    vocab_size: 262144,
    hidden_activation: "gelu_pytorch_tanh",
    query_pre_attn_scalar: 256,
    rope_theta: 1000000,
    rope_local_base_freq: 10000,
    rope_scaling: null,
    sliding_window: 512,
    sliding_window_pattern: 6,
    final_logit_softcapping: null,
    attn_logit_softcapping: null,
    attention_bias: false,
    attention_dropout: 0.0,
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    eos_token_id: [1, 106],
  });
  assertEquals(params(gemma3), 999885952);
  assertEquals(gemma3.tieWordEmbeddings, true);
  assertEquals(gemma3.slidingLayers?.filter((s) => !s).length, 4); // layers 5, 11, 17, 23
  assertEquals(gemma3.slidingLayers?.[5], false);
  assertEquals([gemma3.ropeLocalTheta, gemma3.ropeTheta, gemma3.slidingWindow], [1e4, 1e6, 512]);
  const gemma2 = await configOf({
    model_type: "gemma2",
    hidden_size: 2304,
    intermediate_size: 9216,
    num_hidden_layers: 26,
    num_attention_heads: 8,
    num_key_value_heads: 4,
    head_dim: 256,
    vocab_size: 256000,
    hidden_act: "gelu_pytorch_tanh",
    hidden_activation: "gelu_pytorch_tanh",
    query_pre_attn_scalar: 256,
    sliding_window: 4096,
    final_logit_softcapping: 30.0,
    attn_logit_softcapping: 50.0,
    cache_implementation: "hybrid",
    rope_theta: 10000.0,
    max_position_embeddings: 8192,
    rms_norm_eps: 1e-6,
  });
  assertEquals([gemma2.attnLogitSoftcap, gemma2.finalLogitSoftcap], [50, 30]);
  assertEquals(gemma2.slidingLayers?.slice(0, 3), [true, false, true]);
  const mistral = await configOf({
    model_type: "mistral",
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    vocab_size: 32000,
    rope_theta: 10000.0,
    sliding_window: 4096,
    max_position_embeddings: 32768,
    hidden_act: "silu",
    rms_norm_eps: 1e-5,
    tie_word_embeddings: false,
  });
  assertEquals([mistral.slidingWindow, mistral.slidingLayers, mistral.headDim], [
    4096,
    undefined,
    128,
  ]);
});

// ---- refused configs and tensors ---------------------------------------------------------------

Deno.test("config: every math-changing field is read; unsupported values are ModelConfigErrors naming the field", async () => {
  const bad = async (j: Record<string, unknown>, field: string) => {
    const e = await fail(parseHfConfig(tinyJson(j)));
    assert(e instanceof ModelConfigError, String(e));
    assertEquals(e.field, field, e.message);
    assert(e.message.includes(field.split(".").pop()!) || e.message.includes(field), e.message);
  };
  await bad({ model_type: "gemma" }, "model_type");
  await bad({ hidden_act: "gelu_pytorch_tanh" }, "hidden_act");
  await bad(
    { rope_scaling: { rope_type: "longrope", short_factor: [1], long_factor: [1] } },
    "rope_scaling.rope_type",
  );
  await bad({
    rope_scaling: {
      rope_type: "llama3",
      factor: 8.0,
      high_freq_factor: 4.0,
      original_max_position_embeddings: 8192,
    },
  }, "rope_scaling.low_freq_factor");
  await bad(
    { rope_scaling: { rope_type: "linear", factor: 2.0, beta_fast: 3 } },
    "rope_scaling.beta_fast",
  );
  await bad({ rope_scaling: { rope_type: "linear" } }, "rope_scaling.factor");
  await bad(
    { rope_parameters: { rope_type: "ntk", rope_theta: 1e4, factor: 2.0 } },
    "rope_parameters.rope_type",
  );
  await bad({ partial_rotary_factor: 0.5 }, "partial_rotary_factor");
  await bad({ attention_dropout: 0.1 }, "attention_dropout");
  await bad({ attn_logit_softcapping: 50.0 }, "attn_logit_softcapping");
  await bad({ final_logit_softcapping: 30.0 }, "final_logit_softcapping");
  await bad({ mlp_bias: "yes" }, "mlp_bias");
  await bad({ sliding_window: 4 }, "sliding_window"); // llama has none
  await bad({
    model_type: "qwen2",
    use_sliding_window: true,
    sliding_window: 2,
    layer_types: ["full_attention"],
  }, "layer_types");
  await bad({ model_type: "mistral", sliding_window: 0 }, "sliding_window");
  // gemma: only what is implemented
  const g = { model_type: "gemma2", hidden_act: undefined };
  await bad({ ...g, hidden_activation: "gelu" }, "hidden_activation");
  // gemma's MLP reads hidden_activation only, as HF's: hidden_act does not matter
  assertEquals((await configOf(tinyJson({ ...g, hidden_act: "gelu" }))).modelType, "gemma2");
  await bad({
    model_type: "mistral",
    sliding_window: 4,
    layer_types: ["full_attention", "sliding_attention"],
  }, "layer_types");
  assertEquals((await configOf(tinyJson({ model_type: "mistral" }))).slidingWindow, 4096); // HF's default
  await bad({ ...g, use_bidirectional_attention: true }, "use_bidirectional_attention");
  await bad({ ...g, attn_logit_softcapping: -1 }, "attn_logit_softcapping");
  await bad({ ...g, layer_types: ["sliding_attention"] }, "layer_types");
  await bad({ model_type: "gemma3", hidden_act: undefined }, "model_type"); // the multimodal wrapper
  await bad({ model_type: "gemma", hidden_act: undefined }, "model_type");
  await bad({
    model_type: "gemma3_text",
    hidden_act: undefined,
    rope_parameters: {
      full_attention: { rope_type: "default", rope_theta: 1e6 },
      sliding_attention: { rope_type: "linear", factor: 2.0, rope_theta: 1e4 },
    },
  }, "rope_parameters.sliding_attention.rope_type");
  await bad({
    model_type: "gemma3_text",
    hidden_act: undefined,
    rope_parameters: { full_attention: { rope_type: "longrope", rope_theta: 1e6 } },
  }, "rope_parameters.full_attention.rope_type");
  // neutral values are accepted: rope_type default (old and new spellings), no dropout, null caps
  for (
    const ok of [
      { rope_scaling: { rope_type: "default" } },
      { rope_scaling: { type: "default" } },
      { rope_parameters: { rope_type: "default", rope_theta: 5e5 } },
      { attention_dropout: 0.0, partial_rotary_factor: 1.0, final_logit_softcapping: null },
      {
        model_type: "qwen2",
        use_sliding_window: false,
        sliding_window: 32768,
        max_window_layers: 21,
      },
      { model_type: "mistral", sliding_window: null },
      {
        model_type: "mistral",
        sliding_window: null,
        layer_types: ["full_attention", "full_attention"],
      },
    ]
  ) {
    const c = await configOf(tinyJson(ok));
    assertEquals(c.ropeScaling, undefined);
    assertEquals(c.slidingWindow, undefined);
  }
  assertEquals(
    (await configOf(
      tinyJson({
        rope_theta: undefined,
        rope_parameters: { rope_type: "default", rope_theta: 5e5 },
      }),
    ))
      .ropeTheta,
    5e5,
  );
});

Deno.test("weights: a tensor the config does not consume is a WeightsError naming it", async () => {
  const llama = await configOf(tinyJson({}));
  const withBias = await configOf(tinyJson({ attention_bias: true, mlp_bias: true }));
  const qwen3 = await configOf(tinyJson({ model_type: "qwen3" }));
  const biased = makeWeights(withBias, 1);
  // a checkpoint with biases read with a config that declares none: every bias is refused
  const e1 = await fail(validateWeights(llama, biased));
  assert(e1 instanceof WeightsError);
  assert(e1.tensor.endsWith(".bias"), e1.tensor);
  const oBias = new Map(makeWeights(llama, 1));
  oBias.set("model.layers.0.self_attn.o_proj.bias", { shape: [8], data: new Float32Array(8) });
  const e2 = await fail(validateWeights(llama, oBias));
  assert(
    e2 instanceof WeightsError && e2.tensor === "model.layers.0.self_attn.o_proj.bias",
    e2.message,
  );
  assert(e2.message.includes("model.layers.0.self_attn.o_proj.bias"));
  // qwen3 norms in a llama checkpoint; a qwen3 checkpoint without them
  const q3 = makeWeights(qwen3, 1);
  const e3 = await fail(validateWeights(llama, q3));
  assert(e3 instanceof WeightsError && e3.tensor.includes("_norm.weight"), e3.message);
  const noNorm = new Map(q3);
  noNorm.delete("model.layers.1.self_attn.k_norm.weight");
  const e4 = await fail(validateWeights(qwen3, noNorm));
  assert(e4 instanceof WeightsError && e4.tensor === "model.layers.1.self_attn.k_norm.weight");
  assert(e4.message.includes("missing"));
  // gemma: a llama checkpoint lacks the feed-forward norms; a bias gemma does not declare
  const gemma = await configOf(gemmaJson({ model_type: "gemma2", head_dim: 4 }));
  const e6 = await fail(validateWeights(gemma, makeWeights(llama, 1)));
  assert(
    e6 instanceof WeightsError && e6.tensor === "model.layers.0.pre_feedforward_layernorm.weight",
    e6.message,
  );
  const gBias = new Map(makeWeights(gemma, 1));
  gBias.set("model.layers.1.mlp.down_proj.bias", { shape: [8], data: new Float32Array(8) });
  const e7 = await fail(validateWeights(gemma, gBias));
  assert(
    e7 instanceof WeightsError && e7.tensor === "model.layers.1.mlp.down_proj.bias",
    e7.message,
  );
  // and through a checkpoint directory
  const dir = await Deno.makeTempDir();
  await writeHfCheckpoint(dir, tinyJson({}), oBias);
  const e5 = await fail(loadModel(dir));
  assertEquals(e5._tag, "WeightsError");
  assert(e5.message.includes("model.layers.0.self_attn.o_proj.bias"), e5.message);
  await Deno.remove(dir, { recursive: true });
});

gpuTeardown();
