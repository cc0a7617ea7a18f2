/**
 * Llama-style decoder on any backend: forward to logits (optionally recording a tape), full
 * backward pass, and KV-cached incremental forward for generation. Weights are read, never
 * written: LoRA runs beside the frozen base as y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ.
 *
 * Families (see ModelConfig): q/k/v(/o) and MLP biases, scaled RoPE (the host computes the
 * frequency table, src/model/rope.ts), Qwen3's per-head q/k RMSNorm before RoPE, sliding-window
 * layers (Mistral, Qwen2, Gemma), and Gemma 2/3: (1 + w) norms, sqrt(hidden) embedding scale,
 * norms on the attention and MLP outputs, GeLU-tanh MLP, query_pre_attn_scalar, attention and
 * final logit soft-capping, a local RoPE base on Gemma 3's sliding layers.
 *
 * The language-model head runs over vocabulary chunks when the vocabulary is large: each chunk is
 * a run of rows of the head weight [V, H] inside one of its storage blocks (see Ops.rowBlocks),
 * so no op sees a tensor beyond the device's binding limit. `forwardLogProbs` /
 * `backwardLogProbs` go further: they stream token log-probs, entropies and their gradient over
 * chunks of at most LOGITS_CHUNK_ELEMENTS logits (an online log-softmax; the backward pass
 * recomputes each chunk's logits), so no [tokens, vocab] tensor beyond one chunk is ever held.
 * When everything fits one chunk (a small vocabulary) both run the plain ops, unchanged.
 *
 * Activation memory: a forward pass without a tape runs each layer in a transient scope and keeps
 * only its output. With `gradientCheckpointing` a recording forward does the same and its tape
 * keeps only each layer's input (and the state of the dropout stream before it); the backward
 * pass recomputes one layer's activations at a time, in a transient scope, from that input (with
 * the same dropout masks) and runs that layer's backward pass there, so at most one layer's
 * activations are held. The recomputation runs the very same ops on the very same inputs, so
 * the gradients are bit-identical to those of the full tape.
 * @module
 */
import type { AttentionOptions, Ops, RmsNormFold, RopeFold, SwigluPart } from "../backend/ops.ts";
import type { Tensor } from "../backend/tensor.ts";
import { ensure } from "../backend/tensor.ts";
import { isGemma, isSlidingLayer, type ModelConfig } from "./config.ts";
import { Rng } from "./rng.ts";
import { type RopePlan, ropePlan } from "./rope.ts";
import { type Projection, projectionPath, PROJECTIONS, qkNormPaths } from "./weights.ts";
import { type BaseWeightMap, isHalfTensor } from "./weights.ts";

/** A model's weights uploaded to a backend (owned by the scope of the Ops that uploaded them). */
export interface DeviceModel {
  readonly config: ModelConfig;
  readonly weights: ReadonlyMap<string, Tensor>;
}

/** One LoRA module on the device: A [r, in], B [out, r]. */
export interface LoraModule {
  readonly a: Tensor;
  readonly b: Tensor;
}

/** LoRA applied at run time. Keys of `modules` are projection paths (see projectionPath). */
export interface LoraRuntime {
  readonly scale: number;
  readonly dropout: number;
  readonly modules: ReadonlyMap<string, LoraModule>;
}

/**
 * Uploads host weights; 16-bit ones (a LoRA run's frozen base) stay 16-bit on the device, where
 * matmul, embedding and the head's row slices widen them as they read.
 */
export const uploadModel = (
  ops: Ops,
  config: ModelConfig,
  weights: BaseWeightMap,
): DeviceModel => {
  const out = new Map<string, Tensor>();
  for (const [name, t] of weights) {
    out.set(
      name,
      isHalfTensor(t) ? ops.fromHalf(t.bits, t.shape, t.format) : ops.fromArray(t.data, t.shape),
    );
  }
  return { config, weights: out };
};

/** Tokens of a forward call: `batch` sequences of `seqLen` rows each (right- or left-padded). */
export interface ForwardInput {
  readonly ids: ArrayLike<number>;
  readonly batch: number;
  readonly seqLen: number;
  /** Rotary positions per row; default: index within the sequence minus its left padding. */
  readonly positions?: ArrayLike<number>;
  /** Left padding per sequence: keys before it are masked. Default 0. */
  readonly kvStart?: ArrayLike<number>;
  /** Distinct rows whose logits are wanted (default: all rows). */
  readonly logitRows?: ArrayLike<number>;
}

/** What backward needs from the forward pass. */
export interface Tape {
  readonly model: DeviceModel;
  readonly lora: LoraRuntime | null;
  readonly input: ForwardInput;
  readonly rows: number;
  readonly positions: Tensor;
  /** The rotary frequencies the forward rotated by (dynamic NTK depends on the positions). */
  readonly ropes: LayerRopes;
  readonly kvStart: Tensor | undefined;
  /** Every layer's activations (empty with gradient checkpointing). */
  readonly layers: LayerTape[];
  /** Gradient checkpointing: each layer's input and dropout stream state, else null. */
  readonly checkpoints: LayerCheckpoint[] | null;
  readonly xFinal: Tensor;
  readonly rstdFinal: Tensor;
  readonly hFinal: Tensor;
  /** The forward's `chunkRows` option (the backward pass chunks the head alike). */
  readonly chunkRows?: number;
}

/** What a checkpointed layer's recomputation starts from. */
interface LayerCheckpoint {
  readonly x: Tensor;
  /** State of the dropout stream before the layer drew its masks (null: no dropout stream). */
  readonly rng: readonly number[] | null;
}

interface LinearTape {
  readonly x: Tensor;
  readonly xd?: Tensor;
  readonly xa?: Tensor;
  readonly mask?: Tensor;
}

interface LayerTape {
  readonly x: Tensor;
  /** The attention input's norm (rstd, output); null where an inference pass folded it away. */
  readonly rstd1: Tensor | null;
  readonly h1: Tensor | null;
  /** q/k projections before the per-head norm and their rstd (qkNorm only). */
  readonly qkNorm: { qp: Tensor; kp: Tensor; rstdQ: Tensor; rstdK: Tensor } | null;
  /**
   * Gemma: the attention output (o_proj) and MLP output (down_proj) before their norms, with
   * those norms' rstd.
   */
  readonly sandwich: { o: Tensor; rstdO: Tensor; d: Tensor; rstdD: Tensor } | null;
  readonly q: Tensor;
  readonly k: Tensor;
  readonly v: Tensor;
  readonly att: Tensor;
  readonly lse: Tensor;
  readonly x2: Tensor;
  /** The MLP input's norm; null where an inference pass folded it away (mlpInput). */
  readonly rstd2: Tensor | null;
  readonly h2: Tensor | null;
  /** The MLP's gate and up projections; null where an inference pass fused them (mlpInput). */
  readonly gate: Tensor | null;
  readonly up: Tensor | null;
  readonly act: Tensor;
  readonly lin: Map<Projection, LinearTape>;
}

