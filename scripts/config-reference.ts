// `npm run docs`: writes docs/configuration.md, the run configuration's reference, from the zod
// schema in lib/config/schema.ts (through its JSON Schema, as a config file is read: defaults may
// be left out). Every field gets its path, type, default, allowed values and its description
// (`.describe()` / `.meta({ description })` in the schema) where it has one.
// test/docs-config.test.ts renders it again and fails if the file differs.
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { format, resolveConfig } from 'prettier';
import { z } from 'zod';
import { runConfigSchema } from '../lib/config/schema.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const CONFIG_REFERENCE_PATH = path.join(root, 'docs', 'configuration.md');

/** The subset of JSON Schema that z.toJSONSchema writes for the config. */
interface JsonSchema {
  type?: string;
  description?: string;
  default?: unknown;
  const?: unknown;
  enum?: unknown[];
  properties?: Record<string, JsonSchema>;
  required?: string[];
  oneOf?: JsonSchema[];
  anyOf?: JsonSchema[];
  items?: JsonSchema | false;
  prefixItems?: JsonSchema[];
  minItems?: number;
  maxItems?: number;
  minimum?: number;
  maximum?: number;
  exclusiveMinimum?: number;
  exclusiveMaximum?: number;
  minLength?: number;
  maxLength?: number;
  format?: string;
  pattern?: string;
}

interface Row {
  path: string;
  type: string;
  default: string;
  allowed: string;
  description: string;
}

const code = (v: unknown): string => `\`${JSON.stringify(v)}\``;
// Table cells are one line; a pipe would end the cell.
const cell = (s: string): string => s.replace(/\s*\n\s*/g, ' ').replace(/\|/g, '\\|');

function typeOf(s: JsonSchema): string {
  const variants = s.oneOf ?? s.anyOf;
  if (variants) return variants.map(typeOf).join(' or ');
  if (s.const !== undefined) return typeof s.const;
  if (s.type === 'array') {
    if (s.prefixItems) return `[${s.prefixItems.map(typeOf).join(', ')}]`;
    const item = s.items ? typeOf(s.items) : 'unknown';
    return s.minItems !== undefined && s.minItems === s.maxItems ? `${item}[${s.minItems}]` : `${item}[]`;
  }
  return s.type ?? 'any';
}

function allowedOf(s: JsonSchema): string {
  if (s.const !== undefined) return code(s.const);
  if (s.enum) return s.enum.map(code).join(', ');
  const bounds: string[] = [];
  if (s.exclusiveMinimum !== undefined) bounds.push(`> ${s.exclusiveMinimum}`);
  if (s.minimum !== undefined) bounds.push(`≥ ${s.minimum}`);
  if (s.exclusiveMaximum !== undefined) bounds.push(`< ${s.exclusiveMaximum}`);
  // zod writes the largest safe integer as every integer's maximum: no limit worth stating
  if (s.maximum !== undefined && s.maximum < Number.MAX_SAFE_INTEGER) bounds.push(`≤ ${s.maximum}`);
  if (s.minLength === 1 && s.maxLength === undefined) bounds.push('not empty');
  else if (s.minLength !== undefined || s.maxLength !== undefined) bounds.push(`length ${s.minLength ?? 0} to ${s.maxLength ?? '∞'}`);
  if (s.format === 'uri') bounds.push('a URL');
  else if (s.format) bounds.push(`format ${s.format}`);
  if (s.pattern) bounds.push(`matches \`/${s.pattern}/\``);
  if (s.type === 'array' && s.items) {
    const inner = allowedOf(s.items);
    if (inner) bounds.push(`each ${inner}`);
  }
  if (s.prefixItems) {
    const inner = [...new Set(s.prefixItems.map(allowedOf).filter(Boolean))];
    if (inner.length === 1) bounds.push(`each ${inner[0]}`);
  }
  return bounds.join(', ');
}

function defaultOf(s: JsonSchema, required: boolean): string {
  if (s.default !== undefined) return code(s.default);
  return required ? '**required**' : '—';
}

