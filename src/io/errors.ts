/**
 * Typed errors of the safetensors reader/writer and of checkpoint files and directories.
 * Every error carries structured fields; its `message` (computed from them) names the file, the
 * tensor and the problem, so a log line alone is enough to find the culprit.
 * @module
 */
import { taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";

/** Fields of a {@link SafetensorsError}. */
export interface SafetensorsErrorFields {
  /** The file (or `"<buffer>"` for in-memory data) the problem was found in. */
  readonly file: string;
  /** The tensor concerned, or null for problems of the file or header as a whole. */
  readonly tensor: string | null;
  /** What is wrong, in words. */
  readonly reason: string;
}

const SafetensorsErrorBase: TaggedErrorClass<"SafetensorsError", SafetensorsErrorFields> =
  taggedError(
    "SafetensorsError",
    (e) => {
      return e.tensor === null
        ? `${e.file}: ${e.reason}`
        : `${e.file}: tensor "${e.tensor}": ${e.reason}`;
    },
  );
/** A malformed safetensors file, or a tensor that cannot be encoded, decoded or converted. */
export class SafetensorsError extends SafetensorsErrorBase {}

/** Fields of a {@link NonFiniteTensorError}. */
export interface NonFiniteTensorErrorFields {
  /** The tensor holding the value. */
  readonly tensor: string;
  /** Flat (row-major) index of the first non-finite element. */
  readonly index: number;
  /** The offending value: NaN, Infinity or -Infinity. */
  readonly value: number;
}

const NonFiniteTensorErrorBase: TaggedErrorClass<
  "NonFiniteTensorError",
  NonFiniteTensorErrorFields
> = taggedError(
  "NonFiniteTensorError",
  (e) => `tensor "${e.tensor}" has non-finite value ${e.value} at index ${e.index}`,
);
/** A tensor that holds NaN or ±Infinity where only finite values are allowed. */
export class NonFiniteTensorError extends NonFiniteTensorErrorBase {}

/** Fields of a {@link CheckpointError}. */
export interface CheckpointErrorFields {
  /** The file or directory concerned. */
  readonly path: string;
  /** The tensor concerned, or null. */
  readonly tensor: string | null;
  /** What is wrong, in words (for file-system failures: the system error code and message). */
  readonly reason: string;
}

const CheckpointErrorBase: TaggedErrorClass<"CheckpointError", CheckpointErrorFields> = taggedError(
  "CheckpointError",
  (e) => {
    return e.tensor === null
      ? `${e.path}: ${e.reason}`
      : `${e.path}: tensor "${e.tensor}": ${e.reason}`;
  },
);
/** A checkpoint file or directory that cannot be read or written, or an inconsistent index. */
export class CheckpointError extends CheckpointErrorBase {}
