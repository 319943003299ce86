//! Pages of `list_allocations` (and the cursors of `history` and `log`): a bounded page, in a
//! stable order, with an opaque cursor to the next one (see `docs/queries.md`, "Pages").
//!
//! Order: `(created_at, allocation_id)`. Both are fixed once an allocation exists, and new
//! allocations are created at or after the newest, so a cursor (the key of the last row
//! returned) never skips or repeats an allocation that existed when the first page was read.
//!
//! Cost: allocations in memory (the active ones and the `terminal_retained` last ended ones)
//! are scanned, not sorted (a partial selection of the page's size); ended ones that memory no
//! longer holds come from the [`PageIndex`], a sorted table of every allocation of the log
//! (56 bytes and the job id a row) built by one pass over the log on the first page and kept
//! current from the log's new records on each later one. A page is a binary search and a walk
//! of its own length.

use super::{lock, Ledger};
use crate::domain::clock::{datetime, parse_time, Micros};
use crate::domain::event::{EventBody, LoggedEvent};
use crate::domain::model::{AllocationId, AllocationState, Priority};
use crate::domain::queue::{rank, QueueEntry};
use crate::domain::state::{Allocation, State};
use crate::history::History;
use crate::log::layout::WAL_DIR;
use crate::log::reader::{LogReader, LogRules, Wording};
use crate::log::storage::Storage;
use crate::report::AllocationSummary;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Default page size of the MCP `list_allocations` and `allocation_history` tools.
pub const PAGE_DEFAULT_LIMIT: usize = 1_000;
/// Largest page the MCP tools serve.
pub const PAGE_MAX_LIMIT: usize = 10_000;

/// Which allocations `list` shows; every field narrows (`None`: any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only those in this state (as of now, or as of `at`).
    pub state: Option<AllocationState>,
    /// Only those of this job.
    pub job_id: Option<String>,
    /// Only those counted against this tenant's quota.
    pub tenant: Option<String>,
    /// Only those requested at this priority.
    pub priority: Option<Priority>,
    /// Only those created at or after this instant: RFC 3339 or relative to now (`-15m`).
    pub since: Option<String>,
    /// Only those created before this instant, same forms.
    pub until: Option<String>,
    /// List them as they were at this instant (a scan of the log up to it, not an index).
    pub at: Option<String>,
}

impl ListFilter {
    /// Checks the job id and the tenant name (the same errors as a request's).
    pub fn validate(&self) -> Result<()> {
        if let Some(j) = &self.job_id {
            crate::domain::input::validate_job_id("job_id", j)?;
        }
        if let Some(t) = &self.tenant {
            crate::domain::quota::validate_tenant("tenant", t)?;
        }
        if self.at.is_some() && self.tenant.is_some() {
            return Err(Error::invalid("tenant", "cannot be combined with at: list the tenant's allocations now"));
        }
        Ok(())
    }

    /// What a cursor is bound to: the filter as given (relative times as written, so the pages
    /// of `--since -1h` go on with the same words).
    fn fingerprint(&self) -> u64 {
        let text = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
            self.state, self.job_id, self.tenant, self.priority, self.since, self.until, self.at
        );
        fnv1a(text.as_bytes())
    }
}

/// One page of `list_allocations`: the same object as the unpaged list, plus the cursor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AllocationPage {
    /// The rows, oldest first.
    pub allocations: Vec<AllocationSummary>,
    /// How many rows this page holds.
    pub count: usize,
    /// Pass it as `cursor` (with the same filters) for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

// ----- cursors -----

const CURSOR_VERSION: u8 = 1;
const KIND_LIST: u8 = 1;
const KIND_HISTORY: u8 = 2;
const KIND_LOG: u8 = 3;
const KIND_PENDING: u8 = 4;
const CURSOR_BYTES: usize = 30;
const CURSOR_CHARS: usize = 40;

/// What a cursor holds: its kind, a position (two numbers) and the fingerprint of the filter it
/// was made for, with a checksum so that an edited cursor is refused, not misread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    kind: u8,
    a: i64,
    b: u64,
    filter: u64,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 3);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(B64[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

fn b64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = B64.iter().position(|x| *x == c)?;
        acc = acc << 6 | u32::try_from(v).ok()?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from(acc >> bits & 0xff).ok()?);
        }
    }
    Some(out)
}

