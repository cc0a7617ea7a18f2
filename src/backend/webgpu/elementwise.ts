/**
 * WebGPU backend: elementwise ops, reductions, row gather/scatter, SwiGLU, AdamW and the LoRA fold
 * (kernels `ew_*`, `swiglu*`, `adamw`, `lora_fold` in elementwise.wgsl). Contracts: Ops in
 * ../ops.ts; the CPU backend (../cpu/elementwise.ts) is the reference.
 *
 * Reductions (sumRows, sumSquares) use fixed two-pass trees: every run adds the same numbers in
 * the same order, so results are deterministic. The elementwise ops, adamw and sumSquares also
 * take tensors stored in several blocks (beyond the binding limit), block by block; the row and
 * column slices at the end move data between any storage layouts. Temporaries (partial sums, uploaded row indices)
 * go back to the pool right after encoding, which is safe because the queue runs in order.
 * @module
 */
import type { AdamWOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import { isHalfDType } from "../tensor.ts";
import {
  checkAdamw,
  checkAdamwStorage,
  checkAddRow,
  checkColumnRange,
  checkGatherRows,
  checkLoraFold,
  checkRowRange,
  checkScatterRows,
  checkSetColumns,
  checkSetRows,
  checkSumRows,
  checkSwigluBackward,
  sameShape,
} from "../checks/elementwise.ts";
import { f32, grid, vec4Form } from "./context.ts";
import { columnsOf, type GpuScope, type GpuTensor } from "./scope.ts";
import { copyHalfRange, widenBuffer } from "./half.ts";
import { afterScatter, beforeScatter, mirroredScatter, mirrorTarget } from "./texture_mirror.ts";

/** Invocations per workgroup of the 1-D kernels. */
const WG = 256;
/** A 2-D grid of 1-D workgroups covering `n` invocations (kernels use `linear_id`). */
const groups1d = (n: number): [number, number] => grid(Math.ceil(n / WG));

/** ew_binary op codes. */
const ADD = 0;
const SUB = 1;
const MUL = 2;
const AXPY = 3;

/** Same-shape f32 operands, checked to be stored in the same blocks (the elementwise ops). */
const alike = (sc: GpuScope, op: string, ts: readonly Tensor[]): GpuTensor[] => {
  const gs = ts.map((t) => sc.blocks(t, op, "f32"));
  sc.sameBlocks(op, gs);
  return gs;
};

const binary = (sc: GpuScope, op: string, a: Tensor, b: Tensor, code: number, s = 0): Tensor => {
  sameShape(op, a, b);
  const [x, y] = alike(sc, op, [a, b]);
  const out = x.blocks.length === 1 ? sc.out(a.shape) : sc.like(x);
  x.blocks.forEach((blk, i) => {
    const buffers = [blk.buffer, y.blocks[i].buffer, out.blocks[i].buffer];
    if (blk.length % 4 === 0) {
      const n4 = blk.length / 4;
      sc.dispatch("ew_binary4", buffers, groups1d(n4), { n4, op: code, s: f32(s) });
    } else {
      sc.dispatch("ew_binary", buffers, groups1d(blk.length), {
        n: blk.length,
        op: code,
        s: f32(s),
      });
    }
  });
  return out;
};

/** See Ops.add. */
export function add(sc: GpuScope, a: Tensor, b: Tensor): Tensor {
  return binary(sc, "add", a, b, ADD);
}

/** See Ops.sub. */
export function sub(sc: GpuScope, a: Tensor, b: Tensor): Tensor {
  return binary(sc, "sub", a, b, SUB);
}

/** See Ops.mul. */
export function mul(sc: GpuScope, a: Tensor, b: Tensor): Tensor {
  return binary(sc, "mul", a, b, MUL);
}

/** See Ops.scale. */
export function scale(sc: GpuScope, a: Tensor, s: number): Tensor {
  const x = sc.blocks(a, "scale", "f32");
  const out = x.blocks.length === 1 ? sc.out(a.shape) : sc.like(x);
  x.blocks.forEach((blk, i) => {
    sc.dispatch("ew_scale", [blk.buffer, out.blocks[i].buffer], groups1d(blk.length), {
      n: blk.length,
      s: f32(s),
    });
  });
  return out;
}

/** See Ops.addScaled. */
export function addScaled(sc: GpuScope, a: Tensor, b: Tensor, s: number): Tensor {
  return binary(sc, "addScaled", a, b, AXPY, s);
}

/** See Ops.addScaledInPlace. */
export function addScaledInPlace(sc: GpuScope, dst: Tensor, src: Tensor, s: number): void {
  const op = "addScaledInPlace";
  sameShape(op, dst, src, "dst", "src");
  const [dt, st] = alike(sc, op, [dst, src]);
  dt.blocks.forEach((blk, i) => {
    const d = blk.buffer;
    let x = st.blocks[i].buffer;
    const n = blk.length;
    // A dispatch may not bind one buffer as both writable and readable: copy an aliased src.
    const tmp = x === d ? sc.ctx.alloc(n * 4) : null;
    if (tmp) {
      sc.ctx.copy(x, 0, tmp, 0, n * 4);
      x = tmp;
    }
    sc.dispatch("ew_axpy_inplace", [d, x], groups1d(n), { n, s: f32(s) });
    if (tmp) sc.ctx.release(tmp);
  });
}

/** See Ops.addRow. */
export function addRow(sc: GpuScope, a: Tensor, row: Tensor): Tensor {
  const [, cols] = checkAddRow("addRow", a, row);
  const x = sc.f(a, "addRow");
  const r = sc.f(row, "addRow");
  const out = sc.out(a.shape);
  sc.dispatch("ew_add_row", [x, r, out.buffer], groups1d(a.size), { n: a.size, cols });
  return out;
}

/** Rows summed by one invocation of the first sumRows pass. */
const SUM_ROWS_CHUNK = 32;
/** Upper bound on the number of row chunks (partial sums per column) of sumRows. */
const SUM_ROWS_MAX_CHUNKS = 256;

/** See Ops.sumRows: column sums in fixed chunks of rows, then a sum over the chunks. */
export function sumRows(sc: GpuScope, a: Tensor): Tensor {
  const [rows, cols] = checkSumRows("sumRows", a);
  const x = sc.f(a, "sumRows");
  const out = sc.out([cols]);
  if (cols === 0) return out;
  // Params: n (invocations = chunks * cols), cols, rows, chunk_rows.
  if (rows <= 2 * SUM_ROWS_CHUNK) {
    sc.dispatch("ew_sum_rows", [x, out.buffer], groups1d(cols), {
      n: cols,
      cols,
      rows,
      chunk_rows: rows,
    });
    return out;
  }
  const chunkRows = Math.max(SUM_ROWS_CHUNK, Math.ceil(rows / SUM_ROWS_MAX_CHUNKS));
  const chunks = Math.ceil(rows / chunkRows);
  const part = sc.ctx.alloc(chunks * cols * 4);
  sc.dispatch("ew_sum_rows", [x, part], groups1d(chunks * cols), {
    n: chunks * cols,
    cols,
    rows,
    chunk_rows: chunkRows,
  });
  sc.dispatch("ew_sum_rows", [part, out.buffer], groups1d(cols), {
    n: cols,
    cols,
    rows: chunks,
    chunk_rows: chunks,
  });
  sc.ctx.release(part);
  return out;
}

/** Elements per workgroup below which sumSquares adds another first-pass workgroup. */
const SUM_SQ_PER_GROUP = 1024;
/** Most first-pass workgroups of sumSquares (the second pass is one workgroup). */
const SUM_SQ_MAX_GROUPS = 1024;

/** Sum of squares of one buffer's first n elements into `out` (a buffer of at least 4 bytes). */
const sumSquaresInto = (sc: GpuScope, x: GPUBuffer, n: number, out: GPUBuffer): void => {
  const groups = Math.min(Math.max(Math.ceil(n / SUM_SQ_PER_GROUP), 1), SUM_SQ_MAX_GROUPS);
  if (groups === 1) {
    sc.dispatch("ew_sum_squares", [x, out], [1], { n, square: 1 });
    return;
  }
  const part = sc.ctx.alloc(groups * 4);
  sc.dispatch("ew_sum_squares", [x, part], [groups], { n, square: 1 });
  sc.dispatch("ew_sum_squares", [part, out], [1], { n: groups, square: 0 });
  sc.ctx.release(part);
};

/**
 * See Ops.sumSquares: per-workgroup strided sums and trees, then one tree over the partials; a
 * split tensor sums each block so, then the block sums (in block order).
 */
export function sumSquares(sc: GpuScope, a: Tensor): Tensor {
  const x = sc.blocks(a, "sumSquares", "f32");
  const out = sc.out([1]);
  if (x.blocks.length === 1) {
    sumSquaresInto(sc, x.blocks[0].buffer, a.size, out.buffer);
    return out;
  }
  const nb = x.blocks.length;
  const parts = sc.ctx.alloc(nb * 4);
  const one = sc.ctx.alloc(4);
  x.blocks.forEach((blk, i) => {
    sumSquaresInto(sc, blk.buffer, blk.length, one);
    sc.ctx.copy(one, 0, parts, i * 4, 4);
  });
  sc.dispatch("ew_sum_squares", [parts, out.buffer], [1], { n: nb, square: 0 });
  sc.ctx.release(one);
  sc.ctx.release(parts);
  return out;
}

/** Floats per chunk of ew_sum_squares_chunks; each tensor of a batch starts at a chunk. */
const SUM_SQ_CHUNK = 1024;
/** Most floats one batch of sumSquaresEach copies together (the temporary's size). */
const SUM_SQ_BATCH = 16 * 1024 * 1024;

/**
 * See Ops.sumSquaresEach. Tensors of one storage block are copied into one zero-padded buffer,
 * each from a chunk boundary (buffer copies, no dispatch), whose chunk sums and per-tensor
 * totals take two dispatches for the lot: a gradient norm over hundreds of LoRA matrices costs
 * two dispatches, not two per matrix. A split or very large tensor goes through sumSquares.
 */
export function sumSquaresEach(sc: GpuScope, ts: readonly Tensor[]): Tensor {
  const out = sc.zeros([ts.length]);
  if (ts.length === 0) return out;
  const ctx = sc.ctx;
  const budget = Math.min(SUM_SQ_BATCH, Math.floor(ctx.maxBinding / 4));
  const batch: { t: Tensor; i: number; buffer: GPUBuffer }[] = [];
  let floats = 0;
  const flush = () => {
    if (batch.length === 0) return;
    const flat = ctx.alloc(floats * 4);
    ctx.clear(flat, floats * 4);
    const first = new Int32Array(batch.length + 1);
    let o = 0;
    batch.forEach(({ t, buffer }, s) => {
      first[s] = o / SUM_SQ_CHUNK;
      ctx.copy(buffer, 0, flat, o * 4, t.size * 4);
      o += Math.ceil(t.size / SUM_SQ_CHUNK) * SUM_SQ_CHUNK;
    });
    const chunks = o / SUM_SQ_CHUNK;
    first[batch.length] = chunks;
    const part = ctx.alloc(chunks * 4);
    sc.dispatch("ew_sum_squares_chunks", [flat, part], grid(Math.ceil(chunks / 64)), {
      n4: o / 4,
      chunks,
    });
    const fb = ctx.upload(first);
    const db = ctx.upload(Int32Array.from(batch, (e) => e.i));
    sc.dispatch("ew_sum_segments", [part, fb, db, out.buffer], grid(Math.ceil(batch.length / 64)), {
      segments: batch.length,
    });
    for (const buf of [flat, part, fb, db]) ctx.release(buf);
    batch.length = 0;
    floats = 0;
  };
  ts.forEach((t, i) => {
    const x = sc.blocks(t, "sumSquaresEach", "f32");
    const padded = Math.ceil(t.size / SUM_SQ_CHUNK) * SUM_SQ_CHUNK;
    if (t.size === 0) return; // its sum stays 0
    if (x.blocks.length !== 1 || padded > budget) {
      ctx.copy(sc.f(sumSquares(sc, t), "sumSquaresEach"), 0, out.buffer, i * 4, 4);
      return;
    }
    if (floats + padded > budget) flush();
    batch.push({ t, i, buffer: x.blocks[0].buffer });
    floats += padded;
  });
  flush();
  return out;
}

/** See Ops.gatherRows. */
export function gatherRows(sc: GpuScope, src: Tensor, rows: ArrayLike<number>): Tensor {
  const [, c] = checkGatherRows("gatherRows", src, rows);
  const idx = Int32Array.from(rows);
  const x = sc.f(src, "gatherRows");
  const out = sc.out([rows.length, c]);
  const n = rows.length * c;
  if (n === 0) return out;
  const ib = sc.ctx.upload(idx);
  sc.dispatch("ew_gather_rows", [x, ib, out.buffer], groups1d(n), { n, cols: c });
  sc.ctx.release(ib);
  return out;
}

/**
 * See Ops.scatterRowsInPlace. Row indices must be distinct (each destination row is written
 * once, so the result does not depend on the order of the writes).
 */
export function scatterRowsInPlace(
  sc: GpuScope,
  dst: Tensor,
  src: Tensor,
  rows: ArrayLike<number>,
): void {
  const op = "scatterRowsInPlace";
  const [, c] = checkScatterRows(op, dst, src, rows);
  const idx = Int32Array.from(rows);
  const d = sc.f(dst, op);
  let x = sc.f(src, op);
  const n = rows.length * c;
  if (n === 0) return;
  const tmp = x === d ? sc.ctx.alloc(n * 4) : null;
  if (tmp) {
    sc.ctx.copy(x, 0, tmp, 0, n * 4);
    x = tmp;
  }
  const ib = sc.ctx.upload(idx);
  const mirror = beforeScatter(sc.ctx, d);
  const view = mirrorTarget(mirror, c);
  if (view) {
    const p = { n4: n / 4, cols4: c / 4 };
    const res = [{ buffer: x }, { buffer: ib }, { buffer: d }, view];
    sc.ctx.dispatchResources(mirroredScatter(sc.ctx), res, groups1d(n / 4), p);
  } else if (c % 4 === 0) {
    sc.dispatch("ew_scatter_rows4", [x, ib, d], groups1d(n / 4), { n4: n / 4, cols4: c / 4 });
  } else sc.dispatch("ew_scatter_rows", [x, ib, d], groups1d(n), { n, cols: c });
  afterScatter(sc.ctx, d, mirror, view !== null);
  sc.ctx.release(ib);
  if (tmp) sc.ctx.release(tmp);
}

/** See Ops.swiglu. */
export function swiglu(sc: GpuScope, gate: Tensor, up: Tensor): Tensor {
  sameShape("swiglu", gate, up, "gate", "up");
  const g = sc.f(gate, "swiglu");
  const u = sc.f(up, "swiglu");
  const out = sc.out(gate.shape);
  if (gate.size % 4 === 0) {
    const n4 = gate.size / 4;
    sc.dispatch("swiglu4", [g, u, out.buffer], groups1d(n4), { n4 });
  } else sc.dispatch("swiglu", [g, u, out.buffer], groups1d(gate.size), { n: gate.size });
  return out;
}

/** See Ops.swigluBackward. */
export function swigluBackward(
  sc: GpuScope,
  dh: Tensor,
  gate: Tensor,
  up: Tensor,
): { dGate: Tensor; dUp: Tensor } {
  const op = "swigluBackward";
  checkSwigluBackward(op, dh, gate, up);
  const d = sc.f(dh, op);
  const g = sc.f(gate, op);
  const u = sc.f(up, op);
  const dGate: GpuTensor = sc.out(gate.shape);
  const dUp: GpuTensor = sc.out(gate.shape);
  const w = gate.size % 4 === 0 ? 4 : 1;
  const n = gate.size / w;
  sc.dispatch(
    w === 4 ? vec4Form(sc.ctx, "swiglu_backward") : "swiglu_backward",
    [d, g, u, dGate.buffer, dUp.buffer],
    groups1d(n),
    { n },
  );
  return { dGate, dUp };
}

/**
 * See Ops.adamw (PyTorch AdamW; the formula is in ../cpu/elementwise.ts). Bias corrections and
 * 1 - β are computed on the host in float64. The four tensors must have distinct buffers.
 */
export function adamw(
  sc: GpuScope,
  param: Tensor,
  grad: Tensor,
  m: Tensor,
  v: Tensor,
  opts: AdamWOptions,
): void {
  const op = "adamw";
  checkAdamw(op, param, grad, m, v, opts);
  const ts = alike(sc, op, [param, grad, m, v]);
  const { lr, beta1, beta2, eps, weightDecay, step } = opts;
  ts[0].blocks.forEach((blk, i) => {
    const [p, g, mb, vb] = ts.map((t) => t.blocks[i].buffer);
    checkAdamwStorage(op, p, g, mb, vb);
    const w = blk.length % 4 === 0 ? 4 : 1;
    const n = blk.length / w;
    sc.dispatch(w === 4 ? vec4Form(sc.ctx, "adamw") : "adamw", [p, g, mb, vb], groups1d(n), {
      n,
      lr: f32(lr),
      b1: f32(beta1),
      omb1: f32(1 - beta1),
      b2: f32(beta2),
      omb2: f32(1 - beta2),
      eps: f32(eps),
      decay: f32(1 - lr * weightDecay),
      gscale: f32(opts.gradScale ?? 1),
      bc1: f32(1 - beta1 ** step),
      bc2: f32(1 - beta2 ** step),
    });
  });
}

/** Output tile edge of one lora_fold workgroup (16x16 invocations, 8x8 outputs each). */
const FOLD_TILE = 128;

/**
 * See Ops.loraFold: a fresh W + s·(B·A), W bound read-only. Each invocation keeps an 8x8 block of
 * B·A in registers (8 values of B and 8 of A per rank step); a zero update leaves W's element
 * bit for bit.
 */
export function loraFold(sc: GpuScope, w: Tensor, b: Tensor, a: Tensor, s: number): Tensor {
  const op = "loraFold";
  const [rows, cols, rank] = checkLoraFold(op, w, b, a);
  const wh = sc.fh(w, op);
  const bb = sc.f(b, op);
  const ab = sc.f(a, op);
  const out = sc.out([rows, cols]);
  // a 16-bit base weight is widened into a temporary first (merging is rare: push, export)
  const wb = wh.dtype === "f32" ? wh.buffer : widenBuffer(sc, wh.buffer, wh.dtype, rows * cols);
  sc.dispatch(
    "lora_fold",
    [wb, bb, ab, out.buffer],
    [Math.ceil(cols / FOLD_TILE), Math.ceil(rows / FOLD_TILE)],
    { rows, cols, rank, s: f32(s) },
  );
  if (wb !== wh.buffer) sc.ctx.release(wb);
  return out;
}

// ---- storage blocks: row and column slices ------------------------------------------------------

/**
 * Copies `rows` rows of width `cols` from src (from row sr) to dst (from row dr), across the
 * storage blocks of both (copyBufferToBuffer; src and dst must not share a buffer).
 */
const copyRows = (
  sc: GpuScope,
  src: GpuTensor,
  sr: number,
  dst: GpuTensor,
  dr: number,
  rows: number,
  cols: number,
): void => {
  const lo = sr * cols;
  const hi = (sr + rows) * cols;
  const shift = (dr - sr) * cols; // dst element = src element + shift
  // 16-bit rows may start inside a word: element-exact copies by a kernel
  if (isHalfDType(src.dtype)) return copyHalfRange(sc, src, dst, lo, hi, shift);
  for (const s of src.blocks) {
    const a = Math.max(lo, s.start);
    const b = Math.min(hi, s.start + s.length);
    if (a >= b) continue;
    for (const d of dst.blocks) {
      const x = Math.max(a, d.start - shift);
      const y = Math.min(b, d.start + d.length - shift);
      if (x >= y) continue;
      sc.ctx.copy(s.buffer, (x - s.start) * 4, d.buffer, (x + shift - d.start) * 4, (y - x) * 4);
    }
  }
};

/** Whether two tensors share a storage buffer (a view of the other). */
const overlaps = (a: GpuTensor, b: GpuTensor): boolean =>
  a.blocks.some((x) => b.blocks.some((y) => x.buffer === y.buffer));

/** See Ops.sliceRows: a view of one whole storage block, else a copy (split when needed). */
export function sliceRows(sc: GpuScope, t: Tensor, start: number, count: number): Tensor {
  const op = "sliceRows";
  const g = sc.blocks(t, op);
  const [, c] = checkRowRange(op, g, start, count);
  const exact = g.blocks.find((b) => b.start === start * c && b.length === count * c);
  if (exact && count > 0) return sc.blockView(g, [count, c], exact);
  const out = sc.outBlocks([count, c], g.dtype);
  copyRows(sc, g, start, out, 0, count, c);
  return out;
}

/** See Ops.setRows. */
export function setRows(sc: GpuScope, dst: Tensor, start: number, src: Tensor): void {
  const op = "setRows";
  const d = sc.blocks(dst, op);
  let s = sc.blocks(src, op);
  const [n, c] = checkSetRows(op, dst, start, src);
  if (overlaps(d, s)) {
    const tmp = sc.outBlocks([n, c], s.dtype);
    copyRows(sc, s, 0, tmp, 0, n, c);
    s = tmp;
  }
  copyRows(sc, s, 0, d, start, n, c);
}

/**
 * Copies columns [sc0, sc0 + n) of src [R, Cs] to columns [dc0, dc0 + n) of dst [R, Cd], one
 * `ew_copy_cols` dispatch per pair of storage blocks that share rows.
 */
const copyColumns = (
  sc: GpuScope,
  src: GpuTensor,
  sc0: number,
  dst: GpuTensor,
  dc0: number,
  n: number,
): void => {
  const cs = columnsOf(src);
  const cd = columnsOf(dst);
  if (n === 0) return;
  for (const s of src.blocks) {
    const s0 = s.start / cs;
    const s1 = s0 + s.length / cs;
    for (const d of dst.blocks) {
      const d0 = d.start / cd;
      const d1 = d0 + d.length / cd;
      const r0 = Math.max(s0, d0);
      const r1 = Math.min(s1, d1);
      if (r0 >= r1) continue;
      const total = (r1 - r0) * n;
      sc.dispatch("ew_copy_cols", [s.buffer, d.buffer], groups1d(total), {
        n: total,
        cols: n,
        src_w: cs,
        src_off: (r0 - s0) * cs + sc0,
        dst_w: cd,
        dst_off: (r0 - d0) * cd + dc0,
      });
    }
  }
};

/** See Ops.sliceColumns. */
export function sliceColumns(sc: GpuScope, t: Tensor, start: number, count: number): Tensor {
  const op = "sliceColumns";
  const g = sc.blocks(t, op);
  const [r] = checkColumnRange(op, g, start, count);
  const out = sc.outBlocks([r, count], g.dtype);
  copyColumns(sc, g, start, out, 0, count);
  return out;
}

/** See Ops.setColumns. */
export function setColumns(sc: GpuScope, dst: Tensor, start: number, src: Tensor): void {
  const op = "setColumns";
  const d = sc.blocks(dst, op);
  let s = sc.blocks(src, op);
  const [, , n] = checkSetColumns(op, dst, start, src);
  if (overlaps(d, s)) s = sc.blocks(sliceColumns(sc, s, 0, n), op);
  copyColumns(sc, s, 0, d, start, n);
}
