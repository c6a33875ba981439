//! The durable outbox: an append-only log of checksummed records.
//!
//! After the device process crashes (or is `kill -9`ed) and a new one opens
//! the same path, the seq counter and every unacknowledged reading come back:
//! nothing lost, nothing duplicated. With [`FileOutboxOptions::sync`] the
//! same holds after a power loss.
//!
//! # File format
//!
//! The file is a sequence of records. All integers are big-endian.
//!
//! ```text
//!  0        4        8      9
//!  +--------+--------+------+---------------------------+
//!  | len    | crc32  | kind | fields ...                |
//!  | u32 BE | u32 BE | u8   |                           |
//!  +--------+--------+------+---------------------------+
//!                    |<------------- len bytes -------->|
//!                    |<--- crc32 (IEEE) covers these -->|
//! ```
//!
//! `len` counts the body (kind + fields), 1 ..= 16 MiB. Kinds:
//!
//! ```text
//!  'M' 0x4D META    magic "FURROWOB" [8] | version u16 (= 1) | last_seq u64    (body 19 bytes)
//!  'P' 0x50 PUSH    seq u64 | timestamp_ms u64 | content_type u8 | payload ...  (body 18 + n)
//!  'A' 0x41 ACK     upto u64                                                   (body 9)
//!  'R' 0x52 REMOVE  seq u64                                                    (body 9)
//! ```
//!
//! A file always starts with exactly one META record, followed by any number
//! of PUSH / ACK / REMOVE records, one per [`Outbox`] call that changed
//! something:
//!
//! ```text
//!  +------+------+------+-----+------+--------+------+---
//!  | META | PUSH | PUSH | ACK | PUSH | REMOVE | PUSH | ...   (appended at the end)
//!  +------+------+------+-----+------+--------+------+---
//! ```
//!
//! # Replay
//!
//! Opening replays the log: PUSH adds an entry (its seq must be above the
//! previous PUSH's; a compacted log has PUSHes at or below META's
//! `last_seq`), ACK drops every entry `<= upto`, REMOVE drops one, and
//! `last_seq` is the maximum of every seq in META / PUSH / ACK / REMOVE.
//! (Writers never record an ACK `upto` or a REMOVE seq above `last_seq`, so
//! this matches [`super::MemoryOutbox`]: acknowledging beyond `last_seq`
//! does not move it.) Calls that change nothing append nothing.
//!
//! # Torn tail
//!
//! Each record is encoded in memory and handed to the OS with a single
//! `write_all` on a file opened in append mode, so a crash tears at most the
//! last record. On open, a record that is incomplete, has an impossible length
//! or a wrong checksum is a *torn tail* when no valid record can be found
//! anywhere after its start: the file is truncated to the end of the last
//! good record (with a `tracing` warning) and the outbox carries on. If a
//! valid record follows it, the file is [`OutboxError::Corrupt`] (reported
//! with the offset of the bad record) and is left untouched. A length field
//! is always checked against the maximum and against the bytes actually in
//! the file before anything is allocated. The META record itself is never
//! repaired: a file that does not start with a valid META is `Corrupt` (an
//! empty file is treated as new).
//!
//! # Compaction
//!
//! When the file is larger than [`FileOutboxOptions::compact_bytes`] and the
//! live data (META + one PUSH per pending entry) is less than half of it,
//! the outbox writes `<path>.tmp` with META(`last_seq`) and the pending
//! entries, fsyncs it, renames it over the log, fsyncs the directory and
//! appends to the new file from then on. This is checked after every change
//! and at open. A failed compaction is logged and retried once the file has
//! grown further; it never fails the call that triggered it (the call's own
//! record is already in the log). New files are created the same way, so a
//! log never exists without its META record.
//!
//! One process at a time may open a given path (nothing locks it).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{Entry, Outbox, OutboxError};

/// Bytes before the body: len u32 + crc32 u32.
const HEADER_LEN: usize = 8;
/// Largest accepted body (kind + fields).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Largest payload a PUSH record can carry.
const MAX_PAYLOAD: usize = MAX_BODY - PUSH_FIXED;

const KIND_META: u8 = b'M';
const KIND_PUSH: u8 = b'P';
const KIND_ACK: u8 = b'A';
const KIND_REMOVE: u8 = b'R';

const MAGIC: &[u8; 8] = b"FURROWOB";
const VERSION: u16 = 1;

/// META body: kind + magic + version + last_seq.
const META_BODY: usize = 1 + 8 + 2 + 8;
/// PUSH body without the payload: kind + seq + timestamp + content type.
const PUSH_FIXED: usize = 1 + 8 + 8 + 1;
/// ACK / REMOVE body: kind + u64.
const SEQ_BODY: usize = 1 + 8;

/// Size of a whole META record.
const META_RECORD: u64 = (HEADER_LEN + META_BODY) as u64;

/// When a compaction fails, wait for at least this much growth before the
/// next attempt.
const MIN_COMPACT_RETRY: u64 = 64 * 1024;

/// Options of a [`FileOutbox`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOutboxOptions {
    /// fsync after each appended record (power-loss safety). Default
    /// `false`: every record is still written to the OS with `write(2)`
    /// before `push` / `ack` / `remove` returns, which survives a crash of
    /// the process but not of the machine.
    pub sync: bool,
    /// Rewrite the log when it grows past this many bytes and at least half
    /// of it is dead. Default 8 MiB.
    pub compact_bytes: u64,
}

