// Elementwise kernels (host: elementwise.ts): binary ops, scale, axpy, row sums, gathers and
// scatters, column copies, SwiGLU, AdamW, the LoRA fold, and fill_f32 (dispatch tests).
// Format of the family files: text before the first marker is a comment (only comments and
// blank lines are allowed there); each kernel starts at a line "//! kernel <name>" and runs to
// the next such line or the end of the file.

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

//! kernel ew_binary4
// ew_binary four elements per invocation (n4 = n / 4 vec4s; see swiglu4).
struct Params { n4: u32, op: u32, s: f32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n4) { return; }
  let x = a[i];
  let y = b[i];
  var r: vec4<f32>;
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

//! kernel ew_sum_squares_chunks
// Sums of squares of consecutive chunks of 1024 floats (256 vec4s): out[c] over x4[256c, 256c +
// 256) ∩ [0, n4), one invocation per chunk adding in a fixed order (four lanes, then pairs):
// deterministic, and no workgroup memory or barriers (costly on software adapters).
struct Params { n4: u32, chunks: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let c = linear_id(gid, nwg, 64u);
  if (c >= params.chunks) { return; }
  var acc = vec4<f32>(0.0);
  let end = min(c * 256u + 256u, params.n4);
  for (var i = c * 256u; i < end; i++) {
    let v = x4[i];
    acc += v * v;
  }
  out[c] = (acc.x + acc.y) + (acc.z + acc.w);
}

//! kernel ew_sum_segments
// out[dst[s]] = sum of part[first[s] .. first[s + 1]) in order, for s < segments: the totals of
// the tensors whose chunk sums ew_sum_squares_chunks wrote.
struct Params { segments: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read> first: array<i32>;
@group(0) @binding(3) var<storage, read> dst: array<i32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let s = linear_id(gid, nwg, 64u);
  if (s >= params.segments) { return; }
  var acc = 0.0;
  for (var i = first[s]; i < first[s + 1u]; i++) { acc += part[i]; }
  out[dst[s]] = acc;
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

//! kernel ew_scatter_rows4
// ew_scatter_rows for rows of a multiple of 4 elements, as vec4s (a quarter of the stores, each
// about as dear per lane on llvmpipe): dst[idx[r], c] = src[r, c]; n4 = rows * cols4.
struct Params { n4: u32, cols4: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> idx: array<i32>;
@group(0) @binding(3) var<storage, read_write> dst: array<vec4<f32>>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n4) { return; }
  let r = i / params.cols4;
  let c = i - r * params.cols4;
  dst[u32(idx[r]) * params.cols4 + c] = src[i];
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

//! kernel swiglu4
// swiglu four elements per invocation (n4 = n / 4 vec4s): on a software adapter each storage
// access runs lane by lane, and a vec4 access is one of them instead of four.
struct Params { n4: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> g: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> u: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
fn sigmoid4(x: vec4<f32>) -> vec4<f32> {
  let e = exp(-abs(x));
  return select(e, vec4<f32>(1.0), x >= vec4<f32>(0.0)) / (1.0 + e);
}
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n4) { return; }
  let x = g[i];
  out[i] = x * sigmoid4(x) * u[i];
}

//! kernel swiglu_backward
// With s = sigmoid(g): du = dh * g * s; dg = dh * u * s * (1 + g * (1 - s)).
// V is the element type: the host derives a vec4 form (V = vec4<f32>, n counted in vec4s).
alias V = f32;
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> dh: array<V>;
@group(0) @binding(2) var<storage, read> g: array<V>;
@group(0) @binding(3) var<storage, read> u: array<V>;
@group(0) @binding(4) var<storage, read_write> dg: array<V>;
@group(0) @binding(5) var<storage, read_write> du: array<V>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  let x = g[i];
  let e = exp(-abs(x));
  // sigmoid(x) and 1 - sigmoid(x), each without cancellation.
  let s = select(e, V(1.0), x >= V(0.0)) / (1.0 + e);
  let t = select(V(1.0), e, x >= V(0.0)) / (1.0 + e);
  let d = dh[i];
  du[i] = d * x * s;
  dg[i] = d * u[i] * s * (1.0 + x * t);
}

//! kernel adamw
// In place AdamW (PyTorch): g' = gscale * g; m = b1 m + (1 - b1) g'; v = b2 v + (1 - b2) g'²;
// p = p * decay - lr * (m / bc1) / (sqrt(v / bc2) + eps), decay = 1 - lr * wd, bc = 1 - beta^t.
// V is the element type: the host derives a vec4 form (V = vec4<f32>, n counted in vec4s).
alias V = f32;
struct Params {
  n: u32, lr: f32, b1: f32, omb1: f32, b2: f32, omb2: f32, eps: f32, decay: f32, gscale: f32,
  bc1: f32, bc2: f32,
}
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> p: array<V>;
@group(0) @binding(2) var<storage, read> grad: array<V>;
@group(0) @binding(3) var<storage, read_write> m: array<V>;
@group(0) @binding(4) var<storage, read_write> v: array<V>;
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


//! kernel half_widen
// dst[i] = element i of a 16-bit tensor (two per u32 word), widened exactly (see widen16).
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
override BF16: bool = true;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n) { return; }
  dst[i] = widen16(src[i >> 1u], i, BF16);
}

//! kernel half_copy
// Copies n elements of a 16-bit tensor (two per u32 word) from element src_off of src to element
// dst_off of dst. One invocation per destination word (`words` of them, from word dst_off / 2);
// it keeps the half of its word outside the range, since the ranges of two dispatches (two
// storage blocks) may share a word.
struct Params { n: u32, src_off: u32, dst_off: u32, words: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
fn half_at(e: u32) -> u32 {
  return (src[e >> 1u] >> ((e & 1u) * 16u)) & 0xffffu;
}
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.words) { return; }
  let w = (params.dst_off >> 1u) + i;
  var word = dst[w];
  for (var h = 0u; h < 2u; h++) {
    let e = w * 2u + h;
    if (e >= params.dst_off && e - params.dst_off < params.n) {
      let shift = h * 16u;
      let v = half_at(e - params.dst_off + params.src_off);
      word = (word & ~(0xffffu << shift)) | (v << shift);
    }
  }
  dst[w] = word;
}

//! kernel half_widen4
// half_widen by runs of four (n a multiple of 4): dst4[i] = elements 4i..4i+3 widened, from two
// whole words.
struct Params { n4: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;
override BF16: bool = true;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.n4) { return; }
  let w0 = src[2u * i];
  let w1 = src[2u * i + 1u];
  dst[i] = vec4<f32>(widen16(w0, 0u, BF16), widen16(w0, 1u, BF16), widen16(w1, 0u, BF16),
                     widen16(w1, 1u, BF16));
}
