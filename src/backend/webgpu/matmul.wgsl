// Matmul kernels (host: matmul.ts): the tiled texture kernel with its packer, the small
// kernel and the unpad copy.
// Format of the family files: text before the first marker is a comment (only comments and
// blank lines are allowed there); each kernel starts at a line "//! kernel <name>" and runs to
// the next such line or the end of the file.

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

//! kernel matmul_pack16
// matmul_pack for a 16-bit operand (a frozen base weight stored two per u32 word, see widen16):
// texel (x, y) holds the widened src[(row0 + y) * sr + (4x + i) * sc], i = 0..3, and 0 outside
// rows x cols. BF16: bfloat16, else IEEE half.
struct Params { rows: u32, cols: u32, sr: u32, sc: u32, row0: u32, width: u32, height: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var dst: texture_storage_2d<rgba32float, write>;
override BF16: bool = true;
fn elem(r: u32, c: u32) -> f32 {
  let i = min(r, params.rows - 1u) * params.sr + min(c, params.cols - 1u) * params.sc;
  return select(0.0, widen16(src[i >> 1u], i, BF16), r < params.rows && c < params.cols);
}
@compute @workgroup_size(4, 16)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  if (gid.x >= params.width || gid.y >= params.height) { return; }
  let r = params.row0 + gid.y;
  let c = gid.x * 4u;
  let v = vec4<f32>(elem(r, c), elem(r, c + 1u), elem(r, c + 2u), elem(r, c + 3u));
  textureStore(dst, vec2<i32>(i32(gid.x), i32(gid.y)), v);
}

//! kernel matmul_pitch16
// Copies rows of a 16-bit matrix (two elements per u32 word) into a staging buffer of a row
// pitch of dst_ld words, for a copy into a 16-bit texture (whose rows must be multiples of 256
// bytes): dst[r * dst_ld + w] = src[(row0 + r) * src_ld + col0 + w] for r < rows, w < words.
struct Params { src_ld: u32, dst_ld: u32, row0: u32, col0: u32, rows: u32, words: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 256u);
  if (i >= params.rows * params.words) { return; }
  let r = i / params.words;
  let w = i - r * params.words;
  dst[r * params.dst_ld + w] = src[(params.row0 + r) * params.src_ld + params.col0 + w];
}

//! kernel matmul_pack_block
// One projection's LoRA B [rows, r] (r contiguous, f32) into rows y0.. of the block-diagonal
// texture of projectLoraShared's stacked product: texel (x, y0 + y) holds B[y, 4x + i - coff]
// where coff <= 4x + i < coff + r, else 0 (i = 0..3), for x < width, y < rows.
struct Params { rows: u32, r: u32, coff: u32, width: u32, y0: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var dst: texture_storage_2d<rgba32float, write>;
fn elem(y: u32, col: u32) -> f32 {
  let inside = col >= params.coff && col < params.coff + params.r;
  // clamped index and select, as matmul_pack: no divergent branch around the load
  let j = min(select(0u, col - params.coff, col >= params.coff), params.r - 1u);
  return select(0.0, src[y * params.r + j], inside);
}
@compute @workgroup_size(4, 16)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  if (gid.x >= params.width || gid.y >= params.rows) { return; }
  let c = gid.x * 4u;
  let v = vec4<f32>(elem(gid.y, c), elem(gid.y, c + 1u), elem(gid.y, c + 2u), elem(gid.y, c + 3u));
  textureStore(dst, vec2<i32>(i32(gid.x), i32(params.y0 + gid.y)), v);
}

//! kernel matmul_small
// Direct matmul for small or unusual shapes: each invocation computes a 4x4 block of C[m, n]
// from op(A)[i, k] = a[i * sam + k * sak] and op(B)[k, j] = b[k * sbk + j * sbn] (any transpose).
// Invocations past the last block return at once: on a software adapter every invocation that
// runs the loop pays its loads lane by lane, so few blocks (a LoRA x·Aᵀ while decoding) also get
// a small workgroup (override WG).
// With ACC it adds alpha times the product to c instead of storing it (Ops.matmulAccumulate).
struct Params {
  m: u32, n: u32, k: u32, sam: u32, sak: u32, sbk: u32, sbn: u32, tiles_n: u32, alpha: f32,
}
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
override ACC: bool = false;
fn put1(o: u32, v: f32) {
  if (ACC) { c[o] = c[o] + params.alpha * v; } else { c[o] = v; }
}
fn put(row: u32, col: u32, v: vec4<f32>) {
  if (row >= params.m) { return; }
  let o = row * params.n + col;
  if (col < params.n) { put1(o, v.x); }
  if (col + 1u < params.n) { put1(o + 1u, v.y); }
  if (col + 2u < params.n) { put1(o + 2u, v.z); }
  if (col + 3u < params.n) { put1(o + 3u, v.w); }
}
override WG: u32 = 64u;
@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let id = linear_id(gid, nwg, WG);
  if (id >= ((params.m + 3u) / 4u) * params.tiles_n) { return; }
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

