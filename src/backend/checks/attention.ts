/**
 * Argument and shape validation of Ops.attention / Ops.attentionBackward, shared by the CPU and
 * WebGPU backends so that both raise the same ShapeErrors.
 * @module
 */
import type { AttentionOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import { ensure, expectShape } from "../tensor.ts";

/** Attention geometry with every default resolved. */
export interface AttentionGeometry {
  readonly batch: number;
  readonly tq: number;
  readonly tk: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  /** Query heads per kv head (heads / kvHeads). */
  readonly group: number;
  readonly qOffset: number;
  readonly kvLen: number;
  /** Sliding window (keys per query at most), 0 for none. */
  readonly window: number;
  /** Score scale: opts.scale, default 1 / sqrt(headDim). */
  readonly scale: number;
  /** Logit soft-capping value, 0 for none. */
  readonly softcap: number;
}

const isCount = (n: number, min: number): boolean => Number.isInteger(n) && n >= min;

/**
 * Validates attention options and the shapes of q, k, v (and kvStart); throws ShapeError on any
 * inconsistency. Returns the geometry with defaults applied.
 */
export const checkAttention = (
  op: string,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  opts: AttentionOptions,
): AttentionGeometry => {
  const { batch, tq, tk, heads, kvHeads, headDim } = opts;
  ensure(
    isCount(batch, 1) && isCount(tq, 1) && isCount(tk, 1) && isCount(heads, 1) &&
      isCount(kvHeads, 1) && isCount(headDim, 1),
    op,
    () =>
      `batch ${batch}, tq ${tq}, tk ${tk}, heads ${heads}, kvHeads ${kvHeads}, headDim ${headDim} ` +
      `must be positive integers`,
  );
  ensure(
    heads % kvHeads === 0,
    op,
    () => `heads ${heads} is not a multiple of kvHeads ${kvHeads}`,
  );
  const qOffset = opts.qOffset ?? 0;
  const kvLen = opts.kvLen ?? tk;
  ensure(
    isCount(qOffset, 0) && qOffset + tq <= tk,
    op,
    () =>
      `qOffset ${qOffset} must be a non-negative integer with qOffset + tq (${tq}) <= tk (${tk})`,
  );
  ensure(isCount(kvLen, 0) && kvLen <= tk, op, () => `kvLen ${kvLen} must be in [0, tk=${tk}]`);
  const window = opts.window ?? 0;
  ensure(
    opts.window === undefined || isCount(window, 1),
    op,
    () => `window ${opts.window} must be a positive integer`,
  );
  for (const [name, x] of [["scale", opts.scale], ["softcap", opts.softcap]] as const) {
    ensure(
      x === undefined || (Number.isFinite(x) && x > 0),
      op,
      () => `${name} ${x} must be a positive number`,
    );
  }
  for (const t of [q, k, v]) {
    ensure(t.dtype === "f32", op, () => `q, k, v must be f32, got ${t.dtype}`);
  }
  expectShape(op, "q", q, [batch * tq, heads * headDim]);
  expectShape(op, "k", k, [batch * tk, kvHeads * headDim]);
  expectShape(op, "v", v, [batch * tk, kvHeads * headDim]);
  if (opts.kvStart !== undefined) {
    expectShape(op, "kvStart", opts.kvStart, [batch]);
    ensure(
      opts.kvStart.dtype === "i32",
      op,
      () => `kvStart must be i32, got ${opts.kvStart!.dtype}`,
    );
  }
  return {
    batch,
    tq,
    tk,
    heads,
    kvHeads,
    headDim,
    group: heads / kvHeads,
    qOffset,
    kvLen,
    window,
    scale: opts.scale ?? 1 / Math.sqrt(headDim),
    softcap: opts.softcap ?? 0,
  };
};

/** Validates the extra tensors of the backward pass (dOut, out like q; lse [rows, heads]). */
export const checkAttentionBackward = (
  op: string,
  g: AttentionGeometry,
  dOut: Tensor,
  out: Tensor,
  lse: Tensor,
): void => {
  for (const t of [dOut, out, lse]) {
    ensure(t.dtype === "f32", op, () => `dOut, out, lse must be f32, got ${t.dtype}`);
  }
  expectShape(op, "dOut", dOut, [g.batch * g.tq, g.heads * g.headDim]);
  expectShape(op, "out", out, [g.batch * g.tq, g.heads * g.headDim]);
  expectShape(op, "lse", lse, [g.batch * g.tq, g.heads]);
};
