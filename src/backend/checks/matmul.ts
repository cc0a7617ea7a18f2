/**
 * Argument and shape validation of Ops.matmul, shared by the CPU and WebGPU backends so that both
 * raise the same ShapeErrors.
 * @module
 */
import type { LoraProjection, MatmulOptions, SwigluPart } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import { ensure } from "../tensor.ts";
import { checkRowRange } from "./elementwise.ts";
import { checkRopeOf } from "./layers.ts";

/** Shapes of op(A) [M,K] and op(B) [K,N]; throws ShapeError on a non-2-D operand or a mismatch. */
export const matmulDims = (
  op: string,
  a: Tensor,
  b: Tensor,
  opts: MatmulOptions | undefined,
): { m: number; n: number; k: number; transA: boolean; transB: boolean } => {
  const transA = opts?.transA ?? false;
  const transB = opts?.transB ?? false;
  ensure(a.shape.length === 2, op, () => `a must be 2-D, got shape [${a.shape}]`);
  ensure(b.shape.length === 2, op, () => `b must be 2-D, got shape [${b.shape}]`);
  const [m, k] = transA ? [a.shape[1], a.shape[0]] : [a.shape[0], a.shape[1]];
  const [kb, n] = transB ? [b.shape[1], b.shape[0]] : [b.shape[0], b.shape[1]];
  ensure(
    k === kb,
    op,
    () =>
      `inner dimensions differ: op(a) is [${m},${k}] (a [${a.shape}]${
        transA ? ", transA" : ""
      }), ` +
      `op(b) is [${kb},${n}] (b [${b.shape}]${transB ? ", transB" : ""})`,
  );
  return { m, n, k, transA, transB };
};

/** matmulDims for Ops.matmulAccumulate, with c checked to be 2-D [M, N]. */
export const accumulateDims = (
  op: string,
  c: Tensor,
  a: Tensor,
  b: Tensor,
  opts: MatmulOptions | undefined,
): { m: number; n: number; k: number; transA: boolean; transB: boolean } => {
  const d = matmulDims(op, a, b, opts);
  ensure(
    c.shape.length === 2 && c.shape[0] === d.m && c.shape[1] === d.n,
    op,
    () => `c is [${c.shape}], the product [${d.m},${d.n}]`,
  );
  return d;
};

/**
 * Shapes of Ops.accumulateRows: c [M,N] += x [M,count]·w[start, start + count) (w [R,N]); the
 * range within w's rows. Returns [M, N].
 */
export const accumulateRowsDims = (
  op: string,
  c: Tensor,
  x: Tensor,
  w: Tensor,
  start: number,
  count: number,
): [number, number] => {
  ensure(w.shape.length === 2, op, () => `w must be 2-D, got [${w.shape}]`);
  const [, n] = checkRowRange(op, w, start, count);
  ensure(x.shape.length === 2 && x.shape[1] === count, op, () => `x [${x.shape}], ${count} rows`);
  const m = x.shape[0];
  ensure(
    c.shape.length === 2 && c.shape[0] === m && c.shape[1] === n,
    op,
    () => `c is [${c.shape}], the product [${m},${n}]`,
  );
  return [m, n];
};

/** Shapes of Ops.projectLora: x [M,K]·w [N,K]ᵀ and xa [M,R]·b [N,R]ᵀ, the same [M, N]. */
export const projectLoraDims = (
  op: string,
  x: Tensor,
  w: Tensor,
  xa: Tensor,
  b: Tensor,
  into?: Tensor,
): { m: number; n: number; k: number; r: number } => {
  const base = matmulDims(op, x, w, { transB: true });
  const delta = matmulDims(op, xa, b, { transB: true });
  ensure(
    delta.m === base.m && delta.n === base.n,
    op,
    () => `the delta xa·bᵀ is [${delta.m},${delta.n}], the projection [${base.m},${base.n}]`,
  );
  ensure(
    !into || (into.shape.length === 2 && into.shape[0] === base.m && into.shape[1] === base.n),
    op,
    () => `into is [${into!.shape}], the projection [${base.m},${base.n}]`,
  );
  ensure(into !== x && into !== xa, op, () => "into is an input of the product");
  return { m: base.m, n: base.n, k: base.k, r: delta.k };
};

/**
 * Shapes of Ops.projectLoraShared: for each part x [M,K]·w [N,K]ᵀ, x·a [R,K]ᵀ and b [N,R]
 * (the delta (x·aᵀ)·bᵀ the size of the projection), and `into`, when given, [M,N] and not x.
 */
export const projectLoraSharedDims = (
  op: string,
  x: Tensor,
  parts: readonly LoraProjection[],
): { m: number; n: number; k: number; r: number }[] =>
  parts.map((p) => {
    const base = matmulDims(op, x, p.w, { transB: true });
    const xa = matmulDims(op, x, p.a, { transB: true });
    ensure(
      p.b.shape.length === 2 && p.b.shape[0] === base.n && p.b.shape[1] === xa.n,
      op,
      () => `b is [${p.b.shape}], the delta needs [${base.n},${xa.n}]`,
    );
    const into = p.into;
    ensure(
      !into || (into.shape.length === 2 && into.shape[0] === base.m && into.shape[1] === base.n),
      op,
      () => `into is [${into!.shape}], the projection [${base.m},${base.n}]`,
    );
    ensure(into !== x, op, () => "into is the input x");
    if (p.rope) {
      ensure(!into, op, () => "a rotated projection cannot be added onto a tensor");
      const { positions, heads, headDim, theta } = p.rope;
      checkRopeOf(op, [base.m, base.n], positions, heads, headDim, theta);
    }
    return { m: base.m, n: base.n, k: base.k, r: xa.n };
  });

/** Checks Ops.projectSwiglu: both halves [N,K] of x's K with the same N; their pairs. */
export const projectSwigluDims = (
  op: string,
  x: Tensor,
  gate: SwigluPart,
  up: SwigluPart,
): { m: number; n: number; k: number } => {
  const [g, u] = [gate, up].map((p) => {
    const base = matmulDims(op, x, p.w, { transB: true });
    if (p.lora) projectLoraSharedDims(op, x, [{ w: p.w, a: p.lora.a, b: p.lora.b }]);
    return base;
  });
  ensure(g.n === u.n, op, () => `gate has ${g.n} rows, up ${u.n}`);
  return { m: g.m, n: g.n, k: g.k };
};
