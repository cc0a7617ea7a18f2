/**
 * WebGPU device context: pipeline cache, buffer pool, batched command encoding, uniforms and
 * readback. Ops only encode; work is submitted in batches and the host waits only in `read`.
 * @module
 */
import type { BackendInfo } from "../ops.ts";

/** Marks a uniform parameter as f32 (plain numbers are u32). */
export interface F32 {
  readonly f: number;
}
/** Wraps a float uniform parameter. */
export const f32 = (f: number): F32 => ({ f });
/** A uniform parameter: u32 (number, or negative i32 stored as two's complement) or f32. */
export type Param = number | F32;

/**
 * A kernel's uniform parameters: by field name of its WGSL `struct Params` (every field once,
 * no other key), or positionally in field order. Both are checked against the struct when
 * encoded (count, names, u32 / f32 kinds), so a host call and its kernel cannot drift apart.
 */
export type Params = readonly Param[] | Readonly<Record<string, Param>>;

/** One field of a kernel's `struct Params`. */
export interface ParamField {
  readonly name: string;
  readonly type: "u32" | "i32" | "f32";
}

/**
 * Fields of the `struct Params { name: type, ... }` of a kernel's source, in order (all scalars
 * of 4 bytes: u32, i32 or f32), or null when it declares none. Throws on any other field type.
 */
export const paramFields = (kernel: string, code: string): ParamField[] | null => {
  const m = /struct\s+Params\s*\{([^}]*)\}/.exec(code);
  if (!m) return null;
  return m[1].split(",").map((f) => f.trim()).filter((f) => f !== "").map((f) => {
    const [name, type] = f.split(":").map((x) => x.trim());
    if (type !== "u32" && type !== "i32" && type !== "f32") {
      throw new Error(`kernel ${kernel}: Params field "${f}" is not a u32, i32 or f32`);
    }
    return { name, type };
  });
};

/**
 * Writes `params` into `view` (4 bytes per field, in struct order) after checking them against
 * `fields`: a mismatch (a missing, extra or misnamed field, an f32 given as a plain number or
 * the reverse, a non-integer u32) throws naming the kernel and the field.
 */
export const encodeParams = (
  kernel: string,
  fields: readonly ParamField[] | null,
  params: Params,
  view: DataView,
): void => {
  const bad = (why: string): never => {
    throw new Error(`kernel ${kernel}: ${why}`);
  };
  if (fields === null) return bad("declares no struct Params but was given parameters");
  if (fields.length * 4 > view.byteLength) bad(`${fields.length} params exceed one uniform slot`);
  let values: readonly Param[];
  if (Array.isArray(params)) {
    values = params;
    if (values.length !== fields.length) {
      bad(`${values.length} params for struct Params of ${fields.length} fields`);
    }
  } else {
    const named = params as Readonly<Record<string, Param>>;
    const extra = Object.keys(named).filter((k) => !fields.some((f) => f.name === k));
    if (extra.length > 0) bad(`no Params field named ${extra.join(", ")}`);
    values = fields.map((f) => f.name in named ? named[f.name] : bad(`Params.${f.name} missing`));
  }
  fields.forEach((f, i) => {
    const p = values[i];
    if (f.type === "f32") {
      if (typeof p === "number") bad(`Params.${f.name} is f32: pass f32(${p})`);
      view.setFloat32(i * 4, (p as F32).f, true);
      return;
    }
    if (typeof p !== "number") return bad(`Params.${f.name} is ${f.type}, given f32(${p.f})`);
    if (!Number.isInteger(p) || p < -(2 ** 31) || p >= 2 ** 32) {
      bad(`Params.${f.name} = ${p} is not a 32-bit integer`);
    }
    view.setUint32(i * 4, p >>> 0, true);
  });
};

/** Bytes of one uniform slot (minUniformBufferOffsetAlignment). */
const SLOT = 256;
const SLOTS = 1024;
/** Dispatches per submitted batch before an automatic flush. */
const MAX_BATCH = 1024;
/**
 * Bytes the pool may always keep idle. It keeps more while the device holds less than the most
 * it has held (see `poolLimit`): a SmolLM2-135M training step holds ~1.3 GB of activations, and
 * a 1 GiB cap sent part of them to destruction after every step, so the next step allocated
 * them again (fresh memory that lavapipe zero-fills and faults in: ~0.5 s of an 11 s step).
 */
