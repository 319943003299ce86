//! Shared by the benchmark binaries: quick mode, scratch directories on the project's file
//! system, statistics, a results table (stdout, markdown and JSON), storage wrappers that count
//! or skip fsyncs, and machine facts.
#![allow(dead_code)]

use allocation_ledger::storage::{AppendFile, FileBytes, FsStorage, LockGuard, Storage};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tiny sizes (so CI or a quick look finishes in seconds): `BENCH_QUICK=1` or `--quick`.
pub fn quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0") || std::env::args().any(|a| a == "--quick")
}

/// Scratch space inside `target/` (the project's file system, so fsync costs what it costs for a
/// real ledger there). `BENCH_DIR` overrides it.
pub fn scratch_root() -> PathBuf {
    let root = match std::env::var_os("BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench"),
    };
    std::fs::create_dir_all(&root).expect("creating the benchmark scratch directory");
    root
}

pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in(scratch_root()).expect("creating a scratch directory")
}

/// Where results go: `BENCH_RESULTS_DIR`, else `target/bench-results/`.
pub fn results_dir() -> PathBuf {
    let dir = match std::env::var_os("BENCH_RESULTS_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().expect("target/tmp has a parent").join("bench-results")
        }
    };
    std::fs::create_dir_all(&dir).expect("creating the results directory");
    dir
}

// ----- statistics -----

/// Sorted samples (seconds) with percentiles.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<f64>);

impl Samples {
    pub fn new(mut v: Vec<f64>) -> Self {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Samples(v)
    }
    pub fn from_durations(v: &[Duration]) -> Self {
        Self::new(v.iter().map(Duration::as_secs_f64).collect())
    }
    pub fn values(&self) -> &[f64] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Nearest-rank percentile, `p` in 0..=100.
    pub fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }
    pub fn mean(&self) -> f64 {
        self.0.iter().sum::<f64>() / self.0.len() as f64
    }
    pub fn max(&self) -> f64 {
        self.0.last().copied().unwrap_or(f64::NAN)
    }
}

/// Durations (seconds) of repeated runs of one CPU-bound measurement. Other processes only ever
/// slow a run down, so the best run is the estimate; the median is shown beside it.
#[derive(Debug, Clone)]
pub struct Timed(pub Vec<f64>);

impl Timed {
    pub fn of(reps: usize, mut f: impl FnMut()) -> Timed {
        Timed(
            (0..reps.max(1))
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        )
    }
    pub fn best(&self) -> f64 {
        self.0.iter().copied().fold(f64::INFINITY, f64::min)
    }
    pub fn median(&self) -> f64 {
        median(&self.0)
    }
    /// `n` things per run as a rate: "best (median m)".
    pub fn rate_shown(&self, n: f64) -> String {
        if self.0.len() > 1 {
            format!("{} (median {})", fmt_rate(n / self.best()), fmt_rate(n / self.median()))
        } else {
            fmt_rate(n / self.best())
        }
    }
    pub fn secs_shown(&self) -> String {
        if self.0.len() > 1 {
            format!("{} (median {})", fmt_secs(self.best()), fmt_secs(self.median()))
        } else {
            fmt_secs(self.best())
        }
    }
}

pub fn median(v: &[f64]) -> f64 {
    Samples::new(v.to_vec()).pct(50.0)
}

// ----- formatting -----

pub fn fmt_rate(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.2}M/s", per_s / 1e6)
    } else if per_s >= 1e4 {
        format!("{:.1}k/s", per_s / 1e3)
    } else {
        format!("{per_s:.0}/s")
    }
}

pub fn fmt_secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.2} µs", s * 1e6)
    }
}

pub fn fmt_bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.2} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

pub fn fmt_ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "n/a".into()
    }
}

// ----- results -----

/// One line of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: String,
    pub what: String,
    pub value: f64,
    pub unit: String,
    pub shown: String,
    /// Compared with, e.g. "raw loop 255/s".
    pub against: String,
    pub ratio: Option<f64>,
    pub target: String,
    /// Whether the target is met (None: no target).
    pub met: Option<bool>,
}

/// A benchmark binary's results: sections of rows, printed as a table and written as markdown
/// and JSON to `results_dir()/<name>.{md,json}`.
pub struct Report {
    pub name: String,
    pub quick: bool,
    sections: Vec<(String, Vec<Row>, Vec<String>)>,
    started: Instant,
}

