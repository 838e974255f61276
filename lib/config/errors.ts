// Errors that name a field of the run configuration. A config the schema refuses is a
// RunConfigError (lib/config/load.ts); a SetupError is a config the schema accepts but that
// cannot be set up as it stands — a prompt file that is missing, an unset API-key variable, a
// tokenizer of another model — and names the field to change.

/** A field of the configuration: ['preference', 'model'], ['preference', 'A', 0, 1]. */
export type FieldPath = readonly (string | number)[];

/** `training.optimizer.lr`, `preference.A[0][1]`; `(top level)` for the empty path. */
export function formatFieldPath(path: readonly PropertyKey[]): string {
  return path.map((p, i) => (typeof p === 'number' ? `[${p}]` : `${i ? '.' : ''}${String(p)}`)).join('') || '(top level)';
}

/** A problem the user can fix in the configuration; `path` names the field, and the message starts with it. */
export class SetupError extends Error {
  override name = 'SetupError';
  readonly path: FieldPath;
  constructor(path: FieldPath, detail: string, options?: ErrorOptions) {
    super(path.length > 0 ? `${formatFieldPath(path)}: ${detail}` : detail, options);
    this.path = path;
  }
}
