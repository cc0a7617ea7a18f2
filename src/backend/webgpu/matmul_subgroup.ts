/**
 * WebGPU backend: the subgroup tile kernel of the tiled matmul, for software adapters whose
 * device has subgroups (Mesa lavapipe, llvmpipe's Vulkan driver; not its OpenGL one).
 *
 * llvmpipe runs a subgroup as the lanes of one SIMD vector. In matmul_t16x16 every lane loads
 * all the operand texels of its own 16x16 tile (32 texel gathers per 4 k); here one workgroup
 * is one subgroup of `lanes` invocations computing a 64-row tile together: each lane loads
 * 64 / lanes rows of A and its own 4 columns of B, and every row of A reaches all lanes by
 * `subgroupBroadcast` (an in-register shuffle, two instructions per scalar). Per 4 k a lane
 * then loads 64 / lanes + 4 texels for 64 rows x 4 columns x 4 k of multiply-adds (8 per 1,024
 * at 16 lanes), against 32 per 1,024 in matmul_t16x16: lavapipe at 512 bits (16 lanes), 1024³
 * through Ops.matmul, 83 vs 69-71 GFLOP/s (the kernel alone: 91).
 *
 * WGSL wants the broadcast's lane as a constant expression and a loop over lanes does not
 * unroll into one (measured: 7 GFLOP/s through subgroupShuffle), so the kernel text is written
 * out here for the adapter's subgroup size, with the tiled kernel's Params, bindings, operand
 * layouts and store (`put`) so that `tiled` encodes either. Formats and the LoRA pair are
 * variants of the same text, like matmul_t16x16's derived kernels.
 * @module
 */

/** Rows of C per workgroup (a subgroup): 64 accumulator vec4s per lane, as matmul_t16x16's 16x16. */
export const SUBGROUP_TILE_ROWS = 64;

/** Operand texture formats of the tiled matmul: f32 values, or a 16-bit operand's bits as they are. */
export type TexFormat = "rgba32float" | "rgba16uint" | "rgba16float";

/**
 * Which text: the subgroup size, the formats of the two operand textures, a LoRA pair or not,
 * and `glu`: the SwiGLU of a stacked gate/up product (see subgroupKernelSource).
 */
export interface SubgroupKernelSpec {
  readonly lanes: number;
  readonly fa: TexFormat;
  readonly fb: TexFormat;
  readonly lora: boolean;
  readonly glu?: boolean;
  /** op(A)'s rows RMS-normalised on the fly (see subgroupKernelSource); A must be f32. */
  readonly norm?: boolean;
  /** The output rotated by RoPE as it is stored (see subgroupKernelSource); not with glu. */
  readonly rope?: boolean;
  /**
   * The output reduced to log-softmax partials per row and tile instead of stored (see
   * subgroupKernelSource); only alone (no LoRA pair, glu, norm or rope).
   */
  readonly lsm?: boolean;
}

/**
 * Most k-texels (4 k each) of a `norm` kernel: its norm weight is a uniform array of this many
 * vec4s (16 KiB, within every device's 64 KiB uniform binding), K up to 4,096.
 */
export const NORM_MAX_K4 = 1024;

/** Kernel-name suffix of an operand texture format (matmul.ts names its variants alike). */
export const formatTag = (f: TexFormat): string =>
  f === "rgba32float" ? "" : f === "rgba16uint" ? "_bf16" : "_f16";

/** Kernel name of a spec (one pipeline per name). */
export const subgroupKernelName = (s: SubgroupKernelSpec): string =>
  `matmul_sg${s.lanes}_a${formatTag(s.fa)}_b${formatTag(s.fb)}${s.lora ? "_lora" : ""}${
    s.glu ? "_glu" : ""
  }${s.norm ? "_norm" : ""}${s.rope ? "_rope" : ""}${s.lsm ? "_lsm" : ""}`;

/** Whether a subgroup size can run the kernel: a power of two from 4 to 64 lanes. */
export const subgroupLanesSupported = (lanes: number): boolean =>
  Number.isInteger(lanes) && lanes >= 4 && lanes <= SUBGROUP_TILE_ROWS &&
  (lanes & (lanes - 1)) === 0;

/**
 * WGSL of function `fn`, a texel load of texture `t` as f32 (bf16 bits widened exactly by a
 * shift); matmul.ts derives matmul_t16x16's 16-bit variants by swapping one for the other.
 */
