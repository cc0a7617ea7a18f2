/**
 * WebGPU backend: causal grouped-query attention (kernels `attn_*` in attention.wgsl).
 *
 * Forward (`attn_fwd`): each invocation runs an online softmax in registers for a tile of up to
 * four query vectors (row, head) that share a kv head, so every k/v load serves the whole tile;
 * no workgroup memory and no barriers, which suits llvmpipe. With few query vectors and many
 * keys (decoding) the key range is split over several invocations and `attn_fwd_combine` merges
 * their partials. Backward: `attn_bwd_dq` (per tile of query vectors; also writes D = dOut·out)
 * then `attn_bwd_dkdv` (per tile of key rows, looping over the query rows and query heads that
 * see them), so no float atomics are needed. The kernels read vec4s: a head dim that is not a
 * multiple of 4 is padded with zeros (`attn_restride`) and the results stripped. The forward
 * reads its operands from textures (`stage`, `_tex` kernels; head dims up to 128, within the
 * texture size limit, else storage buffers). With at least 16 query rows the
 * backward runs as batched texture products instead (`useProducts`): together about 3-4x faster
 * than the storage-buffer kernels on llvmpipe at SmolLM2-135M's batch 8 x 128 (bench/attention.ts).
 * Contracts: see Ops in ../ops.ts.
 * @module
 */
