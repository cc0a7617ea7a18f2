/**
 * The server under a bounded burst on loopback (issue 13): 64 concurrent completions plus one
 * oversized request (n = 16384, vLLM's largest n, decoded in batches of --max-num-seqs) while
 * `/health` is polled; then requests past the caps (n and prompt list) that must be refused at
 * once. Every request gets its answer (200 or vLLM's 400), the oversized one all its choices in
 * order, the server keeps serving, and `/health` keeps answering during the burst: 90% of the
 * probes within HEALTH_BOUND_MS (100 ms, the bar; LORAFOLD_HEALTH_BOUND_MS changes it)
 * and none stalled past ten times that.
 */
import assert from "node:assert/strict";
import { startServer, writeTinyCheckpoint } from "./support/server_process.ts";

const HEALTH_BOUND_MS = Number(Deno.env.get("LORAFOLD_HEALTH_BOUND_MS") ?? 100);

Deno.test("server load: 64 concurrent requests + an oversized one; /health stays responsive", async () => {
  const dir = await Deno.makeTempDir({ prefix: "lorafold-load-" });
  await writeTinyCheckpoint(dir, { seed: 2 });
  const srv = await startServer({ modelDir: dir, args: ["--served-model-name", "tiny"] });
  try {
    const health: number[] = [];
    let burst = true;
    const poller = (async () => {
      while (burst) {
        const t = performance.now();
        const r = await fetch(`${srv.url}/health`);
        await r.body?.cancel();
        assert.equal(r.status, 200);
        health.push(performance.now() - t);
        await new Promise((res) => setTimeout(res, 10));
      }
    })();
    const post = async (body: unknown) => {
      const r = await srv.request("/v1/completions", { method: "POST", body });
      return { status: r.status, json: await r.json() };
    };
    const small = Array.from(
      { length: 64 },
      (_, i) => post({ prompt: [1, 3 + (i % 20), 4], max_tokens: 8, seed: i, ignore_eos: true }),
    );
    const big = post({ prompt: "ab", n: 16384, max_tokens: 4, seed: 1, ignore_eos: true });
    const refusedN = post({ prompt: "ab", n: 3_000_000, max_tokens: 4 });
    const refusedList = post({ prompt: Array.from({ length: 5000 }, () => "a"), max_tokens: 1 });
    const [smalls, bigR, nR, listR] = await Promise.all([
      Promise.all(small),
      big,
      refusedN,
      refusedList,
    ]);
    burst = false;
    await poller;
    for (const r of smalls) {
      assert.equal(r.status, 200);
      assert.equal(r.json.choices[0].text.length > 0, true);
    }
    assert.equal(bigR.status, 200);
    assert.equal(bigR.json.choices.length, 16384);
    bigR.json.choices.forEach((c: { index: number }, i: number) => assert.equal(c.index, i));
    assert.equal(bigR.json.usage.completion_tokens, 16384 * 4);
    assert.equal(nR.status, 400);
    assert.match(nR.json.error.message, /n must be at most 16384, got 3000000/);
    assert.equal(listR.status, 400);
    assert.match(listR.json.error.message, /prompt list length 5000 exceeds/);
    assert.ok(health.length >= 5, `only ${health.length} health probes during the burst`);
    // the scheduler gives the event loop a turn every few milliseconds of work; what is left
    // is the OS sharing the cores with other processes, so the bound is on the 90th percentile
    // and a stall (the old 4.9 s for n = 32768) must never happen
    const sorted = [...health].sort((a, b) => a - b);
    const p90 = sorted[Math.floor(sorted.length * 0.9)];
    const worst = sorted[sorted.length - 1];
    const summary =
      `${health.length} probes, median ${sorted[sorted.length >> 1].toFixed(0)} ms, ` +
      `p90 ${p90.toFixed(0)} ms, max ${worst.toFixed(0)} ms`;
    assert.ok(p90 <= HEALTH_BOUND_MS, `/health p90 over ${HEALTH_BOUND_MS} ms: ${summary}`);
    assert.ok(worst <= 10 * HEALTH_BOUND_MS, `/health stalled: ${summary}`);
    console.log(`/health during the burst: ${summary}`);
    // still serving
    const after = await post({ prompt: "ab", max_tokens: 2 });
    assert.equal(after.status, 200);
  } finally {
    await srv.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
