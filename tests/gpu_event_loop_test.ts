/**
 * On a software adapter (llvmpipe) a submit runs its work before it returns, so the WebGPU
 * context queues flushed batches and submits them one by one when the host waits, with a turn of
 * the event loop between two: other fibers of the process (an HTTP answer, a push beside the next
 * update) run between batches instead of after all of them. Results are the same as submitted at
 * once (every other WebGPU test runs this way on llvmpipe).
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { Effect } from "effect";
import { hasGpu, openGpu } from "./support/backends.ts";

/** Counts event-loop turns (messages on a MessageChannel) until `stop` is set. */
const countTurns = (state: { stop: boolean; turns: number }): Promise<void> =>
  new Promise((resolve) => {
    const ch = new MessageChannel();
    ch.port1.onmessage = () => {
      if (state.stop) {
        ch.port1.close();
        ch.port2.close();
        resolve();
        return;
      }
      state.turns++;
      ch.port2.postMessage(0);
    };
    ch.port2.postMessage(0);
  });

Deno.test({
  name:
    "webgpu on a software adapter: the event loop turns between the batches of a long computation",
  ignore: !hasGpu,
  fn: async () => {
    const gpu = (await openGpu())!;
    const ctx = gpu.gpu!;
    if (!gpu.info.fallback) return; // a real GPU's submit returns at once: batches go out as flushed
    await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
      const ops = yield* gpu.ops;
      const n = 1 << 16;
      let x = ops.fromArray(Float32Array.from({ length: n }, (_, i) => (i % 7) - 3), [n]);
      const one = ops.fromArray(new Float32Array(n).fill(1), [n]);
      // 600 dependent dispatches: several batches
      for (let i = 0; i < 600; i++) x = ops.add(x, one);
      const submitsBefore = ctx.submits;
      const state = { stop: false, turns: 0 };
      const counting = countTurns(state);
      const [host] = yield* ops.read([x]);
      state.stop = true;
      yield* Effect.promise(() => counting);
      const batches = ctx.submits - submitsBefore;
      assert(batches >= 5, `${batches} batches`);
      // another fiber ran between every two batches (and not only once the read was done)
      assert(state.turns >= batches - 1, `${state.turns} turns for ${batches} batches`);
      assertEquals(host[0], (0 % 7) - 3 + 600);
      assertEquals(host[n - 1], ((n - 1) % 7) - 3 + 600);
    })));
  },
});
