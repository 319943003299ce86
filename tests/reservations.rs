//! Advance reservations (issue 17, section 4): the window holds capacity for its holder; before
//! it, leases that would reach into it must fit beside it; renewals take the same check; the
//! events, capacity's `reserved` block, snapshots and time travel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{
    Config, Error, EventBody, Ledger, ManualClock, RejectReason, RequestOutcome, ReservationRequest, ResourceRequest,
};
use common::{all_events, fold, mem_options, MEM_DIR};

fn open(storage: &FaultyStorage, clock: &ManualClock) -> Ledger {
    Ledger::open_with(MEM_DIR, mem_options(storage, clock, Config::default())).unwrap()
}

fn rejection(o: &RequestOutcome) -> (RejectReason, String) {
    match o {
        RequestOutcome::Failed(f) => (f.reason, f.error.clone()),
        RequestOutcome::Granted(g) => panic!("granted: {g:?}"),
    }
}

fn field_of(e: Error) -> String {
    match e {
        Error::InvalidInput { field, .. } => field,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_window_keeps_its_reserved_part_for_the_holder() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock);
    let r = ledger.reserve(&ReservationRequest::for_tenant("team-a", 6).window_seconds(3600, 7200)).unwrap();
    assert!(r.is_reserved(), "{r:?}");
    assert_eq!(r.reservation.state, "upcoming");
    // Before the window: a lease that ends before it may take the whole pool.
    let short = ledger.request_resources(&ResourceRequest::new("short").workers(10).ttl_seconds(600)).unwrap();
    assert!(short.is_granted());
    ledger.release_resources(&short.allocation_id().to_string()).unwrap();
    // A lease reaching into the window fits only beside it: 4 of 10.
    let (reason, error) =
        rejection(&ledger.request_resources(&ResourceRequest::new("long").workers(5).ttl_seconds(7200)).unwrap());
    assert_eq!(reason, RejectReason::Reserved);
    assert!(error.contains("requested 5, available 4 at "), "{error}");
    assert!(error.contains(&r.reservation.reservation_id), "{error}");
    assert!(error.contains("for tenant team-a"), "{error}");
    let long = ledger.request_resources(&ResourceRequest::new("long").workers(4).ttl_seconds(7200)).unwrap();
    assert!(long.is_granted());
    // The holder's own lease may reach into its window.
    let mine = ResourceRequest::new("a1").workers(6).ttl_seconds(7200).tenant("team-a");
    assert!(ledger.request_resources(&mine).unwrap().is_granted());

    // In the window: team-a holds its 6, the other 4 are held; nothing is left.
    clock.advance_seconds(3601);
    let cap = ledger.get_capacity().unwrap();
    let reserved = cap.reserved.as_ref().unwrap();
    assert_eq!((reserved.workers, reserved.unused_workers), (6, 0));
    assert_eq!(reserved.reservations, vec![r.reservation.reservation_id.clone()]);
    assert_eq!(fold(&all_events(&ledger)), ledger.with_state(Clone::clone));
}

