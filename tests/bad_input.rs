//! The bad-input table: every field of every CLI command and MCP tool, and every config field,
//! tried with wrong values (empty, too long, control characters, wrong type, negative, zero
//! where it makes no sense, above the pool, unknown enum values, malformed ids and times,
//! metadata that is not an object or is too large). Each must give a clear error that names
//! the field and says what is allowed, and write no event.
//!
//! The table in `docs/reliability.md` is generated from the cases below and what they
//! returned; the test fails if it is stale. Regenerate it with
//! `UPDATE_RELIABILITY_DOC=1 cargo test --test bad_input`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece
#![cfg(feature = "server")]

#[path = "mcp_common/mod.rs"]
mod mcp_common;

use allocation_ledger::{Config, Error, Ledger};
use serde_json::{json, Value};
use std::path::Path;

thread_local! {
    static FAILURES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Records a failed check (all are reported together at the end).
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            let m = format!($($msg)+);
            FAILURES.with(|f| f.borrow_mut().push(m));
        }
    };
}

macro_rules! check_eq {
    ($a:expr, $b:expr, $($msg:tt)+) => {
        if $a != $b {
            let m = format!("{} (got {:?}, expected {:?})", format!($($msg)+), $a, $b);
            FAILURES.with(|f| f.borrow_mut().push(m));
        }
    };
}

/// One row of the table.
struct Row {
    surface: String,
    input: String,
    field: String,
    error: String,
}

fn event_count(dir: &Path) -> usize {
    Ledger::open_read_only(dir).unwrap().events(1, usize::MAX).unwrap().len()
}

fn first_line(s: &str) -> String {
    let line = s.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").to_string();
    // Paths of the temporary directory differ from run to run.
    line.replace('|', "\\|")
}

fn clip(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_control() { '·' } else { c }).collect();
    if s.chars().count() > 60 {
        format!("{}… ({} chars)", s.chars().take(40).collect::<String>(), s.chars().count())
    } else {
        s
    }
}

// ---------------------------------------------------------------------------------------------
// CLI

/// (args after `--json`, shown input, field named (JSON `error.field`, or the flag for clap's
/// own errors), a phrase saying what is allowed).
type CliCase = (Vec<String>, String, &'static str, &'static str);

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(std::string::ToString::to_string).collect()
}

