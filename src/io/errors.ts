/**
 * Typed errors of the safetensors reader/writer and of checkpoint files and directories.
 * Every error carries structured fields plus a `message` that names the file, the tensor and the
 * problem, so a log line alone is enough to find the culprit.
 * @module
 */
import type { TaggedErrorClass } from "../base/tagged_error.ts";
import { Data } from "effect";

/** Fields of a {@link SafetensorsError}. */
export interface SafetensorsErrorFields {
  /** The file (or `"<buffer>"` for in-memory data) the problem was found in. */
  readonly file: string;
  /** The tensor concerned, or null for problems of the file or header as a whole. */
  readonly tensor: string | null;
  /** What is wrong, in words. */
  readonly reason: string;
}

/** A malformed safetensors file, or a tensor that cannot be encoded, decoded or converted. */
const SafetensorsErrorBase: TaggedErrorClass<
  "SafetensorsError",
  SafetensorsErrorFields & { readonly message: string }
> = Data.TaggedError(
  "SafetensorsError",
);
export class SafetensorsError extends SafetensorsErrorBase {
  constructor(fields: SafetensorsErrorFields) {
    super({
      ...fields,
      message: fields.tensor === null
        ? `${fields.file}: ${fields.reason}`
        : `${fields.file}: tensor "${fields.tensor}": ${fields.reason}`,
    });
  }
}

/** Fields of a {@link NonFiniteTensorError}. */
export interface NonFiniteTensorErrorFields {
  /** The tensor holding the value. */
  readonly tensor: string;
  /** Flat (row-major) index of the first non-finite element. */
  readonly index: number;
  /** The offending value: NaN, Infinity or -Infinity. */
  readonly value: number;
}

/** A tensor that holds NaN or ±Infinity where only finite values are allowed. */
const NonFiniteTensorErrorBase: TaggedErrorClass<
  "NonFiniteTensorError",
  NonFiniteTensorErrorFields & { readonly message: string }
> = Data.TaggedError(
  "NonFiniteTensorError",
);
export class NonFiniteTensorError extends NonFiniteTensorErrorBase {
  constructor(fields: NonFiniteTensorErrorFields) {
    super({
      ...fields,
      message:
        `tensor "${fields.tensor}" has non-finite value ${fields.value} at index ${fields.index}`,
    });
  }
}

/** Fields of a {@link CheckpointError}. */
export interface CheckpointErrorFields {
  /** The file or directory concerned. */
  readonly path: string;
  /** The tensor concerned, or null. */
  readonly tensor: string | null;
  /** What is wrong, in words (for file-system failures: the system error code and message). */
  readonly reason: string;
}

/** A checkpoint file or directory that cannot be read or written, or an inconsistent index. */
const CheckpointErrorBase: TaggedErrorClass<
  "CheckpointError",
  CheckpointErrorFields & { readonly message: string }
> = Data.TaggedError(
  "CheckpointError",
);
export class CheckpointError extends CheckpointErrorBase {
  constructor(fields: CheckpointErrorFields) {
    super({
      ...fields,
      message: fields.tensor === null
        ? `${fields.path}: ${fields.reason}`
        : `${fields.path}: tensor "${fields.tensor}": ${fields.reason}`,
    });
  }
}
