/** HF checkpoint directories and PEFT adapter directories: round trips and typed failures. */
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Effect } from "effect";
import { loadModel, saveModel } from "../src/model/loader.ts";
import { initWeights } from "../src/model/weights.ts";
import { initLora } from "../src/lora/adapter.ts";
import { loadPeftAdapter, peftTensorName, savePeftAdapter } from "../src/lora/peft.ts";
import { fromFloat32 } from "../src/io/safetensors.ts";
import { writeSafetensorsFile } from "../src/io/checkpoint.ts";
import { tinyConfig } from "./support/tiny.ts";

const run = <A, E>(e: Effect.Effect<A, E>) => Effect.runPromise(e);
const fail = <A, E>(e: Effect.Effect<A, E>) => Effect.runPromise(Effect.flip(e));

Deno.test("model directory: save then load is bit-exact (f32, sharded) and BF16 rounds once", async () => {
  const dir = await Deno.makeTempDir();
  const c = tinyConfig({ modelType: "qwen2", attentionBias: true, tieWordEmbeddings: true });
  const w = initWeights(c, 5, 0.3);
  await run(saveModel(join(dir, "f32"), c, w, { maxShardBytes: 2000 }));
  const back = await run(loadModel(join(dir, "f32")));
  assertEquals(back.config, c);
  for (const [n, t] of w) assertEquals(Array.from(back.weights.get(n)!.data), Array.from(t.data));
  await run(saveModel(join(dir, "bf16"), c, w, { dtype: "BF16" }));
  const b16 = await run(loadModel(join(dir, "bf16")));
  const q = b16.weights.get("model.layers.0.mlp.up_proj.weight")!.data;
  const orig = w.get("model.layers.0.mlp.up_proj.weight")!.data;
  for (let i = 0; i < q.length; i++) {
    assert(Math.abs(q[i] - orig[i]) <= Math.abs(orig[i]) * 2 ** -8);
  }
  await Deno.remove(dir, { recursive: true });
});

Deno.test("model directory: missing tensor, wrong shape, unknown architecture are typed errors", async () => {
  const dir = await Deno.makeTempDir();
  const c = tinyConfig();
  const w = new Map(initWeights(c, 5));
  w.delete("model.layers.0.self_attn.k_proj.weight");
  await run(saveModel(dir, c, w));
  const e = await fail(loadModel(dir));
  assertEquals(e._tag, "WeightsError");
  assert(e.message.includes("model.layers.0.self_attn.k_proj.weight"));
  await writeFile(
    join(dir, "config.json"),
    JSON.stringify({ model_type: "mamba", hidden_size: 8 }),
  );
  const e2 = await fail(loadModel(dir));
  assertEquals(e2._tag, "ModelConfigError");
  assert(e2.message.includes("mamba"));
  const e3 = await fail(loadModel(join(dir, "nope")));
  assertEquals(e3._tag, "ModelConfigError");
  await Deno.remove(dir, { recursive: true });
});

