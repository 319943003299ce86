//! Priority preemption with grace (issue 17 §2, `docs/policy.md` §2): grace 0 preempts in the
//! grant's command, grace > 0 marks victims `preempting` and grants the preemptor when they are
//! released or the grace ends, `preemptible: false` protects, no victim set leaves everything
//! as it was, a restart mid-grace replays to the same state, and the CLI end to end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{
    Admission, AllocationState, Config, EventBody, Ledger, ManualClock, Priority, RequestOutcome, ResourceRequest,
};
use common::{all_events, fold, mem_options, MEM_DIR};

fn config(grace_seconds: u64) -> Config {
    let mut c = Config { preemption_grace_seconds: grace_seconds, ..Config::default() };
    c.priority_reserve_percent.low = 0;
    c
}

fn open(storage: &FaultyStorage, clock: &ManualClock, config: Config) -> Ledger {
    Ledger::open_with(MEM_DIR, mem_options(storage, clock, config)).unwrap()
}

fn grant(l: &Ledger, req: ResourceRequest) -> String {
    match l.request_resources(&req).unwrap() {
        RequestOutcome::Granted(g) => g.allocation_id.to_string(),
        RequestOutcome::Failed(f) => panic!("{}", f.error),
    }
}

fn low(job: &str, workers: u32) -> ResourceRequest {
    ResourceRequest::new(job).workers(workers).priority(Priority::Low).ttl_seconds(3600)
}

fn state_of(l: &Ledger, id: &str) -> AllocationState {
    l.get_allocation(id).unwrap().unwrap().state
}

fn types(l: &Ledger) -> Vec<&'static str> {
    all_events(l).iter().map(|e| e.event.body.type_name()).collect()
}

/// The fold of the whole log equals the live state.
fn assert_replays(l: &Ledger) {
    assert_eq!(fold(&all_events(l)), l.with_state(Clone::clone));
}

#[test]
fn grace_zero_preempts_the_newest_lowest_in_the_same_command() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, config(0));
    let old = grant(&l, low("old", 4));
    clock.advance_seconds(1);
    let new = grant(&l, low("new", 4));
    let normal = grant(&l, ResourceRequest::new("n").workers(2));
    let crit = grant(&l, ResourceRequest::new("crit").workers(3).priority(Priority::Critical));
    assert_eq!(state_of(&l, &new), AllocationState::Preempted);
    assert_eq!(state_of(&l, &old), AllocationState::Active);
    assert_eq!(state_of(&l, &normal), AllocationState::Active);
    assert_eq!(state_of(&l, &crit), AllocationState::Active);
    let t = types(&l);
    assert_eq!(&t[t.len() - 2..], ["preempted", "granted"]);
    let d = l.get_allocation(&new).unwrap().unwrap();
    assert_eq!(d.preempted_by.unwrap().to_string(), crit);
    let h = l.allocation_history(&new).unwrap();
    let last = h.events.last().unwrap();
    assert_eq!(last.explanation.as_deref(), Some("preempted by crit (critical) to make room; grace 0 s"));
    // `normal` never preempts by default: rejected, nothing preempted.
    match l.request_resources(&ResourceRequest::new("n2").workers(5)).unwrap() {
        RequestOutcome::Failed(f) => assert!(f.error.starts_with("Insufficient workers"), "{}", f.error),
        RequestOutcome::Granted(g) => panic!("{g:?}"),
    }
    assert_eq!(state_of(&l, &old), AllocationState::Active);
    assert_replays(&l);
}

