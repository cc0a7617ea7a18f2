/**
 * Typed failures of the GRPO host math. A non-finite number anywhere in the loss path is a bug
 * upstream (a broken forward pass, stale engine weights, an overflowing ratio); it must stop the
 * step with the place it happened, never flow silently into the optimizer.
 * @module
 */
import { type Cause, Data, Effect } from "effect";

/**
 * The class Data.TaggedError(tag) builds, written out so exported error classes extend a typed
 * const (JSR rejects an inferred call expression as a super class).
 */
export type TaggedErrorClass<Tag extends string, A extends Record<string, unknown>> = new (
  args: A,
) => Cause.YieldableError & { readonly _tag: Tag } & Readonly<A>;

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
  readonly message: string;
}> = Data.TaggedError("GrpoNumericError");
/**
 * A NaN or infinity in GRPO math. `sequence` indexes the micro-batch (or the reward batch);
 * `token` is the completion-token index, or null for per-sequence quantities (reward, advantage,
 * sequence-level ratio) and for the final loss (sequence -1).
 */
export class GrpoNumericError extends GrpoNumericErrorBase {}

const GrpoInputErrorBase: TaggedErrorClass<"GrpoInputError", {
  readonly op: string;
  readonly message: string;
}> = Data.TaggedError("GrpoInputError");
/** Inputs that do not fit together (lengths, missing arrays, bad option values). */
export class GrpoInputError extends GrpoInputErrorBase {}

/** Builds a GrpoNumericError whose message names the quantity, the place and the value. */
export const numericError = (
  quantity: NumericQuantity,
  sequence: number,
  token: number | null,
  value: number,
): GrpoNumericError => {
  const where = sequence < 0
    ? "in the micro-batch total"
    : token === null
    ? `at sequence ${sequence}`
    : `at sequence ${sequence}, token ${token}`;
  return new GrpoNumericError({
    quantity,
    sequence,
    token,
    value,
    message: `${quantity} is ${value} ${where}`,
  });
};

/** Throws a GrpoInputError unless `cond` holds (callers turn it into an Effect failure). */
export const requireInput = (cond: boolean, op: string, message: () => string): void => {
  if (!cond) throw new GrpoInputError({ op, message: message() });
};

/**
 * Runs host math that signals failure by throwing a GrpoNumericError or GrpoInputError, and turns
 * those into typed Effect failures. Anything else thrown is a defect (a bug in this code).
 */
export const attempt = <A>(
  compute: () => A,
): Effect.Effect<A, GrpoNumericError | GrpoInputError> =>
  Effect.suspend(() => {
    try {
      return Effect.succeed(compute());
    } catch (e) {
      if (e instanceof GrpoNumericError || e instanceof GrpoInputError) return Effect.fail(e);
      throw e;
    }
  });
