// Outpost's entry for the cache-tests results index (results/index.mjs), written by
// OUTPOST_CONFORMANCE_WRITE_RESULTS=1 cargo test --test e2e conformance::cache_tests_conformance_gate.
// suite_commit is the cache-tests commit the results were produced with.
export default [
  {
    "file": "outpost.json",
    "name": "Outpost",
    "suite_commit": "b55b8bda3dbb8c927c04e85bd8d496a8caa3e4ba",
    "type": "rev-proxy",
    "version": "0.1.0 (8fa1ecf)"
  }
]
