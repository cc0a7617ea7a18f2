/**
 * Run-time detection of "the engine serves other weights than the ones we trained": after every
 * push, a fixed probe prompt is completed greedily by the engine (temperature 0, a few tokens,
 * logprobs 0, return_token_ids, the new version's model name and cache_salt) and the engine's
 * log-probs of its tokens are compared with the trainer's log-probs of the same tokens, computed
 * from the pushed Snapshot on the trainer's Backend (forward, log_softmax at temperature 1: vLLM
 * reports raw log-probs, and at temperature 0 both of its modes agree). |diff| mean and max go
 * into the PushReport; a max beyond tolerance fails the push with SyncMismatch (policy "fail") or
 * logs a warning ("warn").
 * @module
 */
import { Effect } from "effect";
import type { BackendShape } from "../backend/backend.ts";
import type { BackendError } from "../backend/ops.ts";
import type { FloatArray } from "../backend/tensor.ts";
import { forward } from "../model/decoder.ts";
import { logSoftmax } from "../model/sampling.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import { SyncError, SyncMismatch } from "../ports/push_target.ts";
import {
  CLAMPED_LOGPROB,
  decodeCompletion,
  describeHttpError,
  explicitCompletionFields,
  type VllmClient,
  type VllmHttpError,
} from "../vllm/client.ts";
import { type Snapshot, snapshotModel } from "../snapshot/snapshot.ts";
import type { Route } from "../vllm/routing.ts";

// ---- the probe --------------------------------------------------------------------------------

/** Verification settings (TrainConfig's verify / verifyTolerance plus the probe). */
export interface VerifySettings {
  readonly policy: "fail" | "warn" | "off";
  /** Largest accepted |engine logp - trainer logp|. */
  readonly tolerance: number;
  /** Token ids of the probe prompt (BOS included when the model uses one). */
  readonly probePrompt: readonly number[];
  /** Tokens the engine generates for the probe (EOS ignored, so exactly this many). */
  readonly probeTokens: number;
  /** The trainer's side of the comparison (default {@link trainerLogProbs}; see {@link makeTrainerProbeCache}). */
  readonly trainer?: TrainerLogProbs;
}

/** The trainer's log-probs of a completion under a snapshot's weights. */
export type TrainerLogProbs = (
  backend: BackendShape,
  snapshot: Snapshot,
  prompt: readonly number[],
  completion: readonly number[],
) => Effect.Effect<number[], BackendError>;

/** The default probe prompt: BOS + "57+38=" when the tokenizer can encode it, else a few ids. */
export const defaultProbePrompt = (tok: Tokenizer): number[] => {
  const bos = tok.bosId === null ? [] : [tok.bosId];
  try {
    return [...bos, ...tok.encode("57+38=")];
  } catch {
    const ids = Array.from({ length: 6 }, (_, i) => (3 + i) % tok.vocabSize);
    return [...bos, ...ids];
  }
};

/** The engine's greedy completion of a prompt and the logprobs of its tokens. */
export interface ProbeAnswer {
  readonly tokens: readonly number[];
  /** NaN where the engine sent vLLM's clamp value (-9999.0 for -inf) or no logprob at all. */
  readonly logprobs: readonly number[];
}

/**
 * |trainer - engine| of one probe token. An unknown engine value (NaN: vLLM clamped -inf to
 * -9999.0) is not compared as a number: it agrees only with a trainer logprob that is itself at
 * or below the clamp (both say "impossible"), and is an unbounded disagreement otherwise.
 */
export const probeTokenDiff = (trainer: number, engine: number): number => {
  if (Number.isNaN(engine)) return trainer <= CLAMPED_LOGPROB ? 0 : Infinity;
  const d = Math.abs(trainer - engine);
  return Number.isFinite(d) ? d : Infinity;
};

/** Asks the engine for the probe completion on `route` (model name and cache_salt). */
export const probeEngine = (
  client: VllmClient,
  route: Route,
  prompt: readonly number[],
  maxTokens: number,
): Effect.Effect<ProbeAnswer, VllmHttpError> =>
  client.postJson("/v1/completions", {
    model: route.model,
    prompt: [...prompt],
    n: 1,
    max_tokens: maxTokens,
    ...explicitCompletionFields,
    temperature: 0,
    top_p: 1,
    top_k: -1,
    seed: 0,
    ignore_eos: true,
    stop_token_ids: [],
    skip_special_tokens: false,
    cache_salt: route.cacheSalt,
  }, { idempotent: true }).pipe(
    Effect.flatMap((j) => decodeCompletion(j)),
    Effect.map((choices) => {
      const c = choices.find((x) => x.index === 0);
      return {
        tokens: c?.tokens ?? [],
        logprobs: (c?.logprobs ?? []).map((x) => (x === null ? NaN : x)),
      };
    }),
  );

/**
 * The trainer's log-probs of `completion` after `prompt` under the snapshot's weights, one
 * forward pass and log_softmax at temperature 1 of the rows that predict the completion tokens.
 * A LoRA snapshot runs on the resident base with its adapter applied at run time (nothing of the
 * model is uploaded); a full snapshot's weights are uploaded for this call.
 */
