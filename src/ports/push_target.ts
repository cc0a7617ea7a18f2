/**
 * The port snapshots go to: a PushTarget publishes each immutable snapshot to the rollout engine
 * (in-process, a vLLM-compatible server, or a user's own target) and reports what it did.
 * Implemented in src/rollout/local.ts (in-process) and src/push/ (LoRA and full-weight pushes).
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { Context, type Effect } from "effect";
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
  /** Per replica, when the target fans out to several engine replicas. */
  readonly replicas?: readonly ReplicaPushOutcome[];
  /** Further per-push metrics for the step's log (e.g. `replicas/serving`). */
  readonly metrics?: Readonly<Record<string, number>>;
}

/** What one replica made of a fanned-out push. */
export interface ReplicaPushOutcome {
  readonly url: string;
  /** Pushed and verified (or verification off). */
  readonly ok: boolean;
  /** Why not; null when ok. */
  readonly reason: string | null;
  readonly latencyMs: number;
  readonly logpDiffMax: number | null;
}

/** Fields of a {@link SyncError}. */
export interface SyncErrorFields {
  /** The push target's name. */
  readonly target: string;
  /** The snapshot version being pushed; null when the failure concerns no one version (setting up the target). */
  readonly version: number | null;
  /** What went wrong, in words (for HTTP failures: the request and the server's answer). */
  readonly reason: string;
  /** The underlying error (a VllmHttpError, a CheckpointError, ...), when there is one. */
  readonly cause?: unknown;
}

const SyncErrorBase: TaggedErrorClass<"SyncError", SyncErrorFields> = taggedError(
  "SyncError",
  (e) => `${e.target}: ${e.reason}`,
);
/** A push failed (I/O, HTTP, or the engine serves other weights than the snapshot's). */
export class SyncError extends SyncErrorBase {}

/** Fields of a {@link SyncMismatch}. */
export interface SyncMismatchFields {
  readonly target: string;
  readonly version: number;
  /** How the version reached the engine. */
  readonly pushKind: "lora" | "full";
  /** The `model` the probe asked for. */
  readonly model: string;
  /** The probe's cache_salt. */
  readonly cacheSalt: string;
  /** max and mean |engine logp - trainer logp| over the probe's tokens. */
  readonly maxAbsDiff: number;
  readonly meanAbsDiff: number;
  /** The largest accepted max |diff|. */
  readonly tolerance: number;
  /** The tokens the engine generated for the probe. */
  readonly tokens: readonly number[];
}

const SyncMismatchBase: TaggedErrorClass<"SyncMismatch", SyncMismatchFields> = taggedError(
  "SyncMismatch",
  (e) => {
    return `the engine does not serve snapshot v${e.version} (${e.pushKind} push, model ` +
      `'${e.model}', cache_salt '${e.cacheSalt}'): max |engine logp - trainer logp| = ` +
      `${e.maxAbsDiff.toExponential(3)} > tolerance ${e.tolerance} on the probe (mean ${
        e.meanAbsDiff.toExponential(3)
      }; tokens [${e.tokens.join(",")}])`;
  },
);
/** The engine's answers do not match the pushed snapshot beyond tolerance. */
export class SyncMismatch extends SyncMismatchBase {}

/** Publishes immutable snapshots to the rollout engine. */
export interface PushTargetShape {
  readonly name: string;
  push(snapshot: Snapshot): Effect.Effect<PushReport, SyncError | SyncMismatch>;
  /**
   * The work a push of `snapshot` needs from the trainer's device (its side of verification),
   * done ahead on the trainer's path, so that a push running beside the next update waits only
   * on the engine. Optional: a push does all its work itself when this was not called.
   */
  prepare?(snapshot: Snapshot): Effect.Effect<void, SyncError>;
}

/** PushTarget service key. */
export const PushTarget: Context.Key<PushTargetShape, PushTargetShape> = Context.Service<
  PushTargetShape
>("lorafold/PushTarget");
