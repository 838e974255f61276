import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  // examples/ import the package by its name, as a user's code does; tests run them on lib/.
  resolve: { alias: { 'sppo-engine': fileURLToPath(new URL('./lib/index.ts', import.meta.url)) } },
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // The engine uses every core itself; parallel test files would only fight over them.
    fileParallelism: false,
  },
});
