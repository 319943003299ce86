//! A 1M-event ledger (issue 6, items 3, 4 and 6):
//!
//! - full replay rate (`Ledger::open` with no snapshot) and, for reference, the rates of its
//!   parts: framing + CRC only, serial `serde_json` decoding, decoding on every core, the fold;
//! - open time with a recent snapshot (5000 events before the end of the log);
//! - capacity-at-T latency (`Ledger::capacity_at` at random instants; the first call builds the
//!   capacity index, reported apart) against SQLite answering the same question from an
//!   allocations table with a covering index on (start, end, workers, cpu, memory);
//! - peak resident memory of a process that opens the ledger (10k active allocations, 1M events
//!   of history), measured in a child process from `/proc/self/status`.
//!
//! The log is built by the real `Ledger` (so it holds exactly the events a ledger writes: grants
//! with metadata, releases, rejections, expiries) driven by a `ManualClock`, on a storage that
//! skips fsyncs while building; everything is fsynced once at the end, and every measurement
//! uses the real `FsStorage`. The log's pages are in the page cache (warm) when measured.
//! `BENCH_QUICK=1` (or `--quick`) builds 20k events instead.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // a test or benchmark: a failure should panic, and a scenario reads best in one piece

mod common;

use allocation_ledger::storage::FsStorage;
use allocation_ledger::EventRange;
use allocation_ledger::{
    Clock, Config, Event, EventBody, Ledger, ManualClock, OpenOptions, RequestOutcome, ResourceRequest, State,
};
use common::{
    fmt_bytes, fmt_rate, fmt_secs, machine_note, nproc, proc_status_bytes, quick, scratch_dir, sync_tree,
    CountingStorage, Report, Row, Samples, Timed,
};
use serde_json::json;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

const POOL: u32 = 64_000;
/// Allocations left active at the end of the log.
const ACTIVE: usize = 10_000;
/// Events between the snapshot and the end of the log (half of the default `snapshot_every`).
const SNAPSHOT_TAIL: u64 = 5_000;
const CHILD_ENV: &str = "BENCH_MEMORY_CHILD";

fn config() -> Config {
    Config {
        worker_slots: POOL,
        worker_base_port: 1024,
        total_cpu_millicores: u64::from(POOL) * 1000,
        total_memory_mib: u64::from(POOL) * 2048,
        // Snapshots are written by the benchmark itself, at a known place.
        snapshot_every: 0,
        ..Config::default()
    }
}

/// A small deterministic PRNG (xorshift64*), so runs are repeatable without extra crates.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn request(i: u64, rng: &mut Rng, ttl: u64) -> ResourceRequest {
    let teams = ["platform", "search", "ml-infra", "payments", "mobile"];
    let team = teams[(i % teams.len() as u64) as usize];
    let mut m = serde_json::Map::new();
    m.insert("team".into(), json!(team));
    m.insert("pipeline".into(), json!(format!("{team}-nightly")));
    m.insert("commit".into(), json!(format!("{:012x}", rng.next() >> 16)));
    let mut r = ResourceRequest::new(format!("{team}-job-{i:08}")).workers(1).ttl_seconds(ttl).metadata(m);
    if i.is_multiple_of(3) {
        r = r.mcp_server("github");
    }
    if i.is_multiple_of(7) {
        r = r.mcp_server("filesystem");
    }
    r
}

struct Built {
    dir: tempfile::TempDir,
    events: u64,
    payload_bytes: u64,
    log_bytes: u64,
    counts: [u64; 4],
    build_s: f64,
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |rd| rd.flatten().map(|e| e.metadata().map_or(0, |m| m.len())).sum())
}

