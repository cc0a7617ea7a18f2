/**
 * A user's own module named on the command line (`./my_reward.ts`, `./env.ts#name`): the one
 * place user code is imported, by path relative to a directory, at run time. Reward functions
 * (reward_module.ts) and multi-turn environments (environment_module.ts) are loaded through it.
 * @module
 */
import { Effect } from "effect";
import { basename, extname, resolve } from "node:path";
import process from "node:process";
import { pathToFileURL } from "node:url";
import { messageOf } from "../base/tagged_error.ts";

/** One export of a user module. */
export interface UserExport {
  /** The exported value. */
  readonly value: unknown;
  /** The export's name, or the file's name (safe characters only) for a default export. */
  readonly name: string;
  /** Whether it is the default export (no `#name` given). */
  readonly isDefault: boolean;
  /** The whole module (for further exports such as a reward's `columns`). */
  readonly module: Readonly<Record<string, unknown>>;
}

/** Whether a command-line entry names a module rather than a built-in. */
export const isModuleSpec = (spec: string): boolean =>
  /^(\.{1,2}[\\/]|[\\/]|file:)/.test(spec) || /\.[cm]?[jt]sx?(#.*)?$/.test(spec);

/**
 * Imports the module `spec` names (relative to `cwd`) and returns its default export, or the
 * export after `#`. Fails with the reason in words (the caller names the option).
 */
export const importUserExport = (
  spec: string,
  cwd: string = process.cwd(),
): Effect.Effect<UserExport, string> =>
  Effect.gen(function* () {
    const hash = spec.lastIndexOf("#");
    const file = hash < 0 ? spec : spec.slice(0, hash);
    const exportName = hash < 0 ? "default" : spec.slice(hash + 1);
    const url = file.startsWith("file:") ? file : pathToFileURL(resolve(cwd, file)).href;
    const mod = yield* Effect.tryPromise({
      try: () => import(url) as Promise<Record<string, unknown>>,
      catch: (e) => `cannot import: ${messageOf(e)}`,
    });
    if (!(exportName in mod)) {
      return yield* Effect.fail(
        hash < 0
          ? "has no default export (or name one: file.ts#name)"
          : `has no export "${exportName}"`,
      );
    }
    return {
      value: mod[exportName],
      name: hash < 0 ? basename(file, extname(file)).replace(/[^A-Za-z0-9_.-]/g, "_") : exportName,
      isDefault: hash < 0,
      module: mod,
    };
  });
