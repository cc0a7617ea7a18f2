/**
 * What bounds WebGPU on a software adapter (Mesa llvmpipe): the fixed cost of a dispatch and of
 * a buffer-to-texture copy, and the tiled matmul's 16x16 register tile at 1024³ with its
 * operand texel loads removed step by step, beside numpy's OpenBLAS sgemm in the same run.
 *
 * The tile kernel is matmul_t16x16's loop body (one k-texel per iteration: 16 texels of A and 16
 * of B, 1024 multiply-adds per invocation) with LA texels of A and LB of B actually loaded per
 * iteration; the 16 rows and columns reuse them cyclically, so the arithmetic is unchanged and
 * only the loads differ. LA = LB = 1 is the tile's arithmetic ceiling (llvmpipe lowers every
 * fma to a multiply and an add), LA = LB = 16 the shipped kernel's load count. Results of the
 * reduced variants are not a product; only the full one is checked (against f64 on samples).
 *
 * Where the device has subgroups of one size (lavapipe), the subgroup tile kernel that the
 * products run there is taken apart the same way: without its broadcasts of A's rows, without
 * its texel loads (hoisted out of the k loop), and without both.
 *
 * Run: deno run -A bench/llvmpipe_ceiling.ts (writes bench/results/llvmpipe_ceiling.json).
 * @module
 */
import { preferWideSoftwareSimd } from "../src/backend/webgpu/software_simd.ts";
import { provideRuntimeDir } from "../src/backend/webgpu/wayland_env.ts";
import { openblas, randomFloats, writeResult } from "./common.ts";
import {
  SUBGROUP_TILE_ROWS,
  subgroupKernelSource,
  subgroupLanesSupported,
} from "../src/backend/webgpu/matmul_subgroup.ts";

preferWideSoftwareSimd();
provideRuntimeDir();
const N = 1024;
const K4 = N / 4;
const round = (x: number, d = 2): number => Math.round(x * 10 ** d) / 10 ** d;

/** The tile kernel with `la` / `lb` distinct texel loads of A / B per k-texel. */
const tileKernel = (la: number, lb: number): string => {
  const lines = [
    "@group(0) @binding(0) var at: texture_storage_2d<rgba32float, read>;",
    "@group(0) @binding(1) var bt: texture_storage_2d<rgba32float, read>;",
    "@group(0) @binding(2) var<storage, read_write> c: array<vec4<f32>>;",
    "@compute @workgroup_size(64)",
    "fn main(@builtin(global_invocation_id) gid: vec3<u32>) {",
    // 16 lanes take a 4x4 block of tiles (as matmul_t16x16's tile order)
    "  let blk = gid.x / 16u; let l = gid.x % 16u;",
    `  let tm = (blk / ${N / 64}u) * 4u + l / 4u; let tn = (blk % ${N / 64}u) * 4u + l % 4u;`,
    "  let m0 = i32(tm * 16u); let n0 = i32(tn * 16u);",
  ];
  for (let i = 0; i < 4; i++) {
    for (let j = 0; j < 4; j++) lines.push(`  var c${i}_${j}: mat4x4<f32>;`);
  }
  lines.push(`  for (var k = 0; k < ${K4}; k++) {`);
  for (let q = 0; q < la; q++) {
    lines.push(`    let ra${q} = textureLoad(at, vec2<i32>(k, m0 + ${q}));`);
  }
  for (let q = 0; q < lb; q++) {
    lines.push(`    let rb${q} = textureLoad(bt, vec2<i32>(k, n0 + ${q}));`);
  }
  const pick = (v: string, base: number, count: number) =>
    [0, 1, 2, 3].map((r) => `${v}${(base + r) % count}`).join(", ");
  for (let j = 0; j < 4; j++) lines.push(`    let b${j} = mat4x4<f32>(${pick("rb", 4 * j, lb)});`);
  for (let i = 0; i < 4; i++) {
    lines.push(`    let a${i} = transpose(mat4x4<f32>(${pick("ra", 4 * i, la)}));`);
    for (let j = 0; j < 4; j++) lines.push(`    c${i}_${j} += a${i} * b${j};`);
  }
  lines.push("  }");
  for (let i = 0; i < 4; i++) {
    for (let j = 0; j < 4; j++) {
      lines.push(`  { let u = transpose(c${i}_${j});`);
      for (let r = 0; r < 4; r++) {
        lines.push(
          `    c[(u32(m0) + ${4 * i + r}u) * ${N / 4}u + (u32(n0) + ${4 * j}u) / 4u] = u[${r}];`,
        );
      }
      lines.push("  }");
    }
  }
  lines.push("}");
  return lines.join("\n");
};

const adapter = await navigator.gpu?.requestAdapter();
if (!adapter) {
  console.log("llvmpipe_ceiling: no WebGPU adapter; nothing measured");
  Deno.exit(0);
}
// subgroups where the adapter grants them (Deno 2.9 leaves them out of adapter.features)
const device = await adapter.requestDevice({ requiredFeatures: ["subgroups" as GPUFeatureName] })
  .catch(() => adapter.requestDevice());
