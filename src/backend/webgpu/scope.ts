/**
 * WebGPU backend: tensors and their lifetime. A scope owns the buffers of the tensors it
 * creates and returns them to the context's pool when it closes.
 *
 * A tensor larger than the device's largest storage binding (`GpuContext.maxBinding`) is stored
 * as several buffers, each a whole number of rows of the tensor seen as a matrix [R, C] (its
 * storage blocks). Ops that take such tensors loop over the blocks (`blocks`); every other op
 * reaches a tensor's single buffer through `f` / `i` / `any`, which refuse split tensors with a
 * ShapeError, and `out` refuses results that would not fit one binding.
 *
 * A 16-bit tensor (bf16 / f16, a frozen base weight) holds two elements per u32 word, element 2i
 * in the low half of word i of its block's buffer; it has the row blocks an f32 tensor of its
 * shape would have (each block then fills half a binding), so every chunking decision is the
 * same for both formats.
 * @module
 */
import type { DType, Tensor } from "../tensor.ts";
import { ensure, isHalfDType, ReleasedTensorError, ShapeError, sizeOf } from "../tensor.ts";
import type { GpuContext, Params } from "./context.ts";

interface Life {
  released: boolean;
}

/** One storage block: elements [start, start + length) of the tensor in `buffer`. */
export interface GpuBlock {
  readonly buffer: GPUBuffer;
  readonly start: number;
  readonly length: number;
}

/** A tensor of the WebGPU backend. */
export class GpuTensor implements Tensor {
  readonly backend = "webgpu";
  readonly size: number;
  constructor(
    readonly shape: readonly number[],
    readonly dtype: DType,
    /** @internal Storage blocks in order (one for a tensor that fits a binding). */
    readonly blocks: readonly GpuBlock[],
    /** @internal */ readonly life: Life,
  ) {
    this.size = sizeOf(shape);
  }

  /** @internal The tensor's buffer; a ShapeError for a tensor stored in several blocks. */
  get buffer(): GPUBuffer {
    if (this.blocks.length !== 1) throw splitError("webgpu", this);
    return this.blocks[0].buffer;
  }
}

const splitError = (op: string, t: GpuTensor): ShapeError =>
  new ShapeError({
    op,
    reason: `[${t.shape}] is stored in ${t.blocks.length} blocks (it exceeds the device's ` +
      `largest storage binding) and this op takes only tensors of one block`,
  });

/** Bytes of `n` elements of `dtype` in a buffer (16-bit: whole u32 words). */
export const bytesOf = (dtype: DType, n: number): number =>
  isHalfDType(dtype) ? Math.ceil(n / 2) * 4 : n * 4;

/** Columns of a tensor seen as a matrix (its last dimension; 1 for a scalar). */
const colsOf = (shape: readonly number[]): number =>
  shape.length === 0 ? 1 : shape[shape.length - 1];

/**
 * Storage layout of a tensor of `shape` under a binding limit: one block when it fits, else
 * row blocks of (nearly) equal size. A row wider than the limit cannot be stored.
 */
export const blockLayout = (
  shape: readonly number[],
  limitBytes: number,
): { start: number; length: number }[] => {
  const size = sizeOf(shape);
  if (size * 4 <= limitBytes || size === 0) return [{ start: 0, length: size }];
  const cols = colsOf(shape);
  const rows = size / cols;
  const maxRows = Math.floor(limitBytes / 4 / cols);
  ensure(
    maxRows >= 1,
    "webgpu",
    () => `one row of [${shape}] (${cols * 4} bytes) exceeds the largest storage binding`,
  );
  const n = Math.ceil(rows / maxRows);
  const per = Math.ceil(rows / n);
  const out: { start: number; length: number }[] = [];
  for (let r = 0; r < rows; r += per) {
    out.push({ start: r * cols, length: Math.min(per, rows - r) * cols });
  }
  return out;
};

/** Allocation, access and dispatch for WebGPU op implementations; one per Ops scope. */
export class GpuScope {
  private readonly life: Life = { released: false };
  private readonly owned: GPUBuffer[] = [];
  constructor(readonly ctx: GpuContext) {}

  private own(bytes: number): GPUBuffer {
    const buf = this.ctx.alloc(bytes);
    this.owned.push(buf);
    return buf;
  }

  /**
   * Fresh single-buffer tensor owned by this scope, contents undefined (kernels must write every
   * element). A ShapeError when it would exceed the largest storage binding.
   */
  out(shape: readonly number[], dtype: DType = "f32"): GpuTensor {
    const n = sizeOf(shape);
    ensure(
      n * 4 <= this.ctx.maxBinding,
      "webgpu",
      () =>
        `a result [${shape}] of ${n * 4} bytes exceeds the largest storage binding ` +
        `(${this.ctx.maxBinding} bytes) and this op does not split its result`,
    );
    return new GpuTensor(
      shape,
      dtype,
      [{ buffer: this.own(bytesOf(dtype, n)), start: 0, length: n }],
      this.life,
    );
  }

  /** Fresh tensor in as many storage blocks as the binding limit needs (contents undefined). */
  outBlocks(shape: readonly number[], dtype: DType = "f32"): GpuTensor {
    const blocks = blockLayout(shape, this.ctx.maxBinding).map(({ start, length }) => ({
      buffer: this.own(bytesOf(dtype, length)),
      start,
      length,
    }));
    return new GpuTensor(shape, dtype, blocks, this.life);
  }

  /** Fresh tensor with the shape and storage blocks of `t` (contents undefined). */
  like(t: GpuTensor, dtype: DType = t.dtype): GpuTensor {
    const blocks = t.blocks.map(({ start, length }) => ({
      buffer: this.own(bytesOf(dtype, length)),
      start,
      length,
    }));
    return new GpuTensor(t.shape, dtype, blocks, this.life);
  }

