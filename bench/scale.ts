/**
 * Real-size models: SmolLM2-135M and Qwen2.5-0.5B built from their published config.json with
 * random weights (nothing is downloaded), measured on the WebGPU and CPU backends and against a
 * PyTorch peer (bench/scale_torch.py) with the same shapes, in one run:
 *
 * - `logprobs`: completion log-probs without gradients, batch 8 × (64 prompt + 64 completion);
 * - `lora_train`: one LoRA step (forward + backward + AdamW), same batch, r=16 on all 7
 *   projections;
 * - `generate_b8` / `generate_b64`: KV-cached greedy generation of 32 new tokens for 8 / 64
 *   sequences with a 64-token prompt (new tokens per second, prefill included), adapters active;
 * - `snapshot`: `policy.snapshot()` after one step (out-of-place fold, host copy, digest);
 * - peak RSS of the process that ran them.
 *
 * Each (model, backend) runs as its own child process (`--child <model> <backend>`), so a
 * failure (an error, a crash, a time-out) is recorded as `null` plus `<model>_<backend>_error`
 * and the others still run, and so its peak RSS (VmHWM) is its own. Children report after every
 * measurement, so a child that dies keeps what it measured. A time budget (default 2100 s for
 * the whole bench, `--budget-s N` or SCALE_BUDGET_S) keeps the run bounded: a measurement whose
 * estimated time does not fit is skipped and recorded as such. Also: WebGPU 1024³ matmul vs
 * numpy's OpenBLAS (the two OPENBLAS_* variables unset for that child only). The pairs whose
 * ratios are bars (SmolLM2 vs torch, matmul vs OpenBLAS) run in alternating rounds, and each ratio
 * is the median of its rounds' back-to-back ratios: the machine's speed drifts over the minutes
 * between two children (OpenBLAS seen at 210 and 362 GFLOP/s in two runs of one machine).
 *
 * Run: deno run -A bench/scale.ts (writes bench/results/scale.json); `--models smollm2_135m
 * --backends torch,webgpu --out scale_smollm2` runs only those children (and writes that topic);
 * `--only <measure,...>` on a child runs only those measurements. One child alone, with its
 * own budget: deno run -A bench/scale.ts --child qwen25_05b webgpu --budget-s 720 --out
 * scale_qwen25_05b_webgpu (writes bench/results/scale_qwen25_05b_webgpu.json). Memory of the 16-bit frozen
 * base: deno run -A bench/scale.ts --memory qwen25_05b webgpu bf16 --train (or f32; see
 * memoryChild).
 * @module
 */
import { Effect, Exit, Scope } from "effect";
import {
  type BackendShape,
  cpuBackend,
  generate,
  type GenerationRequest,
  initLora,
  initWeights,
  type LoraConfig,
  type ModelConfig,
  type Ops,
  parseHfConfig,
  Policy,
  PROJECTIONS,
  Rng,
  uploadLora,
  webgpuBackend,
} from "../mod.ts";
import { openblas, peerEnv, writeResult } from "./common.ts";
import { meanNllLoss } from "../src/train/policy.ts";
import { type HalfFormat, roundToHalfBits } from "../src/io/safetensors.ts";
import { type BaseTensor, type BaseWeightMap, weightSpecs } from "../src/model/weights.ts";

type Value = number | string | null;
type Results = Record<string, Value>;

/** The published config.json of each model (fields as in the Hugging Face files). */
export const MODELS = {
  smollm2_135m: {
    hf: {
      architectures: ["LlamaForCausalLM"],
      model_type: "llama",
      attention_bias: false,
      bos_token_id: 0,
      eos_token_id: 0,
      head_dim: 64,
      hidden_act: "silu",
      hidden_size: 576,
      intermediate_size: 1536,
      max_position_embeddings: 8192,
      num_attention_heads: 9,
      num_hidden_layers: 30,
      num_key_value_heads: 3,
      rms_norm_eps: 1e-5,
      rope_scaling: null,
      rope_theta: 100000,
      tie_word_embeddings: true,
      vocab_size: 49152,
    },
    parameters: 134_515_008,
  },
  qwen25_05b: {
    hf: {
      architectures: ["Qwen2ForCausalLM"],
      model_type: "qwen2",
      bos_token_id: 151643,
      eos_token_id: 151643,
      hidden_act: "silu",
      hidden_size: 896,
      intermediate_size: 4864,
      max_position_embeddings: 32768,
      max_window_layers: 24,
      num_attention_heads: 14,
      num_hidden_layers: 24,
      num_key_value_heads: 2,
      rms_norm_eps: 1e-6,
      rope_theta: 1000000,
      sliding_window: 32768,
      tie_word_embeddings: true,
      use_sliding_window: false,
      vocab_size: 151936,
    },
    parameters: 494_032_768,
  },
} as const;
type ModelName = keyof typeof MODELS;
const MODEL_NAMES = Object.keys(MODELS) as ModelName[];
type BackendName = "webgpu" | "cpu";

