// Activation kernels (host: activations.ts): the GeLU-tanh gated MLP (HF's gelu_pytorch_tanh)
// and logit soft-capping, with their gradients. tanh is evaluated as (1 - e) / (1 + e) with
// e = exp(-2|z|), which never overflows.

//! kernel geglu_tanh
// out = gelu_tanh(g) * u, gelu_tanh(g) = g/2 * (1 + tanh(K (g + C g^3))).
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
fn safe_tanh(z: f32) -> f32 {
  let e = exp(-2.0 * abs(z));
  return sign(z) * (1.0 - e) / (1.0 + e);
}
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  let x = g[i];
  let t = safe_tanh(0.7978845608028654 * (x + 0.044715 * x * x * x));
  out[i] = 0.5 * x * (1.0 + t) * u[i];
}

//! kernel geglu_tanh_backward
// With t = tanh(K (g + C g^3)): du = dh * g/2 (1 + t);
// dg = dh * u * (1/2 (1 + t) + g/2 (1 - t^2) K (1 + 3 C g^2)).
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> dh: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read> u: array<f32>;
@group(0) @binding(4) var<storage, read_write> dg: array<f32>;
@group(0) @binding(5) var<storage, read_write> du: array<f32>;
fn safe_tanh(z: f32) -> f32 {
  let e = exp(-2.0 * abs(z));
  return sign(z) * (1.0 - e) / (1.0 + e);
}
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  let x = g[i];
  let k = 0.7978845608028654;
  let t = safe_tanh(k * (x + 0.044715 * x * x * x));
  let d = dh[i];
  du[i] = d * 0.5 * x * (1.0 + t);
  dg[i] = d * u[i] * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 0.134145 * x * x));
}

//! kernel softcap
// out = cap * tanh(x / cap) on one storage block.
struct Params { n: u32, cap: f32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  let z = x[i] / params.cap;
  let e = exp(-2.0 * abs(z));
  out[i] = params.cap * sign(z) * (1.0 - e) / (1.0 + e);
}

//! kernel softcap_backward
// dx = dy * (1 - (y / cap)^2) from the capped output y, on one storage block.
struct Params { n: u32, cap: f32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  let t = y[i] / params.cap;
  out[i] = dy[i] * (1.0 - t * t);
}
