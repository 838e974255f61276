// The preference losses the engine implements, written once: the type, the config's enum,
// the CLI's choices and the training-set mode each loss reads all derive from this tuple.
// The addon reports its own list (kPreferenceLosses, native/include/sppo/preference.h); test/native-surface.test.ts asserts they agree.

export const PREFERENCE_LOSSES = ['sppo', 'sppo-pair', 'sppo-single', 'sppo-hard', 'dpo', 'ipo'] as const;

export type PreferenceLossName = (typeof PREFERENCE_LOSSES)[number];

/** 'all': every response with its own P̂ (the paper's Algorithm 1); 'pair': one (chosen, rejected) pair per prompt. */
export type DatasetMode = 'pair' | 'all';

const MODE_OF_LOSS: Record<PreferenceLossName, DatasetMode> = {
  sppo: 'all',
  'sppo-pair': 'pair',
  'sppo-single': 'pair',
  'sppo-hard': 'pair',
  dpo: 'pair',
  ipo: 'pair',
};

export function isPreferenceLoss(name: unknown): name is PreferenceLossName {
  return typeof name === 'string' && (PREFERENCE_LOSSES as readonly string[]).includes(name);
}

/** The training-set mode a loss reads: 'all' for sppo, 'pair' for the others. */
export function datasetModeForLoss(loss: PreferenceLossName): DatasetMode {
  if (!isPreferenceLoss(loss)) throw new RangeError(`unknown loss '${String(loss)}' (known: ${PREFERENCE_LOSSES.join(', ')})`);
  return MODE_OF_LOSS[loss];
}
