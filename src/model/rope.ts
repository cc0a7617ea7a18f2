/**
 * Rotary frequencies of a config, as Hugging Face's modeling_rope_utils computes them: the
 * per-dimension inverse frequencies (in f32, rounded where torch rounds) and the attention
 * scaling that multiplies cos and sin. Plain RoPE keeps the theta number (the backends' own f32
 * table, unchanged); the scaled types give the rope op a host-computed table.
 * @module
 */
import type { RopeFrequencies } from "../backend/ops.ts";
import { ropeInvFreq } from "../backend/cpu/layers.ts";
import type { ModelConfig } from "./config.ts";

/** What the rope op of one forward call rotates by. */
export interface RopePlan {
  /** Base theta (plain RoPE) or the inverse-frequency table. */
  readonly freqs: RopeFrequencies;
  /**
   * HF's attention_scaling: cos and sin are multiplied by it, i.e. the rotated q and k are
   * scaled by it (1 for every type but yarn).
   */
  readonly scale: number;
}

const f = Math.fround;

/** HF's yarn mscale: 1 for scale <= 1, else 0.1 * m * ln(scale) + 1. */
const yarnMscale = (scale: number, m = 1): number => scale <= 1 ? 1 : 0.1 * m * Math.log(scale) + 1;

/**
 * The rotary plan of `c` for a call whose largest position is `maxPosition` (only dynamic NTK
 * depends on it: HF recomputes its base from seq_len = max(position_ids) + 1 when that exceeds
 * max_position_embeddings).
 */
export const ropePlan = (c: ModelConfig, maxPosition: number): RopePlan => {
  const s = c.ropeScaling;
  const dim = c.headDim;
  const half = dim / 2;
  if (!s) return { freqs: c.ropeTheta, scale: 1 };
  switch (s.type) {
    case "linear": {
      const inv = ropeInvFreq(dim, c.ropeTheta);
      return { freqs: inv.map((x) => f(x / f(s.factor))), scale: 1 };
    }
    case "dynamic": {
      const seqLen = maxPosition + 1;
      const m = c.maxPositionEmbeddings;
      if (seqLen <= m) return { freqs: ropeInvFreq(dim, c.ropeTheta), scale: 1 };
      const base = c.ropeTheta *
        Math.pow((s.factor * seqLen) / m - (s.factor - 1), dim / (dim - 2));
      return { freqs: ropeInvFreq(dim, f(base)), scale: 1 };
    }
    case "llama3": {
      const inv = ropeInvFreq(dim, c.ropeTheta);
      const old = s.originalMaxPositionEmbeddings;
      const lowWavelen = old / s.lowFreqFactor;
      const highWavelen = old / s.highFreqFactor;
      const out = new Float32Array(half);
      for (let i = 0; i < half; i++) {
        const wavelen = f(f(2 * Math.PI) / inv[i]);
        if (wavelen < highWavelen) out[i] = inv[i];
        else if (wavelen > lowWavelen) out[i] = f(inv[i] / s.factor);
        else {
          // medium frequencies: interpolate between scaled and unscaled
          const smooth = f(
            f(f(old / wavelen) - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor),
          );
          out[i] = f(f(f(1 - smooth) * inv[i]) / s.factor + f(smooth * inv[i]));
        }
      }
      return { freqs: out, scale: 1 };
    }
    case "yarn": {
      const base = c.ropeTheta;
      const original = s.originalMaxPositionEmbeddings ?? c.maxPositionEmbeddings;
      const factor = s.factor;
      const scale = s.attentionFactor ??
        (s.mscale && s.mscaleAllDim
          ? yarnMscale(factor, s.mscale) / yarnMscale(factor, s.mscaleAllDim)
          : yarnMscale(factor));
      const betaFast = s.betaFast || 32;
      const betaSlow = s.betaSlow || 1;
      const correctionDim = (rotations: number) =>
        (dim * Math.log(original / (rotations * 2 * Math.PI))) / (2 * Math.log(base));
      let low = correctionDim(betaFast);
      let high = correctionDim(betaSlow);
      if (s.truncate ?? true) {
        low = Math.floor(low);
        high = Math.ceil(high);
      }
      low = Math.max(low, 0);
      high = Math.min(high, dim - 1);
      if (low === high) high += 0.001; // HF: prevents a zero-width ramp
      const out = new Float32Array(half);
      for (let i = 0; i < half; i++) {
        const posFreq = f(Math.pow(base, f((2 * i) / dim)));
        const extrapolation = f(1 / posFreq);
        const interpolation = f(1 / f(factor * posFreq));
        const ramp = Math.min(1, Math.max(0, f(f(i - low) / f(high - low))));
        const extra = f(1 - ramp);
        out[i] = f(f(interpolation * f(1 - extra)) + f(extrapolation * extra));
      }
      return { freqs: out, scale };
    }
  }
};
