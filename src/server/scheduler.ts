/**
 * Continuous batching: ONE scheduler fiber owns generation. HTTP handlers `submit` a validated
 * request (it goes into the scheduler's mailbox, an Effect `Queue`) and await its `Deferred`.
 * At every token boundary the scheduler, holding the device `Semaphore` permit:
 *
 * 1. ends aborted sequences (pause mode=abort, shutdown) and answers aborted queued requests;
 * 2. retires finished sequences (stop_rules.ts) so their KV slots free at once, and answers every
 *    request whose sequences have all finished;
 * 3. admits waiting requests in arrival order while the running sequences stay within
 *    --max-num-seqs and the KV caches within the KV budget (a request is never split; with
 *    nothing running the first one is admitted whatever its size): each distinct prompt is
 *    prefilled once through the prefix cache, each sample draws its first token from the prefill
 *    logits, and the samples join their batch (batch.ts);
 * 4. runs one decode step of every batch and samples each running sequence.
 *
 * Batches are per adapter: the decoder applies ONE LoRA to a whole `forwardCached` call (no
 * per-sequence LoRA), so requests for different adapters (or the base model) decode in separate
 * batches, all stepped at every boundary. A batch holds at most --max-num-seqs sequences, so a
 * request larger than that (n up to --max-n-sequences) is admitted whole but decodes in several
 * batches, and no single forward call, sampling pass or response rendering holds the event loop
 * for long (the scheduler yields between them); at most --max-loras adapters run at once (a running
 * batch pins its adapter, adapters.ts). Each sequence has its own generator (seed + j) and attends
 * only its own KV rows, so its tokens and logprobs are the same alone or batched.
 *
 * Between boundaries the permit is free: adapter load/unload and weight reloads take it, so they
 * happen between two decode steps, and the next step runs with the current weights. The
 * scheduler yields to the event loop every few milliseconds of work so that HTTP requests are
 * served while it decodes. Pause modes: abort ends running and queued requests now
 * (finish_reason "abort"); wait lets them finish; keep freezes the running batches at the next
 * boundary. Requests arriving while paused wait for resume. The drained state is a `Latch`
 * (open when no admitted request is queued or running) that pause(wait|abort) awaits.
 * @module
 */
import { messageOf } from "../base/tagged_error.ts";
import {
  Cause,
  Deferred,
  Effect,
  Exit,
  Fiber,
  Latch,
  Queue,
  type Scope,
  type Semaphore,
} from "effect";
import type { BackendShape } from "../backend/backend.ts";
import { Rng } from "../model/rng.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import type { Adapter, AdapterRegistry } from "./adapters.ts";
import {
  type BatchMember,
  DecodeBatch,
  prefill,
  promptScores,
  shapeOf,
  type StepWeights,
} from "./batch.ts";
import {
  type CompletionSpec,
  type PromptPosition,
  renderChoice,
  renderCompletion,
  renderPromptLogprobs,
  type SeqResult,
  usageOf,
} from "./completion.ts";
import { type PrefixCache, type PrefixEntry, prefixNamespace } from "./prefix_cache.ts";
import type { LogprobsMode } from "./sampler.ts";
import {
  ApiError,
  type CompletionChoice,
  type CompletionResponse,
  internalError,
  notFound,
} from "./schemas.ts";
import {
  ABORTED,
  candidatesFor,
  finish,
  newSeq,
  sampleNext,
  sampleNextFromCandidates,
  sampleNextFromRow,
  seededRng,
  seqResult,
  type SeqState,
  stepUniform,
} from "./stop_rules.ts";
import type { ServedWeights } from "./weights.ts";

/** Pause modes of POST /pause. */
export type PauseMode = "abort" | "wait" | "keep";

/** What the scheduler reports to an observer (tests, traces); `step` counts token boundaries. */
export type SchedulerEvent =
  | { readonly kind: "admit"; readonly id: string; readonly step: number }
  | {
    readonly kind: "step";
    readonly step: number;
    /** Requests with a sequence decoded in this step, in admission order. */
    readonly ids: readonly string[];
    /** Sequences decoded in this step. */
    readonly seqs: number;
  }
  | { readonly kind: "finish"; readonly id: string; readonly step: number };

