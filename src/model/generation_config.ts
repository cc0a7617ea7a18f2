/**
 * A checkpoint's generation_config.json: the extra end-of-sequence ids (Llama 3 instruct models
 * list `<|eot_id|>` there, not in config.json) and the default sampling values. Like vLLM's
 * `generation_config="auto"`, only the sampling fields the file sets are defaults; a missing file
 * sets none. A malformed file or value is a ModelConfigError naming the field.
 * @module
 */
import { Effect } from "effect";
import { join } from "node:path";
import { readFile } from "node:fs/promises";
import { messageOf } from "../base/tagged_error.ts";
import { ModelConfigError } from "./config.ts";

/** The file name, beside config.json. */
export const GENERATION_CONFIG = "generation_config.json";

/** Default sampling values a checkpoint ships (each only when its file sets it). */
export interface SamplingDefaults {
  readonly temperature?: number;
  readonly topP?: number;
  readonly topK?: number;
  readonly minP?: number;
  readonly repetitionPenalty?: number;
  /** HF's do_sample (false: greedy decoding is the checkpoint's default). */
  readonly doSample?: boolean;
}

/** What generation_config.json holds for a loader. */
export interface GenerationConfig {
  /** Its eos_token_id (one or a list), empty when absent. */
  readonly eosTokenIds: readonly number[];
  readonly defaults: SamplingDefaults;
}

/** No generation_config.json. */
export const NO_GENERATION_CONFIG: GenerationConfig = { eosTokenIds: [], defaults: {} };

const bad = (field: string, reason: string) =>
  Effect.fail(
    new ModelConfigError({
      field: `generation_config.${field}`,
      reason: `${GENERATION_CONFIG}: "${field}" ${reason}`,
    }),
  );

/** Validates a parsed generation_config.json object. */
export const parseGenerationConfig = (
  json: unknown,
): Effect.Effect<GenerationConfig, ModelConfigError> =>
  Effect.gen(function* () {
    if (typeof json !== "object" || json === null || Array.isArray(json)) {
      return yield* Effect.fail(
        new ModelConfigError({
          field: GENERATION_CONFIG,
          reason: `${GENERATION_CONFIG} must hold a JSON object`,
        }),
      );
    }
    const j = json as Record<string, unknown>;
    const eosRaw = j.eos_token_id;
    const eos = eosRaw === undefined || eosRaw === null
      ? []
      : Array.isArray(eosRaw)
      ? eosRaw
      : [eosRaw];
    if (!eos.every((x) => Number.isInteger(x) && x >= 0)) {
      return yield* bad(
        "eos_token_id",
        `must be a token id or a list of them, got ${JSON.stringify(eosRaw)}`,
      );
    }
    const defaults: Record<string, number | boolean> = {};
    const num = (
      key: string,
      name: keyof SamplingDefaults,
      ok: (x: number) => boolean,
      range: string,
    ) => {
      const v = j[key];
      if (v === undefined || v === null) return Effect.void;
      if (typeof v !== "number" || !Number.isFinite(v) || !ok(v)) {
        return bad(key, `must be ${range}, got ${JSON.stringify(v)}`);
      }
      defaults[name] = v;
      return Effect.void;
    };
    yield* num("temperature", "temperature", (x) => x >= 0, "a number >= 0");
    yield* num("top_p", "topP", (x) => x > 0 && x <= 1, "in (0, 1]");
    yield* num("top_k", "topK", (x) => Number.isInteger(x) && x >= -1, "an integer >= -1");
    yield* num("min_p", "minP", (x) => x >= 0 && x <= 1, "in [0, 1]");
    yield* num("repetition_penalty", "repetitionPenalty", (x) => x > 0, "a number > 0");
    if (j.do_sample !== undefined && j.do_sample !== null) {
      if (typeof j.do_sample !== "boolean") {
        return yield* bad("do_sample", `must be true or false, got ${JSON.stringify(j.do_sample)}`);
      }
      defaults.doSample = j.do_sample;
    }
    return { eosTokenIds: eos as number[], defaults: defaults as SamplingDefaults };
  });

/** Reads dir/generation_config.json; a checkpoint without one gets NO_GENERATION_CONFIG. */
export const loadGenerationConfig = (
  dir: string,
): Effect.Effect<GenerationConfig, ModelConfigError> =>
  Effect.tryPromise({
    try: async () => {
      try {
        return JSON.parse(await readFile(join(dir, GENERATION_CONFIG), "utf8")) as unknown;
      } catch (e) {
        if ((e as { code?: string }).code === "ENOENT") return null;
        throw e;
      }
    },
    catch: (e) =>
      new ModelConfigError({
        field: GENERATION_CONFIG,
        reason: `cannot read ${join(dir, GENERATION_CONFIG)}: ${messageOf(e)}`,
      }),
  }).pipe(
    Effect.flatMap((json) =>
      json === null ? Effect.succeed(NO_GENERATION_CONFIG) : parseGenerationConfig(json)
    ),
  );

/** config.json's eos ids followed by those only generation_config.json lists (no duplicates). */
export const mergeEosIds = (
  fromConfig: readonly number[],
  fromGeneration: readonly number[],
): number[] => [...new Set([...fromConfig, ...fromGeneration])];
