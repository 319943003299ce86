//! Per-tenant quotas (issue 17, section 1): the rule, its wording, tenants from metadata, changes
//! at run time that never revoke, and a property over random sequences: a grant never takes its
//! tenant past the quota in force, and replay equals the live state.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::FaultyStorage;
use allocation_ledger::{Config, EventBody, Ledger, ManualClock, Quota, RejectReason, RequestOutcome, ResourceRequest};
use common::{all_events, assert_capacity_accounting, fold, mem_options, MEM_DIR};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn quota(workers: Option<u32>, github: Option<u32>) -> Quota {
    Quota {
        workers,
        mcp_servers: github.map(|n| [("github".to_string(), n)].into()).unwrap_or_default(),
        ..Quota::default()
    }
}

fn config(t1_workers: u32) -> Config {
    Config {
        quotas: [("t1".to_string(), quota(Some(t1_workers), Some(1)))].into(),
        default_quota: Some(quota(Some(2), None)),
        ..Config::default()
    }
}

fn open(storage: &FaultyStorage, clock: &ManualClock, config: Config) -> Ledger {
    Ledger::open_with(MEM_DIR, mem_options(storage, clock, config)).unwrap()
}

fn rejection(o: &RequestOutcome) -> (RejectReason, String) {
    match o {
        RequestOutcome::Failed(f) => (f.reason, f.error.clone()),
        RequestOutcome::Granted(g) => panic!("granted: {g:?}"),
    }
}

#[test]
fn a_request_past_its_tenants_quota_is_refused_in_kubernetes_words() {
    let storage = FaultyStorage::new();
    let clock = ManualClock::at_default_epoch();
    let ledger = open(&storage, &clock, config(5));
    let a = ledger.request_resources(&ResourceRequest::new("a").workers(4).tenant("t1").mcp_server("github")).unwrap();
    assert!(a.is_granted());
    let (reason, error) =
        rejection(&ledger.request_resources(&ResourceRequest::new("b").workers(2).tenant("t1")).unwrap());
    assert_eq!(reason, RejectReason::Quota);
    assert_eq!(error, "exceeded quota for tenant t1: requested workers=2, used=4, limited=5");
    let (_, error) = rejection(
        &ledger.request_resources(&ResourceRequest::new("c").workers(1).tenant("t1").mcp_server("github")).unwrap(),
    );
    assert_eq!(error, "exceeded quota for tenant t1: requested mcp_servers.github=1, used=1, limited=1");
    // The rejection records which limit, structured.
    let events = all_events(&ledger);
    let EventBody::Rejected(r) = &events.last().unwrap().event.body else { panic!() };
    let q = r.quota.as_ref().unwrap();
    assert_eq!((q.resource.as_str(), q.used, q.limited, r.tenant.as_deref()), ("mcp_servers.github", 1, 1, Some("t1")));

    // The tenant from metadata (existing callers), and the default quota for the rest.
    let mut meta = serde_json::Map::new();
    meta.insert("tenant".into(), "t2".into());
    let m = ledger.request_resources(&ResourceRequest::new("m").workers(2).metadata(meta.clone())).unwrap();
    assert!(m.is_granted());
    let (_, error) =
        rejection(&ledger.request_resources(&ResourceRequest::new("m2").workers(1).metadata(meta)).unwrap());
    assert_eq!(error, "exceeded quota for tenant t2: requested workers=1, used=2, limited=2");
    let (_, error) = rejection(&ledger.request_resources(&ResourceRequest::new("n").workers(3)).unwrap());
    assert_eq!(error, "exceeded quota for tenant (none): requested workers=3, used=0, limited=2");

    // Capacity by tenant: use against quota, tenants with a quota of their own listed too.
    let rows = ledger.tenant_capacity().unwrap();
    let t1 = rows.iter().find(|t| t.tenant == "t1").unwrap();
    assert_eq!((t1.used.workers, t1.quota.as_ref().unwrap().workers), (4, Some(5)));
    assert_eq!(t1.mcp_servers.get("github"), Some(&1));
    assert!(rows.iter().any(|t| t.tenant == "t2" && t.used.workers == 2));

    // Lowering the quota below use revokes nothing; the tenant's next request is refused; once
    // it releases, it fits again.
    ledger.reconfigure(config(1)).unwrap();
    assert_eq!(ledger.get_capacity().unwrap().allocated_workers, 6, "nothing revoked");
    let (_, error) = rejection(&ledger.request_resources(&ResourceRequest::new("d").workers(1).tenant("t1")).unwrap());
    assert_eq!(error, "exceeded quota for tenant t1: requested workers=1, used=4, limited=1");
    ledger.release_resources(&a.allocation_id().to_string()).unwrap();
    assert!(ledger.request_resources(&ResourceRequest::new("e").workers(1).tenant("t1")).unwrap().is_granted());

    // Bad tenant names are invalid input, nothing written.
    let before = all_events(&ledger).len();
    for bad in ["", "(none)", "a\nb", &"t".repeat(129)] {
        let e = ledger.request_resources(&ResourceRequest::new("x").workers(1).tenant(bad)).unwrap_err();
        assert!(e.to_string().contains("invalid tenant"), "{e}");
    }
    assert_eq!(all_events(&ledger).len(), before);
    // Replay equals the live state (per-tenant use included).
    let live = ledger.with_state(Clone::clone);
    assert_eq!(fold(&all_events(&ledger)), live);
}

