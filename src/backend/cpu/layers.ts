/**
 * CPU backend: decoder layer ops (RMSNorm, rotary embedding, token embedding, log-probs,
 * entropy). Plain loops in double-precision intermediates, stored in the scope precision: the
 * reference the WebGPU kernels are tested against. Contracts: see Ops in ../ops.ts.
 * @module
 */
import type { RopeFrequencies } from "../ops.ts";
import type { FloatArray, HalfDType, Tensor } from "../tensor.ts";
import { isHalfDType } from "../tensor.ts";
import {
  checkEmbedding,
  checkEmbeddingBackward,
  checkEntropy,
  checkIds,
  checkLogProbs,
  checkLogProbsBackward,
  checkLogSoftmaxChunk,
  checkLogSoftmaxFinish,
  checkRmsNorm,
  checkRmsNormBackward,
  checkRope,
  checkSampleCandidates,
} from "../checks/layers.ts";
import { addScaledInPlace } from "./elementwise.ts";
import type { CpuScope } from "./scope.ts";

/**
 * Rotary inverse frequencies as Hugging Face computes them in fp32:
 * inv_freq_i = 1 / theta^(2i/d) rounded to f32, for i < d/2. Shared with the WebGPU backend,
 * which uploads this table so both backends rotate by exactly the same angles.
 */
export const ropeInvFreq = (headDim: number, theta: number): Float32Array => {
  const half = headDim / 2;
  const out = new Float32Array(half);
  for (let i = 0; i < half; i++) {
    out[i] = 1 / Math.fround(Math.pow(theta, Math.fround((2 * i) / headDim)));
  }
  return out;
};

/** Rotary angle of pair i at a position: the fp32 product pos * inv_freq_i (as HF computes it). */
export const ropeAngle = (pos: number, invFreq: number): number =>
  Math.fround(Math.fround(pos) * invFreq);

/** See Ops.rmsNorm. */
export function rmsNorm(
  sc: CpuScope,
  x: Tensor,
  w: Tensor,
  eps: number,
): { y: Tensor; rstd: Tensor } {
  const op = "rmsNorm";
  const xs = sc.f(x, op);
  const ws = sc.f(w, op);
  const [r, h] = checkRmsNorm(op, x, w, eps);
  const y = sc.floats(r * h);
  const rstd = sc.floats(r);
  for (let i = 0; i < r; i++) {
    let ss = 0;
    for (let j = 0; j < h; j++) ss += xs[i * h + j] * xs[i * h + j];
    const s = 1 / Math.sqrt(ss / h + eps);
    rstd[i] = s;
    for (let j = 0; j < h; j++) y[i * h + j] = xs[i * h + j] * s * ws[j];
  }
  return { y: sc.wrap(x.shape, y), rstd: sc.wrap([r], rstd) };
}

/**
 * See Ops.rmsNormBackward. With s = rstd and y = x·s·w:
 * dx_j = s·w_j·dy_j − s³/H · x_j · Σ_k dy_k·w_k·x_k, and dw_j = Σ_rows dy_j·x_j·s.
 */
export function rmsNormBackward(
  sc: CpuScope,
  dy: Tensor,
  x: Tensor,
  w: Tensor,
  rstd: Tensor,
): { dx: Tensor; dw: Tensor } {
  const op = "rmsNormBackward";
  const dys = sc.f(dy, op);
  const xs = sc.f(x, op);
  const ws = sc.f(w, op);
  const ss = sc.f(rstd, op);
  const [r, h] = checkRmsNormBackward(op, dy, x, w, rstd);
  const dx = sc.floats(r * h);
  const dw = new Float64Array(h);
  for (let i = 0; i < r; i++) {
    const s = ss[i];
    let dot = 0;
    for (let j = 0; j < h; j++) dot += dys[i * h + j] * ws[j] * xs[i * h + j];
    const c = (s * s * s * dot) / h;
    for (let j = 0; j < h; j++) {
      dx[i * h + j] = s * ws[j] * dys[i * h + j] - c * xs[i * h + j];
      dw[j] += dys[i * h + j] * xs[i * h + j] * s;
    }
  }
  const dwOut = sc.floats(h);
  dwOut.set(dw);
  return { dx: sc.wrap(x.shape, dx), dw: sc.wrap([h], dwOut) };
}

