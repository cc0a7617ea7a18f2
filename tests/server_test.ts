/**
 * The vLLM-compatible server, end to end: a REAL server process (tests/support/server_process.ts)
 * on a loopback port with a tiny checkpoint, driven with fetch; results are checked against the
 * in-process model (src/model/decoder.ts forward, src/model/generate.ts) on the CPU backend.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Effect } from "effect";
import { cpuBackend } from "../src/backend/backend.ts";
import type { LoraConfig, LoraWeights } from "../src/lora/adapter.ts";
import { savePeftAdapter } from "../src/lora/peft.ts";
import type { ModelConfig } from "../src/model/config.ts";
import { forward, uploadModel } from "../src/model/decoder.ts";
import { generate } from "../src/model/generate.ts";
import { Rng } from "../src/model/rng.ts";
import { logSoftmax } from "../src/model/sampling.ts";
import {
  type HostTensor,
  PROJECTIONS,
  projectionShape,
  type WeightMap,
} from "../src/model/weights.ts";
import { targetPaths } from "../src/lora/adapter.ts";
import { uploadLora } from "../src/lora/adapter.ts";
import { CharTokenizer } from "../src/tokenizer/tokenizer.ts";
import {
  runServeCli,
  type ServerProcess,
  startServer,
  TINY_ALPHABET,
  tinyServerConfig,
  writeTinyCheckpoint,
} from "./support/server_process.ts";

// ---- helpers ---------------------------------------------------------------------------------

// deno-lint-ignore no-explicit-any
type Json = any;

const post = async (
  s: ServerProcess,
  path: string,
  body: unknown,
): Promise<{ status: number; json: Json; text: string }> => {
  const r = await s.request(path, { method: "POST", body });
  const text = await r.text();
  let json: Json = null;
  try {
    json = JSON.parse(text);
  } catch { /* plain text */ }
  return { status: r.status, json, text };
};

const get = async (
  s: ServerProcess,
  path: string,
): Promise<{ status: number; json: Json; text: string }> => {
  const r = await s.request(path);
  const text = await r.text();
  let json: Json = null;
  try {
    json = JSON.parse(text);
  } catch { /* empty */ }
  return { status: r.status, json, text };
};

const complete = async (s: ServerProcess, body: Record<string, unknown>): Promise<Json> => {
  const r = await post(s, "/v1/completions", body);
  assert.equal(r.status, 200, `completion failed: ${r.text}`);
  return r.json;
};

/** Checks the vLLM error envelope. */
const assertEnvelope = (
  r: { status: number; json: Json; text: string },
  status: number,
  mentions?: string,
) => {
  assert.equal(r.status, status, r.text);
  const e = r.json?.error;
  assert.ok(e, `no error envelope: ${r.text}`);
  assert.deepEqual(Object.keys(e).sort(), ["code", "message", "param", "type"]);
  assert.equal(e.code, status);
  const types: Record<number, string> = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
  };
  assert.equal(e.type, types[status]);
  assert.equal(typeof e.message, "string");
  if (mentions) {
    assert.ok(`${e.message} ${e.param}`.includes(mentions), `"${mentions}" not in ${r.text}`);
  }
};

/** In-process logits [ids.length, V] of the full forward pass (CPU backend). */
const refLogits = (
  config: ModelConfig,
  weights: WeightMap,
  ids: readonly number[],
  lora: LoraWeights | null = null,
) =>
  Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const ops = yield* cpuBackend().ops;
    const model = uploadModel(ops, config, weights);
    const lr = lora ? uploadLora(ops, lora) : null;
    const { logits } = forward(ops, model, { ids, batch: 1, seqLen: ids.length }, { lora: lr });
    return (yield* ops.read([logits]))[0];
  })));

/**
 * Checks a greedy completion against the in-process model: each token is the argmax at its
 * position and each logprob is log_softmax of the logits (raw logprobs), top-k included.
 */
const assertMatchesModel = async (
  config: ModelConfig,
  weights: WeightMap,
  prompt: readonly number[],
  choice: Json,
  lora: LoraWeights | null = null,
  tol = 1e-4,
) => {
  const tokens: number[] = choice.token_ids;
  const logits = await refLogits(config, weights, [...prompt, ...tokens], lora);
  const V = config.vocabSize;
  tokens.forEach((t, i) => {
    const row = logits.subarray((prompt.length - 1 + i) * V, (prompt.length + i) * V);
    const lp = logSoftmax(row);
    let best = 0;
    for (let v = 1; v < V; v++) if (row[v] > row[best]) best = v;
    assert.equal(t, best, `token ${i} is not the argmax`);
    assert.ok(
      Math.abs(choice.logprobs.token_logprobs[i] - lp[t]) < tol,
      `logprob ${i}: ${choice.logprobs.token_logprobs[i]} vs ${lp[t]}`,
    );
    const top = choice.logprobs.top_logprobs[i] as Record<string, number>;
    for (const [k, v] of Object.entries(top)) {
      const id = k.startsWith("token_id:") ? Number(k.slice(9)) : TOKEN_IDS.get(k)!;
      assert.ok(Math.abs(v - lp[id]) < tol, `top logprob of ${k}: ${v} vs ${lp[id]}`);
    }
  });
};

/** Token display text -> id of the tiny char tokenizer. */
const TOKEN_IDS: ReadonlyMap<string, number> = (() => {
  const tok = new CharTokenizer(TINY_ALPHABET);
  return new Map(Array.from({ length: tok.vocabSize }, (_, i) => [tok.tokenText(i), i] as const));
})();

