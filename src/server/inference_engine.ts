/**
 * The embedded server's inference engine (behind its HTTP adapter): the base model and tokenizer, runtime LoRA
 * adapters, the prefix cache, pause state, and ONE generation worker that takes queued
 * completion requests (concurrent requests for the same model/adapter name are batched
 * together), prefills each distinct prompt once (through the prefix cache) and decodes all
 * sequences of the batch in lock-step with a shared KV cache.
 *
 * Device lifetimes use Effect scopes: the base weights, each resident adapter, and each batch own
 * one scope. Control operations (adapter load/unload, weight reload) take the device lock, so
 * they happen between batches — or while a batch is frozen by `pause?mode=keep`, after which
 * the batch continues with whatever weights are current (vLLM's in-flight update semantics).
 *
 * Prefix cache (see prefix_cache.ts): per (requested model/adapter NAME, cache_salt, prompt ids)
 * the prompt's K/V rows in every layer and its last-position logits. A hit skips the prompt's
 * forward pass entirely; a cached strict prefix is reused and only the rest is prefilled.
 * @module
 */
import { Effect, Exit, Scope } from "effect";
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { access } from "node:fs/promises";
import { join } from "node:path";
import type { BackendShape } from "../backend/backend.ts";
import type { Ops } from "../backend/ops.ts";
import type { FloatArray } from "../backend/tensor.ts";
import { type LoraWeights, uploadLora } from "../lora/adapter.ts";
import { ADAPTER_CONFIG, loadPeftAdapter } from "../lora/peft.ts";
import type { ModelConfig } from "../model/config.ts";
import {
  type DeviceModel,
  forward,
  forwardCached,
  type KvCache,
  type LoraRuntime,
  makeKvCache,
  uploadModel,
} from "../model/decoder.ts";
import { loadModel } from "../model/loader.ts";
import { Rng } from "../model/rng.ts";
import { logSoftmax } from "../model/sampling.ts";
import { loadTokenizer } from "../tokenizer/bpe.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import type { WeightMap } from "../model/weights.ts";
import {
  checkStopStrings,
  type CompletionSpec,
  decodeIds,
  normalizeCompletion,
  type PromptPosition,
  renderCompletion,
  type SeqResult,
  tokenizeText,
  tokenText,
} from "./completion.ts";
import { PrefixCache, type PrefixEntry, prefixNamespace } from "./prefix_cache.ts";
import { type LogprobsMode, rankOf, sampleStep, topEntries } from "./sampler.ts";
import {
  ApiError,
  badRequest,
  type CompletionRequest,
  type CompletionResponse,
  internalError,
  type ModelCard,
  notFound,
} from "./schemas.ts";

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
  /** Sequences decoded together at most (a single request is never split). */
  readonly maxBatchSequences: number;
}

/** Fields of an {@link InferenceEngineStartError}. */
export interface InferenceEngineStartErrorFields {
  /** The served model directory. */
  readonly modelDir: string;
  /** What could not be used: the model, the tokenizer, or the two together (vocab sizes). */
  readonly part: "model" | "tokenizer" | "vocab";
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
      : e.reason;
  },
);
/** The engine could not start (model or tokenizer unreadable, or not matching). */
export class InferenceEngineStartError extends InferenceEngineStartErrorBase {}

/** Pause modes of POST /pause. */
export type PauseMode = "abort" | "wait" | "keep";

interface Base {
  readonly config: ModelConfig;
  readonly model: DeviceModel;
  readonly scope: Scope.Closeable;
}

interface Adapter {
  readonly name: string;
  readonly path: string;
  readonly weights: LoraWeights;
  readonly created: number;
  runtime: LoraRuntime | null;
  scope: Scope.Closeable | null;
  lastUse: number;
}

interface Job {
  readonly spec: CompletionSpec;
  admitted: boolean;
  aborted: boolean;
  readonly resolve: (r: CompletionResponse) => void;
  readonly reject: (e: ApiError) => void;
}

