// Layer kernels (host: layers.ts): RMSNorm, RoPE, embedding, log-probs, entropy, the streamed
// log-softmax over vocabulary chunks and the device sampling candidates.
// Format of the family files: text before the first marker is a comment (only comments and
// blank lines are allowed there); each kernel starts at a line "//! kernel <name>" and runs to
// the next such line or the end of the file.

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
override ROWS: u32 = 64u;
@compute @workgroup_size(ROWS)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, ROWS);
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

//! kernel rmsnorm_fwd_row4
// rmsnorm_fwd_row for rows of a multiple of 4 elements, read and written as vec4s: a software
// adapter pays a storage access per lane whatever its width, so this does a quarter of them.
struct Params { rows: u32, h: u32, eps: f32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;
override ROWS: u32 = 64u;
@compute @workgroup_size(ROWS)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, ROWS);
  if (r >= params.rows) { return; }
  let h4 = params.h / 4u;
  let base = r * h4;
  var ss = vec4<f32>(0.0);
  for (var j = 0u; j < h4; j++) {
    let v = x[base + j];
    ss += v * v;
  }
  let s = 1.0 / sqrt(((ss.x + ss.y) + (ss.z + ss.w)) / f32(params.h) + params.eps);
  rstd[r] = s;
  for (var j = 0u; j < h4; j++) { y[base + j] = x[base + j] * s * w[j]; }
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
override ROWS: u32 = 64u;
@compute @workgroup_size(ROWS)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, ROWS);
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

//! kernel rmsnorm_bwd_dx_row4
// rmsnorm_bwd_dx_row for rows of a multiple of 4 elements, as vec4s (see rmsnorm_fwd_row4).
struct Params { rows: u32, h: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> dy: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> rstd: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<vec4<f32>>;
override ROWS: u32 = 64u;
@compute @workgroup_size(ROWS)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, ROWS);
  if (r >= params.rows) { return; }
  let h4 = params.h / 4u;
  let base = r * h4;
  var d = vec4<f32>(0.0);
  for (var j = 0u; j < h4; j++) { d += dy[base + j] * w[j] * x[base + j]; }
  let s = rstd[r];
  let c = s * s * s * ((d.x + d.y) + (d.z + d.w)) / f32(params.h);
  for (var j = 0u; j < h4; j++) { dx[base + j] = s * w[j] * dy[base + j] - c * x[base + j]; }
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
// V is the element type: the host derives a vec4 form (V = vec4<f32>, four pairs per invocation,
// n and half counted in vec4s) for half a multiple of 4, a quarter of the storage accesses.
alias V = f32;
struct Params { n: u32, half: u32, heads: u32, sign: f32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<V>;
@group(0) @binding(2) var<storage, read> pos: array<i32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<V>;
@group(0) @binding(4) var<storage, read_write> out: array<V>;
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

//! kernel embed_gather16
// embed_gather_part for a 16-bit table (two per u32 word, see widen16): from one storage block
// holding table rows [row0, row0 + rows), out[r, c] = block[ids[r] - row0, c] widened, for the
// ids inside the block; other rows of out are left as they are (the host zero-fills out first).
struct Params { total: u32, h: u32, row0: u32, rows: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> block: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<i32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
override BF16: bool = true;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let idx = linear_id(gid, nwg, 256u);
  if (idx >= params.total) { return; }
  let r = idx / params.h;
  let c = idx - r * params.h;
  let id = ids[r];
  if (id >= 0 && u32(id) >= params.row0 && u32(id) - params.row0 < params.rows) {
    let e = (u32(id) - params.row0) * params.h + c;
    out[idx] = widen16(block[e >> 1u], e, BF16);
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
override ROWS: u32 = 64u;
@compute @workgroup_size(ROWS)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, ROWS);
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

//! kernel logprob_bwd4
// logprob_bwd for rows of a multiple of 4 columns, 4 consecutive elements of a row per
// invocation as vec4s (a quarter of the storage accesses, each per lane on a software adapter).
struct Params { total: u32, v: u32, inv_t: f32, row0: u32, offset: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> dlogp: array<f32>;
@group(0) @binding(2) var<storage, read> logits: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> targets: array<i32>;
@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i4 = linear_id(gid, nwg, 256u);
  if (4u * i4 >= params.total) { return; }
  let v4 = params.v / 4u;
  let r = i4 / v4;
  let j = 4u * (i4 - r * v4);
  let ro = params.row0 + r;
  let p = exp(logits[i4] * params.inv_t - vec4<f32>(lse[ro]));
  let t = targets[ro] - i32(j + params.offset);
  let onehot = select(vec4<f32>(0.0), vec4<f32>(1.0), vec4<i32>(0, 1, 2, 3) == vec4<i32>(t));
  out[i4] = (onehot - p) * (dlogp[ro] * params.inv_t);
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
override ROWS: u32 = 64u;
@compute @workgroup_size(ROWS)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, ROWS);
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
var<workgroup> part: array<vec3<f32>, WG>;
@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = wid.x + wid.y * nwg.x;
  if (r >= params.n) { return; }
  let v = params.v;
  let it = params.inv_t;
  let base = r * v;
  var st = vec3<f32>(NEG, 0.0, 0.0);
  for (var j = lid; j < v; j += WG) { st = softmax_push(st, logits[base + j] * it); }
  part[lid] = st;
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    workgroupBarrier();
    if (lid < k) { part[lid] = softmax_merge(part[lid], part[lid + k]); }
  }
  if (lid == 0u) { out[params.row0 + r] = log(part[0].y) - part[0].z / part[0].y; }
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
override ROWS: u32 = 64u;
@compute @workgroup_size(ROWS)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, ROWS);
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
    res = vec4<f32>(softmax_merge(p.xyz, vec3<f32>(m, acc.x, acc.y)), p.w);
  }
  if (t >= 0 && u32(t) < v) { res.w = logits[base + u32(t)] * it; }
  acc_out[r] = res;
}