/** A random LoRA adapter (B != 0, so it changes the model). */
const randomLora = (config: ModelConfig, seed: number, r = 4, scale = 0.5): LoraWeights => {
  const rng = new Rng(seed);
  const c: LoraConfig = {
    r,
    alpha: 2 * r,
    dropout: 0,
    targetModules: [...PROJECTIONS],
    useRslora: false,
  };
  const modules = new Map<string, { a: HostTensor; b: HostTensor }>();
  for (const { path, p } of targetPaths(config, c)) {
    const [out, inp] = projectionShape(config, p);
    const a = Float32Array.from({ length: r * inp }, () => rng.normal() * scale);
    const b = Float32Array.from({ length: out * r }, () => rng.normal() * scale);
    modules.set(path, { a: { shape: [r, inp], data: a }, b: { shape: [out, r], data: b } });
  }
  return { config: c, modules };
};

const saveLora = (dir: string, w: LoraWeights) =>
  Effect.runPromise(savePeftAdapter(dir, w.config, w.modules, "tiny"));

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A gauge or counter of GET /metrics. */
const metric = async (s: ServerProcess, name: string): Promise<number> => {
  const text = (await get(s, "/metrics")).text;
  const line = text.split("\n").find((l) => l.startsWith(name + "{") || l.startsWith(name + " "));
  assert.ok(line, `no ${name} in /metrics`);
  return Number(line.split(" ").pop());
};

/** Waits until a request is in a running batch. */
const waitRunning = async (s: ServerProcess) => {
  const deadline = Date.now() + 10_000;
  while ((await metric(s, "vllm:num_requests_running")) < 1) {
    assert.ok(Date.now() < deadline, "no request started running");
    await sleep(5);
  }
};

const CHOICE_KEYS = [
  "finish_reason",
  "index",
  "logprobs",
  "prompt_logprobs",
  "prompt_token_ids",
  "stop_reason",
  "text",
  "token_ids",
];

// ---- the full-featured server ----------------------------------------------------------------

