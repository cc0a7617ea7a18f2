/**
 * `deno task pretrain`: rebuilds the shipped base model (assets/arithmetic-base) deterministically;
 * the defaults rebuild it bit for bit.
 * @module
 */
import { Effect, Schema } from "effect";
import { messageOf, taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { choice, finite, integer, option, type OptionFields } from "../base/options.ts";
import { Backend, type BackendChoice, BackendLive } from "../backend/backend.ts";
import { saveModel } from "../model/loader.ts";
import { pretrain } from "../task/pretrain.ts";
import { BUILTIN_MODEL_DIR } from "../task/arithmetic_task.ts";

/** Decoded options of `pretrain`. */
export interface PretrainCommandOptions {
  readonly seed: number;
  readonly steps: number;
  readonly out: string;
  readonly backend: BackendChoice;
  readonly targetAccuracy: number;
}

/** The `pretrain` option fields. */
export const pretrainOptionFields: OptionFields = {
  seed: integer({ min: 0 }, {
    default: 1,
    description: "Seed of the initial weights and the corpus",
  }),
  steps: integer({ min: 1 }, {
    default: 1500,
    description: "Most pretraining steps (batches of 64)",
  }),
  out: option(Schema.String, {
    default: BUILTIN_MODEL_DIR,
    description: "Directory the checkpoint is written to",
    allowed: "a directory path",
  }),
  backend: choice(["auto", "cpu", "webgpu"], {
    default: "cpu",
    description: "Tensor backend (the CPU rebuilds the shipped model bit for bit)",
  }),
  targetAccuracy: finite({ min: 0, max: 1, exclusiveMin: true }, {
    default: 1,
    description: "Stop once held-out greedy accuracy reaches this (1 = never stop early)",
  }),
};

const PretrainWriteErrorBase: TaggedErrorClass<"PretrainWriteError", {
  readonly path: string;
  readonly reason: string;
}> = taggedError(
  "PretrainWriteError",
  (e) => `cannot write ${e.path}: ${e.reason}`,
);
/** A pretraining output file could not be written. */
export class PretrainWriteError extends PretrainWriteErrorBase {}

const writeText = (path: string, text: string) =>
  Effect.tryPromise({
    try: () => writeFile(path, text),
    catch: (e) => new PretrainWriteError({ path, reason: messageOf(e) }),
  });

/** Runs pretraining and writes the checkpoint, its tokenizer and pretrain.json. */
export const runPretrain = (o: PretrainCommandOptions) =>
  Effect.gen(function* () {
    const t0 = performance.now();
    const r = yield* Effect.gen(function* () {
      const b = yield* Backend;
      return yield* pretrain(b, {
        seed: o.seed,
        maxSteps: o.steps,
        batchSize: 64,
        learningRate: 3e-3,
        dropRate: 0.6,
        targetAccuracy: o.targetAccuracy,
        evalEvery: 50,
        log: (l) => console.log(l),
      });
    }).pipe(Effect.provide(BackendLive(o.backend)));
    yield* saveModel(o.out, r.config, r.weights);
    yield* writeText(
      join(o.out, "tokenizer.json"),
      JSON.stringify(r.tokenizer.toJSON(), null, 2) + "\n",
    );
    yield* writeText(
      join(o.out, "pretrain.json"),
      JSON.stringify(
        {
          seed: o.seed,
          steps: r.steps,
          held_out_accuracy: r.accuracy,
          wall_s: (performance.now() - t0) / 1000,
        },
        null,
        2,
      ) + "\n",
    );
    console.log(
      `wrote ${o.out}: ${r.steps} steps, held-out accuracy ${(r.accuracy * 100).toFixed(1)}%`,
    );
  });