//! kernel lsm_chunk_row4
// lsm_chunk_row for chunks of a multiple of 4 columns, read as vec4s (a software adapter pays a
// storage access per lane whatever its width); 8 columns per loop iteration, as there.
const NEG = -3.4028235e38;
struct Params { n: u32, v: u32, inv_t: f32, offset: u32, has_acc: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read> acc_in: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> acc_out: array<vec4<f32>>;
// (sum exp(z - m), sum exp(z - m) (z - m)) of one vec4 of logits
fn ez4(x: vec4<f32>, it: f32, m: f32) -> vec2<f32> {
  let z = x * it - vec4<f32>(m);
  let e = exp(z);
  let u = select(vec4<f32>(0.0), e * z, e > vec4<f32>(0.0));
  return vec2<f32>((e.x + e.y) + (e.z + e.w), (u.x + u.y) + (u.z + u.w));
}
override ROWS: u32 = 64u;
@compute @workgroup_size(ROWS)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, ROWS);
  if (r >= params.n) { return; }
  let v = params.v;
  let v4 = v / 4u;
  let v8 = v4 & ~1u;
  let it = params.inv_t;
  let base = r * v4;
  var mv = vec4<f32>(NEG);
  for (var j = 0u; j < v8; j += 2u) { mv = max(mv, max(logits[base + j], logits[base + j + 1u])); }
  if (v8 < v4) { mv = max(mv, logits[base + v8]); }
  let m = max(max(max(mv.x, mv.y), max(mv.z, mv.w)) * it, NEG);
  var acc = vec2<f32>(0.0, 0.0);
  for (var j = 0u; j < v8; j += 2u) {
    acc += ez4(logits[base + j], it, m) + ez4(logits[base + j + 1u], it, m);
  }
  if (v8 < v4) { acc += ez4(logits[base + v8], it, m); }
  let t = targets[r] - i32(params.offset);
  var res = vec4<f32>(m, acc.x, acc.y, bitcast<f32>(0x7fc00000u | (v & 0u)));
  if (params.has_acc != 0u) {
    let p = acc_in[r];
    res = vec4<f32>(softmax_merge(p.xyz, vec3<f32>(m, acc.x, acc.y)), p.w);
  }
  if (t >= 0 && u32(t) < v) { res.w = logits[base + u32(t) / 4u][u32(t) % 4u] * it; }
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
var<workgroup> part: array<vec3<f32>, WG>;
@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let r = wid.x + wid.y * nwg.x;
  if (r >= params.n) { return; }
  let v = params.v;
  let it = params.inv_t;
  let base = r * v;
  var st = vec3<f32>(NEG, 0.0, 0.0);
  for (var j = lid; j < v; j += WG) { st = softmax_push(st, logits[base + j] * it); }
  part[lid] = st;
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    workgroupBarrier();
    if (lid < k) { part[lid] = softmax_merge(part[lid], part[lid + k]); }
  }
  if (lid == 0u) {
    let t = targets[r] - i32(params.offset);
    var res = vec4<f32>(part[0], bitcast<f32>(0x7fc00000u | (v & 0u)));
    if (params.has_acc != 0u) {
      let p = acc_in[r];
      res = vec4<f32>(softmax_merge(p.xyz, part[0]), p.w);
    }
    if (t >= 0 && u32(t) < v) { res.w = logits[base + u32(t)] * it; }
    acc_out[r] = res;
  }
}

