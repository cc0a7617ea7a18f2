/**
 * Ops.projectLoraShared composed projection by projection from a backend's own products: the CPU
 * twin, and the WebGPU paths for shapes their shared product does not take.
 * @module
 */
import type { LoraProjection, MatmulOptions } from "./ops.ts";
import type { Tensor } from "./tensor.ts";

/** A backend's own products, for projectEachLora. */
export interface LoraProducts {
  readonly matmul: (a: Tensor, b: Tensor, opts?: MatmulOptions) => Tensor;
  readonly matmulAccumulate: (
    c: Tensor,
    a: Tensor,
    b: Tensor,
    s: number,
    opts?: MatmulOptions,
  ) => void;
  readonly projectLora: (x: Tensor, w: Tensor, xa: Tensor, b: Tensor, s: number) => Tensor;
}

/** Each part's x·aᵀ, then its projection with the delta (added onto `into` when given). */
export const projectEachLora = (
  ops: LoraProducts,
  x: Tensor,
  parts: readonly LoraProjection[],
  s: number,
): Tensor[] =>
  parts.map((p) => {
    const xa = ops.matmul(x, p.a, { transB: true });
    if (!p.into) return ops.projectLora(x, p.w, xa, p.b, s);
    ops.matmulAccumulate(p.into, x, p.w, 1, { transB: true });
    ops.matmulAccumulate(p.into, xa, p.b, s, { transB: true });
    return p.into;
  });
