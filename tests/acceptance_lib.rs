//! The original system's acceptance script and the checks its tests made, through the library,
//! plus the defects we must not repeat and the JSON field names its clients rely on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::{
    AllocationState, Error, GrantReport, Ledger, ManualClock, OpenOptions, Priority, RequestOutcome, ResourceRequest,
};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use tempfile::TempDir;

struct Fixture {
    ledger: Ledger,
    clock: ManualClock,
    _dir: TempDir,
}

/// A fresh ledger on real files with the embedded default config (the original's pool).
fn fresh() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_default_epoch();
    let ledger =
        Ledger::open_with(dir.path().join("ledger"), OpenOptions::default().clock(Arc::new(clock.clone()))).unwrap();
    Fixture { ledger, clock, _dir: dir }
}

fn granted(ledger: &Ledger, req: ResourceRequest) -> GrantReport {
    match ledger.request_resources(&req).unwrap() {
        RequestOutcome::Granted(g) => g,
        other => panic!("{req:?} was not granted: {other:?}"),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap()
}

/// Asserts that the JSON object `v` has every key in `keys`.
#[track_caller]
fn assert_keys(v: &Value, keys: &[&str]) {
    let obj = v.as_object().unwrap_or_else(|| panic!("not an object: {v}"));
    for k in keys {
        assert!(obj.contains_key(*k), "{k} missing from {v}");
    }
}

fn last_seq(ledger: &Ledger) -> u64 {
    ledger.status().last_seq
}

fn is_alloc_id(s: &str) -> bool {
    s.strip_prefix("alloc-")
        .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

#[test]
fn the_original_acceptance_script_passes() {
    let f = fresh();
    let l = &f.ledger;
    // 1. A fresh manager reports 10 total and 10 available workers.
    let cap = to_json(&l.get_capacity().unwrap());
    assert_eq!((cap["total_workers"].clone(), cap["available_workers"].clone()), (json!(10), json!(10)));
    // 2. A request for 4 workers is active with 4 workers.
    let out = l.request_resources(&ResourceRequest::new("test-job").workers(4).mcp_server("github")).unwrap();
    let g = to_json(&out);
    assert_eq!(g["status"], "active", "{g}");
    assert_eq!(g["workers_allocated"].as_array().unwrap().len(), 4);
    let id = g["allocation_id"].as_str().unwrap().to_string();
    assert!(is_alloc_id(&id), "{id}");
    // 3. Capacity then shows 4 allocated, 6 available.
    let cap = to_json(&l.get_capacity().unwrap());
    assert_eq!((cap["allocated_workers"].clone(), cap["available_workers"].clone()), (json!(4), json!(6)));
    // 4. get_allocation reports state active.
    let d = to_json(&l.get_allocation(&id).unwrap().unwrap());
    assert_eq!(d["state"], "active");
    // 5. list_allocations has one entry.
    assert_eq!(l.list_allocations(None, None).unwrap().len(), 1);
    // 6. Release reports released with workers_released 4.
    let r = to_json(&l.release_resources(&id).unwrap());
    assert_eq!((r["status"].clone(), r["workers_released"].clone()), (json!("released"), json!(4)));
    // 7. Capacity is back to 0 allocated, 10 available.
    let cap = to_json(&l.get_capacity().unwrap());
    assert_eq!((cap["allocated_workers"].clone(), cap["available_workers"].clone()), (json!(0), json!(10)));

    // And unlike the original, all of it is still there after a restart.
    let dir = l.dir().to_path_buf();
    drop(f.ledger);
    let again = Ledger::open_with(&dir, OpenOptions::default().clock(Arc::new(f.clock.clone()))).unwrap();
    let d = again.get_allocation(&id).unwrap().unwrap();
    assert_eq!(d.state, AllocationState::Released);
    assert_eq!(again.list_allocations(None, None).unwrap().len(), 1);
}

#[test]
fn four_workers_hold_four_cores_and_8192_mb() {
    let f = fresh();
    let g = granted(&f.ledger, ResourceRequest::new("j").workers(4));
    assert_eq!(g.resources.cpu, 4.0);
    assert_eq!(g.resources.memory, 8192);
    assert_eq!(g.resources.workers, 4);
    let v = to_json(&g);
    assert_eq!(
        v["resources"],
        json!({"cpu": 4.0, "memory": 8192, "workers": 4, "cpu_millicores": 4000, "memory_mib": 8192})
    );
    for w in &g.workers_allocated {
        assert_eq!((w.cpu, w.memory), (1.0, 2048));
    }
    let cap = f.ledger.get_capacity().unwrap();
    assert_eq!((cap.allocated_cpu, cap.allocated_memory), (4.0, 8192));
    assert_eq!((cap.available_cpu, cap.available_memory), (12.0, 32768 - 8192));
    common::assert_capacity_accounting(&cap);
    let d = f.ledger.get_allocation(&g.allocation_id.to_string()).unwrap().unwrap();
    assert_eq!((d.resources.cpu_allocated, d.resources.memory_allocated, d.resources.workers), (4.0, 8192, 4));
}

#[test]
fn mcp_endpoints_are_shared_by_name_and_servers_stop_with_their_last_user() {
    let f = fresh();
    let l = &f.ledger;
    let a = granted(l, ResourceRequest::new("a").mcp_server("github"));
    let b = granted(l, ResourceRequest::new("b").mcp_server("github").mcp_server("slack").workers(1));
    let endpoint =
        |g: &GrantReport, name: &str| g.mcp_servers.iter().find(|m| m.name == name).unwrap().endpoint.clone();
    assert_eq!(endpoint(&a, "github"), endpoint(&b, "github"));
    assert_ne!(endpoint(&b, "github"), endpoint(&b, "slack"));
    for e in [endpoint(&a, "github"), endpoint(&b, "slack")] {
        let port: u32 = e.strip_prefix("http://localhost:").unwrap().parse().unwrap();
        assert!(port >= 9000, "{e}");
    }
    for m in a.mcp_servers.iter().chain(&b.mcp_servers) {
        assert_eq!(m.status, "running");
    }
    assert_eq!(l.get_capacity().unwrap().running_mcp_servers, vec!["github", "slack"]);
    // The original only ever added to running_mcp_servers; here a server stops with its last user.
    l.release_resources(&b.allocation_id.to_string()).unwrap();
    assert_eq!(l.get_capacity().unwrap().running_mcp_servers, vec!["github"]);
    let d = l.get_allocation(&b.allocation_id.to_string()).unwrap().unwrap();
    assert!(d.mcp_servers.iter().all(|m| m.status == "stopped"), "{d:?}");
    l.release_resources(&a.allocation_id.to_string()).unwrap();
    assert!(l.get_capacity().unwrap().running_mcp_servers.is_empty());
    // A name keeps its endpoint after its server stopped.
    let c = granted(l, ResourceRequest::new("c").mcp_server("slack").mcp_server("github"));
    assert_eq!(endpoint(&c, "slack"), endpoint(&b, "slack"));
    assert_eq!(endpoint(&c, "github"), endpoint(&a, "github"));
}

#[test]
fn worker_ids_and_endpoints_are_unique_even_for_a_reused_job_id() {
    let f = fresh();
    let l = &f.ledger;
    // The original derived ids from the job id and endpoints from a running count.
    let g1 = granted(l, ResourceRequest::new("same-job").workers(3));
    let g2 = granted(l, ResourceRequest::new("same-job").workers(3));
    l.release_resources(&g1.allocation_id.to_string()).unwrap();
    let g3 = granted(l, ResourceRequest::new("same-job").workers(4));
    let g4 = granted(l, ResourceRequest::new("same-job").workers(3));
    let held: Vec<_> = [&g2, &g3, &g4].iter().flat_map(|g| g.workers_allocated.clone()).collect();
    assert_eq!(held.len(), 10);
    let ids: BTreeSet<_> = held.iter().map(|w| w.worker_id.clone()).collect();
    let endpoints: BTreeSet<_> = held.iter().map(|w| w.endpoint.clone()).collect();
    assert_eq!(ids.len(), 10, "{held:?}");
    assert_eq!(endpoints.len(), 10, "{held:?}");
    for e in &endpoints {
        let port: u32 = e.strip_prefix("http://localhost:").unwrap().parse().unwrap();
        assert!((8000..8010).contains(&port), "{e}");
    }
    let cap = l.get_capacity().unwrap();
    assert_eq!((cap.allocated_workers, cap.available_workers), (10, 0));
    assert_eq!(l.list_allocations(None, Some("same-job")).unwrap().len(), 4);
}

#[test]
fn a_60_second_ttl_is_expired_61_seconds_later() {
    let f = fresh();
    let l = &f.ledger;
    let g = granted(l, ResourceRequest::new("short").workers(2).ttl_seconds(60));
    let id = g.allocation_id.to_string();
    assert_eq!(g.ttl_seconds, 60);
    f.clock.advance_seconds(59);
    assert_eq!(l.get_allocation(&id).unwrap().unwrap().state, AllocationState::Active);
    assert_eq!(l.get_capacity().unwrap().allocated_workers, 2);
    f.clock.advance_seconds(2);
    // Expired at once, before any cleanup ran, and told apart from a release.
    let d = l.get_allocation(&id).unwrap().unwrap();
    assert_eq!(d.state, AllocationState::Expired);
    assert!(d.is_expired);
    assert_eq!(to_json(&d)["state"], "expired");
    let cap = l.get_capacity().unwrap();
    assert_eq!((cap.allocated_workers, cap.available_workers, cap.active_allocations), (0, 10, 0));
    let listed = l.list_allocations(Some(AllocationState::Expired), None).unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].is_expired);
    let c = l.cleanup_expired().unwrap();
    assert_eq!((c.cleaned_up.clone(), c.count), (vec![g.allocation_id], 1));
    assert_eq!(to_json(&c), json!({"cleaned_up": [id.clone()], "count": 1}));
    assert_eq!(l.cleanup_expired().unwrap().count, 0);
    let events = common::all_events(l);
    assert_eq!(events.last().unwrap().event.body.type_name(), "expired");
}

