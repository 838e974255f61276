// AbortSignal handling shared by every cancellable call: one error for an aborted operation.

/**
 * The error an operation aborted through `signal` rejects with: the signal's reason when it is
 * an Error (AbortSignal.abort() gives a DOMException named AbortError), else an Error named
 * AbortError whose message is the reason when that is a string.
 */
export function abortError(signal: AbortSignal): Error {
  const reason: unknown = signal.reason;
  if (reason instanceof Error) return reason;
  const err = new Error(typeof reason === 'string' ? reason : 'The operation was aborted');
  err.name = 'AbortError';
  return err;
}

/** Throws abortError(signal) when `signal` has been aborted; the check before each unit of work. */
export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw abortError(signal);
}
