#!/usr/bin/env bash
# Drives the original system's acceptance scenario, and the error cases, through the MCP server
# with the MCP Inspector CLI (the TypeScript SDK client, which also validates every result's
# structuredContent against the tool's outputSchema). Each step starts `allocation-ledger serve`
# over stdio on the same scratch ledger, so it also shows the allocations persist between runs.
#
#   bash tests/inspector.sh
#
# Needs node/npx (the pinned inspector is fetched on first use) and python3 (for the checks).
# ALLOCATION_LEDGER_BIN overrides the binary (default target/debug/allocation-ledger).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${ALLOCATION_LEDGER_BIN:-$PWD/target/debug/allocation-ledger}"
INSPECTOR="@modelcontextprotocol/inspector@0.15.0"
DATA="$(mktemp -d)"
trap 'rm -rf "$DATA"' EXIT
[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build first)" >&2; exit 1; }

export RUST_LOG=warn
unset ALLOCATION_LEDGER_DIR ALLOCATION_LEDGER_TOKEN

inspect() {
  npx --prefer-offline -y "$INSPECTOR" --cli "$BIN" --data-dir "$DATA/ledger" serve "$@"
}

# call TOOL [key=value ...]: prints the CallToolResult.
call() {
  local tool="$1"
  shift
  local args=()
  for a in "$@"; do args+=(--tool-arg "$a"); done
  inspect --method tools/call --tool-name "$tool" "${args[@]}"
}

# check LABEL JSON EXPR: EXPR is Python over `r` (the parsed result) and `s` (its structuredContent).
check() {
  local label="$1" json="$2" expr="$3"
  # On stdin, not in the environment: one environment string is limited to 128 KiB, and
  # tools/list with every schema is larger.
  if printf '%s' "$json" | python3 -c '
import json, sys
r = json.load(sys.stdin)
s = r.get("structuredContent") or {}
sys.exit(0 if eval(sys.argv[1]) else 1)' "$expr"; then
    echo "ok   $label"
  else
    echo "FAIL $label: $expr" >&2
    echo "$json" >&2
    exit 1
  fi
}

field() { printf '%s' "$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["structuredContent"][sys.argv[1]])' "$2"; }

out=$(inspect --method tools/list)
check "tools/list: every tool, each with an output schema" "$out" \
  'sorted(t["name"] for t in r["tools"]) == ["allocation_history", "apply_config", "cancel_request", "cancel_reservation", "change_pool", "cleanup_expired", "get_allocation", "get_capacity", "get_pool", "list_allocations", "list_reservations", "plan_request", "release_resources", "renew_allocation", "request_resources", "reserve_resources", "usage_report", "what_if", "write_snapshot"] and all("outputSchema" in t for t in r["tools"])'

out=$(call get_capacity)
check "1. a fresh ledger has 10 total and 10 available workers" "$out" \
  'not r["isError"] and s["total_workers"] == 10 and s["available_workers"] == 10'

out=$(call request_resources job_id=acceptance 'mcp_servers=["github"]' workers=4 priority=high ttl_seconds=600 'metadata={"team":"infra"}')
check "2. a request for 4 workers is active with 4 workers" "$out" \
  'not r["isError"] and s["status"] == "active" and len(s["workers_allocated"]) == 4 and s["priority"] == "high"'
id=$(field "$out" allocation_id)

out=$(call get_capacity)
check "3. capacity shows 4 allocated, 6 available" "$out" \
  's["allocated_workers"] == 4 and s["available_workers"] == 6 and s["running_mcp_servers"] == ["github"]'

out=$(call get_allocation "allocation_id=$id")
check "4. get_allocation reports state active" "$out" \
  'not r["isError"] and s["state"] == "active" and s["metadata"] == {"team": "infra"}'

out=$(call list_allocations)
check "5. list_allocations has one entry" "$out" 's["count"] == 1 and len(s["allocations"]) == 1'

out=$(call release_resources "allocation_id=$id")
check "6. release reports released with workers_released 4" "$out" \
  'not r["isError"] and s["status"] == "released" and s["workers_released"] == 4'

out=$(call get_capacity)
check "7. capacity is back to 0 allocated, 10 available" "$out" \
  's["allocated_workers"] == 0 and s["available_workers"] == 10'

out=$(call request_resources job_id=x 'mcp_servers=[]' workers=1 priority=urgent)
check "invalid priority: isError naming priority and the allowed values" "$out" \
  'r["isError"] and s["field"] == "priority" and "low, normal, high, critical" in s["error"]'

out=$(call request_resources job_id=x 'mcp_servers=[]' workers=1 ttl_seconds=59)
check "ttl_seconds 59: isError naming ttl_seconds" "$out" \
  'r["isError"] and s["field"] == "ttl_seconds" and "ttl_seconds" in s["error"]'

out=$(call request_resources job_id=big 'mcp_servers=[]' workers=7)
check "7 of 10 workers held" "$out" 'not r["isError"] and s["status"] == "active"'
out=$(call request_resources job_id=late 'mcp_servers=[]' workers=5)
check "then a request for 5: isError with the failed shape" "$out" \
  'r["isError"] and s["status"] == "failed" and s["error"] == "Insufficient workers: requested 5, available 3"'

# The scheduler's contract (docs/policy.md): plan, act with expected_seq and a retry key, renew.
out=$(call plan_request job_id=planned 'mcp_servers=[]' workers=2)
check "plan_request: would grant 2 of the 3 free, with current_seq" "$out" \
  'not r["isError"] and s["would_grant"] and s["outcome"]["status"] == "active" and s["current_seq"] > 0'
seq=$(field "$out" current_seq)
out=$(call request_resources job_id=planned 'mcp_servers=[]' workers=2 "expected_seq=$seq" idempotency_key=inspector-1)
check "request_resources with expected_seq = current_seq is granted" "$out" 'not r["isError"] and s["status"] == "active"'
planned=$(field "$out" allocation_id)
out=$(call request_resources job_id=planned 'mcp_servers=[]' workers=2 "expected_seq=$seq" idempotency_key=inspector-1)
check "its retry (same key, stale expected_seq) is replayed" "$out" \
  "not r[\"isError\"] and s[\"replayed\"] and s[\"allocation_id\"] == \"$planned\""
out=$(call renew_allocation "allocation_id=$planned" ttl_seconds=7200)
check "renew_allocation moves expires_at" "$out" \
  'not r["isError"] and s["renewals"] == 1 and s["expires_at"] > s["previous_expires_at"]'
out=$(call cleanup_expired "expected_seq=$seq")
check "a stale expected_seq: isError, kind conflict, with current_seq" "$out" \
  'r["isError"] and s["kind"] == "conflict" and s["current_seq"] > s["expected_seq"]'

out=$(call release_resources allocation_id=alloc-000000000000)
check "unknown allocation: isError, not found" "$out" \
  'r["isError"] and s["status"] == "error" and s["error"] == "Allocation alloc-000000000000 not found"'

if out=$(call no_such_tool 2>&1); then
  echo "FAIL unknown tool: the call succeeded" >&2
  echo "$out" >&2
  exit 1
fi
case "$out" in
  *-32602*|*"tool not found"*) echo "ok   unknown tool: a JSON-RPC error" ;;
  *) echo "FAIL unknown tool: unexpected output" >&2; echo "$out" >&2; exit 1 ;;
esac

echo "inspector: all checks passed"
