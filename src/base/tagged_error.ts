/**
 * The type of an Effect tagged-error class, and the one bridge from synchronous code that throws
 * tagged errors to typed Effect failures.
 *
 * Every error class of the library follows one pattern: typed fields that say what went wrong,
 * and a `message` getter computed from them, both given to {@link taggedError}; the base is
 * declared with {@link TaggedErrorClass}, which keeps the public API free of JSR "slow types" (a
 * class must not extend a call expression directly):
 *
 * ```ts
 * const FooErrorBase: TaggedErrorClass<"FooError", { readonly file: string; readonly reason: string }> =
 *   taggedError("FooError", (e) => `${e.file}: ${e.reason}`);
 * export class FooError extends FooErrorBase {}
 * ```
 * @module
 */
import { type Cause, Data, Effect } from "effect";

/** Constructor type returned by `Data.TaggedError(tag)` for fields `A`. */
export type TaggedErrorClass<Tag extends string, A extends object> = new (
  args: A,
) => Cause.YieldableError & { readonly _tag: Tag } & Readonly<A>;

/**
 * A tagged-error class with fields `A` whose `message` getter is `message(fields)`: the text is
 * computed from the typed fields when read, never stored beside them.
 */
export const taggedError = <Tag extends string, A extends object>(
  tag: Tag,
  message: (fields: Readonly<A>) => string,
): TaggedErrorClass<Tag, A> => {
  const Base = Data.TaggedError(tag) as unknown as new (args: A) => Cause.YieldableError;
  class Tagged extends Base {
    override get message(): string {
      return message(this as unknown as Readonly<A>);
    }
  }
  return Tagged as unknown as TaggedErrorClass<Tag, A>;
};

/**
 * The text of a thrown value: an Error's message, or the `message` of an error-like object (a
 * failure that crossed a realm or was rebuilt from JSON), anything else as a string.
 */
export const messageOf = (e: unknown): string =>
  e instanceof Error || (typeof e === "object" && e !== null && "message" in e)
    ? String((e as { message: unknown }).message)
    : String(e);

type ErrorClass = abstract new (...args: never) => unknown;

/**
 * Runs synchronous code that signals expected failures by throwing instances of `errors` (host
 * math and parsers written as plain loops), and returns those as typed Effect failures. Anything
 * else thrown is a defect: a bug in that code, not a failure the caller can handle.
 */
export const tryTagged = <A, const C extends readonly ErrorClass[]>(
  body: () => A,
  ...errors: C
): Effect.Effect<A, InstanceType<C[number]>> =>
  Effect.suspend(() => {
    try {
      return Effect.succeed(body());
    } catch (e) {
      if (errors.some((c) => e instanceof c)) return Effect.fail(e as InstanceType<C[number]>);
      throw e;
    }
  });
