#!/usr/bin/env node
// The `sppo` executable (package.json "bin"); everything else lives in cli.ts.
import { main } from './cli.js';

// `sppo generate | head` closes the pipe early: that is the reader's choice, not a failure.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(0);
  throw err;
});
process.exitCode = await main(process.argv.slice(2));
