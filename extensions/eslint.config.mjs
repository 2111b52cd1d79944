// Lint for the extension's TypeScript: eslint's and typescript-eslint's recommended rules, type-aware,
// plus the few rules that catch real bugs in async UI code (floating promises, misused promises).
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['lib/**', 'node_modules/**', '../workbench/labextension/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommendedTypeChecked,
  {
    languageOptions: {
      parserOptions: { project: './tsconfig.json', tsconfigRootDir: import.meta.dirname }
    },
    rules: {
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/no-misused-promises': 'error',
      '@typescript-eslint/no-namespace': 'off', // CommandIDs follows JupyterLab's own `namespace CommandIDs` idiom
      eqeqeq: 'error'
    }
  }
);