const POOL_CAP_BYTES = 1 << 30;

/** Largest workgroup count per dimension (WebGPU default limit). */
export const MAX_GROUPS = 65535;

/**
 * The vec4 form of an elementwise kernel written over `alias V = f32;` (its arrays of V, its
 * constants as V(...)): the same text with V = vec4<f32>, dispatched with counts in vec4s. On a
 * software adapter each storage access costs about the same per lane whatever its width, so the
 * vec4 form makes a quarter of them.
 */
export const vec4Form = (ctx: GpuContext, base: string): string =>
  ctx.derivedKernel(`${base}_v4`, base, (code) => {
    const from = "alias V = f32;";
    if (!code.includes(from)) throw new Error(`kernel ${base} has no "${from}"`);
    return code.replace(from, "alias V = vec4<f32>;");
  });

/** Splits `n` workgroups into an [x, y] grid within the per-dimension limit. */
export const grid = (n: number): [number, number] => {
  if (n <= MAX_GROUPS) return [Math.max(n, 1), 1];
  const y = Math.ceil(n / MAX_GROUPS);
  return [Math.ceil(n / y), y];
};

/** Dispatches per batch on a software adapter, whose submits hold the JS thread (deferSubmits). */
const SOFTWARE_BATCH = 64;

/** A flushed batch waiting for its submit. */
interface PendingBatch {
  /** The batch's uniform slots (a copy when the submit is deferred), or null. */
  readonly uniforms: Uint8Array<ArrayBuffer> | null;
  readonly commands: GPUCommandBuffer;
  /** Objects to destroy once it is submitted. */
  readonly retired: { destroy(): void }[];
}

/**
 * Resolves after one turn of the event loop: a message on a fresh MessageChannel, closed once it
 * arrives (I/O that is ready runs first; no clamped millisecond as with setTimeout, ~30 us; no
 * port left open to keep the process alive).
 */
const eventLoopTurn = (): Promise<void> =>
  new Promise((resolve) => {
    const ch = new MessageChannel();
    ch.port1.onmessage = () => {
      ch.port1.close();
      ch.port2.close();
      resolve();
    };
    ch.port2.postMessage(0);
  });

/** Most bytes of one staging buffer of `read` (larger reads take several). */
const READ_STAGING_BYTES = 256 << 20;

/** Uploads of at least this many bytes are submitted at once (their staging copy goes back). */
const UPLOAD_SUBMIT_BYTES = 16 << 20;

/** One WebGPU device with its caches; shared by all scopes of the backend. */
/**
 * Usage of every buffer that can reach the pool (alloc, upload). UNIFORM too: a small read-only
 * table bound as a uniform array (matmul's folded norm weight) is read with vector gathers on
 * llvmpipe, where a storage-buffer load runs lane by lane.
 */
const pooledUsage = (): number =>
  // a function: runtimes without WebGPU (Bun) import this module too
  GPUBufferUsage.STORAGE | GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_SRC |
  GPUBufferUsage.COPY_DST;

