// `sppo run --config FILE`: an SPPO run (or its resumption) described by a config file.
import { loadConfig, RunConfigError } from '../../config/load.js';
import type { RunConfig } from '../../config/schema.js';
import { runSppo } from '../../sppo/run.js';
import { formatMemoryPlan } from '../../engine/memory.js';
import { runMemoryPlan, setupFromConfig } from '../../sppo/setup.js';
import {
  checkpointingOption,
  deviceLine,
  deviceOption,
  parseOptions,
  pathOption,
  requireOption,
  UsageError,
  type Command,
} from '../args.js';
import { finishRun, INTERRUPTED, runInterruptibly } from '../session.js';

const help = `Usage: sppo run --config FILE [--device DEV] [--activation-checkpointing on|off|auto]

Runs SPPO as the config file (.yaml, .yml or .json) describes, or resumes the run in its
run.dir: finished stages are read back, never recomputed. The config's schema is lib/config;
unknown fields are refused and every error names its field.

  --config FILE   the run configuration (required)
  --device DEV    cpu | cuda | auto: where the policy trains and generates, and where an
                  lm-judge or reward-model judge runs (default cpu; not part of the config,
                  so a run may resume on another device)
  --activation-checkpointing on | off | auto: keep only each layer's input and recompute
                  the layer in the backward pass (less memory, one more forward pass per
                  step, the same results); auto (default) turns it on when the memory plan
                  does not fit the device
  -h, --help      this text

The policy's memory plan (bytes per category: parameters, master weights, gradients,
optimizer state, activations, scratch, the generator's KV cache) is printed before the run
starts; a plan that does not fit the device is refused with what would fit.

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
    const values = parseOptions('run', argv, {
      config: { type: 'string' },
      device: { type: 'string' },
      'activation-checkpointing': { type: 'string' },
    });
    const device = deviceOption(values.device);
    const activationCheckpointing = checkpointingOption(values['activation-checkpointing']);
    const config = await readConfig(requireOption(pathOption(values.config, 'config'), 'config', 'run'));
    const setup = await setupFromConfig(config, { device, activationCheckpointing });
    io.stdout.write(deviceLine(setup.model, device));
    io.stdout.write(`${formatMemoryPlan(runMemoryPlan(setup))}\n`);
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
