/**
 * Argument and shape validation of the decoder layer ops (RMSNorm, rotary embedding, token
 * embedding, log-probs, entropy), shared by the CPU and WebGPU backends so that both raise the
 * same ShapeErrors. Each check returns the dimensions the implementations need. Checks that need
 * device data (ids held in a tensor) are left to the backend that has them on the host (CPU).
 * @module
 */
import type { RopeFrequencies } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import { asMatrix, ensure, expectShape } from "../tensor.ts";

/** Validates host ids: integers in [0, vocab). */
export const checkIds = (op: string, ids: ArrayLike<number>, vocab: number): void => {
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i];
    ensure(
      Number.isInteger(id) && id >= 0 && id < vocab,
      op,
      () => `id ${id} at ${i} is outside [0, ${vocab})`,
    );
  }
};

/** Validates a temperature. */
const checkTemperature = (op: string, temperature: number): void =>
  ensure(
    Number.isFinite(temperature) && temperature > 0,
    op,
    () => `temperature ${temperature} must be positive and finite`,
  );

/** Validates x and w of an RMSNorm; returns [rows, cols]. */
const rmsNormShape = (op: string, x: Tensor, w: Tensor): [number, number] => {
  ensure(x.shape.length >= 1, op, () => `x must have at least one dimension`);
  const [r, h] = asMatrix(x);
  expectShape(op, "w", w, [h]);
  return [r, h];
};

/** Validates rmsNorm arguments; returns [rows, cols]. */
export const checkRmsNorm = (op: string, x: Tensor, w: Tensor, eps: number): [number, number] => {
  const [r, h] = rmsNormShape(op, x, w);
  ensure(Number.isFinite(eps) && eps >= 0, op, () => `eps ${eps} must be >= 0`);
  return [r, h];
};

/** Validates rmsNormBackward arguments; returns [rows, cols]. */
export const checkRmsNormBackward = (
  op: string,
  dy: Tensor,
  x: Tensor,
  w: Tensor,
  rstd: Tensor,
  residual?: Tensor,
): [number, number] => {
  const [r, h] = rmsNormShape(op, x, w);
  expectShape(op, "dy", dy, x.shape);
  expectShape(op, "rstd", rstd, [r]);
  if (residual) expectShape(op, "residual", residual, x.shape);
  return [r, h];
};

/** Validates rope / ropeBackward arguments; returns the number of rows. */
export const checkRope = (
  op: string,
  x: Tensor,
  positions: Tensor,
  heads: number,
  headDim: number,
  theta: RopeFrequencies,
): number => checkRopeOf(op, x.shape, positions, heads, headDim, theta);

/** checkRope of a tensor of shape `shape` (a projection's output, see RopeFold). */
export const checkRopeOf = (
  op: string,
  shape: readonly number[],
  positions: Tensor,
  heads: number,
  headDim: number,
  theta: RopeFrequencies,
): number => {
  ensure(
    Number.isInteger(heads) && heads > 0 && Number.isInteger(headDim) && headDim > 0 &&
      headDim % 2 === 0,
    op,
    () => `heads ${heads} and headDim ${headDim} must be positive integers, headDim even`,
  );
  if (typeof theta === "number") {
    ensure(Number.isFinite(theta) && theta > 0, op, () => `theta ${theta} must be positive`);
  } else {
    ensure(
      theta.length === headDim / 2 && theta.every((f) => Number.isFinite(f)),
      op,
      () => `inverse-frequency table needs ${headDim / 2} finite values, got ${theta.length}`,
    );
  }
  ensure(shape.length === 2, op, () => `x must be 2-D, got [${shape}]`);
  const rows = shape[0];
  ensure(
    shape[1] === heads * headDim,
    op,
    () => `x has shape [${shape}], expected [${rows},${heads * headDim}]`,
  );
  expectShape(op, "positions", positions, [rows]);
  ensure(positions.dtype === "i32", op, () => `positions must be i32, got ${positions.dtype}`);
  return rows;
};

/**
 * Validates embedding's shapes; returns [N, V, H]. The ids themselves live in a tensor and are
 * not checked here (the CPU backend checks them with `checkIds`).
 */
export const checkEmbedding = (
  op: string,
  table: Tensor,
  ids: Tensor,
): [number, number, number] => {
  ensure(table.shape.length === 2, op, () => `table must be [V, H], got [${table.shape}]`);
  ensure(ids.shape.length === 1, op, () => `ids must be 1-D, got [${ids.shape}]`);
  const [v, h] = table.shape;
  return [ids.shape[0], v, h];
};

/** Validates embeddingBackward's vocab, dy and host ids; returns [N, H]. */
export const checkEmbeddingBackward = (
  op: string,
  dy: Tensor,
  ids: ArrayLike<number>,
  vocab: number,
): [number, number] => {
  ensure(Number.isInteger(vocab) && vocab >= 0, op, () => `vocab ${vocab} must be >= 0`);
  ensure(dy.shape.length === 2, op, () => `dy must be [N, H], got [${dy.shape}]`);
  const [n, h] = dy.shape;
  ensure(ids.length === n, op, () => `${ids.length} ids for dy [${dy.shape}]`);
  checkIds(op, ids, vocab);
  return [n, h];
};

