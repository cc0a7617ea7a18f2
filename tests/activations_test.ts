/**
 * Gemma's activation ops: gegluTanh (HF's gelu_pytorch_tanh gate) and soft-capping, with their
 * gradients: the float64 CPU reference against the closed forms and finite differences, WebGPU
 * against the reference (including large |x|, where a naive tanh overflows).
 */
import { ok as assert, throws } from "node:assert/strict";
import { Effect } from "effect";
import type { BackendShape } from "../src/backend/backend.ts";
import type { Ops } from "../src/backend/ops.ts";
import {
  gpuTeardown,
  hasGpu,
  numericGradient,
  relError,
  seededValues,
  testBackends,
  withOps,
} from "./support/backends.ts";

const { gpu, cpu, ref } = await testBackends();

const N = 300;
/** Inputs spanning [-amp, amp], with a few large values. */
const xs = (seed: number, amp: number) => {
  const v = Float64Array.from(seededValues(N, seed), (x) => Math.fround(x * amp));
  v[0] = 90;
  v[1] = -90;
  return v;
};

const geluTanh = (x: number) =>
  0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3)));

/** All four ops on a backend: outputs and gradients for the weights `w`. */
const runAll = (b: BackendShape, g: Float64Array, u: Float64Array, w: Float64Array, cap: number) =>
  withOps(b, (ops: Ops) =>
    Effect.gen(function* () {
      const shape = [N / 3, 3];
      const [gt, ut, wt] = [g, u, w].map((a) => ops.fromArray(a, shape));
      const act = ops.gegluTanh(gt, ut);
      const back = ops.gegluTanhBackward(wt, gt, ut);
      const capped = ops.softcap(gt, cap);
      const dcap = ops.softcapBackward(wt, capped, cap);
      const [a, dg, du, c, dc] = yield* ops.read([act, back.dGate, back.dUp, capped, dcap]);
      return { a, dg, du, c, dc };
    }));

Deno.test("cpu f64: gegluTanh and softcap match their closed forms and finite differences", async () => {
  const g = xs(1, 4);
  const u = xs(2, 1);
  const w = xs(3, 1);
  const cap = 3;
  const r = await runAll(ref, g, u, w, cap);
  assert(relError(r.a, Array.from(g, (x, i) => geluTanh(x) * u[i])) < 1e-14);
  assert(relError(r.c, Array.from(g, (x) => cap * Math.tanh(x / cap))) < 1e-14);
  const loss = (f: (x: number, i: number) => number) => (x: Float64Array) =>
    x.reduce((s, v, i) => s + w[i] * f(v, i), 0);
  const dg = numericGradient(loss((x, i) => geluTanh(x) * u[i]), Float64Array.from(g));
  const du = numericGradient(loss((x, i) => geluTanh(g[i]) * x), Float64Array.from(u));
  const dc = numericGradient(loss((x) => cap * Math.tanh(x / cap)), Float64Array.from(g));
  assert(relError(r.dg, dg) < 1e-8, `dGate ${relError(r.dg, dg)}`);
  assert(relError(r.du, du) < 1e-8, `dUp ${relError(r.du, du)}`);
  assert(relError(r.dc, dc) < 1e-8, `softcap ${relError(r.dc, dc)}`);
  for (const v of [...r.a, ...r.dg, ...r.c, ...r.dc]) assert(Number.isFinite(v));
});

for (const [name, b] of [["cpu", cpu], ["webgpu", gpu]] as const) {
  Deno.test({
    name: `${name}: gegluTanh, softcap and their gradients match the f64 reference`,
    ignore: b === null,
    fn: async () => {
      const g = xs(4, 6);
      const u = xs(5, 2);
      const w = xs(6, 1);
      const want = await runAll(ref, g, u, w, 2.5);
      const got = await runAll(b!, g, u, w, 2.5);
      for (const k of ["a", "dg", "du", "c", "dc"] as const) {
        const err = relError(got[k], want[k]);
        assert(err < 1e-6, `${k}: relative error ${err}`);
      }
    },
  });
}

Deno.test("softcap: a cap that is not positive is a ShapeError", async () => {
  await withOps(cpu, (ops) => {
    const x = ops.zeros([2, 2]);
    throws(() => ops.softcap(x, 0), /cap/);
    throws(() => ops.softcapBackward(x, x, -1), /cap/);
    throws(() => ops.gegluTanh(x, ops.zeros([4])), /gegluTanh/);
  });
});

if (hasGpu) gpuTeardown();
