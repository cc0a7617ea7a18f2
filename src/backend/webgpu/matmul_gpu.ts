/**
 * WebGPU backend: the matmul variant for real GPUs, chosen by adapter.
 *
 * matmul.ts is tuned for a software adapter (Mesa llvmpipe): operands packed into textures,
 * a 16x16 tile of C per invocation, no workgroup memory (barriers cost more there than they
 * save). On a hardware adapter that design is likely to spill its 256 accumulators, reuses nothing
 * through shared memory and copies every operand into a texture on every product. This module's kernel
 * (`matmul_gpu`, matmul_gpu.wgsl) is the classic shared-memory tiling instead: 64x64 blocks of
 * C per workgroup of 256 invocations, 16-deep k panels staged in workgroup memory, a 4x4
 * register micro-tile per invocation, read straight from the storage buffers with strides (every
 * transpose variant, no packing), vector loads where the operand is aligned, and 16-bit frozen
 * weights read as their u32 words and widened in the kernel (never into a temporary).
 *
 * `usesGpuKernels` picks it: on a hardware adapter (`info.fallback` false), unless
 * `matmulVariant.force` says otherwise (tests and benchmarks run it on llvmpipe too).
 *
 * Operands stored in several blocks (tensors past the binding limit, see GpuScope) are taken
 * block by block: a block of rows of op(A) (or of columns of op(B)) is a band of C, a block
 * along k a partial product added onto the first. The LoRA projections are two products (the
 * delta accumulated onto the projection as it is stored), not one fused kernel.
 * @module
 */
import { projectEachLora } from "../lora_projections.ts";
import type { LoraProjection, MatmulOptions } from "../ops.ts";
import type { DType, Tensor } from "../tensor.ts";
import { ensure, isHalfDType } from "../tensor.ts";
import {
  accumulateDims,
  matmulDims,
  projectLoraDims,
  projectLoraSharedDims,
} from "../checks/matmul.ts";
import { f32, type GpuContext, MAX_GROUPS } from "./context.ts";
import type { GpuBlock, GpuScope, GpuTensor } from "./scope.ts";
import { columnsOf } from "./scope.ts";
import { addScaledInPlace } from "./elementwise.ts";
import { rope } from "./layers.ts";

/** Which matmul kernels to use: by adapter (undefined), or forced (tests, benchmarks). */
export type MatmulVariant = "gpu" | "software";

/** @internal Test and bench hook: force the GPU or the software (texture) variant. */
export const matmulVariant: { force: MatmulVariant | undefined } = { force: undefined };

/** Whether matmul takes this module's kernel: forced, or a hardware adapter. */
export const usesGpuKernels = (ctx: GpuContext): boolean =>
  matmulVariant.force === undefined ? !ctx.info.fallback : matmulVariant.force === "gpu";

/** Rows and columns of C per workgroup (BM, BN of matmul_gpu.wgsl). */
const BLOCK = 64;

/** How an operand's buffer is bound: f32 or 16-bit words, element by element or four at once. */
type Access = "f32" | "f32v" | "h" | "hv";

/**
 * The declaration and access functions of operand `x` ("a" or "b") in the base kernel, and
 * their replacement for each other access. `one(i)` is element i, `run(i)` elements i..i+3
 * (i a multiple of 4 for the vector bindings).
 */
const accessText = (x: "a" | "b", access: Access): string => {
  const bf16 = x === "a" ? "A_BF16" : "B_BF16";
  const bind = x === "a" ? 1 : 2;
  const decl = (t: string) => `@group(0) @binding(${bind}) var<storage, read> ${x}: array<${t}>;`;
  switch (access) {
    case "f32":
      return `${decl("f32")}
fn ${x}_one(i: u32) -> f32 { return ${x}[i]; }
fn ${x}_run(i: u32) -> vec4<f32> { return vec4<f32>(${x}[i], ${x}[i + 1u], ${x}[i + 2u], ${x}[i + 3u]); }`;
    case "f32v":
      return `${decl("vec4<f32>")}
fn ${x}_one(i: u32) -> f32 { return ${x}[i >> 2u][i & 3u]; }
fn ${x}_run(i: u32) -> vec4<f32> { return ${x}[i >> 2u]; }`;
    case "h":
      return `${decl("u32")}
fn ${x}_one(i: u32) -> f32 { return widen16(${x}[i >> 1u], i, ${bf16}); }
fn ${x}_run(i: u32) -> vec4<f32> {
  return vec4<f32>(${x}_one(i), ${x}_one(i + 1u), ${x}_one(i + 2u), ${x}_one(i + 3u));
}`;
    case "hv":
      return `${decl("vec2<u32>")}
fn ${x}_one(i: u32) -> f32 { return widen16(${x}[i >> 2u][(i >> 1u) & 1u], i, ${bf16}); }
fn ${x}_run(i: u32) -> vec4<f32> {
  let w = ${x}[i >> 2u];
  return vec4<f32>(
    widen16(w.x, 0u, ${bf16}), widen16(w.x, 1u, ${bf16}),
    widen16(w.y, 0u, ${bf16}), widen16(w.y, 1u, ${bf16}),
  );
}`;
  }
};

