/**
 * The tensor operations a Llama-style decoder needs for its forward and backward pass, as one
 * interface implemented by the CPU reference backend and the WebGPU backend.
 *
 * Lifetime: an `Ops` value is bound to an Effect `Scope`; every tensor it creates is released when
 * that scope closes (GPU buffers go back to the pool). Long-lived tensors (weights, optimizer state)
 * come from an `Ops` bound to a long-lived scope; per-step temporaries from a per-step scope.
 * Ops are synchronous: on WebGPU they only encode work, which is submitted in batches; `read`
 * is the only place that waits, so a training step reads back as few (small) tensors as it can.
 *
 * Size: a tensor larger than one storage block (`maxBlockElements`: on WebGPU the device's
 * largest storage-buffer binding) is stored as several row blocks. Creation, copy, reshape,
 * read, the elementwise ops, adamw, sumSquares, embedding, embeddingBackward, logProbs,
 * logProbsBackward, entropy and the row/column slices take such tensors; the other ops refuse
 * them with a ShapeError (the decoder feeds them vocabulary chunks instead, see `sliceRows`).
 *
 * 16-bit tensors (dtype bf16 / f16): a LoRA run's frozen base weights stay in their checkpoint's
 * format (`fromHalf`), half the memory of f32, with the row blocks of an f32 tensor of their
 * shape. matmul (either operand), embedding, sliceRows / setRows, copy, reshape, loraFold (as
 * w), widen and read take them and widen exactly as they read (WebGPU: in the kernels; the CPU:
 * into temporaries), so both backends compute on the very values the checkpoint holds; every
 * other op refuses them with a ShapeError. Gradients and optimizer state are always f32.
 * @module
 */
import type { Effect } from "effect";
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import type { DType, FloatArray, HalfDType, Tensor } from "./tensor.ts";

/** What a backend was doing when it failed. */
export type BackendOperation = "config" | "setup" | "sync" | "read";

const BackendErrorBase: TaggedErrorClass<"BackendError", {
  /** `config`: LORAFOLD_BACKEND; `setup`: opening the device; `sync` / `read`: device work. */
  readonly operation: BackendOperation;
  /** What went wrong, in words (the device's own message for device failures). */
  readonly reason: string;
}> = taggedError(
  "BackendError",
  (e) => {
    return e.operation === "sync"
      ? `device sync failed: ${e.reason}`
      : e.operation === "read"
      ? `device readback failed: ${e.reason}`
      : e.reason;
  },
);
/** Backend setup or device failure (no adapter, device lost, readback failure, out of memory). */
export class BackendError extends BackendErrorBase {}

/**
 * Rotary frequencies: a base theta (inv_freq_i = theta^(-2i/d) in f32, as HF computes it) or an
 * f32 table of the headDim/2 inverse frequencies.
 */
export type RopeFrequencies = number | Float32Array;

/** Matmul transpose flags: `transA` means `a` is stored as [K, M]; `transB` means `b` is [N, K]. */
export interface MatmulOptions {
  readonly transA?: boolean;
  readonly transB?: boolean;
}

/** One half of Ops.projectSwiglu: a weight w [N,K] and, when adapted, its LoRA pair. */
export interface SwigluPart {
  readonly w: Tensor;
  /** a [R,K] and b [N,R], or null for the bare weight. */
  readonly lora: { readonly a: Tensor; readonly b: Tensor } | null;
}

/**
 * An RMSNorm applied to a projection's input first (Ops.projectLoraShared, Ops.projectSwiglu):
 * x·rstd·w with rstd = 1/sqrt(mean(x²) + eps) per row, as Ops.rmsNorm's y, w f32 [K]. Where the
 * backend can, the products normalise their rows as they read them and the normed input is
 * never stored (an inference pass has no use for it).
 */
export interface RmsNormFold {
  readonly w: Tensor;
  readonly eps: number;
}

/**
 * A rotary embedding applied to a projection's output (Ops.projectLoraShared): the part's
 * result is Ops.rope(y, positions, heads, headDim, theta) of its projection y. Where the backend
 * can, the product rotates its tiles as it stores them and the unrotated y is never stored.
 */
export interface RopeFold {
  /** i32 [M], one position per row of the input. */
  readonly positions: Tensor;
  readonly heads: number;
  readonly headDim: number;
  readonly theta: RopeFrequencies;
}

/** One projection of Ops.projectLoraShared: the weight w [N,K] and its LoRA pair a [R,K], b [N,R]. */
export interface LoraProjection {
  readonly w: Tensor;
  readonly a: Tensor;
  readonly b: Tensor;
  /**
   * An f32 [M, N] tensor to add the result onto in place (then returned), as a residual
   * stream takes an output projection; by default a fresh tensor.
   */
  readonly into?: Tensor;
  /** The output rotated (q and k before attention); not with `into`. */
  readonly rope?: RopeFold;
}