fn cli_cases() -> Vec<CliCase> {
    let long_job = "x".repeat(257);
    let long_mcp = "m".repeat(65);
    let big_meta = format!("{{\"blob\":\"{}\"}}", "y".repeat(20_000));
    let mut many_mcp = s(&["request", "--job-id", "j"]);
    for i in 0..65 {
        many_mcp.push("--mcp-server".into());
        many_mcp.push(format!("m{i}"));
    }
    let req = |extra: &[&str]| {
        let mut v = s(&["request", "--job-id", "j", "--workers", "1"]);
        v.extend(extra.iter().map(std::string::ToString::to_string));
        v
    };
    vec![
        (s(&["request", "--job-id", "", "--workers", "1"]), "request --job-id ''".into(), "job_id", "non-empty"),
        (s(&["request", "--job-id", "   ", "--workers", "1"]), "request --job-id '   '".into(), "job_id", "non-empty"),
        (
            s(&["request", "--job-id", &long_job, "--workers", "1"]),
            "request --job-id <257 chars>".into(),
            "job_id",
            "at most 256",
        ),
        (
            s(&["request", "--job-id", "a\nb", "--workers", "1"]),
            "request --job-id 'a\\nb'".into(),
            "job_id",
            "control characters",
        ),
        (s(&["request", "--workers", "1"]), "request without --job-id".into(), "--job-id", "--job-id"),
        (req(&["--idempotency-key", ""]), "request --idempotency-key ''".into(), "idempotency_key", "1 to 128 bytes"),
        (
            req(&["--idempotency-key", &"k".repeat(129)]),
            "request --idempotency-key <129 bytes>".into(),
            "idempotency_key",
            "1 to 128 bytes",
        ),
        (
            req(&["--idempotency-key", "a\tb"]),
            "request --idempotency-key 'a\\tb'".into(),
            "idempotency_key",
            "printable",
        ),
        (
            req(&["--max-lifetime-seconds", "10"]),
            "request --max-lifetime-seconds 10".into(),
            "max_lifetime_seconds",
            "the request's ttl_seconds",
        ),
        (req(&["--expected-seq", "-3"]), "request --expected-seq -3".into(), "expected_seq", "whole number"),
        (s(&["renew", "alloc-zz"]), "renew alloc-zz".into(), "allocation_id", "12 lowercase hex digits"),
        (
            s(&["renew", "alloc-000000000001", "--ttl-seconds", "x"]),
            "renew ID --ttl-seconds x".into(),
            "ttl_seconds",
            "whole number",
        ),
        (s(&["request", "--job-id", "j", "--workers", "-1"]), "request --workers -1".into(), "workers", "whole number"),
        (
            s(&["request", "--job-id", "j", "--workers", "1.5"]),
            "request --workers 1.5".into(),
            "workers",
            "whole number",
        ),
        (
            s(&["request", "--job-id", "j", "--workers", "two"]),
            "request --workers two".into(),
            "workers",
            "whole number",
        ),
        (
            s(&["request", "--job-id", "j", "--workers", "99999999999"]),
            "request --workers 99999999999".into(),
            "workers",
            "whole number",
        ),
        (
            s(&["request", "--job-id", "j", "--workers", "11"]),
            "request --workers 11 (pool of 10)".into(),
            "workers",
            "0 to 10",
        ),
        (
            s(&["request", "--job-id", "j", "--workers", "0"]),
            "request --workers 0, no MCP server".into(),
            "workers",
            "at least 1 worker",
        ),
        (req(&["--priority", "urgent"]), "request --priority urgent".into(), "priority", "low, normal, high, critical"),
        (req(&["--priority", ""]), "request --priority ''".into(), "priority", "low, normal, high, critical"),
        (req(&["--priority", "HIGH"]), "request --priority HIGH".into(), "priority", "low, normal, high, critical"),
        (req(&["--ttl-seconds", "0"]), "request --ttl-seconds 0".into(), "ttl_seconds", "60 to 604800"),
        (req(&["--ttl-seconds", "59"]), "request --ttl-seconds 59".into(), "ttl_seconds", "60 to 604800"),
        (req(&["--ttl-seconds", "604801"]), "request --ttl-seconds 604801".into(), "ttl_seconds", "60 to 604800"),
        (req(&["--ttl-seconds", "-5"]), "request --ttl-seconds -5".into(), "ttl_seconds", "whole number"),
        (req(&["--ttl-seconds", "1h"]), "request --ttl-seconds 1h".into(), "ttl_seconds", "whole number"),
        (req(&["--metadata", "[1,2]"]), "request --metadata '[1,2]'".into(), "metadata", "JSON object"),
        (req(&["--metadata", "\"text\""]), "request --metadata '\"text\"'".into(), "metadata", "JSON object"),
        (req(&["--metadata", "{bad"]), "request --metadata '{bad'".into(), "metadata", "not valid JSON"),
        (
            req(&["--metadata", &big_meta]),
            "request --metadata <20 KB object>".into(),
            "metadata",
            "at most 16384 bytes",
        ),
        (req(&["--metadata", "{\"\":1}"]), "request --metadata '{\"\":1}'".into(), "metadata", "1 to 128 characters"),
        (
            req(&["--metadata", "{\"a\\u0001\":1}"]),
            "request --metadata key with a control character".into(),
            "metadata",
            "without control characters",
        ),
        (
            s(&["request", "--job-id", "j", "--mcp-server", ""]),
            "request --mcp-server ''".into(),
            "mcp_servers[0]",
            "A-Z a-z 0-9 . _ -",
        ),
        (
            s(&["request", "--job-id", "j", "--mcp-server", "has space"]),
            "request --mcp-server 'has space'".into(),
            "mcp_servers[0]",
            "A-Z a-z 0-9 . _ -",
        ),
        (
            s(&["request", "--job-id", "j", "--mcp-server", &long_mcp]),
            "request --mcp-server <65 chars>".into(),
            "mcp_servers[0]",
            "1 to 64 characters",
        ),
        (
            s(&["request", "--job-id", "j", "--mcp-server", "a", "--mcp-server", "a"]),
            "request --mcp-server a --mcp-server a".into(),
            "mcp_servers[1]",
            "name each MCP server once",
        ),
        (many_mcp, "request with 65 --mcp-server".into(), "mcp_servers", "at most 64"),
        (
            s(&["request", "--job-id", "j", "--workers", "1", "--colour", "red"]),
            "request --colour red".into(),
            "--colour",
            "--colour",
        ),
        (s(&["release", ""]), "release ''".into(), "allocation_id", "alloc-` followed by 12 lowercase hex digits"),
        (
            s(&["release", "12345"]),
            "release 12345".into(),
            "allocation_id",
            "alloc-` followed by 12 lowercase hex digits",
        ),
        (
            s(&["release", "alloc-1A2B3C4D5E6F"]),
            "release alloc-1A2B3C4D5E6F".into(),
            "allocation_id",
            "12 lowercase hex digits",
        ),
        (
            s(&["release", "alloc-1a2b3c4d5e6f0"]),
            "release alloc-1a2b3c4d5e6f0".into(),
            "allocation_id",
            "12 lowercase hex digits",
        ),
        (s(&["release"]), "release without an id".into(), "ALLOCATION_ID", "ALLOCATION_ID"),
        (s(&["get", "alloc-XYZ"]), "get alloc-XYZ".into(), "allocation_id", "12 lowercase hex digits"),
        (
            s(&["get", "alloc-\u{1}23456789abc"]),
            "get with a control character".into(),
            "allocation_id",
            "12 lowercase hex digits",
        ),
        (s(&["list", "--state", "gone"]), "list --state gone".into(), "state", "active, released, expired, failed"),
        (s(&["list", "--state", ""]), "list --state ''".into(), "state", "active, released, expired, failed"),
        (s(&["list", "--job-id", ""]), "list --job-id ''".into(), "job_id", "non-empty"),
        (s(&["list", "--job-id", "a\tb"]), "list --job-id 'a\\tb'".into(), "job_id", "control characters"),
        (s(&["log", "--from-seq", "-1"]), "log --from-seq -1".into(), "--from-seq", "--from-seq"),
        (s(&["log", "--from-seq", "x"]), "log --from-seq x".into(), "--from-seq", "--from-seq"),
        (s(&["log", "--limit", "-3"]), "log --limit -3".into(), "--limit", "--limit"),
        (s(&["log", "--since", "yesterday"]), "log --since yesterday".into(), "since", "RFC 3339"),
        (
            s(&["log", "--until", "2026-13-45T00:00:00Z"]),
            "log --until 2026-13-45T00:00:00Z".into(),
            "until",
            "RFC 3339",
        ),
        (s(&["history"]), "history without --allocation or --job-id".into(), "--allocation", "--allocation"),
        (
            s(&["history", "--allocation", "nope"]),
            "history --allocation nope".into(),
            "allocation",
            "12 lowercase hex digits",
        ),
        (s(&["usage", "--since", "-2x"]), "usage --since -2x".into(), "since", "RFC 3339"),
        (s(&["usage", "--since", "-1d", "--by", "metadata."]), "usage --by metadata.".into(), "by", "metadata.KEY"),
        (
            s(&["usage", "--since", "-1d", "--by", "metadata.a\u{7}b"]),
            "usage --by 'metadata.a\\ab'".into(),
            "by",
            "without control characters",
        ),
        (
            s(&["timeline", "--since", "-1d", "--bucket", "0s"]),
            "timeline --bucket 0s".into(),
            "bucket",
            "30s, 5m, 1h, 1d",
        ),
        (
            s(&["timeline", "--since", "-1d", "--bucket", "soon"]),
            "timeline --bucket soon".into(),
            "bucket",
            "30s, 5m, 1h, 1d",
        ),
        (s(&["repair", "--force"]), "repair --force".into(), "--force", "--force-truncate"),
        (
            s(&["serve", "--expiry-interval-seconds", "0"]),
            "serve --expiry-interval-seconds 0".into(),
            "--expiry-interval-seconds",
            "1..=3600",
        ),
        (
            s(&["serve", "--http", "127.0.0.1:0", "--http-header-timeout-seconds", "0"]),
            "serve --http-header-timeout-seconds 0".into(),
            "--http-header-timeout-seconds",
            "1..=3600",
        ),
        (
            s(&["serve", "--http", "127.0.0.1:0", "--http-max-connections", "0"]),
            "serve --http-max-connections 0".into(),
            "--http-max-connections",
            "1..=1000000",
        ),
        (s(&["frobnicate"]), "an unknown subcommand".into(), "frobnicate", "frobnicate"),
    ]
}

