import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { Effect } from "effect";
import { gpuTeardown, hasGpu, testBackends, withOps } from "./support/backends.ts";
import { ReleasedTensorError } from "../src/backend/tensor.ts";
import type { Ops, Tensor } from "../mod.ts";

const { gpu, cpu } = await testBackends();
const both = [cpu, ...(gpu ? [gpu] : [])];

for (const b of both) {
  Deno.test(`${b.info.name}: fromArray / copy / reshape / read round-trip`, () =>
    withOps(b, (ops) =>
      Effect.gen(function* () {
        const t = ops.fromArray([1.5, -2, 3, 4, 5, 6], [2, 3]);
        const c = ops.copy(t);
        const r = ops.reshape(c, [3, 2]);
        const ids = ops.fromArray([7, -1, 0], [3], "i32");
        const [x, y] = yield* ops.read([t, r]);
        const [z] = yield* ops.readInt([ids]);
        assertEquals(Array.from(x), [1.5, -2, 3, 4, 5, 6]);
        assertEquals(Array.from(y), [1.5, -2, 3, 4, 5, 6]);
        assertEquals(r.shape, [3, 2]);
        assertEquals(Array.from(z), [7, -1, 0]);
        const [zeros] = yield* ops.read([ops.zeros([5])]);
        assertEquals(Array.from(zeros), [0, 0, 0, 0, 0]);
      })));

  Deno.test(`${b.info.name}: a tensor used after its scope closed raises ReleasedTensorError`, async () => {
    let leaked: Tensor | undefined;
    await withOps(b, (ops: Ops) => {
      leaked = ops.fromArray([1, 2], [2]);
    });
    await withOps(b, (ops) => {
      let caught: unknown;
      try {
        ops.copy(leaked!);
      } catch (e) {
        caught = e;
      }
      assert(caught instanceof ReleasedTensorError);
    });
  });
}

Deno.test({
  name: "webgpu: pooled buffers are reused across scopes (nothing leaks over a long run)",
  ignore: !hasGpu,
  fn: async () => {
    const ctx = gpu!.gpu!;
    for (let i = 0; i < 50; i++) {
      await withOps(gpu!, (ops) =>
        Effect.gen(function* () {
          const t = ops.zeros([1024, 64]);
          const [x] = yield* ops.read([ops.copy(t)]);
          assertEquals(x.length, 1024 * 64);
        }));
    }
    // Every scope returned its two buffers and the next scope took them again: two in all.
    const n = ctx.pooledBufferCount(1024 * 64 * 4);
    assert(n === 2, `pool holds ${n} buffers of that size after 50 scopes`);
  },
});

/** One scope that holds `n` buffers of `bytes` at once (a step's working set), then returns them. */
const phase = (bytes: number, n: number) =>
  withOps(gpu!, (ops) =>
    Effect.gen(function* () {
      const ts = Array.from({ length: n }, () => ops.zeros([bytes / 4]));
      const [x] = yield* ops.read([ts[n - 1]]);
      assertEquals(x.length, bytes / 4);
    }));

Deno.test({
  name: "webgpu: a full pool drops its least recently released buffers, keeps the new sizes",
  ignore: !hasGpu,
  fn: async () => {
    const ctx = gpu!.gpu!;
    const kib = 1024;
    ctx.setPoolCap(0); // empties the pool
    ctx.setPoolCap(1024 * kib);
    try {
      const old = 200 * kib;
      const next = 392 * kib;
      // a phase that pools four buffers of one size (800 KiB of the 1 MiB cap) ...
      await phase(old, 4);
      assertEquals(ctx.pooledBufferCount(old), 4);
      // ... then one whose buffers do not fit beside them: the oldest go, the new ones stay
      await phase(next, 2);
      assertEquals(ctx.pooledBufferCount(next), 2);
      assertEquals(ctx.pooledBufferCount(old), 1);
      // and the next step of the new phase takes them again instead of allocating
      await phase(next, 2);
      assertEquals(ctx.pooledBufferCount(next), 2);
      assertEquals(ctx.pooledBufferCount(old), 1);
    } finally {
      ctx.setPoolCap(null);
    }
  },
});

Deno.test({
  name: "webgpu: the pool keeps a working set past its base cap, never past the most held",
  ignore: !hasGpu,
  fn: async () => {
    const ctx = gpu!.gpu!;
    const kib = 1024;
    ctx.setPoolCap(0); // empties the pool
    ctx.setPoolCap(1024 * kib, true);
    try {
      const step = 400 * kib;
      // a step that holds 1.6 MiB (past the 1 MiB base): all of it stays for the next step,
      // which then allocates nothing
      await phase(step, 4);
      assertEquals(ctx.pooledBufferCount(step), 4);
      const before = ctx.pooledBufferCount();
      await phase(step, 4);
      assertEquals(ctx.pooledBufferCount(step), 4);
      assertEquals(ctx.pooledBufferCount(), before);
      // new sizes: a new buffer or a release gives back the oldest pooled ones until pooled is
      // within the base (1 MiB) or live + pooled within the most held (1.6 MiB); once the
      // phase is over the pool holds its two new buffers and one old one, 1.6 MiB
      const next = 600 * kib;
      await phase(next, 2);
      assertEquals(ctx.pooledBufferCount(next), 2);
      assertEquals(ctx.pooledBufferCount(step), 1);
    } finally {
      ctx.setPoolCap(null);
    }
  },
});

gpuTeardown();