interface Seq {
  readonly job: Job;
  readonly prompt: number;
  readonly j: number;
  readonly entry: PrefixEntry;
  readonly rng: Rng;
  readonly tokens: number[];
  readonly logprobs: number[];
  readonly tops: (ReadonlyArray<readonly [number, number]> | null)[];
  done: boolean;
  finishReason: "stop" | "length" | "abort";
  stopReason: number | string | null;
  stopText: string | null;
  stoppedByToken: boolean;
  textLen: number;
}

/** A mutual-exclusion lock over the device (FIFO). */
class Lock {
  #held = false;
  readonly #waiters: (() => void)[] = [];
  acquire(): Promise<void> {
    if (!this.#held) {
      this.#held = true;
      return Promise.resolve();
    }
    return new Promise((r) => this.#waiters.push(r));
  }
  release(): void {
    const w = this.#waiters.shift();
    if (w) w();
    else this.#held = false;
  }
  async with<T>(f: () => Promise<T>): Promise<T> {
    await this.acquire();
    try {
      return await f();
    } finally {
      this.release();
    }
  }
}

/** Wakes everyone waiting for a state change. */
class Signal {
  #waiters: (() => void)[] = [];
  wait(): Promise<void> {
    return new Promise((r) => this.#waiters.push(r));
  }
  notify(): void {
    const w = this.#waiters;
    this.#waiters = [];
    for (const f of w) f();
  }
}

const macrotask = (): Promise<void> => new Promise((r) => setTimeout(r, 0));

let lastYield = 0;
/** Lets HTTP requests in between decode steps: yields to the event loop every ~5 ms of work. */
const maybeYield = async (): Promise<void> => {
  const now = performance.now();
  if (now - lastYield < 5) return;
  await macrotask();
  lastYield = performance.now();
};

const run = <A, E>(e: Effect.Effect<A, E>): Promise<A> => Effect.runPromise(e);

const message = (e: unknown): string =>
  e instanceof Error || (typeof e === "object" && e !== null && "message" in e)
    ? String((e as { message: unknown }).message)
    : String(e);

const SAME_SHAPE_FIELDS = [
  "modelType",
  "hiddenSize",
  "intermediateSize",
  "numLayers",
  "numHeads",
  "numKvHeads",
  "headDim",
  "vocabSize",
  "tieWordEmbeddings",
  "attentionBias",
] as const;

const exists = (path: string): Promise<boolean> => access(path).then(() => true, () => false);

/** The serving engine. Create with `makeInferenceEngine`; `close` releases the device memory. */
export class InferenceEngine {
  readonly options: InferenceEngineOptions;
  readonly backend: BackendShape;
  readonly tokenizer: Tokenizer;
  readonly prefixCache: PrefixCache;
  readonly created: number = Math.floor(Date.now() / 1000);
  #base: Base;
  readonly #adapters = new Map<string, Adapter>();
  readonly #queue: Job[] = [];
  readonly #lock = new Lock();
  readonly #signal = new Signal();
  readonly #fallbackRng = new Rng(crypto.getRandomValues(new Uint32Array(1))[0]);
  #paused: PauseMode | null = null;
  /** Batches running or frozen: while > 0, reset_prefix_cache does nothing (like vLLM). */
  #active = 0;
  #running: Job[] = [];
  #clock = 0;
  #closed = false;
  #worker: Promise<void> | null = null;

  constructor(
    backend: BackendShape,
    tokenizer: Tokenizer,
    base: Base,
    options: InferenceEngineOptions,
  ) {
    this.backend = backend;
    this.tokenizer = tokenizer;
    this.#base = base;
    this.options = options;
    this.prefixCache = new PrefixCache(options.prefixCacheBytes);
  }

  /** The served model's configuration. */
  get config(): ModelConfig {
    return this.#base.config;
  }

