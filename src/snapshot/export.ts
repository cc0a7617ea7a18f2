/**
 * Publishing a snapshot to disk: as a Hugging Face checkpoint (full-weight push, reload_weights)
 * or as a PEFT adapter directory (LoRA push, load_lora_adapter). Both re-check the digest first;
 * a checkpoint of a LoRA snapshot also re-checks the base's, and merges out of place
 * (`mergedWeights`). An adapter directory needs only A and B.
 * @module
 */
import { Effect } from "effect";
import type { BackendShape } from "../backend/backend.ts";
import type { BackendError } from "../backend/ops.ts";
import type { CheckpointError, SafetensorsError } from "../io/errors.ts";
import type { WriteMode } from "../io/checkpoint.ts";
import { saveModel } from "../model/loader.ts";
import { savePeftAdapter } from "../lora/peft.ts";
import type { HostTensor } from "../model/weights.ts";
import { mergedWeights, type Snapshot, type SnapshotCorrupted } from "./snapshot.ts";

/**
 * Writes the snapshot's full weights and config.json to `dir` (F32 unless `dtype`). A LoRA
 * snapshot is merged on `backend` (default: the CPU reference backend).
 */
export const exportCheckpoint: (
  snapshot: Snapshot,
  dir: string,
  dtype?: "F32" | "F16" | "BF16",
  backend?: BackendShape,
) => Effect.Effect<void, SnapshotCorrupted | BackendError | CheckpointError | SafetensorsError> =
  Effect.fn(
    "exportCheckpoint",
  )(function* (
    snapshot: Snapshot,
    dir: string,
    dtype: "F32" | "F16" | "BF16" = "F32",
    backend?: BackendShape,
  ) {
    yield* snapshot.verify(true);
    yield* saveModel(dir, snapshot.config, yield* mergedWeights(snapshot, backend), { dtype });
  });

/** Writes the snapshot's LoRA adapter as a PEFT directory; fails for full fine-tuning snapshots. */
export const exportAdapter: (
  snapshot: Snapshot,
  dir: string,
  baseModel: string,
  mode?: WriteMode,
) => Effect.Effect<void, SnapshotCorrupted | CheckpointError | SafetensorsError> = Effect.fn(
  "exportAdapter",
)(function* (snapshot: Snapshot, dir: string, baseModel: string, mode: WriteMode = "atomic") {
  yield* snapshot.verify();
  const tensors = snapshot.adapter();
  if (!tensors || !snapshot.loraConfig) {
    return yield* Effect.die(
      new Error(`snapshot v${snapshot.version} is a full-weight snapshot: no adapter`),
    );
  }
  const modules = new Map<string, { a: HostTensor; b: HostTensor }>();
  for (const [name, t] of tensors) {
    const path = name.replace(/\.lora_[AB]$/, "");
    const m = modules.get(path) ?? { a: t, b: t };
    modules.set(path, name.endsWith("lora_A") ? { ...m, a: t } : { ...m, b: t });
  }
  yield* savePeftAdapter(dir, snapshot.loraConfig, modules, baseModel, mode);
});
