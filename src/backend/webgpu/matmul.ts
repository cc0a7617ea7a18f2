/**
 * WebGPU backend: matmul.
 *
 * Two paths, chosen by shape:
 * - Tiled (`matmul_t32` / `matmul_t16`): op(A) and op(B)ᵀ are first packed into rgba32float
 *   textures (rows along k, four k per texel) by `matmul_pack`, or copied straight in when the
 *   operand is already row-major along k with K a multiple of 64. Each invocation then computes
 *   a 32x32 (or 16x16) tile of C in registers, reading its operands with texel fetches and no
 *   workgroup memory. On a software adapter (Mesa llvmpipe) texel fetches are vectorised while
 *   storage-buffer loads run lane by lane, and barriers cost more than they save, so this layout
 *   is several times faster than a storage-buffer kernel. Packing also absorbs every transpose
 *   variant and the zero padding of K, so one kernel serves X·Wᵀ, dY·W, dYᵀ·X and the plain
 *   product. These dispatches need texture bindings, which `GpuContext.dispatch` does not bind,
 *   so they are encoded into a command buffer of their own, submitted right after the context's
 *   pending batch is flushed (queue order keeps every dependency).
 * - Direct (`matmul_small`): a 4x4 block per invocation straight from the storage buffers with
 *   arbitrary strides, for products too small to repay the packing, and for K beyond the
 *   texture limit.
 * @module
 */
import type { MatmulOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import { matmulDims } from "../cpu/matmul.ts";
import { type GpuContext, grid } from "./context.ts";
import type { GpuScope, GpuTensor } from "./scope.ts";

/** Products below this many multiply-adds use the direct kernel. */
const SMALL_MACS = 1 << 17;
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
        usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.STORAGE_BINDING |
          GPUTextureUsage.COPY_DST,
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

/** One operand of the tiled path: rows of the packed texture are `src[r * sr + k * sc]`. */
interface Operand {
  readonly buffer: GPUBuffer;
  /** Rows of the view (M for A, N for B). */
  readonly rows: number;
  readonly sr: number;
  readonly sc: number;
}

/** Encodes the tiled path and submits it; returns nothing (results land in `c`). */
const tiled = (
  ctx: GpuContext,
  a: Operand,
  b: Operand,
  c: GPUBuffer,
  m: number,
  n: number,
  k: number,
  ldc: number,
  tile: 16 | 32,
): void => {
  const st = stateOf(ctx);
  const dev = ctx.device;
  const limit = dev.limits.maxTextureDimension2D;
  const k4 = Math.ceil(k / 4);
  // Rows per chunk: a multiple of the tile that fits the texture height limit.
  const chunk = Math.floor(limit / tile) * tile;
  const params: number[][] = [];
  const slot = (p: number[]): GPUBufferBinding => {
    params.push(p);
    return { buffer: null as unknown as GPUBuffer, offset: (params.length - 1) * SLOT, size: 32 };
  };
  type Step =
    | { kind: "copy"; op: Operand; row0: number; rows: number; tex: Packed }
    | { kind: "pack"; op: Operand; row0: number; rows: number; tex: Packed; u: GPUBufferBinding }
    | { kind: "main"; at: Packed; bt: Packed; u: GPUBufferBinding; groups: number };
  const steps: Step[] = [];
  const load = (op: Operand, role: string, row0: number, rows: number): Packed => {
    const padded = Math.ceil(rows / tile) * tile;
    const tex = st.texture(role, k4, padded);
    if (op.sc === 1 && op.sr === k && k % 64 === 0) {
      // Already row-major along k with rows of a multiple of 256 bytes: a plain copy. Rows past
      // `rows` keep stale values; they only reach results that are never stored.
      steps.push({ kind: "copy", op, row0, rows, tex });
    } else {
      const u = slot([op.rows, k, op.sr, op.sc, row0, k4, padded]);
      steps.push({ kind: "pack", op, row0, rows: padded, tex, u });
    }
    return tex;
  };
  const pipeline = ctx.pipeline(`matmul_t${tile}`);
  // With a single row chunk, A is packed once and serves every column chunk.
  const single = m <= chunk ? load(a, "a", 0, m) : null;
  for (let n0 = 0; n0 < n; n0 += chunk) {
    const nc = Math.min(chunk, n - n0);
    const bt = load(b, "b", n0, nc);
    for (let m0 = 0; m0 < m; m0 += chunk) {
      const mc = Math.min(chunk, m - m0);
      const at = single ?? load(a, "a", m0, mc);
      const tilesN = Math.ceil(nc / tile);
      const tiles = Math.ceil(mc / tile) * tilesN;
      const u = slot([mc, nc, k4, ldc / 4, (m0 * ldc + n0) / 4, tilesN]);
      steps.push({ kind: "main", at, bt, u, groups: Math.ceil(tiles / 64) });
    }
  }

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
  const pack = ctx.pipeline("matmul_pack");
  for (const s of steps) {
    if (s.kind === "copy") {
      endPass();
      enc.copyBufferToTexture(
        { buffer: s.op.buffer, offset: s.row0 * k * 4, bytesPerRow: k * 4, rowsPerImage: s.rows },
        { texture: s.tex.texture },
        [k4, s.rows],
      );
      continue;
    }
    pass ??= enc.beginComputePass({ label: "matmul" });
    if (s.kind === "pack") {
      pass.setPipeline(pack);
      pass.setBindGroup(
        0,
        dev.createBindGroup({
          layout: pack.getBindGroupLayout(0),
          entries: [
            { binding: 0, resource: bind(s.u) },
            { binding: 1, resource: { buffer: s.op.buffer } },
            { binding: 2, resource: s.tex.view },
          ],
        }),
      );
      pass.dispatchWorkgroups(Math.ceil(k4 / 64), s.rows);
    } else {
      pass.setPipeline(pipeline);
      pass.setBindGroup(
        0,
        dev.createBindGroup({
          layout: pipeline.getBindGroupLayout(0),
          entries: [
            { binding: 0, resource: bind(s.u) },
            { binding: 1, resource: s.at.view },
            { binding: 2, resource: s.bt.view },
            { binding: 3, resource: { buffer: c } },
          ],
        }),
      );
      const [gx, gy] = grid(s.groups);
      pass.dispatchWorkgroups(gx, gy);
    }
  }
  endPass();
  dev.queue.submit([enc.finish()]);
  ctx.submits++;
};

/** Tile size for the tiled path, or null when the direct kernel fits the shape better. */
const chooseTile = (ctx: GpuContext, m: number, n: number, k: number): 16 | 32 | null => {
  if (m * n * k < SMALL_MACS) return null;
  if (Math.ceil(k / 4) > ctx.device.limits.maxTextureDimension2D) return null;
  // Padded work: a 32-tile costs about 0.75 of a 16-tile per multiply-add (fewer fetches per
  // flop) but wastes more on edges.
  const pad = (x: number, t: number) => Math.ceil(x / t) * t;
  const c16 = pad(m, 16) * pad(n, 16);
  const c32 = 0.75 * pad(m, 32) * pad(n, 32);
  return c32 <= c16 ? 32 : 16;
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
  // Packed row r of A is op(A)[r, :]; packed row r of B is op(B)[:, r].
  const opA: Operand = { buffer: ab, rows: m, sr: transA ? 1 : k, sc: transA ? m : 1 };
  const opB: Operand = { buffer: bb, rows: n, sr: transB ? k : 1, sc: transB ? 1 : n };
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