export class GpuContext {
  private readonly pipelines = new Map<string, GPUComputePipeline>();
  private readonly layouts = new Map<string, readonly ParamField[] | null>();
  private readonly pool = new Map<number, GPUBuffer[]>();
  /**
   * The pooled buffers, least recently released first, each with the number of batches that must
   * be submitted before it is idle on the device (see `release`, `evictFor`).
   */
  private readonly pooledOrder = new Map<GPUBuffer, number>();
  private pooledBytes = 0;
  /** Batches ended by `flush` so far (the pool compares it with `submits`). */
  private flushed = 0;
  private encoder: GPUCommandEncoder | null = null;
  private pass: GPUComputePassEncoder | null = null;
  private readonly uniform: GPUBuffer;
  private readonly uniformData = new ArrayBuffer(SLOT * SLOTS);
  private slots = 0;
  private dispatches = 0;
  /** First uncaptured device error since the last read (surfaced as a failed read). */
  error: string | null = null;
  /** Number of host waits so far (readbacks): a training step should add only a few. */
  waits = 0;
  /** Number of submits so far. */
  submits = 0;
  /** Buffers handed out by alloc/upload and not yet released (0 when every scope closed). */
  outstanding = 0;
  /** Bytes of the buffers counted by `outstanding`. */
  outstandingBytes = 0;
  /** Most `outstanding` / `outstandingBytes` since the last `resetPeak` (live device memory). */
  peakOutstanding = 0;
  peakOutstandingBytes = 0;
  private readonly persistent: GPUBuffer[] = [];
  /** Objects to destroy after the next submit (encoded work may still use them). */
  private readonly retired: { destroy(): void }[] = [];
  /**
   * Batches encoded but not yet submitted (software adapters only, see `deferSubmits`), in
   * order, each with its uniforms and what to destroy once it is submitted.
   */
  private readonly pending: PendingBatch[] = [];
  /**
   * Whether flushes queue their batch and `read`/`sync` submit the queue one batch at a time,
   * giving the event loop a turn between batches. On a software adapter a submit holds the JS
   * thread (and every HTTP answer and file write of the process) while the device runs: under
   * Deno 2.9.6 on lavapipe (Mesa 22.3) it returns at once when nothing is in flight but blocks
   * until the submit before it finishes (three 250 ms batches back to back: 0.1, 245, 243 ms),
   * so short batches bound the hold to about one batch. Submitting each batch as it is flushed
   * instead, so that encoding overlaps the device's run, measured no different (SmolLM2-135M
   * log-probs and LoRA train, 3 alternating pairs each, within the machine's ±20% noise), and
   * so did a SmolLM2-135M batch-64 decode step, whose ~40 ms of encoding then overlapped the
   * device's run (`kernel_profile.ts gen 64 64 32`, 5 farm-bench pairs: wall 1.04x, cpu 1.00x):
   * llvmpipe's device is the same 2 cores, so host work beside it takes cores from it. On a real
   * GPU batches go out as they are flushed.
   */
  private readonly deferSubmits: boolean;
  /** Binding numbers of each kernel's read_write storage buffers (parsed once). */
  private readonly writes = new Map<string, ReadonlySet<number>>();
  /** Device objects derived from a buffer's contents (see `derive`), by buffer. */
  private readonly derived = new Map<GPUBuffer, Set<() => void>>();
  private bindingOverride: number | null = null;
  /** Idle bytes the pool may always keep (POOL_CAP_BYTES unless a test sets it). */
  private poolBase = POOL_CAP_BYTES;
  /** Whether the pool may keep more while the device holds less than its most (`poolLimit`). */
  private poolAdaptive = true;
  /** Most bytes of live buffers (`outstandingBytes`' high-water mark, reset only by tests). */
  private mostHeldBytes = 0;

  constructor(
    readonly device: GPUDevice,
    readonly info: BackendInfo,
    private readonly kernels: Map<string, string>,
    /**
     * Lanes of every subgroup when the device has the `subgroups` feature and the adapter runs
     * one fixed size (a software adapter: its SIMD width), else null: the subgroup tile matmul
     * (matmul_subgroup.ts) is written for that size.
     */
    readonly subgroupLanes: number | null = null,
  ) {
    this.uniform = device.createBuffer({
      size: SLOT * SLOTS,
      usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
    });
    this.deferSubmits = info.fallback;
    device.addEventListener("uncapturederror", (e) => {
      const msg = (e as GPUUncapturedErrorEvent).error.message;
      this.error ??= msg;
    });
  }

  /**
   * Largest storage binding in bytes: the device's maxStorageBufferBindingSize (requested at the
   * adapter's maximum), capped by maxBufferSize, or a lower test override. Tensors larger than
   * this are stored in row blocks (see GpuScope).
   */
  get maxBinding(): number {
    const l = this.device.limits;
    const dev = Math.min(l.maxStorageBufferBindingSize, l.maxBufferSize);
    return this.bindingOverride === null ? dev : Math.min(dev, this.bindingOverride);
  }

  /**
   * @internal Test hook: pretends the device binds at most `bytes` (a multiple of 4; null
   * restores the device's limit), so that small shapes exercise the block-split paths.
   */
  setBindingLimit(bytes: number | null): void {
    if (bytes !== null && (!Number.isInteger(bytes) || bytes < 16 || bytes % 4 !== 0)) {
      throw new Error(`binding limit ${bytes} must be a multiple of 4, at least 16`);
    }
    this.bindingOverride = bytes;
  }