import type { AttentionOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import { ensure } from "../tensor.ts";
import {
  type AttentionGeometry,
  checkAttention,
  checkAttentionBackward,
} from "../checks/attention.ts";
import { f32, type GpuContext, grid, type Param } from "./context.ts";
import type { GpuScope } from "./scope.ts";
import { mirrorOf } from "./texture_mirror.ts";

/**
 * @internal Test and bench hooks: force every kernel's tile size (1, 2 or 4) and/or the
 * forward's key-range split length, so that small, quickly compiled shapes exercise every code
 * path; `buffers: true` reads the operands from storage buffers (the kernels before texture
 * staging, kept as the fallback past the texture size limit); `products: false` skips the
 * product path (see `useProducts`) so that the online-softmax kernels run on its shapes,
 * `products: true` takes it in the forward too.
 */
export const attentionTuning: {
  tile?: 1 | 2 | 4;
  splitLen?: number;
  buffers?: boolean;
  products?: boolean;
} = {};

/** @internal Test hook: calls that took the product path (see `useProducts`), per direction. */
export const attentionPathCounts = { forward: 0, backward: 0 };

/** Largest headDim the kernels support (size of the `_wide` variants' per-invocation arrays). */
export const MAX_HEAD_DIM = 256;
/** Largest headDim of the narrow kernels; above it the `_wide` variants run (see kernels.ts). */
const NARROW_HEAD_DIM = 128;
/** The forward splits the key range until it has about this many invocations. */
const SPLIT_TARGET = 64;
/** Fewest keys one split covers. */
const MIN_SPLIT_LEN = 32;
/**
 * Query vectors (forward, dq) or key rows (dk, dv) per invocation: the kernels' override TQ
 * (4, 2 or 1). A bigger tile shares each k/v (or q/dOut) load among more vectors, but keeps 2
 * (forward), 3 (dq) or 4 (dk/dv) head-dim vectors per tile entry live in registers, and llvmpipe's
 * first-use compile time grows steeply with that state (measured cold: about 1-6 s at head dim 64,
 * 9-11 s at 128, over a minute with twice the state). Mesa caches compiled shaders on disk.
 */
export const tileSize = (kind: "fwd" | "dq" | "dkdv", paddedHeadDim: number): number => {
  if (attentionTuning.tile !== undefined) return attentionTuning.tile;
  if (kind === "fwd") return paddedHeadDim <= 32 ? 4 : paddedHeadDim <= NARROW_HEAD_DIM ? 2 : 1;
  const perEntry = kind === "dq" ? 3 : 4;
  return [4, 2, 1].find((t) => t * perEntry * paddedHeadDim <= 512) ?? 1;
};

/** Head dim padded to a multiple of 4 (the kernels work on vec4s). */
const padded = (hd: number): number => Math.ceil(hd / 4) * 4;

/** Key-range split of the forward: nsplit invocations of splitLen keys per query-vector pair. */
export const splitPlan = (g: AttentionGeometry): { nsplit: number; splitLen: number } => {
  const tiles = g.batch * g.kvHeads *
    Math.ceil((g.tq * g.group) / tileSize("fwd", padded(g.headDim)));
  const maxKeys = Math.min(g.qOffset + g.tq, g.kvLen);
  if (attentionTuning.splitLen !== undefined) {
    const splitLen = Math.max(1, attentionTuning.splitLen);
    return { nsplit: Math.max(1, Math.ceil(maxKeys / splitLen)), splitLen };
  }
  const nsplit = Math.max(
    1,
    Math.min(Math.floor(maxKeys / MIN_SPLIT_LEN), Math.ceil(SPLIT_TARGET / tiles)),
  );
  return { nsplit, splitLen: Math.max(1, Math.ceil(maxKeys / nsplit)) };
};

/**
 * Texture staging. The kernels read q, k, v (and dOut, out) through `ld_<name>(row, texel)`; the
 * `_tex` variants bind those operands as rgba32float textures, texel (h * HD4 + d, row) holding
 * elements 4d..4d+3 of head h (`out`, read once per query vector, stays a buffer: a stage may
 * bind at most 4 storage textures by default). On llvmpipe a storage-buffer load runs lane by lane while a
 * read-only storage texture load is inlined and vectorised, and staging a tensor costs one copy
 * (or one `attn_pack` pass where rows are not 256-byte multiples or the head dim is padded).
 */
const TEX_LOADED = ["q", "k", "v", "dout"];

/** The `_tex` variant of a kernel: its ld_* operands bound as textures. */
const texKernel = (ctx: GpuContext, name: string): string =>
  ctx.derivedKernel(`${name}_tex`, name, (code) => {
    let loads = 0;
    let binds = 0;
    const out = code
      .replace(
        /fn ld_(\w+)\(y: u32, x: u32\) -> vec4<f32> \{ return \w+\[[^\]]*\]; \}/g,
        (m, n: string) => {
          if (!TEX_LOADED.includes(n)) return m;
          loads++;
          return `fn ld_${n}(y: u32, x: u32) -> vec4<f32> { return textureLoad(${n}, vec2<u32>(x, y)); }`;
        },
      )
      .replace(
        /@binding\((\d+)\) var<storage, read> (\w+): array<vec4<f32>>;/g,
        (m, b: string, n: string) => {
          if (!TEX_LOADED.includes(n)) return m;
          binds++;
          return `@binding(${b}) var ${n}: texture_storage_2d<rgba32float, read>;`;
        },
      );
    if (loads === 0 || loads !== binds) {
      throw new Error(`attention.wgsl: ${name} has ${loads} ld_* loads for ${binds} bindings`);
    }
    return out;
  });

/** Staging textures per device, by role and size (reused: queue order keeps every dependency). */
const stagingTextures = new WeakMap<GpuContext, Map<string, GPUTexture>>();

const stagingTexture = (ctx: GpuContext, role: string, w: number, h: number): GPUTexture => {
  let m = stagingTextures.get(ctx);
  if (!m) {
    m = new Map();
    stagingTextures.set(ctx, m);
  }
  // heights rounded up so that nearby shapes (a growing KV cache) share a texture
  const th = Math.min(ctx.device.limits.maxTextureDimension2D, Math.ceil(h / 64) * 64);
  const key = `${role}:${w}x${th}`;
  let t = m.get(key);
  if (!t) {
    t = ctx.device.createTexture({
      label: `attn_${key}`,
      size: [w, th],
      format: "rgba32float",
      usage: GPUTextureUsage.STORAGE_BINDING | GPUTextureUsage.COPY_DST,
    });
    m.set(key, t);
  }
  return t;
};

