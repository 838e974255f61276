// `npm run check:lint`: ESLint with typescript-eslint's strict type-checked rules over lib/, test/,
// bench/ and scripts/; the few plain JavaScript files get the rules that need no types.
import eslint from '@eslint/js';
import globals from 'globals';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['build/', 'dist/', 'node_modules/', '.gpu/'] },
  eslint.configs.recommended,
  tseslint.configs.strictTypeChecked,
  {
    languageOptions: {
      globals: globals.node,
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    rules: {
      // Numbers and booleans print as expected in messages; objects, undefined and null do not.
      '@typescript-eslint/restrict-template-expressions': ['error', { allowNumber: true, allowBoolean: true }],
      // `(x) => void_call(x)` callbacks are idiomatic; a void value used in a real expression is still an error.
      '@typescript-eslint/no-confusing-void-expression': ['error', { ignoreArrowShorthand: true }],
      // Spreading a string into code points is deliberate here (the character tokenizer, the
      // styled-reversal task, display widths); spreading promises, functions or maps stays an error.
      '@typescript-eslint/no-misused-spread': ['error', { allow: [{ from: 'lib', name: 'string' }] }],
      // The library checks its callers' input at run time (JavaScript callers ignore the types), and
      // without noUncheckedIndexedAccess this rule calls every `rows[i]?.` guard unnecessary.
      '@typescript-eslint/no-unnecessary-condition': 'off',
      // A leading underscore marks a value that is deliberately unused (`const { a: _, ...rest } = o`).
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrorsIgnorePattern: '^_', ignoreRestSiblings: true },
      ],
    },
  },
  {
    // Tests and benchmarks index data they have just built themselves (`rows[0]!`, `map.get(k)!`).
    files: ['test/**/*.ts', 'test/**/*.mts', 'bench/**/*.ts'],
    rules: { '@typescript-eslint/no-non-null-assertion': 'off' },
  },
  {
    // Tests look inside what the code under test wrote (JSON.parse of run files, configs, caches)
    // and check it with expect(); typing each parsed file would restate the types under test.
    files: ['test/**/*.ts', 'test/**/*.mts'],
    rules: {
      '@typescript-eslint/no-unsafe-argument': 'off',
      '@typescript-eslint/no-unsafe-assignment': 'off',
      '@typescript-eslint/no-unsafe-member-access': 'off',
      '@typescript-eslint/no-unsafe-return': 'off',
      // `readJson<T>(file)` names the shape the test expects to find.
      '@typescript-eslint/no-unnecessary-type-parameters': 'off',
    },
  },
  {
    // Plain JavaScript (eslint.config.js, native/build.mjs, test/run.mjs) is not in a TypeScript project.
    files: ['**/*.js', '**/*.mjs', '**/*.cjs'],
    extends: [tseslint.configs.disableTypeChecked],
  },
);