/** Geometry of an attention call. Rows of q are `batch * tq`, rows of k/v are `batch * tk`. */
export interface AttentionOptions {
  readonly batch: number;
  /** Query positions per sequence. */
  readonly tq: number;
  /** Key/value positions per sequence (rows per sequence in k and v). */
  readonly tk: number;
  readonly heads: number;
  /** Key/value heads; `heads` must be a multiple (grouped-query attention). */
  readonly kvHeads: number;
  readonly headDim: number;
  /**
   * Absolute position of query row 0 within the key sequence (KV-cache decoding: tk - tq).
   * Query i attends keys j <= qOffset + i (causal). Default 0.
   */
  readonly qOffset?: number;
  /**
   * Number of valid key rows per sequence (<= tk); keys at or beyond it are masked. Lets a KV cache
   * be allocated at full length and filled as decoding goes. Default tk.
   */
  readonly kvLen?: number;
  /** Optional i32 [batch]: keys before kvStart[b] are masked (left padding). Default 0. */
  readonly kvStart?: Tensor;
  /**
   * Sliding window (HF's sliding mask): query i also masks keys j <= qOffset + i - window, so
   * it sees at most `window` keys, itself included. Default: no window.
   */
  readonly window?: number;
  /** Score scale (Gemma: query_pre_attn_scalar^-0.5). Default 1/sqrt(headDim). */
  readonly scale?: number;
  /**
   * Attention logit soft-capping (Gemma 2): each scaled score s becomes cap · tanh(s / cap)
   * before the mask and softmax. Default: none.
   */
  readonly softcap?: number;
}

/** AdamW hyper-parameters for one update; `step` is 1-based (bias correction). */
export interface AdamWOptions {
  readonly lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  readonly step: number;
  /** Gradient multiplier applied before the update (gradient clipping / accumulation). Default 1. */
  readonly gradScale?: number;
}

/** Static facts about a backend, logged once when it is chosen. */
export interface BackendInfo {
  readonly name: "cpu" | "webgpu";
  /** Adapter or CPU description, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)". */
  readonly description: string;
  /** True for a software adapter such as llvmpipe. */
  readonly fallback: boolean;
}

/** Tensor operations bound to one scope. All shapes are row-major. */
export interface Ops {
  readonly info: BackendInfo;

  // ---- creation, views, transfer -------------------------------------------------------------
  /** Fresh tensor holding `data` (converted to `dtype`, default f32; bf16/f16 round to nearest even). */
  fromArray(data: ArrayLike<number>, shape: readonly number[], dtype?: DType): Tensor;
  /**
   * Fresh 16-bit tensor holding raw bf16 / f16 `bits` as they are (a frozen base weight in its
   * checkpoint's format: half the memory of f32). Only the ops that read base weights take it:
   * matmul, embedding, sliceRows / setRows, copy, reshape, loraFold (as w), widen and read.
   */
  fromHalf(bits: Uint16Array, shape: readonly number[], dtype: HalfDType): Tensor;
  /** Fresh f32 copy of a float tensor; a 16-bit one widened exactly. */
  widen(t: Tensor): Tensor;
  /** Fresh tensor of zeros. */
  zeros(shape: readonly number[], dtype?: DType): Tensor;
  /** Fresh copy (owned by this scope) of any tensor of this backend. */
  copy(t: Tensor): Tensor;
  /** View with another shape of the same size; shares storage, owned by the source's scope. */
  reshape(t: Tensor, shape: readonly number[]): Tensor;
  /** Host copies of f32 tensors (16-bit ones widened), fetched with a single wait. */
  read(ts: readonly Tensor[]): Effect.Effect<FloatArray[], BackendError>;
  /** Host copies of i32 tensors, fetched with a single wait. */
  readInt(ts: readonly Tensor[]): Effect.Effect<Int32Array[], BackendError>;
  /** Submits pending work without waiting (lets the device run while the host prepares more). */
  flush(): void;
  /**
   * Runs `f` with Ops of a child scope that closes when `f` returns or throws: every tensor `f`
   * creates through them is released then (a loop over chunks holds one chunk's temporaries at a
   * time). What must outlive `f` is written in place into, or created by, an enclosing scope's
   * Ops; a returned tensor of the child is already released.
   */
  transient<A>(f: (ops: Ops) => A): A;