/// A plan predicts what the request with its `expected_seq` then gets: with grace 0 the grant
/// that preempting makes possible (the same slots); with a grace period, an answer without
/// preemption (neither waits).
#[test]
fn a_plan_predicts_the_request_with_its_expected_seq() {
    for grace in [0, 30] {
        let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
        let l = open(&storage, &clock, config(grace));
        let victim = grant(&l, low("low", 8));
        let req = ResourceRequest::new("crit").workers(4).priority(Priority::Critical);
        let plan = l.plan_request(&req).unwrap();
        assert_eq!(plan.would_grant, grace == 0, "grace {grace}: {plan:?}");
        let outcome = l.if_seq(plan.current_seq).request_resources(&req).unwrap();
        assert_eq!(outcome.is_granted(), plan.would_grant, "grace {grace}");
        if let (RequestOutcome::Granted(p), RequestOutcome::Granted(g)) = (&plan.outcome, &outcome) {
            let slots = |r: &allocation_ledger::GrantReport| serde_json::to_value(&r.workers_allocated).unwrap();
            assert_eq!(slots(p), slots(g), "the planned slots");
        }
        let expected = if grace == 0 { AllocationState::Preempted } else { AllocationState::Active };
        assert_eq!(state_of(&l, &victim), expected);
        assert_replays(&l);
    }
}

#[test]
fn grace_keeps_victims_holding_until_the_deadline() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, config(30));
    let a = grant(&l, low("a", 6));
    let b = grant(&l, low("b", 4));
    let admitted = l.request_or_queue(&ResourceRequest::new("hot").workers(4).priority(Priority::High)).unwrap();
    let Admission::Pending(p) = admitted else { panic!("{admitted:?}") };
    assert!(p.waiting_reason.starts_with("preempting 1 allocation(s) until"), "{}", p.waiting_reason);
    let hot = p.allocation_id.to_string();
    // The newest low one (b, 4 workers) is enough.
    assert_eq!(state_of(&l, &b), AllocationState::Preempting);
    assert_eq!(state_of(&l, &a), AllocationState::Active);
    let d = l.get_allocation(&b).unwrap().unwrap();
    assert!(d.preempt_deadline.is_some());
    assert_eq!(d.workers.len(), 4, "still holding");
    assert_eq!(l.list_allocations(Some(AllocationState::Preempting), None).unwrap().len(), 1);
    assert_eq!(l.get_capacity().unwrap().available_workers, 0);
    // A renewal in grace is refused, naming the state.
    let e = l.renew_allocation(&b, Some(600)).unwrap_err();
    assert!(e.to_string().contains("preempting"), "{e}");
    clock.advance_seconds(29);
    l.cleanup_expired().unwrap();
    assert_eq!(state_of(&l, &b), AllocationState::Preempting);
    assert_eq!(state_of(&l, &hot), AllocationState::Pending);
    // Events are stamped a microsecond apart: the grace ends just after 30 s on this clock.
    clock.advance_seconds(2);
    l.cleanup_expired().unwrap();
    assert_eq!(state_of(&l, &b), AllocationState::Preempted);
    assert_eq!(state_of(&l, &hot), AllocationState::Active);
    let t = types(&l);
    assert_eq!(&t[t.len() - 2..], ["preempted", "granted"]);
    let h = l.allocation_history(&b).unwrap();
    let words: Vec<_> = h.events.iter().filter_map(|e| e.explanation.clone()).collect();
    assert!(words.iter().any(|w| w.starts_with("hot (high) preempts")), "{words:?}");
    assert!(words.iter().any(|w| w == "preempted by hot (high) to make room; grace 30 s"), "{words:?}");
    assert_replays(&l);
}

#[test]
fn early_release_grants_at_once_and_freed_capacity_is_kept() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, config(30));
    let a = grant(&l, low("a", 4));
    let b = grant(&l, low("b", 4));
    let _n = grant(&l, ResourceRequest::new("n").workers(2));
    let admitted = l.request_or_queue(&ResourceRequest::new("hot").workers(8).priority(Priority::Critical)).unwrap();
    let Admission::Pending(p) = admitted else { panic!("{admitted:?}") };
    let hot = p.allocation_id.to_string();
    assert_eq!(state_of(&l, &a), AllocationState::Preempting);
    assert_eq!(state_of(&l, &b), AllocationState::Preempting);
    l.release_resources(&a).unwrap();
    // What a freed is kept for hot: nobody else gets it.
    assert_eq!(l.get_capacity().unwrap().available_workers, 4);
    match l.request_resources(&ResourceRequest::new("thief").workers(1)).unwrap() {
        RequestOutcome::Failed(f) => assert!(f.error.contains("Insufficient workers"), "{}", f.error),
        RequestOutcome::Granted(g) => panic!("took kept capacity: {g:?}"),
    }
    assert_eq!(state_of(&l, &hot), AllocationState::Pending);
    clock.advance_seconds(5);
    l.release_resources(&b).unwrap();
    assert_eq!(state_of(&l, &hot), AllocationState::Active);
    assert_eq!(state_of(&l, &b), AllocationState::Released);
    assert_replays(&l);
}

