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

//! kernel attn_fwd
// Causal grouped-query attention forward (Ops.attention), online softmax in registers.
// Work item: a tile of TQ (1, 2 or 4) query vectors (row i, head h) of one sequence b and kv
// head g, which share every k/v load. Query vectors of (b, g) are numbered
// e = i * group + (h - g * group); tile t holds e = TQ*t .. TQ*t + TQ-1 (a short last tile
// repeats its last vector, stored once). Lanes of a vec4 (s, m, l, ...) are the tile entries.
// Invocation id = split * (batch * kv_heads * ntile) + (b * kv_heads + g) * ntile + t. With
// nsplit = 1 it writes out and lse; otherwise it covers keys [split * split_len, +split_len)
// and writes unnormalised partials (m, l, acc) for attn_fwd_combine. Visible keys of query i:
// [kv_start[b], min(q_offset + i + 1, kv_len)). Override HD = head dim, a multiple of 4 (the
// host pads other sizes), at most 128. Bindings: q, k, v, kv_start (i32 [batch], read only when
// has_start != 0), out, lse, part_ml (2 per partial), part_acc (HD per partial).
struct AttnParams {
  batch: u32, tq: u32, tk: u32, heads: u32,
  kv_heads: u32, q_offset: u32, kv_len: u32, has_start: u32,
  scale: f32, split_len: u32, nsplit: u32, pad: u32,
}
@group(0) @binding(0) var<uniform> params: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> kv_start: array<i32>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;
@group(0) @binding(7) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(8) var<storage, read_write> part_acc: array<vec4<f32>>;
override HD: u32 = 64u;
override WG: u32 = 64u;
override HD4: u32 = HD / 4u;
const MAXD4: u32 = 32u;
// Tile size; entries beyond TQ are compiled out. The host keeps TQ * 2 * HD small: llvmpipe's
// compile time grows steeply with the live per-invocation state.
override TQ: u32 = 4u;
const NEG: f32 = -3.0e38;

fn attn_first_key(b: u32) -> u32 {
  if (params.has_start == 0u) { return 0u; }
  return u32(max(kv_start[b], 0));
}

// Writes the result (or partial) of query vector r (lse index); `acc` is unnormalised.
fn attn_store(r: u32, split: u32, m: f32, l: f32, acc: ptr<function, array<vec4<f32>, MAXD4>>) {
  if (params.nsplit > 1u) {
    let p = split * params.batch * params.tq * params.heads + r;
    part_ml[2u * p] = m;
    part_ml[2u * p + 1u] = l;
    for (var d = 0u; d < HD4; d++) { part_acc[p * HD4 + d] = (*acc)[d]; }
    return;
  }
  let inv = select(0.0, 1.0 / l, l > 0.0);
  for (var d = 0u; d < HD4; d++) { out[r * HD4 + d] = (*acc)[d] * inv; }
  lse[r] = select(0.0, m + log(l), l > 0.0);
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let id = linear_id(gid, nwg, WG);
  let heads = params.heads;
  let group = heads / params.kv_heads;
  let nvec = params.tq * group;
  let ntile = (nvec + TQ - 1u) / TQ;
  let ntot = params.batch * params.kv_heads * ntile;
  if (id >= ntot * params.nsplit) { return; }
  let split = id / ntot;
  let tile = id % ntile;
  let bg = (id % ntot) / ntile;
  let g = bg % params.kv_heads;
  let b = bg / params.kv_heads;
  let e = min(vec4<u32>(TQ * tile) + min(vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(TQ - 1u)), vec4<u32>(nvec - 1u));
  let row = e / group;
  let r = (b * params.tq + row) * heads + g * group + e % group;
  let lo = max(attn_first_key(b), split * params.split_len);
  let cap = select(params.kv_len, min(params.kv_len, (split + 1u) * params.split_len), params.nsplit > 1u);
  let hi = min(vec4<u32>(params.q_offset + 1u) + row, vec4<u32>(cap));
  var qa: array<vec4<f32>, MAXD4>;
  var qb: array<vec4<f32>, MAXD4>;
  var qc: array<vec4<f32>, MAXD4>;
  var qd: array<vec4<f32>, MAXD4>;
  var aa: array<vec4<f32>, MAXD4>;
  var ab: array<vec4<f32>, MAXD4>;
  var ac: array<vec4<f32>, MAXD4>;
  var ad: array<vec4<f32>, MAXD4>;
  for (var d = 0u; d < HD4; d++) {
    qa[d] = q[r.x * HD4 + d] * params.scale;
    aa[d] = vec4<f32>(0.0);
    if (TQ > 1u) {
      qb[d] = q[r.y * HD4 + d] * params.scale;
      ab[d] = vec4<f32>(0.0);
    }
    if (TQ > 2u) {
      qc[d] = q[r.z * HD4 + d] * params.scale;
      qd[d] = q[r.w * HD4 + d] * params.scale;
      ac[d] = vec4<f32>(0.0);
      ad[d] = vec4<f32>(0.0);
    }
  }
  var m = vec4<f32>(NEG);
  var l = vec4<f32>(0.0);
  let kstride = params.kv_heads * HD4;
  var ko = (b * params.tk + lo) * kstride + g * HD4;
  let hmax = max(max(hi.x, hi.y), max(hi.z, hi.w));
  for (var j = lo; j < hmax; j++) {
    var s = vec4<f32>(0.0);
    for (var d = 0u; d < HD4; d++) {
      let kk = k[ko + d];
      s.x += dot(qa[d], kk);
      if (TQ > 1u) { s.y += dot(qb[d], kk); }
      if (TQ > 2u) {
        s.z += dot(qc[d], kk);
        s.w += dot(qd[d], kk);
      }
    }
    let vis = vec4<u32>(j) < hi;
    let n = select(m, max(m, s), vis);
    let c = exp(m - n);
    let p = select(vec4<f32>(0.0), exp(s - n), vis);
    l = l * c + p;
    m = n;
    for (var d = 0u; d < HD4; d++) {
      let vv = v[ko + d];
      aa[d] = aa[d] * c.x + p.x * vv;
      if (TQ > 1u) { ab[d] = ab[d] * c.y + p.y * vv; }
      if (TQ > 2u) {
        ac[d] = ac[d] * c.z + p.z * vv;
        ad[d] = ad[d] * c.w + p.w * vv;
      }
    }
    ko += kstride;
  }
  let e0 = TQ * tile;
  attn_store(r.x, split, m.x, l.x, &aa);
  if (TQ > 1u && e0 + 1u < nvec) { attn_store(r.y, split, m.y, l.y, &ab); }
  if (TQ > 2u && e0 + 2u < nvec) { attn_store(r.z, split, m.z, l.z, &ac); }
  if (TQ > 2u && e0 + 3u < nvec) { attn_store(r.w, split, m.w, l.w, &ad); }
}

//! kernel attn_fwd_combine
// Merges the nsplit key-range partials of attn_fwd into out and lse; one invocation per query
// vector (row * heads + h). Bindings: part_ml, part_acc, out, lse. Override HD as in attn_fwd.
struct AttnParams {
  batch: u32, tq: u32, tk: u32, heads: u32,
  kv_heads: u32, q_offset: u32, kv_len: u32, has_start: u32,
  scale: f32, split_len: u32, nsplit: u32, pad: u32,
}
@group(0) @binding(0) var<uniform> params: AttnParams;
@group(0) @binding(1) var<storage, read> part_ml: array<f32>;
@group(0) @binding(2) var<storage, read> part_acc: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
override HD: u32 = 64u;
override WG: u32 = 64u;
override HD4: u32 = HD / 4u;
const MAXD4: u32 = 32u;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let id = linear_id(gid, nwg, WG);
  let n = params.batch * params.tq * params.heads;
  if (id >= n) { return; }
  var m = -3.0e38;
  for (var s = 0u; s < params.nsplit; s++) {
    let p = s * n + id;
    if (part_ml[2u * p + 1u] > 0.0) { m = max(m, part_ml[2u * p]); }
  }
  var acc: array<vec4<f32>, MAXD4>;
  for (var d = 0u; d < HD4; d++) { acc[d] = vec4<f32>(0.0); }
  var l = 0.0;
  for (var s = 0u; s < params.nsplit; s++) {
    let p = s * n + id;
    let ls = part_ml[2u * p + 1u];
    if (ls > 0.0) {
      let c = exp(part_ml[2u * p] - m);
      l += ls * c;
      for (var d = 0u; d < HD4; d++) { acc[d] += c * part_acc[p * HD4 + d]; }
    }
  }
  let inv = select(0.0, 1.0 / l, l > 0.0);
  for (var d = 0u; d < HD4; d++) { out[id * HD4 + d] = acc[d] * inv; }
  lse[id] = select(0.0, m + log(l), l > 0.0);
}

