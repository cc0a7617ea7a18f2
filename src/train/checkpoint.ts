/**
 * Resumable training checkpoints: trainable parameters, AdamW moments, step and RNG state in ONE
 * safetensors file written atomically (temp file + rename), so a kill at any moment leaves the
 * previous checkpoint or the new one, never a torn file.
 * @module
 */
import { Effect } from "effect";
import { tryTagged } from "../base/tagged_error.ts";
import {
  readSafetensorsFile,
  removeStaleTempFiles,
  writeSafetensorsFile,
} from "../io/checkpoint.ts";
import { CheckpointError, SafetensorsError } from "../io/errors.ts";
import { fromFloat32, toFloat32 } from "../io/safetensors.ts";
import type { HostTensor } from "../model/weights.ts";
import type { PolicyState } from "./policy.ts";

/** A checkpoint on disk: policy state plus the last completed step. */
export interface TrainCheckpoint {
  readonly step: number;
  readonly state: PolicyState;
}

const GROUPS = ["param", "m", "v"] as const;

/** Writes the checkpoint atomically. */
export const saveTrainCheckpoint: (
  path: string,
  ckpt: TrainCheckpoint,
) => Effect.Effect<void, CheckpointError | SafetensorsError> = Effect.fn("saveTrainCheckpoint")(
  function* (path: string, ckpt: TrainCheckpoint) {
    const { state } = ckpt;
    const maps = { param: state.params, m: state.m, v: state.v };
    const entries = yield* tryTagged(
      () =>
        GROUPS.flatMap((g) =>
          [...maps[g]].map(([k, t]) => fromFloat32(`${g}/${k}`, t.data, t.shape))
        ),
      SafetensorsError,
    );
    // temp files of saves a kill interrupted (this run is the checkpoint's only writer)
    yield* removeStaleTempFiles(path);
    yield* writeSafetensorsFile(path, entries, {
      format: "lorafold-train-state",
      step: String(ckpt.step),
      version: String(state.version),
      rng: JSON.stringify(state.rng),
    });
  },
);

/** Reads a checkpoint written by saveTrainCheckpoint (typed errors on any malformation). */
export const loadTrainCheckpoint: (
  path: string,
) => Effect.Effect<TrainCheckpoint, CheckpointError | SafetensorsError> = Effect.fn(
  "loadTrainCheckpoint",
)(function* (path: string) {
  const file = yield* readSafetensorsFile(path);
  const md = file.metadata;
  const bad = (reason: string) => Effect.fail(new CheckpointError({ path, tensor: null, reason }));
  if (md.format !== "lorafold-train-state") {
    return yield* bad(`not a lorafold training checkpoint (format=${md.format})`);
  }
  const step = Number(md.step);
  const version = Number(md.version);
  let rng: unknown;
  try {
    rng = JSON.parse(md.rng ?? "null");
  } catch {
    rng = null;
  }
  if (
    !Number.isInteger(step) || !Number.isInteger(version) || !Array.isArray(rng) ||
    rng.length !== 4
  ) {
    return yield* bad("metadata step/version/rng missing or malformed");
  }
  const maps = {
    param: new Map<string, HostTensor>(),
    m: new Map<string, HostTensor>(),
    v: new Map<string, HostTensor>(),
  };
  for (const [name, e] of file.tensors) {
    const slash = name.indexOf("/");
    const g = name.slice(0, slash) as typeof GROUPS[number];
    if (!GROUPS.includes(g)) return yield* bad(`unexpected tensor ${name}`);
    const data = yield* toFloat32(e, path);
    if (!data.every(Number.isFinite)) return yield* bad(`tensor ${name} holds NaN or Inf`);
    maps[g].set(name.slice(slash + 1), { shape: e.shape, data });
  }
  return {
    step,
    state: { version, params: maps.param, m: maps.m, v: maps.v, rng: rng as number[] },
  };
});
