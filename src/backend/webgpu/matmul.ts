/**
 * WebGPU backend: matmul ops. TODO(owner): implement; see Ops in ../ops.ts for contracts.
 * @module
 */
import type { MatmulOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import type { GpuScope } from "./scope.ts";

/** See Ops.matmul. */
export function matmul(_sc: GpuScope, _a: Tensor, _b: Tensor, _opts?: MatmulOptions): Tensor {
  throw new Error("webgpu matmul: not implemented");
}
