/**
 * CPU backend: matmul (reference and fallback). Operands are brought to row-major op(A) [M,K]
 * and op(B) [K,N] (a transposed operand is copied once, which costs O(MK + KN) against the
 * O(MNK) product), then a cache-blocked i-k-j loop with a contiguous inner loop over N runs,
 * four rows and four k-steps at a time (accumulating in the output's precision).
 * @module
 */
import { projectEachLora, projectSwigluEach } from "../lora_projections.ts";
import type { LoraProjection, MatmulOptions, SwigluPart } from "../ops.ts";
import type { FloatArray, HalfDType, Tensor } from "../tensor.ts";
import { isHalfDType } from "../tensor.ts";
import {
  accumulateDims,
  matmulDims,
  projectLoraDims,
  projectLoraSharedDims,
  projectSwigluDims,
} from "../checks/matmul.ts";
import { addScaledInPlace, swiglu } from "./elementwise.ts";
import { rope } from "./layers.ts";
import type { CpuScope } from "./scope.ts";

/** Columns of C per block: a KB x NB panel of B (128 KiB in f32) stays in L2. */
const NB = 256;
/** k-steps per block. */
const KB = 128;
/** Rows of a 16-bit b widened at a time by the few-rows path. */
const DOT_PANEL = 1024;

/** Row-major transpose of src [rows, cols] into a fresh [cols, rows] of the same precision. */
const transpose = (src: FloatArray, rows: number, cols: number): FloatArray => {
  const out = src instanceof Float32Array
    ? new Float32Array(rows * cols)
    : new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    const s = r * cols;
    for (let c = 0; c < cols; c++) out[c * rows + r] = src[s + c];
  }
  return out;
};

/**
 * c[M,N] += a[M,K]·b[K,N], all row-major. Blocked over N and K; four rows of C take four k-steps
 * per pass over a row segment, so each loaded element of B feeds 16 multiply-adds.
 */
const gemm = (
  a: FloatArray,
  b: FloatArray,
  c: FloatArray,
  m: number,
  n: number,
  k: number,
): void => {
  for (let j0 = 0; j0 < n; j0 += NB) {
    const j1 = Math.min(n, j0 + NB);
    for (let k0 = 0; k0 < k; k0 += KB) {
      const k1 = Math.min(k, k0 + KB);
      let i = 0;
      for (; i + 4 <= m; i += 4) {
        const r0 = i * k, r1 = r0 + k, r2 = r1 + k, r3 = r2 + k;
        const c0 = i * n, c1 = c0 + n, c2 = c1 + n, c3 = c2 + n;
        let p = k0;
        for (; p + 4 <= k1; p += 4) {
          const a00 = a[r0 + p], a01 = a[r0 + p + 1], a02 = a[r0 + p + 2], a03 = a[r0 + p + 3];
          const a10 = a[r1 + p], a11 = a[r1 + p + 1], a12 = a[r1 + p + 2], a13 = a[r1 + p + 3];
          const a20 = a[r2 + p], a21 = a[r2 + p + 1], a22 = a[r2 + p + 2], a23 = a[r2 + p + 3];
          const a30 = a[r3 + p], a31 = a[r3 + p + 1], a32 = a[r3 + p + 2], a33 = a[r3 + p + 3];
          const b0 = p * n, b1 = b0 + n, b2 = b1 + n, b3 = b2 + n;
          for (let j = j0; j < j1; j++) {
            const x0 = b[b0 + j], x1 = b[b1 + j], x2 = b[b2 + j], x3 = b[b3 + j];
            c[c0 + j] += a00 * x0 + a01 * x1 + a02 * x2 + a03 * x3;
            c[c1 + j] += a10 * x0 + a11 * x1 + a12 * x2 + a13 * x3;
            c[c2 + j] += a20 * x0 + a21 * x1 + a22 * x2 + a23 * x3;
            c[c3 + j] += a30 * x0 + a31 * x1 + a32 * x2 + a33 * x3;
          }
        }
        for (; p < k1; p++) {
          const a0 = a[r0 + p], a1 = a[r1 + p], a2 = a[r2 + p], a3 = a[r3 + p];
          const b0 = p * n;
          for (let j = j0; j < j1; j++) {
            const x = b[b0 + j];
            c[c0 + j] += a0 * x;
            c[c1 + j] += a1 * x;
            c[c2 + j] += a2 * x;
            c[c3 + j] += a3 * x;
          }
        }
      }
      // Leftover rows use exactly the per-row arithmetic of the 4-row path (k in groups of
      // four, each group summed then added to C), so a row's result never depends on the batch.
      for (; i < m; i++) {
        const ar = i * k;
        const cr = i * n;
        let p = k0;
        for (; p + 4 <= k1; p += 4) {
          const a0 = a[ar + p], a1 = a[ar + p + 1], a2 = a[ar + p + 2], a3 = a[ar + p + 3];
          const b0 = p * n, b1 = b0 + n, b2 = b1 + n, b3 = b2 + n;
          for (let j = j0; j < j1; j++) {
            c[cr + j] += a0 * b[b0 + j] + a1 * b[b1 + j] + a2 * b[b2 + j] + a3 * b[b3 + j];
          }
        }
        for (; p < k1; p++) {
          const a0 = a[ar + p];
          const b0 = p * n;
          for (let j = j0; j < j1; j++) c[cr + j] += a0 * b[b0 + j];
        }
      }
    }
  }
};

/**
 * c[M, j0 + j] = a[M,K]·b[N,K]ᵀ for j < N by row dot products (both operands contiguous; used
 * for few rows), c of row stride `ldc`.
 */
