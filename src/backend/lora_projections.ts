/**
 * Ops.projectLoraShared and Ops.projectSwiglu composed projection by projection from a backend's
 * own products: the CPU twins, and the WebGPU paths for shapes their shared products do not take.
 * @module
 */
import type { LoraProjection, MatmulOptions, SwigluPart } from "./ops.ts";
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
    return ops.projectLora(x, p.w, xa, p.b, s, p.into);
  });

/**
 * Ops.projectSwiglu as its parts: both adapted halves through the backend's projectLoraShared
 * (one x·Aᵀ product where it can), a bare half as a plain product, then swiglu.
 */
export const projectSwigluEach = (
  ops: LoraProducts & {
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
