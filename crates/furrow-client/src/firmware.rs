//! Firmware over the air (docs/protocol.md, "Firmware updates (capability
//! FIRMWARE)").
//!
//! Why it is shaped this way: a device on a bad link must be able to fetch
//! a multi-megabyte image over many short connections and restarts, and it
//! must never install a byte it has not verified. So:
//!
//! * the offer's Ed25519 signature (over the image's SHA-256, size, model
//!   and version) is checked against the key the device was built with
//!   before a single byte is asked for, and an image for another model is
//!   refused;
//! * the image is pulled by ranges, a few requests in flight, each range
//!   checked by its CRC-32 (a bad one is asked for again) and appended in
//!   order to a [`FirmwareSink`] (files in a directory by default,
//!   [`FileSink`]), which remembers how much it holds: after a reconnect, or
//!   a restart of the device process, the next offer resumes there;
//! * when every byte is held, the SHA-256 of what the sink reads back must
//!   equal the image's id, or it is thrown away; only then does the
//!   application hear [`Event::FirmwareReady`] and install it, telling the
//!   gateway how that went
//!   ([`Client::firmware_installed`](crate::Client::firmware_installed) and
//!   friends). Sink I/O is small and synchronous and runs inline in the
//!   connection task; the final SHA-256 pass reads the whole image once.
//!
//! Progress travels in the reported state (member `firmware`), which the
//! gateway's firmware jobs read. The download itself is a sans-I/O state
//! machine (`Download`: messages in, requests, reports and events out), so
//! it is tested without sockets; the client's connection loop feeds it.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use furrow_proto::{Chunk, ChunkRequest, FirmwareOffer, IMAGE_ID_LEN};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use crate::client::Event;

/// Requests kept in flight when neither side says otherwise.
pub const DEFAULT_WINDOW: u16 = 4;

/// Longest range asked for at once when neither side says otherwise: 64 KiB
/// (the gateway caps it at what a frame carries) halves the requests and
/// wake-ups of 32 KiB on both sides; a device short of memory sets less.
pub const DEFAULT_CHUNK_LEN: u32 = 64 * 1024;

/// Makes the device's [`FirmwareSink`]; called once, when the client starts.
pub type SinkFactory = Arc<dyn Fn() -> Box<dyn FirmwareSink> + Send + Sync>;

/// Firmware updates for a [`Config`](crate::Config): with one, the client
/// asks the gateway for capability FIRMWARE and takes the images it offers.
#[derive(Clone)]
pub struct FirmwareConfig {
    /// The fleet's Ed25519 firmware public key, raw 32 bytes: only images
    /// signed by its private key are downloaded.
    pub public_key: [u8; 32],
    /// This device's model: images for another are refused.
    pub model: String,
    /// The firmware version the device runs now (reported to the gateway;
    /// an offer of this version is ignored).
    pub version: String,
    /// Where downloads go (a [`FileSink`] by default).
    pub sink: SinkFactory,
    /// At most this many requests in flight (the offer's `window` may lower it).
    pub window: u16,
    /// At most this many bytes per request (the offer's `chunk_max` may lower it).
    pub chunk_len: u32,
}

impl FirmwareConfig {
    /// Firmware updates checked with `public_key`, downloaded into files in
    /// `dir` ([`FileSink`]), with the default window and chunk length.
    pub fn new(
        public_key: [u8; 32],
        model: impl Into<String>,
        version: impl Into<String>,
        dir: impl Into<PathBuf>,
    ) -> Self {
        let dir = dir.into();
        Self {
            public_key,
            model: model.into(),
            version: version.into(),
            sink: Arc::new(move || Box::new(FileSink::new(dir.clone())) as Box<dyn FirmwareSink>),
            window: DEFAULT_WINDOW,
            chunk_len: DEFAULT_CHUNK_LEN,
        }
    }

    /// Stores downloads in the application's own sink (flash partition,
    /// say) instead of files.
    pub fn with_sink(
        mut self,
        make: impl Fn() -> Box<dyn FirmwareSink> + Send + Sync + 'static,
    ) -> Self {
        self.sink = Arc::new(make);
        self
    }
}

impl fmt::Debug for FirmwareConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FirmwareConfig")
            .field("public_key", &to_hex(&self.public_key))
            .field("model", &self.model)
            .field("version", &self.version)
            .field("window", &self.window)
            .field("chunk_len", &self.chunk_len)
            .finish_non_exhaustive()
    }
}

/// The image a sink is asked to hold (from a verified offer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Its SHA-256, which is also its id.
    pub id: [u8; IMAGE_ID_LEN],
    /// The id in lowercase hex (file names, reports).
    pub hex: String,
    /// Its length in bytes.
    pub size: u64,
    /// The model it is built for.
    pub model: String,
    /// The firmware version it installs.
    pub version: String,
}

