// Seeded pseudo-random numbers for everything that must be reproducible from a run's seed
// (prompt shuffles and splits, generated prompts): mulberry32 — small, fast, not cryptographic;
// and the per-prompt seeds of generation (promptSeeds).

export interface Rng {
  /** uniform in [0, 1) */
  next(): number;
  /** uniform integer in [0, n) */
  int(n: number): number;
}

export function seededRng(seed: number): Rng {
  if (!Number.isSafeInteger(seed)) throw new RangeError(`the seed must be an integer, got ${seed}`);
  // fold the high bits in so seeds beyond 2^32 still differ
  let s = (seed ^ (Math.floor(seed / 2 ** 32) * 0x9e3779b9)) >>> 0;
  const next = (): number => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
  return {
    next,
    int(n: number): number {
      if (!Number.isInteger(n) || n < 1) throw new RangeError(`int(n) needs an integer n ≥ 1, got ${n}`);
      return Math.floor(next() * n);
    },
  };
}

/** A shuffled copy (Fisher–Yates); the same items and seed always give the same order. */
export function seededShuffle<T>(items: readonly T[], seed: number): T[] {
  const rng = seededRng(seed);
  const out = items.slice();
  for (let i = out.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

/** What a batch of generations is for: each purpose samples from streams of its own. */
export const SEED_PURPOSE = {
  /** `sppo run`: iteration t's training samples (from π_{t-1}) */
  training: 0,
  /** `sppo run`: iteration t's evaluation samples */
  evaluation: 1,
  /** `sppo generate` */
  generate: 2,
} as const;

/**
 * One generation seed per prompt, for prompts 0 … n−1: distinct for every (seed mod 10⁶,
 * iteration < 1000, purpose < 10, prompt index < 100 000), and safe integers. A prompt's seed
 * depends only on these and its index, never on the other prompts, so a prompt samples the same
 * tokens alone or in a batch, and no two prompts of a batch share a random stream.
 */
export function promptSeeds(seed: number, iteration: number, purpose: number, n: number): number[] {
  const base = ((seed % 1_000_000) * 1000 + iteration) * 10 + purpose;
  return Array.from({ length: n }, (_, i) => base * 100_000 + i);
}
