/**
 * Publishing a snapshot to disk: as a Hugging Face checkpoint (full-weight push, reload_weights)
 * or as a PEFT adapter directory (LoRA push, load_lora_adapter). Both re-check the digest first.
 * @module
 */
import { Effect } from "effect";
import type { CheckpointError, SafetensorsError } from "../io/errors.ts";
import { saveModel } from "../model/loader.ts";
import { savePeftAdapter } from "../lora/peft.ts";
import type { HostTensor } from "../model/weights.ts";
import type { Snapshot, SnapshotCorrupted } from "./snapshot.ts";

/** Writes the snapshot's full weights and config.json to `dir` (F32 unless `dtype`). */
export const exportCheckpoint: (
  snapshot: Snapshot,
  dir: string,
  dtype?: "F32" | "F16" | "BF16",
) => Effect.Effect<void, SnapshotCorrupted | CheckpointError | SafetensorsError> = Effect.fn(
  "exportCheckpoint",
)(function* (snapshot: Snapshot, dir: string, dtype: "F32" | "F16" | "BF16" = "F32") {
  yield* snapshot.verify();
  yield* saveModel(dir, snapshot.config, snapshot.weights(), { dtype });
});

/** Writes the snapshot's LoRA adapter as a PEFT directory; fails for full fine-tuning snapshots. */
export const exportAdapter: (
  snapshot: Snapshot,
  dir: string,
  baseModel: string,
) => Effect.Effect<void, SnapshotCorrupted | CheckpointError | SafetensorsError> = Effect.fn(
  "exportAdapter",
)(function* (snapshot: Snapshot, dir: string, baseModel: string) {
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
  yield* savePeftAdapter(dir, snapshot.loraConfig, modules, baseModel);
});