Deno.test("server: completions, LoRA, dev routes, prefix cache (real process)", async (t) => {
  const root = await Deno.makeTempDir({ prefix: "lorafold-server-" });
  const modelDir = join(root, "model");
  const { config, weights, tokenizer } = await writeTinyCheckpoint(modelDir, { seed: 11 });
  const srv = await startServer({
    modelDir,
    args: [
      "--enable-lora",
      "--served-model-name",
      "tiny",
      "--max-lora-rank",
      "8",
      "--max-loras",
      "2",
    ],
    env: { VLLM_ALLOW_RUNTIME_LORA_UPDATING: "1", VLLM_SERVER_DEV_MODE: "true" },
  });
  let baseWeights: WeightMap = weights;
  try {
    await t.step("health, version, models", async () => {
      const h = await get(srv, "/health");
      assert.equal(h.status, 200);
      assert.equal(h.text, "");
      const v = await get(srv, "/version");
      assert.match(v.json.version, /^\d+\.\d+\.\d+/);
      const m = await get(srv, "/v1/models");
      assert.equal(m.json.object, "list");
      assert.equal(m.json.data.length, 1);
      const card = m.json.data[0];
      assert.deepEqual(
        {
          id: card.id,
          object: card.object,
          owned_by: card.owned_by,
          root: card.root,
          parent: card.parent,
          max_model_len: card.max_model_len,
        },
        {
          id: "tiny",
          object: "model",
          owned_by: "vllm",
          root: modelDir,
          parent: null,
          max_model_len: 128,
        },
      );
      assert.equal(typeof card.created, "number");
      assert.deepEqual(await get(srv, "/no/such/route"), {
        status: 404,
        json: { detail: "Not Found" },
        text: '{"detail":"Not Found"}',
      });
      assert.equal((await get(srv, "/v1/completions")).status, 405);
    });

    await t.step("completion shape: every key present, nulls included", async () => {
      const res = await complete(srv, {
        model: "tiny",
        prompt: "ab",
        max_tokens: 5,
        temperature: 0,
      });
      assert.deepEqual(Object.keys(res).sort(), [
        "choices",
        "created",
        "id",
        "model",
        "object",
        "usage",
      ]);
      assert.match(res.id, /^cmpl-/);
      assert.equal(res.object, "text_completion");
      assert.equal(res.model, "tiny");
      assert.equal(res.choices.length, 1);
      const c = res.choices[0];
      assert.deepEqual(Object.keys(c).sort(), CHOICE_KEYS);
      assert.equal(c.index, 0);
      assert.equal(c.logprobs, null);
      assert.equal(c.token_ids, null);
      assert.equal(c.prompt_logprobs, null);
      assert.equal(c.prompt_token_ids, null);
      assert.ok(c.finish_reason === "length" || c.finish_reason === "stop");
      assert.deepEqual(Object.keys(res.usage).sort(), [
        "completion_tokens",
        "prompt_tokens",
        "prompt_tokens_details",
        "total_tokens",
      ]);
      assert.equal(res.usage.prompt_tokens, 3); // <bos> a b
      assert.equal(res.usage.prompt_tokens_details, null);
      assert.equal(res.usage.total_tokens, res.usage.prompt_tokens + res.usage.completion_tokens);
      // model omitted -> the base model
      const res2 = await complete(srv, { prompt: [1, 3, 4], max_tokens: 5, temperature: 0 });
      assert.equal(res2.model, "tiny");
      assert.equal(res2.choices[0].text, c.text);
    });

    await t.step("temperature 0: tokens and logprobs equal the in-process model", async () => {
      const prompt = [1, 5, 9, 12, 3];
      const res = await complete(srv, {
        prompt,
        max_tokens: 8,
        temperature: 0,
        logprobs: 3,
        return_token_ids: true,
        ignore_eos: true,
      });
      const c = res.choices[0];
      assert.equal(c.token_ids.length, 8);
      assert.equal(c.finish_reason, "length");
      assert.deepEqual(c.prompt_token_ids, prompt);
      await assertMatchesModel(config, weights, prompt, c);
      const lp = c.logprobs;
      assert.deepEqual(Object.keys(lp).sort(), [
        "text_offset",
        "token_logprobs",
        "tokens",
        "top_logprobs",
      ]);
      assert.deepEqual(lp.tokens, c.token_ids.map((id: number) => tokenizer.tokenText(id)));
      let off = 0;
      lp.tokens.forEach((tok: string, i: number) => {
        assert.equal(lp.text_offset[i], off);
        off += [...tok].length;
        assert.ok(Object.keys(lp.top_logprobs[i]).length >= 3);
        assert.ok(tok in lp.top_logprobs[i]);
      });
      assert.equal(c.text, tokenizer.decode(c.token_ids));
      // the prefix cache: the same prompt is a hit, a longer one reuses the cached prefix
      const hits = await metric(srv, "lorafold:prefix_cache_hits_total");
      const partial = await metric(srv, "lorafold:prefix_cache_partial_hits_total");
      const again = (await complete(srv, {
        prompt,
        max_tokens: 8,
        temperature: 0,
        logprobs: 3,
        return_token_ids: true,
        ignore_eos: true,
      })).choices[0];
      assert.deepEqual(again.logprobs, c.logprobs);
      assert.equal(await metric(srv, "lorafold:prefix_cache_hits_total"), hits + 1);
      const longer = [...prompt, 6, 7, 8];
      const ext = (await complete(srv, {
        prompt: longer,
        max_tokens: 6,
        temperature: 0,
        logprobs: 3,
        return_token_ids: true,
        ignore_eos: true,
      })).choices[0];
      assert.equal(await metric(srv, "lorafold:prefix_cache_partial_hits_total"), partial + 1);
      await assertMatchesModel(config, weights, longer, ext);
    });

    await t.step(
      "seeded sampling: deterministic, n>1 ordering, seed+j, equals in-process generate",
      async () => {
        const prompt = [1, 3, 4, 5];
        const body = {
          prompt: [prompt, prompt],
          n: 3,
          max_tokens: 10,
          temperature: 1,
          seed: 7,
          ignore_eos: true,
          return_token_ids: true,
        };
        const a = await complete(srv, body);
        const b = await complete(srv, body);
        assert.deepEqual(
          a.choices.map((c: Json) => c.token_ids),
          b.choices.map((c: Json) => c.token_ids),
        );
        assert.deepEqual(a.choices.map((c: Json) => c.index), [0, 1, 2, 3, 4, 5]);
        for (let j = 0; j < 3; j++) {
          assert.deepEqual(a.choices[j].token_ids, a.choices[3 + j].token_ids);
        }
        assert.notDeepEqual(a.choices[0].token_ids, a.choices[1].token_ids);
        const single = await complete(srv, { ...body, prompt, n: 1, seed: 8 });
        assert.deepEqual(single.choices[0].token_ids, a.choices[1].token_ids);
        // the same stream as the in-process engine (sample j uses seed + j)
        const gens = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
          const backend = cpuBackend();
          const ops = yield* backend.ops;
          const model = uploadModel(ops, config, weights);
          return yield* generate(
            backend,
            model,
            [0, 1, 2].map((j) => ({
              prompt,
              maxTokens: 10,
              stopTokenIds: [],
              seed: 7 + j,
              temperature: 1,
              topP: 1,
              topK: 0,
            })),
          );
        })));
        assert.deepEqual(
          a.choices.slice(0, 3).map((c: Json) => c.token_ids),
          gens.map((g) => g.tokens),
        );
        // different prompts in one batch: each choice carries its own prompt ids
        const prompts = [[1, 3], [1, 4, 5, 6, 7, 8]];
        const mixed = await complete(srv, {
          prompt: prompts,
          n: 2,
          max_tokens: 5,
          temperature: 0,
          logprobs: 1,
          ignore_eos: true,
          return_token_ids: true,
        });
        assert.deepEqual(mixed.choices.map((c: Json) => c.prompt_token_ids), [
          prompts[0],
          prompts[0],
          prompts[1],
          prompts[1],
        ]);
        assert.equal(mixed.usage.prompt_tokens, 8);
        assert.equal(mixed.usage.completion_tokens, 20);
        for (const c of mixed.choices) {
          await assertMatchesModel(config, weights, prompts[c.index >> 1], c);
        }
        // concurrent requests are batched by the worker: same results as one at a time
        const bodies = [
          {
            prompt: [1, 9, 10, 11, 12, 13, 14],
            n: 2,
            max_tokens: 7,
            seed: 21,
            ignore_eos: true,
            return_token_ids: true,
            logprobs: 0,
          },
          {
            prompt: "xy",
            n: 1,
            max_tokens: 4,
            seed: 22,
            temperature: 0.8,
            top_p: 0.9,
            return_token_ids: true,
            logprobs: 1,
          },
          {
            prompt: [[1, 15], [1, 16, 17]],
            n: 3,
            max_tokens: 5,
            seed: 23,
            top_k: 4,
            ignore_eos: true,
            return_token_ids: true,
          },
        ];
        // (queued while paused, then admitted at once: the worker takes all three in one batch)
        assert.equal((await post(srv, "/pause?mode=keep", {})).status, 200);
        const pending = Promise.all(bodies.map((b) => complete(srv, b)));
        while ((await metric(srv, "vllm:num_requests_waiting")) < bodies.length) await sleep(5);
        assert.equal((await post(srv, "/resume", {})).status, 200);
        const together = await pending;
        for (const [i, b] of bodies.entries()) {
          const alone = await complete(srv, { ...b, cache_salt: `alone-${i}` });
          assert.deepEqual(together[i].choices, alone.choices);
        }
      },
    );

    await t.step(
      "return_tokens_as_token_ids, return_token_ids, prompt_logprobs, echo",
      async () => {
        const res = await complete(srv, {
          prompt: [1, 7, 8],
          max_tokens: 4,
          temperature: 0,
          logprobs: 2,
          return_tokens_as_token_ids: true,
          return_token_ids: true,
          prompt_logprobs: 1,
          ignore_eos: true,
        });
        const c = res.choices[0];
        assert.deepEqual(c.logprobs.tokens, c.token_ids.map((id: number) => `token_id:${id}`));
        for (const top of c.logprobs.top_logprobs) {
          for (const k of Object.keys(top)) assert.match(k, /^token_id:\d+$/);
        }
        assert.deepEqual(c.prompt_token_ids, [1, 7, 8]);
        assert.equal(c.prompt_logprobs.length, 3);
        assert.equal(c.prompt_logprobs[0], null);
        const logits = await refLogits(config, weights, [1, 7, 8]);
        const lp = logSoftmax(logits.subarray(0, config.vocabSize));
        const e = c.prompt_logprobs[1]["7"];
        assert.ok(Math.abs(e.logprob - lp[7]) < 1e-4);
        assert.equal(e.decoded_token, tokenizer.tokenText(7));
        assert.equal(e.rank, 1 + [...lp].filter((x) => x > lp[7]).length);
        const echo = await complete(srv, {
          prompt: "abc",
          max_tokens: 3,
          temperature: 0,
          echo: true,
          ignore_eos: true,
        });
        assert.ok(echo.choices[0].text.startsWith("abc"));
        assert.equal(echo.choices[0].text.length, 6);
      },
    );

    await t.step(
      "stop_token_ids, stop strings, include_stop_str_in_output, min_tokens, ignore_eos",
      async () => {
        const prompt = [1, 10, 11];
        const base = await complete(srv, {
          prompt,
          max_tokens: 12,
          temperature: 0,
          ignore_eos: true,
          return_token_ids: true,
        });
        const g: number[] = base.choices[0].token_ids;
        const text: string = base.choices[0].text;
        const stopId = g[3];
        const k = g.indexOf(stopId);
        const r1 = (await complete(srv, {
          prompt,
          max_tokens: 12,
          temperature: 0,
          ignore_eos: true,
          return_token_ids: true,
          stop_token_ids: [stopId],
        })).choices[0];
        assert.deepEqual(r1.token_ids, g.slice(0, k + 1));
        assert.equal(r1.finish_reason, "stop");
        assert.equal(r1.stop_reason, stopId);
        assert.equal(r1.text, tokenizer.decode(g.slice(0, k)));
        const r2 = (await complete(srv, {
          prompt,
          max_tokens: 12,
          temperature: 0,
          ignore_eos: true,
          stop_token_ids: [stopId],
          include_stop_str_in_output: true,
        })).choices[0];
        assert.equal(r2.text, tokenizer.decode(g.slice(0, k + 1)));
        const stop = text.slice(5, 7);
        const cut = text.indexOf(stop);
        const r3 = (await complete(srv, {
          prompt,
          max_tokens: 12,
          temperature: 0,
          ignore_eos: true,
          stop: [stop],
        })).choices[0];
        assert.equal(r3.finish_reason, "stop");
        assert.equal(r3.stop_reason, stop);
        assert.equal(r3.text, text.slice(0, cut));
        const r4 = (await complete(srv, {
          prompt,
          max_tokens: 12,
          temperature: 0,
          ignore_eos: true,
          stop,
          include_stop_str_in_output: true,
        })).choices[0];
        assert.equal(r4.text, text.slice(0, cut + stop.length));
        // min_tokens bans the stop token for the first tokens
        const r5 = (await complete(srv, {
          prompt,
          max_tokens: 12,
          temperature: 0,
          ignore_eos: true,
          return_token_ids: true,
          stop_token_ids: [g[0]],
          min_tokens: 3,
        })).choices[0];
        assert.notEqual(r5.token_ids[0], g[0]);
        assert.ok(r5.token_ids.slice(0, 3).every((x: number) => x !== g[0]));
        // EOS ends a sequence unless ignore_eos: force it with min_p/top_k sampling on EOS only
        const eos = await complete(srv, {
          prompt,
          max_tokens: 12,
          temperature: 0,
          stop_token_ids: [],
          return_token_ids: true,
        });
        const ids: number[] = eos.choices[0].token_ids;
        if (ids.includes(2)) {
          assert.equal(ids.indexOf(2), ids.length - 1);
          assert.equal(eos.choices[0].finish_reason, "stop");
          assert.equal(eos.choices[0].stop_reason, null);
        }
        const withMinP = await complete(srv, {
          prompt,
          max_tokens: 6,
          temperature: 1,
          min_p: 0.3,
          top_k: 3,
          top_p: 0.9,
          seed: 3,
        });
        assert.equal(withMinP.choices.length, 1);
      },
    );

    await t.step(
      "malformed requests -> 400/404 envelopes, and the server keeps serving",
      async () => {
        const notJson = await srv.request("/v1/completions", {
          method: "POST",
          body: "{not json",
          headers: { "content-type": "application/json" },
        });
        const notJsonText = await notJson.text();
        assertEnvelope(
          { status: notJson.status, text: notJsonText, json: JSON.parse(notJsonText) },
          400,
          "JSON",
        );
        assertEnvelope(await post(srv, "/v1/completions", { prompt: 5 }), 400, "prompt");
        assertEnvelope(
          await post(srv, "/v1/completions", { prompt: "ab", temperature: "hot" }),
          400,
          "temperature",
        );
        assertEnvelope(await post(srv, "/v1/completions", { max_tokens: 3 }), 400, "prompt");
        assertEnvelope(
          await post(srv, "/v1/completions", { prompt: "ab", top_k: -5 }),
          400,
          "top_k",
        );
        assertEnvelope(
          await post(srv, "/v1/completions", { prompt: "ab", logprobs: 50 }),
          400,
          "logprobs",
        );
        assertEnvelope(await post(srv, "/v1/completions", { prompt: "ab", n: 0 }), 400, "n");
        assertEnvelope(
          await post(srv, "/v1/completions", { prompt: "ab", top_p: 0 }),
          400,
          "top_p",
        );
        assertEnvelope(
          await post(srv, "/v1/completions", { prompt: [], max_tokens: 2 }),
          400,
          "prompt",
        );
        assertEnvelope(
          await post(srv, "/v1/completions", { prompt: [1, 999], max_tokens: 2 }),
          400,
          "999",
        );
        assertEnvelope(
          await post(srv, "/v1/completions", { prompt: "a", max_tokens: 500 }),
          400,
          "cannot be greater than max_model_len",
        );
        assertEnvelope(
          await post(srv, "/v1/completions", { prompt: "a", model: "nope" }),
          404,
          "nope",
        );
        assertEnvelope(await post(srv, "/v1/completions", { prompt: "ABC" }), 400, "prompt");
        assertEnvelope(
          await post(srv, "/v1/completions", {
            prompt: "a",
            stream_options: { include_usage: true },
          }),
          400,
          "stream",
        );
        const ok = await complete(srv, { prompt: "ab", max_tokens: 2, temperature: 0 });
        assert.equal(ok.choices.length, 1);
      },
    );

    await t.step("tokenize and detokenize", async () => {
      const tk = await post(srv, "/tokenize", { prompt: "abc" });
      assert.equal(tk.status, 200);
      assert.deepEqual(tk.json, {
        count: 4,
        max_model_len: 128,
        tokens: [1, 3, 4, 5],
        token_strs: null,
      });
      const tk2 = await post(srv, "/tokenize", { prompt: "abc", add_special_tokens: false });
      assert.deepEqual(tk2.json.tokens, [3, 4, 5]);
      const dt = await post(srv, "/detokenize", { tokens: [3, 4, 5] });
      assert.deepEqual(dt.json, { prompt: "abc" });
      assertEnvelope(await post(srv, "/tokenize", { prompt: 3 }), 400, "prompt");
      assertEnvelope(await post(srv, "/detokenize", { tokens: [3, 1000] }), 400, "1000");
    });

    const loraA = randomLora(config, 101);
    const loraB = randomLora(config, 202);
    const dirA = join(root, "lora-a");
    const dirB = join(root, "lora-b");
    await saveLora(dirA, loraA);
    await saveLora(dirB, loraB);

    await t.step("runtime LoRA: load, serve, list, errors, unload", async () => {
      const load = await post(srv, "/v1/load_lora_adapter", {
        lora_name: "pol-v1",
        lora_path: dirA,
      });
      assert.equal(load.status, 200, load.text);
      assert.equal(load.text, "Success: LoRA adapter 'pol-v1' added successfully.");
      const models = (await get(srv, "/v1/models")).json.data;
      assert.deepEqual(models.map((m: Json) => m.id), ["tiny", "pol-v1"]);
      assert.equal(models[1].root, dirA);
      assert.equal(models[1].parent, "tiny");
      const prompt = [1, 20, 21, 22];
      const body = {
        prompt,
        max_tokens: 6,
        temperature: 0,
        logprobs: 2,
        return_token_ids: true,
        ignore_eos: true,
      };
      const onBase = (await complete(srv, { ...body, model: "tiny" })).choices[0];
      const onLora = await complete(srv, { ...body, model: "pol-v1" });
      assert.equal(onLora.model, "pol-v1");
      assert.notDeepEqual(
        onLora.choices[0].logprobs.token_logprobs,
        onBase.logprobs.token_logprobs,
      );
      await assertMatchesModel(config, weights, prompt, onLora.choices[0], loraA);
      // errors
      assertEnvelope(
        await post(srv, "/v1/load_lora_adapter", { lora_name: "pol-v1", lora_path: dirA }),
        400,
        "already",
      );
      assertEnvelope(await post(srv, "/v1/load_lora_adapter", { lora_name: "x" }), 400);
      assertEnvelope(
        await post(srv, "/v1/load_lora_adapter", {
          lora_name: "x",
          lora_path: join(root, "missing"),
        }),
        404,
      );
      const big = join(root, "lora-big");
      await saveLora(big, randomLora(config, 5, 16));
      assertEnvelope(
        await post(srv, "/v1/load_lora_adapter", { lora_name: "big", lora_path: big }),
        400,
        "rank",
      );
      const broken = join(root, "lora-broken");
      const bad = randomLora(config, 6);
      const [path0, m0] = [...bad.modules][0];
      (bad.modules as Map<string, { a: HostTensor; b: HostTensor }>).set(path0, {
        a: { shape: [2, m0.a.shape[1]], data: m0.a.data.subarray(0, 2 * m0.a.shape[1]) },
        b: m0.b,
      });
      await saveLora(broken, bad);
      assertEnvelope(
        await post(srv, "/v1/load_lora_adapter", { lora_name: "broken", lora_path: broken }),
        400,
      );
      assertEnvelope(await post(srv, "/v1/load_lora_adapter", "{"), 400);
      // a second adapter and a third (max-loras 2: evicted/reloaded on use transparently)
      assert.equal(
        (await post(srv, "/v1/load_lora_adapter", { lora_name: "pol-b", lora_path: dirB })).status,
        200,
      );
      assert.equal(
        (await post(srv, "/v1/load_lora_adapter", { lora_name: "pol-c", lora_path: dirA })).status,
        200,
      );
      const onB = await complete(srv, { ...body, model: "pol-b" });
      await assertMatchesModel(config, weights, prompt, onB.choices[0], loraB);
      const onC = await complete(srv, { ...body, model: "pol-c" });
      assert.deepEqual(onC.choices[0].token_ids, onLora.choices[0].token_ids);
      // unload
      const un = await post(srv, "/v1/unload_lora_adapter", { lora_name: "pol-c" });
      assert.equal(un.status, 200);
      assert.equal(un.text, "Success: LoRA adapter 'pol-c' removed successfully.");
      assertEnvelope(await post(srv, "/v1/completions", { ...body, model: "pol-c" }), 404, "pol-c");
      assertEnvelope(
        await post(srv, "/v1/unload_lora_adapter", { lora_name: "pol-c" }),
        404,
        "pol-c",
      );
      assert.deepEqual((await get(srv, "/v1/models")).json.data.map((m: Json) => m.id), [
        "tiny",
        "pol-v1",
        "pol-b",
      ]);
    });

    await t.step(
      "prefix cache is keyed by adapter NAME: in-place reload serves stale prefill until salt/reset",
      async () => {
        const prompt = [1, 30, 31, 32, 33];
        const body = {
          prompt,
          max_tokens: 4,
          temperature: 0,
          logprobs: 0,
          return_token_ids: true,
          ignore_eos: true,
          model: "pol-v1",
        };
        const before = (await complete(srv, body)).choices[0];
        await assertMatchesModel(config, weights, prompt, before, loraA);
        const re = await post(srv, "/v1/load_lora_adapter", {
          lora_name: "pol-v1",
          lora_path: dirB,
          load_inplace: true,
        });
        assert.equal(re.status, 200, re.text);
        // same name, same prompt: the first token comes from the cached prefill of the OLD adapter
        const stale = (await complete(srv, body)).choices[0];
        assert.equal(stale.token_ids[0], before.token_ids[0]);
        assert.equal(stale.logprobs.token_logprobs[0], before.logprobs.token_logprobs[0]);
        const freshRef = await refLogits(config, weights, prompt, loraB);
        const V = config.vocabSize;
        const lpB = logSoftmax(freshRef.subarray((prompt.length - 1) * V, prompt.length * V));
        assert.ok(
          Math.abs(stale.logprobs.token_logprobs[0] - lpB[stale.token_ids[0]]) > 1e-3,
          "expected a stale prefill",
        );
        // a new cache_salt misses the cache: fresh results of the new weights
        const salted = (await complete(srv, { ...body, cache_salt: "v2" })).choices[0];
        await assertMatchesModel(config, weights, prompt, salted, loraB);
        // reset_prefix_cache fixes the unsalted request too
        const reset = await post(srv, "/reset_prefix_cache", {});
        assert.equal(reset.status, 200);
        const after = (await complete(srv, body)).choices[0];
        await assertMatchesModel(config, weights, prompt, after, loraB);
      },
    );

    await t.step(
      "dev: reload_weights (stale until reset, failures keep the old weights)",
      async () => {
        const prompt = [1, 40, 41, 42];
        const body = {
          prompt,
          max_tokens: 4,
          temperature: 0,
          logprobs: 1,
          return_token_ids: true,
          ignore_eos: true,
        };
        const before = (await complete(srv, body)).choices[0];
        await assertMatchesModel(config, baseWeights, prompt, before);
        const v2 = join(root, "weights-v2");
        const w2 = await writeTinyCheckpoint(v2, { seed: 99 });
        const rpc = await post(srv, "/collective_rpc", {
          method: "reload_weights",
          kwargs: { weights_path: v2, is_checkpoint_format: true },
        });
        assert.equal(rpc.status, 200, rpc.text);
        assert.deepEqual(rpc.json, { results: [null] });
        baseWeights = w2.weights;
        const stale = (await complete(srv, body)).choices[0];
        assert.equal(stale.logprobs.token_logprobs[0], before.logprobs.token_logprobs[0]);
        const fresh = (await complete(srv, { ...body, cache_salt: "w2" })).choices[0];
        await assertMatchesModel(config, baseWeights, prompt, fresh);
        // pause(keep) with a request frozen mid-generation: reset_prefix_cache does nothing
        const long = post(srv, "/v1/completions", {
          prompt: [1, 3],
          n: 16,
          max_tokens: 120,
          ignore_eos: true,
          seed: 1,
        });
        await waitRunning(srv);
        assert.deepEqual((await post(srv, "/pause?mode=keep", {})).json, { status: "paused" });
        assert.deepEqual((await get(srv, "/is_paused")).json, { is_paused: true });
        assert.equal((await post(srv, "/reset_prefix_cache", {})).status, 200);
        const stillStale = post(srv, "/v1/completions", body); // queued while paused
        await sleep(150);
        assert.equal(await metric(srv, "vllm:num_requests_running"), 1); // frozen, not finished
        assert.equal(await metric(srv, "vllm:num_requests_waiting"), 1);
        assert.deepEqual((await post(srv, "/resume", {})).json, { status: "resumed" });
        const longRes = await long;
        assert.equal(longRes.status, 200);
        assert.ok(longRes.json.choices.every((c: Json) => c.finish_reason === "length"));
        const s2 = (await stillStale).json.choices[0];
        assert.equal(
          s2.logprobs.token_logprobs[0],
          before.logprobs.token_logprobs[0],
          "reset while busy must not clear",
        );
        // drained: reset works
        assert.equal((await post(srv, "/reset_prefix_cache", {})).status, 200);
        const after = (await complete(srv, body)).choices[0];
        await assertMatchesModel(config, baseWeights, prompt, after);
        // failures: typed envelopes, old weights keep serving
        assertEnvelope(
          await post(srv, "/collective_rpc", {
            method: "reload_weights",
            kwargs: { weights_path: join(root, "nowhere") },
          }),
          400,
          "nowhere",
        );
        const other = join(root, "weights-other");
        await writeTinyCheckpoint(other, {
          config: tinyServerConfig({ hiddenSize: 8, numHeads: 2, numKvHeads: 1 }),
        });
        assertEnvelope(
          await post(srv, "/collective_rpc", {
            method: "reload_weights",
            kwargs: { weights_path: other },
          }),
          400,
          "hiddenSize",
        );
        const corrupt = join(root, "weights-corrupt");
        await writeTinyCheckpoint(corrupt, { seed: 5 });
        await Deno.writeFile(join(corrupt, "model.safetensors"), new Uint8Array([1, 2, 3]));
        assertEnvelope(
          await post(srv, "/collective_rpc", {
            method: "reload_weights",
            kwargs: { weights_path: corrupt },
          }),
          400,
        );
        assertEnvelope(await post(srv, "/collective_rpc", { method: "nope" }), 400, "nope");
        assertEnvelope(await post(srv, "/collective_rpc", { kwargs: {} }), 400, "method");
        const still = (await complete(srv, { ...body, cache_salt: "after-failures" })).choices[0];
        await assertMatchesModel(config, baseWeights, prompt, still);
      },
    );

    await t.step("dev: pause wait/abort/resume", async () => {
      // wait: requests arriving while paused wait for resume
      assert.deepEqual((await post(srv, "/pause?mode=wait", {})).json, { status: "paused" });
      let done = false;
      const pending = post(srv, "/v1/completions", { prompt: "ab", max_tokens: 2 }).then((r) => {
        done = true;
        return r;
      });
      await sleep(200);
      assert.equal(done, false);
      assert.deepEqual((await post(srv, "/resume", {})).json, { status: "resumed" });
      assert.equal((await pending).status, 200);
      assert.deepEqual((await get(srv, "/is_paused")).json, { is_paused: false });
      // abort: the running request ends with finish_reason "abort"
      const long = post(srv, "/v1/completions", {
        prompt: [1, 3],
        n: 16,
        max_tokens: 120,
        ignore_eos: true,
        seed: 2,
        return_token_ids: true,
      });
      await waitRunning(srv);
      assert.deepEqual((await post(srv, "/pause?mode=abort", {})).json, { status: "paused" });
      const res = await long;
      assert.equal(res.status, 200);
      assert.ok(
        res.json.choices.some((c: Json) => c.finish_reason === "abort"),
        JSON.stringify(res.json.choices.map((c: Json) => c.finish_reason)),
      );
      assert.ok(res.json.choices.every((c: Json) => c.token_ids.length < 120));
      assertEnvelope(await post(srv, "/pause?mode=sideways", {}), 400, "mode");
      await post(srv, "/resume", {});
      const ok = await complete(srv, { prompt: "ab", max_tokens: 2 });
      assert.equal(ok.choices.length, 1);
    });

    await t.step(
      "continuous batching: a request joins a running batch and leaves it first",
      async () => {
        const generated = await metric(srv, "vllm:generation_tokens_total");
        const order: string[] = [];
        const long = post(srv, "/v1/completions", {
          prompt: [1, 3],
          n: 16,
          max_tokens: 120,
          ignore_eos: true,
          seed: 5,
        }).then((r) => (order.push("long"), r));
        await waitRunning(srv);
        // frozen mid-generation, so that the short request surely arrives while it runs
        assert.equal((await post(srv, "/pause?mode=keep", {})).status, 200);
        const short = post(srv, "/v1/completions", {
          prompt: [1, 4, 5],
          max_tokens: 3,
          ignore_eos: true,
          seed: 6,
          return_token_ids: true,
        }).then((r) => (order.push("short"), r));
        while ((await metric(srv, "vllm:num_requests_waiting")) < 1) await sleep(5);
        assert.equal(await metric(srv, "vllm:num_requests_running"), 1);
        assert.equal((await post(srv, "/resume", {})).status, 200);
        const [l, s] = await Promise.all([long, short]);
        assert.deepEqual(order, ["short", "long"]);
        assert.equal(s.json.choices[0].token_ids.length, 3);
        assert.ok(l.json.choices.every((c: Json) => c.finish_reason === "length"));
        // ... with the same tokens as alone
        const alone = await complete(srv, {
          prompt: [1, 4, 5],
          max_tokens: 3,
          ignore_eos: true,
          seed: 6,
          return_token_ids: true,
          cache_salt: "alone",
        });
        assert.deepEqual(alone.choices, s.json.choices);
        assert.equal(
          await metric(srv, "vllm:generation_tokens_total"),
          generated + 16 * 120 + 3 + 3,
        );
      },
    );

    await t.step("SIGTERM with a request held by a pause: 503 for it, clean exit", async () => {
      assert.equal((await post(srv, "/pause?mode=keep", {})).status, 200);
      const held = post(srv, "/v1/completions", { prompt: "ab", max_tokens: 2 });
      while ((await metric(srv, "vllm:num_requests_waiting")) < 1) await sleep(5);
      const t0 = Date.now();
      const status = await srv.stop();
      assert.ok(Date.now() - t0 < 4000, "graceful shutdown took too long");
      assert.equal(status.code, 0);
      const r = await held;
      assertEnvelope(r, 503);
    });
  } catch (e) {
    console.error(srv.logs());
    throw e;
  } finally {
    await srv.stop();
    await Deno.remove(root, { recursive: true });
  }
});