  /** Fresh zero-filled tensor owned by this scope (split into blocks when needed). */
  zeros(shape: readonly number[], dtype: DType = "f32"): GpuTensor {
    const t = this.outBlocks(shape, dtype);
    for (const b of t.blocks) this.ctx.clear(b.buffer, bytesOf(dtype, b.length));
    return t;
  }

  /**
   * Fresh tensor holding host data (split into blocks when needed): f32 or i32 values, or the
   * raw bits of a 16-bit tensor (each block packed two per word, an odd tail padded with 0).
   */
  upload(
    data: Float32Array | Int32Array | Uint16Array,
    shape: readonly number[],
    dtype: DType,
  ): GpuTensor {
    const words = (d: Float32Array | Int32Array | Uint16Array): Float32Array | Int32Array => {
      if (!(d instanceof Uint16Array)) return d;
      const even = d.length % 2 === 0 && d.byteOffset % 4 === 0 ? d : (() => {
        const p = new Uint16Array(d.length + (d.length % 2));
        p.set(d);
        return p;
      })();
      return new Int32Array(even.buffer, even.byteOffset, even.length / 2);
    };
    const blocks = blockLayout(shape, this.ctx.maxBinding).map(({ start, length }) => {
      const buffer = this.ctx.upload(
        words(start === 0 && length === data.length ? data : data.subarray(start, start + length)),
      );
      this.owned.push(buffer);
      return { buffer, start, length };
    });
    return new GpuTensor(shape, dtype, blocks, this.life);
  }

  /**
   * View of `t` with another shape (shares the buffers and the owner's lifetime). A split tensor
   * keeps its blocks, which must then hold whole rows of the new shape.
   */
  view(t: Tensor, shape: readonly number[]): GpuTensor {
    const g = this.check(t, "reshape");
    const cols = colsOf(shape);
    ensure(
      g.blocks.length === 1 || g.blocks.every((b) => b.start % cols === 0),
      "reshape",
      () => `[${g.shape}] is stored in blocks that do not hold whole rows of [${shape}]`,
    );
    return new GpuTensor(shape, g.dtype, g.blocks, g.life);
  }

  /** A single-block view of elements [start, start + length) of one buffer, sharing `t`'s life. */
  blockView(t: GpuTensor, shape: readonly number[], block: GpuBlock): GpuTensor {
    return new GpuTensor(shape, t.dtype, [{ ...block, start: 0 }], t.life);
  }

  /** Checks that `t` is a live tensor of this backend. */
  check(t: Tensor, op: string): GpuTensor {
    if (!(t instanceof GpuTensor)) {
      throw new ShapeError({ op, reason: `tensor from backend "${t.backend}" given to webgpu` });
    }
    if (t.life.released) {
      throw new ReleasedTensorError({ op, shape: t.shape });
    }
    return t;
  }

  private single(t: Tensor, op: string): GpuTensor {
    const g = this.check(t, op);
    if (g.blocks.length !== 1) throw splitError(op, g);
    return g;
  }

  /** Buffer of an f32 tensor (checked: this backend, alive, f32, one block). */
  f(t: Tensor, op: string): GPUBuffer {
    const g = this.single(t, op);
    ensure(g.dtype === "f32", op, () => `expected f32 tensor, got ${g.dtype}`);
    return g.blocks[0].buffer;
  }

  /**
   * Buffer of an f32 or 16-bit tensor (checked: this backend, alive, one block), with its
   * dtype: the operands that may be frozen base weights.
   */
  fh(t: Tensor, op: string): { buffer: GPUBuffer; dtype: DType } {
    const g = this.single(t, op);
    ensure(
      g.dtype === "f32" || isHalfDType(g.dtype),
      op,
      () => `expected f32, bf16 or f16 tensor, got ${g.dtype}`,
    );
    return { buffer: g.blocks[0].buffer, dtype: g.dtype };
  }

  /** Buffer of an i32 tensor (checked). */
  i(t: Tensor, op: string): GPUBuffer {
    const g = this.single(t, op);
    ensure(g.dtype === "i32", op, () => `expected i32 tensor, got ${g.dtype}`);
    return g.blocks[0].buffer;
  }

  /** Buffer of any tensor (checked). */
  any(t: Tensor, op: string): GPUBuffer {
    return this.single(t, op).blocks[0].buffer;
  }

  /** A tensor of any storage (checked: this backend, alive, and `dtype` when given). */
  blocks(t: Tensor, op: string, dtype?: DType): GpuTensor {
    const g = this.check(t, op);
    if (dtype) ensure(g.dtype === dtype, op, () => `expected ${dtype} tensor, got ${g.dtype}`);
    return g;
  }

  /** Checks that tensors of one shape are split into the same blocks (elementwise ops). */
  sameBlocks(op: string, ts: readonly GpuTensor[]): void {
    const [a, ...rest] = ts;
    ensure(
      rest.every((t) =>
        t.blocks.length === a.blocks.length &&
        t.blocks.every((b, i) => b.start === a.blocks[i].start && b.length === a.blocks[i].length)
      ),
      op,
      () => `operands of shape [${a.shape}] are stored in different blocks`,
    );
  }

  /** Encodes a dispatch; see GpuContext.dispatch. */
  dispatch(
    kernel: string,
    buffers: readonly GPUBuffer[],
    groups: readonly [number, number?, number?],
    params?: Params,
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

/** Rows of a tensor seen as a matrix [R, C]. */
export const rowsOf = (t: Tensor): number => {
  const c = colsOf(t.shape);
  return c === 0 ? 0 : t.size / c;
};

/** Column count of a tensor seen as a matrix [R, C]. */
export const columnsOf = (t: Tensor): number => colsOf(t.shape);
