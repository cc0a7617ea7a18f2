// Attention kernels (host: attention.ts): causal grouped-query attention forward, its
// split-KV combine, the backward (dq; dk, dv) and the head-dim restride.
// Format of the family files: text before the first marker is a comment (only comments and
// blank lines are allowed there); each kernel starts at a line "//! kernel <name>" and runs to
// the next such line or the end of the file.

//! kernel attn_fwd
// Causal grouped-query attention forward (Ops.attention), online softmax in registers.
// Work item: a tile of TQ (1, 2 or 4) query vectors (row i, head h) of one sequence b and kv
// head g, which share every k/v load. Query vectors of (b, g) are numbered
// e = i * group + (h - g * group); tile t holds e = TQ*t .. TQ*t + TQ-1 (a short last tile
// repeats its last vector, stored once). Lanes of a vec4 (s, m, l, ...) are the tile entries.
// Invocation id = split * (batch * kv_heads * ntile) + (b * kv_heads + g) * ntile + t. With
// nsplit = 1 it writes out and lse; otherwise it covers keys [split * split_len, +split_len)
// and writes unnormalised partials (m, l, acc) for attn_fwd_combine. Visible keys of query i:
// [kv_start[b], min(q_offset + i + 1, kv_len)), and with a sliding window (window > 0) none
// before q_offset + i + 1 - window. Override HD = head dim, a multiple of 4 (the
// host pads other sizes), at most 128. Bindings: q, k, v, kv_start (i32 [batch], read only when
// has_start != 0), out, lse, part_ml (2 per partial), part_acc (HD per partial).
struct Params {
  batch: u32, tq: u32, tk: u32, heads: u32,
  kv_heads: u32, q_offset: u32, kv_len: u32, has_start: u32,
  scale: f32, split_len: u32, nsplit: u32, window: u32,
  softcap: f32, pad1: u32, pad2: u32, pad3: u32,
}
@group(0) @binding(0) var<uniform> params: Params;
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

// Operand loads: texel x (head * HD4 + d) of row y (token row b * tq + i, or b * tk + j). The
// `_tex` variants (attention.ts) bind these operands as rgba32float textures instead.
fn ld_q(y: u32, x: u32) -> vec4<f32> { return q[y * params.heads * HD4 + x]; }
fn ld_k(y: u32, x: u32) -> vec4<f32> { return k[y * params.kv_heads * HD4 + x]; }
fn ld_v(y: u32, x: u32) -> vec4<f32> { return v[y * params.kv_heads * HD4 + x]; }

fn attn_first_key(b: u32) -> u32 {
  if (params.has_start == 0u) { return 0u; }
  return u32(max(kv_start[b], 0));
}

// First visible key of each query row (absolute position q_offset + row): the sequence's first
// key `lo`, or with a sliding window the first key within `window` of the query.
fn attn_window_lo(lo: u32, row: vec4<u32>) -> vec4<u32> {
  if (params.window == 0u) { return vec4<u32>(lo); }
  let w = vec4<u32>(params.window);
  let end = vec4<u32>(params.q_offset + 1u) + row;
  return max(vec4<u32>(lo), select(vec4<u32>(0u), end - w, end > w));
}

// Soft-capped scores cap * tanh(s / cap) (softcap > 0); tanh via exp(-2|z|), never overflowing.
fn attn_cap(s: vec4<f32>) -> vec4<f32> {
  if (params.softcap <= 0.0) { return s; }
  let z = s / params.softcap;
  let e = exp(-2.0 * abs(z));
  return params.softcap * sign(z) * (1.0 - e) / (1.0 + e);
}

