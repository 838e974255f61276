// `sppo run --config FILE`: an SPPO run (or its resumption) described by a config file.
import { loadConfig, RunConfigError } from '../../config/load.js';
import type { RunConfig } from '../../config/schema.js';
import { runSppo } from '../../sppo/run.js';
import { setupFromConfig } from '../../sppo/setup.js';
import { deviceLine, deviceOption, parseOptions, pathOption, requireOption, UsageError, type Command } from '../args.js';
import { finishRun, INTERRUPTED, runInterruptibly } from '../session.js';

const help = `Usage: sppo run --config FILE [--device DEV]

Runs SPPO as the config file (.yaml, .yml or .json) describes, or resumes the run in its
run.dir: finished stages are read back, never recomputed. The config's schema is lib/config;
unknown fields are refused and every error names its field.

  --config FILE   the run configuration (required)
  --device DEV    cpu | cuda | auto: where the policy trains and generates, and where an
                  lm-judge or reward-model judge runs (default cpu; not part of the config,
                  so a run may resume on another device)
  -h, --help      this text

model.preset 'demo' runs the embedded styled-reversal task (as \`sppo demo\`); model.path runs a
Hugging Face model directory with a tokenizer and a chat template. At the end the metrics table
is printed and <run.dir>/report.html and curves.png are written.`;

/** loadConfig's failures (unreadable, bad YAML/JSON, schema) are the user's to fix: exit 2. */
async function readConfig(file: string): Promise<RunConfig> {
  try {
    return await loadConfig(file);
  } catch (err) {
    if (err instanceof RunConfigError) throw err;
    throw new UsageError((err as Error).message);
  }
}

export const runCommand: Command = {
  name: 'run',
  summary: 'run (or resume) SPPO from a config file',
  help,
  async run(argv, io) {
    const values = parseOptions('run', argv, { config: { type: 'string' }, device: { type: 'string' } });
    const device = deviceOption(values.device);
    const config = await readConfig(requireOption(pathOption(values.config, 'config'), 'config', 'run'));
    const setup = await setupFromConfig(config, { device });
    io.stdout.write(deviceLine(setup.model, device));
    try {
      const result = await runInterruptibly(io, ['run', ...argv], (hooks) => runSppo(setup, hooks));
      if (!result) return INTERRUPTED;
      await finishRun(result.dir, io);
      return 0;
    } finally {
      await setup.model.dispose();
      await setup.preference.dispose();
    }
  },
};