  // ---- storage blocks and slices -------------------------------------------------------------
  /** Most elements one storage block holds (WebGPU: max storage binding / 4; CPU: unbounded). */
  maxBlockElements(): number;
  /** Row boundaries of t's storage blocks, t seen as a matrix [R, C]: [0, ..., R]. */
  rowBlocks(t: Tensor): number[];
  /**
   * Rows [start, start + count) of t as a matrix [R, C] -> [count, C]. A view when the range is
   * one whole storage block (CPU: always), else a fresh copy: treat it as read-only.
   */
  sliceRows(t: Tensor, start: number, count: number): Tensor;
  /** In place: rows [start, start + src rows) of dst [R, C] = src [n, C]. */
  setRows(dst: Tensor, start: number, src: Tensor): void;
  /** Columns [start, start + count) of t [R, C] -> a fresh [R, count]. */
  sliceColumns(t: Tensor, start: number, count: number): Tensor;
  /** In place: columns [start, start + n) of dst [R, C] = src [R, n]. */
  setColumns(dst: Tensor, start: number, src: Tensor): void;

  // ---- matmul --------------------------------------------------------------------------------
  /**
   * C[M,N] = op(A)·op(B); see MatmulOptions. X·Wᵀ is `{transB:true}`, dYᵀ·X is `{transA:true}`.
   * Either operand may be 16-bit (a frozen base weight), widened exactly as it is read.
   */
  matmul(a: Tensor, b: Tensor, opts?: MatmulOptions): Tensor;
  /**
   * c += s·op(A)·op(B) in place, c an f32 [M, N] (see matmul): the product is added where it
   * lands, without a temporary or a separate add (a LoRA delta onto the base projection).
   */
  matmulAccumulate(c: Tensor, a: Tensor, b: Tensor, s: number, opts?: MatmulOptions): void;
  /**
   * x·Wᵀ + s·xa·Bᵀ (x [M,K], w [N,K], xa [M,R], b [N,R]): a projection and its LoRA delta as
   * one product where the backend can (the delta's rank-long inner loop continues the base
   * one's in the same registers), else matmul then matmulAccumulate. With `into` (f32 [M,N],
   * not an input) the result is added onto it in place and `into` returned: a training
   * forward's residual stream takes its output projection with no add pass.
   */
  projectLora(x: Tensor, w: Tensor, xa: Tensor, b: Tensor, s: number, into?: Tensor): Tensor;
  /**
   * Projections of one input (q/k/v, gate/up) with their LoRA deltas, no backward:
   * y_i = x·w_iᵀ + s·(x·a_iᵀ)·b_iᵀ (x [M,K], w_i [N_i,K], a_i [R_i,K], b_i [N_i,R_i]). Where the
   * backend can, every x·a_iᵀ comes from one product and each delta joins its projection.
   * With `norm`, x is rmsNorm(x, norm.w, norm.eps).y (see RmsNormFold).
   */
  projectLoraShared(
    x: Tensor,
    parts: readonly LoraProjection[],
    s: number,
    norm?: RmsNormFold,
  ): Tensor[];
  /**
   * An inference MLP's input: swiglu(x·gateᵀ, x·upᵀ), each projection with its LoRA delta
   * (scale s) when it has one, no backward. Where the backend can, one product computes both
   * halves and stores only the activation (no gate or up tensor). With `norm`, x is
   * rmsNorm(x, norm.w, norm.eps).y (see RmsNormFold).
   */
  projectSwiglu(
    x: Tensor,
    gate: SwigluPart,
    up: SwigluPart,
    s: number,
    norm?: RmsNormFold,
  ): Tensor;
  /**
   * x·w[start, start + count)ᵀ: the product with a row range of w (x [M,K], w [R,K]), as
   * matmul(x, sliceRows(w, start, count), {transB: true}) where the backend can read the rows
   * in place (a vocabulary chunk of the LM head, without copying it).
   */
  projectRows(x: Tensor, w: Tensor, start: number, count: number): Tensor;
  /**
   * c += s·x·w[start, start + count): accumulates the product with a row range of w (c [M,N],
   * x [M,count], w [R,N]), as matmulAccumulate(c, x, sliceRows(w, start, count), s) where the
   * backend can read the rows in place (the LM head's backward pass, chunk by chunk).
   */
  accumulateRows(c: Tensor, x: Tensor, w: Tensor, start: number, count: number, s: number): void;