/** One row for `s` at `at`, then one for each field below it. */
function rows(s: JsonSchema, at: string, required: boolean, out: Row[]): Row[] {
  out.push({
    path: `\`${at}\``,
    type: typeOf(s),
    default: defaultOf(s, required),
    allowed: allowedOf(s),
    description: s.description ?? '',
  });
  if (s.properties)
    for (const [key, field] of Object.entries(s.properties)) rows(field, `${at}.${key}`, s.required?.includes(key) ?? false, out);
  return out;
}

function table(list: Row[]): string {
  // The description column only where the schema describes some field of the table.
  const described = list.some((r) => r.description !== '');
  const header = ['field', 'type', 'default', 'allowed values', ...(described ? ['description'] : [])];
  const lines = [`| ${header.join(' | ')} |`, `| ${header.map(() => '---').join(' | ')} |`];
  for (const r of list) {
    const cells = [r.path, r.type, r.default, r.allowed, ...(described ? [r.description] : [])];
    lines.push(`| ${cells.map(cell).join(' | ')} |`);
  }
  return lines.join('\n');
}

function section(key: string, s: JsonSchema, required: boolean): string {
  const parts = [`## \`${key}\``, ''];
  if (s.description) parts.push(cell(s.description), '');
  parts.push(required ? 'Required.' : s.default !== undefined ? `Optional (default ${code(s.default)}).` : 'Optional.', '');
  const variants = s.oneOf ?? s.anyOf;
  if (variants) {
    // A discriminated union: one table per variant, named by its discriminator's value.
    for (const variant of variants) {
      const [tagKey, tag] = Object.entries(variant.properties ?? {}).find(([, f]) => f.const !== undefined) ?? [];
      parts.push(tagKey && tag ? `### \`${key}.${tagKey}: ${JSON.stringify(tag.const)}\`` : `### one form of \`${key}\``, '');
      if (variant.description) parts.push(cell(variant.description), '');
      const list: Row[] = [];
      for (const [field, f] of Object.entries(variant.properties ?? {}))
        rows(f, `${key}.${field}`, variant.required?.includes(field) ?? false, list);
      parts.push(table(list), '');
    }
    return parts.join('\n');
  }
  const list: Row[] = [];
  for (const [field, f] of Object.entries(s.properties ?? {})) rows(f, `${key}.${field}`, s.required?.includes(field) ?? false, list);
  parts.push(table(list), '');
  return parts.join('\n');
}

/** docs/configuration.md's text: rendered from the schema, then formatted as Prettier formats the repository's Markdown. */
export async function renderConfigReference(): Promise<string> {
  const schema = z.toJSONSchema(runConfigSchema, { io: 'input', unrepresentable: 'any' }) as JsonSchema;
  const parts = [
    '# Run configuration reference',
    '',
    '<!-- Generated by scripts/config-reference.ts from lib/config/schema.ts. Do not edit: run `npm run docs`. -->',
    '',
    'A run configuration is a YAML or JSON file (`sppo run --config run.yaml`) or the object passed to `parseConfig`.',
    'Unknown fields are refused everywhere, and every error names the field, e.g. `training.eta: must be > 0`.',
    'Fields marked **required** have no default; `—` marks an optional field without one.',
    'Relative paths (`model.path`, `data.prompts`, `run.dir`, `preference.module`, `preference.path`) resolve against the config file’s folder.',
    '',
  ];
  if (schema.description) parts.push(cell(schema.description), '');
  for (const [key, s] of Object.entries(schema.properties ?? {})) parts.push(section(key, s, schema.required?.includes(key) ?? false));
  const options = (await resolveConfig(CONFIG_REFERENCE_PATH)) ?? {};
  return format(parts.join('\n'), { ...options, parser: 'markdown' });
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  writeFileSync(CONFIG_REFERENCE_PATH, await renderConfigReference());
  console.log(`wrote ${path.relative(root, CONFIG_REFERENCE_PATH)}`);
}
