/**
 * The services a GRPO pipeline runs against, provided by Layers: where rollouts come from
 * (RolloutEngine) and where snapshots go (SyncTarget). The Backend service lives in
 * src/backend/backend.ts.
 * @module
 */
import type { TaggedErrorClass } from "../base/tagged_error.ts";
import { Context, Data, type Effect } from "effect";
import type { Snapshot } from "../snapshot/snapshot.ts";

/** One prompt to complete `n` times (vLLM /v1/completions semantics). */
export interface RolloutRequest {
  readonly prompt: readonly number[];
  readonly n: number;
  readonly maxTokens: number;
  readonly temperature: number;
  readonly topP: number;
  readonly topK: number;
  /** Sample j of the request uses seed + j (vLLM); null = engine's choice. */
  readonly seed: number | null;
  readonly stopTokenIds: readonly number[];
}

/** One sampled completion with the engine's log-probs of its tokens. */
export interface RolloutCompletion {
  readonly tokens: readonly number[];
  /** Engine log-probs of the sampled tokens (of the sampled, tempered distribution). */
  readonly logprobs: readonly number[];
  readonly finishReason: "stop" | "length" | "abort";
}

/** Rollouts of one batch, tagged with the policy version that produced them. */
export interface RolloutResult {
  /** completions[i][j]: sample j of request i. */
  readonly completions: readonly (readonly RolloutCompletion[])[];
  /** Snapshot version the engine generated from (on-policy check). */
  readonly policyVersion: number;
}

const RolloutErrorBase: TaggedErrorClass<"RolloutError", {
  readonly engine: string;
  readonly message: string;
  readonly cause?: unknown;
}> = Data.TaggedError("RolloutError");
/** Generation failed (engine down, bad answer, timeout). */
export class RolloutError extends RolloutErrorBase {}

/** Generates completions from the most recently pushed snapshot. */
export interface RolloutEngineShape {
  readonly name: string;
  generate(requests: readonly RolloutRequest[]): Effect.Effect<RolloutResult, RolloutError>;
}

/** RolloutEngine service key. */
export const RolloutEngine: Context.Key<RolloutEngineShape, RolloutEngineShape> = Context.Service<
  RolloutEngineShape
>("lorafold/RolloutEngine");

/** What a push did, for metrics and benches. */
export interface PushReport {
  readonly version: number;
  readonly target: string;
  /** Bytes written/sent for this push. */
  readonly bytes: number;
  /** Push start to verified (or to done when verification is off), ms. */
  readonly latencyMs: number;
  /** |engine logp - trainer logp| on the verification probe (mean, max); null when not verified. */
  readonly logpDiffMean: number | null;
  readonly logpDiffMax: number | null;
}

const SyncErrorBase: TaggedErrorClass<"SyncError", {
  readonly target: string;
  readonly version: number;
  readonly message: string;
  readonly cause?: unknown;
}> = Data.TaggedError("SyncError");
/** A push failed (I/O, HTTP, or the engine serves other weights than the snapshot's). */
export class SyncError extends SyncErrorBase {}

const SyncMismatchBase: TaggedErrorClass<"SyncMismatch", {
  readonly target: string;
  readonly version: number;
  readonly maxAbsDiff: number;
  readonly tolerance: number;
  readonly message: string;
}> = Data.TaggedError("SyncMismatch");
/** The engine's answers do not match the pushed snapshot beyond tolerance. */
export class SyncMismatch extends SyncMismatchBase {}

/** Publishes immutable snapshots to the rollout engine. */
export interface SyncTargetShape {
  readonly name: string;
  push(snapshot: Snapshot): Effect.Effect<PushReport, SyncError | SyncMismatch>;
}

/** SyncTarget service key. */
export const SyncTarget: Context.Key<SyncTargetShape, SyncTargetShape> = Context.Service<
  SyncTargetShape
>(
  "lorafold/SyncTarget",
);