export const texelLoader = (fn: string, t: string, f: TexFormat): string =>
  f === "rgba16uint"
    ? `fn ${fn}(x: i32, y: i32) -> vec4<f32> {
  return bitcast<vec4<f32>>(textureLoad(${t}, vec2<i32>(x, y)) << vec4<u32>(16u));
}`
    : `fn ${fn}(x: i32, y: i32) -> vec4<f32> { return textureLoad(${t}, vec2<i32>(x, y)); }`;

/**
 * One pass over k-texels [k0, k1) of a pair of operands: lane rows from `la` (k-major: texel
 * (k, row) holds 4 consecutive k of a row), this lane's 4 columns from `block` (a 4x4 matrix
 * whose column j is op(B)[4k + j, 4q..4q+3]); every accumulator c_i += block · row_i.
 */
const pass = (
  lanes: number,
  la: string,
  block: string,
  k0: string,
  k1: string,
  scale = "",
  norm = false,
) => {
  const per = SUBGROUP_TILE_ROWS / lanes;
  const lines = [`  for (var k = ${k0}; k < ${k1}; k++) {`];
  if (norm) {
    // the row's sum of squares from the texels already loaded; the weight is one uniform load
    lines.push("    let g = norm_w[k];");
    for (let j = 0; j < per; j++) {
      lines.push(`    let x${j} = ${la}(k, r + ${j * lanes});`);
      lines.push(`    ss${j} += x${j} * x${j};`);
      lines.push(`    let a${j} = x${j} * g;`);
    }
  } else {
    for (let j = 0; j < per; j++) lines.push(`    let a${j} = ${la}(k, r + ${j * lanes})${scale};`);
  }
  lines.push(`    let bm = ${block}(k, q);`);
  for (let i = 0; i < SUBGROUP_TILE_ROWS; i++) {
    lines.push(`    c${i} += bm * subgroupBroadcast(a${Math.floor(i / lanes)}, ${i % lanes}u);`);
  }
  lines.push("  }");
  return lines.join("\n");
};

/** B rows (weight rows, k-major texels) of a lane's 4 columns: 4q.. or, for `glu`, a gate/up pair. */
const bRows = (glu: boolean, rope: boolean): string[] =>
  glu
    ? ["2 * q", "2 * q + 1", "ng + 2 * q", "ng + 2 * q + 1"]
    : rope
    ? [0, 1, 2, 3].map((j) => `rope_row(q, ${j})`)
    : ["4 * q", "4 * q + 1", "4 * q + 2", "4 * q + 3"];

/**
 * The `rope` form's rows and store. Lane column q is pair group p = q % (hd/4) of head
 * h = q / (hd/4): its 4 columns are dims 2p, 2p+1 of the head's first half and the same dims of
 * its second half (HF's rotate_half pairs), so every rotation pair lies in one lane. Positions
 * and inverse frequencies as Ops.rope reads them; the angle f32(pos) * inv_freq[i] and its
 * Cody-Waite reduction are rope_apply's.
 */
const ropeSource = (posBinding: number): string =>
  `@group(0) @binding(${posBinding}) var<storage, read> rope_pos: array<i32>;
@group(0) @binding(${posBinding + 1}) var<storage, read> rope_freq: array<f32>;
fn rope_row(q: i32, j: i32) -> i32 {
  let hd4 = i32(params.rope_hd4);
  return (q / hd4) * 4 * hd4 + 2 * (q % hd4) + (j & 1) + (j >> 1) * 2 * hd4;
}
const ROPE_C1 = 6.28125;
const ROPE_C2 = 0.0019350051879882812;
const ROPE_C3 = 3.019916050561733e-07;
const ROPE_INV_2PI = 0.15915493667125702;
fn rope_put(row: u32, qq: u32, v: vec4<f32>, a: vec2<f32>) {
  if (row < params.m && qq < params.n / 4u) {
    let hd4 = params.rope_hd4;
    let k = round(a * ROPE_INV_2PI);
    let red = ((a - k * ROPE_C1) - k * ROPE_C2) - k * ROPE_C3;
    let cs = cos(red);
    let sn = sin(red);
    let base = (qq / hd4) * 4u * hd4 + 2u * (qq % hd4);
    let i = (params.coff4 * 4u + row * params.ldc4 * 4u + base) / 2u;
    c[i] = v.xy * cs - v.zw * sn;
    c[i + hd4] = v.zw * cs + v.xy * sn;
  }
}
`;

