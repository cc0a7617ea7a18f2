/**
 * Argument validation of the activation ops (gegluTanh, softcap), shared by both backends.
 * @module
 */
import { ensure } from "../tensor.ts";

/** A soft-capping value must be a positive finite number. */
export const checkSoftcap = (op: string, cap: number): void =>
  ensure(Number.isFinite(cap) && cap > 0, op, () => `cap ${cap} must be a positive number`);