  /** Starts the generation worker (idempotent). */
  start(): void {
    if (!this.#worker) this.#worker = this.#workerLoop();
  }

  /** Stops the worker, fails queued requests, releases device memory. */
  async close(): Promise<void> {
    this.#closed = true;
    for (const j of this.#queue.splice(0)) j.reject(shuttingDown());
    for (const j of this.#running) j.aborted = true;
    this.#paused = null; // unfreezes a batch held by pause(keep); it ends as aborted
    this.#signal.notify();
    await this.#worker?.catch(() => {});
    await this.#lock.with(async () => {
      for (const a of this.#adapters.values()) await this.#evict(a);
      await run(Scope.close(this.#base.scope, Exit.void));
    });
  }

  // ---- model names ---------------------------------------------------------------------------

  /** The adapter for a served name: null = base, undefined = unknown. */
  resolveModel(name: string): { adapter: string | null } | undefined {
    if (name === this.options.servedModelName) return { adapter: null };
    return this.#adapters.has(name) ? { adapter: name } : undefined;
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
      ...[...this.#adapters.values()].map((a): ModelCard => ({
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
    return name == null || this.resolveModel(name)
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
    return this.#checkModel(model).pipe(
      Effect.andThen(tokenizeText(this.tokenizer, prompt, addSpecial)),
      Effect.map((tokens) => ({
        count: tokens.length,
        max_model_len: this.config.maxPositionEmbeddings,
        tokens,
        token_strs: returnStrs ? tokens.map((t) => tokenText(this.tokenizer, t)) : null,
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
            catch: (e) => badRequest(message(e), "tokens"),
          }),
      ),
    );
  }

  // ---- completions ---------------------------------------------------------------------------

  /** POST /v1/completions: validates, queues for the worker, waits for the result. */
  complete(req: CompletionRequest): Effect.Effect<CompletionResponse, ApiError> {
    return normalizeCompletion(req, {
      tokenizer: this.tokenizer,
      config: this.config,
      maxLogprobs: this.options.maxLogprobs,
      servedModelName: this.options.servedModelName,
      resolveModel: (n) => this.resolveModel(n),
    }).pipe(
      Effect.flatMap((spec) =>
        Effect.callback<CompletionResponse, ApiError>((resume) => {
          if (this.#closed) return resume(Effect.fail(shuttingDown()));
          this.#queue.push({
            spec,
            admitted: this.#paused === null,
            aborted: false,
            resolve: (r) => resume(Effect.succeed(r)),
            reject: (e) => resume(Effect.fail(e)),
          });
          this.#signal.notify();
        })
      ),
    );
  }

  // ---- pause / resume ------------------------------------------------------------------------

  /** False once the engine is closing (GET /health answers 503). */
  get healthy(): boolean {
    return !this.#closed;
  }

  /** Whether generation is paused. */
  get paused(): boolean {
    return this.#paused !== null;
  }

  /**
   * POST /pause. abort: running and queued requests finish now with finish_reason "abort";
   * wait: they run to completion (this returns when drained); keep: the running batch freezes
   * at its next step and continues after resume. Requests arriving while paused wait for resume.
   * With `clearCache` (abort/wait) the prefix cache is reset once drained, as vLLM does.
   */
  async pause(mode: PauseMode, clearCache: boolean): Promise<void> {
    this.#paused = mode;
    if (mode === "abort") {
      for (const j of this.#running) j.aborted = true;
      const queued = this.#queue.filter((j) => j.admitted);
      for (const j of queued) {
        this.#queue.splice(this.#queue.indexOf(j), 1);
        j.resolve(this.#abortedResponse(j.spec));
      }
    }
    this.#signal.notify();
    if (mode === "keep") return;
    while (this.#active > 0 || this.#queue.some((j) => j.admitted)) await this.#signal.wait();
    if (clearCache && this.#paused === mode) this.prefixCache.reset();
  }

  /** POST /resume. */
  resume(): void {
    this.#paused = null;
    for (const j of this.#queue) j.admitted = true;
    this.#signal.notify();
  }

  /** Counters for GET /metrics: requests running (frozen included) and waiting. */
  load(): { running: number; waiting: number } {
    return { running: this.#running.length, waiting: this.#queue.length };
  }

  /** POST /reset_prefix_cache: drops the cache unless requests are running (then it does nothing). */
  resetPrefixCache(): boolean {
    if (this.#active > 0) return false;
    this.prefixCache.reset();
    return true;
  }

  // ---- runtime LoRA ------------------------------------------------------------------------------

  /** POST /v1/load_lora_adapter. */
  loadLora(name: string, path: string, inplace: boolean): Effect.Effect<void, ApiError> {
    return Effect.gen({ self: this }, function* () {
      if (this.#adapters.has(name) && !inplace) {
        return yield* Effect.fail(
          badRequest(`The lora adapter '${name}' has already been loaded.`, "lora_name"),
        );
      }
      if (name === this.options.servedModelName) {
        return yield* Effect.fail(
          badRequest(`The lora adapter name '${name}' is the base model's name.`, "lora_name"),
        );
      }
      if (!(yield* Effect.promise(() => exists(join(path, ADAPTER_CONFIG))))) {
        return yield* Effect.fail(
          notFound(
            `No adapter found for ${path}: ${join(path, ADAPTER_CONFIG)} does not exist.`,
            "lora_path",
          ),
        );
      }
      const w = yield* loadPeftAdapter(path, this.config).pipe(
        Effect.mapError((e) =>
          badRequest(
            `Failed to load LoRA adapter '${name}' from ${path}: ${message(e)}`,
            "lora_path",
          )
        ),
      );
      if (w.config.r > this.options.maxLoraRank) {
        return yield* Effect.fail(
          badRequest(
            `LoRA rank ${w.config.r} is greater than max_lora_rank ${this.options.maxLoraRank}.`,
            "lora_path",
          ),
        );
      }
      yield* Effect.tryPromise({
        try: () =>
          this.#lock.with(async () => {
            const old = this.#adapters.get(name);
            if (old) await this.#evict(old);
            this.#adapters.set(name, {
              name,
              path,
              weights: w,
              created: Math.floor(Date.now() / 1000),
              runtime: null,
              scope: null,
              lastUse: 0,
            });
            // upload now when a device slot is free (else on first use)
            if (this.#residentCount() < this.options.maxLoras) await this.#resident(name);
          }),
        catch: (e) => internalError(message(e)),
      });
    });
  }

  /** POST /v1/unload_lora_adapter. */
  unloadLora(name: string): Effect.Effect<void, ApiError> {
    return Effect.tryPromise({
      try: () =>
        this.#lock.with(async () => {
          const a = this.#adapters.get(name);
          if (!a) return false;
          this.#adapters.delete(name);
          await this.#evict(a);
          return true;
        }),
      catch: (e) => internalError(message(e)),
    }).pipe(
      Effect.flatMap((found) =>
        found
          ? Effect.void
          : Effect.fail(notFound(`The lora adapter '${name}' cannot be found.`, "lora_name"))
      ),
    );
  }

  #residentCount(): number {
    let n = 0;
    for (const a of this.#adapters.values()) if (a.runtime) n++;
    return n;
  }

  async #evict(a: Adapter): Promise<void> {
    const s = a.scope;
    a.runtime = null;
    a.scope = null;
    if (s) await run(Scope.close(s, Exit.void));
  }

  /** The adapter's device runtime (uploading it, evicting the least recently used); lock held. */
  async #resident(name: string): Promise<LoraRuntime | null> {
    const a = this.#adapters.get(name);
    if (!a) return null;
    a.lastUse = ++this.#clock;
    if (a.runtime) return a.runtime;
    while (this.#residentCount() >= Math.max(1, this.options.maxLoras)) {
      let lru: Adapter | null = null;
      for (const b of this.#adapters.values()) {
        if (b.runtime && (!lru || b.lastUse < lru.lastUse)) lru = b;
      }
      if (!lru) break;
      await this.#evict(lru);
    }
    const scope = await run(Scope.make());
    const ops = await run(Scope.provide(scope)(this.backend.ops));
    a.runtime = uploadLora(ops, a.weights);
    a.scope = scope;
    return a.runtime;
  }

  // ---- full weights (dev mode) ---------------------------------------------------------------

  /**
   * collective_rpc "reload_weights": loads a HF checkpoint directory (default: the served model
   * directory), checks it has the served architecture, uploads it and swaps it in. On any failure
   * the old weights keep serving. The prefix cache is NOT touched (like vLLM).
   */
  reloadWeights(path: string | null): Effect.Effect<void, ApiError> {
    const dir = path ?? this.options.modelDir;
    return Effect.gen({ self: this }, function* () {
      if (!(yield* Effect.promise(() => exists(join(dir, "config.json"))))) {
        return yield* Effect.fail(
          badRequest(
            `reload_weights: no checkpoint at ${dir} (config.json not found)`,
            "weights_path",
          ),
        );
      }
      const { config, weights } = yield* loadModel(dir).pipe(
        Effect.mapError((e) =>
          badRequest(`reload_weights: cannot load ${dir}: ${message(e)}`, "weights_path")
        ),
      );
      for (const f of SAME_SHAPE_FIELDS) {
        if (config[f] !== this.config[f]) {
          return yield* Effect.fail(
            badRequest(
              `reload_weights: ${dir} does not match the served model: ${f} is ${
                config[f]
              }, expected ${this.config[f]}`,
              "weights_path",
            ),
          );
        }
      }
      yield* Effect.tryPromise({
        try: () =>
          this.#lock.with(async () => {
            const next = await run(uploadBase(
              this.backend,
              { ...this.config, ...pickRuntime(config) },
              weights,
            ));
            const old = this.#base;
            this.#base = next;
            await run(Scope.close(old.scope, Exit.void));
          }),
        catch: (e) => internalError(`reload_weights failed: ${message(e)}`),
      });
    });
  }

  // ---- the worker ----------------------------------------------------------------------------

  async #workerLoop(): Promise<void> {
    while (!this.#closed) {
      const jobs = this.#takeBatch();
      if (!jobs) {
        await this.#signal.wait();
        continue;
      }
      await this.#lock.acquire();
      this.#active++;
      this.#running = jobs;
      try {
        const adapter = jobs[0].spec.adapter;
        if (adapter !== null && !this.#adapters.has(adapter)) {
          // unloaded after the request was accepted
          const gone = notFound(`The model \`${adapter}\` does not exist.`, "model");
          for (const j of jobs) j.reject(gone);
        } else {
          const results = await this.#runBatch(jobs);
          jobs.forEach((j, i) => j.resolve(results[i]));
        }
      } catch (e) {
        console.error(`lorafold serve: generation failed: ${message(e)}`);
        for (const j of jobs) j.reject(internalError(`generation failed: ${message(e)}`));
      } finally {
        this.#running = [];
        this.#active--;
        this.#lock.release();
        this.#signal.notify();
      }
      await macrotask();
    }
  }