  /**
   * @internal Test hook: the pool's base cap in bytes, fixed or (`adaptive`) under
   * `poolLimit`'s rule with the high-water mark restarted at the live bytes now; null restores
   * the default (POOL_CAP_BYTES, adaptive).
   */
  setPoolCap(bytes: number | null, adaptive = false): void {
    this.poolBase = bytes ?? POOL_CAP_BYTES;
    this.poolAdaptive = bytes === null || adaptive;
    if (bytes !== null && adaptive) this.mostHeldBytes = this.outstandingBytes;
    this.evictFor(0);
  }

  /**
   * Idle bytes the pool may keep now: the base cap, or more where live and pooled buffers
   * together stay within the most the device has held, so that pooling never raises the
   * footprint past a peak the workload already reached.
   */
  private get poolLimit(): number {
    return this.poolAdaptive
      ? Math.max(this.poolBase, this.mostHeldBytes - this.outstandingBytes)
      : this.poolBase;
  }

  /**
   * Registers kernel `name` with the source `make()` returns (once; later calls reuse it), for
   * kernels whose text is generated for the device (matmul_subgroup.ts); no include prepended.
   */
  generatedKernel(name: string, make: () => string): string {
    if (!this.kernels.has(name)) this.kernels.set(name, make());
    return name;
  }

  /**
   * Registers kernel `name` as `derive` of kernel `base`'s source (once; later calls reuse it),
   * for variants that differ in declarations only; then `pipeline(name)` and `dispatch` take it.
   */
  derivedKernel(name: string, base: string, derive: (code: string) => string): string {
    if (!this.kernels.has(name)) {
      const code = this.kernels.get(base);
      if (code === undefined) throw new Error(`kernel "${base}" not found in the .wgsl files`);
      this.kernels.set(name, derive(code));
    }
    return name;
  }

  /** The `struct Params` fields of a kernel (parsed once), or null when it has none. */
  paramsOf(kernel: string): readonly ParamField[] | null {
    if (!this.layouts.has(kernel)) {
      const code = this.kernels.get(kernel);
      if (code === undefined) throw new Error(`kernel "${kernel}" not found in the .wgsl files`);
      this.layouts.set(kernel, paramFields(kernel, code));
    }
    return this.layouts.get(kernel)!;
  }

  /** Compiled pipeline for a kernel (and override constants), cached. */
  pipeline(name: string, constants?: Record<string, number>): GPUComputePipeline {
    const key = constants ? `${name}|${JSON.stringify(constants)}` : name;
    let p = this.pipelines.get(key);
    if (!p) {
      const code = this.kernels.get(name);
      if (code === undefined) throw new Error(`kernel "${name}" not found in the .wgsl files`);
      const module = this.device.createShaderModule({ code, label: name });
      p = this.device.createComputePipeline({
        layout: "auto",
        label: name,
        compute: { module, entryPoint: "main", constants },
      });
      this.pipelines.set(key, p);
    }
    return p;
  }

  /**
   * Registers `dispose` as the owner of something derived from `buf`'s current contents (a
   * packed copy of a frozen weight): it is called, once, when `buf` is released or written by a
   * copy or clear (`invalidate`), so the derived object never outlives the contents it mirrors.
   */
  derive(buf: GPUBuffer, dispose: () => void): void {
    const set = this.derived.get(buf) ?? new Set();
    set.add(dispose);
    this.derived.set(buf, set);
  }

  /** Forgets `dispose` as an owner registered by `derive` (its owner takes it over). */
  underive(buf: GPUBuffer, dispose: () => void): void {
    const set = this.derived.get(buf);
    if (!set) return;
    set.delete(dispose);
    if (set.size === 0) this.derived.delete(buf);
  }

  /**
   * Destroys `obj` (a texture that encoded, not yet submitted work may still use) right after
   * the next submit.
   */
  retire(obj: { destroy(): void }): void {
    if (this.encoder) this.retired.push(obj);
    else if (this.pending.length > 0) this.pending[this.pending.length - 1].retired.push(obj);
    else obj.destroy();
  }

  /** Disposes what was derived from `buf` (its contents are about to change or be reused). */
  invalidate(buf: GPUBuffer): void {
    const set = this.derived.get(buf);
    if (!set) return;
    this.derived.delete(buf);
    for (const d of set) d();
  }

  /** Restarts the high-water marks of live buffers at the current counts. */
  resetPeak(): void {
    this.peakOutstanding = this.outstanding;
    this.peakOutstandingBytes = this.outstandingBytes;
  }

