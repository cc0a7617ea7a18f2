/**
 * WebGPU backend: causal grouped-query attention (kernels `attn_*` in src/kernels.wgsl).
 *
 * Forward (`attn_fwd`): each invocation runs an online softmax in registers for two query vectors
 * (row, head) that share a kv head, so every k/v load serves both; no workgroup memory and no
 * barriers, which suits llvmpipe. With few query vectors and many keys (decoding) the key range
 * is split over several invocations and `attn_fwd_combine` merges their partials. Backward:
 * `attn_bwd_dq` (per pair of query vectors; also writes D = dOut·out) then `attn_bwd_dkdv` (per
 * pair of key rows, looping over the query rows and query heads that see them), so no float
 * atomics are needed. The kernels read vec4s: a head dim that is not a multiple of 4 is padded
 * with zeros (`attn_restride`) and the results stripped. Contracts: see Ops in ../ops.ts.
 * @module
 */
import type { AttentionOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import { require } from "../tensor.ts";
import {
  type AttentionGeometry,
  checkAttention,
  checkAttentionBackward,
} from "../cpu/attention.ts";
import { f32, grid, type Param } from "./context.ts";
import type { GpuScope } from "./scope.ts";

/** Largest headDim the kernels support (size of their per-invocation arrays). */
export const MAX_HEAD_DIM = 128;
/** The forward splits the key range until it has about this many invocations. */
const SPLIT_TARGET = 64;
/** Fewest keys one split covers. */
const MIN_SPLIT_LEN = 32;
/** Query vectors (forward, dq) or key rows (dk, dv) per invocation, as in the kernels. */
const TILE = 4;

/** Key-range split of the forward: nsplit invocations of splitLen keys per query-vector pair. */
export const splitPlan = (g: AttentionGeometry): { nsplit: number; splitLen: number } => {
  const tiles = g.batch * g.kvHeads * Math.ceil((g.tq * g.group) / TILE);
  const maxKeys = Math.min(g.qOffset + g.tq, g.kvLen);
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
  require(
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
): void => {
  const wg = wgFor(n);
  sc.dispatch(kernel, buffers, grid(Math.ceil(n / wg)), p, { HD: hd, WG: wg });
};

/** Head dim padded to a multiple of 4 (the kernels work on vec4s). */
const padded = (hd: number): number => Math.ceil(hd / 4) * 4;

/** Copies `rows` rows of width `from` into a fresh buffer of rows of width `to` (zero-filled). */
const restride = (sc: GpuScope, src: GPUBuffer, rows: number, from: number, to: number) => {
  const dst = sc.out([rows, to]);
  const n = rows * to;
  sc.dispatch("attn_restride", [src, dst.buffer], grid(Math.ceil(n / 256)), [n, from, to, 0]);
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
    return hp === hd ? b : restride(sc, b, n, hd, hp).buffer;
  };
  const [qb, kb, vb] = [pad(q, vecs), pad(k, krows * g.kvHeads), pad(v, krows * g.kvHeads)];
  const sb = startBuffer(sc, opts, op);
  const out = sc.out([rows, g.heads * hd]);
  const lse = sc.out([rows, g.heads]);
  const ob = hp === hd ? out.buffer : sc.out([vecs, hp]).buffer;
  const { nsplit, splitLen } = splitPlan(g);
  const p = params(g, !!opts.kvStart, splitLen, nsplit);
  const tiles = g.batch * g.kvHeads * Math.ceil((g.tq * g.group) / TILE);
  if (nsplit === 1) {
    const none = sc.out([4]).buffer; // partials unused (a vec4 binding needs 16 bytes)
    launch(sc, "attn_fwd", [qb, kb, vb, sb, ob, lse.buffer, none, none], tiles, p, hp);
  } else {
    const ml = sc.out([nsplit * vecs * 2]).buffer;
    const acc = sc.out([nsplit * vecs * hp]).buffer;
    launch(sc, "attn_fwd", [qb, kb, vb, sb, ob, lse.buffer, ml, acc], nsplit * tiles, p, hp);
    launch(sc, "attn_fwd_combine", [ml, acc, ob, lse.buffer], vecs, p, hp);
  }
  if (hp !== hd) {
    const n = vecs * hd;
    sc.dispatch("attn_restride", [ob, out.buffer], grid(Math.ceil(n / 256)), [n, hp, hd, 0]);
  }
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
    return hp === hd ? b : restride(sc, b, n, hd, hp).buffer;
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
  const tiles = g.batch * g.kvHeads * Math.ceil((g.tq * g.group) / TILE);
  launch(sc, "attn_bwd_dq", [dob, qb, kb, vb, ob, lb, sb, dqb, delta], tiles, p, hp);
  const pairs = g.batch * g.kvHeads * Math.ceil(g.tk / TILE);
  launch(sc, "attn_bwd_dkdv", [dob, qb, kb, vb, lb, delta, sb, dkb, dvb], pairs, p, hp);
  if (hp !== hd) {
    for (const [src, dst, n] of [[dqb, dq, vecs], [dkb, dk, kvecs], [dvb, dv, kvecs]] as const) {
      sc.dispatch("attn_restride", [src, dst.buffer], grid(Math.ceil((n * hd) / 256)), [
        n * hd,
        hp,
        hd,
        0,
      ]);
    }
  }
  return { dq, dk, dv };
}
