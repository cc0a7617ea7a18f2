/**
 * Device memory of KV-cached generation (src/model/generate.ts, forwardCached): the buffers live
 * on the WebGPU device, counted by GpuContext (outstanding buffers and their bytes, with a
 * high-water mark), stay O(model + KV cache + one layer's activations). A decode step holds the
 * same buffers whatever its index, and the peak beyond the KV cache does not grow with the
 * number of layers (a prefill once held every layer's activations until the step ended) nor
 * with the number of new tokens.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { Effect } from "effect";
import type { BackendShape } from "../src/backend/backend.ts";
import type { Ops } from "../src/backend/ops.ts";
import type { Tensor } from "../src/backend/tensor.ts";
import type { GpuContext } from "../src/backend/webgpu/context.ts";
import { uploadModel } from "../src/model/decoder.ts";
import type { ModelConfig } from "../src/model/config.ts";
import { generate, type GenerationRequest, setDeviceSampling } from "../src/model/generate.ts";
import { initWeights } from "../src/model/weights.ts";
import { gpuTeardown, hasGpu, openGpu } from "./support/backends.ts";
import { tinyConfig } from "./support/tiny.ts";

const B = 4;
const PROMPT = 6;

const config = (layers: number): ModelConfig =>
  tinyConfig({
    hiddenSize: 32,
    intermediateSize: 64,
    numHeads: 4,
    numKvHeads: 2,
    headDim: 8,
    vocabSize: 300,
    numLayers: layers,
    eosTokenIds: [],
  });

/** Greedy requests of `steps` new tokens; prompts of different lengths (left padding). */
const requests = (steps: number): GenerationRequest[] =>
  Array.from({ length: B }, (_, b) => ({
    prompt: Array.from({ length: PROMPT - (b % 3) }, (_, t) => 1 + ((b * 37 + t * 11) % 299)),
    maxTokens: steps,
    stopTokenIds: [],
    seed: b,
    temperature: 0,
    topK: -1,
    topP: 1,
  }));

/** Bytes of the KV cache `generate` allocates: K and V per layer, [B * maxLen, kvHeads * headDim]. */
const kvBytes = (c: ModelConfig, steps: number): number =>
  2 * c.numLayers * B * (PROMPT + steps) * c.numKvHeads * c.headDim * 4;

interface Live {
  readonly buffers: number;
  readonly bytes: number;
}

interface Measured {
  /** Live buffers beyond the model's at each read-back (one per step for greedy rows). */
  readonly atReads: Live[];
  /** Most live bytes beyond the model's during the call. */
  readonly peakBytes: number;
  /** Live buffers beyond the model's once the call returned. */
  readonly after: number;
  readonly tokens: number[][];
}

/** Ops that note the live device buffers whenever the caller reads back. */
const noting = (ops: Ops, ctx: GpuContext, base: Live, out: Live[]): Ops =>
  new Proxy(ops, {
    get(target, prop, recv) {
      if (prop === "read") {
        return (ts: readonly Tensor[]) => {
          out.push({
            buffers: ctx.outstanding - base.buffers,
            bytes: ctx.outstandingBytes - base.bytes,
          });
          return target.read(ts);
        };
      }
      if (prop === "transient") {
        return <A>(f: (o: Ops) => A) => target.transient((o) => f(noting(o, ctx, base, out)));
      }
      return Reflect.get(target, prop, recv);
    },
  });

const measure = (gpu: BackendShape, layers: number, steps: number): Promise<Measured> =>
  Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const ctx = gpu.gpu!;
    const ops = yield* gpu.ops;
    const c = config(layers);
    const model = uploadModel(ops, c, initWeights(c, 5, 0.5));
    const base = { buffers: ctx.outstanding, bytes: ctx.outstandingBytes };
    const atReads: Live[] = [];
    ctx.resetPeak();
    const gens = yield* generate(
      { ...gpu, ops: Effect.map(gpu.ops, (o) => noting(o, ctx, base, atReads)) },
      model,
      requests(steps),
    );
    return {
      atReads,
      peakBytes: ctx.peakOutstandingBytes - base.bytes,
      after: ctx.outstanding - base.buffers,
      tokens: gens.map((g) => g.tokens),
    };
  })));

for (const device of [false, true]) {
  const where = device ? "device" : "host";
  Deno.test({
    name: `generate (${where} sampling): every decode step holds the same device buffers`,
    ignore: !hasGpu,
    fn: async () => {
      setDeviceSampling(device);
      try {
        const gpu = (await openGpu())!;
        const steps = 7;
        const m = await measure(gpu, 3, steps);
        assertEquals(m.tokens.map((t) => t.length), new Array(B).fill(steps));
        // the prefill's read, then one per decode step (greedy rows always decide)
        assertEquals(m.atReads.length, steps);
        const decode = m.atReads.slice(1);
        assert(decode.length > 2);
        for (const live of decode) assertEquals(live, decode[0]);
        // the generation's KV cache and temporaries are all released when it returns
        assertEquals(m.after, 0);
      } finally {
        setDeviceSampling(undefined);
      }
    },
  });

  Deno.test({
    name: `generate (${where} sampling): peak device bytes beyond the KV cache are the same ` +
      `for 1 to 4 layers and 2 to 9 new tokens`,
    ignore: !hasGpu,
    fn: async () => {
      setDeviceSampling(device);
      try {
        const gpu = (await openGpu())!;
        const beyondCache: number[] = [];
        for (const layers of [1, 2, 4]) {
          for (const steps of [2, 9]) {
            const m = await measure(gpu, layers, steps);
            assert(m.peakBytes > kvBytes(config(layers), steps));
            beyondCache.push(m.peakBytes - kvBytes(config(layers), steps));
          }
        }
        assertEquals(beyondCache, new Array(beyondCache.length).fill(beyondCache[0]));
      } finally {
        setDeviceSampling(undefined);
      }
    },
  });
}

gpuTeardown();
