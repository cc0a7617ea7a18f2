/**
 * CPU backend: the Gemma activations, GeLU-tanh gated MLP (HF's gelu_pytorch_tanh) and logit
 * soft-capping. Double-precision intermediates, stored in the scope precision: the reference of
 * the WebGPU kernels in ../webgpu/activations.wgsl. Contracts: see Ops in ../ops.ts.
 * @module
 */
import type { Tensor } from "../tensor.ts";
import { checkSoftcap } from "../checks/activations.ts";
import { checkSwigluBackward, sameShape } from "../checks/elementwise.ts";
import type { CpuScope } from "./scope.ts";

/** sqrt(2 / pi), the GeLU-tanh constant. */
const K = Math.sqrt(2 / Math.PI);
const C = 0.044715;

/** See Ops.gegluTanh: gelu_tanh(g) * u, gelu_tanh(g) = g/2 · (1 + tanh(K (g + C g³))). */
export function gegluTanh(sc: CpuScope, gate: Tensor, up: Tensor): Tensor {
  const op = "gegluTanh";
  sameShape(op, gate, up, "gate", "up");
  const g = sc.f(gate, op);
  const u = sc.f(up, op);
  const out = sc.floats(g.length);
  for (let i = 0; i < g.length; i++) {
    const x = g[i];
    out[i] = 0.5 * x * (1 + Math.tanh(K * (x + C * x * x * x))) * u[i];
  }
  return sc.wrap(gate.shape, out);
}

/**
 * See Ops.gegluTanhBackward. With t = tanh(K (g + C g³)): dUp = dh · gelu(g) and
 * dGate = dh · u · (½(1 + t) + ½ g (1 − t²) K (1 + 3C g²)).
 */
export function gegluTanhBackward(
  sc: CpuScope,
  dh: Tensor,
  gate: Tensor,
  up: Tensor,
): { dGate: Tensor; dUp: Tensor } {
  const op = "gegluTanhBackward";
  checkSwigluBackward(op, dh, gate, up);
  const d = sc.f(dh, op);
  const g = sc.f(gate, op);
  const u = sc.f(up, op);
  const dg = sc.floats(g.length);
  const du = sc.floats(g.length);
  for (let i = 0; i < g.length; i++) {
    const x = g[i];
    const t = Math.tanh(K * (x + C * x * x * x));
    du[i] = d[i] * 0.5 * x * (1 + t);
    dg[i] = d[i] * u[i] * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * K * (1 + 3 * C * x * x));
  }
  return { dGate: sc.wrap(gate.shape, dg), dUp: sc.wrap(gate.shape, du) };
}

/** See Ops.softcap: cap · tanh(x / cap). */
export function softcap(sc: CpuScope, x: Tensor, cap: number): Tensor {
  const op = "softcap";
  checkSoftcap(op, cap);
  const xs = sc.f(x, op);
  const out = sc.floats(xs.length);
  for (let i = 0; i < xs.length; i++) out[i] = cap * Math.tanh(xs[i] / cap);
  return sc.wrap(x.shape, out);
}

/** See Ops.softcapBackward: dy · (1 − (y / cap)²), from the capped output y. */
export function softcapBackward(sc: CpuScope, dy: Tensor, y: Tensor, cap: number): Tensor {
  const op = "softcapBackward";
  checkSoftcap(op, cap);
  sameShape(op, dy, y, "dy", "y");
  const d = sc.f(dy, op);
  const ys = sc.f(y, op);
  const out = sc.floats(d.length);
  for (let i = 0; i < d.length; i++) {
    const t = ys[i] / cap;
    out[i] = d[i] * (1 - t * t);
  }
  return sc.wrap(dy.shape, out);
}