/// Storage for a download in progress. The client only ever appends in
/// order, so a sink needs nothing but "how much do I hold" to resume.
pub trait FirmwareSink: Send + 'static {
    /// Prepares to receive `image`; returns how many leading bytes of it it
    /// already holds (the resume point, at most `image.size`).
    fn open(&mut self, image: &ImageInfo) -> io::Result<u64>;
    /// Writes `data` at `offset`, which is always exactly the number of
    /// bytes held so far (appends in order).
    fn append(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Reads back everything held, in order, for verification.
    fn read_all(&mut self, f: &mut dyn FnMut(&[u8])) -> io::Result<()>;
    /// Forgets what it holds for `image` (after a failed verification).
    fn discard(&mut self, image: &ImageInfo) -> io::Result<()>;
    /// The image verified: hands it over; returns where it is.
    fn complete(&mut self, image: &ImageInfo) -> io::Result<PathBuf>;
}

/// The default sink: `<dir>/<hex>.part` while downloading, renamed to
/// `<dir>/<hex>.bin` once verified. The `.part` file's length is the resume
/// point, so a download survives reconnects and restarts of the device
/// process alike. Writes are not fsynced one by one: a tail lost to a power
/// cut is caught by the final SHA-256 check (the download then starts over).
#[derive(Debug)]
pub struct FileSink {
    dir: PathBuf,
    cur: Option<Current>,
}

#[derive(Debug)]
struct Current {
    hex: String,
    size: u64,
    held: u64,
    file: File,
    /// `file` is the finished `.bin` (found at open, or completed).
    done: bool,
}

impl FileSink {
    /// A sink writing into `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            cur: None,
        }
    }

    fn path(&self, hex: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{hex}.{ext}"))
    }

    fn current(&mut self) -> io::Result<&mut Current> {
        self.cur
            .as_mut()
            .ok_or_else(|| io::Error::other("no firmware image open"))
    }

    /// Removes partial downloads of other images: a device has room for one.
    fn remove_other_parts(&self, keep: &str) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(stem) = name.strip_suffix(".part") else {
                continue;
            };
            if stem != keep && stem.len() == 2 * IMAGE_ID_LEN && is_lower_hex(stem) {
                if let Err(e) = fs::remove_file(entry.path()) {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove a stale firmware download");
                }
            }
        }
    }
}

