/**
 * CPU backend: elementwise ops, reductions, row gather/scatter, SwiGLU, AdamW and the LoRA fold.
 * Plain loops computing in JS numbers (float64) and storing in the scope precision: the reference
 * the WebGPU kernels are tested against. Contracts: Ops in ../ops.ts.
 * @module
 */
import type { AdamWOptions } from "../ops.ts";
import type { FloatArray, Tensor } from "../tensor.ts";
import {
  checkAdamw,
  checkAdamwStorage,
  checkAddRow,
  checkColumnRange,
  checkGatherRows,
  checkLoraFold,
  checkScatterRows,
  checkSetColumns,
  checkSetRows,
  checkSumRows,
  checkSwigluBackward,
  sameShape,
} from "../checks/elementwise.ts";
import type { CpuScope } from "./scope.ts";

/** Fresh tensor of a's shape with out[i] = f(x[i], y[i]). */
const zip = (
  sc: CpuScope,
  op: string,
  a: Tensor,
  b: Tensor,
  f: (x: number, y: number) => number,
): Tensor => {
  sameShape(op, a, b);
  const x = sc.f(a, op);
  const y = sc.f(b, op);
  const out = sc.floats(x.length);
  for (let i = 0; i < x.length; i++) out[i] = f(x[i], y[i]);
  return sc.wrap(a.shape, out);
};

const sigmoid = (x: number): number => 1 / (1 + Math.exp(-x));

/** See Ops.add. */
export function add(sc: CpuScope, a: Tensor, b: Tensor): Tensor {
  return zip(sc, "add", a, b, (x, y) => x + y);
}

/** See Ops.sub. */
export function sub(sc: CpuScope, a: Tensor, b: Tensor): Tensor {
  return zip(sc, "sub", a, b, (x, y) => x - y);
}

/** See Ops.mul. */
export function mul(sc: CpuScope, a: Tensor, b: Tensor): Tensor {
  return zip(sc, "mul", a, b, (x, y) => x * y);
}

/** See Ops.scale. */
export function scale(sc: CpuScope, a: Tensor, s: number): Tensor {
  const x = sc.f(a, "scale");
  const out = sc.floats(x.length);
  for (let i = 0; i < x.length; i++) out[i] = s * x[i];
  return sc.wrap(a.shape, out);
}

/** See Ops.addScaled. */
export function addScaled(sc: CpuScope, a: Tensor, b: Tensor, s: number): Tensor {
  return zip(sc, "addScaled", a, b, (x, y) => x + s * y);
}

/** See Ops.addScaledInPlace. */
export function addScaledInPlace(sc: CpuScope, dst: Tensor, src: Tensor, s: number): void {
  sameShape("addScaledInPlace", dst, src, "dst", "src");
  const d = sc.f(dst, "addScaledInPlace");
  const x = sc.f(src, "addScaledInPlace");
  for (let i = 0; i < d.length; i++) d[i] = d[i] + s * x[i];
}

/** See Ops.addRow. */
export function addRow(sc: CpuScope, a: Tensor, row: Tensor): Tensor {
  const [rows, cols] = checkAddRow("addRow", a, row);
  const x = sc.f(a, "addRow");
  const r = sc.f(row, "addRow");
  const out = sc.floats(x.length);
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) out[i * cols + j] = x[i * cols + j] + r[j];
  }
  return sc.wrap(a.shape, out);
}

/** See Ops.sumRows. */
export function sumRows(sc: CpuScope, a: Tensor): Tensor {
  const [rows, cols] = checkSumRows("sumRows", a);
  const x = sc.f(a, "sumRows");
  const acc = new Float64Array(cols);
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) acc[j] += x[i * cols + j];
  }
  const out = sc.floats(cols);
  out.set(acc);
  return sc.wrap([cols], out);
}

/** See Ops.sumSquares. */
export function sumSquares(sc: CpuScope, a: Tensor): Tensor {
  const x = sc.f(a, "sumSquares");
  let acc = 0;
  for (let i = 0; i < x.length; i++) acc += x[i] * x[i];
  const out = sc.floats(1);
  out[0] = acc;
  return sc.wrap([1], out);
}

/** See Ops.sumSquaresEach: each tensor as sumSquares. */
export function sumSquaresEach(sc: CpuScope, ts: readonly Tensor[]): Tensor {
  const out = sc.floats(ts.length);
  ts.forEach((t, i) => {
    const x = sc.f(t, "sumSquaresEach");
    let acc = 0;
    for (let j = 0; j < x.length; j++) acc += x[j] * x[j];
    out[i] = acc;
  });
  return sc.wrap([ts.length], out);
}

/** See Ops.gatherRows. */
export function gatherRows(sc: CpuScope, src: Tensor, rows: ArrayLike<number>): Tensor {
  const [, c] = checkGatherRows("gatherRows", src, rows);
  const x = sc.f(src, "gatherRows");
  const out = sc.floats(rows.length * c);
  for (let i = 0; i < rows.length; i++) {
    out.set(x.subarray(rows[i] * c, rows[i] * c + c), i * c);
  }
  return sc.wrap([rows.length, c], out);
}

/**
 * See Ops.scatterRowsInPlace. Row indices must be distinct (each destination row is written
 * once, so the result does not depend on the order of the writes).
 */
export function scatterRowsInPlace(
  sc: CpuScope,
  dst: Tensor,
  src: Tensor,
  rows: ArrayLike<number>,
): void {
  const op = "scatterRowsInPlace";
  const [, c] = checkScatterRows(op, dst, src, rows);
  const d = sc.f(dst, op);
  // Copy first: src may be a view of dst.
  const x: FloatArray = sc.f(src, op).slice();
  for (let i = 0; i < rows.length; i++) d.set(x.subarray(i * c, i * c + c), rows[i] * c);
}

