// lorafold compute kernels: the shared include. Each kernel lives in the .wgsl file of its
// family beside its host module (attention.wgsl, elementwise.wgsl, layers.wgsl, matmul.wgsl);
// the loader (kernels.ts) compiles every kernel as this file + its section, with entry point
// `main`. Binding 0 is the uniform `params` (when the op passes parameters), bindings 1.. the
// storage buffers in the order the TypeScript side passes them. Large 1-D launches use a 2-D
// grid: use `linear_id`.

// Flattens a 2-D dispatch grid of 1-D workgroups of size `wg` into one invocation index.
fn linear_id(gid: vec3<u32>, nwg: vec3<u32>, wg: u32) -> u32 {
  return gid.x + gid.y * nwg.x * wg;
}