/** KV cache for incremental decoding: per layer [batch*maxLen, kvHeads*headDim]. */
export interface KvCache {
  readonly k: Tensor[];
  readonly v: Tensor[];
  readonly batch: number;
  readonly maxLen: number;
  /** Rows filled so far per sequence (same for all sequences; padding is on the left). */
  len: number;
}

/** Allocates an empty KV cache. */
export const makeKvCache = (ops: Ops, c: ModelConfig, batch: number, maxLen: number): KvCache => {
  const shape = [batch * maxLen, c.numKvHeads * c.headDim];
  return {
    k: Array.from({ length: c.numLayers }, () => ops.zeros(shape)),
    v: Array.from({ length: c.numLayers }, () => ops.zeros(shape)),
    batch,
    maxLen,
    len: 0,
  };
};

/** A tape tensor backward needs: recording forwards never fuse it away (see mlpInput). */
const recorded = (t: Tensor | null): Tensor => {
  if (!t) throw new Error("backward: the tape lacks a tensor an inference pass fused away");
  return t;
};

const weight = (m: DeviceModel, name: string): Tensor => {
  const w = m.weights.get(name);
  if (!w) throw new Error(`model has no tensor ${name}`);
  return w;
};

const headName = (c: ModelConfig): string =>
  c.tieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight";

/**
 * Most logits one chunk of the streamed head (forwardLogProbs / backwardLogProbs) holds: 4M
 * (16 MiB in f32), e.g. 4096 vocabulary rows for 1024 tokens.
 */
export const LOGITS_CHUNK_ELEMENTS: number = 1 << 22;

/** Vocabulary rows a head chunk's size is a multiple of where it can be (see vocabChunks). */
const CHUNK_ALIGN = 4;

/** A vocabulary chunk: rows [start, start + count) of the head weight. */
export type Chunk = readonly [start: number, count: number];

/**
 * Cuts each storage block [bounds[i], bounds[i + 1]) of a head weight into chunks of at most
 * `maxRows` rows, as evenly as sizes that are multiples of CHUNK_ALIGN allow where maxRows does
 * (only a block's last chunk may be shorter): the fused head products
 * (Ops.projectLogSoftmaxChunk on WebGPU) take chunks of 4k rows only, and Qwen2.5's head
 * (151,936 rows in 5 blocks) cut exactly evenly gave 7,597-row chunks.
 */
export const vocabChunks = (bounds: readonly number[], maxRows: number): Chunk[] => {
  const align = maxRows >= CHUNK_ALIGN ? CHUNK_ALIGN : 1;
  const step = Math.max(1, Math.floor(maxRows / align) * align);
  const out: Chunk[] = [];
  for (let i = 0; i + 1 < bounds.length; i++) {
    const [b0, n] = [bounds[i], bounds[i + 1] - bounds[i]];
    // per: a multiple of align, at least ceil(n / k) and at most step
    const k = Math.max(1, Math.ceil(n / step));
    const per = Math.ceil(Math.ceil(n / k) / align) * align;
    for (let s0 = 0; s0 < n; s0 += per) out.push([b0 + s0, Math.min(per, n - s0)]);
  }
  return out;
};

/**
 * Vocabulary chunks of the head weight [V, H] for `rows` logit rows: each lies in one storage
 * block of the weight, and holds at most `chunkRows` vocabulary rows (default: as many as keep
 * rows x chunk within `budget` logits and one storage block).
 */
const headChunks = (
  ops: Ops,
  head: Tensor,
  rows: number,
  budget: number,
  chunkRows?: number,
): Chunk[] => {
  const limit = Math.min(budget, ops.maxBlockElements());
  const maxRows = Math.max(1, Math.floor(chunkRows ?? limit / Math.max(rows, 1)));
  return vocabChunks(ops.rowBlocks(head), maxRows);
};

/**
 * Full logits h·headᵀ [N, V]: one matmul when the head fits one chunk, else chunk by chunk into
 * columns of a result that is itself split into row blocks when it exceeds one binding.
 */
const headLogits = (ops: Ops, h: Tensor, head: Tensor, chunkRows?: number): Tensor => {
  const chunks = headChunks(ops, head, h.shape[0], Infinity, chunkRows);
  if (chunks.length === 1) return ops.matmul(h, head, { transB: true });
  const logits = ops.zeros([h.shape[0], head.shape[0]]);
  for (const [c0, n] of chunks) {
    ops.transient((t) => ops.setColumns(logits, c0, t.projectRows(h, head, c0, n)));
  }
  return logits;
};

interface Ctx {
  readonly ops: Ops;
  readonly model: DeviceModel;
  readonly lora: LoraRuntime | null;
  readonly rng: Rng | null;
  /** Training: apply LoRA dropout and fill the linear tapes. */
  readonly record: boolean;
  /** Rotary frequencies of this call. */
  readonly ropes: LayerRopes;
}

/** Rotary plans of a call: global layers, and sliding layers (Gemma 3's local base). */
interface LayerRopes {
  readonly global: RopePlan;
  readonly local: RopePlan;
}

const layerRopes = (c: ModelConfig, maxPosition: number): LayerRopes => {
  const global = ropePlan(c, maxPosition);
  return {
    global,
    local: c.ropeLocalTheta !== undefined ? { freqs: c.ropeLocalTheta, scale: 1 } : global,
  };
};

const ropeOf = (c: ModelConfig, r: LayerRopes, l: number): RopePlan =>
  isSlidingLayer(c, l) ? r.local : r.global;

/** Gemma's embedding scale sqrt(hidden), in f32 as HF rounds it; 1 for the others. */
const embedScale = (c: ModelConfig): number =>
  isGemma(c) ? Math.fround(Math.sqrt(c.hiddenSize)) : 1;

/** Token embeddings, scaled for Gemma. */
const embed = (ops: Ops, model: DeviceModel, ids: ArrayLike<number>): Tensor => {
  const x = ops.embedding(
    weight(model, "model.embed_tokens.weight"),
    ops.fromArray(ids, [ids.length], "i32"),
  );
  const s = embedScale(model.config);
  return s === 1 ? x : ops.scale(x, s);
};

/** Ones vectors per Ops (owned by its scope), so a call uploads each size once. */
const onesOf = new WeakMap<Ops, Map<number, Tensor>>();

const ones = (ops: Ops, n: number): Tensor => {
  let m = onesOf.get(ops);
  if (!m) onesOf.set(ops, m = new Map());
  let t = m.get(n);
  if (!t) m.set(n, t = ops.fromArray(new Float32Array(n).fill(1), [n]));
  return t;
};

/**
 * A norm's effective weight: w, or 1 + w for Gemma's norms (whose gradient is w's gradient).
 * Computed per use from the live weight, which full fine-tuning updates in place.
 */
