/**
 * generation_config.json: eos ids merged into the loaded base's, default sampling values exposed
 * (only those the file sets, as vLLM's generation_config="auto"), bad values refused by field.
 */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { join } from "node:path";
import { Effect } from "effect";
import { ModelConfigError } from "../src/model/config.ts";
import {
  loadGenerationConfig,
  mergeEosIds,
  parseGenerationConfig,
} from "../src/model/generation_config.ts";
import { loadBase } from "../src/model/loader.ts";
import { writeTinyCheckpoint } from "./support/server_process.ts";

const run = <A, E>(e: Effect.Effect<A, E>) => Effect.runPromise(e);
const fail = <A, E>(e: Effect.Effect<A, E>) => Effect.runPromise(Effect.flip(e));

Deno.test("generation_config: Llama-3-instruct style eos list and sampling defaults", async () => {
  // the shape of Llama-3.2-1B-Instruct's generation_config.json
  const g = await run(parseGenerationConfig({
    bos_token_id: 128000,
    do_sample: true,
    eos_token_id: [128001, 128008, 128009],
    temperature: 0.6,
    top_p: 0.9,
    transformers_version: "4.45.0.dev0",
  }));
  assertEquals(g.eosTokenIds, [128001, 128008, 128009]);
  assertEquals(g.defaults, { temperature: 0.6, topP: 0.9, doSample: true });
  const q = await run(
    parseGenerationConfig({ eos_token_id: 151645, top_k: 20, min_p: 0, repetition_penalty: 1.05 }),
  );
  assertEquals(q.eosTokenIds, [151645]);
  assertEquals(q.defaults, { topK: 20, minP: 0, repetitionPenalty: 1.05 });
  assertEquals(mergeEosIds([128001], [128001, 128008, 128009]), [128001, 128008, 128009]);
  assertEquals(mergeEosIds([2, 5], []), [2, 5]);
});

Deno.test("generation_config: bad values are ModelConfigErrors naming the field", async () => {
  for (
    const [json, field] of [
      [{ temperature: -1 }, "generation_config.temperature"],
      [{ top_p: 0 }, "generation_config.top_p"],
      [{ top_k: 2.5 }, "generation_config.top_k"],
      [{ eos_token_id: ["x"] }, "generation_config.eos_token_id"],
      [{ do_sample: "yes" }, "generation_config.do_sample"],
      [[1], "generation_config.json"],
    ] as const
  ) {
    const e = await fail(parseGenerationConfig(json));
    assert(e instanceof ModelConfigError);
    assertEquals(e.field, field);
    assert(e.message.includes(field.replace("generation_config.", "")), e.message);
  }
});

Deno.test("loadBase: generation_config.json eos ids join config.json's; defaults are exposed", async () => {
  const dir = await Deno.makeTempDir();
  const { config } = await writeTinyCheckpoint(dir);
  // without the file: nothing changes, no defaults
  const plain = await run(loadBase(dir));
  assertEquals(plain.config.eosTokenIds, config.eosTokenIds);
  assertEquals(plain.samplingDefaults, {});
  assertEquals((await run(loadGenerationConfig(dir))).eosTokenIds, []);
  await Deno.writeTextFile(
    join(dir, "generation_config.json"),
    JSON.stringify({ eos_token_id: [2, 7], temperature: 0.7, top_k: 20, top_p: 0.8 }),
  );
  const base = await run(loadBase(dir));
  assertEquals(base.config.eosTokenIds, [...new Set([...config.eosTokenIds, 2, 7])]);
  assertEquals(base.samplingDefaults, { temperature: 0.7, topK: 20, topP: 0.8 });
  await Deno.writeTextFile(join(dir, "generation_config.json"), "{ not json");
  const e = await fail(loadBase(dir));
  assertEquals(e._tag, "ModelConfigError");
  assert(e.message.includes("generation_config.json"), e.message);
  await Deno.remove(dir, { recursive: true });
});