/** True when operands of `rows` rows and `heads` heads fit a staging texture. */
const texturable = (ctx: GpuContext, rows: number, heads: number, hp: number): boolean =>
  Math.max(rows, (heads * hp) / 4) <= ctx.device.limits.maxTextureDimension2D;

/** Stages a [rows, heads * hd] f32 buffer into the role's texture; returns its view. */
const stage = (
  sc: GpuScope,
  role: string,
  src: GPUBuffer,
  rows: number,
  heads: number,
  hd: number,
): GPUTextureView => {
  const ctx = sc.ctx;
  const hp = padded(hd);
  const w = (heads * hp) / 4;
  const direct = hp === hd && (w * 16) % 256 === 0;
  // a KV cache keeps its own texture, updated by each scatter (texture_mirror.ts)
  const mirror = direct ? mirrorOf(ctx, src, w, rows) : null;
  if (mirror) return mirror.createView();
  const tex = stagingTexture(ctx, role, w, rows);
  if (direct) {
    ctx.copyToTexture({ buffer: src, bytesPerRow: w * 16, rowsPerImage: rows }, { texture: tex }, [
      w,
      rows,
    ]);
  } else {
    ctx.dispatchResources(
      "attn_pack",
      [{ buffer: src }, tex.createView()],
      [Math.ceil(w / 16), Math.ceil(rows / 4)],
      [rows, heads, hd, hp / 4],
    );
  }
  return tex.createView();
};

/**
 * Workgroup size: small launches use small workgroups so that every CPU thread gets one, but
 * never below the adapter's subgroup (its SIMD width on llvmpipe), whose vector a smaller
 * workgroup fills only in part: a decoding step's attention of 64 sequences (384 invocations) ran
 * 1.6x faster at 16 than at 8 (lavapipe, 512 bits).
 */
const wgFor = (ctx: GpuContext, n: number): number =>
  n >= 2048 ? 64 : Math.max(8, ctx.subgroupLanes ?? 8);

const check = (op: string, q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions) => {
  const g = checkAttention(op, q, k, v, opts);
  ensure(
    g.headDim <= MAX_HEAD_DIM,
    op,
    () => `headDim ${g.headDim} exceeds the WebGPU kernels' limit of ${MAX_HEAD_DIM}`,
  );
  return g;
};

const params = (g: AttentionGeometry, hasStart: boolean, splitLen = 0, nsplit = 1): Param[] => [
  g.batch,
  g.tq,
  g.tk,
  g.heads,
  g.kvHeads,
  g.qOffset,
  g.kvLen,
  hasStart ? 1 : 0,
  f32(g.scale),
  splitLen,
  nsplit,
  g.window,
  f32(g.softcap),
  0,
  0,
  0,
];

/** A kernel operand: a buffer, or a staged texture (then the `_tex` variant runs). */
type Operand = GPUBuffer | GPUTextureView;

/** Encodes one attention kernel over `n` invocations. */
const launch = (
  sc: GpuScope,
  kernel: string,
  operands: readonly Operand[],
  n: number,
  p: Param[],
  hd: number,
  tile?: number,
): void => {
  const wg = wgFor(sc.ctx, n);
  const constants: Record<string, number> = { HD: hd, WG: wg };
  if (tile !== undefined) constants.TQ = tile;
  const base = hd > NARROW_HEAD_DIM ? `${kernel}_wide` : kernel;
  const tex = operands.some((o) => !(o instanceof GPUBuffer));
  const name = tex ? texKernel(sc.ctx, base) : base;
  const resources = operands.map((o) => (o instanceof GPUBuffer ? { buffer: o } : o));
  sc.ctx.dispatchResources(name, resources, grid(Math.ceil(n / wg)), p, constants);
};

/** Whether this call stages its operands in textures (see `stage`). */
const useTextures = (sc: GpuScope, g: AttentionGeometry): boolean =>
  !attentionTuning.buffers && padded(g.headDim) <= NARROW_HEAD_DIM &&
  texturable(sc.ctx, g.batch * g.tq, g.heads, padded(g.headDim)) &&
  texturable(sc.ctx, g.batch * g.tk, g.kvHeads, padded(g.headDim));

