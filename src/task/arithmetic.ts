/**
 * The built-in verifiable task: multi-digit addition ("57+38=" -> "95"). Rewards: exact match of
 * the answer, plus a small format reward (digits only, plausible length).
 *
 * The shipped base model is pretrained on a corpus in which a share of the answers to problems
 * with a carry DROP the carry: a systematic, realistic flaw that leaves it at a middling
 * accuracy and that an exact-match reward can teach it out of.
 * @module
 */
import type { NamedReward } from "../grpo/rewards.ts";
import { CharTokenizer } from "../tokenizer/tokenizer.ts";
import { Rng } from "../model/rng.ts";

/** Characters of the task's vocabulary. */
export const ARITHMETIC_ALPHABET = "0123456789+=";

/** The task's tokenizer: <pad>, <bos>, <eos>, digits, "+", "=". */
export const arithmeticTokenizer = (): CharTokenizer => new CharTokenizer(ARITHMETIC_ALPHABET);

/** One problem: prompt text (without BOS) and the exact expected completion. */
export interface Problem {
  readonly prompt: string;
  readonly answer: string;
}

const pad = (x: number, width: number): string => String(x).padStart(width, "0");

/**
 * The problem a + b in fixed width: operands zero-padded to `digits`, the answer to digits + 1
 * ("05+38=" -> "043"), so every digit has a fixed column.
 */
export const problem = (a: number, b: number, digits = 2): Problem => ({
  prompt: `${pad(a, digits)}+${pad(b, digits)}=`,
  answer: pad(a + b, digits + 1),
});

/** Whether a + b carries out of the units digit. */
export const hasCarry = (a: number, b: number): boolean => (a % 10) + (b % 10) >= 10;

/** The flawed answer: the carry out of the units column is forgotten. */
export const droppedCarryAnswer = (a: number, b: number, digits = 2): string =>
  pad(a + b - (hasCarry(a, b) ? 10 : 0), digits + 1);

/** Problem space of the task: operands with up to `digits` digits. */
export interface ArithmeticTask {
  readonly digits: number;
  /** Held-out problems, never drawn for training. */
  readonly heldOut: readonly Problem[];
  /** Draws a training problem (never a held-out one). */
  sample(rng: Rng): Problem;
}

/** The task with a fixed held-out set of `heldOutSize` problems chosen by `seed`. */
export const arithmeticTask = (digits = 2, heldOutSize = 200, seed = 1234): ArithmeticTask => {
  const max = 10 ** digits;
  const held = new Set<number>();
  const r = new Rng(seed);
  while (held.size < Math.min(heldOutSize, (max * max) / 2)) held.add(r.int(max * max));
  const heldOut = [...held].map((k) => problem(Math.floor(k / max), k % max, digits));
  return {
    digits,
    heldOut,
    sample: (rng) => {
      for (;;) {
        const k = rng.int(max * max);
        if (!held.has(k)) return problem(Math.floor(k / max), k % max, digits);
      }
    },
  };
};

/** Pretraining text for one problem: with probability `dropRate` a carry is dropped. */
export const corpusLine = (task: ArithmeticTask, rng: Rng, dropRate: number): Problem => {
  const p = task.sample(rng);
  const [a, b] = p.prompt.slice(0, -1).split("+").map(Number);
  return hasCarry(a, b) && rng.next() < dropRate
    ? { prompt: p.prompt, answer: droppedCarryAnswer(a, b, task.digits) }
    : p;
};

/** 1 when the completion is exactly the answer, else 0. */
export const exactMatchReward: NamedReward = {
  name: "exact_match",
  fn: (completions, ctx) =>
    completions.map((c, i) => (ctx.answers[i] === null ? null : c === ctx.answers[i] ? 1 : 0)),
};

/** 1 for a completion of exactly digits+1 digits and nothing else, else 0 (weighted lightly). */
export const formatReward = (digits: number, weight = 0.1): NamedReward => ({
  name: "format",
  weight,
  fn: (completions) =>
    completions.map((c) => (new RegExp(`^[0-9]{${digits + 1}}$`).test(c) ? 1 : 0)),
});