impl Cursor {
    fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(CURSOR_BYTES);
        bytes.push(CURSOR_VERSION);
        bytes.push(self.kind);
        bytes.extend_from_slice(&self.a.to_be_bytes());
        bytes.extend_from_slice(&self.b.to_be_bytes());
        bytes.extend_from_slice(&self.filter.to_be_bytes());
        let check = fnv1a(&bytes).to_be_bytes();
        bytes.extend_from_slice(&check[..4]);
        b64_encode(&bytes)
    }

    /// Reads `text` as a cursor of `kind` made for the filter `filter`; every failure is an
    /// error naming the field `cursor`.
    fn decode(text: &str, kind: u8, filter: u64) -> Result<Cursor> {
        let bad = || {
            Error::invalid(
                "cursor",
                format!(
                    "{:?} is not a cursor of this listing: pass the next_cursor of the previous page as it was given",
                    text.chars().take(60).collect::<String>()
                ),
            )
        };
        let bytes = Some(text)
            .filter(|t| t.len() == CURSOR_CHARS)
            .and_then(b64_decode)
            .filter(|b| b.len() == CURSOR_BYTES)
            .ok_or_else(bad)?;
        let (body, check) = bytes.split_at(CURSOR_BYTES - 4);
        if fnv1a(body).to_be_bytes()[..4] != *check || body[0] != CURSOR_VERSION || body[1] != kind {
            return Err(bad());
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&body[at..at + 8]);
            w
        };
        let c = Cursor {
            kind,
            a: i64::from_be_bytes(word(2)),
            b: u64::from_be_bytes(word(10)),
            filter: u64::from_be_bytes(word(18)),
        };
        if c.filter != filter {
            return Err(Error::invalid(
                "cursor",
                "was made for other filters: pass the same filters as for the first page, or start again without cursor",
            ));
        }
        Ok(c)
    }
}

/// The sort key of a row: `(created_at, allocation_id)`.
type Key = (Micros, AllocationId);

fn list_cursor(key: Key, filter: u64) -> String {
    Cursor { kind: KIND_LIST, a: key.0.as_micros(), b: key.1.as_u64(), filter }.encode()
}

fn list_after(cursor: Option<&str>, filter: u64) -> Result<Option<Key>> {
    cursor
        .map(|t| Cursor::decode(t, KIND_LIST, filter).map(|c| (Micros::from_micros(c.a), AllocationId::from_u64(c.b))))
        .transpose()
}

// ----- the index of allocations no longer in memory -----

/// One allocation of the log, as `list` shows it once it has ended.
#[derive(Debug, Clone)]
struct Row {
    created_us: Micros,
    id: AllocationId,
    job_id: Box<str>,
    tenant: Option<Box<str>>,
    priority: Priority,
    workers: u32,
    /// Its state as of the index's last event (only read for allocations memory no longer
    /// holds, which have ended).
    state: AllocationState,
}

impl Row {
    fn key(&self) -> Key {
        (self.created_us, self.id)
    }

    fn summary(&self, now: Micros) -> AllocationSummary {
        AllocationSummary {
            allocation_id: self.id,
            job_id: self.job_id.to_string(),
            state: self.state,
            priority: self.priority,
            workers: self.workers,
            age_seconds: now.saturating_since(self.created_us).max(0) as f64 / 1e6,
            is_expired: self.state == AllocationState::Expired,
            created_at: datetime(self.created_us),
            preemptible: true,
            preempt_deadline: None,
        }
    }
}

/// Every allocation of the log up to `upto`, by `(created_at, id)`: the ended ones that memory
/// no longer holds are served from here. Derived data: nothing in it is not in the log.
#[derive(Debug, Default)]
pub(crate) struct PageIndex {
    upto: u64,
    rows: Vec<Row>,
    /// Allocations not yet ended, by id: when each was created (to find its row).
    open: HashMap<AllocationId, Micros>,
    /// Requests waiting in the queue: the row a `cancelled` event gives each (created then).
    waiting: HashMap<AllocationId, Row>,
}

impl PageIndex {
    /// Folds in the log's events after `self.upto` up to `upto`.
    fn catch_up(&mut self, storage: &dyn Storage, wal_dir: &Path, upto: u64) -> Result<()> {
        if upto <= self.upto {
            return Ok(());
        }
        let after = self.upto;
        let reader = LogReader::new(storage, wal_dir).after(after).upto(upto);
        reader.events(&mut LogRules::resuming(after), Wording::Open, &mut |pos, event| {
            self.observe(&LoggedEvent { seq: pos.seq, event });
            Ok(pos.seq < upto)
        })?;
        self.upto = upto;
        Ok(())
    }

