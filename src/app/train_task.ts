/**
 * The task a `train` run's options describe: the built-in arithmetic task, or a prompt dataset
 * (`dataset`, `eval_dataset` / `eval_split`) with the model's chat template and the reward
 * functions named by `reward_funcs` (built-in names and user modules). Everything a run could
 * trip over later is checked here, before a run directory exists: every row, the template on
 * every prompt, each reward module's import and the columns the rewards need.
 * @module
 */
import { Effect } from "effect";
import { DatasetError } from "../io/dataset.ts";
import type { NamedReward } from "../grpo/rewards.ts";
import { type ChatTemplateError, loadChatTemplate } from "../tokenizer/chat_template.ts";
import { arithmeticGrpoTask } from "../task/arithmetic_task.ts";
import { ANSWER_COLUMNS, BUILTIN_REWARDS, builtinReward } from "../task/builtin_rewards.ts";
import {
  loadPromptDataset,
  type PromptDataset,
  splitDataset,
  stepsForEpochs,
} from "../task/dataset.ts";
import { datasetTask } from "../task/dataset_task.ts";
import { loadRewardModule, type RewardModuleError } from "../task/reward_module.ts";
import { isModuleSpec } from "../task/user_module.ts";
import type { Task } from "../task/task.ts";
import { type EnvironmentModuleError, loadEnvironmentModule } from "../task/environment_module.ts";
import { type TrainConfig, TrainConfigError } from "./config.ts";

/** Why a run's task cannot be set up. */
export type TrainTaskError =
  | TrainConfigError
  | DatasetError
  | ChatTemplateError
  | RewardModuleError
  | EnvironmentModuleError;

/** The built-in task's name as a `dataset` value. */
export const BUILTIN_DATASET = "arithmetic";

const invalid = (option: string, reason: string) =>
  Effect.fail(new TrainConfigError({ option, reason }));

/** `key=value` entries as template variables; values are JSON when they parse, else text. */
export const chatTemplateKwargsOf = (
  entries: readonly string[] | null,
): Effect.Effect<Record<string, unknown>, TrainConfigError> =>
  Effect.gen(function* () {
    const out: Record<string, unknown> = {};
    for (const e of entries ?? []) {
      const at = e.indexOf("=");
      if (at <= 0) {
        return yield* invalid(
          "chatTemplateKwargs",
          `option chatTemplateKwargs: got ${JSON.stringify(e)}; allowed: key=value entries`,
        );
      }
      const text = e.slice(at + 1);
      let value: unknown = text;
      try {
        value = JSON.parse(text);
      } catch {
        // plain text
      }
      out[e.slice(0, at).trim()] = value;
    }
    return out;
  });

/** The reward functions `reward_funcs` names, with the columns each needs. */
const resolveRewards = (
  specs: readonly string[],
  cfg: TrainConfig,
  cwd: string | undefined,
): Effect.Effect<
  { rewards: NamedReward[]; needs: { name: string; columns: readonly string[] }[] },
  TrainConfigError | RewardModuleError
> =>
  Effect.gen(function* () {
    const rewards: NamedReward[] = [];
    const needs: { name: string; columns: readonly string[] }[] = [];
    for (const spec of specs) {
      if (isModuleSpec(spec)) {
        const loaded = yield* loadRewardModule(spec, cwd);
        rewards.push(loaded.reward);
        needs.push({ name: spec, columns: loaded.columns });
        continue;
      }
      const r = builtinReward(spec, cfg.grpo);
      if (r === null) {
        return yield* invalid(
          "rewardFuncs",
          `option rewardFuncs: unknown reward function "${spec}"; allowed: ${
            BUILTIN_REWARDS.join(", ")
          }, or a module path (./my_reward.ts)`,
        );
      }
      rewards.push(r);
    }
    const names = rewards.map((r) => r.name);
    const twice = names.find((n, i) => names.indexOf(n) !== i);
    if (twice !== undefined) {
      return yield* invalid("rewardFuncs", `option rewardFuncs: "${twice}" is named twice`);
    }
    const w = cfg.grpo.rewardWeights;
    if (w !== null && w.length !== rewards.length) {
      return yield* invalid(
        "rewardWeights",
        `option rewardWeights: ${w.length} weights for ${rewards.length} reward functions`,
      );
    }
    return { rewards, needs };
  });

/** Fails when a dataset lacks a column the rewards need. */
const checkColumns = (
  ds: PromptDataset,
  rewards: readonly NamedReward[],
  needs: readonly { name: string; columns: readonly string[] }[],
): Effect.Effect<void, DatasetError> => {
  const missing = (column: string, who: string) =>
    Effect.fail(
      new DatasetError({
        path: ds.path,
        row: null,
        column,
        reason: `is missing; reward ${who} reads it (columns: ${ds.columns.join(", ")})`,
      }),
    );
  if (
    rewards.some((r) => r.name === "accuracy") &&
    !ANSWER_COLUMNS.some((c) => ds.columns.includes(c))
  ) {
    return missing(ANSWER_COLUMNS.join(" | "), "accuracy");
  }
  for (const n of needs) {
    const col = n.columns.find((c) => !ds.columns.includes(c));
    if (col !== undefined) return missing(col, n.name);
  }
  return Effect.void;
};