  /** Admitted jobs for the head's model name, up to the batch size (FIFO otherwise). */
  #takeBatch(): Job[] | null {
    if (this.#paused === "keep") return null;
    const admitted = this.#queue.filter((j) => j.admitted);
    if (admitted.length === 0) return null;
    const model = admitted[0].spec.model;
    const out: Job[] = [];
    let seqs = 0;
    for (const j of admitted) {
      if (j.spec.model !== model) continue;
      const k = j.spec.prompts.length * j.spec.n;
      if (out.length > 0 && seqs + k > this.options.maxBatchSequences) break;
      out.push(j);
      seqs += k;
    }
    for (const j of out) this.#queue.splice(this.#queue.indexOf(j), 1);
    return out;
  }

  /** While paused with mode keep: gives the device lock back and waits for a change. */
  async #freezePoint(): Promise<void> {
    if (this.#paused !== "keep") return;
    this.#lock.release();
    while (this.#paused === "keep") await this.#signal.wait();
    await this.#lock.acquire();
  }

  /** Current weights for the batch's model name; null when the adapter was unloaded. */
  async #current(
    adapter: string | null,
  ): Promise<{ model: DeviceModel; lora: LoraRuntime | null } | null> {
    if (adapter === null) return { model: this.#base.model, lora: null };
    const lora = await this.#resident(adapter);
    return lora ? { model: this.#base.model, lora } : null;
  }

  #abortedResponse(spec: CompletionSpec): CompletionResponse {
    const empty: SeqResult = {
      tokens: [],
      logprobs: [],
      tops: [],
      finishReason: "abort",
      stopReason: null,
      stopText: null,
      stoppedByToken: false,
    };
    return renderCompletion(
      spec,
      this.tokenizer,
      spec.prompts.map(() => Array.from({ length: spec.n }, () => empty)),
      spec.prompts.map(() => null),
    );
  }

  /** Prefill of one prompt through the prefix cache (lock held). */
  async #prefill(
    ns: string,
    ids: readonly number[],
    cur: { model: DeviceModel; lora: LoraRuntime | null },
    lookup: boolean,
  ): Promise<PrefixEntry> {
    const hit = lookup ? this.prefixCache.lookup(ns, ids) : null;
    if (hit?.exact) return hit.entry;
    const c = cur.model.config;
    const L = ids.length;
    const kvdim = c.numKvHeads * c.headDim;
    const start = hit ? hit.entry.ids.length : 0;
    const backend = this.backend;
    const entry = await run(Effect.scoped(Effect.gen(function* () {
      const ops = yield* backend.ops;
      const fill = (src: FloatArray | undefined) => {
        if (!src || start === 0) return ops.zeros([L, kvdim]);
        const host = new Float32Array(L * kvdim);
        host.set(src.subarray(0, start * kvdim));
        return ops.fromArray(host, [L, kvdim]);
      };
      const cache: KvCache = {
        k: Array.from({ length: c.numLayers }, (_, l) => fill(hit?.entry.k[l])),
        v: Array.from({ length: c.numLayers }, (_, l) => fill(hit?.entry.v[l])),
        batch: 1,
        maxLen: L,
        len: start,
      };
      const logits = forwardCached(
        ops,
        cur.model,
        cache,
        ids.slice(start),
        L - start,
        [0],
        cur.lora,
      );
      const host = yield* ops.read([logits, ...cache.k, ...cache.v]);
      return {
        ns,
        ids: [...ids],
        logits: host[0],
        k: host.slice(1, 1 + c.numLayers),
        v: host.slice(1 + c.numLayers),
      } satisfies PrefixEntry;
    })));
    this.prefixCache.insert(entry);
    return entry;
  }

