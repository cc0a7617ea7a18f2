/**
 * Kernel uniform parameters by name: every kernel's `struct Params` parses (4-byte scalars
 * only); named parameters encode to the bytes of their positional form in struct order, in any
 * key order; a missing, extra or misnamed field, a wrong count, an f32 passed as a plain number
 * (or the reverse) and a non-integer u32 fail naming the kernel and the field; and a real
 * dispatch on WebGPU refuses a call that does not fit its kernel before encoding it.
 */
import { deepStrictEqual as assertEquals, ok as assert, throws } from "node:assert/strict";
import fc from "fast-check";
import {
  encodeParams,
  f32,
  type Param,
  type ParamField,
  paramFields,
} from "../src/backend/webgpu/context.ts";
import { loadKernels } from "../src/backend/webgpu/kernels.ts";
import { gpuTeardown, hasGpu, openGpu } from "./support/backends.ts";

const kernels = await loadKernels();

Deno.test("every kernel's struct Params parses into 4-byte scalar fields that fit one uniform slot", () => {
  let withParams = 0;
  for (const [name, code] of kernels) {
    const fields = paramFields(name, code);
    if (fields === null) continue;
    withParams++;
    assert(fields.length > 0 && fields.length * 4 <= 256, `${name}: ${fields.length} fields`);
    assertEquals(new Set(fields.map((f) => f.name)).size, fields.length, `${name}: unique names`);
  }
  assert(withParams >= 40, `${withParams} kernels with parameters`);
});

Deno.test("paramFields refuses a field that is not a u32, i32 or f32", () => {
  throws(
    () => paramFields("k", "struct Params { n: u32, v: vec4<f32> }"),
    /kernel k: Params field "v: vec4<f32>"/,
  );
  assertEquals(paramFields("k", "fn main() {}"), null);
});

const fieldList = fc.uniqueArray(
  fc.record({
    name: fc.stringMatching(/^[a-z][a-z0-9_]{0,6}$/),
    type: fc.constantFrom<ParamField["type"]>("u32", "i32", "f32"),
  }),
  { minLength: 1, maxLength: 12, selector: (f) => f.name },
);

const valueFor = (f: ParamField, x: number): Param =>
  f.type === "f32" ? f32(x / 7) : f.type === "i32" ? x - 1000 : x;

const encode = (fields: ParamField[] | null, p: Parameters<typeof encodeParams>[2]) => {
  const view = new DataView(new ArrayBuffer(256));
  encodeParams("k", fields, p, view);
  return new Uint8Array(view.buffer);
};

Deno.test("named parameters, in any key order, encode to the bytes of the positional form", () => {
  fc.assert(
    fc.property(fieldList, fc.array(fc.nat(100000), { minLength: 12, maxLength: 12 }), fc.nat(), (
      fields,
      xs,
      rot,
    ) => {
      const positional = fields.map((f, i) => valueFor(f, xs[i]));
      const keys = fields.map((f) => f.name);
      const order = [...keys.slice(rot % keys.length), ...keys.slice(0, rot % keys.length)];
      const named = Object.fromEntries(order.map((k) => [k, positional[keys.indexOf(k)]]));
      const bytes = encode(fields, positional);
      assertEquals(encode(fields, named), bytes);
      // the layout: field i at bytes [4i, 4i + 4), little-endian
      const view = new DataView(bytes.buffer);
      fields.forEach((f, i) => {
        const p = positional[i];
        if (f.type === "f32") {
          assertEquals(view.getFloat32(4 * i, true), Math.fround((p as { f: number }).f));
        } else assertEquals(view.getUint32(4 * i, true), (p as number) >>> 0);
      });
    }),
  );
});

Deno.test("parameters that do not fit the struct fail naming the kernel and the field", () => {
  const fields: ParamField[] = [{ name: "n", type: "u32" }, { name: "s", type: "f32" }];
  const bad = (p: Parameters<typeof encodeParams>[2], re: RegExp) =>
    throws(() => encode(fields, p), re);
  bad([3], /kernel k: 1 params for struct Params of 2 fields/);
  bad([3, f32(1), 4], /kernel k: 3 params for struct Params of 2 fields/);
  bad({ n: 3 }, /kernel k: Params\.s missing/);
  bad({ n: 3, s: f32(1), t: 2 }, /kernel k: no Params field named t/);
  bad({ n: 3, s: 1 }, /kernel k: Params\.s is f32: pass f32\(1\)/);
  bad([f32(3), f32(1)], /kernel k: Params\.n is u32, given f32\(3\)/);
  bad({ n: 2.5, s: f32(1) }, /kernel k: Params\.n = 2\.5 is not a 32-bit integer/);
  bad({ n: 2 ** 32, s: f32(1) }, /not a 32-bit integer/);
  throws(() => encode(null, [1]), /kernel k: declares no struct Params but was given parameters/);
  // negative values of u32 fields go in as two's complement (i32 stored in u32), as before
  const v = new DataView(encode(fields, { n: -1, s: f32(0) }).buffer);
  assertEquals(v.getUint32(0, true), 0xffffffff);
});

Deno.test({
  name: "webgpu: a dispatch whose parameters do not fit its kernel throws before encoding",
  ignore: !hasGpu,
  fn: async () => {
    const ctx = (await openGpu())!.gpu!;
    const a = ctx.alloc(16);
    const b = ctx.alloc(16);
    try {
      throws(
        () => ctx.dispatch("ew_scale", [a, b], [1], [4]),
        /ew_scale: 1 params for struct Params of 2/,
      );
      throws(() => ctx.dispatch("ew_scale", [a, b], [1], { n: 4, s: 2 }), /Params\.s is f32/);
      throws(
        () => ctx.dispatch("ew_scale", [a, b], [1]),
        /ew_scale: declares struct Params but was given no parameters/,
      );
      // the named form runs
      ctx.dispatch("ew_scale", [a, b], [1], { n: 4, s: f32(2) });
      await ctx.sync();
    } finally {
      ctx.release(a);
      ctx.release(b);
    }
  },
});

gpuTeardown();