Deno.test("PEFT adapter: save/load round trip with PEFT names and config fields", async () => {
  const dir = await Deno.makeTempDir();
  const c = tinyConfig();
  const lora = initLora(c, {
    r: 4,
    alpha: 8,
    dropout: 0.05,
    targetModules: ["q_proj", "v_proj", "down_proj"],
    useRslora: true,
  }, 1);
  await run(savePeftAdapter(dir, lora.config, lora.modules, "tiny-base"));
  const cfg = JSON.parse(await Deno.readTextFile(join(dir, "adapter_config.json")));
  assertEquals(cfg.peft_type, "LORA");
  assertEquals(cfg.r, 4);
  assertEquals(cfg.lora_alpha, 8);
  assertEquals(cfg.use_rslora, true);
  assertEquals(cfg.target_modules, ["q_proj", "v_proj", "down_proj"]);
  const back = await run(loadPeftAdapter(dir, c));
  assertEquals(back.config, lora.config);
  for (const [p, m] of lora.modules) {
    assertEquals(Array.from(back.modules.get(p)!.a.data), Array.from(m.a.data));
    assertEquals(back.modules.get(p)!.b.shape, m.b.shape);
  }
  assertEquals(
    peftTensorName("model.layers.0.self_attn.q_proj", "A"),
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("PEFT adapter: wrong shape, missing tensor, NaN, bad config are typed errors naming the tensor/field", async () => {
  const dir = await Deno.makeTempDir();
  const c = tinyConfig();
  const lora = initLora(c, {
    r: 2,
    alpha: 4,
    dropout: 0,
    targetModules: ["q_proj"],
    useRslora: false,
  }, 1);
  await run(savePeftAdapter(dir, lora.config, lora.modules, "tiny"));
  const name0 = peftTensorName("model.layers.0.self_attn.q_proj", "A");
  const name1B = peftTensorName("model.layers.1.self_attn.q_proj", "B");
  const entries = [...lora.modules].flatMap(([p, m]) => [
    fromFloat32(
      peftTensorName(p, "A"),
      p.includes("layers.0") ? new Float32Array(3 * 8) : m.a.data,
      p.includes("layers.0") ? [3, 8] : m.a.shape,
    ),
    fromFloat32(peftTensorName(p, "B"), m.b.data, m.b.shape),
  ]);
  await run(writeSafetensorsFile(join(dir, "adapter_model.safetensors"), entries));
  const e = await fail(loadPeftAdapter(dir, c));
  assertEquals(e._tag, "LoraConfigError");
  assert(e.message.includes(name0) && e.message.includes("[3,8]"), e.message);
  await run(
    writeSafetensorsFile(
      join(dir, "adapter_model.safetensors"),
      entries.filter((x) => x.name !== name1B && x.name !== name0),
    ),
  );
  assert((await fail(loadPeftAdapter(dir, c))).message.includes("missing"));
  const nanB = new Float32Array(lora.modules.get("model.layers.1.self_attn.q_proj")!.b.data);
  nanB[3] = NaN;
  await run(writeSafetensorsFile(join(dir, "adapter_model.safetensors"), [
    ...[...lora.modules].flatMap(([p, m]) => [
      fromFloat32(peftTensorName(p, "A"), m.a.data, m.a.shape),
      fromFloat32(peftTensorName(p, "B"), p.includes("layers.1") ? nanB : m.b.data, m.b.shape),
    ]),
  ]));
  assert((await fail(loadPeftAdapter(dir, c))).message.includes("NaN"));
  await writeFile(
    join(dir, "adapter_config.json"),
    JSON.stringify({ peft_type: "LORA", r: 0, lora_alpha: 4, target_modules: ["q_proj"] }),
  );
  const e4 = await fail(loadPeftAdapter(dir, c));
  assertEquals((e4 as { field: string }).field, "r");
  await writeFile(
    join(dir, "adapter_config.json"),
    JSON.stringify({ r: 2, lora_alpha: 4, target_modules: ["qkv"] }),
  );
  assertEquals(
    ((await fail(loadPeftAdapter(dir, c))) as { field: string }).field,
    "target_modules",
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("model directory: a tokenizer larger than the config's vocab_size is a typed error naming the field", async () => {
  const { loadBase } = await import("../src/model/loader.ts");
  const { CharTokenizer } = await import("../src/tokenizer/tokenizer.ts");
  const dir = await Deno.makeTempDir();
  const c = tinyConfig({ vocabSize: 6 });
  await run(saveModel(dir, c, initWeights(c, 1)));
  await writeFile(
    join(dir, "tokenizer.json"),
    JSON.stringify(new CharTokenizer("0123456789").toJSON()),
  );
  const e = await fail(loadBase(dir));
  assertEquals(e._tag, "ModelConfigError");
  assertEquals((e as { field: string }).field, "vocab_size");
  assert(e.message.includes("13"), e.message);
  await Deno.remove(dir, { recursive: true });
});
