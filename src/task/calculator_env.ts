/**
 * A tool-using task on the built-in arithmetic model: sums of three two-digit numbers
 * ("47+20+49=" -> "116"), which the model was never taught (it is pretrained on two-number sums
 * only), and a calculator environment it can call instead.
 *
 * The call protocol fits what this model can emit: its vocabulary is digits, "+", "=" and
 * EOS, and right after "=" it only ever writes digits or ends its turn (a pretrained model puts
 * next to no mass on "+" or "=" there, so a "+"- or "="-marked call would never be explored). So
 * a turn that writes nothing, just ends, asks the calculator; it answers the last sum in the
 * context with its digits (tool output, masked out of the loss), and the model's next turn ends
 * the episode: it should end at once, leaving the calculator's answer as its own. A turn with
 * digits is a direct answer and ends the episode. The reward is exact match on the whole
 * episode's text, so a direct answer and a called-and-accepted one score alike, and digits
 * written after the calculator's answer spoil it.
 * @module
 */
import { Effect } from "effect";
import type { BackendShape } from "../backend/backend.ts";
import type { BackendError } from "../backend/ops.ts";
import type { DeviceModel, LoraRuntime } from "../model/decoder.ts";
import { generate } from "../model/generate.ts";
import { Rng } from "../model/rng.ts";
import { expandRequests } from "../rollout/local.ts";
import { type NamedReward, RewardError } from "../grpo/rewards.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import {
  type Environment,
  type EnvironmentError,
  type EpisodeLimits,
  type EpisodeSpec,
  runEpisodes,
} from "../pipeline/multi_turn.ts";
import { type PromptItem, promptTokens } from "../pipeline/stages.ts";
import { BUILTIN_MODEL_DIR } from "./arithmetic_task.ts";
import type { Problem } from "./arithmetic.ts";
import type { Task } from "./task.ts";

/** The sum of the last "a+b+..." expression in `text` (digits and "+"), or null when none. */
export const lastSum = (text: string): number | null => {
  const all = [...text.matchAll(/\d+(?:\+\d+)+/g)];
  const last = all.at(-1);
  return last ? last[0].split("+").reduce((a, x) => a + Number(x), 0) : null;
};

/** Options of {@link calculatorEnvironment}. */
export interface CalculatorOptions {
  /** Digits of the calculator's answer, zero-padded (default 3: the task's answer width). */
  readonly width?: number;
}

/**
 * The calculator: an empty turn (the model ended it without writing) is a call, answered with
 * the last sum of the prompt and episode so far; any other turn, or the turn after an answer,
 * ends the episode.
 */
export const calculatorEnvironment = (
  tokenizer: Tokenizer,
  options: CalculatorOptions = {},
): Environment => {
  const width = options.width ?? 3;
  return {
    name: "calculator",
    reset: (item: PromptItem) =>
      Effect.sync(() => {
        let answered = false;
        return {
          step: (turn) =>
            Effect.sync(() => {
              const wrote = turn.tokens.some((t) => t !== tokenizer.eosId);
              if (answered || wrote || turn.finishReason !== "stop") {
                return { observation: [], done: true };
              }
              const context = item.prompt + tokenizer.decode(turn.episode);
              const sum = lastSum(context);
              if (sum === null) return { observation: [], done: true };
              answered = true;
              return { observation: String(sum).padStart(width, "0"), done: false };
            }),
        };
      }),
  };
};

/** Three-operand problems with `digits`-digit operands; the answer zero-padded to digits + 1. */
export const threeSumProblem = (a: number, b: number, c: number, digits = 2): Problem => {
  const pad = (x: number, w: number) => String(x).padStart(w, "0");
  return {
    prompt: `${pad(a, digits)}+${pad(b, digits)}+${pad(c, digits)}=`,
    answer: pad(a + b + c, digits + 1),
  };
};

/** A problem of the three-sum task from a random stream. */
const drawProblem = (rng: Rng, digits: number): Problem => {
  const max = 10 ** digits;
  return threeSumProblem(rng.int(max), rng.int(max), rng.int(max), digits);
};

