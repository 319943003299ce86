"""The scheduler's contract (issue 15) through the MCP server, driven by the real Python client.

- tools/list has renew_allocation and plan_request, with input and output schemas;
- 64 concurrent request_resources calls with one idempotency_key, over ONE session and over
  several HTTP sessions: exactly one grant, every answer the same allocation_id;
- the same key with other arguments: invalid_input naming idempotency_key;
- renew_allocation (and not_active); plan_request then request_resources with expected_seq;
  a stale expected_seq is a conflict carrying current_seq.

The client (mcp.Client) checks every successful result's structuredContent against the tool's
outputSchema itself; the error shapes are checked here against the same schema.
Uses the helpers of test_mcp_client.py (the binary from $ALLOCATION_LEDGER_BIN).
"""

import asyncio
import datetime
import os
import sys
import tempfile

import httpx2
import jsonschema
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_mcp_client import BIN, HttpServer, call, call_error, server_env  # noqa: E402

CALLERS = 64


def stdio_client(data_dir, mode="auto"):
    params = StdioServerParameters(command=BIN, args=["--data-dir", data_dir, "serve"], env=server_env())
    return Client(params, mode=mode)


async def schemas(client):
    return {t.name: t for t in (await client.list_tools()).tools}


async def error_of(client, tools, name, args):
    """An error result, checked against the tool's outputSchema (which admits the error shape)."""
    err, text = await call_error(client, name, args)
    jsonschema.validate(err, tools[name].output_schema)
    assert err["status"] == "error" or name in ("request_resources",), err
    return err, text


async def grants_of(client, job_id):
    h = await call(client, "allocation_history", {"job_id": job_id})
    return [e for e in h["events"] if e["type"] == "granted"]


async def seq_now(client):
    """The ledger's current seq: what plan_request reports (it writes nothing)."""
    p = await call(client, "plan_request", {"job_id": "probe", "mcp_servers": [], "workers": 1})
    return p["current_seq"]


def when(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))


# ---------------------------------------------------------------------------------------------


async def tools_listed():
    with tempfile.TemporaryDirectory() as d:
        async with stdio_client(d) as client:
            tools = await schemas(client)
            assert {"renew_allocation", "plan_request"} <= set(tools), set(tools)
            renew = tools["renew_allocation"]
            assert renew.input_schema["required"] == ["allocation_id"]
            assert set(renew.input_schema["properties"]) == {"allocation_id", "ttl_seconds", "expected_seq"}
            assert renew.input_schema["properties"]["ttl_seconds"]["minimum"] == 60
            assert renew.output_schema and renew.annotations.read_only_hint is False
            plan = tools["plan_request"]
            assert set(plan.input_schema["required"]) == {"job_id", "mcp_servers"}
            assert "expected_seq" not in plan.input_schema["properties"]
            assert "idempotency_key" in plan.input_schema["properties"]
            assert plan.output_schema and plan.annotations.read_only_hint is True
            req = tools["request_resources"].input_schema["properties"]
            assert req["idempotency_key"]["type"] == "string" and req["idempotency_key"]["maxLength"] == 128
            assert req["max_lifetime_seconds"]["type"] == "integer"
            assert req["expected_seq"]["type"] == "integer"
            assert "expected_seq" in tools["release_resources"].input_schema["properties"]
            assert "expected_seq" in tools["cleanup_expired"].input_schema["properties"]
            kinds = tools["request_resources"].output_schema
            assert "conflict" in str(kinds) and "not_active" in str(kinds)


def test_tools_list_has_the_contract_tools():
    asyncio.run(tools_listed())


async def race(clients, args):
    """CALLERS concurrent request_resources calls, spread over `clients`."""
    calls = [clients[i % len(clients)].call_tool("request_resources", args) for i in range(CALLERS)]
    results = await asyncio.gather(*calls)
    for r in results:
        assert not r.is_error, r.structured_content
    answers = [r.structured_content for r in results]
    ids = {a["allocation_id"] for a in answers}
    assert len(ids) == 1, ids
    assert sum(1 for a in answers if not a.get("replayed")) == 1, "exactly one answer is the grant itself"
    assert {tuple(w["worker_id"] for w in a["workers_allocated"]) for a in answers} == {
        tuple(w["worker_id"] for w in answers[0]["workers_allocated"])}
    return ids.pop()