//! kernel attn_bwd_dq
// Attention backward, query side: tiles of TQ query vectors as in attn_fwd (nsplit = 1)
// recompute P = exp(S - lse) over the visible keys and write dq = scale * sum_j P (dP - D) k_j
// and delta = D = dOut · out (read by attn_bwd_dkdv). Bindings: dout, q, k, v, out, lse,
// kv_start, dq, delta. Override HD as in attn_fwd.
struct AttnParams {
  batch: u32, tq: u32, tk: u32, heads: u32,
  kv_heads: u32, q_offset: u32, kv_len: u32, has_start: u32,
  scale: f32, split_len: u32, nsplit: u32, pad: u32,
}
@group(0) @binding(0) var<uniform> params: AttnParams;
@group(0) @binding(1) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> out: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> lse: array<f32>;
@group(0) @binding(7) var<storage, read> kv_start: array<i32>;
@group(0) @binding(8) var<storage, read_write> dq: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> delta: array<f32>;
override HD: u32 = 64u;
override WG: u32 = 64u;
override HD4: u32 = HD / 4u;
const MAXD4: u32 = 32u;
// Query vectors per invocation (1, 2 or 4), as in attn_fwd (state: TQ * 3 * HD floats).
override TQ: u32 = 4u;

fn attn_first_key(b: u32) -> u32 {
  if (params.has_start == 0u) { return 0u; }
  return u32(max(kv_start[b], 0));
}

fn attn_store_dq(r: u32, dd: f32, acc: ptr<function, array<vec4<f32>, MAXD4>>) {
  for (var d = 0u; d < HD4; d++) { dq[r * HD4 + d] = (*acc)[d] * params.scale; }
  delta[r] = dd;
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let id = linear_id(gid, nwg, WG);
  let heads = params.heads;
  let group = heads / params.kv_heads;
  let nvec = params.tq * group;
  let ntile = (nvec + TQ - 1u) / TQ;
  if (id >= params.batch * params.kv_heads * ntile) { return; }
  let tile = id % ntile;
  let bg = id / ntile;
  let g = bg % params.kv_heads;
  let b = bg / params.kv_heads;
  let e = min(vec4<u32>(TQ * tile) + min(vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(TQ - 1u)), vec4<u32>(nvec - 1u));
  let row = e / group;
  let r = (b * params.tq + row) * heads + g * group + e % group;
  let lo = attn_first_key(b);
  let hi = min(vec4<u32>(params.q_offset + 1u) + row, vec4<u32>(params.kv_len));
  var qa: array<vec4<f32>, MAXD4>;
  var qb: array<vec4<f32>, MAXD4>;
  var qc: array<vec4<f32>, MAXD4>;
  var qd: array<vec4<f32>, MAXD4>;
  var oa: array<vec4<f32>, MAXD4>;
  var ob: array<vec4<f32>, MAXD4>;
  var oc: array<vec4<f32>, MAXD4>;
  var od: array<vec4<f32>, MAXD4>;
  var ga: array<vec4<f32>, MAXD4>;
  var gb: array<vec4<f32>, MAXD4>;
  var gc: array<vec4<f32>, MAXD4>;
  var gd: array<vec4<f32>, MAXD4>;
  var dd = vec4<f32>(0.0);
  for (var d = 0u; d < HD4; d++) {
    qa[d] = q[r.x * HD4 + d] * params.scale;
    oa[d] = dout[r.x * HD4 + d];
    dd.x += dot(oa[d], out[r.x * HD4 + d]);
    ga[d] = vec4<f32>(0.0);
    if (TQ > 1u) {
      qb[d] = q[r.y * HD4 + d] * params.scale;
      ob[d] = dout[r.y * HD4 + d];
      dd.y += dot(ob[d], out[r.y * HD4 + d]);
      gb[d] = vec4<f32>(0.0);
    }
    if (TQ > 2u) {
      qc[d] = q[r.z * HD4 + d] * params.scale;
      qd[d] = q[r.w * HD4 + d] * params.scale;
      oc[d] = dout[r.z * HD4 + d];
      od[d] = dout[r.w * HD4 + d];
      dd.z += dot(oc[d], out[r.z * HD4 + d]);
      dd.w += dot(od[d], out[r.w * HD4 + d]);
      gc[d] = vec4<f32>(0.0);
      gd[d] = vec4<f32>(0.0);
    }
  }
  let rl = vec4<f32>(lse[r.x], lse[r.y], lse[r.z], lse[r.w]);
  let kstride = params.kv_heads * HD4;
  var ko = (b * params.tk + lo) * kstride + g * HD4;
  let hmax = max(max(hi.x, hi.y), max(hi.z, hi.w));
  for (var j = lo; j < hmax; j++) {
    var s = vec4<f32>(0.0);
    var dp = vec4<f32>(0.0);
    for (var d = 0u; d < HD4; d++) {
      let kk = k[ko + d];
      let vv = v[ko + d];
      s.x += dot(qa[d], kk);
      dp.x += dot(oa[d], vv);
      if (TQ > 1u) {
        s.y += dot(qb[d], kk);
        dp.y += dot(ob[d], vv);
      }
      if (TQ > 2u) {
        s.z += dot(qc[d], kk);
        s.w += dot(qd[d], kk);
        dp.z += dot(oc[d], vv);
        dp.w += dot(od[d], vv);
      }
    }
    let ds = select(vec4<f32>(0.0), exp(s - rl) * (dp - dd), vec4<u32>(j) < hi);
    for (var d = 0u; d < HD4; d++) {
      let kk = k[ko + d];
      ga[d] += ds.x * kk;
      if (TQ > 1u) { gb[d] += ds.y * kk; }
      if (TQ > 2u) {
        gc[d] += ds.z * kk;
        gd[d] += ds.w * kk;
      }
    }
    ko += kstride;
  }
  let e0 = TQ * tile;
  attn_store_dq(r.x, dd.x, &ga);
  if (TQ > 1u && e0 + 1u < nvec) { attn_store_dq(r.y, dd.y, &gb); }
  if (TQ > 2u && e0 + 2u < nvec) { attn_store_dq(r.z, dd.z, &gc); }
  if (TQ > 2u && e0 + 3u < nvec) { attn_store_dq(r.w, dd.w, &gd); }
}

//! kernel attn_bwd_dkdv
// Attention backward, key side: one invocation per TQ (1, 2 or 4) adjacent key rows of one
// sequence and kv head loops over the query rows that see them and the query heads of the group
// (sharing each q/dOut load): dv = sum P dOut, dk = scale * sum P (dP - D) q. Each invocation
// owns its dk/dv rows, so no atomics. Invocation id = (b * kv_heads + g) * nquad + jq; a short
// last tile repeats its last key, stored once. Bindings: dout, q, k, v, lse, delta, kv_start,
// dk, dv.
// Override HD as in attn_fwd.
struct AttnParams {
  batch: u32, tq: u32, tk: u32, heads: u32,
  kv_heads: u32, q_offset: u32, kv_len: u32, has_start: u32,
  scale: f32, split_len: u32, nsplit: u32, pad: u32,
}
@group(0) @binding(0) var<uniform> params: AttnParams;
@group(0) @binding(1) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> lse: array<f32>;
@group(0) @binding(6) var<storage, read> delta: array<f32>;
@group(0) @binding(7) var<storage, read> kv_start: array<i32>;
@group(0) @binding(8) var<storage, read_write> dk: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> dv: array<vec4<f32>>;
override HD: u32 = 64u;
override WG: u32 = 64u;
override HD4: u32 = HD / 4u;
const MAXD4: u32 = 32u;
// Key rows per invocation (1, 2 or 4); the host keeps TQ * 4 * HD small (live registers).
override TQ: u32 = 4u;

fn attn_first_key(b: u32) -> u32 {
  if (params.has_start == 0u) { return 0u; }
  return u32(max(kv_start[b], 0));
}

// First query row that sees key j (tq when none does: masked by kv_len or kv_start).
fn attn_first_row(j: u32, lo: u32) -> u32 {
  if (j >= params.kv_len || j < lo) { return params.tq; }
  return select(0u, j - params.q_offset, j > params.q_offset);
}

