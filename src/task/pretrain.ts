/**
 * Pretraining of the built-in base model: supervised next-token training (full fine-tuning,
 * cross-entropy on the answer tokens) on the flawed arithmetic corpus, stopped once held-out
 * accuracy reaches a middling target. Deterministic for a seed.
 * @module
 */
import { Effect } from "effect";
import type { BackendShape } from "../backend/backend.ts";
import type { ModelConfig } from "../model/config.ts";
import { initWeights, type WeightMap } from "../model/weights.ts";
import { Rng } from "../model/rng.ts";
import { meanNllLoss, Policy } from "../train/policy.ts";
import { mergedWeights, snapshotModel } from "../snapshot/snapshot.ts";
import { arithmeticTask, arithmeticTokenizer, corpusLine } from "./arithmetic.ts";
import { accuracy, promptIds } from "./evaluate.ts";

/** The built-in base model's architecture. */
export const builtinConfig = (vocabSize: number): ModelConfig => ({
  modelType: "llama",
  hiddenSize: 64,
  intermediateSize: 192,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 16,
  rmsNormEps: 1e-5,
  ropeTheta: 10000,
  vocabSize,
  maxPositionEmbeddings: 32,
  tieWordEmbeddings: false,
  attentionBias: false,
  bosTokenId: 1,
  eosTokenIds: [2],
});

/** Pretraining settings. */
export interface PretrainOptions {
  readonly seed: number;
  readonly maxSteps: number;
  readonly batchSize: number;
  readonly learningRate: number;
  /** Share of carry problems whose corpus answer drops the carry. */
  readonly dropRate: number;
  /** Stop when greedy held-out accuracy reaches at least this. */
  readonly targetAccuracy: number;
  readonly evalEvery: number;
  readonly log: (line: string) => void;
}

/** Runs pretraining; returns the weights and the held-out accuracy reached. */
export const pretrain = Effect.fn("pretrain")(
  function* (backend: BackendShape, o: PretrainOptions) {
    const tok = arithmeticTokenizer();
    const task = arithmeticTask();
    const config = builtinConfig(tok.vocabSize);
    const base: WeightMap = initWeights(config, o.seed);
    const policy = yield* Policy.make(backend, config, base, {
      mode: "full",
      seed: o.seed,
      optimizer: {
        learningRate: o.learningRate,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weightDecay: 0.01,
        maxGradNorm: 1,
      },
    });
    const rng = new Rng(o.seed + 99);
    let acc = 0;
    let step = 0;
    const evalNow = Effect.gen(function* () {
      const { model, lora } = yield* snapshotModel(yield* policy.snapshot(), backend);
      return yield* accuracy(backend, model, tok, task.heldOut, task.digits + 2, lora);
    }).pipe(Effect.scoped);
    while (step < o.maxSteps) {
      const seqs = Array.from({ length: o.batchSize }, () => {
        const p = corpusLine(task, rng, o.dropRate);
        return { prompt: promptIds(tok, p), completion: [...tok.encode(p.answer), tok.eosId] };
      });
      const stats = yield* policy.step(seqs, 1, meanNllLoss);
      step++;
      if (step % o.evalEvery === 0) {
        acc = yield* evalNow;
        o.log(
          `pretrain step ${step}: loss ${stats.loss.toFixed(4)} held-out accuracy ${
            (acc * 100).toFixed(1)
          }%`,
        );
        if (acc >= o.targetAccuracy) break;
      }
    }
    const snap = yield* policy.snapshot();
    const weights = yield* mergedWeights(snap);
    return { config, weights, accuracy: acc, steps: step, tokenizer: tok };
  },
  Effect.scoped,
);