const normWeight = (ops: Ops, model: DeviceModel, name: string): Tensor => {
  const w = weight(model, name);
  if (!isGemma(model.config)) return w;
  return ops.addScaled(ones(ops, w.size), w, 1);
};

/** Gemma 2's final logit soft-capping, when configured. */
const capLogits = (ops: Ops, c: ModelConfig, logits: Tensor): Tensor =>
  c.finalLogitSoftcap ? ops.softcap(logits, c.finalLogitSoftcap) : logits;

/** Largest value of host positions (dynamic NTK rope reads it), 0 for none. */
const maxOf = (xs: ArrayLike<number>): number => {
  let m = 0;
  for (let i = 0; i < xs.length; i++) m = Math.max(m, xs[i]);
  return m;
};

/**
 * Attention options of layer `l`: the call's, plus the sliding window on sliding layers and
 * Gemma's score scale and logit soft-capping.
 */
const layerAttention = (c: ModelConfig, l: number, o: AttentionOptions): AttentionOptions => ({
  ...o,
  ...(isSlidingLayer(c, l) ? { window: c.slidingWindow } : {}),
  ...(c.queryPreAttnScalar !== undefined ? { scale: c.queryPreAttnScalar ** -0.5 } : {}),
  ...(c.attnLogitSoftcap !== undefined ? { softcap: c.attnLogitSoftcap } : {}),
});

/**
 * RMSNorm over head_dim of every head of x [R, heads*headDim] (qwen3's q_norm/k_norm): the rows
 * seen as [R*heads, headDim].
 */
const headNorm = (ops: Ops, x: Tensor, w: Tensor, heads: number, hd: number, eps: number) => {
  const rows = x.shape[0];
  const n = ops.rmsNorm(ops.reshape(x, [rows * heads, hd]), w, eps);
  return { y: ops.reshape(n.y, [rows, heads * hd]), rstd: n.rstd };
};

/** Rotary embedding with the plan's attention scaling. */
const rotate = (
  ops: Ops,
  x: Tensor,
  positions: Tensor,
  heads: number,
  c: ModelConfig,
  rp: RopePlan,
) => {
  const y = ops.rope(x, positions, heads, c.headDim, rp.freqs);
  return rp.scale === 1 ? y : ops.scale(y, rp.scale);
};

const linear = (
  cx: Ctx,
  layer: number,
  p: Projection,
  x: Tensor,
  tape: Map<Projection, LinearTape> | null,
  /** A tensor to add the projection onto in place (then returned); needs no bias. */
  into?: Tensor,
): Tensor => {
  const { ops, model } = cx;
  const path = projectionPath(layer, p);
  const w = weight(model, `${path}.weight`);
  const bias = model.weights.get(`${path}.bias`);
  if (into && bias) throw new Error(`linear ${path}: a bias cannot be added onto a tensor`);
  const m = cx.lora?.modules.get(path);
  if (!m) {
    tape?.set(p, { x });
    if (into) {
      ops.matmulAccumulate(into, x, w, 1, { transB: true });
      return into;
    }
    const y = ops.matmul(x, w, { transB: true });
    return bias ? ops.addRow(y, bias) : y;
  }
  let xd = x;
  let mask: Tensor | undefined;
  if (cx.record && cx.rng && cx.lora!.dropout > 0) {
    const keep = 1 - cx.lora!.dropout;
    const host = new Float32Array(x.size);
    for (let i = 0; i < host.length; i++) host[i] = cx.rng.next() < keep ? 1 / keep : 0;
    mask = ops.fromArray(host, x.shape);
    xd = ops.mul(x, mask);
  }
  const xa = ops.matmul(xd, m.a, { transB: true });
  // the projection and its delta in one product where the backend can
  const y = ops.projectLora(x, w, xa, m.b, cx.lora!.scale, into);
  tape?.set(p, { x, xd, xa, mask });
  return bias ? ops.addRow(y, bias) : y;
};

/**
 * Projections of one input (q/k/v, gate/up, or one). Without a tape (inference) the adapted ones
 * run through Ops.projectLoraShared, which computes all their x·Aᵀ in one product.
 */
const linears = (
  cx: Ctx,
  layer: number,
  ps: readonly Projection[],
  x: Tensor,
  tape: Map<Projection, LinearTape> | null,
  /** x is the input before this norm (only where allAdapted: see sharedNorm). */
  norm?: RmsNormFold,
  /** Rotations of outputs (q, k) joined to the shared product; only for bias-free parts. */
  ropes?: ReadonlyMap<Projection, RopeFold>,
): Tensor[] => {
  const lora = cx.lora;
  const adapted = ps.filter((p) => lora?.modules.has(projectionPath(layer, p)));
  if (cx.record || !lora || adapted.length === 0) {
    if (norm || ropes) {
      throw new Error("linears: a folded norm or rope needs adapted projections and no tape");
    }
    return ps.map((p) => linear(cx, layer, p, x, tape));
  }
  if ((norm || ropes) && adapted.length !== ps.length) {
    throw new Error("linears: a folded norm or rope needs every projection adapted");
  }
  const { ops, model } = cx;
  const shared = ops.projectLoraShared(
    x,
    adapted.map((p) => {
      const path = projectionPath(layer, p);
      const m = lora.modules.get(path)!;
      const rope = ropes?.get(p);
      if (rope && model.weights.has(`${path}.bias`)) {
        throw new Error(`linears ${path}: a rope cannot follow a bias added after the product`);
      }
      return { w: weight(model, `${path}.weight`), a: m.a, b: m.b, ...(rope ? { rope } : {}) };
    }),
    lora.scale,
    norm,
  );
  return ps.map((p) => {
    const i = adapted.indexOf(p);
    if (i < 0) return linear(cx, layer, p, x, tape);
    const bias = model.weights.get(`${projectionPath(layer, p)}.bias`);
    return bias ? ops.addRow(shared[i], bias) : shared[i];
  });
};

/**
 * The MLP's activation of its normed input h, with its gate and up projections when recording.
 * Without a tape a SwiGLU MLP (gate and up without biases) runs as Ops.projectSwiglu: one
 * product where the backend can, and no gate or up tensor.
 */
