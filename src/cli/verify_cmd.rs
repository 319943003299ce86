//! `verify`: check every record and snapshot, print the head of the chain, and check a head
//! pinned earlier (`--expect-head SEQ:HASH`).

use super::Out;
use allocation_ledger::storage::FsStorage;
use allocation_ledger::{ChainHead, Error, ExitCode, VerifyOptions, VerifyReport};
use std::path::PathBuf;

/// `verify`'s options.
#[derive(Debug, clap::Args)]
pub(super) struct VerifyArgs {
    /// A head printed by an earlier `verify` (SEQ:HASH): fail (exit 6) unless the log up to SEQ
    /// is the one it was then
    #[arg(long, value_name = "SEQ:HASH", value_parser = parse_head)]
    expect_head: Option<ChainHead>,
}

fn parse_head(text: &str) -> Result<ChainHead, String> {
    text.parse()
}

/// Runs `verify` on the ledger in `dir`: exit 6 on damage or a head that does not match.
pub(super) fn run(out: &Out, dir: PathBuf, args: &VerifyArgs) -> allocation_ledger::Result<ExitCode> {
    if !dir.join(allocation_ledger::layout::WAL_DIR).exists() {
        return Err(Error::NoLedger { path: dir });
    }
    let storage = FsStorage::default();
    let mut bar = super::history::ProgressBar::new("verifying");
    let opts = VerifyOptions { expect_head: args.expect_head };
    let report = allocation_ledger::verify_with(&storage, &dir, opts, &mut |done, total| bar.update(done, total))?;
    bar.finish();
    out.doc(&report, || super::human_verify(&report))?;
    Ok(if report.ok { ExitCode::Ok } else { ExitCode::Damaged })
}

/// The chain lines of the human report: the head, where the chain begins, the pinned head.
pub(super) fn human_chain(r: &VerifyReport) -> String {
    let mut s = match (&r.chain_head, r.chain_from) {
        (Some(head), Some(from)) if from > 1 => format!("head: {head} (chained from record {from})\n"),
        (Some(head), _) => format!("head: {head}\n"),
        (None, Some(_)) => "head: not verified (see the problems)\n".to_string(),
        (None, None) => "head: none (the log is not chained: an older format)\n".to_string(),
    };
    if let Some(e) = &r.expect_head {
        s.push_str(&format!("expected head {}: {}\n", e.expected, if e.matches { "matches" } else { "MISMATCH" }));
        if !e.matches {
            s.push_str(&format!("  {}\n", e.message));
        }
    }
    s
}
