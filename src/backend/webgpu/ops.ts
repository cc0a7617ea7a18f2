/**
 * WebGPU backend: every op is a compute shader from the .wgsl file of its family, encoded into batched
 * command buffers; the host waits only when it reads a tensor back.
 * @module
 */
import { Effect } from "effect";
import { BackendError, type Ops } from "../ops.ts";
import type { DType, Tensor } from "../tensor.ts";
import { ensure, isHalfDType, sizeOf } from "../tensor.ts";
import { roundToHalfBits, widenHalfBits } from "../../io/safetensors.ts";
import * as half from "./half.ts";
import * as activations from "./activations.ts";
import * as attention from "./attention.ts";
import type { GpuContext } from "./context.ts";
import * as elementwise from "./elementwise.ts";
import * as layers from "./layers.ts";
import * as matmul from "./matmul.ts";
import { bytesOf, columnsOf, GpuScope, rowsOf } from "./scope.ts";
import { messageOf } from "../../base/tagged_error.ts";

const failure = (e: unknown): BackendError =>
  new BackendError({ operation: "read", reason: messageOf(e) });

/** Ops bound to a fresh GPU scope; call `release` of the returned scope when it closes. */
export const makeGpuOps = (ctx: GpuContext): { ops: Ops; scope: GpuScope } => {
  const sc = new GpuScope(ctx);
  // The tensors are checked before the wait: a released tensor is a defect, never a BackendError.
  // A split tensor is read block by block (one wait for all) and joined on the host; a 16-bit
  // one is widened there (its blocks may start inside a word: they are joined by element).
  const readBytes = (ts: readonly Tensor[], op: string) =>
    Effect.suspend(() => {
      const gs = ts.map((t) => sc.blocks(t, op));
      const reqs = gs.flatMap((g) =>
        g.blocks.map((b) => ({ buffer: b.buffer, bytes: bytesOf(g.dtype, b.length) }))
      );
      return Effect.map(
        Effect.tryPromise({ try: () => ctx.read(reqs), catch: failure }),
        (bufs) => {
          let k = 0;
          return gs.map((g) => {
            if (isHalfDType(g.dtype)) {
              const bits = new Uint16Array(g.size);
              for (const b of g.blocks) {
                bits.set(new Uint16Array(bufs[k++], 0, b.length), b.start);
              }
              return widenHalfBits(bits, g.dtype).buffer as ArrayBuffer;
            }
            if (g.blocks.length === 1) return bufs[k++];
            const all = new Uint8Array(g.size * 4);
            for (const b of g.blocks) all.set(new Uint8Array(bufs[k++]), b.start * 4);
            return all.buffer;
          });
        },
      );
    });
  const ops: Ops = {
    info: ctx.info,
    fromArray: (data: ArrayLike<number>, shape: readonly number[], dtype: DType = "f32") => {
      ensure(
        sizeOf(shape) === data.length,
        "fromArray",
        () => `shape [${shape}] vs length ${data.length}`,
      );
      if (isHalfDType(dtype)) return sc.upload(roundToHalfBits(data, dtype), shape, dtype);
      // upload copies into the device buffer: an array of the right type goes in as it is
      const host = dtype === "i32"
        ? (data instanceof Int32Array ? data : Int32Array.from(data))
        : (data instanceof Float32Array ? data : Float32Array.from(data));
      return sc.upload(host, shape, dtype);
    },
    fromHalf: (bits, shape, dtype) => {
      ensure(isHalfDType(dtype), "fromHalf", () => `expected bf16 or f16, got ${dtype}`);
      ensure(
        sizeOf(shape) === bits.length,
        "fromHalf",
        () => `shape [${shape}] vs length ${bits.length}`,
      );
      return sc.upload(bits, shape, dtype);
    },
    widen: (t) => half.widen(sc, t),
    zeros: (shape, dtype = "f32") => sc.zeros(shape, dtype),
    copy: (t) => {
      const src = sc.blocks(t, "copy");
      const out = sc.like(src);
      src.blocks.forEach((b, i) =>
        ctx.copy(b.buffer, 0, out.blocks[i].buffer, 0, bytesOf(src.dtype, b.length))
      );
      return out;
    },
    reshape: (t, shape) => {
      ensure(sizeOf(shape) === t.size, "reshape", () => `[${t.shape}] -> [${shape}]`);
      return sc.view(t, shape);
    },
    read: (ts) => {
      ts.forEach((t) => {
        const g = sc.blocks(t, "read");
        ensure(
          g.dtype === "f32" || isHalfDType(g.dtype),
          "read",
          () => `expected f32, bf16 or f16 tensor, got ${g.dtype}`,
        );
      });
      return Effect.map(readBytes(ts, "read"), (bufs) => bufs.map((b) => new Float32Array(b)));
    },
    readInt: (ts) => {
      ts.forEach((t) => sc.blocks(t, "readInt", "i32"));
      return Effect.map(readBytes(ts, "readInt"), (bufs) => bufs.map((b) => new Int32Array(b)));
    },
    flush: () => ctx.flush(),
    transient: <A>(f: (ops: Ops) => A): A => {
      const inner = makeGpuOps(ctx);
      try {
        return f(inner.ops);
      } finally {
        inner.scope.release();
      }
    },
    maxBlockElements: () => Math.floor(ctx.maxBinding / 4),
    rowBlocks: (t) => {
      const g = sc.blocks(t, "rowBlocks");
      const c = columnsOf(g);
      return [...g.blocks.map((b) => c === 0 ? 0 : b.start / c), rowsOf(g)];
    },
    sliceRows: (t, start, count) => elementwise.sliceRows(sc, t, start, count),
    setRows: (dst, start, src) => elementwise.setRows(sc, dst, start, src),
    sliceColumns: (t, start, count) => elementwise.sliceColumns(sc, t, start, count),
    setColumns: (dst, start, src) => elementwise.setColumns(sc, dst, start, src),
    matmul: (a, b, opts) => matmul.matmul(sc, a, b, opts),
    matmulAccumulate: (c, a, b, s, opts) => matmul.matmulAccumulate(sc, c, a, b, s, opts),
    projectLora: (x, w, xa, b, s, into) => matmul.projectLora(sc, x, w, xa, b, s, into),
    projectLoraShared: (x, parts, s, norm) => matmul.projectLoraShared(sc, x, parts, s, norm),
    projectSwiglu: (x, gate, up, s, norm) => matmul.projectSwiglu(sc, x, gate, up, s, norm),
    projectRows: (x, w, start, count) => matmul.projectRows(sc, x, w, start, count),
    projectLogSoftmaxChunk: (acc, x, w, start, count, targets, temperature) =>
      matmul.projectLogSoftmaxChunk(sc, acc, x, w, start, count, targets, temperature),
    accumulateRows: (c, x, w, start, count, s) =>
      matmul.accumulateRows(sc, c, x, w, start, count, s),
    add: (a, b) => elementwise.add(sc, a, b),
    sub: (a, b) => elementwise.sub(sc, a, b),
    mul: (a, b) => elementwise.mul(sc, a, b),
    scale: (a, s) => elementwise.scale(sc, a, s),
    addScaled: (a, b, s) => elementwise.addScaled(sc, a, b, s),
    addScaledInPlace: (dst, src, s) => elementwise.addScaledInPlace(sc, dst, src, s),
    addRow: (a, row) => elementwise.addRow(sc, a, row),
    sumRows: (a) => elementwise.sumRows(sc, a),
    sumSquares: (a) => elementwise.sumSquares(sc, a),
    sumSquaresEach: (ts) => elementwise.sumSquaresEach(sc, ts),
    gatherRows: (src, rows) => elementwise.gatherRows(sc, src, rows),
    scatterRowsInPlace: (dst, src, rows) => elementwise.scatterRowsInPlace(sc, dst, src, rows),
    swiglu: (gate, up) => elementwise.swiglu(sc, gate, up),
    swigluBackward: (dh, gate, up) => elementwise.swigluBackward(sc, dh, gate, up),
    gegluTanh: (gate, up) => activations.gegluTanh(sc, gate, up),
    gegluTanhBackward: (dh, gate, up) => activations.gegluTanhBackward(sc, dh, gate, up),
    softcap: (x, cap) => activations.softcap(sc, x, cap),
    softcapBackward: (dy, y, cap) => activations.softcapBackward(sc, dy, y, cap),
    adamw: (param, grad, m, v, opts) => elementwise.adamw(sc, param, grad, m, v, opts),
    loraFold: (w, b, a, s) => elementwise.loraFold(sc, w, b, a, s),
    rmsNorm: (x, w, eps) => layers.rmsNorm(sc, x, w, eps),
    rmsNormBackward: (dy, x, w, rstd) => layers.rmsNormBackward(sc, dy, x, w, rstd),
    rmsNormBackwardInput: (dy, x, w, rstd, residual) =>
      layers.rmsNormBackwardInput(sc, dy, x, w, rstd, residual),
    rope: (x, positions, heads, headDim, theta) =>
      layers.rope(sc, x, positions, heads, headDim, theta),
    ropeBackward: (dy, positions, heads, headDim, theta) =>
      layers.ropeBackward(sc, dy, positions, heads, headDim, theta),
    embedding: (table, ids) => layers.embedding(sc, table, ids),
    embeddingBackward: (dy, ids, vocab) => layers.embeddingBackward(sc, dy, ids, vocab),
    logProbs: (logits, targets, temperature) => layers.logProbs(sc, logits, targets, temperature),
    logProbsBackward: (dlogp, logits, targets, lse, temperature, targetOffset) =>
      layers.logProbsBackward(sc, dlogp, logits, targets, lse, temperature, targetOffset),
    entropy: (logits, temperature) => layers.entropy(sc, logits, temperature),
    logSoftmaxChunk: (acc, logits, targets, offset, temperature) =>
      layers.logSoftmaxChunk(sc, acc, logits, targets, offset, temperature),
    logSoftmaxFinish: (acc) => layers.logSoftmaxFinish(sc, acc),
    sampleCandidates: (logits, temperatures, count) =>
      layers.sampleCandidates(sc, logits, temperatures, count),
    attention: (q, k, v, opts) => attention.attention(sc, q, k, v, opts),
    attentionBackward: (dOut, q, k, v, out, lse, opts) =>
      attention.attentionBackward(sc, dOut, q, k, v, out, lse, opts),
  };
  return { ops, scope: sc };
};
