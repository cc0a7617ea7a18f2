/**
 * Weight push, measured: bytes written per push and push-to-verified latency (median of 5, after
 * one warm-up push) for the three ways a snapshot reaches an engine —
 *
 * - lora: PEFT adapter directory → POST /v1/load_lora_adapter → verification probe;
 * - full: HF checkpoint directory → pause → reload_weights → reset_prefix_cache → resume → probe;
 * - inprocess: the local engine takes the snapshot (LoRA: its own device adapter over the resident
 *   base, no weights uploaded; nothing crosses a process; nothing to verify);
 *
 * for the built-in model (assets/arithmetic-base) and a larger random one (hidden 512, 8 layers,
 * intermediate 1376, 8 heads, 8 KV heads, vocab 15; keys with the suffix _large). Servers are
 * the embedded one on the CPU backend, on loopback; the trainer side runs on the CPU backend.
 * LoRA: r 8, alpha 16, all seven projections, non-zero B.
 *
 *   deno run -A bench/push.ts   (writes bench/results/push.json)
 * @module
 */
import { Effect, Exit, Scope } from "effect";
import { copyFile, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type BackendShape, cpuBackend } from "../src/backend/backend.ts";
import { initLora, type LoraConfig } from "../src/lora/adapter.ts";
import type { ModelConfig } from "../src/model/config.ts";
import { loadModel, saveModel } from "../src/model/loader.ts";
import { loadTokenizer } from "../src/tokenizer/bpe.ts";
import { Rng } from "../src/model/rng.ts";
import { initWeights, PROJECTIONS, type WeightMap } from "../src/model/weights.ts";
import { makeLocalEngine } from "../src/rollout/local.ts";
import { Policy } from "../src/train/policy.ts";
import type { PushReport } from "../src/ports/push_target.ts";
import { BUILTIN_MODEL_DIR } from "../src/task/arithmetic_task.ts";
import { makeVllmClient } from "../src/vllm/client.ts";
import { makeFullPusher } from "../src/push/full.ts";
import { makeLoraPusher } from "../src/push/lora.ts";
import { discoverModelName } from "../src/app/server_layer.ts";
import { maxLoraRankFor, startEmbeddedServer } from "../src/app/embedded_server.ts";
import type { Snapshot } from "../src/snapshot/snapshot.ts";
import { defaultProbePrompt } from "../src/push/verify.ts";
import { Routing } from "../src/vllm/routing.ts";
import { median, writeResult } from "./common.ts";

const LORA: LoraConfig = {
  r: 8,
  alpha: 16,
  dropout: 0,
  targetModules: [...PROJECTIONS],
  useRslora: false,
};
const REPEATS = 5;

/** The larger configuration (random weights). */
export const largeConfig: ModelConfig = {
  modelType: "llama",
  hiddenSize: 512,
  intermediateSize: 1376,
  numLayers: 8,
  numHeads: 8,
  numKvHeads: 8,
  headDim: 64,
  rmsNormEps: 1e-5,
  ropeTheta: 10000,
  vocabSize: 15,
  maxPositionEmbeddings: 64,
  tieWordEmbeddings: false,
  attentionBias: false,
  bosTokenId: 1,
  eosTokenIds: [2],
};

interface Model {
  readonly dir: string;
  readonly config: ModelConfig;
  readonly weights: WeightMap;
}

type Kind = "lora" | "full" | "inprocess";

