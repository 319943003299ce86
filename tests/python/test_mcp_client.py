"""The original system's acceptance scenario, driven through the MCP server by a real client.

Uses the Python `mcp` SDK (pinned in requirements.txt) against the real binary:
- over stdio, once with mode="auto" (the stateless 2026-07-28 protocol: server/discover and
  per-request _meta) and once with mode="legacy" (the 2025-11-25 initialize handshake);
- over Streamable HTTP with a bearer token, in both modes.

Each run starts the server on a fresh ledger. The binary comes from $ALLOCATION_LEDGER_BIN
(default: target/debug/allocation-ledger at the repository root).

Run:  python -m pytest tests/python -v      or      python tests/python/test_mcp_client.py
"""

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import httpx2  # the HTTP client of mcp 2.x
from mcp import Client, MCPError
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("ALLOCATION_LEDGER_BIN", os.path.join(ROOT, "target", "debug", "allocation-ledger"))
MODES = ("auto", "legacy")
EXPECTED_PROTOCOL = {"auto": "2026-07-28", "legacy": "2025-11-25"}


def server_env():
    env = dict(os.environ)
    env.pop("ALLOCATION_LEDGER_DIR", None)
    env.pop("ALLOCATION_LEDGER_TOKEN", None)
    env.setdefault("RUST_LOG", "warn")
    return env


async def call(client, name, args=None):
    """A tool call that must succeed; returns its structuredContent."""
    r = await client.call_tool(name, args or {})
    assert not r.is_error, f"{name} failed: {r.structured_content}"
    assert r.structured_content is not None, f"{name}: no structuredContent"
    assert r.content and r.content[0].type == "text", f"{name}: no text copy"
    return r.structured_content


async def call_error(client, name, args):
    """A tool call that must be an error result; returns (structuredContent, text)."""
    r = await client.call_tool(name, args)
    assert r.is_error, f"{name}({args}) should be an error: {r.structured_content}"
    assert r.structured_content is not None
    return r.structured_content, r.content[0].text


async def scenario(client, mode):
    assert client.session.protocol_version == EXPECTED_PROTOCOL[mode], client.session.protocol_version

    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {
        "request_resources", "release_resources", "get_capacity",
        "get_allocation", "list_allocations", "cleanup_expired",
        "allocation_history", "usage_report", "what_if",
        "renew_allocation", "plan_request", "get_pool", "change_pool",
        "write_snapshot", "apply_config", "cancel_request",
        "reserve_resources", "cancel_reservation", "list_reservations",
    }, set(tools)
    req = tools["request_resources"].input_schema
    assert set(req["required"]) == {"job_id", "mcp_servers"}
    assert req["properties"]["priority"]["enum"] == ["low", "normal", "high", "critical"]
    assert req["properties"]["priority"]["default"] == "normal"
    assert req["properties"]["ttl_seconds"]["minimum"] == 60
    assert req["properties"]["ttl_seconds"]["default"] == 3600
    assert req["properties"]["workers"]["minimum"] == 0
    assert tools["list_allocations"].input_schema["properties"]["state"]["enum"] == [
        "active", "released", "expired", "failed", "pending", "cancelled", "preempting", "preempted"]
    assert all(t.output_schema for t in tools.values())

    # 1. a fresh ledger reports 10 total and 10 available workers
    cap = await call(client, "get_capacity")
    assert (cap["total_workers"], cap["available_workers"]) == (10, 10), cap

    # 2. a request for 4 workers is active with 4 workers
    g = await call(client, "request_resources",
                   {"job_id": "acceptance", "mcp_servers": ["github"], "workers": 4})
    assert g["status"] == "active" and len(g["workers_allocated"]) == 4, g
    assert re.fullmatch(r"alloc-[0-9a-f]{12}", g["allocation_id"]), g
    assert g["resources"]["cpu"] == 4.0 and g["resources"]["memory"] == 8192, g
    assert g["mcp_servers"][0]["name"] == "github" and g["mcp_servers"][0]["status"] == "running"
    aid = g["allocation_id"]

    # 3. capacity shows 4 allocated, 6 available
    cap = await call(client, "get_capacity")
    assert (cap["allocated_workers"], cap["available_workers"]) == (4, 6), cap
    assert cap["running_mcp_servers"] == ["github"], cap

    # 4. get_allocation reports state active
    d = await call(client, "get_allocation", {"allocation_id": aid})
    assert d["state"] == "active" and d["job_id"] == "acceptance", d

    # 5. list_allocations has one entry
    lst = await call(client, "list_allocations")
    assert lst["count"] == 1 and lst["allocations"][0]["allocation_id"] == aid, lst
    assert (await call(client, "list_allocations", {"state": "released"}))["count"] == 0

    # 6. release reports released with workers_released 4
    rel = await call(client, "release_resources", {"allocation_id": aid})
    assert rel["status"] == "released" and rel["workers_released"] == 4, rel
    again = await call(client, "release_resources", {"allocation_id": aid})
    assert again["status"] == "already_released", again

    # 7. capacity is back to 0 allocated, 10 available
    cap = await call(client, "get_capacity")
    assert (cap["allocated_workers"], cap["available_workers"]) == (0, 10), cap

    # Errors an agent can act on.
    err, text = await call_error(client, "request_resources",
                                 {"job_id": "j", "mcp_servers": [], "workers": 1, "priority": "urgent"})
    assert err["status"] == "error" and err["field"] == "priority", err
    assert "priority" in err["error"] and "low, normal, high, critical" in err["error"], err
    assert "low, normal, high, critical" in text

    err, _ = await call_error(client, "request_resources",
                              {"job_id": "j", "mcp_servers": [], "workers": 1, "ttl_seconds": 59})
    assert err["field"] == "ttl_seconds" and "ttl_seconds" in err["error"] and "60" in err["error"], err

    err, _ = await call_error(client, "request_resources", {"job_id": "j", "mcp_servers": "github"})
    assert err["field"] == "mcp_servers", err

    held = await call(client, "request_resources", {"job_id": "big", "mcp_servers": [], "workers": 7})
    assert held["status"] == "active"
    err, text = await call_error(client, "request_resources",
                                 {"job_id": "late", "mcp_servers": [], "workers": 5})
    assert err["status"] == "failed", err
    assert err["error"] == "Insufficient workers: requested 5, available 3", err
    assert re.fullmatch(r"alloc-[0-9a-f]{12}", err["allocation_id"]), err
    assert "Insufficient workers: requested 5, available 3" in text
    failed = await call(client, "list_allocations", {"state": "failed"})
    assert failed["count"] == 1 and failed["allocations"][0]["job_id"] == "late", failed

    unknown = "alloc-000000000000"
    err, _ = await call_error(client, "release_resources", {"allocation_id": unknown})
    assert err["status"] == "error" and err["error"] == f"Allocation {unknown} not found", err
    err, _ = await call_error(client, "get_allocation", {"allocation_id": unknown})
    assert "not found" in err["error"], err

    try:
        await client.call_tool("no_such_tool", {})
    except MCPError as e:
        assert e.code == -32602 and "not found" in e.message, (e.code, e.message)
    else:
        raise AssertionError("an unknown tool must be a JSON-RPC error")


