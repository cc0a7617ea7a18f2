/**
 * The port rollouts come from: a RolloutEngine generates completions (with the engine's log-probs)
 * from the most recently pushed snapshot. Implemented in-process (src/rollout/local.ts) and over
 * a vLLM-compatible server (src/rollout/server.ts); provided to the pipeline by a Layer.
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { Context, type Effect } from "effect";

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
  /**
   * Tokens naming the replica this request prefers when there are several (its prefix cache
   * holds them): default the prompt. The turns of one episode pass the episode's first prompt.
   */
  readonly affinity?: readonly number[];
}

/** One sampled completion with the engine's log-probs of its tokens. */
export interface RolloutCompletion {
  readonly tokens: readonly number[];
  /**
   * Engine log-probs of the sampled tokens (of the sampled, tempered distribution); NaN where the
   * engine's value is unknown (vLLM sends -inf clamped to -9999.0).
   */
  readonly logprobs: readonly number[];
  /** EOS/stop, max_tokens, aborted by the server, or vLLM's repetition detection. */
  readonly finishReason: "stop" | "length" | "abort" | "repetition";
}

/** Rollouts of one batch, tagged with the policy version that produced them. */
export interface RolloutResult {
  /** completions[i][j]: sample j of request i. */
  readonly completions: readonly (readonly RolloutCompletion[])[];
  /** Snapshot version the engine generated from (on-policy check). */
  readonly policyVersion: number;
}

/** Fields of a {@link RolloutError}. */
export interface RolloutErrorFields {
  /** The engine's name (`local`, `server(<url>)`, ...). */
  readonly engine: string;
  /** What went wrong, in words (for HTTP failures: the request and the server's answer). */
  readonly reason: string;
  /** The underlying error (a VllmHttpError, a backend failure), when there is one. */
  readonly cause?: unknown;
}

const RolloutErrorBase: TaggedErrorClass<"RolloutError", RolloutErrorFields> = taggedError(
  "RolloutError",
  (e) => `rollout engine ${e.engine}: ${e.reason}`,
);
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