// ---- a server without runtime LoRA or dev mode, with an API key ------------------------------

Deno.test("server: disabled routes 404, --api-key guards /v1 only, processed logprobs", async () => {
  const root = await Deno.makeTempDir({ prefix: "lorafold-server-" });
  const modelDir = join(root, "model");
  await writeTinyCheckpoint(modelDir, { seed: 3 });
  // --enable-lora without VLLM_ALLOW_RUNTIME_LORA_UPDATING: no runtime LoRA routes
  const srv = await startServer({
    modelDir,
    args: [
      "--enable-lora",
      "--api-key",
      "sekret",
      "--logprobs-mode",
      "processed_logprobs",
      "--max-logprobs",
      "5",
    ],
  });
  try {
    const auth = { authorization: "Bearer sekret" };
    const noKey = await srv.request("/v1/models");
    assertEnvelope({ status: noKey.status, json: await noKey.json(), text: "" }, 401);
    const wrong = await srv.request("/v1/completions", {
      body: { prompt: "a" },
      headers: { authorization: "Bearer nope" },
    });
    assert.equal(wrong.status, 401);
    await wrong.body?.cancel();
    const models = await srv.request("/v1/models", { headers: auth });
    assert.equal(models.status, 200);
    assert.equal((await models.json()).data[0].id, modelDir);
    const health = await srv.request("/health");
    assert.equal(health.status, 200);
    await health.body?.cancel();
    const tok = await srv.request("/tokenize", { body: { prompt: "ab" } });
    assert.equal(tok.status, 200);
    await tok.body?.cancel();
    for (
      const path of [
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/pause",
        "/resume",
        "/collective_rpc",
        "/reset_prefix_cache",
      ]
    ) {
      const r = await srv.request(path, {
        method: "POST",
        body: { lora_name: "x", lora_path: root },
        headers: auth,
      });
      assert.equal(r.status, 404, path);
      await r.body?.cancel();
    }
    const paused = await srv.request("/is_paused");
    assert.equal(paused.status, 404);
    await paused.body?.cancel();
    // processed logprobs: of the tempered, top-k filtered distribution (top-5 sums to 1)
    const r = await srv.request("/v1/completions", {
      body: {
        prompt: [1, 3, 4],
        max_tokens: 4,
        temperature: 0.7,
        top_k: 5,
        logprobs: 5,
        seed: 4,
        ignore_eos: true,
      },
      headers: auth,
    });
    const res = await r.json();
    assert.equal(r.status, 200, JSON.stringify(res));
    for (
      const [i, top] of (res.choices[0].logprobs.top_logprobs as Record<string, number>[]).entries()
    ) {
      const mass = Object.values(top).reduce((s, v) => s + Math.exp(v), 0);
      assert.ok(Math.abs(mass - 1) < 1e-6, `step ${i}: mass ${mass}`);
      assert.ok(Object.values(top).includes(res.choices[0].logprobs.token_logprobs[i]));
    }
    const over = await srv.request("/v1/completions", {
      body: { prompt: "a", logprobs: 6 },
      headers: auth,
    });
    assertEnvelope({ status: over.status, json: await over.json(), text: "" }, 400, "logprobs");
  } catch (e) {
    console.error(srv.logs());
    throw e;
  } finally {
    await srv.stop();
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("server: a bad flag prints one line naming it and exits with code 2", async () => {
  for (
    const [args, mention] of [
      [["--model", "/x", "--max-lora-rank", "7"], "--max-lora-rank"],
      [["--model", "/x", "--logprobs-mode", "weird"], '"raw_logprobs" | "processed_logprobs"'],
      [["--model", "/x", "--backend", "tpu"], '"auto" | "cpu" | "webgpu"'],
      [["--model", "/x", "--port", "http"], "--port"],
      [["--model", "/x", "--frobnicate"], "--frobnicate"],
      [["--port", "80"], "--model"],
    ] as const
  ) {
    const r = await runServeCli(args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    const lines = r.stderr.trim().split("\n");
    assert.equal(lines.length, 1, r.stderr);
    assert.ok(lines[0].includes(mention), lines[0]);
  }
  const missing = await runServeCli([
    "--model",
    "/definitely/not/here",
    "--backend",
    "cpu",
    "--port",
    "0",
  ]);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /not\/here/);
});