  // ---- elementwise and reductions (f32) ------------------------------------------------------
  /** a + b, same shape. */
  add(a: Tensor, b: Tensor): Tensor;
  /** a - b, same shape. */
  sub(a: Tensor, b: Tensor): Tensor;
  /** a * b elementwise, same shape. */
  mul(a: Tensor, b: Tensor): Tensor;
  /** s * a. */
  scale(a: Tensor, s: number): Tensor;
  /** a + s * b, same shape. */
  addScaled(a: Tensor, b: Tensor, s: number): Tensor;
  /** In place: dst += s * src (gradient accumulation). */
  addScaledInPlace(dst: Tensor, src: Tensor, s: number): void;
  /** a[R,C] + row[C] broadcast over rows (bias add). */
  addRow(a: Tensor, row: Tensor): Tensor;
  /** Column sums of a[R,C] -> [C] (bias gradient). */
  sumRows(a: Tensor): Tensor;
  /** Sum of squares of all elements -> [1] (gradient norms; read back with `read`). */
  sumSquares(a: Tensor): Tensor;
  /** Sum of squares of each tensor -> [ts.length] (a gradient norm over many matrices at once). */
  sumSquaresEach(ts: readonly Tensor[]): Tensor;
  /** Rows of src[R,C] picked by host indices -> [rows.length, C]. */
  gatherRows(src: Tensor, rows: ArrayLike<number>): Tensor;
  /** In place: dst[rows[i], :] = src[i, :] (KV-cache writes). */
  scatterRowsInPlace(dst: Tensor, src: Tensor, rows: ArrayLike<number>): void;

  // ---- decoder layers ------------------------------------------------------------------------
  /** RMSNorm over the last dim: y = x / sqrt(mean(x²) + eps) * w. Also returns rstd [R]. */
  rmsNorm(x: Tensor, w: Tensor, eps: number): { y: Tensor; rstd: Tensor };
  /** Gradients of rmsNorm: dx [R,H] and dw [H]. */
  rmsNormBackward(dy: Tensor, x: Tensor, w: Tensor, rstd: Tensor): { dx: Tensor; dw: Tensor };
  /**
   * dx of rmsNormBackward alone (a frozen norm weight needs no dw); plus `residual` (the
   * gradient the residual stream carries past the norm, same shape) when given, in the same
   * pass where the backend can.
   */
  rmsNormBackwardInput(dy: Tensor, x: Tensor, w: Tensor, rstd: Tensor, residual?: Tensor): Tensor;
  /**
   * Rotary embedding (Hugging Face "rotate_half" layout) on x [R, heads*headDim] with i32
   * positions [R]: for i < d/2, (x_i, x_{i+d/2}) rotated by pos * inv_freq_i, where inv_freq_i =
   * theta^(-2i/d) for a number `theta`, or `theta[i]` for an inverse-frequency table (the scaled
   * RoPE variants compute theirs on the host, see src/model/rope.ts).
   */
  rope(
    x: Tensor,
    positions: Tensor,
    heads: number,
    headDim: number,
    theta: RopeFrequencies,
  ): Tensor;
  /** Gradient of rope (rotation by the opposite angle). */
  ropeBackward(
    dy: Tensor,
    positions: Tensor,
    heads: number,
    headDim: number,
    theta: RopeFrequencies,
  ): Tensor;
  /**
   * Causal softmax attention with grouped-query heads, scale 1/sqrt(headDim).
   * q [batch*tq, heads*headDim], k and v [batch*tk, kvHeads*headDim] -> out like q, and the
   * log-sum-exp of the scaled scores, lse [batch*tq, heads] (kept for the backward pass).
   * A query row with no visible key gets out = 0 and lse = 0.
   */
  attention(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions): { out: Tensor; lse: Tensor };
  /** Gradients of attention given dOut and the forward's out and lse. */
  attentionBackward(
    dOut: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    opts: AttentionOptions,
  ): { dq: Tensor; dk: Tensor; dv: Tensor };
  /** SiLU-gated MLP activation: silu(gate) * up. */
  swiglu(gate: Tensor, up: Tensor): Tensor;
  /** Gradients of swiglu. */
  swigluBackward(dh: Tensor, gate: Tensor, up: Tensor): { dGate: Tensor; dUp: Tensor };
  /**
   * GeLU-tanh gated MLP activation (Gemma, HF's gelu_pytorch_tanh): gelu_tanh(gate) * up with
   * gelu_tanh(g) = g/2 · (1 + tanh(sqrt(2/π) (g + 0.044715 g³))).
   */
  gegluTanh(gate: Tensor, up: Tensor): Tensor;
  /** Gradients of gegluTanh. */
  gegluTanhBackward(dh: Tensor, gate: Tensor, up: Tensor): { dGate: Tensor; dUp: Tensor };
  /** Soft-capping (Gemma's final logits): cap · tanh(x / cap); x may be stored in row blocks. */
  softcap(x: Tensor, cap: number): Tensor;
  /** Gradient of softcap from its output y: dy · (1 − (y / cap)²). */
  softcapBackward(dy: Tensor, y: Tensor, cap: number): Tensor;
  /** Embedding gather: table[V,H] (f32 or 16-bit), ids i32 [N] -> f32 [N,H]. */
  embedding(table: Tensor, ids: Tensor): Tensor;
  /**
   * Embedding gradient: scatter-add of dy[N,H] into a fresh [vocab,H] by the host ids (the ids are
   * known on the host, which makes the reduction deterministic and free of float atomics).
   */
  embeddingBackward(dy: Tensor, ids: ArrayLike<number>, vocab: number): Tensor;
  /**
   * Token log-probs at a temperature: logp[i] = log_softmax(logits[i]/T)[targets[i]] for logits
   * [N,V] and i32 targets [N]; also returns lse [N] = logsumexp(logits[i]/T).
   */
  logProbs(logits: Tensor, targets: Tensor, temperature: number): { logp: Tensor; lse: Tensor };
  /**
   * d logits [N,V] from d logp [N]: (onehot(target) - softmax(logits/T)) * dlogp / T. With
   * `targetOffset`, `logits` are the vocabulary columns [targetOffset, targetOffset + V) of
   * wider rows whose `lse` is given (a vocabulary chunk): a target outside them adds no one-hot.
   */
  logProbsBackward(
    dlogp: Tensor,
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    temperature: number,
    targetOffset?: number,
  ): Tensor;
  /** Per-row entropy [N] of softmax(logits/T). */
  entropy(logits: Tensor, temperature: number): Tensor;
  /**
   * One step of a log-softmax streamed over vocabulary chunks: folds `logits` [N, Vc], the
   * vocabulary columns [offset, offset + Vc) of each row, into the running state `acc` [N, 4]
   * (null before the first chunk) and returns the new state (a fresh tensor). With z = logit/T,
   * a row's state is (m, s, u, zt): m = max z so far, s = Σ exp(z − m), u = Σ exp(z − m)(z − m)
   * and zt = z of the row's target (NaN until its chunk is seen). Chunks may come in any order.
   */
  logSoftmaxChunk(
    acc: Tensor | null,
    logits: Tensor,
    targets: Tensor,
    offset: number,
    temperature: number,
  ): Tensor;
  /**
   * logSoftmaxChunk(acc, projectRows(x, w, start, count), targets, start, temperature): an LM
   * head's vocabulary chunk folded into the streamed state. Where the backend can, the product
   * reduces its tiles to partial states as it stores and the [N, count] logits are never written.
   */
  projectLogSoftmaxChunk(
    acc: Tensor | null,
    x: Tensor,
    w: Tensor,
    start: number,
    count: number,
    targets: Tensor,
    temperature: number,
  ): Tensor;
  /**
   * Results of a streamed log-softmax state [N, 4] (see logSoftmaxChunk): logp = zt − lse,
   * lse = m + log s (of logits/T, as logProbs returns) and entropy = log s − u / s.
   */
  logSoftmaxFinish(acc: Tensor): { logp: Tensor; lse: Tensor; entropy: Tensor };