export const trainerLogProbs: (
  backend: BackendShape,
  snapshot: Snapshot,
  prompt: readonly number[],
  completion: readonly number[],
) => Effect.Effect<number[], BackendError> = Effect.fn("trainerLogProbs")(
  function* (
    backend: BackendShape,
    snapshot: Snapshot,
    prompt: readonly number[],
    completion: readonly number[],
  ) {
    if (completion.length === 0) return [];
    const rows = completion.map((_, j) => prompt.length - 1 + j);
    const host = yield* snapshotLogits(backend, snapshot, [...prompt, ...completion], rows);
    const V = snapshot.config.vocabSize;
    return completion.map((t, j) => logSoftmax(host.subarray(j * V, (j + 1) * V))[t]);
  },
);

/**
 * One forward pass of `ids` under the snapshot's weights (a LoRA snapshot on the resident base
 * with its adapter applied at run time), the logits of `rows` read back ([rows, vocab]).
 */
const snapshotLogits = (
  backend: BackendShape,
  snapshot: Snapshot,
  ids: readonly number[],
  rows: readonly number[],
): Effect.Effect<FloatArray, BackendError> =>
  Effect.scoped(Effect.gen(function* () {
    const { model, lora } = yield* snapshotModel(snapshot, backend);
    const ops = yield* backend.ops;
    const { logits } = forward(
      ops,
      model,
      { ids: [...ids], batch: 1, seqLen: ids.length, logitRows: [...rows] },
      { lora },
    );
    const [host] = yield* ops.read([logits]);
    return host;
  }));

/** The trainer's greedy continuation of a probe prompt, with its log-probs when known. */
export interface GreedyProbe {
  readonly tokens: readonly number[];
  /** As {@link trainerLogProbs} computes them for these tokens (the same forward pass); null when not computed. */
  readonly logprobs: readonly number[] | null;
}

/**
 * The trainer's greedy continuation of `prompt` under the snapshot's weights (`n` tokens, EOS not
 * special, the lowest id on a tie): what an engine serving the snapshot answers the probe.
 * `guess` (e.g. the previous snapshot's continuation: one optimizer step rarely changes it) is
 * checked in one forward pass — a guessed token that is the argmax after the tokens before it is
 * the greedy token — and decoding goes on from the first token that differs, so a right guess
 * costs one forward pass instead of `n`; that pass is exactly {@link trainerLogProbs}'s, so its
 * log-probs come with it.
 */
export const trainerGreedyProbe: (
  backend: BackendShape,
  snapshot: Snapshot,
  prompt: readonly number[],
  n: number,
  guess?: readonly number[],
) => Effect.Effect<GreedyProbe, BackendError> = Effect.fn("trainerGreedyProbe")(
  function* (
    backend: BackendShape,
    snapshot: Snapshot,
    prompt: readonly number[],
    n: number,
    guess: readonly number[] = [],
  ) {
    const V = snapshot.config.vocabSize;
    const tokens: number[] = [];
    let logprobs: number[] | null = null;
    while (tokens.length < n) {
      const from = tokens.length;
      const cand = [...tokens, ...guess.slice(from, n)];
      // rows predicting continuation positions from..last (one past the candidates if short)
      const last = Math.min(n - 1, cand.length);
      const rows = Array.from({ length: last - from + 1 }, (_, j) => prompt.length - 1 + from + j);
      const host = yield* snapshotLogits(backend, snapshot, [...prompt, ...cand], rows);
      const picked: number[] = [];
      for (let j = from; j <= last; j++) {
        const row = host.subarray((j - from) * V, (j - from + 1) * V);
        let best = 0;
        for (let v = 1; v < V; v++) if (row[v] > row[best]) best = v;
        tokens.push(best);
        picked.push(logSoftmax(row)[best]);
        if (j < cand.length && best !== cand[j]) break; // later rows follow a wrong token
      }
      // the whole guess held in the first pass: that pass was trainerLogProbs(prompt, tokens)
      if (from === 0 && cand.length === n && tokens.every((t, j) => t === cand[j])) {
        logprobs = picked;
      }
    }
    return { tokens, logprobs };
  },
);

/**
 * The trainer's side of verification, computed once per snapshot and completion: replicas that
 * answer the probe alike (they serve the same weights) share one forward pass, and `prime`
 * computes it ahead for the answer an engine serving the snapshot gives (the trainer's greedy
 * continuation), so that a push, once the engine answers, compares without waiting for the
 * trainer's device (busy with the next update in asynchronous GRPO). Another answer is computed
 * when it comes, exactly as without the cache. Keeps the entries of the newest `snapshots`
 * snapshots (default 4).
 */
export interface TrainerProbeCache {
  readonly trainer: TrainerLogProbs;
  prime(
    backend: BackendShape,
    snapshot: Snapshot,
    settings: VerifySettings,
  ): Effect.Effect<void, BackendError>;
}

