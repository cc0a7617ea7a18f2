/**
 * WebGPU backend: decoder layer ops (RMSNorm, rotary embedding, token embedding, log-probs,
 * entropy, the streamed log-softmax over vocabulary chunks) as kernels of layers.wgsl
 * (sections rmsnorm_*, rope_*, embed_*, logprob_*, entropy_*, lsm_*). Contracts: see Ops in
 * ../ops.ts. The embedding table and its gradient, and the logits of logProbs, entropy and
 * logProbsBackward, may be stored in several blocks (beyond the binding limit): the kernels
 * then run block by block, with the block's first row as a parameter.
 *
 * Row reductions (norm, log-softmax, entropy) come in two forms: one invocation per row looping
 * over it (`*_row`, no barriers) and one workgroup per row with a shared-memory tree (`*_wg`).
 * `rowKernel` picks one by adapter and shape; see its comment for the measurements behind it.
 * @module
 */
import type { RopeFrequencies } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import { ensure, isHalfDType } from "../tensor.ts";
import { halfConstants } from "./half.ts";
import { addScaledInPlace } from "./elementwise.ts";
import {
  checkEmbedding,
  checkEmbeddingBackward,
  checkEntropy,
  checkLogProbs,
  checkLogProbsBackward,
  checkLogSoftmaxChunk,
  checkLogSoftmaxFinish,
  checkRmsNorm,
  checkRmsNormBackward,
  checkRope,
  checkSampleCandidates,
} from "../checks/layers.ts";
import { ropeInvFreq } from "../cpu/layers.ts";
import { f32, type GpuContext, grid, vec4Form } from "./context.ts";
import { columnsOf, type GpuScope, type GpuTensor } from "./scope.ts";

/** Invocations per workgroup of the one-invocation-per-row kernels (`*_row`). */
const ROW_WG = 64;
/**
 * Rows per workgroup of a `*_row` launch of fewer than ROW_SPLIT_ROWS rows: 16 (one 512-bit
 * SIMD vector on llvmpipe) so that every CPU thread gets rows. A decode step normalises 64 rows:
 * at 64 per workgroup one thread of llvmpipe ran them and the others waited.
 */
const SMALL_ROW_WG = 16;
const ROW_SPLIT_ROWS = 8 * ROW_WG;
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
): RowLaunch => {
  const fits = passes * Math.ceil(cols / 8) + 16 <= LOOP_BUDGET;
  const row = forcedForm === "row" ? fits : forcedForm === "wg" ? false : ctx.info.fallback && fits;
  if (!row) return { kernel: `${base}_wg`, groups: grid(rows), constants: {} };
  const wg = rows < ROW_SPLIT_ROWS ? SMALL_ROW_WG : ROW_WG;
  return { kernel: `${base}_row`, groups: groups(rows, wg), constants: { ROWS: wg } };
};

/** A row kernel's name, grid and pipeline constants (the `*_row` form's rows per workgroup). */
interface RowLaunch {
  readonly kernel: string;
  readonly groups: [number, number];
  readonly constants: Record<string, number>;
}

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

/**
 * The inverse frequencies [headDim / 2] of rope_apply (and the subgroup matmul's rope form): the
 * cached table of a theta, or a table (scaled RoPE), small and per call, uploaded into the scope.
 */
export const ropeFrequencies = (
  sc: GpuScope,
  headDim: number,
  theta: RopeFrequencies,
): GPUBuffer =>
  typeof theta === "number"
    ? invFreqBuffer(sc.ctx, headDim, theta)
    : sc.upload(theta, [theta.length], "f32").buffer;

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
  const k = rowKernel4(sc.ctx, "rmsnorm_fwd", r, h);
  sc.dispatch(
    k.kernel,
    [xb, wb, y.buffer, rstd.buffer],
    k.groups,
    { rows: r, h, eps: f32(eps) },
    k.constants,
  );
  return { y, rstd };
}