fn attn_store_dkdv(o: u32, gk: ptr<function, array<vec4<f32>, MAXD4>>,
                   gv: ptr<function, array<vec4<f32>, MAXD4>>) {
  for (var d = 0u; d < HD4; d++) {
    dk[o + d] = (*gk)[d] * params.scale;
    dv[o + d] = (*gv)[d];
  }
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let id = linear_id(gid, nwg, WG);
  let kvh = params.kv_heads;
  let nquad = (params.tk + TQ - 1u) / TQ;
  if (id >= params.batch * kvh * nquad) { return; }
  let jq = id % nquad;
  let bg = id / nquad;
  let g = bg % kvh;
  let b = bg / kvh;
  let j = min(vec4<u32>(TQ * jq) + min(vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(TQ - 1u)), vec4<u32>(params.tk - 1u));
  let heads = params.heads;
  let group = heads / kvh;
  let o = ((b * params.tk + j) * kvh + g) * HD4;
  var ka: array<vec4<f32>, MAXD4>;
  var kb: array<vec4<f32>, MAXD4>;
  var kc: array<vec4<f32>, MAXD4>;
  var kd: array<vec4<f32>, MAXD4>;
  var va: array<vec4<f32>, MAXD4>;
  var vb: array<vec4<f32>, MAXD4>;
  var vc: array<vec4<f32>, MAXD4>;
  var vd: array<vec4<f32>, MAXD4>;
  var gka: array<vec4<f32>, MAXD4>;
  var gkb: array<vec4<f32>, MAXD4>;
  var gkc: array<vec4<f32>, MAXD4>;
  var gkd: array<vec4<f32>, MAXD4>;
  var gva: array<vec4<f32>, MAXD4>;
  var gvb: array<vec4<f32>, MAXD4>;
  var gvc: array<vec4<f32>, MAXD4>;
  var gvd: array<vec4<f32>, MAXD4>;
  for (var d = 0u; d < HD4; d++) {
    ka[d] = k[o.x + d] * params.scale;
    va[d] = v[o.x + d];
    gka[d] = vec4<f32>(0.0);
    gva[d] = vec4<f32>(0.0);
    if (TQ > 1u) {
      kb[d] = k[o.y + d] * params.scale;
      vb[d] = v[o.y + d];
      gkb[d] = vec4<f32>(0.0);
      gvb[d] = vec4<f32>(0.0);
    }
    if (TQ > 2u) {
      kc[d] = k[o.z + d] * params.scale;
      kd[d] = k[o.w + d] * params.scale;
      vc[d] = v[o.z + d];
      vd[d] = v[o.w + d];
      gkc[d] = vec4<f32>(0.0);
      gkd[d] = vec4<f32>(0.0);
      gvc[d] = vec4<f32>(0.0);
      gvd[d] = vec4<f32>(0.0);
    }
  }
  let lo = attn_first_key(b);
  let i0 = vec4<u32>(
    attn_first_row(j.x, lo),
    attn_first_row(j.y, lo),
    attn_first_row(j.z, lo),
    attn_first_row(j.w, lo),
  );
  for (var i = min(min(i0.x, i0.y), min(i0.z, i0.w)); i < params.tq; i++) {
    let see = vec4<u32>(i) >= i0;
    let rb = (b * params.tq + i) * heads + g * group;
    for (var hh = 0u; hh < group; hh++) {
      let r = rb + hh;
      let qo = r * HD4;
      var s = vec4<f32>(0.0);
      var dp = vec4<f32>(0.0);
      for (var d = 0u; d < HD4; d++) {
        let qq = q[qo + d];
        let oo = dout[qo + d];
        s.x += dot(qq, ka[d]);
        dp.x += dot(oo, va[d]);
        if (TQ > 1u) {
          s.y += dot(qq, kb[d]);
          dp.y += dot(oo, vb[d]);
        }
        if (TQ > 2u) {
          s.z += dot(qq, kc[d]);
          s.w += dot(qq, kd[d]);
          dp.z += dot(oo, vc[d]);
          dp.w += dot(oo, vd[d]);
        }
      }
      let p = select(vec4<f32>(0.0), exp(s - lse[r]), see);
      let ds = p * (dp - delta[r]);
      for (var d = 0u; d < HD4; d++) {
        let qq = q[qo + d];
        let oo = dout[qo + d];
        gva[d] += p.x * oo;
        gka[d] += ds.x * qq;
        if (TQ > 1u) {
          gvb[d] += p.y * oo;
          gkb[d] += ds.y * qq;
        }
        if (TQ > 2u) {
          gvc[d] += p.z * oo;
          gvd[d] += p.w * oo;
          gkc[d] += ds.z * qq;
          gkd[d] += ds.w * qq;
        }
      }
    }
  }
  let j0 = TQ * jq;
  attn_store_dkdv(o.x, &gka, &gva);
  if (TQ > 1u && j0 + 1u < params.tk) { attn_store_dkdv(o.y, &gkb, &gvb); }
  if (TQ > 2u && j0 + 2u < params.tk) { attn_store_dkdv(o.z, &gkc, &gvc); }
  if (TQ > 2u && j0 + 3u < params.tk) { attn_store_dkdv(o.w, &gkd, &gvd); }
}

//! kernel attn_restride
// Copies rows of width src_w into rows of width dst_w, zero-filling the extra columns: pads the
// head dim of attention operands to a multiple of 4 (and strips the padding from results).
// One invocation per destination element. Bindings: src, dst.
struct Params { n: u32, src_w: u32, dst_w: u32, pad: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  let r = i / params.dst_w;
  let c = i % params.dst_w;
  var x = 0.0;
  if (c < params.src_w) { x = src[r * params.src_w + c]; }
  dst[i] = x;
}

//! kernel ew_binary
// out = a (op) b elementwise. op 0: a + b, 1: a - b, 2: a * b, 3: a + s * b.
struct Params { n: u32, op: u32, s: f32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  let x = a[i];
  let y = b[i];
  var r: f32;
  switch params.op {
    case 0u: { r = x + y; }
    case 1u: { r = x - y; }
    case 2u: { r = x * y; }
    default: { r = x + params.s * y; }
  }
  out[i] = r;
}

//! kernel ew_scale
// out = s * a.
struct Params { n: u32, s: f32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i < params.n) { out[i] = params.s * a[i]; }
}

//! kernel ew_axpy_inplace
// In place: dst += s * src (src must be another buffer).
struct Params { n: u32, s: f32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i < params.n) { dst[i] = dst[i] + params.s * src[i]; }
}

//! kernel ew_add_row
// out[R, C] = a[R, C] + row[C] broadcast over rows.
struct Params { n: u32, cols: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> row: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i < params.n) { out[i] = a[i] + row[i % params.cols]; }
}

//! kernel ew_sum_rows
// Partial column sums of a[rows, cols] over chunks of chunk_rows rows: invocation t < n
// (= chunks * cols) writes out[t] = sum of a[r, t % cols] for r in chunk t / cols, in row order.
// With chunk_rows >= rows it is the whole column sum (out [cols]).
struct Params { n: u32, cols: u32, rows: u32, chunk_rows: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let t = linear_id(gid, nwg, 256u);
  if (t >= params.n) { return; }
  let chunk = t / params.cols;
  let c = t - chunk * params.cols;
  let r0 = chunk * params.chunk_rows;
  let r1 = min(r0 + params.chunk_rows, params.rows);
  var acc = 0.0;
  for (var r = r0; r < r1; r++) { acc += a[r * params.cols + c]; }
  out[t] = acc;
}

//! kernel ew_sum_squares
// Workgroup w writes out[w] = sum over i = w*256 + lid, stepping by 256 * workgroups, of x[i]²
// (or of x[i] when square == 0), reduced by a fixed tree: deterministic. One workgroup over the
// partials (square = 0) finishes the reduction.
struct Params { n: u32, square: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
var<workgroup> part: array<f32, 256>;
@compute @workgroup_size(256)
fn main(
  @builtin(local_invocation_id) lid: vec3<u32>,
  @builtin(workgroup_id) wid: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
) {
  let stride = nwg.x * 256u;
  var acc = 0.0;
  for (var i = wid.x * 256u + lid.x; i < params.n; i += stride) {
    let v = x[i];
    acc += select(v, v * v, params.square != 0u);
  }
  part[lid.x] = acc;
  workgroupBarrier();
  for (var h = 128u; h > 0u; h = h >> 1u) {
    if (lid.x < h) { part[lid.x] = part[lid.x] + part[lid.x + h]; }
    workgroupBarrier();
  }
  if (lid.x == 0u) { out[wid.x] = part[0]; }
}

//! kernel ew_gather_rows
// out[i, c] = src[idx[i], c] for out [rows, cols]; n = rows * cols.
struct Params { n: u32, cols: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> idx: array<i32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  let r = i / params.cols;
  let c = i - r * params.cols;
  out[i] = src[u32(idx[r]) * params.cols + c];
}

//! kernel ew_scatter_rows
// In place: dst[idx[i], c] = src[i, c] for src [rows, cols]; n = rows * cols; idx distinct.
struct Params { n: u32, cols: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> idx: array<i32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  let r = i / params.cols;
  let c = i - r * params.cols;
  dst[u32(idx[r]) * params.cols + c] = src[i];
}

//! kernel ew_copy_cols
// Copies a column range between row-major matrices (bit for bit, any 32-bit dtype):
// dst[dst_off + r * dst_w + c] = src[src_off + r * src_w + c] for c < cols; n = rows * cols.
struct Params { n: u32, cols: u32, src_w: u32, src_off: u32, dst_w: u32, dst_off: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  let r = i / params.cols;
  let c = i - r * params.cols;
  dst[params.dst_off + r * params.dst_w + c] = src[params.src_off + r * params.src_w + c];
}

//! kernel swiglu
// out = silu(g) * u, silu(g) = g * sigmoid(g) (sigmoid evaluated without overflow).
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
fn sigmoid(x: f32) -> f32 {
  let e = exp(-abs(x));
  return select(e, 1.0, x >= 0.0) / (1.0 + e);
}
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  let x = g[i];
  out[i] = x * sigmoid(x) * u[i];
}

//! kernel swiglu_backward
// With s = sigmoid(g): du = dh * g * s; dg = dh * u * s * (1 + g * (1 - s)).
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> dh: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read> u: array<f32>;
@group(0) @binding(4) var<storage, read_write> dg: array<f32>;
@group(0) @binding(5) var<storage, read_write> du: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  let x = g[i];
  let e = exp(-abs(x));
  // sigmoid(x) and 1 - sigmoid(x), each without cancellation.
  let s = select(e, 1.0, x >= 0.0) / (1.0 + e);
  let t = select(1.0, e, x >= 0.0) / (1.0 + e);
  let d = dh[i];
  du[i] = d * x * s;
  dg[i] = d * u[i] * s * (1.0 + x * t);
}

