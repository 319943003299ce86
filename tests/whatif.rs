//! What-if over random histories (manual clock, in-memory storage): with the recorded config it
//! re-decides exactly what the ledger decided, event for event; with a strictly larger pool it
//! never rejects a request that reality granted (when what-if-only grants end before the next
//! request; with longer holds they may take what a later request needed, shown below).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

use allocation_ledger::storage::MemoryStorage;
use allocation_ledger::{
    Config, Event, EventBody, Hold, Ledger, ManualClock, McpCatalogEntry, Micros, OpenOptions, Priority,
    ResourceRequest, SimObserver, WhatIfOptions,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Op {
    Request {
        job: u8,
        workers: u32,
        mcp: Vec<usize>,
        priority: u8,
        ttl: u64,
        tenant: u8,
    },
    Release(usize),
    Advance(u64),
    Cleanup,
    Reconfigure(u32),
    Invalid,
    /// Renews the known allocation at this index (modulo), which may have ended.
    Renew(usize, u64),
    /// Sends the last keyed request again (a retry: answered as decided, nothing written).
    Retry,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..5, 0u32..6, prop::collection::vec(0usize..4, 0..3), 0u8..4, 60u64..400, 0u8..3)
            .prop_map(|(job, workers, mcp, priority, ttl, tenant)| Op::Request { job, workers, mcp, priority, ttl, tenant }),
        4 => any::<usize>().prop_map(Op::Release),
        4 => prop_oneof![Just(0u64), 1u64..2_000_000, 1_000_000u64..300_000_000].prop_map(Op::Advance),
        1 => Just(Op::Cleanup),
        1 => (8u32..14).prop_map(Op::Reconfigure),
        1 => Just(Op::Invalid),
        2 => (any::<usize>(), 60u64..600).prop_map(|(i, ttl)| Op::Renew(i, ttl)),
        1 => Just(Op::Retry),
    ]
}

fn config(workers: u32) -> Config {
    let mut catalog = BTreeMap::new();
    catalog.insert(
        "github".to_string(),
        McpCatalogEntry { endpoint: "http://gh".into(), cpu_millicores: 500, memory_mib: 256 },
    );
    Config {
        worker_slots: workers,
        total_cpu_millicores: 9_000,
        total_memory_mib: 18_000,
        mcp_catalog: catalog,
        terminal_retained: 20,
        snapshot_every: 0,
        // A quota, so that the what-if re-decides quota rejections too.
        quotas: [("tenant-2".to_string(), allocation_ledger::Quota { workers: Some(4), ..Default::default() })].into(),
        ..Config::default()
    }
}

fn run(ops: &[Op]) -> Ledger {
    let clock = ManualClock::at_default_epoch();
    let opts = OpenOptions::default()
        .config(config(10))
        .storage(Arc::new(MemoryStorage::new()))
        .clock(Arc::new(clock.clone()));
    let ledger = Ledger::open_with("/ledger", opts).unwrap();
    let mut ids = Vec::new();
    let mut last_keyed: Option<ResourceRequest> = None;
    for (n, op) in ops.iter().enumerate() {
        match op {
            Op::Request { job, workers, mcp, priority, ttl, tenant } => {
                let mut req = ResourceRequest::new(format!("job-{job}")).workers(*workers).ttl_seconds(*ttl);
                for &m in mcp {
                    let name = ["github", "slack", "db", "search"][m];
                    if !req.mcp_servers.iter().any(|n| n == name) {
                        req = req.mcp_server(name);
                    }
                }
                req = req.priority(
                    [Priority::Low, Priority::Normal, Priority::High, Priority::Critical][*priority as usize],
                );
                let mut meta = serde_json::Map::new();
                meta.insert("tenant".into(), format!("tenant-{tenant}").into());
                let req = req.metadata(meta).idempotency_key(format!("key-{n}"));
                if let Ok(o) = ledger.request_resources(&req) {
                    ids.push(o.allocation_id().to_string());
                }
                last_keyed = Some(req);
            }
            Op::Release(i) if !ids.is_empty() => {
                let _ = ledger.release_resources(&ids[i % ids.len()]);
            }
            Op::Release(_) => {}
            Op::Advance(us) => clock.advance_micros(*us as i64),
            Op::Cleanup => {
                ledger.cleanup_expired().unwrap();
            }
            Op::Reconfigure(w) => {
                let _ = ledger.reconfigure(config(*w));
            }
            Op::Invalid => {
                let _ = ledger.request_resources(&ResourceRequest::new("bad").workers(99));
            }
            Op::Renew(i, ttl) if !ids.is_empty() => {
                let _ = ledger.renew_allocation(&ids[i % ids.len()], Some(*ttl));
            }
            Op::Renew(..) => {}
            Op::Retry => {
                if let Some(req) = &last_keyed {
                    let _ = ledger.request_resources(req);
                }
            }
        }
    }
    clock.advance_seconds(1);
    ledger
}

#[derive(Default)]
struct Both {
    real: Vec<(u64, Micros, EventBody)>,
    what_if: Vec<(u64, Micros, EventBody)>,
}