//! kernel matmul_ksum
// c[coff4 + r * ldc4 + q] = sum over z < nz of part[z * zstride4 + r * ldc4 + q], for rows r <
// rows and vec4 columns q < n4: the slabs of a K-split matmul_t16x16 added up (in z order).
struct Params { rows: u32, n4: u32, ldc4: u32, coff4: u32, nz: u32, zstride4: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> part: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> c: array<vec4<f32>>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = linear_id(gid, nwg, 64u);
  if (i >= params.rows * params.n4) { return; }
  let at = (i / params.n4) * params.ldc4 + i % params.n4;
  var s = part[at];
  for (var z = 1u; z < params.nz; z++) { s += part[z * params.zstride4 + at]; }
  c[params.coff4 + at] = s;
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
// Writes rows < params.m, columns < params.n (a multiple of 4) at c[coff4 + row * ldc4 + col / 4];
// with ACC it adds alpha times the product to what is there instead (Ops.matmulAccumulate).
// k4b, beta, k4b0: the LoRA pair of the derived `_lora` kernels (see matmul.ts loraKernel): its
// rank in texels, its scale, and its first texel in the xa texture (several pairs share one).
// nz, kz4, zstride4: a K split (few tiles, so few invocations: a decoding step's x·Aᵀ): part z of
// nz sums k-texels [z·kz4, (z+1)·kz4) into its own slab of c, zstride4 vec4s after part z-1's;
// matmul_ksum adds the slabs up. Without a split nz = 1, kz4 = k4.
struct Params {
  m: u32, n: u32, k4: u32, ldc4: u32, coff4: u32, tiles_n: u32, tiles_m: u32, alpha: f32,
  k4b: u32, beta: f32, k4b0: u32, nz: u32, kz4: u32, zstride4: u32,
}
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
override ACC: bool = false;
// first vec4 of this invocation's slab of c (its K-split part's)
var<private> slab: u32;
fn put(row: u32, col: u32, v: vec4<f32>) {
  if (row < params.m && col < params.n) {
    let i = slab + row * params.ldc4 + col / 4u;
    if (ACC) { c[i] = c[i] + params.alpha * v; } else { c[i] = v; }
  }
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
// HALF_M: tiles of 8 rows x 16 columns, for products of at most 8 rows (decoding a batch of 8):
// a 16-row tile would spend half its loads and multiply-adds on padding rows.
override HALF_M: bool = false;
@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let id = linear_id(gid, nwg, WG);
  // the last workgroup's tail has no tile (it would only recompute one)
  let tiles = params.tiles_m * params.tiles_n;
  let z = id / tiles;
  if (z >= params.nz) { return; }
  slab = params.coff4 + z * params.zstride4;
  let tile = tile_order(id - z * tiles, WG, params.tiles_m, params.tiles_n);
  let tm = tile.x;
  let tn = tile.y;
  let m0 = i32(tm * select(16u, 8u, HALF_M));
  let n0 = i32(tn * 16u);
  let k0 = i32(z * params.kz4);
  let k4 = min(i32(params.k4), k0 + i32(params.kz4));
  var c0_0: mat4x4<f32>; var c0_1: mat4x4<f32>; var c0_2: mat4x4<f32>; var c0_3: mat4x4<f32>;
  var c1_0: mat4x4<f32>; var c1_1: mat4x4<f32>; var c1_2: mat4x4<f32>; var c1_3: mat4x4<f32>;
  var c2_0: mat4x4<f32>; var c2_1: mat4x4<f32>; var c2_2: mat4x4<f32>; var c2_3: mat4x4<f32>;
  var c3_0: mat4x4<f32>; var c3_1: mat4x4<f32>; var c3_2: mat4x4<f32>; var c3_3: mat4x4<f32>;
  // One k-texel (4 k) per iteration: unrolling two was slower (more live registers).
  for (var k = k0; k < k4; k++) {
    let a0 = rows_a(k, m0 + 0);
    let a1 = rows_a(k, m0 + 4);
    let b0 = cols_b(k, n0 + 0);
    let b1 = cols_b(k, n0 + 4);
    let b2 = cols_b(k, n0 + 8);
    let b3 = cols_b(k, n0 + 12);
    c0_0 += a0 * b0; c0_1 += a0 * b1; c0_2 += a0 * b2; c0_3 += a0 * b3;
    c1_0 += a1 * b0; c1_1 += a1 * b1; c1_2 += a1 * b2; c1_3 += a1 * b3;
    if (!HALF_M) {
      let a2 = rows_a(k, m0 + 8);
      let a3 = rows_a(k, m0 + 12);
      c2_0 += a2 * b0; c2_1 += a2 * b1; c2_2 += a2 * b2; c2_3 += a2 * b3;
      c3_0 += a3 * b0; c3_1 += a3 * b1; c3_2 += a3 * b2; c3_3 += a3 * b3;
    }
  }
  let r = u32(m0);
  let q = u32(n0);
  put4(r, q, c0_0); put4(r, q + 4u, c0_1);
  put4(r, q + 8u, c0_2); put4(r, q + 12u, c0_3);
  put4(r + 4u, q, c1_0); put4(r + 4u, q + 4u, c1_1);
  put4(r + 4u, q + 8u, c1_2); put4(r + 4u, q + 12u, c1_3);
  if (!HALF_M) {
    put4(r + 8u, q, c2_0); put4(r + 8u, q + 4u, c2_1);
    put4(r + 8u, q + 8u, c2_2); put4(r + 8u, q + 12u, c2_3);
    put4(r + 12u, q, c3_0); put4(r + 12u, q + 4u, c3_1);
    put4(r + 12u, q + 8u, c3_2); put4(r + 12u, q + 12u, c3_3);
  }
}
