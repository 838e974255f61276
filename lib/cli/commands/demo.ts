// `sppo demo`: the embedded styled-reversal run (lib/demo), alone or SPPO beside DPO and IPO.
import path from 'node:path';
import { runDemo } from '../../demo/demo.js';
import { isPreferenceLoss, PREFERENCE_LOSSES, type PreferenceLossName } from '../../engine/losses.js';
import type { IterationMetrics } from '../../sppo/run.js';
import type { Model } from '../../engine/model.js';
import { deviceLine, deviceOption, integerOption, parseOptions, pathOption, UsageError, type Command } from '../args.js';
import { finishRun, INTERRUPTED, runInterruptibly } from '../session.js';
import { compareTable } from '../table.js';

const DEFAULT_DIR = 'sppo-demo';
/** The paper's comparison: SPPO against iterative DPO and IPO. */
const COMPARED: readonly PreferenceLossName[] = ['sppo-pair', 'dpo', 'ipo'];

const help = `Usage: sppo demo [--dir DIR] [--loss LOSS] [--iterations N] [--quick] [--compare] [--device DEV]

Trains a small policy on the styled-reversal task, whose preference is non-transitive with a
known Nash equilibrium, so the duality gap is exact: supervised fine-tuning gives the base
policy π_0, then SPPO iterations against the oracle. Re-running the same command resumes.

  --dir DIR         run directory (default ${DEFAULT_DIR})
  --loss LOSS       ${PREFERENCE_LOSSES.join(' | ')} (default sppo-pair)
  --iterations N    SPPO iterations (default 3)
  --quick           fewer prompts and supervised steps (about a minute on two cores)
  --compare         run ${COMPARED.join(', ')} in DIR/<loss> and print them side by side
  --device DEV      cpu | cuda | auto (default cpu; auto takes the GPU when one is usable)
  -h, --help        this text

Prints a per-iteration table (win rate vs base and vs the previous iterate with 95% CIs, mean
quality, style mix, duality gap of the last iterate and of the average policy, response length,
seconds) and writes DIR/report.html and DIR/curves.png.`;

function lossOption(value: string | undefined): PreferenceLossName | undefined {
  if (value === undefined || isPreferenceLoss(value)) return value;
  throw new UsageError(`--loss must be one of ${PREFERENCE_LOSSES.join(', ')}, got '${value}'`);
}

export const demoCommand: Command = {
  name: 'demo',
  summary: 'the embedded styled-reversal run (SPPO, or SPPO vs DPO vs IPO)',
  help,
  async run(argv, io) {
    const values = parseOptions('demo', argv, {
      dir: { type: 'string' },
      loss: { type: 'string' },
      iterations: { type: 'string' },
      quick: { type: 'boolean' },
      compare: { type: 'boolean' },
      device: { type: 'string' },
    });
    const device = deviceOption(values.device);
    const loss = lossOption(values.loss);
    if (values.compare && loss) throw new UsageError(`--compare runs ${COMPARED.join(', ')}; it takes no --loss`);
    const dir = path.resolve(pathOption(values.dir, 'dir') ?? DEFAULT_DIR);
    const common = {
      iterations: integerOption(values.iterations, 'iterations', 1),
      quick: values.quick ?? false,
      device,
      onModel: (m: Model) => io.stdout.write(deviceLine(m, device)),
    };
    const runs = values.compare ? COMPARED.map((l) => ({ loss: l, dir: path.join(dir, l) })) : [{ loss: loss ?? 'sppo-pair', dir }];

    const results: { name: string; metrics: IterationMetrics[] }[] = [];
    for (const run of runs) {
      if (runs.length > 1) io.stdout.write(`\n== ${run.loss} (${run.dir}) ==\n`);
      const result = await runInterruptibly(io, ['demo', ...argv], (hooks) => runDemo({ ...common, loss: run.loss, dir: run.dir }, hooks));
      if (!result) return INTERRUPTED;
      await finishRun(result.dir, io);
      results.push({ name: run.loss, metrics: result.metrics });
    }
    if (results.length > 1) io.stdout.write(`\n${compareTable(results)}\n`);
    return 0;
  },
};