  /** Raw prompt scores (full forward, current weights; never cached). */
  async #promptScores(
    ids: readonly number[],
    k: number,
    cur: { model: DeviceModel; lora: LoraRuntime | null },
  ): Promise<PromptPosition[]> {
    const backend = this.backend;
    const host = await run(Effect.scoped(Effect.gen(function* () {
      const ops = yield* backend.ops;
      const { logits } = forward(ops, cur.model, { ids, batch: 1, seqLen: ids.length }, {
        lora: cur.lora,
      });
      return (yield* ops.read([logits]))[0];
    })));
    const V = cur.model.config.vocabSize;
    const out: PromptPosition[] = [];
    for (let i = 1; i < ids.length; i++) {
      const lp = logSoftmax(host.subarray((i - 1) * V, i * V));
      out.push({
        token: ids[i],
        logprob: lp[ids[i]],
        rank: rankOf(lp, ids[i]),
        top: topEntries(lp, k),
      });
    }
    return out;
  }

  async #runBatch(jobs: readonly Job[]): Promise<CompletionResponse[]> {
    const adapter = jobs[0].spec.adapter;
    const V = this.config.vocabSize;
    const mode = this.options.logprobsMode;
    // 1. prefill every distinct prompt once (prefix cache), prompt logprobs when asked
    const seqs: Seq[] = [];
    const scores: (PromptPosition[] | null)[][] = jobs.map((j) => j.spec.prompts.map(() => null));
    const fresh = new Map<string, PrefixEntry>();
    for (const [ji, job] of jobs.entries()) {
      const spec = job.spec;
      for (const [p, prompt] of spec.prompts.entries()) {
        if (job.aborted) break;
        const cur = await this.#current(adapter);
        if (!cur) {
          job.aborted = true;
          break;
        }
        const ns = prefixNamespace(spec.model, spec.cacheSalt);
        const key = `${ns}\u0000${prompt.ids.join(",")}`;
        // vLLM skips the prefix cache for requests asking for prompt logprobs
        const lookup = spec.promptLogprobs === null;
        let entry = lookup ? fresh.get(key) : undefined;
        if (!entry) {
          entry = await this.#prefill(ns, prompt.ids, cur, lookup);
          fresh.set(key, entry);
        }
        if (spec.promptLogprobs !== null) {
          scores[ji][p] = await this.#promptScores(prompt.ids, spec.promptLogprobs, cur);
        }
        for (let j = 0; j < spec.n; j++) {
          seqs.push({
            job,
            prompt: p,
            j,
            entry,
            rng: new Rng(spec.seed !== null ? spec.seed + j : this.#fallbackRng.nextU32()),
            tokens: [],
            logprobs: [],
            tops: [],
            done: false,
            finishReason: "length",
            stopReason: null,
            stopText: null,
            stoppedByToken: false,
            textLen: 0,
          });
        }
      }
    }
    // 2. decode all sequences together
    const B = seqs.length;
    if (B > 0) {
      const c = this.config;
      const P = Math.max(...seqs.map((s) => s.entry.ids.length));
      const maxNew = Math.max(...seqs.map((s) => s.job.spec.maxTokens));
      const maxLen = P + maxNew;
      const kvStart = seqs.map((s) => P - s.entry.ids.length);
      const batchScope = await run(Scope.make());
      try {
        const ops: Ops = await run(Scope.provide(batchScope)(this.backend.ops));
        const cache = makeKvCache(ops, c, B, maxLen);
        const kvdim = c.numKvHeads * c.headDim;
        const byEntry = new Map<PrefixEntry, number[]>();
        seqs.forEach((s, b) => byEntry.set(s.entry, [...(byEntry.get(s.entry) ?? []), b]));
        for (const [entry, members] of byEntry) {
          const L = entry.ids.length;
          for (let l = 0; l < c.numLayers; l++) {
            const kT = ops.fromArray(entry.k[l], [L, kvdim]);
            const vT = ops.fromArray(entry.v[l], [L, kvdim]);
            for (const b of members) {
              const rows = Array.from({ length: L }, (_, t) => b * maxLen + P - L + t);
              ops.scatterRowsInPlace(cache.k[l], kT, rows);
              ops.scatterRowsInPlace(cache.v[l], vT, rows);
            }
          }
        }
        cache.len = P;
        let rows: (b: number) => FloatArray = (b) => seqs[b].entry.logits;
        for (;;) {
          for (const s of seqs) if (!s.done && s.job.aborted) this.#finish(s, "abort", null);
          const next = new Int32Array(B);
          for (let b = 0; b < B; b++) {
            const s = seqs[b];
            if (s.done) continue;
            this.#sampleInto(s, rows(b), mode);
            next[b] = s.tokens[s.tokens.length - 1];
          }
          if (seqs.every((s) => s.done)) break;
          await maybeYield();
          await this.#freezePoint();
          for (const s of seqs) if (!s.done && s.job.aborted) this.#finish(s, "abort", null);
          if (seqs.every((s) => s.done)) break;
          const cur = await this.#current(adapter);
          if (!cur) {
            for (const s of seqs) if (!s.done) this.#finish(s, "abort", null);
            break;
          }
          const host = await run(Effect.scoped(Effect.gen({ self: this }, function* () {
            const sops = yield* this.backend.ops;
            const logits = forwardCached(sops, cur.model, cache, next, 1, kvStart, cur.lora);
            return (yield* sops.read([logits]))[0];
          })));
          rows = (b) => host.subarray(b * V, (b + 1) * V);
        }
      } finally {
        await run(Scope.close(batchScope, Exit.void));
      }
    }
    // 3. responses
    return jobs.map((job, ji) => {
      if (job.aborted && !seqs.some((s) => s.job === job)) return this.#abortedResponse(job.spec);
      const mine = seqs.filter((s) => s.job === job);
      const results: SeqResult[][] = job.spec.prompts.map((_, p) =>
        Array.from({ length: job.spec.n }, (_, j) => {
          const s = mine.find((x) => x.prompt === p && x.j === j);
          return s
            ? {
              tokens: s.tokens,
              logprobs: s.logprobs,
              tops: s.tops,
              finishReason: s.finishReason,
              stopReason: s.stopReason,
              stopText: s.stopText,
              stoppedByToken: s.stoppedByToken,
            }
            : {
              tokens: [],
              logprobs: [],
              tops: [],
              finishReason: "abort" as const,
              stopReason: null,
              stopText: null,
              stoppedByToken: false,
            };
        })
      );
      return renderCompletion(job.spec, this.tokenizer, results, scores[ji]);
    });
  }

