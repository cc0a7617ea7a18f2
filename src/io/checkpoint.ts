/**
 * Safetensors files and checkpoint directories: atomic single-file writes, and checkpoints that
 * are either one `model.safetensors` or shards `model-0000i-of-0000K.safetensors` described by
 * `model.safetensors.index.json` ({metadata:{total_size}, weight_map:{name: file}}).
 *
 * Only node:fs/promises and node:path are used, so this runs under Deno, Bun and Node. Every
 * file-system failure becomes a CheckpointError; format problems are SafetensorsErrors.
 * @module
 */
import { Effect } from "effect";
import { tryTagged } from "../base/tagged_error.ts";
import * as fs from "node:fs/promises";
import * as nodePath from "node:path";
import { CheckpointError, SafetensorsError } from "./errors.ts";
import {
  parseSafetensors,
  type SafetensorsContents,
  serializeHeader,
  type TensorEntry,
} from "./safetensors.ts";

export { CheckpointError } from "./errors.ts";

/** File name of a single-file checkpoint. */
export const SINGLE_FILE = "model.safetensors";
/** File name of the shard index of a sharded checkpoint. */
export const INDEX_FILE = "model.safetensors.index.json";

/** Shard file name, 1-based: `model-00001-of-00003.safetensors`. */
export const shardFileName = (i: number, count: number): string =>
  `model-${String(i).padStart(5, "0")}-of-${String(count).padStart(5, "0")}.safetensors`;

const SHARD_RE = /^model-\d{5}-of-\d{5}\.safetensors$/;

/** Largest single read or write call (node caps one call at 2 GiB). */
const IO_CHUNK = 1 << 28;

/** The text of a thrown value: an Error's message, with its system code (ENOENT, ...) first. */
export const errorText = (e: unknown): string => {
  if (e instanceof Error) {
    const code = (e as { code?: unknown }).code;
    return typeof code === "string" && !e.message.startsWith(code)
      ? `${code}: ${e.message}`
      : e.message;
  }
  return String(e);
};

const errCode = (e: unknown): unknown =>
  typeof e === "object" && e !== null ? (e as { code?: unknown }).code : undefined;

/**
 * Runs a promise-returning file operation, mapping any rejection to a CheckpointError naming the
 * path and the step (`what`).
 */
export const fsOp = <A>(
  path: string,
  what: string,
  run: () => Promise<A>,
): Effect.Effect<A, CheckpointError> =>
  Effect.tryPromise({
    try: run,
    catch: (e) => new CheckpointError({ path, tensor: null, reason: `${what}: ${errorText(e)}` }),
  });

/** Runs a synchronous step that may throw SafetensorsError (anything else is a defect). */
const syncStep = <A>(body: () => A): Effect.Effect<A, SafetensorsError> =>
  tryTagged(body, SafetensorsError);

/** Whether `path` exists (as anything); other stat failures are errors. */
const exists = (path: string): Effect.Effect<boolean, CheckpointError> =>
  fsOp(path, "stat failed", async () => {
    try {
      await fs.stat(path);
      return true;
    } catch (e) {
      if (errCode(e) === "ENOENT") return false;
      throw e;
    }
  });

/** Creates `path` and any missing parents (like `mkdir -p`); an existing directory is fine. */
export const makeDirectory = (path: string): Effect.Effect<void, CheckpointError> =>
  fsOp(path, "creating directory failed", async () => {
    await fs.mkdir(path, { recursive: true });
  });

/** Reads a whole file into a fresh Uint8Array (no 2 GiB limit: reads in chunks). */
export const readFileBytes = (path: string): Effect.Effect<Uint8Array, CheckpointError> =>
  fsOp(path, "read failed", async () => {
    const h = await fs.open(path, "r");
    try {
      const { size } = await h.stat();
      const buf = new Uint8Array(size);
      let off = 0;
      while (off < size) {
        const { bytesRead } = await h.read(buf, off, Math.min(IO_CHUNK, size - off), off);
        if (bytesRead === 0) throw new Error(`file shrank while reading (${off} of ${size} bytes)`);
        off += bytesRead;
      }
      return buf;
    } finally {
      await h.close();
    }
  });

