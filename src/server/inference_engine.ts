/**
 * The embedded server's inference engine, as its HTTP adapter sees it: a thin façade over
 *
 * - scheduler.ts: continuous batching on one scheduler fiber (queue, token-boundary admission
 *   and retirement, pause modes, shutdown);
 * - batch.ts: prefill through the prefix cache, decode steps of a running batch, KV cache slots;
 * - stop_rules.ts: one sequence's sampling and vLLM's stop rules;
 * - adapters.ts: the runtime LoRA registry (resident adapters, pins, LRU eviction);
 * - weights.ts: the base weights and reload_weights;
 * - prefix_cache.ts: prefills keyed by (model/adapter NAME, cache_salt, prompt ids).
 *
 * Everything is an Effect; the only runtime boundary is the HTTP adapter (http.ts / serve.ts).
 * Device work is serialised by one `Semaphore` permit: the scheduler holds it for a token
 * boundary, adapter load/unload and weight reloads take it in between, so they apply between two
 * decode steps. Device lifetimes are Effect scopes: the base weights, each resident adapter and
 * each batch's KV cache own one.
 * @module
 */
import { Effect, Semaphore } from "effect";
import type { Scope } from "effect";
import { messageOf, taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import type { BackendShape } from "../backend/backend.ts";
import type { ModelConfig } from "../model/config.ts";
import { loadFrozenBase } from "../model/loader.ts";
import { loadTokenizer } from "../tokenizer/bpe.ts";
import { type ChatTemplate, loadChatTemplate } from "../tokenizer/chat_template.ts";
import {
  type GenerationConfig,
  loadGenerationConfig,
  mergeEosIds,
  NO_GENERATION_CONFIG,
} from "../model/generation_config.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import { AdapterRegistry } from "./adapters.ts";
import {
  type CompletionLimits,
  decodeIds,
  maxCharsPerToken,
  normalizeCompletion,
  tokenizeText,
  tokenText,
} from "./completion.ts";
import { PrefixCache } from "./prefix_cache.ts";
import type { LogprobsMode } from "./sampler.ts";
import {
  makeScheduler,
  type PauseMode,
  type ProgressObserver,
  type Scheduler,
  type SchedulerEvent,
} from "./scheduler.ts";
import type { CompletionSpec } from "./completion.ts";
import { chatPromptIds, type ConversationFields } from "./chat.ts";
import {
  type ApiError,
  badRequest,
  type CompletionRequest,
  type CompletionResponse,
  internalError,
  type ModelCard,
  notFound,
} from "./schemas.ts";
import { ServedWeights, uploadBase } from "./weights.ts";

export type { PauseMode, SchedulerEvent };

/** InferenceEngine settings (from the command line). */
export interface InferenceEngineOptions {
  readonly modelDir: string;
  readonly servedModelName: string;
  readonly enableLora: boolean;
  readonly maxLoraRank: number;
  /** Adapters resident on the device at once (others stay on the host, uploaded on use). */
  readonly maxLoras: number;
  readonly maxLogprobs: number;
  readonly logprobsMode: LogprobsMode;
  /** Prefix-cache budget in bytes (0 disables it). */
  readonly prefixCacheBytes: number;
  /** Sequences running at once (a single request is never split). */
  readonly maxBatchSequences: number;
  /** KV-cache budget in bytes for the running batches (a single request is never split). */
  readonly kvCacheBytes: number;
  /** Observer of the scheduler (tests). */
  readonly onEvent?: (e: SchedulerEvent) => void;
  /** Request limits (n, prompt list, stop strings); vLLM's defaults when absent. */
  readonly limits?: Partial<CompletionLimits>;
  /** lora_path and weights_path must resolve under this directory; null/absent = anywhere. */
  readonly allowedRoot?: string | null;
  /** --chat-template: a template file replacing the model's; null/absent = the model's own. */
  readonly chatTemplatePath?: string | null;
  /**
   * --generation-config: "auto" (default, vLLM's) reads the model's generation_config.json (its
   * sampling values become the defaults of omitted fields, its eos ids stop generation too);
   * "vllm" ignores it.
   */
  readonly generationConfig?: "auto" | "vllm";
}

/** vLLM's default request limits. */
export const DEFAULT_LIMITS: CompletionLimits = {
  maxN: 16384,
  maxPrompts: 1024,
  maxSequences: 65536,
  maxStopStrings: 64,
  maxStopLength: 1024,
};

/** Fields of an {@link InferenceEngineStartError}. */
export interface InferenceEngineStartErrorFields {
  /** The served model directory. */
  readonly modelDir: string;
  /** What could not be used: the model, the tokenizer, the two together (vocab sizes), or the
   * --chat-template file. */
  readonly part: "model" | "tokenizer" | "vocab" | "chat template";
  /** What is wrong, in words (the load error's message, or the mismatch). */
  readonly reason: string;
  /** The load error, when there is one. */
  readonly cause?: unknown;
}

const InferenceEngineStartErrorBase: TaggedErrorClass<
  "InferenceEngineStartError",
  InferenceEngineStartErrorFields
> = taggedError(
  "InferenceEngineStartError",
  (e) => {
    return e.part === "model"
      ? `cannot load model ${e.modelDir}: ${e.reason}`
      : e.part === "tokenizer"
      ? `cannot load the tokenizer of ${e.modelDir}: ${e.reason}`
      : e.part === "chat template"
      ? `cannot use the chat template: ${e.reason}`
      : e.reason;
  },
);
/** The engine could not start (model or tokenizer unreadable, or not matching). */
export class InferenceEngineStartError extends InferenceEngineStartErrorBase {}

/** The serving engine. Create with `makeInferenceEngine`; `close` drains and frees the device. */
export class InferenceEngine {
  readonly options: InferenceEngineOptions;
  readonly backend: BackendShape;
  readonly tokenizer: Tokenizer;
  readonly prefixCache: PrefixCache;
  readonly weights: ServedWeights;
  readonly adapters: AdapterRegistry;
  readonly scheduler: Scheduler;
  /** The chat template (/v1/chat/completions, /tokenize with messages), or null. */
  readonly chatTemplate: ChatTemplate | null;
  /** generation_config.json of the model (empty with --generation-config vllm). */
  readonly generation: GenerationConfig;
  readonly created: number = Math.floor(Date.now() / 1000);
  readonly #device: Semaphore.Semaphore;
  readonly limits: CompletionLimits;
  /** vLLM's max_chars_per_token of the tokenizer (computed once). */
  readonly maxCharsPerToken: number;
  #released = false;

  /** Use `makeInferenceEngine`. */
  constructor(parts: {
    readonly options: InferenceEngineOptions;
    readonly backend: BackendShape;
    readonly tokenizer: Tokenizer;
    readonly prefixCache: PrefixCache;
    readonly weights: ServedWeights;
    readonly adapters: AdapterRegistry;
    readonly scheduler: Scheduler;
    readonly device: Semaphore.Semaphore;
    readonly chatTemplate?: ChatTemplate | null;
    readonly generation?: GenerationConfig;
  }) {
    this.chatTemplate = parts.chatTemplate ?? null;
    this.generation = parts.generation ?? NO_GENERATION_CONFIG;
    this.options = parts.options;
    this.backend = parts.backend;
    this.tokenizer = parts.tokenizer;
    this.prefixCache = parts.prefixCache;
    this.weights = parts.weights;
    this.adapters = parts.adapters;
    this.scheduler = parts.scheduler;
    this.#device = parts.device;
    this.limits = { ...DEFAULT_LIMITS, ...parts.options.limits };
    this.maxCharsPerToken = maxCharsPerToken(parts.tokenizer);
  }

  /** The served model's configuration. */
  get config(): ModelConfig {
    return this.weights.config;
  }

  /**
   * Shutdown: queued requests get 503, running ones end as aborted (answered), the scheduler
   * stops, then the adapters and base weights are released. Idempotent.
   */
  close(): Effect.Effect<void> {
    return Effect.gen({ self: this }, function* () {
      yield* this.scheduler.close();
      if (this.#released) return;
      this.#released = true;
      yield* this.#device.withPermit(
        Effect.andThen(this.adapters.close(), this.weights.close()),
      );
    });
  }

  // ---- model names ---------------------------------------------------------------------------

  /** The adapter for a served name: null = base, undefined = unknown. */
  resolveModel(name: string): { adapter: string | null } | undefined {
    if (name === this.options.servedModelName) return { adapter: null };
    return this.adapters.get(name) ? { adapter: name } : undefined;
  }

  /** Cards of GET /v1/models: the base model, then the adapters in load order. */
  models(): ModelCard[] {
    const o = this.options;
    return [
      {
        id: o.servedModelName,
        object: "model",
        created: this.created,
        owned_by: "vllm",
        root: o.modelDir,
        parent: null,
        max_model_len: this.config.maxPositionEmbeddings,
      },
      ...this.adapters.list().map((a): ModelCard => ({
        id: a.name,
        object: "model",
        created: a.created,
        owned_by: "vllm",
        root: a.path,
        parent: o.servedModelName,
        max_model_len: null,
      })),
    ];
  }

  #checkModel(name: string | null | undefined): Effect.Effect<void, ApiError> {
    return name == null || name === "" || this.resolveModel(name)
      ? Effect.void
      : Effect.fail(notFound(`The model \`${name}\` does not exist.`, "model"));
  }

  // ---- tokenizer routes ----------------------------------------------------------------------

  /** POST /tokenize. */
  tokenize(
    model: string | null | undefined,
    prompt: string,
    addSpecial: boolean,
    returnStrs: boolean,
  ): Effect.Effect<
    { count: number; max_model_len: number; tokens: number[]; token_strs: string[] | null },
    ApiError
  > {
    const maxLen = this.config.maxPositionEmbeddings;
    const maxChars = maxLen * this.maxCharsPerToken;
    return this.#checkModel(model).pipe(
      // vLLM's character bound: a prompt that cannot fit is refused without tokenizing it
      Effect.andThen(
        prompt.length > maxChars
          ? Effect.fail(
            badRequest(
              `You passed ${prompt.length} input characters and requested 0 output tokens. ` +
                `However, the model's context length is only ${maxLen} tokens, resulting in a ` +
                `maximum input length of ${maxLen} tokens (at most ${maxChars} characters). ` +
                "Please reduce the length of the input prompt.",
              "input_text",
            ),
          )
          : tokenizeText(this.tokenizer, prompt, addSpecial),
      ),
      Effect.map((tokens) => ({
        count: tokens.length,
        max_model_len: this.config.maxPositionEmbeddings,
        tokens,
        token_strs: returnStrs ? tokens.map((t) => tokenText(this.tokenizer, t)) : null,
      })),
    );
  }

  /** POST /tokenize, chat form: the conversation rendered with the chat template. */
  tokenizeChat(
    req: ConversationFields & {
      readonly model?: string | null;
      readonly return_token_strs?: boolean | null;
    },
  ): Effect.Effect<
    { count: number; max_model_len: number; tokens: number[]; token_strs: string[] | null },
    ApiError
  > {
    return this.#checkModel(req.model).pipe(
      Effect.andThen(
        chatPromptIds(
          req,
          this.chatTemplate,
          (t) => this.tokenizer.encode(t),
          this.tokenizer.bosId,
        ),
      ),
      Effect.map((tokens) => ({
        count: tokens.length,
        max_model_len: this.config.maxPositionEmbeddings,
        tokens,
        token_strs: req.return_token_strs ? tokens.map((t) => tokenText(this.tokenizer, t)) : null,
      })),
    );
  }

  /** POST /detokenize. */
  detokenize(
    model: string | null | undefined,
    tokens: readonly number[],
  ): Effect.Effect<{ prompt: string }, ApiError> {
    const bad = tokens.find((t) => t < 0 || t >= this.tokenizer.vocabSize);
    return this.#checkModel(model).pipe(
      Effect.andThen(
        bad !== undefined
          ? Effect.fail(badRequest(`Token id ${bad} is out of vocabulary`, "tokens"))
          : Effect.try({
            try: () => ({ prompt: decodeIds(this.tokenizer, tokens, false) }),
            catch: (e) => badRequest(messageOf(e), "tokens"),
          }),
      ),
    );
  }

  // ---- completions ---------------------------------------------------------------------------

  /** Validates a /v1/completions request into a spec (400/404 on bad input). */
  validate(
    req: CompletionRequest,
    headerRequestId: string | null = null,
  ): Effect.Effect<CompletionSpec, ApiError> {
    const config = this.config;
    return normalizeCompletion(req, {
      tokenizer: this.tokenizer,
      config: this.generation.eosTokenIds.length === 0 ? config : {
        ...config,
        eosTokenIds: mergeEosIds(config.eosTokenIds, this.generation.eosTokenIds),
      },
      samplingDefaults: this.generation.defaults,
      maxLogprobs: this.options.maxLogprobs,
      servedModelName: this.options.servedModelName,
      resolveModel: (n) => this.resolveModel(n),
      limits: this.limits,
      maxCharsPerToken: this.maxCharsPerToken,
      headerRequestId,
    });
  }

  /**
   * Runs a validated request; `onProgress` (streaming) sees its sequences at each boundary,
   * `cancel` aborts it (a streaming client that went away).
   */
  run(
    spec: CompletionSpec,
    onProgress: ProgressObserver | null = null,
    cancel: AbortSignal | null = null,
  ): Effect.Effect<CompletionResponse, ApiError> {
    return this.scheduler.submit(spec, onProgress, cancel);
  }

  /** POST /v1/completions: validates, submits to the scheduler, waits for the response. */
  complete(req: CompletionRequest): Effect.Effect<CompletionResponse, ApiError> {
    return this.validate(req).pipe(Effect.flatMap((spec) => this.run(spec)));
  }

  // ---- pause / resume ------------------------------------------------------------------------

  /** False once the engine is closing (GET /health answers 503). */
  get healthy(): boolean {
    return !this.scheduler.closed;
  }

  /** Whether generation is paused. */
  get paused(): boolean {
    return this.scheduler.paused;
  }

  /** POST /pause (see Scheduler.pause). */
  pause(mode: PauseMode, clearCache: boolean): Effect.Effect<void> {
    return this.scheduler.pause(mode, clearCache);
  }

  /** POST /resume. */
  resume(): Effect.Effect<void> {
    return this.scheduler.resume();
  }

  /** Counters for GET /metrics: requests running (frozen included) and waiting. */
  load(): { running: number; waiting: number } {
    return this.scheduler.load();
  }

  /** POST /reset_prefix_cache: drops the cache unless requests are running (then does nothing). */
  resetPrefixCache(): boolean {
    if (this.scheduler.busy) return false;
    this.prefixCache.reset();
    return true;
  }

  // ---- runtime LoRA --------------------------------------------------------------------------

  /** POST /v1/load_lora_adapter. */
  loadLora(name: string, path: string, inplace: boolean): Effect.Effect<void, ApiError> {
    return this.adapters.prepare(name, path, inplace, {
      config: this.config,
      maxRank: this.options.maxLoraRank,
      baseName: this.options.servedModelName,
      allowedRoot: this.options.allowedRoot ?? null,
    }).pipe(
      Effect.flatMap((w) => this.#onDevice(this.adapters.install(name, path, w), "")),
    );
  }

  /** POST /v1/unload_lora_adapter. */
  unloadLora(name: string): Effect.Effect<void, ApiError> {
    return this.#onDevice(this.adapters.remove(name), "").pipe(
      Effect.flatMap((found) =>
        found
          ? Effect.void
          : Effect.fail(notFound(`The lora adapter '${name}' cannot be found.`, "lora_name"))
      ),
    );
  }

  // ---- full weights (dev mode) ---------------------------------------------------------------

  /**
   * collective_rpc "reload_weights": loads a HF checkpoint directory (default: the served model
   * directory), checks it has the served architecture, uploads it and swaps it in between two
   * decode steps. On any failure the old weights keep serving. The prefix cache is NOT touched
   * (like vLLM).
   */
  reloadWeights(path: string | null): Effect.Effect<void, ApiError> {
    return this.weights.prepare(path, this.options.allowedRoot ?? null).pipe(
      Effect.flatMap((next) =>
        this.#onDevice(this.weights.install(next), "reload_weights failed: ")
      ),
    );
  }

  /** Runs device work under the permit (between decode steps); defects become 500s. */
  #onDevice<A>(work: Effect.Effect<A>, prefix: string): Effect.Effect<A, ApiError> {
    return this.#device.withPermit(work).pipe(
      Effect.catchDefect((d) => Effect.fail(internalError(`${prefix}${messageOf(d)}`))),
    );
  }
}

