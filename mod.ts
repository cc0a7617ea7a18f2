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

// ---- model, LoRA, snapshots ------------------------------------------------------------------
export {
  type ModelConfig,
  ModelConfigError,
  parseHfConfig,
  toHfConfig,
} from "./src/model/config.ts";
export {
  type HostTensor,
  initWeights,
  type Projection,
  PROJECTIONS,
  validateWeights,
  type WeightMap,
  WeightsError,
} from "./src/model/weights.ts";
export {
  backward,
  type DeviceModel,
  forward,
  forwardCached,
  type LoraRuntime,
  makeKvCache,
  uploadModel,
} from "./src/model/decoder.ts";
export { generate, type Generation, type GenerationRequest } from "./src/model/generate.ts";
export { loadModel, saveModel } from "./src/model/loader.ts";
export { Rng } from "./src/model/rng.ts";
export { CharTokenizer, type Tokenizer, TokenizerError } from "./src/tokenizer/tokenizer.ts";
export { ByteLevelBpeTokenizer, loadTokenizer } from "./src/tokenizer/bpe.ts";
export {
  initLora,
  type LoraConfig,
  loraScale,
  type LoraWeights,
  uploadLora,
} from "./src/lora/adapter.ts";
export { loadPeftAdapter, savePeftAdapter } from "./src/lora/peft.ts";
export { copySnapshot, foldSnapshot, Snapshot, SnapshotCorrupted } from "./src/snapshot/snapshot.ts";
export { exportAdapter, exportCheckpoint } from "./src/snapshot/export.ts";

// ---- GRPO and the pipeline -------------------------------------------------------------------
export * from "./src/grpo/mod.ts";
export {
  type PushReport,
  RolloutEngine,
  type RolloutEngineShape,
  RolloutError,
  type RolloutRequest,
  SyncError,
  SyncMismatch,
  SyncTarget,
  type SyncTargetShape,
} from "./src/ports/rollout_engine.ts";
export {
  NonFiniteStepError,
  Policy,
  type PolicyOptions,
  StateMismatchError,
} from "./src/train/policy.ts";
export { LocalEngineLive, makeLocalEngine } from "./src/rollout/local.ts";
export {
  advantage,
  type PromptItem,
  push,
  reward,
  rollout,
  snapshot,
  steps,
  update,
} from "./src/pipeline/stages.ts";
export { decodeTrainConfig, type TrainConfig, TrainConfigError } from "./src/app/config.ts";
export { loadBase, runTraining, type TrainSummary } from "./src/app/trainer.ts";

// ---- pushing to a vLLM-compatible server -----------------------------------------------------
export { serverEngineLayer, startEmbeddedServer } from "./src/app/server_layer.ts";
export { VllmHttpError } from "./src/vllm/client.ts";
