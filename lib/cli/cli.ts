// The `sppo` command: subcommand dispatch, `--help`, and how failures end — one line and exit
// code 2 for what the user can fix in the command or the config (USER_ERRORS), the error's
// message and exit code 1 for a run that failed, 130 for Ctrl-C (lib/cli/session.ts).
import { SetupError } from '../config/errors.js';
import { RunConfigError } from '../config/load.js';
import { UsageError, type Command, type Io } from './args.js';
import { demoCommand } from './commands/demo.js';
import { evalCommand } from './commands/eval.js';
import { generateCommand } from './commands/generate.js';
import { initCommand } from './commands/init.js';
import { mergeAdapterCommand } from './commands/merge-adapter.js';
import { runCommand } from './commands/run.js';

const COMMANDS: readonly Command[] = [initCommand, runCommand, demoCommand, generateCommand, evalCommand, mergeAdapterCommand];
const NAME_WIDTH = Math.max(...COMMANDS.map((c) => c.name.length)) + 2;

/** Errors the user fixes in the command line (UsageError) or the config (RunConfigError, SetupError): exit code 2. */
const USER_ERRORS = [UsageError, RunConfigError, SetupError];

const usage = `Usage: sppo <command> [options]

Self-Play Preference Optimization for language models.

Commands:
${COMMANDS.map((c) => `  ${c.name.padEnd(NAME_WIDTH)}${c.summary}`).join('\n')}

\`sppo <command> --help\` describes a command's options. Set SPPO_DEBUG=1 to see stack traces.`;

export async function main(argv: readonly string[], io: Io = { stdout: process.stdout, stderr: process.stderr }): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h') {
    (name === undefined ? io.stderr : io.stdout).write(`${usage}\n`);
    return name === undefined ? 2 : 0;
  }
  const command = COMMANDS.find((c) => c.name === name);
  if (!command) {
    io.stderr.write(`sppo: unknown command '${name}' (commands: ${COMMANDS.map((c) => c.name).join(', ')}; see sppo --help)\n`);
    return 2;
  }
  if (rest.includes('--help') || rest.includes('-h')) {
    io.stdout.write(`${command.help}\n`);
    return 0;
  }
  try {
    return await command.run(rest, io);
  } catch (err) {
    if (process.env.SPPO_DEBUG) io.stderr.write(`${(err as Error)?.stack ?? String(err)}\n`);
    // Multi-line messages (a config's or a prompt file's list of problems) become one line.
    const message = (err instanceof Error ? err.message : String(err)).replace(/:?\n\s*/g, (m) => (m.startsWith(':') ? ': ' : '; '));
    io.stderr.write(`sppo ${name}: ${message}\n`);
    return USER_ERRORS.some((E) => err instanceof E) ? 2 : 1;
  }
}
