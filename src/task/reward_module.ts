/**
 * User reward functions in their own modules (`--reward-funcs ./my_reward.ts`, or
 * `./rewards.ts#named` for a named export), imported dynamically. The signature mirrors TRL's
 * `reward_func(prompts, completions, completion_ids, **columns)` as one object argument:
 *
 * ```ts
 * export default ({ prompts, completions, completionIds, label }: RewardArgs) =>
 *   completions.map((c, i) => (text(c).includes(String(label[i])) ? 1 : 0));
 * ```
 *
 * `prompts` are the dataset's prompts (text, or message lists for conversational data),
 * `completions` the completions (text, or `[{ role: "assistant", content }]` for conversational
 * data, as TRL hands them), `completionIds` (also `completion_ids`) their token ids, and every
 * other column of the rows by name, one value per completion. The function may be async and may
 * return null (for the whole batch, or per completion) where it does not apply. A module may
 * export `columns` (a list of column names it reads), checked against the dataset before the
 * run starts.
 * @module
 */
import { Effect } from "effect";
import process from "node:process";
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { importUserExport } from "./user_module.ts";
import type { NamedReward, RewardValues } from "../grpo/rewards.ts";
import type { ChatMessage } from "../tokenizer/chat_template.ts";

/** What a user reward function receives; dataset columns come as further keys. */
export interface RewardArgs {
  readonly prompts: readonly (string | readonly ChatMessage[])[];
  readonly completions: readonly (string | readonly ChatMessage[])[];
  readonly completionIds: readonly (readonly number[])[];
  /** TRL's spelling of `completionIds`. */
  readonly completion_ids: readonly (readonly number[])[];
  readonly [column: string]: readonly unknown[];
}

/** A user reward function: one value (or null) per completion, or null for none of them. */
export type UserRewardFn = (
  args: RewardArgs,
) => RewardValues | null | Promise<RewardValues | null>;

/** Argument keys that are not columns; a dataset column may not use one of these names. */
export const RESERVED_REWARD_ARGS: readonly string[] = [
  "prompts",
  "completions",
  "completionIds",
  "completion_ids",
];

const RewardModuleErrorBase: TaggedErrorClass<"RewardModuleError", {
  /** The `--reward-funcs` entry at fault. */
  readonly spec: string;
  readonly reason: string;
}> = taggedError("RewardModuleError", (e) => `reward function ${e.spec}: ${e.reason}`);
/** A reward module that cannot be imported, or that exports no usable function. */
export class RewardModuleError extends RewardModuleErrorBase {}

/** A user reward function, ready for the trainer, and the columns it says it reads. */
export interface LoadedReward {
  readonly reward: NamedReward;
  /** Columns the module declares it reads (`export const columns`); empty when it declares none. */
  readonly columns: readonly string[];
}

const isMessages = (x: unknown): x is readonly ChatMessage[] => Array.isArray(x);

/** The reward as the trainer calls it: the TRL-style arguments built from the context. */
export const userReward = (name: string, fn: UserRewardFn): NamedReward => ({
  name,
  fn: (completions, ctx) => {
    const rows = ctx.rows ?? completions.map(() => null);
    const conversational = rows.some((r) => r !== null && isMessages(r.prompt));
    const columns = new Map<string, unknown[]>();
    rows.forEach((r, i) => {
      if (r === null) return;
      for (const [k, v] of Object.entries(r)) {
        if (k === "prompt" || k === "completion" || RESERVED_REWARD_ARGS.includes(k)) continue;
        if (!columns.has(k)) columns.set(k, Array(completions.length).fill(undefined));
        columns.get(k)![i] = v;
      }
    });
    const ids = ctx.completionIds ?? completions.map(() => []);
    const args: RewardArgs = {
      ...Object.fromEntries(columns),
      prompts: rows.map((r, i) =>
        r !== null && (typeof r.prompt === "string" || isMessages(r.prompt))
          ? r.prompt
          : ctx.prompts[i]
      ),
      completions: conversational
        ? completions.map((c) => [{ role: "assistant", content: c }])
        : completions,
      completionIds: ids,
      completion_ids: ids,
    };
    return Effect.map(
      Effect.tryPromise({ try: async () => await fn(args), catch: (e) => e }),
      (out) => (out === null ? completions.map(() => null) : out),
    );
  },
});

/**
 * Imports the module an entry names (relative to `cwd`) and returns its default export, or the
 * export after `#`, as a reward named after the export (the file's name for a default export).
 */
export const loadRewardModule = (
  spec: string,
  cwd: string = process.cwd(),
): Effect.Effect<LoadedReward, RewardModuleError> =>
  Effect.gen(function* () {
    const found = yield* importUserExport(spec, cwd).pipe(
      Effect.mapError((reason) => new RewardModuleError({ spec, reason })),
    );
    const fn = found.value;
    if (typeof fn !== "function") {
      return yield* Effect.fail(
        new RewardModuleError({
          spec,
          reason: found.isDefault
            ? "has no default export function (or name one: file.ts#name)"
            : `has no exported function "${found.name}"`,
        }),
      );
    }
    const cols = found.module.columns;
    if (
      cols !== undefined && (!Array.isArray(cols) || cols.some((c) => typeof c !== "string"))
    ) {
      return yield* Effect.fail(
        new RewardModuleError({ spec, reason: "exports columns that are not a list of names" }),
      );
    }
    return {
      reward: userReward(found.name, fn as UserRewardFn),
      columns: found.isDefault ? (cols as string[] | undefined) ?? [] : [],
    };
  });
