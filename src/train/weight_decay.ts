/**
 * Which trainable tensors AdamW's decoupled weight decay applies to. As in transformers' Trainer
 * (so TRL): every weight except biases and normalisation weights, whose decay would only pull
 * the norms' gains and the biases towards zero without regularising anything. LoRA A and B are
 * decayed (PEFT trains them through the same Trainer rule).
 * @module
 */

/** The name patterns transformers' `get_decay_parameter_names` excludes (lower-cased names). */
const NO_DECAY: readonly RegExp[] = [
  /bias/,
  /layernorm/,
  /rmsnorm/,
  /(?:^|\.)norm(?:$|\.)/,
  /_norm(?:$|\.)/,
];

/** Whether weight decay applies to the trainable tensor called `name` (an HF tensor name). */
export const isDecayed = (name: string): boolean => {
  const n = name.toLowerCase();
  return !NO_DECAY.some((re) => re.test(n));
};