//! kernel adamw
// In place AdamW (PyTorch): g' = gscale * g; m = b1 m + (1 - b1) g'; v = b2 v + (1 - b2) g'²;
// p = p * decay - lr * (m / bc1) / (sqrt(v / bc2) + eps), decay = 1 - lr * wd, bc = 1 - beta^t.
struct Params {
  n: u32, lr: f32, b1: f32, omb1: f32, b2: f32, omb2: f32, eps: f32, decay: f32, gscale: f32,
  bc1: f32, bc2: f32,
}
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> p: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  let g = params.gscale * grad[i];
  let mi = params.b1 * m[i] + params.omb1 * g;
  let vi = params.b2 * v[i] + params.omb2 * g * g;
  m[i] = mi;
  v[i] = vi;
  p[i] = p[i] * params.decay - params.lr * (mi / params.bc1) / (sqrt(vi / params.bc2) + params.eps);
}

//! kernel lora_fold
// out = w + s * (bm · am) for w [rows, cols], bm [rows, rank], am [rank, cols]; w, bm, am are
// only read. A 16x16 workgroup covers a 128x128 tile; invocation (x, y) owns rows r0 + 16p and
// columns c0 + 16q (p, q < 8), keeping its 8x8 block of bm · am in registers (8 loads of bm and
// 8 of am per 64 multiply-adds). Where the update is zero the output is w's element, bit for bit.
struct Params { rows: u32, cols: u32, rank: u32, s: f32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> bm: array<f32>;
@group(0) @binding(3) var<storage, read> am: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let rows = params.rows;
  let cols = params.cols;
  let rank = params.rank;
  let r0 = wid.y * 128u + lid.y;
  let c0 = wid.x * 128u + lid.x;
  // Clamped offsets keep the loads in bounds; the stores below are guarded.
  var ri: array<u32, 8>;
  var cj: array<u32, 8>;
  for (var t = 0u; t < 8u; t++) {
    ri[t] = min(r0 + 16u * t, rows - 1u) * rank;
    cj[t] = min(c0 + 16u * t, cols - 1u);
  }
  var acc: array<array<f32, 8>, 8>;
  for (var k = 0u; k < rank; k++) {
    var bv: array<f32, 8>;
    var av: array<f32, 8>;
    let ka = k * cols;
    for (var t = 0u; t < 8u; t++) {
      bv[t] = bm[ri[t] + k];
      av[t] = am[ka + cj[t]];
    }
    for (var p = 0u; p < 8u; p++) {
      for (var q = 0u; q < 8u; q++) { acc[p][q] += bv[p] * av[q]; }
    }
  }
  for (var p = 0u; p < 8u; p++) {
    let i = r0 + 16u * p;
    if (i >= rows) { break; }
    for (var q = 0u; q < 8u; q++) {
      let j = c0 + 16u * q;
      if (j >= cols) { break; }
      let idx = i * cols + j;
      let wv = w[idx];
      let d = params.s * acc[p][q];
      out[idx] = select(wv + d, wv, d == 0.0);
    }
  }
}

//! kernel rmsnorm_fwd_row
// RMSNorm, one invocation per row: y = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps).
// Loops are unrolled by 8: llvmpipe stops any invocation after 65535 loop iterations in all, so
// a row loop must stay well below that (the TypeScript side picks the _wg form for longer rows).
struct Params { rows: u32, h: u32, eps: f32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;
fn sq(i: u32) -> f32 { let v = x[i]; return v * v; }
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, 64u);
  if (r >= params.rows) { return; }
  let h = params.h;
  let h8 = h & ~7u;
  let base = r * h;
  var ss = 0.0;
  for (var j = 0u; j < h8; j += 8u) {
    let b = base + j;
    ss += ((sq(b) + sq(b + 1u)) + (sq(b + 2u) + sq(b + 3u))) +
      ((sq(b + 4u) + sq(b + 5u)) + (sq(b + 6u) + sq(b + 7u)));
  }
  for (var j = h8; j < h; j++) { ss += sq(base + j); }
  let s = 1.0 / sqrt(ss / f32(h) + params.eps);
  rstd[r] = s;
  for (var j = 0u; j < h8; j += 8u) {
    let b = base + j;
    y[b] = x[b] * s * w[j];
    y[b + 1u] = x[b + 1u] * s * w[j + 1u];
    y[b + 2u] = x[b + 2u] * s * w[j + 2u];
    y[b + 3u] = x[b + 3u] * s * w[j + 3u];
    y[b + 4u] = x[b + 4u] * s * w[j + 4u];
    y[b + 5u] = x[b + 5u] * s * w[j + 5u];
    y[b + 6u] = x[b + 6u] * s * w[j + 6u];
    y[b + 7u] = x[b + 7u] * s * w[j + 7u];
  }
  for (var j = h8; j < h; j++) { y[base + j] = x[base + j] * s * w[j]; }
}

//! kernel rmsnorm_fwd_wg
// RMSNorm, one workgroup per row with a shared-memory reduction of the sum of squares.
const WG = 64u;
struct Params { rows: u32, h: u32, eps: f32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;
var<workgroup> part: array<f32, WG>;
@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = wid.x + wid.y * nwg.x;
  if (r >= params.rows) { return; }
  let h = params.h;
  let base = r * h;
  var ss = 0.0;
  for (var j = lid; j < h; j += WG) { let v = x[base + j]; ss += v * v; }
  part[lid] = ss;
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    workgroupBarrier();
    if (lid < k) { part[lid] += part[lid + k]; }
  }
  workgroupBarrier();
  let s = 1.0 / sqrt(part[0] / f32(h) + params.eps);
  if (lid == 0u) { rstd[r] = s; }
  for (var j = lid; j < h; j += WG) { y[base + j] = x[base + j] * s * w[j]; }
}

//! kernel rmsnorm_bwd_dx_row
// RMSNorm input gradient, one invocation per row (loops unrolled by 8, see rmsnorm_fwd_row):
// dx = s*w*dy - s^3/H * x * sum(dy*w*x), with s = rstd of the row.
struct Params { rows: u32, h: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read> rstd: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;
fn t(b: u32, j: u32) -> f32 { return dy[b] * w[j] * x[b]; }
fn g(b: u32, j: u32, s: f32, c: f32) { dx[b] = s * w[j] * dy[b] - c * x[b]; }
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, 64u);
  if (r >= params.rows) { return; }
  let h = params.h;
  let h8 = h & ~7u;
  let base = r * h;
  var dot = 0.0;
  for (var j = 0u; j < h8; j += 8u) {
    let b = base + j;
    dot += ((t(b, j) + t(b + 1u, j + 1u)) + (t(b + 2u, j + 2u) + t(b + 3u, j + 3u))) +
      ((t(b + 4u, j + 4u) + t(b + 5u, j + 5u)) + (t(b + 6u, j + 6u) + t(b + 7u, j + 7u)));
  }
  for (var j = h8; j < h; j++) { dot += t(base + j, j); }
  let s = rstd[r];
  let c = s * s * s * dot / f32(h);
  for (var j = 0u; j < h8; j += 8u) {
    let b = base + j;
    g(b, j, s, c);
    g(b + 1u, j + 1u, s, c);
    g(b + 2u, j + 2u, s, c);
    g(b + 3u, j + 3u, s, c);
    g(b + 4u, j + 4u, s, c);
    g(b + 5u, j + 5u, s, c);
    g(b + 6u, j + 6u, s, c);
    g(b + 7u, j + 7u, s, c);
  }
  for (var j = h8; j < h; j++) { g(base + j, j, s, c); }
}

//! kernel rmsnorm_bwd_dx_wg
// RMSNorm input gradient, one workgroup per row (shared-memory reduction of the dot product).
const WG = 64u;
struct Params { rows: u32, h: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read> rstd: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;
var<workgroup> part: array<f32, WG>;
@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = wid.x + wid.y * nwg.x;
  if (r >= params.rows) { return; }
  let h = params.h;
  let base = r * h;
  var dot = 0.0;
  for (var j = lid; j < h; j += WG) { dot += dy[base + j] * w[j] * x[base + j]; }
  part[lid] = dot;
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    workgroupBarrier();
    if (lid < k) { part[lid] += part[lid + k]; }
  }
  workgroupBarrier();
  let s = rstd[r];
  let c = s * s * s * part[0] / f32(h);
  for (var j = lid; j < h; j += WG) { dx[base + j] = s * w[j] * dy[base + j] - c * x[base + j]; }
}

//! kernel rmsnorm_bwd_dw
// RMSNorm weight gradient over a chunk of rows, one invocation per (chunk c, column j):
// out[c, j] = sum over rows r of chunk c of dy[r,j] * x[r,j] * rstd[r], in row order. With one
// chunk `out` is dw; otherwise rmsnorm_bwd_dw_sum adds the chunks (fixed order: deterministic).
struct Params { total: u32, rows: u32, h: u32, chunk: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> rstd: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let idx = linear_id(gid, nwg, 64u);
  if (idx >= params.total) { return; }
  let h = params.h;
  let c = idx / h;
  let j = idx - c * h;
  let end = min(params.rows, (c + 1u) * params.chunk);
  var acc = 0.0;
  for (var r = c * params.chunk; r < end; r++) { acc += dy[r * h + j] * x[r * h + j] * rstd[r]; }
  out[idx] = acc;
}

//! kernel rmsnorm_bwd_dw_sum
// dw[j] = sum over chunks c of part[c, j] (see rmsnorm_bwd_dw).
struct Params { chunks: u32, h: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> dw: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let j = linear_id(gid, nwg, 64u);
  if (j >= params.h) { return; }
  var acc = 0.0;
  for (var c = 0u; c < params.chunks; c++) { acc += part[c * params.h + j]; }
  dw[j] = acc;
}

