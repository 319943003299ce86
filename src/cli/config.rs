//! The config on the command line: `init`, `config show`, `config apply FILE` (a recorded
//! `config_changed` event, shown as a diff first), and the check that a `--config` given for an
//! existing ledger is the one it records.

use super::contract::ExpectSeq;
use super::{open_options, report_recovery, warn_snapshot_error, Out};
use allocation_ledger::{Config, ConfigApplyReport, Error, ExitCode, Ledger};
use clap::Subcommand;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// `config ...`.
#[derive(Debug, Subcommand)]
pub(super) enum ConfigCommand {
    /// Print the config the ledger records now
    Show,
    /// Change the config: show the difference, then record it (a config_changed event). A
    /// change that takes away what active allocations hold is refused, naming the allocation
    Apply {
        /// The new config (JSON); fields left out take their defaults
        file: PathBuf,
        /// Only show the difference and whether it would be accepted; write nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        expect: ExpectSeq,
    },
}

/// One field that differs between two configs.
#[derive(Debug, Serialize)]
pub(super) struct FieldChange {
    field: String,
    from: serde_json::Value,
    to: serde_json::Value,
}

/// The fields of `to` that differ from `from`, in the config's field order.
pub(super) fn diff(from: &Config, to: &Config) -> Vec<FieldChange> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(from), serde_json::to_value(to))
    else {
        return Vec::new();
    };
    b.into_iter()
        .filter(|(k, v)| a.get(k) != Some(v))
        .map(|(field, to)| FieldChange { from: a.get(&field).cloned().unwrap_or_default(), field, to })
        .collect()
}

/// A `--config` given for a ledger that exists must be the config it records: an existing
/// ledger keeps its own, and silently ignoring the file (the pool the caller asked for) would
/// mislead. Says how to apply it instead.
pub(super) fn check_recorded(ledger: &Ledger, config_file: &Option<PathBuf>) -> allocation_ledger::Result<()> {
    let Some(path) = config_file else { return Ok(()) };
    if ledger.recovery_report().created {
        return Ok(());
    }
    let given = Config::from_file(path)?;
    let recorded = ledger.with_state(|s| s.config.clone());
    let changes = diff(&recorded, &given);
    if changes.is_empty() {
        return Ok(());
    }
    let fields: Vec<String> = changes.iter().map(|c| format!("{} {} -> {}", c.field, c.from, c.to)).collect();
    Err(Error::invalid(
        "config",
        format!(
            "{} differs from the config the ledger in {} records ({}); an existing ledger keeps its recorded config: record the change with `allocation-ledger config apply {}` (or drop --config)",
            path.display(),
            ledger.dir().display(),
            fields.join(", "),
            path.display()
        ),
    ))
}

/// `init`: creates the ledger (with `--config`, or the built-in pool); an existing one is
/// reported, and a `--config` that differs from its own is an error.
pub(super) fn init(out: &Out, dir: &Path, config_file: &Option<PathBuf>) -> allocation_ledger::Result<ExitCode> {
    let ledger = Ledger::open_with(dir, open_options(config_file)?)?;
    report_recovery(&ledger);
    check_recorded(&ledger, config_file)?;
    let status = ledger.status();
    let created = ledger.recovery_report().created;
    let doc = serde_json::json!({
        "data_dir": dir,
        "ledger_id": status.ledger_id,
        "created": created,
        "last_seq": status.last_seq,
    });
    out.doc(&doc, || {
        let what = if created { "created" } else { "already holds" };
        format!("{} {what} ledger {} (at seq {})", dir.display(), status.ledger_id, status.last_seq)
    })?;
    Ok(ExitCode::Ok)
}

/// `config show` and `config apply`.
pub(super) fn run(out: &Out, ledger: &Ledger, cmd: &ConfigCommand) -> allocation_ledger::Result<ExitCode> {
    match cmd {
        ConfigCommand::Show => {
            let config = ledger.with_state(|s| s.config.clone());
            let text = serde_json::to_string_pretty(&config)
                .map_err(|e| Error::io("cannot serialise the config", e.into()))?;
            out.doc(&config, || text)?;
            Ok(ExitCode::Ok)
        }
        ConfigCommand::Apply { file, dry_run, expect } => apply(out, ledger, file, *dry_run, expect.seq()?),
    }
}

fn apply(
    out: &Out,
    ledger: &Ledger,
    file: &Path,
    dry_run: bool,
    expected_seq: Option<u64>,
) -> allocation_ledger::Result<ExitCode> {
    let report = ledger.apply_config(Config::from_file(file)?, expected_seq, dry_run)?;
    warn_snapshot_error(ledger);
    print_apply(out, &report)
}

/// `config apply`'s report (local, or from a server's `apply_config`).
pub(super) fn print_apply(out: &Out, report: &ConfigApplyReport) -> allocation_ledger::Result<ExitCode> {
    let changes: String = report.changes.iter().map(|c| format!("  {}: {} -> {}\n", c.field, c.from, c.to)).collect();
    out.doc(report, || match report.seq {
        _ if report.changes.is_empty() => "no change: the ledger already records this config".to_string(),
        Some(seq) => format!("recorded the config change as event {seq}:\n{changes}"),
        None => format!("dry run: the change would be accepted (nothing written):\n{changes}"),
    })?;
    Ok(ExitCode::Ok)
}