/**
 * See Ops.rmsNormBackwardInput: dx of rmsNormBackward (the reference computes both), then
 * residual + dx.
 */
export function rmsNormBackwardInput(
  sc: CpuScope,
  dy: Tensor,
  x: Tensor,
  w: Tensor,
  rstd: Tensor,
  residual?: Tensor,
): Tensor {
  const op = "rmsNormBackwardInput";
  checkRmsNormBackward(op, dy, x, w, rstd, residual);
  const dx = rmsNormBackward(sc, dy, x, w, rstd).dx;
  if (residual) addScaledInPlace(sc, dx, residual, 1);
  return dx;
}

/** Rotates every (i, i + d/2) pair of every head by `sign` times its angle. */
const rotate = (
  src: FloatArray,
  dst: FloatArray,
  pos: Int32Array,
  heads: number,
  headDim: number,
  theta: RopeFrequencies,
  sign: number,
): void => {
  const half = headDim / 2;
  const invFreq = typeof theta === "number" ? ropeInvFreq(headDim, theta) : theta;
  const cols = heads * headDim;
  for (let r = 0; r < pos.length; r++) {
    for (let i = 0; i < half; i++) {
      const a = ropeAngle(pos[r], invFreq[i]);
      const c = Math.cos(a);
      const s = sign * Math.sin(a);
      for (let hd = 0; hd < heads; hd++) {
        const lo = r * cols + hd * headDim + i;
        const x1 = src[lo];
        const x2 = src[lo + half];
        dst[lo] = x1 * c - x2 * s;
        dst[lo + half] = x2 * c + x1 * s;
      }
    }
  }
};

/** See Ops.rope. */
export function rope(
  sc: CpuScope,
  x: Tensor,
  positions: Tensor,
  heads: number,
  headDim: number,
  theta: RopeFrequencies,
): Tensor {
  const op = "rope";
  const xs = sc.f(x, op);
  const ps = sc.i(positions, op);
  checkRope(op, x, positions, heads, headDim, theta);
  const out = sc.floats(x.size);
  rotate(xs, out, ps, heads, headDim, theta, 1);
  return sc.wrap(x.shape, out);
}

/** See Ops.ropeBackward: the transpose of a rotation is the rotation by the opposite angle. */
export function ropeBackward(
  sc: CpuScope,
  dy: Tensor,
  positions: Tensor,
  heads: number,
  headDim: number,
  theta: RopeFrequencies,
): Tensor {
  const op = "ropeBackward";
  const ds = sc.f(dy, op);
  const ps = sc.i(positions, op);
  checkRope(op, dy, positions, heads, headDim, theta);
  const out = sc.floats(dy.size);
  rotate(ds, out, ps, heads, headDim, theta, -1);
  return sc.wrap(dy.shape, out);
}

/** See Ops.embedding. Ids outside [0, V) raise ShapeError. */
export function embedding(sc: CpuScope, table: Tensor, ids: Tensor): Tensor {
  const op = "embedding";
  const t = sc.any(table, op);
  const is = sc.i(ids, op);
  const [, v, h] = checkEmbedding(op, table, ids);
  checkIds(op, is, v);
  const out = sc.floats(is.length * h);
  // a 16-bit table: only the gathered rows are widened
  const row = isHalfDType(t.dtype)
    ? (id: number) =>
      sc.widen((t.data as Uint16Array).subarray(id * h, (id + 1) * h), t.dtype as HalfDType)
    : (id: number) => sc.f(t, op).subarray(id * h, (id + 1) * h);
  for (let i = 0; i < is.length; i++) out.set(row(is[i]), i * h);
  return sc.wrap([is.length, h], out);
}

/** See Ops.embeddingBackward: rows added in order of the ids (deterministic). */
export function embeddingBackward(
  sc: CpuScope,
  dy: Tensor,
  ids: ArrayLike<number>,
  vocab: number,
): Tensor {
  const op = "embeddingBackward";
  const ds = sc.f(dy, op);
  const [n, h] = checkEmbeddingBackward(op, dy, ids, vocab);
  const out = sc.floats(vocab * h);
  for (let i = 0; i < n; i++) {
    const base = ids[i] * h;
    for (let j = 0; j < h; j++) out[base + j] += ds[i * h + j];
  }
  return sc.wrap([vocab, h], out);
}

