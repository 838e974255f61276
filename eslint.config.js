// `npm run check:lint`: ESLint with typescript-eslint's type-checked rules over lib, test, bench and scripts.
import eslint from '@eslint/js';
import globals from 'globals';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['build/', 'dist/', 'node_modules/', '.gpu/'] },
  eslint.configs.recommended,
  tseslint.configs.recommendedTypeChecked,
  {
    languageOptions: {
      globals: globals.node,
      parserOptions: { projectService: { allowDefaultProject: ['*.js', 'native/*.mjs', 'test/*.mjs'] }, tsconfigRootDir: import.meta.dirname },
    },
  },
);
