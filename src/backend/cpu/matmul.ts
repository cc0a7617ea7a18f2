/**
 * CPU backend: matmul (reference and fallback). Operands are brought to row-major op(A) [M,K]
 * and op(B) [K,N] (a transposed operand is copied once, which costs O(MK + KN) against the
 * O(MNK) product), then a cache-blocked i-k-j loop with a contiguous inner loop over N runs,
 * four k-steps at a time into a float64 row accumulator.
 * @module
 */
import type { MatmulOptions } from "../ops.ts";
import type { FloatArray, Tensor } from "../tensor.ts";
import { require } from "../tensor.ts";
import type { CpuScope } from "./scope.ts";

/** Columns of C per block: a KB x NB panel of B (<= 512 KiB in f32) stays in L2. */
const NB = 512;
/** k-steps per block. */
const KB = 256;

/** Shapes of op(A) [M,K] and op(B) [K,N]; throws ShapeError on a non-2-D operand or a mismatch. */
export const matmulDims = (
  op: string,
  a: Tensor,
  b: Tensor,
  opts: MatmulOptions | undefined,
): { m: number; n: number; k: number; transA: boolean; transB: boolean } => {
  const transA = opts?.transA ?? false;
  const transB = opts?.transB ?? false;
  require(a.shape.length === 2, op, () => `a must be 2-D, got shape [${a.shape}]`);
  require(b.shape.length === 2, op, () => `b must be 2-D, got shape [${b.shape}]`);
  const [m, k] = transA ? [a.shape[1], a.shape[0]] : [a.shape[0], a.shape[1]];
  const [kb, n] = transB ? [b.shape[1], b.shape[0]] : [b.shape[0], b.shape[1]];
  require(
    k === kb,
    op,
    () =>
      `inner dimensions differ: op(a) is [${m},${k}] (a [${a.shape}]${transA ? ", transA" : ""}), ` +
      `op(b) is [${kb},${n}] (b [${b.shape}]${transB ? ", transB" : ""})`,
  );
  return { m, n, k, transA, transB };
};

/** Row-major transpose of src [rows, cols] into a fresh float64 [cols, rows]. */
const transpose = (src: FloatArray, rows: number, cols: number): Float64Array => {
  const out = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    const s = r * cols;
    for (let c = 0; c < cols; c++) out[c * rows + r] = src[s + c];
  }
  return out;
};

/** c[M,N] = a[M,K]·b[K,N], all row-major; c must be zero on entry. */
const gemm = (
  a: FloatArray,
  b: FloatArray,
  c: FloatArray,
  m: number,
  n: number,
  k: number,
): void => {
  const acc = new Float64Array(Math.min(n, NB));
  for (let j0 = 0; j0 < n; j0 += NB) {
    const nb = Math.min(NB, n - j0);
    for (let k0 = 0; k0 < k; k0 += KB) {
      const k1 = Math.min(k, k0 + KB);
      for (let i = 0; i < m; i++) {
        acc.fill(0);
        const ar = i * k;
        let p = k0;
        for (; p + 4 <= k1; p += 4) {
          const a0 = a[ar + p];
          const a1 = a[ar + p + 1];
          const a2 = a[ar + p + 2];
          const a3 = a[ar + p + 3];
          const b0 = p * n + j0;
          const b1 = b0 + n;
          const b2 = b1 + n;
          const b3 = b2 + n;
          for (let j = 0; j < nb; j++) {
            acc[j] += a0 * b[b0 + j] + a1 * b[b1 + j] + a2 * b[b2 + j] + a3 * b[b3 + j];
          }
        }
        for (; p < k1; p++) {
          const a0 = a[ar + p];
          const b0 = p * n + j0;
          for (let j = 0; j < nb; j++) acc[j] += a0 * b[b0 + j];
        }
        const cr = i * n + j0;
        for (let j = 0; j < nb; j++) c[cr + j] += acc[j];
      }
    }
  }
};

/** c[M,N] = a[M,K]·b[N,K]ᵀ by row dot products (both operands contiguous; used for few rows). */
const gemmDot = (
  a: FloatArray,
  b: FloatArray,
  c: FloatArray,
  m: number,
  n: number,
  k: number,
): void => {
  for (let i = 0; i < m; i++) {
    const ar = i * k;
    for (let j = 0; j < n; j++) {
      const br = j * k;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      let p = 0;
      for (; p + 4 <= k; p += 4) {
        s0 += a[ar + p] * b[br + p];
        s1 += a[ar + p + 1] * b[br + p + 1];
        s2 += a[ar + p + 2] * b[br + p + 2];
        s3 += a[ar + p + 3] * b[br + p + 3];
      }
      for (; p < k; p++) s0 += a[ar + p] * b[br + p];
      c[i * n + j] = (s0 + s1) + (s2 + s3);
    }
  }
};

/** See Ops.matmul: C[M,N] = op(A)·op(B) in the scope precision. */
export function matmul(sc: CpuScope, a: Tensor, b: Tensor, opts?: MatmulOptions): Tensor {
  const { m, n, k, transA, transB } = matmulDims("matmul", a, b, opts);
  const ad = sc.f(a, "matmul");
  const bd = sc.f(b, "matmul");
  const out = sc.out([m, n]);
  if (m === 0 || n === 0 || k === 0) return out;
  const c = out.data as FloatArray;
  if (transB && !transA && m < 8) {
    // Few rows (decoding): transposing b would cost as much as the product itself.
    gemmDot(ad, bd, c, m, n, k);
    return out;
  }
  const am = transA ? transpose(ad, k, m) : ad;
  const bm = transB ? transpose(bd, n, k) : bd;
  gemm(am, bm, c, m, n, k);
  return out;
}
