// Prints the test definitions of the installed http-cache-tests package as JSON: a list of
// suites, each {id, name, description, tests: [...]}, the same shape as the suite's own
// `npm run --silent export` (which needs the `ajv` dev dependency, absent from the published
// package). Like the suite's cli.mjs, it appends the Surrogate-Control suite to tests/index.mjs,
// so the definitions cover every test the CLI runs.
//
//   node --no-warnings conformance/export-tests.mjs > tests.json
const suiteDir = new URL('./node_modules/http-cache-tests/', import.meta.url)
const { default: tests } = await import(new URL('tests/index.mjs', suiteDir))
const { default: surrogate } = await import(new URL('tests/surrogate-control.mjs', suiteDir))

process.stdout.write(JSON.stringify([...tests, surrogate], null, 2) + '\n')