#[test]
fn with_seven_of_ten_workers_held_a_request_for_five_fails() {
    let f = fresh();
    let l = &f.ledger;
    granted(l, ResourceRequest::new("big").workers(7));
    let before = last_seq(l);
    let out = l.request_resources(&ResourceRequest::new("too-big").workers(5)).unwrap();
    let RequestOutcome::Failed(fail) = &out else { panic!("{out:?}") };
    assert_eq!(fail.error, "Insufficient workers: requested 5, available 3");
    assert_eq!(fail.status, AllocationState::Failed);
    // The refusal is recorded (one event), and the pool is untouched.
    assert_eq!(last_seq(l), before + 1);
    let v = to_json(&out);
    assert_keys(&v, &["allocation_id", "status", "error"]);
    assert_eq!(v["status"], "failed");
    assert!(is_alloc_id(v["allocation_id"].as_str().unwrap()), "{v}");
    let cap = l.get_capacity().unwrap();
    assert_eq!((cap.allocated_workers, cap.available_workers, cap.active_allocations), (7, 3, 1));
    let d = l.get_allocation(&fail.allocation_id.to_string()).unwrap().unwrap();
    assert_eq!(d.state, AllocationState::Failed);
    assert_eq!(d.error.as_deref(), Some("Insufficient workers: requested 5, available 3"));
    assert!(d.workers.is_empty());
}

