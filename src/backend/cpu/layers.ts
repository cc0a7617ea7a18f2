/**
 * CPU backend: decoder layer ops (RMSNorm, rotary embedding, token embedding, log-probs,
 * entropy). Plain loops in double-precision intermediates, stored in the scope precision: the
 * reference the WebGPU kernels are tested against. Contracts: see Ops in ../ops.ts.
 * @module
 */
import type { FloatArray, Tensor } from "../tensor.ts";
import { asMatrix, ensure, expectShape } from "../tensor.ts";
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

/** Validates rope arguments; returns the number of rows. */
export const checkRope = (
  op: string,
  x: Tensor,
  positions: Tensor,
  heads: number,
  headDim: number,
  theta: number,
): number => {
  ensure(
    Number.isInteger(heads) && heads > 0 && Number.isInteger(headDim) && headDim > 0 &&
      headDim % 2 === 0,
    op,
    () => `heads ${heads} and headDim ${headDim} must be positive integers, headDim even`,
  );
  ensure(Number.isFinite(theta) && theta > 0, op, () => `theta ${theta} must be positive`);
  ensure(x.shape.length === 2, op, () => `x must be 2-D, got [${x.shape}]`);
  const rows = x.shape[0];
  expectShape(op, "x", x, [rows, heads * headDim]);
  expectShape(op, "positions", positions, [rows]);
  ensure(positions.dtype === "i32", op, () => `positions must be i32, got ${positions.dtype}`);
  return rows;
};

/** Validates a temperature. */
export const checkTemperature = (op: string, temperature: number): void =>
  ensure(
    Number.isFinite(temperature) && temperature > 0,
    op,
    () => `temperature ${temperature} must be positive and finite`,
  );

/** Validates rmsNorm arguments; returns [rows, cols]. */
export const checkRmsNorm = (op: string, x: Tensor, w: Tensor): [number, number] => {
  ensure(x.shape.length >= 1, op, () => `x must have at least one dimension`);
  const [r, h] = asMatrix(x);
  expectShape(op, "w", w, [h]);
  return [r, h];
};

/** Validates embeddingBackward's host ids against the vocabulary. */
export const checkIds = (op: string, ids: ArrayLike<number>, vocab: number): void => {
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i];
    ensure(
      Number.isInteger(id) && id >= 0 && id < vocab,
      op,
      () => `id ${id} at ${i} is outside [0, ${vocab})`,
    );
  }
};

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
  const [r, h] = checkRmsNorm(op, x, w);
  ensure(Number.isFinite(eps) && eps >= 0, op, () => `eps ${eps} must be >= 0`);
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
  const [r, h] = checkRmsNorm(op, x, w);
  expectShape(op, "dy", dy, x.shape);
  expectShape(op, "rstd", rstd, [r]);
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

/** Rotates every (i, i + d/2) pair of every head by `sign` times its angle. */
const rotate = (
  src: FloatArray,
  dst: FloatArray,
  pos: Int32Array,
  heads: number,
  headDim: number,
  theta: number,
  sign: number,
): void => {
  const half = headDim / 2;
  const invFreq = ropeInvFreq(headDim, theta);
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
  theta: number,
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
  theta: number,
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
  const ts = sc.f(table, op);
  const is = sc.i(ids, op);
  ensure(table.shape.length === 2, op, () => `table must be [V, H], got [${table.shape}]`);
  ensure(ids.shape.length === 1, op, () => `ids must be 1-D, got [${ids.shape}]`);
  const [v, h] = table.shape;
  checkIds(op, is, v);
  const out = sc.floats(is.length * h);
  for (let i = 0; i < is.length; i++) out.set(ts.subarray(is[i] * h, (is[i] + 1) * h), i * h);
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
  ensure(Number.isInteger(vocab) && vocab >= 0, op, () => `vocab ${vocab} must be >= 0`);
  ensure(dy.shape.length === 2, op, () => `dy must be [N, H], got [${dy.shape}]`);
  const [n, h] = dy.shape;
  ensure(ids.length === n, op, () => `${ids.length} ids for dy [${dy.shape}]`);
  checkIds(op, ids, vocab);
  const out = sc.floats(vocab * h);
  for (let i = 0; i < n; i++) {
    const base = ids[i] * h;
    for (let j = 0; j < h; j++) out[base + j] += ds[i * h + j];
  }
  return sc.wrap([vocab, h], out);
}

/** Validates logits [N,V] and i32 targets [N]; returns [N, V]. */
const checkLogits = (op: string, logits: Tensor, targets: Tensor | null): [number, number] => {
  ensure(logits.shape.length === 2, op, () => `logits must be [N, V], got [${logits.shape}]`);
  const [n, v] = logits.shape;
  ensure(v > 0, op, () => `logits [${logits.shape}] need at least one column`);
  if (targets) {
    expectShape(op, "targets", targets, [n]);
    ensure(targets.dtype === "i32", op, () => `targets must be i32, got ${targets.dtype}`);
  }
  return [n, v];
};

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
  const [n, v] = checkLogits(op, logits, targets);
  checkTemperature(op, temperature);
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
): Tensor {
  const op = "logProbsBackward";
  const gs = sc.f(dlogp, op);
  const xs = sc.f(logits, op);
  const ts = sc.i(targets, op);
  const ls = sc.f(lse, op);
  const [n, v] = checkLogits(op, logits, targets);
  expectShape(op, "dlogp", dlogp, [n]);
  expectShape(op, "lse", lse, [n]);
  checkTemperature(op, temperature);
  checkIds(op, ts, v);
  const out = sc.floats(n * v);
  for (let i = 0; i < n; i++) {
    const g = gs[i] / temperature;
    for (let j = 0; j < v; j++) {
      const p = Math.exp(xs[i * v + j] / temperature - ls[i]);
      out[i * v + j] = ((j === ts[i] ? 1 : 0) - p) * g;
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
  const [n, v] = checkLogits(op, logits, null);
  checkTemperature(op, temperature);
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
