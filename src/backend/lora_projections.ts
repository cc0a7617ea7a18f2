/**
 * Ops.projectLoraShared and Ops.projectSwiglu composed projection by projection from a backend's
 * own products: the CPU twins, and the WebGPU paths for shapes their shared products do not take.
 * @module
 */
import type { LoraProjection, MatmulOptions, RopeFrequencies, SwigluPart } from "./ops.ts";
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
  readonly projectLora: (
    x: Tensor,
    w: Tensor,
    xa: Tensor,
    b: Tensor,
    s: number,
    into?: Tensor,
  ) => Tensor;
  /** Ops.rope, for the parts with a RopeFold. */
  readonly rope: (
    x: Tensor,
    positions: Tensor,
    heads: number,
    headDim: number,
    theta: RopeFrequencies,
  ) => Tensor;
}

/**
 * Each part's x·aᵀ, then its projection with the delta (added onto `into` when given), rotated
 * when the part has a RopeFold.
 */
export const projectEachLora = (
  ops: LoraProducts,
  x: Tensor,
  parts: readonly LoraProjection[],
  s: number,
): Tensor[] =>
  parts.map((p) => {
    const xa = ops.matmul(x, p.a, { transB: true });
    const y = ops.projectLora(x, p.w, xa, p.b, s, p.into);
    return p.rope ? rotated(ops, y, p) : y;
  });

/** A part's output y rotated by its RopeFold (see LoraProjection.rope), else y. */
export const rotated = (
  ops: Pick<LoraProducts, "rope">,
  y: Tensor,
  p: LoraProjection,
): Tensor => {
  if (!p.rope) return y;
  const { positions, heads, headDim, theta } = p.rope;
  return ops.rope(y, positions, heads, headDim, theta);
};

/**
 * Ops.projectSwiglu as its parts: both adapted halves through the backend's projectLoraShared
 * (one x·Aᵀ product where it can), a bare half as a plain product, then swiglu.
 */
export const projectSwigluEach = (
  ops: Omit<LoraProducts, "rope"> & {
    readonly projectLoraShared: (x: Tensor, p: readonly LoraProjection[], s: number) => Tensor[];
    readonly swiglu: (gate: Tensor, up: Tensor) => Tensor;
  },
  x: Tensor,
  gate: SwigluPart,
  up: SwigluPart,
  s: number,
): Tensor => {
  const [g, u] = gate.lora && up.lora
    ? ops.projectLoraShared(x, [
      { w: gate.w, a: gate.lora.a, b: gate.lora.b },
      { w: up.w, a: up.lora.a, b: up.lora.b },
    ], s)
    : [gate, up].map((p) =>
      p.lora
        ? ops.projectLora(x, p.w, ops.matmul(x, p.lora.a, { transB: true }), p.lora.b, s)
        : ops.matmul(x, p.w, { transB: true })
    );
  return ops.swiglu(g, u);
};
