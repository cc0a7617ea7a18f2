/**
 * A GRPO {@link Task} over a user's prompt dataset: prompts drawn epoch by epoch in a seeded
 * shuffled order, conversational prompts rendered with the model's chat template (and then
 * tokenized without adding special tokens, as TRL does), every column handed to the reward
 * functions, and a greedy evaluation on an eval set scored by the rewards.
 *
 * Every prompt is rendered when the task is made, so a row the template cannot take fails before
 * a run starts, naming the row.
 * @module
 */
import { Effect } from "effect";
import { generate } from "../model/generate.ts";
import { DatasetError, type DatasetRow } from "../io/dataset.ts";
import { type NamedReward, scoreRewards } from "../grpo/rewards.ts";
import { nanMean } from "../grpo/metrics.ts";
import { type PromptItem, promptTokens } from "../pipeline/stages.ts";
import type { ChatMessage, ChatTemplate } from "../tokenizer/chat_template.ts";
import { messageOf } from "../base/tagged_error.ts";
import { answerColumnOf } from "./builtin_rewards.ts";
import { epochSampler, type PromptDataset } from "./dataset.ts";
import type { Task, TaskEvaluation } from "./task.ts";

/** Settings of a dataset task. */
export interface DatasetTaskOptions {
  /** Shown in log lines; default the training file's path. */
  readonly name?: string;
  readonly train: PromptDataset;
  /** Evaluation rows; null = the first `evalSize` training rows (said so in the log line). */
  readonly eval: PromptDataset | null;
  /** The reward functions, in order. */
  readonly rewards: readonly NamedReward[];
  /** Their weights (TRL reward_weights); null = each function's own. */
  readonly rewardWeights?: readonly number[] | null;
  /** Renders conversational prompts; required when the dataset is conversational. */
  readonly chatTemplate: ChatTemplate | null;
  /** Extra template variables (TRL chat_template_kwargs, e.g. `{ enable_thinking: false }`). */
  readonly chatTemplateKwargs?: Readonly<Record<string, unknown>>;
  /**
   * Prepend the tokenizer's BOS to text (non-conversational) prompts. Default false, as TRL
   * tokenizes every prompt; true suits a base model pretrained with BOS-first text (the shipped
   * arithmetic model). Rendered conversations never get one: the template decides.
   */
  readonly addSpecialTokens?: boolean;
  /** Seed of the epoch order. */
  readonly seed: number;
  /** Shuffle each epoch (TRL shuffle_dataset); default true. */
  readonly shuffle?: boolean;
  /** Evaluation rows used at most; default 200. */
  readonly evalSize?: number;
  /** Prompt tokens kept (the last ones) in evaluation, as in training; null = all. */
  readonly maxPromptLength?: number | null;
  readonly baseModelDir: string | null;
}

/** The prompt items of a dataset: rendered prompt, reference answer (if any), the row. */
export const promptItems = (
  ds: PromptDataset,
  template: ChatTemplate | null,
  kwargs: Readonly<Record<string, unknown>> = {},
  addSpecialTokens = false,
): Effect.Effect<PromptItem[], DatasetError> =>
  Effect.gen(function* () {
    if (ds.conversational && template === null) {
      return yield* Effect.fail(
        new DatasetError({
          path: ds.path,
          row: null,
          column: "prompt",
          reason: "holds conversations, but the model has no chat template " +
            "(tokenizer_config.json chat_template; or give chat_template_path)",
        }),
      );
    }
    const answerColumn = answerColumnOf(ds.columns);
    const items: PromptItem[] = [];
    for (let i = 0; i < ds.rows.length; i++) {
      const row = ds.rows[i];
      const fail = (column: string, reason: string) =>
        Effect.fail(new DatasetError({ path: ds.path, row: i + 1, column, reason }));
      let prompt: string;
      if (ds.conversational) {
        let rendered: string | Error;
        try {
          rendered = template!.render(row.prompt as ChatMessage[], { kwargs });
        } catch (e) {
          rendered = new Error(messageOf(e));
        }
        if (typeof rendered !== "string") return yield* fail("prompt", rendered.message);
        prompt = rendered;
      } else prompt = row.prompt as string;
      let answer: string | null = null;
      if (answerColumn !== null) {
        const a = row[answerColumn];
        if (typeof a === "number" && Number.isFinite(a)) answer = String(a);
        else if (typeof a === "string") answer = a;
        else if (a !== null) {
          return yield* fail(answerColumn, `must be text, a number or null, got ${typeof a}`);
        }
      }
      items.push({
        prompt,
        answer,
        addSpecialTokens: !ds.conversational && addSpecialTokens,
        row,
      });
    }
    return items;
  });

