/**
 * WebGPU backend: the GeLU-tanh gated MLP and logit soft-capping (kernels in activations.wgsl).
 * Soft-capping works on tensors stored in several blocks (the logits of a large vocabulary),
 * block by block. Contracts: Ops in ../ops.ts; the CPU backend (../cpu/activations.ts) is the
 * reference.
 * @module
 */
import type { Tensor } from "../tensor.ts";
import { checkSoftcap } from "../checks/activations.ts";
import { checkSwigluBackward, sameShape } from "../checks/elementwise.ts";
import { f32, grid } from "./context.ts";
import type { GpuScope } from "./scope.ts";

const WG = 256;
const groups1d = (n: number): [number, number] => grid(Math.ceil(n / WG));

/** See Ops.gegluTanh. */
export function gegluTanh(sc: GpuScope, gate: Tensor, up: Tensor): Tensor {
  const op = "gegluTanh";
  sameShape(op, gate, up, "gate", "up");
  const g = sc.f(gate, op);
  const u = sc.f(up, op);
  const out = sc.out(gate.shape);
  sc.dispatch("geglu_tanh", [g, u, out.buffer], groups1d(gate.size), [gate.size]);
  return out;
}

/** See Ops.gegluTanhBackward. */
export function gegluTanhBackward(
  sc: GpuScope,
  dh: Tensor,
  gate: Tensor,
  up: Tensor,
): { dGate: Tensor; dUp: Tensor } {
  const op = "gegluTanhBackward";
  checkSwigluBackward(op, dh, gate, up);
  const d = sc.f(dh, op);
  const g = sc.f(gate, op);
  const u = sc.f(up, op);
  const dGate = sc.out(gate.shape);
  const dUp = sc.out(gate.shape);
  sc.dispatch(
    "geglu_tanh_backward",
    [d, g, u, dGate.buffer, dUp.buffer],
    groups1d(gate.size),
    [gate.size],
  );
  return { dGate, dUp };
}

/** See Ops.softcap. */
export function softcap(sc: GpuScope, x: Tensor, cap: number): Tensor {
  const op = "softcap";
  checkSoftcap(op, cap);
  const xs = sc.blocks(x, op, "f32");
  const out = xs.blocks.length === 1 ? sc.out(x.shape) : sc.like(xs);
  xs.blocks.forEach((blk, i) => {
    sc.dispatch("softcap", [blk.buffer, out.blocks[i].buffer], groups1d(blk.length), [
      blk.length,
      f32(cap),
    ]);
  });
  return out;
}

/** See Ops.softcapBackward. */
export function softcapBackward(sc: GpuScope, dy: Tensor, y: Tensor, cap: number): Tensor {
  const op = "softcapBackward";
  checkSoftcap(op, cap);
  sameShape(op, dy, y, "dy", "y");
  const [d, ys] = [sc.blocks(dy, op, "f32"), sc.blocks(y, op, "f32")];
  sc.sameBlocks(op, [d, ys]);
  const out = d.blocks.length === 1 ? sc.out(dy.shape) : sc.like(d);
  d.blocks.forEach((blk, i) => {
    sc.dispatch(
      "softcap_backward",
      [blk.buffer, ys.blocks[i].buffer, out.blocks[i].buffer],
      groups1d(blk.length),
      [blk.length, f32(cap)],
    );
  });
  return out;
}