/** Shapes shared with bench/scale_torch.py (passed to it on the command line). */
export const SHAPES = {
  batch: 8,
  prompt: 64,
  completion: 64,
  genPrompt: 64,
  genNew: 32,
  genBatches: [8, 64],
  loraR: 16,
  loraAlpha: 32,
} as const;

export const LORA: LoraConfig = {
  r: SHAPES.loraR,
  alpha: SHAPES.loraAlpha,
  dropout: 0,
  targetModules: PROJECTIONS,
  useRslora: false,
};

/** The bench's LoRA policy (AdamW at lr 1e-5, clip 1) over `base`, held by the current scope. */
export const loraPolicy = (
  backend: BackendShape,
  config: ModelConfig,
  base: BaseWeightMap,
  gradientCheckpointing: boolean,
) =>
  Policy.make(backend, config, base, {
    mode: "lora",
    lora: LORA,
    seed: 1,
    optimizer: {
      learningRate: 1e-5,
      beta1: 0.9,
      beta2: 0.999,
      eps: 1e-8,
      weightDecay: 0,
      maxGradNorm: 1,
      gradientCheckpointing,
    },
  });

/** In the order a child runs them: cheapest first, so a tight budget drops the dearest. */
const MEASURES = [
  "logprobs_tokens_per_s",
  "snapshot_ms",
  "generate_b8_tokens_per_s",
  "lora_train_tokens_per_s",
  "generate_b64_tokens_per_s",
] as const;

const DEFINITIONS = "logprobs and lora_train: batch 8 x (64 prompt + 64 completion) tokens per " +
  "second of wall time (1,024 tokens per call; logits for the 512 completion-predicting rows; " +
  "lora_train = forward + entropy + backward + clip + AdamW on LoRA r=16 alpha=32, all 7 " +
  "projections); generate_bN: N sequences x 32 new tokens, greedy, 64-token prompt, KV cache, " +
  "unmerged adapters active, new tokens per second including prefill; snapshot_ms: " +
  "policy.snapshot() of the LoRA policy (fold + host copy + SHA-256 digest; torch: out-of-place " +
  "fold + SHA-256 + finite check), on webgpu and cpu the median of up to 9 timed runs " +
  "(`_snapshot_ms_runs`), torch one; peak_rss_mib: VmHWM of the child process that ran that " +
  "(model, backend); each figure is the best of `repetitions` timed runs after one warm-up " +
  "(logprobs: full size on webgpu, which compiles its kernels then, and torch, batch 1 on cpu; " +
  "lora_train: full size on webgpu and torch, batch 1 on cpu; generation: the same batch with an 8-token prompt and 2 new tokens); " +
  "SmolLM2 torch and webgpu children run in alternating rounds (`_rounds`), each figure the " +
  "best of its rounds; a `_vs_torch_..._ratio` is the median over rounds of webgpu round i / " +
  "torch round i (`_ratio_rounds` lists them), as is the matmul vs OpenBLAS ratio";

const round = (x: number, d = 2): number => Math.round(x * 10 ** d) / 10 ** d;

const describe = (e: unknown): string => {
  const tag = (e as { _tag?: unknown })?._tag;
  const msg = e instanceof Error ? e.message : typeof e === "string" ? e : JSON.stringify(e);
  const s = (typeof tag === "string" && !msg.includes(tag) ? `${tag}: ` : "") + msg;
  return s.replace(/\s+/g, " ").slice(0, 400);
};

/** Peak resident set (VmHWM) of this process, MiB. */
const peakRssMib = (): number | null => {
  try {
    const m = /VmHWM:\s+(\d+)\s+kB/.exec(Deno.readTextFileSync("/proc/self/status"));
    return m ? round(Number(m[1]) / 1024, 1) : null;
  } catch {
    return null;
  }
};

const modelConfig = async (name: ModelName): Promise<ModelConfig> =>
  await Effect.runPromise(parseHfConfig(MODELS[name].hf));

// ---- child: one (model, backend) ------------------------------------------------------------

const MARK = "SCALE_RESULT ";

const randomIds = (rng: Rng, n: number, vocab: number): number[] =>
  Array.from({ length: n }, () => rng.int(vocab));

