/**
 * CPU backend: matmul ops. TODO(owner): implement; see Ops in ../ops.ts for contracts.
 * @module
 */
import type { MatmulOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import type { CpuScope } from "./scope.ts";

/** See Ops.matmul. */
export function matmul(_sc: CpuScope, _a: Tensor, _b: Tensor, _opts?: MatmulOptions): Tensor {
  throw new Error("cpu matmul: not implemented");
}