/**
 * The `lsm` form's store: per row of the tile, the online-softmax state (m, s, u) of its scaled
 * logits z = c * inv_t over the tile's columns (common.wgsl's statistics: m the max, at least
 * -f32 max as lsm_chunk's, s = sum exp(z - m), u = sum exp(z - m) (z - m)) and zt, the z of the
 * row's target where it lies in the tile's columns (else NaN bits), reduced over the lanes by
 * subgroup operations and written by lane 0 as part[row * tiles_n + tile column]. Targets
 * (i32, vocabulary ids) count from the chunk's first column `lsm_off`.
 */
const lsmSource = (binding: number): string =>
  `@group(0) @binding(${binding}) var<storage, read> lsm_targets: array<i32>;
const LSM_NEG = -3.4028235e38;
fn lsm_put(row: u32, qq: u32, tn: u32, lane: u32, v: vec4<f32>, t: i32) {
  let col = vec4<u32>(4u * qq) + vec4<u32>(0u, 1u, 2u, 3u);
  let ok = col < vec4<u32>(params.n);
  let z = v * params.lsm_it;
  let zm = select(vec4<f32>(LSM_NEG), z, ok);
  let m = max(subgroupMax(max(max(zm.x, zm.y), max(zm.z, zm.w))), LSM_NEG);
  let e = select(vec4<f32>(0.0), exp(z - vec4<f32>(m)), ok);
  let u = select(vec4<f32>(0.0), e * (z - vec4<f32>(m)), e > vec4<f32>(0.0));
  let s = subgroupAdd((e.x + e.y) + (e.z + e.w));
  let uu = subgroupAdd((u.x + u.y) + (u.z + u.w));
  let hit = ok & (vec4<i32>(col) == vec4<i32>(t));
  let zt = dot(select(vec4<f32>(0.0), z, hit), vec4<f32>(1.0));
  let found = subgroupMax(select(0u, 1u, any(hit)));
  let ztAll = subgroupMax(select(LSM_NEG, zt, any(hit)));
  if (lane == 0u && row < params.m) {
    let w = select(bitcast<f32>(0x7fc00000u), ztAll, found != 0u);
    c[row * params.tiles_n + tn] = vec4<f32>(m, s, uu, w);
  }
}
`;

/**
 * The WGSL of a spec. op(A) must be k-major (texel (k, row) = op(A)[row, 4k..4k+3]); B either
 * layout (override B_KMAJOR, as matmul_t16x16). Rows and columns past the tile's edge read
 * whatever the (padded) textures hold there and are never stored. The LoRA variant continues
 * with the pair's loop (bindings 4 and 5, both k-major f32: + beta·xa·Bᵀ), as matmul.ts
 * loraKernel does for the 16x16 kernel.
 *
 * `glu`: B (k-major) is a gate weight of n rows stacked on its up weight (rows n..2n), the LoRA
 * B block-diagonal likewise; lane q's 4 columns are gate units 2q, 2q+1 and the same up units,
 * so each lane holds both halves of its two outputs and stores silu(gate) * up (swiglu4's
 * formula) as one vec2: no gate/up tensors, half the stores (on llvmpipe a store runs lane by
 * lane, a quarter of a K=576 product's time), no swiglu pass. Output [m, n] (vec2 pitch ldc4*2).
 *
 * `norm`: the product of RMSNorm(A) (rows x·rstd·w, w the norm weight over k, HF's formula)
 * without the normalised rows ever being stored: each k-texel of A is multiplied by w's texel
 * as it is loaded, the lane sums its rows' squares from the same texels, and after the main
 * loop every row of the tile is scaled by its rstd = 1/sqrt(sum/h + eps) (params norm_h,
 * norm_eps), before the LoRA pair's loop (whose xa comes from a `norm` product itself). w is a
 * uniform array: llvmpipe gathers it as a vector where a storage load runs lane by lane, and a
 * fifth storage texture is past the LoRA form's limit of four. Measured on SmolLM2's shapes
 * (lavapipe, 16 lanes): the sums of squares cost nothing visible, the multiply by w +7% on the
 * gate/up product and +9% on q/k/v, against an rmsnorm pass that reads and writes every element
 * lane by lane (12 ms per norm of a 4096-row prefill).
 *
 * `rope`: B's rows are taken per lane as ropeSource maps them (each rotation pair in one lane)
 * and the tile is stored rotated by rope_put, c as vec2s: q and k leave their products ready
 * for attention, with no rope pass reading and writing them again lane by lane.
 *
 * `lsm`: nothing of the product is stored; lsm_put reduces each row of the tile to its
 * online-softmax state and target logit (subgroup reductions over the lanes' columns) and lane
 * 0 writes one vec4 per row and tile: an LM head's chunk of [rows, count] logits becomes
 * [rows, count / (4 lanes)] partials, folded by lsm_merge_tiles (layers.wgsl).
 */