const child = async (
  model: ModelName,
  backendName: BackendName,
  budgetS: number,
  reps: number,
  only: readonly string[] = [],
) => {
  const t0 = performance.now();
  const left = () => budgetS - (performance.now() - t0) / 1000;
  const p = `${model}_${backendName}`;
  const out: Results = {};
  const errors: string[] = [];
  const skipped: string[] = [];
  for (const m of MEASURES) out[`${p}_${m}`] = null;
  const report = () => {
    out[`${p}_peak_rss_mib`] = peakRssMib();
    if (errors.length) out[`${p}_error`] = errors.join(" | ");
    if (skipped.length) out[`${p}_skipped`] = skipped.join(" | ");
    out[`${p}_child_s`] = round((performance.now() - t0) / 1000, 1);
    console.log(MARK + JSON.stringify(out));
  };
  const scope = Scope.makeUnsafe();
  const inScope = <A, E>(e: Effect.Effect<A, E, Scope.Scope>) =>
    Effect.runPromise(Scope.provide(scope)(e));
  try {
    const config = await modelConfig(model);
    const rng = new Rng(11);
    // as a LoRA run on a published (BF16) checkpoint: the frozen base's matrices stay bf16;
    // Qwen2.5-0.5B also checkpoints its activations (TRL's gradient_checkpointing), as a user
    // fitting it in a few GB would
    const base = initWeights16(config, 1, "bf16");
    const checkpointing = model === "qwen25_05b";
    let params = 0;
    for (const t of base.values()) params += t.shape.reduce((a, b) => a * b, 1);
    out[`${p}_parameters`] = params;
    out[`${p}_base_format`] = "bf16";
    out[`${p}_gradient_checkpointing`] = checkpointing ? "on" : "off";
    if (params !== MODELS[model].parameters) {
      throw new Error(`${model}: ${params} parameters, expected ${MODELS[model].parameters}`);
    }
    const backend: BackendShape = backendName === "webgpu"
      ? await inScope(webgpuBackend)
      : cpuBackend("f32");
    const policy = await inScope(loraPolicy(backend, config, base, checkpointing));
    const ops: Ops = await inScope(backend.ops);
    // Generation runs the frozen base plus an unmerged adapter (as the policy's own forward does).
    const lora = uploadLora(ops, initLora(config, LORA, 1));
    out[`${p}_build_s`] = round((performance.now() - t0) / 1000, 1);
    const seqs = (batch: number) =>
      Array.from({ length: batch }, () => ({
        prompt: randomIds(rng, SHAPES.prompt, config.vocabSize),
        completion: randomIds(rng, SHAPES.completion, config.vocabSize),
      }));
    const requests = (batch: number, prompt: number, maxTokens: number): GenerationRequest[] =>
      Array.from({ length: batch }, () => ({
        prompt: randomIds(rng, prompt, config.vocabSize),
        maxTokens,
        stopTokenIds: [],
        seed: 0,
        temperature: 0,
        topP: 1,
        topK: 0,
      }));
    const train = seqs(SHAPES.batch);
    const small = seqs(1);
    // On WebGPU the log-probs and the training step warm up at full size (they compile the
    // forward and backward kernels at their shapes, and the pool then holds the step's buffers:
    // a user's steady-state step); the others warm up at ~1/8 of the work, so that the budget
    // buys measurements.
    const warmFull = backendName === "webgpu";
    /** Seconds per log-probs call; estimates what the others cost (unknown: just try). */
    let forwardS: number | null = null;
    const estimate = (m: (typeof MEASURES)[number]): number => {
      if (forwardS === null) return 0;
      if (m === "lora_train_tokens_per_s") return 3.5 * forwardS;
      if (m === "snapshot_ms") return params * 5e-8;
      // prefill at the batched rate; a decode step costs at least 64 batched tokens (weights
      // are read for few rows); b64 costs at least b8 plus its larger prefill
      const b = m === "generate_b8_tokens_per_s" ? 8 : 64;
      const perToken = forwardS / (SHAPES.batch * (SHAPES.prompt + SHAPES.completion));
      const est = perToken * b * SHAPES.genPrompt +
        SHAPES.genNew * perToken * Math.max(b, 64) * 1.2;
      return b === 64 && gen8S !== null
        ? Math.max(est, gen8S + perToken * 56 * SHAPES.genPrompt)
        : est;
    };
    let gen8S: number | null = null;
    let minReps = reps;
    /** One warm-up and one timed run of every measurement after `m`: they come before repeats. */
    const rest = (m: (typeof MEASURES)[number]): number =>
      MEASURES.slice(MEASURES.indexOf(m) + 1).reduce(
        (a, l) => a + estimate(l) * (l === "snapshot_ms" ? 2 : 1.125),
        0,
      );
    const measure = async (
      m: (typeof MEASURES)[number],
      full: () => Promise<unknown>,
      warm: () => Promise<unknown>,
      value: (bestS: number) => number,
      /**
       * A sub-second measurement (the snapshot): this many timed runs when they fit, reported
       * as their median (and listed): one run after the warm-up lands in the first snapshots,
       * whose device copies still allocate buffers (on lavapipe 100-140 ms against ~65 ms once
       * the pool holds them; a training run snapshots every step).
       */
      medianOf = 0,
    ) => {
      if (only.length > 0 && !only.includes(m)) return;
      const est = estimate(m);
      // warm-up (full size, or ~1/8) + as many timed runs as fit (at least one); a second run
      // only when the later measurements still fit one each
      const warmCost =
        warmFull && (m === "logprobs_tokens_per_s" || m === "lora_train_tokens_per_s")
          ? est
          : est / 8;
      let n = reps;
      while (n > 1 && warmCost + n * est + rest(m) > left()) n--;
      if (warmCost + n * est > left()) {
        skipped.push(
          `${m}: estimated ${Math.round(warmCost + est)} s > ${Math.round(left())} s left`,
        );
        report();
        return;
      }
      try {
        console.error(`${p} ${m}: warm-up, then ${n} timed (estimate ${Math.round(est)} s each)`);
        await warm();
        let best = Infinity;
        let done = 0;
        const times: number[] = [];
        const want = Math.max(n, medianOf);
        while (done < want) {
          const t = performance.now();
          await full();
          times.push((performance.now() - t) / 1000);
          best = Math.min(best, times[times.length - 1]);
          done++;
          if (best + rest(m) > left()) break; // the next run would not fit
        }
        if (medianOf > 0) {
          const sorted = [...times].sort((a, b) => a - b);
          const mid = sorted.length >> 1;
          const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
          out[`${p}_${m}`] = round(value(median));
          out[`${p}_${m}_runs`] = times.map((x) => round(value(x), 1)).join(", ");
        } else out[`${p}_${m}`] = round(value(best));
        minReps = Math.min(minReps, done);
        out[`${p}_repetitions`] = minReps;
      } catch (e) {
        errors.push(`${m}: ${describe(e)}`);
      }
      report();
    };
    const tokens = SHAPES.batch * (SHAPES.prompt + SHAPES.completion);
    await measure(
      "logprobs_tokens_per_s",
      () => Effect.runPromise(policy.logProbs(train, 1)),
      () => Effect.runPromise(policy.logProbs(warmFull ? train : small, 1)),
      (s) => {
        forwardS = s;
        return tokens / s;
      },
    );
    await measure(
      "snapshot_ms",
      () => Effect.runPromise(policy.snapshot()),
      () => Effect.runPromise(policy.snapshot()),
      (s) => s * 1000,
      9,
    );
    const generation = async (b: number) => {
      const reqs = requests(b, SHAPES.genPrompt, SHAPES.genNew);
      // warm-up: the same batch, an 8-token prompt and 2 new tokens (prefill and decode kernels)
      const warmReqs = requests(b, 8, 2);
      await measure(
        b === 8 ? "generate_b8_tokens_per_s" : "generate_b64_tokens_per_s",
        () => Effect.runPromise(generate(backend, policy.baseDevice, reqs, lora)),
        () => Effect.runPromise(generate(backend, policy.baseDevice, warmReqs, lora)),
        (s) => {
          if (b === 8) gen8S = s;
          return (b * SHAPES.genNew) / s;
        },
      );
    };
    await generation(8);
    await measure(
      "lora_train_tokens_per_s",
      () => Effect.runPromise(policy.step(train, 1, meanNllLoss)),
      () => Effect.runPromise(policy.step(warmFull ? train : small, 1, meanNllLoss)),
      (s) => tokens / s,
    );
    await generation(64);
  } catch (e) {
    errors.push(`setup: ${describe(e)}`);
  }
  report();
  try {
    await Effect.runPromise(Scope.close(scope, Exit.void));
  } catch (e) {
    errors.push(`release: ${describe(e)}`);
    report();
  }
  return out;
};