/** The kernel for the operands' accesses: matmul_gpu with the declarations swapped. */
const kernelFor = (ctx: GpuContext, aa: Access, ba: Access): string => {
  if (aa === "f32" && ba === "f32") return "matmul_gpu";
  return ctx.derivedKernel(`matmul_gpu_${aa}_${ba}`, "matmul_gpu", (code) => {
    let out = code;
    for (const [x, acc] of [["a", aa], ["b", ba]] as const) {
      const from = accessText(x, "f32");
      if (!out.includes(from)) throw new Error(`matmul_gpu.wgsl: matmul_gpu lacks "${from}"`);
      out = out.replace(from, accessText(x, acc));
    }
    return out;
  });
};

/**
 * One operand of a product as the kernel reads it: element (row, p) of op(A) (or (p, col) of
 * op(B)) at buffer[off + row * ld + p] when `kc` (k contiguous), else buffer[off + p * ld + row].
 */
interface Side {
  readonly buffer: GPUBuffer;
  readonly dtype: DType;
  readonly kc: boolean;
  readonly ld: number;
  readonly off: number;
}

/** How the kernel binds a side: four elements per load where every run of four is aligned. */
const accessOf = (s: Side): Access => {
  const aligned = s.ld % 4 === 0 && s.off % 4 === 0;
  if (s.dtype === "f32") return aligned && s.buffer.size % 16 === 0 ? "f32v" : "f32";
  return aligned && s.buffer.size % 8 === 0 ? "hv" : "h";
};

/**
 * Encodes C[m, n] (at c_off, row stride ldc) = op(A)·op(B), or += alpha times it (alpha not
 * null); rows past the dispatch limit go in several dispatches.
 */
const encode = (
  ctx: GpuContext,
  a: Side,
  b: Side,
  c: GPUBuffer,
  cOff: number,
  ldc: number,
  m: number,
  n: number,
  k: number,
  alpha: number | null,
): void => {
  const tilesN = Math.ceil(n / BLOCK);
  ensure(tilesN <= MAX_GROUPS, "matmul", () => `${n} columns exceed the dispatch limit`);
  const rowsPer = MAX_GROUPS * BLOCK;
  for (let r0 = 0; r0 < m; r0 += rowsPer) {
    const rows = Math.min(rowsPer, m - r0);
    // a later band of rows starts r0 rows further into A and C
    const as: Side = { ...a, off: a.off + r0 * (a.kc ? a.ld : 1) };
    const constants: Record<string, number> = {
      A_KC: +as.kc,
      B_KC: +b.kc,
      A_BF16: +(as.dtype === "bf16"),
      B_BF16: +(b.dtype === "bf16"),
    };
    if (alpha !== null) constants.ACC = 1;
    ctx.dispatch(
      kernelFor(ctx, accessOf(as), accessOf(b)),
      [as.buffer, b.buffer, c],
      [tilesN, Math.ceil(rows / BLOCK)],
      {
        m: rows,
        n,
        k,
        lda: as.ld,
        ldb: b.ld,
        ldc,
        a_off: as.off,
        b_off: b.off,
        c_off: cOff + r0 * ldc,
        alpha: f32(alpha ?? 1),
      },
      constants,
    );
  }
};

/** A float operand of this module (f32 or 16-bit), any number of storage blocks. */
const floatBlocks = (sc: GpuScope, t: Tensor, op: string): GpuTensor => {
  const g = sc.blocks(t, op);
  ensure(
    g.dtype === "f32" || isHalfDType(g.dtype),
    op,
    () => `expected f32, bf16 or f16 tensor, got ${g.dtype}`,
  );
  return g;
};

/** One storage block of an operand as the ranges of the product it holds, with its Side. */
interface Piece {
  readonly side: Side;
  /** Range of rows of op(A) / columns of op(B). */
  readonly o0: number;
  readonly o1: number;
  /** Range of k. */
  readonly k0: number;
  readonly k1: number;
}

/**
 * The blocks of operand `g` as pieces: with `outerRows` (stored [outer, k]) a block holds a range
 * of rows of op(A) / columns of op(B) and all of k, else (stored [k, outer]) a range of k.
 */
const piecesOf = (g: GpuTensor, outerRows: boolean, outer: number, k: number): Piece[] => {
  const cols = columnsOf(g);
  return g.blocks.map((blk: GpuBlock) => {
    const s0 = blk.start / cols;
    const s1 = s0 + blk.length / cols;
    // stored [outer, k] (rows along outer, k contiguous) or [k, outer]
    const side: Side = { buffer: blk.buffer, dtype: g.dtype, kc: outerRows, ld: cols, off: 0 };
    return outerRows
      ? { side, o0: s0, o1: s1, k0: 0, k1: k }
      : { side, o0: 0, o1: outer, k0: s0, k1: s1 };
  });
};