  private handOut(size: number): void {
    this.outstanding++;
    this.outstandingBytes += size;
    this.peakOutstanding = Math.max(this.peakOutstanding, this.outstanding);
    this.peakOutstandingBytes = Math.max(this.peakOutstandingBytes, this.outstandingBytes);
    this.mostHeldBytes = Math.max(this.mostHeldBytes, this.outstandingBytes);
  }

  /** A storage buffer of at least `bytes` (pooled by exact size; contents undefined). */
  alloc(bytes: number): GPUBuffer {
    const size = Math.max(4, Math.ceil(bytes / 4) * 4);
    this.handOut(size);
    const list = this.pool.get(size);
    if (list && list.length > 0) {
      this.pooledBytes -= size;
      const buf = list.pop()!;
      this.pooledOrder.delete(buf);
      return buf;
    }
    // a new buffer: the pool gives back what would take the total past the limit
    this.evictFor(0);
    return this.device.createBuffer({ size, usage: pooledUsage() });
  }

  /** Buffers currently idle in the pool (tests check that scopes return what they take). */
  pooledBufferCount(bytes?: number): number {
    if (bytes !== undefined) {
      return this.pool.get(Math.max(4, Math.ceil(bytes / 4) * 4))?.length ?? 0;
    }
    let n = 0;
    for (const l of this.pool.values()) n += l.length;
    return n;
  }

  /** A fresh buffer initialised from host data (fresh, so no pending command can see it). */
  upload(data: Float32Array | Int32Array): GPUBuffer {
    const size = Math.max(4, data.byteLength);
    this.handOut(size);
    this.evictFor(0);
    const buf = this.device.createBuffer({ size, usage: pooledUsage(), mappedAtCreation: true });
    const view = data instanceof Int32Array
      ? new Int32Array(buf.getMappedRange())
      : new Float32Array(buf.getMappedRange());
    view.set(data);
    buf.unmap();
    // a large upload goes out now, so its staging copy is not held until the next submit
    if (size >= UPLOAD_SUBMIT_BYTES) this.device.queue.submit([]);
    return buf;
  }

  /** A device-lifetime buffer (constant tables): destroyed with the device, never pooled. */
  uploadPersistent(data: Float32Array | Int32Array): GPUBuffer {
    const b = this.upload(data);
    this.outstanding--;
    this.outstandingBytes -= b.size;
    this.persistent.push(b);
    return b;
  }

  /**
   * Returns a buffer to the pool. Safe while earlier encoded work still uses it: the queue runs
   * in order, so a later user only ever writes after those reads.
   */
  release(buf: GPUBuffer): void {
    this.invalidate(buf);
    this.outstanding--;
    this.outstandingBytes -= buf.size;
    if (buf.size > this.poolLimit) {
      this.retire(buf);
      return;
    }
    this.evictFor(buf.size);
    const list = this.pool.get(buf.size) ?? [];
    list.push(buf);
    this.pool.set(buf.size, list);
    this.pooledBytes += buf.size;
    // idle once the batch holding the work encoded so far is submitted
    this.pooledOrder.set(buf, this.flushed + (this.encoder ? 1 : 0));
  }

  /**
   * Makes room for `bytes` in the pool by dropping the least recently released buffers: when the
   * sizes in use change (a prefill of 64 x 64 rows after a training step), the newest buffers
   * are the ones the next layer asks for again, while the old sizes would hold the pool full and
   * send every new buffer to destruction. A buffer whose last user is submitted is destroyed at
   * once (its memory goes back now, not at the next host read); others after the next submit.
   */
  private evictFor(bytes: number): void {
    for (const [old, idleAfter] of this.pooledOrder) {
      if (this.pooledBytes + bytes <= this.poolLimit) return;
      this.pooledOrder.delete(old);
      const list = this.pool.get(old.size)!;
      list.splice(list.indexOf(old), 1);
      if (list.length === 0) this.pool.delete(old.size);
      this.pooledBytes -= old.size;
      if (this.submits >= idleAfter) old.destroy();
      else this.retire(old);
    }
  }

  private enc(): GPUCommandEncoder {
    this.encoder ??= this.device.createCommandEncoder();
    return this.encoder;
  }

  private endPass(): void {
    if (this.pass) {
      this.pass.end();
      this.pass = null;
    }
  }

