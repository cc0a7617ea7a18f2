/**
 * Argument and shape validation of Ops.matmul, shared by the CPU and WebGPU backends so that both
 * raise the same ShapeErrors.
 * @module
 */
import type { MatmulOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import { ensure } from "../tensor.ts";

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