  #finish(s: Seq, reason: "stop" | "length" | "abort", stopReason: number | string | null): void {
    s.done = true;
    s.finishReason = reason;
    s.stopReason = stopReason;
  }

  /** Samples the next token of `s` from its logits row and applies vLLM's stop rules. */
  #sampleInto(s: Seq, row: FloatArray, mode: LogprobsMode): void {
    const spec = s.job.spec;
    const stopIds = spec.eosId === null ? spec.stopTokenIds : [spec.eosId, ...spec.stopTokenIds];
    const banned = s.tokens.length < spec.minTokens ? [...stopIds, this.tokenizer.eosId] : [];
    const topN = spec.logprobs !== null && spec.logprobs > 0 ? spec.logprobs : null;
    const r = sampleStep(row, spec.sampling, s.rng, banned, mode, topN);
    s.tokens.push(r.token);
    s.logprobs.push(r.logprob);
    s.tops.push(r.top);
    if (spec.eosId !== null && r.token === spec.eosId) {
      s.stoppedByToken = true;
      return this.#finish(s, "stop", null);
    }
    if (spec.stopTokenIds.includes(r.token)) {
      s.stoppedByToken = true;
      return this.#finish(s, "stop", r.token);
    }
    if (spec.stop.length > 0) {
      // like vLLM: only text produced after min_tokens can match (look-back = stop length)
      const text = decodeIds(this.tokenizer, s.tokens, spec.skipSpecial);
      const newChars = text.length - s.textLen;
      s.textLen = text.length;
      const hit = s.tokens.length > spec.minTokens
        ? checkStopStrings(text, newChars, spec.stop, spec.includeStop)
        : null;
      if (hit) {
        s.stopText = hit.text;
        return this.#finish(s, "stop", hit.stop);
      }
    }
    if (s.tokens.length >= spec.maxTokens) this.#finish(s, "length", null);
  }
}

