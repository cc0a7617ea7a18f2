/**
 * PEFT adapter directories (adapter_config.json + adapter_model.safetensors), the format Python
 * PEFT and vLLM's /v1/load_lora_adapter read. Tensor names:
 * base_model.model.<projection path>.lora_{A,B}.weight, A [r, in], B [out, r].
 * @module
 */
import { Effect } from "effect";
import { join } from "node:path";
import { readFile } from "node:fs/promises";
import { tryTagged } from "../base/tagged_error.ts";
import {
  makeDirectory,
  readSafetensorsFile,
  removeStaleTempFiles,
  writeFileAs,
  type WriteMode,
  writeSafetensorsFile,
} from "../io/checkpoint.ts";
import type { CheckpointError } from "../io/errors.ts";
import { fromFloat32, SafetensorsError, toFloat32 } from "../io/safetensors.ts";
import type { ModelConfig } from "../model/config.ts";
import {
  type HostTensor,
  type Projection,
  PROJECTIONS,
  projectionShape,
} from "../model/weights.ts";
import {
  type LoraConfig,
  LoraConfigError,
  loraConfigProblem,
  type LoraWeights,
  targetPaths,
} from "./adapter.ts";

/** File names inside an adapter directory. */
export const ADAPTER_CONFIG = "adapter_config.json";
export const ADAPTER_WEIGHTS = "adapter_model.safetensors";

const PREFIX = "base_model.model.";

/** PEFT tensor name of a module's A or B matrix. */
export const peftTensorName = (path: string, which: "A" | "B"): string =>
  `${PREFIX}${path}.lora_${which}.weight`;

/** adapter_config.json contents for a LoRA config. */
export const peftConfigJson = (c: LoraConfig, baseModel: string): Record<string, unknown> => ({
  peft_type: "LORA",
  task_type: "CAUSAL_LM",
  base_model_name_or_path: baseModel,
  r: c.r,
  lora_alpha: c.alpha,
  lora_dropout: c.dropout,
  target_modules: [...c.targetModules],
  bias: "none",
  use_rslora: c.useRslora,
  use_dora: false,
  modules_to_save: null,
  fan_in_fan_out: false,
  inference_mode: true,
});

/** Writes an adapter directory: tensors first, then the config, each file atomically. */
export const savePeftAdapter: (
  dir: string,
  config: LoraConfig,
  modules: ReadonlyMap<string, { readonly a: HostTensor; readonly b: HostTensor }>,
  baseModel: string,
  mode?: WriteMode,
) => Effect.Effect<void, CheckpointError | SafetensorsError> = Effect.fn("savePeftAdapter")(
  function* (
    dir: string,
    config: LoraConfig,
    modules: ReadonlyMap<string, { readonly a: HostTensor; readonly b: HostTensor }>,
    baseModel: string,
    mode: WriteMode = "atomic",
  ) {
    yield* makeDirectory(dir);
    const entries = yield* tryTagged(
      () =>
        [...modules].flatMap(([path, { a, b }]) => [
          fromFloat32(peftTensorName(path, "A"), a.data, a.shape),
          fromFloat32(peftTensorName(path, "B"), b.data, b.shape),
        ]),
      SafetensorsError,
    );
    if (mode === "atomic") {
      // temp files of an export a kill interrupted (a directory has one writer)
      yield* removeStaleTempFiles(join(dir, ADAPTER_WEIGHTS));
      yield* removeStaleTempFiles(join(dir, ADAPTER_CONFIG));
    }
    yield* writeSafetensorsFile(join(dir, ADAPTER_WEIGHTS), entries, undefined, mode);
    // the config last: its presence marks a complete directory (loaders read it first)
    const json = JSON.stringify(peftConfigJson(config, baseModel), null, 2) + "\n";
    yield* writeFileAs(join(dir, ADAPTER_CONFIG), new TextEncoder().encode(json), mode);
  },
);

