// Token ids cross into the native engine as int32: one check for every caller that packs them.

export const INT32_MIN = -(2 ** 31);
export const INT32_MAX = 2 ** 31 - 1;

/** Whether `v` is an integer that an int32 holds exactly (not NaN, not 1.5, not 2^31). */
export function isInt32(v: unknown): v is number {
  return Number.isInteger(v) && (v as number) >= INT32_MIN && (v as number) <= INT32_MAX;
}

/** The error for a token id that is not an int32; `where` names it in the caller's terms. */
export function tokenIdError(where: string, id: unknown): TypeError {
  return new TypeError(`${where} is not an integer id: ${String(id)}`);
}
