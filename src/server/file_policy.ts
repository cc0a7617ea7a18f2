/**
 * What the server lets requests do with files: `lora_path` and `weights_path` may name any
 * readable directory (vLLM's behaviour, the default), or only directories under
 * `--allowed-lora-root` (opt-in; checked on the resolved path, symlinks followed, before the
 * path is even probed). Error messages about files never carry their bytes: `redactFileText`
 * removes the parts of a loader's message that quote file content (JSON.parse's excerpts, quoted
 * strings, "got <value>" renderings) and keeps the rest (which file, which field, which check).
 * @module
 */
import { Effect } from "effect";
import { realpath } from "node:fs/promises";
import { dirname, isAbsolute, relative, resolve } from "node:path";
import { type ApiError, badRequest } from "./schemas.ts";

/** The real path of `p`, or of its nearest existing ancestor joined with the rest. */
const resolveReal = async (p: string): Promise<string> => {
  const abs = resolve(p);
  try {
    return await realpath(abs);
  } catch {
    const parent = dirname(abs);
    if (parent === abs) return abs;
    return resolve(await resolveReal(parent), relative(parent, abs));
  }
};

/** Whether `path` lies under `root` (after resolving both). */
export const isUnder = async (path: string, root: string): Promise<boolean> => {
  const [p, r] = await Promise.all([resolveReal(path), resolveReal(root)]);
  const rel = relative(r, p);
  return rel === "" || (!rel.startsWith("..") && !isAbsolute(rel));
};

/** Fails with a 400 when `root` is set and `path` is not under it. */
export const checkAllowedPath = (
  path: string,
  root: string | null,
  param: string,
): Effect.Effect<void, ApiError> =>
  root === null ? Effect.void : Effect.promise(() => isUnder(path, root)).pipe(
    Effect.flatMap((ok) =>
      ok ? Effect.void : Effect.fail(
        badRequest(
          `${param} '${path}' is outside the directory this server allows (--allowed-lora-root)`,
          param,
        ),
      )
    ),
  );

/** A loader's message without any excerpt of the file it read. */
export const redactFileText = (msg: string): string =>
  msg
    // JSON.parse: `Unexpected token 'x', "xyz..." is not valid JSON`
    .replace(/Unexpected token .*? is not valid JSON/gs, "not valid JSON")
    .replace(/"(?:[^"\\]|\\.)*"(?:\.\.\.)? is not valid JSON/gs, "not valid JSON")
    .replace(/Unexpected token '.'/g, "Unexpected token")
    // renderings of values read from the file
    .replace(/\bgot .*?(?=$|[;\n])/g, "got an invalid value")
    .replace(/\bunknown dtype .*?(?=$|[;\n])/g, "unknown dtype")
    .replace(/"(?:[^"\\\n]|\\.){0,400}"/g, '"…"')
    .replace(/'(?:[^'\\\n]|\\.){0,400}'/g, "'…'");
