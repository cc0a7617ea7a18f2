// Matmul for real GPUs (host: matmul_gpu.ts), the counterpart of matmul.wgsl's texture kernels,
// which are tuned for a software adapter. Classic shared-memory tiling straight from the
// storage buffers: no packing pass, every transpose variant through strides.
// Format of the family files: text before the first marker is a comment (only comments and
// blank lines are allowed there); each kernel starts at a line "//! kernel <name>" and runs to
// the next such line or the end of the file.

//! kernel matmul_gpu
// C[m, n] (= or += alpha·) op(A)[m, k]·op(B)[k, n]. A workgroup of 16x16 invocations owns a
// 64x64 block of C; each step stages a 64x16 panel of op(A) and a 16x64 panel of op(B) in
// workgroup memory (k-major, four rows or columns per vec4), and each invocation accumulates a
// 4x4 micro-tile of C in registers from them: every staged element feeds 64 multiply-adds.
// Operands: op(A)[i, p] = a[a_off + i * lda + p] when A_KC (k contiguous: A stored [m, k]), else
// a[a_off + p * lda + i] (A stored [k, m]); op(B)[p, j] = b[b_off + j * ldb + p] when B_KC (B
// stored [n, k]), else b[b_off + p * ldb + j]. C[i, j] is c[c_off + i * ldc + j]. Runs of four
// elements along the contiguous dimension are loaded together (`a_run` / `b_run`); elements past
// m, n or k read as 0, so any shape works. The host derives variants that bind a 16-bit operand
// as its u32 words (widened here with widen16, A_BF16 / B_BF16 picking the format) and an
// aligned operand as vec4<f32> or vec2<u32> for one wide load per run; only the declarations of
// `a` / `b` and their two access functions differ (see matmul_gpu.ts).
struct Params {
  m: u32, n: u32, k: u32, lda: u32, ldb: u32, ldc: u32, a_off: u32, b_off: u32, c_off: u32,
  alpha: f32,
}
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
fn a_one(i: u32) -> f32 { return a[i]; }
fn a_run(i: u32) -> vec4<f32> { return vec4<f32>(a[i], a[i + 1u], a[i + 2u], a[i + 3u]); }
@group(0) @binding(2) var<storage, read> b: array<f32>;
fn b_one(i: u32) -> f32 { return b[i]; }
fn b_run(i: u32) -> vec4<f32> { return vec4<f32>(b[i], b[i + 1u], b[i + 2u], b[i + 3u]); }
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
override A_KC: bool = true;
override B_KC: bool = false;
override A_BF16: bool = true;
override B_BF16: bool = true;
override ACC: bool = false;

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
// sa[p * 16 + r] holds op(A) rows 4r..4r+3 of the block at k step p; sb likewise columns of op(B).
var<workgroup> sa: array<vec4<f32>, 256>;
var<workgroup> sb: array<vec4<f32>, 256>;

// How many leading elements of a run of four starting at `start` lie below `limit` (0 when the
// run's other coordinate is out of range).
fn valid(start: u32, limit: u32, other_in: bool) -> u32 {
  return select(0u, min(limit - min(start, limit), 4u), other_in);
}

fn fetch_a(i: u32, ok: u32) -> vec4<f32> {
  if (ok == 4u) { return a_run(i); }
  var v = vec4<f32>();
  for (var j = 0u; j < ok; j++) { v[j] = a_one(i + j); }
  return v;
}

fn fetch_b(i: u32, ok: u32) -> vec4<f32> {
  if (ok == 4u) { return b_run(i); }
  var v = vec4<f32>();
  for (var j = 0u; j < ok; j++) { v[j] = b_one(i + j); }
  return v;
}

fn put1(o: u32, v: f32) {
  if (ACC) { c[o] = c[o] + params.alpha * v; } else { c[o] = v; }
}

fn put(row: u32, col: u32, v: vec4<f32>) {
  if (row >= params.m) { return; }
  let o = params.c_off + row * params.ldc + col;
  if (col < params.n) { put1(o, v.x); }
  if (col + 1u < params.n) { put1(o + 1u, v.y); }
  if (col + 2u < params.n) { put1(o + 2u, v.z); }
  if (col + 3u < params.n) { put1(o + 3u, v.w); }
}

@compute @workgroup_size(16, 16)
fn main(
  @builtin(workgroup_id) wid: vec3<u32>,
  @builtin(local_invocation_id) lid: vec3<u32>,
  @builtin(local_invocation_index) t: u32,
) {
  let i0 = wid.y * BM;
  let j0 = wid.x * BN;
  let tx = lid.x;
  let ty = lid.y;
  var acc0 = vec4<f32>();
  var acc1 = vec4<f32>();
  var acc2 = vec4<f32>();
  var acc3 = vec4<f32>();
  for (var k0 = 0u; k0 < params.k; k0 += BK) {
    // Each of the 256 invocations stages one run of four of each panel.
    if (A_KC) {
      let r = t >> 2u;
      let q = (t & 3u) * 4u;
      let gi = i0 + r;
      let gp = k0 + q;
      let v = fetch_a(params.a_off + gi * params.lda + gp, valid(gp, params.k, gi < params.m));
      let s = r >> 2u;
      let e = r & 3u;
      sa[q * 16u + s][e] = v.x;
      sa[(q + 1u) * 16u + s][e] = v.y;
      sa[(q + 2u) * 16u + s][e] = v.z;
      sa[(q + 3u) * 16u + s][e] = v.w;
    } else {
      let p = t >> 4u;
      let q = (t & 15u) * 4u;
      let gi = i0 + q;
      let gp = k0 + p;
      sa[p * 16u + (q >> 2u)] = fetch_a(
        params.a_off + gp * params.lda + gi,
        valid(gi, params.m, gp < params.k),
      );
    }
    if (B_KC) {
      let cl = t >> 2u;
      let q = (t & 3u) * 4u;
      let gj = j0 + cl;
      let gp = k0 + q;
      let v = fetch_b(params.b_off + gj * params.ldb + gp, valid(gp, params.k, gj < params.n));
      let s = cl >> 2u;
      let e = cl & 3u;
      sb[q * 16u + s][e] = v.x;
      sb[(q + 1u) * 16u + s][e] = v.y;
      sb[(q + 2u) * 16u + s][e] = v.z;
      sb[(q + 3u) * 16u + s][e] = v.w;
    } else {
      let p = t >> 4u;
      let q = (t & 15u) * 4u;
      let gj = j0 + q;
      let gp = k0 + p;
      sb[p * 16u + (q >> 2u)] = fetch_b(
        params.b_off + gp * params.ldb + gj,
        valid(gj, params.n, gp < params.k),
      );
    }
    workgroupBarrier();
    for (var p = 0u; p < BK; p++) {
      let av = sa[p * 16u + ty];
      let bv = sb[p * 16u + tx];
      acc0 += av.x * bv;
      acc1 += av.y * bv;
      acc2 += av.z * bv;
      acc3 += av.w * bv;
    }
    workgroupBarrier();
  }
  let row = i0 + ty * 4u;
  let col = j0 + tx * 4u;
  put(row, col, acc0);
  put(row + 1u, col, acc1);
  put(row + 2u, col, acc2);
  put(row + 3u, col, acc3);
}