impl Default for FileOutboxOptions {
    fn default() -> Self {
        Self {
            sync: false,
            compact_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Durable outbox: an append-only, checksummed log (format in the module
/// docs). Pending entries are also kept in memory.
#[derive(Debug)]
pub struct FileOutbox {
    path: PathBuf,
    opts: FileOutboxOptions,
    /// Open in append mode on the current log.
    file: File,
    /// Pending entries, ordered by seq.
    entries: VecDeque<Entry>,
    last_seq: u64,
    /// Bytes in the log (all of them good records).
    file_size: u64,
    /// Size the log would have right after a compaction.
    live_bytes: u64,
    /// Do not try to compact before the log is larger than this (backoff
    /// after a failed compaction).
    compact_floor: u64,
    /// Set when a failed append could not be rolled back: the log may end in
    /// a partial record, so nothing more may be appended to it.
    broken: Option<String>,
}

/// One decoded record.
#[derive(Debug)]
enum Record {
    Meta { last_seq: u64 },
    Push(Entry),
    Ack { upto: u64 },
    Remove { seq: u64 },
}

impl FileOutbox {
    /// Opens the outbox at `path`: creates the file (and its parent
    /// directory) if missing, otherwise replays it, repairing a torn last
    /// record.
    pub fn open(path: impl AsRef<Path>, opts: FileOutboxOptions) -> Result<Self, OutboxError> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
            }
        }
        let tmp = tmp_path(&path);
        match std::fs::remove_file(&tmp) {
            Ok(()) => tracing::debug!(path = %tmp.display(), "removed a stale outbox temp file"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %tmp.display(), error = %e, "cannot remove stale outbox temp file")
            }
        }

        let existing = match OpenOptions::new().read(true).append(true).open(&path) {
            Ok(f) => {
                let len = f.metadata().map_err(|e| io_err(&path, e))?.len();
                if len == 0 {
                    None
                } else {
                    Some((f, len))
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&path, e)),
        };

        let Some((file, len)) = existing else {
            let (file, size) = rewrite(&path, 0, &VecDeque::new())?;
            return Ok(Self {
                path,
                opts,
                file,
                entries: VecDeque::new(),
                last_seq: 0,
                file_size: size,
                live_bytes: size,
                compact_floor: 0,
                broken: None,
            });
        };

        let replay = replay(&path, &file, len)?;
        if let Some((reason, good_end)) = &replay.torn {
            tracing::warn!(
                path = %path.display(),
                offset = good_end,
                dropped_bytes = len - good_end,
                reason = %reason,
                "outbox log ends in a torn record; truncating it"
            );
            file.set_len(*good_end).map_err(|e| io_err(&path, e))?;
            file.sync_all().map_err(|e| io_err(&path, e))?;
        }
        let mut outbox = Self {
            path,
            opts,
            file,
            entries: replay.entries,
            last_seq: replay.last_seq,
            file_size: replay.good_end,
            live_bytes: replay.live_bytes,
            compact_floor: 0,
            broken: None,
        };
        outbox.maybe_compact();
        Ok(outbox)
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one encoded record (a single `write_all`), then fsyncs if
    /// configured. On failure the log is cut back to its previous end; if
    /// even that fails, the outbox refuses further changes.
    fn append(&mut self, record: &[u8]) -> Result<(), OutboxError> {
        if let Some(why) = &self.broken {
            return Err(io_err(&self.path, io::Error::other(why.clone())));
        }
        let written = (&self.file).write_all(record).and_then(|()| {
            if self.opts.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                self.file_size += record.len() as u64;
                Ok(())
            }
            Err(e) => {
                if let Err(e2) = self.file.set_len(self.file_size) {
                    let why = format!(
                        "outbox unusable: a failed append ({e}) could not be rolled back ({e2})"
                    );
                    tracing::error!(path = %self.path.display(), "{why}");
                    self.broken = Some(why);
                }
                Err(io_err(&self.path, e))
            }
        }
    }

    /// Compacts if the log qualifies; failures are logged, not returned.
    fn maybe_compact(&mut self) {
        let threshold = self.opts.compact_bytes.max(self.compact_floor);
        if self.broken.is_some()
            || self.file_size <= threshold
            || self.live_bytes.saturating_mul(2) >= self.file_size
        {
            return;
        }
        match rewrite(&self.path, self.last_seq, &self.entries) {
            Ok((file, size)) => {
                tracing::debug!(
                    path = %self.path.display(),
                    from = self.file_size,
                    to = size,
                    "compacted outbox log"
                );
                self.file = file;
                self.file_size = size;
                self.live_bytes = size;
                self.compact_floor = 0;
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbox compaction failed; will retry later");
                self.compact_floor = self
                    .file_size
                    .saturating_add(self.opts.compact_bytes.max(MIN_COMPACT_RETRY));
            }
        }
    }
}

impl Outbox for FileOutbox {
    fn last_seq(&self) -> u64 {
        self.last_seq
    }

