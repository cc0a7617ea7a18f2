/**
 * lorafold: GRPO fine-tuning of language models with LoRA adapters, alias-free weight snapshots
 * and WebGPU kernels.
 * @module
 */
export type { DType, FloatArray, Tensor } from "./src/backend/tensor.ts";
export { ReleasedTensorError, ShapeError } from "./src/backend/tensor.ts";
export type {
  AdamWOptions,
  AttentionOptions,
  BackendFailure,
  BackendInfo,
  MatmulOptions,
  Ops,
} from "./src/backend/ops.ts";
export {
  Backend,
  type BackendChoice,
  BackendError,
  BackendLive,
  type BackendShape,
  cpuBackend,
  selectBackend,
  webgpuBackend,
} from "./src/backend/backend.ts";
