/**
 * WebGPU backend: tensors and their lifetime. A scope owns the buffers of the tensors it
 * creates and returns them to the context's pool when it closes.
 * @module
 */
import type { DType, Tensor } from "../tensor.ts";
import { ensure, ReleasedTensorError, ShapeError, sizeOf } from "../tensor.ts";
import type { GpuContext, Param } from "./context.ts";

interface Life {
  released: boolean;
}

/** A tensor of the WebGPU backend. */
export class GpuTensor implements Tensor {
  readonly backend = "webgpu";
  readonly size: number;
  constructor(
    readonly shape: readonly number[],
    readonly dtype: DType,
    /** @internal */ readonly buffer: GPUBuffer,
    /** @internal */ readonly life: Life,
  ) {
    this.size = sizeOf(shape);
  }
}

/** Allocation, access and dispatch for WebGPU op implementations; one per Ops scope. */
export class GpuScope {
  private readonly life: Life = { released: false };
  private readonly owned: GPUBuffer[] = [];
  constructor(readonly ctx: GpuContext) {}

  /** Fresh tensor owned by this scope, contents undefined (kernels must write every element). */
  out(shape: readonly number[], dtype: DType = "f32"): GpuTensor {
    const buf = this.ctx.alloc(sizeOf(shape) * 4);
    this.owned.push(buf);
    return new GpuTensor(shape, dtype, buf, this.life);
  }

  /** Fresh zero-filled tensor owned by this scope. */
  zeros(shape: readonly number[], dtype: DType = "f32"): GpuTensor {
    const t = this.out(shape, dtype);
    this.ctx.clear(t.buffer, t.size * 4);
    return t;
  }

  /** Fresh tensor holding host data. */
  upload(data: Float32Array | Int32Array, shape: readonly number[], dtype: DType): GpuTensor {
    const buf = this.ctx.upload(data);
    this.owned.push(buf);
    return new GpuTensor(shape, dtype, buf, this.life);
  }

  /** View of `t` with another shape (shares the buffer and the owner's lifetime). */
  view(t: Tensor, shape: readonly number[]): GpuTensor {
    const g = this.check(t, "reshape");
    return new GpuTensor(shape, g.dtype, g.buffer, g.life);
  }

  private check(t: Tensor, op: string): GpuTensor {
    if (!(t instanceof GpuTensor)) {
      throw new ShapeError({ op, reason: `tensor from backend "${t.backend}" given to webgpu` });
    }
    if (t.life.released) {
      throw new ReleasedTensorError({ op, shape: t.shape });
    }
    return t;
  }

  /** Buffer of an f32 tensor (checked: this backend, alive, f32). */
  f(t: Tensor, op: string): GPUBuffer {
    const g = this.check(t, op);
    ensure(g.dtype === "f32", op, () => `expected f32 tensor, got ${g.dtype}`);
    return g.buffer;
  }

  /** Buffer of an i32 tensor (checked). */
  i(t: Tensor, op: string): GPUBuffer {
    const g = this.check(t, op);
    ensure(g.dtype === "i32", op, () => `expected i32 tensor, got ${g.dtype}`);
    return g.buffer;
  }

  /** Buffer of any tensor (checked). */
  any(t: Tensor, op: string): GPUBuffer {
    return this.check(t, op).buffer;
  }

  /** Encodes a dispatch; see GpuContext.dispatch. */
  dispatch(
    kernel: string,
    buffers: readonly GPUBuffer[],
    groups: readonly [number, number?, number?],
    params?: readonly Param[],
    constants?: Record<string, number>,
  ): void {
    this.ctx.dispatch(kernel, buffers, groups, params, constants);
  }

  /** Returns this scope's buffers to the pool; later use of its tensors raises an error. */
  release(): void {
    this.life.released = true;
    for (const b of this.owned) this.ctx.release(b);
    this.owned.length = 0;
  }
}
