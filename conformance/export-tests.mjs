// Prints the test definitions of a cache-tests suite as JSON: a list of suites, each
// {id, name, description, tests: [...]}, the same shape as the suite's own
// `npm run --silent export` (which needs the `ajv` dev dependency, absent from the published
// package and from `npm ci --omit=dev`).
//
//   node --no-warnings conformance/export-tests.mjs [SUITE_DIR [CLI]] > tests.json
//
// SUITE_DIR defaults to the pinned npm package (conformance/node_modules/http-cache-tests) and
// CLI to the suite's CLI: `test-engine/cli.mjs` (the current git layout) or `cli.mjs` (the npm
// package 0.4.x). The definitions are exactly what that CLI runs: it is read for its imports of
// the suite's tests/ directory. `tests/index.mjs` gives the list, and every other suite the
// CLI imports from tests/ and pushes onto that list (0.4.5 appends Surrogate-Control that way,
// the current suite appends nothing) is appended in import order.
import fs from 'node:fs'
import path from 'node:path'
import { pathToFileURL, fileURLToPath } from 'node:url'

const here = path.dirname(fileURLToPath(import.meta.url))
const suiteDir = path.resolve(process.argv[2] || path.join(here, 'node_modules', 'http-cache-tests'))
const cliRel = process.argv[3] ||
  (fs.existsSync(path.join(suiteDir, 'test-engine', 'cli.mjs')) ? 'test-engine/cli.mjs' : 'cli.mjs')
const cliPath = path.join(suiteDir, cliRel)
const cliSource = fs.readFileSync(cliPath, 'utf8')
const testsDir = path.join(suiteDir, 'tests') + path.sep

let list = null
let listName = null
const appended = []
for (const m of cliSource.matchAll(/^import\s+(\w+)\s+from\s+['"]([^'"]+)['"]/gm)) {
  const [, name, spec] = m
  if (!spec.startsWith('.')) continue
  const file = path.resolve(path.dirname(cliPath), spec)
  if (!file.startsWith(testsDir)) continue
  const { default: value } = await import(pathToFileURL(file))
  if (path.relative(testsDir, file) === 'index.mjs') {
    list = [...value]
    listName = name
  } else {
    appended.push([name, value])
  }
}
if (list === null) {
  console.error(`export-tests.mjs: ${cliPath} does not import tests/index.mjs`)
  process.exit(1)
}
for (const [name, suite] of appended) {
  if (new RegExp(`\\b${listName}\\.push\\(\\s*${name}\\s*\\)`).test(cliSource)) list.push(suite)
}

process.stdout.write(JSON.stringify(list, null, 2) + '\n')