  /**
   * Sampling candidates of each row of logits [N, V] (which may be stored in row blocks), so that
   * a decode step reads back O(N) values instead of [N, V]: a fresh f32 [N, 4 + 2·count] whose
   * row i is (m, s1, sT, n, values[count], ids[count]) with m = max of the row, s1 = Σ exp(x − m),
   * sT = Σ exp((x − m) / T_i) (T_i = temperatures[i]; T_i <= 0 counts as 1), n = min(count, V)
   * and the n largest logits (value descending, ties by lower id) with their ids (as floats,
   * exact below 2^24); unused slots hold value -Infinity and id -1. `count` is in [1, 64].
   * The host finishes sampling from it (src/model/sampling.ts `sampleFromCandidates`).
   */
  sampleCandidates(logits: Tensor, temperatures: ArrayLike<number>, count: number): Tensor;

  // ---- optimizer and LoRA --------------------------------------------------------------------
  /** In place AdamW (decoupled weight decay) on param, m, v with gradient g. */
  adamw(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, opts: AdamWOptions): void;
  /**
   * Out-of-place LoRA fold: a FRESH f32 tensor W + s·B·A for W [out,in] (f32 or 16-bit, widened),
   * B [out,r], A [r,in].
   * Never writes to W: the heart of the alias-free snapshot.
   */
  loraFold(w: Tensor, b: Tensor, a: Tensor, s: number): Tensor;
}