/** Requests refused because the engine is shutting down (503, like a dead vLLM engine). */
const shuttingDown = (): ApiError =>
  new ApiError({ status: 503, reason: "the engine is shutting down", param: null });

/** Runtime-only config fields a reload may change (rope theta, eps, eos ids). */
const pickRuntime = (c: ModelConfig): Partial<ModelConfig> => ({
  rmsNormEps: c.rmsNormEps,
  ropeTheta: c.ropeTheta,
});

/** Uploads base weights into a scope of their own (closed when they are replaced or at close). */
const uploadBase = (
  backend: BackendShape,
  config: ModelConfig,
  weights: WeightMap,
): Effect.Effect<Base> =>
  Effect.gen(function* () {
    const scope = yield* Scope.make();
    const model = yield* Scope.provide(scope)(
      Effect.map(backend.ops, (ops) => uploadModel(ops, config, weights)),
    );
    return { config, model, scope };
  });

/** Loads the model directory and tokenizer, uploads the weights, and starts the worker. */
export const makeInferenceEngine = (
  backend: BackendShape,
  options: InferenceEngineOptions,
): Effect.Effect<InferenceEngine, InferenceEngineStartError> =>
  Effect.gen(function* () {
    const modelDir = options.modelDir;
    const { config, weights } = yield* loadModel(modelDir).pipe(
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
    const base = yield* uploadBase(backend, config, weights);
    const engine = new InferenceEngine(backend, tokenizer, base, options);
    engine.start();
    return engine;
  });
