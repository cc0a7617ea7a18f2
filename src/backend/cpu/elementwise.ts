/**
 * CPU backend: elementwise ops. TODO(owner): implement; see Ops in ../ops.ts for contracts.
 * @module
 */
import type { AdamWOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import type { CpuScope } from "./scope.ts";

/** See Ops.add. */
export function add(_sc: CpuScope, _a: Tensor, _b: Tensor): Tensor {
  throw new Error("cpu add: not implemented");
}

/** See Ops.sub. */
export function sub(_sc: CpuScope, _a: Tensor, _b: Tensor): Tensor {
  throw new Error("cpu sub: not implemented");
}

/** See Ops.mul. */
export function mul(_sc: CpuScope, _a: Tensor, _b: Tensor): Tensor {
  throw new Error("cpu mul: not implemented");
}

/** See Ops.scale. */
export function scale(_sc: CpuScope, _a: Tensor, _s: number): Tensor {
  throw new Error("cpu scale: not implemented");
}

/** See Ops.addScaled. */
export function addScaled(_sc: CpuScope, _a: Tensor, _b: Tensor, _s: number): Tensor {
  throw new Error("cpu addScaled: not implemented");
}

/** See Ops.addScaledInPlace. */
export function addScaledInPlace(_sc: CpuScope, _dst: Tensor, _src: Tensor, _s: number): void {
  throw new Error("cpu addScaledInPlace: not implemented");
}

/** See Ops.addRow. */
export function addRow(_sc: CpuScope, _a: Tensor, _row: Tensor): Tensor {
  throw new Error("cpu addRow: not implemented");
}

/** See Ops.sumRows. */
export function sumRows(_sc: CpuScope, _a: Tensor): Tensor {
  throw new Error("cpu sumRows: not implemented");
}

/** See Ops.sumSquares. */
export function sumSquares(_sc: CpuScope, _a: Tensor): Tensor {
  throw new Error("cpu sumSquares: not implemented");
}

/** See Ops.gatherRows. */
export function gatherRows(_sc: CpuScope, _src: Tensor, _rows: ArrayLike<number>): Tensor {
  throw new Error("cpu gatherRows: not implemented");
}

/** See Ops.scatterRowsInPlace. */
export function scatterRowsInPlace(_sc: CpuScope, _dst: Tensor, _src: Tensor, _rows: ArrayLike<number>): void {
  throw new Error("cpu scatterRowsInPlace: not implemented");
}

/** See Ops.swiglu. */
export function swiglu(_sc: CpuScope, _gate: Tensor, _up: Tensor): Tensor {
  throw new Error("cpu swiglu: not implemented");
}

/** See Ops.swigluBackward. */
export function swigluBackward(_sc: CpuScope, _dh: Tensor, _gate: Tensor, _up: Tensor): { dGate: Tensor; dUp: Tensor } {
  throw new Error("cpu swigluBackward: not implemented");
}

/** See Ops.adamw. */
export function adamw(_sc: CpuScope, _param: Tensor, _grad: Tensor, _m: Tensor, _v: Tensor, _opts: AdamWOptions): void {
  throw new Error("cpu adamw: not implemented");
}

/** See Ops.loraFold. */
export function loraFold(_sc: CpuScope, _w: Tensor, _b: Tensor, _a: Tensor, _s: number): Tensor {
  throw new Error("cpu loraFold: not implemented");
}
