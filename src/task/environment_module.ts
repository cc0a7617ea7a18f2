/**
 * A multi-turn environment in the user's own module (`--environment ./env.ts`, or
 * `./envs.ts#named`): its default export (or the named one) starts an episode for one sample of
 * a prompt and answers each model turn, in plain async code:
 *
 * ```ts
 * export default async (item) => async ({ turn, text }) =>
 *   turn < 3 ? { observation: `\nresult: ${compute(text)}\n`, done: false }
 *            : { observation: "", done: true };
 * ```
 *
 * A class instance (or any object) with a `reset(item)` method of that shape works too. The
 * observation (token ids, or text encoded with the run's tokenizer) is appended to the episode
 * and masked out of the loss; rewards see the whole episode.
 * @module
 */
import { Effect } from "effect";
import process from "node:process";
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import {
  type Environment,
  type EnvironmentStep,
  fromPromise,
  type ModelTurn,
} from "../pipeline/multi_turn.ts";
import type { PromptItem } from "../pipeline/stages.ts";
import { importUserExport } from "./user_module.ts";

const EnvironmentModuleErrorBase: TaggedErrorClass<"EnvironmentModuleError", {
  /** The `--environment` entry at fault. */
  readonly spec: string;
  readonly reason: string;
}> = taggedError("EnvironmentModuleError", (e) => `environment ${e.spec}: ${e.reason}`);
/** An environment module that cannot be imported, or that exports no usable environment. */
export class EnvironmentModuleError extends EnvironmentModuleErrorBase {}

/** What an environment module exports: an episode starter, or an object with one. */
export type UserEpisodeStart = (
  item: PromptItem,
) => Promise<(turn: ModelTurn) => Promise<EnvironmentStep>>;

/** Imports the environment a `--environment` entry names (relative to `cwd`). */
export const loadEnvironmentModule = (
  spec: string,
  cwd: string = process.cwd(),
): Effect.Effect<Environment, EnvironmentModuleError> =>
  Effect.gen(function* () {
    const found = yield* importUserExport(spec, cwd).pipe(
      Effect.mapError((reason) => new EnvironmentModuleError({ spec, reason })),
    );
    const v = found.value as { reset?: unknown } | null;
    if (typeof v === "function") return fromPromise(found.name, v as UserEpisodeStart);
    if (typeof v === "object" && v !== null && typeof v.reset === "function") {
      const reset = v.reset as UserEpisodeStart;
      return fromPromise(found.name, (item) => reset.call(v, item));
    }
    return yield* Effect.fail(
      new EnvironmentModuleError({
        spec,
        reason: `its ${
          found.isDefault ? "default export" : `export "${found.name}"`
        } is neither an episode start function (item) => Promise<(turn) => Promise<{ observation, done }>> nor an object with such a reset method`,
      }),
    );
  });