#[test]
fn during_the_window_others_see_the_pool_less_the_unused_reserved_part() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock);
    let r = ledger.reserve(&ReservationRequest::for_job("train-7", 6).window_seconds(0, 3600)).unwrap();
    assert!(r.is_reserved());
    assert_eq!(r.reservation.state, "in_force");
    let other = ResourceRequest::new("other").workers(5).ttl_seconds(60);
    let (reason, error) = rejection(&ledger.request_resources(&other).unwrap());
    assert_eq!(reason, RejectReason::Reserved);
    assert!(error.starts_with("Insufficient workers outside reservations: requested 5, available 4 now"), "{error}");
    assert!(ledger.request_resources(&ResourceRequest::new("other").workers(4).ttl_seconds(60)).unwrap().is_granted());
    // The holder takes its 6 (and no more: the rest is held).
    let two = ledger.request_resources(&ResourceRequest::new("train-7").workers(2).ttl_seconds(60)).unwrap();
    assert!(two.is_granted());
    assert_eq!(ledger.get_capacity().unwrap().reserved.unwrap().unused_workers, 4);
    assert!(ledger
        .request_resources(&ResourceRequest::new("train-7").workers(4).ttl_seconds(60))
        .unwrap()
        .is_granted());
    assert!(!ledger
        .request_resources(&ResourceRequest::new("train-7").workers(1).ttl_seconds(60))
        .unwrap()
        .is_granted());
    // A release by the holder frees reserved capacity for the holder only.
    ledger.release_resources(&two.allocation_id().to_string()).unwrap();
    assert!(!ledger.request_resources(&ResourceRequest::new("other").workers(1).ttl_seconds(60)).unwrap().is_granted());
    // Cancelled: the reserved part is everyone's again.
    let c = ledger.cancel_reservation(&r.reservation.reservation_id).unwrap();
    assert_eq!(c.status, "cancelled");
    assert!(ledger.request_resources(&ResourceRequest::new("other").workers(2).ttl_seconds(60)).unwrap().is_granted());
    assert!(ledger.get_capacity().unwrap().reserved.is_none());
    assert_eq!(field_of(ledger.cancel_reservation(&r.reservation.reservation_id).unwrap_err()), "reservation_id");
}

#[test]
fn after_the_window_the_reservation_is_over_without_an_event() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock);
    let r = ledger.reserve(&ReservationRequest::for_tenant("t", 10).window_seconds(0, 120)).unwrap();
    assert!(r.is_reserved());
    assert!(!ledger.request_resources(&ResourceRequest::new("x").workers(1).ttl_seconds(60)).unwrap().is_granted());
    assert_eq!(ledger.reservations().unwrap().reservations.len(), 1);
    clock.advance_seconds(121);
    assert!(ledger.reservations().unwrap().reservations.is_empty());
    assert!(ledger.get_capacity().unwrap().reserved.is_none());
    assert!(ledger.request_resources(&ResourceRequest::new("x").workers(10).ttl_seconds(60)).unwrap().is_granted());
    assert_eq!(fold(&all_events(&ledger)), ledger.with_state(Clone::clone));
}

#[test]
fn a_reservation_that_cannot_be_honoured_is_recorded_as_rejected() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock);
    // 7 held for two hours reach into a window an hour from now.
    assert!(ledger.request_resources(&ResourceRequest::new("long").workers(7).ttl_seconds(7200)).unwrap().is_granted());
    let failed = ledger.reserve(&ReservationRequest::for_tenant("team-a", 4).window_seconds(3600, 3600)).unwrap();
    assert_eq!(failed.status, "failed");
    assert_eq!(failed.reason.as_deref(), Some("reservation_conflict"));
    assert!(failed.error.as_ref().unwrap().contains("only 3 of the 4 needed workers"), "{failed:?}");
    let events = all_events(&ledger);
    let EventBody::ReservationRejected(rej) = &events.last().unwrap().event.body else { panic!() };
    assert_eq!((rej.needed, rej.available), (4, 3));
    // Three fit; after the lease's deadline, four do.
    assert!(ledger
        .reserve(&ReservationRequest::for_tenant("team-a", 3).window_seconds(3600, 3600))
        .unwrap()
        .is_reserved());
    assert!(ledger
        .reserve(&ReservationRequest::for_tenant("team-b", 4).window_seconds(7200, 600))
        .unwrap()
        .is_reserved());
    // Overlapping reservations add up: 3 + 4 + 7 held > 10 in [2h, 2h+10m) is fine (the lease
    // has ended by then), but another 4 for team-c then is not.
    let c = ledger.reserve(&ReservationRequest::for_tenant("team-c", 4).window_seconds(7000, 600)).unwrap();
    assert_eq!(c.status, "failed", "{c:?}");
    assert_eq!(fold(&all_events(&ledger)), ledger.with_state(Clone::clone));
}