/** What setting up a task needs besides the options. */
export interface TrainTaskSettings {
  /** Directory reward module paths are relative to; default the process's. */
  readonly cwd?: string;
}

/**
 * The run's task, and its options with `steps` set from `num_train_epochs` when that is given.
 * Fails before anything is written when a dataset, template or reward is unusable.
 */
export const trainTaskOf = (
  cfg: TrainConfig,
  settings: TrainTaskSettings = {},
): Effect.Effect<{ task: Task; config: TrainConfig }, TrainTaskError> =>
  Effect.flatMap(
    singleTurnTaskOf(cfg, settings),
    ({ task, config }) =>
      cfg.environment === null
        ? Effect.succeed({ task, config })
        : Effect.map(loadEnvironmentModule(cfg.environment, settings.cwd), (environment) => ({
          // rollouts become episodes; the task's rewards see the whole episode
          task: {
            ...task,
            environment,
            limits: {
              maxTurns: cfg.maxTurns,
              ...(cfg.maxTurnTokens === null ? {} : { maxTurnTokens: cfg.maxTurnTokens }),
            },
          },
          config,
        })),
  );

/** The run's task without `environment`: the built-in task or a dataset's. */
const singleTurnTaskOf = (
  cfg: TrainConfig,
  settings: TrainTaskSettings,
): Effect.Effect<{ task: Task; config: TrainConfig }, TrainTaskError> =>
  Effect.gen(function* () {
    if (cfg.dataset === BUILTIN_DATASET) {
      if (cfg.numTrainEpochs !== null) {
        return yield* invalid(
          "numTrainEpochs",
          "option numTrainEpochs: the built-in task has no epochs (its problems are drawn " +
            "afresh); give steps",
        );
      }
      const builtin = arithmeticGrpoTask({ heldOutSize: cfg.evalSize });
      if (cfg.rewardFuncs === null) return { task: builtin, config: cfg };
      const { rewards } = yield* resolveRewards(cfg.rewardFuncs, cfg, settings.cwd);
      return { task: { ...builtin, rewards }, config: cfg };
    }
    if (cfg.model === null) {
      return yield* invalid(
        "model",
        `option model: dataset ${cfg.dataset} needs a model (--model DIR)`,
      );
    }
    const full = yield* loadPromptDataset(cfg.dataset);
    let train = full;
    let evalSet: PromptDataset | null = null;
    if (cfg.evalDataset !== null) {
      if (cfg.evalSplit > 0) {
        return yield* invalid("evalSplit", "option evalSplit: give it or evalDataset, not both");
      }
      evalSet = yield* loadPromptDataset(cfg.evalDataset);
      const col = full.columns.find((c) => !evalSet!.columns.includes(c));
      if (col !== undefined) {
        return yield* Effect.fail(
          new DatasetError({
            path: evalSet.path,
            row: null,
            column: col,
            reason: `is missing (the training set ${full.path} has it)`,
          }),
        );
      }
    } else if (cfg.evalSplit > 0) {
      ({ train, eval: evalSet } = yield* splitDataset(full, cfg.evalSplit, cfg.seed));
    }
    const specs = cfg.rewardFuncs ??
      (ANSWER_COLUMNS.some((c) => full.columns.includes(c)) ? ["accuracy"] : null);
    if (specs === null || specs.length === 0) {
      return yield* invalid(
        "rewardFuncs",
        `option rewardFuncs: dataset ${full.path} has no ${
          ANSWER_COLUMNS.join(" / ")
        } column for accuracy; name the reward functions (--reward-funcs ./my_reward.ts)`,
      );
    }
    const { rewards, needs } = yield* resolveRewards(specs, cfg, settings.cwd);
    yield* checkColumns(full, rewards, needs);
    const conversational = full.conversational || (evalSet?.conversational ?? false);
    const template = conversational || cfg.chatTemplatePath !== null
      ? yield* loadChatTemplate(cfg.model, cfg.chatTemplatePath)
      : null;
    const task = yield* datasetTask({
      train,
      eval: evalSet,
      rewards,
      rewardWeights: cfg.grpo.rewardWeights,
      chatTemplate: template,
      chatTemplateKwargs: yield* chatTemplateKwargsOf(cfg.chatTemplateKwargs),
      seed: cfg.seed,
      shuffle: cfg.shuffleDataset,
      evalSize: cfg.evalSize,
      maxPromptLength: cfg.maxPromptLength,
      baseModelDir: null,
    });
    const steps = cfg.numTrainEpochs === null
      ? cfg.steps
      : stepsForEpochs(cfg.numTrainEpochs, train.rows.length, cfg.promptsPerStep);
    return { task, config: { ...cfg, steps } };
  });
