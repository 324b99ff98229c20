#!/usr/bin/env bash
# Installs what the conformance gate (tests/e2e/conformance.rs) needs: node and npm, then the pinned
# http-cache-tests package in conformance/node_modules. Idempotent; run before `cargo test`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    echo "conformance/setup.sh: node $(node --version) and npm $(npm --version 2>/dev/null) present"
else
    echo "conformance/setup.sh: node or npm missing; installing the Debian nodejs and npm packages"
    if [ "$(id -u)" -ne 0 ]; then
        echo "conformance/setup.sh: need root to apt-get install nodejs npm" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y nodejs npm
    echo "conformance/setup.sh: installed node $(node --version), npm $(npm --version 2>/dev/null)"
fi

pinned="$(node -p 'require(process.argv[1]).dependencies["http-cache-tests"]' "$here/package.json")"
installed_manifest="$here/node_modules/http-cache-tests/package.json"
installed=""
if [ -f "$installed_manifest" ]; then
    installed="$(node -p 'require(process.argv[1]).version' "$installed_manifest")"
fi
if [ "$installed" = "$pinned" ]; then
    echo "conformance/setup.sh: http-cache-tests $installed already installed in conformance/node_modules"
else
    echo "conformance/setup.sh: installing http-cache-tests $pinned with npm ci" \
        "(found: ${installed:-nothing}; from conformance/package-lock.json)"
    (cd "$here" && npm ci --no-audit --no-fund)
    echo "conformance/setup.sh: installed conformance/node_modules/http-cache-tests"
fi