//! kernel rope_apply
// Rotary embedding (HF rotate_half layout), one invocation per (row, head, pair i < half):
// (x_i, x_{i+half}) rotated by sign * angle, angle = f32(pos) * inv_freq[i] rounded to f32 as
// Hugging Face computes it. cos/sin are taken after an exact Cody-Waite reduction modulo 2*pi,
// so large angles (positions in the thousands) stay accurate on every driver.
struct Params { n: u32, half: u32, heads: u32, sign: f32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> pos: array<i32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
// 2*pi = C1 + C2 + C3; C1 and C2 have 8 and 11 significant bits, so k*C1 and k*C2 are exact for
// |k| < 2^13 (angles up to ~51000).
const C1 = 6.28125;
const C2 = 0.0019350051879882812;
const C3 = 3.019916050561733e-07;
const INV_2PI = 0.15915493667125702;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let idx = linear_id(gid, nwg, 256u);
  if (idx >= params.n) { return; }
  let half = params.half;
  let i = idx % half;
  let t = idx / half;
  let hd = t % params.heads;
  let r = t / params.heads;
  let a = f32(pos[r]) * inv_freq[i];
  let k = round(a * INV_2PI);
  let red = ((a - k * C1) - k * C2) - k * C3;
  let c = cos(red);
  let sn = sin(red) * params.sign;
  let lo = (r * params.heads + hd) * 2u * half + i;
  let x1 = x[lo];
  let x2 = x[lo + half];
  out[lo] = x1 * c - x2 * sn;
  out[lo + half] = x2 * c + x1 * sn;
}

//! kernel embed_gather
// Embedding rows: out[r, c] = table[ids[r], c]; an id outside [0, V) gives a zero row (never an
// out-of-bounds read).
struct Params { total: u32, h: u32, v: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<i32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let idx = linear_id(gid, nwg, 256u);
  if (idx >= params.total) { return; }
  let r = idx / params.h;
  let c = idx - r * params.h;
  let id = ids[r];
  var val = 0.0;
  if (id >= 0 && u32(id) < params.v) { val = table[u32(id) * params.h + c]; }
  out[idx] = val;
}

//! kernel embed_grad
// Embedding gradient from a host-built CSR list, one invocation per (segment s, column c).
// csr = [S segment ids | S+1 offsets into the positions | N row positions grouped by id,
// ascending | D distinct ids | D+1 first segments of each distinct id]. An id's positions are
// split into segments of bounded length (llvmpipe caps loop iterations). Sums dy[p, c] over the
// positions of segment s in ascending order into out[id, c] when `direct` (every id has one
// segment), else into part[s, c] for embed_grad_sum.
struct Params { total: u32, segs: u32, h: u32, direct: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> csr: array<i32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let idx = linear_id(gid, nwg, 256u);
  if (idx >= params.total) { return; }
  let h = params.h;
  let ns = params.segs;
  let s = idx / h;
  let c = idx - s * h;
  let start = u32(csr[ns + s]);
  let end = u32(csr[ns + s + 1u]);
  var acc = 0.0;
  for (var k = start; k < end; k++) { acc += dy[u32(csr[2u * ns + 1u + k]) * h + c]; }
  if (params.direct != 0u) { out[u32(csr[s]) * h + c] = acc; } else { out[idx] = acc; }
}

//! kernel embed_grad_sum
// Adds the segment sums of each distinct id (see embed_grad), one invocation per (id j, column c),
// for the distinct ids j0, j0 + 1, ... (total / h of them). `out` holds the table rows from row0
// on (one storage block of a split gradient; row0 = j0 = 0 for a whole table).
struct Params { total: u32, d: u32, h: u32, at: u32, row0: u32, j0: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> csr: array<i32>;
@group(0) @binding(2) var<storage, read> part: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let idx = linear_id(gid, nwg, 256u);
  if (idx >= params.total) { return; }
  let h = params.h;
  let jl = idx / h;
  let c = idx - jl * h;
  let j = params.j0 + jl;
  let at = params.at;
  let first = u32(csr[at + params.d + j]);
  let last = u32(csr[at + params.d + j + 1u]);
  var acc = 0.0;
  for (var s = first; s < last; s++) { acc += part[s * h + c]; }
  out[(u32(csr[at + j]) - params.row0) * h + c] = acc;
}

//! kernel embed_gather_part
// Embedding rows from one storage block of a split table, holding table rows [row0, row0 + rows):
// out[r, c] = block[ids[r] - row0, c] for the ids inside the block; other rows of out are left
// as they are (the host zero-fills out first, so an id outside [0, V) gives a zero row).
struct Params { total: u32, h: u32, row0: u32, rows: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> block: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<i32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let idx = linear_id(gid, nwg, 256u);
  if (idx >= params.total) { return; }
  let r = idx / params.h;
  let c = idx - r * params.h;
  let id = ids[r];
  if (id >= 0 && u32(id) >= params.row0 && u32(id) - params.row0 < params.rows) {
    out[idx] = block[(u32(id) - params.row0) * params.h + c];
  }
}

//! kernel logprob_fwd_row
// Token log-probs, one invocation per row (loops unrolled by 8, see rmsnorm_fwd_row):
// lse = m + log(s) with m = max(logits/T), s = sum exp(logits/T - m); logp = (logits[target]/T - m)
// - log(s) (no large intermediate); a target outside [0, V) gives NaN (never an out-of-bounds read).
// The logits may be one storage block of split logits: its rows are rows row0.. of targets/out.
struct Params { n: u32, v: u32, inv_t: f32, row0: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> logp: array<f32>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
fn mx(b: u32) -> f32 {
  return max(max(max(logits[b], logits[b + 1u]), max(logits[b + 2u], logits[b + 3u])),
    max(max(logits[b + 4u], logits[b + 5u]), max(logits[b + 6u], logits[b + 7u])));
}
fn ex(i: u32, it: f32, m: f32) -> f32 { return exp(logits[i] * it - m); }
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, 64u);
  if (r >= params.n) { return; }
  let v = params.v;
  let v8 = v & ~7u;
  let it = params.inv_t;
  let base = r * v;
  var mraw = -3.4028235e38;
  for (var j = 0u; j < v8; j += 8u) { mraw = max(mraw, mx(base + j)); }
  for (var j = v8; j < v; j++) { mraw = max(mraw, logits[base + j]); }
  let m = mraw * it;
  var s = 0.0;
  for (var j = 0u; j < v8; j += 8u) {
    let b = base + j;
    s += ((ex(b, it, m) + ex(b + 1u, it, m)) + (ex(b + 2u, it, m) + ex(b + 3u, it, m))) +
      ((ex(b + 4u, it, m) + ex(b + 5u, it, m)) + (ex(b + 6u, it, m) + ex(b + 7u, it, m)));
  }
  for (var j = v8; j < v; j++) { s += ex(base + j, it, m); }
  let ls = log(s);
  let ro = params.row0 + r;
  lse[ro] = m + ls;
  let t = targets[ro];
  if (t >= 0 && u32(t) < v) {
    logp[ro] = (logits[base + u32(t)] * it - m) - ls;
  } else {
    logp[ro] = bitcast<f32>(0x7fc00000u | (v & 0u));
  }
}

//! kernel logprob_fwd_wg
// Token log-probs, one workgroup per row: per-invocation online (max, sum) over a strided slice,
// then a shared-memory tree combine. Same outputs (and row0) as logprob_fwd_row.
const WG = 64u;
const NEG = -3.4028235e38;
struct Params { n: u32, v: u32, inv_t: f32, row0: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> logp: array<f32>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
var<workgroup> pm: array<f32, WG>;
var<workgroup> ps: array<f32, WG>;
@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = wid.x + wid.y * nwg.x;
  if (r >= params.n) { return; }
  let v = params.v;
  let it = params.inv_t;
  let base = r * v;
  var m = NEG;
  var s = 0.0;
  for (var j = lid; j < v; j += WG) {
    let z = logits[base + j] * it;
    if (z > m) { s = s * exp(m - z) + 1.0; m = z; } else { s += exp(z - m); }
  }
  pm[lid] = m;
  ps[lid] = s;
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    workgroupBarrier();
    if (lid < k) {
      let m1 = pm[lid];
      let m2 = pm[lid + k];
      let mm = max(m1, m2);
      ps[lid] = ps[lid] * exp(m1 - mm) + ps[lid + k] * exp(m2 - mm);
      pm[lid] = mm;
    }
  }
  if (lid == 0u) {
    let ls = log(ps[0]);
    let ro = params.row0 + r;
    lse[ro] = pm[0] + ls;
    let t = targets[ro];
    if (t >= 0 && u32(t) < v) {
      logp[ro] = (logits[base + u32(t)] * it - pm[0]) - ls;
    } else {
      logp[ro] = bitcast<f32>(0x7fc00000u | (v & 0u));
    }
  }
}