    fn push(
        &mut self,
        timestamp_ms: u64,
        content_type: u8,
        payload: Bytes,
    ) -> Result<u64, OutboxError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(io_err(
                &self.path,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "payload of {} bytes is above the outbox maximum of {MAX_PAYLOAD}",
                        payload.len()
                    ),
                ),
            ));
        }
        let Some(seq) = self.last_seq.checked_add(1) else {
            return Err(OutboxError::Corrupt {
                path: self.path.clone(),
                offset: 0,
                reason: "seq counter exhausted (last_seq is u64::MAX)".into(),
            });
        };
        let entry = Entry {
            seq,
            timestamp_ms,
            content_type,
            payload,
        };
        let mut buf = Vec::with_capacity(push_record_len(&entry) as usize);
        write_push(&mut buf, &entry).map_err(|e| io_err(&self.path, e))?;
        self.append(&buf)?;
        self.last_seq = seq;
        self.live_bytes += buf.len() as u64;
        self.entries.push_back(entry);
        self.maybe_compact();
        Ok(seq)
    }

    fn ack(&mut self, upto: u64) -> Result<(), OutboxError> {
        let n = self.entries.partition_point(|e| e.seq <= upto);
        if n == 0 {
            return Ok(());
        }
        self.append(&seq_record(KIND_ACK, upto.min(self.last_seq)))?;
        for e in self.entries.drain(..n) {
            self.live_bytes -= push_record_len(&e);
        }
        self.maybe_compact();
        Ok(())
    }

    fn remove(&mut self, seq: u64) -> Result<(), OutboxError> {
        let Ok(i) = self.entries.binary_search_by_key(&seq, |e| e.seq) else {
            return Ok(());
        };
        self.append(&seq_record(KIND_REMOVE, seq))?;
        if let Some(e) = self.entries.remove(i) {
            self.live_bytes -= push_record_len(&e);
        }
        self.maybe_compact();
        Ok(())
    }

    fn rebase(&mut self, after: u64) -> Result<(), OutboxError> {
        if after <= self.last_seq {
            return Ok(());
        }
        if let Some(why) = &self.broken {
            return Err(io_err(&self.path, io::Error::other(why.clone())));
        }
        let mut entries = self.entries.clone();
        let last_seq = super::memory::renumber(&mut entries, after);
        // Renumbering is not expressible as records: write the new state
        // whole, atomically (tmp file, fsync, rename), as compaction does.
        let (file, size) = rewrite(&self.path, last_seq, &entries)?;
        self.file = file;
        self.file_size = size;
        self.live_bytes = size;
        self.entries = entries;
        self.last_seq = last_seq;
        Ok(())
    }

    fn after(&self, after: u64, limit: usize) -> Vec<Entry> {
        super::memory::entries_after(&self.entries, after, limit)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

// ---------------------------------------------------------------- encoding

fn io_err(path: &Path, source: io::Error) -> OutboxError {
    OutboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> OutboxError {
    OutboxError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(".tmp");
    PathBuf::from(s)
}

fn push_record_len(e: &Entry) -> u64 {
    (HEADER_LEN + PUSH_FIXED + e.payload.len()) as u64
}

/// Writes `[len][crc][body]` for a body made of `parts`.
fn write_record<W: Write>(w: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len)
        .ok()
        .filter(|&l| l as usize <= MAX_BODY)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "outbox record too large"))?;
    let mut crc = crc32fast::Hasher::new();
    for p in parts {
        crc.update(p);
    }
    w.write_all(&len.to_be_bytes())?;
    w.write_all(&crc.finalize().to_be_bytes())?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

fn write_push<W: Write>(w: &mut W, e: &Entry) -> io::Result<()> {
    let mut fixed = [0u8; PUSH_FIXED];
    fixed[0] = KIND_PUSH;
    fixed[1..9].copy_from_slice(&e.seq.to_be_bytes());
    fixed[9..17].copy_from_slice(&e.timestamp_ms.to_be_bytes());
    fixed[17] = e.content_type;
    write_record(w, &[&fixed, &e.payload])
}

fn write_meta<W: Write>(w: &mut W, last_seq: u64) -> io::Result<()> {
    let mut body = [0u8; META_BODY];
    body[0] = KIND_META;
    body[1..9].copy_from_slice(MAGIC);
    body[9..11].copy_from_slice(&VERSION.to_be_bytes());
    body[11..19].copy_from_slice(&last_seq.to_be_bytes());
    write_record(w, &[&body])
}

