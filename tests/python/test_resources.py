"""Resources, subscriptions and logging with the Python `mcp` SDK over stdio (2025-11-25 session):
list and read the resources, subscribe to the capacity, grant, and receive
notifications/resources/updated and a notifications/message of the grant.

Run:  python -m pytest tests/python/test_resources.py -v
"""

import asyncio
import json
import os
import tempfile

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from test_mcp_client import BIN, call, server_env

DEADLINE_SECONDS = 60

# resources/subscribe and logging are 2025-11-25 features (2026-07-28 replaces them): the SDK
# warns on each use, which is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:.*2026-07-28")


async def wait_for(queue, what, want):
    """The first item of `queue` that satisfies `want`, within the deadline."""
    seen = []
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_SECONDS
    while True:
        try:
            item = await asyncio.wait_for(queue.get(), timeout=max(0.0, end - loop.time()))
        except asyncio.TimeoutError:
            raise AssertionError(f"no {what}; received instead: {seen}")
        if want(item):
            return item
        seen.append(item)


async def watch():
    notes = asyncio.Queue()
    logs = asyncio.Queue()

    async def on_message(message):
        root = getattr(message, "root", message)
        method = getattr(root, "method", None)
        if method == "notifications/resources/updated":
            await notes.put(str(root.params.uri))

    async def on_log(params):
        await logs.put(params)

    with tempfile.TemporaryDirectory() as d:
        params = StdioServerParameters(command=BIN, args=["--data-dir", d, "serve"], env=server_env())
        async with Client(params, mode="legacy", message_handler=on_message, logging_callback=on_log) as client:
            caps = client.server_capabilities
            assert caps.resources is not None and caps.resources.subscribe, caps
            assert caps.logging is not None, caps

            uris = [str(r.uri) for r in (await client.list_resources()).resources]
            assert uris == ["ledger://capacity", "ledger://events"], uris
            templates = (await client.list_resource_templates()).resource_templates
            assert [t.uri_template for t in templates] == ["ledger://allocations/{allocation_id}"]

            r = await client.read_resource("ledger://capacity")
            assert r.contents[0].mime_type == "application/json"
            assert json.loads(r.contents[0].text)["available_workers"] == 10

            await client.subscribe_resource("ledger://capacity")
            await client.set_logging_level("info")
            g = await call(client, "request_resources", {"job_id": "py", "mcp_servers": [], "workers": 2})

            await wait_for(notes, "capacity update", lambda u: u == "ledger://capacity")
            log = await wait_for(logs, "log of the grant",
                                 lambda p: isinstance(p.data, dict) and p.data.get("event") == "granted")
            assert log.level == "info" and log.data["allocation_id"] == g["allocation_id"], log

            r = await client.read_resource(f"ledger://allocations/{g['allocation_id']}")
            assert json.loads(r.contents[0].text)["state"] == "active"
            r = await client.read_resource("ledger://capacity")
            assert json.loads(r.contents[0].text)["available_workers"] == 8
            await client.unsubscribe_resource("ledger://capacity")


def test_resources_subscription_and_logging_over_stdio():
    asyncio.run(watch())


if __name__ == "__main__":
    test_resources_subscription_and_logging_over_stdio()
    print("ok")
