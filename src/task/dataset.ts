/**
 * Prompt datasets, as TRL's GRPOTrainer reads them: rows with a `prompt` column, either text
 * ("standard" format) or a list of `{ role, content }` messages ("conversational" format, rendered
 * with the model's chat template); every other column travels with the prompt to the reward
 * functions. Rows are drawn in epochs: each epoch visits every row once, in an order shuffled by
 * (seed, epoch), so a run and its resumption draw the same rows at the same steps.
 * @module
 */
import { Effect } from "effect";
import {
  checkRows,
  DatasetError,
  type DatasetFile,
  type DatasetRow,
  readDatasetFile,
} from "../io/dataset.ts";
import { Rng } from "../model/rng.ts";
import { checkMessages } from "../tokenizer/chat_template.ts";
import { messageOf } from "../base/tagged_error.ts";
import { RESERVED_REWARD_ARGS } from "./reward_module.ts";

/** A validated prompt dataset. */
export interface PromptDataset extends DatasetFile {
  /** Prompts are message lists (rendered with a chat template), not text. */
  readonly conversational: boolean;
}

/**
 * Checks a dataset's rows as prompts: a `prompt` column in every row, all text (non-empty) or
 * all conversations of `{ role, content }` messages, and no column named like a reward argument.
 */
export const promptDataset = (file: DatasetFile): Effect.Effect<PromptDataset, DatasetError> =>
  Effect.gen(function* () {
    const fail = (row: number | null, column: string | null, reason: string) =>
      Effect.fail(new DatasetError({ path: file.path, row, column, reason }));
    if (!file.columns.includes("prompt")) {
      return yield* fail(
        null,
        "prompt",
        `is missing (columns: ${file.columns.join(", ")}); every row needs a prompt`,
      );
    }
    const reserved = file.columns.find((c) => RESERVED_REWARD_ARGS.includes(c));
    if (reserved !== undefined) {
      return yield* fail(null, reserved, "is a reserved name (reward functions get it already)");
    }
    const conversational = Array.isArray(file.rows[0].prompt);
    for (let i = 0; i < file.rows.length; i++) {
      const p = file.rows[i].prompt;
      if (conversational) {
        if (!Array.isArray(p)) {
          return yield* fail(i + 1, "prompt", "is text, but row 1's is a list of messages");
        }
        let bad: string | null = null;
        try {
          checkMessages(p);
        } catch (e) {
          bad = messageOf(e).replace(/^chat template \(messages\): /, "");
        }
        if (bad !== null) return yield* fail(i + 1, "prompt", bad);
      } else if (typeof p !== "string") {
        return yield* fail(
          i + 1,
          "prompt",
          Array.isArray(p)
            ? "is a list of messages, but row 1's is text"
            : `must be text or a list of messages, got ${p === null ? "null" : typeof p}`,
        );
      } else if (p.length === 0) {
        return yield* fail(i + 1, "prompt", "is empty");
      }
    }
    return { ...file, conversational };
  });

/** Reads and checks a `.jsonl` or `.parquet` prompt dataset. */
export const loadPromptDataset = (path: string): Effect.Effect<PromptDataset, DatasetError> =>
  Effect.flatMap(readDatasetFile(path), promptDataset);

/** A prompt dataset of in-memory rows (e.g. built by a script), checked like a file's. */
export const promptDatasetOf = (
  name: string,
  rows: readonly DatasetRow[],
): Effect.Effect<PromptDataset, DatasetError> =>
  Effect.flatMap(checkRows(name, rows), promptDataset);

/** A seeded permutation of 0..n-1 (Fisher-Yates over the project's Rng). */
export const shuffledOrder = (n: number, seed: readonly number[]): number[] => {
  const order = Array.from({ length: n }, (_, i) => i);
  const rng = new Rng(seed);
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
};

/**
 * Splits off a seeded `fraction` of the rows as an evaluation set (at least one row each side).
 * Fails when the dataset is too small to split.
 */
export const splitDataset = (
  ds: PromptDataset,
  fraction: number,
  seed: number,
): Effect.Effect<{ train: PromptDataset; eval: PromptDataset }, DatasetError> => {
  const n = ds.rows.length;
  const k = Math.round(n * fraction);
  if (k < 1 || k >= n) {
    return Effect.fail(
      new DatasetError({
        path: ds.path,
        row: null,
        column: null,
        reason: `cannot hold out ${fraction} of ${n} rows (need at least one row each side)`,
      }),
    );
  }
  const order = shuffledOrder(n, [seed >>> 0, 0x5eed, 0xe7a1, 1]);
  const held = new Set(order.slice(0, k));
  return Effect.succeed({
    train: { ...ds, rows: ds.rows.filter((_, i) => !held.has(i)) },
    eval: { ...ds, path: `${ds.path} (held out)`, rows: ds.rows.filter((_, i) => held.has(i)) },
  });
};

/**
 * Which row the run's `position`-th draw takes: epoch `floor(position / n)` visits every row once,
 * in a (seed, epoch)-shuffled order (file order without shuffling).
 */
export const epochSampler = (
  n: number,
  seed: number,
  shuffle: boolean,
): (position: number) => { readonly epoch: number; readonly row: number } => {
  let cached: { epoch: number; order: number[] } | null = null;
  return (position) => {
    const epoch = Math.floor(position / n);
    const at = position - epoch * n;
    if (!shuffle) return { epoch, row: at };
    if (cached === null || cached.epoch !== epoch) {
      cached = { epoch, order: shuffledOrder(n, [seed >>> 0, epoch >>> 0, 0xda7a5e7, 3]) };
    }
    return { epoch, row: cached.order[at] };
  };
};

/** GRPO steps for `epochs` passes over `rows` prompts at `promptsPerStep` prompts a step. */
export const stepsForEpochs = (epochs: number, rows: number, promptsPerStep: number): number =>
  Math.max(1, Math.ceil((epochs * rows) / promptsPerStep));