const mlpInput = (
  cx: Ctx,
  layer: number,
  x: Tensor,
  norm: RmsNormFold,
  tape: Map<Projection, LinearTape> | null,
): {
  gate: Tensor | null;
  up: Tensor | null;
  act: Tensor;
  n: { y: Tensor; rstd: Tensor } | null;
} => {
  const { ops, model, lora } = cx;
  const gemma = isGemma(model.config);
  const paths = (["gate_proj", "up_proj"] as const).map((p) => projectionPath(layer, p));
  if (!cx.record && !gemma && paths.every((p) => !model.weights.has(`${p}.bias`))) {
    const [gate, up] = paths.map((p): SwigluPart => {
      const m = lora?.modules.get(p);
      return { w: weight(model, `${p}.weight`), lora: m ? { a: m.a, b: m.b } : null };
    });
    // the norm joins the product where the backend can (Ops.projectSwiglu)
    const act = ops.projectSwiglu(x, gate, up, lora?.scale ?? 1, norm);
    return { gate: null, up: null, act, n: null };
  }
  const n = ops.rmsNorm(x, norm.w, norm.eps);
  const [gate, up] = linears(cx, layer, ["gate_proj", "up_proj"], n.y, tape);
  return { gate, up, act: gemma ? ops.gegluTanh(gate, up) : ops.swiglu(gate, up), n };
};

/**
 * The attention input's projections (q, k, v) of the layer input x through its norm: without a
 * tape and with all three adapted, the norm joins their products (Ops.projectLoraShared) and
 * is never stored (`n` null); otherwise it runs first. In that shared form q and k also take
 * their rotation in the product (`rotated`) where nothing comes between the two: no bias, no
 * qwen3 head norm, no attention scaling of the rope plan.
 */
const attentionInputs = (
  cx: Ctx,
  layer: number,
  x: Tensor,
  norm: RmsNormFold,
  tape: Map<Projection, LinearTape> | null,
  positions: Tensor,
  rp: RopePlan,
): { qkv: Tensor[]; n: { y: Tensor; rstd: Tensor } | null; rotated: boolean } => {
  const ps = ["q_proj", "k_proj", "v_proj"] as const;
  const { lora, model } = cx;
  const c = model.config;
  if (!cx.record && lora && ps.every((p) => lora.modules.has(projectionPath(layer, p)))) {
    const joins = !c.qkNorm && rp.scale === 1 &&
      (["q_proj", "k_proj"] as const).every((p) =>
        !model.weights.has(`${projectionPath(layer, p)}.bias`)
      );
    const fold = (heads: number): RopeFold => ({
      positions,
      heads,
      headDim: c.headDim,
      theta: rp.freqs,
    });
    const ropes = joins
      ? new Map<Projection, RopeFold>([
        ["q_proj", fold(c.numHeads)],
        ["k_proj", fold(c.numKvHeads)],
      ])
      : undefined;
    return { qkv: linears(cx, layer, ps, x, tape, norm, ropes), n: null, rotated: joins };
  }
  const n = cx.ops.rmsNorm(x, norm.w, norm.eps);
  return { qkv: linears(cx, layer, ps, n.y, tape), n, rotated: false };
};

/**
 * The residual stream past an output projection (o_proj, down_proj): x + proj(h), or with
 * Gemma's sandwich norm (`post`, the norm's name in the layer) x + norm(proj(h)). Without a tape
 * and without that norm x itself is updated and returned: the projection adds onto it as it
 * stores, with no add pass and no new tensor (an inference pass never reads x again).
 */
const addProjection = (
  cx: Ctx,
  layer: number,
  p: Projection,
  h: Tensor,
  x: Tensor,
  tape: Map<Projection, LinearTape> | null,
  post: string | null,
): { sum: Tensor; proj: Tensor | null; norm: { y: Tensor; rstd: Tensor } | null } => {
  const { ops, model, lora } = cx;
  const path = projectionPath(layer, p);
  if (post === null && !model.weights.has(`${path}.bias`)) {
    if (cx.record) {
      // the tape keeps x: the projection adds onto a copy of it as it stores (no add pass)
      const sum = ops.copy(x);
      linear(cx, layer, p, h, tape, sum);
      return { sum, proj: null, norm: null };
    }
    const w = weight(model, `${path}.weight`);
    const m = lora?.modules.get(path);
    if (m) ops.projectLoraShared(h, [{ w, a: m.a, b: m.b, into: x }], lora!.scale);
    else ops.matmulAccumulate(x, h, w, 1, { transB: true });
    return { sum: x, proj: null, norm: null };
  }
  const [proj] = linears(cx, layer, [p], h, tape);
  const c = model.config;
  const norm = post === null ? null : ops.rmsNorm(
    proj,
    normWeight(ops, model, `model.layers.${layer}.${post}.weight`),
    c.rmsNormEps,
  );
  return { sum: ops.add(x, norm ? norm.y : proj), proj, norm };
};

const defaultPositions = (input: ForwardInput): Int32Array => {
  const pos = new Int32Array(input.batch * input.seqLen);
  for (let b = 0; b < input.batch; b++) {
    const pad = input.kvStart ? input.kvStart[b] : 0;
    for (let t = 0; t < input.seqLen; t++) pos[b * input.seqLen + t] = Math.max(0, t - pad);
  }
  return pos;
};

/**
 * One decoder layer: x + attn(norm(x)), then + mlp(norm(·)). `attend` runs attention on the
 * rotated q, k and v (the full pass attends to k/v directly, decoding via the KV cache). Returns
 * the layer output and what backward needs (linear tapes are filled only when recording).
 */
const decoderLayer = (
  cx: Ctx,
  l: number,
  x: Tensor,
  positions: Tensor,
  attend: (q: Tensor, k: Tensor, v: Tensor) => { out: Tensor; lse: Tensor },
): LayerTape & { out: Tensor } => {
  const { ops, model } = cx;
  const c = model.config;
  const lin = cx.record ? new Map<Projection, LinearTape>() : null;
  const pre = `model.layers.${l}`;
  const gemma = isGemma(c);
  const n1w = normWeight(ops, model, `${pre}.input_layernorm.weight`);
  const rp = ropeOf(c, cx.ropes, l);
  const inputs = attentionInputs(cx, l, x, { w: n1w, eps: c.rmsNormEps }, lin, positions, rp);
  const n1 = inputs.n;
  let [qp, kp, v] = inputs.qkv;
  let qkNorm: LayerTape["qkNorm"] = null;
  if (c.qkNorm) {
    // qwen3: each head normalised over head_dim before the rotation
    const names = qkNormPaths(l);
    const qw = normWeight(ops, model, names.q);
    const kw = normWeight(ops, model, names.k);
    const qn = headNorm(ops, qp, qw, c.numHeads, c.headDim, c.rmsNormEps);
    const kn = headNorm(ops, kp, kw, c.numKvHeads, c.headDim, c.rmsNormEps);
    qkNorm = { qp, kp, rstdQ: qn.rstd, rstdK: kn.rstd };
    qp = qn.y;
    kp = kn.y;
  }
  const q = inputs.rotated ? qp : rotate(ops, qp, positions, c.numHeads, c, rp);
  const k = inputs.rotated ? kp : rotate(ops, kp, positions, c.numKvHeads, c, rp);
  const att = attend(q, k, v);
  // Gemma normalises the attention and MLP outputs too (post_attention_layernorm is then the
  // attention output's norm, pre_feedforward_layernorm the MLP input's)
  const ro = addProjection(
    cx,
    l,
    "o_proj",
    att.out,
    x,
    lin,
    gemma ? "post_attention_layernorm" : null,
  );
  const x2 = ro.sum;
  const mlpNorm = gemma ? "pre_feedforward_layernorm" : "post_attention_layernorm";
  const n2w = normWeight(ops, model, `${pre}.${mlpNorm}.weight`);
  const { gate, up, act, n: n2 } = mlpInput(cx, l, x2, { w: n2w, eps: c.rmsNormEps }, lin);
  const rd = addProjection(
    cx,
    l,
    "down_proj",
    act,
    x2,
    lin,
    gemma ? "post_feedforward_layernorm" : null,
  );
  const out = rd.sum;
  return {
    x,
    rstd1: n1?.rstd ?? null,
    h1: n1?.y ?? null,
    qkNorm,
    sandwich: ro.norm && rd.norm
      ? { o: ro.proj!, rstdO: ro.norm.rstd, d: rd.proj!, rstdD: rd.norm.rstd }
      : null,
    q,
    k,
    v,
    att: att.out,
    lse: att.lse,
    x2,
    rstd2: n2?.rstd ?? null,
    h2: n2?.y ?? null,
    gate,
    up,
    act,
    lin: lin ?? new Map(),
    out,
  };
};