/** See `Scheduler.counters`. */
export interface SchedulerCounters {
  readonly promptTokens: number;
  readonly generationTokens: number;
  readonly kvRebuilds: number;
  readonly kvInPlaceJoins: number;
  /** Decode-step tokens sampled from device candidates (no logits row read back). */
  readonly deviceSampledTokens: number;
}

/** Scheduler settings. */
export interface SchedulerOptions {
  /** Sequences running at once, all batches together (--max-num-seqs). */
  readonly maxNumSeqs: number;
  /** KV-cache budget in bytes, all batches together. */
  readonly kvCacheBytes: number;
  readonly logprobsMode: LogprobsMode;
  /** Called synchronously on the scheduler fiber (keep it cheap; it must not throw). */
  readonly onEvent?: (e: SchedulerEvent) => void;
}

/** What the scheduler runs against. */
export interface SchedulerDeps {
  readonly backend: BackendShape;
  readonly tokenizer: Tokenizer;
  readonly weights: ServedWeights;
  readonly adapters: AdapterRegistry;
  readonly prefixCache: PrefixCache;
  /** The device permit: held by the scheduler during a boundary, by control operations. */
  readonly device: Semaphore.Semaphore;
}

/** One sequence of a request as a stream observer sees it (read-only). */
export interface SeqView {
  /** Index of its prompt in the request. */
  readonly prompt: number;
  /** Sample index within its prompt. */
  readonly j: number;
  readonly state: SeqState;
}

/**
 * Called on the scheduler fiber after every token boundary that advanced a streamed request
 * (keep it cheap; it must not throw): its sequences, in (prompt, j) order.
 */
export type ProgressObserver = (seqs: readonly SeqView[]) => void;

/** A request in the scheduler (opaque outside this module). */
export interface Job {
  readonly spec: CompletionSpec;
  readonly onProgress: ProgressObserver | null;
  readonly deferred: Deferred.Deferred<CompletionResponse, ApiError>;
  /** Submitted while not paused, or resumed since. */
  admitted: boolean;
  aborted: boolean;
  state: "queued" | "running" | "done";
  readonly seqs: Seq[];
  scores: (PromptPosition[] | null)[];
  /** Sequences not finished. */
  live: number;
}

interface Seq extends BatchMember {
  readonly job: Job;
  readonly prompt: number;
  readonly j: number;
}

interface Group {
  readonly adapter: Adapter | null;
  readonly batch: DecodeBatch<Seq>;
}

/** Requests refused because the engine is shutting down (503, like a dead vLLM engine). */
export const shuttingDown = (): ApiError =>
  new ApiError({ status: 503, reason: "the engine is shutting down", param: null });

const macrotask: Effect.Effect<void> = Effect.promise(() =>
  new Promise<void>((r) => setTimeout(r, 0))
);

/** The continuous-batching scheduler. `run` is its fiber's body (forked by the engine). */
export class Scheduler {
  readonly deps: SchedulerDeps;
  readonly options: SchedulerOptions;
  /** Arrivals (a job) and wake-ups (null) for the scheduler fiber. */
  readonly #mailbox: Queue.Queue<Job | null>;
  /** Open when no admitted request is queued or running (pause wait/abort awaits it). */
  readonly #drained: Latch.Latch;
  /** Every request not answered yet, in arrival order. */
  readonly #pending = new Set<Job>();
  /** Queued requests in arrival order (scheduler-owned). */
  #waiting: Job[] = [];
  /**
   * Running batches. A batch holds at most --max-num-seqs sequences (one forward call each, so
   * no single call holds the event loop for long): a request larger than that is admitted whole
   * but decodes in several batches of its adapter.
   */
  readonly #groups = new Set<Group>();
  readonly #fallbackRng = new Rng(crypto.getRandomValues(new Uint32Array(1))[0]);
  #paused: PauseMode | null = null;
  #closed = false;
  #step = 0;
  #promptTokens = 0;
  #generationTokens = 0;
  #rebuilds = 0;
  #deviceSampled = 0;
  #inPlaceJoins = 0;
  #lastYield = 0;
  #fiber: Fiber.Fiber<void> | null = null;