//! kernel lsm_merge_tiles
// One vocabulary chunk of a streamed log-softmax from its product's per-tile partials
// (Ops.projectLogSoftmaxChunk: the subgroup matmul's lsm form, matmul_subgroup.ts), one
// invocation per row: the row's `tiles` states vec4 (m, s, u, zt) merged in column order at the
// larger max, zt taken from the tile holding the target (the others carry NaN bits), then
// merged with the previous state acc_in (when has_acc != 0) as lsm_chunk_row merges its own.
struct Params { n: u32, tiles: u32, has_acc: u32, pad: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> part: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> acc_in: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> acc_out: array<vec4<f32>>;
const NAN_BITS = 0x7fc00000u;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, 64u);
  if (r >= params.n) { return; }
  let p0 = part[r * params.tiles];
  var st = p0.xyz;
  var zt = p0.w;
  for (var t = 1u; t < params.tiles; t++) {
    let p = part[r * params.tiles + t];
    st = softmax_merge(st, p.xyz);
    if (bitcast<u32>(p.w) != NAN_BITS) { zt = p.w; }
  }
  var res = vec4<f32>(st, zt);
  if (params.has_acc != 0u) {
    let a = acc_in[r];
    res = vec4<f32>(softmax_merge(a.xyz, st), select(a.w, zt, bitcast<u32>(zt) != NAN_BITS));
  }
  acc_out[r] = res;
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

//! kernel sample_greedy_row4
// sample_cand_wg's row for one candidate (greedy decoding), one invocation per row of a multiple
// of 4 logits and no barriers: on llvmpipe a workgroup per row with shared-memory trees took
// ~21 ms for 64 rows x 49,152 (b64 decoding), a lane per row 3.5 ms. The max is the reference's
// (Ops.sampleCandidates on the CPU): the first logit, then any strictly greater one, so the
// lowest id among equals and no NaN past the first; s1 and sT Kahan-compensated element by
// element (see the sums' comment), sT = s1 when
// 1/T is 1. Out row (m, s1, sT, 1, m, id) at row row0 + r, as sample_cand_wg with count 1.
struct Params { n: u32, v: u32, count: u32, row0: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> temps: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
override ROWS: u32 = 16u;
@compute @workgroup_size(ROWS)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let r = linear_id(gid, nwg, ROWS);
  if (r >= params.n) { return; }
  let q = params.v / 4u;
  let base = r * q;
  var m = logits[base].x;
  var mi = 0u;
  for (var g = 0u; g < q; g++) {
    let x = logits[base + g];
    let j = 4u * g;
    var b = x.x > m;
    m = select(m, x.x, b);
    mi = select(mi, j, b);
    b = x.y > m;
    m = select(m, x.y, b);
    mi = select(mi, j + 1u, b);
    b = x.z > m;
    m = select(m, x.z, b);
    mi = select(mi, j + 2u, b);
    b = x.w > m;
    m = select(m, x.w, b);
    mi = select(mi, j + 3u, b);
  }
  let ro = params.row0 + r;
  let t = temps[ro];
  let it = select(1.0, 1.0 / t, t > 0.0);
  let tempered = it != 1.0;
  // Kahan's (u - s) - y is 0 to the shader compiler's algebra, which folds it away (measured:
  // as inaccurate as a plain sum); u passes through a bit flip by a zero it cannot see (count is
  // 1 here), and the compensation survives (1e-8 of the f64 sum of 3,248 logits against 8e-7).
  let zero = params.count - 1u;
  var s1 = 0.0;
  var c1 = 0.0;
  var st = 0.0;
  var ct = 0.0;
  for (var g = 0u; g < q; g++) {
    let d = logits[base + g] - vec4<f32>(m);
    let e = exp(d);
    let f = select(e, exp(d * it), tempered);
    for (var k = 0u; k < 4u; k++) {
      let y = e[k] - c1;
      let u = s1 + y;
      c1 = (bitcast<f32>(bitcast<u32>(u) ^ zero) - s1) - y;
      s1 = u;
      if (tempered) {
        let z = f[k] - ct;
        let w = st + z;
        ct = (bitcast<f32>(bitcast<u32>(w) ^ zero) - st) - z;
        st = w;
      }
    }
  }
  let o = ro * 6u;
  // the candidate's value read at its id: the compiler turns the compare-and-select chain
  // above into a max, whose result for +0 against -0 is either (llvmpipe on OpenGL ES gave -0 for a
  // row whose first logit, the one chosen, is +0); the sums do not see a zero's sign
  let mv = logits[base + mi / 4u][mi % 4u];
  out[o] = mv;
  // the compensation folded back in, as sample_cand_wg's h + l
  out[o + 1u] = s1 - c1;
  out[o + 2u] = select(s1 - c1, st - ct, tempered);
  out[o + 3u] = 1.0;
  out[o + 4u] = mv;
  out[o + 5u] = f32(mi);
}