/** The WebGPU 1024³ matmul, measured as bench/matmul.ts does (that file exports no helper). */
const matmulChild = async () => {
  const n = 1024;
  const flops = 2 * n * n * n;
  const random = (len: number, seed: number) => {
    const r = new Rng(seed);
    return Float32Array.from({ length: len }, () => r.next() * 2 - 1);
  };
  const scope = Scope.makeUnsafe();
  const out: Results = {};
  try {
    const b = await Effect.runPromise(Scope.provide(scope)(webgpuBackend));
    const scoped = <A>(f: (ops: Ops) => A) =>
      Effect.runPromise(Effect.scoped(Effect.map(b.ops, f)));
    const sync = () => Effect.runPromise(b.sync);
    const ops = await Effect.runPromise(Scope.provide(scope)(b.ops));
    const x = ops.fromArray(random(n * n, 1), [n, n]);
    const w = ops.fromArray(random(n * n, 2), [n, n]);
    let first = 0;
    for (let i = 0; i < 2; i++) { // compile, then a steady-state estimate
      const t = performance.now();
      ops.matmul(x, w);
      await sync();
      first = performance.now() - t;
    }
    const reps = Math.max(1, Math.min(64, Math.round(300 / Math.max(first, 0.5))));
    let best = Infinity;
    for (let r = 0; r < 6; r++) {
      const t = performance.now();
      for (let i = 0; i < reps; i++) await scoped((o) => o.matmul(x, w));
      await sync();
      best = Math.min(best, (performance.now() - t) / reps);
    }
    out.webgpu_matmul_1024_gflop_s = round(flops / best / 1e6);
  } catch (e) {
    out.webgpu_matmul_1024_error = describe(e);
  }
  console.log(MARK + JSON.stringify(out));
  await Effect.runPromise(Scope.close(scope, Exit.void)).catch(() => {});
};

