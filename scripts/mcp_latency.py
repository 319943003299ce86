#!/usr/bin/env python3
"""MCP tool-call latency by transport, against a built `allocation-ledger` binary.

One `get_capacity` call at a time (p50 / p99 over CALLS calls, after 20 warm-up calls) over:
stdio; HTTP on one kept-alive connection from Python `http.client` and from Node `fetch`;
HTTP with a new connection per call (Python `http.client`); and the throughput of 64
concurrent HTTP sessions (Node `fetch`, each session one call at a time) over SECONDS.
Each transport gets a fresh server over a fresh ledger. Prints a Markdown table.

    cargo build --release --all-features
    python3 scripts/mcp_latency.py [--bin target/release/allocation-ledger] [--calls 2000] [--seconds 5]
"""

import argparse
import http.client
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
INIT_PARAMS = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}
CALL = {"name": "get_capacity", "arguments": {}}


def pct(samples, p):
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def message(body: bytes):
    text = body.decode()
    if text.startswith("{"):
        return json.loads(text)
    for line in text.splitlines():
        if line.startswith("data:") and line[5:].strip().startswith("{"):
            v = json.loads(line[5:])
            if "id" in v:
                return v
    raise RuntimeError(f"no JSON-RPC response in {text!r}")


class Http:
    def __init__(self, binary):
        self.dir = tempfile.TemporaryDirectory(prefix="mcp-latency-")
        self.proc = subprocess.Popen(
            [binary, "--data-dir", self.dir.name, "serve", "--http", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "RUST_LOG": "warn"}, text=True,
        )
        for _ in range(1000):
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("the server exited before listening")
            if "listening on http://" in line:
                self.url = line[line.index("http://"):].strip()
                break
        u = urllib.parse.urlsplit(self.url)
        self.host, self.port, self.path = u.hostname, u.port, u.path

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.dir.cleanup()


def py_session(server, conn_factory):
    """initialize + notifications/initialized; returns a function making one call."""
    conn = conn_factory()
    conn.request("POST", server.path, json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT_PARAMS}), HEADERS)
    r = conn.getresponse()
    sid = r.getheader("mcp-session-id")
    message(r.read())
    h = {**HEADERS, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    conn.request("POST", server.path, json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}), h)
    r = conn.getresponse()
    r.read()
    state = {"id": 1, "conn": conn}

    def call(new_connection=False):
        if new_connection:
            state["conn"].close()
            state["conn"] = conn_factory()
        state["id"] += 1
        body = json.dumps({"jsonrpc": "2.0", "id": state["id"], "method": "tools/call", "params": CALL})
        state["conn"].request("POST", server.path, body, h)
        resp = state["conn"].getresponse()
        v = message(resp.read())
        assert not v["result"]["isError"], v

    return call


def measure_python(binary, calls, new_connection):
    server = Http(binary)
    try:
        call = py_session(server, lambda: http.client.HTTPConnection(server.host, server.port))
        for _ in range(20):
            call(new_connection)
        lat = []
        for _ in range(calls):
            t = time.perf_counter()
            call(new_connection)
            lat.append((time.perf_counter() - t) * 1000)
        return lat
    finally:
        server.stop()


def cpu_seconds(pid):
    """User + system CPU time of a live process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_node(binary, args):
    """The Node script's result, plus the CPU seconds the server and the client used."""
    server = Http(binary)
    try:
        server_cpu = cpu_seconds(server.proc.pid)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(["node", os.path.join(HERE, "mcp_fetch.mjs"), server.url, *map(str, args)],
                             check=True, capture_output=True, text=True, timeout=600)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = json.loads(out.stdout)
        result["server_cpu"] = cpu_seconds(server.proc.pid) - server_cpu
        result["client_cpu"] = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
        return result
    finally:
        server.stop()


def measure_stdio(binary, calls):
    with tempfile.TemporaryDirectory(prefix="mcp-latency-") as d:
        p = subprocess.Popen([binary, "--data-dir", d, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "RUST_LOG": "warn"}, text=True, bufsize=1)
        next_id = [0]

        def request(method, params):
            next_id[0] += 1
            p.stdin.write(json.dumps({"jsonrpc": "2.0", "id": next_id[0], "method": method, "params": params}) + "\n")
            p.stdin.flush()
            while True:
                v = json.loads(p.stdout.readline())
                if v.get("id") == next_id[0]:
                    return v

        request("initialize", INIT_PARAMS)
        p.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n")
        p.stdin.flush()
        for _ in range(20):
            request("tools/call", CALL)
        lat = []
        for _ in range(calls):
            t = time.perf_counter()
            request("tools/call", CALL)
            lat.append((time.perf_counter() - t) * 1000)
        p.stdin.close()
        p.wait(timeout=60)
        return lat


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(HERE, "..", "target", "release", "allocation-ledger"))
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--concurrency", type=int, default=64)
    a = ap.parse_args()

    def row(name, lat):
        return f"| {name} | {statistics.median(lat):.2f} ms | {pct(lat, 99):.2f} ms | {len(lat) / (sum(lat) / 1000):.0f}/s |"

    rows = [
        row("stdio", measure_stdio(a.bin, a.calls)),
        row("HTTP, one kept-alive connection, Python http.client", measure_python(a.bin, a.calls, False)),
        row("HTTP, one kept-alive connection, Node fetch", measure_node(a.bin, ["seq", a.calls])["latencies_ms"]),
        row("HTTP, a new connection per call, Python http.client", measure_python(a.bin, a.calls, True)),
    ]
    c = measure_node(a.bin, ["concurrent", a.concurrency, a.seconds])
    rows.append(f"| HTTP, {a.concurrency} concurrent sessions (Node fetch, each one call at a time) | | | "
                f"{c['calls'] / c['seconds']:.0f} calls/s |")
    # Includes the sessions' setup; the run itself is most of it.
    cpu_note = (f"{a.concurrency} sessions: {c['calls']} calls in {c['seconds']:.1f} s; CPU used by the server "
                f"{c['server_cpu']:.1f} s, by the Node client {c['client_cpu']:.1f} s "
                f"({(c['server_cpu'] + c['client_cpu']) / c['seconds']:.2f} cores of {os.cpu_count()}); "
                f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"get_capacity, {a.calls} calls one at a time per row (after 20 warm-up calls); binary {a.bin}")
    print()
    print("| transport | p50 | p99 | calls/s |")
    print("|---|---:|---:|---:|")
    print("\n".join(rows))
    print()
    print(cpu_note)


if __name__ == "__main__":
    sys.exit(main())
