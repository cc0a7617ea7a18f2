// lorafold compute kernels: the shared include. Each kernel lives in the .wgsl file of its
// family beside its host module (attention.wgsl, elementwise.wgsl, layers.wgsl, matmul.wgsl);
// the loader (kernels.ts) compiles every kernel as this file + its section, with entry point
// `main`. Binding 0 is the uniform `params` (when the op passes parameters: by the field names
// of the kernel's `struct Params`, u32 / i32 / f32 fields only, checked when encoded, see
// context.ts encodeParams), bindings 1.. the storage buffers in the order the TypeScript side
// passes them. Large 1-D launches use a 2-D grid: use `linear_id`.

// Flattens a 2-D dispatch grid of 1-D workgroups of size `wg` into one invocation index.
fn linear_id(gid: vec3<u32>, nwg: vec3<u32>, wg: u32) -> u32 {
  return gid.x + gid.y * nwg.x * wg;
}


// Element `j` of a 16-bit tensor stored two per u32 word (element 2i in the low half of word i),
// given its word, widened exactly to f32: bfloat16 when `bf16`, else IEEE half (subnormals, inf
// and NaN decoded bit by bit, so no adapter's flushing or shader-f16 support matters).
fn widen16(word: u32, j: u32, bf16: bool) -> f32 {
  let h = (word >> ((j & 1u) * 16u)) & 0xffffu;
  if (bf16) { return bitcast<f32>(h << 16u); }
  let sign = (h & 0x8000u) << 16u;
  let e = (h >> 10u) & 0x1fu;
  let m = h & 0x3ffu;
  // a subnormal half is m * 2^-24, a normal f32 (or zero): exact
  let sub = bitcast<u32>(f32(m) * 5.9604644775390625e-8) | sign;
  let normal = sign | ((e + 112u) << 23u) | (m << 13u);
  let special = sign | 0x7f800000u | (m << 13u);
  return bitcast<f32>(select(select(normal, special, e == 31u), sub, e == 0u));
}

// Online softmax statistics of scaled logits z, a state vec3 (m, s, u): m the running max,
// s = sum e^(z - m), u = sum e^(z - m) (z - m) (entropy = log s - u / s); a state with s = 0 is
// empty. Shared by the entropy and streamed log-softmax kernels so their partials combine alike.
// softmax_rescale: the state's (s, u) moved to a larger max mm.
fn softmax_rescale(st: vec3<f32>, mm: f32) -> vec2<f32> {
  if (st.y == 0.0) { return vec2<f32>(0.0, 0.0); }
  let a = exp(st.x - mm);
  return vec2<f32>(a * st.y, a * (st.z + (st.x - mm) * st.y));
}

// The state with one more scaled logit z.
fn softmax_push(st: vec3<f32>, z: f32) -> vec3<f32> {
  if (z > st.x) {
    let q = softmax_rescale(st, z);
    return vec3<f32>(z, q.x + 1.0, q.y);
  }
  let e = exp(z - st.x);
  var u = st.z;
  if (e > 0.0) { u += e * (z - st.x); }
  return vec3<f32>(st.x, st.y + e, u);
}

// Two states merged at the larger max.
fn softmax_merge(a: vec3<f32>, b: vec3<f32>) -> vec3<f32> {
  let mm = max(a.x, b.x);
  let p = softmax_rescale(a, mm);
  let q = softmax_rescale(b, mm);
  return vec3<f32>(mm, p.x + q.x, p.y + q.y);
}