/// Builds a ledger of about `target` events ending with `ACTIVE` active allocations, and a
/// snapshot `SNAPSHOT_TAIL` events before its end.
fn build(target: u64, active: usize) -> Built {
    let t0 = Instant::now();
    let dir = scratch_dir("history-");
    let step_us: i64 = 50_000;
    // The timeline ends about an hour before now, so the long allocations (7 days) are still
    // active when the benchmark opens the ledger with the system clock.
    let iterations = target as i64 * 100 / 214;
    let start = allocation_ledger::SystemClock.now_micros() - iterations * step_us - 3_600_000_000;
    let clock = ManualClock::new(start);
    let storage = CountingStorage::no_sync();
    let ledger = Ledger::open_with(
        dir.path(),
        OpenOptions::default().config(config()).clock(Arc::new(clock.clone())).storage(storage),
    )
    .unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut long: VecDeque<String> = VecDeque::new();
    let mut i = 0u64;
    let mut seq = 1u64;
    let mut snapshot_done = false;
    let grant = |r: RequestOutcome| match r {
        RequestOutcome::Granted(g) => g.allocation_id.to_string(),
        RequestOutcome::Failed(f) => panic!("unexpected rejection while building: {}", f.error),
    };
    while seq + 2 < target {
        i += 1;
        clock.advance_micros(step_us);
        long.push_back(grant(ledger.request_resources(&request(i, &mut rng, 604_800)).unwrap()));
        if long.len() > active {
            let id = long.pop_front().unwrap();
            clock.advance_micros(1 + rng.below(step_us as u64 / 2) as i64);
            ledger.release_resources(&id).unwrap();
        }
        if i.is_multiple_of(10) {
            // Never released: expires 1 to 5 minutes later (written by a later write).
            let ttl = 60 + rng.below(240);
            grant(ledger.request_resources(&request(i + 1_000_000_000, &mut rng, ttl)).unwrap());
        }
        if i.is_multiple_of(25) {
            let r = ledger.request_resources(&ResourceRequest::new(format!("big-job-{i}")).workers(POOL)).unwrap();
            assert!(!r.is_granted());
        }
        seq = ledger.status().last_seq;
        if !snapshot_done && seq + SNAPSHOT_TAIL >= target {
            ledger.snapshot().unwrap();
            snapshot_done = true;
        }
    }
    // Let the short allocations expire, so exactly `active` remain.
    clock.advance_micros(600_000_000);
    ledger.cleanup_expired().unwrap();
    let mut counts = [0u64; 4];
    let mut events = 0;
    ledger
        .for_each_event(EventRange::default(), &mut |e| {
            events += 1;
            match &e.event.body {
                EventBody::Granted(_) => counts[0] += 1,
                EventBody::Released { .. } => counts[1] += 1,
                EventBody::Expired { .. } => counts[2] += 1,
                EventBody::Rejected(_) => counts[3] += 1,
                _ => {}
            }
            true
        })
        .unwrap();
    assert_eq!(ledger.with_state(allocation_ledger::State::active_count), active);
    drop(ledger);
    sync_tree(dir.path());
    let wal = dir.path().join("wal");
    let mut payload_bytes = 0u64;
    allocation_ledger::testing::wal::scan_log(&FsStorage::default(), &wal, 0, &mut |_, p| {
        payload_bytes += p.len() as u64;
        Ok(true)
    })
    .unwrap();
    Built { events, payload_bytes, log_bytes: dir_bytes(&wal), counts, build_s: t0.elapsed().as_secs_f64(), dir }
}

/// Moves `snapshots/` out of the way while `f` runs (to measure opening without one).
fn without_snapshots<R>(dir: &Path, f: impl FnOnce() -> R) -> R {
    let snaps = dir.join("snapshots");
    let hidden = dir.join("snapshots.hidden");
    std::fs::rename(&snaps, &hidden).unwrap();
    let r = f();
    std::fs::rename(&hidden, &snaps).unwrap();
    r
}

fn open(dir: &Path) -> (Ledger, f64) {
    let t = Instant::now();
    let l = Ledger::open(dir).expect("opening the 1M-event ledger");
    (l, t.elapsed().as_secs_f64())
}

// ----- the child process that measures memory -----