/** Mean of the weighted rewards of greedy completions of the rows. */
const rewardEvaluation = (
  items: readonly PromptItem[],
  rewards: readonly NamedReward[],
  weights: readonly number[] | null,
  maxPromptLength: number | null,
  metric: string,
  detail: string,
  format: ((x: number) => string) | undefined,
): TaskEvaluation => ({
  metric,
  detail,
  format,
  run: (backend, { model, lora }, tok, maxTokens) =>
    Effect.gen(function* () {
      const gens = yield* generate(
        backend,
        model,
        items.map((p) => ({
          prompt: promptTokens(tok, p, maxPromptLength),
          maxTokens,
          stopTokenIds: [tok.eosId],
          temperature: 0,
          topP: 1,
          topK: 0,
          seed: 0,
        })),
        lora,
      );
      const table = yield* scoreRewards(
        rewards,
        gens.map((g) => tok.decode(g.tokens)),
        {
          prompts: items.map((p) => p.prompt),
          answers: items.map((p) => p.answer),
          completionIds: gens.map((g) => g.tokens),
          rows: items.map((p) => (p.row ?? null) as DatasetRow | null),
        },
        { rewardWeights: weights },
      );
      const mean = nanMean(table.combined);
      return Number.isNaN(mean) ? 0 : mean;
    }),
});

/** The dataset as a GRPO task (fails on a row the chat template cannot render). */
export const datasetTask = (o: DatasetTaskOptions): Effect.Effect<Task, DatasetError> =>
  Effect.gen(function* () {
    const kwargs = o.chatTemplateKwargs ?? {};
    const bos = o.addSpecialTokens ?? false;
    const train = yield* promptItems(o.train, o.chatTemplate, kwargs, bos);
    const evalSize = o.evalSize ?? 200;
    const evalItems = o.eval === null
      ? train.slice(0, evalSize)
      : (yield* promptItems(o.eval, o.chatTemplate, kwargs, bos)).slice(0, evalSize);
    const sampler = epochSampler(train.length, o.seed, o.shuffle ?? true);
    // accuracy alone when it is there (a share in [0, 1]); else the weighted reward sum
    const accuracy = o.rewards.find((r) => r.name === "accuracy");
    const evalRewards = accuracy !== undefined ? [accuracy] : o.rewards;
    const where = o.eval === null
      ? `first ${evalItems.length} training rows (no eval set given)`
      : `${evalItems.length} rows of ${o.eval.path}`;
    const evaluation = rewardEvaluation(
      evalItems,
      evalRewards,
      accuracy !== undefined ? null : o.rewardWeights ?? null,
      o.maxPromptLength ?? null,
      accuracy !== undefined ? "held-out accuracy" : "held-out mean reward",
      `${where}, greedy`,
      accuracy !== undefined ? undefined : (x) => x.toFixed(4),
    );
    return {
      name: o.name ?? o.train.path,
      prompts: (_rng, draw) =>
        train[sampler((draw.step - 1) * draw.promptsPerStep + draw.index).row],
      rewards: o.rewards,
      evaluation,
      baseModelDir: o.baseModelDir,
    };
  });
