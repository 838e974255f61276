// Runs (or resumes) the SPPO job a config file describes — what `sppo run --config FILE` does —
// from TypeScript, with progress lines and Ctrl-C stopping at the next safe point:
//
//   npx tsx examples/run-config.ts examples/configs/hf-http-judge.yaml [cpu|cuda|auto]
//
// A killed or interrupted run resumes where it stopped when started again with the same config.
import { loadConfig, runSppo, setupFromConfig, type Device, type RunResult } from 'sppo-engine';

export interface RunConfiguredOptions {
  device?: Device;
  signal?: AbortSignal;
  /** where progress lines go; default console.log */
  log?: (line: string) => void;
}

export async function runConfigured(file: string, options: RunConfiguredOptions = {}): Promise<RunResult> {
  const log = options.log ?? console.log;
  const config = await loadConfig(file); // a RunConfigError names every bad field
  const setup = await setupFromConfig(config, { device: options.device }); // a SetupError names the field to change
  log(`policy on ${setup.model.device}; judge ${setup.preference.id}; run directory ${config.run.dir}`);
  try {
    return await runSppo(setup, {
      signal: options.signal,
      onStage: ({ iteration, stage, status, seconds }) => {
        if (status === 'done') log(`iteration ${iteration} ${stage}: ${seconds?.toFixed(1) ?? '?'} s`);
        if (status === 'skipped') log(`iteration ${iteration} ${stage}: already done`);
      },
      onMetrics: ({ iteration, winRateVsBase: w, meanResponseLength }) =>
        log(
          `π_${iteration}: win rate vs π_0 ${w.mean.toFixed(3)} [${w.low.toFixed(3)}, ${w.high.toFixed(3)}], mean length ${meanResponseLength.toFixed(1)}`,
        ),
    });
  } finally {
    await setup.model.dispose();
    await setup.preference.dispose();
  }
}

if (import.meta.url === new URL(`file://${process.argv[1]}`).href) {
  const [file, device] = process.argv.slice(2);
  if (!file) {
    console.error('usage: npx tsx examples/run-config.ts CONFIG.yaml [cpu|cuda|auto]');
    process.exit(2);
  }
  const stop = new AbortController();
  process.once('SIGINT', () => stop.abort(new Error('interrupted: run the same command again to resume')));
  const result = await runConfigured(file, { device: device as Device | undefined, signal: stop.signal });
  console.log(`done: ${result.metrics.length - 1} iterations in ${result.dir}`);
}
