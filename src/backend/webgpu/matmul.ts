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
 *   the plain product. Copies and dispatches join the context's batch (`dispatchResources`
 *   binds the textures; queue order keeps every dependency), so a product costs no submit of
 *   its own: a decoding step runs ~200 of them.
 * - Direct (`matmul_small`): a 4x4 block per invocation straight from the storage buffers with
 *   arbitrary strides, for products too small to repay the packing, for K beyond the
 *   texture limit, and for accumulating a skinny product (a LoRA delta while decoding).
 *
 * Both kernels can add alpha times the product into C as they store it (`matmulAccumulate`,
 * override ACC): a LoRA delta lands on the base projection without a temporary or an add pass.
 *
 * A 16-bit operand (a frozen base weight, two elements per u32 word) whose contiguous dimension
 * is a multiple of 4 (real models) goes to its texture as raw bits, half the bytes of an f32
 * copy: rgba16uint for bf16 (the main kernel, derived from matmul_t16x16, widens with a shift),
 * rgba16float for f16 (the texture load widens). Rows of a multiple of 128 elements (256 bytes,
 * e.g. every Qwen2.5 matrix) are copied as they are, others through a staging buffer of that
 * pitch (`matmul_pitch16`). Any other 16-bit operand is widened element by element by
 * `matmul_pack16`; the direct kernel gets it widened into a temporary. A 16-bit operand's packed
 * texture is kept with its buffer (`TileState.frozen`, within a byte budget) and reused until
 * that buffer is released or written, so a frozen base weight is packed once, not per product.
 * Other operands go to shared textures, and one already there (the last load into that texture,
 * its buffer neither written nor released since) is not copied again (`TileState.holding`).
 * projectLoraShared runs a decoding step's q/k/v or gate/up as one product over stacked weights
 * (`stackedProjections`).
 *
 * Where the device has subgroups of one fixed size (lavapipe, llvmpipe's Vulkan driver), a
 * product of at least 64 rows with a k-major A runs the subgroup tile kernel instead of
 * matmul_t16x16 (matmul_subgroup.ts): same textures, parameters and store, a 64-row tile per
 * subgroup with rows of A shared by broadcast (1024³: 83 vs 69-71 GFLOP/s).
 * @module
 */
import { projectEachLora, projectSwigluEach, rotated } from "../lora_projections.ts";
import type {
  LoraProjection,
  MatmulOptions,
  RmsNormFold,
  RopeFold,
  RopeFrequencies,
  SwigluPart,
} from "../ops.ts";
import { type DType, ensure, type Tensor } from "../tensor.ts";
import { checkRowRange } from "../checks/elementwise.ts";
import { checkLogSoftmaxChunkOf } from "../checks/layers.ts";
import {
  accumulateDims,
  accumulateRowsDims,
  matmulDims,
  projectLoraDims,
  projectLoraSharedDims,
  projectSwigluDims,
} from "../checks/matmul.ts";
import { f32, type GpuContext, grid, type Params } from "./context.ts";
import type { GpuScope, GpuTensor } from "./scope.ts";
import { halfConstants, widenBuffer } from "./half.ts";
import { addScaledInPlace, sliceRows, swiglu } from "./elementwise.ts";
import { logSoftmaxChunk, lsmMergeTiles, rmsNorm, rope, ropeFrequencies } from "./layers.ts";
import * as gpuVariant from "./matmul_gpu.ts";
import {
  formatTag,
  NORM_MAX_K4,
  SUBGROUP_TILE_ROWS,
  subgroupKernelName,
  subgroupKernelSource,
  texelLoader,
  type TexFormat,
} from "./matmul_subgroup.ts";

/** Products below this many multiply-adds use the direct kernel. */
const SMALL_MACS = 1 << 17;
/** Inner dimensions up to this (a LoRA rank) with few rows accumulate with the direct kernel. */
const SKINNY_K = 32;
/** Output rows and columns per invocation of the tiled kernel (`matmul_t16x16`). */
const TILE = 16;

/** @internal Test hook: send every product the tiled kernel can take to it, whatever its size. */
export const matmulTuning: {
  forceTiled: boolean;
  stackedProducts: number;
  subgroupTiles: boolean;
  subgroupProducts: number;
  swigluProducts: number;
  foldedNorms: number;
  ropeInProducts: boolean;
  ropeStores: number;
  lsmInProducts: boolean;
  lsmStores: number;
} = {
  forceTiled: false,
  /** Products projectLoraShared ran stacked (stackedProjections), counted for tests. */
  stackedProducts: 0,
  /** Let products the subgroup tile kernel can take go to it (false: matmul_t16x16 only). */
  subgroupTiles: true,
  /** Dispatches of the subgroup tile kernel (matmul_subgroup.ts), counted for tests. */
  subgroupProducts: 0,
  /** Calls projectSwiglu ran as one product (swigluProduct), counted for tests. */
  swigluProducts: 0,
  /** Calls of projectLoraShared / projectSwiglu whose RMSNorm joined their products, for tests. */
  foldedNorms: 0,
  /** Let projectLoraShared rotate in the product's store (false: rope_apply after, for A/B). */
  ropeInProducts: true,
  /** projectLoraShared parts rotated in their product's store, counted for tests. */
  ropeStores: 0,
  /** Let projectLogSoftmaxChunk reduce in the product's store (false: logits then lsm_chunk). */
  lsmInProducts: true,
  /** projectLogSoftmaxChunk calls reduced in their product's store, counted for tests. */
  lsmStores: 0,
};

/**
 * Products of fewer tiles than this (and no accumulate or LoRA pair) split K when it is long:
 * a decoding step's x·Aᵀ (8 rows, a rank of 48: 3 tiles) otherwise runs 3 invocations, lanes
 * of one vector on one thread, through all of K.
 */
const SPLIT_BELOW_TILES = 16;
/** Invocations a K split aims at: a 16-lane vector for each of two threads. */
const SPLIT_INVOCATIONS = 32;
/** Fewest k-texels (4 k each) per part of a K split. */
const SPLIT_MIN_K4 = 16;

/** Tiles below which workgroups shrink from 64 to 16 invocations. */
const FEW_TILES = 256;
/** Texture sizes are rounded up to these multiples so that similar shapes share textures. */
const TEX_W_STEP = 64;
const TEX_H_STEP = 128;
/** Cached operand textures above this many bytes are dropped (after a flush). */
const TEX_CACHE_BYTES = 512 * 1024 * 1024;
/**
 * Most bytes of packed 16-bit operands kept between products (TileState.frozen): the frozen base
 * of a small model (SmolLM2-135M: 270 MB) fits; a larger one keeps the first matrices it meets.
 */
const KEPT_TEX_BYTES = 768 * 1024 * 1024;
/**
 * Operands that copy straight into their texture are kept only up to this total (they cost
 * memory for a gain in small products only), and only for products of at most
 * KEEP_DIRECT_ROWS rows of A.
 */
const KEPT_DIRECT_BYTES = 384 * 1024 * 1024;
const KEEP_DIRECT_ROWS = 64;

interface Packed {
  readonly texture: GPUTexture;
  readonly view: GPUTextureView;
  readonly bytes: number;
}

/** Per-device state of the tiled path: operand textures and a uniform buffer. */
class TileState {
  private readonly textures = new Map<string, Packed>();
  private bytes = 0;

  /** Packed copies of 16-bit operands kept with their buffer (see `frozen`), and their bytes. */
  private readonly kept = new Map<GPUBuffer, Map<string, Packed>>();
  private keptBytes = 0;

  constructor(private readonly ctx: GpuContext) {}

  /**
   * The packed copy of a 16-bit operand's rows under `key` (its layout), kept with its buffer:
   * `hit` when it is already filled, else a fresh texture of w x h texels that the caller fills
   * now; null when keeping it would pass KEPT_TEX_BYTES (the caller packs into the shared
   * texture as before). A copy lives until its buffer is released or written
   * (GpuContext.invalidate): a frozen base weight is packed once, not on every product.
   */
  frozen(
    buffer: GPUBuffer,
    direct: boolean,
    key: string,
    w: number,
    h: number,
    format: TexFormat,
  ): { tex: Packed; hit: boolean } | null {
    const per = this.kept.get(buffer);
    const found = per?.get(key);
    if (found) return { tex: found, hit: true };
    const tex = this.keep(
      `matmul_kept_${key}`,
      w,
      h,
      format,
      direct ? KEPT_DIRECT_BYTES : KEPT_TEX_BYTES,
    );
    if (!tex) return null;
    if (per) per.set(key, tex);
    else {
      this.kept.set(buffer, new Map([[key, tex]]));
      this.ctx.derive(buffer, () => {
        for (const t of this.kept.get(buffer)?.values() ?? []) {
          this.ctx.retire(t.texture);
          this.keptBytes -= t.bytes;
        }
        this.kept.delete(buffer);
      });
    }
    return { tex, hit: false };
  }

  /** A fresh w x h texture counted in keptBytes, or null when that would pass `budget`. */
  private keep(label: string, w: number, h: number, format: TexFormat, budget: number) {
    const bytes = w * h * (format === "rgba32float" ? 16 : 8);
    if (this.keptBytes + bytes > budget) return null;
    const texture = this.ctx.device.createTexture({
      label,
      size: [w, h],
      format,
      usage: GPUTextureUsage.STORAGE_BINDING | GPUTextureUsage.COPY_DST,
    });
    this.keptBytes += bytes;
    return { texture, view: texture.createView(), bytes };
  }

  /** Numbers naming buffers in the keys of `stacked`. */
  private readonly ids = new WeakMap<GPUBuffer, number>();
  private nextId = 0;
  /** Textures derived from several buffers (see `stacked`), by key. */
  private readonly stacks = new Map<string, Packed>();

  /**
   * A texture derived from several buffers together (projectLoraShared's stacked weights and
   * block-diagonal LoRA B), kept within KEPT_TEX_BYTES like `frozen` until any of them is
   * released or written: `hit` when filled already, else fresh for the caller to fill now; null
   * when keeping it would pass the budget (the caller takes the projection-by-projection path).
   */
  stacked(
    buffers: readonly GPUBuffer[],
    what: string,
    w: number,
    h: number,
    format: TexFormat,
  ): { tex: Packed; hit: boolean } | null {
    const id = (b: GPUBuffer) => {
      let i = this.ids.get(b);
      if (i === undefined) this.ids.set(b, i = this.nextId++);
      return i;
    };
    const key = `${what}:${w}x${h}:${format}:${buffers.map(id).join(",")}`;
    const found = this.stacks.get(key);
    if (found) return { tex: found, hit: true };
    const tex = this.keep(`matmul_stacked_${what}`, w, h, format, KEPT_TEX_BYTES);
    if (!tex) return null;
    this.stacks.set(key, tex);
    // the first of its buffers to change drops it (the others find it gone)
    for (const b of buffers) this.ctx.derive(b, () => this.unstack(tex));
    return { tex, hit: false };
  }

  /** Drops a texture of `stacked` (its contents are stale, or its caller will not fill it). */
  unstack(tex: Packed): void {
    for (const [key, t] of this.stacks) {
      if (t !== tex) continue;
      this.stacks.delete(key);
      this.ctx.retire(t.texture);
      this.keptBytes -= t.bytes;
    }
  }

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

  /**
   * What each shared texture holds: the operand load last encoded into it (its buffer and the
   * load's layout), while that buffer is neither written nor released.
   */
  private readonly holds = new Map<Packed, { buffer: GPUBuffer; load: string }>();
  /** Buffers whose writes and release clear their entries in `holds`. */
  private readonly watched = new Set<GPUBuffer>();

  /**
   * Whether shared texture `tex` already holds load `load` of `buffer` (encoded earlier and
   * neither overwritten nor stale since; queue order then serves it to later products as is).
   * Otherwise records it as the texture's contents, for the caller to encode now. Products of
   * one input (q/k/v and their LoRA x·Aᵀ, gate/up) thus copy it into its texture once.
   */
  holding(tex: Packed, buffer: GPUBuffer, load: string): boolean {
    const h = this.holds.get(tex);
    if (h && h.buffer === buffer && h.load === load) return true;
    this.holds.set(tex, { buffer, load });
    if (!this.watched.has(buffer)) {
      this.watched.add(buffer);
      this.ctx.derive(buffer, () => {
        this.watched.delete(buffer);
        for (const [t, v] of this.holds) if (v.buffer === buffer) this.holds.delete(t);
      });
    }
    return false;
  }

  /** Drops the shared textures (destroyed once the work encoded so far is submitted). */
  private clear(): void {
    for (const p of this.textures.values()) this.ctx.retire(p.texture);
    this.textures.clear();
    this.holds.clear();
    this.bytes = 0;
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
  /** Keep an f32 operand's packed texture with its buffer too (a LoRA B between updates). */
  readonly keep?: boolean;
  /**
   * For a k-contiguous operand: its rows are rows [rowBase, rowBase + rows) of a matrix of
   * bufferRows rows in the buffer (a vocabulary chunk of the LM head, read without a copy).
   */
  readonly view?: { readonly rowBase: number; readonly bufferRows: number };
  /**
   * For an operand that is not k-contiguous and goes to its texture as it is (not k-major): its
   * k rows start at row kBase of the buffer (a vocabulary chunk of the LM head, read in place).
   */
  readonly kBase?: number;
  /** Its texture, filled already (projectLoraShared's stacked weights and LoRA B): no load. */
  readonly packed?: Packed;
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
    /** Inner dimension of this operand when not the product's (the LoRA pair's rank). */
    k?: number;
    /** First texture row written (0 unless several operands share the texture). */
    y0?: number;
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
    u: Params;
    /** First texture row written (as for a copy). */
    y0?: number;
  }
  | {
    kind: "pack";
    /** matmul_pack (f32) or matmul_pack16 (16-bit). */
    kernel: string;
    op: Operand;
    /** Texels to write: [width, height]. */
    size: readonly [number, number];
    tex: Packed;
    u: Params;
  };

/**
 * A LoRA pair added to a tiled product: + beta·xa·Bᵀ (xa [m, r] and B [n, r], both f32 and
 * k-contiguous), by the `_lora` kernel's second inner loop. xa may be r columns of a wider
 * matrix (`xaWidth` columns, from column `xaOffset`, both multiples of 4): the deltas of
 * projections that share an input share one xa.
 */
interface LoraPair {
  readonly xa: Operand;
  readonly b: Operand;
  readonly r: number;
  readonly beta: number;
  readonly xaWidth?: number;
  readonly xaOffset?: number;
}

/**
 * An RMSNorm folded into the subgroup kernel (its `norm` form): the norm weight in a uniform
 * buffer of NORM_MAX_K4 vec4s, the row length h and eps.
 */
interface NormFold {
  readonly w: GPUBuffer;
  readonly h: number;
  readonly eps: number;
}

/**
 * A rotary embedding applied by the subgroup kernel as it stores (its `rope` form): the rows'
 * i32 positions, the inverse frequencies [headDim / 2] and headDim / 4.
 */
interface RopeStore {
  readonly positions: GPUBuffer;
  readonly freqs: GPUBuffer;
  readonly hd4: number;
}

/**
 * A product reduced by the subgroup kernel to log-softmax partials as it stores (its `lsm`
 * form, see matmul_subgroup.ts): the rows' i32 targets, the chunk's first vocabulary id and
 * 1 / temperature.
 */
interface LsmStore {
  readonly targets: GPUBuffer;
  readonly offset: number;
  readonly invT: number;
}

/**
 * Rows of A (columns of B) per chunk of the tiled path: the largest multiple of the tile side
 * within the device's texture limit.
 */
const rowChunk = (ctx: GpuContext): number =>
  Math.floor(ctx.device.limits.maxTextureDimension2D / TILE) * TILE;

/** Whether tiled runs the subgroup kernel for an f32 k-contiguous A of m rows, n columns, k. */
const subgroupRuns = (ctx: GpuContext, m: number, n: number, k: number): boolean => {
  const lanes = ctx.subgroupLanes;
  return lanes !== null && matmulTuning.subgroupTiles && !gpuVariant.usesGpuKernels(ctx) &&
    m >= SUBGROUP_TILE_ROWS && n >= 2 * lanes && k > 0 && k / 4 <= NORM_MAX_K4 &&
    Math.ceil(k / 4) <= ctx.device.limits.maxTextureDimension2D;
};

/**
 * Whether a projection of m rows, n columns over k rotates in its subgroup product's store (the
 * `rope` form: one chunk, whole vec4s of a head); elsewhere the rotation runs after.
 */
const ropeStores = (ctx: GpuContext, m: number, n: number, k: number, r: RopeFold): boolean => {
  const chunk = rowChunk(ctx);
  return matmulTuning.ropeInProducts && subgroupRuns(ctx, m, n, k) && r.headDim % 4 === 0 &&
    m <= chunk && n <= chunk;
};

/**
 * The norm weight w [k] (f32) in a fresh uniform buffer for the `norm` kernels (one small copy);
 * the caller releases `w` after its products.
 */
const normFold = (sc: GpuScope, norm: RmsNormFold, k: number, op: string): NormFold => {
  const wb = sc.f(norm.w, op);
  ensure(
    norm.w.shape.length === 1 && norm.w.shape[0] === k,
    op,
    () => `norm weight [${norm.w.shape}] for rows of ${k}`,
  );
  ensure(Number.isFinite(norm.eps) && norm.eps >= 0, op, () => `norm eps ${norm.eps}`);
  const w = sc.ctx.alloc(NORM_MAX_K4 * 16);
  sc.ctx.copy(wb, 0, w, 0, k * 4);
  return { w, h: k, eps: norm.eps };
};

/**
 * How rows [row0, row0 + rows) of a 16-bit operand reach texture `tex` as raw bits, from texture
 * row y0: copied when the run one texture row holds (k of one operand row when `km`, else `rows`
 * operand rows at one k) is a multiple of 256 bytes, as copies need; else through a staging
 * buffer of that row pitch (matmul_pitch16), pushed to `staging` for the caller to release once
 * the load is encoded.
 */
const load16 = (
  ctx: GpuContext,
  op: Operand,
  km: boolean,
  k: number,
  row0: number,
  rows: number,
  tex: Packed,
  staging: GPUBuffer[],
  y0 = 0,
): Load => {
  const run = km ? k : rows;
  if (((km ? k : op.rows) * 2) % 256 === 0) {
    return { kind: "copy", op, kMajor: km, row0, rows, tex, elem: 2, y0 };
  }
  const pitch = Math.ceil((run * 2) / 256) * 256;
  const lines = km ? rows : k;
  const buf = ctx.alloc(lines * pitch);
  staging.push(buf);
  const u: Params = {
    src_ld: (km ? k : op.rows) / 2,
    dst_ld: pitch / 4,
    row0: km ? row0 : op.kBase ?? 0,
    col0: km ? 0 : row0 / 2,
    rows: lines,
    words: run / 2,
  };
  const extent: [number, number] = km ? [Math.ceil(k / 4), rows] : [rows / 4, k];
  return { kind: "pitch", op, staging: buf, pitch, lines, words: run / 2, extent, tex, u, y0 };
};

/** Encodes one operand load (`k`: the product's inner dimension) into the context's batch. */
const encodeLoad = (ctx: GpuContext, l: Load, kk: number): void => {
  if (l.kind === "copy") {
    const { op, row0, rows, elem: e } = l;
    const k = l.k ?? kk;
    const kSteps = Math.ceil(k / 4);
    ctx.copyToTexture(
      l.kMajor
        ? { buffer: op.buffer, offset: row0 * k * e, bytesPerRow: k * e, rowsPerImage: rows }
        : {
          buffer: op.buffer,
          offset: ((op.kBase ?? 0) * op.rows + row0) * e,
          bytesPerRow: op.rows * e,
          rowsPerImage: k,
        },
      { texture: l.tex.texture, origin: { x: 0, y: l.y0 ?? 0 } },
      l.kMajor ? [kSteps, rows] : [Math.ceil(rows / 4), k],
    );
  } else if (l.kind === "pitch") {
    ctx.dispatch(
      "matmul_pitch16",
      [l.op.buffer, l.staging],
      grid(Math.ceil((l.lines * l.words) / 256)),
      l.u,
    );
    ctx.copyToTexture(
      { buffer: l.staging, offset: 0, bytesPerRow: l.pitch, rowsPerImage: l.lines },
      { texture: l.tex.texture, origin: { x: 0, y: l.y0 ?? 0 } },
      l.extent,
    );
  } else {
    ctx.dispatchResources(
      l.kernel,
      [{ buffer: l.op.buffer }, l.tex.view],
      [Math.ceil(l.size[0] / 4), Math.ceil(l.size[1] / 16)],
      l.u,
      l.op.dtype === "f32" ? undefined : halfConstants(l.op.dtype),
    );
  }
};

/**
 * Texture layout of an operand of a product of inner dimension k: k-major (texel = 4
 * consecutive k of one row) unless the operand is stored [K, rows] with rows a multiple of 64
 * and K of the k-step, which is copied as is (texel = 4 consecutive rows at one k). Copies need
 * rows of a multiple of 256 bytes. A 16-bit operand takes the copied-as-is layout with rows of a
 * multiple of 4 only (its copies go through a staging buffer of a 256-byte pitch where needed,
 * see tiled's bits16). `limit`: the device's largest texture side.
 */
const kMajorLayout = (
  op: { readonly kContiguous: boolean; readonly rows: number; readonly dtype: DType },
  k: number,
  limit: number,
): boolean =>
  op.kContiguous || op.rows % (op.dtype === "f32" ? 64 : 4) !== 0 || k % 4 !== 0 || k > limit;

/** Encodes the tiled path into the context's batch (results land in `c`). */
const tiled = (
  ctx: GpuContext,
  a: Operand,
  b: Operand,
  c: GPUBuffer,
  m: number,
  n: number,
  k: number,
  ldc: number,
  /** Accumulate: c += alpha·product (Ops.matmulAccumulate); null stores the product. */
  alpha: number | null = null,
  /** A LoRA pair added to the product (the `_lora` kernel); needs one row and column chunk. */
  lora: LoraPair | null = null,
  /** Columns stored into separate outputs (with `lora`, no accumulate; see segmentKernel). */
  segments: Segments | null = null,
  /**
   * The subgroup kernel's SwiGLU form (matmul_subgroup.ts): b is a gate weight of n rows stacked
   * on its up weight, c gets swiglu [m, n]; one chunk, no accumulate or segments.
   */
  glu = false,
  /** op(A)'s rows RMS-normalised in the subgroup kernel (its `norm` form; A f32, k-major). */
  norm: NormFold | null = null,
  /** The product rotated as it is stored (the subgroup kernel's `rope` form; one chunk). */
  rope: RopeStore | null = null,
  /** The product reduced to log-softmax partials (the subgroup kernel's `lsm` form; c: part). */
  lsm: LsmStore | null = null,
): void => {
  const kk = k;
  const st = stateOf(ctx);
  const dev = ctx.device;
  const limit = dev.limits.maxTextureDimension2D;
  const kSteps = Math.ceil(k / 4);
  const chunk = rowChunk(ctx);
  // kernel parameters, by the kernel they are for (checked against its struct Params when encoded)
  const slot = (_kernel: string, p: Params): Params => p;
  const kMajor = (op: Operand) => kMajorLayout(op, k, limit);
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
  const load = (op: Operand, role: string, viewRow0: number, rows: number): Packed => {
    if (op.packed) return op.packed;
    if (op.kBase !== undefined && kMajor(op)) {
      throw new Error("matmul: an operand with a k offset must go to its texture as it is");
    }
    // rows of a view are addressed in its buffer's matrix (see Operand.view)
    const row0 = viewRow0 + (op.view?.rowBase ?? 0);
    const bufferRows = op.view?.bufferRows ?? op.rows;
    const padded = Math.ceil(rows / TILE) * TILE;
    if (bits16(op)) {
      const km = kMajor(op);
      const direct = ((km ? k : op.rows) * 2) % 256 === 0;
      // A 16-bit operand (a frozen weight) is packed once and kept with its buffer when its rows
      // need a staging pass, or when the product is so small (decoding) that even a direct copy
      // costs as much as the arithmetic; a larger product redoes a direct copy (cheap beside it).
      const kept = direct && m > KEEP_DIRECT_ROWS ? null : st.frozen(
        op.buffer,
        direct,
        `${km}:${format(op)}:${k}:${bufferRows}:${row0}:${rows}:${op.kBase ?? 0}`,
        km ? kSteps : padded / 4,
        km ? padded : k,
        format(op),
      );
      if (kept?.hit) return kept.tex;
      const tex = kept?.tex ??
        (km
          ? st.texture(role + "k", kSteps, padded, format(op))
          : st.texture(role + "m", padded / 4, k, format(op)));
      const held = `16:${km}:${k}:${bufferRows}:${row0}:${rows}:${op.kBase ?? 0}`;
      if (!kept && st.holding(tex, op.buffer, held)) {
        return tex;
      }
      loads.push(load16(ctx, op, km, k, row0, rows, tex, staging));
      return tex;
    }
    if (!kMajor(op)) {
      const tex = st.texture(role + "m", padded / 4, k);
      if (st.holding(tex, op.buffer, `m:${k}:${bufferRows}:${row0}:${rows}:${op.kBase ?? 0}`)) {
        return tex;
      }
      loads.push({ kind: "copy", op, kMajor: false, row0, rows, tex, elem: 4 });
      return tex;
    }
    const tex = st.texture(role + "k", kSteps, padded);
    const layout = op.kContiguous ? "k" : "t";
    if (st.holding(tex, op.buffer, `${layout}:${k}:${bufferRows}:${row0}:${rows}`)) return tex;
    if (copyable(op)) {
      // Rows past `rows` keep stale values; they only reach results that are never stored.
      loads.push({ kind: "copy", op, kMajor: true, row0, rows, tex, elem: 4 });
    } else {
      const [sr, sc] = op.kContiguous ? [k, 1] : [1, op.rows];
      const kernel = op.dtype === "f32" ? "matmul_pack" : "matmul_pack16";
      const u = slot(kernel, {
        rows: bufferRows,
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
  type Main = { loads: Load[]; at: Packed; bt: Packed; u: Params; tiles: number };
  // The subgroup tile kernel where the device has one (lavapipe) and the product has a tile's
  // rows and half a tile's columns (a LoRA x·Aᵀ of rank 16 ran 2x faster in matmul_t16x16: 1024
  // x 16 x 1536 on lavapipe); it reads op(A) k-major only, and has no segmented store.
  const lanes = ctx.subgroupLanes;
  const sg = lanes !== null && matmulTuning.subgroupTiles && !segments &&
    m >= SUBGROUP_TILE_ROWS && n >= 2 * lanes && kMajor(a);
  if (glu && (!sg || alpha !== null || segments || m > chunk || 2 * n > chunk)) {
    throw new Error("matmul: the SwiGLU form needs the subgroup kernel and one chunk");
  }
  if (norm && (!sg || format(a) !== "rgba32float" || kSteps > NORM_MAX_K4)) {
    throw new Error("matmul: a folded norm needs the subgroup kernel and an f32 A");
  }
  if (
    rope && (!sg || glu || alpha !== null || m > chunk || n > chunk || !kMajor(b))
  ) {
    throw new Error("matmul: the rope form needs the subgroup kernel, one chunk and k-major B");
  }
  if (lsm && (!sg || glu || alpha !== null || lora || norm || rope || m > chunk || n > chunk)) {
    throw new Error("matmul: the lsm form needs the subgroup kernel alone and one chunk");
  }
  const tileRows = sg ? SUBGROUP_TILE_ROWS : TILE;
  // a SwiGLU tile covers 2 units per lane (its 4 columns are their gate and up halves)
  const tileCols = sg ? (glu ? 2 : 4) * lanes! : TILE;
  // at most half a tile of rows (decoding a few sequences): tiles of 8 rows (HALF_M)
  const halfM = m <= TILE / 2;
  const mains: Main[] = [];
  // With a single row chunk, A is loaded once and serves every column chunk.
  const single = m <= chunk ? load(a, "a", 0, m) : null;
  for (let n0 = 0; n0 < n; n0 += chunk) {
    const nc = Math.min(chunk, n - n0);
    const bt = load(b, "b", n0, glu ? 2 * nc : nc);
    for (let m0 = 0; m0 < m; m0 += chunk) {
      const mc = Math.min(chunk, m - m0);
      const at = single ?? load(a, "a", m0, mc);
      const tilesN = Math.ceil(nc / tileCols);
      const tilesM = Math.ceil(mc / (halfM ? TILE / 2 : tileRows));
      const tiles = tilesM * tilesN;
      const u = slot("matmul_t16x16", {
        m: mc,
        n: nc,
        k4: kSteps,
        ldc4: ldc / 4,
        coff4: (m0 * ldc + n0) / 4,
        tiles_n: tilesN,
        tiles_m: tilesM,
        alpha: f32(alpha ?? 1),
        k4b: lora ? Math.ceil(lora.r / 4) : 0,
        beta: f32(lora?.beta ?? 0),
        k4b0: lora ? (lora.xaOffset ?? 0) / 4 : 0,
        nz: 1,
        kz4: kSteps,
        zstride4: 0,
        ...(norm ? { norm_h: f32(norm.h), norm_eps: f32(norm.eps) } : {}),
        ...(rope ? { rope_hd4: rope.hd4 } : {}),
        ...(lsm ? { lsm_off: lsm.offset, lsm_it: f32(lsm.invT) } : {}),
      });
      mains.push({ loads: loads.splice(0), at, bt, u, tiles });
    }
  }
  // Few tiles: small workgroups, so that both threads of a software adapter get work.
  const wg = Math.ceil(m / TILE) * Math.ceil(n / TILE) >= FEW_TILES ? 64 : 16;
  const constants: Record<string, number> = sg
    ? { B_KMAJOR: +kMajor(b) }
    : { A_KMAJOR: +kMajor(a), B_KMAJOR: +kMajor(b) };
  if (wg !== 64 && !sg) constants.WG = wg;
  if (alpha !== null) constants.ACC = 1;
  if (halfM) constants.HALF_M = 1;
  if (segments && (!lora || alpha !== null || mains.length !== 1)) {
    throw new Error("matmul: segmented outputs need one chunk, a LoRA pair and no accumulate");
  }
  const kernel = (() => {
    if (sg) {
      const spec = {
        lanes: lanes!,
        fa: format(a),
        fb: format(b),
        lora: lora !== null,
        glu,
        norm: norm !== null,
        rope: rope !== null,
        lsm: lsm !== null,
      };
      return ctx.generatedKernel(subgroupKernelName(spec), () => subgroupKernelSource(spec));
    }
    const base = mainKernel(ctx, format(a), format(b));
    const fused = lora ? loraKernel(ctx, base) : base;
    return segments ? segmentKernel(ctx, fused) : fused;
  })();
  if (segments) {
    mains[0].u = { ...mains[0].u, seg1: segments.bounds[0], seg2: segments.bounds[1] };
  }
  // K split (see SPLIT_BELOW_TILES): parts into slabs of a temporary, added up into c after
  const split = !sg && mains.length === 1 && alpha === null && lora === null &&
      mains[0].tiles < SPLIT_BELOW_TILES
    ? kSplit(mains[0], kSteps, m, n, ldc)
    : null;
  const part = split ? ctx.alloc(split.nz * split.slab4 * 16) : null;
  if (part) staging.push(part);
  // the LoRA pair's textures, loaded with the (single) main's operands
  const pair = lora
    ? [
      loadRank(st, lora.xa, "xa", lora.xaWidth ?? lora.r, mains[0].loads),
      loadRank(st, lora.b, "lb", lora.r, mains[0].loads),
    ]
    : [];

  // Encoded into the context's batch, in order with the dispatches that produce the operands
  // and those that read the result (queue order keeps every dependency, shared textures too).
  for (const main of mains) {
    for (const l of main.loads) encodeLoad(ctx, l, kk);
    ctx.dispatchResources(
      kernel,
      [
        main.at.view,
        main.bt.view,
        { buffer: part ?? c },
        ...pair.map((p) => p.view),
        ...(segments?.outs ?? []).map((buffer) => ({ buffer })),
        ...(norm ? [{ buffer: norm.w }] : []),
        ...(rope ? [{ buffer: rope.positions }, { buffer: rope.freqs }] : []),
        ...(lsm ? [{ buffer: lsm.targets }] : []),
      ],
      // the subgroup kernel: one workgroup (one subgroup) per tile
      grid(sg ? main.tiles : Math.ceil(main.tiles / wg)),
      main.u,
      constants,
    );
    if (sg) matmulTuning.subgroupProducts++;
  }
  if (split && part) {
    ctx.dispatch("matmul_ksum", [part, c], grid(Math.ceil((m * split.n4) / 64)), {
      rows: m,
      n4: split.n4,
      ldc4: ldc / 4,
      coff4: 0,
      nz: split.nz,
      zstride4: split.slab4,
    });
  }
  // later users of these buffers come after this work in the queue
  for (const buf of staging) ctx.release(buf);
};

/**
 * The K split of a product of few tiles (one chunk, so stored at offset 0): as many parts as
 * bring the invocations to SPLIT_INVOCATIONS, each of at least SPLIT_MIN_K4 k-texels; null when
 * that is one part. Rewrites `main` to write part z into slab z of a temporary (allocated by the
 * caller) of `slab4` vec4s each.
 */
const kSplit = (
  main: { u: Params; tiles: number },
  kSteps: number,
  m: number,
  n: number,
  ldc: number,
): { nz: number; slab4: number; n4: number } | null => {
  const want = Math.min(
    Math.ceil(SPLIT_INVOCATIONS / main.tiles),
    Math.floor(kSteps / SPLIT_MIN_K4),
  );
  if (want < 2) return null;
  const kz4 = Math.ceil(kSteps / want);
  const nz = Math.ceil(kSteps / kz4);
  const slab4 = (m * ldc) / 4;
  main.u = { ...main.u, nz, kz4, zstride4: slab4 };
  main.tiles *= nz;
  return { nz, slab4, n4: Math.ceil(n / 4) };
};

/**
 * Texture of an f32 operand along a short inner dimension r (the LoRA pair: rows of xa or B,
 * r contiguous), k-major like the main operands: copied when r is a multiple of 64, else packed.
 * With `op.keep` the texture is kept with the buffer (until it is released or written).
 */
const loadRank = (
  st: TileState,
  op: Operand,
  role: string,
  r: number,
  loads: Load[],
): Packed => {
  if (op.packed) return op.packed;
  const steps = Math.ceil(r / 4);
  const padded = Math.ceil(op.rows / TILE) * TILE;
  const kept = op.keep
    ? st.frozen(op.buffer, false, `lora:${r}:${op.rows}`, steps, padded, "rgba32float")
    : null;
  if (kept?.hit) return kept.tex;
  const tex = kept?.tex ?? st.texture(role, steps, padded);
  if (!kept && st.holding(tex, op.buffer, `rank:${r}:${op.rows}`)) return tex;
  if (r % 64 === 0) {
    loads.push({ kind: "copy", op, kMajor: true, row0: 0, rows: op.rows, tex, elem: 4, k: r });
  } else {
    const u: Params = {
      rows: op.rows,
      cols: r,
      sr: r,
      sc: 1,
      row0: 0,
      width: steps,
      height: padded,
    };
    loads.push({ kind: "pack", kernel: "matmul_pack", op, size: [steps, padded], tex, u });
  }
  return tex;
};

/**
 * Outputs of a product whose columns go to separate tensors: columns [0, bounds[0]) to `c`
 * (row stride bounds[0]), [bounds[0], bounds[1]) to outs[0], [bounds[1], n) to outs[1], each
 * at its own width (bounds[1] = n leaves outs[1] unwritten). Segment widths are multiples of the
 * tile, so a tile's columns lie in one output.
 */
interface Segments {
  readonly outs: readonly [GPUBuffer, GPUBuffer];
  readonly bounds: readonly [number, number];
}

/**
 * Edits of matmul_t16x16's source for its derived kernels: `swap` replaces the first `from`
 * (which must be there: a renamed line fails loudly), `text` is the result.
 */
const textSwap = (code: string) => {
  let out = code;
  return {
    swap: (from: string, to: string): void => {
      if (!out.includes(from)) throw new Error(`matmul.wgsl: matmul_t16x16 lacks "${from}"`);
      out = out.replace(from, to);
    },
    text: (): string => out,
  };
};

/**
 * `lora` (a main kernel with its LoRA loop) storing into three outputs by column (see Segments):
 * projectLoraShared's stacked product, whose q/k/v (or gate/up) land in their own tensors.
 */
const segmentKernel = (ctx: GpuContext, lora: string): string =>
  ctx.derivedKernel(`${lora}_seg`, lora, (code) => {
    const edit = textSwap(code);
    const swap = edit.swap;
    swap("zstride4: u32,\n}", "zstride4: u32, seg1: u32, seg2: u32,\n}");
    swap(
      "@group(0) @binding(5) var tb_lora: texture_storage_2d<rgba32float, read>;",
      `@group(0) @binding(5) var tb_lora: texture_storage_2d<rgba32float, read>;
@group(0) @binding(6) var<storage, read_write> c1: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> c2: array<vec4<f32>>;`,
    );
    swap(
      `    let i = slab + row * params.ldc4 + col / 4u;
    if (ACC) { c[i] = c[i] + params.alpha * v; } else { c[i] = v; }`,
      `    if (col < params.seg1) {
      c[row * (params.seg1 / 4u) + col / 4u] = v;
    } else if (col < params.seg2) {
      c1[row * ((params.seg2 - params.seg1) / 4u) + (col - params.seg1) / 4u] = v;
    } else {
      c2[row * ((params.n - params.seg2) / 4u) + (col - params.seg2) / 4u] = v;
    }`,
    );
    return edit.text();
  });

/**
 * `base` (a main tiled kernel) with a second inner loop over the LoRA pair's textures (bindings
 * 4 and 5, k-major f32): the same 16x16 tile accumulates beta·xa·Bᵀ after op(A)·op(B), so the
 * delta costs no store pass of its own.
 */
const loraKernel = (ctx: GpuContext, base: string): string =>
  ctx.derivedKernel(`${base}_lora`, base, (code) => {
    const edit = textSwap(code);
    const swap = edit.swap;
    swap(
      "@group(0) @binding(3) var<storage, read_write> c: array<vec4<f32>>;",
      `@group(0) @binding(3) var<storage, read_write> c: array<vec4<f32>>;
@group(0) @binding(4) var ta_lora: texture_storage_2d<rgba32float, read>;
@group(0) @binding(5) var tb_lora: texture_storage_2d<rgba32float, read>;
fn la(x: i32, y: i32) -> vec4<f32> { return textureLoad(ta_lora, vec2<i32>(x, y)); }
fn lb(x: i32, y: i32) -> vec4<f32> { return textureLoad(tb_lora, vec2<i32>(x, y)); }
fn rows_la(k: i32, r: i32) -> mat4x4<f32> {
  let x = k + i32(params.k4b0);
  return transpose(mat4x4<f32>(la(x, r), la(x, r + 1), la(x, r + 2), la(x, r + 3))) * params.beta;
}
fn cols_lb(k: i32, n: i32) -> mat4x4<f32> {
  return mat4x4<f32>(lb(k, n), lb(k, n + 1), lb(k, n + 2), lb(k, n + 3));
}`,
    );
    swap(
      "  let r = u32(m0);",
      `  for (var k = 0; k < i32(params.k4b); k++) {
    let a0 = rows_la(k, m0 + 0);
    let a1 = rows_la(k, m0 + 4);
    let b0 = cols_lb(k, n0 + 0);
    let b1 = cols_lb(k, n0 + 4);
    let b2 = cols_lb(k, n0 + 8);
    let b3 = cols_lb(k, n0 + 12);
    c0_0 += a0 * b0; c0_1 += a0 * b1; c0_2 += a0 * b2; c0_3 += a0 * b3;
    c1_0 += a1 * b0; c1_1 += a1 * b1; c1_2 += a1 * b2; c1_3 += a1 * b3;
    if (!HALF_M) {
      let a2 = rows_la(k, m0 + 8);
      let a3 = rows_la(k, m0 + 12);
      c2_0 += a2 * b0; c2_1 += a2 * b1; c2_2 += a2 * b2; c2_3 += a2 * b3;
      c3_0 += a3 * b0; c3_1 += a3 * b1; c3_2 += a3 * b2; c3_3 += a3 * b3;
    }
  }
  let r = u32(m0);`,
    );
    return edit.text();
  });

/**
 * The main tiled kernel for operand textures of the given formats: matmul_t16x16 with the
 * declarations (and, for bf16 bits, the loads: `bitcast(bits << 16)` is the exact widening)
 * changed, derived from its source so that the arithmetic is the same text.
 */
const mainKernel = (ctx: GpuContext, fa: TexFormat, fb: TexFormat): string => {
  if (fa === "rgba32float" && fb === "rgba32float") return "matmul_t16x16";
  const name = `matmul_t16x16_a${formatTag(fa)}_b${formatTag(fb)}`;
  return ctx.derivedKernel(name, "matmul_t16x16", (code) => {
    const edit = textSwap(code);
    const swap = edit.swap;
    for (const [t, f, fmt] of [["at", "ta", fa], ["bt", "tb", fb]] as const) {
      if (fmt === "rgba32float") continue;
      swap(
        `var ${t}: texture_storage_2d<rgba32float, read>;`,
        `var ${t}: texture_storage_2d<${fmt}, read>;`,
      );
      if (fmt === "rgba16float") continue;
      swap(texelLoader(f, t, "rgba32float"), texelLoader(f, t, fmt));
    }
    return edit.text();
  });
};

/** Whether the tiled path takes the product (else the direct kernel). */
const useTiled = (ctx: GpuContext, m: number, n: number, k: number): boolean => {
  if (Math.ceil(k / 4) > ctx.device.limits.maxTextureDimension2D) return false;
  return matmulTuning.forceTiled || m * n * k >= SMALL_MACS;
};

/**
 * The direct kernel (`matmul_small`) into c: stores the product, or adds alpha times it
 * (`alpha` not null). 16-bit operands are widened into temporaries first.
 */
const direct = (
  sc: GpuScope,
  ah: { buffer: GPUBuffer; dtype: DType },
  bh: { buffer: GPUBuffer; dtype: DType },
  c: GPUBuffer,
  m: number,
  n: number,
  k: number,
  transA: boolean,
  transB: boolean,
  alpha: number | null,
): void => {
  const ctx = sc.ctx;
  // 16-bit operands widened into temporaries, released once the product is encoded
  const dense = (h: { buffer: GPUBuffer; dtype: DType }, size: number) =>
    h.dtype === "f32" ? h.buffer : widenBuffer(sc, h.buffer, h.dtype, size);
  const ab = dense(ah, m * k);
  const bb = dense(bh, k * n);
  const tilesN = Math.ceil(n / 4);
  const blocks = Math.ceil(m / 4) * tilesN;
  // few blocks: a workgroup of their size (extra invocations would only idle through the loop)
  const wg = blocks >= 64 ? 64 : blocks > 8 ? 16 : 8;
  const constants: Record<string, number> = {};
  if (wg !== 64) constants.WG = wg;
  if (alpha !== null) constants.ACC = 1;
  sc.dispatch("matmul_small", [ab, bb, c], grid(Math.ceil(blocks / wg)), {
    m,
    n,
    k,
    sam: transA ? 1 : k,
    sak: transA ? m : 1,
    sbk: transB ? 1 : n,
    sbn: transB ? k : 1,
    tiles_n: tilesN,
    alpha: f32(alpha ?? 1),
  }, Object.keys(constants).length > 0 ? constants : undefined);
  if (ab !== ah.buffer) ctx.release(ab);
  if (bb !== bh.buffer) ctx.release(bb);
};

/** See Ops.matmul. */
export function matmul(sc: GpuScope, a: Tensor, b: Tensor, opts?: MatmulOptions): Tensor {
  if (gpuVariant.usesGpuKernels(sc.ctx)) return gpuVariant.matmulGpu(sc, a, b, opts);
  const { m, n, k, transA, transB } = matmulDims("matmul", a, b, opts);
  const ah = sc.fh(a, "matmul");
  const bh = sc.fh(b, "matmul");
  if (m === 0 || n === 0) return sc.out([m, n]);
  if (k === 0) return sc.zeros([m, n]);
  const ctx = sc.ctx;
  if (!useTiled(ctx, m, n, k)) {
    const out = sc.out([m, n]);
    direct(sc, ah, bh, out.buffer, m, n, k, transA, transB, null);
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

/**
 * See Ops.matmulAccumulate. The tiled kernel adds into c as it stores (no temporary, no add
 * pass over c); the other paths compute the product and add it.
 */
export function matmulAccumulate(
  sc: GpuScope,
  c: Tensor,
  a: Tensor,
  b: Tensor,
  s: number,
  opts?: MatmulOptions,
): void {
  if (gpuVariant.usesGpuKernels(sc.ctx)) {
    return gpuVariant.matmulAccumulateGpu(sc, c, a, b, s, opts);
  }
  const op = "matmulAccumulate";
  const { m, n, k, transA, transB } = accumulateDims(op, c, a, b, opts);
  const cb = sc.f(c, op);
  const ah = sc.fh(a, op);
  const bh = sc.fh(b, op);
  if (m === 0 || n === 0 || k === 0) return;
  if (cb === ah.buffer || cb === bh.buffer) {
    addScaledInPlace(sc, c, matmul(sc, a, b, opts), s);
    return;
  }
  // A skinny inner dimension with few rows (a LoRA delta x·Aᵀ·Bᵀ while decoding) goes direct
  // too: packing its operands would cost more than the product.
  if (!useTiled(sc.ctx, m, n, k) || n % 4 !== 0 || (k <= SKINNY_K && m <= KEEP_DIRECT_ROWS)) {
    direct(sc, ah, bh, cb, m, n, k, transA, transB, s);
    return;
  }
  const opA: Operand = { buffer: ah.buffer, rows: m, kContiguous: !transA, dtype: ah.dtype };
  const opB: Operand = { buffer: bh.buffer, rows: n, kContiguous: transB, dtype: bh.dtype };
  tiled(sc.ctx, opA, opB, cb, m, n, k, n, s);
}

/**
 * See Ops.projectLora. Products of more than KEEP_DIRECT_ROWS rows that the tiled kernel takes
 * in one chunk run the `_lora` kernel (the delta's loop continues the base one's, B's texture
 * kept until B changes); others (decoding, where packing xa would add a dispatch) take the
 * projection, then the delta accumulated onto it.
 */
export function projectLora(
  sc: GpuScope,
  x: Tensor,
  w: Tensor,
  xa: Tensor,
  b: Tensor,
  s: number,
  into?: Tensor,
): Tensor {
  if (gpuVariant.usesGpuKernels(sc.ctx)) {
    return gpuVariant.projectLoraGpu(sc, x, w, xa, b, s, into);
  }
  const op = "projectLora";
  const { m, n, k, r } = projectLoraDims(op, x, w, xa, b, into);
  const xh = sc.fh(x, op);
  const wh = sc.fh(w, op);
  const xah = sc.fh(xa, op);
  const bh = sc.fh(b, op);
  const ctx = sc.ctx;
  if (!(m > KEEP_DIRECT_ROWS && fusable(ctx, m, n, k, r, [xah.dtype, bh.dtype]))) {
    const y = matmul(sc, x, w, { transB: true });
    matmulAccumulate(sc, y, xa, b, s, { transB: true });
    if (!into) return y;
    addScaledInPlace(sc, into, y, 1);
    return into;
  }
  // with `into`: c += the product as the tile stores it (the same x + y as an add pass)
  const out = into ?? sc.out([m, n]);
  tiled(
    ctx,
    { buffer: xh.buffer, rows: m, kContiguous: true, dtype: xh.dtype },
    { buffer: wh.buffer, rows: n, kContiguous: true, dtype: wh.dtype },
    sc.f(out, op),
    m,
    n,
    k,
    n,
    into ? 1 : null,
    {
      xa: { buffer: xah.buffer, rows: m, kContiguous: true, dtype: "f32" },
      b: { buffer: bh.buffer, rows: n, kContiguous: true, dtype: "f32", keep: true },
      r,
      beta: s,
    },
  );
  return out;
}

/** Whether `projectLora` with these operands runs as one `_lora` product (any number of rows). */
const fusable = (
  ctx: GpuContext,
  m: number,
  n: number,
  k: number,
  r: number,
  dtypes: readonly DType[],
): boolean => {
  const limit = ctx.device.limits.maxTextureDimension2D;
  const chunk = rowChunk(ctx);
  return m <= chunk && n <= chunk && n % 4 === 0 && r > 0 && Math.ceil(r / 4) <= limit &&
    k > 0 && dtypes.every((d) => d === "f32") && useTiled(ctx, m, n, k);
};

/**
 * See Ops.projectLoraShared. The ranks' A matrices are stacked (buffer copies) so that one
 * product gives every xa, into a row pitch of a multiple of 64 floats so that it copies into
 * the `_lora` kernel's texture as is; each projection then runs as one `_lora` product reading
 * its columns of xa. Per layer of a decoding step that is 4 dispatches for the 7 deltas of a
 * LoRA on all projections instead of 14 (each delta's x·Aᵀ and its accumulate). Other shapes
 * go projection by projection.
 */
export function projectLoraShared(
  sc: GpuScope,
  input: Tensor,
  parts: readonly LoraProjection[],
  s: number,
  norm?: RmsNormFold,
): Tensor[] {
  const op = "projectLoraShared";
  const ctx = sc.ctx;
  const dims = projectLoraSharedDims(op, input, parts).map((d, i) => ({
    ...d,
    ah: sc.fh(parts[i].a, op),
    bh: sc.fh(parts[i].b, op),
  }));
  const [m, k] = input.shape;
  const r = dims.reduce((t, d) => t + d.r, 0);
  const pitch = Math.ceil(r / 64) * 64;
  const fits = (xd: DType) =>
    parts.length > 0 && m > 0 && xd === "f32" &&
    Math.ceil(pitch / 4) <= ctx.device.limits.maxTextureDimension2D &&
    dims.every((d) => d.r % 4 === 0 && fusable(ctx, m, d.n, k, d.r, [d.ah.dtype, d.bh.dtype]));
  // the norm joins the products where all of them (each part and the shared x·Aᵀ) run the
  // subgroup kernel; elsewhere it runs first
  const fold = norm && fits(sc.fh(input, op).dtype) && subgroupRuns(ctx, m, r, k) &&
      dims.every((d) => subgroupRuns(ctx, m, d.n, k))
    ? normFold(sc, norm, k, op)
    : null;
  const x = norm && !fold ? rmsNorm(sc, input, norm.w, norm.eps).y : input;
  if (gpuVariant.usesGpuKernels(ctx)) return gpuVariant.projectLoraSharedGpu(sc, x, parts, s);
  const xh = sc.fh(x, op);
  // the rotation after a product (parts whose product does not rotate as it stores)
  const rotate = {
    rope: (y: Tensor, pos: Tensor, heads: number, hd: number, theta: RopeFrequencies) =>
      rope(sc, y, pos, heads, hd, theta),
  };
  if (!fits(xh.dtype)) {
    return projectEachLora(
      {
        matmul: (a, b, opts) => matmul(sc, a, b, opts),
        matmulAccumulate: (c, a, b, k, opts) => matmulAccumulate(sc, c, a, b, k, opts),
        projectLora: (xx, w, xa, b, k, into) => projectLora(sc, xx, w, xa, b, k, into),
        ...rotate,
      },
      x,
      parts,
      s,
    );
  }
  const opX: Operand = { buffer: xh.buffer, rows: m, kContiguous: true, dtype: "f32" };
  const xa = sharedXa(
    ctx,
    opX,
    dims.map((d) => d.ah.buffer),
    dims.map((d) => d.r),
    m,
    k,
    pitch,
    fold,
  );
  // (a folded norm has a tile of rows or more: stackedProjections takes at most 16)
  const stackedOuts = fold ? null : stackedProjections(sc, opX, xa, pitch, r, dims, parts, s);
  if (stackedOuts) {
    ctx.release(xa);
    return stackedOuts.map((y, i) => rotated(rotate, y, parts[i]));
  }
  let offset = 0;
  const outs = parts.map((p, i) => {
    const d = dims[i];
    const wh = sc.fh(p.w, op);
    // onto `into` in place (the kernel's accumulating store), else into a fresh tensor
    const out = p.into ?? sc.out([m, d.n]);
    // a rotation joins the product's store where the subgroup kernel runs it (else after)
    const ropeStore = p.rope && ropeStores(ctx, m, d.n, k, p.rope)
      ? {
        positions: sc.i(p.rope.positions, op),
        freqs: ropeFrequencies(sc, p.rope.headDim, p.rope.theta),
        hd4: p.rope.headDim / 4,
      }
      : null;
    tiled(
      ctx,
      opX,
      { buffer: wh.buffer, rows: d.n, kContiguous: true, dtype: wh.dtype },
      sc.f(out, op),
      m,
      d.n,
      k,
      d.n,
      p.into ? 1 : null,
      {
        xa: { buffer: xa, rows: m, kContiguous: true, dtype: "f32" },
        b: { buffer: d.bh.buffer, rows: d.n, kContiguous: true, dtype: "f32", keep: true },
        r: d.r,
        beta: s,
        xaWidth: pitch,
        xaOffset: offset,
      },
      null,
      false,
      fold,
      ropeStore,
    );
    offset += d.r;
    if (ropeStore) matmulTuning.ropeStores++;
    return ropeStore ? out : rotated(rotate, out, p);
  });
  ctx.release(xa);
  if (fold) {
    ctx.release(fold.w);
    matmulTuning.foldedNorms++;
  }
  return outs;
}

/**
 * projectLoraShared's parts as one product where they allow it: two or three 16-bit weights of
 * tile-multiple widths and fresh outputs (q/k/v, gate/up). Their rows stacked in one kept
 * texture, their LoRA B in a block-diagonal one (each B's columns at its rank's offset in xa,
 * zeros elsewhere), so that x·[W1; W2; W3]ᵀ + s·xa·B_blockᵀ lands column by column in the
 * parts' outputs (segmentKernel): one dispatch instead of one per part, over more tiles, for
 * products of at most one tile of rows (a decoding step of a few sequences, whose products
 * have few tiles each). Measured on llvmpipe, SmolLM2-135M with LoRA on all projections: 8
 * sequences decoding 5% more tokens per second; 64 (4 tiles of rows) no faster, and a
 * 4096-row prefill 5% slower (the block-diagonal delta's longer loop), so those go part by
 * part. Null when they do not allow it or the kept textures would pass their budget.
 */
const stackedProjections = (
  sc: GpuScope,
  x: Operand,
  xa: GPUBuffer,
  pitch: number,
  r: number,
  dims: readonly { n: number; r: number; bh: { buffer: GPUBuffer } }[],
  parts: readonly LoraProjection[],
  s: number,
): GpuTensor[] | null => {
  const ctx = sc.ctx;
  const m = x.rows;
  const k = parts[0].w.shape[1];
  const ws = parts.map((p) => sc.fh(p.w, "projectLoraShared"));
  const dtype = ws[0].dtype;
  const nTotal = dims.reduce((t, d) => t + d.n, 0);
  if (
    m > TILE || parts.length < 2 || parts.length > 3 || parts.some((p) => p.into) ||
    dtype === "f32" ||
    ws.some((w) => w.dtype !== dtype) || dims.some((d) => d.n % TILE !== 0) || k % 4 !== 0 ||
    !fusable(ctx, m, nTotal, k, r, ["f32", "f32"])
  ) return null;
  const st = stateOf(ctx);
  const kSteps = k / 4;
  const padded = Math.ceil(nTotal / TILE) * TILE;
  const format: TexFormat = dtype === "bf16" ? "rgba16uint" : "rgba16float";
  const w = st.stacked(ws.map((h) => h.buffer), "w", kSteps, padded, format);
  if (!w) return null;
  const b = st.stacked(dims.map((d) => d.bh.buffer), "lora_b", r / 4, padded, "rgba32float");
  if (!b) {
    if (!w.hit) st.unstack(w.tex);
    return null;
  }
  fillStacked(ctx, k, dtype, dims.map((d, i) => ({ ...d, w: ws[i].buffer, b: d.bh.buffer })), w, b);
  const outs = dims.map((d) => sc.out([m, d.n]));
  // two parts: the third output is never written (its columns start at n)
  const unused = outs.length === 2 ? ctx.alloc(16) : null;
  tiled(
    ctx,
    x,
    { buffer: ws[0].buffer, rows: nTotal, kContiguous: true, dtype, packed: w.tex },
    outs[0].buffer,
    m,
    nTotal,
    k,
    nTotal,
    null,
    {
      xa: { buffer: xa, rows: m, kContiguous: true, dtype: "f32" },
      b: {
        buffer: dims[0].bh.buffer,
        rows: nTotal,
        kContiguous: true,
        dtype: "f32",
        packed: b.tex,
      },
      r,
      beta: s,
      xaWidth: pitch,
      xaOffset: 0,
    },
    {
      outs: [outs[1].buffer, outs[2]?.buffer ?? unused!],
      bounds: [dims[0].n, outs.length === 3 ? dims[0].n + dims[1].n : nTotal],
    },
  );
  if (unused) ctx.release(unused);
  matmulTuning.stackedProducts++;
  return outs;
};

/**
 * See Ops.projectSwiglu. Where the subgroup tile kernel runs (lavapipe) and the halves allow it
 * (16-bit weights of one dtype, both adapted or neither, at least a tile of rows): the gate and
 * up weights stacked in one texture (kept like projectLoraShared's, else filled per call), their
 * LoRA B block-diagonal, one x·Aᵀ product for both ranks, then one product whose tiles hold
 * both halves of their units and store only the activation (matmul_subgroup.ts, `glu`).
 * Otherwise the two projections, then swiglu.
 */
export function projectSwiglu(
  sc: GpuScope,
  input: Tensor,
  gate: SwigluPart,
  up: SwigluPart,
  s: number,
  norm?: RmsNormFold,
): Tensor {
  const op = "projectSwiglu";
  const { m, n, k } = projectSwigluDims(op, input, gate, up);
  if (norm) {
    const folded = swigluProduct(sc, input, [gate, up], m, n, k, s, norm);
    if (folded) return folded;
  }
  const x = norm ? rmsNorm(sc, input, norm.w, norm.eps).y : input;
  const fused = swigluProduct(sc, x, [gate, up], m, n, k, s);
  if (fused) return fused;
  return projectSwigluEach(
    {
      matmul: (a, b, opts) => matmul(sc, a, b, opts),
      matmulAccumulate: (c, a, b, kk, opts) => matmulAccumulate(sc, c, a, b, kk, opts),
      projectLora: (xx, w, xa, b, kk, into) => projectLora(sc, xx, w, xa, b, kk, into),
      projectLoraShared: (xx, parts, kk) => projectLoraShared(sc, xx, parts, kk),
      swiglu: (g, u) => swiglu(sc, g, u),
    },
    x,
    gate,
    up,
    s,
  );
}

/**
 * Fills a stacked texture of parts' 16-bit weights (k-major; part i from the row after those
 * before it) and, when given, the block-diagonal texture of their LoRA B (part i's columns at
 * its rank's offset, rank total `r` over all parts), each unless it holds them already (`hit`).
 */
const fillStacked = (
  ctx: GpuContext,
  k: number,
  dtype: DType,
  parts: readonly { w: GPUBuffer; n: number; b: GPUBuffer | null; r: number }[],
  w: { tex: Packed; hit: boolean },
  b: { tex: Packed; hit: boolean } | null,
): void => {
  const r = parts.reduce((t, p) => t + p.r, 0);
  const staging: GPUBuffer[] = [];
  let y0 = 0;
  let coff = 0;
  for (const p of parts) {
    if (!w.hit) {
      const op: Operand = { buffer: p.w, rows: p.n, kContiguous: true, dtype };
      encodeLoad(ctx, load16(ctx, op, true, k, 0, p.n, w.tex, staging, y0), k);
    }
    if (b && !b.hit && p.b) {
      ctx.dispatchResources(
        "matmul_pack_block",
        [{ buffer: p.b }, b.tex.view],
        [Math.ceil(r / 16), Math.ceil(p.n / 16)],
        { rows: p.n, r: p.r, coff, width: r / 4, y0 },
      );
    }
    y0 += p.n;
    coff += p.r;
  }
  for (const buf of staging) ctx.release(buf);
};

/** projectSwiglu's single product, or null where its conditions do not hold. */
const swigluProduct = (
  sc: GpuScope,
  x: Tensor,
  parts: readonly [SwigluPart, SwigluPart],
  m: number,
  n: number,
  k: number,
  s: number,
  /** Fold this norm of x into the products (null back when they cannot all take it). */
  norm: RmsNormFold | null = null,
): Tensor | null => {
  const ctx = sc.ctx;
  const op = "projectSwiglu";
  const lanes = ctx.subgroupLanes;
  const limit = ctx.device.limits.maxTextureDimension2D;
  const chunk = rowChunk(ctx);
  const xh = sc.fh(x, op);
  const ws = parts.map((p) => sc.fh(p.w, op));
  const dtype = ws[0].dtype;
  const adapted = parts.every((p) => p.lora !== null);
  const ranks = parts.map((p) => p.lora?.a.shape[0] ?? 0);
  if (
    lanes === null || !matmulTuning.subgroupTiles || gpuVariant.usesGpuKernels(ctx) ||
    xh.dtype !== "f32" || dtype === "f32" || ws[1].dtype !== dtype ||
    m < SUBGROUP_TILE_ROWS || m > chunk || 2 * n > chunk || n % 4 !== 0 || k % 4 !== 0 ||
    k / 4 > limit || n < 2 * lanes ||
    (!adapted && parts.some((p) => p.lora !== null)) || ranks.some((r) => r % 4 !== 0)
  ) return null;
  const r = ranks[0] + ranks[1];
  // a folded norm: the gate/up product and the shared x·Aᵀ both in the subgroup kernel
  if (norm && !(subgroupRuns(ctx, m, n, k) && (!adapted || subgroupRuns(ctx, m, r, k)))) {
    return null;
  }
  const fold = norm ? normFold(sc, norm, k, op) : null;
  const pitch = Math.ceil(r / 64) * 64;
  const st = stateOf(ctx);
  const kSteps = k / 4;
  const padded = Math.ceil((2 * n) / TILE) * TILE;
  const format: TexFormat = dtype === "bf16" ? "rgba16uint" : "rgba16float";
  // the same kept textures as stackedProjections' (its decode-sized products of gate/up)
  const kept = st.stacked(ws.map((h) => h.buffer), "w", kSteps, padded, format);
  const w = kept ?? { tex: st.texture("glu_w", kSteps, padded, format), hit: false };
  const bs = adapted ? parts.map((p) => sc.f(p.lora!.b, op)) : null;
  const keptB = bs ? st.stacked(bs, "lora_b", r / 4, padded, "rgba32float") : null;
  const b = bs ? keptB ?? { tex: st.texture("glu_lora_b", r / 4, padded), hit: false } : null;
  fillStacked(
    ctx,
    k,
    dtype,
    ws.map((h, i) => ({ w: h.buffer, n, b: bs?.[i] ?? null, r: ranks[i] })),
    w,
    b,
  );
  const opX: Operand = { buffer: xh.buffer, rows: m, kContiguous: true, dtype: "f32" };
  let pair: LoraPair | null = null;
  let xa: GPUBuffer | null = null;
  if (bs && b) {
    xa = sharedXa(ctx, opX, parts.map((p) => sc.f(p.lora!.a, op)), ranks, m, k, pitch, fold);
    pair = {
      xa: { buffer: xa, rows: m, kContiguous: true, dtype: "f32" },
      b: { buffer: bs[0], rows: 2 * n, kContiguous: true, dtype: "f32", packed: b.tex },
      r,
      beta: s,
      xaWidth: pitch,
      xaOffset: 0,
    };
  }
  const out = sc.out([m, n]);
  tiled(
    ctx,
    opX,
    { buffer: ws[0].buffer, rows: 2 * n, kContiguous: true, dtype, packed: w.tex },
    out.buffer,
    m,
    n,
    k,
    n,
    null,
    pair,
    null,
    true,
    fold,
  );
  if (xa) ctx.release(xa);
  matmulTuning.swigluProducts++;
  if (fold) {
    ctx.release(fold.w);
    matmulTuning.foldedNorms++;
  }
  return out;
};

/**
 * Every x·a_iᵀ in one product (x k-major f32, a_i [r_i, k] f32): the A matrices stacked by buffer
 * copies, into xa [m, pitch] (a multiple of 64 floats, so that it copies into a texture as is);
 * the caller releases xa.
 */
const sharedXa = (
  ctx: GpuContext,
  x: Operand,
  as: readonly GPUBuffer[],
  ranks: readonly number[],
  m: number,
  k: number,
  pitch: number,
  norm: NormFold | null = null,
): GPUBuffer => {
  const r = ranks.reduce((t, x) => t + x, 0);
  const xa = ctx.alloc(m * pitch * 4);
  // The A matrices stacked in a texture kept until one of them changes (a generation reuses one
  // adapter for every step: 2 texture copies per layer and step instead of 4 buffer copies and
  // a texture copy); rows must copy into it as they are (k a multiple of 64 floats).
  const st = stateOf(ctx);
  const kept = k % 64 === 0 && Math.ceil(k / 4) <= ctx.device.limits.maxTextureDimension2D
    ? st.stacked(as, "lora_a", k / 4, Math.ceil(r / TILE) * TILE, "rgba32float")
    : null;
  if (kept && !kept.hit) {
    let y0 = 0;
    as.forEach((a, i) => {
      ctx.copyToTexture(
        { buffer: a, bytesPerRow: k * 4, rowsPerImage: ranks[i] },
        { texture: kept.tex.texture, origin: [0, y0] },
        [k / 4, ranks[i]],
      );
      y0 += ranks[i];
    });
  }
  const stacked = kept ? null : ctx.alloc(r * k * 4);
  if (stacked) {
    let row = 0;
    as.forEach((a, i) => {
      ctx.copy(a, 0, stacked, row * k * 4, ranks[i] * k * 4);
      row += ranks[i];
    });
  }
  tiled(
    ctx,
    x,
    kept
      ? { buffer: as[0], rows: r, kContiguous: true, dtype: "f32", packed: kept.tex }
      : { buffer: stacked!, rows: r, kContiguous: true, dtype: "f32" },
    xa,
    m,
    r,
    k,
    pitch,
    null,
    null,
    null,
    false,
    norm,
  );
  if (stacked) ctx.release(stacked);
  return xa;
};

/** See Ops.accumulateRows. */
export function accumulateRows(
  sc: GpuScope,
  c: Tensor,
  x: Tensor,
  w: Tensor,
  start: number,
  count: number,
  s: number,
): void {
  const op = "accumulateRows";
  const [m, n] = accumulateRowsDims(op, c, x, w, start, count);
  const g = sc.blocks(w, op);
  const cb = sc.f(c, op);
  const xh = sc.fh(x, op);
  const block = g.blocks.find((b) =>
    b.start <= start * n && (start + count) * n <= b.start + b.length
  );
  const ctx = sc.ctx;
  // the rows go to their texture in place only in the copied-as-is (not k-major) layout
  const asIs = !kMajorLayout(
    { kContiguous: false, rows: n, dtype: g.dtype },
    count,
    ctx.device.limits.maxTextureDimension2D,
  );
  if (
    gpuVariant.usesGpuKernels(ctx) || !block || !asIs || cb === xh.buffer || m === 0 ||
    !useTiled(ctx, m, n, count)
  ) {
    matmulAccumulate(sc, c, x, sliceRows(sc, w, start, count), s);
    return;
  }
  tiled(
    ctx,
    { buffer: xh.buffer, rows: m, kContiguous: true, dtype: xh.dtype },
    {
      buffer: block.buffer,
      rows: n,
      kContiguous: false,
      dtype: g.dtype,
      kBase: (start * n - block.start) / n,
    },
    cb,
    m,
    n,
    count,
    n,
    s,
  );
}

/**
 * What projectRows and projectLogSoftmaxChunk read: x [m, k] (checked against w's rows) and the
 * row range [start, start + count) of w as an operand read where it lies, or null where the
 * range spans storage blocks.
 */
const rowRange = (sc: GpuScope, op: string, x: Tensor, w: Tensor, start: number, count: number) => {
  const g = sc.blocks(w, op);
  const [, k] = checkRowRange(op, g, start, count);
  const xh = sc.fh(x, op);
  ensure(x.shape.length === 2 && x.shape[1] === k, op, () => `x [${x.shape}], rows of ${k}`);
  const block = g.blocks.find((b) =>
    b.start <= start * k && (start + count) * k <= b.start + b.length
  );
  const rows: Operand | null = block
    ? {
      buffer: block.buffer,
      rows: count,
      kContiguous: true,
      dtype: g.dtype,
      view: { rowBase: (start * k - block.start) / k, bufferRows: block.length / k },
    }
    : null;
  return { m: x.shape[0], k, xh, rows };
};

/**
 * See Ops.projectLogSoftmaxChunk. Where the subgroup kernel takes the product (lavapipe) and the
 * rows lie in one storage block: its `lsm` form reduces every 64-row tile to log-softmax
 * partials per row (tile width: 4 columns per lane) instead of storing the logits, and
 * lsm_merge_tiles folds a row's partials into the state; no [rows, count] logits tensor is
 * written or read back. Otherwise projectRows then logSoftmaxChunk.
 */
export function projectLogSoftmaxChunk(
  sc: GpuScope,
  acc: Tensor | null,
  x: Tensor,
  w: Tensor,
  start: number,
  count: number,
  targets: Tensor,
  temperature: number,
): Tensor {
  const op = "projectLogSoftmaxChunk";
  const { m, k, xh, rows } = rowRange(sc, op, x, w, start, count);
  checkLogSoftmaxChunkOf(op, acc, [m, count], targets, start, temperature);
  const ctx = sc.ctx;
  const chunk = rowChunk(ctx);
  if (
    !rows || !matmulTuning.lsmInProducts || xh.dtype !== "f32" || count % 4 !== 0 ||
    m > chunk || count > chunk || !subgroupRuns(ctx, m, count, k) || !useTiled(ctx, m, count, k)
  ) {
    return logSoftmaxChunk(
      sc,
      acc,
      projectRows(sc, x, w, start, count),
      targets,
      start,
      temperature,
    );
  }
  const tilesN = Math.ceil(count / (4 * ctx.subgroupLanes!));
  const part = ctx.alloc(m * tilesN * 16);
  const tb = sc.i(targets, op);
  tiled(
    ctx,
    { buffer: xh.buffer, rows: m, kContiguous: true, dtype: xh.dtype },
    rows,
    part,
    m,
    count,
    k,
    count,
    null,
    null,
    null,
    false,
    null,
    null,
    { targets: tb, offset: start, invT: 1 / temperature },
  );
  const out = lsmMergeTiles(sc, acc, part, m, tilesN);
  ctx.release(part);
  matmulTuning.lsmStores++;
  return out;
}

/**
 * See Ops.projectRows. The rows are read where they lie (their storage block, from a row
 * offset), so a 16-bit head weight's kept textures serve every chunk and nothing is copied;
 * a range across blocks, or a product the tiled kernel does not take, goes through sliceRows.
 */
export function projectRows(
  sc: GpuScope,
  x: Tensor,
  w: Tensor,
  start: number,
  count: number,
): Tensor {
  const { m, k, xh, rows } = rowRange(sc, "projectRows", x, w, start, count);
  if (!rows || count % 4 !== 0 || m === 0 || !useTiled(sc.ctx, m, count, k)) {
    return matmul(sc, x, sliceRows(sc, w, start, count), { transB: true });
  }
  const out = sc.out([m, count]);
  tiled(
    sc.ctx,
    { buffer: xh.buffer, rows: m, kContiguous: true, dtype: xh.dtype },
    rows,
    out.buffer,
    m,
    count,
    k,
    count,
  );
  return out;
}