//! kernel logprob_bwd
// d logits = (onehot(target) - exp(logits/T - lse)) * dlogp / T, one invocation per element.
// The logits may be one storage block of split logits (its rows are rows row0.. of dlogp, targets
// and lse) and/or a vocabulary chunk: column j is vocabulary entry offset + j.
struct Params { total: u32, v: u32, inv_t: f32, row0: u32, offset: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> dlogp: array<f32>;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read> targets: array<i32>;
@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let idx = linear_id(gid, nwg, 256u);
  if (idx >= params.total) { return; }
  let r = idx / params.v;
  let j = idx - r * params.v;
  let ro = params.row0 + r;
  let p = exp(logits[idx] * params.inv_t - lse[ro]);
  let onehot = select(0.0, 1.0, i32(j + params.offset) == targets[ro]);
  out[idx] = (onehot - p) * (dlogp[ro] * params.inv_t);
}

//! kernel entropy_row
// Entropy of softmax(logits/T), one invocation per row (loops unrolled by 8, see
// rmsnorm_fwd_row): with m = max z and e = exp(z - m), H = log(sum e) - sum(e * (z - m)) / sum e.
// The logits may be one storage block of split logits: its rows are rows row0.. of out.
struct Params { n: u32, v: u32, inv_t: f32, row0: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
fn mx(b: u32) -> f32 {
  return max(max(max(logits[b], logits[b + 1u]), max(logits[b + 2u], logits[b + 3u])),
    max(max(logits[b + 4u], logits[b + 5u]), max(logits[b + 6u], logits[b + 7u])));
}
// (e, e * z) for z = logits[i]/T - m; the product is 0 where e underflows (z may be -inf).
fn ez(i: u32, it: f32, m: f32) -> vec2<f32> {
  let z = logits[i] * it - m;
  let e = exp(z);
  return vec2<f32>(e, select(0.0, e * z, e > 0.0));
}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, 64u);
  if (r >= params.n) { return; }
  let v = params.v;
  let v8 = v & ~7u;
  let it = params.inv_t;
  let base = r * v;
  var mraw = -3.4028235e38;
  for (var j = 0u; j < v8; j += 8u) { mraw = max(mraw, mx(base + j)); }
  for (var j = v8; j < v; j++) { mraw = max(mraw, logits[base + j]); }
  let m = mraw * it;
  var acc = vec2<f32>(0.0, 0.0);
  for (var j = 0u; j < v8; j += 8u) {
    let b = base + j;
    acc += ((ez(b, it, m) + ez(b + 1u, it, m)) + (ez(b + 2u, it, m) + ez(b + 3u, it, m))) +
      ((ez(b + 4u, it, m) + ez(b + 5u, it, m)) + (ez(b + 6u, it, m) + ez(b + 7u, it, m)));
  }
  for (var j = v8; j < v; j++) { acc += ez(base + j, it, m); }
  out[params.row0 + r] = log(acc.x) - acc.y / acc.x;
}

//! kernel entropy_wg
// Entropy, one workgroup per row: online (max, sum e, sum e*(z-max)) per invocation, then a
// shared-memory tree combine. Same output (and row0) as entropy_row.
const WG = 64u;
const NEG = -3.4028235e38;
struct Params { n: u32, v: u32, inv_t: f32, row0: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
var<workgroup> pm: array<f32, WG>;
var<workgroup> ps: array<f32, WG>;
var<workgroup> pz: array<f32, WG>;
// Moves a partial (m, s, sz) to a larger max mm: s' = a*s, sz' = a*(sz + (m - mm)*s), a = e^(m-mm).
fn rescale(m: f32, s: f32, sz: f32, mm: f32) -> vec2<f32> {
  if (s == 0.0) { return vec2<f32>(0.0, 0.0); }
  let a = exp(m - mm);
  return vec2<f32>(a * s, a * (sz + (m - mm) * s));
}
@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = wid.x + wid.y * nwg.x;
  if (r >= params.n) { return; }
  let v = params.v;
  let it = params.inv_t;
  let base = r * v;
  var m = NEG;
  var s = 0.0;
  var sz = 0.0;
  for (var j = lid; j < v; j += WG) {
    let z = logits[base + j] * it;
    if (z > m) {
      let q = rescale(m, s, sz, z);
      s = q.x + 1.0;
      sz = q.y;
      m = z;
    } else {
      let e = exp(z - m);
      s += e;
      if (e > 0.0) { sz += e * (z - m); }
    }
  }
  pm[lid] = m;
  ps[lid] = s;
  pz[lid] = sz;
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    workgroupBarrier();
    if (lid < k) {
      let mm = max(pm[lid], pm[lid + k]);
      let a = rescale(pm[lid], ps[lid], pz[lid], mm);
      let b = rescale(pm[lid + k], ps[lid + k], pz[lid + k], mm);
      pm[lid] = mm;
      ps[lid] = a.x + b.x;
      pz[lid] = a.y + b.y;
    }
  }
  if (lid == 0u) { out[params.row0 + r] = log(ps[0]) - pz[0] / ps[0]; }
}

//! kernel lsm_chunk_row
// One vocabulary chunk of a streamed log-softmax (Ops.logSoftmaxChunk), one invocation per row
// (loops unrolled by 8, see rmsnorm_fwd_row). The chunk holds vocabulary columns
// [offset, offset + v) of each row. With z = logits/T: the chunk's m = max z (at least -f32 max,
// so that exp(z - m) never sees inf - inf for masked logits), s = sum exp(z - m) and
// u = sum exp(z - m) (z - m), merged with the previous state acc_in (when has_acc != 0) at the
// larger max (a partial with s = 0 is empty); zt = z of the target when the target lies in the
// chunk, else the previous zt (NaN before any chunk). State: vec4 (m, s, u, zt) per row.
const NEG = -3.4028235e38;
struct Params { n: u32, v: u32, inv_t: f32, offset: u32, has_acc: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read> acc_in: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> acc_out: array<vec4<f32>>;
fn mx(b: u32) -> f32 {
  return max(max(max(logits[b], logits[b + 1u]), max(logits[b + 2u], logits[b + 3u])),
    max(max(logits[b + 4u], logits[b + 5u]), max(logits[b + 6u], logits[b + 7u])));
}
fn ez(i: u32, it: f32, m: f32) -> vec2<f32> {
  let z = logits[i] * it - m;
  let e = exp(z);
  return vec2<f32>(e, select(0.0, e * z, e > 0.0));
}
fn rescale(m: f32, s: f32, u: f32, mm: f32) -> vec2<f32> {
  if (s == 0.0) { return vec2<f32>(0.0, 0.0); }
  let a = exp(m - mm);
  return vec2<f32>(a * s, a * (u + (m - mm) * s));
}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, 64u);
  if (r >= params.n) { return; }
  let v = params.v;
  let v8 = v & ~7u;
  let it = params.inv_t;
  let base = r * v;
  var mraw = NEG;
  for (var j = 0u; j < v8; j += 8u) { mraw = max(mraw, mx(base + j)); }
  for (var j = v8; j < v; j++) { mraw = max(mraw, logits[base + j]); }
  let m = max(mraw * it, NEG);
  var acc = vec2<f32>(0.0, 0.0);
  for (var j = 0u; j < v8; j += 8u) {
    let b = base + j;
    acc += ((ez(b, it, m) + ez(b + 1u, it, m)) + (ez(b + 2u, it, m) + ez(b + 3u, it, m))) +
      ((ez(b + 4u, it, m) + ez(b + 5u, it, m)) + (ez(b + 6u, it, m) + ez(b + 7u, it, m)));
  }
  for (var j = v8; j < v; j++) { acc += ez(base + j, it, m); }
  let t = targets[r] - i32(params.offset);
  var res = vec4<f32>(m, acc.x, acc.y, bitcast<f32>(0x7fc00000u | (v & 0u)));
  if (params.has_acc != 0u) {
    let p = acc_in[r];
    let mm = max(p.x, m);
    let a = rescale(p.x, p.y, p.z, mm);
    let b = rescale(m, acc.x, acc.y, mm);
    res = vec4<f32>(mm, a.x + b.x, a.y + b.y, p.w);
  }
  if (t >= 0 && u32(t) < v) { res.w = logits[base + u32(t)] * it; }
  acc_out[r] = res;
}

//! kernel lsm_chunk_wg
// Same as lsm_chunk_row, one workgroup per row: per-invocation online (m, s, u) over a strided
// slice, a shared-memory tree combine, then the merge with the previous state.
const WG = 64u;
const NEG = -3.4028235e38;
struct Params { n: u32, v: u32, inv_t: f32, offset: u32, has_acc: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read> acc_in: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> acc_out: array<vec4<f32>>;
var<workgroup> pm: array<f32, WG>;
var<workgroup> ps: array<f32, WG>;
var<workgroup> pu: array<f32, WG>;
fn rescale(m: f32, s: f32, u: f32, mm: f32) -> vec2<f32> {
  if (s == 0.0) { return vec2<f32>(0.0, 0.0); }
  let a = exp(m - mm);
  return vec2<f32>(a * s, a * (u + (m - mm) * s));
}
@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = wid.x + wid.y * nwg.x;
  if (r >= params.n) { return; }
  let v = params.v;
  let it = params.inv_t;
  let base = r * v;
  var m = NEG;
  var s = 0.0;
  var u = 0.0;
  for (var j = lid; j < v; j += WG) {
    let z = logits[base + j] * it;
    if (z > m) {
      let q = rescale(m, s, u, z);
      s = q.x + 1.0;
      u = q.y;
      m = z;
    } else {
      let e = exp(z - m);
      s += e;
      if (e > 0.0) { u += e * (z - m); }
    }
  }
  pm[lid] = m;
  ps[lid] = s;
  pu[lid] = u;
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    workgroupBarrier();
    if (lid < k) {
      let mm = max(pm[lid], pm[lid + k]);
      let a = rescale(pm[lid], ps[lid], pu[lid], mm);
      let b = rescale(pm[lid + k], ps[lid + k], pu[lid + k], mm);
      pm[lid] = mm;
      ps[lid] = a.x + b.x;
      pu[lid] = a.y + b.y;
    }
  }
  if (lid == 0u) {
    let t = targets[r] - i32(params.offset);
    var res = vec4<f32>(pm[0], ps[0], pu[0], bitcast<f32>(0x7fc00000u | (v & 0u)));
    if (params.has_acc != 0u) {
      let p = acc_in[r];
      let mm = max(p.x, pm[0]);
      let a = rescale(p.x, p.y, p.z, mm);
      let b = rescale(pm[0], ps[0], pu[0], mm);
      res = vec4<f32>(mm, a.x + b.x, a.y + b.y, p.w);
    }
    if (t >= 0 && u32(t) < v) { res.w = logits[base + u32(t)] * it; }
    acc_out[r] = res;
  }
}