// ---- memory mode: the 16-bit frozen base ----------------------------------------------------

/**
 * Random weights of `config` as initWeights(config, seed) draws them, with every matrix rounded
 * to `format` tensor by tensor as it is drawn (the f32 copy of the model never exists, as when a
 * BF16 checkpoint is loaded with loadFrozenBase); 1-D tensors (norms, biases) stay f32.
 */
export const initWeights16 = (
  config: ModelConfig,
  seed: number,
  format: HalfFormat,
): BaseWeightMap => {
  const rng = new Rng(seed);
  const out = new Map<string, BaseTensor>();
  for (const { name, shape } of weightSpecs(config)) {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    if (name.endsWith("norm.weight")) data.fill(1);
    else if (!name.endsWith(".bias")) { for (let i = 0; i < n; i++) data[i] = rng.normal() * 0.02; }
    out.set(
      name,
      shape.length === 2 ? { shape, format, bits: roundToHalfBits(data, format) } : { shape, data },
    );
  }
  return out;
};

/**
 * `--memory <model> <backend> <bf16|f16|f32> [--logprobs] [--train]`: one LoRA policy (r=16, all
 * 7 projections, gradient checkpointing on) over a base kept in that format; `--logprobs` times
 * policy.logProbs on the bench batch (best of 2 after a warm-up), `--train` one policy.step on it
 * (no warm-up: the step's own peak is the point). Prints the peak RSS (VmHWM) after each phase.
 */
const memoryChild = async (
  model: ModelName,
  backendName: BackendName,
  format: "bf16" | "f16" | "f32",
  phases: { logprobs: boolean; train: boolean },
) => {
  const t0 = performance.now();
  const out: Results = { model, backend: backendName, base_format: format };
  const scope = Scope.makeUnsafe();
  const inScope = <A, E>(e: Effect.Effect<A, E, Scope.Scope>) =>
    Effect.runPromise(Scope.provide(scope)(e));
  try {
    const config = await modelConfig(model);
    const base = format === "f32" ? initWeights(config, 1) : initWeights16(config, 1, format);
    out.base_host_mib = round(
      [...base.values()].reduce((a, t) => a + ("bits" in t ? t.bits : t.data).byteLength, 0) /
        2 ** 20,
      1,
    );
    const backend: BackendShape = backendName === "webgpu"
      ? await inScope(webgpuBackend)
      : cpuBackend("f32");
    const policy = await inScope(loraPolicy(backend, config, base, true));
    out.setup_s = round((performance.now() - t0) / 1000, 1);
    out.peak_rss_after_setup_mib = peakRssMib();
    const rng = new Rng(11);
    const train = Array.from({ length: SHAPES.batch }, () => ({
      prompt: randomIds(rng, SHAPES.prompt, config.vocabSize),
      completion: randomIds(rng, SHAPES.completion, config.vocabSize),
    }));
    const tokens = SHAPES.batch * (SHAPES.prompt + SHAPES.completion);
    if (phases.logprobs) {
      await Effect.runPromise(policy.logProbs(train, 1));
      let best = Infinity;
      for (let i = 0; i < 2; i++) {
        const t = performance.now();
        await Effect.runPromise(policy.logProbs(train, 1));
        best = Math.min(best, (performance.now() - t) / 1000);
      }
      out.logprobs_tokens_per_s = round(tokens / best);
      out.peak_rss_after_logprobs_mib = peakRssMib();
    }
    if (phases.train) {
      const t = performance.now();
      const stats = await Effect.runPromise(policy.step(train, 1, (lp) => {
        const n = lp.logp.reduce((a, x) => a + x.length, 0);
        return Effect.succeed({
          loss: -lp.logp.reduce((a, x) => a + x.reduce((u, v) => u + v, 0), 0) / n,
          dLogp: lp.logp.map((x) => new Float64Array(x.length).fill(-1 / n)),
          metrics: {},
        });
      }));
      out.train_step_s = round((performance.now() - t) / 1000, 1);
      out.train_loss = round(stats.loss, 4);
      out.peak_rss_after_train_mib = peakRssMib();
    }
  } catch (e) {
    out.error = describe(e);
  }
  out.wall_s = round((performance.now() - t0) / 1000, 1);
  console.log(MARK + JSON.stringify(out));
  await Effect.runPromise(Scope.close(scope, Exit.void)).catch(() => {});
};