#[test]
fn a_renewal_into_a_window_takes_the_same_check() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock);
    let lease = ledger.request_resources(&ResourceRequest::new("j").workers(6).ttl_seconds(600)).unwrap();
    assert!(ledger.reserve(&ReservationRequest::for_tenant("t", 6).window_seconds(1800, 600)).unwrap().is_reserved());
    let id = lease.allocation_id().to_string();
    // Within the time before the window: fine.
    assert!(ledger.renew_allocation(&id, Some(1200)).is_ok());
    let err = ledger.renew_allocation(&id, Some(3600)).unwrap_err();
    let message = err.to_string();
    assert_eq!(field_of(err), "ttl_seconds");
    assert!(message.contains("ttl_seconds of at most 1799"), "{message}");
}

#[test]
fn invalid_reservations_name_the_field_and_write_nothing() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock);
    let before = ledger.status().last_seq;
    let both = ReservationRequest { job_id: Some("j".into()), ..ReservationRequest::for_tenant("t", 1) };
    let cases = [
        (ReservationRequest::for_tenant("t", 1), "end"),
        (ReservationRequest::for_tenant("t", 0).window_seconds(0, 60), "workers"),
        (ReservationRequest::for_tenant("t", 11).window_seconds(0, 60), "workers"),
        (ReservationRequest { workers: 1, ..ReservationRequest::default() }.window_seconds(0, 60), "tenant"),
        (both.window_seconds(0, 60), "tenant"),
        (ReservationRequest::for_job("", 1).window_seconds(0, 60), "job_id"),
        (ReservationRequest::for_tenant("t", 1).window_seconds(0, 0), "duration_seconds"),
        (ReservationRequest::for_tenant("t", 1).window_seconds(0, 604_801), "duration_seconds"),
        (ReservationRequest::for_tenant("t", 1).window_seconds(2_592_001, 60), "start"),
        (ReservationRequest { end: Some("-1h".into()), ..ReservationRequest::for_tenant("t", 1) }, "end"),
        (
            ReservationRequest {
                start: Some("+2h".into()),
                end: Some("+1h".into()),
                ..ReservationRequest::for_tenant("t", 1)
            },
            "end",
        ),
        (ReservationRequest { start: Some("tomorrow".into()), ..ReservationRequest::for_tenant("t", 1) }, "start"),
    ];
    for (req, field) in cases {
        assert_eq!(field_of(ledger.reserve(&req).unwrap_err()), field, "{req:?}");
    }
    assert_eq!(field_of(ledger.cancel_reservation("alloc-000000000001").unwrap_err()), "reservation_id");
    assert_eq!(ledger.status().last_seq, before);
}

#[test]
fn reservations_survive_snapshots_and_reopening() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock);
    ledger.reserve(&ReservationRequest::for_tenant("t", 3).window_seconds(60, 600)).unwrap();
    ledger.reserve(&ReservationRequest::for_job("j", 2).window_seconds(0, 600)).unwrap();
    ledger.snapshot().unwrap();
    let live = ledger.with_state(Clone::clone);
    drop(ledger);
    let again = open(&storage, &clock);
    assert_eq!(again.with_state(Clone::clone), live);
    assert_eq!(again.reservations().unwrap().reservations.len(), 2);
    assert!(!again.request_resources(&ResourceRequest::new("x").workers(9).ttl_seconds(120)).unwrap().is_granted());
}