const fsyncUnsupported = new Set([
  "ENOTSUP",
  "EOPNOTSUPP",
  "ENOSYS",
  "EINVAL",
  "ERR_METHOD_NOT_IMPLEMENTED",
]);

/**
 * Writes `chunks` to `path` atomically: a temp file in the same directory is written, fsynced
 * (where the platform supports it) and renamed over `path`, then the directory is fsynced (best
 * effort). A crash leaves either the old file or the new one, never a torn one; on failure the
 * temp file is removed.
 */
export const writeFileAtomic = (
  path: string,
  chunks: Uint8Array | readonly Uint8Array[],
): Effect.Effect<void, CheckpointError> =>
  fsOp(path, "atomic write failed", async () => {
    const parts = chunks instanceof Uint8Array ? [chunks] : chunks;
    const dir = nodePath.dirname(path);
    const rand = crypto.getRandomValues(new Uint8Array(6));
    const suffix = Array.from(rand, (b) => b.toString(16).padStart(2, "0")).join("");
    const tmp = nodePath.join(dir, `.${nodePath.basename(path)}.${suffix}.tmp`);
    let h: fs.FileHandle | undefined;
    try {
      h = await fs.open(tmp, "wx", 0o644);
      for (const part of parts) {
        let off = 0;
        while (off < part.length) {
          const { bytesWritten } = await h.write(part, off, Math.min(IO_CHUNK, part.length - off));
          off += bytesWritten;
        }
      }
      try {
        await h.sync();
      } catch (e) {
        if (!fsyncUnsupported.has(errCode(e) as string)) throw e;
      }
      const closing = h;
      h = undefined;
      await closing.close();
      await fs.rename(tmp, path);
    } catch (e) {
      if (h !== undefined) await h.close().catch(() => {});
      await fs.rm(tmp, { force: true }).catch(() => {});
      throw e;
    }
    // Persist the rename itself; not every platform can open or fsync a directory.
    try {
      const d = await fs.open(dir, "r");
      try {
        await d.sync();
      } finally {
        await d.close();
      }
    } catch {
      // best effort
    }
  });

/**
 * How a file is written: `atomic` ({@link writeFileAtomic}: checkpoints, exports a user keeps) or
 * `plain` (one write, no fsync: files inside a directory that is itself published by an atomic
 * rename and thrown away after use, such as a pushed version's directory).
 */
export type WriteMode = "atomic" | "plain";

/** Writes `chunks` to `path` in the given mode. */
export const writeFileAs = (
  path: string,
  chunks: Uint8Array | readonly Uint8Array[],
  mode: WriteMode,
): Effect.Effect<void, CheckpointError> =>
  mode === "atomic" ? writeFileAtomic(path, chunks) : fsOp(path, "write failed", async () => {
    const parts = chunks instanceof Uint8Array ? [chunks] : chunks;
    const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let off = 0;
    for (const p of parts) {
      all.set(p, off);
      off += p.length;
    }
    await fs.writeFile(path, all, { flag: "wx", mode: 0o644 });
  });

/** The temp-file pattern of {@link writeFileAtomic} for `path`: `.<name>.<12 hex>.tmp`. */
const tempFilePattern = (path: string): RegExp => {
  const name = nodePath.basename(path).replace(/[.*+?^$()|[\]\\{}]/g, "\\$&");
  return new RegExp("^\\." + name + "\\.[0-9a-f]{12}\\.tmp$");
};

/**
 * Removes the temp files a killed {@link writeFileAtomic} of `path` left behind. Only for a path
 * this process alone writes (a run's checkpoint): another writer's temp file would go too.
 */