// ---- parent ---------------------------------------------------------------------------------

interface ChildRun {
  readonly results: Results;
  readonly error: string | null;
  readonly wallS: number;
}

/** Runs a child; its last result line wins; a crash, a time-out or no result is an error. */
const runChild = async (
  cmd: string,
  args: string[],
  timeoutS: number,
  env?: Record<string, string>,
): Promise<ChildRun> => {
  const t0 = performance.now();
  const proc = new Deno.Command(cmd, {
    args,
    stdout: "piped",
    stderr: "piped",
    ...(env ? { env, clearEnv: true } : {}),
  }).spawn();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      proc.kill("SIGKILL");
    } catch { /* already gone */ }
  }, timeoutS * 1000);
  let results: Results = {};
  let stderrTail = "";
  const readLines = async (s: ReadableStream<Uint8Array>, f: (line: string) => void) => {
    let buf = "";
    for await (const chunk of s.pipeThrough(new TextDecoderStream())) {
      buf += chunk;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        f(buf.slice(0, i));
        buf = buf.slice(i + 1);
      }
    }
    if (buf) f(buf);
  };
  const [status] = await Promise.all([
    proc.status,
    readLines(proc.stdout, (line) => {
      if (line.startsWith(MARK)) results = JSON.parse(line.slice(MARK.length));
      else if (line.trim()) console.log(`  | ${line}`);
    }),
    readLines(proc.stderr, (line) => {
      stderrTail = (stderrTail + "\n" + line).slice(-2000);
      if (line.trim()) console.log(`  ! ${line}`);
    }),
  ]);
  clearTimeout(timer);
  const wallS = round((performance.now() - t0) / 1000, 1);
  const lastErr = stderrTail.trim().split("\n").filter((l) => l.trim()).slice(-2).join(" / ");
  const error = timedOut
    ? `killed after ${timeoutS} s (time-out)`
    : !status.success && Object.keys(results).length === 0
    ? `exited with code ${status.code}${status.signal ? ` (${status.signal})` : ""}: ${lastErr}`
    : !status.success
    ? `exited with code ${status.code}${
      status.signal ? ` (${status.signal})` : ""
    } after reporting (results kept)`
    : null;
  return { results, error, wallS };
};

const torchAvailable = async (): Promise<string | null> => {
  try {
    const o = await new Deno.Command("/usr/bin/python3", {
      args: ["-c", "import torch; print(torch.__version__)"],
      stdout: "piped",
      stderr: "piped",
      env: peerEnv(),
      clearEnv: true,
    }).output();
    return o.success ? null : new TextDecoder().decode(o.stderr).trim().split("\n").at(-1)!;
  } catch (e) {
    return describe(e);
  }
};

/**
 * Alternating rounds of the pairs whose ratios are bars (SmolLM2 vs torch, matmul vs OpenBLAS):
 * three, so that a ratio is a true median. With two, one peer round decided it: torch's
 * log-probs measured 337 and 243 tokens/s in the two rounds of one run (2026-12-04).
 */
const ROUNDS = 3;

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const h = Math.floor(s.length / 2);
  return s.length % 2 ? s[h] : (s[h - 1] + s[h]) / 2;
};

/** The better of a kept value and a new one (`pick`: Math.max or Math.min), numbers only. */
const best = (
  kept: Value | undefined,
  v: Value | undefined,
  pick: (a: number, b: number) => number,
) => typeof v !== "number" ? (kept ?? null) : typeof kept === "number" ? pick(kept, v) : v;

/**
 * Folds the rounds of one child into `out`: throughputs and peak RSS the highest seen, times
 * (`_ms`, `_s`) the lowest, anything else the latest round's; `_rounds` counts them.
 */
const mergeRounds = (out: Results, p: string, rounds: readonly Results[]): void => {
  for (const m of MEASURES) out[`${p}_${m}`] = null;
  out[`${p}_peak_rss_mib`] = null;
  for (const r of rounds) {
    for (const [k, v] of Object.entries(r)) {
      if (k.endsWith("_tokens_per_s") || k.endsWith("_peak_rss_mib")) {
        out[k] = best(out[k], v, Math.max);
      } else if (k.endsWith("_ms") || k.endsWith("_build_s")) out[k] = best(out[k], v, Math.min);
      else out[k] = v;
    }
  }
  if (rounds.length > 1) out[`${p}_rounds`] = rounds.length;
};

/**
 * Ratio of `q` between a backend's round i and the peer's round i (run back to back, so the
 * machine's drift over the whole bench cancels), for every round where both measured it.
 */
const pairRatios = (
  mine: readonly Results[],
  peer: readonly Results[],
  q: string,
  model: string,
  backend: string,
): number[] => {
  const out: number[] = [];
  for (let i = 0; i < Math.min(mine.length, peer.length); i++) {
    const a = mine[i][`${model}_${backend}_${q}`];
    const t = peer[i][`${model}_torch_${q}`];
    if (typeof a === "number" && typeof t === "number") out.push(a / t);
  }
  return out;
};