#[test]
fn time_travel_and_the_timeline_show_reservations() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock);
    let made = ledger.now_micros();
    let r = ledger.reserve(&ReservationRequest::for_tenant("t", 3).window_seconds(600, 600)).unwrap();
    assert!(r.is_reserved());
    assert!(ledger.request_resources(&ResourceRequest::new("j").workers(2).ttl_seconds(3600)).unwrap().is_granted());
    clock.advance_seconds(700);
    ledger.cancel_reservation(&r.reservation.reservation_id).unwrap();
    clock.advance_seconds(100);
    assert!(ledger.reservations().unwrap().reservations.is_empty());
    let second = 1_000_000;
    let upcoming = ledger.reservations_at(made + 10 * second).unwrap();
    assert_eq!(upcoming.reservations.len(), 1);
    assert_eq!(upcoming.reservations[0].state, "upcoming");
    let during = ledger.reservations_at(made + 650 * second).unwrap();
    assert_eq!(during.reservations[0].state, "in_force");
    let state = ledger.state_at_point(allocation_ledger::LogPoint::At(made + 650 * second)).unwrap();
    assert_eq!(state.reservations.len(), 1);
    let reserved = state.capacity.reserved.unwrap();
    assert_eq!((reserved.workers, reserved.unused_workers), (3, 3));
    let tl = ledger.timeline(made, made + 800 * second, 60 * second).unwrap();
    let svg = tl.to_svg_with_events(&all_events(&ledger));
    assert!(svg.contains(r#"<rect class="reserved""#), "{svg}");
}

#[cfg(feature = "server")]
mod mcp_common;

/// The tools over stdio, and the CLI through a running `serve --http`.
#[cfg(feature = "server")]
#[test]
fn the_tools_and_the_cli_through_a_server() {
    use mcp_common::{bin, err, ok, HttpServer, StdioServer};
    use serde_json::{json, Value};
    let tmp = tempfile::tempdir().unwrap();
    let mut mcp = StdioServer::start(tmp.path(), &[]);
    mcp.initialize();
    let r = ok(&mcp.call("reserve_resources", json!({"tenant": "team-a", "workers": 4, "duration_seconds": 600})));
    assert_eq!(
        (r["status"].as_str(), r["state"].as_str(), r["workers"].as_u64()),
        (Some("reserved"), Some("in_force"), Some(4))
    );
    let id = r["reservation_id"].as_str().unwrap().to_string();
    let f = err(&mcp.call(
        "reserve_resources",
        json!({"job_id": "j", "workers": 7, "start_in_seconds": 10, "duration_seconds": 60}),
    ));
    assert_eq!((f["status"].as_str(), f["reason"].as_str()), (Some("failed"), Some("reservation_conflict")));
    assert!(f["conflict_at"].is_string());
    let bad = err(
        &mcp.call("reserve_resources", json!({"tenant": "t", "job_id": "j", "workers": 1, "duration_seconds": 60}))
    );
    assert_eq!((bad["kind"].as_str(), bad["field"].as_str()), (Some("invalid_input"), Some("tenant")));
    let cap = ok(&mcp.call("get_capacity", json!({})));
    assert_eq!(cap["reserved"]["unused_workers"], 4);
    let g = err(&mcp.call("request_resources", json!({"job_id": "x", "mcp_servers": [], "workers": 7})));
    assert_eq!(g["reason"], "reserved");
    let l = ok(&mcp.call("list_reservations", json!({})));
    assert_eq!(l["reservations"].as_array().unwrap().len(), 1);
    let c = ok(&mcp.call("cancel_reservation", json!({"reservation_id": id})));
    assert_eq!(c["status"], "cancelled");
    assert_eq!(err(&mcp.call("cancel_reservation", json!({"reservation_id": id})))["field"], "reservation_id");
    mcp.close();

    let served = tempfile::tempdir().unwrap();
    let server = HttpServer::start(served.path(), &[]);
    let cli = |args: &[&str]| {
        let o = bin()
            .env_remove("ALLOCATION_LEDGER_SERVER")
            .args(["--server", &server.url, "--json"])
            .args(args)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        (o.status.code(), v)
    };
    let (code, v) = cli(&["reserve", "--job-id", "train", "--workers", "3", "--duration-seconds", "600"]);
    assert_eq!((code, v["status"].as_str()), (Some(0), Some("reserved")), "{v}");
    let (code, v) = cli(&["reserve", "--tenant", "b", "--workers", "8", "--duration-seconds", "600"]);
    assert_eq!((code, v["status"].as_str()), (Some(3), Some("failed")), "{v}");
    let (code, v) = cli(&["reservations"]);
    assert_eq!((code, v["reservations"].as_array().map(Vec::len)), (Some(0), Some(1)), "{v}");
    let id = v["reservations"][0]["reservation_id"].as_str().unwrap().to_string();
    let (code, v) = cli(&["reservation", "cancel", &id]);
    assert_eq!((code, v["status"].as_str()), (Some(0), Some("cancelled")), "{v}");
}

#[test]
fn capacity_at_shows_the_reservations_then_and_a_jobs_history_has_its_reservations() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock);
    let a = ledger.request_resources(&ResourceRequest::new("train-7").workers(1).ttl_seconds(60)).unwrap();
    let r = ledger.reserve(&ReservationRequest::for_job("train-7", 4).window_seconds(0, 600)).unwrap();
    assert!(r.is_reserved());
    let refused = ledger.reserve(&ReservationRequest::for_job("train-7", 10).window_seconds(0, 600)).unwrap();
    assert!(!refused.is_reserved());
    let other = ledger.reserve(&ReservationRequest::for_job("other", 1).window_seconds(0, 600)).unwrap();
    clock.advance_seconds(10);
    let during = ledger.now_micros();
    assert!(ledger.get_capacity().unwrap().reserved.is_some(), "now");
    clock.advance_seconds(10);
    ledger.cancel_reservation(&r.reservation.reservation_id).unwrap();
    ledger.release_resources(&a.allocation_id().to_string()).unwrap();
    clock.advance_seconds(1000);
    ledger.request_resources(&ResourceRequest::new("later").workers(1)).unwrap();
    // Time travel from the capacity index: the reserved block as it was.
    let then = ledger.capacity_at(during).unwrap();
    let reserved = then.reserved.as_ref().expect("a reserved block at T");
    assert_eq!(reserved.workers, 5);
    assert!(reserved.reservations.contains(&r.reservation.reservation_id));
    assert!(reserved.reservations.contains(&other.reservation.reservation_id));
    assert!(ledger.capacity_at(ledger.now_micros()).unwrap().reserved.is_none(), "over now");
    // The job's history holds its reservation events, not the other job's.
    let h = ledger.job_history("train-7").unwrap();
    let kinds: Vec<&str> = h.events.iter().map(|e| e.event.body.type_name()).collect();
    assert_eq!(kinds, ["granted", "reserved", "reservation_rejected", "reservation_cancelled", "released"]);
}