fn memory_child(dir: &Path) {
    let rss0 = proc_status_bytes("VmRSS");
    let anon0 = proc_status_bytes("RssAnon");
    let t = Instant::now();
    let ledger = Ledger::open(dir).unwrap();
    let open_s = t.elapsed().as_secs_f64();
    let (active, allocations) = ledger.with_state(|s| (s.active_count(), s.allocations().count()));
    let hwm_open = proc_status_bytes("VmHWM");
    let rss_open = proc_status_bytes("VmRSS");
    let anon_open = proc_status_bytes("RssAnon");
    // What the heap holds live, without the pages glibc keeps after frees.
    trim_heap();
    let anon_trim = proc_status_bytes("RssAnon");
    let cap = ledger.get_capacity().unwrap();
    let mid = ledger.ledger_start() + (ledger.now_micros() - ledger.ledger_start()) / 2;
    ledger.capacity_at(mid).unwrap();
    let hwm_ix = proc_status_bytes("VmHWM");
    let anon_ix = proc_status_bytes("RssAnon");
    println!(
        "{}",
        json!({
            "rss0": rss0, "anon0": anon0, "open_s": open_s, "active": active, "allocations_in_ram": allocations,
            "active_reported": cap.active_allocations,
            "hwm_open": hwm_open, "rss_open": rss_open, "anon_open": anon_open, "anon_trim": anon_trim, "hwm_ix": hwm_ix, "anon_ix": anon_ix,
            "replayed": ledger.recovery_report().events_replayed,
        })
    );
}

/// Returns freed heap pages to the kernel (glibc's `malloc_trim`; a no-op elsewhere).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only releases free memory of the allocator; it has no preconditions.
        unsafe {
            malloc_trim(0);
        }
    }
}

fn run_memory_child(dir: &Path) -> serde_json::Value {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("starting the memory child");
    assert!(out.status.success(), "the memory child failed");
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

// ----- SQLite -----

struct Interval {
    id: u64,
    workers: u32,
    cpu: u64,
    mem: u64,
    start: i64,
    end: i64,
}

/// Each grant's holding interval `[granted, min(released, deadline))`, from the log.
fn intervals(ledger: &Ledger) -> Vec<Interval> {
    let mut out: Vec<Interval> = Vec::new();
    let mut by_id = std::collections::HashMap::new();
    ledger
        .for_each_event(EventRange::default(), &mut |e| {
            match &e.event.body {
                EventBody::Granted(g) => {
                    by_id.insert(g.allocation_id, out.len());
                    out.push(Interval {
                        id: g.allocation_id.as_u64(),
                        workers: g.resources.workers,
                        cpu: g.resources.cpu_millicores,
                        mem: g.resources.memory_mib,
                        start: e.event.ts_us.as_micros(),
                        end: g.deadline_us.as_micros(),
                    });
                }
                EventBody::Released { allocation_id } => {
                    let iv = &mut out[by_id[allocation_id]];
                    iv.end = iv.end.min(e.event.ts_us.as_micros());
                }
                EventBody::Expired { allocation_id, deadline_us } => {
                    let iv = &mut out[by_id[allocation_id]];
                    iv.end = iv.end.min(deadline_us.as_micros());
                }
                _ => {}
            }
            true
        })
        .unwrap();
    out
}

fn sqlite_capacity_db(path: &Path, ivs: &[Interval]) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).unwrap();
    conn.execute_batch(
        "PRAGMA synchronous=OFF;
         CREATE TABLE allocations(id INTEGER PRIMARY KEY, workers INTEGER NOT NULL, cpu_millicores INTEGER NOT NULL,
             memory_mib INTEGER NOT NULL, start_us INTEGER NOT NULL, end_us INTEGER NOT NULL);
         BEGIN;",
    )
    .unwrap();
    {
        let mut ins = conn
            .prepare(
                "INSERT INTO allocations(id, workers, cpu_millicores, memory_mib, start_us, end_us) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .unwrap();
        for iv in ivs {
            ins.execute(rusqlite::params![iv.id as i64, iv.workers, iv.cpu as i64, iv.mem as i64, iv.start, iv.end])
                .unwrap();
        }
    }
    conn.execute_batch(
        "COMMIT;
         CREATE INDEX allocations_cover ON allocations(start_us, end_us, workers, cpu_millicores, memory_mib);
         ANALYZE;",
    )
    .unwrap();
    conn
}

