// The judge prompt shared by the HTTP and LM judges: its default text and the placeholders it
// must hold. A leaf (no imports), so the run configuration can check a template.

export const DEFAULT_JUDGE_TEMPLATE = `Two AI assistants answered the same user prompt. Decide which response is better: more helpful, correct, and clear.

[Prompt]
{prompt}

[Response A]
{a}

[Response B]
{b}

Which response is better? Answer with a single letter: A or B.`;

/** The placeholders a judge template lacks. */
export function missingPlaceholders(template: string): string[] {
  return ['{prompt}', '{a}', '{b}'].filter((p) => !template.includes(p));
}