/**
 * `rowKernel` for a row reduction, with the vec4 row form (`${base}_row4`) where the row form is
 * chosen and rows are a multiple of 4 elements.
 */
const rowKernel4 = (
  ctx: GpuContext,
  base: string,
  rows: number,
  cols: number,
): RowLaunch => {
  const k = rowKernel(ctx, base, rows, cols);
  return cols % 4 === 0 && k.kernel === `${base}_row` ? { ...k, kernel: `${base}_row4` } : k;
};

/** The store of rmsnorm_bwd_dx_row4 that its residual form extends. */
const DX4_STORE = "dx[base + j] = s * w[j] * dy[base + j] - c * x[base + j];";

/**
 * rmsnorm_bwd_dx_row4 plus the gradient the residual stream carries past the norm (binding 6):
 * dx = res + (s*w*dy - c*x), the sum an add pass would store, in the same pass.
 */
const residualForm = (ctx: GpuContext): string =>
  ctx.derivedKernel("rmsnorm_bwd_dx_row4_res", "rmsnorm_bwd_dx_row4", (code) => {
    const dxDecl = "var<storage, read_write> dx: array<vec4<f32>>;";
    if (!code.includes(DX4_STORE) || !code.includes(dxDecl)) {
      throw new Error("layers.wgsl: rmsnorm_bwd_dx_row4 lacks the store its residual form extends");
    }
    return code
      .replace(dxDecl, `${dxDecl}\n@group(0) @binding(6) var<storage, read> res: array<vec4<f32>>;`)
      .replace(
        DX4_STORE,
        "dx[base + j] = res[base + j] + (s * w[j] * dy[base + j] - c * x[base + j]);",
      );
  });

/**
 * d x of rmsNorm into a fresh tensor (the first half of rmsNormBackward), plus `residual` when
 * given: in the same pass where the row form runs on rows of a multiple of 4 (`residualForm`),
 * else an add after it.
 */
const rmsNormDx = (
  sc: GpuScope,
  op: string,
  dy: Tensor,
  x: Tensor,
  w: Tensor,
  rstd: Tensor,
  residual?: Tensor,
): { dx: Tensor; buffers: GPUBuffer[]; r: number; h: number } => {
  const dyb = sc.f(dy, op);
  const xb = sc.f(x, op);
  const wb = sc.f(w, op);
  const sb = sc.f(rstd, op);
  const [r, h] = checkRmsNormBackward(op, dy, x, w, rstd, residual);
  const dx = sc.out(x.shape);
  const k = rowKernel4(sc.ctx, "rmsnorm_bwd_dx", r, h);
  const fused = residual !== undefined && k.kernel === "rmsnorm_bwd_dx_row4";
  const buffers = [dyb, xb, wb, sb, dx.buffer, ...(fused ? [sc.f(residual, op)] : [])];
  const kernel = fused ? residualForm(sc.ctx) : k.kernel;
  sc.dispatch(kernel, buffers, k.groups, { rows: r, h }, k.constants);
  if (residual && !fused) addScaledInPlace(sc, dx, residual, 1);
  return { dx, buffers: [dyb, xb, sb], r, h };
};