const SQLITE_CAPACITY_AT: &str =
    "SELECT COALESCE(SUM(workers), 0), COALESCE(SUM(cpu_millicores), 0), COALESCE(SUM(memory_mib), 0)
     FROM allocations WHERE start_us <= ?1 AND end_us > ?1";

fn main() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        memory_child(Path::new(&dir));
        return;
    }
    let quick = quick();
    let mut report = Report::new("history");
    let (target, active) = if quick { (20_000u64, 500usize) } else { (1_000_000, ACTIVE) };

    report.section("Building the test ledger");
    machine_note(&mut report);
    eprintln!("[history] building a {target}-event ledger");
    let b = build(target, active);
    let dir: PathBuf = b.dir.path().to_path_buf();
    if std::env::var_os("BENCH_KEEP").is_some() {
        // For profiling: `BENCH_MEMORY_CHILD=<dir> <this binary>` opens it again.
        eprintln!("[history] keeping the ledger in {}", dir.display());
    }
    report.value("events", "events in the log", b.events as f64, "events", format!("{}", b.events));
    report.value(
        "event_bytes",
        "average event (JSON payload) / framed record",
        b.payload_bytes as f64 / b.events as f64,
        "bytes",
        format!(
            "{:.0} B / {:.0} B",
            b.payload_bytes as f64 / b.events as f64,
            (b.payload_bytes + 16 * b.events) as f64 / b.events as f64
        ),
    );
    report.value("log_bytes", "log size", b.log_bytes as f64, "bytes", fmt_bytes(b.log_bytes as f64));
    report.note(format!(
        "{} grants, {} releases, {} expiries, {} rejections; {active} allocations active at the end; built in {:.1} s \
         by the real Ledger (ManualClock, fsync skipped while building, everything fsynced once at the end)",
        b.counts[0], b.counts[1], b.counts[2], b.counts[3], b.build_s
    ));

    // ----- replay and its parts -----
    report.section("Full replay and open (issue 6, item 3)");
    eprintln!("[history] decoding");
    let storage = FsStorage { mmap_min_bytes: 1 << 20 };
    let wal = dir.join("wal");
    let mut buf: Vec<u8> = Vec::with_capacity(b.payload_bytes as usize);
    let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(b.events as usize);
    allocation_ledger::testing::wal::scan_log(&storage, &wal, 0, &mut |_, p| {
        ranges.push((buf.len(), p.len()));
        buf.extend_from_slice(p);
        Ok(true)
    })
    .unwrap();
    // Each part runs `reps` times; other processes on the machine only ever slow a run down,
    // so the best run is the estimate (the median is shown beside it).
    let reps = if quick { 1 } else { 3 };
    let scan_s = Timed::of(reps, || {
        let mut n = 0u64;
        allocation_ledger::testing::wal::scan_log(&storage, &wal, 0, &mut |_, p| {
            n += std::hint::black_box(p.len()) as u64 & 1;
            Ok(true)
        })
        .unwrap();
        std::hint::black_box(n);
    });
    let decode_s = Timed::of(reps, || {
        for &(o, l) in &ranges {
            std::hint::black_box(Event::decode(&buf[o..o + l]).unwrap());
        }
    });
    let cores = nproc();
    let par_decode_s = Timed::of(reps, || {
        std::thread::scope(|s| {
            for chunk in ranges.chunks(ranges.len().div_ceil(cores)) {
                let buf = &buf;
                s.spawn(move || {
                    for &(o, l) in chunk {
                        std::hint::black_box(Event::decode(&buf[o..o + l]).unwrap());
                    }
                });
            }
        });
    });
    // The fold alone: decode a chunk (untimed), then time `evolve_owned` over it.
    let mut fold_runs = Vec::new();
    for _ in 0..reps {
        let mut state = State::empty(Config::default());
        let mut fold_s = 0.0;
        for (c, chunk) in ranges.chunks(100_000).enumerate() {
            let evs: Vec<Event> = chunk.iter().map(|&(o, l)| Event::decode(&buf[o..o + l]).unwrap()).collect();
            let t = Instant::now();
            for (k, ev) in evs.into_iter().enumerate() {
                state.evolve_owned((c * 100_000 + k + 1) as u64, ev.ts_us, ev.body);
            }
            fold_s += t.elapsed().as_secs_f64();
        }
        assert_eq!(state.active_count(), active);
        fold_runs.push(fold_s);
    }
    let fold_s = Timed(fold_runs);
    drop(buf);
    drop(ranges);
    let ev = b.events as f64;

    eprintln!("[history] full replays");
    let mut replay_s = Vec::new();
    without_snapshots(&dir, || {
        for _ in 0..reps {
            let (l, s) = open(&dir);
            assert_eq!(l.recovery_report().events_replayed, b.events);
            replay_s.push(s);
        }
    });
    let replay_t = Timed(replay_s);
    let replay = replay_t.best();
    let decode = decode_s.best();
    report.row(Row {
        id: "replay_rate".into(),
        what: format!("full replay: Ledger::open, no snapshot ({} events)", b.events),
        value: ev / replay,
        unit: "events/s".into(),
        shown: replay_t.rate_shown(ev),
        against: format!("serial serde_json decode {}", fmt_rate(ev / decode)),
        ratio: Some(decode / replay),
        target: ">= 1M events/s".into(),
        met: Some(ev / replay >= 1e6),
    });
    report.value("replay_s", "full replay: time", replay, "s", replay_t.secs_shown());
    for (id, what, t) in [
        ("scan_rate", "  part: framing + CRC only (wal::scan_log, no decode)".to_string(), &scan_s),
        ("decode_rate", "  part: serial serde_json decode (Event::decode), reference".to_string(), &decode_s),
        (
            "par_decode_rate",
            format!("  part: Event::decode on {cores} threads (upper bound of a parallel decode)"),
            &par_decode_s,
        ),
        ("fold_rate", "  part: State::evolve_owned alone (events decoded beforehand)".to_string(), &fold_s),
    ] {
        report.value(id, &what, ev / t.best(), "events/s", t.rate_shown(ev));
    }
    report.note(format!(
        "each measurement ran {reps} times; the best run is the figure (other processes only slow runs down), the \
         median is in parentheses. The log's pages are in the page cache."
    ));

    eprintln!("[history] opens with a snapshot");
    let snap_files: Vec<_> = std::fs::read_dir(dir.join("snapshots")).unwrap().flatten().collect();
    assert_eq!(snap_files.len(), 1, "one snapshot, written while building");
    let snap_bytes = snap_files[0].metadata().unwrap().len();
    let mut open_s = Vec::new();
    let mut tail = 0;
    for _ in 0..if quick { 1 } else { 5 } {
        let (l, s) = open(&dir);
        tail = l.recovery_report().events_replayed;
        assert!(l.recovery_report().snapshot_seq.is_some());
        open_s.push(s);
    }
    let open_t = Timed(open_s);
    let open_snap = open_t.best();
    report.row(Row {
        id: "open_snapshot_s".into(),
        what: format!("open with a snapshot {tail} events old"),
        value: open_snap,
        unit: "s".into(),
        shown: open_t.secs_shown(),
        against: format!("full replay {}", fmt_secs(replay)),
        ratio: None,
        target: "<= 50 ms".into(),
        met: Some(open_snap <= 0.050),
    });
    report.value("snapshot_bytes", "  snapshot file size", snap_bytes as f64, "bytes", fmt_bytes(snap_bytes as f64));

    // ----- capacity at T -----
    report.section("Capacity at T (issue 6, item 4)");
    eprintln!("[history] capacity_at");
    let (ledger, _) = open(&dir);
    let (first, last) = ledger.with_state(|s| (s.created_us, s.last_ts_us));
    let mut rng = Rng(42);
    let mut at = || first + rng.below((last - first) as u64) as i64;
    let t = Instant::now();
    ledger.capacity_at(at()).unwrap();
    let build_s = t.elapsed().as_secs_f64();
    let queries = if quick { 2_000 } else { 20_000 };
    let mut lat = Vec::with_capacity(queries);
    for _ in 0..queries {
        let t_at = at();
        let t = Instant::now();
        std::hint::black_box(ledger.capacity_at(t_at).unwrap());
        lat.push(t.elapsed());
    }
    let lat = Samples::from_durations(&lat);

    eprintln!("[history] SQLite capacity table");
    let ivs = intervals(&ledger);
    let sql_dir = scratch_dir("sqlite-cap-");
    let t = Instant::now();
    let conn = sqlite_capacity_db(&sql_dir.path().join("capacity.db"), &ivs);
    let sql_build_s = t.elapsed().as_secs_f64();
    let plan: String = conn
        .query_row(&format!("EXPLAIN QUERY PLAN {SQLITE_CAPACITY_AT}"), [0i64], |r| r.get(3))
        .unwrap_or_else(|e| format!("? ({e})"));
    let mut stmt = conn.prepare(SQLITE_CAPACITY_AT).unwrap();
    let sql_queries = if quick { 50 } else { 300 };
    let mut sql_lat = Vec::with_capacity(sql_queries);
    let mut checked = 0;
    for k in 0..sql_queries {
        let t_at = at();
        let t = Instant::now();
        let (w, c, m): (i64, i64, i64) =
            stmt.query_row([t_at.as_micros()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
        sql_lat.push(t.elapsed());
        if k % 10 == 0 {
            // Same question, same answer.
            let cap = ledger.capacity_at(t_at).unwrap();
            assert_eq!(
                (i64::from(cap.allocated_workers), cap.allocated_cpu_millicores as i64, cap.allocated_memory as i64),
                (w, c, m),
                "SQLite and the ledger disagree at {t_at:?}"
            );
            checked += 1;
        }
    }
    let sql_lat = Samples::from_durations(&sql_lat);
    report.row(Row {
        id: "capacity_at_p50_s".into(),
        what: "Ledger::capacity_at(T), random T: p50".into(),
        value: lat.pct(50.0),
        unit: "s".into(),
        shown: fmt_secs(lat.pct(50.0)),
        against: format!("SQLite p50 {}", fmt_secs(sql_lat.pct(50.0))),
        ratio: Some(sql_lat.pct(50.0) / lat.pct(50.0)),
        target: "<= 10 µs".into(),
        met: Some(lat.pct(50.0) <= 10e-6),
    });
    report.row(Row {
        id: "capacity_at_p99_s".into(),
        what: "Ledger::capacity_at(T): p99 / mean".into(),
        value: lat.pct(99.0),
        unit: "s".into(),
        shown: format!("{} / {}", fmt_secs(lat.pct(99.0)), fmt_secs(lat.mean())),
        against: format!("SQLite p99 {} / mean {}", fmt_secs(sql_lat.pct(99.0)), fmt_secs(sql_lat.mean())),
        ratio: Some(sql_lat.mean() / lat.mean()),
        target: "<= 10 µs".into(),
        met: Some(lat.pct(99.0) <= 10e-6),
    });
    report.value(
        "capacity_index_build_s",
        "first capacity_at: builds the capacity index (one pass over the log)",
        build_s,
        "s",
        fmt_secs(build_s),
    );
    report.value(
        "sqlite_build_s",
        &format!("SQLite: load {} allocation rows + build the covering index (setup, not timed above)", ivs.len()),
        sql_build_s,
        "s",
        fmt_secs(sql_build_s),
    );
    report.note(format!(
        "{queries} ledger queries and {sql_queries} SQLite queries at uniformly random instants over the ledger's life; \
         {checked} of them checked to give the same allocated workers, CPU and memory from both. SQLite query: \
         `{}`; plan: `{plan}`. With `start <= T` as the only usable range, SQLite reads every index entry that \
         started before T, so its time grows with the history.",
        SQLITE_CAPACITY_AT.split_whitespace().collect::<Vec<_>>().join(" ")
    ));
    drop(stmt);
    drop(conn);
    drop(ledger);

    // ----- memory -----
    report.section("Peak resident memory (issue 6, item 6)");
    eprintln!("[history] memory (child processes)");
    let with_snap = run_memory_child(&dir);
    let no_snap = without_snapshots(&dir, || run_memory_child(&dir));
    for (id, label, m) in
        [("mem_snapshot", "open with the snapshot", &with_snap), ("mem_replay", "open by full replay", &no_snap)]
    {
        let g = |k: &str| m[k].as_f64().unwrap();
        let act = g("active");
        let per_active = (g("hwm_open") - g("rss0")) / act;
        report.row(Row {
            id: format!("{id}_per_active"),
            what: format!("{label}: (peak RSS - RSS before open) / active allocations"),
            value: per_active,
            unit: "bytes".into(),
            shown: fmt_bytes(per_active),
            against: format!("peak RSS {} for {} active", fmt_bytes(g("hwm_open")), act),
            ratio: None,
            target: "<= 2 KiB".into(),
            met: Some(per_active <= 2048.0),
        });
        report.value(
            &format!("{id}_anon"),
            &format!("{label}: anonymous RSS after open (heap) / per active allocation"),
            g("anon_open"),
            "bytes",
            format!("{} / {}", fmt_bytes(g("anon_open")), fmt_bytes((g("anon_open") - g("anon0")) / act)),
        );
        report.value(
            &format!("{id}_live"),
            &format!("{label}: heap after malloc_trim (live) / per active allocation"),
            g("anon_trim"),
            "bytes",
            format!("{} / {}", fmt_bytes(g("anon_trim")), fmt_bytes((g("anon_trim") - g("anon0")) / act)),
        );
        report.value(
            &format!("{id}_index"),
            &format!("{label}: peak RSS after the capacity index is built"),
            g("hwm_ix"),
            "bytes",
            fmt_bytes(g("hwm_ix")),
        );
        report.note(format!(
            "{label}: {} allocations held in RAM (active and terminal), open took {}, peak RSS includes the \
             memory-mapped log pages touched while replaying ({} events replayed)",
            m["allocations_in_ram"],
            fmt_secs(g("open_s")),
            m["replayed"]
        ));
    }

    // ----- snapshot write cost -----
    report.section("Snapshot write (for reference)");
    let (ledger, _) = open(&dir);
    let t = Instant::now();
    let info = ledger.snapshot().unwrap();
    let snap_s = t.elapsed().as_secs_f64();
    let snap_size = std::fs::metadata(&info.path).map_or(0, |m| m.len());
    report.value(
        "snapshot_write_s",
        "Ledger::snapshot() of the whole state (encode, write, fsync, rename)",
        snap_s,
        "s",
        format!("{} ({})", fmt_secs(snap_s), fmt_bytes(snap_size as f64)),
    );
    // The next snapshot of the same ledger reuses the encoding of every allocation that did
    // not change (here: all of them; one grant is made so that there is a new event).
    let req = allocation_ledger::ResourceRequest::new("bench-after-snapshot").workers(1);
    let _ = ledger.request_resources(&req);
    let t = Instant::now();
    ledger.snapshot().unwrap();
    let again_s = t.elapsed().as_secs_f64();
    report.value(
        "snapshot_again_s",
        "the next Ledger::snapshot(), allocations unchanged (their encoding reused); against the first",
        again_s,
        "s",
        format!("{} ({:.2}x)", fmt_secs(again_s), again_s / snap_s),
    );
    report.note(
        "with the default snapshot_every (10000), a ledger taking writes pays this every 10000 events (a state whose \
         snapshot is over 1 MiB, also only once the log has grown by its size); the state lock is held only while \
         references to the allocations are copied (sorting, encoding and writing happen outside it). The encoding \
         kept for reuse costs about as much memory as the snapshot file, once a snapshot has been taken.",
    );
    drop(ledger);
    report.finish();
    if std::env::var_os("BENCH_KEEP").is_some() {
        let _ = b.dir.keep();
    }
}
