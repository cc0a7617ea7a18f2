/**
 * WebGPU backend: texture mirrors of buffers that grow by scattered rows (a KV cache).
 *
 * Attention reads its operands from textures (attention.ts `stage`), and a decode step used to
 * copy every layer's whole cache into a staging texture: SmolLM2-135M at batch 64 copied about
 * 280 MB per step on llvmpipe, on the one thread that runs the queue while the others waited.
 * A buffer written by `scatterRowsInPlace` gets, at its first staging, a texture of its own
 * holding the same rows (one full copy); each later scatter writes its rows into both in one
 * pass (`mirroredScatter`), so staging it again costs nothing. The mirror is derived from the
 * buffer (GpuContext.derive): any other write to the buffer, or its release, destroys it.
 * @module
 */
import type { GpuContext } from "./context.ts";

interface Entry {
  /** Texture [width texels, rows] with texel (c, r) = the buffer's row r, elements 4c..4c+3. */
  tex: GPUTexture | null;
  width: number;
  rows: number;
  readonly dispose: () => void;
}

const entries = new WeakMap<GPUBuffer, Entry>();

const register = (ctx: GpuContext, buf: GPUBuffer, e: Entry): void => {
  entries.set(buf, e);
  ctx.derive(buf, e.dispose);
};

const entryFor = (ctx: GpuContext, buf: GPUBuffer): Entry => {
  const e: Entry = {
    tex: null,
    width: 0,
    rows: 0,
    dispose: () => {
      if (entries.get(buf) === e) entries.delete(buf);
      if (e.tex) ctx.retire(e.tex);
      e.tex = null;
    },
  };
  return e;
};

/**
 * Before a scatter into `buf`: takes its mirror out of the buffer's derived objects, so that the
 * scatter's own write does not destroy it; `afterScatter` puts it back.
 */
export const beforeScatter = (ctx: GpuContext, buf: GPUBuffer): Entry | null => {
  const e = entries.get(buf);
  if (!e) return null;
  ctx.underive(buf, e.dispose);
  entries.delete(buf);
  return e;
};

/**
 * The mirror taken by `beforeScatter` as a view for a scatter that writes the buffer and the
 * mirror in one pass, or null when there is none or its rows are not `cols` f32 wide.
 */
export const mirrorTarget = (taken: Entry | null, cols: number): GPUTextureView | null =>
  taken?.tex && cols % 4 === 0 && cols / 4 === taken.width ? taken.tex.createView() : null;

/**
 * After a scatter into `buf` is encoded: puts back the mirror taken by `beforeScatter` when the
 * scatter wrote its rows there too (`mirrored`, into `mirrorTarget`'s view), drops one it did
 * not (its rows are of another width), or marks `buf` as one whose staging keeps a mirror (its
 * first `mirrorOf` makes it).
 */
export const afterScatter = (
  ctx: GpuContext,
  buf: GPUBuffer,
  taken: Entry | null,
  mirrored: boolean,
): void => {
  const e = taken ?? entryFor(ctx, buf);
  if (e.tex && !mirrored) {
    e.dispose();
    register(ctx, buf, entryFor(ctx, buf));
    return;
  }
  register(ctx, buf, e);
};

/**
 * ew_scatter_rows4 that also writes each row into the mirror (binding 4): texel (c, idx[r]) =
 * elements 4c..4c+3 of the row, so the buffer and its mirror take a decode step's k and v rows
 * in one pass.
 */
export const mirroredScatter = (ctx: GpuContext): string =>
  ctx.derivedKernel("ew_scatter_rows4_mirrored", "ew_scatter_rows4", (code) => {
    const store = "dst[u32(idx[r]) * params.cols4 + c] = src[i];";
    const decl = "var<storage, read_write> dst: array<vec4<f32>>;";
    if (!code.includes(store) || !code.includes(decl)) {
      throw new Error(
        "elementwise.wgsl: ew_scatter_rows4 lacks the store its mirrored form extends",
      );
    }
    return code
      .replace(
        decl,
        `${decl}\n@group(0) @binding(4) var mirror: texture_storage_2d<rgba32float, write>;`,
      )
      .replace(
        store,
        "let v = src[i];\n  dst[u32(idx[r]) * params.cols4 + c] = v;\n" +
          "  textureStore(mirror, vec2<i32>(i32(c), idx[r]), v);",
      );
  });

/**
 * The mirror of `buf` as a texture of `width` rgba32float texels x `rows` rows, or null when
 * `buf` is not scattered into (a transient operand is staged as before). The first call copies
 * the buffer (`bytesPerRow` = width * 16 must be a multiple of 256); a mirror of another shape
 * is replaced.
 */
export const mirrorOf = (
  ctx: GpuContext,
  buf: GPUBuffer,
  width: number,
  rows: number,
): GPUTexture | null => {
  const e = entries.get(buf);
  if (!e) return null;
  if (e.tex && e.width === width && e.rows === rows) return e.tex;
  if (e.tex) ctx.retire(e.tex);
  e.tex = ctx.device.createTexture({
    label: "kv_mirror",
    size: [width, rows],
    format: "rgba32float",
    usage: GPUTextureUsage.STORAGE_BINDING | GPUTextureUsage.COPY_DST,
  });
  e.width = width;
  e.rows = rows;
  ctx.copyToTexture({ buffer: buf, bytesPerRow: width * 16, rowsPerImage: rows }, {
    texture: e.tex,
  }, [width, rows]);
  return e.tex;
};