  /**
   * Encodes one dispatch of `kernel`. Binding 0 is the uniform `params` (when `params` is given;
   * checked against the kernel's struct Params, see encodeParams), bindings 1.. are `buffers` in
   * order; every declared binding must be used by the kernel.
   */
  dispatch(
    kernel: string,
    buffers: readonly GPUBuffer[],
    groups: readonly [number, number?, number?],
    params?: Params,
    constants?: Record<string, number>,
  ): void {
    this.dispatchResources(
      kernel,
      buffers.map((buffer) => ({ buffer })),
      groups,
      params,
      constants,
    );
  }

  /** Binding numbers of the `var<storage, read_write>` declarations of a kernel. */
  private writesOf(kernel: string): ReadonlySet<number> {
    let w = this.writes.get(kernel);
    if (!w) {
      const code = this.kernels.get(kernel) ?? "";
      const re = /@binding\((\d+)\)\s*var<storage,\s*read_write>/g;
      w = new Set([...code.matchAll(re)].map((m) => Number(m[1])));
      this.writes.set(kernel, w);
    }
    return w;
  }

  /**
   * `dispatch` with any binding resources (texture views too) at bindings 1.. (0 is `params`
   * when given). Buffers the kernel declares read_write lose what was derived from them.
   */
  dispatchResources(
    kernel: string,
    resources: readonly GPUBindingResource[],
    groups: readonly [number, number?, number?],
    params?: Params,
    constants?: Record<string, number>,
  ): void {
    if ((groups[0] ?? 0) === 0 || (groups[1] ?? 1) === 0 || (groups[2] ?? 1) === 0) return;
    if (this.slots >= SLOTS || this.dispatches >= this.batchLimit) this.flush();
    const pipeline = this.pipeline(kernel, constants);
    const entries: GPUBindGroupEntry[] = [];
    let first = 0;
    if (!params && this.paramsOf(kernel) !== null) {
      throw new Error(`kernel ${kernel}: declares struct Params but was given no parameters`);
    }
    if (params) {
      const view = new DataView(this.uniformData, this.slots * SLOT, SLOT);
      encodeParams(kernel, this.paramsOf(kernel), params, view);
      entries.push({
        binding: 0,
        resource: { buffer: this.uniform, offset: this.slots * SLOT, size: SLOT },
      });
      this.slots++;
      first = 1;
    }
    resources.forEach((resource, i) => entries.push({ binding: first + i, resource }));
    if (this.derived.size > 0) {
      const w = this.writesOf(kernel);
      for (const e of entries) {
        const b = (e.resource as GPUBufferBinding).buffer;
        if (w.has(e.binding) && b) this.invalidate(b);
      }
    }
    const bindGroup = this.device.createBindGroup({
      layout: pipeline.getBindGroupLayout(0),
      entries,
    });
    this.pass ??= this.enc().beginComputePass();
    this.pass.setPipeline(pipeline);
    this.pass.setBindGroup(0, bindGroup);
    this.pass.dispatchWorkgroups(groups[0], groups[1] ?? 1, groups[2] ?? 1);
    this.dispatches++;
  }

  /** Encodes a buffer-to-buffer copy (ordered with the dispatches). */
  copy(src: GPUBuffer, srcOffset: number, dst: GPUBuffer, dstOffset: number, bytes: number): void {
    if (bytes === 0) return;
    this.invalidate(dst);
    this.endPass();
    this.enc().copyBufferToBuffer(src, srcOffset, dst, dstOffset, bytes);
    this.dispatches++;
  }

  /** Encodes a buffer-to-texture copy (ordered with the dispatches). */
  copyToTexture(
    src: GPUTexelCopyBufferInfo,
    dst: GPUTexelCopyTextureInfo,
    size: readonly [number, number],
  ): void {
    if (this.dispatches >= this.batchLimit) this.flush();
    this.endPass();
    this.enc().copyBufferToTexture(src, dst, [size[0], size[1]]);
    this.dispatches++;
  }

  /** Encodes zero-filling of a buffer range (ordered with the dispatches). */
  clear(buf: GPUBuffer, bytes?: number): void {
    this.invalidate(buf);
    this.endPass();
    this.enc().clearBuffer(buf, 0, bytes === undefined ? undefined : Math.ceil(bytes / 4) * 4);
    this.dispatches++;
  }

  /** Dispatches per batch: shorter batches where a submit holds the JS thread while it runs. */
  private get batchLimit(): number {
    return this.deferSubmits ? SOFTWARE_BATCH : MAX_BATCH;
  }