const budgetFromArgs = (args: readonly string[]): number => {
  const i = args.indexOf("--budget-s");
  const v = i >= 0 ? Number(args[i + 1]) : Number(Deno.env.get("SCALE_BUDGET_S") ?? 2100);
  return Number.isFinite(v) && v > 0 ? v : 2100;
};

/** Runs the whole scale bench (children for each measurement group). */
export async function run(args: readonly string[] = []): Promise<Results> {
  const t0 = performance.now();
  const budget = budgetFromArgs(args);
  const left = () => budget - (performance.now() - t0) / 1000;
  const self = new URL(import.meta.url).pathname;
  const deno = Deno.execPath();
  const out: Results = { load_average_1min_start: round(Deno.loadavg()[0]) };
  for (const m of MODEL_NAMES) {
    const c = await modelConfig(m);
    out[`${m}_config`] =
      `${c.modelType}: hidden ${c.hiddenSize}, intermediate ${c.intermediateSize}, ${c.numLayers} layers, ${c.numHeads} heads / ${c.numKvHeads} kv, head_dim ${c.headDim}, ` +
      `vocab ${c.vocabSize}, tied ${c.tieWordEmbeddings}, qkv bias ${c.attentionBias}, ` +
      `rope_theta ${c.ropeTheta}, rms_eps ${c.rmsNormEps}`;
  }

  // The matmul against OpenBLAS in ROUNDS alternating pairs (the machine's speed drifts over
  // minutes; a pair's ratio does not): the ratio is the median pair's, the GFLOP/s the best.
  const mmRatios: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    console.log(`scale: WebGPU 1024 matmul vs numpy OpenBLAS (round ${i + 1} of ${ROUNDS})`);
    const mm = await runChild(deno, ["run", "-A", self, "--child", "matmul"], 300);
    if (mm.error && mm.results.webgpu_matmul_1024_gflop_s === undefined) {
      out.webgpu_matmul_1024_error = mm.error;
    }
    const ob = await openblas();
    const g = mm.results.webgpu_matmul_1024_gflop_s;
    const o = ob.openblas_matmul_1024_gflop_s;
    out.webgpu_matmul_1024_gflop_s = best(out.webgpu_matmul_1024_gflop_s, g, Math.max);
    out.openblas_matmul_1024_gflop_s = best(out.openblas_matmul_1024_gflop_s, o, Math.max);
    out.openblas_numpy = ob.openblas_numpy;
    if (typeof g === "number" && typeof o === "number") mmRatios.push(g / o);
  }
  out.webgpu_matmul_1024_vs_openblas_ratio = mmRatios.length ? round(median(mmRatios), 3) : null;
  out.webgpu_matmul_1024_vs_openblas_ratio_rounds = mmRatios.map((r) => round(r, 3)).join(", ");

  // Cheapest and most informative first; each child gets the time left, capped.
  const torchMissing = await torchAvailable();
  // SmolLM2's pair (the ratio bars) runs in ROUNDS alternating rounds (torch, webgpu, torch,
  // webgpu, ...): see pairRatios.
  const plan: [ModelName, BackendName | "torch", number, number][] = [
    // model, backend, cap (s), timed repetitions
    ...Array.from({ length: ROUNDS }, (): [ModelName, "torch" | "webgpu", number, number][] => [
      ["smollm2_135m", "torch", 200, 1],
      ["smollm2_135m", "webgpu", 240, 1],
    ]).flat(),
    ["qwen25_05b", "torch", 330, 1],
    ["qwen25_05b", "webgpu", 480, 1], // room for its b64 generation (the bar asks for it)
    ["smollm2_135m", "cpu", 180, 1],
    ["qwen25_05b", "cpu", 300, 1],
  ];
  /** Each child's results, in the order run, by `<model>_<backend>`. */
  const runs = new Map<string, Results[]>();
  if (torchMissing) {
    out.torch_peer_skipped =
      `python3-torch is not importable by /usr/bin/python3 (${torchMissing}); torch peer skipped`;
  }
  // `--models a,b` / `--backends x,y`: only those children (a quick side-by-side of one model)
  const pick = (flag: string) => {
    const i = args.indexOf(flag);
    return i >= 0 ? args[i + 1].split(",") : null;
  };
  const models = pick("--models");
  const backends = pick("--backends");
  for (const [model, backend, cap, reps] of plan) {
    const p = `${model}_${backend}`;
    if (backend === "torch" && torchMissing) continue;
    if ((models && !models.includes(model)) || (backends && !backends.includes(backend))) continue;
    const budgetS = Math.floor(Math.min(cap, left() - 30));
    if (budgetS < 30) {
      for (const m of MEASURES) out[`${p}_${m}`] = null;
      out[`${p}_peak_rss_mib`] = null;
      out[`${p}_error`] = `not run: bench budget (${budget} s) spent`;
      continue;
    }
    console.log(`scale: ${model} on ${backend} (budget ${budgetS} s, ${reps} repetitions)`);
    const r = backend === "torch"
      ? await runChild(
        "/usr/bin/python3",
        [
          new URL("./scale_torch.py", import.meta.url).pathname,
          "--model",
          model,
          "--config",
          JSON.stringify(MODELS[model].hf),
          "--parameters",
          String(MODELS[model].parameters),
          "--shapes",
          JSON.stringify(SHAPES),
          "--budget-s",
          String(budgetS),
          "--repetitions",
          String(reps),
          "--threads",
          "2",
        ],
        budgetS + 60,
        peerEnv(),
      )
      : await runChild(deno, [
        "run",
        "-A",
        self,
        "--child",
        model,
        backend,
        "--budget-s",
        String(budgetS),
        "--repetitions",
        String(reps),
      ], budgetS + 60);
    runs.set(p, [...(runs.get(p) ?? []), r.results]);
    mergeRounds(out, p, runs.get(p)!);
    if (r.error) {
      const prev = out[`${p}_error`];
      out[`${p}_error`] = prev ? `${prev} | ${r.error}` : r.error;
    }
    console.log(`  ${p}: ${JSON.stringify(r.results)} (${r.wallS} s)`);
  }

  // Peer ratios (throughput; > 1: lorafold is faster) from this run.
  if (!torchMissing) {
    for (const m of MODEL_NAMES) {
      for (const b of ["webgpu", "cpu"]) {
        for (const q of MEASURES.filter((x) => x.endsWith("tokens_per_s"))) {
          const pr = pairRatios(runs.get(`${m}_${b}`) ?? [], runs.get(`${m}_torch`) ?? [], q, m, b);
          out[`${m}_${b}_vs_torch_${q}_ratio`] = pr.length ? round(median(pr), 3) : null;
          if (pr.length > 1) {
            out[`${m}_${b}_vs_torch_${q}_ratio_rounds`] = pr.map((x) => round(x, 3)).join(", ");
          }
        }
      }
    }
  }
  out.definitions = DEFINITIONS;
  out.budget_s = budget;
  out.bench_wall_s = round((performance.now() - t0) / 1000, 1);
  out.load_average_1min_end = round(Deno.loadavg()[0]);
  return out;
}