//! kernel sample_cand_wg
// Sampling candidates (Ops.sampleCandidates), one workgroup per row of one storage block of the
// logits (its rows are rows row0.. of temps/out). Pass 1: each invocation keeps the `count`
// largest logits of its slice in a private list (sorted, value descending; its ids increase,
// so an equal value ranks after those kept), then `count` rounds of a shared-memory argmax
// (ties: lower id) pop the global best of the heads. Pass 2: with m = the best,
// s1 = sum exp(x - m) and sT = sum exp((x - m) / T), compensated (Kahan per invocation, TwoSum
// in the tree); sT is s1 when 1/T is 1 (greedy rows too). Out row: (m, s1, sT, min(count, v),
// values[count], ids[count]) with -inf / -1 in unused slots.
// An invocation reads groups of 4 consecutive logits (`ld4`; elements past the row are never
// kept or summed): sample_cand_wg4, for rows of a multiple of 4, loads each group as one vec4,
// as a software adapter pays a storage access per lane whatever its width. The list's last
// value is kept in a register (`thr`): most logits fail that test, and on llvmpipe a private
// array read at a run-time index is a loop over lanes.
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
// logits [base + 4g, base + 4g + 4) of a row of v (elements past v are never used)
//! ld4 begin
fn ld4(base: u32, g: u32, v: u32) -> vec4<f32> {
  let j = 4u * g;
  return vec4<f32>(
    logits[base + j],
    logits[base + min(j + 1u, v - 1u)],
    logits[base + min(j + 2u, v - 1u)],
    logits[base + min(j + 3u, v - 1u)],
  );
}
//! ld4 end
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
  let quads = (v + 3u) / 4u;
  let ninf = bitcast<f32>(0xff800000u | (v & 0u));
  var vals: array<f32, MAXC>;
  var ids: array<u32, MAXC>;
  var len = 0u;
  // full: the list holds cnt values, the last of them thr
  var full = false;
  var thr = ninf;
  for (var g = lid; g < quads; g += WG) {
    let x4 = ld4(base, g, v);
    for (var e = 0u; e < 4u; e++) {
      let j = 4u * g + e;
      let x = x4[e];
      if (j >= v || (full && !(x > thr))) { continue; }
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
      full = len == cnt;
      thr = vals[cnt - 1u];
    }
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
  let tempered = it != 1.0;
  var s1 = 0.0;
  var c1 = 0.0;
  var s2 = 0.0;
  var c2 = 0.0;
  for (var g = lid; g < quads; g += WG) {
    let d4 = ld4(base, g, v) - vec4<f32>(m);
    let e4 = exp(d4);
    let f4 = select(e4, exp(d4 * it), tempered);
    for (var e = 0u; e < 4u; e++) {
      if (4u * g + e >= v) { break; }
      let y1 = e4[e] - c1;
      let t1 = s1 + y1;
      c1 = (t1 - s1) - y1;
      s1 = t1;
      if (tempered) {
        let y2 = f4[e] - c2;
        let t2 = s2 + y2;
        c2 = (t2 - s2) - y2;
        s2 = t2;
      }
    }
  }
  if (!tempered) {
    s2 = s1;
    c2 = c1;
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