    fn observe(&mut self, e: &LoggedEvent) {
        let ts = e.event.ts_us;
        let (row, open) = match &e.event.body {
            EventBody::Granted(g) => (
                Row {
                    created_us: ts,
                    id: g.allocation_id,
                    job_id: g.job_id.as_str().into(),
                    tenant: g.tenant.as_deref().map(Into::into),
                    priority: g.priority,
                    workers: g.resources.workers,
                    state: AllocationState::Active,
                },
                true,
            ),
            EventBody::Rejected(r) => (
                Row {
                    created_us: ts,
                    id: r.allocation_id,
                    job_id: r.job_id.as_str().into(),
                    tenant: r.tenant.as_deref().map(Into::into),
                    priority: r.priority,
                    workers: r.workers,
                    state: AllocationState::Failed,
                },
                false,
            ),
            EventBody::Queued(q) => {
                let row = Row {
                    created_us: ts,
                    id: q.allocation_id,
                    job_id: q.job_id.as_str().into(),
                    tenant: q.tenant.as_deref().map(Into::into),
                    priority: q.priority,
                    workers: q.workers,
                    state: AllocationState::Cancelled,
                };
                self.waiting.insert(q.allocation_id, row);
                return;
            }
            EventBody::Cancelled { allocation_id } => match self.waiting.remove(allocation_id) {
                // The live fold creates a cancelled allocation at its cancel.
                Some(row) => (Row { created_us: ts, ..row }, false),
                None => return,
            },
            EventBody::Released { allocation_id } => return self.end(*allocation_id, AllocationState::Released),
            EventBody::Expired { allocation_id, .. } => return self.end(*allocation_id, AllocationState::Expired),
            _ => return,
        };
        self.waiting.remove(&row.id);
        if open {
            self.open.insert(row.id, row.created_us);
        }
        // The log's timestamps never go back: a new row goes last, or among the rows of the
        // same microsecond.
        let key = row.key();
        let at = match self.rows.last() {
            Some(last) if last.key() > key => self.rows.partition_point(|r| r.key() < key),
            _ => self.rows.len(),
        };
        self.rows.insert(at, row);
    }

    fn end(&mut self, id: AllocationId, state: AllocationState) {
        let Some(created) = self.open.remove(&id) else { return };
        let key = (created, id);
        let at = self.rows.partition_point(|r| r.key() < key);
        if let Some(row) = self.rows.get_mut(at).filter(|r| r.id == id) {
            row.state = state;
        }
    }
}

// ----- a page -----

/// The filter with its times resolved.
struct Resolved<'a> {
    f: &'a ListFilter,
    since: Option<Micros>,
    until: Option<Micros>,
}

impl Resolved<'_> {
    fn created_ok(&self, t: Micros) -> bool {
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t < u)
    }

    fn allocation_ok(&self, a: &Allocation, now: Micros) -> bool {
        self.created_ok(a.created_us)
            && self.f.job_id.as_deref().is_none_or(|j| a.job_id == j)
            && self.f.tenant.as_deref().is_none_or(|t| a.tenant.as_deref() == Some(t))
            && self.f.priority.is_none_or(|p| a.priority == p)
            && self.f.state.is_none_or(|s| a.state_at(now) == s)
    }

    fn row_ok(&self, r: &Row) -> bool {
        self.created_ok(r.created_us)
            && self.f.job_id.as_deref().is_none_or(|j| &*r.job_id == j)
            && self.f.tenant.as_deref().is_none_or(|t| r.tenant.as_deref() == Some(t))
            && self.f.priority.is_none_or(|p| r.priority == p)
            && self.f.state.is_none_or(|s| r.state == s)
    }

    fn summary_ok(&self, s: &AllocationSummary) -> bool {
        self.created_ok(Micros::from_micros(s.created_at.timestamp_micros()))
            && self.f.job_id.as_deref().is_none_or(|j| s.job_id == j)
            && self.f.priority.is_none_or(|p| s.priority == p)
            && self.f.state.is_none_or(|st| s.state == st)
    }
}