fn seq_record(kind: u8, seq: u64) -> Vec<u8> {
    let mut body = [0u8; SEQ_BODY];
    body[0] = kind;
    body[1..9].copy_from_slice(&seq.to_be_bytes());
    let mut buf = Vec::with_capacity(HEADER_LEN + SEQ_BODY);
    // Writing a 9-byte body into a Vec cannot fail.
    let _ = write_record(&mut buf, &[&body]);
    buf
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Decodes a body whose checksum matched. `body` is non-empty.
fn decode(body: Vec<u8>) -> Result<Record, String> {
    let kind = body.first().copied().unwrap_or(0);
    match kind {
        KIND_META => {
            if body.len() != META_BODY {
                return Err(format!("META record of {} bytes", body.len()));
            }
            if &body[1..9] != MAGIC {
                return Err("not a furrow outbox log (bad magic)".into());
            }
            let version = u16::from_be_bytes([body[9], body[10]]);
            if version != VERSION {
                return Err(format!("unsupported outbox log version {version}"));
            }
            Ok(Record::Meta {
                last_seq: be_u64(&body[11..]),
            })
        }
        KIND_PUSH => {
            if body.len() < PUSH_FIXED {
                return Err(format!("PUSH record of {} bytes", body.len()));
            }
            let seq = be_u64(&body[1..]);
            let timestamp_ms = be_u64(&body[9..]);
            let content_type = body[17];
            let payload = Bytes::from(body).slice(PUSH_FIXED..);
            Ok(Record::Push(Entry {
                seq,
                timestamp_ms,
                content_type,
                payload,
            }))
        }
        KIND_ACK | KIND_REMOVE => {
            if body.len() != SEQ_BODY {
                return Err(format!("ACK/REMOVE record of {} bytes", body.len()));
            }
            let seq = be_u64(&body[1..]);
            Ok(if kind == KIND_ACK {
                Record::Ack { upto: seq }
            } else {
                Record::Remove { seq }
            })
        }
        other => Err(format!("unknown record kind 0x{other:02x}")),
    }
}

/// Whether a well-formed record (sane length, known kind of the right size,
/// matching checksum) starts at `buf[0]`.
fn valid_record_at(buf: &[u8]) -> bool {
    if buf.len() < HEADER_LEN + 1 {
        return false;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len == 0 || len > MAX_BODY || len > buf.len() - HEADER_LEN {
        return false;
    }
    let body = &buf[HEADER_LEN..HEADER_LEN + len];
    let size_ok = match body[0] {
        KIND_META => len == META_BODY,
        KIND_PUSH => len >= PUSH_FIXED,
        KIND_ACK | KIND_REMOVE => len == SEQ_BODY,
        _ => false,
    };
    size_ok && crc32fast::hash(body) == crc
}

// ------------------------------------------------------------------ replay

struct Replay {
    entries: VecDeque<Entry>,
    last_seq: u64,
    /// End of the last good record.
    good_end: u64,
    live_bytes: u64,
    /// Why the tail was cut, and where (== good_end).
    torn: Option<(String, u64)>,
}

/// Replays the log of `len` bytes (> 0).
fn replay(path: &Path, file: &File, len: u64) -> Result<Replay, OutboxError> {
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut entries: VecDeque<Entry> = VecDeque::new();
    let mut last_seq = 0u64;
    let mut last_push = 0u64;
    let mut live_bytes = 0u64;
    let mut off = 0u64;
    let mut bad: Option<String> = None;

    while off < len {
        let remaining = len - off;
        if remaining < HEADER_LEN as u64 {
            bad = Some(format!("incomplete record header ({remaining} bytes)"));
            break;
        }
        let mut header = [0u8; HEADER_LEN];
        reader
            .read_exact(&mut header)
            .map_err(|e| io_err(path, e))?;
        let body_len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if body_len == 0 || body_len as usize > MAX_BODY {
            bad = Some(format!("record length {body_len} out of range"));
            break;
        }
        if u64::from(body_len) > remaining - HEADER_LEN as u64 {
            bad = Some(format!(
                "record of {body_len} bytes extends past the end of the file"
            ));
            break;
        }
        // Bounded by MAX_BODY and by the bytes present in the file.
        let mut body = vec![0u8; body_len as usize];
        reader.read_exact(&mut body).map_err(|e| io_err(path, e))?;
        if crc32fast::hash(&body) != crc {
            bad = Some("checksum mismatch".into());
            break;
        }
        let record = decode(body).map_err(|reason| corrupt(path, off, reason))?;
        match record {
            Record::Meta { last_seq: meta } => {
                if off != 0 {
                    return Err(corrupt(path, off, "META record after the start"));
                }
                last_seq = meta;
                live_bytes += META_RECORD;
            }
            _ if off == 0 => {
                return Err(corrupt(path, 0, "log does not start with a META record"));
            }
            Record::Push(e) => {
                if e.seq <= last_push {
                    return Err(corrupt(
                        path,
                        off,
                        format!(
                            "PUSH seq {} is not above the previous PUSH {last_push}",
                            e.seq
                        ),
                    ));
                }
                last_push = e.seq;
                last_seq = last_seq.max(e.seq);
                live_bytes += push_record_len(&e);
                entries.push_back(e);
            }
            Record::Ack { upto } => {
                last_seq = last_seq.max(upto);
                let n = entries.partition_point(|e| e.seq <= upto);
                for e in entries.drain(..n) {
                    live_bytes -= push_record_len(&e);
                }
            }
            Record::Remove { seq } => {
                last_seq = last_seq.max(seq);
                if let Ok(i) = entries.binary_search_by_key(&seq, |e| e.seq) {
                    if let Some(e) = entries.remove(i) {
                        live_bytes -= push_record_len(&e);
                    }
                }
            }
        }
        off += HEADER_LEN as u64 + u64::from(body_len);
    }
    drop(reader);

    let torn = match bad {
        None => None,
        Some(reason) => {
            if off == 0 {
                return Err(corrupt(
                    path,
                    0,
                    format!("no valid META record at the start: {reason}"),
                ));
            }
            if let Some(next) = find_valid_record_after(path, file, off, len)? {
                return Err(corrupt(
                    path,
                    off,
                    format!("{reason}; a valid record follows at byte {next}"),
                ));
            }
            Some((reason, off))
        }
    };
    Ok(Replay {
        entries,
        last_seq,
        good_end: off,
        live_bytes,
        torn,
    })
}

/// Looks for a valid record starting anywhere in `(off, len)`. The region is
/// only read if it is small enough to be a torn tail (at most two maximal
/// records); a longer one is reported as corrupt.
fn find_valid_record_after(
    path: &Path,
    file: &File,
    off: u64,
    len: u64,
) -> Result<Option<u64>, OutboxError> {
    let rest = len - off;
    let limit = 2 * (HEADER_LEN + MAX_BODY) as u64;
    if rest > limit {
        return Err(corrupt(
            path,
            off,
            format!("bad record followed by {rest} bytes, too many for a torn tail"),
        ));
    }
    let mut f = file;
    f.seek(SeekFrom::Start(off)).map_err(|e| io_err(path, e))?;
    // `rest` <= limit, so this fits in memory comfortably.
    let mut buf = Vec::with_capacity(rest as usize);
    f.take(rest)
        .read_to_end(&mut buf)
        .map_err(|e| io_err(path, e))?;
    Ok((1..buf.len())
        .find(|&p| valid_record_at(&buf[p..]))
        .map(|p| off + p as u64))
}

// -------------------------------------------------------------- rewriting

/// Atomically replaces the log at `path` with META(`last_seq`) + a PUSH per
/// entry: writes `<path>.tmp`, fsyncs it, renames it over `path`, fsyncs the
/// directory. Returns the new log opened for append, and its size.
fn rewrite(
    path: &Path,
    last_seq: u64,
    entries: &VecDeque<Entry>,
) -> Result<(File, u64), OutboxError> {
    let tmp = tmp_path(path);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp, e)),
    }
    let write_tmp = || -> io::Result<(File, u64)> {
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&tmp)?;
        let mut w = BufWriter::with_capacity(64 * 1024, &file);
        write_meta(&mut w, last_seq)?;
        let mut size = META_RECORD;
        for e in entries {
            write_push(&mut w, e)?;
            size += push_record_len(e);
        }
        w.flush()?;
        drop(w);
        file.sync_all()?;
        Ok((file, size))
    };
    let (file, size) = match write_tmp().and_then(|r| std::fs::rename(&tmp, path).map(|()| r)) {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(&tmp, e));
        }
    };
    // The rename happened: `file` is the log now, whatever follows.
    if let Err(e) = sync_dir(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot fsync the outbox directory");
    }
    Ok((file, size))
}