/** Max m of row/T and log Σ_j exp(row_j/T − m) of one row (lse = m + that), stable. */
const rowLse = (xs: FloatArray, off: number, v: number, t: number): [number, number] => {
  let m = -Infinity;
  for (let j = 0; j < v; j++) m = Math.max(m, xs[off + j] / t);
  if (m === -Infinity) return [m, 0];
  let s = 0;
  for (let j = 0; j < v; j++) s += Math.exp(xs[off + j] / t - m);
  return [m, Math.log(s)];
};

/** See Ops.logProbs. Targets outside [0, V) raise ShapeError. */
export function logProbs(
  sc: CpuScope,
  logits: Tensor,
  targets: Tensor,
  temperature: number,
): { logp: Tensor; lse: Tensor } {
  const op = "logProbs";
  const xs = sc.f(logits, op);
  const ts = sc.i(targets, op);
  const [n, v] = checkLogProbs(op, logits, targets, temperature);
  checkIds(op, ts, v);
  const logp = sc.floats(n);
  const lse = sc.floats(n);
  for (let i = 0; i < n; i++) {
    const [m, ls] = rowLse(xs, i * v, v, temperature);
    lse[i] = m + ls;
    logp[i] = (xs[i * v + ts[i]] / temperature - m) - ls;
  }
  return { logp: sc.wrap([n], logp), lse: sc.wrap([n], lse) };
}

/** See Ops.logProbsBackward. */
export function logProbsBackward(
  sc: CpuScope,
  dlogp: Tensor,
  logits: Tensor,
  targets: Tensor,
  lse: Tensor,
  temperature: number,
  targetOffset?: number,
): Tensor {
  const op = "logProbsBackward";
  const gs = sc.f(dlogp, op);
  const xs = sc.f(logits, op);
  const ts = sc.i(targets, op);
  const ls = sc.f(lse, op);
  const [n, v] = checkLogProbsBackward(op, dlogp, logits, targets, lse, temperature, targetOffset);
  // A vocabulary chunk: targets in other chunks are legitimate (they add no one-hot here).
  if (targetOffset === undefined) checkIds(op, ts, v);
  const off = targetOffset ?? 0;
  const out = sc.floats(n * v);
  for (let i = 0; i < n; i++) {
    const g = gs[i] / temperature;
    const t = ts[i] - off;
    for (let j = 0; j < v; j++) {
      const p = Math.exp(xs[i * v + j] / temperature - ls[i]);
      out[i * v + j] = ((j === t ? 1 : 0) - p) * g;
    }
  }
  return sc.wrap([n, v], out);
}

/**
 * See Ops.entropy. With z = logits/T, m = max z and s = Σ exp(z − m):
 * H = log s − Σ exp(z − m)·(z − m) / s (every term bounded, so it is stable).
 */
export function entropy(sc: CpuScope, logits: Tensor, temperature: number): Tensor {
  const op = "entropy";
  const xs = sc.f(logits, op);
  const [n, v] = checkEntropy(op, logits, temperature);
  const out = sc.floats(n);
  for (let i = 0; i < n; i++) {
    let m = -Infinity;
    for (let j = 0; j < v; j++) m = Math.max(m, xs[i * v + j] / temperature);
    let s = 0;
    let sz = 0;
    for (let j = 0; j < v; j++) {
      const z = xs[i * v + j] / temperature - m;
      const e = Math.exp(z);
      s += e;
      if (e > 0) sz += e * z;
    }
    out[i] = Math.log(s) - sz / s;
  }
  return sc.wrap([n], out);
}

/** Lower bound of a chunk's running max (as the WebGPU kernels clamp it): -f32 max. */
const NEG = -3.4028235e38;

/**
 * A partial (m, s, u) of a streamed log-softmax moved to a larger max mm:
 * s' = a·s, u' = a·(u + (m − mm)·s) with a = exp(m − mm); an empty partial (s = 0) stays empty.
 */
export const rescalePartial = (
  m: number,
  s: number,
  u: number,
  mm: number,
): [number, number] => {
  if (s === 0) return [0, 0];
  const a = Math.exp(m - mm);
  return [a * s, a * (u + (m - mm) * s)];
};

