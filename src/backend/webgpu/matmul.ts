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
 *
 * A 16-bit operand (a frozen base weight, two elements per u32 word) whose contiguous dimension
 * is a multiple of 4 (real models) goes to its texture as raw bits, half the bytes of an f32
 * copy: rgba16uint for bf16 (the main kernel, derived from matmul_t16x16, widens with a shift),
 * rgba16float for f16 (the texture load widens). Rows of a multiple of 128 elements (256 bytes,
 * e.g. every Qwen2.5 matrix) are copied as they are, others through a staging buffer of that
 * pitch (`matmul_pitch16`). Any other 16-bit operand is widened element by element by
 * `matmul_pack16`; the direct kernel gets it widened into a temporary.
 * @module
 */
import type { MatmulOptions } from "../ops.ts";
import type { DType, Tensor } from "../tensor.ts";
import { matmulDims } from "../checks/matmul.ts";
import { encodeParams, type GpuContext, grid, type Params } from "./context.ts";
import type { GpuScope, GpuTensor } from "./scope.ts";
import { halfConstants, widenBuffer } from "./half.ts";

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

/** Operand texture formats: f32 values, or a 16-bit operand's bits as they are. */
type TexFormat = "rgba32float" | "rgba16uint" | "rgba16float";

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

  /**
   * A texture of at least w x h texels for the operand role ("a" or "b"): rgba32float, or a
   * 16-bit operand's raw bits (rgba16uint for bf16, widened by the main kernel as it loads;
   * rgba16float for f16, widened by the texture load).
   */
  texture(role: string, w: number, h: number, format: TexFormat = "rgba32float"): Packed {
    const limit = this.ctx.device.limits.maxTextureDimension2D;
    const tw = Math.min(limit, Math.ceil(w / TEX_W_STEP) * TEX_W_STEP);
    const th = Math.min(limit, Math.ceil(h / TEX_H_STEP) * TEX_H_STEP);
    const key = `${role}:${format}:${tw}x${th}`;
    let p = this.textures.get(key);
    if (!p) {
      const bytes = tw * th * (format === "rgba32float" ? 16 : 8);
      if (this.bytes + bytes > TEX_CACHE_BYTES) this.clear();
      const texture = this.ctx.device.createTexture({
        label: `matmul_${key}`,
        size: [tw, th],
        format,
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
  /** f32, or a 16-bit format (then always packed, by matmul_pack16). */
  readonly dtype: DType;
}

/** How a chunk of an operand reaches its texture. */
type Load =
  | {
    kind: "copy";
    op: Operand;
    kMajor: boolean;
    row0: number;
    rows: number;
    tex: Packed;
    /** Bytes per element in the buffer and the texture: 4 (f32), 2 (bf16 bits, rgba16uint). */
    elem: number;
  }
  | {
    /** 16-bit rows copied into a staging buffer of a 256-byte pitch, then into the texture. */
    kind: "pitch";
    op: Operand;
    staging: GPUBuffer;
    pitch: number;
    /** Texture rows, and u32 words of each. */
    lines: number;
    words: number;
    extent: [number, number];
    tex: Packed;
    u: GPUBufferBinding;
  }
  | {
    kind: "pack";
    /** matmul_pack (f32) or matmul_pack16 (16-bit). */
    kernel: string;
    op: Operand;
    /** Texels to write: [width, height]. */
    size: readonly [number, number];
    tex: Packed;
    u: GPUBufferBinding;
  };

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
  // uniform slots: the kernel each is for (to check them against its struct Params) and values
  const params: [string, Params][] = [];
  const slot = (kernel: string, p: Params): GPUBufferBinding => {
    params.push([kernel, p]);
    return { buffer: null as unknown as GPUBuffer, offset: (params.length - 1) * SLOT, size: 32 };
  };
  // Texture layout of an operand: k-major (texel = 4 consecutive k of one row) unless the
  // operand is stored [K, rows] with rows a multiple of 64 and K of the k-step, which is copied
  // as is (texel = 4 consecutive rows at one k). Copies need rows of a multiple of 256 bytes.
  // A 16-bit operand takes the copied-as-is layout with rows of a multiple of 4 only (its
  // copies go through a staging buffer of a 256-byte pitch where needed, see bits16).
  const kMajor = (op: Operand) =>
    op.kContiguous || op.rows % (op.dtype === "f32" ? 64 : 4) !== 0 || k % 4 !== 0 || k > limit;
  const copyable = (op: Operand) =>
    op.dtype === "f32" && (!op.kContiguous ? !kMajor(op) : k % 64 === 0);
  // A 16-bit operand with its contiguous dimension a multiple of 4 goes to the texture as raw
  // bits: rgba16uint (bf16: the main kernel widens with a shift) or rgba16float (f16: the texture
  // load widens). Copies need texture rows of a multiple of 256 bytes: other widths are first
  // copied into a staging buffer of that row pitch (matmul_pitch16).
  const bits16 = (op: Operand) =>
    op.dtype !== "f32" && (!kMajor(op) || (op.kContiguous && k % 4 === 0));
  const format = (op: Operand): TexFormat =>
    !bits16(op) ? "rgba32float" : op.dtype === "bf16" ? "rgba16uint" : "rgba16float";
  const staging: GPUBuffer[] = [];
  const loads: Load[] = [];
  const load = (op: Operand, role: string, row0: number, rows: number): Packed => {
    const padded = Math.ceil(rows / TILE) * TILE;
    if (bits16(op)) {
      const km = kMajor(op);
      const tex = km
        ? st.texture(role + "k", kSteps, padded, format(op))
        : st.texture(role + "m", padded / 4, k, format(op));
      // the run of elements one texture row holds: k of one op row, or `rows` op rows at one k;
      // a direct copy reads it at the buffer's row stride, which must be a multiple of 256 bytes
      const run = km ? k : rows;
      if (((km ? k : op.rows) * 2) % 256 === 0) {
        loads.push({ kind: "copy", op, kMajor: km, row0, rows, tex, elem: 2 });
        return tex;
      }
      const pitch = Math.ceil((run * 2) / 256) * 256;
      const lines = km ? rows : k;
      const buf = ctx.alloc(lines * pitch);
      staging.push(buf);
      const u = slot("matmul_pitch16", {
        src_ld: (km ? k : op.rows) / 2,
        dst_ld: pitch / 4,
        row0: km ? row0 : 0,
        col0: km ? 0 : row0 / 2,
        rows: lines,
        words: run / 2,
      });
      const extent: [number, number] = km ? [kSteps, rows] : [rows / 4, k];
      loads.push({ kind: "pitch", op, staging: buf, pitch, lines, words: run / 2, extent, tex, u });
      return tex;
    }
    if (!kMajor(op)) {
      const tex = st.texture(role + "m", padded / 4, k);
      loads.push({ kind: "copy", op, kMajor: false, row0, rows, tex, elem: 4 });
      return tex;
    }
    const tex = st.texture(role + "k", kSteps, padded);
    if (copyable(op)) {
      // Rows past `rows` keep stale values; they only reach results that are never stored.
      loads.push({ kind: "copy", op, kMajor: true, row0, rows, tex, elem: 4 });
    } else {
      const [sr, sc] = op.kContiguous ? [k, 1] : [1, op.rows];
      const kernel = op.dtype === "f32" ? "matmul_pack" : "matmul_pack16";
      const u = slot(kernel, {
        rows: op.rows,
        cols: k,
        sr,
        sc,
        row0,
        width: kSteps,
        height: padded,
      });
      loads.push({ kind: "pack", kernel, op, size: [kSteps, padded], tex, u });
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
      const u = slot("matmul_t16x16", {
        m: mc,
        n: nc,
        k4: kSteps,
        ldc4: ldc / 4,
        coff4: (m0 * ldc + n0) / 4,
        tiles_n: tilesN,
        tiles_m: tilesM,
      });
      mains.push({ loads: loads.splice(0), at, bt, u, tiles });
    }
  }
  // Few tiles: small workgroups, so that both threads of a software adapter get work.
  const wg = Math.ceil(m / TILE) * Math.ceil(n / TILE) >= FEW_TILES ? 64 : 16;
  const constants: Record<string, number> = { A_KMAJOR: +kMajor(a), B_KMAJOR: +kMajor(b) };
  if (wg !== 64) constants.WG = wg;
  const pipeline = ctx.pipeline(mainKernel(ctx, format(a), format(b)), constants);
  const pack = (kernel: string, op: Operand) =>
    ctx.pipeline(kernel, op.dtype === "f32" ? undefined : halfConstants(op.dtype));

  ctx.flush(); // the context's pending work first: it may produce our operands
  const ubuf = st.uniforms(params.length);
  const data = new ArrayBuffer(params.length * SLOT);
  params.forEach(([kernel, p], i) =>
    encodeParams(kernel, ctx.paramsOf(kernel), p, new DataView(data, i * SLOT, SLOT))
  );
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
        const { op, row0, rows, elem: e } = l;
        enc.copyBufferToTexture(
          l.kMajor
            ? { buffer: op.buffer, offset: row0 * k * e, bytesPerRow: k * e, rowsPerImage: rows }
            : { buffer: op.buffer, offset: row0 * e, bytesPerRow: op.rows * e, rowsPerImage: k },
          { texture: l.tex.texture },
          l.kMajor ? [kSteps, rows] : [Math.ceil(rows / 4), k],
        );
      } else if (l.kind === "pitch") {
        pass ??= enc.beginComputePass({ label: "matmul" });
        const p = ctx.pipeline("matmul_pitch16");
        pass.setPipeline(p);
        pass.setBindGroup(
          0,
          bindGroup(p, [bind(l.u), { buffer: l.op.buffer }, { buffer: l.staging }]),
        );
        const [gx, gy] = grid(Math.ceil((l.lines * l.words) / 256));
        pass.dispatchWorkgroups(gx, gy);
        endPass();
        enc.copyBufferToTexture(
          { buffer: l.staging, offset: 0, bytesPerRow: l.pitch, rowsPerImage: l.lines },
          { texture: l.tex.texture },
          l.extent,
        );
      } else {
        pass ??= enc.beginComputePass({ label: "matmul" });
        const p = pack(l.kernel, l.op);
        pass.setPipeline(p);
        pass.setBindGroup(0, bindGroup(p, [bind(l.u), { buffer: l.op.buffer }, l.tex.view]));
        pass.dispatchWorkgroups(Math.ceil(l.size[0] / 4), Math.ceil(l.size[1] / 16));
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
  // later users of these buffers come after this submit in the queue
  for (const buf of staging) ctx.release(buf);
};

/**
 * The main tiled kernel for operand textures of the given formats: matmul_t16x16 with the
 * declarations (and, for bf16 bits, the loads: `bitcast(bits << 16)` is the exact widening)
 * changed, derived from its source so that the arithmetic is the same text.
 */
const mainKernel = (ctx: GpuContext, fa: TexFormat, fb: TexFormat): string => {
  if (fa === "rgba32float" && fb === "rgba32float") return "matmul_t16x16";
  const tag = (f: TexFormat) => f === "rgba32float" ? "" : f === "rgba16uint" ? "_bf16" : "_f16";
  const name = `matmul_t16x16_a${tag(fa)}_b${tag(fb)}`;
  return ctx.derivedKernel(name, "matmul_t16x16", (code) => {
    let out = code;
    const swap = (from: string, to: string) => {
      if (!out.includes(from)) throw new Error(`matmul.wgsl: matmul_t16x16 lacks "${from}"`);
      out = out.replace(from, to);
    };
    for (const [t, f, fmt] of [["at", "ta", fa], ["bt", "tb", fb]] as const) {
      if (fmt === "rgba32float") continue;
      swap(
        `var ${t}: texture_storage_2d<rgba32float, read>;`,
        `var ${t}: texture_storage_2d<${fmt}, read>;`,
      );
      if (fmt === "rgba16float") continue;
      swap(
        `fn ${f}(x: i32, y: i32) -> vec4<f32> { return textureLoad(${t}, vec2<i32>(x, y)); }`,
        `fn ${f}(x: i32, y: i32) -> vec4<f32> {
  return bitcast<vec4<f32>>(textureLoad(${t}, vec2<i32>(x, y)) << vec4<u32>(16u));
}`,
      );
    }
    return out;
  });
};

/** Whether the tiled path takes the product (else the direct kernel). */
const useTiled = (ctx: GpuContext, m: number, n: number, k: number): boolean => {
  if (Math.ceil(k / 4) > ctx.device.limits.maxTextureDimension2D) return false;
  return matmulTuning.forceTiled || m * n * k >= SMALL_MACS;
};

/** See Ops.matmul. */
export function matmul(sc: GpuScope, a: Tensor, b: Tensor, opts?: MatmulOptions): Tensor {
  const { m, n, k, transA, transB } = matmulDims("matmul", a, b, opts);
  const ah = sc.fh(a, "matmul");
  const bh = sc.fh(b, "matmul");
  if (m === 0 || n === 0) return sc.out([m, n]);
  if (k === 0) return sc.zeros([m, n]);
  const ctx = sc.ctx;
  if (!useTiled(ctx, m, n, k)) {
    // 16-bit operands widened into temporaries, released once the product is encoded
    const dense = (h: { buffer: GPUBuffer; dtype: DType }, size: number) =>
      h.dtype === "f32" ? h.buffer : widenBuffer(sc, h.buffer, h.dtype, size);
    const ab = dense(ah, a.size);
    const bb = dense(bh, b.size);
    const out = sc.out([m, n]);
    const tilesN = Math.ceil(n / 4);
    const groups = Math.ceil((Math.ceil(m / 4) * tilesN) / 64);
    sc.dispatch("matmul_small", [ab, bb, out.buffer], grid(groups), {
      m,
      n,
      k,
      sam: transA ? 1 : k,
      sak: transA ? m : 1,
      sbk: transB ? 1 : n,
      sbn: transB ? k : 1,
      tiles_n: tilesN,
    });
    if (ab !== ah.buffer) ctx.release(ab);
    if (bb !== bh.buffer) ctx.release(bb);
    return out;
  }
  // Rows of op(A) and columns of op(B), each a vector along k.
  const opA: Operand = { buffer: ah.buffer, rows: m, kContiguous: !transA, dtype: ah.dtype };
  const opB: Operand = { buffer: bh.buffer, rows: n, kContiguous: transB, dtype: bh.dtype };
  const out: GpuTensor = sc.out([m, n]);
  if (n % 4 === 0) {
    tiled(ctx, opA, opB, out.buffer, m, n, k, n);
    return out;
  }
  // Vector stores need a row stride of a multiple of 4: compute into a padded buffer, then copy.
  const ld = Math.ceil(n / 4) * 4;
  const tmp = ctx.alloc(m * ld * 4);
  tiled(ctx, opA, opB, tmp, m, n, k, ld);
  sc.dispatch("matmul_unpad", [tmp, out.buffer], grid(Math.ceil((m * n) / 256)), {
    rows: m,
    cols: n,
    ld,
  });
  ctx.release(tmp);
  return out;
}
