#!/usr/bin/env bash
# Runs the MCP conformance suite (the official `@modelcontextprotocol/conformance` server
# scenarios, Streamable HTTP) against `allocation-ledger serve --http` on a scratch ledger, twice:
#
# 1. With `--conformance-fixtures`: the server also serves the suite's fixture tools, resources
#    and prompts (test_simple_text, test://static-text, test_simple_prompt, ...) and advertises
#    prompts and completions. Every active scenario must pass; there is no baseline.
# 2. As shipped (no fixtures): the scenarios that call fixtures, or the prompts and completions
#    it does not advertise, are in a baseline; every other scenario must pass, and the suite
#    also fails when a baseline entry passes (a stale entry), so the list hides nothing.
#
#   bash tests/conformance.sh
#
# Needs node/npx (the pinned suite, and Node 22 which it requires, are fetched from npm on first
# use). ALLOCATION_LEDGER_BIN overrides the binary (default target/debug/allocation-ledger).
# Result (docs/mcp.md, "Conformance"): 30 of the 30 active scenarios pass with the fixtures;
# as shipped, the 9 that need no fixture pass.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${ALLOCATION_LEDGER_BIN:-$PWD/target/debug/allocation-ledger}"
CONFORMANCE="@modelcontextprotocol/conformance@0.1.16"
# 0.1.16 uses fs.globSync (Node 22); taking Node from npm makes the run independent of the
# machine's own node.
NODE="node@22"
DATA="$(mktemp -d)"
SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  SERVER_PID=""
}
cleanup() {
  stop_server
  rm -rf "$DATA"
}
trap cleanup EXIT
[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build first)" >&2; exit 1; }

export RUST_LOG=warn
unset ALLOCATION_LEDGER_DIR ALLOCATION_LEDGER_TOKEN

cat >"$DATA/baseline.yml" <<'EOF'
# Scenarios that do not apply to allocation-ledger as shipped: they call the conformance suite's
# fixture tools, resources or prompts (test_simple_text, test://static-text, test_simple_prompt,
# ...), or a capability it advertises only with --conformance-fixtures. Run 1 passes them all.
server:
  # completions: advertised only with the fixtures (no prompts, no template argument worth completing).
  - completion-complete
  # tools: advertised; tools-list passes. These call fixture tools (test_simple_text,
  # test_image_content, test_error_handling, test_tool_with_progress, test_sampling, ...).
  - tools-call-simple-text
  - tools-call-image
  - tools-call-audio
  - tools-call-embedded-resource
  - tools-call-mixed-content
  - tools-call-with-logging
  - tools-call-error
  - tools-call-with-progress
  - tools-call-sampling
  - tools-call-elicitation
  - elicitation-sep1034-defaults
  - elicitation-sep1330-enums
  # resources: advertised; resources-list, -subscribe and -unsubscribe pass. These read fixture
  # resources (test://static-text, test://static-binary, test://template/{id}/data).
  - resources-read-text
  - resources-read-binary
  - resources-templates-read
  # prompts: advertised only with the fixtures.
  - prompts-list
  - prompts-get-simple
  - prompts-get-with-args
  - prompts-get-embedded-resource
  - prompts-get-with-image
EOF

# run_suite NAME [serve flags...] [-- conformance flags...]: one server, one suite run.
run_suite() {
  local name="$1"; shift
  local serve_flags=() suite_flags=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do serve_flags+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  suite_flags=("$@")
  "$BIN" --data-dir "$DATA/$name/ledger" serve --http 127.0.0.1:0 "${serve_flags[@]}" 2>"$DATA/$name.log" &
  SERVER_PID=$!
  local url=""
  for _ in $(seq 1 300); do
    url=$(grep -o 'http://127\.0\.0\.1:[0-9]*/mcp' "$DATA/$name.log" | head -1 || true)
    [ -n "$url" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$DATA/$name.log" >&2; echo "the server exited" >&2; exit 1; }
    sleep 0.1
  done
  [ -n "$url" ] || { cat "$DATA/$name.log" >&2; echo "the server did not start listening" >&2; exit 1; }
  local status=0
  npx --prefer-offline -y -p "$NODE" -p "$CONFORMANCE" -- conformance server --url "$url" \
    "${suite_flags[@]}" -o "$DATA/$name/results" >"$DATA/$name.out" 2>&1 || status=$?
  stop_server
  echo "== conformance, $name"
  sed -n '/=== SUMMARY ===/,$p' "$DATA/$name.out"
  local passed ran
  passed=$(grep -c '^✓' "$DATA/$name.out" || true)
  ran=$(grep -c '^[✓✗]' "$DATA/$name.out" || true)
  echo "conformance, $name: $passed of $ran scenarios passed"
  if [ "$status" -ne 0 ] || [ "$ran" -eq 0 ]; then
    echo "FAIL conformance, $name: a scenario failed that is not in the baseline, or a baseline entry passes" >&2
    grep -v EBADENGINE "$DATA/$name.out" | tail -40 >&2
    exit 1
  fi
  LAST_PASSED=$passed
  LAST_RAN=$ran
}

run_suite with-fixtures --conformance-fixtures
[ "$LAST_PASSED" -eq "$LAST_RAN" ] || { echo "FAIL conformance: with the fixtures every scenario must pass" >&2; exit 1; }
run_suite as-shipped -- --expected-failures "$DATA/baseline.yml"
echo "conformance: every scenario passed with the fixtures; as shipped, every scenario that needs none passed"
