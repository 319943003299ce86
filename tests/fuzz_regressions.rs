//! The fuzz targets' harness (`fuzz/src/harness.rs`) in the normal test run: every input a
//! fuzzer found a bug with (`tests/fuzz_regressions/<target>/`), every seed
//! (`fuzz/seeds/<target>/`), and a fixed set of pseudo-random mutations of the seeds, so the
//! harness and its checks are exercised in CI while the long runs stay in `scripts/fuzz.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

#[path = "../fuzz/src/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::path::{Path, PathBuf};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 6] = [
    ("record_decode", harness::record_decode),
    ("segment_scan", harness::segment_scan),
    ("snapshot_decode", harness::snapshot_decode),
    ("event_decode", harness::event_decode),
    ("mcp_args", harness::mcp_args),
    ("config_parse", harness::config_parse),
];

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_kept_crasher_runs_clean() {
    let mut n = 0;
    for (name, target) in TARGETS {
        for f in files(&root().join("tests/fuzz_regressions").join(name)) {
            let data = std::fs::read(&f).unwrap();
            eprintln!("{name}: {}", f.display());
            target(&data);
            n += 1;
        }
    }
    assert!(n >= 3, "the kept crashers are missing ({n} found)");
}

#[test]
fn every_seed_runs_clean() {
    for (name, target) in TARGETS {
        let seeds = files(&root().join("fuzz/seeds").join(name));
        assert!(!seeds.is_empty(), "no seeds for {name}");
        for f in seeds {
            target(&std::fs::read(&f).unwrap());
        }
    }
}

/// Deterministic mutations of every seed: bit flips, byte overwrites with edge values,
/// insertions, deletions and truncations, as libFuzzer's simplest mutators do.
#[test]
fn mutated_seeds_run_clean() {
    let mut rng = 0x5eed_u64;
    let mut next = move |n: usize| {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((rng >> 33) as usize) % n.max(1)
    };
    for (name, target) in TARGETS {
        for f in files(&root().join("fuzz/seeds").join(name)) {
            let seed = std::fs::read(&f).unwrap();
            for _ in 0..40 {
                let mut d = seed.clone();
                for _ in 0..1 + next(3) {
                    if d.is_empty() {
                        d.push(next(256) as u8);
                        continue;
                    }
                    let at = next(d.len());
                    match next(6) {
                        0 => d[at] ^= 1 << next(8),
                        1 => d[at] = [0u8, 0xff, b'"', b'-', b'9', b'{'][next(6)],
                        2 => d.insert(at, next(256) as u8),
                        3 => {
                            d.remove(at);
                        }
                        4 => d.truncate(at),
                        _ => {
                            // Repeat a slice: long strings, deep arrays, duplicated records.
                            let len = next(64).min(d.len() - at);
                            let piece = d[at..at + len].to_vec();
                            d.splice(at..at, piece);
                        }
                    }
                }
                target(&d);
            }
        }
        eprintln!("{name}: mutations ok");
    }
}

// ----- the fuzzers' findings, spelled out -----

/// event_decode found: a `granted` event whose `resources.workers` (3) disagrees with the one
/// slot it lists broke the fold's invariants (a debug-build panic; in release, a state whose
/// worker count and slot table disagreed). Such a grant is now an anomaly and is not applied.
#[test]
fn a_grant_that_disagrees_with_itself_is_an_anomaly() {
    let data =
        std::fs::read(root().join("tests/fuzz_regressions/event_decode/grant-workers-disagree-with-slots")).unwrap();
    let ev = allocation_ledger::Event::decode(&data).unwrap();
    let mut s = allocation_ledger::State::empty(allocation_ledger::Config::default());
    let created = allocation_ledger::EventBody::LedgerCreated {
        ledger_id: "x".into(),
        config: allocation_ledger::Config::default(),
    };
    s.evolve(1, ev.ts_us - 1, &created);
    s.evolve(2, ev.ts_us, &ev.body);
    assert_eq!(s.anomalies, 1);
    assert_eq!(s.active_count(), 0);
    s.check_invariants().unwrap();
}

/// segment_scan found: a log whose `ledger_created` config has 1.6 CPUs followed by grants of
/// 3 CPUs replayed into a state holding more than the pool. A grant that does not fit the
/// pool is now an anomaly, and the replayed state keeps `allocated + available == total`.
#[test]
fn a_grant_beyond_the_pool_is_an_anomaly() {
    let data = std::fs::read(root().join("tests/fuzz_regressions/segment_scan/grants-beyond-the-pool")).unwrap();
    harness::segment_scan(&data);
    let payloads: Vec<&[u8]> = data.split(|&b| b == b'\n').filter(|p| !p.is_empty()).collect();
    let mut s = allocation_ledger::State::empty(allocation_ledger::Config::default());
    let events: Vec<_> = payloads.iter().filter_map(|p| allocation_ledger::Event::decode(p).ok()).collect();
    assert!(events.len() >= 3);
    for (i, ev) in events.iter().enumerate() {
        s.evolve(i as u64 + 1, ev.ts_us, &ev.body);
    }
    assert!(s.anomalies > 0);
    s.check_invariants().unwrap();
    let c = s.capacity(s.last_ts_us);
    assert_eq!(c.allocated_cpu_millicores + c.available_cpu_millicores, c.total_cpu_millicores);
}

/// mcp_args found: an unknown argument with an empty name was reported with an empty field
/// ("invalid : unknown argument"). The field is now shown quoted.
#[test]
fn an_unknown_argument_with_an_empty_name_is_named() {
    let args: serde_json::Map<String, serde_json::Value> = serde_json::from_str(r#"{"": "zactive"}"#).unwrap();
    match allocation_ledger::ResourceRequest::from_json(&args) {
        Err(allocation_ledger::Error::InvalidInput { field, message }) => {
            assert_eq!(field, "\"\"");
            assert!(message.contains("allowed arguments: job_id"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let args: serde_json::Map<String, serde_json::Value> = serde_json::from_str(r#"{"a\nb": 1}"#).unwrap();
    let e = allocation_ledger::ResourceRequest::from_json(&args).unwrap_err().to_string();
    assert!(e.contains(r#""a\nb""#), "{e}");
}

/// Found while triaging the above (by reading the fold, not by the fuzzer in its first minute):
/// a `ledger_created` event naming billions of worker slots made replay allocate a slot table
/// of that size. A config that does not validate is now an anomaly and is not applied, and a
/// snapshot holding one does not load.
#[test]
fn an_invalid_config_in_the_log_is_not_applied() {
    let mut config = serde_json::to_value(allocation_ledger::Config::default()).unwrap();
    config["worker_slots"] = 4_000_000_000u64.into();
    let payload = serde_json::to_vec(&serde_json::json!({
        "v": 1, "ts_us": 1_767_225_600_000_000i64, "type": "ledger_created",
        "ledger_id": "00000000-0000-4000-8000-000000000000", "config": config,
    }))
    .unwrap();
    harness::event_decode(&payload);
    harness::segment_scan(&payload);
    let ev = allocation_ledger::Event::decode(&payload).unwrap();
    let mut s = allocation_ledger::State::empty(allocation_ledger::Config::default());
    s.evolve(1, ev.ts_us, &ev.body);
    assert_eq!(s.anomalies, 1);
    assert_eq!(s.config, allocation_ledger::Config::default());

    let mut data = s.to_data();
    data.config.worker_slots = 4_000_000_000;
    let snap = allocation_ledger::testing::snapshot::encode(&data);
    let err = allocation_ledger::testing::snapshot::decode(&snap, data.last_seq).unwrap_err();
    assert!(err.contains("worker_slots"), "{err}");
}