/**
 * Loads the model directory and tokenizer, uploads the weights, and forks the scheduler into
 * the current scope; closing the scope closes the engine (if `close` did not already).
 */
export const makeInferenceEngine = (
  backend: BackendShape,
  options: InferenceEngineOptions,
): Effect.Effect<InferenceEngine, InferenceEngineStartError, Scope.Scope> =>
  Effect.gen(function* () {
    const modelDir = options.modelDir;
    // 16-bit checkpoints stay 16-bit on the device (widened in the kernels): half the memory
    const { config, weights } = yield* loadFrozenBase(modelDir).pipe(
      Effect.mapError((e) =>
        new InferenceEngineStartError({ modelDir, part: "model", reason: e.message, cause: e })
      ),
    );
    const tokenizer = yield* loadTokenizer(modelDir).pipe(
      Effect.mapError((e) =>
        new InferenceEngineStartError({ modelDir, part: "tokenizer", reason: e.message, cause: e })
      ),
    );
    if (tokenizer.vocabSize > config.vocabSize) {
      return yield* Effect.fail(
        new InferenceEngineStartError({
          modelDir,
          part: "vocab",
          reason:
            `tokenizer has ${tokenizer.vocabSize} tokens but the model's vocab_size is ${config.vocabSize}`,
        }),
      );
    }
    const generation = options.generationConfig === "vllm"
      ? NO_GENERATION_CONFIG
      : yield* loadGenerationConfig(modelDir).pipe(
        Effect.mapError((e) =>
          new InferenceEngineStartError({ modelDir, part: "model", reason: e.message, cause: e })
        ),
      );
    const template = yield* loadChatTemplate(modelDir, options.chatTemplatePath ?? null).pipe(
      Effect.catch((e) =>
        options.chatTemplatePath
          ? Effect.fail(
            new InferenceEngineStartError({ modelDir, part: "chat template", reason: e.message }),
          )
          : Effect.sync(() => {
            console.warn(`lorafold serve: the model's chat template is unusable: ${e.message}`);
            return null;
          })
      ),
    );
    const served = new ServedWeights(
      backend,
      modelDir,
      yield* uploadBase(backend, config, weights),
    );
    const device = yield* Semaphore.make(1);
    const prefixCache = new PrefixCache(options.prefixCacheBytes);
    const adapters = new AdapterRegistry(backend, options.maxLoras);
    const scheduler = yield* makeScheduler(
      { backend, tokenizer, weights: served, adapters, prefixCache, device },
      {
        maxNumSeqs: options.maxBatchSequences,
        kvCacheBytes: options.kvCacheBytes,
        logprobsMode: options.logprobsMode,
        onEvent: options.onEvent,
      },
    );
    const engine = new InferenceEngine({
      options,
      backend,
      tokenizer,
      prefixCache,
      weights: served,
      adapters,
      scheduler,
      device,
      chatTemplate: template,
      generation,
    });
    yield* scheduler.start();
    yield* Effect.addFinalizer(() => engine.close());
    return engine;
  });
