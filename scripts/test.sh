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

# The status page is checked in a real browser (tests/e2e/status_page.rs); install Debian's
# Chromium when it is missing. If it cannot be installed, that test skips loudly.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "scripts/test.sh: installing Debian's chromium for the status page test"
        (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq chromium) \
            || echo "scripts/test.sh: WARNING: chromium could not be installed; the browser test will skip"
    else
        echo "scripts/test.sh: WARNING: chromium missing and not root; the browser test will skip"
    fi
fi

# Fleet mode is tested against a real NATS JetStream server (tests/e2e/fleet.rs); install
# Debian's nats-server when it is missing. If it cannot be installed, those tests skip loudly.
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "scripts/test.sh: installing Debian's nats-server for the fleet tests"
        (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq nats-server) \
            || echo "scripts/test.sh: WARNING: nats-server could not be installed; the fleet tests will skip"
    else
        echo "scripts/test.sh: WARNING: nats-server missing and not root; the fleet tests will skip"
    fi
fi

if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "scripts/test.sh: installing Debian's prometheus (for promtool) to check /metrics"
        (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus) \
            || echo "scripts/test.sh: WARNING: prometheus could not be installed; /metrics is checked without promtool"
    else
        echo "scripts/test.sh: WARNING: promtool missing and not root; /metrics is checked without it"
    fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