/** Options of a forward pass. */
export interface ForwardOptions {
  readonly lora?: LoraRuntime | null;
  /** Record a tape for backward (and apply LoRA dropout, drawing masks from `rng`). */
  readonly train?: boolean;
  readonly rng?: Rng | null;
  /**
   * Most vocabulary rows per head chunk (tests force several chunks with it). Default: as many
   * as the storage blocks allow (and, for forwardLogProbs, LOGITS_CHUNK_ELEMENTS).
   */
  readonly chunkRows?: number;
  /**
   * With `train`: keep only each layer's input and recompute its activations in the backward
   * pass, one layer at a time (TRL's gradient_checkpointing). Same gradients, bit for bit.
   * Default false.
   */
  readonly gradientCheckpointing?: boolean;
}

/** Forward pass to logits [logitRows or all rows, vocab]; with `train`, also the tape. */
export const forward = (
  ops: Ops,
  model: DeviceModel,
  input: ForwardInput,
  opts: ForwardOptions = {},
): { logits: Tensor; tape: Tape | null } => {
  const { hSel, tape } = forwardHidden(ops, model, input, opts);
  const logits = capLogits(
    ops,
    model.config,
    headLogits(ops, hSel, weight(model, headName(model.config)), opts.chunkRows),
  );
  return { logits, tape };
};

/**
 * The decoder up to the final norm: hidden states of the logit rows (hSel [rows, hidden]) and,
 * with `train`, the tape.
 */
const forwardHidden = (
  ops: Ops,
  model: DeviceModel,
  input: ForwardInput,
  opts: ForwardOptions,
): { hSel: Tensor; tape: Tape | null } => {
  const c = model.config;
  const rows = input.batch * input.seqLen;
  ensure(input.ids.length === rows, "forward", () => `ids ${input.ids.length} != ${rows} rows`);
  const hostPositions = input.positions ?? defaultPositions(input);
  const cx: Ctx = {
    ops,
    model,
    lora: opts.lora ?? null,
    rng: opts.rng ?? null,
    record: !!opts.train,
    ropes: layerRopes(c, maxOf(hostPositions)),
  };
  const positions = ops.fromArray(hostPositions, [rows], "i32");
  const kvStart = input.kvStart ? ops.fromArray(input.kvStart, [input.batch], "i32") : undefined;
  const attnOpts = {
    batch: input.batch,
    tq: input.seqLen,
    tk: input.seqLen,
    heads: c.numHeads,
    kvHeads: c.numKvHeads,
    headDim: c.headDim,
    kvStart,
  };
  let x = embed(ops, model, input.ids);
  const layers: LayerTape[] = [];
  const checkpoints: LayerCheckpoint[] | null = cx.record && opts.gradientCheckpointing ? [] : null;
  for (let l = 0; l < c.numLayers; l++) {
    const lOpts = layerAttention(c, l, attnOpts);
    if (cx.record && !checkpoints) {
      const t = decoderLayer(cx, l, x, positions, (q, k, v) => ops.attention(q, k, v, lOpts));
      layers.push(t);
      x = t.out;
      continue;
    }
    // only the layer's output outlives it (and, checkpointed, its input, kept by the tape)
    checkpoints?.push({ x, rng: cx.rng ? cx.rng.state() : null });
    const input = x;
    x = ops.transient((t) => {
      const out = decoderLayer(
        { ...cx, ops: t },
        l,
        input,
        positions,
        (q, k, v) => t.attention(q, k, v, lOpts),
      ).out;
      // an inference pass may have updated its input in place (see addProjection)
      return out === input ? input : ops.copy(out);
    });
  }
  const nf = ops.rmsNorm(x, normWeight(ops, model, "model.norm.weight"), c.rmsNormEps);
  const hSel = input.logitRows ? ops.gatherRows(nf.y, input.logitRows) : nf.y;
  const tape: Tape | null = cx.record
    ? {
      model,
      lora: cx.lora,
      input,
      rows,
      positions,
      ropes: cx.ropes,
      kvStart,
      layers,
      checkpoints,
      xFinal: x,
      rstdFinal: nf.rstd,
      hFinal: nf.y,
      chunkRows: opts.chunkRows,
    }
    : null;
  return { hSel, tape };
};

/** Token log-probs (and entropies) of a forward pass; see forwardLogProbs. */
export interface TokenLogProbs {
  /** log_softmax(logits/T)[target] per logit row [N]. */
  readonly logp: Tensor;
  /** logsumexp(logits/T) per logit row [N]. */
  readonly lse: Tensor;
  /** Entropy of softmax(logits/T) per logit row [N], when asked for. */
  readonly entropy: Tensor | null;
  /** What backwardLogProbs needs (with `train`). */
  readonly tape: LogProbsTape | null;
}

/** What backwardLogProbs needs from forwardLogProbs. */
export interface LogProbsTape {
  readonly tape: Tape;
  readonly hSel: Tensor;
  readonly targets: Tensor;
  readonly lse: Tensor;
  readonly temperature: number;
  /** The logits, kept when the head ran as one chunk (then the backward pass reuses them). */
  readonly logits: Tensor | null;
}

/** Options of forwardLogProbs. */
export interface LogProbsOptions extends ForwardOptions {
  /** Also compute the entropy of each row's distribution (default false). */
  readonly entropy?: boolean;
}

/**
 * Forward pass to the log-probs of `targets` (one per logit row, in [0, vocab)) at a temperature,
 * without materialising the logits: the head runs over vocabulary chunks of at most
 * LOGITS_CHUNK_ELEMENTS logits, each folded into an online log-softmax (Ops.logSoftmaxChunk)
 * and released. A vocabulary that fits one chunk runs the plain ops (matmul, logProbs, entropy).
 */