impl SimObserver for Both {
    fn real(&mut self, seq: u64, event: &Event) {
        self.real.push((seq, event.ts_us, event.body.clone()));
    }
    fn what_if(&mut self, seq: u64, ts_us: Micros, body: &EventBody) {
        self.what_if.push((seq, ts_us, body.clone()));
    }
}

/// Outcome per request id: granted or not.
fn outcomes(events: &[(u64, Micros, EventBody)]) -> BTreeMap<String, bool> {
    events
        .iter()
        .filter_map(|(_, _, b)| match b {
            EventBody::Granted(g) => Some((g.allocation_id.to_string(), true)),
            EventBody::Rejected(r) => Some((r.allocation_id.to_string(), false)),
            _ => None,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn recorded_config_reproduces_every_event(ops in prop::collection::vec(op(), 1..120)) {
        let ledger = run(&ops);
        let mut both = Both::default();
        let report = ledger.what_if_observed(&WhatIfOptions::default(), &mut both).unwrap();
        prop_assert_eq!(report.reproduced, Some(true));
        prop_assert_eq!(report.differing_decisions, 0);
        prop_assert_eq!(&both.what_if, &both.real);
        prop_assert_eq!(report.comparison.reality.clone(), report.comparison.what_if.clone());
        let recorded = ledger.events(1, usize::MAX).unwrap();
        prop_assert_eq!(both.real.len(), recorded.len());

        // A window that starts in the middle: the state before it is folded as recorded, and
        // the requests in it are still decided exactly as recorded.
        let since = recorded[recorded.len() / 2].event.ts_us;
        let in_window = recorded
            .iter()
            .filter(|e| e.event.ts_us >= since && matches!(e.event.body, EventBody::Granted(_) | EventBody::Rejected(_)))
            .count() as u64;
        let report = ledger.what_if(&WhatIfOptions { since: Some(since), ..WhatIfOptions::default() }).unwrap();
        prop_assert_eq!(report.reproduced, Some(true));
        prop_assert_eq!(report.comparison.requests, in_window);
    }

    #[test]
    fn a_larger_pool_never_rejects_what_reality_granted(
        ops in prop::collection::vec(op(), 1..120),
        more_workers in 1u32..6,
        more_cpu in 1u64..5_000,
        more_memory in 1u64..5_000,
    ) {
        let ledger = run(&ops);
        let base = ledger.with_state(|s| s.config.clone());
        // A strictly larger pool than any the ledger had (its reconfigurations included).
        let mut patch = serde_json::Map::new();
        patch.insert("worker_slots".into(), (14 + more_workers).into());
        patch.insert("total_cpu_millicores".into(), (base.total_cpu_millicores + more_cpu).into());
        patch.insert("total_memory_mib".into(), (base.total_memory_mib + more_memory).into());
        let opts = WhatIfOptions { config: Some(patch), hold: Hold::Fixed(1), ..WhatIfOptions::default() };
        let mut both = Both::default();
        let report = ledger.what_if_observed(&opts, &mut both).unwrap();
        let (real, what_if) = (outcomes(&both.real), outcomes(&both.what_if));
        for (id, granted) in &real {
            if *granted {
                prop_assert_eq!(what_if.get(id), Some(&true), "{} was granted in reality", id);
            }
        }
        prop_assert_eq!(report.comparison.changes.granted_only_in_reality, 0);
        prop_assert!(report.comparison.what_if.rejected <= report.comparison.reality.rejected);
        let ids: BTreeSet<_> = real.keys().collect();
        prop_assert_eq!(ids.len() as u64, report.comparison.requests);
    }
}

/// Why the property above holds only when what-if-only grants end before the next request: a
/// grant that reality could not make may hold what a later request (granted in reality) needs.
#[test]
fn a_what_if_only_grant_held_for_its_ttl_can_take_what_a_later_request_needed() {
    let ops = vec![
        Op::Request { job: 0, workers: 6, mcp: vec![], priority: 1, ttl: 600, tenant: 0 },
        Op::Advance(1_000_000),
        Op::Request { job: 1, workers: 5, mcp: vec![], priority: 1, ttl: 600, tenant: 0 },
        Op::Advance(1_000_000),
        Op::Release(0),
        Op::Advance(1_000_000),
        Op::Request { job: 2, workers: 8, mcp: vec![], priority: 1, ttl: 600, tenant: 0 },
    ];
    let ledger = run(&ops);
    let mut patch = serde_json::Map::new();
    patch.insert("worker_slots".into(), 11.into());
    patch.insert("total_cpu_millicores".into(), 20_000.into());
    patch.insert("total_memory_mib".into(), 40_000.into());
    let ttl = ledger.what_if(&WhatIfOptions { config: Some(patch.clone()), ..WhatIfOptions::default() }).unwrap();
    let c = &ttl.comparison;
    assert_eq!((c.reality.granted, c.reality.rejected), (2, 1));
    assert_eq!((c.changes.granted_only_in_what_if, c.changes.granted_only_in_reality), (1, 1));
    let short = WhatIfOptions { config: Some(patch), hold: Hold::Fixed(1_500_000), ..WhatIfOptions::default() };
    let c = ledger.what_if(&short).unwrap().comparison;
    assert_eq!((c.what_if.granted, c.what_if.rejected), (3, 0));
}
