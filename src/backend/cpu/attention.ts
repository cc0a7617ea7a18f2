/**
 * CPU backend: causal grouped-query softmax attention and its gradients. Plain loops in
 * double-precision intermediates, stored in the scope precision: the reference the WebGPU kernels
 * are tested against. Contracts: see Ops.attention / Ops.attentionBackward in ../ops.ts.
 * @module
 */
import type { AttentionOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import {
  type AttentionGeometry,
  checkAttention,
  checkAttentionBackward,
} from "../checks/attention.ts";
import type { CpuScope } from "./scope.ts";

/**
 * Visible key range [lo, hi) of query i of a sequence whose first visible key is `start` (and,
 * with a sliding window, no key `window` or more before the query).
 */
const visible = (g: AttentionGeometry, start: number, i: number): [number, number] => [
  Math.max(start, 0, g.window > 0 ? g.qOffset + i + 1 - g.window : 0),
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
          s[j] = g.softcap > 0 ? g.softcap * Math.tanh((dot * scale) / g.softcap) : dot * scale;
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
          // with soft-capping, d capped / d raw = 1 - (capped / cap)²
          const capped = g.softcap > 0
            ? g.softcap * Math.tanh((dot * scale) / g.softcap)
            : dot * scale;
          const p = Math.exp(capped - rowLse);
          const dcap = g.softcap > 0 ? 1 - (capped / g.softcap) ** 2 : 1;
          const ds = p * (dp - delta) * dcap * scale;
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
