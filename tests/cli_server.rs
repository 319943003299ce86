//! The CLI as a client of a running `serve --http` (issue 16 §1): writes find the server of
//! their data dir by themselves (`server.json`) or go where `--server URL` says, with the local
//! mode's output, `--json` and exit codes; the bearer token; a stale `server.json`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece
#![cfg(feature = "server")]

mod mcp_common;

use mcp_common::{bin, HttpServer, DEADLINE};
use serde_json::Value;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs the CLI on `dir`; a CLI that does not finish within the deadline fails the test (a
/// hang is a bug: a refused token must be an error, not a wait).
fn cli(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = bin();
    c.env_remove("ALLOCATION_LEDGER_SERVER").arg("--data-dir").arg(dir).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let err_file = tempfile::NamedTempFile::new().unwrap();
    let mut child =
        c.stdin(Stdio::null()).stdout(out_file.reopen().unwrap()).stderr(err_file.reopen().unwrap()).spawn().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("`{}` did not finish within {DEADLINE:?}", args.join(" "));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Run {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(out_file.path()).unwrap(),
        stderr: std::fs::read_to_string(err_file.path()).unwrap(),
    }
}

/// The server's `server.json`, once written (the server writes it just after it listens).
fn server_file(dir: &Path) -> Value {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(dir.join("server.json")) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                return v;
            }
        }
        assert!(start.elapsed() < DEADLINE, "no server.json in {}", dir.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    k.sort();
    k
}

/// Drops the values that differ between two ledgers doing the same thing (ids, clocks).
fn without_times(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        for k in
            ["as_of", "allocation_id", "created_at", "expires_at", "released_at", "duration_seconds", "age_seconds"]
        {
            o.remove(k);
        }
    }
    v
}