/** Copies `rows` rows of width `from` into rows of width `to` of `dst` (zero-filled). */
const restrideInto = (
  sc: GpuScope,
  src: GPUBuffer,
  dst: GPUBuffer,
  rows: number,
  from: number,
  to: number,
): void => {
  const n = rows * to;
  sc.dispatch("attn_restride", [src, dst], grid(Math.ceil(n / 256)), [n, from, to, 0]);
};

/** `restrideInto` a fresh buffer. */
const restride = (sc: GpuScope, src: GPUBuffer, rows: number, from: number, to: number) => {
  const dst = sc.out([rows, to]).buffer;
  restrideInto(sc, src, dst, rows, from, to);
  return dst;
};

/** The kvStart buffer, or a never-read placeholder (every declared binding must be bound). */
const startBuffer = (sc: GpuScope, opts: AttentionOptions, op: string): GPUBuffer =>
  opts.kvStart ? sc.i(opts.kvStart, op) : sc.out([1], "i32").buffer;

/**
 * The product path (kernels `attn_mm`, `attn_softmax`, `attn_softmax_bwd`): with no cache-style
 * geometry (at least 16 query rows: training and log-probs),
 * attention runs as batched matrix products over textures, S = q·kᵀ per (sequence, head), a row
 * kernel for the masked softmax (P, lse), then out = P·v; backward dP = dOut·vᵀ, one row kernel
 * for P and dS = P (dP - D), then dv = Pᵀ·dOut, dk = dSᵀ·q·scale, dq = dS·k·scale. The 16x16
 * register tiles of `attn_mm` run several times faster on llvmpipe than the online-softmax
 * kernels, whose per-invocation vectors live in (spilled) private arrays; tiles and k ranges that
 * the causal mask hides are skipped. Memory: S (and dP) of batch * heads * tq * tk floats, so
 * the path is taken only below PRODUCTS_MAX_FLOATS.
 */
const PRODUCTS_MAX_FLOATS = 1 << 24;

/** Key columns of S rows, padded to the 16-wide tiles. */
const scoreWidth = (tk: number): number => Math.ceil(tk / 16) * 16;

/**
 * Whether a call takes the product path (see PRODUCTS_MAX_FLOATS). The backward does by
 * default; the forward only when `attentionTuning.products` is true: on llvmpipe (2 shared
 * cores, bench/attention.ts) its three steps measured slower than `attn_fwd_tex` (about 60 vs
 * 38 ms at batch 8 x 128, SmolLM2-135M heads), where the backward's six take about a quarter of
 * the time of `attn_bwd_dq` + `attn_bwd_dkdv`.
 */
const useProducts = (sc: GpuScope, g: AttentionGeometry, forward: boolean): boolean => {
  if (attentionTuning.buffers || attentionTuning.products === false) return false;
  if (forward && attentionTuning.products !== true) return false;
  const ld = scoreWidth(g.tk);
  const limit = sc.ctx.device.limits.maxTextureDimension2D;
  const hp = padded(g.headDim);
  return g.tq >= 16 &&
    g.batch * g.heads * g.tq * ld <= Math.min(PRODUCTS_MAX_FLOATS, sc.ctx.maxBinding / 4) &&
    (g.heads * ld) / 4 <= limit &&
    texturable(sc.ctx, g.batch * g.tq, g.heads, hp) &&
    texturable(sc.ctx, g.batch * g.tk, g.kvHeads, hp);
};

/** One `attn_mm` product: m x n tiles for each of nz (sequence, head) pairs. */
interface Product {
  readonly a: GPUTextureView;
  readonly b: GPUTextureView;
  readonly c: GPUBuffer | GPUTextureView;
  /** A k-major (scores, P·V) or not (Pᵀ·dOut); B likewise. */
  readonly aK: boolean;
  readonly bK: boolean;
  readonly m: number;
  readonly n: number;
  readonly k4: number;
  readonly nz: number;
  readonly zh: number;
  readonly ng: number;
  readonly a_hx: number;
  readonly a_by: number;
  readonly a_hmul: number;
  readonly a_hdiv: number;
  readonly b_hx: number;
  readonly b_by: number;
  readonly b_hmul: number;
  readonly b_hdiv: number;
  readonly c_b4: number;
  readonly c_h4: number;
  readonly ldc4: number;
  readonly alpha: number;
  readonly mode: 0 | 1 | 2;
}

