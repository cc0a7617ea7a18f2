/**
 * WebGPU backend: matmul.
 *
 * Two paths, chosen by shape:
 * - Tiled (`matmul_t16x16`): op(A) and op(B)ᵀ are first packed into
 *   rgba32float textures (rows along k, four k per texel) by `matmul_pack`, or copied straight
 *   in when the operand is already row-major along k with K a multiple of 64. Each invocation
 *   then computes a 16x16 tile of C in registers, reading its operands as read-only
 *   storage textures and using no workgroup memory. On a software adapter (Mesa llvmpipe)
 *   those loads are vectorised and inlined (a sampled-texture fetch is a call per texel, and a
 *   storage-buffer load runs lane by lane), and barriers cost more than they save, so this
 *   layout is several times faster than a storage-buffer kernel. Packing also absorbs every
 *   transpose variant and the zero padding of K, so one kernel serves X·Wᵀ, dY·W, dYᵀ·X and
 *   the plain product. These dispatches need texture bindings, which `GpuContext.dispatch`
 *   does not bind, so they are encoded into a command buffer of their own, submitted right
 *   after the context's pending batch is flushed (queue order keeps every dependency).
 * - Direct (`matmul_small`): a 4x4 block per invocation straight from the storage buffers with
 *   arbitrary strides, for products too small to repay the packing, and for K beyond the
 *   texture limit.
 * @module
 */
