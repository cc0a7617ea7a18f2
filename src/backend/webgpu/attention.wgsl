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
  let lov = attn_window_lo(lo, row);
  let j0 = min(min(lov.x, lov.y), min(lov.z, lov.w));
  var ko = (b * params.tk + j0) * kstride + g * HD4;
  let hmax = max(max(hi.x, hi.y), max(hi.z, hi.w));
  for (var j = j0; j < hmax; j++) {
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
    s = attn_cap(s);
    let vis = (vec4<u32>(j) < hi) & (vec4<u32>(j) >= lov);
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
  let lov = attn_window_lo(lo, row);
  let j0 = min(min(lov.x, lov.y), min(lov.z, lov.w));
  var ko = (b * params.tk + j0) * kstride + g * HD4;
  let hmax = max(max(hi.x, hi.y), max(hi.z, hi.w));
  for (var j = j0; j < hmax; j++) {
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
    let sc = attn_cap(s);
    let ds = select(
      vec4<f32>(0.0),
      exp(sc - rl) * (dp - dd) * attn_dcap(sc),
      (vec4<u32>(j) < hi) & (vec4<u32>(j) >= lov),
    );
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
  let i1 = vec4<u32>(attn_end_row(j.x), attn_end_row(j.y), attn_end_row(j.z), attn_end_row(j.w));
  let imax = max(max(i1.x, i1.y), max(i1.z, i1.w));
  for (var i = min(min(i0.x, i0.y), min(i0.z, i0.w)); i < imax; i++) {
    let see = (vec4<u32>(i) >= i0) & (vec4<u32>(i) < i1);
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
      let sc = attn_cap(s);
      let p = select(vec4<f32>(0.0), exp(sc - lse[r]), see);
      let ds = p * (dp - delta[r]) * attn_dcap(sc);
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

