// Node `fetch` (undici, keep-alive on by default) against `allocation-ledger serve --http`.
// Driven by scripts/mcp_latency.py; prints one JSON line.
//   node scripts/mcp_fetch.mjs URL seq CALLS          -> {"latencies_ms": [...]}   one session, one call at a time
//   node scripts/mcp_fetch.mjs URL concurrent N SECS  -> {"calls": C, "seconds": S} N sessions, each one call at a time
const [url, mode, a, b] = process.argv.slice(2);
const HEADERS = { "content-type": "application/json", accept: "application/json, text/event-stream" };

function parse(text) {
  // The body is JSON or an SSE stream whose `data:` line carries the response.
  if (text.startsWith("{")) return JSON.parse(text);
  for (const line of text.split("\n")) {
    if (line.startsWith("data:")) {
      const data = line.slice(5).trim();
      if (data.startsWith("{")) {
        const v = JSON.parse(data);
        if (v.id !== undefined) return v;
      }
    }
  }
  throw new Error("no JSON-RPC response in " + JSON.stringify(text));
}

async function session() {
  const init = {
    jsonrpc: "2.0", id: 0, method: "initialize",
    params: { protocolVersion: "2025-11-25", capabilities: {}, clientInfo: { name: "bench", version: "0" } },
  };
  const r = await fetch(url, { method: "POST", headers: HEADERS, body: JSON.stringify(init) });
  const sid = r.headers.get("mcp-session-id");
  parse(await r.text());
  const h = { ...HEADERS, "mcp-session-id": sid, "mcp-protocol-version": "2025-11-25" };
  const n = await fetch(url, { method: "POST", headers: h, body: JSON.stringify({ jsonrpc: "2.0", method: "notifications/initialized" }) });
  await n.text();
  let id = 1;
  return async () => {
    const body = JSON.stringify({ jsonrpc: "2.0", id: id++, method: "tools/call", params: { name: "get_capacity", arguments: {} } });
    const r = await fetch(url, { method: "POST", headers: h, body });
    const v = parse(await r.text());
    if (!v.result || v.result.isError) throw new Error("call failed: " + JSON.stringify(v));
  };
}

if (mode === "seq") {
  const call = await session();
  for (let i = 0; i < 20; i++) await call();
  const lat = [];
  for (let i = 0; i < Number(a); i++) {
    const t = process.hrtime.bigint();
    await call();
    lat.push(Number(process.hrtime.bigint() - t) / 1e6);
  }
  console.log(JSON.stringify({ latencies_ms: lat }));
} else if (mode === "concurrent") {
  const calls = await Promise.all(Array.from({ length: Number(a) }, () => session()));
  for (const c of calls) await c();
  const end = Date.now() + Number(b) * 1000;
  const t0 = process.hrtime.bigint();
  let done = 0;
  await Promise.all(calls.map(async (call) => {
    while (Date.now() < end) { await call(); done++; }
  }));
  console.log(JSON.stringify({ calls: done, seconds: Number(process.hrtime.bigint() - t0) / 1e9 }));
} else {
  throw new Error("mode is seq or concurrent");
}