import type { MatmulOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import { matmulDims } from "../checks/matmul.ts";
import { type GpuContext, grid } from "./context.ts";
import type { GpuScope, GpuTensor } from "./scope.ts";

/** Products below this many multiply-adds use the direct kernel. */
const SMALL_MACS = 1 << 17;
/** Output rows and columns per invocation of the tiled kernel (`matmul_t16x16`). */
const TILE = 16;

/** @internal Test hook: send every product the tiled kernel can take to it, whatever its size. */
export const matmulTuning: { forceTiled: boolean } = { forceTiled: false };

/** Tiles below which workgroups shrink from 64 to 16 invocations. */
const FEW_TILES = 256;
/** Texture sizes are rounded up to these multiples so that similar shapes share textures. */
const TEX_W_STEP = 64;
const TEX_H_STEP = 128;
/** Cached operand textures above this many bytes are dropped (after a flush). */
const TEX_CACHE_BYTES = 512 * 1024 * 1024;
/** Bytes per uniform slot (the default minUniformBufferOffsetAlignment). */
const SLOT = 256;

interface Packed {
  readonly texture: GPUTexture;
  readonly view: GPUTextureView;
  readonly bytes: number;
}

/** Per-device state of the tiled path: operand textures and a uniform buffer. */
class TileState {
  private readonly textures = new Map<string, Packed>();
  private bytes = 0;
  private uniform: GPUBuffer | null = null;
  private uniformSlots = 0;

  constructor(private readonly ctx: GpuContext) {}

  /** A texture of at least w x h texels for the operand role ("a" or "b"). */
  texture(role: string, w: number, h: number): Packed {
    const limit = this.ctx.device.limits.maxTextureDimension2D;
    const tw = Math.min(limit, Math.ceil(w / TEX_W_STEP) * TEX_W_STEP);
    const th = Math.min(limit, Math.ceil(h / TEX_H_STEP) * TEX_H_STEP);
    const key = `${role}:${tw}x${th}`;
    let p = this.textures.get(key);
    if (!p) {
      const bytes = tw * th * 16;
      if (this.bytes + bytes > TEX_CACHE_BYTES) this.clear();
      const texture = this.ctx.device.createTexture({
        label: `matmul_${key}`,
        size: [tw, th],
        format: "rgba32float",
        usage: GPUTextureUsage.STORAGE_BINDING | GPUTextureUsage.COPY_DST,
      });
      p = { texture, view: texture.createView(), bytes };
      this.textures.set(key, p);
      this.bytes += bytes;
    }
    return p;
  }

  /** Destroys the cached textures (everything using them has been submitted). */
  private clear(): void {
    for (const p of this.textures.values()) p.texture.destroy();
    this.textures.clear();
    this.bytes = 0;
  }

  /** A uniform buffer with at least `slots` slots of SLOT bytes. */
  uniforms(slots: number): GPUBuffer {
    if (!this.uniform || this.uniformSlots < slots) {
      // The old buffer may still be read by submitted work: let it go instead of destroying it.
      this.uniformSlots = Math.max(64, slots);
      this.uniform = this.ctx.device.createBuffer({
        label: "matmul_params",
        size: this.uniformSlots * SLOT,
        usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
      });
    }
    return this.uniform;
  }
}

const states = new WeakMap<GpuContext, TileState>();
const stateOf = (ctx: GpuContext): TileState => {
  let s = states.get(ctx);
  if (!s) {
    s = new TileState(ctx);
    states.set(ctx, s);
  }
  return s;
};

/**
 * One operand of the tiled path, seen as `rows` vectors of length K (rows of op(A), columns of
 * op(B)): stored either [rows, K] (`kContiguous`) or [K, rows].
 */
interface Operand {
  readonly buffer: GPUBuffer;
  readonly rows: number;
  readonly kContiguous: boolean;
}

/** How a chunk of an operand reaches its texture. */
type Load =
  | { kind: "copy"; op: Operand; kMajor: boolean; row0: number; rows: number; tex: Packed }
  | { kind: "pack"; op: Operand; row0: number; rows: number; tex: Packed; u: GPUBufferBinding };

/** Encodes the tiled path and submits it (results land in `c`). */
const tiled = (
  ctx: GpuContext,
  a: Operand,
  b: Operand,
  c: GPUBuffer,
  m: number,
  n: number,
  k: number,
  ldc: number,
): void => {
  const st = stateOf(ctx);
  const dev = ctx.device;
  const limit = dev.limits.maxTextureDimension2D;
  const kSteps = Math.ceil(k / 4);
  // Rows of A (columns of B) per chunk: a multiple of the tile side that fits the texture limit.
  const chunk = Math.floor(limit / TILE) * TILE;
  const params: number[][] = [];
  const slot = (p: number[]): GPUBufferBinding => {
    params.push(p);
    return { buffer: null as unknown as GPUBuffer, offset: (params.length - 1) * SLOT, size: 32 };
  };
  // Texture layout of an operand: k-major (texel = 4 consecutive k of one row) unless the
  // operand is stored [K, rows] with rows a multiple of 64 and K of the k-step, which is copied
  // as is (texel = 4 consecutive rows at one k). Copies need rows of a multiple of 256 bytes.
  const kMajor = (op: Operand) => op.kContiguous || op.rows % 64 !== 0 || k % 4 !== 0 || k > limit;
  const copyable = (op: Operand) => !op.kContiguous ? !kMajor(op) : k % 64 === 0;
  const loads: Load[] = [];
  const load = (op: Operand, role: string, row0: number, rows: number): Packed => {
    const padded = Math.ceil(rows / TILE) * TILE;
    if (!kMajor(op)) {
      const tex = st.texture(role + "m", padded / 4, k);
      loads.push({ kind: "copy", op, kMajor: false, row0, rows, tex });
      return tex;
    }
    const tex = st.texture(role + "k", kSteps, padded);
    if (copyable(op)) {
      // Rows past `rows` keep stale values; they only reach results that are never stored.
      loads.push({ kind: "copy", op, kMajor: true, row0, rows, tex });
    } else {
      const [sr, sc] = op.kContiguous ? [k, 1] : [1, op.rows];
      const u = slot([op.rows, k, sr, sc, row0, kSteps, padded]);
      loads.push({ kind: "pack", op, row0, rows: padded, tex, u });
    }
    return tex;
  };
  type Main = { loads: Load[]; at: Packed; bt: Packed; u: GPUBufferBinding; tiles: number };
  const mains: Main[] = [];
  // With a single row chunk, A is loaded once and serves every column chunk.
  const single = m <= chunk ? load(a, "a", 0, m) : null;
  for (let n0 = 0; n0 < n; n0 += chunk) {
    const nc = Math.min(chunk, n - n0);
    const bt = load(b, "b", n0, nc);
    for (let m0 = 0; m0 < m; m0 += chunk) {
      const mc = Math.min(chunk, m - m0);
      const at = single ?? load(a, "a", m0, mc);
      const tilesN = Math.ceil(nc / TILE);
      const tilesM = Math.ceil(mc / TILE);
      const tiles = tilesM * tilesN;
      const u = slot([mc, nc, kSteps, ldc / 4, (m0 * ldc + n0) / 4, tilesN, tilesM]);
      mains.push({ loads: loads.splice(0), at, bt, u, tiles });
    }
  }
  // Few tiles: small workgroups, so that both threads of a software adapter get work.
  const wg = Math.ceil(m / TILE) * Math.ceil(n / TILE) >= FEW_TILES ? 64 : 16;
  const constants: Record<string, number> = { A_KMAJOR: +kMajor(a), B_KMAJOR: +kMajor(b) };
  if (wg !== 64) constants.WG = wg;
  const pipeline = ctx.pipeline("matmul_t16x16", constants);
  const pack = ctx.pipeline("matmul_pack");

  ctx.flush(); // the context's pending work first: it may produce our operands
  const ubuf = st.uniforms(params.length);
  const data = new Uint32Array(params.length * (SLOT / 4));
  params.forEach((p, i) => data.set(p, i * (SLOT / 4)));
  dev.queue.writeBuffer(ubuf, 0, data);
  const bind = (u: GPUBufferBinding): GPUBufferBinding => ({ ...u, buffer: ubuf });

  const enc = dev.createCommandEncoder({ label: "matmul" });
  let pass: GPUComputePassEncoder | null = null;
  const endPass = () => {
    pass?.end();
    pass = null;
  };
  const bindGroup = (p: GPUComputePipeline, resources: GPUBindingResource[]) =>
    dev.createBindGroup({
      layout: p.getBindGroupLayout(0),
      entries: resources.map((resource, binding) => ({ binding, resource })),
    });
  for (const main of mains) {
    for (const l of main.loads) {
      if (l.kind === "copy") {
        endPass();
        const { op, row0, rows } = l;
        enc.copyBufferToTexture(
          l.kMajor
            ? { buffer: op.buffer, offset: row0 * k * 4, bytesPerRow: k * 4, rowsPerImage: rows }
            : { buffer: op.buffer, offset: row0 * 4, bytesPerRow: op.rows * 4, rowsPerImage: k },
          { texture: l.tex.texture },
          l.kMajor ? [kSteps, rows] : [Math.ceil(rows / 4), k],
        );
      } else {
        pass ??= enc.beginComputePass({ label: "matmul" });
        pass.setPipeline(pack);
        pass.setBindGroup(0, bindGroup(pack, [bind(l.u), { buffer: l.op.buffer }, l.tex.view]));
        pass.dispatchWorkgroups(Math.ceil(kSteps / 4), Math.ceil(l.rows / 16));
      }
    }
    pass ??= enc.beginComputePass({ label: "matmul" });
    pass.setPipeline(pipeline);
    pass.setBindGroup(
      0,
      bindGroup(pipeline, [bind(main.u), main.at.view, main.bt.view, { buffer: c }]),
    );
    const [gx, gy] = grid(Math.ceil(main.tiles / wg));
    pass.dispatchWorkgroups(gx, gy);
  }
  endPass();
  dev.queue.submit([enc.finish()]);
  ctx.submits++;
};

/** Whether the tiled path takes the product (else the direct kernel). */
const useTiled = (ctx: GpuContext, m: number, n: number, k: number): boolean => {
  if (Math.ceil(k / 4) > ctx.device.limits.maxTextureDimension2D) return false;
  return matmulTuning.forceTiled || m * n * k >= SMALL_MACS;
};

/** See Ops.matmul. */
export function matmul(sc: GpuScope, a: Tensor, b: Tensor, opts?: MatmulOptions): Tensor {
  const { m, n, k, transA, transB } = matmulDims("matmul", a, b, opts);
  const ab = sc.f(a, "matmul");
  const bb = sc.f(b, "matmul");
  if (m === 0 || n === 0) return sc.out([m, n]);
  if (k === 0) return sc.zeros([m, n]);
  const ctx = sc.ctx;
  if (!useTiled(ctx, m, n, k)) {
    const out = sc.out([m, n]);
    const tilesN = Math.ceil(n / 4);
    const groups = Math.ceil((Math.ceil(m / 4) * tilesN) / 64);
    sc.dispatch("matmul_small", [ab, bb, out.buffer], grid(groups), [
      m,
      n,
      k,
      transA ? 1 : k, // sam
      transA ? m : 1, // sak
      transB ? 1 : n, // sbk
      transB ? k : 1, // sbn
      tilesN,
    ]);
    return out;
  }
  // Rows of op(A) and columns of op(B), each a vector along k.
  const opA: Operand = { buffer: ab, rows: m, kContiguous: !transA };
  const opB: Operand = { buffer: bb, rows: n, kContiguous: transB };
  const out: GpuTensor = sc.out([m, n]);
  if (n % 4 === 0) {
    tiled(ctx, opA, opB, out.buffer, m, n, k, n);
    return out;
  }
  // Vector stores need a row stride of a multiple of 4: compute into a padded buffer, then copy.
  const ld = Math.ceil(n / 4) * 4;
  const tmp = ctx.alloc(m * ld * 4);
  tiled(ctx, opA, opB, tmp, m, n, k, ld);
  sc.dispatch("matmul_unpad", [tmp, out.buffer], grid(Math.ceil((m * n) / 256)), [m, n, ld]);
  ctx.release(tmp);
  return out;
}
