/**
 * WebGPU backend: decoder layer ops (RMSNorm, rotary embedding, token embedding, log-probs,
 * entropy) as kernels of src/kernels.wgsl (sections rmsnorm_*, rope_*, embed_*, logprob_*,
 * entropy_*). Contracts: see Ops in ../ops.ts.
 *
 * Row reductions (norm, log-softmax, entropy) come in two forms: one invocation per row looping
 * over it (`*_row`, no barriers) and one workgroup per row with a shared-memory tree (`*_wg`).
 * `rowKernel` picks one by adapter and shape; see its comment for the measurements behind it.
 * @module
 */
import type { Tensor } from "../tensor.ts";
import {
  checkEmbedding,
  checkEmbeddingBackward,
  checkEntropy,
  checkLogProbs,
  checkLogProbsBackward,
  checkRmsNorm,
  checkRmsNormBackward,
  checkRope,
} from "../checks/layers.ts";
import { ropeInvFreq } from "../cpu/layers.ts";
import { f32, type GpuContext, grid } from "./context.ts";
import type { GpuScope } from "./scope.ts";

/** Invocations per workgroup of the one-invocation-per-row kernels (`*_row`). */
const ROW_WG = 64;
/** Invocations per workgroup of the elementwise kernels. */
const ELEM_WG = 256;
/**
 * Loop iterations one invocation may run. llvmpipe ends an invocation after 65535 iterations of
 * all its loops together (its guard against endless loops), silently; keep well below.
 */
const LOOP_BUDGET = 60000;
/** Rows per chunk of the rmsNorm weight-gradient reduction (and its loop length). */
const DW_CHUNK = 1024;
/** Longest run of positions one embed_grad invocation sums (longer lists are split). */
export const EMBED_SEGMENT = 1024;

/**
 * Picks the form of a row reduction over `rows` rows of `cols` elements read in `passes` loops:
 * `${base}_row` (one invocation per row, loops unrolled by 8, no barriers) or `${base}_wg` (one
 * workgroup of 64 per row, strided loops and a shared-memory tree).
 *
 * Measured on Mesa llvmpipe (2 cores, busy machine, best of 4x4 runs, ms row / wg):
 * logProbs N=512 V=256 6.0/15.9, N=512 V=32000 47/103, N=8 V=32000 3.6/4.2, N=64 V=152000
 * 69/129; entropy 512x256 3.9/22, 512x32000 67/200; rmsNorm 512x2048 10.7/22.5, 512x32000 221/493.
 * Barriers are costly there and the row loop wins at every shape tried, so a software adapter uses
 * it whenever the row fits the loop budget. A hardware GPU gets the workgroup form, which keeps
 * its many cores busy when rows are few.
 */
export const rowKernel = (
  ctx: GpuContext,
  base: string,
  rows: number,
  cols: number,
  passes = 2,
): { kernel: string; groups: [number, number] } => {
  const fits = passes * Math.ceil(cols / 8) + 16 <= LOOP_BUDGET;
  const row = forcedForm === "row" ? fits : forcedForm === "wg" ? false : ctx.info.fallback && fits;
  return row
    ? { kernel: `${base}_row`, groups: groups(rows, ROW_WG) }
    : { kernel: `${base}_wg`, groups: grid(rows) };
};

let forcedForm: "row" | "wg" | undefined;

/**
 * Overrides the choice of `rowKernel` (tests and benchmarks run both forms on one adapter);
 * `undefined` restores the choice by adapter and shape. The row form is still refused for rows
 * longer than the loop budget.
 */