/** 1 when the whole episode's text is exactly the answer (however it got there), else 0. */
export const episodeExactMatch: NamedReward = {
  name: "exact_match",
  fn: (completions, ctx) =>
    completions.map((c, i) => (ctx.answers[i] === null ? null : c === ctx.answers[i] ? 1 : 0)),
};

/** Episode limits of the calculator task: a call, its answer, a closing turn. */
export const calculatorLimits: EpisodeLimits = {
  maxTurns: 3,
  maxTurnTokens: 4,
  maxEpisodeTokens: 10,
};

/**
 * Mean exact match of greedy episodes with the calculator (the multi-turn loop on the model
 * itself, no rollout engine).
 */
export const episodeAccuracy = (
  backend: BackendShape,
  model: DeviceModel,
  lora: LoraRuntime | null,
  tokenizer: Tokenizer,
  problems: readonly Problem[],
  limits: EpisodeLimits = calculatorLimits,
): Effect.Effect<number, BackendError | EnvironmentError> =>
  Effect.gen(function* () {
    const specs: EpisodeSpec[] = problems.map((p) => {
      const item: PromptItem = { prompt: p.prompt, answer: p.answer };
      const prompt = promptTokens(tokenizer, item);
      return {
        item,
        prompt,
        request: {
          prompt,
          n: 1,
          maxTokens: limits.maxTurnTokens,
          temperature: 0,
          topP: 1,
          topK: 0,
          seed: 0,
          stopTokenIds: [tokenizer.eosId],
        },
      };
    });
    const { episodes } = yield* runEpisodes(
      (requests) =>
        generate(backend, model, expandRequests(requests), lora).pipe(
          Effect.map((gens) => ({
            completions: gens.map((g) => [{
              tokens: g.tokens,
              logprobs: g.processedLogprobs,
              finishReason: g.finishReason,
            }]),
            policyVersion: 0,
          })),
        ),
      calculatorEnvironment(tokenizer),
      tokenizer,
      specs,
      limits,
    );
    let ok = 0;
    episodes.forEach((ep, i) => {
      if (ep.finish === "stop" && tokenizer.decode(ep.tokens) === problems[i].answer) ok++;
    });
    return problems.length === 0 ? 0 : ok / problems.length;
  });

/** A calculator task: the GRPO {@link Task} with its environment and episode limits. */
export interface CalculatorTask extends Task {
  readonly environment: Environment;
  readonly limits: EpisodeLimits;
  /** Held-out problems (never drawn for training). */
  readonly heldOut: readonly Problem[];
}

/**
 * The three-sum task with the calculator, on the built-in model. Held-out problems are drawn
 * from a stream of their own and skipped in training. `runTraining` rolls it out multi-turn
 * through its `environment` and `limits`; examples/calculator_tool.ts composes the stages itself.
 */
export const calculatorTask = (
  tokenizer: Tokenizer,
  options: { readonly heldOutSize?: number; readonly seed?: number } = {},
): CalculatorTask => {
  const r = new Rng(options.seed ?? 4321);
  const held = new Map<string, Problem>();
  while (held.size < (options.heldOutSize ?? 100)) {
    const p = drawProblem(r, 2);
    held.set(p.prompt, p);
  }
  const heldOut = [...held.values()];
  const environment = calculatorEnvironment(tokenizer);
  return {
    name: "three-sum-calculator",
    prompts: (rng) => {
      for (;;) {
        const p = drawProblem(rng, 2);
        if (!held.has(p.prompt)) return p;
      }
    },
    rewards: [episodeExactMatch],
    evaluation: {
      metric: "held-out episode exact match with the calculator",
      detail: `${heldOut.length} problems, greedy`,
      run: (backend, { model, lora }, tok) =>
        Effect.catchTag(
          episodeAccuracy(backend, model, lora, tok, heldOut),
          "EnvironmentError",
          (e) =>
            Effect.fail(
              new RewardError({ reward: "*", reason: `evaluation: ${e.message}`, cause: e }),
            ),
        ),
    },
    baseModelDir: BUILTIN_MODEL_DIR,
    environment,
    limits: calculatorLimits,
    heldOut,
  };
};
