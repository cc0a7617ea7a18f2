/**
 * CPU backend: layers ops. TODO(owner): implement; see Ops in ../ops.ts for contracts.
 * @module
 */
import type { Tensor } from "../tensor.ts";
import type { CpuScope } from "./scope.ts";

/** See Ops.rmsNorm. */
export function rmsNorm(_sc: CpuScope, _x: Tensor, _w: Tensor, _eps: number): { y: Tensor; rstd: Tensor } {
  throw new Error("cpu rmsNorm: not implemented");
}

/** See Ops.rmsNormBackward. */
export function rmsNormBackward(_sc: CpuScope, _dy: Tensor, _x: Tensor, _w: Tensor, _rstd: Tensor): { dx: Tensor; dw: Tensor } {
  throw new Error("cpu rmsNormBackward: not implemented");
}

/** See Ops.rope. */
export function rope(_sc: CpuScope, _x: Tensor, _positions: Tensor, _heads: number, _headDim: number, _theta: number): Tensor {
  throw new Error("cpu rope: not implemented");
}

/** See Ops.ropeBackward. */
export function ropeBackward(_sc: CpuScope, _dy: Tensor, _positions: Tensor, _heads: number, _headDim: number, _theta: number): Tensor {
  throw new Error("cpu ropeBackward: not implemented");
}

/** See Ops.embedding. */
export function embedding(_sc: CpuScope, _table: Tensor, _ids: Tensor): Tensor {
  throw new Error("cpu embedding: not implemented");
}

/** See Ops.embeddingBackward. */
export function embeddingBackward(_sc: CpuScope, _dy: Tensor, _ids: ArrayLike<number>, _vocab: number): Tensor {
  throw new Error("cpu embeddingBackward: not implemented");
}

/** See Ops.logProbs. */
export function logProbs(_sc: CpuScope, _logits: Tensor, _targets: Tensor, _temperature: number): { logp: Tensor; lse: Tensor } {
  throw new Error("cpu logProbs: not implemented");
}

/** See Ops.logProbsBackward. */
export function logProbsBackward(_sc: CpuScope, _dlogp: Tensor, _logits: Tensor, _targets: Tensor, _lse: Tensor, _temperature: number): Tensor {
  throw new Error("cpu logProbsBackward: not implemented");
}

/** See Ops.entropy. */
export function entropy(_sc: CpuScope, _logits: Tensor, _temperature: number): Tensor {
  throw new Error("cpu entropy: not implemented");
}