/** Pushes warm-up + REPEATS snapshots one way; returns the reports of the timed pushes. */
const measure = (backend: BackendShape, model: Model, kind: Kind, root: string) =>
  Effect.scoped(Effect.gen(function* () {
    const tokenizer = yield* loadTokenizer(model.dir);
    const init = initLora(model.config, LORA, 1);
    const rng = new Rng(7);
    for (const { b } of init.modules.values()) {
      for (let i = 0; i < b.data.length; i++) b.data[i] = (rng.next() - 0.5) * 0.02;
    }
    const policy = yield* Policy.make(backend, model.config, model.weights, {
      mode: "lora",
      lora: LORA,
      seed: 1,
      optimizer: {
        learningRate: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weightDecay: 0,
        maxGradNorm: 1,
      },
    }, init);
    const snapshotAt = (v: number): Effect.Effect<Snapshot, unknown> => {
      policy.version = v;
      return policy.snapshot();
    };
    let push: (s: Snapshot) => Effect.Effect<PushReport, unknown>;
    if (kind === "inprocess") {
      const { target } = yield* makeLocalEngine(backend, 0);
      push = target.push;
    } else {
      const server = yield* startEmbeddedServer({
        modelDir: model.dir,
        backend: "cpu",
        maxLoraRank: maxLoraRankFor(LORA.r),
      });
      const client = makeVllmClient(server.url);
      const common = {
        client,
        backend,
        routing: new Routing(),
        root: join(root, kind),
        verify: {
          policy: "fail" as const,
          tolerance: 1e-3,
          probePrompt: defaultProbePrompt(tokenizer),
          probeTokens: 4,
        },
        target: `bench-${kind}`,
      };
      push = kind === "lora"
        ? makeLoraPusher({ ...common, baseModel: model.dir, keepLoaded: 2 }).push
        : makeFullPusher({ ...common, modelName: yield* discoverModelName(client), keepDirs: 2 })
          .push;
    }
    const reports: PushReport[] = [];
    for (let v = 0; v <= REPEATS; v++) {
      const snap = yield* snapshotAt(v);
      const r = yield* push(snap);
      if (v > 0) reports.push(r); // v0 warms up the server, the kernels and the JIT
    }
    return reports;
  }));

/** Runs the bench; keys push_{bytes,latency_ms}_{lora,full,inprocess}[_large] and the verify diffs. */
export async function run(): Promise<Record<string, number>> {
  const backend = cpuBackend();
  const root = await mkdtemp(join(tmpdir(), "lorafold-push-bench-"));
  const out: Record<string, number> = {};
  try {
    const builtin = await Effect.runPromise(loadModel(BUILTIN_MODEL_DIR));
    const largeDir = join(root, "large-model");
    const largeWeights = initWeights(largeConfig, 3, 0.02);
    await Effect.runPromise(saveModel(largeDir, largeConfig, largeWeights));
    await copyFile(join(BUILTIN_MODEL_DIR, "tokenizer.json"), join(largeDir, "tokenizer.json"));
    const models: [string, Model][] = [
      ["", { dir: BUILTIN_MODEL_DIR, ...builtin }],
      ["_large", { dir: largeDir, config: largeConfig, weights: largeWeights }],
    ];
    for (const [suffix, model] of models) {
      for (const kind of ["lora", "full", "inprocess"] as const) {
        const scope = await Effect.runPromise(Scope.make());
        try {
          const reports = await Effect.runPromise(
            Scope.provide(scope)(
              measure(backend, model, kind, join(root, `pushes${suffix}`)),
            ) as Effect.Effect<
              PushReport[]
            >,
          );
          out[`push_bytes_${kind}${suffix}`] = median(reports.map((r) => r.bytes));
          out[`push_latency_ms_${kind}${suffix}`] = +median(reports.map((r) => r.latencyMs))
            .toFixed(2);
          if (kind !== "inprocess") {
            out[`verify_logp_diff_max_${kind}${suffix}`] = Math.max(
              ...reports.map((r) => r.logpDiffMax ?? NaN),
            );
          }
          console.log(
            `${kind}${suffix}: ${out[`push_bytes_${kind}${suffix}`]} bytes, ${
              out[`push_latency_ms_${kind}${suffix}`]
            } ms`,
          );
        } finally {
          await Effect.runPromise(Scope.close(scope, Exit.void));
        }
      }
    }
    const params = (w: WeightMap) => [...w.values()].reduce((n, t) => n + t.data.length, 0);
    out.parameters = params(builtin.weights);
    out.parameters_large = params(largeWeights);
    out.lora_r = LORA.r;
    out.repeats = REPEATS;
  } finally {
    await rm(root, { recursive: true, force: true });
  }
  return out;
}

if (import.meta.main) {
  const results = await run();
  console.log(await writeResult("push", results));
}
