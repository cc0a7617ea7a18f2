/**
 * WebGPU backend: attention ops. TODO(owner): implement; see Ops in ../ops.ts for contracts.
 * @module
 */
import type { AttentionOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import type { GpuScope } from "./scope.ts";

/** See Ops.attention. */
export function attention(_sc: GpuScope, _q: Tensor, _k: Tensor, _v: Tensor, _opts: AttentionOptions): { out: Tensor; lse: Tensor } {
  throw new Error("webgpu attention: not implemented");
}

/** See Ops.attentionBackward. */
export function attentionBackward(_sc: GpuScope, _dOut: Tensor, _q: Tensor, _k: Tensor, _v: Tensor, _out: Tensor, _lse: Tensor, _opts: AttentionOptions): { dq: Tensor; dk: Tensor; dv: Tensor } {
  throw new Error("webgpu attentionBackward: not implemented");
}
