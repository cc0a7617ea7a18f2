/**
 * WebGPU backend: 16-bit tensors (bf16 / f16 frozen base weights, two elements per u32 word, see
 * GpuScope). Widening to f32 (`half_widen`, `half_widen4`), element-exact copies between any
 * storage blocks (`half_copy`), and the override constant that picks the format in the kernels
 * that read such tensors (half_*, matmul_pack16, embed_gather16), all of which
 * widen with `widen16` from common.wgsl. (matmul also hands aligned 16-bit operands to its main
 * kernel as raw bits in 16-bit textures: see matmul.ts.)
 * @module
 */
import type { DType, Tensor } from "../tensor.ts";
import { ensure, isHalfDType } from "../tensor.ts";
import { grid } from "./context.ts";
import type { GpuScope, GpuTensor } from "./scope.ts";

/** Invocations per workgroup of the half_* kernels. */
const WG = 256;

/** Override constants of a kernel reading a 16-bit tensor of `dtype`. */
export const halfConstants = (dtype: DType): Record<string, number> => ({
  BF16: dtype === "bf16" ? 1 : 0,
});

/**
 * A fresh pooled f32 buffer of the `n` elements of a 16-bit buffer, widened; the caller releases
 * it (`ctx.release`) once the work reading it is encoded (the queue keeps the order).
 */
export const widenBuffer = (sc: GpuScope, src: GPUBuffer, dtype: DType, n: number): GPUBuffer => {
  const out = sc.ctx.alloc(n * 4);
  widenInto(sc, src, out, dtype, n);
  return out;
};

/** Widens the `n` elements of a 16-bit buffer into an f32 buffer (by fours when it can). */
const widenInto = (sc: GpuScope, src: GPUBuffer, dst: GPUBuffer, dtype: DType, n: number) => {
  if (n % 4 === 0) {
    const n4 = n / 4;
    sc.dispatch("half_widen4", [src, dst], grid(Math.ceil(n4 / WG)), { n4 }, halfConstants(dtype));
  } else {
    sc.dispatch("half_widen", [src, dst], grid(Math.ceil(n / WG)), { n }, halfConstants(dtype));
  }
};

/** See Ops.widen: a fresh f32 tensor with t's shape and storage blocks. */
export function widen(sc: GpuScope, t: Tensor): Tensor {
  const op = "widen";
  const g = sc.blocks(t, op);
  ensure(
    g.dtype === "f32" || isHalfDType(g.dtype),
    op,
    () => `expected a float tensor, got ${g.dtype}`,
  );
  const out = sc.like(g, "f32");
  g.blocks.forEach((b, i) => {
    const dst = out.blocks[i].buffer;
    if (g.dtype === "f32") sc.ctx.copy(b.buffer, 0, dst, 0, b.length * 4);
    else widenInto(sc, b.buffer, dst, g.dtype, b.length);
  });
  return out;
}

/**
 * Copies elements [lo, hi) of the 16-bit `src` to elements [lo + shift, hi + shift) of the
 * 16-bit `dst`, across the storage blocks of both (one half_copy per overlapping pair of blocks;
 * src and dst must not share a buffer).
 */
export const copyHalfRange = (
  sc: GpuScope,
  src: GpuTensor,
  dst: GpuTensor,
  lo: number,
  hi: number,
  shift: number,
): void => {
  for (const s of src.blocks) {
    const a = Math.max(lo, s.start);
    const b = Math.min(hi, s.start + s.length);
    if (a >= b) continue;
    for (const d of dst.blocks) {
      const x = Math.max(a, d.start - shift);
      const y = Math.min(b, d.start + d.length - shift);
      if (x >= y) continue;
      const dstOff = x + shift - d.start;
      const words = Math.floor((dstOff + (y - x) - 1) / 2) - Math.floor(dstOff / 2) + 1;
      sc.dispatch("half_copy", [s.buffer, d.buffer], grid(Math.ceil(words / WG)), {
        n: y - x,
        src_off: x - s.start,
        dst_off: dstOff,
        words,
      });
    }
  }
};