#[cfg(unix)]
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_path: &Path) -> io::Result<()> {
    Ok(())
}

// ------------------------------------------------------------------- tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::MemoryOutbox;
    use proptest::prelude::*;

    fn opts() -> FileOutboxOptions {
        FileOutboxOptions::default()
    }

    fn small(compact_bytes: u64) -> FileOutboxOptions {
        FileOutboxOptions {
            sync: false,
            compact_bytes,
        }
    }

    fn all(o: &impl Outbox) -> Vec<Entry> {
        o.after(0, usize::MAX)
    }

    fn seqs(o: &impl Outbox) -> Vec<u64> {
        all(o).iter().map(|e| e.seq).collect()
    }

    fn payload(i: u64, n: usize) -> Bytes {
        Bytes::from(
            (0..n)
                .map(|k| (i as usize * 31 + k) as u8)
                .collect::<Vec<u8>>(),
        )
    }

    fn file_len(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().len()
    }

    fn expect_corrupt(r: Result<FileOutbox, OutboxError>) -> u64 {
        match r {
            Err(OutboxError::Corrupt { offset, .. }) => offset,
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(o) => panic!("expected Corrupt, opened with {:?}", seqs(&o)),
        }
    }

    #[test]
    fn rebase_renumbers_durably() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.log");
        let mut o = FileOutbox::open(&path, opts()).unwrap();
        o.push(7, 1, Bytes::from_static(b"a")).unwrap();
        o.push(8, 1, Bytes::from_static(b"b")).unwrap();
        o.rebase(500).unwrap();
        assert_eq!(seqs(&o), vec![501, 502]);
        assert_eq!(o.push(9, 1, Bytes::from_static(b"c")).unwrap(), 503);
        drop(o);
        let o = FileOutbox::open(&path, opts()).unwrap();
        assert_eq!(seqs(&o), vec![501, 502, 503]);
        assert_eq!(o.last_seq(), 503);
        assert_eq!(&all(&o)[0].payload[..], b"a");
    }

    #[test]
    fn default_options() {
        let d = FileOutboxOptions::default();
        assert!(!d.sync);
        assert_eq!(d.compact_bytes, 8 * 1024 * 1024);
    }

    #[test]
    fn new_file_and_parent_dir_are_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/outbox.log");
        let o = FileOutbox::open(&path, opts()).unwrap();
        assert_eq!(o.last_seq(), 0);
        assert!(o.is_empty());
        assert_eq!(o.path(), path.as_path());
        assert_eq!(file_len(&path), META_RECORD);
        assert!(!tmp_path(&path).exists());
        drop(o);
        let o = FileOutbox::open(&path, opts()).unwrap();
        assert_eq!(o.last_seq(), 0);
    }

    #[test]
    fn empty_existing_file_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        std::fs::write(&path, b"").unwrap();
        let mut o = FileOutbox::open(&path, opts()).unwrap();
        assert_eq!(o.push(1, 2, Bytes::from_static(b"x")).unwrap(), 1);
        drop(o);
        assert_eq!(seqs(&FileOutbox::open(&path, opts()).unwrap()), vec![1]);
    }

    #[test]
    fn push_ack_remove_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut o = FileOutbox::open(&path, opts()).unwrap();
        let mut m = MemoryOutbox::default();
        for i in 1..=6u64 {
            let p = payload(i, i as usize * 3);
            assert_eq!(o.push(1000 + i, i as u8, p.clone()).unwrap(), i);
            m.push(1000 + i, i as u8, p).unwrap();
        }
        o.ack(2).unwrap();
        m.ack(2).unwrap();
        o.remove(4).unwrap();
        m.remove(4).unwrap();
        assert_eq!(all(&o), all(&m));
        drop(o);

        let mut o = FileOutbox::open(&path, opts()).unwrap();
        assert_eq!(all(&o), all(&m));
        assert_eq!(seqs(&o), vec![3, 5, 6]);
        assert_eq!(o.last_seq(), 6);
        assert_eq!(o.len(), 3);
        assert_eq!(o.after(3, 1).len(), 1);
        assert_eq!(o.after(3, 1)[0].seq, 5);
        let e = &all(&o)[0];
        assert_eq!((e.timestamp_ms, e.content_type), (1003, 3));
        assert_eq!(e.payload, payload(3, 9));
        assert_eq!(o.push(0, 0, Bytes::new()).unwrap(), 7);
        drop(o);
        let o = FileOutbox::open(&path, opts()).unwrap();
        assert_eq!(seqs(&o), vec![3, 5, 6, 7]);
        assert_eq!(o.last_seq(), 7);
        assert_eq!(all(&o)[3].payload.len(), 0);
    }

    #[test]
    fn synced_outbox_works() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let o_opts = FileOutboxOptions {
            sync: true,
            compact_bytes: 4096,
        };
        let mut o = FileOutbox::open(&path, o_opts).unwrap();
        for i in 1..=3 {
            o.push(i, 1, payload(i, 10)).unwrap();
        }
        o.ack(1).unwrap();
        o.remove(3).unwrap();
        drop(o);
        let o = FileOutbox::open(&path, o_opts).unwrap();
        assert_eq!(seqs(&o), vec![2]);
        assert_eq!(o.last_seq(), 3);
    }

    #[test]
    fn last_seq_survives_full_ack() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut o = FileOutbox::open(&path, opts()).unwrap();
        for i in 1..=5 {
            o.push(i, 1, payload(i, 20)).unwrap();
        }
        o.ack(5).unwrap();
        assert!(o.is_empty());
        drop(o);
        let mut o = FileOutbox::open(&path, opts()).unwrap();
        assert!(o.is_empty());
        assert_eq!(o.last_seq(), 5);
        assert_eq!(o.push(0, 1, Bytes::new()).unwrap(), 6);
    }

    #[test]
    fn last_seq_survives_compaction_to_meta_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        // Any log larger than 64 bytes with less than half live compacts.
        let mut o = FileOutbox::open(&path, small(64)).unwrap();
        for i in 1..=5 {
            o.push(i, 1, payload(i, 20)).unwrap();
        }
        o.ack(5).unwrap();
        assert_eq!(file_len(&path), META_RECORD, "compacted down to META");
        drop(o);
        let mut o = FileOutbox::open(&path, small(64)).unwrap();
        assert!(o.is_empty());
        assert_eq!(o.last_seq(), 5);
        assert_eq!(o.push(0, 1, Bytes::new()).unwrap(), 6);
        drop(o);
        assert_eq!(FileOutbox::open(&path, opts()).unwrap().last_seq(), 6);
    }

    #[test]
    fn no_op_ack_and_remove_append_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut o = FileOutbox::open(&path, opts()).unwrap();
        o.ack(10).unwrap();
        o.remove(3).unwrap();
        assert_eq!(file_len(&path), META_RECORD);
        o.push(0, 1, payload(1, 5)).unwrap();
        o.push(0, 1, payload(2, 5)).unwrap();
        let size = file_len(&path);
        o.ack(0).unwrap();
        o.remove(7).unwrap();
        assert_eq!(file_len(&path), size);
        // Acknowledging beyond last_seq does not move it (as MemoryOutbox).
        o.ack(100).unwrap();
        assert_eq!(o.last_seq(), 2);
        drop(o);
        let mut o = FileOutbox::open(&path, opts()).unwrap();
        assert_eq!(o.last_seq(), 2);
        assert_eq!(o.push(0, 1, Bytes::new()).unwrap(), 3);
    }

    #[test]
    fn entries_share_payload_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut o = FileOutbox::open(&path, opts()).unwrap();
        let p = payload(1, 100);
        o.push(0, 1, p.clone()).unwrap();
        assert_eq!(all(&o)[0].payload.as_ptr(), p.as_ptr());
        drop(o);
        let o = FileOutbox::open(&path, opts()).unwrap();
        let a = all(&o);
        let b = a[0].clone();
        assert_eq!(a[0].payload.as_ptr(), b.payload.as_ptr());
        assert_eq!(all(&o)[0].payload.as_ptr(), b.payload.as_ptr());
    }

    #[test]
    fn oversized_payload_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut o = FileOutbox::open(&path, opts()).unwrap();
        let big = Bytes::from(vec![0u8; MAX_PAYLOAD + 1]);
        assert!(matches!(o.push(0, 1, big), Err(OutboxError::Io { .. })));
        assert_eq!(o.last_seq(), 0);
        assert_eq!(file_len(&path), META_RECORD);
        assert_eq!(o.push(0, 1, Bytes::new()).unwrap(), 1);
    }

    /// What one operation on the log does, for the torn-tail tests.
    #[derive(Debug, Clone, Copy)]
    enum LastOp {
        Push,
        Ack,
        Remove,
    }

    /// Builds a log, then applies `last`; returns the full file bytes, the
    /// size before `last`, and the state before it.
    fn log_with_last(path: &Path, last: LastOp) -> (Vec<u8>, u64, Vec<Entry>, u64) {
        let mut o = FileOutbox::open(path, opts()).unwrap();
        for i in 1..=5 {
            o.push(i, 7, payload(i, 12)).unwrap();
        }
        o.ack(1).unwrap();
        o.remove(3).unwrap();
        let before = (file_len(path), all(&o), o.last_seq());
        match last {
            LastOp::Push => drop(o.push(99, 9, payload(9, 40)).unwrap()),
            LastOp::Ack => o.ack(4).unwrap(),
            LastOp::Remove => o.remove(5).unwrap(),
        }
        drop(o);
        let bytes = std::fs::read(path).unwrap();
        assert!(bytes.len() as u64 > before.0);
        (bytes, before.0, before.1, before.2)
    }

    #[test]
    fn torn_tail_at_every_cut_point_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        for last in [LastOp::Push, LastOp::Ack, LastOp::Remove] {
            let src = dir.path().join(format!("src-{last:?}.log"));
            let (bytes, good, state, last_seq) = log_with_last(&src, last);
            for cut in good..bytes.len() as u64 {
                let path = dir.path().join(format!("cut-{last:?}-{cut}.log"));
                std::fs::write(&path, &bytes[..cut as usize]).unwrap();
                let mut o = FileOutbox::open(&path, opts()).unwrap();
                assert_eq!(all(&o), state, "{last:?} cut at {cut}");
                assert_eq!(o.last_seq(), last_seq, "{last:?} cut at {cut}");
                assert_eq!(file_len(&path), good, "{last:?} cut at {cut}");
                let seq = o.push(5, 5, payload(77, 8)).unwrap();
                assert_eq!(seq, last_seq + 1);
                let expect = all(&o);
                drop(o);
                let o = FileOutbox::open(&path, opts()).unwrap();
                assert_eq!(all(&o), expect, "{last:?} cut at {cut}, reopened");
                assert_eq!(o.last_seq(), seq);
                drop(o);
                std::fs::remove_file(&path).unwrap();
            }
        }
    }

    /// Offsets of every record of a good log.
    fn record_offsets(bytes: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < bytes.len() {
            out.push(off);
            let len = u32::from_be_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            off += HEADER_LEN + len;
        }
        assert_eq!(off, bytes.len());
        out
    }

    #[test]
    fn flipped_byte_in_last_record_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let (mut bytes, good, state, last_seq) = log_with_last(&path, LastOp::Push);
        let last = bytes.len() - 5; // inside the payload
        bytes[last] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let o = FileOutbox::open(&path, opts()).unwrap();
        assert_eq!(all(&o), state);
        assert_eq!(o.last_seq(), last_seq);
        assert_eq!(file_len(&path), good);
    }

    #[test]
    fn flipped_byte_in_middle_record_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let (bytes, _, _, _) = log_with_last(&path, LastOp::Push);
        let offs = record_offsets(&bytes);
        let mid = offs[3]; // third PUSH
                           // A payload byte, a seq byte, the crc, and a small change of len.
        for at in [mid + HEADER_LEN + PUSH_FIXED + 2, mid + 9, mid + 5, mid + 3] {
            let mut b = bytes.clone();
            b[at] ^= 0x01;
            std::fs::write(&path, &b).unwrap();
            let off = expect_corrupt(FileOutbox::open(&path, opts()));
            assert_eq!(off, mid as u64, "flip at {at}");
            // Left untouched.
            assert_eq!(std::fs::read(&path).unwrap(), b);
        }
    }

    #[test]
    fn huge_length_in_middle_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let (bytes, _, _, _) = log_with_last(&path, LastOp::Push);
        let mid = record_offsets(&bytes)[2];
        for len in [u32::MAX, MAX_BODY as u32 + 1, MAX_BODY as u32, 0] {
            let mut b = bytes.clone();
            b[mid..mid + 4].copy_from_slice(&len.to_be_bytes());
            std::fs::write(&path, &b).unwrap();
            let off = expect_corrupt(FileOutbox::open(&path, opts()));
            assert_eq!(off, mid as u64, "len {len}");
        }
    }

    #[test]
    fn huge_length_in_last_record_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let (bytes, good, state, _) = log_with_last(&path, LastOp::Ack);
        for len in [u32::MAX, MAX_BODY as u32 + 1, 1000, 0] {
            let mut b = bytes.clone();
            b[good as usize..good as usize + 4].copy_from_slice(&len.to_be_bytes());
            std::fs::write(&path, &b).unwrap();
            let o = FileOutbox::open(&path, opts()).unwrap();
            assert_eq!(all(&o), state, "len {len}");
            assert_eq!(file_len(&path), good);
        }
    }

    #[test]
    fn trailing_zeros_are_torn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let (mut bytes, _, _, _) = log_with_last(&path, LastOp::Push);
        let good = bytes.len() as u64;
        bytes.extend_from_slice(&[0u8; 4096]);
        std::fs::write(&path, &bytes).unwrap();
        let o = FileOutbox::open(&path, opts()).unwrap();
        assert_eq!(o.last_seq(), 6);
        assert_eq!(file_len(&path), good);
    }

    #[test]
    fn not_an_outbox_log_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        for content in [
            &b"hello world, this is not an outbox"[..],
            b"abc",
            &[0u8; 64],
        ] {
            std::fs::write(&path, content).unwrap();
            assert_eq!(expect_corrupt(FileOutbox::open(&path, opts())), 0);
            assert_eq!(std::fs::read(&path).unwrap(), content, "left untouched");
        }
        // A valid record that is not META first.
        let mut b = seq_record(KIND_ACK, 1);
        std::fs::write(&path, &b).unwrap();
        assert_eq!(expect_corrupt(FileOutbox::open(&path, opts())), 0);
        // A torn META.
        b.clear();
        write_meta(&mut b, 9).unwrap();
        std::fs::write(&path, &b[..b.len() - 1]).unwrap();
        assert_eq!(expect_corrupt(FileOutbox::open(&path, opts())), 0);
        // Bad magic with a valid checksum.
        let mut body = [0u8; META_BODY];
        body[0] = KIND_META;
        body[1..9].copy_from_slice(b"NOTOURS!");
        b.clear();
        write_record(&mut b, &[&body]).unwrap();
        std::fs::write(&path, &b).unwrap();
        assert_eq!(expect_corrupt(FileOutbox::open(&path, opts())), 0);
    }

    #[test]
    fn bad_records_with_valid_checksums_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut meta = Vec::new();
        write_meta(&mut meta, 5).unwrap();
        let push = |seq| {
            let mut b = Vec::new();
            let e = Entry {
                seq,
                timestamp_ms: 0,
                content_type: 0,
                payload: Bytes::new(),
            };
            write_push(&mut b, &e).unwrap();
            b
        };
        let mut unknown = Vec::new();
        write_record(&mut unknown, &[b"Zxx"]).unwrap();
        let cases: Vec<Vec<u8>> = vec![
            [meta.clone(), push(7), push(6)].concat(), // out of order
            [meta.clone(), push(6), push(6)].concat(), // duplicate
            [meta.clone(), meta.clone()].concat(),     // second META
            [meta.clone(), unknown].concat(),          // unknown kind
        ];
        for (i, c) in cases.iter().enumerate() {
            std::fs::write(&path, c).unwrap();
            let off = expect_corrupt(FileOutbox::open(&path, opts()));
            assert!(off >= META_RECORD, "case {i}");
        }
        // META's last_seq alone carries the counter.
        std::fs::write(&path, &meta).unwrap();
        let mut o = FileOutbox::open(&path, opts()).unwrap();
        assert_eq!(o.push(0, 0, Bytes::new()).unwrap(), 6);
        // A counter at u64::MAX is an error, not an overflow.
        meta.clear();
        write_meta(&mut meta, u64::MAX).unwrap();
        std::fs::write(&path, &meta).unwrap();
        let mut o = FileOutbox::open(&path, opts()).unwrap();
        assert!(o.push(0, 0, Bytes::new()).is_err());
    }

    #[test]
    fn compaction_triggers_shrinks_and_preserves_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut o = FileOutbox::open(&path, small(4096)).unwrap();
        let mut m = MemoryOutbox::default();
        let mut max_len = 0;
        for i in 1..=200u64 {
            let p = payload(i, 100);
            o.push(i, 1, p.clone()).unwrap();
            m.push(i, 1, p).unwrap();
            if i % 10 == 0 {
                // Keep a few entries pending.
                o.ack(i - 3).unwrap();
                m.ack(i - 3).unwrap();
                o.remove(i - 1).unwrap();
                m.remove(i - 1).unwrap();
            }
            max_len = max_len.max(file_len(&path));
            assert_eq!(all(&o), all(&m));
        }
        // 200 pushes of ~126 bytes = ~25 KB without compaction.
        assert!(max_len <= 4096 + 200, "max {max_len}");
        let size = file_len(&path);
        assert!(size < 4096, "size {size}");
        drop(o);
        let o = FileOutbox::open(&path, small(4096)).unwrap();
        assert_eq!(all(&o), all(&m));
        assert_eq!(o.last_seq(), 200);
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn no_compaction_while_mostly_live() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut o = FileOutbox::open(&path, small(1024)).unwrap();
        for i in 1..=40u64 {
            o.push(i, 1, payload(i, 100)).unwrap();
        }
        let size = file_len(&path);
        assert_eq!(size, META_RECORD + 40 * (8 + 18 + 100));
        o.ack(10).unwrap(); // 30 of 40 still live
        assert_eq!(file_len(&path), size + 17);
        o.ack(25).unwrap(); // 15 of 40 live: compacts
        assert_eq!(file_len(&path), META_RECORD + 15 * (8 + 18 + 100));
        assert_eq!(o.after(0, 1)[0].seq, 26);
    }

    #[test]
    fn compaction_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut o = FileOutbox::open(&path, opts()).unwrap();
        for i in 1..=100u64 {
            o.push(i, 1, payload(i, 50)).unwrap();
        }
        o.ack(98).unwrap();
        let expect = all(&o);
        drop(o);
        let before = file_len(&path);
        // A stale temp file from an interrupted compaction is ignored.
        std::fs::write(tmp_path(&path), b"junk").unwrap();
        let o = FileOutbox::open(&path, small(4096)).unwrap();
        assert_eq!(all(&o), expect);
        let after = file_len(&path);
        assert_eq!(after, META_RECORD + 2 * (8 + 18 + 50));
        assert!(after < before);
        assert!(!tmp_path(&path).exists());
        drop(o);
        let o = FileOutbox::open(&path, opts()).unwrap();
        assert_eq!(all(&o), expect);
        assert_eq!(o.last_seq(), 100);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u64, u8, Vec<u8>),
        /// upto = last_seq - delta (clamped at 0), delta may be negative.
        Ack(i64),
        /// Picks a pending seq, or one that is not pending.
        Remove(usize),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (any::<u64>(), any::<u8>(), prop::collection::vec(any::<u8>(), 0..48))
                .prop_map(|(t, c, p)| Op::Push(t, c, p)),
            2 => (-3i64..8).prop_map(Op::Ack),
            2 => any::<usize>().prop_map(Op::Remove),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn matches_memory_outbox(
            ops in prop::collection::vec(op(), 1..60),
            compact_bytes in prop_oneof![Just(0u64), Just(300), Just(1 << 20)],
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("outbox.log");
            let o_opts = small(compact_bytes);
            let mut f = FileOutbox::open(&path, o_opts).unwrap();
            let mut m = MemoryOutbox::default();
            for op in ops {
                match op {
                    Op::Push(t, c, p) => {
                        let p = Bytes::from(p);
                        prop_assert_eq!(f.push(t, c, p.clone()).unwrap(), m.push(t, c, p).unwrap());
                    }
                    Op::Ack(delta) => {
                        let upto = (m.last_seq() as i64 - delta).max(0) as u64;
                        f.ack(upto).unwrap();
                        m.ack(upto).unwrap();
                    }
                    Op::Remove(i) => {
                        let pending = all(&m);
                        let seq = if !pending.is_empty() && i % 4 != 0 {
                            pending[i % pending.len()].seq
                        } else {
                            (m.last_seq() + 1).saturating_sub((i % 5) as u64)
                        };
                        f.remove(seq).unwrap();
                        m.remove(seq).unwrap();
                    }
                    Op::Reopen => {
                        drop(f);
                        f = FileOutbox::open(&path, o_opts).unwrap();
                    }
                }
                prop_assert_eq!(all(&f), all(&m));
                prop_assert_eq!(f.last_seq(), m.last_seq());
                prop_assert_eq!(f.len(), m.len());
            }
            drop(f);
            let f = FileOutbox::open(&path, o_opts).unwrap();
            prop_assert_eq!(all(&f), all(&m));
            prop_assert_eq!(f.last_seq(), m.last_seq());
        }

        /// Damaged files never panic: either they open (to a prefix of the
        /// history) or they are reported.
        #[test]
        fn damaged_files_never_panic(
            cut in any::<prop::sample::Index>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("outbox.log");
            let (mut bytes, _, _, _) = log_with_last(&path, LastOp::Push);
            for (at, x) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            std::fs::write(&path, &bytes).unwrap();
            match FileOutbox::open(&path, opts()) {
                Ok(mut o) => {
                    let s = o.push(0, 0, Bytes::new());
                    prop_assert!(s.is_ok() || o.last_seq() == u64::MAX);
                }
                Err(OutboxError::Corrupt { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }
    }
}