impl FirmwareSink for FileSink {
    fn open(&mut self, image: &ImageInfo) -> io::Result<u64> {
        self.cur = None;
        fs::create_dir_all(&self.dir)?;
        let bin = self.path(&image.hex, "bin");
        if fs::metadata(&bin).is_ok_and(|m| m.is_file() && m.len() == image.size) {
            self.cur = Some(Current {
                hex: image.hex.clone(),
                size: image.size,
                held: image.size,
                file: File::open(&bin)?,
                done: true,
            });
            return Ok(image.size);
        }
        self.remove_other_parts(&image.hex);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path(&image.hex, "part"))?;
        let mut held = file.metadata()?.len();
        if held > image.size {
            file.set_len(0)?;
            held = 0;
        }
        self.cur = Some(Current {
            hex: image.hex.clone(),
            size: image.size,
            held,
            file,
            done: false,
        });
        Ok(held)
    }

    fn append(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let cur = self.current()?;
        if cur.done || offset != cur.held || offset + data.len() as u64 > cur.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "append of {} bytes at {offset}: holding {} of {}",
                    data.len(),
                    cur.held,
                    cur.size
                ),
            ));
        }
        cur.file.seek(SeekFrom::Start(offset))?;
        cur.file.write_all(data)?;
        cur.held += data.len() as u64;
        Ok(())
    }

    fn read_all(&mut self, f: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        let cur = self.current()?;
        cur.file.seek(SeekFrom::Start(0))?;
        let mut rd = (&mut cur.file).take(cur.held);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => f(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn discard(&mut self, image: &ImageInfo) -> io::Result<()> {
        self.cur = None;
        for ext in ["part", "bin"] {
            match fs::remove_file(self.path(&image.hex, ext)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    fn complete(&mut self, image: &ImageInfo) -> io::Result<PathBuf> {
        let bin = self.path(&image.hex, "bin");
        let part = self.path(&image.hex, "part");
        let cur = self.current()?;
        if cur.hex != image.hex {
            return Err(io::Error::other("another firmware image is open"));
        }
        if !cur.done {
            // Durable before it is named finished; a `.bin` of the wrong
            // size (found at open) makes way.
            cur.file.sync_all()?;
            match fs::remove_file(&bin) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            fs::rename(&part, &bin)?;
            cur.done = true;
        }
        Ok(bin)
    }
}

/// Firmware counters, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FirmwareStats {
    /// Data bytes of every CHUNK received, good or bad, for any image.
    pub bytes_received: u64,
    /// CHUNKs whose CRC-32 (or length) was wrong and whose range was asked
    /// for again.
    pub chunks_retried: u64,
    /// Images given up on: another model, a bad signature, a SHA-256
    /// mismatch, or a storage error.
    pub refused: u64,
}

/// Why a firmware call of the application was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FirmwareError {
    /// The client was started without [`FirmwareConfig`].
    #[error("firmware updates are not configured")]
    NotConfigured,
    /// No image has been made ready ([`Event::FirmwareReady`]) yet.
    #[error("no firmware image is ready")]
    NothingReady,
}

/// What the download asks the connection to do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Output {
    /// Send this CHUNK_REQUEST.
    Request(ChunkRequest),
    /// Queue this reported-state patch (REPORT).
    Report(Value),
    /// Tell the application.
    Event(Event),
}

/// One request in flight.
#[derive(Debug, Clone, Copy)]
struct Req {
    offset: u64,
    length: u32,
    /// Its answer will be dropped: an earlier range failed, so this one
    /// cannot be appended in order; it is asked for again later.
    stale: bool,
}

/// The image being downloaded.
#[derive(Debug)]
struct Active {
    info: ImageInfo,
    chunk: u32,
    window: usize,
    /// Bytes the sink holds (contiguous from 0).
    held: u64,
    /// The next offset to ask for.
    next: u64,
    outstanding: VecDeque<Req>,
    /// Requests go out (an offer on this connection stands).
    requesting: bool,
    /// Last 10 % step reported.
    step: u8,
}

/// The image handed to the application.
#[derive(Debug)]
struct Ready {
    info: ImageInfo,
    /// Its last reported `update.state`.
    state: &'static str,
}

/// The download state machine: gateway messages in, [`Output`]s out.
pub(crate) struct Download {
    public_key: [u8; 32],
    model: String,
    /// The firmware the device runs.
    version: String,
    window: u16,
    chunk_len: u32,
    sink: Box<dyn FirmwareSink>,
    active: Option<Active>,
    ready: Option<Ready>,
    stats: FirmwareStats,
}

fn to_hex(b: &[u8]) -> String {
    use fmt::Write as _;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `held` of `size` in whole percent.
fn percent(held: u64, size: u64) -> u8 {
    if size == 0 {
        return 100;
    }
    (u128::from(held.min(size)) * 100 / u128::from(size)) as u8
}

/// The reported-state patch for an update. Absent members are sent as
/// `null`, which a merge patch removes: a `reason` or `percent` of an
/// earlier state must not linger in the reported document.
fn update_report(
    running: &str,
    info: &ImageInfo,
    state: &str,
    percent: Option<u8>,
    reason: Option<&str>,
) -> Value {
    json!({"firmware": {"version": running, "update": {
        "image": info.hex,
        "version": info.version,
        "state": state,
        "percent": percent,
        "reason": reason,
    }}})
}

impl Download {
    /// A download for `cfg`; makes its sink.
    pub(crate) fn new(cfg: &FirmwareConfig) -> Self {
        Self {
            public_key: cfg.public_key,
            model: cfg.model.clone(),
            version: cfg.version.clone(),
            window: cfg.window.max(1),
            chunk_len: cfg.chunk_len.max(1),
            sink: (cfg.sink)(),
            active: None,
            ready: None,
            stats: FirmwareStats::default(),
        }
    }

    pub(crate) fn stats(&self) -> FirmwareStats {
        self.stats
    }

    /// `{"firmware": {"version": <running>}}`.
    pub(crate) fn version_report(&self) -> Value {
        json!({"firmware": {"version": self.version}})
    }

    /// Gives up on `info`: reports it failed and tells the application.
    fn refuse(&mut self, info: &ImageInfo, reason: String, out: &mut Vec<Output>) {
        tracing::warn!(image = %info.hex, version = %info.version, %reason, "firmware refused");
        self.stats.refused += 1;
        out.push(Output::Report(update_report(
            &self.version,
            info,
            "failed",
            None,
            Some(&reason),
        )));
        out.push(Output::Event(Event::FirmwareRefused {
            image: info.hex.clone(),
            reason,
        }));
    }

    /// FIRMWARE_OFFER: check it, then start (or resume) the download.
    pub(crate) fn on_offer(&mut self, o: &FirmwareOffer) -> Vec<Output> {
        let mut out = Vec::new();
        let info = ImageInfo {
            id: o.image,
            hex: to_hex(&o.image),
            size: o.size,
            model: o.model.to_string(),
            version: o.version.to_string(),
        };
        if let Some(a) = &mut self.active {
            if a.info.id == o.image && a.requesting {
                // The same offer again on this connection: carry on.
                self.fill(&mut out);
                return out;
            }
            // An offer replaces the earlier one: its requests are void.
            a.requesting = false;
            a.outstanding.clear();
        }
        if info.model != self.model {
            let reason = format!(
                "image for model {:?}, this device is {:?}",
                info.model, self.model
            );
            self.refuse(&info, reason, &mut out);
            return out;
        }
        let msg =
            furrow_proto::firmware_signed_message(&o.image, o.size, &info.model, &info.version);
        let key =
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, self.public_key);
        if key.verify(&msg, &o.signature).is_err() {
            self.refuse(&info, "bad signature".into(), &mut out);
            return out;
        }
        if info.version == self.version {
            out.push(Output::Report(self.version_report()));
            return out;
        }
        if let Some(r) = &self.ready {
            if r.info.id == o.image && r.state != "failed" {
                // Handed over already: say again how it stands.
                out.push(Output::Report(update_report(
                    &self.version,
                    &r.info,
                    r.state,
                    None,
                    None,
                )));
                return out;
            }
        }
        let held = match self.open(&info) {
            Ok(h) => h,
            Err(e) => {
                self.active = None;
                self.refuse(&info, format!("storage: {e}"), &mut out);
                return out;
            }
        };
        let p = percent(held, info.size);
        tracing::debug!(image = %info.hex, version = %info.version, held, size = info.size, "firmware download starts");
        out.push(Output::Report(update_report(
            &self.version,
            &info,
            "downloading",
            Some(p),
            None,
        )));
        self.active = Some(Active {
            chunk: o.chunk_max.min(self.chunk_len).max(1),
            window: usize::from(o.window.min(self.window).max(1)),
            held,
            next: held,
            outstanding: VecDeque::new(),
            requesting: true,
            step: p / 10,
            info,
        });
        self.fill(&mut out);
        out
    }

    /// Opens the sink at its resume point (never past the image's end).
    fn open(&mut self, info: &ImageInfo) -> io::Result<u64> {
        let held = self.sink.open(info)?;
        if held <= info.size {
            return Ok(held);
        }
        self.sink.discard(info)?;
        match self.sink.open(info)? {
            h if h <= info.size => Ok(h),
            h => Err(io::Error::other(format!(
                "sink holds {h} bytes of a {}-byte image",
                info.size
            ))),
        }
    }

    /// Keeps the window full; verifies once every byte is held.
    fn fill(&mut self, out: &mut Vec<Output>) {
        let Some(a) = &mut self.active else { return };
        if a.held >= a.info.size {
            self.finish(out);
            return;
        }
        if !a.requesting {
            return;
        }
        while a.outstanding.len() < a.window && a.next < a.info.size {
            let length = u64::from(a.chunk).min(a.info.size - a.next) as u32;
            a.outstanding.push_back(Req {
                offset: a.next,
                length,
                stale: false,
            });
            out.push(Output::Request(ChunkRequest {
                image: a.info.id,
                offset: a.next,
                length,
            }));
            a.next += u64::from(length);
        }
    }

    /// CHUNK: check it, append it in order, ask for more.
    pub(crate) fn on_chunk(&mut self, c: &Chunk) -> Vec<Output> {
        let mut out = Vec::new();
        self.stats.bytes_received += c.data.len() as u64;
        let Some(a) = &mut self.active else {
            return out;
        };
        if a.info.id != c.image || !a.requesting {
            return out;
        }
        // Answers come in request order; one for a range not (or no longer)
        // asked for is dropped.
        let Some(pos) = a.outstanding.iter().position(|r| r.offset == c.offset) else {
            return out;
        };
        let skipped_live = a.outstanding.drain(..pos).any(|r| !r.stale);
        let Some(req) = a.outstanding.pop_front() else {
            return out;
        };
        let intact = c.data.len() == req.length as usize && crc32fast::hash(&c.data) == c.crc32;
        if !req.stale && !skipped_live && intact && c.offset == a.held {
            if let Err(e) = self.sink.append(c.offset, &c.data) {
                let info = a.info.clone();
                self.active = None;
                self.refuse(&info, format!("storage: {e}"), &mut out);
                return out;
            }
            a.held += c.data.len() as u64;
            let p = percent(a.held, a.info.size);
            if p / 10 > a.step && a.held < a.info.size {
                a.step = p / 10;
                out.push(Output::Report(update_report(
                    &self.version,
                    &a.info,
                    "downloading",
                    Some(p),
                    None,
                )));
            }
        } else if !req.stale || skipped_live {
            // A range the sink needs next failed: what is in flight after it
            // cannot be appended in order; drop it and ask again from here.
            if !intact {
                self.stats.chunks_retried += 1;
                tracing::debug!(offset = c.offset, "firmware chunk damaged: asking again");
            }
            for r in &mut a.outstanding {
                r.stale = true;
            }
            a.next = a.held;
        }
        self.fill(&mut out);
        out
    }

    /// Every byte is held: check the SHA-256, hand the image over.
    fn finish(&mut self, out: &mut Vec<Output>) {
        let Some(a) = self.active.take() else { return };
        let info = a.info;
        out.push(Output::Report(update_report(
            &self.version,
            &info,
            "downloaded",
            Some(100),
            None,
        )));
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        if let Err(e) = self.sink.read_all(&mut |b| ctx.update(b)) {
            self.refuse(&info, format!("storage: {e}"), out);
            return;
        }
        if ctx.finish().as_ref() != info.id.as_slice() {
            if let Err(e) = self.sink.discard(&info) {
                tracing::warn!(error = %e, "cannot discard a damaged firmware image");
            }
            self.refuse(&info, "sha256 mismatch".into(), out);
            return;
        }
        out.push(Output::Report(update_report(
            &self.version,
            &info,
            "verified",
            None,
            None,
        )));
        match self.sink.complete(&info) {
            Ok(path) => {
                tracing::debug!(image = %info.hex, version = %info.version, path = %path.display(), "firmware verified");
                out.push(Output::Event(Event::FirmwareReady {
                    image: info.hex.clone(),
                    version: info.version.clone(),
                    path,
                }));
                self.ready = Some(Ready {
                    info,
                    state: "verified",
                });
            }
            Err(e) => self.refuse(&info, format!("storage: {e}"), out),
        }
    }

    /// FIRMWARE_CANCEL: stop asking; what is held stays for a later offer.
    pub(crate) fn on_cancel(&mut self, image: &[u8; IMAGE_ID_LEN]) {
        if let Some(a) = &mut self.active {
            if a.info.id == *image && a.requesting {
                tracing::debug!(image = %a.info.hex, held = a.held, "firmware offer withdrawn");
                a.requesting = false;
                a.outstanding.clear();
                a.next = a.held;
            }
        }
    }

    /// The connection ended: requests in flight are lost; the next
    /// connection waits for the gateway's offer.
    pub(crate) fn on_disconnect(&mut self) {
        if let Some(a) = &mut self.active {
            a.requesting = false;
            a.outstanding.clear();
            a.next = a.held;
        }
    }

    /// The application is installing the ready image.
    pub(crate) fn installing(&mut self) -> Result<Value, FirmwareError> {
        let r = self.ready.as_mut().ok_or(FirmwareError::NothingReady)?;
        r.state = "installing";
        Ok(update_report(
            &self.version,
            &r.info,
            "installing",
            None,
            None,
        ))
    }

    /// The device runs `version` now.
    pub(crate) fn installed(&mut self, version: &str) -> Value {
        self.version = version.to_owned();
        match &mut self.ready {
            Some(r) => {
                r.state = "installed";
                json!({"firmware": {"version": version, "update": {
                    "image": r.info.hex,
                    "version": version,
                    "state": "installed",
                    "percent": null,
                    "reason": null,
                }}})
            }
            None => self.version_report(),
        }
    }

    /// Installing the ready image failed.
    pub(crate) fn failed(&mut self, reason: &str) -> Result<Value, FirmwareError> {
        let r = self.ready.as_mut().ok_or(FirmwareError::NothingReady)?;
        r.state = "failed";
        Ok(update_report(
            &self.version,
            &r.info,
            "failed",
            None,
            Some(reason),
        ))
    }
}

/// The latest firmware report waiting for the outbox. Each report carries
/// the whole `firmware` member, so a newer one supersedes an older one not
/// yet queued: one slot bounds the queue, and the connection loop posts
/// without ever waiting for outbox space.
pub(crate) struct ReportSlot {
    slot: Mutex<(u64, Option<(u64, Value)>)>,
    /// Woken when a report is posted (a permit is kept if nobody waits).
    pub(crate) wake: Notify,
    /// The generation of the newest report in the outbox.
    pub(crate) queued: watch::Sender<u64>,
}

impl ReportSlot {
    pub(crate) fn new() -> Self {
        Self {
            slot: Mutex::new((0, None)),
            wake: Notify::new(),
            queued: watch::channel(0).0,
        }
    }

    /// Replaces the waiting report; returns its generation.
    pub(crate) fn post(&self, patch: Value) -> u64 {
        let gen = {
            let mut s = self.slot.lock().unwrap_or_else(|p| p.into_inner());
            s.0 += 1;
            s.1 = Some((s.0, patch));
            s.0
        };
        self.wake.notify_one();
        gen
    }

    /// Takes the waiting report.
    pub(crate) fn take(&self) -> Option<(u64, Value)> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).1.take()
    }

    /// Reports up to `gen` are in the outbox (or were dropped for good).
    pub(crate) fn mark_queued(&self, gen: u64) {
        self.queued.send_if_modified(|v| {
            let raise = gen > *v;
            if raise {
                *v = gen;
            }
            raise
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn keypair() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn public(k: &Ed25519KeyPair) -> [u8; 32] {
        k.public_key().as_ref().try_into().unwrap()
    }

    fn sha256(b: &[u8]) -> [u8; 32] {
        ring::digest::digest(&ring::digest::SHA256, b)
            .as_ref()
            .try_into()
            .unwrap()
    }

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// An offer of `data` signed by `key` (for `id`, normally its SHA-256).
    fn offer(
        key: &Ed25519KeyPair,
        id: [u8; 32],
        size: u64,
        model: &str,
        version: &str,
    ) -> FirmwareOffer {
        let msg = furrow_proto::firmware_signed_message(&id, size, model, version);
        FirmwareOffer {
            image: id,
            size,
            chunk_max: 1000,
            window: 4,
            signature: key.sign(&msg).as_ref().try_into().unwrap(),
            model: model.into(),
            version: version.into(),
        }
    }

    /// A sink in memory, shared with the test.
    #[derive(Clone, Default)]
    struct MemSink(Arc<Mutex<Vec<u8>>>);

    impl FirmwareSink for MemSink {
        fn open(&mut self, _: &ImageInfo) -> io::Result<u64> {
            Ok(self.0.lock().unwrap().len() as u64)
        }
        fn append(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            let mut v = self.0.lock().unwrap();
            assert_eq!(offset, v.len() as u64, "appends in order");
            v.extend_from_slice(data);
            Ok(())
        }
        fn read_all(&mut self, f: &mut dyn FnMut(&[u8])) -> io::Result<()> {
            f(&self.0.lock().unwrap());
            Ok(())
        }
        fn discard(&mut self, _: &ImageInfo) -> io::Result<()> {
            self.0.lock().unwrap().clear();
            Ok(())
        }
        fn complete(&mut self, _: &ImageInfo) -> io::Result<PathBuf> {
            Ok(PathBuf::from("mem"))
        }
    }

    fn config(key: &Ed25519KeyPair, sink: MemSink) -> FirmwareConfig {
        FirmwareConfig::new(public(key), "p7", "1.0.0", "unused")
            .with_sink(move || Box::new(sink.clone()))
    }

    /// A gateway in a loop: answers requests in order from `data`; `damage`
    /// may spoil a chunk (by its index among all answers); stops after
    /// `limit` answers. Returns every output seen.
    fn serve(
        dl: &mut Download,
        first: Vec<Output>,
        data: &[u8],
        limit: usize,
        mut damage: impl FnMut(usize, &mut Vec<u8>),
    ) -> Vec<Output> {
        let mut queue: VecDeque<ChunkRequest> = VecDeque::new();
        let mut seen = Vec::new();
        let mut answered = 0;
        let mut take = |outs: Vec<Output>, queue: &mut VecDeque<ChunkRequest>| {
            for o in outs {
                if let Output::Request(r) = &o {
                    assert!(r.length >= 1 && r.offset + u64::from(r.length) <= data.len() as u64);
                    queue.push_back(*r);
                }
                seen.push(o);
            }
        };
        take(first, &mut queue);
        while let Some(r) = queue.pop_front() {
            if answered == limit {
                break;
            }
            assert!(queue.len() < 4, "at most window requests outstanding");
            let range = r.offset as usize..(r.offset + u64::from(r.length)) as usize;
            let mut bytes = data[range].to_vec();
            let crc = crc32fast::hash(&bytes);
            damage(answered, &mut bytes);
            answered += 1;
            let outs = dl.on_chunk(&Chunk {
                image: r.image,
                offset: r.offset,
                crc32: crc,
                data: Bytes::from(bytes),
            });
            take(outs, &mut queue);
        }
        seen
    }

    fn reports(outs: &[Output]) -> Vec<&Value> {
        outs.iter()
            .filter_map(|o| match o {
                Output::Report(v) => Some(v),
                _ => None,
            })
            .collect()
    }

    fn states(outs: &[Output]) -> Vec<String> {
        reports(outs)
            .iter()
            .filter_map(|v| v["firmware"]["update"]["state"].as_str().map(str::to_owned))
            .collect()
    }

    /// A download of a fresh image of `len` bytes offered (signed by the
    /// device's key) as version 1.1.0 for model p7: its sink, the download,
    /// the image, the offer and what the offer made the download do.
    fn offered(len: usize) -> (MemSink, Download, Vec<u8>, FirmwareOffer, Vec<Output>) {
        let key = keypair();
        let sink = MemSink::default();
        let mut dl = Download::new(&config(&key, sink.clone()));
        let data = image(len);
        let o = offer(&key, sha256(&data), data.len() as u64, "p7", "1.1.0");
        let first = dl.on_offer(&o);
        (sink, dl, data, o, first)
    }

    fn ready(outs: &[Output]) -> bool {
        outs.iter()
            .any(|o| matches!(o, Output::Event(Event::FirmwareReady { .. })))
    }

    #[test]
    fn a_signed_image_downloads_verifies_and_is_handed_over() {
        let (sink, mut dl, data, _, first) = offered(10_500);
        let outs = serve(&mut dl, first, &data, usize::MAX, |_, _| {});
        assert_eq!(*sink.0.lock().unwrap(), data);
        let s = states(&outs);
        assert_eq!(s.first().map(String::as_str), Some("downloading"));
        assert_eq!(&s[s.len() - 2..], ["downloaded", "verified"]);
        // The start and at most one report per 10 % step.
        assert!(s.iter().filter(|s| *s == "downloading").count() <= 11);
        let first_report = reports(&outs)[0];
        assert_eq!(
            *first_report,
            json!({"firmware": {"version": "1.0.0", "update": {"image": to_hex(&sha256(&data)),
                "version": "1.1.0", "state": "downloading", "percent": 0, "reason": null}}})
        );
        assert!(outs.iter().any(|o| matches!(o, Output::Event(Event::FirmwareReady { version, .. }) if version == "1.1.0")));
        assert_eq!(dl.stats().bytes_received, data.len() as u64);
        assert_eq!(dl.stats().chunks_retried, 0);
        // The application installs it.
        assert_eq!(
            dl.installing().unwrap()["firmware"]["update"]["state"],
            "installing"
        );
        let done = dl.installed("1.1.0");
        assert_eq!(done["firmware"]["version"], "1.1.0");
        assert_eq!(done["firmware"]["update"]["state"], "installed");
        assert_eq!(
            dl.version_report(),
            json!({"firmware": {"version": "1.1.0"}})
        );
    }

    #[test]
    fn an_image_signed_by_another_key_or_for_another_model_is_refused() {
        let key = keypair();
        let other = keypair();
        let sink = MemSink::default();
        let mut dl = Download::new(&config(&key, sink.clone()));
        let data = image(100);
        let id = sha256(&data);
        // The right key verifies.
        let good = offer(&key, id, 100, "p7", "1.1.0");
        let msg = furrow_proto::firmware_signed_message(&id, 100, "p7", "1.1.0");
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public(&key))
            .verify(&msg, &good.signature)
            .unwrap();

        let outs = dl.on_offer(&offer(&other, id, 100, "p7", "1.1.0"));
        assert!(!outs.iter().any(|o| matches!(o, Output::Request(_))));
        assert_eq!(states(&outs), ["failed"]);
        assert_eq!(
            reports(&outs)[0]["firmware"]["update"]["reason"],
            "bad signature"
        );
        assert!(outs.iter().any(|o| matches!(o, Output::Event(Event::FirmwareRefused { reason, .. }) if reason == "bad signature")));

        // A valid signature over another version is not this offer's.
        let mut forged = offer(&key, id, 100, "p7", "1.1.0");
        forged.version = "9.9.9".into();
        assert_eq!(states(&dl.on_offer(&forged)), ["failed"]);

        let outs = dl.on_offer(&offer(&key, id, 100, "p8", "1.1.0"));
        assert_eq!(states(&outs), ["failed"]);
        assert_eq!(dl.stats().refused, 3);
        assert!(sink.0.lock().unwrap().is_empty());

        // The right key and model go ahead.
        let outs = dl.on_offer(&good);
        assert!(outs.iter().any(|o| matches!(o, Output::Request(_))));
    }

    #[test]
    fn an_offer_of_the_running_version_is_ignored() {
        let key = keypair();
        let mut dl = Download::new(&config(&key, MemSink::default()));
        let data = image(100);
        let outs = dl.on_offer(&offer(&key, sha256(&data), 100, "p7", "1.0.0"));
        assert_eq!(
            outs,
            [Output::Report(json!({"firmware": {"version": "1.0.0"}}))]
        );
    }

    #[test]
    fn a_damaged_chunk_is_fetched_again_and_the_image_is_bit_identical() {
        let (sink, mut dl, data, _, first) = offered(20_000);
        let outs = serve(&mut dl, first, &data, usize::MAX, |i, b| {
            if i == 5 {
                b[17] ^= 0x40;
            }
        });
        assert!(ready(&outs));
        assert_eq!(*sink.0.lock().unwrap(), data);
        let s = dl.stats();
        assert_eq!(s.chunks_retried, 1);
        // The damaged range and the three in flight behind it, again.
        assert_eq!(s.bytes_received, data.len() as u64 + 4 * 1000);
        // Chunk 5 (offset 5000) was asked for twice.
        let asked = outs
            .iter()
            .filter(|o| matches!(o, Output::Request(r) if r.offset == 5000))
            .count();
        assert_eq!(asked, 2);
    }

    #[test]
    fn after_a_disconnect_the_next_offer_resumes_where_the_download_stopped() {
        let (sink, mut dl, data, o, first) = offered(50_000);
        let outs = serve(&mut dl, first, &data, 20, |_, _| {});
        assert!(!ready(&outs));
        assert_eq!(sink.0.lock().unwrap().len(), 20_000);
        dl.on_disconnect();
        // A chunk of the old connection arriving late is ignored.
        assert!(dl
            .on_chunk(&Chunk {
                image: o.image,
                offset: 20_000,
                crc32: 0,
                data: Bytes::from_static(b"x"),
            })
            .is_empty());

        let again = dl.on_offer(&o);
        let resumed_at = again.iter().find_map(|x| match x {
            Output::Request(r) => Some(r.offset),
            _ => None,
        });
        assert_eq!(resumed_at, Some(20_000));
        assert_eq!(reports(&again)[0]["firmware"]["update"]["percent"], 40);
        let outs = serve(&mut dl, again, &data, usize::MAX, |_, _| {});
        assert!(ready(&outs));
        assert_eq!(*sink.0.lock().unwrap(), data);
        assert!(dl.stats().bytes_received < data.len() as u64 * 3 / 2);
    }

    #[test]
    fn a_cancelled_offer_stops_requests_and_a_later_one_resumes() {
        let (sink, mut dl, data, o, first) = offered(10_000);
        serve(&mut dl, first, &data, 3, |_, _| {});
        dl.on_cancel(&o.image);
        // An answer still in flight after the cancel is not appended.
        let late = Chunk {
            image: o.image,
            offset: 3000,
            crc32: crc32fast::hash(&data[3000..4000]),
            data: Bytes::copy_from_slice(&data[3000..4000]),
        };
        assert!(dl.on_chunk(&late).is_empty());
        assert_eq!(sink.0.lock().unwrap().len(), 3000);
        let again = dl.on_offer(&o);
        assert!(matches!(again.get(1), Some(Output::Request(r)) if r.offset == 3000));
        assert!(ready(&serve(&mut dl, again, &data, usize::MAX, |_, _| {})));
    }

    #[test]
    fn an_image_whose_sha256_does_not_match_is_discarded() {
        let key = keypair();
        let sink = MemSink::default();
        let mut dl = Download::new(&config(&key, sink.clone()));
        let data = image(5000);
        let mut wrong = data.clone();
        wrong[4321] ^= 1;
        // Signed for `data`, but the gateway serves `wrong` (good CRCs).
        let first = dl.on_offer(&offer(&key, sha256(&data), 5000, "p7", "1.1.0"));
        let outs = serve(&mut dl, first, &wrong, usize::MAX, |_, _| {});
        assert!(!ready(&outs));
        assert_eq!(states(&outs).last().map(String::as_str), Some("failed"));
        assert_eq!(
            reports(&outs).last().unwrap()["firmware"]["update"]["reason"],
            "sha256 mismatch"
        );
        assert!(!states(&outs).contains(&"verified".to_owned()));
        assert!(sink.0.lock().unwrap().is_empty(), "discarded");
        assert_eq!(dl.stats().refused, 1);
        assert_eq!(dl.failed("x"), Err(FirmwareError::NothingReady));
    }

    #[test]
    fn the_file_sink_resumes_across_a_restart_and_keeps_the_verified_image() {
        let dir = tempfile::tempdir().unwrap();
        let key = keypair();
        let cfg = FirmwareConfig::new(public(&key), "p7", "1.0.0", dir.path());
        let data = image(30_000);
        let id = sha256(&data);
        let hex = to_hex(&id);
        let o = offer(&key, id, data.len() as u64, "p7", "1.1.0");
        {
            let mut dl = Download::new(&cfg);
            let first = dl.on_offer(&o);
            serve(&mut dl, first, &data, 12, |_, _| {});
        } // the device process stops
        let part = dir.path().join(format!("{hex}.part"));
        assert_eq!(fs::metadata(&part).unwrap().len(), 12_000);

        let mut dl = Download::new(&cfg);
        let first = dl.on_offer(&o);
        assert!(matches!(first.get(1), Some(Output::Request(r)) if r.offset == 12_000));
        let outs = serve(&mut dl, first, &data, usize::MAX, |_, _| {});
        let bin = dir.path().join(format!("{hex}.bin"));
        assert!(outs.iter().any(
            |o| matches!(o, Output::Event(Event::FirmwareReady { path, .. }) if *path == bin)
        ));
        assert_eq!(fs::read(&bin).unwrap(), data);
        assert!(!part.exists());
        assert_eq!(dl.stats().bytes_received, 18_000);

        // A restart after the image was verified: it is checked again, not fetched.
        let mut dl = Download::new(&cfg);
        let outs = dl.on_offer(&o);
        assert!(!outs.iter().any(|o| matches!(o, Output::Request(_))));
        assert!(ready(&outs));
        // Offered again on the same run: reported, not handed over twice.
        let outs = dl.on_offer(&o);
        assert!(!ready(&outs));
        assert_eq!(states(&outs), ["verified"]);
    }

    #[test]
    fn the_file_sink_drops_other_partial_downloads_and_an_overlong_part() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(format!("{}.part", "ab".repeat(32)));
        fs::write(&stale, b"old").unwrap();
        let info = ImageInfo {
            id: [1; 32],
            hex: to_hex(&[1; 32]),
            size: 4,
            model: "p7".into(),
            version: "1".into(),
        };
        fs::write(dir.path().join(format!("{}.part", info.hex)), b"toolong").unwrap();
        let mut sink = FileSink::new(dir.path());
        assert_eq!(sink.open(&info).unwrap(), 0);
        assert!(!stale.exists());
        sink.append(0, b"ab").unwrap();
        assert!(sink.append(0, b"ab").is_err(), "appends only at the end");
        sink.append(2, b"cd").unwrap();
        let mut all = Vec::new();
        sink.read_all(&mut |b| all.extend_from_slice(b)).unwrap();
        assert_eq!(all, b"abcd");
    }

    #[test]
    fn the_report_slot_keeps_only_the_newest() {
        let slot = ReportSlot::new();
        slot.post(json!({"a": 1}));
        let gen = slot.post(json!({"a": 2}));
        assert_eq!(slot.take(), Some((gen, json!({"a": 2}))));
        assert_eq!(slot.take(), None);
    }
}