/** Validates logits [N,V] and i32 targets [N]; returns [N, V]. */
const logitsShape = (op: string, logits: Tensor, targets: Tensor | null): [number, number] =>
  logitsShapeOf(op, logits.shape, targets);

const logitsShapeOf = (
  op: string,
  shape: readonly number[],
  targets: Tensor | null,
): [number, number] => {
  ensure(shape.length === 2, op, () => `logits must be [N, V], got [${shape}]`);
  const [n, v] = shape;
  ensure(v > 0, op, () => `logits [${shape}] need at least one column`);
  if (targets) {
    expectShape(op, "targets", targets, [n]);
    ensure(targets.dtype === "i32", op, () => `targets must be i32, got ${targets.dtype}`);
  }
  return [n, v];
};

/**
 * Validates logProbs' shapes and temperature; returns [N, V]. The target values live in a tensor
 * and are not checked here (the CPU backend checks them with `checkIds`).
 */
export const checkLogProbs = (
  op: string,
  logits: Tensor,
  targets: Tensor,
  temperature: number,
): [number, number] => {
  const [n, v] = logitsShape(op, logits, targets);
  checkTemperature(op, temperature);
  return [n, v];
};

/** Validates logProbsBackward's shapes and temperature; returns [N, V] (target values: as above). */
export const checkLogProbsBackward = (
  op: string,
  dlogp: Tensor,
  logits: Tensor,
  targets: Tensor,
  lse: Tensor,
  temperature: number,
  targetOffset = 0,
): [number, number] => {
  const [n, v] = logitsShape(op, logits, targets);
  expectShape(op, "dlogp", dlogp, [n]);
  expectShape(op, "lse", lse, [n]);
  checkTemperature(op, temperature);
  checkOffset(op, targetOffset);
  return [n, v];
};

/** Validates a vocabulary offset: an integer >= 0 (and < 2^31, so that kernels can add it). */
const checkOffset = (op: string, offset: number): void =>
  ensure(
    Number.isInteger(offset) && offset >= 0 && offset < 2 ** 31,
    op,
    () => `offset ${offset} must be an integer in [0, 2^31)`,
  );

/** Validates logSoftmaxChunk's state, chunk, targets, offset and temperature; returns [N, Vc]. */
export const checkLogSoftmaxChunk = (
  op: string,
  acc: Tensor | null,
  logits: Tensor,
  targets: Tensor,
  offset: number,
  temperature: number,
): [number, number] => checkLogSoftmaxChunkOf(op, acc, logits.shape, targets, offset, temperature);

/** checkLogSoftmaxChunk of logits of shape `shape` (a product's, see projectLogSoftmaxChunk). */
export const checkLogSoftmaxChunkOf = (
  op: string,
  acc: Tensor | null,
  shape: readonly number[],
  targets: Tensor,
  offset: number,
  temperature: number,
): [number, number] => {
  const [n, v] = logitsShapeOf(op, shape, targets);
  if (acc) expectShape(op, "acc", acc, [n, 4]);
  checkOffset(op, offset);
  checkTemperature(op, temperature);
  return [n, v];
};

/** Validates logSoftmaxFinish's state [N, 4]; returns N. */
export const checkLogSoftmaxFinish = (op: string, acc: Tensor): number => {
  expectShape(op, "acc", acc, [-1, 4]);
  return acc.shape[0];
};

/** Validates entropy's logits and temperature; returns [N, V]. */
export const checkEntropy = (op: string, logits: Tensor, temperature: number): [number, number] => {
  const [n, v] = logitsShape(op, logits, null);
  checkTemperature(op, temperature);
  return [n, v];
};

/** Most candidates per row of sampleCandidates (the kernel's per-invocation list). */
export const MAX_SAMPLE_CANDIDATES = 64;

/** Validates sampleCandidates' logits, temperatures and count; returns [N, V]. */
export const checkSampleCandidates = (
  op: string,
  logits: Tensor,
  temperatures: ArrayLike<number>,
  count: number,
): [number, number] => {
  const [n, v] = logitsShape(op, logits, null);
  ensure(
    temperatures.length === n,
    op,
    () => `temperatures: ${temperatures.length} values for ${n} rows`,
  );
  for (let i = 0; i < n; i++) {
    const t = temperatures[i];
    ensure(Number.isFinite(t), op, () => `temperature ${t} of row ${i} must be finite`);
  }
  ensure(
    Number.isInteger(count) && count >= 1 && count <= MAX_SAMPLE_CANDIDATES,
    op,
    () => `count ${count} must be an integer in [1, ${MAX_SAMPLE_CANDIDATES}]`,
  );
  ensure(v < 2 ** 24, op, () => `vocabulary ${v} too large for float ids (< 2^24)`);
  return [n, v];
};
