/**
 * WebGPU backend: decoder layer ops (RMSNorm, rotary embedding, token embedding, log-probs,
 * entropy) as kernels of src/kernels.wgsl (sections rmsnorm_*, rope_*, embed_*, logprob_*,
 * entropy_*). Contracts: see Ops in ../ops.ts.
 *
 * Row reductions (norm, log-softmax, entropy) come in two forms: one invocation per row looping
 * over it (`*_row`, no barriers) and one workgroup per row with a shared-memory tree (`*_wg`).
 * `rowKernel` picks one by shape; see its comment for the measurements behind the choice.
 * @module
 */
import type { Tensor } from "../tensor.ts";
import { expectShape, require } from "../tensor.ts";
import { checkIds, checkRmsNorm, checkRope, checkTemperature, ropeInvFreq } from "../cpu/layers.ts";
import { f32, type GpuContext, grid } from "./context.ts";
import type { GpuScope } from "./scope.ts";

/** Invocations per workgroup of the one-invocation-per-row kernels. */
const ROW_WG = 64;
/** Invocations per workgroup of the elementwise kernels. */
const ELEM_WG = 256;

/**
 * Chooses the per-row loop or the workgroup-per-row kernel for `rows` rows of `cols` elements.
 * Measured on Mesa llvmpipe (2 cores), see tests/layers_test.ts's bench notes in the report:
 * barriers are expensive there, so the loop wins whenever there are enough rows to keep the
 * cores busy; with few long rows the workgroup form spreads a row over many invocations.
 */
export const rowKernel = (base: string, rows: number, cols: number): string =>
  rows >= ROW_MIN_ROWS || cols < ROW_MIN_COLS_WG ? `${base}_row` : `${base}_wg`;
/** Rows from which the per-row loop is used regardless of the row length. */
const ROW_MIN_ROWS = 256;
/** Row length below which the per-row loop is used regardless of the number of rows. */
const ROW_MIN_COLS_WG = 1024;

/** Dispatch size for `n` invocations of workgroups of `wg`. */
const groups = (n: number, wg: number): [number, number] => grid(Math.ceil(n / wg));

/** Rotary inverse-frequency tables uploaded once per device, keyed by headDim and theta. */
const invFreqCache = new WeakMap<GpuContext, Map<string, GPUBuffer>>();

const invFreqBuffer = (ctx: GpuContext, headDim: number, theta: number): GPUBuffer => {
  let m = invFreqCache.get(ctx);
  if (!m) {
    m = new Map();
    invFreqCache.set(ctx, m);
  }
  const key = `${headDim}|${theta}`;
  let b = m.get(key);
  if (!b) {
    b = ctx.upload(ropeInvFreq(headDim, theta));
    m.set(key, b);
  }
  return b;
};

/** See Ops.rmsNorm. */
export function rmsNorm(
  sc: GpuScope,
  x: Tensor,
  w: Tensor,
  eps: number,
): { y: Tensor; rstd: Tensor } {
  const op = "rmsNorm";
  const xb = sc.f(x, op);
  const wb = sc.f(w, op);
  const [r, h] = checkRmsNorm(op, x, w);
  require(Number.isFinite(eps) && eps >= 0, op, () => `eps ${eps} must be >= 0`);
  const y = sc.out(x.shape);
  const rstd = sc.out([r]);
  const k = rowKernel("rmsnorm_fwd", r, h);
  const g = k.endsWith("_row") ? groups(r, ROW_WG) : grid(r);
  sc.dispatch(k, [xb, wb, y.buffer, rstd.buffer], g, [r, h, f32(eps)]);
  return { y, rstd };
}

