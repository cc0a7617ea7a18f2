/**
 * The served base weights: loading the model directory at start, and collective_rpc
 * "reload_weights" (a Hugging Face checkpoint directory that must have the served architecture).
 * The weights on the device own one Effect scope, closed when they are replaced or at shutdown.
 * Reading and checking a checkpoint happens on the host (`prepare`); the swap (`install`) touches
 * the device and runs under the scheduler's device permit, so between two decode steps: running
 * sequences continue with the new weights (vLLM's in-flight update semantics).
 * @module
 */
import { messageOf } from "../base/tagged_error.ts";
import { Effect, Exit, Scope } from "effect";
import { access } from "node:fs/promises";
import { join } from "node:path";
import type { BackendShape } from "../backend/backend.ts";
import type { ModelConfig } from "../model/config.ts";
import { type DeviceModel, uploadModel } from "../model/decoder.ts";
import { loadFrozenBase } from "../model/loader.ts";
import type { BaseWeightMap } from "../model/weights.ts";
import { type ApiError, badRequest } from "./schemas.ts";
import { checkAllowedPath, redactFileText } from "./file_policy.ts";

/** Base weights on the device, in a scope of their own. */
export interface BaseWeights {
  readonly config: ModelConfig;
  readonly model: DeviceModel;
  readonly scope: Scope.Closeable;
}

/** A checkpoint read and checked on the host, ready to upload. */
export interface PreparedWeights {
  readonly config: ModelConfig;
  readonly weights: BaseWeightMap;
}

const SAME_SHAPE_FIELDS = [
  "modelType",
  "hiddenSize",
  "intermediateSize",
  "numLayers",
  "numHeads",
  "numKvHeads",
  "headDim",
  "vocabSize",
  "tieWordEmbeddings",
  "attentionBias",
  // fields that change the math without changing a shape: a reload keeps the served ones
  "mlpBias",
  "qkNorm",
  "ropeScaling",
  "slidingWindow",
  "slidingLayers",
  "queryPreAttnScalar",
  "attnLogitSoftcap",
  "finalLogitSoftcap",
  "ropeLocalTheta",
] as const;

/** Structural equality of two config values (numbers, booleans, lists, rope-scaling records). */
const sameValue = (a: unknown, b: unknown): boolean => JSON.stringify(a) === JSON.stringify(b);

/** Whether a path exists. */
export const pathExists = (path: string): Effect.Effect<boolean> =>
  Effect.promise(() => access(path).then(() => true, () => false));

/** Uploads host weights into a scope of their own. */
export const uploadBase = (
  backend: BackendShape,
  config: ModelConfig,
  weights: BaseWeightMap,
): Effect.Effect<BaseWeights> =>
  Effect.gen(function* () {
    const scope = yield* Scope.make();
    const model = yield* Scope.provide(scope)(
      Effect.map(backend.ops, (ops) => uploadModel(ops, config, weights)),
    );
    return { config, model, scope };
  });

/** The current base weights; replaced whole by `install`. */
export class ServedWeights {
  readonly backend: BackendShape;
  readonly modelDir: string;
  #current: BaseWeights;

  constructor(backend: BackendShape, modelDir: string, initial: BaseWeights) {
    this.backend = backend;
    this.modelDir = modelDir;
    this.#current = initial;
  }

  /** The weights to run the next step with. */
  get current(): BaseWeights {
    return this.#current;
  }

  /** The served configuration. */
  get config(): ModelConfig {
    return this.#current.config;
  }

  /**
   * Reads a checkpoint directory (default: the served model directory) and checks that it has the
   * served architecture (host only; nothing changes).
   */
  prepare(
    path: string | null,
    allowedRoot: string | null = null,
  ): Effect.Effect<PreparedWeights, ApiError> {
    const dir = path ?? this.modelDir;
    const served = this.config;
    return Effect.gen(function* () {
      if (path !== null) yield* checkAllowedPath(path, allowedRoot, "weights_path");
      if (!(yield* pathExists(join(dir, "config.json")))) {
        return yield* Effect.fail(
          badRequest(
            `reload_weights: no checkpoint at ${dir} (config.json not found)`,
            "weights_path",
          ),
        );
      }
      const { config, weights } = yield* loadFrozenBase(dir).pipe(
        Effect.mapError((e) =>
          badRequest(
            `reload_weights: cannot load ${dir}: ${redactFileText(messageOf(e))}`,
            "weights_path",
          )
        ),
      );
      for (const f of SAME_SHAPE_FIELDS) {
        if (!sameValue(config[f], served[f])) {
          return yield* Effect.fail(
            badRequest(
              `reload_weights: ${dir} does not match the served model: ${f} is ${
                JSON.stringify(config[f])
              }, expected ${JSON.stringify(served[f])}`,
              "weights_path",
            ),
          );
        }
      }
      // runtime-only fields a reload may change: rope theta and the norm epsilon
      return {
        config: { ...served, rmsNormEps: config.rmsNormEps, ropeTheta: config.ropeTheta },
        weights,
      };
    });
  }

  /** Uploads prepared weights and swaps them in; the old ones are released (device permit held). */
  install(next: PreparedWeights): Effect.Effect<void> {
    return Effect.gen({ self: this }, function* () {
      const uploaded = yield* uploadBase(this.backend, next.config, next.weights);
      const old = this.#current;
      this.#current = uploaded;
      yield* Scope.close(old.scope, Exit.void);
    });
  }

  /** Releases the device memory (at shutdown). */
  close(): Effect.Effect<void> {
    return Scope.close(this.#current.scope, Exit.void);
  }
}
