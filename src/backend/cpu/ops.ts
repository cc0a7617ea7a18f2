/**
 * CPU reference backend: plain TypeScript, simple and obviously correct; the oracle the WebGPU
 * kernels are tested against, and the fallback where no GPU adapter exists.
 * @module
 */
import { Effect } from "effect";
import type { BackendInfo, Ops } from "../ops.ts";
import type { DType, Tensor } from "../tensor.ts";
import { asMatrix, ensure, isHalfDType, sizeOf } from "../tensor.ts";
import { roundToHalfBits } from "../../io/safetensors.ts";
import { checkRowRange } from "../checks/elementwise.ts";
import * as activations from "./activations.ts";
import * as attention from "./attention.ts";
import * as elementwise from "./elementwise.ts";
import * as layers from "./layers.ts";
import * as matmul from "./matmul.ts";
import { accumulateRowsDims, matmulDims } from "../checks/matmul.ts";
import { type CpuPrecision, CpuScope, CpuTensor } from "./scope.ts";

/** Describes the CPU backend. */
export const cpuInfo = (precision: CpuPrecision): BackendInfo => ({
  name: "cpu",
  description: `TypeScript reference (${precision}, ${navigator.hardwareConcurrency} cpus)`,
  fallback: false,
});

/** Ops bound to a fresh CPU scope; call `release` of the returned scope when it closes. */
export const makeCpuOps = (precision: CpuPrecision): { ops: Ops; scope: CpuScope } => {
  const sc = new CpuScope(precision);
  // rows [start, start + count) of t as a view of its data
  const sliceRows = (t: Tensor, start: number, count: number, op: string) => {
    const c = sc.any(t, op);
    const [, cols] = checkRowRange(op, c, start, count);
    const data = c.data.subarray(start * cols, (start + count) * cols);
    return new CpuTensor([count, cols], c.dtype, data, c.life);
  };
  const fromArray = (data: ArrayLike<number>, shape: readonly number[], dtype: DType = "f32") => {
    ensure(
      sizeOf(shape) === data.length,
      "fromArray",
      () => `shape [${shape}] vs length ${data.length}`,
    );
    if (isHalfDType(dtype)) return sc.wrap(shape, roundToHalfBits(data, dtype), dtype);
    const store = dtype === "i32" ? Int32Array.from(data) : sc.floats(data.length);
    if (dtype === "f32") store.set(data);
    return sc.wrap(shape, store, dtype);
  };
  /** Storage of `n` zeros of `dtype`. */
  const zerosOf = (n: number, dtype: DType) =>
    dtype === "i32" ? new Int32Array(n) : isHalfDType(dtype) ? new Uint16Array(n) : sc.floats(n);
  /** x·w[start, start + count)ᵀ with the rows as a view (Ops.projectRows). */
  const projectRows = (op: string, x: Tensor, w: Tensor, start: number, count: number) => {
    const rows = sliceRows(w, start, count, op);
    matmulDims(op, x, rows, { transB: true });
    return matmul.matmul(sc, x, rows, { transB: true });
  };
  const ops: Ops = {
    info: cpuInfo(precision),
    fromArray,
    fromHalf: (bits, shape, dtype) => {
      ensure(isHalfDType(dtype), "fromHalf", () => `expected bf16 or f16, got ${dtype}`);
      ensure(
        sizeOf(shape) === bits.length,
        "fromHalf",
        () => `shape [${shape}] vs length ${bits.length}`,
      );
      return sc.wrap(shape, bits.slice(), dtype);
    },
    widen: (t) => {
      const c = sc.any(t, "widen");
      return sc.wrap(c.shape, isHalfDType(c.dtype) ? sc.fw(c, "widen") : sc.f(c, "widen").slice());
    },
    zeros: (shape, dtype = "f32") => sc.wrap(shape, zerosOf(sizeOf(shape), dtype), dtype),
    copy: (t) => {
      const c = sc.any(t, "copy");
      return sc.wrap(c.shape, c.data.slice(), c.dtype);
    },
    reshape: (t: Tensor, shape) => {
      const c = sc.any(t, "reshape");
      ensure(sizeOf(shape) === c.size, "reshape", () => `[${c.shape}] -> [${shape}]`);
      return new CpuTensor(shape, c.dtype, c.data, c.life);
    },
    read: (ts) =>
      Effect.sync(() =>
        ts.map((t) => {
          const c = sc.any(t, "read");
          return isHalfDType(c.dtype) ? sc.fw(c, "read") : sc.f(c, "read").slice();
        })
      ),
    readInt: (ts) => Effect.sync(() => ts.map((t) => sc.i(t, "readInt").slice())),
    flush: () => {},
    transient: <A>(f: (ops: Ops) => A): A => {
      const inner = makeCpuOps(precision);
      try {
        return f(inner.ops);
      } finally {
        inner.scope.release();
      }
    },
    maxBlockElements: () => Number.MAX_SAFE_INTEGER,
    rowBlocks: (t) => [0, asMatrix(sc.any(t, "rowBlocks"))[0]],
    sliceRows: (t, start, count) => sliceRows(t, start, count, "sliceRows"),
    setRows: (dst, start, src) => elementwise.setRows(sc, dst, start, src),
    sliceColumns: (t, start, count) => elementwise.sliceColumns(sc, t, start, count),
    setColumns: (dst, start, src) => elementwise.setColumns(sc, dst, start, src),
    matmul: (a, b, opts) => matmul.matmul(sc, a, b, opts),
    matmulAccumulate: (c, a, b, s, opts) => matmul.matmulAccumulate(sc, c, a, b, s, opts),
    projectLora: (x, w, xa, b, s, into) => matmul.projectLora(sc, x, w, xa, b, s, into),
    // a norm before the projections runs as itself: the reference the folded ones must match
    projectLoraShared: (x, parts, s, norm) =>
      matmul.projectLoraShared(
        sc,
        norm ? layers.rmsNorm(sc, x, norm.w, norm.eps).y : x,
        parts,
        s,
      ),
    projectSwiglu: (x, gate, up, s, norm) =>
      matmul.projectSwiglu(sc, norm ? layers.rmsNorm(sc, x, norm.w, norm.eps).y : x, gate, up, s),
    // the rows are a view already (sliceRows copies nothing here)
    accumulateRows: (c, x, w, start, count, s) => {
      accumulateRowsDims("accumulateRows", c, x, w, start, count);
      matmul.matmulAccumulate(sc, c, x, sliceRows(w, start, count, "accumulateRows"), s);
    },
    projectRows: (x, w, start, count) => projectRows("projectRows", x, w, start, count),
    // the chunk's logits, then their fold (the reference the fused products must match)
    projectLogSoftmaxChunk: (acc, x, w, start, count, targets, temperature) =>
      layers.logSoftmaxChunk(
        sc,
        acc,
        projectRows("projectLogSoftmaxChunk", x, w, start, count),
        targets,
        start,
        temperature,
      ),
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
