/**
 * The embedded server against vLLM's behaviour, both ways (issue 13): what vLLM implements is
 * implemented the same way (streaming through the official `openai` SDK, allowed_token_ids,
 * truncate_prompt_tokens, request_id, penalties, logit_bias, min_p, echo + max_tokens 0, int64
 * seeds), what this server cannot do is refused with a 400 (use_beam_search), and vLLM's
 * validation answers are matched (empty prompt, empty model name, Content-Type, infinite
 * temperature, caps on n / prompt list / cache_salt / stop strings / body size / prompt length,
 * adapters vLLM rejects, paths outside --allowed-lora-root, no file bytes in messages).
 * Everything runs against a REAL server process on loopback with a tiny checkpoint; penalised
 * greedy decoding is checked against an independent float64 reference over the in-process
 * model's logits.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Effect } from "effect";
// test-only: kept out of deno.json "imports" so that nothing under mod.ts can reach it
// deno-lint-ignore no-import-prefix
import OpenAI from "npm:openai@7.55.0";
import { cpuBackend } from "../src/backend/backend.ts";
import type { LoraConfig, LoraWeights } from "../src/lora/adapter.ts";
import { targetPaths } from "../src/lora/adapter.ts";
import { savePeftAdapter } from "../src/lora/peft.ts";
import type { ModelConfig } from "../src/model/config.ts";
import { forward, uploadModel } from "../src/model/decoder.ts";
import { Rng } from "../src/model/rng.ts";
import { logSoftmax } from "../src/model/sampling.ts";
import {
  type HostTensor,
  PROJECTIONS,
  projectionShape,
  type WeightMap,
} from "../src/model/weights.ts";
import { type ServerProcess, startServer, writeTinyCheckpoint } from "./support/server_process.ts";

// deno-lint-ignore no-explicit-any
type Json = any;

const send = async (
  s: ServerProcess,
  path: string,
  body: unknown,
  headers: Record<string, string> = {},
): Promise<{ status: number; json: Json; text: string }> => {
  const r = await s.request(path, {
    method: "POST",
    body,
    headers: typeof body === "string"
      ? { "content-type": "application/json", ...headers }
      : headers,
  });
  const text = await r.text();
  let json: Json = null;
  try {
    json = JSON.parse(text);
  } catch { /* not JSON */ }
  return { status: r.status, json, text };
};

const complete = async (s: ServerProcess, body: unknown): Promise<Json> => {
  const r = await send(s, "/v1/completions", body);
  assert.equal(r.status, 200, r.text);
  return r.json;
};

/** A 4xx envelope whose message contains `mentions`. */
const assertRefused = (
  r: { status: number; json: Json; text: string },
  status: number,
  mentions: string,
) => {
  assert.equal(r.status, status, r.text);
  assert.equal(r.json?.error?.code, status, r.text);
  assert.ok(r.json.error.message.includes(mentions), `"${mentions}" not in ${r.text}`);
};

const refLogits = (config: ModelConfig, weights: WeightMap, ids: readonly number[]) =>
  Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const ops = yield* cpuBackend().ops;
    const model = uploadModel(ops, config, weights);
    const { logits } = forward(ops, model, { ids, batch: 1, seqLen: ids.length }, {});
    return (yield* ops.read([logits]))[0];
  })));

/** vLLM's penalties and bias on one row of logits, written independently in float64. */
const penalise = (
  row: ArrayLike<number>,
  prompt: readonly number[],
  out: readonly number[],
  p: { presence: number; frequency: number; repetition: number; bias: Record<number, number> },
): Float64Array => {
  const w = Float64Array.from(row);
  for (const [t, b] of Object.entries(p.bias)) w[Number(t)] += b;
  const seen = new Set([...prompt, ...out]);
  for (let t = 0; t < w.length; t++) {
    if (seen.has(t)) w[t] = w[t] > 0 ? w[t] / p.repetition : w[t] * p.repetition;
    const c = out.filter((x) => x === t).length;
    w[t] -= p.frequency * c + p.presence * (c > 0 ? 1 : 0);
  }
  return w;
};