/// Up to `take` allocations of memory after `after` that pass the filter, in key order: a
/// scan and a partial selection, no sort of the whole.
fn memory_rows<'s>(
    s: &'s State,
    r: &Resolved<'_>,
    after: Option<Key>,
    take: usize,
    now: Micros,
) -> Vec<&'s Allocation> {
    let mut found: Vec<&Allocation> =
        s.allocations().filter(|a| after.is_none_or(|k| (a.created_us, a.id) > k) && r.allocation_ok(a, now)).collect();
    if found.len() > take && take > 0 {
        found.select_nth_unstable_by_key(take - 1, |a| (a.created_us, a.id));
    }
    found.truncate(take);
    found.sort_unstable_by_key(|a| (a.created_us, a.id));
    found
}

/// Up to `take` rows of the index after `after` that pass the filter and that memory does not
/// hold, in key order.
fn index_rows<'i>(ix: &'i PageIndex, s: &State, r: &Resolved<'_>, after: Option<Key>, take: usize) -> Vec<&'i Row> {
    let mut start = after.map_or(0, |k| ix.rows.partition_point(|row| row.key() <= k));
    if let Some(since) = r.since {
        start = start.max(ix.rows.partition_point(|row| row.created_us < since));
    }
    ix.rows[start..]
        .iter()
        .take_while(|row| r.until.is_none_or(|u| row.created_us < u))
        .filter(|row| s.allocation(row.id).is_none() && r.row_ok(row))
        .take(take)
        .collect()
}

/// The page after `after` of at most `limit` rows, and the key of its last row if more follow.
fn page_now(
    ix: &PageIndex,
    s: &State,
    r: &Resolved<'_>,
    after: Option<Key>,
    limit: usize,
    now: Micros,
) -> (Vec<AllocationSummary>, Option<Key>) {
    let take = limit.saturating_add(1);
    let mem = memory_rows(s, r, after, take, now);
    let old = index_rows(ix, s, r, after, take);
    let (mut m, mut o) = (mem.into_iter().peekable(), old.into_iter().peekable());
    let mut rows = Vec::with_capacity(take.min(4096));
    let mut more = false;
    loop {
        let pick_mem = match (m.peek(), o.peek()) {
            (Some(a), Some(row)) => (a.created_us, a.id) < row.key(),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if rows.len() == limit {
            more = true;
            break;
        }
        let summary = match pick_mem {
            true => m.next().map(|a| AllocationSummary::of(a, now)),
            false => o.next().map(|row| row.summary(now)),
        };
        rows.extend(summary);
    }
    let next = more
        .then(|| rows.last().map(|s| (Micros::from_micros(s.created_at.timestamp_micros()), s.allocation_id)))
        .flatten();
    (rows, next)
}

/// The page after `after` of an already-built list (`at`: the list as of an instant).
fn page_of(
    rows: Vec<AllocationSummary>,
    r: &Resolved<'_>,
    after: Option<Key>,
    limit: usize,
) -> (Vec<AllocationSummary>, Option<Key>) {
    let key = |s: &AllocationSummary| (Micros::from_micros(s.created_at.timestamp_micros()), s.allocation_id);
    let mut page: Vec<AllocationSummary> = rows
        .into_iter()
        .filter(|s| after.is_none_or(|k| key(s) > k) && r.summary_ok(s))
        .take(limit.saturating_add(1))
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let next = more.then(|| page.last().map(key)).flatten();
    (page, next)
}

impl Ledger {
    /// `list_allocations` by pages: at most `limit` rows (`None`: all) after `cursor` (the
    /// `next_cursor` of the previous page, with the same filter), oldest first. Malformed or
    /// foreign cursors are errors naming `cursor`.
    pub fn list_page(&self, filter: &ListFilter, limit: Option<usize>, cursor: Option<&str>) -> Result<AllocationPage> {
        filter.validate()?;
        let fingerprint = filter.fingerprint();
        if filter.state == Some(AllocationState::Pending) && filter.at.is_none() {
            return self.pending_page(filter, fingerprint, limit, cursor);
        }
        let after = list_after(cursor, fingerprint)?;
        let now = self.now_micros();
        let resolve = |field: &str, t: &Option<String>| t.as_deref().map(|t| parse_time(field, t, now)).transpose();
        let r =
            Resolved { f: filter, since: resolve("since", &filter.since)?, until: resolve("until", &filter.until)? };
        let limit = limit.unwrap_or(usize::MAX);
        let (rows, next) = match resolve("at", &filter.at)? {
            Some(t) => page_of(self.list_allocations_at(t, filter.state, filter.job_id.as_deref())?, &r, after, limit),
            None => self.page_from_index(&r, after, limit)?,
        };
        let count = rows.len();
        Ok(AllocationPage { allocations: rows, count, next_cursor: next.map(|k| list_cursor(k, fingerprint)) })
    }

    /// A page of the current state: the index is brought up to the durable end of the log
    /// outside the core lock (the first time, one pass over the log), then over the last few
    /// records under it, so that index and memory describe the same instant.
    fn page_from_index(
        &self,
        r: &Resolved<'_>,
        after: Option<Key>,
        limit: usize,
    ) -> Result<(Vec<AllocationSummary>, Option<Key>)> {
        let mut guard = lock(&self.shared.pages);
        let ix = guard.get_or_insert_with(PageIndex::default);
        let wal_dir = self.shared.dir.join(WAL_DIR);
        let storage = &*self.shared.storage;
        let ((), upto) = self.with_durable_state(|_| ())?;
        ix.catch_up(storage, &wal_dir, upto)?;
        self.read_history(|s, _, now| {
            ix.catch_up(storage, &wal_dir, s.last_seq)?;
            Ok(page_now(ix, s, r, after, limit, now))
        })?
    }
}

// ----- the queue's pages -----

/// Where a page of the queue ended: the last row's priority rank, enqueue time and `queued`
/// sequence number, enough to place it in the queue's order at any later instant even once it
/// has left the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QueueKey {
    rank: u8,
    queued_us: Micros,
    seq: u64,
}