const gemmDot = (
  a: FloatArray,
  b: FloatArray,
  c: FloatArray,
  m: number,
  n: number,
  k: number,
  ldc = n,
  j0 = 0,
): void => {
  // Same summation order and rounding as gemm (groups of four k-steps added to an accumulator
  // stored in C's precision), so decoding a row gives the bits a batched product gives.
  const round = c instanceof Float32Array ? Math.fround : (x: number) => x;
  for (let i = 0; i < m; i++) {
    const ar = i * k;
    for (let j = 0; j < n; j++) {
      const br = j * k;
      let acc = 0;
      let p = 0;
      for (; p + 4 <= k; p += 4) {
        acc = round(
          acc + (a[ar + p] * b[br + p] + a[ar + p + 1] * b[br + p + 1] +
            a[ar + p + 2] * b[br + p + 2] + a[ar + p + 3] * b[br + p + 3]),
        );
      }
      for (; p < k; p++) acc = round(acc + a[ar + p] * b[br + p]);
      c[i * ldc + j0 + j] = acc;
    }
  }
};

/** See Ops.matmul: C[M,N] = op(A)·op(B) in the scope precision. */
export function matmul(sc: CpuScope, a: Tensor, b: Tensor, opts?: MatmulOptions): Tensor {
  const { m, n, k, transA, transB } = matmulDims("matmul", a, b, opts);
  // a 16-bit operand (a frozen base weight) is widened exactly into a temporary
  const ad = sc.fw(a, "matmul");
  const bt = sc.any(b, "matmul");
  const bHalf = isHalfDType(bt.dtype);
  if (!bHalf) sc.f(b, "matmul"); // f32 or 16-bit: anything else is a ShapeError
  const out = sc.out([m, n]);
  if (m === 0 || n === 0 || k === 0) return out;
  const c = out.data as FloatArray;
  if (transB && !transA && m < 8) {
    // Few rows (decoding): transposing b would cost as much as the product itself. A 16-bit b
    // (a vocabulary-sized head) is widened a panel of rows at a time, not whole.
    if (!bHalf) {
      gemmDot(ad, sc.f(b, "matmul"), c, m, n, k);
      return out;
    }
    const bits = bt.data as Uint16Array;
    for (let j0 = 0; j0 < n; j0 += DOT_PANEL) {
      const j1 = Math.min(n, j0 + DOT_PANEL);
      const panel = sc.widen(bits.subarray(j0 * k, j1 * k), bt.dtype as HalfDType);
      gemmDot(ad, panel, c, m, j1 - j0, k, n, j0);
    }
    return out;
  }
  const bd = sc.fw(b, "matmul");
  const am = transA ? transpose(ad, k, m) : ad;
  const bm = transB ? transpose(bd, n, k) : bd;
  gemm(am, bm, c, m, n, k);
  return out;
}

/** See Ops.matmulAccumulate: c += s·op(A)·op(B), the product rounded as matmul rounds it. */
export function matmulAccumulate(
  sc: CpuScope,
  c: Tensor,
  a: Tensor,
  b: Tensor,
  s: number,
  opts?: MatmulOptions,
): void {
  const op = "matmulAccumulate";
  accumulateDims(op, c, a, b, opts);
  const d = sc.f(c, op);
  const p = sc.f(matmul(sc, a, b, opts), op);
  for (let i = 0; i < d.length; i++) d[i] = d[i] + s * p[i];
}

/**
 * See Ops.projectLora: the projection, then the delta accumulated onto it (then that added onto
 * `into`, as the residual add it replaces).
 */
export function projectLora(
  sc: CpuScope,
  x: Tensor,
  w: Tensor,
  xa: Tensor,
  b: Tensor,
  s: number,
  into?: Tensor,
): Tensor {
  const op = "projectLora";
  projectLoraDims(op, x, w, xa, b, into);
  const y = matmul(sc, x, w, { transB: true });
  matmulAccumulate(sc, y, xa, b, s, { transB: true });
  if (!into) return y;
  addScaledInPlace(sc, into, y, 1);
  return into;
}

/** See Ops.projectLoraShared: each projection as projectLora with its own x·aᵀ. */
export function projectLoraShared(
  sc: CpuScope,
  x: Tensor,
  parts: readonly LoraProjection[],
  s: number,
): Tensor[] {
  projectLoraSharedDims("projectLoraShared", x, parts);
  return projectEachLora(
    {
      matmul: (a, b, opts) => matmul(sc, a, b, opts),
      matmulAccumulate: (c, a, b, k, opts) => matmulAccumulate(sc, c, a, b, k, opts),
      projectLora: (xx, w, xa, b, k, into) => projectLora(sc, xx, w, xa, b, k, into),
      rope: (y, pos, heads, hd, theta) => rope(sc, y, pos, heads, hd, theta),
    },
    x,
    parts,
    s,
  );
}

/** See Ops.projectSwiglu: the two projections, then swiglu. */
export function projectSwiglu(
  sc: CpuScope,
  x: Tensor,
  gate: SwigluPart,
  up: SwigluPart,
  s: number,
): Tensor {
  projectSwigluDims("projectSwiglu", x, gate, up);
  return projectSwigluEach(
    {
      matmul: (a, b, opts) => matmul(sc, a, b, opts),
      matmulAccumulate: (c, a, b, k, opts) => matmulAccumulate(sc, c, a, b, k, opts),
      projectLora: (xx, w, xa, b, k, into) => projectLora(sc, xx, w, xa, b, k, into),
      projectLoraShared: (xx, parts, k) => projectLoraShared(sc, xx, parts, k),
      swiglu: (g, u) => swiglu(sc, g, u),
    },
    x,
    gate,
    up,
    s,
  );
}