#[test]
fn writes_find_their_server_and_answer_as_the_local_mode() {
    let served = tempfile::tempdir().unwrap();
    let local = tempfile::tempdir().unwrap();
    let server = HttpServer::start(served.path(), &[]);
    let file = server_file(served.path());
    assert_eq!(file["url"], server.url.as_str());
    assert_eq!(file["pid"], server.child.id());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(served.path().join("server.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "server.json is owner-only");
    }
    let both = |args: &[&str]| (cli(served.path(), args, &[]), cli(local.path(), args, &[]));

    // A grant: same shape, same exit code; without --server it went to the server (locally
    // the ledger is locked: exit 5).
    let (r, l) = both(&["--json", "request", "--job-id", "a", "--workers", "2", "--mcp-server", "github"]);
    assert_eq!((r.code, l.code), (0, 0), "{r:?}\n{l:?}");
    let (g, lg) = (r.json(), l.json());
    assert_eq!(keys(&g), keys(&lg));
    assert_eq!(without_times(g.clone()), without_times(lg.clone()));
    let (id, local_id) = (g["allocation_id"].as_str().unwrap(), lg["allocation_id"].as_str().unwrap());

    // The human text too, but for the id and the times.
    let (r, l) = both(&["request", "--job-id", "b", "--workers", "1"]);
    assert_eq!((r.code, l.code), (0, 0), "{r:?}\n{l:?}");
    assert_eq!(r.stdout.lines().skip(1).collect::<Vec<_>>(), l.stdout.lines().skip(1).collect::<Vec<_>>());

    // Not granted: exit 3 and the failed report, both ways.
    let (r, l) = both(&["--json", "request", "--job-id", "c", "--workers", "9"]);
    assert_eq!((r.code, l.code), (3, 3), "{r:?}\n{l:?}");
    assert_eq!(without_times(r.json()), without_times(l.json()));

    // Errors: the same JSON and exit code as the local mode.
    for args in [
        &["--json", "release", "alloc-000000000000"][..],
        &["--json", "request", "--job-id", "d", "--workers", "99"],
        &["--json", "request", "--job-id", "", "--workers", "1"],
        &["--json", "request", "--job-id", "d", "--workers", "1", "--expected-seq", "1"],
        &["--json", "renew", "alloc-000000000000"],
        &["--json", "release", "not-an-id"],
    ] {
        let (r, l) = both(args);
        assert_eq!(r.code, l.code, "{args:?}\n{r:?}\n{l:?}");
        assert_ne!(r.code, 0, "{args:?}: {r:?}");
        assert_eq!(r.json(), l.json(), "{args:?}");
    }
    let (r, l) = both(&["release", "alloc-000000000000"]);
    assert_eq!((r.code, r.stderr.as_str()), (4, l.stderr.as_str()), "{r:?}\n{l:?}");

    // Reads answer locally beside the server (read-only), and from the server with --server:
    // the same document.
    let url = server.url.as_str();
    let mine = cli(served.path(), &["--json", "capacity"], &[]);
    let theirs = cli(Path::new("/nonexistent"), &["--server", url, "--json", "capacity"], &[]);
    assert_eq!((mine.code, theirs.code), (0, 0), "{mine:?}\n{theirs:?}");
    assert_eq!(without_times(mine.json()), without_times(theirs.json()));
    assert_eq!(theirs.json()["allocated_workers"], 3);
    let l = cli(local.path(), &["--json", "capacity"], &[]);
    assert_eq!(without_times(l.json()), without_times(theirs.json()));
    let listed = cli(Path::new("/nonexistent"), &["--server", url, "--json", "list", "--state", "active"], &[]);
    assert_eq!(listed.json().as_array().unwrap().len(), 2, "{listed:?}");
    let got = cli(Path::new("/nonexistent"), &["--server", url, "--json", "get", id], &[]);
    assert_eq!((got.code, got.json()["state"].as_str()), (0, Some("active")), "{got:?}");
    let csv = cli(Path::new("/nonexistent"), &["--server", url, "-o", "csv", "capacity"], &[]);
    assert!(csv.stdout.starts_with("resource,"), "{csv:?}");
    // The env var names the server too; a bare http://HOST:PORT gets /mcp.
    let bare = url.trim_end_matches("/mcp");
    let r = cli(Path::new("/nonexistent"), &["--json", "capacity"], &[("ALLOCATION_LEDGER_SERVER", bare)]);
    assert_eq!(r.code, 0, "{r:?}");
    // An empty one names none: the local mode.
    let r = cli(local.path(), &["--json", "capacity"], &[("ALLOCATION_LEDGER_SERVER", "")]);
    assert_eq!((r.code, r.json()["allocated_workers"].as_u64()), (0, Some(3)), "{r:?}");

    // Release with --server and by auto-discovery.
    let r = cli(Path::new("/nonexistent"), &["--server", url, "--json", "release", id], &[]);
    let l = cli(local.path(), &["--json", "release", local_id], &[]);
    assert_eq!((r.code, l.code), (0, 0), "{r:?}\n{l:?}");
    assert_eq!(keys(&r.json()), keys(&l.json()));
    assert_eq!(r.json()["status"], "released");
    let (r, l) =
        (cli(served.path(), &["--json", "release", id], &[]), cli(local.path(), &["--json", "release", local_id], &[]));
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("already_released")), "{r:?}");
    assert_eq!(without_times(r.json()), without_times(l.json()));
    // Renewing a released allocation: not active (8) both ways.
    let (r, l) =
        (cli(served.path(), &["--json", "renew", id], &[]), cli(local.path(), &["--json", "renew", local_id], &[]));
    assert_eq!((r.code, l.code), (8, 8), "{r:?}\n{l:?}");

    // A dry run goes to the server's plan_request.
    let (r, l) = both(&["--json", "request", "--job-id", "e", "--workers", "1", "--dry-run"]);
    assert_eq!((r.code, l.code), (0, 0), "{r:?}\n{l:?}");
    assert_eq!(keys(&r.json()), keys(&l.json()));

    // A snapshot is written by the server (write_snapshot), at the server's last seq.
    let r = cli(served.path(), &["--json", "snapshot"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let seq = r.json()["seq"].as_u64().unwrap();
    let cap = cli(served.path(), &["--server", url, "--json", "capacity"], &[]).json();
    assert_eq!(Some(seq), cap["seq"].as_u64(), "{cap}");
    assert!(served.path().join("snapshots").read_dir().unwrap().count() >= 1);

    // Commands the server has no tool for: locked (5), with a note naming the server.
    let r = cli(served.path(), &["init"], &[]);
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains(url) && r.stderr.contains("stop the server"), "{r:?}");
    let r = cli(served.path(), &["--server", url, "log"], &[]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("`log` has no server equivalent"), "{r:?}");

    // A clean shutdown removes server.json; the CLI is then local again.
    assert!(server.stop().success());
    assert!(!served.path().join("server.json").exists(), "removed on a clean shutdown");
    let r = cli(served.path(), &["--json", "request", "--job-id", "f", "--workers", "1"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn the_token_is_sent_and_a_missing_or_wrong_one_is_an_error() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ledger");
    let (good, bad) = (root.path().join("token"), root.path().join("wrong"));
    std::fs::write(&good, "s3cret-token\n").unwrap();
    std::fs::write(&bad, "not-it\n").unwrap();
    // `serve` takes the token from the same global --token-file.
    let server = HttpServer::start(&dir, &["--token-file", good.to_str().unwrap()]);
    assert_eq!(server_file(&dir)["token_required"], true);
    assert!(!std::fs::read_to_string(dir.join("server.json")).unwrap().contains("s3cret"), "never the token itself");
    let url = server.url.as_str();

    let env: Vec<(&str, &str)> = Vec::new();
    for (how, extra) in [("auto", vec![]), ("--server", vec!["--server", url])] {
        let (good, bad) = (good.to_str().unwrap(), bad.to_str().unwrap());
        let run = |rest: &[&str], env: &[(&str, &str)]| {
            let all: Vec<&str> = extra.iter().copied().chain(rest.iter().copied()).collect();
            cli(&dir, &all, env)
        };
        let missing = run(&["--json", "request", "--job-id", "a", "--workers", "1"], &env);
        assert_eq!(missing.code, 2, "{how}: {missing:?}");
        assert_eq!(missing.json()["error"]["field"], "token", "{how}");
        assert!(missing.json()["error"]["message"].as_str().unwrap().contains("--token-file"), "{how}: {missing:?}");
        let wrong = run(&["--token-file", bad, "request", "--job-id", "a", "--workers", "1"], &env);
        assert_eq!(wrong.code, 2, "{how}: {wrong:?}");
        assert!(wrong.stderr.contains("refused the bearer token"), "{how}: {wrong:?}");
        let given = run(&["--token-file", good, "--json", "request", "--job-id", "a", "--workers", "1"], &env);
        assert_eq!((given.code, given.json()["status"].as_str()), (0, Some("active")), "{how}: {given:?}");
        let by_env = run(&["--json", "capacity"], &[("ALLOCATION_LEDGER_TOKEN", "s3cret-token")]);
        assert_eq!(by_env.code, 0, "{how}: {by_env:?}");
    }
    let r = cli(&dir, &["--json", "capacity"], &[]);
    assert_eq!(r.json()["active_allocations"], 2, "both grants went to the server: {r:?}");
    assert!(server.stop().success());
}

#[test]
fn a_stale_server_file_does_not_break_the_local_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = HttpServer::start(dir.path(), &[]);
    let file = server_file(dir.path());
    let r = cli(dir.path(), &["--json", "request", "--job-id", "a", "--workers", "1"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    server.child.kill().unwrap(); // SIGKILL: no chance to remove server.json
    server.child.wait().unwrap();
    assert_eq!(server_file(dir.path()), file, "left behind");

    let r = cli(dir.path(), &["--json", "request", "--job-id", "b", "--workers", "1"], &[]);
    assert_eq!(r.code, 0, "runs locally: {r:?}");
    let r = cli(dir.path(), &["--json", "capacity"], &[]);
    assert_eq!((r.code, r.json()["active_allocations"].as_u64()), (0, Some(2)), "{r:?}");
    // A server that is gone but named explicitly is an error (1, kind io), not a hang.
    let r = cli(dir.path(), &["--server", file["url"].as_str().unwrap(), "--json", "capacity"], &[]);
    assert_eq!((r.code, r.json()["error"]["kind"].as_str()), (1, Some("io")), "{r:?}");
    // A new server replaces the stale file.
    let server = HttpServer::start(dir.path(), &[]);
    let start = Instant::now();
    while server_file(dir.path())["url"] != server.url.as_str() {
        assert!(start.elapsed() < DEADLINE, "the new server did not replace server.json");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(server_file(dir.path())["pid"], server.child.id());
    assert!(server.stop().success());
}

/// `pool` changes are writes: on a served data dir they go to the server (`change_pool`) and
/// answer as the local mode does; `pool show` reads it back through `--server` (`get_pool`).
#[test]
fn pool_changes_go_to_the_server_and_answer_as_the_local_mode() {
    let served = tempfile::tempdir().unwrap();
    let local = tempfile::tempdir().unwrap();
    let server = HttpServer::start(served.path(), &[]);
    server_file(served.path()); // written just after the server listens
    let both = |args: &[&str]| (cli(served.path(), args, &[]), cli(local.path(), args, &[]));
    let (r, l) = both(&["--json", "request", "--job-id", "a", "--workers", "1"]);
    assert_eq!((r.code, l.code), (0, 0), "{r:?}\n{l:?}");

    // Draining the held slot 0: the same report both ways (the seq included: both ledgers
    // wrote the same events).
    let (r, l) = both(&["--json", "pool", "drain", "worker-00"]);
    assert_eq!((r.code, l.code), (0, 0), "{r:?}\n{l:?}");
    assert_eq!(r.json(), l.json());
    assert_eq!(r.json()["applied"], true, "{r:?}");
    // A refused change: the same exit code and error kind.
    let (r, l) = both(&["--json", "pool", "remove-worker", "worker-01"]);
    assert_eq!((r.code, l.code), (2, 2), "{r:?}\n{l:?}");
    assert_eq!(r.json()["error"]["kind"], l.json()["error"]["kind"]);
    // A dry run writes nothing on the server either.
    let r = cli(served.path(), &["--json", "pool", "add-workers", "--count", "2", "--dry-run"], &[]);
    assert_eq!((r.code, r.json()["applied"].as_bool()), (0, Some(false)), "{r:?}");

    // `config apply` goes to apply_config: the same report both ways, a dry run first.
    let file = local.path().join("..").join(format!("cfg-{}.json", std::process::id()));
    let drained =
        r#"{"worker_slots": 12, "total_cpu_millicores": 18000, "total_memory_mib": 36864, "drained_workers": [0]}"#;
    std::fs::write(&file, drained).unwrap();
    let path = file.to_str().unwrap();
    let r = cli(served.path(), &["--json", "config", "apply", path, "--dry-run"], &[]);
    assert_eq!((r.code, r.json()["applied"].as_bool()), (0, Some(false)), "{r:?}");
    let (r, l) = both(&["--json", "config", "apply", path]);
    assert_eq!((r.code, l.code), (0, 0), "{r:?}\n{l:?}");
    assert_eq!(r.json(), l.json());
    assert_eq!(r.json()["applied"], true, "{r:?}");
    // Applying it again changes nothing, and writes nothing.
    let (r, l) = both(&["--json", "config", "apply", path]);
    assert_eq!((r.json()["applied"].as_bool(), l.json()["applied"].as_bool()), (Some(false), Some(false)));
    std::fs::remove_file(&file).unwrap();

    let r = cli(served.path(), &["--server", &server.url, "--json", "pool", "show"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let shown = r.json();
    assert_eq!(shown["workers"][0]["state"], "draining", "{shown}");
    assert_eq!(shown["workers"][1]["state"], "free", "{shown}");
    assert_eq!(shown["workers"][11]["state"], "free", "added by the config: {shown}");
    assert_eq!(shown["seq"], 4, "created, granted, drained, the config applied: {shown}");
    assert!(server.stop().success());
}

/// `list` through the server: a page with `--limit`, the next one with `--cursor`, filters,
/// and every row without `--limit` (as the local mode prints them).
#[test]
fn list_pages_through_the_server_as_the_local_mode() {
    let served = tempfile::tempdir().unwrap();
    let server = HttpServer::start(served.path(), &[]);
    server_file(served.path()); // written just after the server listens
    for job in ["a", "b", "c"] {
        let r = cli(served.path(), &["--json", "request", "--job-id", job, "--workers", "1"], &[]);
        assert_eq!(r.code, 0, "{r:?}");
    }
    let remote = |args: &[&str]| {
        let mut all = vec!["--server", server.url.as_str(), "--json", "list"];
        all.extend_from_slice(args);
        cli(served.path(), &all, &[])
    };
    let first = remote(&["--limit", "2"]);
    assert_eq!(first.code, 0, "{first:?}");
    let page = first.json();
    assert_eq!(page["count"], 2, "{page}");
    let cursor = page["next_cursor"].as_str().expect("more follow").to_string();
    let second = remote(&["--limit", "2", "--cursor", &cursor]).json();
    assert_eq!((second["count"].as_u64(), second["next_cursor"].is_null()), (Some(1), true), "{second}");
    assert_eq!(second["allocations"][0]["job_id"], "c", "{second}");
    // Without --limit: every row, as an array.
    let all = remote(&[]).json();
    assert_eq!(all.as_array().map(Vec::len), Some(3), "{all}");
    let only_b = remote(&["--job-id", "b"]).json();
    assert_eq!(only_b.as_array().map(Vec::len), Some(1), "{only_b}");
    // A cursor used with other filters: refused as locally (exit 2).
    let r = remote(&["--limit", "2", "--cursor", &cursor, "--job-id", "a"]);
    assert_eq!((r.code, r.json()["error"]["kind"].as_str()), (2, Some("invalid_input")), "{r:?}");
    assert!(server.stop().success());
}