fn run_cli(dir: &Path, args: &[String]) -> (i32, Value, String) {
    let o = mcp_common::bin().arg("--data-dir").arg(dir).arg("--json").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("{args:?}: not one JSON document ({e}): {stdout:?} {}", String::from_utf8_lossy(&o.stderr))
    });
    (o.status.code().unwrap(), v, String::from_utf8_lossy(&o.stderr).to_string())
}

fn cli_rows(dir: &Path) -> Vec<Row> {
    let before = event_count(dir);
    let mut rows = Vec::new();
    for (args, input, field, allowed) in cli_cases() {
        let (code, v, _) = run_cli(dir, &args);
        let ctx = format!("CLI {input}");
        check_eq!(code, 2, "{ctx}: exit code: {v}");
        check_eq!(v["error"]["kind"], "invalid_input", "{ctx}: {v}");
        let message = v["error"]["message"].as_str().unwrap().to_string();
        match v["error"]["field"].as_str() {
            Some(f) => check_eq!(f, field, "{ctx}: {v}"),
            // clap's own errors (unknown flags, numbers it parses itself) name the flag.
            None => check!(message.contains(field), "{ctx}: the message does not name {field}: {message}"),
        }
        check!(message.contains(allowed), "{ctx}: the message does not say {allowed:?}: {message}");
        rows.push(Row { surface: "CLI".into(), input, field: field.into(), error: first_line(&message) });
    }
    // The human form names the field and the flag too.
    let o = mcp_common::bin()
        .arg("--data-dir")
        .arg(dir)
        .args(["request", "--job-id", "j", "--workers", "-1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    check!(err.contains("invalid workers") && err.contains("(flag --workers)"), "{err}");
    check_eq!(event_count(dir), before, "invalid CLI input wrote an event");
    rows
}

// ---------------------------------------------------------------------------------------------
// Config files

type ConfigCase = (&'static str, &'static str, &'static str);

fn config_cases() -> Vec<ConfigCase> {
    vec![
        ("[]", "config", "JSON object"),
        ("{\"worker_slotz\": 3}", "config", "known fields"),
        ("{\"total_cpu_millicores\": 0}", "config.total_cpu_millicores", "greater than 0"),
        ("{\"total_cpu_millicores\": -1}", "config.total_cpu_millicores", "expected u64"),
        ("{\"total_cpu_millicores\": \"16\"}", "config.total_cpu_millicores", "expected u64"),
        ("{\"total_cpu_millicores\": 2199023255553}", "config.total_cpu_millicores", "below 2^40"),
        ("{\"total_memory_mib\": 0}", "config.total_memory_mib", "greater than 0"),
        ("{\"total_memory_mib\": 1.5}", "config.total_memory_mib", "expected u64"),
        ("{\"worker_slots\": 100001}", "config.worker_slots", "limit of 100000"),
        ("{\"worker_slots\": -1}", "config.worker_slots", "expected u32"),
        ("{\"worker_cpu_millicores\": 17000}", "config.worker_cpu_millicores", "exceeds total_cpu_millicores"),
        ("{\"worker_memory_mib\": 40000}", "config.worker_memory_mib", "exceeds total_memory_mib"),
        ("{\"worker_endpoints\": [\"http://a:1\"]}", "config.worker_endpoints", "exactly worker_slots"),
        ("{\"worker_slots\": 1, \"worker_endpoints\": [\"\"]}", "config.worker_endpoints[0]", "non-empty URL"),
        (
            "{\"worker_slots\": 1, \"worker_endpoints\": [\"http://a\\n\"]}",
            "config.worker_endpoints[0]",
            "without control characters",
        ),
        ("{\"worker_endpoints\": \"http://a:1\"}", "config.worker_endpoints", "expected a sequence"),
        ("{\"worker_base_port\": 65530}", "config.worker_base_port", "within port 65535"),
        ("{\"worker_base_port\": 70000}", "config.worker_base_port", "expected u16"),
        (
            "{\"mcp_catalog\": {\"bad name\": {\"endpoint\": \"http://x:1\"}}}",
            "config.mcp_catalog key \"bad name\"",
            "A-Z a-z 0-9 . _ -",
        ),
        ("{\"mcp_catalog\": {\"gh\": {\"endpoint\": \"\"}}}", "config.mcp_catalog.gh.endpoint", "non-empty URL"),
        (
            "{\"mcp_catalog\": {\"gh\": {\"endpoint\": \"http://x:1\", \"cpu_millicores\": 99999}}}",
            "config.mcp_catalog.gh",
            "more than the whole pool",
        ),
        (
            "{\"mcp_catalog\": {\"gh\": {\"endpoint\": \"http://x:1\", \"colour\": 1}}}",
            "config.mcp_catalog",
            "unknown field `colour`",
        ),
        ("{\"mcp_catalog\": [\"gh\"]}", "config.mcp_catalog", "expected a map"),
        ("{\"mcp_base_port\": -1}", "config.mcp_base_port", "expected u16"),
        ("{\"strict_mcp_catalog\": \"yes\"}", "config.strict_mcp_catalog", "expected a boolean"),
        ("{\"min_ttl_seconds\": 0}", "config.min_ttl_seconds", "at least 1"),
        ("{\"max_ttl_seconds\": 30}", "config.max_ttl_seconds", "below min_ttl_seconds"),
        ("{\"max_ttl_seconds\": 400000000}", "config.max_ttl_seconds", "at most ten years"),
        ("{\"default_ttl_seconds\": 10}", "config.default_ttl_seconds", "must lie between"),
        ("{\"snapshot_every\": -1}", "config.snapshot_every", "expected u64"),
        ("{\"max_metadata_bytes\": 300000}", "config.max_metadata_bytes", "at most 262144"),
        ("{\"segment_size_bytes\": 100}", "config.segment_size_bytes", "between 4096 and 4294967296"),
        ("{\"segment_size_bytes\": 8589934592}", "config.segment_size_bytes", "between 4096 and 4294967296"),
        ("{\"terminal_retained\": 10000001}", "config.terminal_retained", "at most 10000000"),
        ("{\"terminal_retained\": -1}", "config.terminal_retained", "expected u64"),
        (
            "{\"priority_reserve_percent\": {\"low\": 101, \"normal\": 0, \"high\": 0, \"critical\": 0}}",
            "config.priority_reserve_percent.low",
            "0..=100",
        ),
        ("{\"priority_reserve_percent\": {\"low\": 10}}", "config.priority_reserve_percent", "missing field `normal`"),
        (
            "{\"priority_reserve_percent\": {\"low\": -1, \"normal\": 0, \"high\": 0, \"critical\": 0}}",
            "config.priority_reserve_percent",
            "expected u8",
        ),
    ]
}

fn config_rows(dir: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    for (text, field, allowed) in config_cases() {
        let ctx = format!("config {text}");
        let Err(e) = Config::from_json(text) else {
            check!(false, "{ctx}: accepted");
            continue;
        };
        let Error::InvalidInput { field: got, message } = &e else {
            check!(false, "{ctx}: {e}");
            continue;
        };
        check_eq!(got, field, "{ctx}: {e}");
        check!(message.contains(allowed), "{ctx}: the message does not say {allowed:?}: {message}");
        rows.push(Row {
            surface: "config".into(),
            input: format!("`{}`", text.replace('|', "\\|")),
            field: field.into(),
            error: first_line(&e.to_string()),
        });
    }
    // Through the binary: exit 2 naming the field, and no ledger is created.
    let cfg = dir.join("bad-config.json");
    std::fs::write(&cfg, "{\"worker_slots\": -1}").unwrap();
    let fresh = dir.join("fresh");
    for args in [&["--json", "capacity"][..], &["serve"][..]] {
        let o = mcp_common::bin().arg("--data-dir").arg(&fresh).arg("--config").arg(&cfg).args(args).output().unwrap();
        check_eq!(o.status.code(), Some(2), "{args:?}");
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        check!(text.contains("config.worker_slots") && text.contains("expected u32"), "{args:?}: {text}");
        check!(!fresh.join("wal").exists(), "{args:?}: a ledger was created with a bad config");
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// MCP tools

type McpCase = (&'static str, Value, &'static str, &'static str);

fn mcp_cases() -> Vec<McpCase> {
    let long_job = "x".repeat(257);
    let many: Vec<String> = (0..65).map(|i| format!("m{i}")).collect();
    let big = json!({"blob": "y".repeat(20_000)});
    vec![
        ("request_resources", json!({"workers": 1}), "job_id", "is required"),
        ("request_resources", json!({"job_id": "", "workers": 1}), "job_id", "non-empty"),
        ("request_resources", json!({"job_id": long_job, "workers": 1}), "job_id", "at most 256"),
        ("request_resources", json!({"job_id": "a\u{7}b", "workers": 1}), "job_id", "control characters"),
        ("request_resources", json!({"job_id": 42, "workers": 1}), "job_id", "must be a string"),
        ("request_resources", json!({"job_id": "j", "workers": -1}), "workers", "whole number"),
        ("request_resources", json!({"job_id": "j", "workers": 1.5}), "workers", "whole number"),
        ("request_resources", json!({"job_id": "j", "workers": "2"}), "workers", "whole number"),
        ("request_resources", json!({"job_id": "j", "workers": 11}), "workers", "0 to 10"),
        ("request_resources", json!({"job_id": "j", "workers": 4294967296u64}), "workers", "whole number"),
        ("request_resources", json!({"job_id": "j", "workers": 0}), "workers", "at least 1 worker"),
        ("request_resources", json!({"job_id": "j", "mcp_servers": "github"}), "mcp_servers", "array of strings"),
        ("request_resources", json!({"job_id": "j", "mcp_servers": [7]}), "mcp_servers[0]", "must be a string"),
        ("request_resources", json!({"job_id": "j", "mcp_servers": ["a/b"]}), "mcp_servers[0]", "A-Z a-z 0-9 . _ -"),
        (
            "request_resources",
            json!({"job_id": "j", "mcp_servers": ["a", "a"]}),
            "mcp_servers[1]",
            "name each MCP server once",
        ),
        ("request_resources", json!({"job_id": "j", "mcp_servers": many}), "mcp_servers", "at most 64"),
        (
            "request_resources",
            json!({"job_id": "j", "workers": 1, "priority": "urgent"}),
            "priority",
            "low, normal, high, critical",
        ),
        (
            "request_resources",
            json!({"job_id": "j", "workers": 1, "priority": 2}),
            "priority",
            "low, normal, high, critical",
        ),
        ("request_resources", json!({"job_id": "j", "workers": 1, "ttl_seconds": 59}), "ttl_seconds", "60 to 604800"),
        ("request_resources", json!({"job_id": "j", "workers": 1, "ttl_seconds": 0}), "ttl_seconds", "60 to 604800"),
        ("request_resources", json!({"job_id": "j", "workers": 1, "ttl_seconds": -60}), "ttl_seconds", "whole number"),
        (
            "request_resources",
            json!({"job_id": "j", "workers": 1, "ttl_seconds": "3600"}),
            "ttl_seconds",
            "whole number",
        ),
        ("request_resources", json!({"job_id": "j", "workers": 1, "metadata": [1]}), "metadata", "JSON object"),
        ("request_resources", json!({"job_id": "j", "workers": 1, "metadata": "text"}), "metadata", "JSON object"),
        ("request_resources", json!({"job_id": "j", "workers": 1, "metadata": big}), "metadata", "at most 16384 bytes"),
        (
            "request_resources",
            json!({"job_id": "j", "workers": 1, "metadata": {"": 1}}),
            "metadata",
            "1 to 128 characters",
        ),
        ("request_resources", json!({"job_id": "j", "workers": 1, "workerz": 2}), "workerz", "allowed arguments"),
        ("release_resources", json!({}), "allocation_id", "is required"),
        ("release_resources", json!({"allocation_id": ""}), "allocation_id", "12 lowercase hex digits"),
        ("release_resources", json!({"allocation_id": "alloc-XYZ"}), "allocation_id", "12 lowercase hex digits"),
        ("release_resources", json!({"allocation_id": 12}), "allocation_id", "must be a string"),
        (
            "release_resources",
            json!({"allocation_id": "alloc-000000000001", "force": true}),
            "force",
            "allowed arguments",
        ),
        ("get_allocation", json!({"allocation_id": "alloc-1A2B3C4D5E6F"}), "allocation_id", "12 lowercase hex digits"),
        ("get_allocation", json!({"allocation_id": null}), "allocation_id", "is required"),
        ("list_allocations", json!({"state": "gone"}), "state", "active, released, expired, failed"),
        ("list_allocations", json!({"state": 1}), "state", "must be a string"),
        ("list_allocations", json!({"job_id": 5}), "job_id", "must be a string"),
        ("list_allocations", json!({"job_id": ""}), "job_id", "non-empty"),
        ("list_allocations", json!({"job_id": "x".repeat(1 << 20)}), "job_id", "at most 256"),
        ("list_allocations", json!({"job_id": "a\u{1}b"}), "job_id", "control characters"),
        ("usage_report", json!({"since": "-1d", "by": "metadata.a\u{7}b"}), "by", "without control characters"),
        ("list_allocations", json!({"page": 5}), "page", "allowed arguments"),
        ("list_allocations", json!({"limit": 0}), "limit", "1 to 10000"),
        ("list_allocations", json!({"cursor": "x"}), "cursor", "not a cursor"),
        ("get_capacity", json!({"verbose": true}), "verbose", "allowed arguments"),
        ("get_capacity", json!({"at": "yesterday"}), "at", "RFC 3339"),
        ("cleanup_expired", json!({"now": 1}), "now", "allowed arguments: expected_seq"),
        ("cleanup_expired", json!({"expected_seq": "3"}), "expected_seq", "a whole number"),
        (
            "request_resources",
            json!({"job_id": "j", "workers": 1, "idempotency_key": 7}),
            "idempotency_key",
            "a string",
        ),
        (
            "request_resources",
            json!({"job_id": "j", "workers": 1, "idempotency_key": ""}),
            "idempotency_key",
            "1 to 128",
        ),
        (
            "request_resources",
            json!({"job_id": "j", "workers": 1, "expected_seq": -1}),
            "expected_seq",
            "whole sequence number",
        ),
        (
            "release_resources",
            json!({"allocation_id": "alloc-000000000001", "expected_seq": 1.5}),
            "expected_seq",
            "whole sequence number",
        ),
        ("renew_allocation", json!({}), "allocation_id", "is required"),
        (
            "renew_allocation",
            json!({"allocation_id": "alloc-000000000001", "ttl_seconds": "x"}),
            "ttl_seconds",
            "whole number of seconds",
        ),
        ("renew_allocation", json!({"allocation_id": "alloc-000000000001", "until": 5}), "until", "allowed arguments"),
        ("plan_request", json!({"job_id": "j", "workers": 1, "expected_seq": 3}), "expected_seq", "allowed arguments"),
    ]
}

fn mcp_rows(dir: &Path) -> Vec<Row> {
    let before = event_count(dir);
    let mut server = mcp_common::StdioServer::start(dir, &[]);
    server.initialize();
    let mut rows = Vec::new();
    for (tool, args, field, allowed) in mcp_cases() {
        let ctx = format!("MCP {tool} {}", clip(&args.to_string()));
        let r = server.call(tool, args.clone());
        let e = mcp_common::err(&r);
        check_eq!(e["field"], field, "{ctx}: {e}");
        check_eq!(e["kind"], "invalid_input", "{ctx}: {e}");
        let message = e["error"].as_str().unwrap();
        check!(message.contains(allowed), "{ctx}: the message does not say {allowed:?}: {message}");
        rows.push(Row {
            surface: format!("MCP `{tool}`"),
            input: format!("`{}`", clip(&args.to_string()).replace('|', "\\|")),
            field: field.into(),
            error: first_line(message),
        });
    }
    let code = server.close().code();
    check_eq!(code, Some(0), "the MCP server exits cleanly");
    check_eq!(event_count(dir), before, "invalid MCP arguments wrote an event");
    rows
}

// ---------------------------------------------------------------------------------------------

const START: &str = "<!-- bad-input-table:start (generated by tests/bad_input.rs) -->";
const END: &str = "<!-- bad-input-table:end -->";

#[test]
fn every_bad_input_names_its_field_says_what_is_allowed_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ledger");
    // A ledger with one allocation in it, so that ids and states exist.
    let (code, _, _) = run_cli(&dir, &s(&["request", "--job-id", "existing", "--workers", "2"]));
    assert_eq!(code, 0);
    let mut rows = cli_rows(&dir);
    rows.extend(mcp_rows(&dir));
    rows.extend(config_rows(tmp.path()));
    let failures = FAILURES.with(|f| f.borrow().clone());
    assert!(failures.is_empty(), "{} failed checks:\n{}", failures.len(), failures.join("\n"));

    let mut table = String::from("| where | input | field | error returned |\n|---|---|---|---|\n");
    for r in &rows {
        let error = if r.error.chars().count() > 170 {
            format!("{}…", r.error.chars().take(170).collect::<String>())
        } else {
            r.error.clone()
        };
        table.push_str(&format!("| {} | {} | `{}` | {} |\n", r.surface, clip(&r.input), r.field, error));
    }
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reliability.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap_or_default();
    let generated = format!("{START}\n{table}{END}");
    let current = match (doc.find(START), doc.find(END)) {
        (Some(a), Some(b)) => Some(&doc[a..b + END.len()]),
        _ => None,
    };
    if std::env::var_os("UPDATE_RELIABILITY_DOC").is_some() {
        let new = match current {
            Some(cur) => doc.replace(cur, &generated),
            None => format!("{doc}\n{generated}\n"),
        };
        std::fs::write(&doc_path, new).unwrap();
    } else {
        // Every case is in the table with the field it names (the wording of a message may
        // change without touching the doc; a new, removed or renamed case may not).
        let key = |line: &str| line.rsplitn(3, " | ").nth(2).map(str::to_string);
        let want: Vec<_> = generated.lines().filter(|l| l.starts_with("| ")).filter_map(key).collect();
        let have: Vec<_> = current.unwrap_or("").lines().filter(|l| l.starts_with("| ")).filter_map(key).collect();
        assert_eq!(
            have, want,
            "docs/reliability.md's bad-input table is stale: run UPDATE_RELIABILITY_DOC=1 cargo test --test bad_input"
        );
    }
    assert!(rows.len() >= 120, "{} cases", rows.len());
}