/**
 * `attn_mm` with a texture C (scores, read back by the row kernels: a texture load is one
 * vectorised instruction on llvmpipe, a buffer load one per lane): texel (hz * c_h4 + col / 4,
 * b * c_b4 + row).
 */
const mmTexKernel = (ctx: GpuContext): string =>
  ctx.derivedKernel("attn_mm_tex", "attn_mm", (code) => {
    const decl = "@group(0) @binding(3) var<storage, read_write> c: array<vec4<f32>>;";
    const store =
      "c[b * params.c_b4 + hz * params.c_h4 + row * params.ldc4 + col / 4u] = params.alpha * v;";
    if (!code.includes(decl) || !code.includes(store)) {
      throw new Error("attention.wgsl: attn_mm lacks the declaration or store of c");
    }
    return code.replace(
      decl,
      "@group(0) @binding(3) var c: texture_storage_2d<rgba32float, write>;",
    )
      .replace(
        store,
        "textureStore(c, vec2<u32>(hz * params.c_h4 + col / 4u, b * params.c_b4 + row), params.alpha * v);",
      );
  });

const product = (sc: GpuScope, g: AttentionGeometry, p: Product): void => {
  const tiles_m = Math.ceil(p.m / 16);
  const tiles_n = Math.ceil(p.n / 16);
  const n = tiles_m * tiles_n * p.nz;
  const wg = n >= 1024 ? 64 : 16;
  const { a, b, c, aK, bK, alpha, ...rest } = p;
  const buffer = c instanceof GPUBuffer;
  sc.ctx.dispatchResources(
    buffer ? "attn_mm" : mmTexKernel(sc.ctx),
    [a, b, buffer ? { buffer: c } : c],
    grid(Math.ceil(n / wg)),
    {
      ...rest,
      tiles_m,
      tiles_n,
      alpha: f32(alpha),
      q_offset: g.qOffset,
      kv_len: g.kvLen,
      k_valid: p.mode === 0 ? 0 : p.mode === 1 ? g.tk : g.tq,
    },
    { A_KMAJOR: aK ? 1 : 0, B_KMAJOR: bK ? 1 : 0, WG: wg },
  );
};

/** Params of the row kernels. */
const rowParams = (g: AttentionGeometry, hasStart: boolean, ld4: number, hd4: number) => {
  const p = params(g, hasStart);
  p[9] = ld4;
  p[10] = hd4;
  return p;
};

/** S = q·kᵀ (or dP = dOut·vᵀ) per (sequence, query head) into the role's score texture. */
const scores = (
  sc: GpuScope,
  g: AttentionGeometry,
  a: GPUTextureView,
  b: GPUTextureView,
  role: string,
): GPUTexture => {
  const ld4 = scoreWidth(g.tk) / 4;
  const hd4 = padded(g.headDim) / 4;
  const c = scoreTexture(sc, g, role);
  product(sc, g, {
    a,
    b,
    c: c.createView(),
    aK: true,
    bK: true,
    m: g.tq,
    n: g.tk,
    k4: hd4,
    nz: g.batch * g.heads,
    zh: g.heads,
    ng: 1,
    a_hx: hd4,
    a_by: g.tq,
    a_hmul: 1,
    a_hdiv: 1,
    b_hx: hd4,
    b_by: g.tk,
    b_hmul: 1,
    b_hdiv: g.group,
    c_b4: g.tq,
    c_h4: ld4,
    ldc4: 0,
    alpha: 1,
    mode: 0,
  });
  return c;
};

