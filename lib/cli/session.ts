// What every run-like command does around the scheduler: progress on stdout, Ctrl-C as a clean
// stop (the scheduler leaves every finished stage on disk, so the same command resumes), and
// the metrics table and report at the end.
import { readMetrics, writeReport } from '../report/report.js';
import type { RunHooks } from '../sppo/run.js';
import { commandLine, type Io } from './args.js';
import { Progress, runProgressHooks } from './progress.js';
import { metricsTable } from './table.js';

/** Exit code of a process stopped by SIGINT (128 + 2), as shells report it. */
export const INTERRUPTED = 130;

class Interrupted extends Error {
  override name = 'Interrupted';
}

/**
 * Runs `fn` with hooks that draw progress and abort on the first Ctrl-C (a second one quits at
 * once). Returns undefined when interrupted, after telling the user how to resume.
 */
export async function runInterruptibly<T>(io: Io, argv: readonly string[], fn: (hooks: RunHooks) => Promise<T>): Promise<T | undefined> {
  const progress = new Progress(io.stdout);
  const controller = new AbortController();
  const onSigint = () => {
    progress.stop(); // also shows the cursor again
    if (controller.signal.aborted) process.exit(INTERRUPTED);
    io.stderr.write('\nstopping at the next step (Ctrl-C again quits at once)…\n');
    controller.abort(new Interrupted('interrupted by Ctrl-C'));
  };
  process.on('SIGINT', onSigint);
  try {
    return await fn({ signal: controller.signal, ...runProgressHooks(progress), onNotice: (message) => progress.log(message) });
  } catch (err) {
    if (!controller.signal.aborted) throw err;
    io.stderr.write(`interrupted; finished stages are saved, resume with: ${commandLine(argv)}\n`);
    return undefined;
  } finally {
    progress.stop();
    process.off('SIGINT', onSigint);
  }
}

/** Errors of a directory that cannot be written: permissions, a read-only filesystem. */
const NOT_WRITABLE = new Set(['EACCES', 'EPERM', 'EROFS']);

/**
 * Prints the run's metrics table and (re)writes its report. With `readOnly`, a directory that
 * cannot be written is no failure: the report is left as it is, and stderr says so.
 */
export async function finishRun(dir: string, io: Io, options: { readOnly?: boolean } = {}): Promise<void> {
  io.stdout.write(`\n${metricsTable(await readMetrics(dir))}\n\n`);
  let files;
  try {
    files = await writeReport(dir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (!options.readOnly || code === undefined || !NOT_WRITABLE.has(code)) throw err;
    io.stderr.write(`${dir} is not writable (${code}), so its report (report.html, curves.png, curves.svg) was not rewritten\n`);
    return;
  }
  io.stdout.write(`report: ${files.html} (curves: ${files.png})\n`);
}