impl QueueKey {
    fn of(e: &QueueEntry) -> QueueKey {
        QueueKey { rank: rank(e.request.priority), queued_us: e.queued_us, seq: e.seq }
    }

    /// Its order at `now` (smaller first), as `domain/queue.rs` orders the waiting requests:
    /// effective priority (aging), then arrival.
    fn order(&self, now: Micros, aging_us: i64) -> (std::cmp::Reverse<u8>, u64) {
        let steps = if aging_us > 0 && now > self.queued_us { (now - self.queued_us) / aging_us } else { 0 };
        let effective = (i64::from(self.rank) + steps).min(3) as u8;
        (std::cmp::Reverse(effective), self.seq)
    }

    fn cursor(&self, filter: u64) -> String {
        let b = (u64::from(self.rank) << 56) | (self.seq & ((1 << 56) - 1));
        Cursor { kind: KIND_PENDING, a: self.queued_us.as_micros(), b, filter }.encode()
    }

    fn decode(text: &str, filter: u64) -> Result<QueueKey> {
        let c = Cursor::decode(text, KIND_PENDING, filter)?;
        Ok(QueueKey { rank: (c.b >> 56) as u8, queued_us: Micros::from_micros(c.a), seq: c.b & ((1 << 56) - 1) })
    }
}