async def run_stdio(mode):
    with tempfile.TemporaryDirectory() as d:
        params = StdioServerParameters(command=BIN, args=["--data-dir", d, "serve"], env=server_env())
        async with Client(params, mode=mode) as client:
            await scenario(client, mode)


class HttpServer:
    """`serve --http 127.0.0.1:0` with a token file; reads the bound URL from stderr."""

    def __init__(self, data_dir, token):
        token_file = os.path.join(data_dir, "token")
        with open(token_file, "w") as f:
            f.write(token + "\n")
        self.proc = subprocess.Popen(
            [BIN, "--data-dir", os.path.join(data_dir, "ledger"), "serve",
             "--http", "127.0.0.1:0", "--token-file", token_file],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=server_env(), text=True,
        )
        self.url = None
        found = threading.Event()

        def pump():
            for line in self.proc.stderr:
                m = re.search(r"listening on (http://\S+/mcp)", line)
                if m and self.url is None:
                    self.url = m.group(1)
                    found.set()
                sys.stderr.write(line)

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(timeout=30):
            self.proc.kill()
            raise AssertionError("the HTTP server did not report its address")

    def stop(self):
        self.proc.terminate()
        assert self.proc.wait(timeout=30) == 0


async def run_http(mode):
    token = "test-token-" + os.urandom(8).hex()
    with tempfile.TemporaryDirectory() as d:
        server = HttpServer(d, token)
        try:
            # Without the token: 401.
            async with httpx2.AsyncClient() as plain:
                r = await plain.post(server.url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
                assert r.status_code == 401, r.status_code
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                      timeout=httpx2.Timeout(30, read=60))
            async with http:
                async with Client(streamable_http_client(server.url, http_client=http), mode=mode) as client:
                    await scenario(client, mode)
        finally:
            server.stop()


def test_stdio_auto():
    asyncio.run(run_stdio("auto"))


def test_stdio_legacy():
    asyncio.run(run_stdio("legacy"))


def test_http_auto():
    asyncio.run(run_http("auto"))


def test_http_legacy():
    asyncio.run(run_http("legacy"))


if __name__ == "__main__":
    started = time.monotonic()
    for test in (test_stdio_auto, test_stdio_legacy, test_http_auto, test_http_legacy):
        test()
        print(f"ok  {test.__name__}")
    print(f"all passed in {time.monotonic() - started:.1f}s")