  /** Use `makeScheduler`. */
  constructor(
    deps: SchedulerDeps,
    options: SchedulerOptions,
    mailbox: Queue.Queue<Job | null>,
    drained: Latch.Latch,
  ) {
    this.deps = deps;
    this.options = options;
    this.#mailbox = mailbox;
    this.#drained = drained;
  }

  // ---- the HTTP side ---------------------------------------------------------------------------

  /**
   * Queues a validated request and waits for its response; `onProgress` (streaming) sees its
   * sequences after every boundary that advanced them; `cancel` (the client went away) aborts
   * it like vLLM does: its sequences end at the next boundary with finish_reason "abort".
   */
  submit(
    spec: CompletionSpec,
    onProgress: ProgressObserver | null = null,
    cancel: AbortSignal | null = null,
  ): Effect.Effect<CompletionResponse, ApiError> {
    return Effect.suspend(() => {
      if (this.#closed) return Effect.fail(shuttingDown());
      const job: Job = {
        spec,
        onProgress,
        deferred: Deferred.makeUnsafe<CompletionResponse, ApiError>(),
        admitted: this.#paused === null,
        aborted: false,
        state: "queued",
        seqs: [],
        scores: [],
        live: 0,
      };
      this.#pending.add(job);
      this.#syncDrained();
      Queue.offerUnsafe(this.#mailbox, job);
      cancel?.addEventListener("abort", () => {
        if (job.state === "done") return;
        job.aborted = true;
        this.#wake();
      }, { once: true });
      return Deferred.await(job.deferred);
    });
  }

  /** Whether generation is paused. */
  get paused(): boolean {
    return this.#paused !== null;
  }

  /** False once shutting down. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Requests running (frozen included) and waiting. */
  load(): { running: number; waiting: number } {
    let running = 0;
    let waiting = 0;
    for (const j of this.#pending) {
      if (j.state === "running") running++;
      else if (j.state === "queued") waiting++;
    }
    return { running, waiting };
  }

  /**
   * Counters for GET /metrics: tokens prefilled (prompts of admitted requests) and generated,
   * KV caches built (new batches, joins that did not fit, compactions), joins into free slots,
   * and decode tokens sampled on the device.
   */
  counters(): SchedulerCounters {
    return {
      promptTokens: this.#promptTokens,
      generationTokens: this.#generationTokens,
      kvRebuilds: this.#rebuilds,
      kvInPlaceJoins: this.#inPlaceJoins,
      deviceSampledTokens: this.#deviceSampled,
    };
  }

  /** Whether requests hold KV state (then reset_prefix_cache does nothing, like vLLM). */
  get busy(): boolean {
    return this.load().running > 0;
  }

  /**
   * POST /pause. abort: running and queued requests end at the next boundary with finish_reason
   * "abort"; wait: they run to completion; both return once drained, and with `clearCache` reset
   * the prefix cache then. keep: the running batches freeze at the next boundary (returns at
   * once). Requests arriving while paused wait for resume.
   */
  pause(mode: PauseMode, clearCache: boolean): Effect.Effect<void> {
    return Effect.suspend(() => {
      this.#paused = mode;
      if (mode === "abort") {
        for (const j of this.#pending) if (j.admitted) j.aborted = true;
      }
      this.#wake();
      if (mode === "keep") return Effect.void;
      return this.#drained.await.pipe(
        Effect.andThen(Effect.sync(() => {
          if (clearCache && this.#paused === mode) this.deps.prefixCache.reset();
        })),
      );
    });
  }

  /** POST /resume. */
  resume(): Effect.Effect<void> {
    return Effect.sync(() => {
      this.#paused = null;
      for (const j of this.#pending) j.admitted = true;
      this.#syncDrained();
      this.#wake();
    });
  }

  // ---- lifetime --------------------------------------------------------------------------------

  /** Forks the scheduler fiber into the current scope (once). */
  start(): Effect.Effect<void, never, Scope.Scope> {
    return Effect.gen({ self: this }, function* () {
      if (this.#fiber) return;
      this.#fiber = yield* Effect.forkScoped(this.run());
    });
  }

  /**
   * Shutdown: queued requests get 503, running ones end at the next boundary as aborted (their
   * responses are sent), then the fiber ends and the KV caches are released. Idempotent.
   */
  close(): Effect.Effect<void> {
    return Effect.gen({ self: this }, function* () {
      if (!this.#closed) {
        this.#closed = true;
        for (const j of this.#pending) {
          if (j.state === "queued") this.#fail(j, shuttingDown());
          else j.aborted = true;
        }
        this.#paused = null; // unfreezes batches held by pause(keep); they end as aborted
        this.#syncDrained();
        this.#wake();
      }
      if (this.#fiber) yield* Fiber.await(this.#fiber);
    });
  }

  /** The scheduler loop (ends after `close`). */
  run(): Effect.Effect<void> {
    return Effect.gen({ self: this }, function* () {
      for (;;) {
        this.#deliver(yield* Queue.clear(this.#mailbox));
        if (this.#hasWork()) {
          yield* this.deps.device.withPermit(this.#boundary());
          if (performance.now() - this.#lastYield >= 5) {
            yield* macrotask;
            this.#lastYield = performance.now();
          }
          continue;
        }
        if (this.#closed) break;
        this.#deliver([yield* Queue.take(this.#mailbox)]);
      }
      yield* this.deps.device.withPermit(Effect.gen({ self: this }, function* () {
        for (const g of [...this.#groups]) yield* this.#dropGroup(g);
      }));
    }).pipe(
      Effect.catchCause((cause) =>
        Effect.sync(() => {
          // interrupted (its scope closed without `close`), or a bug: answer everyone
          if (!Cause.hasInterruptsOnly(cause)) {
            console.error(`lorafold serve: the scheduler stopped: ${Cause.pretty(cause)}`);
          }
          this.#closed = true;
          for (const j of this.#pending) this.#fail(j, internalError("the scheduler stopped"));
          this.#syncDrained();
        })
      ),
    );
  }

  // ---- the scheduler fiber ---------------------------------------------------------------------

  #wake(): void {
    Queue.offerUnsafe(this.#mailbox, null);
  }

  #deliver(msgs: readonly (Job | null)[]): void {
    for (const m of msgs) if (m) this.#waiting.push(m);
    this.#waiting = this.#waiting.filter((j) => j.state === "queued");
  }

  #syncDrained(): void {
    let busy = false;
    for (const j of this.#pending) {
      if (j.admitted) {
        busy = true;
        break;
      }
    }
    if (busy) this.#drained.closeUnsafe();
    else this.#drained.openUnsafe();
  }

  #runningSeqs(): number {
    let n = 0;
    for (const g of this.#groups.values()) n += g.batch.members.length;
    return n;
  }

  /** Something to do at a boundary now (not frozen, and something running or admissible). */
  #hasWork(): boolean {
    if (this.#groups.size > 0 && this.#paused !== "keep") return true;
    if (this.#closed || this.#paused === "keep") return false;
    return this.#waiting.some((j) => j.admitted);
  }

  /** Gives the event loop a turn after a few milliseconds of work (HTTP stays responsive). */
  #breathe(): Effect.Effect<void> {
    return Effect.suspend(() => {
      if (performance.now() - this.#lastYield < 5) return Effect.void;
      return macrotask.pipe(Effect.andThen(Effect.sync(() => {
        this.#lastYield = performance.now();
      })));
    });
  }

  #emit(e: SchedulerEvent): void {
    this.options.onEvent?.(e);
  }

  #progress(job: Job): void {
    if (!job.onProgress || job.state !== "running") return;
    try {
      job.onProgress(job.seqs);
    } catch (e) {
      console.error("lorafold serve: a stream observer failed:", e);
    }
  }

  #answer(job: Job, response: CompletionResponse): void {
    job.state = "done";
    this.#pending.delete(job);
    Deferred.doneUnsafe(job.deferred, Exit.succeed(response));
    this.#emit({ kind: "finish", id: job.spec.id, step: this.#step });
  }

  #fail(job: Job, e: ApiError): void {
    job.state = "done";
    this.#pending.delete(job);
    Deferred.doneUnsafe(job.deferred, Exit.fail(e));
  }

  #abortedResponse(spec: CompletionSpec): CompletionResponse {
    return renderCompletion(
      spec,
      this.deps.tokenizer,
      spec.prompts.map(() => Array.from({ length: spec.n }, () => ABORTED)),
      spec.prompts.map(() => null),
    );
  }

  /** The response of a finished request, rendered in slices (the event loop gets turns). */
  #render(job: Job): Effect.Effect<CompletionResponse> {
    return Effect.gen({ self: this }, function* () {
      const spec = job.spec;
      const tok = this.deps.tokenizer;
      const results: SeqResult[][] = spec.prompts.map(() => []);
      for (const s of job.seqs) results[s.prompt][s.j] = seqResult(s.state);
      const choices: CompletionChoice[] = [];
      let k = 0;
      for (const [p, row] of results.entries()) {
        const scores = job.scores[p] ?? null;
        const promptLogprobs = renderPromptLogprobs(spec, tok, scores);
        for (const [j, r] of row.entries()) {
          choices.push(renderChoice(spec, tok, p, j, r, scores, promptLogprobs));
          if ((++k & 127) === 0) yield* this.#breathe();
        }
      }
      return {
        id: spec.id,
        object: "text_completion",
        created: spec.created,
        model: spec.model,
        choices,
        usage: usageOf(spec, results),
      } satisfies CompletionResponse;
    });
  }

  #weightsOf(g: { readonly adapter: Adapter | null }): StepWeights {
    return {
      model: this.deps.weights.current.model,
      lora: g.adapter ? this.deps.adapters.runtime(g.adapter) : null,
    };
  }

  /** One token boundary (device permit held). */
  #boundary(): Effect.Effect<void> {
    return Effect.gen({ self: this }, function* () {
      this.#step++;
      const frozen = this.#paused === "keep";
      // 1. aborts
      for (const j of this.#waiting) if (j.aborted) this.#answer(j, this.#abortedResponse(j.spec));
      this.#waiting = this.#waiting.filter((j) => j.state === "queued");
      for (const g of this.#groups.values()) {
        for (const m of g.batch.members) {
          if (m.job.aborted && !m.state.done) finish(m.state, "abort");
        }
      }
      // 2. leaves
      yield* this.#retire();
      // 3. joins
      const joining = new Map<Group, Seq[]>();
      if (!frozen && !this.#closed) yield* this.#admit(joining);
      for (const g of [...this.#groups]) {
        const exit = yield* Effect.exit(g.batch.join(joining.get(g) ?? []));
        yield* this.#breathe();
        if (Exit.isFailure(exit)) yield* this.#failGroup(g, exit.cause);
        else if (exit.value === "closed") yield* this.#dropGroup(g);
        else if (exit.value === "rebuilt") this.#rebuilds++;
        else if (exit.value === "in-place") this.#inPlaceJoins++;
      }
      // 4. one decode step of every batch
      if (!frozen) {
        const ids = new Set<string>();
        let seqs = 0;
        for (const g of [...this.#groups]) {
          yield* this.#breathe();
          // each live sequence's uniform of this step, drawn once for whichever path samples it
          const us = new Map<Seq, number>();
          for (const m of g.batch.members) if (!m.state.done) us.set(m, stepUniform(m.state));
          const tok = this.deps.tokenizer;
          const mode = this.options.logprobsMode;
          const V = this.deps.weights.config.vocabSize;
          const exit = yield* Effect.exit(g.batch.step(this.#weightsOf(g), {
            need: (m) => candidatesFor(m.state, tok, V, mode),
            temperature: (m) => m.state.spec.sampling.temperature,
            take: (m, c, n) => sampleNextFromCandidates(m.state, c, n, us.get(m)!, tok, mode),
          }));
          if (Exit.isFailure(exit)) {
            yield* this.#failGroup(g, exit.cause);
            continue;
          }
          const streamed = new Set<Job>();
          let k = 0;
          const count = (m: Seq) => {
            this.#generationTokens++;
            seqs++;
            ids.add(m.job.spec.id);
            if (m.job.onProgress) streamed.add(m.job);
          };
          for (const m of exit.value.sampled) count(m);
          this.#deviceSampled += exit.value.sampled.length;
          for (const [m, row] of exit.value.rows) {
            sampleNextFromRow(m.state, row, us.get(m)!, tok, mode);
            count(m);
            if ((++k & 63) === 0) yield* this.#breathe();
          }
          for (const j of streamed) this.#progress(j);
        }
        if (ids.size > 0) this.#emit({ kind: "step", step: this.#step, ids: [...ids], seqs });
        yield* this.#retire();
      }
      this.#syncDrained();
    });
  }

  /** Finished sequences leave their batches; requests with every sequence finished are answered. */
  #retire(): Effect.Effect<void> {
    return Effect.gen({ self: this }, function* () {
      const finished: Job[] = [];
      for (const g of this.#groups.values()) {
        for (const m of g.batch.leave()) if (--m.job.live === 0) finished.push(m.job);
      }
      for (const job of finished) {
        this.#progress(job);
        const response = yield* this.#render(job);
        if (job.state !== "done") this.#answer(job, response);
      }
    });
  }

  /** A running batch of `adapter` with room for more sequences, or null. */
  #openGroup(adapter: Adapter | null, joining: Map<Group, Seq[]>): Group | null {
    for (const g of this.#groups) {
      if (g.adapter !== adapter) continue;
      if (g.batch.members.length + (joining.get(g)?.length ?? 0) < this.options.maxNumSeqs) {
        return g;
      }
    }
    return null;
  }

  /** A new, empty batch of `adapter` (pinning it); null when no adapter slot is free. */
  #newGroup(adapter: Adapter | null): Effect.Effect<Group | null> {
    return Effect.gen({ self: this }, function* () {
      if (adapter && !(yield* this.deps.adapters.pin(adapter))) return null;
      const g: Group = {
        adapter,
        batch: new DecodeBatch<Seq>(this.deps.backend, this.deps.weights.config),
      };
      this.#groups.add(g);
      return g;
    });
  }

  /** Admits waiting requests (FIFO) into `joining`, per batch. */
  #admit(joining: Map<Group, Seq[]>): Effect.Effect<void> {
    return Effect.gen({ self: this }, function* () {
      const { maxNumSeqs, kvCacheBytes } = this.options;
      let running = this.#runningSeqs();
      const fresh = new Map<string, PrefixEntry>();
      for (const job of [...this.#waiting]) {
        if (!job.admitted || job.state !== "queued") continue;
        yield* this.#breathe();
        const spec = job.spec;
        let adapter: Adapter | null = null;
        if (spec.adapter !== null) {
          const a = this.deps.adapters.get(spec.adapter);
          if (!a) {
            // unloaded after the request was accepted
            this.#fail(job, notFound(`The model \`${spec.adapter}\` does not exist.`, "model"));
            continue;
          }
          adapter = a;
        }
        const k = spec.prompts.length * spec.n;
        const first = running === 0;
        if (!first && running + k > maxNumSeqs) break;
        const hasBatch = [...this.#groups].some((h) => h.adapter === adapter);
        if (!hasBatch && adapter && !this.deps.adapters.canPin(adapter)) continue; // wait for a slot
        // the KV budget, counting the rebuilt cache this request would cause
        const shapes = spec.prompts.flatMap((p) =>
          Array.from({ length: spec.n }, () => ({ rows: p.ids.length, remaining: spec.maxTokens }))
        );
        if (!first) {
          // the caches after the joins, the open batch of this adapter counted as rebuilt
          const open = this.#openGroup(adapter, joining);
          let bytes = 0;
          for (const h of this.#groups) if (h !== open) bytes += h.batch.bytes;
          const target = open?.batch ??
            new DecodeBatch<Seq>(this.deps.backend, this.deps.weights.config);
          const before = (open ? joining.get(open) ?? [] : []).map(shapeOf);
          if (bytes + target.bytesWith([...before, ...shapes]) > kvCacheBytes) break;
        }
        let g = this.#openGroup(adapter, joining);
        if (!g) g = yield* this.#newGroup(adapter);
        if (!g) continue;
        const exit = yield* Effect.exit(this.#start(job, g, fresh));
        if (Exit.isFailure(exit)) {
          const why = messageOf(Cause.squash(exit.cause));
          console.error(`lorafold serve: prefill failed: ${Cause.pretty(exit.cause)}`);
          this.#fail(job, internalError(`generation failed: ${why}`));
          continue;
        }
        running += k;
        // the live sequences fill the open batch, then new batches of at most --max-num-seqs
        for (const s of job.seqs) {
          if (s.state.done) continue;
          let target: Group | null = this.#groups.has(g) &&
              g.batch.members.length + (joining.get(g)?.length ?? 0) < maxNumSeqs
            ? g
            : this.#openGroup(adapter, joining);
          if (!target) target = yield* this.#newGroup(adapter);
          if (!target) {
            // unreachable: the adapter is pinned by `g` already
            this.#fail(job, internalError("no adapter slot for a running request"));
            break;
          }
          g = target;
          const list = joining.get(g);
          if (list) list.push(s);
          else joining.set(g, [s]);
        }
      }
      this.#waiting = this.#waiting.filter((j) => j.state === "queued");
    });
  }

  /** Prefills a request's prompts and samples each sequence's first token. */
  #start(job: Job, g: Group, fresh: Map<string, PrefixEntry>): Effect.Effect<void, unknown> {
    return Effect.gen({ self: this }, function* () {
      const spec = job.spec;
      const w = this.#weightsOf(g);
      const ns = prefixNamespace(spec.model, spec.cacheSalt);
      // vLLM skips the prefix cache for requests asking for prompt logprobs
      const lookup = spec.promptLogprobs === null;
      const seqs: Seq[] = [];
      const scores: (PromptPosition[] | null)[] = [];
      for (const [p, prompt] of spec.prompts.entries()) {
        const key = `${ns}\u0000${prompt.ids.join(",")}`;
        let entry = lookup ? fresh.get(key) : undefined;
        if (!entry) {
          entry = yield* prefill(
            this.deps.backend,
            this.deps.prefixCache,
            ns,
            prompt.ids,
            w,
            lookup,
          );
          fresh.set(key, entry);
        }
        scores.push(
          spec.promptLogprobs !== null
            ? yield* promptScores(this.deps.backend, prompt.ids, spec.promptLogprobs, w)
            : null,
        );
        for (let j = 0; j < spec.n; j++) {
          const rng = spec.seed !== null
            ? seededRng(spec.seed, j)
            : new Rng(this.#fallbackRng.nextU32());
          seqs.push({ job, prompt: p, j, prefill: entry, state: newSeq(spec, rng, prompt.ids) });
        }
        yield* this.#breathe();
      }
      if (job.state !== "queued") return; // failed by a shutdown meanwhile
      job.state = "running";
      job.scores = scores;
      for (const s of seqs) job.seqs.push(s);
      job.live = seqs.length;
      this.#emit({ kind: "admit", id: spec.id, step: this.#step });
      for (const p of spec.prompts) this.#promptTokens += p.ids.length;
      let k = 0;
      for (const s of seqs) {
        sampleNext(s.state, s.prefill.logits, this.deps.tokenizer, this.options.logprobsMode);
        this.#generationTokens++;
        if (s.state.done) job.live--;
        if ((++k & 63) === 0) yield* this.#breathe();
      }
      if (job.live === 0) this.#answer(job, yield* this.#render(job));
      else this.#progress(job);
    });
  }

  /** A batch failed on the device: its requests get 500, its cache is released. */
  #failGroup(g: Group, cause: Cause.Cause<unknown>): Effect.Effect<void> {
    return Effect.suspend(() => {
      const why = messageOf(Cause.squash(cause));
      console.error(`lorafold serve: generation failed: ${Cause.pretty(cause)}`);
      for (const m of g.batch.members) {
        if (m.job.state !== "done") this.#fail(m.job, internalError(`generation failed: ${why}`));
      }
      return this.#dropGroup(g);
    });
  }

  #dropGroup(g: Group): Effect.Effect<void> {
    return Effect.gen({ self: this }, function* () {
      this.#groups.delete(g);
      yield* g.batch.close();
      if (g.adapter) yield* this.deps.adapters.unpin(g.adapter);
    });
  }
}

/** A scheduler (not started: `start` forks its fiber). */
export const makeScheduler = (
  deps: SchedulerDeps,
  options: SchedulerOptions,
): Effect.Effect<Scheduler> =>
  Effect.gen(function* () {
    const mailbox = yield* Queue.unbounded<Job | null>();
    const drained = yield* Latch.make(true);
    return new Scheduler(deps, options, mailbox, drained);
  });