const argmax = (xs: ArrayLike<number>): number => {
  let best = 0;
  for (let i = 1; i < xs.length; i++) if (xs[i] > xs[best]) best = i;
  return best;
};

const randomLora = (config: ModelConfig, seed: number, r = 4): LoraWeights => {
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
    const a = Float32Array.from({ length: r * inp }, () => rng.normal() * 0.5);
    const b = Float32Array.from({ length: out * r }, () => rng.normal() * 0.5);
    modules.set(path, { a: { shape: [r, inp], data: a }, b: { shape: [out, r], data: b } });
  }
  return { config: c, modules };
};

/** Reads an SSE body into its `data:` payloads. */
const sseData = async (r: Response): Promise<string[]> => {
  const text = await r.text();
  return text.split("\n\n").filter((e) => e.length > 0).map((e) => {
    assert.ok(e.startsWith("data: "), `not an SSE data event: ${JSON.stringify(e)}`);
    return e.slice(6);
  });
};

Deno.test("server fidelity: vLLM's fields implemented or refused, vLLM's validation answers", async (t) => {
  const root = await Deno.makeTempDir({ prefix: "lorafold-fidelity-" });
  const modelDir = join(root, "model");
  const { config, weights } = await writeTinyCheckpoint(modelDir, { seed: 5 });
  // a chat template within the tiny alphabet (rendered by src/tokenizer/chat_template.ts)
  await Deno.writeTextFile(
    join(modelDir, "tokenizer_config.json"),
    JSON.stringify({
      chat_template: "{% for m in messages %}{{ m.role }} {{ m.content }}. {% endfor %}" +
        "{% if add_generation_prompt %}assistant {% endif %}",
    }),
  );
  const loraRoot = join(root, "loras");
  await Deno.mkdir(loraRoot);
  const srv = await startServer({
    modelDir,
    args: [
      "--served-model-name",
      "tiny",
      "--enable-lora",
      "--max-lora-rank",
      "8",
      "--max-logprobs",
      "64",
      "--allowed-lora-root",
      loraRoot,
      "--max-request-body-mb",
      "2",
    ],
    env: { VLLM_ALLOW_RUNTIME_LORA_UPDATING: "1" },
  });
  try {
    const V = config.vocabSize;
    const client = new OpenAI({ apiKey: "none", baseURL: `${srv.url}/v1`, maxRetries: 0 });

    await t.step(
      "stream=true: the openai SDK streams; deltas add up to the JSON answer",
      async () => {
        const body = {
          model: "tiny",
          prompt: "ab",
          max_tokens: 12,
          temperature: 0,
          logprobs: 2,
          ignore_eos: true,
        };
        const whole = await complete(srv, body);
        const stream = await client.completions.create({
          ...body,
          stream: true,
          stream_options: { include_usage: true },
        } as OpenAI.CompletionCreateParamsStreaming);
        let text = "";
        const tokens: string[] = [];
        let usage: Json = null;
        let finish: string | null = null;
        let chunks = 0;
        for await (const chunk of stream) {
          chunks++;
          assert.equal(chunk.object, "text_completion");
          assert.equal(chunk.model, "tiny");
          for (const c of chunk.choices) {
            text += c.text;
            tokens.push(...(c.logprobs?.tokens ?? []));
            if (c.finish_reason) finish = c.finish_reason;
          }
          if (chunk.usage) usage = chunk.usage;
        }
        assert.ok(chunks >= 3, `only ${chunks} chunks`);
        assert.equal(text, whole.choices[0].text);
        assert.deepEqual(tokens, whole.choices[0].logprobs.tokens);
        assert.equal(finish, "length");
        assert.deepEqual(usage, whole.usage);
        // the wire: data lines, the last chunk is the usage (no choices), then [DONE]
        const raw = await srv.request("/v1/completions", {
          method: "POST",
          body: { ...body, stream: true, stream_options: { include_usage: true }, n: 1 },
        });
        assert.equal(raw.headers.get("content-type")?.split(";")[0], "text/event-stream");
        const events = await sseData(raw);
        assert.equal(events.at(-1), "[DONE]");
        const last = JSON.parse(events.at(-2)!);
        assert.deepEqual(last.choices, []);
        assert.deepEqual(last.usage, whole.usage);
        // n > 1 and two prompts: per-index deltas add up to each choice; token ids as deltas,
        // prompt_token_ids in a choice's first chunk only
        const multi = {
          model: "tiny",
          prompt: [[1, 3, 4], [1, 5]],
          n: 2,
          max_tokens: 9,
          seed: 11,
          ignore_eos: true,
          return_token_ids: true,
        };
        const multiWhole = await complete(srv, multi);
        const multiRaw = await srv.request("/v1/completions", {
          method: "POST",
          body: { ...multi, stream: true },
        });
        const texts = ["", "", "", ""];
        const ids: number[][] = [[], [], [], []];
        const promptIds: (number[] | null)[][] = [[], [], [], []];
        const finishes: (string | null)[] = [null, null, null, null];
        for (const e of (await sseData(multiRaw)).slice(0, -1)) {
          for (const c of JSON.parse(e).choices) {
            texts[c.index] += c.text;
            ids[c.index].push(...c.token_ids);
            promptIds[c.index].push(c.prompt_token_ids);
            if (c.finish_reason) finishes[c.index] = c.finish_reason;
          }
        }
        multiWhole.choices.forEach((c: Json, i: number) => {
          assert.equal(texts[i], c.text);
          assert.deepEqual(ids[i], c.token_ids);
          assert.deepEqual(promptIds[i][0], c.prompt_token_ids);
          assert.ok(promptIds[i].slice(1).every((p) => p === null));
          assert.equal(finishes[i], c.finish_reason);
        });
        // stop strings: the streamed text never runs past the stop
        const stopBody = { model: "tiny", prompt: "ab", max_tokens: 30, seed: 3, stop: ["e", "k"] };
        const stopped = await complete(srv, stopBody);
        const s2 = await client.completions.create({ ...stopBody, stream: true });
        let t2 = "";
        for await (const c of s2) t2 += c.choices.map((x) => x.text).join("");
        assert.equal(t2, stopped.choices[0].text);
        // validation errors are answered before the stream starts
        assertRefused(
          await send(srv, "/v1/completions", { prompt: "ab", stream: true, prompt_logprobs: 1 }),
          400,
          "not available when `stream=True`",
        );
      },
    );

    await t.step("a streaming client that goes away aborts its request", async () => {
      const metric = async (name: string) => {
        const text = await (await srv.request("/metrics")).text();
        return Number(text.split("\n").find((l) => l.startsWith(name + "{"))!.split(" ").pop());
      };
      const before = await metric("vllm:generation_tokens_total");
      const r = await srv.request("/v1/completions", {
        method: "POST",
        body: { prompt: "ab", n: 64, max_tokens: 120, seed: 1, ignore_eos: true, stream: true },
      });
      const reader = r.body!.getReader();
      await reader.read(); // the first chunk: generation is under way
      await reader.cancel();
      const deadline = Date.now() + 20_000;
      while ((await metric("vllm:num_requests_running")) > 0) {
        assert.ok(Date.now() < deadline, "the abandoned request kept running");
        await new Promise((res) => setTimeout(res, 10));
      }
      const generated = (await metric("vllm:generation_tokens_total")) - before;
      assert.ok(generated < 64 * 120, `all ${generated} tokens were generated anyway`);
    });

    await t.step("stream_options without stream is vLLM's 400", async () => {
      assertRefused(
        await send(srv, "/v1/completions", {
          prompt: "ab",
          stream_options: { include_usage: true },
        }),
        400,
        "Stream options can only be defined when `stream=True`.",
      );
    });

    await t.step(
      "allowed_token_ids: every sampled token is allowed; bad lists are 400",
      async () => {
        const allowed = [5, 9, 17];
        const r = await complete(srv, {
          prompt: [1, 3, 4],
          n: 4,
          max_tokens: 10,
          seed: 1,
          allowed_token_ids: allowed,
          return_token_ids: true,
        });
        for (const c of r.choices) for (const tok of c.token_ids) assert.ok(allowed.includes(tok));
        assertRefused(
          await send(srv, "/v1/completions", { prompt: "ab", allowed_token_ids: [] }),
          400,
          "allowed_token_ids is not None and empty!",
        );
        assertRefused(
          await send(srv, "/v1/completions", { prompt: "ab", allowed_token_ids: [3, V] }),
          400,
          "allowed_token_ids contains out-of-vocab token id!",
        );
      },
    );

    await t.step("truncate_prompt_tokens keeps the last N tokens (vLLM's left side)", async () => {
      const prompt = [1, 3, 4, 5, 6, 7, 8, 9, 10, 11];
      const body = { max_tokens: 5, temperature: 0, return_token_ids: true, ignore_eos: true };
      const cut = await complete(srv, { ...body, prompt, truncate_prompt_tokens: 4 });
      const tail = await complete(srv, { ...body, prompt: prompt.slice(-4) });
      assert.deepEqual(cut.choices[0].prompt_token_ids, prompt.slice(-4));
      assert.equal(cut.usage.prompt_tokens, 4);
      assert.deepEqual(cut.choices[0].token_ids, tail.choices[0].token_ids);
      const right = await complete(srv, {
        ...body,
        prompt,
        truncate_prompt_tokens: 4,
        truncation_side: "right",
      });
      assert.deepEqual(right.choices[0].prompt_token_ids, prompt.slice(0, 4));
      assertRefused(
        await send(srv, "/v1/completions", { prompt, max_tokens: 100, truncate_prompt_tokens: 50 }),
        400,
        "truncate_prompt_tokens=50 cannot be greater than max_model_len - max_tokens = 28",
      );
    });

    await t.step(
      "use_beam_search is refused; request_id / X-Request-Id name the response",
      async () => {
        assertRefused(
          await send(srv, "/v1/completions", { prompt: "ab", use_beam_search: true }),
          400,
          "use_beam_search",
        );
        const r = await complete(srv, { prompt: "ab", max_tokens: 2, request_id: "probe-7" });
        assert.equal(r.id, "cmpl-probe-7");
        const h = await send(srv, "/v1/completions", {
          prompt: "ab",
          max_tokens: 2,
          request_id: "a",
        }, {
          "x-request-id": "hdr-1",
        });
        assert.equal(h.json.id, "cmpl-hdr-1");
        for (const field of ["response_format", "structured_outputs", "prompt_embeds"]) {
          assertRefused(
            await send(srv, "/v1/completions", { prompt: "ab", [field]: { type: "json_object" } }),
            400,
            field,
          );
        }
      },
    );

    await t.step(
      "penalties and logit_bias: greedy tokens equal vLLM's formula on the model's logits",
      async () => {
        const prompt = [1, 3, 4, 3, 5];
        const p = { presence: 0.7, frequency: 0.9, repetition: 1.6, bias: { 7: 2.5, 12: -1.5 } };
        const r = await complete(srv, {
          prompt,
          max_tokens: 12,
          temperature: 0,
          ignore_eos: true,
          presence_penalty: p.presence,
          frequency_penalty: p.frequency,
          repetition_penalty: p.repetition,
          logit_bias: { "7": 2.5, "12": -1.5 },
          logprobs: 0,
          return_token_ids: true,
        });
        const tokens: number[] = r.choices[0].token_ids;
        const logits = await refLogits(config, weights, [...prompt, ...tokens]);
        let differs = false;
        tokens.forEach((tok, i) => {
          const row = logits.subarray((prompt.length - 1 + i) * V, (prompt.length + i) * V);
          const expected = argmax(penalise(row, prompt, tokens.slice(0, i), p));
          assert.equal(tok, expected, `token ${i}`);
          if (argmax(row) !== tok) differs = true;
          // logprobs stay raw (vLLM computes them before any processing)
          assert.ok(
            Math.abs(r.choices[0].logprobs.token_logprobs[i] - logSoftmax(row)[tok]) < 1e-4,
          );
        });
        assert.ok(differs, "the penalties changed no token: the check would be vacuous");
        // vLLM's range checks
        assertRefused(
          await send(srv, "/v1/completions", { prompt: "ab", presence_penalty: 2.5 }),
          400,
          "presence_penalty must be in [-2, 2], got 2.5.",
        );
        assertRefused(
          await send(srv, "/v1/completions", { prompt: "ab", repetition_penalty: 0 }),
          400,
          "repetition_penalty must be greater than zero, got 0.0.",
        );
        assertRefused(
          await send(srv, "/v1/completions", { prompt: "ab", logit_bias: { x: 1 } }),
          400,
          "logit_bias contains key(s) that cannot be converted to integer token IDs: ['x']",
        );
        assertRefused(
          await send(srv, "/v1/completions", { prompt: "ab", logit_bias: { [V]: 1 } }),
          400,
          `token_id(s) [${V}] in logit_bias contain out-of-vocab token ids`,
        );
      },
    );

    await t.step("min_p: no sampled token is below min_p times the top probability", async () => {
      const minP = 0.3;
      const r = await complete(srv, {
        prompt: [1, 3],
        n: 8,
        max_tokens: 12,
        seed: 4,
        min_p: minP,
        ignore_eos: true,
        logprobs: 1,
      });
      for (const c of r.choices) {
        c.logprobs.token_logprobs.forEach((lp: number, i: number) => {
          const best = Math.max(
            ...Object.values(c.logprobs.top_logprobs[i] as Record<string, number>),
          );
          assert.ok(lp >= best + Math.log(minP) - 1e-9, `${lp} < ${best} + ln ${minP}`);
        });
      }
    });

    await t.step(
      "echo with max_tokens 0 scores the prompt (vLLM's verification probe)",
      async () => {
        const prompt = [1, 3, 4, 5, 6]; // "abcd" with BOS
        const r = await complete(srv, {
          prompt: "abcd",
          max_tokens: 0,
          echo: true,
          logprobs: 1,
          temperature: 0,
        });
        const c = r.choices[0];
        const logits = await refLogits(config, weights, prompt);
        assert.equal(c.text, "abcd");
        assert.equal(c.logprobs.token_logprobs[0], null);
        assert.equal(c.logprobs.token_logprobs.length, prompt.length);
        for (let i = 1; i < prompt.length; i++) {
          const lp = logSoftmax(logits.subarray((i - 1) * V, i * V));
          assert.ok(Math.abs(c.logprobs.token_logprobs[i] - lp[prompt[i]]) < 1e-4);
        }
        assert.equal(c.prompt_logprobs.length, prompt.length);
        assertRefused(
          await send(srv, "/v1/completions", { prompt, max_tokens: 0 }),
          400,
          "max_tokens must be at least 1, got 0.",
        );
      },
    );

    await t.step("seeds: -1 is unseeded, all 64 bits count, int64 range as vLLM", async () => {
      const body = { prompt: [1, 3], max_tokens: 16, ignore_eos: true, return_token_ids: true };
      const ids = async (seed: string) =>
        (await complete(
          srv,
          `{"prompt":[1,3],"max_tokens":16,"ignore_eos":true,"return_token_ids":true,"seed":${seed}}`,
        ))
          .choices[0].token_ids.join(",");
      const unseeded = new Set<string>();
      for (let i = 0; i < 4; i++) {
        unseeded.add((await complete(srv, { ...body, seed: -1 })).choices[0].token_ids.join(","));
      }
      assert.ok(unseeded.size > 1, "seed -1 gave the same tokens four times");
      assert.equal(await ids("5"), await ids("5"));
      assert.notEqual(await ids("5"), await ids(String(5 + 2 ** 32)));
      // beyond 2^53: exact (2^60 and 2^60 + 1 differ), deterministic
      const big = (2n ** 60n).toString();
      const big1 = (2n ** 60n + 1n).toString();
      assert.equal(await ids(big1), await ids(big1));
      assert.notEqual(await ids(big), await ids(big1));
      assert.equal(typeof await ids("-9223372036854775808"), "string");
      assertRefused(
        await send(srv, "/v1/completions", `{"prompt":"ab","seed":9223372036854775808}`),
        400,
        "less than or equal to 9223372036854775807",
      );
    });

    await t.step("prompt, model, Content-Type, temperature: vLLM's answers", async () => {
      assertRefused(
        await send(srv, "/v1/completions", { prompt: "" }),
        400,
        "Either prompt or prompt_embeds must be provided and non-empty.",
      );
      const base = await complete(srv, { prompt: "ab", model: "", max_tokens: 2 });
      assert.equal(base.model, "tiny");
      const plain = await srv.request("/v1/completions", {
        method: "POST",
        body: JSON.stringify({ prompt: "ab" }),
        headers: { "content-type": "text/plain" },
      });
      assertRefused(
        { status: plain.status, text: "", json: await plain.json() },
        400,
        "Unsupported Media Type",
      );
      assertRefused(
        await send(srv, "/v1/completions", `{"prompt":"ab","temperature":1e400}`),
        400,
        "temperature must be a finite number, got inf.",
      );
      assertRefused(
        await send(srv, "/v1/completions", { prompt: "ab", temperature: 2.5 }),
        400,
        "temperature must be in [0, 2], got 2.5.",
      );
      assertRefused(
        await send(srv, "/v1/completions", { prompt: "ab", stop: ["x", ""] }),
        400,
        "stop cannot contain an empty string.",
      );
    });

    await t.step(
      "caps: n, prompt list, cache_salt, stop strings, body, prompt length",
      async () => {
        assertRefused(
          await send(srv, "/v1/completions", { prompt: "ab", n: 16385 }),
          400,
          "n must be at most 16384, got 16385. To increase this limit, set the VLLM_MAX_N_SEQUENCES",
        );
        assertRefused(
          await send(srv, "/v1/completions", { prompt: Array.from({ length: 1025 }, () => "a") }),
          400,
          "prompt list length 1025 exceeds the maximum allowed count of 1024.",
        );
        assertRefused(
          await send(srv, "/v1/completions", {
            prompt: Array.from({ length: 8 }, () => "ab"),
            n: 10000,
          }),
          400,
          "8 prompts x n=10000 = 80000 sequences, more than this server allows (65536",
        );
        assertRefused(
          await send(srv, "/v1/completions", { prompt: "ab", cache_salt: "s".repeat(1025) }),
          400,
          "at most 1024 characters",
        );
        assertRefused(
          await send(srv, "/v1/completions", {
            prompt: "ab",
            stop: Array.from({ length: 65 }, (_, i) => `s${i}`),
          }),
          400,
          "stop has 65 strings",
        );
        // over --max-request-body-mb (2): 413 before parsing
        const huge = await send(srv, "/v1/completions", { prompt: "a".repeat(3 * 1024 * 1024) });
        assertRefused(huge, 413, "exceeds 2097152 bytes");
        // a long prompt is refused by the character bound, without tokenizing
        assertRefused(
          await send(srv, "/v1/completions", { prompt: "a".repeat(1_500_000), max_tokens: 8 }),
          400,
          "You passed 1500000 input characters and requested 8 output tokens.",
        );
        assertRefused(
          await send(srv, "/tokenize", { prompt: "a".repeat(1_500_000) }),
          400,
          "input characters",
        );
        // the server still serves
        assert.equal((await complete(srv, { prompt: "ab", max_tokens: 2 })).choices.length, 1);
      },
    );

    await t.step("/v1/chat/completions and /tokenize's chat form (the openai SDK)", async () => {
      const messages = [
        { role: "system" as const, content: "be brief" },
        { role: "user" as const, content: "what is 2+2?" },
      ];
      const rendered = "system be brief. user what is 2+2?. assistant ";
      const plain = await complete(srv, {
        prompt: rendered,
        add_special_tokens: false,
        max_tokens: 6,
        temperature: 0,
        ignore_eos: true,
        logprobs: 2,
        return_token_ids: true,
      });
      const chat = await client.chat.completions.create({
        model: "tiny",
        messages,
        max_completion_tokens: 6,
        temperature: 0,
        logprobs: true,
        top_logprobs: 2,
        // vLLM extras go through the SDK's body as they are
        ...({ ignore_eos: true, return_token_ids: true } as Record<string, unknown>),
      });
      assert.equal(chat.object, "chat.completion");
      assert.ok(chat.id.startsWith("chatcmpl-"));
      const c = chat.choices[0];
      assert.equal(c.message.role, "assistant");
      assert.equal(c.message.content, plain.choices[0].text);
      assert.deepEqual(
        (c as unknown as { token_ids: number[] }).token_ids,
        plain.choices[0].token_ids,
      );
      assert.deepEqual(chat.usage, plain.usage);
      assert.equal(c.logprobs!.content!.length, 6);
      c.logprobs!.content!.forEach((e, i) => {
        assert.equal(e.token, plain.choices[0].logprobs.tokens[i]);
        assert.ok(Math.abs(e.logprob - plain.choices[0].logprobs.token_logprobs[i]) < 1e-9);
        assert.equal(e.top_logprobs.length, 2);
        assert.deepEqual(e.bytes, [...new TextEncoder().encode(e.token)]);
      });
      // streamed: the role first, deltas add up to the answer
      const stream = await client.chat.completions.create({
        model: "tiny",
        messages,
        max_completion_tokens: 6,
        temperature: 0,
        stream: true,
        ...({ ignore_eos: true } as Record<string, unknown>),
      });
      let content = "";
      let role: string | undefined;
      for await (const chunk of stream) {
        assert.equal(chunk.object, "chat.completion.chunk");
        for (const ch of chunk.choices) {
          role ??= ch.delta.role;
          content += ch.delta.content ?? "";
        }
      }
      assert.equal(role, "assistant");
      assert.equal(content, plain.choices[0].text);
      // /tokenize with messages = the rendered conversation, no special tokens added
      const tk = await send(srv, "/tokenize", { messages });
      const tkPlain = await send(srv, "/tokenize", { prompt: rendered, add_special_tokens: false });
      assert.equal(tk.status, 200, tk.text);
      assert.deepEqual(tk.json.tokens, tkPlain.json.tokens);
      assertRefused(
        await send(srv, "/v1/chat/completions", { messages, tools: [{ type: "function" }] }),
        400,
        "tools",
      );
      assertRefused(
        await send(srv, "/v1/chat/completions", { messages, top_logprobs: 2 }),
        400,
        "`logprobs` must be set to true",
      );
    });

    await t.step("/version is consistent with the routes served", async () => {
      const v = await (await srv.request("/version")).json();
      const [major, minor] = v.version.split(".").map(Number);
      assert.ok(major > 0 || minor >= 15, `version ${v.version} predates /pause?mode=keep`);
    });

    await t.step(
      "adapters vLLM rejects are rejected with vLLM's messages; paths are policed",
      async () => {
        const lora = randomLora(config, 9);
        const write = async (name: string, patch: Record<string, unknown>) => {
          const dir = join(loraRoot, name);
          await Effect.runPromise(savePeftAdapter(dir, lora.config, lora.modules, "tiny"));
          const cfgPath = join(dir, "adapter_config.json");
          const cfg = JSON.parse(await Deno.readTextFile(cfgPath));
          await Deno.writeTextFile(cfgPath, JSON.stringify({ ...cfg, ...patch }));
          return dir;
        };
        const load = (name: string, path: string) =>
          send(srv, "/v1/load_lora_adapter", { lora_name: name, lora_path: path });
        assertRefused(
          await load("b", await write("bias", { bias: "all" })),
          400,
          "Adapter bias is not supported.",
        );
        assertRefused(
          await load("m", await write("mts", { modules_to_save: ["lm_head"] })),
          400,
          "vLLM only supports modules_to_save being None.",
        );
        assertRefused(
          await load("d", await write("dora", { use_dora: true, r: 16 })),
          400,
          "vLLM does not yet support DoRA. LoRA rank 16 is greater than max_lora_rank 8.",
        );
        // a non-JSON adapter_config.json: named, never quoted
        const junk = await write("junk", {});
        const secret = "SECRET-BYTES-0123456789";
        await Deno.writeTextFile(join(junk, "adapter_config.json"), `${secret} not json`);
        const j = await load("j", junk);
        assertRefused(j, 400, "adapter_config.json is not valid JSON");
        assert.ok(!j.text.includes("SECRET"), j.text);
        // outside --allowed-lora-root (also through a symlink): refused before probing the path
        const outside = join(root, "outside");
        await Effect.runPromise(savePeftAdapter(outside, lora.config, lora.modules, "tiny"));
        assertRefused(await load("o", outside), 400, "outside the directory this server allows");
        await Deno.symlink(outside, join(loraRoot, "link"));
        assertRefused(await load("l", join(loraRoot, "link")), 400, "outside the directory");
        assertRefused(
          await load("p", join(loraRoot, "..", "outside")),
          400,
          "outside the directory",
        );
        const ok = await load("good", await write("good", {}));
        assert.equal(ok.status, 200, ok.text);
      },
    );
  } finally {
    await srv.stop();
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("server fidelity: generation_config.json sets the defaults of omitted fields (vLLM's auto)", async () => {
  const root = await Deno.makeTempDir({ prefix: "lorafold-genconfig-" });
  try {
    const modelDir = join(root, "model");
    const { config, weights } = await writeTinyCheckpoint(modelDir, { seed: 8 });
    const V = config.vocabSize;
    // the greedy first token of this prompt becomes an extra eos id of generation_config.json
    const prompt = [1, 3, 4, 5];
    const first = argmax((await refLogits(config, weights, prompt)).subarray(3 * V, 4 * V));
    assert.notEqual(first, 2);
    await Deno.writeTextFile(
      join(modelDir, "generation_config.json"),
      JSON.stringify({ temperature: 0.0, eos_token_id: [2, first] }),
    );
    const body = { prompt: [1, 6, 7], max_tokens: 12, ignore_eos: true, return_token_ids: true };
    {
      await using srv = await startServer({ modelDir });
      const a = await complete(srv, { ...body, seed: 1 });
      const b = await complete(srv, { ...body, seed: 2 });
      const greedy = await complete(srv, { ...body, temperature: 0 });
      assert.deepEqual(a.choices[0].token_ids, greedy.choices[0].token_ids);
      assert.deepEqual(b.choices[0].token_ids, greedy.choices[0].token_ids);
      // a request's own value wins
      const hot = await Promise.all(
        [1, 2, 3].map((seed) => complete(srv, { ...body, seed, temperature: 1 })),
      );
      assert.ok(new Set(hot.map((h) => h.choices[0].token_ids.join(","))).size > 1);
      // its eos ids stop generation (reported as a stop token id, like vLLM)
      const stopped = await complete(srv, { prompt, max_tokens: 8, return_token_ids: true });
      assert.deepEqual(stopped.choices[0].token_ids, [first]);
      assert.equal(stopped.choices[0].finish_reason, "stop");
      assert.equal(stopped.choices[0].stop_reason, first);
    }
    {
      // --generation-config vllm: OpenAI's defaults (temperature 1)
      await using srv = await startServer({ modelDir, args: ["--generation-config", "vllm"] });
      const runs = await Promise.all([1, 2, 3].map((seed) => complete(srv, { ...body, seed })));
      assert.ok(new Set(runs.map((h) => h.choices[0].token_ids.join(","))).size > 1);
      const free = await complete(srv, {
        prompt,
        max_tokens: 8,
        temperature: 0,
        return_token_ids: true,
      });
      assert.ok(free.choices[0].token_ids.length > 1 || free.choices[0].stop_reason !== first);
    }
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});
