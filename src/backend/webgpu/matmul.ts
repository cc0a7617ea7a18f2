/**
 * WebGPU backend: matmul.
 *
 * Two paths, chosen by shape:
 * - Tiled (`matmul_t32x16` / `matmul_t16x16`): op(A) and op(B)ᵀ are first packed into
 *   rgba32float textures (rows along k, four k per texel) by `matmul_pack`, or copied straight
 *   in when the operand is already row-major along k with K a multiple of 64. Each invocation
 *   then computes a 32x16 (or 16x16) tile of C in registers, reading its operands as read-only
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
/** Outputs below this many elements use the 16x16 tile. */
const BIG_TILE_MIN_MN = 128 * 128;
/** Output columns per invocation in every tiled kernel (`matmul_t{rows}x16`). */
const TILE_COLS = 16;
/** Rows per invocation of a tiled kernel. */
export type TileRows = 16 | 32;
/**
 * Cost per multiply-add of each tile height relative to 16 (1024³ on llvmpipe; a 48-row tile
 * measured no better than 32 and was dropped).
 */
const TILE_COST: Readonly<Record<TileRows, number>> = { 16: 1, 32: 0.9 };

/** @internal Test hook: force the tiled path with this tile height (null: choose by shape). */
export const matmulTuning: { rows: TileRows | null } = { rows: null };

/** Tiles below which workgroups shrink from 64 to 8 invocations. */
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
  rows: TileRows,
): void => {
  const st = stateOf(ctx);
  const dev = ctx.device;
  const limit = dev.limits.maxTextureDimension2D;
  const kSteps = Math.ceil(k / 4);
  // Rows of A (columns of B) per chunk: a multiple of the tile side that fits the texture limit.
  const chunkA = Math.floor(limit / rows) * rows;
  const chunkB = Math.floor(limit / TILE_COLS) * TILE_COLS;
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
  const load = (op: Operand, role: string, row0: number, rows: number, side: number): Packed => {
    const padded = Math.ceil(rows / side) * side;
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
  const single = m <= chunkA ? load(a, "a", 0, m, rows) : null;
  for (let n0 = 0; n0 < n; n0 += chunkB) {
    const nc = Math.min(chunkB, n - n0);
    const bt = load(b, "b", n0, nc, TILE_COLS);
    for (let m0 = 0; m0 < m; m0 += chunkA) {
      const mc = Math.min(chunkA, m - m0);
      const at = single ?? load(a, "a", m0, mc, rows);
      const tilesN = Math.ceil(nc / TILE_COLS);
      const tiles = Math.ceil(mc / rows) * tilesN;
      const u = slot([mc, nc, kSteps, ldc / 4, (m0 * ldc + n0) / 4, tilesN]);
      mains.push({ loads: loads.splice(0), at, bt, u, tiles });
    }
  }
  // Few tiles: small workgroups, so that both threads of a software adapter get work.
  const wg = Math.ceil(m / rows) * Math.ceil(n / TILE_COLS) >= FEW_TILES ? 64 : 8;
  const constants: Record<string, number> = { A_KMAJOR: +kMajor(a), B_KMAJOR: +kMajor(b) };
  if (wg !== 64) constants.WG = wg;
  const pipeline = ctx.pipeline(`matmul_t${rows}x${TILE_COLS}`, constants);
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

/** Tile height for the tiled path, or null when the direct kernel fits the shape better. */
const chooseTile = (ctx: GpuContext, m: number, n: number, k: number): TileRows | null => {
  if (Math.ceil(k / 4) > ctx.device.limits.maxTextureDimension2D) return null;
  if (matmulTuning.rows !== null) return matmulTuning.rows;
  if (m * n * k < SMALL_MACS) return null;
  // The taller tiles take seconds to compile the first time: only for large outputs.
  if (m * n < BIG_TILE_MIN_MN) return 16;
  // Padded work: a taller tile costs less per multiply-add (fewer fetches per flop) but
  // wastes more rows on the edge.
  const cost = (rows: TileRows) => TILE_COST[rows] * Math.ceil(m / rows) * rows;
  return cost(32) < cost(16) ? 32 : 16;
};

/** See Ops.matmul. */
export function matmul(sc: GpuScope, a: Tensor, b: Tensor, opts?: MatmulOptions): Tensor {
  const { m, n, k, transA, transB } = matmulDims("matmul", a, b, opts);
  const ab = sc.f(a, "matmul");
  const bb = sc.f(b, "matmul");
  if (m === 0 || n === 0) return sc.out([m, n]);
  if (k === 0) return sc.zeros([m, n]);
  const ctx = sc.ctx;
  const tile = chooseTile(ctx, m, n, k);
  if (tile === null) {
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
    tiled(ctx, opA, opB, out.buffer, m, n, k, n, tile);
    return out;
  }
  // Vector stores need a row stride of a multiple of 4: compute into a padded buffer, then copy.
  const ld = Math.ceil(n / 4) * 4;
  const tmp = ctx.alloc(m * ld * 4);
  tiled(ctx, opA, opB, tmp, m, n, k, ld, tile);
  sc.dispatch("matmul_unpad", [tmp, out.buffer], grid(Math.ceil((m * n) / 256)), [m, n, ld]);
  ctx.release(tmp);
  return out;
}