export const forwardLogProbs = (
  ops: Ops,
  model: DeviceModel,
  input: ForwardInput,
  targets: ArrayLike<number>,
  temperature: number,
  opts: LogProbsOptions = {},
): TokenLogProbs => {
  const c = model.config;
  const n = input.logitRows ? input.logitRows.length : input.batch * input.seqLen;
  ensure(
    targets.length === n,
    "forwardLogProbs",
    () => `${targets.length} targets for ${n} logit rows`,
  );
  for (let i = 0; i < n; i++) {
    const t = targets[i];
    ensure(
      Number.isInteger(t) && t >= 0 && t < c.vocabSize,
      "forwardLogProbs",
      () => `target ${t} at ${i} is outside [0, ${c.vocabSize})`,
    );
  }
  const { hSel, tape } = forwardHidden(ops, model, input, opts);
  const tgt = ops.fromArray(targets, [n], "i32");
  const head = weight(model, headName(c));
  const chunks = headChunks(ops, head, n, LOGITS_CHUNK_ELEMENTS, opts.chunkRows);
  const keep = (lse: Tensor, logits: Tensor | null): LogProbsTape | null =>
    tape ? { tape, hSel, targets: tgt, lse, temperature, logits } : null;
  if (chunks.length === 1) {
    const logits = capLogits(ops, c, ops.matmul(hSel, head, { transB: true }));
    const { logp, lse } = ops.logProbs(logits, tgt, temperature);
    const entropy = opts.entropy ? ops.entropy(logits, temperature) : null;
    return { logp, lse, entropy, tape: keep(lse, logits) };
  }
  let acc: Tensor | null = null;
  for (const [c0, cn] of chunks) {
    const prev: Tensor | null = acc;
    // without a soft cap the head's product folds its chunk as it stores where the backend can
    // (no logits tensor); the state leaves the transient scope as a copy (n x 4 floats)
    acc = c.finalLogitSoftcap
      ? ops.transient((t) => {
        const lc = capLogits(t, c, t.projectRows(hSel, head, c0, cn));
        return ops.logSoftmaxChunk(prev, lc, tgt, c0, temperature);
      })
      : ops.transient((t) =>
        ops.copy(t.projectLogSoftmaxChunk(prev, hSel, head, c0, cn, tgt, temperature))
      );
  }
  const r = ops.logSoftmaxFinish(acc!);
  return {
    logp: r.logp,
    lse: r.lse,
    entropy: opts.entropy ? r.entropy : null,
    tape: keep(r.lse, null),
  };
};

/**
 * Backward pass from d logp [N] (the rows of forwardLogProbs) to parameter gradients (as
 * `backward`). A chunked head recomputes each chunk's logits, turns them into d logits and
 * accumulates d hidden (and, in mode "full", the head rows of the chunk), one chunk at a time.
 */
export const backwardLogProbs = (
  ops: Ops,
  lt: LogProbsTape,
  dlogp: Tensor,
  mode: GradMode,
): Map<string, Tensor> => {
  const { tape, hSel, targets, lse, temperature } = lt;
  const c = tape.model.config;
  const cap = c.finalLogitSoftcap;
  // the kept / recomputed logits are the capped ones: their gradient goes back through the cap
  const uncap = (t: Ops, d: Tensor, capped: Tensor) => cap ? t.softcapBackward(d, capped, cap) : d;
  if (lt.logits) {
    const dLogits = ops.logProbsBackward(dlogp, lt.logits, targets, lse, temperature);
    return backwardUncapped(ops, tape, uncap(ops, dLogits, lt.logits), mode);
  }
  const head = weight(tape.model, headName(c));
  const n = hSel.shape[0];
  const chunks = headChunks(ops, head, n, LOGITS_CHUNK_ELEMENTS, tape.chunkRows);
  return headBackward(ops, tape, hSel, chunks, mode, (t, c0, cn) => {
    const lc = capLogits(t, c, t.projectRows(hSel, head, c0, cn));
    return uncap(t, t.logProbsBackward(dlogp, lc, targets, lse, temperature, c0), lc);
  });
};

/** Which parameters receive gradients. */
export type GradMode = "lora" | "full";

/** Gradient key of a LoRA matrix (PEFT-style suffix on the projection path). */
export const loraGradKey = (path: string, which: "A" | "B"): string => `${path}.lora_${which}`;

const accumulate = (ops: Ops, grads: Map<string, Tensor>, key: string, g: Tensor): void => {
  const prev = grads.get(key);
  grads.set(key, prev ? ops.add(prev, g) : g);
};

/**
 * d input of an RMSNorm with weight `name`; in mode "full" its weight gradient accumulates in
 * `grads` (a LoRA run's norms are frozen: no dw is computed).
 */
const normBackward = (
  ops: Ops,
  mode: GradMode,
  grads: Map<string, Tensor>,
  dy: Tensor,
  x: Tensor,
  model: DeviceModel,
  name: string,
  rstd: Tensor,
  /** The gradient the residual stream carries past the norm, added to d input when given. */
  residual?: Tensor,
): Tensor => {
  const w = normWeight(ops, model, name);
  if (mode !== "full") return ops.rmsNormBackwardInput(dy, x, w, rstd, residual);
  const nb = ops.rmsNormBackward(dy, x, w, rstd);
  accumulate(ops, grads, name, nb.dw);
  return residual ? ops.add(residual, nb.dx) : nb.dx;
};

/** accumulate, with `g` from a transient scope: the result is owned by `ops`'s scope. */
const accumulateOut = (ops: Ops, grads: Map<string, Tensor>, key: string, g: Tensor): void => {
  const prev = grads.get(key);
  grads.set(key, prev ? ops.add(prev, g) : ops.copy(g));
};

/**
 * s·op(a)·b as one accumulating product onto zeros (op(a) = aᵀ with `transA`): no scale pass
 * over the result (the LoRA gradients' s).
 */
const scaledProduct = (ops: Ops, a: Tensor, b: Tensor, s: number, transA = false): Tensor => {
  const out = ops.zeros([transA ? a.shape[1] : a.shape[0], b.shape[1]]);
  ops.matmulAccumulate(out, a, b, s, { transA });
  return out;
};

/**
 * d input of one projection (and its gradients into `grads`). With `into` (d input of another
 * projection of the same input) it is added onto that tensor in place and returned: the
 * products accumulate as they store, with no add pass.
 */