export const setRowForm = (form: "row" | "wg" | undefined): void => {
  forcedForm = form;
};

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
    b = ctx.uploadPersistent(ropeInvFreq(headDim, theta));
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
  const [r, h] = checkRmsNorm(op, x, w, eps);
  const y = sc.out(x.shape);
  const rstd = sc.out([r]);
  const k = rowKernel(sc.ctx, "rmsnorm_fwd", r, h);
  sc.dispatch(k.kernel, [xb, wb, y.buffer, rstd.buffer], k.groups, [r, h, f32(eps)]);
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
  const [r, h] = checkRmsNormBackward(op, dy, x, w, rstd);
  const dx = sc.out(x.shape);
  const dw = sc.out([h]);
  const k = rowKernel(sc.ctx, "rmsnorm_bwd_dx", r, h);
  sc.dispatch(k.kernel, [dyb, xb, wb, sb, dx.buffer], k.groups, [r, h]);
  const chunks = Math.max(1, Math.ceil(r / DW_CHUNK));
  const part = chunks === 1 ? dw : sc.out([chunks, h]);
  const total = chunks * h;
  sc.dispatch(
    "rmsnorm_bwd_dw",
    [dyb, xb, sb, part.buffer],
    groups(total, ROW_WG),
    [total, r, h, DW_CHUNK],
  );
  if (chunks > 1) {
    sc.dispatch("rmsnorm_bwd_dw_sum", [part.buffer, dw.buffer], groups(h, ROW_WG), [chunks, h]);
  }
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
  const [n, v, h] = checkEmbedding(op, table, ids);
  const out = sc.out([n, h]);
  const total = n * h;
  sc.dispatch("embed_gather", [tb, ib, out.buffer], groups(total, ELEM_WG), [total, h, v]);
  return out;
}

/**
 * Host-side CSR of the positions of each distinct id, split into segments of at most `segment`
 * positions, packed as one i32 array (see the embed_grad kernel):
 * [S segment ids | S+1 offsets | N positions grouped by id, ascending | D distinct ids ascending |
 * D+1 first segment of each distinct id].
 */
export const idCsr = (
  ids: ArrayLike<number>,
  segment: number = EMBED_SEGMENT,
): { csr: Int32Array; segments: number; distinct: number } => {
  const n = ids.length;
  const order = Array.from({ length: n }, (_, i) => i);
  order.sort((a, b) => ids[a] - ids[b] || a - b);
  const segIds: number[] = [];
  const segOff: number[] = [];
  const uniq: number[] = [];
  const firstSeg: number[] = [];
  let runStart = 0;
  for (let k = 0; k < n; k++) {
    const id = ids[order[k]];
    const fresh = k === 0 || id !== ids[order[k - 1]];
    if (fresh) {
      uniq.push(id);
      firstSeg.push(segIds.length);
      runStart = k;
    }
    if (fresh || (k - runStart) % segment === 0) {
      segIds.push(id);
      segOff.push(k);
    }
  }
  segOff.push(n);
  firstSeg.push(segIds.length);
  const s = segIds.length;
  const d = uniq.length;
  const csr = new Int32Array(2 * s + 1 + n + 2 * d + 1);
  csr.set(segIds, 0);
  csr.set(segOff, s);
  csr.set(order, 2 * s + 1);
  csr.set(uniq, 2 * s + 1 + n);
  csr.set(firstSeg, 2 * s + 1 + n + d);
  return { csr, segments: s, distinct: d };
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
  const [n, h] = checkEmbeddingBackward(op, dy, ids, vocab);
  const out = sc.zeros([vocab, h]);
  if (n === 0 || h === 0) return out;
  const { csr, segments, distinct } = idCsr(ids);
  const csrBuf = sc.upload(csr, [csr.length], "i32").buffer;
  const direct = segments === distinct;
  const part = direct ? out : sc.out([segments, h]);
  const total = segments * h;
  sc.dispatch(
    "embed_grad",
    [csrBuf, db, part.buffer],
    groups(total, ELEM_WG),
    [total, segments, h, direct ? 1 : 0],
  );
  if (!direct) {
    const sumTotal = distinct * h;
    sc.dispatch(
      "embed_grad_sum",
      [csrBuf, part.buffer, out.buffer],
      groups(sumTotal, ELEM_WG),
      [sumTotal, distinct, h, 2 * segments + 1 + n],
    );
  }
  return out;
}

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
  const [n, v] = checkLogProbs(op, logits, targets, temperature);
  const logp = sc.out([n]);
  const lse = sc.out([n]);
  const k = rowKernel(sc.ctx, "logprob_fwd", n, v);
  sc.dispatch(k.kernel, [lb, tb, logp.buffer, lse.buffer], k.groups, [n, v, f32(1 / temperature)]);
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
  const [n, v] = checkLogProbsBackward(op, dlogp, logits, targets, lse, temperature);
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
  const [n, v] = checkEntropy(op, logits, temperature);
  const out = sc.out([n]);
  const k = rowKernel(sc.ctx, "entropy", n, v);
  sc.dispatch(k.kernel, [lb, out.buffer], k.groups, [n, v, f32(1 / temperature)]);
  return out;
}