/** See Ops.logSoftmaxChunk. Targets are not range-checked (other chunks hold the rest). */
export function logSoftmaxChunk(
  sc: CpuScope,
  acc: Tensor | null,
  logits: Tensor,
  targets: Tensor,
  offset: number,
  temperature: number,
): Tensor {
  const op = "logSoftmaxChunk";
  const xs = sc.f(logits, op);
  const ts = sc.i(targets, op);
  const prev = acc ? sc.f(acc, op) : null;
  const [n, v] = checkLogSoftmaxChunk(op, acc, logits, targets, offset, temperature);
  const out = sc.floats(n * 4);
  for (let i = 0; i < n; i++) {
    const off = i * v;
    let m = NEG;
    for (let j = 0; j < v; j++) m = Math.max(m, xs[off + j] / temperature);
    let s = 0;
    let u = 0;
    for (let j = 0; j < v; j++) {
      const z = xs[off + j] / temperature - m;
      const e = Math.exp(z);
      s += e;
      if (e > 0) u += e * z;
    }
    const t = ts[i] - offset;
    const zt = t >= 0 && t < v ? xs[off + t] / temperature : prev ? prev[i * 4 + 3] : NaN;
    if (prev) {
      const m0 = prev[i * 4];
      const mm = Math.max(m0, m);
      const [s0, u0] = rescalePartial(m0, prev[i * 4 + 1], prev[i * 4 + 2], mm);
      const [s1, u1] = rescalePartial(m, s, u, mm);
      m = mm;
      s = s0 + s1;
      u = u0 + u1;
    }
    out[i * 4] = m;
    out[i * 4 + 1] = s;
    out[i * 4 + 2] = u;
    out[i * 4 + 3] = zt;
  }
  return sc.wrap([n, 4], out);
}

/** See Ops.logSoftmaxFinish. */
export function logSoftmaxFinish(
  sc: CpuScope,
  acc: Tensor,
): { logp: Tensor; lse: Tensor; entropy: Tensor } {
  const op = "logSoftmaxFinish";
  const a = sc.f(acc, op);
  const n = checkLogSoftmaxFinish(op, acc);
  const logp = sc.floats(n);
  const lse = sc.floats(n);
  const ent = sc.floats(n);
  for (let i = 0; i < n; i++) {
    const m = a[i * 4];
    const ls = Math.log(a[i * 4 + 1]);
    lse[i] = m + ls;
    logp[i] = (a[i * 4 + 3] - m) - ls;
    ent[i] = ls - a[i * 4 + 2] / a[i * 4 + 1];
  }
  return { logp: sc.wrap([n], logp), lse: sc.wrap([n], lse), entropy: sc.wrap([n], ent) };
}

/** See Ops.sampleCandidates (sums in float64, the reference the kernel is tested against). */
export function sampleCandidates(
  sc: CpuScope,
  logits: Tensor,
  temperatures: ArrayLike<number>,
  count: number,
): Tensor {
  const op = "sampleCandidates";
  const xs = sc.f(logits, op);
  const [n, v] = checkSampleCandidates(op, logits, temperatures, count);
  const w = 4 + 2 * count;
  const out = sc.floats(n * w);
  const vals = new Float64Array(count);
  const ids = new Int32Array(count);
  for (let i = 0; i < n; i++) {
    const off = i * v;
    let len = 0;
    for (let j = 0; j < v; j++) {
      const x = xs[off + j];
      // ids come in increasing order: an equal value ranks after those already kept
      if (len === count && !(x > vals[count - 1])) continue;
      let p = len < count ? len++ : count - 1;
      while (p > 0 && x > vals[p - 1]) {
        vals[p] = vals[p - 1];
        ids[p] = ids[p - 1];
        p--;
      }
      vals[p] = x;
      ids[p] = j;
    }
    const m = vals[0];
    const t = temperatures[i];
    const it = t > 0 ? 1 / t : 1;
    let s1 = 0;
    let sT = 0;
    for (let j = 0; j < v; j++) {
      const d = xs[off + j] - m;
      s1 += Math.exp(d);
      sT += Math.exp(d * it);
    }
    const o = i * w;
    out[o] = m;
    out[o + 1] = s1;
    out[o + 2] = sT;
    out[o + 3] = len;
    for (let c = 0; c < count; c++) {
      out[o + 4 + c] = c < len ? vals[c] : -Infinity;
      out[o + 4 + count + c] = c < len ? ids[c] : -1;
    }
  }
  return sc.wrap([n, w], out);
}