impl Report {
    pub fn new(name: &str) -> Self {
        Report { name: name.into(), quick: quick(), sections: Vec::new(), started: Instant::now() }
    }

    pub fn section(&mut self, title: &str) {
        println!("\n== {title}");
        self.sections.push((title.into(), Vec::new(), Vec::new()));
    }

    /// A note under the current section's table.
    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        println!("   note: {text}");
        self.sections.last_mut().expect("a section first").2.push(text);
    }

    pub fn row(&mut self, row: Row) {
        let met = match row.met {
            Some(true) => "  [met]",
            Some(false) => "  [MISSED]",
            None => "",
        };
        let mut line = format!("   {:<58} {:>14}", row.what, row.shown);
        if let Some(r) = row.ratio {
            let _ = write!(line, "   {} vs {}", fmt_ratio(r), row.against);
        } else if !row.against.is_empty() {
            let _ = write!(line, "   ({})", row.against);
        }
        if !row.target.is_empty() {
            let _ = write!(line, "   target {}{met}", row.target);
        }
        println!("{line}");
        self.sections.last_mut().expect("a section first").1.push(row);
    }

    /// A plain measurement without baseline or target.
    pub fn value(&mut self, id: &str, what: &str, value: f64, unit: &str, shown: String) {
        self.row(Row {
            id: id.into(),
            what: what.into(),
            value,
            unit: unit.into(),
            shown,
            against: String::new(),
            ratio: None,
            target: String::new(),
            met: None,
        });
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        for (title, rows, notes) in &self.sections {
            let _ = writeln!(md, "### {title}\n");
            let _ = writeln!(md, "| measurement | result | compared with (same run) | ratio | target | met |");
            let _ = writeln!(md, "|---|---:|---|---:|---|:-:|");
            for r in rows {
                let met = match r.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "",
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} |",
                    r.what,
                    r.shown,
                    r.against,
                    r.ratio.map(fmt_ratio).unwrap_or_default(),
                    r.target,
                    met
                );
            }
            if !notes.is_empty() {
                md.push('\n');
                for n in notes {
                    let _ = writeln!(md, "- {n}");
                }
            }
            md.push('\n');
        }
        md
    }

    pub fn json(&self) -> Value {
        let sections: Vec<Value> = self
            .sections
            .iter()
            .map(|(title, rows, notes)| {
                json!({
                    "title": title,
                    "notes": notes,
                    "rows": rows.iter().map(|r| json!({
                        "id": r.id, "what": r.what, "value": r.value, "unit": r.unit, "shown": r.shown,
                        "against": r.against, "ratio": r.ratio, "target": r.target, "met": r.met,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({"bench": self.name, "quick": self.quick, "seconds": self.started.elapsed().as_secs_f64(), "sections": sections})
    }

    /// Writes `<name>.md` and `<name>.json` into the results directory.
    pub fn finish(self) {
        let dir = results_dir();
        let mode = if self.quick { " (quick mode: tiny sizes, not comparable)" } else { "" };
        let md = format!(
            "<!-- written by `cargo bench --bench {}`; {:.0} s -->\n{}",
            self.name,
            self.started.elapsed().as_secs_f64(),
            if mode.is_empty() { self.markdown() } else { format!("_{}_\n\n{}", mode.trim(), self.markdown()) }
        );
        std::fs::write(dir.join(format!("{}.md", self.name)), md).expect("writing results");
        std::fs::write(
            dir.join(format!("{}.json", self.name)),
            serde_json::to_string_pretty(&self.json()).unwrap() + "\n",
        )
        .expect("writing results");
        println!(
            "\n{} finished in {:.1} s; results in {}/{}.{{md,json}}",
            self.name,
            self.started.elapsed().as_secs_f64(),
            dir.display(),
            self.name
        );
    }
}

// ----- storage wrappers -----

/// The real file system with every `fdatasync` of an appended file counted (directory fsyncs
/// are not counted). Measurements use this; the counting is one atomic add.
#[derive(Debug, Default)]
pub struct CountingStorage {
    inner: FsStorage,
    pub syncs: Arc<AtomicU64>,
    /// Positional writes to appended files (the ledger's batch writes and pre-fills).
    pub writes: Arc<AtomicU64>,
    /// Renames: one per snapshot written (`write_atomic`).
    pub renames: AtomicU64,
    /// Skip `fdatasync` of appended files (NOT durable): only to build large test logs fast and
    /// to measure the CPU cost of a grant without the disk.
    pub skip_sync: bool,
}

impl CountingStorage {
    pub fn real() -> Arc<Self> {
        Arc::new(CountingStorage { inner: FsStorage { mmap_min_bytes: 1 << 20 }, ..Default::default() })
    }
    pub fn no_sync() -> Arc<Self> {
        Arc::new(CountingStorage {
            inner: FsStorage { mmap_min_bytes: 1 << 20 },
            skip_sync: true,
            ..Default::default()
        })
    }
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
    pub fn renames(&self) -> u64 {
        self.renames.load(Ordering::Relaxed)
    }
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct CountingFile {
    inner: Box<dyn AppendFile>,
    syncs: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
    skip: bool,
}

impl AppendFile for CountingFile {
    fn append(&self, buf: &[u8]) -> io::Result<()> {
        self.inner.append(buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.write_at(offset, buf)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        if self.skip {
            Ok(())
        } else {
            self.inner.sync_data()
        }
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
}

impl Storage for CountingStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn open_append(&self, path: &Path, create_new: bool) -> io::Result<Box<dyn AppendFile>> {
        let inner = self.inner.open_append(path, create_new)?;
        Ok(Box::new(CountingFile {
            inner,
            syncs: self.syncs.clone(),
            writes: self.writes.clone(),
            skip: self.skip_sync,
        }))
    }
    fn read(&self, path: &Path) -> io::Result<FileBytes> {
        self.inner.read(path)
    }
    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.inner.read_range(path, offset, len)
    }
    fn file_len(&self, path: &Path) -> io::Result<u64> {
        self.inner.file_len(path)
    }
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        self.inner.set_len(path, len)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.renames.fetch_add(1, Ordering::Relaxed);
        self.inner.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.skip_sync {
            Ok(())
        } else {
            self.inner.sync_dir(dir)
        }
    }
    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        self.inner.try_lock(path)
    }
}

/// fsyncs every file in `dir` and `dir` itself (after building a log without fsyncs).
pub fn sync_tree(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            sync_tree(&path);
        } else {
            std::fs::File::open(&path).unwrap().sync_all().unwrap();
        }
    }
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

// ----- machine facts -----

/// A value of `/proc/self/status` in bytes (`VmHWM`, `VmRSS`, `RssAnon`, `RssFile`).
pub fn proc_status_bytes(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
            let kb: u64 = rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
            return kb * 1024;
        }
    }
    0
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().into())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Device and file-system type that `path` lives on (from `/proc/mounts`, longest prefix).
pub fn filesystem_of(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        if path.starts_with(f[1]) && best.as_ref().is_none_or(|(len, _)| f[1].len() > *len) {
            best = Some((f[1].len(), format!("{} on {} ({})", f[0], f[1], f[2])));
        }
    }
    best.map_or_else(|| "unknown".into(), |b| b.1)
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Prints and notes the machine the numbers come from.
pub fn machine_note(report: &mut Report) {
    let root = scratch_root();
    report.note(format!(
        "machine: {} cores ({}), scratch dir on {}, load average at start {}",
        nproc(),
        cpu_model(),
        filesystem_of(&root),
        loadavg()
    ));
}

/// Runs `f(thread, i)` on `threads` threads until `dur` has passed or `f` returns false (each
/// thread checks the clock between calls); returns the number of calls that returned true, the
/// elapsed time and their latencies.
pub fn run_threads(
    threads: usize,
    dur: Duration,
    f: impl Fn(usize, u64) -> bool + Sync,
) -> (u64, Duration, Vec<Duration>) {
    let start = Instant::now();
    let f = &f;
    let per_thread: Vec<Vec<Duration>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut lat = Vec::new();
                    let mut i = 0u64;
                    while start.elapsed() < dur {
                        let t0 = Instant::now();
                        if !f(t, i) {
                            break;
                        }
                        lat.push(t0.elapsed());
                        i += 1;
                    }
                    lat
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed();
    let lat: Vec<Duration> = per_thread.into_iter().flatten().collect();
    (lat.len() as u64, elapsed, lat)
}

/// The benchmarks use the allocator the binary ships with (the `mimalloc` feature, on by
/// default); `cargo bench --no-default-features --features cli,server` measures glibc's.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
