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
 * multiple of 4 is padded with zeros (`attn_restride`) and the results stripped.
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
import { f32, grid, type Param } from "./context.ts";
import type { GpuScope } from "./scope.ts";

/**
 * @internal Test hooks: force every kernel's tile size (1, 2 or 4) and/or the forward's key-range
 * split length, so that small, quickly compiled shapes exercise every code path.
 */
export const attentionTuning: { tile?: 1 | 2 | 4; splitLen?: number } = {};

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

/** Workgroup size: small launches use small workgroups so that every CPU thread gets one. */
const wgFor = (n: number): number => (n >= 2048 ? 64 : 8);

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

/** Encodes one attention kernel over `n` invocations. */
const launch = (
  sc: GpuScope,
  kernel: string,
  buffers: readonly GPUBuffer[],
  n: number,
  p: Param[],
  hd: number,
  tile?: number,
): void => {
  const wg = wgFor(n);
  const constants: Record<string, number> = { HD: hd, WG: wg };
  if (tile !== undefined) constants.TQ = tile;
  const name = hd > NARROW_HEAD_DIM ? `${kernel}_wide` : kernel;
  sc.dispatch(name, buffers, grid(Math.ceil(n / wg)), p, constants);
};

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
  const pad = (t: Tensor, n: number) => {
    const b = sc.f(t, op);
    return hp === hd ? b : restride(sc, b, n, hd, hp);
  };
  const [qb, kb, vb] = [pad(q, vecs), pad(k, krows * g.kvHeads), pad(v, krows * g.kvHeads)];
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
  const pad = (t: Tensor, n: number) => {
    const b = sc.f(t, op);
    return hp === hd ? b : restride(sc, b, n, hd, hp);
  };
  const [dob, qb, ob] = [pad(dOut, vecs), pad(q, vecs), pad(out, vecs)];
  const [kb, vb] = [pad(k, kvecs), pad(v, kvecs)];
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
