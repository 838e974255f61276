// `sppo init`: writes a commented starting config — every field of the schema under its
// description, at its default unless an option sets it — that `sppo run --config` loads as is.
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { RunConfigInput } from '../../config/schema.js';
import { starterConfigText } from '../../config/starter.js';
import { demoConfigInput } from '../../demo/demo.js';
import { parseOptions, UsageError, type Command } from '../args.js';

const JUDGES = ['http', 'lm-judge', 'reward-model', 'function'] as const;
type Judge = (typeof JUDGES)[number];

const help = `Usage: sppo init [--out FILE] [--demo | --model DIR [--prompts FILE] [--judge KIND]]

Writes a starting run configuration: every field with its description as a comment, set to its
default unless an option below sets it, and the optional ones commented out. Edit it, then
\`sppo run --config FILE\`. An existing file is never overwritten.

  --out FILE      the config to write (default sppo.yaml; .yaml or .yml)
  --demo          the embedded demo (what \`sppo demo\` runs): no model or judge to provide
  --model DIR     the Hugging Face model directory to align (default models/MODEL)
  --prompts FILE  a JSONL or Parquet prompt file (default prompts.jsonl)
  --judge KIND    ${JUDGES.join(' | ')} (default http: an OpenAI-compatible endpoint)
  -h, --help      this text

Paths are written relative to the config's folder, as the config reads them.`;

/** The sections a starting config sets; paths relative to the config's folder. */
function starterInput(o: { demo: boolean; model?: string; prompts?: string; judge: Judge }, rel: (p: string) => string): RunConfigInput {
  if (o.demo) return demoConfigInput();
  const preference: RunConfigInput['preference'] = {
    http: { kind: 'http' as const, baseUrl: 'http://127.0.0.1:8000/v1', model: 'JUDGE-MODEL' },
    'lm-judge': { kind: 'lm-judge' as const, path: rel('models/JUDGE-MODEL') },
    'reward-model': { kind: 'reward-model' as const, path: rel('models/REWARD-MODEL') },
    function: { kind: 'function' as const, module: rel('judge.mjs'), id: 'judge-v1' },
  }[o.judge];
  return {
    model: { path: rel(o.model ?? 'models/MODEL') },
    data: { prompts: rel(o.prompts ?? 'prompts.jsonl') },
    preference,
  };
}

export const initCommand: Command = {
  name: 'init',
  summary: 'write a commented starting config',
  help,
  async run(argv, io) {
    const v = parseOptions('init', argv, {
      out: { type: 'string' },
      demo: { type: 'boolean' },
      model: { type: 'string' },
      prompts: { type: 'string' },
      judge: { type: 'string' },
    });
    const out = path.resolve(v.out ?? 'sppo.yaml');
    if (!/\.ya?ml$/i.test(out)) throw new UsageError(`--out: ${out} must end in .yaml or .yml`);
    if (v.demo && (v.model !== undefined || v.prompts !== undefined || v.judge !== undefined))
      throw new UsageError('--demo brings its own policy, prompts and judge: drop --model, --prompts and --judge');
    const judge = (v.judge ?? 'http') as Judge;
    if (!JUDGES.includes(judge)) throw new UsageError(`--judge: must be one of ${JUDGES.join(', ')}, got '${v.judge}'`);
    // The config resolves relative paths against its own folder; the options name them from here.
    const rel = (p: string): string => path.relative(path.dirname(out), path.resolve(p)) || '.';
    const input = starterInput({ demo: v.demo ?? false, model: v.model, prompts: v.prompts, judge }, rel);
    const text = starterConfigText(input, [
      `SPPO run configuration written by sppo init${v.demo ? ' --demo' : ''}.`,
      'Every field is shown under its description; optional fields without a default are commented out. Run it with: sppo run --config ' +
        path.relative(process.cwd(), out),
    ]);
    try {
      await writeFile(out, text, { flag: 'wx' }); // wx: never replaces an existing file
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EEXIST') throw new UsageError(`${out} already exists; remove it or choose another --out`);
      if (code === 'ENOENT') throw new UsageError(`--out: the folder ${path.dirname(out)} does not exist`);
      throw err;
    }
    io.stdout.write(`wrote ${out}\n`);
    return 0;
  },
};