/** C[b, h] = A[b, h]·B (P·v, dS·k) into rows of query heads: [batch * tq, heads * hp]. */
const rowsTimes = (
  sc: GpuScope,
  g: AttentionGeometry,
  a: GPUTextureView,
  b: GPUTextureView,
  c: GPUBuffer,
  alpha: number,
): void => {
  const ld4 = scoreWidth(g.tk) / 4;
  const hd4 = padded(g.headDim) / 4;
  product(sc, g, {
    a,
    b,
    c,
    aK: true,
    bK: false,
    m: g.tq,
    n: hd4 * 4,
    k4: ld4,
    nz: g.batch * g.heads,
    zh: g.heads,
    ng: 1,
    a_hx: ld4,
    a_by: g.tq,
    a_hmul: 1,
    a_hdiv: 1,
    b_hx: hd4,
    b_by: g.tk,
    b_hmul: 1,
    b_hdiv: g.group,
    c_b4: g.tq * g.heads * hd4,
    c_h4: hd4,
    ldc4: g.heads * hd4,
    alpha,
    mode: 1,
  });
};

/** C[b, g] = sum over the group's heads of A[b, h]ᵀ·B[b, h] (Pᵀ·dOut, dSᵀ·q): [batch * tk, kvHeads * hp]. */
const keysTimes = (
  sc: GpuScope,
  g: AttentionGeometry,
  a: GPUTextureView,
  b: GPUTextureView,
  c: GPUBuffer,
  alpha: number,
): void => {
  const ld4 = scoreWidth(g.tk) / 4;
  const hd4 = padded(g.headDim) / 4;
  product(sc, g, {
    a,
    b,
    c,
    aK: false,
    bK: false,
    m: g.tk,
    n: hd4 * 4,
    k4: Math.ceil(g.tq / 4),
    nz: g.batch * g.kvHeads,
    zh: g.kvHeads,
    ng: g.group,
    a_hx: ld4,
    a_by: g.tq,
    a_hmul: g.group,
    a_hdiv: 1,
    b_hx: hd4,
    b_by: g.tq,
    b_hmul: g.group,
    b_hdiv: 1,
    c_b4: g.tk * g.kvHeads * hd4,
    c_h4: hd4,
    ldc4: g.kvHeads * hd4,
    alpha,
    mode: 2,
  });
};

/** A texture of P or dS rows: texel (h * ld4 + j / 4, b * tq + i). */
const scoreTexture = (sc: GpuScope, g: AttentionGeometry, role: string): GPUTexture =>
  stagingTexture(sc.ctx, role, (g.heads * scoreWidth(g.tk)) / 4, g.batch * g.tq);

/** The forward on the product path; `ob` gets out as [rows, heads * hp]. */
const attentionProducts = (
  sc: GpuScope,
  g: AttentionGeometry,
  x: { q: GPUBuffer; k: GPUBuffer; v: GPUBuffer; start: GPUBuffer; hasStart: boolean },
  ob: GPUBuffer,
  lse: GPUBuffer,
): void => {
  const hd = g.headDim;
  const rows = g.batch * g.tq;
  const krows = g.batch * g.tk;
  const qt = stage(sc, "q", x.q, rows, g.heads, hd);
  const kt = stage(sc, "k", x.k, krows, g.kvHeads, hd);
  const vt = stage(sc, "v", x.v, krows, g.kvHeads, hd);
  const s = scores(sc, g, qt, kt, "s");
  const pt = scoreTexture(sc, g, "p");
  const ld4 = scoreWidth(g.tk) / 4;
  const rowsN = g.batch * g.heads * g.tq;
  sc.ctx.dispatchResources(
    "attn_softmax",
    [s.createView(), { buffer: x.start }, { buffer: lse }, pt.createView()],
    grid(Math.ceil(rowsN / 64)),
    rowParams(g, x.hasStart, ld4, padded(hd) / 4),
  );
  rowsTimes(sc, g, pt.createView(), vt, ob, 1);
};

