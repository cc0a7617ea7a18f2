/**
 * WebGPU backend: elementwise ops, reductions, row gather/scatter, SwiGLU, AdamW and the LoRA fold
 * (kernels `ew_*`, `swiglu*`, `adamw`, `lora_fold` in src/kernels.wgsl). Contracts: Ops in
 * ../ops.ts; the CPU backend (../cpu/elementwise.ts) is the reference.
 *
 * Reductions (sumRows, sumSquares) use fixed two-pass trees: every run adds the same numbers in
 * the same order, so results are deterministic. Temporaries (partial sums, uploaded row indices)
 * go back to the pool right after encoding, which is safe because the queue runs in order.
 * @module
 */
import type { AdamWOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import {
  checkAdamw,
  checkAdamwStorage,
  checkAddRow,
  checkGatherRows,
  checkLoraFold,
  checkScatterRows,
  checkSumRows,
  checkSwigluBackward,
  sameShape,
} from "../checks/elementwise.ts";
import { f32, grid } from "./context.ts";
import type { GpuScope, GpuTensor } from "./scope.ts";

/** Invocations per workgroup of the 1-D kernels. */
const WG = 256;
/** A 2-D grid of 1-D workgroups covering `n` invocations (kernels use `linear_id`). */
const groups1d = (n: number): [number, number] => grid(Math.ceil(n / WG));

/** ew_binary op codes. */
const ADD = 0;
const SUB = 1;
const MUL = 2;
const AXPY = 3;

const binary = (sc: GpuScope, op: string, a: Tensor, b: Tensor, code: number, s = 0): Tensor => {
  sameShape(op, a, b);
  const x = sc.f(a, op);
  const y = sc.f(b, op);
  const out = sc.out(a.shape);
  sc.dispatch("ew_binary", [x, y, out.buffer], groups1d(a.size), [a.size, code, f32(s)]);
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
  const x = sc.f(a, "scale");
  const out = sc.out(a.shape);
  sc.dispatch("ew_scale", [x, out.buffer], groups1d(a.size), [a.size, f32(s)]);
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
  const d = sc.f(dst, op);
  let x = sc.f(src, op);
  // A dispatch may not bind one buffer as both writable and readable: copy an aliased src.
  const tmp = x === d ? sc.ctx.alloc(src.size * 4) : null;
  if (tmp) {
    sc.ctx.copy(x, 0, tmp, 0, src.size * 4);
    x = tmp;
  }
  sc.dispatch("ew_axpy_inplace", [d, x], groups1d(dst.size), [dst.size, f32(s)]);
  if (tmp) sc.ctx.release(tmp);
}

/** See Ops.addRow. */
export function addRow(sc: GpuScope, a: Tensor, row: Tensor): Tensor {
  const [, cols] = checkAddRow("addRow", a, row);
  const x = sc.f(a, "addRow");
  const r = sc.f(row, "addRow");
  const out = sc.out(a.shape);
  sc.dispatch("ew_add_row", [x, r, out.buffer], groups1d(a.size), [a.size, cols]);
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
    sc.dispatch("ew_sum_rows", [x, out.buffer], groups1d(cols), [cols, cols, rows, rows]);
    return out;
  }
  const chunkRows = Math.max(SUM_ROWS_CHUNK, Math.ceil(rows / SUM_ROWS_MAX_CHUNKS));
  const chunks = Math.ceil(rows / chunkRows);
  const part = sc.ctx.alloc(chunks * cols * 4);
  sc.dispatch("ew_sum_rows", [x, part], groups1d(chunks * cols), [
    chunks * cols,
    cols,
    rows,
    chunkRows,
  ]);
  sc.dispatch("ew_sum_rows", [part, out.buffer], groups1d(cols), [cols, cols, chunks, chunks]);
  sc.ctx.release(part);
  return out;
}

/** Elements per workgroup below which sumSquares adds another first-pass workgroup. */
const SUM_SQ_PER_GROUP = 1024;
/** Most first-pass workgroups of sumSquares (the second pass is one workgroup). */
const SUM_SQ_MAX_GROUPS = 1024;

/** See Ops.sumSquares: per-workgroup strided sums and trees, then one tree over the partials. */
export function sumSquares(sc: GpuScope, a: Tensor): Tensor {
  const x = sc.f(a, "sumSquares");
  const n = a.size;
  const out = sc.out([1]);
  const groups = Math.min(Math.max(Math.ceil(n / SUM_SQ_PER_GROUP), 1), SUM_SQ_MAX_GROUPS);
  if (groups === 1) {
    sc.dispatch("ew_sum_squares", [x, out.buffer], [1], [n, 1]);
    return out;
  }
  const part = sc.ctx.alloc(groups * 4);
  sc.dispatch("ew_sum_squares", [x, part], [groups], [n, 1]);
  sc.dispatch("ew_sum_squares", [part, out.buffer], [1], [groups, 0]);
  sc.ctx.release(part);
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
  sc.dispatch("ew_gather_rows", [x, ib, out.buffer], groups1d(n), [n, c]);
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
  sc.dispatch("ew_scatter_rows", [x, ib, d], groups1d(n), [n, c]);
  sc.ctx.release(ib);
  if (tmp) sc.ctx.release(tmp);
}

/** See Ops.swiglu. */
export function swiglu(sc: GpuScope, gate: Tensor, up: Tensor): Tensor {
  sameShape("swiglu", gate, up, "gate", "up");
  const g = sc.f(gate, "swiglu");
  const u = sc.f(up, "swiglu");
  const out = sc.out(gate.shape);
  sc.dispatch("swiglu", [g, u, out.buffer], groups1d(gate.size), [gate.size]);
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
  sc.dispatch(
    "swiglu_backward",
    [d, g, u, dGate.buffer, dUp.buffer],
    groups1d(gate.size),
    [gate.size],
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
  const p = sc.f(param, op);
  const g = sc.f(grad, op);
  const mb = sc.f(m, op);
  const vb = sc.f(v, op);
  checkAdamwStorage(op, p, g, mb, vb);
  const { lr, beta1, beta2, eps, weightDecay, step } = opts;
  const n = param.size;
  sc.dispatch("adamw", [p, g, mb, vb], groups1d(n), [
    n,
    f32(lr),
    f32(beta1),
    f32(1 - beta1),
    f32(beta2),
    f32(1 - beta2),
    f32(eps),
    f32(1 - lr * weightDecay),
    f32(opts.gradScale ?? 1),
    f32(1 - beta1 ** step),
    f32(1 - beta2 ** step),
  ]);
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
  const wb = sc.f(w, op);
  const bb = sc.f(b, op);
  const ab = sc.f(a, op);
  const out = sc.out([rows, cols]);
  sc.dispatch(
    "lora_fold",
    [wb, bb, ab, out.buffer],
    [Math.ceil(cols / FOLD_TILE), Math.ceil(rows / FOLD_TILE)],
    [rows, cols, rank, f32(s)],
  );
  return out;
}