  /**
   * Ends the encoded batch: submits it (uniforms are written first; the queue keeps the order),
   * or queues it for `read` / `sync` on a software adapter.
   */
  flush(): void {
    this.endPass();
    if (!this.encoder) return;
    const batch: PendingBatch = {
      uniforms: this.slots > 0
        ? (this.deferSubmits
          ? new Uint8Array(this.uniformData.slice(0, this.slots * SLOT))
          : new Uint8Array(this.uniformData, 0, this.slots * SLOT))
        : null,
      commands: this.encoder.finish(),
      retired: this.retired.splice(0),
    };
    this.encoder = null;
    this.slots = 0;
    this.dispatches = 0;
    this.flushed++;
    if (this.deferSubmits) this.pending.push(batch);
    else this.submitBatch(batch);
  }

  private submitBatch(b: PendingBatch): void {
    if (b.uniforms) this.device.queue.writeBuffer(this.uniform, 0, b.uniforms);
    this.device.queue.submit([b.commands]);
    this.submits++;
    for (const r of b.retired) r.destroy();
  }

  /** Submits the queued batches in order, with a turn of the event loop between two. */
  private async drain(): Promise<void> {
    while (this.pending.length > 0) {
      this.submitBatch(this.pending.shift()!);
      if (this.pending.length > 0) await eventLoopTurn();
    }
  }

  /**
   * Copies buffers to the host with one submit and one wait. The sources share staging buffers
   * of up to READ_STAGING_BYTES (at 8-byte offsets, as mapped ranges need): a LoRA snapshot reads
   * ~400 tensors, and a staging buffer and a map per tensor cost more than the copy.
   */
  async read(srcs: readonly { buffer: GPUBuffer; bytes: number }[]): Promise<ArrayBuffer[]> {
    const cap = Math.min(READ_STAGING_BYTES, this.device.limits.maxBufferSize);
    const staging: GPUBuffer[] = [];
    const at: { stage: number; offset: number }[] = [];
    let start = 0;
    let used = 0;
    const close = (end: number) => {
      if (end === start) return;
      const s = this.device.createBuffer({
        size: Math.max(used, 8),
        usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
      });
      for (let i = start; i < end; i++) {
        const size = Math.ceil(srcs[i].bytes / 4) * 4;
        if (size > 0) this.copy(srcs[i].buffer, 0, s, at[i].offset, size);
      }
      staging.push(s);
      start = end;
      used = 0;
    };
    srcs.forEach(({ bytes }, i) => {
      const size = Math.ceil(bytes / 8) * 8;
      if (used > 0 && used + size > cap) close(i);
      at.push({ stage: staging.length, offset: used });
      used += size;
    });
    close(srcs.length);
    this.flush();
    await this.drain();
    this.waits++;
    try {
      await Promise.all(staging.map((s) => s.mapAsync(GPUMapMode.READ)));
      if (this.error) {
        const e = this.error;
        this.error = null;
        throw new Error(e);
      }
      return srcs.map(({ bytes }, i) => {
        if (bytes === 0) return new ArrayBuffer(0);
        // a copy: unmap detaches the mapped range
        return staging[at[i].stage].getMappedRange(at[i].offset, Math.ceil(bytes / 4) * 4)
          .slice(0, bytes);
      });
    } finally {
      // Unmap before destroying: destroying a still-mapped buffer is where Deno's WebGPU has
      // been seen to corrupt the heap (an abort at process exit).
      staging.forEach((s) => {
        if (s.mapState === "mapped") s.unmap();
        s.destroy();
      });
    }
  }

  /** Waits until all submitted work is done (used before timing and at shutdown). */
  async sync(): Promise<void> {
    this.flush();
    await this.drain();
    this.waits++;
    await this.device.queue.onSubmittedWorkDone();
  }

  /** Frees pooled buffers and the device. */
  destroy(): void {
    this.flush();
    for (const b of this.pending.splice(0)) this.submitBatch(b);
    for (const list of this.pool.values()) for (const b of list) b.destroy();
    for (const b of this.persistent) b.destroy();
    for (const r of this.retired.splice(0)) r.destroy();
    this.pool.clear();
    this.pooledOrder.clear();
    this.uniform.destroy();
    this.device.destroy();
  }
}