/** A piece's side moved to start at row o of its outer range and k step p. */
const shifted = (p: Piece, o: number, kk: number): Side => {
  const s = p.side;
  const row = o - p.o0;
  const step = kk - p.k0;
  return { ...s, off: s.kc ? row * s.ld + step : step * s.ld + row };
};

/**
 * C (one buffer, row stride n) = op(A)·op(B), or += alpha times it: every pair of storage blocks
 * whose k ranges meet is one product into its band of C; the first along k of each band stores
 * (unless accumulating), the others add.
 */
const product = (
  ctx: GpuContext,
  ga: GpuTensor,
  gb: GpuTensor,
  c: GPUBuffer,
  m: number,
  n: number,
  k: number,
  transA: boolean,
  transB: boolean,
  alpha: number | null,
): void => {
  const pa = piecesOf(ga, !transA, m, k);
  const pb = piecesOf(gb, transB, n, k);
  const stored = new Set<string>();
  for (const x of pa) {
    for (const y of pb) {
      const k0 = Math.max(x.k0, y.k0);
      const k1 = Math.min(x.k1, y.k1);
      if (k1 <= k0 || x.o1 <= x.o0 || y.o1 <= y.o0) continue;
      const band = `${x.o0}:${y.o0}`;
      const first = alpha === null && !stored.has(band);
      stored.add(band);
      encode(
        ctx,
        shifted(x, x.o0, k0),
        shifted(y, y.o0, k0),
        c,
        x.o0 * n + y.o0,
        n,
        x.o1 - x.o0,
        y.o1 - y.o0,
        k1 - k0,
        first ? null : alpha ?? 1,
      );
    }
  }
};

/** See Ops.matmul: the GPU variant (any storage blocks of A and B; C in one binding). */
export function matmulGpu(sc: GpuScope, a: Tensor, b: Tensor, opts?: MatmulOptions): Tensor {
  const { m, n, k, transA, transB } = matmulDims("matmul", a, b, opts);
  const ga = floatBlocks(sc, a, "matmul");
  const gb = floatBlocks(sc, b, "matmul");
  if (m === 0 || n === 0) return sc.out([m, n]);
  if (k === 0) return sc.zeros([m, n]);
  const out = sc.out([m, n]);
  product(sc.ctx, ga, gb, out.buffer, m, n, k, transA, transB, null);
  return out;
}

/** See Ops.matmulAccumulate: the GPU variant; adds into c as it stores. */
export function matmulAccumulateGpu(
  sc: GpuScope,
  c: Tensor,
  a: Tensor,
  b: Tensor,
  s: number,
  opts?: MatmulOptions,
): void {
  const op = "matmulAccumulate";
  const { m, n, k, transA, transB } = accumulateDims(op, c, a, b, opts);
  const cb = sc.f(c, op);
  const ga = floatBlocks(sc, a, op);
  const gb = floatBlocks(sc, b, op);
  if (m === 0 || n === 0 || k === 0) return;
  const buffers = [...ga.blocks, ...gb.blocks].map((x) => x.buffer);
  if (buffers.includes(cb)) {
    // c is also an operand: the product goes to a fresh buffer first
    addScaledInPlace(sc, c, matmulGpu(sc, a, b, opts), s);
    return;
  }
  product(sc.ctx, ga, gb, cb, m, n, k, transA, transB, s);
}

/** See Ops.projectLora: the GPU variant, x·Wᵀ then s·xa·Bᵀ added onto it as it is stored. */
export function projectLoraGpu(
  sc: GpuScope,
  x: Tensor,
  w: Tensor,
  xa: Tensor,
  b: Tensor,
  s: number,
  into?: Tensor,
): Tensor {
  projectLoraDims("projectLora", x, w, xa, b, into);
  for (const t of [x, w, xa, b]) floatBlocks(sc, t, "projectLora");
  const y = matmulGpu(sc, x, w, { transB: true });
  matmulAccumulateGpu(sc, y, xa, b, s, { transB: true });
  if (!into) return y;
  addScaledInPlace(sc, into, y, 1);
  return into;
}

/**
 * See Ops.projectLoraShared: the GPU variant, each projection with its own x·Aᵀ; a part with
 * `into` adds its projection onto that tensor and returns it.
 */
export function projectLoraSharedGpu(
  sc: GpuScope,
  x: Tensor,
  parts: readonly LoraProjection[],
  s: number,
): Tensor[] {
  projectLoraSharedDims("projectLoraShared", x, parts);
  return projectEachLora(
    {
      matmul: (a, b, opts) => matmulGpu(sc, a, b, opts),
      matmulAccumulate: (c, a, b, k, opts) => matmulAccumulateGpu(sc, c, a, b, k, opts),
      projectLora: (xx, w, xa, b, k, into) => projectLoraGpu(sc, xx, w, xa, b, k, into),
      rope: (y, pos, heads, hd, theta) => rope(sc, y, pos, heads, hd, theta),
    },
    x,
    parts,
    s,
  );
}