const linearBackward = (
  ops: Ops,
  tape: Tape,
  layer: number,
  p: Projection,
  dy: Tensor,
  lt: LinearTape,
  mode: GradMode,
  grads: Map<string, Tensor>,
  into: Tensor | null = null,
): Tensor => {
  const path = projectionPath(layer, p);
  const w = weight(tape.model, `${path}.weight`);
  let dx = into ?? ops.matmul(dy, w);
  if (into) ops.matmulAccumulate(into, dy, w, 1);
  if (mode === "full") {
    accumulate(ops, grads, `${path}.weight`, ops.matmul(dy, lt.x, { transA: true }));
    if (tape.model.weights.has(`${path}.bias`)) {
      accumulate(ops, grads, `${path}.bias`, ops.sumRows(dy));
    }
  }
  const m = tape.lora?.modules.get(path);
  if (m && lt.xa && lt.xd) {
    const s = tape.lora!.scale;
    const dxa = scaledProduct(ops, dy, m.b, s);
    if (mode === "lora") {
      accumulate(ops, grads, loraGradKey(path, "B"), scaledProduct(ops, dy, lt.xa, s, true));
      accumulate(ops, grads, loraGradKey(path, "A"), ops.matmul(dxa, lt.xd, { transA: true }));
    }
    if (lt.mask) {
      const d = ops.mul(ops.matmul(dxa, m.a), lt.mask);
      if (into) ops.addScaledInPlace(into, d, 1);
      else dx = ops.add(dx, d);
    } else ops.matmulAccumulate(dx, dxa, m.a, 1); // dx: a fresh product, or `into`
  }
  return dx;
};

/**
 * Backward pass from d logits (same rows as the forward's logits) to parameter gradients:
 * LoRA A/B (mode "lora", keys from loraGradKey) or every weight (mode "full", HF names).
 * With final soft-capping, the capped logits are recomputed to take d logits through the cap.
 */
export const backward = (
  ops: Ops,
  tape: Tape,
  dLogits: Tensor,
  mode: GradMode,
): Map<string, Tensor> => {
  const c = tape.model.config;
  const cap = c.finalLogitSoftcap;
  if (!cap) return backwardUncapped(ops, tape, dLogits, mode);
  const sel = tape.input.logitRows;
  const hSel = sel ? ops.gatherRows(tape.hFinal, sel) : tape.hFinal;
  const capped = ops.softcap(
    headLogits(ops, hSel, weight(tape.model, headName(c)), tape.chunkRows),
    cap,
  );
  return backwardUncapped(ops, tape, ops.softcapBackward(dLogits, capped, cap), mode);
};

/** `backward` from d of the logits before any soft-capping. */
const backwardUncapped = (
  ops: Ops,
  tape: Tape,
  dLogits: Tensor,
  mode: GradMode,
): Map<string, Tensor> => {
  const c = tape.model.config;
  const head = weight(tape.model, headName(c));
  const sel = tape.input.logitRows;
  const hSel = sel ? ops.gatherRows(tape.hFinal, sel) : tape.hFinal;
  const chunks = headChunks(ops, head, hSel.shape[0], Infinity, tape.chunkRows);
  if (chunks.length === 1) {
    const grads = new Map<string, Tensor>();
    const dh = ops.matmul(dLogits, head);
    if (mode === "full") {
      accumulate(ops, grads, headName(c), ops.matmul(dLogits, hSel, { transA: true }));
    }
    return backwardFrom(ops, tape, dh, mode, grads);
  }
  return headBackward(
    ops,
    tape,
    hSel,
    chunks,
    mode,
    (t, c0, cn) => t.sliceColumns(dLogits, c0, cn),
  );
};

/**
 * The head's backward pass chunk by chunk: `dChunk` gives d logits of vocabulary rows
 * [c0, c0 + cn) in a transient scope; d hidden accumulates in place, and in
 * mode "full" each chunk's head gradient lands in its rows. Then the rest of the backward pass.
 */
const headBackward = (
  ops: Ops,
  tape: Tape,
  hSel: Tensor,
  chunks: readonly Chunk[],
  mode: GradMode,
  dChunk: (t: Ops, c0: number, cn: number) => Tensor,
): Map<string, Tensor> => {
  const c = tape.model.config;
  const head = weight(tape.model, headName(c));
  const dh = ops.zeros(hSel.shape);
  const dHead = mode === "full" ? ops.zeros(head.shape) : null;
  for (const [c0, cn] of chunks) {
    ops.transient((t) => {
      const dl = dChunk(t, c0, cn);
      // the head's rows read in place (no copy of the chunk, whose texture stays packed)
      t.accumulateRows(dh, dl, head, c0, cn, 1);
      if (dHead) ops.setRows(dHead, c0, t.matmul(dl, hSel, { transA: true }));
    });
  }
  const grads = new Map<string, Tensor>();
  if (dHead) grads.set(headName(c), dHead);
  return backwardFrom(ops, tape, dh, mode, grads);
};

/** The backward pass below the head, from d hidden of the logit rows. */
const backwardFrom = (
  ops: Ops,
  tape: Tape,
  dhSel: Tensor,
  mode: GradMode,
  grads: Map<string, Tensor>,
): Map<string, Tensor> => {
  const { model } = tape;
  const c = model.config;
  const sel = tape.input.logitRows;
  let dh = dhSel;
  if (sel) {
    const full = ops.zeros([tape.rows, c.hiddenSize]);
    ops.scatterRowsInPlace(full, dh, sel);
    dh = full;
  }
  let dx = normBackward(
    ops,
    mode,
    grads,
    dh,
    tape.xFinal,
    model,
    "model.norm.weight",
    tape.rstdFinal,
  );
  const attnOpts = {
    batch: tape.input.batch,
    tq: tape.input.seqLen,
    tk: tape.input.seqLen,
    heads: c.numHeads,
    kvHeads: c.numKvHeads,
    headDim: c.headDim,
    kvStart: tape.kvStart,
  };
  for (let l = c.numLayers - 1; l >= 0; l--) {
    const ck = tape.checkpoints?.[l];
    const lOpts = layerAttention(c, l, attnOpts);
    if (!ck) {
      dx = layerBackward(ops, tape, l, tape.layers[l], dx, mode, grads, lOpts);
      continue;
    }
    // recompute the layer from its input (same dropout masks) and run its backward pass, all in
    // a transient scope; only its gradients and d input are kept
    const dOut = dx;
    dx = ops.transient((t) => {
      const cx: Ctx = {
        ops: t,
        model,
        lora: tape.lora,
        rng: ck.rng ? new Rng(ck.rng) : null,
        record: true,
        ropes: tape.ropes,
      };
      const lt = decoderLayer(
        cx,
        l,
        ck.x,
        tape.positions,
        (q, k, v) => t.attention(q, k, v, lOpts),
      );
      const local = new Map<string, Tensor>();
      const d = layerBackward(t, tape, l, lt, dOut, mode, local, lOpts);
      for (const [key, g] of local) accumulateOut(ops, grads, key, g);
      return ops.copy(d);
    });
  }
  if (mode === "full") {
    accumulate(
      ops,
      grads,
      "model.embed_tokens.weight",
      ops.embeddingBackward(
        embedScale(c) === 1 ? dx : ops.scale(dx, embedScale(c)),
        tape.input.ids,
        c.vocabSize,
      ),
    );
  }
  return grads;
};