//! kernel lsm_finish
// Results of a streamed log-softmax state (m, s, u, zt) per row (Ops.logSoftmaxFinish):
// lse = m + log s, logp = (zt - m) - log s, entropy = log s - u / s.
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> acc: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> logp: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(4) var<storage, read_write> ent: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, 64u);
  if (r >= params.n) { return; }
  let a = acc[r];
  let ls = log(a.y);
  lse[r] = a.x + ls;
  logp[r] = (a.w - a.x) - ls;
  ent[r] = ls - a.z / a.y;
}

//! kernel sample_cand_wg
// Sampling candidates (Ops.sampleCandidates), one workgroup per row of one storage block of the
// logits (its rows are rows row0.. of temps/out). Pass 1: each invocation keeps the `count`
// largest logits of its strided slice in a private list (sorted, value descending; its ids
// increase, so an equal value ranks after those kept), then `count` rounds of a shared-memory
// argmax (ties: lower id) pop the global best of the heads. Pass 2: with m = the best,
// s1 = sum exp(x - m) and sT = sum exp((x - m) / T), compensated (Kahan per invocation, TwoSum
// in the tree). Out row: (m, s1, sT, min(count, v), values[count], ids[count]) with -inf / -1
// in unused slots.
const WG = 64u;
const MAXC = 64u;
const NONE = 0xffffffffu;
struct Params { n: u32, v: u32, count: u32, row0: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> temps: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
var<workgroup> wv: array<f32, WG>;
var<workgroup> wi: array<u32, WG>;
var<workgroup> h1s: array<f32, WG>;
var<workgroup> l1s: array<f32, WG>;
var<workgroup> h2s: array<f32, WG>;
var<workgroup> l2s: array<f32, WG>;
fn better(av: f32, ai: u32, bv: f32, bi: u32) -> bool {
  if (ai == NONE) { return false; }
  if (bi == NONE) { return true; }
  return av > bv || (av == bv && ai < bi);
}
// TwoSum of (ah, al) + (bh, bl) -> (hi, lo)
fn two_sum(ah: f32, al: f32, bh: f32, bl: f32) -> vec2<f32> {
  let s = ah + bh;
  let bb = s - ah;
  let err = (ah - (s - bb)) + (bh - bb);
  return vec2<f32>(s, (al + bl) + err);
}
@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = wid.x + wid.y * nwg.x;
  if (r >= params.n) { return; }
  let v = params.v;
  let cnt = params.count;
  let base = r * v;
  let ninf = bitcast<f32>(0xff800000u | (v & 0u));
  var vals: array<f32, MAXC>;
  var ids: array<u32, MAXC>;
  var len = 0u;
  for (var j = lid; j < v; j += WG) {
    let x = logits[base + j];
    if (len == cnt && !(x > vals[cnt - 1u])) { continue; }
    var p = len;
    if (len < cnt) { len += 1u; } else { p = cnt - 1u; }
    loop {
      if (p == 0u) { break; }
      if (!(x > vals[p - 1u])) { break; }
      vals[p] = vals[p - 1u];
      ids[p] = ids[p - 1u];
      p -= 1u;
    }
    vals[p] = x;
    ids[p] = j;
  }
  let ro = params.row0 + r;
  let w = 4u + 2u * cnt;
  let ob = ro * w;
  var head = 0u;
  var m = ninf;
  for (var c = 0u; c < cnt; c++) {
    if (head < len) {
      wv[lid] = vals[head];
      wi[lid] = ids[head];
    } else {
      wv[lid] = ninf;
      wi[lid] = NONE;
    }
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
      if (lid < k) {
        if (better(wv[lid + k], wi[lid + k], wv[lid], wi[lid])) {
          wv[lid] = wv[lid + k];
          wi[lid] = wi[lid + k];
        }
      }
      workgroupBarrier();
    }
    let bi = wi[0];
    let bv = wv[0];
    if (c == 0u) { m = bv; }
    if (head < len && ids[head] == bi) { head += 1u; }
    if (lid == 0u) {
      if (bi == NONE) {
        out[ob + 4u + c] = ninf;
        out[ob + 4u + cnt + c] = -1.0;
      } else {
        out[ob + 4u + c] = bv;
        out[ob + 4u + cnt + c] = f32(bi);
      }
    }
    workgroupBarrier();
  }
  let t = temps[ro];
  let it = select(1.0, 1.0 / t, t > 0.0);
  var s1 = 0.0;
  var c1 = 0.0;
  var s2 = 0.0;
  var c2 = 0.0;
  for (var j = lid; j < v; j += WG) {
    let d = logits[base + j] - m;
    let y1 = exp(d) - c1;
    let t1 = s1 + y1;
    c1 = (t1 - s1) - y1;
    s1 = t1;
    let y2 = exp(d * it) - c2;
    let t2 = s2 + y2;
    c2 = (t2 - s2) - y2;
    s2 = t2;
  }
  h1s[lid] = s1;
  l1s[lid] = -c1;
  h2s[lid] = s2;
  l2s[lid] = -c2;
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    workgroupBarrier();
    if (lid < k) {
      let a = two_sum(h1s[lid], l1s[lid], h1s[lid + k], l1s[lid + k]);
      let b = two_sum(h2s[lid], l2s[lid], h2s[lid + k], l2s[lid + k]);
      h1s[lid] = a.x;
      l1s[lid] = a.y;
      h2s[lid] = b.x;
      l2s[lid] = b.y;
    }
  }
  if (lid == 0u) {
    out[ob] = m;
    out[ob + 1u] = h1s[0] + l1s[0];
    out[ob + 2u] = h2s[0] + l2s[0];
    out[ob + 3u] = f32(min(cnt, v));
  }
}

// ---- matmul (src/backend/webgpu/matmul.ts) ------------------------------------------------

//! kernel matmul_pack
// Packs a strided matrix view into an rgba32float texture for the matmul_t* kernels (when the
// operand cannot be copied as is): texel (x, y) holds src[(row0 + y) * sr + (4x + i) * sc],
// i = 0..3, and 0 outside rows x cols.
struct Params { rows: u32, cols: u32, sr: u32, sc: u32, row0: u32, width: u32, height: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var dst: texture_storage_2d<rgba32float, write>;
fn elem(r: u32, c: u32) -> f32 {
  // Clamped index and select instead of a branch: no divergent control flow around the load.
  let v = src[min(r, params.rows - 1u) * params.sr + min(c, params.cols - 1u) * params.sc];
  return select(0.0, v, r < params.rows && c < params.cols);
}
// A workgroup covers 16 columns x 16 rows of the source view, a 64-byte line per row on both
// the read side (either layout) and the texture side: the transposing case stays cache-friendly.
@compute @workgroup_size(4, 16)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  if (gid.x >= params.width || gid.y >= params.height) { return; }
  let r = params.row0 + gid.y;
  let c = gid.x * 4u;
  let v = vec4<f32>(elem(r, c), elem(r, c + 1u), elem(r, c + 2u), elem(r, c + 3u));
  textureStore(dst, vec2<i32>(i32(gid.x), i32(gid.y)), v);
}