if (import.meta.main) {
  const args = Deno.args;
  if (args[0] === "--memory") {
    const [model, backend, format] = args.slice(1, 4) as [ModelName, BackendName, string];
    if (
      !MODEL_NAMES.includes(model) || (backend !== "webgpu" && backend !== "cpu") ||
      (format !== "bf16" && format !== "f16" && format !== "f32")
    ) {
      console.error(
        `usage: --memory <${
          MODEL_NAMES.join("|")
        }> <webgpu|cpu> <bf16|f16|f32> [--logprobs] [--train]`,
      );
      Deno.exit(2);
    }
    await memoryChild(model, backend, format, {
      logprobs: args.includes("--logprobs"),
      train: args.includes("--train"),
    });
    Deno.exit(0);
  } else if (args[0] === "--child") {
    if (args[1] === "matmul") await matmulChild();
    else {
      const model = args[1] as ModelName;
      const backend = args[2] as BackendName;
      if (!MODEL_NAMES.includes(model) || (backend !== "webgpu" && backend !== "cpu")) {
        console.error(`usage: --child <${MODEL_NAMES.join("|")}> <webgpu|cpu> | --child matmul`);
        Deno.exit(2);
      }
      const opt = (k: string, d: number) => {
        const i = args.indexOf(k);
        return i >= 0 ? Number(args[i + 1]) : d;
      };
      // `--only <measure,...>`: just those measurements (one phase's time or peak RSS alone)
      const k = args.indexOf("--only");
      const only = k >= 0 ? args[k + 1].split(",") : [];
      const out = await child(
        model,
        backend,
        opt("--budget-s", 600),
        opt("--repetitions", 2),
        only,
      );
      // `--out <topic>`: also record this one child (its own run) as bench/results/<topic>.json
      const o = args.indexOf("--out");
      if (o >= 0) {
        const kept = Object.entries(out).filter((e): e is [string, number | string] =>
          e[1] !== null
        );
        console.error(await writeResult(args[o + 1], Object.fromEntries(kept)));
      }
    }
    Deno.exit(0);
  } else {
    const results = await run(args);
    // `--out <topic>`: a partial run goes to bench/results/<topic>.json, not scale.json
    const o = args.indexOf("--out");
    const topic = o >= 0 ? args[o + 1] : "scale";
    console.log(await writeResult(topic, results as Record<string, number | string>));
  }
}