async def check_one_grant(client, job_id, aid, workers):
    grants = await grants_of(client, job_id)
    assert len(grants) == 1 and grants[0]["allocation_id"] == aid, grants
    cap = await call(client, "get_capacity")
    assert cap["allocated_workers"] == workers, cap
    lst = await call(client, "list_allocations", {"job_id": job_id})
    assert lst["count"] == 1, lst


async def race_one_session(mode):
    with tempfile.TemporaryDirectory() as d:
        async with stdio_client(d, mode) as client:
            await schemas(client)
            args = {"job_id": "race", "mcp_servers": ["github"], "workers": 3, "idempotency_key": "race-key-1"}
            aid = await race([client], args)
            await check_one_grant(client, "race", aid, 3)
        # After a restart (a new server process), a retry is still answered, not granted again.
        async with stdio_client(d, mode) as client:
            again = await call(client, "request_resources", args)
            assert again["replayed"] is True and again["allocation_id"] == aid, again
            await check_one_grant(client, "race", aid, 3)


def test_64_callers_one_key_one_session():
    asyncio.run(race_one_session("auto"))


def test_64_callers_one_key_one_legacy_session():
    asyncio.run(race_one_session("legacy"))


async def race_many_sessions():
    token = "test-token-" + os.urandom(8).hex()
    with tempfile.TemporaryDirectory() as d:
        server = HttpServer(d, token)
        try:
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                      timeout=httpx2.Timeout(30, read=60))
            async with http:
                sessions = [Client(streamable_http_client(server.url, http_client=http), mode=m)
                            for m in ("auto", "legacy") * 4]
                clients = [await s.__aenter__() for s in sessions]
                try:
                    args = {"job_id": "race-http", "mcp_servers": [], "workers": 2,
                            "idempotency_key": "race-key-http"}
                    aid = await race(clients, args)
                    await check_one_grant(clients[0], "race-http", aid, 2)
                finally:
                    for s in reversed(sessions):
                        await s.__aexit__(None, None, None)
        finally:
            server.stop()


def test_64_callers_one_key_many_sessions():
    asyncio.run(race_many_sessions())


