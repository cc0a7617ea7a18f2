/**
 * The type of an Effect tagged-error class. Declaring error bases with it keeps the public API
 * free of "slow types" for JSR (a class must not extend a call expression directly).
 * @module
 */
import type { Cause } from "effect";

/** Constructor type returned by `Data.TaggedError(tag)` for fields `A`. */
export type TaggedErrorClass<Tag extends string, A extends object> = new (
  args: A,
) => Cause.YieldableError & { readonly _tag: Tag } & Readonly<A>;