export const subgroupKernelSource = (s: SubgroupKernelSpec): string => {
  if (!subgroupLanesSupported(s.lanes)) throw new Error(`subgroup size ${s.lanes} unsupported`);
  const L = s.lanes;
  const glu = s.glu === true;
  const norm = s.norm === true;
  const rope = s.rope === true;
  if (norm && s.fa !== "rgba32float") throw new Error("a norm kernel reads an f32 A");
  if (rope && glu) throw new Error("a rope kernel has no SwiGLU form");
  const lsm = s.lsm === true;
  if (lsm && (s.lora || glu || norm || rope)) throw new Error("an lsm kernel has no other form");
  const decl: string[] = [];
  const store: string[] = [];
  for (let i = 0; i < SUBGROUP_TILE_ROWS; i++) {
    decl.push(`  var c${i} = vec4<f32>();`);
    store.push(`  put(u32(m0 + ${i}), col, c${i});`);
  }
  const per = SUBGROUP_TILE_ROWS / L;
  // `norm`: each lane's rows' sums of squares, then the rows scaled by their rstd
  const rstd: string[] = [];
  if (norm) {
    for (let j = 0; j < per; j++) {
      decl.push(`  var ss${j} = vec4<f32>();`);
      rstd.push(
        `  let rs${j} = 1.0 / sqrt(((ss${j}.x + ss${j}.y) + (ss${j}.z + ss${j}.w)) / params.norm_h + params.norm_eps);`,
      );
    }
    for (let i = 0; i < SUBGROUP_TILE_ROWS; i++) {
      rstd.push(`  c${i} *= subgroupBroadcast(rs${Math.floor(i / L)}, ${i % L}u);`);
    }
  }
  // A per-row value of the tile (rope's positions, lsm's targets): each lane loads those of
  // its rows (clamped to the last row), and row i's reaches every lane by broadcast.
  const rowValues = (name: string, load: (row: string) => string) => ({
    loads: Array.from(
      { length: per },
      (_, j) => `  let ${name}${j} = ${load(`min(u32(m0) + lane + ${j * L}u, params.m - 1u)`)};`,
    ),
    of: (i: number) => `subgroupBroadcast(${name}${Math.floor(i / L)}, ${i % L}u)`,
  });
  // bindings past c: the LoRA pair's two textures, the norm weight, rope's positions and table
  const normBinding = s.lora ? 6 : 4;
  const normDecl = norm
    ? `@group(0) @binding(${normBinding}) var<uniform> norm_w: array<vec4<f32>, ${NORM_MAX_K4}>;\n`
    : "";
  const ropeDecl = rope ? ropeSource(normBinding + (norm ? 1 : 0)) : "";
  if (rope) {
    // the store rotates: this lane's pair group, its frequencies and its rows' positions
    store.length = 0;
    store.push(
      "  let qq = u32(q);",
      "  let pg = qq % params.rope_hd4;",
      "  let lastf = 2u * params.rope_hd4 - 1u;",
      "  let fr = vec2<f32>(rope_freq[min(2u * pg, lastf)], rope_freq[min(2u * pg + 1u, lastf)]);",
    );
    const pos = rowValues("ps", (row) => `rope_pos[${row}]`);
    store.push(...pos.loads);
    for (let i = 0; i < SUBGROUP_TILE_ROWS; i++) {
      store.push(`  rope_put(u32(m0 + ${i}), qq, c${i}, f32(${pos.of(i)}) * fr);`);
    }
  }
  if (lsm) {
    // every lane takes part in each row's reductions, stored or not (see lsmSource)
    store.length = 0;
    store.push(
      "  let qq = u32(q);",
      "  let tn = tile % params.tiles_n;",
      "  let toff = i32(params.lsm_off);",
    );
    const tg = rowValues("tg", (row) => `lsm_targets[${row}] - toff`);
    store.push(...tg.loads);
    for (let i = 0; i < SUBGROUP_TILE_ROWS; i++) {
      store.push(`  lsm_put(u32(m0 + ${i}), qq, tn, lane, c${i}, ${tg.of(i)});`);
    }
  }
  const lsmDecl = lsm ? lsmSource(4) : "";
  const rows = bRows(glu, rope);
  const block = (f: string) =>
    `transpose(mat4x4<f32>(${rows.map((r) => `${f}(k, ${r})`).join(", ")}))`;
  const lora = s.lora
    ? `@group(0) @binding(4) var ta_lora: texture_storage_2d<rgba32float, read>;
@group(0) @binding(5) var tb_lora: texture_storage_2d<rgba32float, read>;
fn la(x: i32, y: i32) -> vec4<f32> {
  return textureLoad(ta_lora, vec2<i32>(x + i32(params.k4b0), y));
}
fn lb(x: i32, y: i32) -> vec4<f32> { return textureLoad(tb_lora, vec2<i32>(x, y)); }
fn block_lb(k: i32, q: i32) -> mat4x4<f32> {
  ${glu ? "let ng = i32(params.n);\n  " : ""}return ${block("lb")};
}
`
    : "";
  // glu and rope read B k-major only (B_KMAJOR is not consulted): glu's stacked texture always
  // is, rope's weight is k-contiguous
  const blockB = glu || rope
    ? `fn block_b(k: i32, q: i32) -> mat4x4<f32> {
  let ng = i32(params.n);
  return ${block("tb")};
}`
    : `fn block_b(k: i32, q: i32) -> mat4x4<f32> {
  if (B_KMAJOR) {
    return ${block("tb")};
  }
  return mat4x4<f32>(tb(q, 4 * k), tb(q, 4 * k + 1), tb(q, 4 * k + 2), tb(q, 4 * k + 3));
}`;
  // (rope and lsm store through rope_put, lsm_put)
  const put = rope || lsm ? "" : glu
    ? `fn put(row: u32, col: u32, v: vec4<f32>) {
  if (row < params.m && col / 2u < params.n) {
    let g = v.xy;
    let e = exp(-abs(g));
    let sg = select(e, vec2<f32>(1.0), g >= vec2<f32>(0.0)) / (1.0 + e);
    c[params.coff4 * 2u + row * params.ldc4 * 2u + col / 4u] = g * sg * v.zw;
  }
}`
    : `fn put(row: u32, col: u32, v: vec4<f32>) {
  if (row < params.m && col < params.n) {
    let i = params.coff4 + row * params.ldc4 + col / 4u;
    if (ACC) { c[i] = c[i] + params.alpha * v; } else { c[i] = v; }
  }
}`;
  return `// Generated by matmul_subgroup.ts for ${L}-lane subgroups (see there).
struct Params {
  m: u32, n: u32, k4: u32, ldc4: u32, coff4: u32, tiles_n: u32, tiles_m: u32, alpha: f32,
  k4b: u32, beta: f32, k4b0: u32, nz: u32, kz4: u32, zstride4: u32,${
    norm ? "\n  norm_h: f32, norm_eps: f32," : ""
  }${rope ? "\n  rope_hd4: u32," : ""}${lsm ? "\n  lsm_off: u32, lsm_it: f32," : ""}
}
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var at: texture_storage_2d<${s.fa}, read>;
@group(0) @binding(2) var bt: texture_storage_2d<${s.fb}, read>;
@group(0) @binding(3) var<storage, read_write> c: array<vec${glu || rope ? 2 : 4}<f32>>;
${lora}${normDecl}${ropeDecl}${lsmDecl}override B_KMAJOR: bool = true;
override ACC: bool = false;
${texelLoader("ta", "at", s.fa)}
${texelLoader("tb", "bt", s.fb)}
// Column j: op(B)[4k + j, 4q..4q+3]. B_KMAJOR: texel (k, n) holds op(B)[4k..4k+3, n];
// otherwise texel (x, y) holds op(B)[y, 4x..4x+3].
${blockB}
${put}
@compute @workgroup_size(${L})
fn main(
  @builtin(global_invocation_id) gid: vec3<u32>,
  @builtin(num_workgroups) nwg: vec3<u32>,
  @builtin(subgroup_invocation_id) lane: u32,
) {
  // one tile per workgroup: the whole subgroup returns or none of it (broadcasts need all lanes)
  let tile = (gid.x + gid.y * nwg.x * ${L}u) / ${L}u;
  if (tile >= params.tiles_m * params.tiles_n) { return; }
  let m0 = i32((tile / params.tiles_n) * ${SUBGROUP_TILE_ROWS}u);
  // this lane's column texel, and its first row of A
  let q = i32((tile % params.tiles_n) * ${L}u + lane);
  let r = m0 + i32(lane);
${decl.join("\n")}
${pass(L, "ta", "block_b", "0", "i32(params.k4)", "", norm)}
${rstd.join("\n")}
${s.lora ? pass(L, "la", "block_lb", "0", "i32(params.k4b)", " * params.beta") : ""}
  let col = u32(4 * q);
${store.join("\n")}
}
`;
};