async def keys_and_renewals():
    with tempfile.TemporaryDirectory() as d:
        async with stdio_client(d) as client:
            tools = await schemas(client)
            args = {"job_id": "k", "mcp_servers": ["github"], "workers": 2, "ttl_seconds": 600,
                    "max_lifetime_seconds": 900, "idempotency_key": "k-1"}
            g = await call(client, "request_resources", args)
            assert g["status"] == "active" and "replayed" not in g, g
            seq = await seq_now(client)

            # The same key with other arguments: invalid_input naming idempotency_key, nothing written.
            for change in ({"workers": 3}, {"job_id": "k2"}, {"mcp_servers": []}, {"ttl_seconds": 700},
                           {"priority": "high"}, {"metadata": {"a": 1}}, {"max_lifetime_seconds": 1200}):
                err, text = await error_of(client, tools, "request_resources", {**args, **change})
                assert err["kind"] == "invalid_input" and err["field"] == "idempotency_key", (change, err)
                assert "idempotency_key" in text
            for bad in ("", "k" * 129, "tab\there", "\x01"):
                err, _ = await error_of(client, tools, "request_resources", {**args, "idempotency_key": bad})
                assert err["kind"] == "invalid_input" and err["field"] == "idempotency_key", (bad, err)
            assert await seq_now(client) == seq

            # renew_allocation: the deadline moves; capped by max_lifetime_seconds.
            r = await call(client, "renew_allocation", {"allocation_id": g["allocation_id"], "ttl_seconds": 700})
            assert r["status"] == "active" and r["renewals"] == 1 and r["capped_by_max_lifetime"] is False, r
            assert r["previous_expires_at"] == g["expires_at"], r
            assert when(r["expires_at"]) > when(g["expires_at"]), r
            d_now = await call(client, "get_allocation", {"allocation_id": g["allocation_id"]})
            assert d_now["timestamps"]["expires_at"] == r["expires_at"], d_now
            r = await call(client, "renew_allocation", {"allocation_id": g["allocation_id"], "ttl_seconds": 3600})
            assert r["capped_by_max_lifetime"] is True and r["renewals"] == 2, r
            assert when(r["expires_at"]) == when(g["created_at"]) + datetime.timedelta(seconds=900), r
            err, _ = await error_of(client, tools, "renew_allocation",
                                    {"allocation_id": g["allocation_id"], "ttl_seconds": 3600})
            assert err["kind"] == "invalid_input" and err["field"] == "ttl_seconds", err
            assert "max_lifetime_seconds" in err["error"], err
            err, _ = await error_of(client, tools, "renew_allocation",
                                    {"allocation_id": g["allocation_id"], "ttl_seconds": 59})
            assert err["kind"] == "invalid_input" and err["field"] == "ttl_seconds", err
            err, _ = await error_of(client, tools, "renew_allocation", {"allocation_id": "alloc-000000000000"})
            assert err["kind"] == "not_found", err

            # A retry of the grant still answers with the original (the renewed deadline is the
            # allocation's state now, the rest is the original grant).
            again = await call(client, "request_resources", args)
            assert again["replayed"] is True and again["allocation_id"] == g["allocation_id"], again
            assert again["workers_allocated"] == g["workers_allocated"], again

            # Released: not_active naming the state; nothing written.
            rel = await call(client, "release_resources", {"allocation_id": g["allocation_id"]})
            assert rel["status"] == "released", rel
            seq = await seq_now(client)
            err, text = await error_of(client, tools, "renew_allocation", {"allocation_id": g["allocation_id"]})
            assert err["kind"] == "not_active" and err["state"] == "released", err
            assert err["allocation_id"] == g["allocation_id"] and "released" in text, err
            assert await seq_now(client) == seq
            # release is idempotent: again is not an error and writes nothing.
            rel = await call(client, "release_resources", {"allocation_id": g["allocation_id"]})
            assert rel["status"] == "already_released", rel
            assert await seq_now(client) == seq
            again = await call(client, "request_resources", args)
            assert again["replayed"] is True and again["status"] == "released", again


def test_idempotency_key_rules_and_renewal():
    asyncio.run(keys_and_renewals())


