// The zod building blocks of the run configuration: numbers and paths with the messages its
// errors print. A leaf (zod only), shared by lib/config/schema.ts and the judges' options
// schemas (lib/preference/options).
import { z } from 'zod';

export const positive = () => z.number({ error: 'must be a number' }).gt(0, { error: 'must be > 0' });
export const nonNegative = () => z.number({ error: 'must be a number' }).min(0, { error: 'must be ≥ 0' });
export const positiveInt = () => z.int({ error: 'must be an integer' }).min(1, { error: 'must be an integer ≥ 1' });
export const nonNegativeInt = () => z.int({ error: 'must be an integer' }).min(0, { error: 'must be an integer ≥ 0' });
export const probability = () => nonNegative().max(1, { error: 'must be ≤ 1' });
export const nonEmpty = () => z.string().min(1, { error: 'must not be empty' });
/** a file or directory; a config file's relative paths resolve against its folder (lib/config/load.ts) */
export const filePath = () => z.string({ error: 'must be a path (a string)' }).min(1, { error: 'must not be empty' });