export const removeStaleTempFiles = (path: string): Effect.Effect<void, CheckpointError> =>
  fsOp(path, "removing stale temp files failed", async () => {
    const dir = nodePath.dirname(path);
    const re = tempFilePattern(path);
    let names: string[];
    try {
      names = await fs.readdir(dir);
    } catch (e) {
      if (errCode(e) === "ENOENT") return;
      throw e;
    }
    for (const n of names) if (re.test(n)) await fs.rm(nodePath.join(dir, n), { force: true });
  });

/** Reads and validates one safetensors file. Tensor bytes are views into the file's buffer. */
export const readSafetensorsFile: (
  path: string,
) => Effect.Effect<SafetensorsContents, CheckpointError | SafetensorsError> = Effect.fn(
  "readSafetensorsFile",
)(function* (path: string) {
  const buf = yield* readFileBytes(path);
  return yield* parseSafetensors(buf, path);
});

/**
 * Writes one safetensors file, atomically unless `mode` is "plain" (see {@link WriteMode}); metadata defaults to
 * {format:"pt"}. Invalid tensors (duplicate names, byte lengths not matching shapes) fail with a
 * SafetensorsError before anything is written.
 */
export const writeSafetensorsFile: (
  path: string,
  tensors: readonly TensorEntry[],
  metadata?: Record<string, string>,
  mode?: WriteMode,
) => Effect.Effect<void, CheckpointError | SafetensorsError> = Effect.fn("writeSafetensorsFile")(
  function* (
    path: string,
    tensors: readonly TensorEntry[],
    metadata?: Record<string, string>,
    mode: WriteMode = "atomic",
  ) {
    const header = yield* syncStep(() => serializeHeader(tensors, metadata));
    yield* writeFileAs(path, [header, ...tensors.map((t) => t.bytes)], mode);
  },
);

/** A loaded checkpoint. */
export interface LoadedCheckpoint {
  /** Every tensor, by name (for sharded checkpoints: in weight_map order). */
  tensors: Map<string, TensorEntry>;
  /** `__metadata__` of the single file, or of the first shard. */
  metadata: Record<string, string>;
  /** The safetensors files read, relative to the directory (shards in name order). */
  files: string[];
  /** Whether the checkpoint came from an index and shards. */
  sharded: boolean;
}

interface ShardIndex {
  weightMap: [string, string][];
  totalSize: number | null;
}

const isRecord = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);

const parseIndex = (path: string, buf: Uint8Array): Effect.Effect<ShardIndex, CheckpointError> =>
  Effect.suspend(() => {
    const fail = (reason: string, tensor: string | null = null) =>
      Effect.fail(new CheckpointError({ path, tensor, reason }));
    let json: unknown;
    try {
      json = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(buf));
    } catch (e) {
      return fail(`index is not valid UTF-8 JSON: ${errorText(e)}`);
    }
    if (!isRecord(json)) return fail("index must be a JSON object");
    let totalSize: number | null = null;
    if (json.metadata !== undefined) {
      if (!isRecord(json.metadata)) return fail(`index "metadata" must be an object`);
      const ts = json.metadata.total_size;
      if (ts !== undefined) {
        if (typeof ts !== "number" || !Number.isSafeInteger(ts) || ts < 0) {
          return fail(`index "metadata.total_size" must be a non-negative integer`);
        }
        totalSize = ts;
      }
    }
    if (!isRecord(json.weight_map)) return fail(`index "weight_map" must be an object`);
    const weightMap: [string, string][] = [];
    for (const [name, file] of Object.entries(json.weight_map)) {
      if (typeof file !== "string") {
        return fail(`weight_map value must be a file name string, got ${typeof file}`, name);
      }
      if (
        file === "" || file === "." || file === ".." || file.includes("/") || file.includes("\\")
      ) {
        return fail(`weight_map names "${file}", which is not a plain file name`, name);
      }
      weightMap.push([name, file]);
    }
    return Effect.succeed({ weightMap, totalSize });
  });

