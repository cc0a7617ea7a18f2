/**
 * WebGPU backend: every op is a compute shader from src/kernels.wgsl, encoded into batched
 * command buffers; the host waits only when it reads a tensor back.
 * @module
 */
import { Effect } from "effect";
import { BackendError, type Ops } from "../ops.ts";
import type { DType, Tensor } from "../tensor.ts";
import { ensure, sizeOf } from "../tensor.ts";
import * as attention from "./attention.ts";
import type { GpuContext } from "./context.ts";
import * as elementwise from "./elementwise.ts";
import * as layers from "./layers.ts";
import * as matmul from "./matmul.ts";
import { GpuScope } from "./scope.ts";

const failure = (e: unknown): BackendError =>
  new BackendError({ operation: "read", reason: e instanceof Error ? e.message : String(e) });

/** Ops bound to a fresh GPU scope; call `release` of the returned scope when it closes. */
export const makeGpuOps = (ctx: GpuContext): { ops: Ops; scope: GpuScope } => {
  const sc = new GpuScope(ctx);
  // The tensors are checked before the wait: a released tensor is a defect, never a BackendError.
  const readBytes = (ts: readonly Tensor[], op: string) =>
    Effect.suspend(() => {
      const reqs = ts.map((t) => ({ buffer: sc.any(t, op), bytes: t.size * 4 }));
      return Effect.tryPromise({ try: () => ctx.read(reqs), catch: failure });
    });
  const ops: Ops = {
    info: ctx.info,
    fromArray: (data: ArrayLike<number>, shape: readonly number[], dtype: DType = "f32") => {
      ensure(
        sizeOf(shape) === data.length,
        "fromArray",
        () => `shape [${shape}] vs length ${data.length}`,
      );
      const host = dtype === "i32" ? Int32Array.from(data) : Float32Array.from(data);
      return sc.upload(host, shape, dtype);
    },
    zeros: (shape, dtype = "f32") => sc.zeros(shape, dtype),
    copy: (t) => {
      const src = sc.any(t, "copy");
      const out = sc.out(t.shape, t.dtype);
      ctx.copy(src, 0, out.buffer, 0, t.size * 4);
      return out;
    },
    reshape: (t, shape) => {
      ensure(sizeOf(shape) === t.size, "reshape", () => `[${t.shape}] -> [${shape}]`);
      return sc.view(t, shape);
    },
    read: (ts) => {
      ts.forEach((t) => sc.f(t, "read"));
      return Effect.map(readBytes(ts, "read"), (bufs) => bufs.map((b) => new Float32Array(b)));
    },
    readInt: (ts) => {
      ts.forEach((t) => sc.i(t, "readInt"));
      return Effect.map(readBytes(ts, "readInt"), (bufs) => bufs.map((b) => new Int32Array(b)));
    },
    flush: () => ctx.flush(),
    matmul: (a, b, opts) => matmul.matmul(sc, a, b, opts),
    add: (a, b) => elementwise.add(sc, a, b),
    sub: (a, b) => elementwise.sub(sc, a, b),
    mul: (a, b) => elementwise.mul(sc, a, b),
    scale: (a, s) => elementwise.scale(sc, a, s),
    addScaled: (a, b, s) => elementwise.addScaled(sc, a, b, s),
    addScaledInPlace: (dst, src, s) => elementwise.addScaledInPlace(sc, dst, src, s),
    addRow: (a, row) => elementwise.addRow(sc, a, row),
    sumRows: (a) => elementwise.sumRows(sc, a),
    sumSquares: (a) => elementwise.sumSquares(sc, a),
    gatherRows: (src, rows) => elementwise.gatherRows(sc, src, rows),
    scatterRowsInPlace: (dst, src, rows) => elementwise.scatterRowsInPlace(sc, dst, src, rows),
    swiglu: (gate, up) => elementwise.swiglu(sc, gate, up),
    swigluBackward: (dh, gate, up) => elementwise.swigluBackward(sc, dh, gate, up),
    adamw: (param, grad, m, v, opts) => elementwise.adamw(sc, param, grad, m, v, opts),
    loraFold: (w, b, a, s) => elementwise.loraFold(sc, w, b, a, s),
    rmsNorm: (x, w, eps) => layers.rmsNorm(sc, x, w, eps),
    rmsNormBackward: (dy, x, w, rstd) => layers.rmsNormBackward(sc, dy, x, w, rstd),
    rope: (x, positions, heads, headDim, theta) =>
      layers.rope(sc, x, positions, heads, headDim, theta),
    ropeBackward: (dy, positions, heads, headDim, theta) =>
      layers.ropeBackward(sc, dy, positions, heads, headDim, theta),
    embedding: (table, ids) => layers.embedding(sc, table, ids),
    embeddingBackward: (dy, ids, vocab) => layers.embeddingBackward(sc, dy, ids, vocab),
    logProbs: (logits, targets, temperature) => layers.logProbs(sc, logits, targets, temperature),
    logProbsBackward: (dlogp, logits, targets, lse, temperature) =>
      layers.logProbsBackward(sc, dlogp, logits, targets, lse, temperature),
    entropy: (logits, temperature) => layers.entropy(sc, logits, temperature),
    attention: (q, k, v, opts) => attention.attention(sc, q, k, v, opts),
    attentionBackward: (dOut, q, k, v, out, lse, opts) =>
      attention.attentionBackward(sc, dOut, q, k, v, out, lse, opts),
  };
  return { ops, scope: sc };
};