#[test]
fn capacity_at_and_a_jobs_history_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let json = |args: &[&str]| -> (i32, serde_json::Value) {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_allocation-ledger"))
            .env_remove("ALLOCATION_LEDGER_DIR")
            .arg("--data-dir")
            .arg(d)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8(o.stdout).unwrap();
        let v = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout:?} {}", String::from_utf8_lossy(&o.stderr)));
        (o.status.code().unwrap(), v)
    };
    assert_eq!(json(&["init"]).0, 0);
    let (code, r) = json(&["reserve", "--job-id", "train-7", "--workers", "4", "--duration-seconds", "1"]);
    assert_eq!(code, 0, "{r}");
    let start = r["start"].as_str().unwrap().to_string();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // A later event, so that the instant is time travel, and the window over now.
    let (code, _) = json(&["request", "--job-id", "other", "--workers", "1"]);
    assert_eq!(code, 0);
    let (_, now) = json(&["capacity"]);
    assert!(now.get("reserved").is_none(), "{now}");
    let (code, then) = json(&["capacity", "--at", &start]);
    assert_eq!(code, 0, "{then}");
    assert_eq!(then["reserved"]["workers"], 4, "{then}");
    let (code, h) = json(&["history", "--job-id", "train-7"]);
    assert_eq!(code, 0, "{h}");
    let types: Vec<&str> = h["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["reserved"], "{h}");
}