const subgroups = device.features.has("subgroups");
const storageTexture = (w: number, h: number, data: Float32Array<ArrayBuffer>): GPUTexture => {
  const t = device.createTexture({
    size: [w, h],
    format: "rgba32float",
    usage: GPUTextureUsage.STORAGE_BINDING | GPUTextureUsage.COPY_DST,
  });
  device.queue.writeTexture({ texture: t }, data, { bytesPerRow: w * 16, rowsPerImage: h }, [w, h]);
  return t;
};
const storage = (bytes: number, data?: Float32Array<ArrayBuffer>): GPUBuffer => {
  const b = device.createBuffer({
    size: bytes,
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  if (data) device.queue.writeBuffer(b, 0, data);
  return b;
};
const pipelineOf = (code: string, resources: GPUBindingResource[]) => {
  const module = device.createShaderModule({ code });
  const pipeline = device.createComputePipeline({
    layout: "auto",
    compute: { module, entryPoint: "main" },
  });
  const group = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: resources.map((resource, binding) => ({ binding, resource })),
  });
  return { pipeline, group };
};
/** Best milliseconds per command over `rounds` submits of `count` commands each. */
const perCommand = async (
  count: number,
  rounds: number,
  encode: (e: GPUCommandEncoder) => void,
) => {
  let best = Infinity;
  for (let r = 0; r <= rounds; r++) {
    const e = device.createCommandEncoder();
    for (let i = 0; i < count; i++) encode(e);
    const t0 = performance.now();
    device.queue.submit([e.finish()]);
    await device.queue.onSubmittedWorkDone();
    // round 0 compiles and touches memory
    if (r > 0) best = Math.min(best, (performance.now() - t0) / count);
  }
  return best;
};
const dispatchOf =
  (p: { pipeline: GPUComputePipeline; group: GPUBindGroup }, groups: number) =>
  (e: GPUCommandEncoder) => {
    const pass = e.beginComputePass();
    pass.setPipeline(p.pipeline);
    pass.setBindGroup(0, p.group);
    pass.dispatchWorkgroups(groups);
    pass.end();
  };

const results: Record<string, number | string> = {};
// a dispatch that does (almost) nothing, and a decoding step's activation copy (8 x 576 floats)
const small = storage(4096);
const empty = pipelineOf(
  "@group(0) @binding(0) var<storage, read_write> o: array<f32>;\n" +
    "@compute @workgroup_size(16) fn main(@builtin(global_invocation_id) g: vec3<u32>) " +
    "{ o[g.x] = o[g.x] + 1.0; }",
  [{ buffer: small }],
);
results.empty_dispatch_us = round(1000 * await perCommand(500, 3, dispatchOf(empty, 1)));
const copyTex = storageTexture(144, 8, new Float32Array(144 * 8 * 4));
const copySrc = storage(144 * 8 * 16, randomFloats(144 * 8 * 4, 3));
results.texture_copy_8x576_us = round(
  1000 *
    await perCommand(
      500,
      3,
      (e) =>
        e.copyBufferToTexture({ buffer: copySrc, bytesPerRow: 144 * 16 }, { texture: copyTex }, [
          144,
          8,
        ]),
    ),
);

// the tile kernel at 1024³: A k-major (texel (x, y) = A[y, 4x..]), B k-major (B[4x.., y])
const a = randomFloats(N * N, 1);
const b = randomFloats(N * N, 2);
const bt = new Float32Array(N * N);
for (let i = 0; i < N; i++) for (let j = 0; j < N; j++) bt[j * N + i] = b[i * N + j];
const at = storageTexture(K4, N, a);
const btT = storageTexture(K4, N, bt);
const c = storage(N * N * 4);
const flops = 2 * N ** 3;
for (
  const [la, lb, key] of [[1, 1, "arithmetic_only"], [1, 16, "b_loads"], [
    16,
    16,
    "all_loads",
  ]] as const
) {
  const p = pipelineOf(tileKernel(la, lb), [at.createView(), btT.createView(), { buffer: c }]);
  const ms = await perCommand(3, 4, dispatchOf(p, (N / 16) ** 2 / 64));
  results[`tile16_${key}_gflop_s`] = round(flops / ms / 1e6);
  results[`tile16_${key}_texel_loads_per_k_texel`] = la + lb;
}
/** Largest error of C = A·B's samples in `cBuf` vs f64 (relative to 1 + |C|); throws past 1e-3. */
const sampleError = async (cBuf: GPUBuffer, what: string): Promise<number> => {
  const staging = device.createBuffer({
    size: N * N * 4,
    usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
  });
  const enc = device.createCommandEncoder();
  enc.copyBufferToBuffer(cBuf, 0, staging, 0, N * N * 4);
  device.queue.submit([enc.finish()]);
  await staging.mapAsync(GPUMapMode.READ);
  const out = new Float32Array(staging.getMappedRange());
  let worst = 0;
  for (const [i, j] of [[0, 0], [5, 17], [1023, 1023], [517, 3], [64, 900]]) {
    let r = 0;
    for (let q = 0; q < N; q++) r += a[i * N + q] * b[q * N + j];
    worst = Math.max(worst, Math.abs(out[i * N + j] - r) / (1 + Math.abs(r)));
  }
  staging.unmap();
  staging.destroy();
  if (worst > 1e-3) throw new Error(`${what} wrong: relative error ${worst}`);
  return Number(worst.toExponential(2));
};
// the full variant is the product: check samples against f64
results.tile16_all_loads_max_sample_error = await sampleError(c, "tile kernel");

