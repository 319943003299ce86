#!/usr/bin/env bash
# Runs every test: the Rust suites (unit, property, crash, end-to-end against the real binary),
# then the real-client MCP tests (the Python `mcp` package and the MCP Inspector CLI).
# Needs: cargo, python3 (venv + pip), node/npx. Installs what it needs on first run.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# The default build's etcd client (replicated mode) compiles its gRPC code with protoc.
if ! command -v protoc >/dev/null; then
  if command -v apt-get >/dev/null; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq protobuf-compiler
  else
    echo "scripts/test.sh: protoc is missing (install protobuf-compiler, or set PROTOC)" >&2
    exit 1
  fi
fi

cargo build --all-features --bins
# tests/replication.rs starts a real etcd cluster only with ALLOCATION_LEDGER_ETCD_TESTS=1
# (.ci/run sets it and installs etcd); without it those tests say they were skipped.
cargo test --all-features

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
export ALLOCATION_LEDGER_BIN="$PWD/target/debug/allocation-ledger"
.venv/bin/python -m pytest -q tests/python
bash tests/inspector.sh
bash tests/conformance.sh