async def plan_then_act():
    with tempfile.TemporaryDirectory() as d:
        async with stdio_client(d) as client:
            tools = await schemas(client)
            await call(client, "request_resources", {"job_id": "first", "mcp_servers": [], "workers": 4})
            req = {"job_id": "planned", "mcp_servers": ["github"], "workers": 3, "priority": "high"}
            plan = await call(client, "plan_request", req)
            assert plan["would_grant"] is True and plan["outcome"]["status"] == "active", plan
            assert await seq_now(client) == plan["current_seq"], "a plan writes nothing"
            cap = await call(client, "get_capacity")
            assert cap["allocated_workers"] == 4, "a plan reserves nothing"

            g = await call(client, "request_resources", {**req, "expected_seq": plan["current_seq"]})
            assert g["workers_allocated"] == plan["outcome"]["workers_allocated"], (g, plan)
            assert g["mcp_servers"] == plan["outcome"]["mcp_servers"], (g, plan)
            assert g["seq"] == plan["current_seq"] + 1

            # The plan is now stale: every write with it is a conflict carrying current_seq.
            stale = plan["current_seq"]
            current = await seq_now(client)
            for name, args in (("request_resources", {**req, "job_id": "late"}),
                               ("release_resources", {"allocation_id": g["allocation_id"]}),
                               ("renew_allocation", {"allocation_id": g["allocation_id"]}),
                               ("cleanup_expired", {})):
                err, text = await error_of(client, tools, name, {**args, "expected_seq": stale})
                assert err["kind"] == "conflict", (name, err)
                assert err["current_seq"] == current and err["expected_seq"] == stale, (name, err)
                assert "conflict" in text
            assert await seq_now(client) == current, "no conflicting write wrote anything"
            err, _ = await error_of(client, tools, "cleanup_expired", {"expected_seq": -1})
            assert err["kind"] == "invalid_input" and err["field"] == "expected_seq", err

            # With the current seq each write goes through.
            r = await call(client, "renew_allocation", {"allocation_id": g["allocation_id"], "expected_seq": current})
            assert r["seq"] == current + 1, r
            await call(client, "cleanup_expired", {"expected_seq": current + 1})
            rel = await call(client, "release_resources", {"allocation_id": g["allocation_id"],
                                                            "expected_seq": current + 1})
            assert rel["status"] == "released", rel

            # A plan that would not be granted: the reason a request would record.
            plan = await call(client, "plan_request", {"job_id": "big", "mcp_servers": [], "workers": 7})
            assert plan["would_grant"] is False and plan["outcome"]["status"] == "failed", plan
            assert plan["outcome"]["error"] == "Insufficient workers: requested 7, available 6", plan
            err, _ = await error_of(client, tools, "request_resources",
                                    {"job_id": "big", "mcp_servers": [], "workers": 7,
                                     "expected_seq": plan["current_seq"]})
            assert err["status"] == "failed" and err["error"] == plan["outcome"]["error"], err

            # A retry with a stale expected_seq is answered from its key, not a conflict.
            keyed = {"job_id": "keyed", "mcp_servers": [], "workers": 1, "idempotency_key": "plan-key"}
            seq = await seq_now(client)
            first = await call(client, "request_resources", {**keyed, "expected_seq": seq})
            retry = await call(client, "request_resources", {**keyed, "expected_seq": seq})
            assert retry["replayed"] is True and retry["allocation_id"] == first["allocation_id"], retry


def test_plan_then_act_with_expected_seq():
    asyncio.run(plan_then_act())


async def queue_gaps():
    """A keyed retry of a waiting request waits for the same one (never queued twice), and
    release_resources of a waiting request cancels it (status "cancelled"; the waiting call
    returns cancelled); a second release is already_cancelled. Shapes checked against the
    tools' outputSchema."""
    with tempfile.TemporaryDirectory() as d:
        async with stdio_client(d) as client:
            tools = await schemas(client)
            await call(client, "request_resources", {"job_id": "big", "mcp_servers": [], "workers": 10})
            req = {"job_id": "w", "mcp_servers": [], "workers": 2, "wait": True,
                   "queue_timeout_seconds": 120, "idempotency_key": "k-wait"}
            first = asyncio.create_task(client.call_tool("request_resources", req))
            pending = []
            for _ in range(200):
                pending = (await call(client, "list_allocations", {"state": "pending"}))["allocations"]
                if pending:
                    break
                await asyncio.sleep(0.02)
            assert len(pending) == 1, pending
            retry = asyncio.create_task(client.call_tool("request_resources", req))
            await asyncio.sleep(0.2)
            page = await call(client, "list_allocations", {"state": "pending", "limit": 10})
            assert page["count"] == 1 and page["next_cursor"] is None, page
            rel = await call(client, "release_resources", {"allocation_id": pending[0]["allocation_id"]})
            jsonschema.validate(rel, tools["release_resources"].output_schema)
            assert rel["status"] == "cancelled" and rel["state"] == "cancelled", rel
            for task in (first, retry):
                r = await task
                assert r.is_error, r.structured_content
                assert r.structured_content["reason"] == "cancelled", r.structured_content
                assert r.structured_content["allocation_id"] == pending[0]["allocation_id"]
            again = await call(client, "release_resources", {"allocation_id": pending[0]["allocation_id"]})
            jsonschema.validate(again, tools["release_resources"].output_schema)
            assert again["status"] == "already_cancelled", again


def test_queue_gaps_over_mcp():
    asyncio.run(queue_gaps())