/** See Ops.rmsNormBackwardInput (rmsNormDx, the residual in the same pass where it can). */
export function rmsNormBackwardInput(
  sc: GpuScope,
  dy: Tensor,
  x: Tensor,
  w: Tensor,
  rstd: Tensor,
  residual?: Tensor,
): Tensor {
  return rmsNormDx(sc, "rmsNormBackwardInput", dy, x, w, rstd, residual).dx;
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
  const { dx, buffers: [dyb, xb, sb], r, h } = rmsNormDx(sc, op, dy, x, w, rstd);
  const dw = sc.out([h]);
  const chunks = Math.max(1, Math.ceil(r / DW_CHUNK));
  const part = chunks === 1 ? dw : sc.out([chunks, h]);
  const total = chunks * h;
  sc.dispatch(
    "rmsnorm_bwd_dw",
    [dyb, xb, sb, part.buffer],
    groups(total, ROW_WG),
    { total, rows: r, h, chunk: DW_CHUNK },
  );
  if (chunks > 1) {
    sc.dispatch("rmsnorm_bwd_dw_sum", [part.buffer, dw.buffer], groups(h, ROW_WG), { chunks, h });
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
  theta: RopeFrequencies,
  sign: number,
): Tensor => {
  const xb = sc.f(x, op);
  const pb = sc.i(positions, op);
  const rows = checkRope(op, x, positions, heads, headDim, theta);
  const out = sc.out(x.shape);
  // four rotation pairs per invocation where the half head dim allows
  const w = (headDim / 2) % 4 === 0 ? 4 : 1;
  const half = headDim / 2 / w;
  const n = rows * heads * half;
  sc.dispatch(
    w === 4 ? vec4Form(sc.ctx, "rope_apply") : "rope_apply",
    [
      xb,
      pb,
      ropeFrequencies(sc, headDim, theta),
      out.buffer,
    ],
    groups(n, ELEM_WG),
    { n, half, heads, sign: f32(sign) },
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
  theta: RopeFrequencies,
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
  theta: RopeFrequencies,
): Tensor {
  return rotate(sc, "ropeBackward", dy, positions, heads, headDim, theta, -1);
}

/**
 * See Ops.embedding. An id outside [0, V) yields a zero row (the ids stay on the device). A table
 * split into storage blocks is gathered block by block into a zero-filled result.
 */
export function embedding(sc: GpuScope, table: Tensor, ids: Tensor): Tensor {
  const op = "embedding";
  const tt = sc.blocks(table, op);
  ensure(
    tt.dtype === "f32" || isHalfDType(tt.dtype),
    op,
    () => `expected f32, bf16 or f16 table, got ${tt.dtype}`,
  );
  const ib = sc.i(ids, op);
  const [n, v, h] = checkEmbedding(op, table, ids);
  const total = n * h;
  if (tt.dtype === "f32" && tt.blocks.length === 1) {
    const out = sc.out([n, h]);
    sc.dispatch("embed_gather", [tt.blocks[0].buffer, ib, out.buffer], groups(total, ELEM_WG), {
      total,
      h,
      v,
    });
    return out;
  }
  const out = sc.out([n, h]);
  sc.ctx.clear(out.buffer, total * 4);
  // a 16-bit table (a frozen base) is always gathered block by block, widening as it reads
  const half = tt.dtype !== "f32";
  for (const b of tt.blocks) {
    sc.dispatch(
      half ? "embed_gather16" : "embed_gather_part",
      [b.buffer, ib, out.buffer],
      groups(total, ELEM_WG),
      { total, h, row0: b.start / h, rows: b.length / h },
      half ? halfConstants(tt.dtype) : undefined,
    );
  }
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

/** See Ops.embeddingBackward. A gradient larger than one binding is written block by block. */
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
  const split = out.blocks.length > 1;
  const direct = segments === distinct && !split;
  const part = direct ? out : sc.out([segments, h]);
  const total = segments * h;
  sc.dispatch(
    "embed_grad",
    [csrBuf, db, part.buffer],
    groups(total, ELEM_WG),
    { total, segs: segments, h, direct: direct ? 1 : 0 },
  );
  if (direct) return out;
  const at = 2 * segments + 1 + n;
  // Distinct ids ascending: each block sums the run of them that falls in its rows.
  const uniq = csr.subarray(at, at + distinct);
  const firstAtLeast = (row: number) => {
    let lo = 0;
    let hi = distinct;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (uniq[mid] < row) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
  for (const b of out.blocks) {
    const row0 = b.start / h;
    const j0 = firstAtLeast(row0);
    const j1 = firstAtLeast(row0 + b.length / h);
    const sumTotal = (j1 - j0) * h;
    sc.dispatch(
      "embed_grad_sum",
      [csrBuf, part.buffer, b.buffer],
      groups(sumTotal, ELEM_WG),
      { total: sumTotal, d: distinct, h, at, row0, j0 },
    );
  }
  return out;
}

/** Rows [r0, r0 + rows) of each storage block of a split (or whole) logits tensor. */
const rowBlocksOf = (t: GpuTensor): { buffer: GPUBuffer; row0: number; rows: number }[] => {
  const v = columnsOf(t);
  return t.blocks.map((b) => ({ buffer: b.buffer, row0: b.start / v, rows: b.length / v }));
};

/** See Ops.logProbs. A target outside [0, V) yields logp = NaN (the targets stay on the device). */
export function logProbs(
  sc: GpuScope,
  logits: Tensor,
  targets: Tensor,
  temperature: number,
): { logp: Tensor; lse: Tensor } {
  const op = "logProbs";
  const lt = sc.blocks(logits, op, "f32");
  const tb = sc.i(targets, op);
  const [n, v] = checkLogProbs(op, logits, targets, temperature);
  const logp = sc.out([n]);
  const lse = sc.out([n]);
  for (const b of rowBlocksOf(lt)) {
    const k = rowKernel(sc.ctx, "logprob_fwd", b.rows, v);
    sc.dispatch(k.kernel, [b.buffer, tb, logp.buffer, lse.buffer], k.groups, {
      n: b.rows,
      v,
      inv_t: f32(1 / temperature),
      row0: b.row0,
    }, k.constants);
  }
  return { logp, lse };
}

/** See Ops.logProbsBackward. Split logits give a gradient split the same way. */
export function logProbsBackward(
  sc: GpuScope,
  dlogp: Tensor,
  logits: Tensor,
  targets: Tensor,
  lse: Tensor,
  temperature: number,
  targetOffset = 0,
): Tensor {
  const op = "logProbsBackward";
  const gb = sc.f(dlogp, op);
  const lt = sc.blocks(logits, op, "f32");
  const tb = sc.i(targets, op);
  const sb = sc.f(lse, op);
  const [, v] = checkLogProbsBackward(op, dlogp, logits, targets, lse, temperature, targetOffset);
  const out = lt.blocks.length === 1 ? sc.out(logits.shape) : sc.like(lt);
  const outBlocks = rowBlocksOf(out);
  rowBlocksOf(lt).forEach((b, i) => {
    const total = b.rows * v;
    const four = v % 4 === 0;
    sc.dispatch(
      four ? "logprob_bwd4" : "logprob_bwd",
      [gb, b.buffer, tb, sb, outBlocks[i].buffer],
      groups(four ? total / 4 : total, ELEM_WG),
      { total, v, inv_t: f32(1 / temperature), row0: b.row0, offset: targetOffset },
    );
  });
  return out;
}

/** See Ops.entropy. */
export function entropy(sc: GpuScope, logits: Tensor, temperature: number): Tensor {
  const op = "entropy";
  const lt = sc.blocks(logits, op, "f32");
  const [n, v] = checkEntropy(op, logits, temperature);
  const out = sc.out([n]);
  for (const b of rowBlocksOf(lt)) {
    const k = rowKernel(sc.ctx, "entropy", b.rows, v);
    sc.dispatch(k.kernel, [b.buffer, out.buffer], k.groups, {
      n: b.rows,
      v,
      inv_t: f32(1 / temperature),
      row0: b.row0,
    }, k.constants);
  }
  return out;
}

/** See Ops.logSoftmaxChunk (kernels lsm_chunk_row / lsm_chunk_wg). */
export function logSoftmaxChunk(
  sc: GpuScope,
  acc: Tensor | null,
  logits: Tensor,
  targets: Tensor,
  offset: number,
  temperature: number,
): Tensor {
  const op = "logSoftmaxChunk";
  const lb = sc.f(logits, op);
  const tb = sc.i(targets, op);
  const ab = acc ? sc.f(acc, op) : sc.out([4]).buffer; // never read without a state
  const [n, v] = checkLogSoftmaxChunk(op, acc, logits, targets, offset, temperature);
  const out = sc.out([n, 4]);
  const k = rowKernel4(sc.ctx, "lsm_chunk", n, v);
  sc.dispatch(k.kernel, [lb, tb, ab, out.buffer], k.groups, {
    n,
    v,
    inv_t: f32(1 / temperature),
    offset,
    has_acc: acc ? 1 : 0,
  }, k.constants);
  return out;
}

/**
 * The streamed log-softmax state [n, 4] after one vocabulary chunk, from its product's per-tile
 * partials part [n, tiles] (vec4s, see matmul.ts projectLogSoftmaxChunk) and the previous state.
 */
export function lsmMergeTiles(
  sc: GpuScope,
  acc: Tensor | null,
  part: GPUBuffer,
  n: number,
  tiles: number,
): Tensor {
  const ab = acc ? sc.f(acc, "projectLogSoftmaxChunk") : sc.out([4]).buffer; // never read
  const out = sc.out([n, 4]);
  sc.dispatch("lsm_merge_tiles", [part, ab, out.buffer], groups(n, 64), {
    n,
    tiles,
    has_acc: acc ? 1 : 0,
    pad: 0,
  });
  return out;
}

/** See Ops.logSoftmaxFinish. */
export function logSoftmaxFinish(
  sc: GpuScope,
  acc: Tensor,
): { logp: Tensor; lse: Tensor; entropy: Tensor } {
  const op = "logSoftmaxFinish";
  const ab = sc.f(acc, op);
  const n = checkLogSoftmaxFinish(op, acc);
  const logp = sc.out([n]);
  const lse = sc.out([n]);
  const ent = sc.out([n]);
  sc.dispatch("lsm_finish", [ab, logp.buffer, lse.buffer, ent.buffer], groups(n, ROW_WG), { n });
  return { logp, lse, entropy: ent };
}

/**
 * Rows from which a software adapter samples one candidate (greedy decoding) with a lane per
 * row (sample_greedy_row4): enough rows for a workgroup on each of its threads.
 */
const GREEDY_ROW_MIN_ROWS = 8;

/**
 * See Ops.sampleCandidates (kernel sample_cand_wg[4], block by block for split logits; one
 * candidate of rows of a multiple of 4 on a software adapter: sample_greedy_row4).
 */
export function sampleCandidates(
  sc: GpuScope,
  logits: Tensor,
  temperatures: ArrayLike<number>,
  count: number,
): Tensor {
  const op = "sampleCandidates";
  const lt = sc.blocks(logits, op, "f32");
  const [n, v] = checkSampleCandidates(op, logits, temperatures, count);
  const temps = sc.upload(Float32Array.from(temperatures), [n], "f32");
  const out = sc.out([n, 4 + 2 * count]);
  for (const b of rowBlocksOf(lt)) {
    if (
      count === 1 && v % 4 === 0 && sc.ctx.info.fallback && b.rows >= GREEDY_ROW_MIN_ROWS &&
      forcedForm !== "wg"
    ) {
      // 16 rows a workgroup from 32 rows on, else 4 (both threads get work)
      const rows = b.rows >= 32 ? 16 : 4;
      sc.dispatch(
        "sample_greedy_row4",
        [b.buffer, temps.buffer, out.buffer],
        groups(b.rows, rows),
        { n: b.rows, v, count, row0: b.row0 },
        { ROWS: rows },
      );
      continue;
    }
    const kernel = v % 4 === 0 ? "sample_cand_wg4" : "sample_cand_wg";
    sc.dispatch(kernel, [b.buffer, temps.buffer, out.buffer], grid(b.rows), {
      n: b.rows,
      v,
      count,
      row0: b.row0,
    });
  }
  return out;
}