//! kernel matmul_small
// Direct matmul for small or unusual shapes: each invocation computes a 4x4 block of C[m, n]
// from op(A)[i, k] = a[i * sam + k * sak] and op(B)[k, j] = b[k * sbk + j * sbn] (any transpose).
struct Params { m: u32, n: u32, k: u32, sam: u32, sak: u32, sbk: u32, sbn: u32, tiles_n: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
fn put(row: u32, col: u32, v: vec4<f32>) {
  if (row >= params.m) { return; }
  let o = row * params.n + col;
  if (col < params.n) { c[o] = v.x; }
  if (col + 1u < params.n) { c[o + 1u] = v.y; }
  if (col + 2u < params.n) { c[o + 2u] = v.z; }
  if (col + 3u < params.n) { c[o + 3u] = v.w; }
}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let id = linear_id(gid, nwg, 64u);
  let r0 = (id / params.tiles_n) * 4u;
  let c0 = (id % params.tiles_n) * 4u;
  // Rows and columns past the edge are clamped (their results are never stored).
  let a0 = min(r0, params.m - 1u) * params.sam;
  let a1 = min(r0 + 1u, params.m - 1u) * params.sam;
  let a2 = min(r0 + 2u, params.m - 1u) * params.sam;
  let a3 = min(r0 + 3u, params.m - 1u) * params.sam;
  let b0 = min(c0, params.n - 1u) * params.sbn;
  let b1 = min(c0 + 1u, params.n - 1u) * params.sbn;
  let b2 = min(c0 + 2u, params.n - 1u) * params.sbn;
  let b3 = min(c0 + 3u, params.n - 1u) * params.sbn;
  var s0 = vec4<f32>();
  var s1 = vec4<f32>();
  var s2 = vec4<f32>();
  var s3 = vec4<f32>();
  for (var k = 0u; k < params.k; k++) {
    let ka = k * params.sak;
    let kb = k * params.sbk;
    let bv = vec4<f32>(b[kb + b0], b[kb + b1], b[kb + b2], b[kb + b3]);
    s0 += a[ka + a0] * bv;
    s1 += a[ka + a1] * bv;
    s2 += a[ka + a2] * bv;
    s3 += a[ka + a3] * bv;
  }
  put(r0, c0, s0);
  put(r0 + 1u, c0, s1);
  put(r0 + 2u, c0, s2);
  put(r0 + 3u, c0, s3);
}

//! kernel matmul_unpad
// dst[r, col] = src[r * ld + col] for a [rows, cols] result computed with a padded row stride.
struct Params { rows: u32, cols: u32, ld: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.rows * params.cols) { return; }
  let r = i / params.cols;
  dst[i] = src[r * params.ld + (i - r * params.cols)];
}

//! kernel matmul_t16x16
// C tile of 16x16 per invocation from operands held in rgba32float textures (copied from
// the tensors, or packed by matmul_pack). Accumulates in registers only (no workgroup
// memory: barriers are very expensive on software adapters such as llvmpipe). The textures are
// read as read-only storage textures: on llvmpipe that load is inlined, where a sampled-texture
// fetch is a call per texel (measured: 1.7x the throughput). Tiles are taken in `tile_order`;
// in that order a 32x16 tile (fewer fetches per multiply-add, more spilled registers)
// measured no faster on any bench shape and was dropped.
// Writes rows < params.m, columns < params.n (a multiple of 4) at c[coff4 + row * ldc4 + col / 4].
struct Params { m: u32, n: u32, k4: u32, ldc4: u32, coff4: u32, tiles_n: u32, tiles_m: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var at: texture_storage_2d<rgba32float, read>;
@group(0) @binding(2) var bt: texture_storage_2d<rgba32float, read>;
@group(0) @binding(3) var<storage, read_write> c: array<vec4<f32>>;
// Operand layouts (pipeline constants): A_KMAJOR: texel (x, y) of at holds op(A)[y, 4x..4x+3];
// otherwise op(A)[4x..4x+3, y] (a transposed A copied as is). B_KMAJOR: texel (x, y) of bt holds
// op(B)[4x..4x+3, y]; otherwise op(B)[y, 4x..4x+3] (a plain B copied as is).
override A_KMAJOR: bool = true;
override B_KMAJOR: bool = true;
fn ta(x: i32, y: i32) -> vec4<f32> { return textureLoad(at, vec2<i32>(x, y)); }
fn tb(x: i32, y: i32) -> vec4<f32> { return textureLoad(bt, vec2<i32>(x, y)); }
// Column kk: op(A)[r..r+3, 4k + kk].
fn rows_a(k: i32, r: i32) -> mat4x4<f32> {
  if (A_KMAJOR) {
    return transpose(mat4x4<f32>(ta(k, r), ta(k, r + 1), ta(k, r + 2), ta(k, r + 3)));
  }
  let x = r / 4;
  return mat4x4<f32>(ta(x, 4 * k), ta(x, 4 * k + 1), ta(x, 4 * k + 2), ta(x, 4 * k + 3));
}
// Column j: op(B)[4k..4k+3, n + j].
fn cols_b(k: i32, n: i32) -> mat4x4<f32> {
  if (B_KMAJOR) {
    return mat4x4<f32>(tb(k, n), tb(k, n + 1), tb(k, n + 2), tb(k, n + 3));
  }
  let x = n / 4;
  return transpose(mat4x4<f32>(tb(x, 4 * k), tb(x, 4 * k + 1), tb(x, 4 * k + 2), tb(x, 4 * k + 3)));
}
fn put(row: u32, col: u32, v: vec4<f32>) {
  if (row < params.m && col < params.n) { c[params.coff4 + row * params.ldc4 + col / 4u] = v; }
}
// Stores a 4x4 block whose column j is C[row..row+3, col + j].
fn put4(row: u32, col: u32, t: mat4x4<f32>) {
  let u = transpose(t);
  put(row, col, u[0]);
  put(row + 1u, col, u[1]);
  put(row + 2u, col, u[2]);
  put(row + 3u, col, u[3]);
}
// Tile (row, column) of invocation `id` in a tiles_m x tiles_n grid of output tiles, for
// workgroups of `wg` invocations. Tiles go in bands of wg/4 tile rows; each band is walked in
// strips of 4 tile columns, row by row inside a strip (narrower bands and strips at the edges,
// so no tile is skipped or repeated). Consecutive invocations, which a software adapter runs
// as the lanes of one SIMD vector, thus take a 4x4 block of tiles, and a workgroup shares its
// strip's columns of B: their operand rows stay in the CPU caches together (llvmpipe at 512
// bits, 1024³ with k-major B: 72-73 GFLOP/s against 39-56 in row-major order, 6 processes).
fn tile_order(id: u32, wg: u32, tiles_m: u32, tiles_n: u32) -> vec2<u32> {
  let band_rows = max(wg / 4u, 1u);
  let band_size = band_rows * tiles_n;
  let band = id / band_size;
  // max(.., 1): invocations past the last tile (the last workgroup's tail) must not divide by 0.
  let rows = max(min(band_rows, tiles_m - min(tiles_m, band * band_rows)), 1u);
  let r = id - band * band_size;
  let strip = r / (rows * 4u);
  let cols = max(min(4u, tiles_n - min(tiles_n, strip * 4u)), 1u);
  let s = r - strip * rows * 4u;
  return vec2<u32>(band * band_rows + s / cols, strip * 4u + s % cols);
}
// Invocations per workgroup: 64, or 16 when there are few tiles (a workgroup runs on one
// thread of a software adapter; 16 fills one 512-bit vector of f32).
override WG: u32 = 64u;
@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let tile = tile_order(linear_id(gid, nwg, WG), WG, params.tiles_m, params.tiles_n);
  let tm = tile.x;
  let tn = tile.y;
  let m0 = i32(tm * 16u);
  let n0 = i32(tn * 16u);
  let k4 = i32(params.k4);
  var c0_0: mat4x4<f32>; var c0_1: mat4x4<f32>; var c0_2: mat4x4<f32>; var c0_3: mat4x4<f32>;
  var c1_0: mat4x4<f32>; var c1_1: mat4x4<f32>; var c1_2: mat4x4<f32>; var c1_3: mat4x4<f32>;
  var c2_0: mat4x4<f32>; var c2_1: mat4x4<f32>; var c2_2: mat4x4<f32>; var c2_3: mat4x4<f32>;
  var c3_0: mat4x4<f32>; var c3_1: mat4x4<f32>; var c3_2: mat4x4<f32>; var c3_3: mat4x4<f32>;
  // One k-texel (4 k) per iteration: unrolling two was slower (more live registers).
  for (var k = 0; k < k4; k++) {
    let a0 = rows_a(k, m0 + 0);
    let a1 = rows_a(k, m0 + 4);
    let a2 = rows_a(k, m0 + 8);
    let a3 = rows_a(k, m0 + 12);
    let b0 = cols_b(k, n0 + 0);
    let b1 = cols_b(k, n0 + 4);
    let b2 = cols_b(k, n0 + 8);
    let b3 = cols_b(k, n0 + 12);
    c0_0 += a0 * b0; c0_1 += a0 * b1; c0_2 += a0 * b2; c0_3 += a0 * b3;
    c1_0 += a1 * b0; c1_1 += a1 * b1; c1_2 += a1 * b2; c1_3 += a1 * b3;
    c2_0 += a2 * b0; c2_1 += a2 * b1; c2_2 += a2 * b2; c2_3 += a2 * b3;
    c3_0 += a3 * b0; c3_1 += a3 * b1; c3_2 += a3 * b2; c3_3 += a3 * b3;
  }
  let r = u32(m0);
  let q = u32(n0);
  put4(r, q, c0_0); put4(r, q + 4u, c0_1);
  put4(r, q + 8u, c0_2); put4(r, q + 12u, c0_3);
  put4(r + 4u, q, c1_0); put4(r + 4u, q + 4u, c1_1);
  put4(r + 4u, q + 8u, c1_2); put4(r + 4u, q + 12u, c1_3);
  put4(r + 8u, q, c2_0); put4(r + 8u, q + 4u, c2_1);
  put4(r + 8u, q + 8u, c2_2); put4(r + 8u, q + 12u, c2_3);
  put4(r + 12u, q, c3_0); put4(r + 12u, q + 4u, c3_1);
  put4(r + 12u, q + 8u, c3_2); put4(r + 12u, q + 12u, c3_3);
}