/** See Ops.rmsNormBackward. */
export function rmsNormBackward(
  sc: GpuScope,
  dy: Tensor,
  x: Tensor,
  w: Tensor,
  rstd: Tensor,
): { dx: Tensor; dw: Tensor } {
  const op = "rmsNormBackward";
  const dyb = sc.f(dy, op);
  const xb = sc.f(x, op);
  const wb = sc.f(w, op);
  const sb = sc.f(rstd, op);
  const [r, h] = checkRmsNorm(op, x, w);
  expectShape(op, "dy", dy, x.shape);
  expectShape(op, "rstd", rstd, [r]);
  const dx = sc.out(x.shape);
  const dw = sc.out([h]);
  const k = rowKernel("rmsnorm_bwd_dx", r, h);
  const g = k.endsWith("_row") ? groups(r, ROW_WG) : grid(r);
  sc.dispatch(k, [dyb, xb, wb, sb, dx.buffer], g, [r, h]);
  if (r === 0) sc.ctx.clear(dw.buffer, h * 4);
  else sc.dispatch("rmsnorm_bwd_dw", [dyb, xb, sb, dw.buffer], groups(h, ROW_WG), [r, h]);
  return { dx, dw };
}

const rotate = (
  sc: GpuScope,
  op: string,
  x: Tensor,
  positions: Tensor,
  heads: number,
  headDim: number,
  theta: number,
  sign: number,
): Tensor => {
  const xb = sc.f(x, op);
  const pb = sc.i(positions, op);
  const rows = checkRope(op, x, positions, heads, headDim, theta);
  const out = sc.out(x.shape);
  const n = rows * heads * (headDim / 2);
  sc.dispatch(
    "rope_apply",
    [xb, pb, invFreqBuffer(sc.ctx, headDim, theta), out.buffer],
    groups(n, ELEM_WG),
    [n, headDim / 2, heads, f32(sign)],
  );
  return out;
};

/** See Ops.rope. */
export function rope(
  sc: GpuScope,
  x: Tensor,
  positions: Tensor,
  heads: number,
  headDim: number,
  theta: number,
): Tensor {
  return rotate(sc, "rope", x, positions, heads, headDim, theta, 1);
}

/** See Ops.ropeBackward. */
export function ropeBackward(
  sc: GpuScope,
  dy: Tensor,
  positions: Tensor,
  heads: number,
  headDim: number,
  theta: number,
): Tensor {
  return rotate(sc, "ropeBackward", dy, positions, heads, headDim, theta, -1);
}

/** See Ops.embedding. An id outside [0, V) yields a zero row (the ids stay on the device). */
export function embedding(sc: GpuScope, table: Tensor, ids: Tensor): Tensor {
  const op = "embedding";
  const tb = sc.f(table, op);
  const ib = sc.i(ids, op);
  require(table.shape.length === 2, op, () => `table must be [V, H], got [${table.shape}]`);
  require(ids.shape.length === 1, op, () => `ids must be 1-D, got [${ids.shape}]`);
  const [v, h] = table.shape;
  const n = ids.shape[0];
  const out = sc.out([n, h]);
  const total = n * h;
  sc.dispatch("embed_gather", [tb, ib, out.buffer], groups(total, ELEM_WG), [total, h, v]);
  return out;
}

/**
 * Host-side CSR of the positions of each distinct id, packed as one i32 array:
 * [D distinct ids ascending | D+1 offsets | N positions grouped by id, ascending within an id].
 */
export const idCsr = (ids: ArrayLike<number>): { csr: Int32Array; distinct: number } => {
  const n = ids.length;
  const order = Array.from({ length: n }, (_, i) => i);
  order.sort((a, b) => ids[a] - ids[b] || a - b);
  const uniq: number[] = [];
  const offsets: number[] = [];
  for (let k = 0; k < n; k++) {
    if (k === 0 || ids[order[k]] !== ids[order[k - 1]]) {
      uniq.push(ids[order[k]]);
      offsets.push(k);
    }
  }
  offsets.push(n);
  const d = uniq.length;
  const csr = new Int32Array(2 * d + 1 + n);
  csr.set(uniq, 0);
  csr.set(offsets, d);
  csr.set(order, 2 * d + 1);
  return { csr, distinct: d };
};

