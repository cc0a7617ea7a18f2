/**
 * CPU reference backend: storage and lifetime. Values are Float32Array (or Float64Array in the
 * f64 mode that tests use as a float64 reference), ids Int32Array, 16-bit tensors (bf16 / f16)
 * their raw bits in a Uint16Array, widened exactly where an op reads them (`fw`), so that the
 * reference computes on the very values the WebGPU kernels widen.
 * @module
 */
import type { DType, FloatArray, HalfDType, Tensor } from "../tensor.ts";
import { ensure, isHalfDType, ReleasedTensorError, ShapeError, sizeOf } from "../tensor.ts";
import { widenHalfBits } from "../../io/safetensors.ts";

/** Arithmetic precision of the CPU backend. */
export type CpuPrecision = "f32" | "f64";

interface Life {
  released: boolean;
}

/** A tensor of the CPU backend. */
export class CpuTensor implements Tensor {
  readonly backend = "cpu";
  readonly size: number;
  constructor(
    readonly shape: readonly number[],
    readonly dtype: DType,
    /** @internal */ readonly data: FloatArray | Int32Array | Uint16Array,
    /** @internal */ readonly life: Life,
  ) {
    this.size = sizeOf(shape);
  }
}

/** Allocation and access for CPU op implementations; one per Ops scope. */
export class CpuScope {
  private readonly life: Life = { released: false };
  constructor(readonly precision: CpuPrecision) {}

  /** Fresh float storage of the backend precision. */
  floats(n: number): FloatArray {
    return this.precision === "f64" ? new Float64Array(n) : new Float32Array(n);
  }

  /** Wraps storage as a tensor owned by this scope. */
  wrap(
    shape: readonly number[],
    data: FloatArray | Int32Array | Uint16Array,
    dtype: DType = "f32",
  ): CpuTensor {
    ensure(sizeOf(shape) === data.length, "wrap", () => `shape [${shape}] vs ${data.length}`);
    return new CpuTensor(shape, dtype, data, this.life);
  }

  /** Fresh zero-filled f32 tensor. */
  out(shape: readonly number[]): CpuTensor {
    return this.wrap(shape, this.floats(sizeOf(shape)));
  }

  private check(t: Tensor, op: string): CpuTensor {
    if (!(t instanceof CpuTensor)) {
      throw new ShapeError({ op, reason: `tensor from backend "${t.backend}" given to cpu` });
    }
    if (t.life.released) {
      throw new ReleasedTensorError({ op, shape: t.shape });
    }
    return t;
  }

  /** Float storage of `t` (checked: this backend, alive, f32). */
  f(t: Tensor, op: string): FloatArray {
    const c = this.check(t, op);
    ensure(c.dtype === "f32", op, () => `expected f32 tensor, got ${c.dtype}`);
    return c.data as FloatArray;
  }

  /**
   * Float values of `t` (checked: f32 or 16-bit): an f32 tensor's own storage, a 16-bit one's
   * values widened exactly into fresh storage of the backend precision.
   */
  fw(t: Tensor, op: string): FloatArray {
    const c = this.check(t, op);
    if (!isHalfDType(c.dtype)) return this.f(t, op);
    return this.widen(c.data as Uint16Array, c.dtype);
  }

  /** 16-bit bits widened exactly into fresh storage of the backend precision. */
  widen(bits: Uint16Array, dtype: HalfDType): FloatArray {
    const w = widenHalfBits(bits, dtype);
    return this.precision === "f64" ? Float64Array.from(w) : w;
  }

  /** Int storage of `t` (checked: this backend, alive, i32). */
  i(t: Tensor, op: string): Int32Array {
    const c = this.check(t, op);
    ensure(c.dtype === "i32", op, () => `expected i32 tensor, got ${c.dtype}`);
    return c.data as Int32Array;
  }

  /** Any storage of `t` (checked). */
  any(t: Tensor, op: string): CpuTensor {
    return this.check(t, op);
  }

  /** Releases every tensor of this scope: later use raises ReleasedTensorError. */
  release(): void {
    this.life.released = true;
  }
}