const loadSharded: (
  dir: string,
) => Effect.Effect<LoadedCheckpoint, CheckpointError | SafetensorsError> = Effect.fn(
  "loadSharded",
)(function* (dir: string) {
  const indexPath = nodePath.join(dir, INDEX_FILE);
  const index = yield* Effect.flatMap(readFileBytes(indexPath), (b) => parseIndex(indexPath, b));
  const files = [...new Set(index.weightMap.map(([, f]) => f))].sort();
  const shards = new Map<string, SafetensorsContents>();
  const owner = new Map<string, string>();
  for (const f of files) {
    const p = nodePath.join(dir, f);
    if (!(yield* exists(p))) {
      return yield* Effect.fail(
        new CheckpointError({
          path: p,
          tensor: null,
          reason: `shard "${f}" named in ${INDEX_FILE} does not exist`,
        }),
      );
    }
    const contents = yield* readSafetensorsFile(p);
    for (const name of contents.tensors.keys()) {
      const other = owner.get(name);
      if (other !== undefined) {
        return yield* Effect.fail(
          new CheckpointError({
            path: p,
            tensor: name,
            reason: `tensor is stored in two shards: "${other}" and "${f}"`,
          }),
        );
      }
      owner.set(name, f);
    }
    shards.set(f, contents);
  }
  const tensors = new Map<string, TensorEntry>();
  for (const [name, f] of index.weightMap) {
    const t = shards.get(f)!.tensors.get(name);
    if (t === undefined) {
      return yield* Effect.fail(
        new CheckpointError({
          path: nodePath.join(dir, f),
          tensor: name,
          reason: `weight_map places the tensor in "${f}" but that shard does not contain it`,
        }),
      );
    }
    tensors.set(name, t);
  }
  const metadata = files.length > 0 ? shards.get(files[0])!.metadata : {};
  return { tensors, metadata, files, sharded: true };
});

/**
 * Loads every tensor of a checkpoint directory: `model.safetensors`, or the shards named by
 * `model.safetensors.index.json` (validated: index shape, every shard exists, every weight_map
 * entry is in its shard, no tensor in two shards). A directory holding both is ambiguous and
 * fails, as does one holding neither.
 */
export const loadCheckpoint: (
  dir: string,
) => Effect.Effect<LoadedCheckpoint, CheckpointError | SafetensorsError> = Effect.fn(
  "loadCheckpoint",
)(function* (dir: string) {
  const single = nodePath.join(dir, SINGLE_FILE);
  const hasSingle = yield* exists(single);
  const hasIndex = yield* exists(nodePath.join(dir, INDEX_FILE));
  if (hasSingle && hasIndex) {
    return yield* Effect.fail(
      new CheckpointError({
        path: dir,
        tensor: null,
        reason: `ambiguous checkpoint: both ${SINGLE_FILE} and ${INDEX_FILE} are present`,
      }),
    );
  }
  if (hasIndex) return yield* loadSharded(dir);
  if (!hasSingle) {
    return yield* Effect.fail(
      new CheckpointError({
        path: dir,
        tensor: null,
        reason: `no checkpoint: neither ${SINGLE_FILE} nor ${INDEX_FILE} exists`,
      }),
    );
  }
  const { tensors, metadata } = yield* readSafetensorsFile(single);
  return { tensors, metadata, files: [SINGLE_FILE], sharded: false };
});

/** Options of {@link saveCheckpoint}. */
export interface SaveCheckpointOptions {
  /**
   * Largest sum of tensor bytes per shard (headers not counted). When the tensors exceed it they
   * are split greedily in the given order; a tensor larger than the limit gets a shard of its
   * own. Default: no limit (a single file).
   */
  maxShardBytes?: number;
  /** `__metadata__` of every written file; default {format:"pt"}. */
  metadata?: Record<string, string>;
}

/** What {@link saveCheckpoint} wrote. */
export interface SavedCheckpoint {
  /** Safetensors files written, relative to the directory (the index not included). */
  files: string[];
  /** Sum of all tensor bytes (the index's metadata.total_size). */
  totalSize: number;
  sharded: boolean;
}

