/**
 * WebGPU backend: elementwise ops. TODO(owner): implement; see Ops in ../ops.ts for contracts.
 * @module
 */
import type { AdamWOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import type { GpuScope } from "./scope.ts";

/** See Ops.add. */
export function add(_sc: GpuScope, _a: Tensor, _b: Tensor): Tensor {
  throw new Error("webgpu add: not implemented");
}

/** See Ops.sub. */
export function sub(_sc: GpuScope, _a: Tensor, _b: Tensor): Tensor {
  throw new Error("webgpu sub: not implemented");
}

/** See Ops.mul. */
export function mul(_sc: GpuScope, _a: Tensor, _b: Tensor): Tensor {
  throw new Error("webgpu mul: not implemented");
}

/** See Ops.scale. */
export function scale(_sc: GpuScope, _a: Tensor, _s: number): Tensor {
  throw new Error("webgpu scale: not implemented");
}

/** See Ops.addScaled. */
export function addScaled(_sc: GpuScope, _a: Tensor, _b: Tensor, _s: number): Tensor {
  throw new Error("webgpu addScaled: not implemented");
}

/** See Ops.addScaledInPlace. */
export function addScaledInPlace(_sc: GpuScope, _dst: Tensor, _src: Tensor, _s: number): void {
  throw new Error("webgpu addScaledInPlace: not implemented");
}

/** See Ops.addRow. */
export function addRow(_sc: GpuScope, _a: Tensor, _row: Tensor): Tensor {
  throw new Error("webgpu addRow: not implemented");
}

/** See Ops.sumRows. */
export function sumRows(_sc: GpuScope, _a: Tensor): Tensor {
  throw new Error("webgpu sumRows: not implemented");
}

/** See Ops.sumSquares. */
export function sumSquares(_sc: GpuScope, _a: Tensor): Tensor {
  throw new Error("webgpu sumSquares: not implemented");
}

/** See Ops.gatherRows. */
export function gatherRows(_sc: GpuScope, _src: Tensor, _rows: ArrayLike<number>): Tensor {
  throw new Error("webgpu gatherRows: not implemented");
}

/** See Ops.scatterRowsInPlace. */
export function scatterRowsInPlace(_sc: GpuScope, _dst: Tensor, _src: Tensor, _rows: ArrayLike<number>): void {
  throw new Error("webgpu scatterRowsInPlace: not implemented");
}

/** See Ops.swiglu. */
export function swiglu(_sc: GpuScope, _gate: Tensor, _up: Tensor): Tensor {
  throw new Error("webgpu swiglu: not implemented");
}

/** See Ops.swigluBackward. */
export function swigluBackward(_sc: GpuScope, _dh: Tensor, _gate: Tensor, _up: Tensor): { dGate: Tensor; dUp: Tensor } {
  throw new Error("webgpu swigluBackward: not implemented");
}

/** See Ops.adamw. */
export function adamw(_sc: GpuScope, _param: Tensor, _grad: Tensor, _m: Tensor, _v: Tensor, _opts: AdamWOptions): void {
  throw new Error("webgpu adamw: not implemented");
}

/** See Ops.loraFold. */
export function loraFold(_sc: GpuScope, _w: Tensor, _b: Tensor, _a: Tensor, _s: number): Tensor {
  throw new Error("webgpu loraFold: not implemented");
}