/** See Ops.attention. */
export function attention(
  sc: GpuScope,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  opts: AttentionOptions,
): { out: Tensor; lse: Tensor } {
  const op = "attention";
  const g = check(op, q, k, v, opts);
  const hd = g.headDim;
  const hp = padded(hd);
  const rows = g.batch * g.tq;
  const krows = g.batch * g.tk;
  const vecs = rows * g.heads;
  if (useProducts(sc, g, true)) {
    const out = sc.out([rows, g.heads * hd]);
    const lse = sc.out([rows, g.heads]);
    const ob = hp === hd ? out.buffer : sc.out([vecs, hp]).buffer;
    const x = { q: sc.f(q, op), k: sc.f(k, op), v: sc.f(v, op) };
    attentionPathCounts.forward++;
    attentionProducts(
      sc,
      g,
      { ...x, start: startBuffer(sc, opts, op), hasStart: !!opts.kvStart },
      ob,
      lse.buffer,
    );
    if (hp !== hd) restrideInto(sc, ob, out.buffer, vecs, hp, hd);
    return { out, lse };
  }
  const tex = useTextures(sc, g);
  const pad = (t: Tensor, n: number, role: string, r: number, h: number): Operand => {
    const b = sc.f(t, op);
    if (tex) return stage(sc, role, b, r, h, hd);
    return hp === hd ? b : restride(sc, b, n, hd, hp);
  };
  const [qb, kb, vb] = [
    pad(q, vecs, "q", rows, g.heads),
    pad(k, krows * g.kvHeads, "k", krows, g.kvHeads),
    pad(v, krows * g.kvHeads, "v", krows, g.kvHeads),
  ];
  const sb = startBuffer(sc, opts, op);
  const out = sc.out([rows, g.heads * hd]);
  const lse = sc.out([rows, g.heads]);
  const ob = hp === hd ? out.buffer : sc.out([vecs, hp]).buffer;
  const { nsplit, splitLen } = splitPlan(g);
  const p = params(g, !!opts.kvStart, splitLen, nsplit);
  const t = tileSize("fwd", hp);
  const tiles = g.batch * g.kvHeads * Math.ceil((g.tq * g.group) / t);
  if (nsplit === 1) {
    const none = sc.out([4]).buffer; // partials unused (a vec4 binding needs 16 bytes)
    launch(sc, "attn_fwd", [qb, kb, vb, sb, ob, lse.buffer, none, none], tiles, p, hp, t);
  } else {
    const ml = sc.out([nsplit * vecs * 2]).buffer;
    const acc = sc.out([nsplit * vecs * hp]).buffer;
    launch(sc, "attn_fwd", [qb, kb, vb, sb, ob, lse.buffer, ml, acc], nsplit * tiles, p, hp, t);
    launch(sc, "attn_fwd_combine", [ml, acc, ob, lse.buffer], vecs, p, hp);
  }
  if (hp !== hd) restrideInto(sc, ob, out.buffer, vecs, hp, hd);
  return { out, lse };
}

