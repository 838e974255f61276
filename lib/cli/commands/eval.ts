// `sppo eval --run DIR`: the metrics table of a run (finished or not) and a fresh report.
import { existingPathOption, parseOptions, type Command } from '../args.js';
import { finishRun } from '../session.js';

const help = `Usage: sppo eval --run DIR

Prints the per-iteration metrics of the run in DIR (from DIR/metrics.jsonl) and rewrites its
report: DIR/report.html, DIR/curves.png and DIR/curves.svg. Works on a run that is still going
or was interrupted (it shows the iterations evaluated so far), and on a read-only copy of a run
(the table is printed and the report left as it is).

  --run DIR    the run directory (run.dir of the config, or sppo demo's --dir)
  -h, --help   this text`;

export const evalCommand: Command = {
  name: 'eval',
  summary: "print a run's metrics table and rewrite its report",
  help,
  async run(argv, io) {
    const values = parseOptions('eval', argv, { run: { type: 'string' } });
    const dir = existingPathOption(values.run, 'run', 'eval');
    // a run copied somewhere read-only still shows; only its report stays as it was
    await finishRun(dir, io, { readOnly: true });
    return 0;
  },
};
