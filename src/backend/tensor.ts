/**
 * Tensor handles shared by every backend. A tensor is an opaque handle: its data lives in the
 * backend (a typed array on the CPU, a GPU buffer on WebGPU) and is reached only through `Ops`.
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";

/**
 * Element type: `f32` for values, `i32` for token ids and positions, and the 16-bit storage
 * formats `bf16` / `f16` of a frozen base's weights (stored compactly, widened to f32 inside the
 * few ops that read base weights: matmul, embedding, the row slices, loraFold, widen, read).
 */
export type DType = "f32" | "i32" | HalfDType;

/** A 16-bit storage format: bfloat16 or IEEE half. Gradients never flow into such tensors. */
export type HalfDType = "bf16" | "f16";

/** True for the 16-bit storage formats. */
export const isHalfDType = (d: DType): d is HalfDType => d === "bf16" || d === "f16";

/** Host arrays the backends hand back. The CPU reference in f64 mode returns Float64Array. */
export type FloatArray = Float32Array | Float64Array;

/** A handle to backend-owned data of a fixed shape. Immutable except through in-place ops. */
export interface Tensor {
  readonly shape: readonly number[];
  readonly dtype: DType;
  /** Number of elements (product of shape). */
  readonly size: number;
  /** Which backend created it ("cpu" | "webgpu"); ops refuse tensors from another backend. */
  readonly backend: string;
}

const ShapeErrorBase: TaggedErrorClass<"ShapeError", {
  /** The op that refused its arguments. */
  readonly op: string;
  /** What does not fit, in words. */
  readonly reason: string;
}> = taggedError(
  "ShapeError",
  (e) => `${e.op}: ${e.reason}`,
);
/** A shape or dtype that an op cannot accept: a programming error, thrown synchronously. */
export class ShapeError extends ShapeErrorBase {}

const ReleasedTensorErrorBase: TaggedErrorClass<"ReleasedTensorError", {
  /** The op given the released tensor. */
  readonly op: string;
  /** The shape of the released tensor. */
  readonly shape: readonly number[];
}> = taggedError(
  "ReleasedTensorError",
  (e) => `${e.op}: tensor [${e.shape}] used after its scope closed`,
);
/** A tensor used after the scope that owned it closed. */
export class ReleasedTensorError extends ReleasedTensorErrorBase {}

/** Product of dimensions; validates that every dimension is a non-negative integer. */
export const sizeOf = (shape: readonly number[]): number => {
  let n = 1;
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 0) {
      throw new ShapeError({ op: "shape", reason: `invalid dimension ${d} in [${shape}]` });
    }
    n *= d;
  }
  return n;
};

/** Throws a ShapeError unless `cond` holds; `reason` is only evaluated on failure. */
export const ensure = (cond: boolean, op: string, reason: () => string): void => {
  if (!cond) throw new ShapeError({ op, reason: reason() });
};

/** Checks `t.shape` equals `shape` (use -1 for "any"). */
export const expectShape = (
  op: string,
  name: string,
  t: Tensor,
  shape: readonly number[],
): void => {
  ensure(
    t.shape.length === shape.length && shape.every((d, i) => d === -1 || d === t.shape[i]),
    op,
    () => `${name} has shape [${t.shape}], expected [${shape.map((d) => d === -1 ? "*" : d)}]`,
  );
};

/** Shape as a matrix [rows, cols]: all leading dims folded into rows. */
export const asMatrix = (t: Tensor): [number, number] => {
  const cols = t.shape.length === 0 ? 1 : t.shape[t.shape.length - 1];
  return [cols === 0 ? 0 : t.size / cols, cols];
};
