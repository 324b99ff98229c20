#!/usr/bin/env bash
# Runs every check and test of Outpost: formatting, lints, unit, end-to-end and the HTTP caching
# conformance gate. Installs what the tests need beyond cargo (node/npm and the pinned
# http-cache-tests suite) when it is missing, so a fresh Debian machine with Rust passes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    echo "scripts/test.sh: adding the rustfmt and clippy components"
    rustup component add rustfmt clippy
fi

bash conformance/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