#[test]
fn bad_quota_configs_name_the_field() {
    for (text, field) in [
        (r#"{"quotas": {"": {"workers": 1}}}"#, "config.quotas."),
        (r#"{"quotas": {"t": {"gpus": 1}}}"#, "config.quotas"),
        (r#"{"quotas": {"t": {"mcp_servers": {"bad name": 1}}}}"#, "config.quotas.t.mcp_servers"),
        (r#"{"default_quota": {"workers": -1}}"#, "config.default_quota"),
        (r#"{"tenant_metadata_key": ""}"#, "config.tenant_metadata_key"),
    ] {
        let e = Config::from_json(text).unwrap_err();
        assert!(e.to_string().contains(field), "{text}: {e}");
    }
}

#[derive(Debug, Clone)]
enum Op {
    Request { tenant: Option<u8>, workers: u32, github: bool },
    Release(usize),
    Advance(i64),
    Requota { t0: u32, default: u32 },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (prop::option::of(0u8..3), 1u32..4, any::<bool>())
            .prop_map(|(tenant, workers, github)| Op::Request { tenant, workers, github }),
        3 => (0usize..64).prop_map(Op::Release),
        1 => (1i64..120).prop_map(Op::Advance),
        1 => (0u32..6, 0u32..6).prop_map(|(t0, default)| Op::Requota { t0, default }),
        1 => Just(Op::Reopen),
    ]
}

fn quotas(t0: u32, default: u32) -> Config {
    Config {
        quotas: [("t0".to_string(), quota(Some(t0), Some(1)))].into(),
        default_quota: Some(quota(Some(default), Some(2))),
        min_ttl_seconds: 10,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A grant never takes its tenant past the quota in force; lowering a quota revokes
    /// nothing; replay equals the live state.
    #[test]
    fn a_quota_is_never_exceeded_by_a_grant(ops in prop::collection::vec(op(), 1..60)) {
        let storage = FaultyStorage::new();
        let clock = ManualClock::at_default_epoch();
        let mut ledger = open(&storage, &clock, quotas(3, 4));
        let mut ids = Vec::new();
        for op in ops {
            match op {
                Op::Request { tenant, workers, github } => {
                    let mut req = ResourceRequest::new("j").workers(workers).ttl_seconds(60);
                    if let Some(t) = tenant {
                        req = req.tenant(format!("t{t}"));
                    }
                    if github {
                        req = req.mcp_server("github");
                    }
                    let out = ledger.request_resources(&req).unwrap();
                    if out.is_granted() {
                        let (use_now, config) = ledger.with_state(|s| (s.tenant_use(req.tenant.as_deref()), s.config.clone()));
                        if let Some(q) = config.quota_of(req.tenant.as_deref()) {
                            prop_assert!(q.workers.is_none_or(|l| use_now.resources.workers <= l), "{:?} over {:?}", use_now, q);
                            for (name, limit) in &q.mcp_servers {
                                prop_assert!(use_now.mcp_servers.get(name).is_none_or(|n| n <= limit));
                            }
                        }
                        ids.push(out.allocation_id().to_string());
                    }
                }
                Op::Release(i) if !ids.is_empty() => {
                    ledger.release_resources(&ids[i % ids.len()]).unwrap();
                }
                Op::Release(_) => {}
                Op::Advance(s) => clock.advance_seconds(s),
                Op::Requota { t0, default } => {
                    // Nothing active before ends by the change, but by its deadline: the
                    // reconfigure's write expires what is due at its own timestamp, which may be
                    // a microsecond past the clock the read before it saw.
                    let active = |l: &Ledger| {
                        l.with_state(|s| {
                            s.allocations()
                                .filter(|a| a.state == allocation_ledger::AllocationState::Active)
                                .map(|a| a.id)
                                .collect::<Vec<_>>()
                        })
                    };
                    let before = active(&ledger);
                    ledger.reconfigure(quotas(t0, default)).unwrap();
                    let after = active(&ledger);
                    for id in before.iter().filter(|id| !after.contains(id)) {
                        let state = ledger.with_state(|s| s.allocation(*id).map(|a| a.state));
                        prop_assert_eq!(
                            state,
                            Some(allocation_ledger::AllocationState::Expired),
                            "a quota change ended {}",
                            id
                        );
                    }
                }
                Op::Reopen => {
                    drop(ledger);
                    ledger = open(&storage, &clock, Config::default());
                }
            }
            assert_capacity_accounting(&ledger.get_capacity().unwrap());
        }
        let per_tenant: BTreeMap<String, u32> =
            ledger.tenant_capacity().unwrap().into_iter().map(|t| (t.tenant, t.used.workers)).collect();
        prop_assert_eq!(per_tenant.values().sum::<u32>(), ledger.get_capacity().unwrap().allocated_workers);
        let live = ledger.with_state(Clone::clone);
        prop_assert_eq!(fold(&all_events(&ledger)), live);
    }
}

#[test]
fn quotas_through_the_binary_with_capacity_by_tenant() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("quotas.json");
    std::fs::write(&cfg, r#"{"quotas": {"team-a": {"workers": 4}}, "default_quota": {"workers": 2}}"#).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_allocation-ledger"))
            .env_remove("ALLOCATION_LEDGER_DIR")
            .arg("--data-dir")
            .arg(tmp.path().join("ledger"))
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(run(&["request", "--job-id", "a", "--workers", "3", "--tenant", "team-a"]).status.success());
    let refused = run(&["--json", "request", "--job-id", "b", "--workers", "2", "--tenant", "team-a"]);
    assert_eq!(refused.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert_eq!(v["reason"], "quota");
    assert_eq!(v["error"], "exceeded quota for tenant team-a: requested workers=2, used=3, limited=4");
    let csv = String::from_utf8(run(&["capacity", "--by-tenant", "-o", "csv"]).stdout).unwrap();
    assert_eq!(
        csv,
        "tenant,workers_used,workers_limit,cpu_millicores_used,cpu_millicores_limit,memory_mib_used,memory_mib_limit,mcp_servers\nteam-a,3,4,3000,,6144,,\n"
    );
    let table = String::from_utf8(run(&["capacity", "--by-tenant"]).stdout).unwrap();
    assert!(table.contains("team-a  3 / 4"), "{table}");
}