// d capped / d raw from the capped scores: 1 - (c / cap)^2 (1 without soft-capping).
fn attn_dcap(c: vec4<f32>) -> vec4<f32> {
  if (params.softcap <= 0.0) { return vec4<f32>(1.0); }
  let t = c / params.softcap;
  return 1.0 - t * t;
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
  let qy = r / heads;
  let qx = (r % heads) * HD4;
  for (var d = 0u; d < HD4; d++) {
    qa[d] = ld_q(qy.x, qx.x + d) * params.scale;
    aa[d] = vec4<f32>(0.0);
    if (TQ > 1u) {
      qb[d] = ld_q(qy.y, qx.y + d) * params.scale;
      ab[d] = vec4<f32>(0.0);
    }
    if (TQ > 2u) {
      qc[d] = ld_q(qy.z, qx.z + d) * params.scale;
      qd[d] = ld_q(qy.w, qx.w + d) * params.scale;
      ac[d] = vec4<f32>(0.0);
      ad[d] = vec4<f32>(0.0);
    }
  }
  var m = vec4<f32>(NEG);
  var l = vec4<f32>(0.0);
  let lov = attn_window_lo(lo, row);
  let j0 = min(min(lov.x, lov.y), min(lov.z, lov.w));
  var ky = b * params.tk + j0;
  let kx = g * HD4;
  let hmax = max(max(hi.x, hi.y), max(hi.z, hi.w));
  for (var j = j0; j < hmax; j++) {
    var s = vec4<f32>(0.0);
    for (var d = 0u; d < HD4; d++) {
      let kk = ld_k(ky, kx + d);
      s.x += dot(qa[d], kk);
      if (TQ > 1u) { s.y += dot(qb[d], kk); }
      if (TQ > 2u) {
        s.z += dot(qc[d], kk);
        s.w += dot(qd[d], kk);
      }
    }
    s = attn_cap(s);
    let vis = (vec4<u32>(j) < hi) & (vec4<u32>(j) >= lov);
    let n = select(m, max(m, s), vis);
    let c = exp(m - n);
    let p = select(vec4<f32>(0.0), exp(s - n), vis);
    l = l * c + p;
    m = n;
    for (var d = 0u; d < HD4; d++) {
      let vv = ld_v(ky, kx + d);
      aa[d] = aa[d] * c.x + p.x * vv;
      if (TQ > 1u) { ab[d] = ab[d] * c.y + p.y * vv; }
      if (TQ > 2u) {
        ac[d] = ac[d] * c.z + p.z * vv;
        ad[d] = ad[d] * c.w + p.w * vv;
      }
    }
    ky += 1u;
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
struct Params {
  batch: u32, tq: u32, tk: u32, heads: u32,
  kv_heads: u32, q_offset: u32, kv_len: u32, has_start: u32,
  scale: f32, split_len: u32, nsplit: u32, window: u32,
  softcap: f32, pad1: u32, pad2: u32, pad3: u32,
}
@group(0) @binding(0) var<uniform> params: Params;
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
struct Params {
  batch: u32, tq: u32, tk: u32, heads: u32,
  kv_heads: u32, q_offset: u32, kv_len: u32, has_start: u32,
  scale: f32, split_len: u32, nsplit: u32, window: u32,
  softcap: f32, pad1: u32, pad2: u32, pad3: u32,
}
@group(0) @binding(0) var<uniform> params: Params;
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

// Operand loads as in attn_fwd.
fn ld_q(y: u32, x: u32) -> vec4<f32> { return q[y * params.heads * HD4 + x]; }
fn ld_dout(y: u32, x: u32) -> vec4<f32> { return dout[y * params.heads * HD4 + x]; }
fn ld_out(y: u32, x: u32) -> vec4<f32> { return out[y * params.heads * HD4 + x]; }
fn ld_k(y: u32, x: u32) -> vec4<f32> { return k[y * params.kv_heads * HD4 + x]; }
fn ld_v(y: u32, x: u32) -> vec4<f32> { return v[y * params.kv_heads * HD4 + x]; }

fn attn_first_key(b: u32) -> u32 {
  if (params.has_start == 0u) { return 0u; }
  return u32(max(kv_start[b], 0));
}

// First visible key of each query row (absolute position q_offset + row): the sequence's first
// key `lo`, or with a sliding window the first key within `window` of the query.
fn attn_window_lo(lo: u32, row: vec4<u32>) -> vec4<u32> {
  if (params.window == 0u) { return vec4<u32>(lo); }
  let w = vec4<u32>(params.window);
  let end = vec4<u32>(params.q_offset + 1u) + row;
  return max(vec4<u32>(lo), select(vec4<u32>(0u), end - w, end > w));
}

// Soft-capped scores cap * tanh(s / cap) (softcap > 0); tanh via exp(-2|z|), never overflowing.
fn attn_cap(s: vec4<f32>) -> vec4<f32> {
  if (params.softcap <= 0.0) { return s; }
  let z = s / params.softcap;
  let e = exp(-2.0 * abs(z));
  return params.softcap * sign(z) * (1.0 - e) / (1.0 + e);
}

// d capped / d raw from the capped scores: 1 - (c / cap)^2 (1 without soft-capping).
fn attn_dcap(c: vec4<f32>) -> vec4<f32> {
  if (params.softcap <= 0.0) { return vec4<f32>(1.0); }
  let t = c / params.softcap;
  return 1.0 - t * t;
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
  let qy = r / heads;
  let qx = (r % heads) * HD4;
  for (var d = 0u; d < HD4; d++) {
    qa[d] = ld_q(qy.x, qx.x + d) * params.scale;
    oa[d] = ld_dout(qy.x, qx.x + d);
    dd.x += dot(oa[d], ld_out(qy.x, qx.x + d));
    ga[d] = vec4<f32>(0.0);
    if (TQ > 1u) {
      qb[d] = ld_q(qy.y, qx.y + d) * params.scale;
      ob[d] = ld_dout(qy.y, qx.y + d);
      dd.y += dot(ob[d], ld_out(qy.y, qx.y + d));
      gb[d] = vec4<f32>(0.0);
    }
    if (TQ > 2u) {
      qc[d] = ld_q(qy.z, qx.z + d) * params.scale;
      qd[d] = ld_q(qy.w, qx.w + d) * params.scale;
      oc[d] = ld_dout(qy.z, qx.z + d);
      od[d] = ld_dout(qy.w, qx.w + d);
      dd.z += dot(oc[d], ld_out(qy.z, qx.z + d));
      dd.w += dot(od[d], ld_out(qy.w, qx.w + d));
      gc[d] = vec4<f32>(0.0);
      gd[d] = vec4<f32>(0.0);
    }
  }
  let rl = vec4<f32>(lse[r.x], lse[r.y], lse[r.z], lse[r.w]);
  let lov = attn_window_lo(lo, row);
  let j0 = min(min(lov.x, lov.y), min(lov.z, lov.w));
  var ky = b * params.tk + j0;
  let kx = g * HD4;
  let hmax = max(max(hi.x, hi.y), max(hi.z, hi.w));
  for (var j = j0; j < hmax; j++) {
    var s = vec4<f32>(0.0);
    var dp = vec4<f32>(0.0);
    for (var d = 0u; d < HD4; d++) {
      let kk = ld_k(ky, kx + d);
      let vv = ld_v(ky, kx + d);
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
    let sc = attn_cap(s);
    let ds = select(
      vec4<f32>(0.0),
      exp(sc - rl) * (dp - dd) * attn_dcap(sc),
      (vec4<u32>(j) < hi) & (vec4<u32>(j) >= lov),
    );
    for (var d = 0u; d < HD4; d++) {
      let kk = ld_k(ky, kx + d);
      ga[d] += ds.x * kk;
      if (TQ > 1u) { gb[d] += ds.y * kk; }
      if (TQ > 2u) {
        gc[d] += ds.z * kk;
        gd[d] += ds.w * kk;
      }
    }
    ky += 1u;
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
struct Params {
  batch: u32, tq: u32, tk: u32, heads: u32,
  kv_heads: u32, q_offset: u32, kv_len: u32, has_start: u32,
  scale: f32, split_len: u32, nsplit: u32, window: u32,
  softcap: f32, pad1: u32, pad2: u32, pad3: u32,
}
@group(0) @binding(0) var<uniform> params: Params;
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

// Operand loads as in attn_fwd.
fn ld_q(y: u32, x: u32) -> vec4<f32> { return q[y * params.heads * HD4 + x]; }
fn ld_dout(y: u32, x: u32) -> vec4<f32> { return dout[y * params.heads * HD4 + x]; }
fn ld_k(y: u32, x: u32) -> vec4<f32> { return k[y * params.kv_heads * HD4 + x]; }
fn ld_v(y: u32, x: u32) -> vec4<f32> { return v[y * params.kv_heads * HD4 + x]; }

fn attn_first_key(b: u32) -> u32 {
  if (params.has_start == 0u) { return 0u; }
  return u32(max(kv_start[b], 0));
}

// First query row that sees key j (tq when none does: masked by kv_len or kv_start).
fn attn_first_row(j: u32, lo: u32) -> u32 {
  if (j >= params.kv_len || j < lo) { return params.tq; }
  return select(0u, j - params.q_offset, j > params.q_offset);
}

// One past the last query row that sees key j: tq, or with a sliding window the rows whose
// absolute position is below j + window.
fn attn_end_row(j: u32) -> u32 {
  if (params.window == 0u) { return params.tq; }
  let e = j + params.window;
  if (e <= params.q_offset) { return 0u; }
  return min(params.tq, e - params.q_offset);
}

// Soft-capped scores cap * tanh(s / cap) (softcap > 0); tanh via exp(-2|z|), never overflowing.
fn attn_cap(s: vec4<f32>) -> vec4<f32> {
  if (params.softcap <= 0.0) { return s; }
  let z = s / params.softcap;
  let e = exp(-2.0 * abs(z));
  return params.softcap * sign(z) * (1.0 - e) / (1.0 + e);
}

// d capped / d raw from the capped scores: 1 - (c / cap)^2 (1 without soft-capping).
fn attn_dcap(c: vec4<f32>) -> vec4<f32> {
  if (params.softcap <= 0.0) { return vec4<f32>(1.0); }
  let t = c / params.softcap;
  return 1.0 - t * t;
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
  let ky = b * params.tk + j;
  let kx = g * HD4;
  for (var d = 0u; d < HD4; d++) {
    ka[d] = ld_k(ky.x, kx + d) * params.scale;
    va[d] = ld_v(ky.x, kx + d);
    gka[d] = vec4<f32>(0.0);
    gva[d] = vec4<f32>(0.0);
    if (TQ > 1u) {
      kb[d] = ld_k(ky.y, kx + d) * params.scale;
      vb[d] = ld_v(ky.y, kx + d);
      gkb[d] = vec4<f32>(0.0);
      gvb[d] = vec4<f32>(0.0);
    }
    if (TQ > 2u) {
      kc[d] = ld_k(ky.z, kx + d) * params.scale;
      kd[d] = ld_k(ky.w, kx + d) * params.scale;
      vc[d] = ld_v(ky.z, kx + d);
      vd[d] = ld_v(ky.w, kx + d);
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
  let i1 = vec4<u32>(attn_end_row(j.x), attn_end_row(j.y), attn_end_row(j.z), attn_end_row(j.w));
  let imax = max(max(i1.x, i1.y), max(i1.z, i1.w));
  for (var i = min(min(i0.x, i0.y), min(i0.z, i0.w)); i < imax; i++) {
    let see = (vec4<u32>(i) >= i0) & (vec4<u32>(i) < i1);
    let qy = b * params.tq + i;
    let rb = qy * heads + g * group;
    for (var hh = 0u; hh < group; hh++) {
      let r = rb + hh;
      let qx = (g * group + hh) * HD4;
      var s = vec4<f32>(0.0);
      var dp = vec4<f32>(0.0);
      for (var d = 0u; d < HD4; d++) {
        let qq = ld_q(qy, qx + d);
        let oo = ld_dout(qy, qx + d);
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
      let sc = attn_cap(s);
      let p = select(vec4<f32>(0.0), exp(sc - lse[r]), see);
      let ds = p * (dp - delta[r]) * attn_dcap(sc);
      for (var d = 0u; d < HD4; d++) {
        let qq = ld_q(qy, qx + d);
        let oo = ld_dout(qy, qx + d);
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


//! kernel attn_pack
// Stages a [rows, heads * hd] f32 operand into an rgba32float texture for the `_tex` attention
// kernels (where a plain copy cannot: rows not a multiple of 256 bytes, or hd not a multiple of
// 4): texel (h * hd4 + d, row) holds elements 4d..4d+3 of head h, zero past hd. One invocation
// per texel. Bindings: src, dst.
struct Params { rows: u32, heads: u32, hd: u32, hd4: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var dst: texture_storage_2d<rgba32float, write>;
fn elem(row: u32, h: u32, c: u32) -> f32 {
  // clamped index and select: no divergent branch around the load
  let v = src[(row * params.heads + h) * params.hd + min(c, params.hd - 1u)];
  return select(0.0, v, c < params.hd);
}
@compute @workgroup_size(16, 4)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  if (gid.x >= params.heads * params.hd4 || gid.y >= params.rows) { return; }
  let h = gid.x / params.hd4;
  let c = (gid.x % params.hd4) * 4u;
  let y = gid.y;
  let v = vec4<f32>(elem(y, h, c), elem(y, h, c + 1u), elem(y, h, c + 2u), elem(y, h, c + 3u));
  textureStore(dst, vec2<u32>(gid.x, y), v);
}

//! kernel attn_mm
// The product path of attention (attention.ts `products`): one 16x16 tile of C per invocation
// for each of nz independent products z = (sequence b, head hz), operands in rgba32float
// textures at texel offsets per head and sequence, registers only (as matmul_t16x16). Operand
// layouts as in matmul_t16x16 (A_KMAJOR, B_KMAJOR). Over the group loop hh < ng, A's head is
// (hz * a_hmul + hh) / a_hdiv and B's (hz * b_hmul + hh) / b_hdiv; A's texels start at (a_hx * head,
// a_by * b), B's at (b_hx * head, b_by * b). C (vec4s): c[b * c_b4 + hz * c_h4 + row * ldc4 +
// col / 4] for row < m, col < n, times alpha; k rows of an operand that is not k-major count
// only below k_valid. Causal skipping (mode): 0 = scores (A·Bᵀ of query
// rows and key rows; tiles whose keys no row of the tile sees are not computed, nor read later),
// 1 = P·V style (the k loop stops at the tile's last visible key), 2 = Pᵀ·dO style (the k loop
// starts at the first query row that sees the tile's first key).
struct Params {
  m: u32, n: u32, k4: u32, tiles_m: u32,
  tiles_n: u32, nz: u32, zh: u32, ng: u32,
  a_hx: u32, a_by: u32, a_hmul: u32, b_hx: u32,
  b_by: u32, b_hmul: u32, b_hdiv: u32, c_b4: u32,
  c_h4: u32, ldc4: u32, alpha: f32, mode: u32,
  q_offset: u32, kv_len: u32, a_hdiv: u32, k_valid: u32,
}
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var at: texture_storage_2d<rgba32float, read>;
@group(0) @binding(2) var bt: texture_storage_2d<rgba32float, read>;
@group(0) @binding(3) var<storage, read_write> c: array<vec4<f32>>;
override A_KMAJOR: bool = true;
override B_KMAJOR: bool = true;
override WG: u32 = 64u;
fn ta(x: i32, y: i32) -> vec4<f32> { return textureLoad(at, vec2<i32>(x, y)); }
fn tb(x: i32, y: i32) -> vec4<f32> { return textureLoad(bt, vec2<i32>(x, y)); }
// Texel t of the four k rows 4k..4k+3 of an operand that is not k-major, zero from k_valid on:
// those rows belong to the next sequence, or lie past the staged rows (stale texture contents,
// which must not reach a product even as 0 * inf).
fn kmask(k: i32, t: i32, v: vec4<f32>) -> vec4<f32> {
  return select(vec4<f32>(0.0), v, u32(4 * k + t) < params.k_valid);
}
// Column kk: op(A)[r..r+3, 4k + kk] (texel offsets ax, ay).
fn rows_a(ax: i32, ay: i32, k: i32, r: i32) -> mat4x4<f32> {
  if (A_KMAJOR) {
    let x = ax + k;
    let y = ay + r;
    return transpose(mat4x4<f32>(ta(x, y), ta(x, y + 1), ta(x, y + 2), ta(x, y + 3)));
  }
  let x = ax + r / 4;
  let y = ay + 4 * k;
  return mat4x4<f32>(
    kmask(k, 0, ta(x, y)),
    kmask(k, 1, ta(x, y + 1)),
    kmask(k, 2, ta(x, y + 2)),
    kmask(k, 3, ta(x, y + 3)),
  );
}
// Column j: op(B)[4k..4k+3, n + j].
fn cols_b(bx: i32, by: i32, k: i32, n: i32) -> mat4x4<f32> {
  if (B_KMAJOR) {
    let x = bx + k;
    let y = by + n;
    return mat4x4<f32>(tb(x, y), tb(x, y + 1), tb(x, y + 2), tb(x, y + 3));
  }
  let x = bx + n / 4;
  let y = by + 4 * k;
  return transpose(mat4x4<f32>(
    kmask(k, 0, tb(x, y)),
    kmask(k, 1, tb(x, y + 1)),
    kmask(k, 2, tb(x, y + 2)),
    kmask(k, 3, tb(x, y + 3)),
  ));
}
// Stores C[row, col..col+3] of product (b, hz) (attention.ts derives `attn_mm_tex`, whose c is
// a texture: texel (hz * c_h4 + col / 4, b * c_b4 + row)).
fn put(b: u32, hz: u32, row: u32, col: u32, v: vec4<f32>) {
  if (row < params.m && col < params.n) {
    c[b * params.c_b4 + hz * params.c_h4 + row * params.ldc4 + col / 4u] = params.alpha * v;
  }
}
fn put4(b: u32, hz: u32, row: u32, col: u32, t: mat4x4<f32>) {
  let u = transpose(t);
  put(b, hz, row, col, u[0]);
  put(b, hz, row + 1u, col, u[1]);
  put(b, hz, row + 2u, col, u[2]);
  put(b, hz, row + 3u, col, u[3]);
}
// As matmul_t16x16's tile_order: consecutive invocations take a 4x4 block of tiles.
fn tile_order(id: u32, wg: u32, tiles_m: u32, tiles_n: u32) -> vec2<u32> {
  let band_rows = max(wg / 4u, 1u);
  let band_size = band_rows * tiles_n;
  let band = id / band_size;
  let rows = max(min(band_rows, tiles_m - min(tiles_m, band * band_rows)), 1u);
  let r = id - band * band_size;
  let strip = r / (rows * 4u);
  let cols = max(min(4u, tiles_n - min(tiles_n, strip * 4u)), 1u);
  let s = r - strip * rows * 4u;
  return vec2<u32>(band * band_rows + s / cols, strip * 4u + s % cols);
}
@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let id = linear_id(gid, nwg, WG);
  let per = params.tiles_m * params.tiles_n;
  if (id >= per * params.nz) { return; }
  let z = id / per;
  let tile = tile_order(id - z * per, WG, params.tiles_m, params.tiles_n);
  let b = z / params.zh;
  let hz = z % params.zh;
  let m0 = tile.x * 16u;
  let n0 = tile.y * 16u;
  // causal limits (the key tile's keys, or the row tile's rows)
  let seen = min(params.kv_len, params.q_offset + m0 + 16u);
  if (params.mode == 0u && n0 >= seen) { return; }
  var k_lo = 0u;
  var k_hi = params.k4;
  if (params.mode == 1u) { k_hi = min(k_hi, (seen + 3u) / 4u); }
  if (params.mode == 2u && m0 > params.q_offset) { k_lo = (m0 - params.q_offset) / 4u; }
  var c0_0: mat4x4<f32>; var c0_1: mat4x4<f32>; var c0_2: mat4x4<f32>; var c0_3: mat4x4<f32>;
  var c1_0: mat4x4<f32>; var c1_1: mat4x4<f32>; var c1_2: mat4x4<f32>; var c1_3: mat4x4<f32>;
  var c2_0: mat4x4<f32>; var c2_1: mat4x4<f32>; var c2_2: mat4x4<f32>; var c2_3: mat4x4<f32>;
  var c3_0: mat4x4<f32>; var c3_1: mat4x4<f32>; var c3_2: mat4x4<f32>; var c3_3: mat4x4<f32>;
  let mi = i32(m0);
  let ni = i32(n0);
  for (var hh = 0u; hh < params.ng; hh++) {
    let ha = (hz * params.a_hmul + hh) / params.a_hdiv;
    let hb = (hz * params.b_hmul + hh) / params.b_hdiv;
    let ax = i32(params.a_hx * ha);
    let ay = i32(params.a_by * b);
    let bx = i32(params.b_hx * hb);
    let by = i32(params.b_by * b);
    for (var k = i32(k_lo); k < i32(k_hi); k++) {
      let a0 = rows_a(ax, ay, k, mi + 0);
      let a1 = rows_a(ax, ay, k, mi + 4);
      let a2 = rows_a(ax, ay, k, mi + 8);
      let a3 = rows_a(ax, ay, k, mi + 12);
      let b0 = cols_b(bx, by, k, ni + 0);
      let b1 = cols_b(bx, by, k, ni + 4);
      let b2 = cols_b(bx, by, k, ni + 8);
      let b3 = cols_b(bx, by, k, ni + 12);
      c0_0 += a0 * b0; c0_1 += a0 * b1; c0_2 += a0 * b2; c0_3 += a0 * b3;
      c1_0 += a1 * b0; c1_1 += a1 * b1; c1_2 += a1 * b2; c1_3 += a1 * b3;
      c2_0 += a2 * b0; c2_1 += a2 * b1; c2_2 += a2 * b2; c2_3 += a2 * b3;
      c3_0 += a3 * b0; c3_1 += a3 * b1; c3_2 += a3 * b2; c3_3 += a3 * b3;
    }
  }
  put4(b, hz, m0, n0, c0_0); put4(b, hz, m0, n0 + 4u, c0_1);
  put4(b, hz, m0, n0 + 8u, c0_2); put4(b, hz, m0, n0 + 12u, c0_3);
  put4(b, hz, m0 + 4u, n0, c1_0); put4(b, hz, m0 + 4u, n0 + 4u, c1_1);
  put4(b, hz, m0 + 4u, n0 + 8u, c1_2); put4(b, hz, m0 + 4u, n0 + 12u, c1_3);
  put4(b, hz, m0 + 8u, n0, c2_0); put4(b, hz, m0 + 8u, n0 + 4u, c2_1);
  put4(b, hz, m0 + 8u, n0 + 8u, c2_2); put4(b, hz, m0 + 8u, n0 + 12u, c2_3);
  put4(b, hz, m0 + 12u, n0, c3_0); put4(b, hz, m0 + 12u, n0 + 4u, c3_1);
  put4(b, hz, m0 + 12u, n0 + 8u, c3_2); put4(b, hz, m0 + 12u, n0 + 12u, c3_3);
}

//! kernel attn_softmax
// Product path, forward: the masked softmax of one row of raw scores S = q·k (attn_mm_tex mode
// 0; texel (h * ld4 + j / 4, b * tq + i), as P). Scales, soft-caps and masks as attn_fwd,
// writes lse and the probabilities P (0 where masked, the whole row of ld4 texels) to the same
// texels of texture p. One invocation per row. Bindings: s, kv_start, lse, p.
struct Params {
  batch: u32, tq: u32, tk: u32, heads: u32,
  kv_heads: u32, q_offset: u32, kv_len: u32, has_start: u32,
  scale: f32, ld4: u32, hd4: u32, window: u32,
  softcap: f32, pad1: u32, pad2: u32, pad3: u32,
}
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var s: texture_storage_2d<rgba32float, read>;
@group(0) @binding(2) var<storage, read> kv_start: array<i32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(4) var p: texture_storage_2d<rgba32float, write>;
const NEG: f32 = -3.0e38;

// Soft-capped scores cap * tanh(s / cap) (softcap > 0); tanh via exp(-2|z|), never overflowing.
fn attn_cap(x: vec4<f32>) -> vec4<f32> {
  if (params.softcap <= 0.0) { return x; }
  let z = x / params.softcap;
  let e = exp(-2.0 * abs(z));
  return params.softcap * sign(z) * (1.0 - e) / (1.0 + e);
}

// Visible keys [lo, hi) of query row i of sequence b (as attn_fwd).
fn attn_range(b: u32, i: u32) -> vec2<u32> {
  var lo = 0u;
  if (params.has_start != 0u) { lo = u32(max(kv_start[b], 0)); }
  let end = params.q_offset + i + 1u;
  if (params.window != 0u && end > params.window) { lo = max(lo, end - params.window); }
  return vec2<u32>(lo, min(end, params.kv_len));
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let id = linear_id(gid, nwg, 64u);
  if (id >= params.batch * params.heads * params.tq) { return; }
  let i = id % params.tq;
  let bh = id / params.tq;
  let h = bh % params.heads;
  let b = bh / params.heads;
  let r = attn_range(b, i);
  let j0 = r.x / 4u;
  let j1 = select(j0, (r.y + 3u) / 4u, r.y > r.x);
  var m = NEG;
  var l = 0.0;
  for (var j4 = j0; j4 < j1; j4++) {
    let j = vec4<u32>(4u * j4) + vec4<u32>(0u, 1u, 2u, 3u);
    let vis = (j >= vec4<u32>(r.x)) & (j < vec4<u32>(r.y));
    let x = select(vec4<f32>(NEG), attn_cap(textureLoad(s, vec2<u32>(h * params.ld4 + j4, b * params.tq + i)) * params.scale), vis);
    let n = max(m, max(max(x.x, x.y), max(x.z, x.w)));
    let e = select(vec4<f32>(0.0), exp(x - n), vis);
    l = l * exp(m - n) + e.x + e.y + e.z + e.w;
    m = n;
  }
  let ls = select(0.0, m + log(l), l > 0.0);
  lse[(b * params.tq + i) * params.heads + h] = ls;
  let y = b * params.tq + i;
  for (var j4 = 0u; j4 < params.ld4; j4++) {
    var pv = vec4<f32>(0.0);
    if (j4 >= j0 && j4 < j1) {
      let j = vec4<u32>(4u * j4) + vec4<u32>(0u, 1u, 2u, 3u);
      let vis = (j >= vec4<u32>(r.x)) & (j < vec4<u32>(r.y));
      let x = attn_cap(textureLoad(s, vec2<u32>(h * params.ld4 + j4, b * params.tq + i)) * params.scale);
      pv = select(vec4<f32>(0.0), exp(x - ls), vis);
    }
    textureStore(p, vec2<u32>(h * params.ld4 + j4, y), pv);
  }
}

//! kernel attn_softmax_bwd
// Product path, backward: from one row of raw scores S and of dP = dOut·v (attn_mm_tex, texture
// layout as attn_softmax's P) and lse, writes P = exp(S' - lse) and dS' = P (dP - D) dcap, S'
// the scaled, soft-capped scores, both 0 where masked, to textures laid out as S. D = dOut·out
// equals sum_j P dP (out = sum_j P v), which this kernel sums in a first pass: it then needs no
// out or dOut texture (a stage binds at most 4 storage textures by default). One invocation per
// row. Bindings: s, dp, lse, kv_start, p, ds.
struct Params {
  batch: u32, tq: u32, tk: u32, heads: u32,
  kv_heads: u32, q_offset: u32, kv_len: u32, has_start: u32,
  scale: f32, ld4: u32, hd4: u32, window: u32,
  softcap: f32, pad1: u32, pad2: u32, pad3: u32,
}
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var s: texture_storage_2d<rgba32float, read>;
@group(0) @binding(2) var dp: texture_storage_2d<rgba32float, read>;
@group(0) @binding(3) var<storage, read> lse: array<f32>;
@group(0) @binding(4) var<storage, read> kv_start: array<i32>;
@group(0) @binding(5) var p: texture_storage_2d<rgba32float, write>;
@group(0) @binding(6) var ds: texture_storage_2d<rgba32float, write>;

fn attn_cap(x: vec4<f32>) -> vec4<f32> {
  if (params.softcap <= 0.0) { return x; }
  let z = x / params.softcap;
  let e = exp(-2.0 * abs(z));
  return params.softcap * sign(z) * (1.0 - e) / (1.0 + e);
}

// d capped / d raw from the capped scores: 1 - (c / cap)^2 (1 without soft-capping).
fn attn_dcap(x: vec4<f32>) -> vec4<f32> {
  if (params.softcap <= 0.0) { return vec4<f32>(1.0); }
  let t = x / params.softcap;
  return 1.0 - t * t;
}

fn attn_range(b: u32, i: u32) -> vec2<u32> {
  var lo = 0u;
  if (params.has_start != 0u) { lo = u32(max(kv_start[b], 0)); }
  let end = params.q_offset + i + 1u;
  if (params.window != 0u && end > params.window) { lo = max(lo, end - params.window); }
  return vec2<u32>(lo, min(end, params.kv_len));
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let id = linear_id(gid, nwg, 64u);
  if (id >= params.batch * params.heads * params.tq) { return; }
  let i = id % params.tq;
  let bh = id / params.tq;
  let h = bh % params.heads;
  let b = bh / params.heads;
  let y = b * params.tq + i;
  let ls = lse[y * params.heads + h];
  let r = attn_range(b, i);
  let j0 = r.x / 4u;
  let j1 = select(j0, (r.y + 3u) / 4u, r.y > r.x);
  var dd = 0.0;
  for (var j4 = j0; j4 < j1; j4++) {
    let j = vec4<u32>(4u * j4) + vec4<u32>(0u, 1u, 2u, 3u);
    let vis = (j >= vec4<u32>(r.x)) & (j < vec4<u32>(r.y));
    let x = attn_cap(textureLoad(s, vec2<u32>(h * params.ld4 + j4, y)) * params.scale);
    let pv = select(vec4<f32>(0.0), exp(x - ls), vis);
    dd += dot(pv, select(vec4<f32>(0.0), textureLoad(dp, vec2<u32>(h * params.ld4 + j4, y)), vis));
  }
  for (var j4 = 0u; j4 < params.ld4; j4++) {
    var pv = vec4<f32>(0.0);
    var dv = vec4<f32>(0.0);
    if (j4 >= j0 && j4 < j1) {
      let j = vec4<u32>(4u * j4) + vec4<u32>(0u, 1u, 2u, 3u);
      let vis = (j >= vec4<u32>(r.x)) & (j < vec4<u32>(r.y));
      let x = attn_cap(textureLoad(s, vec2<u32>(h * params.ld4 + j4, y)) * params.scale);
      pv = select(vec4<f32>(0.0), exp(x - ls), vis);
      let dpv = textureLoad(dp, vec2<u32>(h * params.ld4 + j4, y));
      dv = select(vec4<f32>(0.0), pv * (dpv - dd) * attn_dcap(x), vis);
    }
    textureStore(p, vec2<u32>(h * params.ld4 + j4, y), pv);
    textureStore(ds, vec2<u32>(h * params.ld4 + j4, y), dv);
  }
}