/** See Ops.embeddingBackward. */
export function embeddingBackward(
  sc: GpuScope,
  dy: Tensor,
  ids: ArrayLike<number>,
  vocab: number,
): Tensor {
  const op = "embeddingBackward";
  const db = sc.f(dy, op);
  require(Number.isInteger(vocab) && vocab >= 0, op, () => `vocab ${vocab} must be >= 0`);
  require(dy.shape.length === 2, op, () => `dy must be [N, H], got [${dy.shape}]`);
  const [n, h] = dy.shape;
  require(ids.length === n, op, () => `${ids.length} ids for dy [${dy.shape}]`);
  checkIds(op, ids, vocab);
  const out = sc.zeros([vocab, h]);
  if (n === 0 || h === 0) return out;
  const { csr, distinct } = idCsr(ids);
  const csrT = sc.upload(csr, [csr.length], "i32");
  const total = distinct * h;
  sc.dispatch(
    "embed_grad",
    [csrT.buffer, db, out.buffer],
    groups(total, ELEM_WG),
    [total, distinct, h],
  );
  return out;
}

const checkLogits = (op: string, logits: Tensor, targets: Tensor | null): [number, number] => {
  require(logits.shape.length === 2, op, () => `logits must be [N, V], got [${logits.shape}]`);
  const [n, v] = logits.shape;
  require(v > 0, op, () => `logits [${logits.shape}] need at least one column`);
  if (targets) {
    expectShape(op, "targets", targets, [n]);
    require(targets.dtype === "i32", op, () => `targets must be i32, got ${targets.dtype}`);
  }
  return [n, v];
};

/** See Ops.logProbs. A target outside [0, V) yields logp = NaN (the targets stay on the device). */
export function logProbs(
  sc: GpuScope,
  logits: Tensor,
  targets: Tensor,
  temperature: number,
): { logp: Tensor; lse: Tensor } {
  const op = "logProbs";
  const lb = sc.f(logits, op);
  const tb = sc.i(targets, op);
  const [n, v] = checkLogits(op, logits, targets);
  checkTemperature(op, temperature);
  const logp = sc.out([n]);
  const lse = sc.out([n]);
  const k = rowKernel("logprob_fwd", n, v);
  const g = k.endsWith("_row") ? groups(n, ROW_WG) : grid(n);
  sc.dispatch(k, [lb, tb, logp.buffer, lse.buffer], g, [n, v, f32(1 / temperature)]);
  return { logp, lse };
}

/** See Ops.logProbsBackward. */
export function logProbsBackward(
  sc: GpuScope,
  dlogp: Tensor,
  logits: Tensor,
  targets: Tensor,
  lse: Tensor,
  temperature: number,
): Tensor {
  const op = "logProbsBackward";
  const gb = sc.f(dlogp, op);
  const lb = sc.f(logits, op);
  const tb = sc.i(targets, op);
  const sb = sc.f(lse, op);
  const [n, v] = checkLogits(op, logits, targets);
  expectShape(op, "dlogp", dlogp, [n]);
  expectShape(op, "lse", lse, [n]);
  checkTemperature(op, temperature);
  const out = sc.out([n, v]);
  const total = n * v;
  sc.dispatch(
    "logprob_bwd",
    [gb, lb, tb, sb, out.buffer],
    groups(total, ELEM_WG),
    [total, v, f32(1 / temperature)],
  );
  return out;
}

/** See Ops.entropy. */
export function entropy(sc: GpuScope, logits: Tensor, temperature: number): Tensor {
  const op = "entropy";
  const lb = sc.f(logits, op);
  const [n, v] = checkLogits(op, logits, null);
  checkTemperature(op, temperature);
  const out = sc.out([n]);
  const k = rowKernel("entropy", n, v);
  const g = k.endsWith("_row") ? groups(n, ROW_WG) : grid(n);
  sc.dispatch(k, [lb, out.buffer], g, [n, v, f32(1 / temperature)]);
  return out;
}
