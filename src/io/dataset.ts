/**
 * Dataset files as rows of named columns: JSON Lines (`.jsonl`, one object a line; blank lines
 * skipped) and Parquet (`.parquet`, read with hyparquet; Snappy or uncompressed pages). Every row
 * must be an object with the same columns as the first: a line that is not JSON, a row that is
 * not an object, a missing or extra column is a DatasetError naming the file, the row (1-based,
 * and the line for JSONL) and the column. What the columns mean is the task's business
 * (src/task/dataset.ts).
 * @module
 */
import { Effect } from "effect";
import { parquetReadObjects } from "hyparquet";
import { readFile } from "node:fs/promises";
import { extname } from "node:path";
import { messageOf, taggedError, type TaggedErrorClass } from "../base/tagged_error.ts";

/** One dataset row: column name -> value (JSON values; Parquet lists and structs alike). */
export type DatasetRow = Readonly<Record<string, unknown>>;

/** The rows of one file, with its column names in the first row's order. */
export interface DatasetFile {
  readonly path: string;
  readonly columns: readonly string[];
  readonly rows: readonly DatasetRow[];
}

/** Fields of a {@link DatasetError}. */
export interface DatasetErrorFields {
  /** The file (or the dataset's name) at fault. */
  readonly path: string;
  /** 1-based row number, or null for a problem of the file as a whole. */
  readonly row: number | null;
  /** The column concerned, or null. */
  readonly column: string | null;
  /** What is wrong, in words. */
  readonly reason: string;
}

const DatasetErrorBase: TaggedErrorClass<"DatasetError", DatasetErrorFields> = taggedError(
  "DatasetError",
  (e) =>
    `dataset ${e.path}${e.row === null ? "" : ` row ${e.row}`}${
      e.column === null ? "" : ` column "${e.column}"`
    }: ${e.reason}`,
);
/** A dataset file that cannot be read, or a row that is not what a dataset row must be. */
export class DatasetError extends DatasetErrorBase {}

/** The dataset file formats, by extension. */
export const DATASET_EXTENSIONS: readonly string[] = [".jsonl", ".parquet"];

const isObject = (x: unknown): x is Record<string, unknown> =>
  typeof x === "object" && x !== null && !Array.isArray(x);

/** Parquet INT64 values come back as bigint; exact ones become numbers, JSON-like as JSONL's. */
const plain = (v: unknown): unknown => {
  if (typeof v === "bigint") {
    return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)
      ? Number(v)
      : v.toString();
  }
  if (Array.isArray(v)) return v.map(plain);
  if (v instanceof Date) return v.toISOString();
  if (isObject(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
  return v;
};

/**
 * Checks that every row is an object with exactly the first row's columns. `where(i)` names row
 * i in messages (JSONL adds the line).
 */
export const checkRows = (
  path: string,
  rows: readonly unknown[],
  where: (i: number) => string = () => "",
): Effect.Effect<DatasetFile, DatasetError> =>
  Effect.gen(function* () {
    const fail = (i: number | null, column: string | null, reason: string) =>
      Effect.fail(new DatasetError({ path, row: i === null ? null : i + 1, column, reason }));
    if (rows.length === 0) return yield* fail(null, null, "has no rows");
    let columns: string[] = [];
    for (let i = 0; i < rows.length; i++) {
      const r = rows[i];
      if (!isObject(r)) {
        return yield* fail(i, null, `${where(i)}is not an object (a row maps columns to values)`);
      }
      if (i === 0) {
        columns = Object.keys(r);
        continue;
      }
      const missing = columns.find((c) => !Object.hasOwn(r, c));
      if (missing !== undefined) {
        return yield* fail(i, missing, `${where(i)}is missing (row 1 has it)`);
      }
      const extra = Object.keys(r).find((c) => !columns.includes(c));
      if (extra !== undefined) {
        return yield* fail(i, extra, `${where(i)}is not a column of row 1`);
      }
    }
    return { path, columns, rows: rows as DatasetRow[] };
  });

const readJsonl = (path: string, text: string): Effect.Effect<DatasetFile, DatasetError> =>
  Effect.gen(function* () {
    const rows: unknown[] = [];
    const lines: number[] = [];
    const all = text.split("\n");
    for (let l = 0; l < all.length; l++) {
      if (all[l].trim() === "") continue;
      const parsed = yield* Effect.try({
        try: () => JSON.parse(all[l]) as unknown,
        catch: (e) =>
          new DatasetError({
            path,
            row: rows.length + 1,
            column: null,
            reason: `line ${l + 1} is not JSON: ${messageOf(e)}`,
          }),
      });
      rows.push(parsed);
      lines.push(l + 1);
    }
    return yield* checkRows(path, rows, (i) => `(line ${lines[i]}) `);
  });

const readParquet = (path: string, bytes: Uint8Array): Effect.Effect<DatasetFile, DatasetError> =>
  Effect.gen(function* () {
    const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    const rows = yield* Effect.tryPromise({
      try: () => parquetReadObjects({ file: buffer as ArrayBuffer }),
      catch: (e) =>
        new DatasetError({
          path,
          row: null,
          column: null,
          reason: `is not a readable Parquet file: ${messageOf(e)}`,
        }),
    });
    return yield* checkRows(path, rows.map(plain));
  });

/** Reads a `.jsonl` or `.parquet` dataset file. */
export const readDatasetFile = (path: string): Effect.Effect<DatasetFile, DatasetError> =>
  Effect.gen(function* () {
    const ext = extname(path).toLowerCase();
    if (!DATASET_EXTENSIONS.includes(ext)) {
      return yield* Effect.fail(
        new DatasetError({
          path,
          row: null,
          column: null,
          reason: `unknown format "${ext}"; allowed: ${DATASET_EXTENSIONS.join(", ")}`,
        }),
      );
    }
    const bytes = yield* Effect.tryPromise({
      try: () => readFile(path),
      catch: (e) =>
        new DatasetError({ path, row: null, column: null, reason: `cannot read: ${messageOf(e)}` }),
    });
    return ext === ".parquet"
      ? yield* readParquet(path, bytes)
      : yield* readJsonl(path, new TextDecoder().decode(bytes));
  });