/** See Ops.swiglu: silu(g) * u with silu(g) = g * sigmoid(g). */
export function swiglu(sc: CpuScope, gate: Tensor, up: Tensor): Tensor {
  sameShape("swiglu", gate, up, "gate", "up");
  return zip(sc, "swiglu", gate, up, (g, u) => g * sigmoid(g) * u);
}

/**
 * See Ops.swigluBackward. With σ = sigmoid(g): dUp = dh · g·σ and
 * dGate = dh · u · σ · (1 + g·(1 - σ)).
 */
export function swigluBackward(
  sc: CpuScope,
  dh: Tensor,
  gate: Tensor,
  up: Tensor,
): { dGate: Tensor; dUp: Tensor } {
  const op = "swigluBackward";
  checkSwigluBackward(op, dh, gate, up);
  const d = sc.f(dh, op);
  const g = sc.f(gate, op);
  const u = sc.f(up, op);
  const dg = sc.floats(g.length);
  const du = sc.floats(g.length);
  for (let i = 0; i < g.length; i++) {
    const s = sigmoid(g[i]);
    du[i] = d[i] * g[i] * s;
    dg[i] = d[i] * u[i] * s * (1 + g[i] * (1 - s));
  }
  return { dGate: sc.wrap(gate.shape, dg), dUp: sc.wrap(gate.shape, du) };
}

/**
 * See Ops.adamw (PyTorch AdamW): g ← gradScale·g; m ← β1·m + (1-β1)·g; v ← β2·v + (1-β2)·g²;
 * p ← p·(1 - lr·wd) - lr · (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + eps). The four tensors must
 * have one shape and distinct storage.
 */
export function adamw(
  sc: CpuScope,
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
  const mm = sc.f(m, op);
  const vv = sc.f(v, op);
  checkAdamwStorage(op, p, g, mm, vv);
  const { lr, beta1, beta2, eps, weightDecay, step } = opts;
  const gs = opts.gradScale ?? 1;
  const bc1 = 1 - beta1 ** step;
  const bc2 = 1 - beta2 ** step;
  const decay = 1 - lr * weightDecay;
  for (let i = 0; i < p.length; i++) {
    const gi = gs * g[i];
    const mi = beta1 * mm[i] + (1 - beta1) * gi;
    const vi = beta2 * vv[i] + (1 - beta2) * gi * gi;
    mm[i] = mi;
    vv[i] = vi;
    p[i] = p[i] * decay - lr * (mi / bc1) / (Math.sqrt(vi / bc2) + eps);
  }
}

/**
 * See Ops.loraFold: a fresh W + s·(B·A). Reads W, B and A only. Where the update s·(B·A)[i,j]
 * is zero the output element is W's, bit for bit (B = 0 reproduces W exactly, -0 included).
 */
export function loraFold(sc: CpuScope, w: Tensor, b: Tensor, a: Tensor, s: number): Tensor {
  const op = "loraFold";
  const [rows, cols, rank] = checkLoraFold(op, w, b, a);
  const wd = sc.fw(w, op);
  const bd = sc.f(b, op);
  const ad = sc.f(a, op);
  const out = sc.floats(rows * cols);
  const acc = new Float64Array(cols);
  for (let i = 0; i < rows; i++) {
    acc.fill(0);
    for (let k = 0; k < rank; k++) {
      const bik = bd[i * rank + k];
      for (let j = 0; j < cols; j++) acc[j] += bik * ad[k * cols + j];
    }
    for (let j = 0; j < cols; j++) {
      const d = s * acc[j];
      out[i * cols + j] = d === 0 ? wd[i * cols + j] : wd[i * cols + j] + d;
    }
  }
  return sc.wrap([rows, cols], out);
}

/** In place: rows [start, start + n) of dst = src (see Ops.setRows). */
export function setRows(sc: CpuScope, dst: Tensor, start: number, src: Tensor): void {
  const op = "setRows";
  const [, c] = checkSetRows(op, dst, start, src);
  const d = sc.any(dst, op).data;
  const x = sc.any(src, op).data;
  // src may share storage with dst (a row view): copy it first then.
  d.set(x.buffer === d.buffer ? x.slice() : x, start * c);
}

/** Columns [start, start + count) of t (see Ops.sliceColumns). */
export function sliceColumns(sc: CpuScope, t: Tensor, start: number, count: number): Tensor {
  const op = "sliceColumns";
  const [r, c] = checkColumnRange(op, t, start, count);
  const x = sc.any(t, op);
  const out = x.dtype === "i32" ? new Int32Array(r * count) : sc.floats(r * count);
  for (let i = 0; i < r; i++) {
    out.set(x.data.subarray(i * c + start, i * c + start + count), i * count);
  }
  return sc.wrap([r, count], out, x.dtype);
}

/** In place: columns [start, start + n) of dst = src (see Ops.setColumns). */
export function setColumns(sc: CpuScope, dst: Tensor, start: number, src: Tensor): void {
  const op = "setColumns";
  const [r, c, n] = checkSetColumns(op, dst, start, src);
  const d = sc.any(dst, op).data;
  const s0 = sc.any(src, op).data;
  const x = s0.buffer === d.buffer ? s0.slice() : s0;
  for (let i = 0; i < r; i++) d.set(x.subarray(i * n, i * n + n), i * c + start);
}