#[test]
fn releasing_twice_reports_already_released_and_writes_nothing() {
    let f = fresh();
    let l = &f.ledger;
    let g = granted(l, ResourceRequest::new("j").workers(2));
    let id = g.allocation_id.to_string();
    let first = l.release_resources(&id).unwrap();
    assert_eq!((first.status.as_str(), first.workers_released), ("released", 2));
    let seq = last_seq(l);
    let second = l.release_resources(&id).unwrap();
    assert_eq!(second.status, "already_released");
    assert_eq!(second.workers_released, 0);
    assert_eq!(second.released_at, first.released_at);
    assert_eq!(last_seq(l), seq, "a second release writes no event");
    let v = to_json(&second);
    assert_keys(&v, &["status", "allocation_id", "released_at"]);
    let cap = l.get_capacity().unwrap();
    assert_eq!((cap.allocated_workers, cap.available_workers), (0, 10));
}

#[test]
fn releasing_an_unknown_id_is_not_found() {
    let f = fresh();
    let l = &f.ledger;
    let seq = last_seq(l);
    match l.release_resources("alloc-0123456789ab") {
        Err(e @ Error::NotFound(_)) => {
            assert_eq!(e.to_string(), "Allocation alloc-0123456789ab not found");
            assert_eq!(e.kind(), "not_found");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(l.get_allocation("alloc-0123456789ab").unwrap(), None);
    match l.release_resources("not-an-id") {
        Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "allocation_id"),
        other => panic!("{other:?}"),
    }
    assert_eq!(last_seq(l), seq);
}

#[test]
fn releasing_an_expired_allocation_reports_already_expired_and_writes_no_release() {
    let f = fresh();
    let l = &f.ledger;
    let g = granted(l, ResourceRequest::new("j").workers(3).ttl_seconds(60));
    let id = g.allocation_id.to_string();
    f.clock.advance_seconds(61);
    let seq = last_seq(l);
    let r = l.release_resources(&id).unwrap();
    assert_eq!(r.status, "already_expired");
    assert_eq!(r.state, AllocationState::Expired);
    assert_eq!(r.workers_released, 0);
    assert!(r.expired_at.is_some() && r.released_at.is_none(), "{r:?}");
    // The only event written on the way is the expiry itself; there is no release.
    let written: Vec<&str> = l.events(seq + 1, usize::MAX).unwrap().iter().map(|e| e.event.body.type_name()).collect();
    assert_eq!(written, vec!["expired"]);
    let seq = last_seq(l);
    assert_eq!(l.release_resources(&id).unwrap().status, "already_expired");
    assert_eq!(last_seq(l), seq);
    let cap = l.get_capacity().unwrap();
    assert_eq!((cap.allocated_workers, cap.active_allocations), (0, 0));
}

#[test]
fn releasing_a_failed_allocation_reports_already_failed_and_counts_never_go_negative() {
    let f = fresh();
    let l = &f.ledger;
    let held = granted(l, ResourceRequest::new("held").workers(7));
    let RequestOutcome::Failed(fail) = l.request_resources(&ResourceRequest::new("j").workers(5)).unwrap() else {
        panic!("not refused")
    };
    let failed_id = fail.allocation_id.to_string();
    let cap = l.get_capacity().unwrap();
    let seq = last_seq(l);
    for _ in 0..3 {
        let r = l.release_resources(&failed_id).unwrap();
        assert_eq!(r.status, "already_failed");
        assert_eq!(r.state, AllocationState::Failed);
        assert_eq!((r.workers_released, r.cpu_freed, r.memory_freed), (0, 0.0, 0));
        assert_eq!(l.get_capacity().unwrap(), cap);
    }
    assert_eq!(last_seq(l), seq);
    assert_eq!(cap.active_allocations, 1);
    l.release_resources(&held.allocation_id.to_string()).unwrap();
    l.release_resources(&failed_id).unwrap();
    let cap = l.get_capacity().unwrap();
    assert_eq!((cap.active_allocations, cap.allocated_workers, cap.available_workers), (0, 0, 10));
    assert_eq!((cap.allocated_cpu_millicores, cap.allocated_memory), (0, 0));
    common::assert_capacity_accounting(&cap);
}

#[test]
fn invalid_input_names_the_field_and_writes_no_event() {
    let f = fresh();
    let l = &f.ledger;
    granted(l, ResourceRequest::new("x").workers(1));
    let mut big = serde_json::Map::new();
    big.insert("blob".into(), Value::String("x".repeat(17_000)));
    let cases: Vec<(ResourceRequest, &str)> = vec![
        (ResourceRequest::new("").workers(1), "job_id"),
        (ResourceRequest::new("   ").workers(1), "job_id"),
        (ResourceRequest::new("j".repeat(257)).workers(1), "job_id"),
        (ResourceRequest::new("a\nb").workers(1), "job_id"),
        (ResourceRequest::new("esc\u{1b}[0m").workers(1), "job_id"),
        (ResourceRequest::new("j").workers(11), "workers"),
        (ResourceRequest::new("j").workers(u32::MAX), "workers"),
        (ResourceRequest::new("j"), "workers"),
        (ResourceRequest::new("j").workers(1).ttl_seconds(59), "ttl_seconds"),
        (ResourceRequest::new("j").workers(1).ttl_seconds(0), "ttl_seconds"),
        (ResourceRequest::new("j").workers(1).ttl_seconds(604_801), "ttl_seconds"),
        (ResourceRequest::new("j").workers(1).metadata(big), "metadata"),
        (ResourceRequest::new("j").mcp_server("bad name"), "mcp_servers[0]"),
        (ResourceRequest::new("j").mcp_server(""), "mcp_servers[0]"),
        (ResourceRequest::new("j").mcp_server("g".repeat(65)), "mcp_servers[0]"),
        (ResourceRequest::new("j").mcp_server("github").mcp_server("a/b"), "mcp_servers[1]"),
        (ResourceRequest::new("j").mcp_server("github").mcp_server("github"), "mcp_servers[1]"),
    ];
    let cap = l.get_capacity().unwrap();
    for (req, field) in cases {
        let seq = last_seq(l);
        match l.request_resources(&req) {
            Err(e @ Error::InvalidInput { .. }) => {
                let Error::InvalidInput { field: got, message } = &e else { unreachable!() };
                assert_eq!(got, field, "{req:?}: {e}");
                assert!(!message.is_empty());
                assert!(e.to_string().contains(field), "{e}");
            }
            other => panic!("{req:?}: {other:?}"),
        }
        assert_eq!(last_seq(l), seq, "{req:?} wrote an event");
    }
    // The edges are valid.
    for ttl in [60, 604_800] {
        granted(l, ResourceRequest::new("edge").mcp_server("github").ttl_seconds(ttl));
    }
    let seq = last_seq(l);

    // Arguments as the MCP tool gets them.
    let json_cases: Vec<(Value, &str)> = vec![
        (json!({"job_id": "j", "workers": 1, "priority": "urgent"}), "priority"),
        (json!({"job_id": "j", "workers": 1, "priority": 3}), "priority"),
        (json!({"job_id": "j", "workers": 1, "metadata": [1, 2]}), "metadata"),
        (json!({"job_id": "j", "workers": 1, "metadata": "text"}), "metadata"),
        (json!({"job_id": "j", "workers": -1}), "workers"),
        (json!({"job_id": "j", "workers": 1.5}), "workers"),
        (json!({"job_id": "j", "workers": 1, "ttl_seconds": "60"}), "ttl_seconds"),
        (json!({"job_id": "j", "workers": 1, "ttl_seconds": -60}), "ttl_seconds"),
        (json!({"job_id": "j", "mcp_servers": "github"}), "mcp_servers"),
        (json!({"job_id": "j", "mcp_servers": ["github", 7]}), "mcp_servers[1]"),
        (json!({"workers": 1}), "job_id"),
        (json!({"job_id": 12, "workers": 1}), "job_id"),
        (json!({"job_id": "j", "workers": 1, "ttl_seconds": 59}), "ttl_seconds"),
        (json!({"job_id": "j", "workers": 11}), "workers"),
        (json!({"job_id": "j", "mcp_servers": ["a", "a"]}), "mcp_servers[1]"),
    ];
    for (args, field) in json_cases {
        let r = ResourceRequest::from_json(args.as_object().unwrap()).and_then(|req| l.request_resources(&req));
        match r {
            Err(Error::InvalidInput { field: got, message }) => {
                assert_eq!(got, field, "{args}: {message}");
                if field == "priority" {
                    assert!(message.contains("low, normal, high, critical"), "{message}");
                }
            }
            other => panic!("{args}: {other:?}"),
        }
        assert_eq!(last_seq(l), seq, "{args} wrote an event");
    }
    // Nothing changed but the two valid grants.
    let after = l.get_capacity().unwrap();
    assert_eq!(after.running_mcp_servers, vec!["github"]);
    assert_eq!(
        (after.allocated_workers, after.active_allocations),
        (cap.allocated_workers, cap.active_allocations + 2)
    );
}

#[test]
fn priority_is_validated_stored_and_matters() {
    let f = fresh();
    let l = &f.ledger;
    let args = json!({"job_id": "j", "workers": 1, "priority": "critical"});
    let req = ResourceRequest::from_json(args.as_object().unwrap()).unwrap();
    let g = granted(l, req);
    assert_eq!(g.priority, Priority::Critical);
    let d = to_json(&l.get_allocation(&g.allocation_id.to_string()).unwrap().unwrap());
    assert_eq!(d["priority"], "critical");
    // `low` leaves a quarter of the pool (3 of 10 workers) to everybody else.
    granted(l, ResourceRequest::new("n").workers(5));
    let low = l.request_resources(&ResourceRequest::new("l").workers(2).priority(Priority::Low)).unwrap();
    let RequestOutcome::Failed(fail) = &low else { panic!("{low:?}") };
    assert!(fail.error.starts_with("Insufficient workers: requested 2, available 1"), "{}", fail.error);
    granted(l, ResourceRequest::new("l").workers(1).priority(Priority::Low));
    granted(l, ResourceRequest::new("n").workers(3).priority(Priority::Normal));
}

#[test]
fn results_serialise_with_the_original_field_names() {
    let f = fresh();
    let l = &f.ledger;
    // Whole seconds from here on (the ledger was created at the clock's start).
    f.clock.advance_seconds(1);
    let mut meta = serde_json::Map::new();
    meta.insert("owner".into(), json!("team-a"));
    let out = l
        .request_resources(
            &ResourceRequest::new("job-1").workers(2).mcp_server("github").ttl_seconds(600).metadata(meta.clone()),
        )
        .unwrap();
    let g = to_json(&out);
    assert_keys(
        &g,
        &[
            "allocation_id",
            "status",
            "job_id",
            "mcp_servers",
            "workers_allocated",
            "resources",
            "ttl_seconds",
            "created_at",
        ],
    );
    assert_eq!(g["job_id"], "job-1");
    assert_eq!(g["ttl_seconds"], 600);
    assert!(g["created_at"].is_string());
    let m = &g["mcp_servers"][0];
    assert_keys(m, &["name", "endpoint", "status"]);
    assert_eq!((m["name"].as_str(), m["status"].as_str()), (Some("github"), Some("running")));
    let w = &g["workers_allocated"][0];
    assert_keys(w, &["worker_id", "endpoint", "cpu", "memory"]);
    assert!(w["cpu"].is_f64() && w["memory"].is_u64(), "{w}");
    assert_keys(&g["resources"], &["cpu", "memory", "workers"]);
    let id = g["allocation_id"].as_str().unwrap().to_string();

    let cap = to_json(&l.get_capacity().unwrap());
    assert_keys(
        &cap,
        &[
            "total_cpu",
            "total_memory",
            "total_workers",
            "allocated_cpu",
            "allocated_memory",
            "allocated_workers",
            "available_cpu",
            "available_memory",
            "available_workers",
            "running_mcp_servers",
            "active_allocations",
        ],
    );
    assert_eq!(cap["running_mcp_servers"], json!(["github"]));
    assert_eq!(cap["active_allocations"], 1);
    assert_eq!(cap["total_cpu"], json!(16.0));

    f.clock.advance_seconds(30);
    let d = to_json(&l.get_allocation(&id).unwrap().unwrap());
    assert_keys(
        &d,
        &[
            "allocation_id",
            "job_id",
            "state",
            "priority",
            "resources",
            "mcp_servers",
            "workers",
            "timestamps",
            "ttl_seconds",
            "is_expired",
            "metadata",
        ],
    );
    assert_keys(&d["resources"], &["cpu_allocated", "memory_allocated", "workers"]);
    assert_keys(&d["mcp_servers"][0], &["name", "endpoint", "status"]);
    assert_keys(&d["workers"][0], &["worker_id", "endpoint", "status", "cpu", "memory"]);
    assert_keys(&d["timestamps"], &["created_at", "activated_at", "released_at", "age_seconds"]);
    assert_eq!(d["timestamps"]["age_seconds"], json!(30.0));
    assert_eq!(d["timestamps"]["released_at"], Value::Null);
    assert_eq!(d["is_expired"], false);
    assert_eq!(d["metadata"], Value::Object(meta));
    assert_eq!(d["priority"], "normal");

    let list = to_json(&l.list_allocations(None, None).unwrap());
    assert_keys(&list[0], &["allocation_id", "job_id", "state", "priority", "workers", "age_seconds", "is_expired"]);
    assert_eq!(list[0]["workers"], 2);

    let r = to_json(&l.release_resources(&id).unwrap());
    assert_keys(
        &r,
        &[
            "status",
            "allocation_id",
            "job_id",
            "workers_released",
            "cpu_freed",
            "memory_freed",
            "released_at",
            "duration_seconds",
        ],
    );
    assert_eq!(r["cpu_freed"], json!(2.0));
    assert_eq!(r["memory_freed"], 4096);
    assert_eq!(r["duration_seconds"], json!(30.0));
    let d = to_json(&l.get_allocation(&id).unwrap().unwrap());
    assert!(d["timestamps"]["released_at"].is_string(), "{d}");

    let c = to_json(&l.cleanup_expired().unwrap());
    assert_keys(&c, &["cleaned_up", "count"]);
    assert_eq!(c, json!({"cleaned_up": [], "count": 0}));
}
