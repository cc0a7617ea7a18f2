/**
 * The port snapshots go to: a PushTarget publishes each immutable snapshot to the rollout engine
 * (in-process, a vLLM-compatible server, or a user's own target) and reports what it did.
 * Implemented in src/rollout/local.ts (in-process) and src/push/ (LoRA and full-weight pushes).
 * @module
 */
import type { TaggedErrorClass } from "../base/tagged_error.ts";
import { Context, Data, type Effect } from "effect";
import type { Snapshot } from "../snapshot/snapshot.ts";

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
export interface PushTargetShape {
  readonly name: string;
  push(snapshot: Snapshot): Effect.Effect<PushReport, SyncError | SyncMismatch>;
}

/** PushTarget service key. */
export const PushTarget: Context.Key<PushTargetShape, PushTargetShape> = Context.Service<
  PushTargetShape
>("lorafold/PushTarget");