/** One layer's backward pass from d output to d input, given its activations. */
const layerBackward = (
  ops: Ops,
  tape: Tape,
  l: number,
  t: LayerTape,
  dx: Tensor,
  mode: GradMode,
  grads: Map<string, Tensor>,
  attnOpts: AttentionOptions,
): Tensor => {
  const { model } = tape;
  const c = model.config;
  const pre = `model.layers.${l}`;
  const lb = (p: Projection, dy: Tensor, into: Tensor | null = null) =>
    linearBackward(ops, tape, l, p, dy, t.lin.get(p)!, mode, grads, into);
  const gemma = isGemma(c);
  // d through a norm: d input, with d weight accumulated in mode "full"
  const normBack = (dy: Tensor, x: Tensor, name: string, rstd: Tensor, residual?: Tensor) =>
    normBackward(ops, mode, grads, dy, x, model, name, rstd, residual);
  const sw3 = t.sandwich;
  // x3 = x2 + [norm](down(act)): the residual passes dx through unchanged
  const dDown = sw3
    ? normBack(dx, sw3.d, `${pre}.post_feedforward_layernorm.weight`, sw3.rstdD)
    : dx;
  const dAct = lb("down_proj", dDown);
  const sw = gemma
    ? ops.gegluTanhBackward(dAct, recorded(t.gate), recorded(t.up))
    : ops.swigluBackward(dAct, recorded(t.gate), recorded(t.up));
  const dh2 = lb("up_proj", sw.dUp, lb("gate_proj", sw.dGate));
  const mlpNorm = gemma ? "pre_feedforward_layernorm" : "post_attention_layernorm";
  const dx2 = normBack(dh2, t.x2, `${pre}.${mlpNorm}.weight`, recorded(t.rstd2), dx);
  const dO = sw3 ? normBack(dx2, sw3.o, `${pre}.post_attention_layernorm.weight`, sw3.rstdO) : dx2;
  const dAtt = lb("o_proj", dO);
  const ab = ops.attentionBackward(dAtt, t.q, t.k, t.v, t.att, t.lse, attnOpts);
  const rp = ropeOf(c, tape.ropes, l);
  const unrotate = (d: Tensor, heads: number) =>
    ops.ropeBackward(
      rp.scale === 1 ? d : ops.scale(d, rp.scale),
      tape.positions,
      heads,
      c.headDim,
      rp.freqs,
    );
  let dqPre = unrotate(ab.dq, c.numHeads);
  let dkPre = unrotate(ab.dk, c.numKvHeads);
  if (t.qkNorm) {
    const names = qkNormPaths(l);
    const headNormBackward = (d: Tensor, x: Tensor, name: string, rstd: Tensor, heads: number) => {
      const rows = d.shape[0];
      const flat = [rows * heads, c.headDim];
      const dx = normBackward(
        ops,
        mode,
        grads,
        ops.reshape(d, flat),
        ops.reshape(x, flat),
        model,
        name,
        rstd,
      );
      return ops.reshape(dx, [rows, heads * c.headDim]);
    };
    dqPre = headNormBackward(dqPre, t.qkNorm.qp, names.q, t.qkNorm.rstdQ, c.numHeads);
    dkPre = headNormBackward(dkPre, t.qkNorm.kp, names.k, t.qkNorm.rstdK, c.numKvHeads);
  }
  const dh1 = lb("v_proj", ab.dv, lb("k_proj", dkPre, lb("q_proj", dqPre)));
  return normBack(dh1, t.x, `${pre}.input_layernorm.weight`, recorded(t.rstd1), dx2);
};

/**
 * Incremental forward for generation: `ids` are `cache.batch * tq` new tokens (tq per sequence)
 * appended after `cache.len`; returns logits of each sequence's last new token [batch, vocab].
 */
export const forwardCached = (
  ops: Ops,
  model: DeviceModel,
  cache: KvCache,
  ids: ArrayLike<number>,
  tq: number,
  kvStart: ArrayLike<number>,
  lora: LoraRuntime | null = null,
  opts: { readonly chunkRows?: number } = {},
): Tensor => {
  const c = model.config;
  const B = cache.batch;
  const rows = B * tq;
  ensure(ids.length === rows, "forwardCached", () => `ids ${ids.length} != ${rows}`);
  ensure(cache.len + tq <= cache.maxLen, "forwardCached", () => `cache full (${cache.maxLen})`);
  const pos = new Int32Array(rows);
  const cacheRows = new Int32Array(rows);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < tq; t++) {
      pos[b * tq + t] = Math.max(0, cache.len + t - kvStart[b]);
      cacheRows[b * tq + t] = b * cache.maxLen + cache.len + t;
    }
  }
  const cx: Ctx = { ops, model, lora, rng: null, record: false, ropes: layerRopes(c, maxOf(pos)) };
  const positions = ops.fromArray(pos, [rows], "i32");
  const kvStartT = ops.fromArray(kvStart, [B], "i32");
  const attnOpts = {
    batch: B,
    tq,
    tk: cache.maxLen,
    heads: c.numHeads,
    kvHeads: c.numKvHeads,
    headDim: c.headDim,
    qOffset: cache.len,
    kvLen: cache.len + tq,
    kvStart: kvStartT,
  };
  // the hidden state, overwritten by each layer's output
  const x = embed(ops, model, ids);
  for (let l = 0; l < c.numLayers; l++) {
    // Each layer's temporaries go back to the pool when it ends: a prefill of batch x prompt
    // rows would otherwise hold every layer's activations (O(layers)) until the step ends.
    ops.transient((t) => {
      // new keys/values go into the cache; attention reads the whole cache
      const out = decoderLayer({ ...cx, ops: t }, l, x, positions, (q, k, v) => {
        t.scatterRowsInPlace(cache.k[l], k, cacheRows);
        t.scatterRowsInPlace(cache.v[l], v, cacheRows);
        return t.attention(q, cache.k[l], cache.v[l], layerAttention(c, l, attnOpts));
      }).out;
      // encoded after every read of x (device queues and the CPU run in order), unless the
      // layer updated x in place (see addProjection)
      if (out !== x) t.setRows(x, 0, out);
    });
  }
  cache.len += tq;
  const last = Array.from({ length: B }, (_, b) => b * tq + tq - 1);
  const nf = ops.rmsNorm(
    ops.gatherRows(x, last),
    normWeight(ops, model, "model.norm.weight"),
    c.rmsNormEps,
  );
  return capLogits(ops, c, headLogits(ops, nf.y, weight(model, headName(c)), opts.chunkRows));
};

/** Names of all projections, re-exported for adapters. */
export { PROJECTIONS };