/** Parses adapter_config.json into a LoraConfig (typed error naming the field). */
export const parsePeftConfig = (json: unknown): Effect.Effect<LoraConfig, LoraConfigError> =>
  Effect.suspend(() => {
    if (typeof json !== "object" || json === null) {
      return Effect.fail(
        new LoraConfigError({ field: "(root)", reason: "adapter_config.json must be an object" }),
      );
    }
    const j = json as Record<string, unknown>;
    if (j.peft_type !== undefined && j.peft_type !== "LORA") {
      return Effect.fail(
        new LoraConfigError({
          field: "peft_type",
          reason: `peft_type ${JSON.stringify(j.peft_type)}: only "LORA"`,
        }),
      );
    }
    if (j.use_dora === true) {
      return Effect.fail(
        new LoraConfigError({ field: "use_dora", reason: "DoRA is not supported" }),
      );
    }
    let targets = j.target_modules;
    if (typeof targets === "string") {
      targets = targets === "all-linear" ? [...PROJECTIONS] : [targets];
    }
    if (!Array.isArray(targets) || !targets.every((t) => typeof t === "string")) {
      return Effect.fail(
        new LoraConfigError({
          field: "target_modules",
          reason: "target_modules must be a list of names",
        }),
      );
    }
    const c: LoraConfig = {
      r: j.r as number,
      alpha: (j.lora_alpha ?? j.r) as number,
      dropout: (j.lora_dropout ?? 0) as number,
      targetModules: targets as Projection[],
      useRslora: j.use_rslora === true,
    };
    const problem = loraConfigProblem(c);
    return problem ? Effect.fail(problem) : Effect.succeed(c);
  });

/** Loads an adapter directory written by lorafold or PEFT, checking names and shapes against the model. */
export const loadPeftAdapter: (
  dir: string,
  model: ModelConfig,
) => Effect.Effect<LoraWeights, LoraConfigError | CheckpointError | SafetensorsError> = Effect.fn(
  "loadPeftAdapter",
)(function* (dir: string, model: ModelConfig) {
  const json = yield* Effect.tryPromise({
    try: async () => JSON.parse(await readFile(join(dir, ADAPTER_CONFIG), "utf8")) as unknown,
    catch: (e) =>
      new LoraConfigError({
        field: ADAPTER_CONFIG,
        reason: `cannot read ${join(dir, ADAPTER_CONFIG)}: ${e}`,
      }),
  });
  const config = yield* parsePeftConfig(json);
  const file = yield* readSafetensorsFile(join(dir, ADAPTER_WEIGHTS));
  const modules = new Map<string, { a: HostTensor; b: HostTensor }>();
  for (const { path, p } of targetPaths(model, config)) {
    const [out, inp] = projectionShape(model, p);
    const get = (which: "A" | "B", shape: number[]) =>
      Effect.gen(function* () {
        const name = peftTensorName(path, which);
        const e = file.tensors.get(name);
        if (!e) {
          return yield* Effect.fail(
            new LoraConfigError({ field: name, reason: `adapter is missing tensor ${name}` }),
          );
        }
        if (e.shape.length !== 2 || e.shape[0] !== shape[0] || e.shape[1] !== shape[1]) {
          return yield* Effect.fail(
            new LoraConfigError({
              field: name,
              reason: `tensor ${name} has shape [${e.shape}], expected [${shape}]`,
            }),
          );
        }
        const data = yield* toFloat32(e, join(dir, ADAPTER_WEIGHTS));
        if (!data.every(Number.isFinite)) {
          return yield* Effect.fail(
            new LoraConfigError({ field: name, reason: `tensor ${name} holds NaN or Inf` }),
          );
        }
        return { shape, data } as HostTensor;
      });
    modules.set(path, {
      a: yield* get("A", [config.r, inp]),
      b: yield* get("B", [out, config.r]),
    });
  }
  return { config, modules };
});