/**
 * Saves tensors to `dir` (created if missing) as `model.safetensors`, or, when they exceed
 * `maxShardBytes`, as shards plus `model.safetensors.index.json`. Each file is written
 * atomically; the index is written after its shards. Afterwards, checkpoint files of an earlier
 * save in the same directory that are not part of this one (index, single file, other shards) are
 * removed so that loaders never mix versions. Prefer a fresh directory per version.
 */
export const saveCheckpoint: (
  dir: string,
  tensors: readonly TensorEntry[],
  options?: SaveCheckpointOptions,
) => Effect.Effect<SavedCheckpoint, CheckpointError | SafetensorsError> = Effect.fn(
  "saveCheckpoint",
)(function* (dir: string, tensors: readonly TensorEntry[], options: SaveCheckpointOptions = {}) {
  const { maxShardBytes, metadata } = options;
  if (
    maxShardBytes !== undefined && (!Number.isSafeInteger(maxShardBytes) || maxShardBytes <= 0)
  ) {
    return yield* Effect.fail(
      new CheckpointError({
        path: dir,
        tensor: null,
        reason: `maxShardBytes must be a positive integer, got ${maxShardBytes}`,
      }),
    );
  }
  // Validate everything (names unique, shapes, byte lengths, metadata) before touching disk.
  yield* syncStep(() => serializeHeader(tensors, metadata));
  const totalSize = tensors.reduce((s, t) => s + t.bytes.length, 0);
  const groups: TensorEntry[][] = [];
  let current: TensorEntry[] = [];
  let currentBytes = 0;
  for (const t of tensors) {
    if (
      maxShardBytes !== undefined && current.length > 0 &&
      currentBytes + t.bytes.length > maxShardBytes
    ) {
      groups.push(current);
      current = [];
      currentBytes = 0;
    }
    current.push(t);
    currentBytes += t.bytes.length;
  }
  groups.push(current);

  yield* makeDirectory(dir);
  const files: string[] = [];
  if (groups.length > 1) {
    // Drop an old index first: a crash while shards are rewritten then leaves a directory that
    // fails to load instead of an old index silently mixing old and new shards.
    const oldIndex = nodePath.join(dir, INDEX_FILE);
    yield* fsOp(
      oldIndex,
      "removing the old index failed",
      () => fs.rm(oldIndex, { force: true }),
    );
  }
  if (groups.length === 1) {
    yield* writeSafetensorsFile(nodePath.join(dir, SINGLE_FILE), tensors, metadata);
    files.push(SINGLE_FILE);
  } else {
    const weightMap: [string, string][] = [];
    for (let i = 0; i < groups.length; i++) {
      const name = shardFileName(i + 1, groups.length);
      yield* writeSafetensorsFile(nodePath.join(dir, name), groups[i], metadata);
      files.push(name);
      for (const t of groups[i]) weightMap.push([t.name, name]);
    }
    weightMap.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    const index = {
      metadata: { total_size: totalSize },
      weight_map: Object.fromEntries(weightMap),
    };
    yield* writeFileAtomic(
      nodePath.join(dir, INDEX_FILE),
      new TextEncoder().encode(JSON.stringify(index, null, 2) + "\n"),
    );
  }
  // Remove checkpoint files of an earlier save that this one does not replace.
  const present = yield* fsOp(dir, "listing directory failed", () => fs.readdir(dir));
  const keep = new Set(files);
  if (groups.length > 1) keep.add(INDEX_FILE);
  for (const f of present) {
    const stale = (f === SINGLE_FILE || f === INDEX_FILE || SHARD_RE.test(f)) && !keep.has(f);
    if (stale) {
      const p = nodePath.join(dir, f);
      yield* fsOp(p, "removing a stale checkpoint file failed", () => fs.rm(p, { force: true }));
    }
  }
  return { files, totalSize, sharded: groups.length > 1 };
});
