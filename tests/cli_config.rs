//! The config through the real binary: `init`, `config show`, `config apply` (a recorded
//! change, shown as a diff, refused when it would take away what is held), and `--config` for
//! an existing ledger that records another config.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn run(dir: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"));
    c.env_remove("ALLOCATION_LEDGER_DIR");
    c.arg("--data-dir").arg(dir).args(args).output().expect("binary runs")
}

fn json(dir: &Path, args: &[&str]) -> (i32, Value) {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let o = run(dir, &full);
    let stdout = String::from_utf8(o.stdout).unwrap();
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout:?}; stderr {}", String::from_utf8_lossy(&o.stderr)));
    (o.status.code().unwrap(), v)
}

fn events(dir: &Path) -> Vec<Value> {
    let o = run(dir, &["log"]);
    assert!(o.status.success());
    String::from_utf8(o.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn init_config_show_and_a_config_that_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ledger");
    let twelve = write_config(tmp.path(), "twelve.json", r#"{"worker_slots": 12}"#);
    let (code, v) = json(&d, &["--config", &twelve, "init"]);
    assert_eq!((code, v["created"].as_bool()), (0, Some(true)), "{v}");
    let (code, v) = json(&d, &["--config", &twelve, "init"]);
    assert_eq!((code, v["created"].as_bool()), (0, Some(false)), "init again reports the ledger: {v}");
    let (_, cfg) = json(&d, &["config", "show"]);
    assert_eq!(cfg["worker_slots"], 12);
    assert_eq!(cfg["idempotency_window_seconds"], 86_400);

    // Another config for the existing ledger: an error naming the fields and the way to apply
    // it, for writes and reads alike; nothing written.
    let forty = write_config(
        tmp.path(),
        "forty.json",
        r#"{"worker_slots": 40, "total_cpu_millicores": 64000, "total_memory_mib": 131072}"#,
    );
    let before = events(&d).len();
    for args in [&["request", "--job-id", "j", "--workers", "1"][..], &["capacity"][..]] {
        let mut full = vec!["--config", forty.as_str()];
        full.extend_from_slice(args);
        let (code, v) = json(&d, &full);
        assert_eq!(code, 2, "{args:?}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("worker_slots 12 -> 40") && msg.contains("config apply"), "{msg}");
        assert_eq!(v["error"]["field"], "config");
    }
    assert_eq!(events(&d).len(), before);
    // The same config as recorded is fine.
    let (code, _) = json(&d, &["--config", &twelve, "capacity"]);
    assert_eq!(code, 0);
}

#[test]
fn config_apply_shows_the_diff_records_the_change_and_refuses_to_revoke() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ledger");
    let (code, g) = json(&d, &["request", "--job-id", "holder", "--workers", "10"]);
    assert_eq!(code, 0, "{g}");
    let holder = g["allocation_id"].as_str().unwrap().to_string();
    let at_ten = events(&d).last().unwrap()["ts_us"].as_i64().unwrap();

    // Fewer slots than are held: refused, naming the allocation that holds them.
    let six = write_config(tmp.path(), "six.json", r#"{"worker_slots": 6}"#);
    let before = events(&d).len();
    let (code, v) = json(&d, &["config", "apply", &six]);
    assert_eq!(code, 2, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&holder) && msg.contains("job holder") && msg.contains("worker_slots must be at least 10"),
        "{msg}"
    );
    assert_eq!(events(&d).len(), before);

    // Growing the pool: a dry run shows the diff and writes nothing; then it is recorded.
    let grow = write_config(tmp.path(), "grow.json", r#"{"worker_slots": 14, "total_cpu_millicores": 20000}"#);
    let (code, v) = json(&d, &["config", "apply", &grow, "--dry-run"]);
    assert_eq!(code, 0, "{v}");
    let fields: Vec<&str> = v["changes"].as_array().unwrap().iter().map(|c| c["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["total_cpu_millicores", "worker_slots"]);
    assert_eq!((v["applied"].as_bool(), v["dry_run"].as_bool()), (Some(false), Some(true)));
    assert_eq!(events(&d).len(), before);
    let o = run(&d, &["config", "apply", &grow]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("worker_slots: 10 -> 14"), "{text}");
    let all = events(&d);
    assert_eq!(all.last().unwrap()["type"], "config_changed");
    let (_, cap) = json(&d, &["capacity"]);
    assert_eq!((cap["total_workers"].as_u64(), cap["available_workers"].as_u64()), (Some(14), Some(4)));
    // Time travel knows the pool as it was.
    let before_change = allocation_ledger::format_micros(allocation_ledger::Micros::from_micros(at_ten));
    let (_, then) = json(&d, &["capacity", "--at", &before_change]);
    assert_eq!(then["total_workers"], 10, "{then}");
    // Applying the same file again changes nothing; a stale --expected-seq is a conflict.
    let (code, v) = json(&d, &["config", "apply", &grow]);
    assert_eq!((code, v["applied"].as_bool()), (0, Some(false)), "{v}");
    let back = write_config(tmp.path(), "back.json", r#"{"worker_slots": 12}"#);
    let (code, v) = json(&d, &["config", "apply", &back, "--expected-seq", "1"]);
    assert_eq!((code, v["error"]["kind"].as_str()), (7, Some("conflict")), "{v}");
}