/** Makes a {@link TrainerProbeCache}. */
export const makeTrainerProbeCache = (snapshots = 4): TrainerProbeCache => {
  // per snapshot digest (insertion order = age), per probe completion
  const memo = new Map<string, Map<string, Effect.Effect<number[], BackendError>>>();
  const entriesOf = (snapshot: Snapshot) => {
    let entries = memo.get(snapshot.digest);
    if (!entries) {
      entries = new Map();
      memo.set(snapshot.digest, entries);
      // a push of an older snapshot may still be verifying while the newest is primed
      while (memo.size > snapshots) memo.delete(memo.keys().next().value!);
    }
    return entries;
  };
  const keyOf = (prompt: readonly number[], completion: readonly number[]) =>
    `${prompt.join(",")}|${completion.join(",")}`;
  const trainer: TrainerLogProbs = (backend, snapshot, prompt, completion) =>
    Effect.suspend(() => {
      const entries = entriesOf(snapshot);
      const key = keyOf(prompt, completion);
      const known = entries.get(key);
      if (known) return known;
      const cell = entries;
      return Effect.flatMap(
        Effect.cached(trainerLogProbs(backend, snapshot, prompt, completion)),
        (once) => {
          cell.set(key, once);
          return once;
        },
      );
    });
  let guess: readonly number[] = [];
  const prime = (backend: BackendShape, snapshot: Snapshot, settings: VerifySettings) =>
    settings.policy === "off" ? Effect.void : Effect.flatMap(
      trainerGreedyProbe(backend, snapshot, settings.probePrompt, settings.probeTokens, guess),
      (g) => {
        guess = g.tokens;
        if (g.logprobs === null) {
          return Effect.asVoid(trainer(backend, snapshot, settings.probePrompt, g.tokens));
        }
        entriesOf(snapshot).set(
          keyOf(settings.probePrompt, g.tokens),
          Effect.succeed([...g.logprobs]),
        );
        return Effect.void;
      },
    );
  return { trainer, prime };
};

/** |diff| statistics of a verified push. */
export interface VerifyOutcome {
  readonly mean: number;
  readonly max: number;
  readonly tokens: readonly number[];
  readonly engineLogp: readonly number[];
  readonly trainerLogp: readonly number[];
}

/**
 * Verifies that the engine serves `snapshot` on `route`. Returns null when verification is off.
 * A probe that cannot be run is a SyncError; a difference beyond tolerance is a SyncMismatch
 * (policy "fail") or a logged warning (policy "warn", the outcome is returned).
 */
export const verifyRoute: (
  client: VllmClient,
  backend: BackendShape,
  snapshot: Snapshot,
  route: Route,
  settings: VerifySettings,
  target: string,
) => Effect.Effect<VerifyOutcome | null, SyncError | SyncMismatch> = Effect.fn("verifyRoute")(
  function* (
    client: VllmClient,
    backend: BackendShape,
    snapshot: Snapshot,
    route: Route,
    settings: VerifySettings,
    target: string,
  ): Effect.fn.Return<VerifyOutcome | null, SyncError | SyncMismatch> {
    if (settings.policy === "off") return null;
    const version = snapshot.version;
    const syncError = (reason: string, cause?: unknown) =>
      new SyncError({ target, version, reason, cause });
    const answer = yield* probeEngine(client, route, settings.probePrompt, settings.probeTokens)
      .pipe(
        Effect.mapError((e) =>
          syncError(`verification probe of v${version} failed: ${describeHttpError(e)}`, e)
        ),
      );
    if (answer.tokens.length === 0) {
      return yield* Effect.fail(
        syncError(`verification probe of v${version}: the engine generated no tokens`),
      );
    }
    const trainerSide = settings.trainer ?? trainerLogProbs;
    const trainer = yield* trainerSide(backend, snapshot, settings.probePrompt, answer.tokens)
      .pipe(
        Effect.mapError((e) =>
          syncError(`verification of v${version}: trainer forward failed: ${e.message}`, e)
        ),
      );
    const diffs = trainer.map((t, i) => probeTokenDiff(t, answer.logprobs[i]));
    const max = Math.max(...diffs);
    const mean = diffs.reduce((a, b) => a + b, 0) / diffs.length;
    const outcome: VerifyOutcome = {
      mean,
      max,
      tokens: answer.tokens,
      engineLogp: answer.logprobs,
      trainerLogp: trainer,
    };
    if (max <= settings.tolerance) return outcome;
    const mismatch = new SyncMismatch({
      target,
      version,
      pushKind: route.kind,
      model: route.model,
      cacheSalt: route.cacheSalt,
      maxAbsDiff: max,
      meanAbsDiff: mean,
      tolerance: settings.tolerance,
      tokens: answer.tokens,
    });
    if (settings.policy === "warn") {
      yield* Effect.logWarning(`verify: ${mismatch.message}`);
      return outcome;
    }
    return yield* Effect.fail(mismatch);
  },
);
