/**
 * Typed failures of the GRPO host math. A non-finite number anywhere in the loss path is a bug
 * upstream (a broken forward pass, stale engine weights, an overflowing ratio); it must stop the
 * step with the place it happened, never flow silently into the optimizer.
 * @module
 */
import type { Effect } from "effect";
import { taggedError, type TaggedErrorClass, tryTagged } from "../base/tagged_error.ts";

/** The quantity that went non-finite. Inputs first, then derived values in computation order. */
export type NumericQuantity =
  | "reward"
  | "advantage"
  | "logp"
  | "oldLogp"
  | "refLogp"
  | "engineLogp"
  | "entropy"
  | "ratio"
  | "importanceSamplingRatio"
  | "kl"
  | "loss"
  | "dLogp";

const GrpoNumericErrorBase: TaggedErrorClass<"GrpoNumericError", {
  readonly quantity: NumericQuantity;
  readonly sequence: number;
  readonly token: number | null;
  readonly value: number;
}> = taggedError(
  "GrpoNumericError",
  (e) => {
    const where = e.sequence < 0
      ? "in the micro-batch total"
      : e.token === null
      ? `at sequence ${e.sequence}`
      : `at sequence ${e.sequence}, token ${e.token}`;
    return `${e.quantity} is ${e.value} ${where}`;
  },
);
/**
 * A NaN or infinity in GRPO math. `sequence` indexes the micro-batch (or the reward batch);
 * `token` is the completion-token index, or null for per-sequence quantities (reward, advantage,
 * sequence-level ratio) and for the final loss (sequence -1). The message names the quantity, the
 * place and the value.
 */
export class GrpoNumericError extends GrpoNumericErrorBase {}

const GrpoInputErrorBase: TaggedErrorClass<"GrpoInputError", {
  /** The operation that rejected its inputs (`grpoLoss`, `groupAdvantages`, ...). */
  readonly op: string;
  /** What does not fit, in words. */
  readonly reason: string;
}> = taggedError(
  "GrpoInputError",
  (e) => `${e.op}: ${e.reason}`,
);
/** Inputs that do not fit together (lengths, missing arrays, values out of range). */
export class GrpoInputError extends GrpoInputErrorBase {}

/** A GrpoNumericError for `quantity` at (`sequence`, `token`) holding `value`. */
export const numericError = (
  quantity: NumericQuantity,
  sequence: number,
  token: number | null,
  value: number,
): GrpoNumericError => new GrpoNumericError({ quantity, sequence, token, value });

/** Throws a GrpoInputError unless `cond` holds (callers run it under {@link attempt}). */
export const requireInput = (cond: boolean, op: string, reason: () => string): void => {
  if (!cond) throw new GrpoInputError({ op, reason: reason() });
};

/**
 * Runs host math that signals failure by throwing a GrpoNumericError or GrpoInputError, and turns
 * those into typed Effect failures. Anything else thrown is a defect (a bug in this code).
 */
export const attempt = <A>(
  compute: () => A,
): Effect.Effect<A, GrpoNumericError | GrpoInputError> =>
  tryTagged(compute, GrpoNumericError, GrpoInputError);
