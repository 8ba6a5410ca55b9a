// The chat page's JavaScript (smollm3_triton/entrypoints/webui): browser ES modules, no
// build step. ESLint's recommended rules, and the rules that keep the page within its
// Content-Security-Policy and away from HTML strings (what the model writes is untrusted).
import js from "@eslint/js";
import globals from "globals";

export default [
  js.configs.recommended,
  {
    files: ["smollm3_triton/entrypoints/webui/**/*.js"],
    languageOptions: {ecmaVersion: 2024, sourceType: "module", globals: globals.browser},
    linterOptions: {reportUnusedDisableDirectives: "error"},
    rules: {
      "no-eval": "error",
      "no-implied-eval": "error",
      "no-new-func": "error",
      "no-script-url": "error",
      "no-restricted-properties": ["error",
        {property: "innerHTML", message: "build nodes; model text must never be parsed as HTML"},
        {property: "outerHTML", message: "build nodes; model text must never be parsed as HTML"},
        {property: "insertAdjacentHTML", message: "build nodes; model text must never be parsed as HTML"},
        {object: "document", property: "write", message: "build nodes instead"}],
      "eqeqeq": "error",
      "no-var": "error",
      "prefer-const": "error",
      "no-unused-vars": ["error", {args: "after-used", argsIgnorePattern: "^_"}],
    },
  },
];
