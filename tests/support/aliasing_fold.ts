/**
 * NEGATIVE CONTROL, never used by the library: TRL v0.15.0's push sequence, reproduced to prove
 * the snapshot property tests can see the aliasing bug. It merges the adapter into the LIVE
 * weights in place, takes a state dict whose arrays alias those weights, then unmerges in place,
 * so the "snapshot" it returns holds the base weights again (and follows later mutations).
 */
import type { HostTensor } from "../../src/model/weights.ts";

/** Live (mutable) weights keyed by HF name. */
export type LiveWeights = Map<string, HostTensor>;

const deltaInPlace = (
  w: Float32Array,
  a: HostTensor,
  b: HostTensor,
  s: number,
  sign: 1 | -1,
) => {
  const [out, r] = b.shape;
  const inp = a.shape[1];
  for (let o = 0; o < out; o++) {
    for (let i = 0; i < inp; i++) {
      let acc = 0;
      for (let k = 0; k < r; k++) acc += b.data[o * r + k] * a.data[k * inp + i];
      w[o * inp + i] += sign * s * acc;
    }
  }
};

/** merge_adapter(); state_dict() (views); unmerge_adapter(): returns aliased arrays. */
export const aliasingFold = (
  live: LiveWeights,
  adapter: ReadonlyMap<string, { a: HostTensor; b: HostTensor }>,
  scale: number,
): Map<string, HostTensor> => {
  for (const [path, { a, b }] of adapter) {
    deltaInPlace(live.get(`${path}.weight`)!.data, a, b, scale, 1);
  }
  const stateDict = new Map(live); // views of the live arrays, as torch's state_dict() returns
  for (const [path, { a, b }] of adapter) {
    deltaInPlace(live.get(`${path}.weight`)!.data, a, b, scale, -1);
  }
  return stateDict;
};