/** See Ops.attentionBackward. */
export function attentionBackward(
  sc: GpuScope,
  dOut: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  out: Tensor,
  lse: Tensor,
  opts: AttentionOptions,
): { dq: Tensor; dk: Tensor; dv: Tensor } {
  const op = "attentionBackward";
  const g = check(op, q, k, v, opts);
  checkAttentionBackward(op, g, dOut, out, lse);
  const hd = g.headDim;
  const hp = padded(hd);
  const rows = g.batch * g.tq;
  const krows = g.batch * g.tk;
  const vecs = rows * g.heads;
  const kvecs = krows * g.kvHeads;
  if (useProducts(sc, g, false)) {
    const dq = sc.out([rows, g.heads * hd]);
    const dk = sc.out([krows, g.kvHeads * hd]);
    const dv = sc.out([krows, g.kvHeads * hd]);
    const [dqb, dkb, dvb] = hp === hd
      ? [dq.buffer, dk.buffer, dv.buffer]
      : [sc.out([vecs, hp]).buffer, sc.out([kvecs, hp]).buffer, sc.out([kvecs, hp]).buffer];
    attentionPathCounts.backward++;
    const qt = stage(sc, "q", sc.f(q, op), rows, g.heads, hd);
    const kt = stage(sc, "k", sc.f(k, op), krows, g.kvHeads, hd);
    const vt = stage(sc, "v", sc.f(v, op), krows, g.kvHeads, hd);
    const dot = stage(sc, "dout", sc.f(dOut, op), rows, g.heads, hd);
    const s = scores(sc, g, qt, kt, "s");
    const dp = scores(sc, g, dot, vt, "dp");
    const pt = scoreTexture(sc, g, "p");
    const dst = scoreTexture(sc, g, "ds");
    const ld4 = scoreWidth(g.tk) / 4;
    const rowsN = g.batch * g.heads * g.tq;
    sc.ctx.dispatchResources(
      "attn_softmax_bwd",
      [
        s.createView(),
        dp.createView(),
        { buffer: sc.f(lse, op) },
        { buffer: startBuffer(sc, opts, op) },
        pt.createView(),
        dst.createView(),
      ],
      grid(Math.ceil(rowsN / 64)),
      rowParams(g, !!opts.kvStart, ld4, hp / 4),
    );
    keysTimes(sc, g, pt.createView(), dot, dvb, 1);
    keysTimes(sc, g, dst.createView(), qt, dkb, g.scale);
    rowsTimes(sc, g, dst.createView(), kt, dqb, g.scale);
    if (hp !== hd) {
      restrideInto(sc, dqb, dq.buffer, vecs, hp, hd);
      restrideInto(sc, dkb, dk.buffer, kvecs, hp, hd);
      restrideInto(sc, dvb, dv.buffer, kvecs, hp, hd);
    }
    return { dq, dk, dv };
  }
  // The backward kernels read storage buffers: staged in textures they measured no faster
  // (bench/attention.ts, kernels_textures vs before).
  const tex = false;
  const pad = (t: Tensor, n: number, role: string | null, r: number, h: number): Operand => {
    const b = sc.f(t, op);
    if (tex && role) return stage(sc, role, b, r, h, hd);
    return hp === hd ? b : restride(sc, b, n, hd, hp);
  };
  const [dob, qb, ob] = [
    pad(dOut, vecs, "dout", rows, g.heads),
    pad(q, vecs, "q", rows, g.heads),
    pad(out, vecs, null, rows, g.heads),
  ];
  const [kb, vb] = [pad(k, kvecs, "k", krows, g.kvHeads), pad(v, kvecs, "v", krows, g.kvHeads)];
  const lb = sc.f(lse, op);
  const sb = startBuffer(sc, opts, op);
  const dq = sc.out([rows, g.heads * hd]);
  const dk = sc.out([krows, g.kvHeads * hd]);
  const dv = sc.out([krows, g.kvHeads * hd]);
  const [dqb, dkb, dvb] = hp === hd
    ? [dq.buffer, dk.buffer, dv.buffer]
    : [sc.out([vecs, hp]).buffer, sc.out([kvecs, hp]).buffer, sc.out([kvecs, hp]).buffer];
  const delta = sc.out([rows, g.heads]).buffer;
  const p = params(g, !!opts.kvStart);
  const tq = tileSize("dq", hp);
  const tiles = g.batch * g.kvHeads * Math.ceil((g.tq * g.group) / tq);
  launch(sc, "attn_bwd_dq", [dob, qb, kb, vb, ob, lb, sb, dqb, delta], tiles, p, hp, tq);
  const tk = tileSize("dkdv", hp);
  const keyTiles = g.batch * g.kvHeads * Math.ceil(g.tk / tk);
  launch(sc, "attn_bwd_dkdv", [dob, qb, kb, vb, lb, delta, sb, dkb, dvb], keyTiles, p, hp, tk);
  if (hp !== hd) {
    restrideInto(sc, dqb, dq.buffer, vecs, hp, hd);
    restrideInto(sc, dkb, dk.buffer, kvecs, hp, hd);
    restrideInto(sc, dvb, dv.buffer, kvecs, hp, hd);
  }
  return { dq, dk, dv };
}
