/**
 * NaN-aware statistics for GRPO metrics, matching torch.nanmean and TRL's `nanstd` (Bessel's
 * correction over the non-NaN count). A reward function may return null for a sample it does not
 * apply to; those become NaN and are skipped here rather than dragging a mean to NaN.
 * @module
 */

/** A flat map of metric name to value, with TRL's metric names ("clip_ratio/low_mean", ...). */
export type GrpoMetrics = Readonly<Record<string, number>>;

/** Mean of the non-NaN values; NaN when there are none (torch.nanmean). */
export const nanMean = (values: ArrayLike<number>): number => {
  let sum = 0;
  let n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isNaN(v)) {
      sum += v;
      n++;
    }
  }
  return n === 0 ? NaN : sum / n;
};

/**
 * Sample standard deviation (N-1) of the non-NaN values; NaN when fewer than two (TRL's nanstd
 * computes variance * n / (n - 1), which is 0/0 for n = 1).
 */
export const nanStd = (values: ArrayLike<number>): number => {
  const mean = nanMean(values);
  let ss = 0;
  let n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isNaN(v)) {
      ss += (v - mean) * (v - mean);
      n++;
    }
  }
  return n < 2 ? NaN : Math.sqrt(ss / (n - 1));
};

/** Min, mean and max of `values`; all 0 when empty (TRL logs 0 for an empty selection). */
export const minMeanMax = (
  values: ArrayLike<number>,
): { min: number; mean: number; max: number } => {
  if (values.length === 0) return { min: 0, mean: 0, max: 0 };
  let min = Infinity;
  let max = -Infinity;
  let sum = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v < min) min = v;
    if (v > max) max = v;
    sum += v;
  }
  return { min, mean: sum / values.length, max };
};
