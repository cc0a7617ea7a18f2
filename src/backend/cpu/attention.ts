/**
 * CPU backend: attention ops. TODO(owner): implement; see Ops in ../ops.ts for contracts.
 * @module
 */
import type { AttentionOptions } from "../ops.ts";
import type { Tensor } from "../tensor.ts";
import type { CpuScope } from "./scope.ts";

/** See Ops.attention. */
export function attention(_sc: CpuScope, _q: Tensor, _k: Tensor, _v: Tensor, _opts: AttentionOptions): { out: Tensor; lse: Tensor } {
  throw new Error("cpu attention: not implemented");
}

/** See Ops.attentionBackward. */
export function attentionBackward(_sc: CpuScope, _dOut: Tensor, _q: Tensor, _k: Tensor, _v: Tensor, _out: Tensor, _lse: Tensor, _opts: AttentionOptions): { dq: Tensor; dk: Tensor; dv: Tensor } {
  throw new Error("cpu attentionBackward: not implemented");
}
