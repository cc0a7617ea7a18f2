/**
 * Reward functions a run names on the command line (`--reward-funcs accuracy,think_format`):
 *
 * - `accuracy`: 1 when the completion's answer equals the reference, else 0; null where the row
 *   has no reference. The answer is the last `\boxed{...}`, else the last `<answer>...</answer>`,
 *   else the last number; numbers compare numerically (`1,000` = `1000.0`), other answers as
 *   trimmed text. The reference (the `answer`, `solution` or `ground_truth` column) is its
 *   `\boxed{}`, its `<answer>`, what follows GSM8K's `####`, or else the whole text, so GSM8K's
 *   `... #### 72`, MATH's `\boxed{72}` and a bare `72` all work.
 * - `think_format`: 1 when the completion is `<think>...</think>` then the answer (TRL's
 *   `think_format_reward`).
 * - `think_answer_format`: 1 for `<think>...</think>` then `<answer>...</answer>` and nothing else.
 * - `length`: TRL's soft overlong punishment: 0 up to 80% of max_completion_length tokens, then
 *   falling linearly to -1 at the limit.
 * @module
 */
import type { NamedReward } from "../grpo/rewards.ts";

/** Columns, in order of preference, that hold a row's reference answer. */
export const ANSWER_COLUMNS: readonly string[] = ["answer", "solution", "ground_truth"];

/** The reference answer column of a dataset's columns, if it has one. */
export const answerColumnOf = (columns: readonly string[]): string | null =>
  ANSWER_COLUMNS.find((c) => columns.includes(c)) ?? null;

/** Content of the last `\boxed{...}` (braces balanced), or null. */
export const lastBoxed = (text: string): string | null => {
  const at = text.lastIndexOf("\\boxed");
  if (at < 0) return null;
  let i = at + "\\boxed".length;
  while (text[i] === " ") i++;
  if (text[i] !== "{") return null;
  let depth = 0;
  for (let j = i; j < text.length; j++) {
    if (text[j] === "{") depth++;
    else if (text[j] === "}" && --depth === 0) return text.slice(i + 1, j);
  }
  return null;
};

const NUMBER = /-?\d[\d,]*(?:\.\d+)?|-?\.\d+/g;

/** The last number in the text (thousands separators dropped), or null. */
export const lastNumber = (text: string): number | null => {
  const all = text.match(NUMBER);
  if (all === null) return null;
  const n = Number(all[all.length - 1].replace(/,/g, ""));
  return Number.isFinite(n) ? n : null;
};

/** The answer a text gives: boxed, else in <answer> tags, else its last number; null if none. */
export const extractAnswer = (text: string): string | null => {
  const boxed = lastBoxed(text);
  if (boxed !== null) return boxed.trim();
  const tagged = [...text.matchAll(/<answer>([\s\S]*?)<\/answer>/g)].at(-1);
  if (tagged !== undefined) return tagged[1].trim();
  const n = lastNumber(text);
  return n === null ? null : String(n);
};

const normalize = (s: string): string =>
  s.replace(/\$/g, "").replace(/\\(?:text|mathrm)\{([^}]*)\}/g, "$1").replace(/\s+/g, "")
    .replace(/\.$/, "");

/** Whether two extracted answers agree: numerically when both are numbers, else as text. */
export const answersMatch = (got: string, want: string): boolean => {
  const a = normalize(got);
  const b = normalize(want);
  const x = Number(a.replace(/,/g, ""));
  const y = Number(b.replace(/,/g, ""));
  if (a !== "" && b !== "" && Number.isFinite(x) && Number.isFinite(y)) {
    return Math.abs(x - y) <= 1e-6 * Math.max(1, Math.abs(y));
  }
  return a === b;
};

/** The reference of a row: boxed, else in <answer> tags, else after GSM8K's `####`, else all. */
const referenceOf = (raw: string): string => {
  const boxed = lastBoxed(raw);
  if (boxed !== null) return boxed.trim();
  const tagged = [...raw.matchAll(/<answer>([\s\S]*?)<\/answer>/g)].at(-1);
  if (tagged !== undefined) return tagged[1].trim();
  const hash = raw.lastIndexOf("####");
  return (hash >= 0 ? raw.slice(hash + 4) : raw).trim();
};

/** `accuracy`: exact (or numeric) answer match against the row's reference. */
export const accuracyReward: NamedReward = {
  name: "accuracy",
  fn: (completions, ctx) =>
    completions.map((c, i) => {
      const want = ctx.answers[i];
      if (want === null) return null;
      const got = extractAnswer(c);
      return got !== null && answersMatch(got, referenceOf(want)) ? 1 : 0;
    }),
};

const THINK = /^<think>(?![\s\S]*<think>)[\s\S]*?<\/think>[\s\S]*$/;
const THINK_ANSWER = /^<think>\n?[\s\S]*?\n?<\/think>\s*<answer>\n?[\s\S]*?\n?<\/answer>\s*$/;

/** `think_format`: reasoning in one leading `<think>...</think>` block. */
export const thinkFormatReward: NamedReward = {
  name: "think_format",
  fn: (completions) => completions.map((c) => (THINK.test(c) ? 1 : 0)),
};

/** `think_answer_format`: `<think>...</think>` then `<answer>...</answer>`, nothing else. */
export const thinkAnswerFormatReward: NamedReward = {
  name: "think_answer_format",
  fn: (completions) => completions.map((c) => (THINK_ANSWER.test(c) ? 1 : 0)),
};

/**
 * `length`: TRL's soft overlong punishment with a buffer of a fifth of the budget: 0 up to
 * `max - buffer` tokens, `(max - buffer - L) / buffer` above, -1 past `max`.
 */
export const lengthReward = (maxCompletionLength: number): NamedReward => {
  const buffer = Math.max(1, Math.floor(maxCompletionLength / 5));
  const free = maxCompletionLength - buffer;
  return {
    name: "length",
    fn: (completions, ctx) =>
      completions.map((_, i) => {
        const ids = ctx.completionIds?.[i];
        if (ids === undefined) return null;
        const L = ids.length;
        return L <= free ? 0 : L <= maxCompletionLength ? (free - L) / buffer : -1;
      }),
  };
};

/** Names of the built-in reward functions. */
export const BUILTIN_REWARDS: readonly string[] = [
  "accuracy",
  "think_format",
  "think_answer_format",
  "length",
];

/** The built-in reward named `name`, or null. */
export const builtinReward = (
  name: string,
  settings: { readonly maxCompletionLength: number },
): NamedReward | null => {
  switch (name) {
    case "accuracy":
      return accuracyReward;
    case "think_format":
      return thinkFormatReward;
    case "think_answer_format":
      return thinkAnswerFormatReward;
    case "length":
      return lengthReward(settings.maxCompletionLength);
    default:
      return null;
  }
};
