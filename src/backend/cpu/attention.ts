/**
 * CPU backend: causal grouped-query softmax attention and its gradients. Plain loops in
 * double-precision intermediates, stored in the scope precision: the reference the WebGPU kernels
 * are tested against. Contracts: see Ops.attention / Ops.attentionBackward in ../ops.ts.
 * @module
 */
import type { AttentionOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import { ensure, expectShape } from "../tensor.ts";
import type { CpuScope } from "./scope.ts";

/** Attention geometry with every default resolved (shared with the WebGPU backend). */
export interface AttentionGeometry {
  readonly batch: number;
  readonly tq: number;
  readonly tk: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  /** Query heads per kv head (heads / kvHeads). */
  readonly group: number;
  readonly qOffset: number;
  readonly kvLen: number;
  /** 1 / sqrt(headDim). */
  readonly scale: number;
}

const isCount = (n: number, min: number): boolean => Number.isInteger(n) && n >= min;

/**
 * Validates attention options and the shapes of q, k, v (and kvStart); throws ShapeError on any
 * inconsistency. Returns the geometry with defaults applied.
 */
export const checkAttention = (
  op: string,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  opts: AttentionOptions,
): AttentionGeometry => {
  const { batch, tq, tk, heads, kvHeads, headDim } = opts;
  ensure(
    isCount(batch, 1) && isCount(tq, 1) && isCount(tk, 1) && isCount(heads, 1) &&
      isCount(kvHeads, 1) && isCount(headDim, 1),
    op,
    () =>
      `batch ${batch}, tq ${tq}, tk ${tk}, heads ${heads}, kvHeads ${kvHeads}, headDim ${headDim} ` +
      `must be positive integers`,
  );
  ensure(
    heads % kvHeads === 0,
    op,
    () => `heads ${heads} is not a multiple of kvHeads ${kvHeads}`,
  );
  const qOffset = opts.qOffset ?? 0;
  const kvLen = opts.kvLen ?? tk;
  ensure(
    isCount(qOffset, 0) && qOffset + tq <= tk,
    op,
    () =>
      `qOffset ${qOffset} must be a non-negative integer with qOffset + tq (${tq}) <= tk (${tk})`,
  );
  ensure(isCount(kvLen, 0) && kvLen <= tk, op, () => `kvLen ${kvLen} must be in [0, tk=${tk}]`);
  for (const t of [q, k, v]) {
    ensure(t.dtype === "f32", op, () => `q, k, v must be f32, got ${t.dtype}`);
  }
  expectShape(op, "q", q, [batch * tq, heads * headDim]);
  expectShape(op, "k", k, [batch * tk, kvHeads * headDim]);
  expectShape(op, "v", v, [batch * tk, kvHeads * headDim]);
  if (opts.kvStart !== undefined) {
    expectShape(op, "kvStart", opts.kvStart, [batch]);
    ensure(
      opts.kvStart.dtype === "i32",
      op,
      () => `kvStart must be i32, got ${opts.kvStart!.dtype}`,
    );
  }
  return {
    batch,
    tq,
    tk,
    heads,
    kvHeads,
    headDim,
    group: heads / kvHeads,
    qOffset,
    kvLen,
    scale: 1 / Math.sqrt(headDim),
  };
};

/** Validates the extra tensors of the backward pass (dOut, out like q; lse [rows, heads]). */
export const checkAttentionBackward = (
  op: string,
  g: AttentionGeometry,
  dOut: Tensor,
  out: Tensor,
  lse: Tensor,
): void => {
  for (const t of [dOut, out, lse]) {
    ensure(t.dtype === "f32", op, () => `dOut, out, lse must be f32, got ${t.dtype}`);
  }
  expectShape(op, "dOut", dOut, [g.batch * g.tq, g.heads * g.headDim]);
  expectShape(op, "out", out, [g.batch * g.tq, g.heads * g.headDim]);
  expectShape(op, "lse", lse, [g.batch * g.tq, g.heads]);
};

/** Visible key range [lo, hi) of query i of a sequence whose first visible key is `start`. */
const visible = (g: AttentionGeometry, start: number, i: number): [number, number] => [
  Math.max(start, 0),
  Math.min(g.qOffset + i + 1, g.kvLen),
];

/** See Ops.attention. */
export function attention(
  sc: CpuScope,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  opts: AttentionOptions,
): { out: Tensor; lse: Tensor } {
  const op = "attention";
  const g = checkAttention(op, q, k, v, opts);
  const Q = sc.f(q, op);
  const K = sc.f(k, op);
  const V = sc.f(v, op);
  const starts = opts.kvStart ? sc.i(opts.kvStart, op) : null;
  const { batch, tq, tk, heads, kvHeads, headDim: hd, group, scale } = g;
  const out = sc.floats(batch * tq * heads * hd);
  const lse = sc.floats(batch * tq * heads);
  const s = new Float64Array(tk);
  const acc = new Float64Array(hd);
  for (let b = 0; b < batch; b++) {
    for (let i = 0; i < tq; i++) {
      const row = b * tq + i;
      const [lo, hi] = visible(g, starts ? starts[b] : 0, i);
      if (lo >= hi) continue; // no visible key: out = 0, lse = 0
      for (let h = 0; h < heads; h++) {
        const qo = (row * heads + h) * hd;
        const kvh = Math.floor(h / group);
        let m = -Infinity;
        for (let j = lo; j < hi; j++) {
          const ko = ((b * tk + j) * kvHeads + kvh) * hd;
          let dot = 0;
          for (let d = 0; d < hd; d++) dot += Q[qo + d] * K[ko + d];
          s[j] = dot * scale;
          m = Math.max(m, s[j]);
        }
        let sum = 0;
        acc.fill(0);
        for (let j = lo; j < hi; j++) {
          const p = Math.exp(s[j] - m);
          sum += p;
          const vo = ((b * tk + j) * kvHeads + kvh) * hd;
          for (let d = 0; d < hd; d++) acc[d] += p * V[vo + d];
        }
        for (let d = 0; d < hd; d++) out[qo + d] = acc[d] / sum;
        lse[row * heads + h] = m + Math.log(sum);
      }
    }
  }
  return {
    out: sc.wrap([batch * tq, heads * hd], out),
    lse: sc.wrap([batch * tq, heads], lse),
  };
}

/** See Ops.attentionBackward. */
export function attentionBackward(
  sc: CpuScope,
  dOut: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  out: Tensor,
  lse: Tensor,
  opts: AttentionOptions,
): { dq: Tensor; dk: Tensor; dv: Tensor } {
  const op = "attentionBackward";
  const g = checkAttention(op, q, k, v, opts);
  checkAttentionBackward(op, g, dOut, out, lse);
  const dO = sc.f(dOut, op);
  const Q = sc.f(q, op);
  const K = sc.f(k, op);
  const V = sc.f(v, op);
  const O = sc.f(out, op);
  const L = sc.f(lse, op);
  const starts = opts.kvStart ? sc.i(opts.kvStart, op) : null;
  const { batch, tq, tk, heads, kvHeads, headDim: hd, group, scale } = g;
  // Accumulate in float64 whatever the scope precision, then store.
  const dq = new Float64Array(batch * tq * heads * hd);
  const dk = new Float64Array(batch * tk * kvHeads * hd);
  const dv = new Float64Array(batch * tk * kvHeads * hd);
  for (let b = 0; b < batch; b++) {
    for (let i = 0; i < tq; i++) {
      const row = b * tq + i;
      const [lo, hi] = visible(g, starts ? starts[b] : 0, i);
      for (let h = 0; h < heads; h++) {
        const qo = (row * heads + h) * hd;
        const kvh = Math.floor(h / group);
        const rowLse = L[row * heads + h];
        // D_i = dOut_i · out_i (the softmax Jacobian's row term).
        let delta = 0;
        for (let d = 0; d < hd; d++) delta += dO[qo + d] * O[qo + d];
        for (let j = lo; j < hi; j++) {
          const ko = ((b * tk + j) * kvHeads + kvh) * hd;
          let dot = 0;
          let dp = 0;
          for (let d = 0; d < hd; d++) {
            dot += Q[qo + d] * K[ko + d];
            dp += dO[qo + d] * V[ko + d];
          }
          const p = Math.exp(dot * scale - rowLse);
          const ds = p * (dp - delta) * scale;
          for (let d = 0; d < hd; d++) {
            dv[ko + d] += p * dO[qo + d];
            dq[qo + d] += ds * K[ko + d];
            dk[ko + d] += ds * Q[qo + d];
          }
        }
      }
    }
  }
  const store = (x: Float64Array, shape: number[]): Tensor => {
    const t = sc.floats(x.length);
    t.set(x);
    return sc.wrap(shape, t);
  };
  return {
    dq: store(dq, [batch * tq, heads * hd]),
    dk: store(dk, [batch * tk, kvHeads * hd]),
    dv: store(dv, [batch * tk, kvHeads * hd]),
  };
}
