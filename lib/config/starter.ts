// A commented starting config (`sppo init`): every field of the schema in its order, each under
// its description; the values a caller gives, else the schema's defaults, are written out, and
// optional fields without a default are left commented out. Generated from the schema, so the
// file cannot drift from what loadConfig accepts.
import { stringify } from 'yaml';
import { z } from 'zod';
import { runConfigSchema, type RunConfigInput } from './schema.js';

interface Node {
  description?: string;
  default?: unknown;
  const?: unknown;
  enum?: unknown[];
  type?: string;
  properties?: Record<string, Node>;
  oneOf?: Node[];
}

const WIDTH = 96;

/** `text` as `# ` lines of at most WIDTH columns at `indent`. */
function comment(text: string, indent: string): string[] {
  const lines: string[] = [];
  let line = '';
  for (const word of text.split(/\s+/)) {
    if (line && indent.length + 2 + line.length + 1 + word.length > WIDTH) {
      lines.push(`${indent}# ${line}`);
      line = word;
    } else line = line ? `${line} ${word}` : word;
  }
  if (line) lines.push(`${indent}# ${line}`);
  return lines;
}

/** A value on one line: arrays and matrices in flow style, multi-line text as a JSON string (which YAML reads). */
function inline(value: unknown): string {
  if (typeof value === 'string' && value.includes('\n')) return JSON.stringify(value);
  return stringify(value, { collectionStyle: 'flow', flowCollectionPadding: false }).trimEnd();
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** The fields of an object node: a discriminated union resolves to the branch `value.kind` names. */
function fieldsOf(node: Node, value: Record<string, unknown>): Record<string, Node> {
  if (node.oneOf) {
    const branch = node.oneOf.find((b) => b.properties?.kind?.const === value.kind);
    if (!branch) throw new RangeError(`no kind ${JSON.stringify(value.kind)} in the schema`);
    return branch.properties ?? {};
  }
  return node.properties ?? {};
}

function render(node: Node, value: Record<string, unknown>, indent: string): string[] {
  const out: string[] = [];
  for (const [name, field] of Object.entries(fieldsOf(node, value))) {
    const given = value[name];
    const nested = field.type === 'object' && field.properties !== undefined;
    const doc = field.description ?? '';
    const allowed = field.enum ? ` (${field.enum.map((v) => JSON.stringify(v)).join(' | ')})` : '';
    out.push(...comment(doc + allowed, indent));
    if (nested && (given !== undefined || field.default !== undefined)) {
      const inner = isRecord(given) ? given : isRecord(field.default) ? field.default : {};
      out.push(`${indent}${name}:`, ...render(field, inner, `${indent}  `));
    } else if (given !== undefined || field.default !== undefined) {
      out.push(`${indent}${name}: ${inline(given ?? field.default)}`);
    } else {
      out.push(`${indent}# ${name}:`);
    }
  }
  return out;
}

/**
 * The YAML text of a starting config: `input`'s values (which must parse) with every other
 * field at its default or commented out, each under its description. Loading the text gives
 * exactly parseConfig(input).
 */
export function starterConfigText(input: RunConfigInput, header: readonly string[] = []): string {
  runConfigSchema.parse(input);
  const schema = z.toJSONSchema(runConfigSchema, { io: 'input' }) as Node;
  const lines = [...header.flatMap((h) => comment(h, '')), ''];
  const top = input as Record<string, unknown>;
  for (const [name, section] of Object.entries(schema.properties ?? {})) {
    const given = top[name];
    lines.push(...comment(section.description ?? name, ''));
    if (given === undefined && section.default === undefined) {
      lines.push(`# ${name}: (optional section, not used here)`, '');
      continue;
    }
    lines.push(`${name}:`, ...render(section, isRecord(given) ? given : {}, '  '), '');
  }
  return lines.join('\n');
}