#[test]
fn a_victim_expiring_in_grace_and_a_cancelled_preemptor() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, config(120));
    let a = grant(&l, low("a", 5).ttl_seconds(60));
    let b = grant(&l, low("b", 5));
    let Admission::Pending(p) =
        l.request_or_queue(&ResourceRequest::new("hot").workers(10).priority(Priority::High)).unwrap()
    else {
        panic!()
    };
    let hot = p.allocation_id.to_string();
    clock.advance_seconds(61);
    l.cleanup_expired().unwrap();
    assert_eq!(state_of(&l, &a), AllocationState::Expired);
    assert_eq!(state_of(&l, &b), AllocationState::Preempting);
    assert_eq!(state_of(&l, &hot), AllocationState::Pending);
    // Cancelled in grace: the victim left is active again.
    l.cancel_request(&hot).unwrap();
    assert_eq!(state_of(&l, &b), AllocationState::Active);
    assert!(l.get_allocation(&b).unwrap().unwrap().preempt_deadline.is_none());
    assert_replays(&l);
}

#[test]
fn not_preemptible_is_protected_and_only_allowed_for_critical() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, config(0));
    let e = l.request_resources(&ResourceRequest::new("x").workers(1).preemptible(false)).unwrap_err();
    assert!(e.to_string().contains("preemptible") && e.to_string().contains("critical"), "{e}");
    let before = all_events(&l).len();
    assert_eq!(before, 1, "nothing written");
    let keep = grant(&l, ResourceRequest::new("keep").workers(6).priority(Priority::Critical).preemptible(false));
    assert!(!l.get_allocation(&keep).unwrap().unwrap().preemptible);
    let _low = grant(&l, low("l", 4));
    // Critical may only preempt lower priorities; `keep` is critical anyway, and a high one
    // cannot touch it either way: only the low one (4) is below high, not enough for 6.
    match l.request_resources(&ResourceRequest::new("h").workers(6).priority(Priority::High)).unwrap() {
        RequestOutcome::Failed(_) => {}
        RequestOutcome::Granted(g) => panic!("{g:?}"),
    }
    assert_eq!(state_of(&l, &keep), AllocationState::Active);
    assert!(!types(&l).contains(&"preempted"), "no victim set: nothing preempted");
    assert_replays(&l);
}

#[test]
fn a_restart_mid_grace_replays_to_the_same_state() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, config(30));
    let b = grant(&l, low("b", 10));
    let Admission::Pending(p) =
        l.request_or_queue(&ResourceRequest::new("hot").workers(3).priority(Priority::Critical)).unwrap()
    else {
        panic!()
    };
    let live = l.with_state(Clone::clone);
    drop(l);
    let l = open(&storage, &clock, config(30));
    assert_eq!(l.with_state(Clone::clone), live);
    l.snapshot().unwrap();
    drop(l);
    let l = open(&storage, &clock, config(30));
    assert_eq!(l.with_state(Clone::clone), live, "from the snapshot");
    assert_eq!(state_of(&l, &b), AllocationState::Preempting);
    clock.advance_seconds(31);
    l.cleanup_expired().unwrap();
    assert_eq!(state_of(&l, &b), AllocationState::Preempted);
    assert_eq!(state_of(&l, &p.allocation_id.to_string()), AllocationState::Active);
    assert_replays(&l);
}

