// lorafold compute kernels. Every WebGPU op of the project lives in this file.
//
// Layout: this prelude is shared; each kernel starts at a line "//! kernel <name>" and is
// compiled as prelude + its section, with entry point `main`. Binding 0 is the uniform
// `params` (when the op passes parameters), bindings 1.. the storage buffers in the order the
// TypeScript side passes them. Large 1-D launches use a 2-D grid: use `linear_id`.

// Flattens a 2-D dispatch grid of 1-D workgroups of size `wg` into one invocation index.
fn linear_id(gid: vec3<u32>, nwg: vec3<u32>, wg: u32) -> u32 {
  return gid.x + gid.y * nwg.x * wg;
}

//! kernel fill_f32
// Sets every element of `out` to params.value (used by tests of the dispatch machinery).
struct Params { n: u32, value: f32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i < params.n) { out[i] = params.value; }
}
