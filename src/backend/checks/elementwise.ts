/**
 * Argument and shape validation of the elementwise ops, reductions, row gather/scatter, SwiGLU,
 * AdamW and the LoRA fold, shared by the CPU and WebGPU backends so that both raise the same
 * ShapeErrors. Each check returns the dimensions the implementations need.
 * @module
 */
import type { AdamWOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import { asMatrix, ensure, expectShape, isHalfDType } from "../tensor.ts";

/** Checks that a and b have one shape (the binary ops, addScaledInPlace, swiglu). */
export const sameShape = (op: string, a: Tensor, b: Tensor, an = "a", bn = "b"): void =>
  ensure(
    a.shape.length === b.shape.length && a.shape.every((d, i) => d === b.shape[i]),
    op,
    () => `${an} [${a.shape}] and ${bn} [${b.shape}] must have the same shape`,
  );

/** Checks host row indices: integers in [0, rows). */
const checkRows = (op: string, idx: ArrayLike<number>, rows: number): void => {
  for (let i = 0; i < idx.length; i++) {
    const r = idx[i];
    ensure(
      Number.isInteger(r) && r >= 0 && r < rows,
      op,
      () => `row index ${r} (at ${i}) out of range [0, ${rows})`,
    );
  }
};

/** Validates addRow arguments; returns a as a matrix [rows, cols]. */
export const checkAddRow = (op: string, a: Tensor, row: Tensor): [number, number] => {
  ensure(a.shape.length >= 1, op, () => `a must have rank >= 1, got [${a.shape}]`);
  const [rows, cols] = asMatrix(a);
  expectShape(op, "row", row, [cols]);
  return [rows, cols];
};

/** Validates sumRows' argument; returns a as a matrix [rows, cols]. */
export const checkSumRows = (op: string, a: Tensor): [number, number] => {
  ensure(a.shape.length >= 1, op, () => `a must have rank >= 1, got [${a.shape}]`);
  return asMatrix(a);
};

/** Validates gatherRows arguments (src 2-D, host row indices in range); returns src's [R, C]. */
export const checkGatherRows = (
  op: string,
  src: Tensor,
  rows: ArrayLike<number>,
): [number, number] => {
  expectShape(op, "src", src, [-1, -1]);
  const [r, c] = src.shape;
  checkRows(op, rows, r);
  return [r, c];
};

/**
 * Validates scatterRowsInPlace arguments (dst 2-D, src [rows.length, C], host row indices in
 * range and distinct); returns dst's [R, C].
 */
export const checkScatterRows = (
  op: string,
  dst: Tensor,
  src: Tensor,
  rows: ArrayLike<number>,
): [number, number] => {
  expectShape(op, "dst", dst, [-1, -1]);
  const [r, c] = dst.shape;
  expectShape(op, "src", src, [rows.length, c]);
  checkRows(op, rows, r);
  ensure(new Set(Array.from(rows)).size === rows.length, op, () => `row indices must be distinct`);
  return [r, c];
};

/** Validates swigluBackward's shapes (gate, up and dh alike). */
export const checkSwigluBackward = (op: string, dh: Tensor, gate: Tensor, up: Tensor): void => {
  sameShape(op, gate, up, "gate", "up");
  sameShape(op, dh, gate, "dh", "gate");
};

/** Validates adamw's shapes (four alike) and step; see also `checkAdamwStorage`. */
export const checkAdamw = (
  op: string,
  param: Tensor,
  grad: Tensor,
  m: Tensor,
  v: Tensor,
  opts: AdamWOptions,
): void => {
  sameShape(op, param, grad, "param", "grad");
  sameShape(op, param, m, "param", "m");
  sameShape(op, param, v, "param", "v");
  ensure(
    Number.isInteger(opts.step) && opts.step >= 1,
    op,
    () => `step must be an integer >= 1, got ${opts.step}`,
  );
};

/** Checks that adamw's four operands have distinct storage (typed arrays or GPU buffers). */
export const checkAdamwStorage = (
  op: string,
  param: unknown,
  grad: unknown,
  m: unknown,
  v: unknown,
): void =>
  ensure(
    new Set([param, grad, m, v]).size === 4,
    op,
    () => "param, grad, m and v must not share storage",
  );

/** Validates loraFold's shapes (w [R, C], b [R, r], a [r, C]); returns [R, C, r]. */
export const checkLoraFold = (
  op: string,
  w: Tensor,
  b: Tensor,
  a: Tensor,
): [number, number, number] => {
  expectShape(op, "w", w, [-1, -1]);
  const [rows, cols] = w.shape;
  expectShape(op, "b", b, [rows, -1]);
  const rank = b.shape[1];
  expectShape(op, "a", a, [rank, cols]);
  return [rows, cols, rank];
};

/** Validates a row range of t seen as a matrix; returns t's [R, C]. */
export const checkRowRange = (
  op: string,
  t: Tensor,
  start: number,
  count: number,
): [number, number] => {
  ensure(t.shape.length >= 1, op, () => `tensor must have rank >= 1, got [${t.shape}]`);
  const [r, c] = asMatrix(t);
  ensure(
    Number.isInteger(start) && Number.isInteger(count) && start >= 0 && count >= 0 &&
      start + count <= r,
    op,
    () => `rows [${start}, ${start + count}) out of range [0, ${r}) of [${t.shape}]`,
  );
  return [r, c];
};

/** Validates setRows' arguments (src rows of dst's width, in range); returns [start, rows, C]. */
export const checkSetRows = (
  op: string,
  dst: Tensor,
  start: number,
  src: Tensor,
): [number, number] => {
  ensure(src.shape.length >= 1, op, () => `src must have rank >= 1, got [${src.shape}]`);
  const [n, c] = asMatrix(src);
  const [, dc] = checkRowRange(op, dst, start, n);
  ensure(c === dc, op, () => `src [${src.shape}] and dst [${dst.shape}] differ in width`);
  ensure(src.dtype === dst.dtype, op, () => `src is ${src.dtype}, dst ${dst.dtype}`);
  return [n, c];
};

/** Validates a column range of a 2-D tensor; returns its [R, C]. */
export const checkColumnRange = (
  op: string,
  t: Tensor,
  start: number,
  count: number,
): [number, number] => {
  expectShape(op, "tensor", t, [-1, -1]);
  // 16-bit tensors (frozen base weights) are sliced by rows only, never by columns
  ensure(!isHalfDType(t.dtype), op, () => `${t.dtype} tensors cannot be sliced by columns`);
  const [r, c] = t.shape;
  ensure(
    Number.isInteger(start) && Number.isInteger(count) && start >= 0 && count >= 0 &&
      start + count <= c,
    op,
    () => `columns [${start}, ${start + count}) out of range [0, ${c}) of [${t.shape}]`,
  );
  return [r, c];
};

/** Validates setColumns' arguments (src [R, n] within dst [R, C]); returns dst's [R, C] and n. */
export const checkSetColumns = (
  op: string,
  dst: Tensor,
  start: number,
  src: Tensor,
): [number, number, number] => {
  expectShape(op, "src", src, [-1, -1]);
  const [r, c] = checkColumnRange(op, dst, start, src.shape[1]);
  expectShape(op, "src", src, [r, -1]);
  ensure(src.dtype === dst.dtype, op, () => `src is ${src.dtype}, dst ${dst.dtype}`);
  return [r, c, src.shape[1]];
};
