/**
 * Held-out evaluation: exact-match accuracy of greedy (temperature 0) completions, the strict
 * measure reported before and after training.
 * @module
 */
import { Effect } from "effect";
import type { BackendShape } from "../backend/backend.ts";
import type { BackendError } from "../backend/ops.ts";
import type { DeviceModel, LoraRuntime } from "../model/decoder.ts";
import { generate } from "../model/generate.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import type { Problem } from "./arithmetic.ts";

/** Prompt token ids of a problem (BOS first when the tokenizer has one). */
export const promptIds = (tok: Tokenizer, p: Problem): number[] => [
  ...(tok.bosId === null ? [] : [tok.bosId]),
  ...tok.encode(p.prompt),
];

/** Share of problems whose greedy completion is exactly the answer followed by EOS. */
export const accuracy = (
  backend: BackendShape,
  model: DeviceModel,
  tok: Tokenizer,
  problems: readonly Problem[],
  maxTokens: number,
  lora: LoraRuntime | null = null,
): Effect.Effect<number, BackendError> =>
  Effect.map(
    generate(
      backend,
      model,
      problems.map((p) => ({
        prompt: promptIds(tok, p),
        maxTokens,
        stopTokenIds: [tok.eosId],
        temperature: 0,
        topP: 1,
        topK: 0,
        seed: 0,
      })),
      lora,
    ),
    (gens) => {
      let ok = 0;
      gens.forEach((g, i) => {
        if (g.finishReason === "stop" && tok.decode(g.tokens) === problems[i].answer) ok++;
      });
      return problems.length === 0 ? 0 : ok / problems.length;
    },
  );