impl Ledger {
    /// A page of `list --state pending`, in queue order (priority with aging, then arrival):
    /// the rows that come after the cursor's row in the order the queue has now. A request
    /// that ages past the cursor's row between pages is not shown again, nor is one that a
    /// newer arrival of a higher priority pushes ahead of it.
    fn pending_page(
        &self,
        filter: &ListFilter,
        fingerprint: u64,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> Result<AllocationPage> {
        let after = cursor.map(|c| QueueKey::decode(c, fingerprint)).transpose()?;
        let now = self.now_micros();
        let resolve = |field: &str, t: &Option<String>| t.as_deref().map(|t| parse_time(field, t, now)).transpose();
        let r =
            Resolved { f: filter, since: resolve("since", &filter.since)?, until: resolve("until", &filter.until)? };
        let limit = limit.unwrap_or(usize::MAX);
        let (rows, next) = self.read(|s, now| {
            let aging_us = i64::try_from(s.config.queue.aging_seconds).unwrap_or(i64::MAX).saturating_mul(1_000_000);
            let mut page: Vec<(QueueKey, AllocationSummary)> = s
                .queue()
                .order(now, &s.config.queue)
                .filter(|e| after.is_none_or(|k| QueueKey::of(e).order(now, aging_us) > k.order(now, aging_us)))
                .filter(|e| filter.tenant.as_deref().is_none_or(|t| e.request.tenant.as_deref() == Some(t)))
                .map(|e| (QueueKey::of(e), super::queue::pending_summary(s, e, now)))
                .filter(|(_, row)| r.summary_ok(row))
                .take(limit.saturating_add(1))
                .collect();
            let more = page.len() > limit;
            page.truncate(limit);
            let next = more.then(|| page.last().map(|(k, _)| k.cursor(fingerprint))).flatten();
            (page.into_iter().map(|(_, row)| row).collect::<Vec<_>>(), next)
        })?;
        Ok(AllocationPage { count: rows.len(), allocations: rows, next_cursor: next })
    }
}

// ----- history and log cursors -----

/// The page of a history: at most `limit` events, the most recent ones before `cursor`'s, and
/// the cursor to the older ones if any (`subject`: what the history is of, which the cursor is
/// bound to).
pub fn page_history(
    mut h: History,
    subject: &str,
    limit: usize,
    cursor: Option<&str>,
) -> Result<(History, Option<String>)> {
    let fingerprint = fnv1a(subject.as_bytes());
    let before = cursor.map(|c| Cursor::decode(c, KIND_HISTORY, fingerprint)).transpose()?.map_or(u64::MAX, |c| c.b);
    h.events.retain(|e| e.seq < before);
    let older = h.events.len().saturating_sub(limit);
    h.events.drain(..older);
    let next = (older > 0)
        .then(|| h.events.first().map(|e| Cursor { kind: KIND_HISTORY, a: 0, b: e.seq, filter: fingerprint }.encode()))
        .flatten();
    Ok((h, next))
}

/// `log --cursor`: the first sequence number the cursor continues from (`window`: the time
/// window as given, which the cursor is bound to).
pub fn log_cursor_seq(cursor: &str, window: &str) -> Result<u64> {
    Cursor::decode(cursor, KIND_LOG, fnv1a(window.as_bytes())).map(|c| c.b)
}

/// The cursor `log` prints when more events follow: the next one to show is `next_seq`.
pub fn log_cursor(next_seq: u64, window: &str) -> String {
    Cursor { kind: KIND_LOG, a: 0, b: next_seq, filter: fnv1a(window.as_bytes()) }.encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_roundtrips_every_length() {
        for n in 0..40u8 {
            let bytes: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
            assert_eq!(b64_decode(&b64_encode(&bytes)).unwrap(), bytes, "length {n}");
        }
    }

    #[test]
    fn cursor_roundtrips_and_refuses_tampering_and_other_filters() {
        let f = ListFilter { job_id: Some("j".into()), ..Default::default() };
        let key = (Micros::from_micros(1_234_567), AllocationId::from_u64(0xabcdef));
        let c = list_cursor(key, f.fingerprint());
        assert_eq!(list_after(Some(&c), f.fingerprint()).unwrap(), Some(key));
        // Every one-character change is refused.
        for i in 0..c.len() {
            for sub in ["A", "z", "-", "_"] {
                let mut t = c.clone();
                if &t[i..=i] == sub {
                    continue;
                }
                t.replace_range(i..=i, sub);
                let e = list_after(Some(&t), f.fingerprint()).unwrap_err();
                assert!(e.to_string().contains("cursor"), "{e}");
            }
        }
        let other = ListFilter { job_id: Some("k".into()), ..Default::default() };
        let e = list_after(Some(&c), other.fingerprint()).unwrap_err();
        assert!(e.to_string().contains("other filters"), "{e}");
        for junk in ["", "x", "!!!!", "AAAA", &"A".repeat(40), "émoji"] {
            assert!(list_after(Some(junk), f.fingerprint()).is_err(), "{junk:?}");
        }
        // A history cursor is not a list cursor.
        let h = Cursor { kind: KIND_HISTORY, a: 0, b: 5, filter: f.fingerprint() }.encode();
        assert!(list_after(Some(&h), f.fingerprint()).is_err());
    }

    #[test]
    fn log_cursor_is_bound_to_its_window() {
        let c = log_cursor(42, "since=-1h");
        assert_eq!(log_cursor_seq(&c, "since=-1h").unwrap(), 42);
        assert!(log_cursor_seq(&c, "since=-2h").is_err());
    }
}
