/**
 * lorafold: GRPO fine-tuning of language models with LoRA adapters, alias-free weight snapshots
 * and WebGPU kernels.
 * @module
 */
// ---- base: options as annotated Schemas, shared by every configuration --------------------------
export {
  choice,
  decodeOptions,
  InvalidOption,
  option,
  type OptionDoc,
  type OptionFields,
  optionsSchema,
} from "./src/base/options.ts";
export { taggedError, type TaggedErrorClass } from "./src/base/tagged_error.ts";

// ---- tensors ----------------------------------------------------------------------------------
export type { DType, FloatArray, HalfDType, Tensor } from "./src/backend/tensor.ts";
export { isHalfDType, ReleasedTensorError, ShapeError } from "./src/backend/tensor.ts";

// ---- backend ----------------------------------------------------------------------------------
export type {
  AdamWOptions,
  AttentionOptions,
  BackendInfo,
  LoraProjection,
  MatmulOptions,
  Ops,
  RopeFrequencies,
  SwigluPart,
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

// ---- tokenizer --------------------------------------------------------------------------------
export { CharTokenizer, type Tokenizer, TokenizerError } from "./src/tokenizer/tokenizer.ts";
export { ByteLevelBpeTokenizer, HfTokenizer, loadTokenizer } from "./src/tokenizer/bpe.ts";
export {
  type ChatMessage,
  type ChatTemplate,
  ChatTemplateError,
  chatTemplateFromConfig,
  loadChatTemplate,
  type RenderOptions,
} from "./src/tokenizer/chat_template.ts";

// ---- model ------------------------------------------------------------------------------------
export {
  isSlidingLayer,
  MODEL_TYPES,
  type ModelConfig,
  ModelConfigError,
  type ModelType,
  parseHfConfig,
  type RopeScaling,
  toHfConfig,
} from "./src/model/config.ts";
export { type RopePlan, ropePlan } from "./src/model/rope.ts";
export {
  type GenerationConfig,
  loadGenerationConfig,
  parseGenerationConfig,
  type SamplingDefaults,
} from "./src/model/generation_config.ts";
export {
  type BaseTensor,
  type BaseWeightMap,
  type HalfTensor,
  type HostTensor,
  initWeights,
  isHalfTensor,
  type Projection,
  projectionHasBias,
  PROJECTIONS,
  qkNormPaths,
  validateWeights,
  type WeightMap,
  WeightsError,
  widenTensor,
  widenWeights,
} from "./src/model/weights.ts";
export {
  backward,
  backwardLogProbs,
  type DeviceModel,
  forward,
  forwardCached,
  forwardLogProbs,
  LOGITS_CHUNK_ELEMENTS,
  type LogProbsOptions,
  type LogProbsTape,
  type LoraRuntime,
  makeKvCache,
  type TokenLogProbs,
  uploadModel,
} from "./src/model/decoder.ts";
export { generate, type Generation, type GenerationRequest } from "./src/model/generate.ts";
export {
  type BaseModel,
  loadBase,
  type LoadBaseOptions,
  loadFrozenBase,
  loadModel,
  saveModel,
} from "./src/model/loader.ts";
export { Rng } from "./src/model/rng.ts";

// ---- LoRA -------------------------------------------------------------------------------------
export {
  initLora,
  type LoraConfig,
  loraScale,
  type LoraWeights,
  uploadLora,
} from "./src/lora/adapter.ts";
export { loadPeftAdapter, savePeftAdapter } from "./src/lora/peft.ts";

// ---- snapshots --------------------------------------------------------------------------------
export {
  copySnapshot,
  firstNonFiniteWeight,
  FrozenBase,
  loraSnapshot,
  mergedWeights,
  type NonFinite,
  Snapshot,
  snapshotAdapter,
  SnapshotCorrupted,
  type SnapshotKind,
  type SnapshotModel,
  snapshotModel,
} from "./src/snapshot/snapshot.ts";
export { exportAdapter, exportCheckpoint } from "./src/snapshot/export.ts";

// ---- GRPO math --------------------------------------------------------------------------------
export * from "./src/grpo/mod.ts";

// ---- training state ---------------------------------------------------------------------------
export {
  NonFiniteStepError,
  Policy,
  type PolicyOptions,
  StateMismatchError,
} from "./src/train/policy.ts";
export { isDecayed } from "./src/train/weight_decay.ts";

// ---- ports: where rollouts come from, where snapshots go ---------------------------------------
export {
  type RolloutCompletion,
  RolloutEngine,
  type RolloutEngineShape,
  RolloutError,
  type RolloutRequest,
  type RolloutResult,
} from "./src/ports/rollout_engine.ts";
export {
  type PushReport,
  PushTarget,
  type PushTargetShape,
  type ReplicaPushOutcome,
  SyncError,
  SyncMismatch,
} from "./src/ports/push_target.ts";

// ---- vLLM protocol client ---------------------------------------------------------------------
export {
  CLAMPED_LOGPROB,
  type FinishReason,
  makeVllmClient,
  type VllmClient,
  VllmHttpError,
} from "./src/vllm/client.ts";
export { detectPauseSupport, type PauseForm, type PauseSupport } from "./src/vllm/pause.ts";
export { type Route, Routing } from "./src/vllm/routing.ts";
export {
  type OutCause,
  parseReplicaFile,
  parseReplicaSource,
  Replica,
  type ReplicaEvent,
  type ReplicaObserver,
  ReplicaSet,
  type ReplicaSource,
  type ReplicaState,
  type ReplicaStatus,
} from "./src/vllm/replicas.ts";

// ---- rollout engines --------------------------------------------------------------------------
export { LocalEngineLive, makeLocalEngine } from "./src/rollout/local.ts";
export { makeServerRolloutEngine } from "./src/rollout/server.ts";

// ---- push targets -----------------------------------------------------------------------------
export { makeLoraPusher } from "./src/push/lora.ts";
export { makeFullPusher } from "./src/push/full.ts";
export {
  makeReplicatedPushTarget,
  monitorReplicas,
  monitorRound,
  type ReplicaMonitorOptions,
  type ReplicaTarget,
  type ReplicaTargetFactory,
  type ReplicatedPushTarget,
} from "./src/push/replicated.ts";

// ---- pipeline stages --------------------------------------------------------------------------
export {
  advantage,
  boundedStaleness,
  preparePush,
  type PromptDraw,
  type PromptItem,
  type PromptSource,
  promptTokens,
  push,
  reward,
  rollout,
  snapshot,
  type Staled,
  type StalenessInfo,
  type StalenessOptions,
  steps,
  update,
} from "./src/pipeline/stages.ts";
export {
  appendModelTurn,
  appendObservation,
  emptyEpisode,
  type Environment,
  EnvironmentError,
  type EnvironmentStep,
  type Episode,
  type EpisodeEnvironment,
  type EpisodeLimits,
  type EpisodeSpec,
  fromPromise,
  type ModelTurn,
  type MultiTurnOptions,
  multiTurnRollout,
  runEpisodes,
  type TokenOrigin,
  type TurnGenerator,
} from "./src/pipeline/multi_turn.ts";

// ---- tasks ------------------------------------------------------------------------------------
export type { Task, TaskEvaluation } from "./src/task/task.ts";
export {
  arithmeticGrpoTask,
  arithmeticTaskDefaults,
  type ArithmeticTaskOptions,
  BUILTIN_MODEL_DIR,
} from "./src/task/arithmetic_task.ts";
export {
  arithmeticTask,
  exactMatchReward,
  formatReward,
  type Problem,
} from "./src/task/arithmetic.ts";
export {
  DatasetError,
  type DatasetFile,
  type DatasetRow,
  readDatasetFile,
} from "./src/io/dataset.ts";
export {
  epochSampler,
  loadPromptDataset,
  type PromptDataset,
  promptDatasetOf,
  splitDataset,
  stepsForEpochs,
} from "./src/task/dataset.ts";
export { datasetTask, type DatasetTaskOptions } from "./src/task/dataset_task.ts";
export {
  accuracyReward,
  BUILTIN_REWARDS,
  builtinReward,
  extractAnswer,
  lengthReward,
  thinkAnswerFormatReward,
  thinkFormatReward,
} from "./src/task/builtin_rewards.ts";
export {
  loadRewardModule,
  type RewardArgs,
  RewardModuleError,
  userReward,
  type UserRewardFn,
} from "./src/task/reward_module.ts";
export {
  EnvironmentModuleError,
  loadEnvironmentModule,
  type UserEpisodeStart,
} from "./src/task/environment_module.ts";
export { importUserExport, isModuleSpec, type UserExport } from "./src/task/user_module.ts";
export {
  calculatorEnvironment,
  calculatorLimits,
  type CalculatorOptions,
  type CalculatorTask,
  calculatorTask,
  episodeAccuracy,
  episodeExactMatch,
  lastSum,
  threeSumProblem,
} from "./src/task/calculator_env.ts";

// ---- the trainer app --------------------------------------------------------------------------
export { decodeTrainConfig, type TrainConfig, TrainConfigError } from "./src/app/config.ts";
export { type TrainTaskError, trainTaskOf } from "./src/app/train_task.ts";
export {
  type RolloutLayerFactory,
  runTraining,
  type TrainRunOptions,
  type TrainSummary,
} from "./src/app/trainer.ts";
export { makeServerLayer, serverLayer } from "./src/app/server_layer.ts";
export { startEmbeddedServer } from "./src/app/embedded_server.ts";