#[test]
fn a_blocking_request_waits_for_its_grant() {
    let (storage, clock) = (FaultyStorage::new(), ManualClock::at_default_epoch());
    let l = open(&storage, &clock, config(30));
    let b = grant(&l, low("b", 10));
    let waiter = {
        let l = l.clone();
        let req = ResourceRequest::new("hot").workers(2).priority(Priority::High).wait(Some(120));
        std::thread::spawn(move || l.request_resources(&req))
    };
    while state_of(&l, &b) != AllocationState::Preempting {
        std::thread::yield_now();
    }
    l.release_resources(&b).unwrap();
    let outcome = waiter.join().unwrap().unwrap();
    assert!(outcome.is_granted(), "{outcome:?}");
    // Without `wait` the library call answers at once: no preemption with a grace period.
    let b2 = grant(&l, low("b2", 8));
    match l.request_resources(&ResourceRequest::new("hot2").workers(2).priority(Priority::High)).unwrap() {
        RequestOutcome::Failed(f) => assert!(f.error.contains("Insufficient workers"), "{}", f.error),
        RequestOutcome::Granted(g) => panic!("{g:?}"),
    }
    assert_eq!(state_of(&l, &b2), AllocationState::Active);
    let _ = EventBody::Released { allocation_id: allocation_ledger::AllocationId::from_u64(1) };
}

mod cli {
    use serde_json::Value;
    use std::path::Path;
    use std::process::Command;

    fn json(dir: &Path, cfg: &Path, args: &[&str]) -> (i32, Value) {
        let o = Command::new(env!("CARGO_BIN_EXE_allocation-ledger"))
            .env_remove("ALLOCATION_LEDGER_DIR")
            .arg("--data-dir")
            .arg(dir)
            .arg("--config")
            .arg(cfg)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8(o.stdout).unwrap();
        let v = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout:?} {}", String::from_utf8_lossy(&o.stderr)));
        (o.status.code().unwrap(), v)
    }

    fn ledger(grace: u64) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("config.json");
        std::fs::write(&cfg, format!(r#"{{"preemption_grace_seconds": {grace}}}"#)).unwrap();
        let d = tmp.path().join("ledger");
        assert_eq!(json(&d, &cfg, &["init"]).0, 0);
        (tmp, d, cfg)
    }

    #[test]
    fn the_binary_preempts_and_explains_it() {
        let (_tmp, d, cfg) = ledger(0);
        let (code, low) = json(&d, &cfg, &["request", "--job-id", "batch", "--workers", "7", "--priority", "low"]);
        assert_eq!(code, 0, "{low}");
        let low_id = low["allocation_id"].as_str().unwrap().to_string();
        let (code, e) = json(&d, &cfg, &["request", "--job-id", "x", "--workers", "1", "--not-preemptible"]);
        assert_eq!((code, e["error"]["field"].as_str()), (2, Some("preemptible")), "{e}");
        let (code, g) = json(&d, &cfg, &["request", "--job-id", "urgent", "--workers", "8", "--priority", "critical"]);
        assert_eq!(code, 0, "{g}");
        let (_, got) = json(&d, &cfg, &["get", &low_id]);
        assert_eq!(got["state"], "preempted", "{got}");
        assert_eq!(got["preempted_by"], g["allocation_id"], "{got}");
        let (_, list) = json(&d, &cfg, &["list", "--state", "preempted"]);
        assert_eq!(list.as_array().map(Vec::len).or(list["allocations"].as_array().map(Vec::len)), Some(1), "{list}");
        let (_, h) = json(&d, &cfg, &["history", "--allocation", &low_id]);
        assert!(h.to_string().contains("preempted by urgent (critical) to make room; grace 0 s"), "{h}");
    }

    #[test]
    fn the_binary_waits_out_the_grace() {
        let (_tmp, d, cfg) = ledger(1);
        let (code, low) = json(&d, &cfg, &["request", "--job-id", "batch", "--workers", "7", "--priority", "low"]);
        assert_eq!(code, 0, "{low}");
        // Blocks for the one second of grace, then is granted.
        let (code, g) = json(&d, &cfg, &["request", "--job-id", "urgent", "--workers", "5", "--priority", "high"]);
        assert_eq!((code, g["status"].as_str()), (0, Some("active")), "{g}");
        let (_, got) = json(&d, &cfg, &["get", low["allocation_id"].as_str().unwrap()]);
        assert_eq!(got["state"], "preempted", "{got}");
    }
}
