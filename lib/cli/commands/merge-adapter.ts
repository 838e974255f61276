// `sppo merge-adapter`: a PEFT LoRA adapter merged into its base, written as a full Hugging Face
// checkpoint (lib/io/peft.ts's mergeAdapter).
import path from 'node:path';
import { AdapterError, adapterBaseDir, mergeAdapter } from '../../io/peft.js';
import { existingPathOption, parseOptions, pathOption, requireOption, UsageError, type Command } from '../args.js';

const help = `Usage: sppo merge-adapter [--base DIR] --adapter DIR --out DIR [--dtype float32|bfloat16]

Merges a LoRA adapter (a PEFT adapter directory: adapter_config.json and
adapter_model.safetensors, as PEFT and saveAdapter write them) into its base model and
writes a full Hugging Face checkpoint that transformers, vLLM and \`sppo run\` load: every base
weight, with W + (alpha/r)·B·A in each adapted projection (computed in float64, rounded once),
the base's config.json, generation config and tokenizer files. The files appear in DIR only
when all are written; the base is read one tensor at a time.

  --base DIR       the base model directory the adapter was trained on (default: the one its
                   base_model_name_or_path names; a relative path from the working
                   directory, as PEFT reads it)
  --adapter DIR    the adapter directory
  --out DIR        where the merged checkpoint goes (not the base or the adapter directory)
  --dtype D        float32 | bfloat16 (default: bfloat16 when every base weight is, else float32)
  -h, --help       this text`;

/** The base model directory the adapter names (adapterBaseDir), or a UsageError asking for --base. */
async function namedBase(adapter: string): Promise<string> {
  try {
    return await adapterBaseDir(adapter);
  } catch (err) {
    if (!(err instanceof AdapterError)) throw err;
    throw new UsageError(`--adapter: ${err.message}; give the base with --base DIR`);
  }
}

export const mergeAdapterCommand: Command = {
  name: 'merge-adapter',
  summary: 'merge a LoRA adapter into its base model as a full checkpoint',
  help,
  async run(argv, io) {
    const values = parseOptions('merge-adapter', argv, {
      base: { type: 'string' },
      adapter: { type: 'string' },
      out: { type: 'string' },
      dtype: { type: 'string' },
    });
    const adapter = existingPathOption(values.adapter, 'adapter', 'merge-adapter');
    const base = values.base !== undefined ? existingPathOption(values.base, 'base', 'merge-adapter') : await namedBase(adapter);
    const out = path.resolve(requireOption(pathOption(values.out, 'out'), 'out', 'merge-adapter'));
    const dtype = values.dtype;
    if (dtype !== undefined && dtype !== 'float32' && dtype !== 'bfloat16')
      throw new UsageError(`--dtype must be float32 or bfloat16, got '${dtype}'`);
    const files = await mergeAdapter(base, adapter, out, { dtype });
    io.stdout.write(`merged ${adapter} into ${base}: ${files.length} files in ${out}\n`);
    return 0;
  },
};
