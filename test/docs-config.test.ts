// docs/configuration.md is generated from the config schema (scripts/config-reference.ts): it
// must be what the schema renders to now, so that a changed field cannot leave the docs behind.
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { CONFIG_REFERENCE_PATH, renderConfigReference } from '../scripts/config-reference.js';

describe('docs/configuration.md', () => {
  it('is what scripts/config-reference.ts renders from lib/config/schema.ts', async () => {
    const rendered = await renderConfigReference();
    const onDisk = readFileSync(CONFIG_REFERENCE_PATH, 'utf8');
    if (onDisk !== rendered) expect.fail('docs/configuration.md is out of date with lib/config/schema.ts: run npm run docs');
  });

  it('names every top-level section and the fields a config must give', async () => {
    const rendered = await renderConfigReference();
    for (const section of ['model', 'data', 'generation', 'preference', 'training', 'run', 'sft'])
      expect(rendered).toContain(`## \`${section}\``);
    expect(rendered).toMatch(/\| `preference\.baseUrl` +\| string +\| \*\*required\*\* /);
    expect(rendered).toMatch(/\| `training\.optimizer\.lr` +\| number +\| `5e-7` /);
  });
});