// The subgroup tile kernel (matmul_subgroup.ts, what lavapipe's products run) at 1024³ with its
// costs removed one at a time: the broadcasts of A's rows (each lane uses its own texel
// instead), the operand texel loads (hoisted out of the k loop), and both. Only the shipped
// text is a product (checked on samples); the others bound what each cost takes.
const lanesInfo = adapter.info as GPUAdapterInfo & {
  subgroupMinSize?: number;
  subgroupMaxSize?: number;
};
const lanes = lanesInfo.subgroupMinSize;
const sgKeys: string[] = [];
if (
  !subgroups || lanes === undefined || lanes !== lanesInfo.subgroupMaxSize ||
  !subgroupLanesSupported(lanes)
) {
  results.subgroup_tile = "skipped: the device has no subgroups of one size the kernel takes";
} else {
  const shipped = subgroupKernelSource({
    lanes,
    fa: "rgba32float",
    fb: "rgba32float",
    lora: false,
  });
  const edit = (code: string, re: RegExp, to: string) => {
    const out = code.replace(re, to);
    if (out === code) throw new Error(`llvmpipe_ceiling: ${re} matched nothing in the kernel text`);
    return out;
  };
  // moves the matching loop-body lines before the loop, at k = 0
  const hoist = (code: string, re: RegExp) => {
    const lines = code.split("\n");
    const loop = lines.findIndex((l) => l.includes("for (var k = 0;"));
    const moved = lines.filter((l, i) => i > loop && re.test(l));
    if (moved.length === 0) throw new Error(`llvmpipe_ceiling: ${re} matched no loop line`);
    const rest = lines.filter((l, i) => !(i > loop && re.test(l)));
    rest.splice(loop, 0, ...moved.map((l) => l.replace("(k, ", "(0, ")));
    return rest.join("\n");
  };
  const noBroadcast = (code: string) => edit(code, /subgroupBroadcast\((a\d+), \d+u\)/g, "$1");
  const hoisted = hoist(
    hoist(shipped, /^ {4}let a\d+ = ta\(k, /),
    /^ {4}let bm = block_b\(k, q\);/,
  );
  const variants: [string, string][] = [
    ["shipped", shipped],
    ["no_broadcasts", noBroadcast(shipped)],
    ["no_loads", hoisted],
    ["arithmetic_only", noBroadcast(hoisted)],
  ];
  const tilesN = N / (4 * lanes);
  const tilesM = N / SUBGROUP_TILE_ROWS;
  const u = new ArrayBuffer(64);
  new Uint32Array(u).set([N, N, K4, N / 4, 0, tilesN, tilesM]);
  new Float32Array(u)[7] = 1;
  new Uint32Array(u).set([1, K4], 11);
  const ub = device.createBuffer({
    size: 64,
    usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
  });
  device.queue.writeBuffer(ub, 0, u);
  // op(A) k-major as `at`; B as the tiled path keeps a weight: texel (k, n) = B[4k..4k+3, n]
  const sc = storage(N * N * 4);
  for (const [key, code] of variants) {
    const p = pipelineOf(code, [{ buffer: ub }, at.createView(), btT.createView(), { buffer: sc }]);
    const ms = await perCommand(3, 4, dispatchOf(p, tilesM * tilesN));
    results[`subgroup_tile_${key}_gflop_s`] = round(flops / ms / 1e6);
    sgKeys.push(`subgroup_tile_${key}`);
    if (key === "shipped") {
      results.subgroup_tile_shipped_max_sample_error = await sampleError(
        sc,
        "subgroup tile kernel",
      );
    }
  }
  results.subgroup_tile_lanes = lanes;
}

const peer = await openblas();
const ob = peer.openblas_matmul_1024_gflop_s;
results.openblas_numpy = peer.openblas_numpy;
if (ob === null) results.openblas_matmul_1024 = "skipped: python3 with numpy not found";
else {
  results.openblas_matmul_1024_gflop_s = ob;
  for (
    const key of [
      ...["arithmetic_only", "b_loads", "all_loads"].map((k) => `tile16_${k}`),
      ...sgKeys,
    ]
  ) {
    results[`${key}_vs_openblas_ratio`] = round((results[`${key}_gflop_s`] as number) / ob, 3);
  }
}
device.destroy();
console.table(results);
console.log(await writeResult("llvmpipe_ceiling", results));
