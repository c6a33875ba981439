//! Power loss: the store runs on an SQLite VFS that keeps every write in
//! memory until the file is synced, the way SQLite's own crash tests do
//! (`test6.c`'s crash VFS): only what `xSync` made durable reaches the
//! "disk". At a seeded, random write or sync the power goes: it and every
//! later write fail, and all that was not synced is lost. The durable
//! files are then opened as a new store (the tail rebuilt, the log
//! recovered) and checked, for 12 seeds:
//!
//! - every reading whose append returned (what the gateway ACKs) is there;
//! - each device holds exactly seqs 1..=last_seq, with last_seq between
//!   its highest acknowledged and its highest sent seq: nothing twice,
//!   no gap;
//! - the store takes the device's next readings after last_seq.
//!
//! Seals run constantly (tiny thresholds), so the power also goes in the
//! middle of seal rounds and checkpoints.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use furrow::store::prelude::*;
use furrow::store::sqlite::{LogOptions, SqliteOptions, SqliteStore};
use furrow::store::{Batch, TelemetryRange, TelemetryRecord};
use rand::{Rng, SeedableRng};
use rusqlite::ffi;

const VFS_NAME: &CStr = c"furrow-lossy";

/// One file's bytes: what reads see, and what survives a power loss.
#[derive(Default)]
struct Image {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Byte ranges written since the last sync.
    dirty: Vec<(usize, usize)>,
}

/// Every shimmed file by path (several connections share one file).
fn files() -> &'static Mutex<HashMap<String, Arc<Mutex<Image>>>> {
    static FILES: OnceLock<Mutex<HashMap<String, Arc<Mutex<Image>>>>> = OnceLock::new();
    FILES.get_or_init(Default::default)
}

static CRASHED: AtomicBool = AtomicBool::new(false);
static OPS: AtomicU64 = AtomicU64::new(0);
static CRASH_AT: AtomicU64 = AtomicU64::new(u64::MAX);
static REAL_VFS: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(std::ptr::null_mut());

/// Our file: SQLite's header, then the real VFS's file right after it.
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    /// `Arc::into_raw` of the shared image; null for files passed through
    /// (temporary files have no name).
    image: *const Mutex<Image>,
}

const REAL_OFFSET: usize = std::mem::size_of::<ShimFile>().next_multiple_of(16);

fn lock(m: &Mutex<Image>) -> std::sync::MutexGuard<'_, Image> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a write or sync of a durable file; true (and from then on
/// [`CRASHED`]) when the power goes at this one.
fn power_goes() -> bool {
    if OPS.fetch_add(1, Ordering::SeqCst) + 1 >= CRASH_AT.load(Ordering::SeqCst) {
        CRASHED.store(true, Ordering::SeqCst);
    }
    CRASHED.load(Ordering::SeqCst)
}

// SAFETY (for every function below): SQLite calls these with the file it
// gave to `x_open`, which `x_open` laid out as a `ShimFile` followed by the
// real VFS's file; `real` then points into that same allocation and is
// valid until `x_close`, and `image` holds one `Arc` reference until then.
// Buffers come from SQLite with the lengths it passes.

unsafe fn real(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    (*(f as *mut ShimFile)).real
}

unsafe fn methods(f: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    &*(*real(f)).pMethods
}

unsafe fn image<'a>(f: *mut ffi::sqlite3_file) -> Option<&'a Mutex<Image>> {
    (*(f as *mut ShimFile)).image.as_ref()
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    let rc = (methods(f).xClose.expect("xClose"))(real(f));
    let shim = f as *mut ShimFile;
    if !(*shim).image.is_null() {
        drop(Arc::from_raw((*shim).image));
        (*shim).image = std::ptr::null();
    }
    rc
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amt: c_int,
    off: i64,
) -> c_int {
    let Some(img) = image(f) else {
        return (methods(f).xRead.expect("xRead"))(real(f), buf, amt, off);
    };
    let g = lock(img);
    let out = std::slice::from_raw_parts_mut(buf as *mut u8, amt as usize);
    let off = off as usize;
    let n = g.current.len().saturating_sub(off).min(out.len());
    if n > 0 {
        out[..n].copy_from_slice(&g.current[off..off + n]);
    }
    if n < out.len() {
        out[n..].fill(0);
        return ffi::SQLITE_IOERR_SHORT_READ;
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amt: c_int,
    off: i64,
) -> c_int {
    if CRASHED.load(Ordering::SeqCst) {
        return ffi::SQLITE_IOERR_WRITE;
    }
    let Some(img) = image(f) else {
        return (methods(f).xWrite.expect("xWrite"))(real(f), buf, amt, off);
    };
    if power_goes() {
        return ffi::SQLITE_IOERR_WRITE;
    }
    let mut g = lock(img);
    let data = std::slice::from_raw_parts(buf as *const u8, amt as usize);
    let (a, b) = (off as usize, off as usize + data.len());
    if g.current.len() < b {
        g.current.resize(b, 0);
    }
    g.current[a..b].copy_from_slice(data);
    g.dirty.push((a, b));
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    if CRASHED.load(Ordering::SeqCst) {
        return ffi::SQLITE_IOERR_TRUNCATE;
    }
    let Some(img) = image(f) else {
        return (methods(f).xTruncate.expect("xTruncate"))(real(f), size);
    };
    lock(img).current.truncate(size as usize);
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    if CRASHED.load(Ordering::SeqCst) {
        return ffi::SQLITE_IOERR_FSYNC;
    }
    let Some(img) = image(f) else {
        return (methods(f).xSync.expect("xSync"))(real(f), flags);
    };
    if power_goes() {
        // Before this sync completes: what it would have made durable is
        // lost with everything after it.
        return ffi::SQLITE_IOERR_FSYNC;
    }
    let mut g = lock(img);
    let len = g.current.len();
    let Image {
        current,
        durable,
        dirty,
    } = &mut *g;
    durable.resize(len, 0);
    for (a, b) in dirty.drain(..) {
        let (a, b) = (a.min(len), b.min(len));
        durable[a..b].copy_from_slice(&current[a..b]);
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    let Some(img) = image(f) else {
        return (methods(f).xFileSize.expect("xFileSize"))(real(f), size);
    };
    *size = lock(img).current.len() as i64;
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    (methods(f).xLock.expect("xLock"))(real(f), l)
}
unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    (methods(f).xUnlock.expect("xUnlock"))(real(f), l)
}
unsafe extern "C" fn x_check_reserved(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    (methods(f).xCheckReservedLock.expect("xCheckReservedLock"))(real(f), out)
}
unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    (methods(f).xFileControl.expect("xFileControl"))(real(f), op, arg)
}
unsafe extern "C" fn x_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    (methods(f).xSectorSize.expect("xSectorSize"))(real(f))
}
unsafe extern "C" fn x_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    (methods(f)
        .xDeviceCharacteristics
        .expect("xDeviceCharacteristics"))(real(f))
}
unsafe extern "C" fn x_shm_map(
    f: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    (methods(f).xShmMap.expect("xShmMap"))(real(f), page, size, extend, out)
}
unsafe extern "C" fn x_shm_lock(
    f: *mut ffi::sqlite3_file,
    off: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    (methods(f).xShmLock.expect("xShmLock"))(real(f), off, n, flags)
}
unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    (methods(f).xShmBarrier.expect("xShmBarrier"))(real(f))
}
unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    (methods(f).xShmUnmap.expect("xShmUnmap"))(real(f), delete)
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 2, // WAL needs shared memory; no memory-mapped reads
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: None,
    xUnfetch: None,
};

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    f: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real_vfs = REAL_VFS.load(Ordering::SeqCst);
    let shim = f as *mut ShimFile;
    let real_file = (f as *mut u8).add(REAL_OFFSET) as *mut ffi::sqlite3_file;
    (*shim).base.pMethods = std::ptr::null();
    (*shim).real = real_file;
    (*shim).image = std::ptr::null();
    let rc = ((*real_vfs).xOpen.expect("xOpen"))(real_vfs, name, real_file, flags, out_flags);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    let durable_kinds =
        ffi::SQLITE_OPEN_MAIN_DB | ffi::SQLITE_OPEN_WAL | ffi::SQLITE_OPEN_MAIN_JOURNAL;
    if !name.is_null() && flags & durable_kinds != 0 {
        let path = CStr::from_ptr(name).to_string_lossy().into_owned();
        let mut all = files().lock().unwrap_or_else(|p| p.into_inner());
        let img = all.entry(path.clone()).or_insert_with(|| {
            let bytes = std::fs::read(&path).unwrap_or_default();
            Arc::new(Mutex::new(Image {
                current: bytes.clone(),
                durable: bytes,
                dirty: Vec::new(),
            }))
        });
        (*shim).image = Arc::into_raw(Arc::clone(img));
    }
    (*shim).base.pMethods = &METHODS;
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_delete(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    if CRASHED.load(Ordering::SeqCst) {
        return ffi::SQLITE_IOERR_DELETE;
    }
    let path = CStr::from_ptr(name).to_string_lossy().into_owned();
    files()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&path);
    let real_vfs = REAL_VFS.load(Ordering::SeqCst);
    ((*real_vfs).xDelete.expect("xDelete"))(real_vfs, name, sync_dir)
}

/// Registers the VFS once: a copy of the default one with our open,
/// delete and file size.
fn register() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find(NULL) returns the default VFS, which
        // lives for the whole process; the copy is leaked, so it lives as
        // long; registration happens once.
        unsafe {
            let real = ffi::sqlite3_vfs_find(std::ptr::null());
            assert!(!real.is_null(), "no default SQLite VFS");
            REAL_VFS.store(real, Ordering::SeqCst);
            let mut vfs: ffi::sqlite3_vfs = std::ptr::read(real);
            vfs.zName = VFS_NAME.as_ptr();
            vfs.szOsFile = (REAL_OFFSET + (*real).szOsFile as usize) as c_int;
            vfs.xOpen = Some(x_open);
            vfs.xDelete = Some(x_delete);
            vfs.pNext = std::ptr::null_mut();
            let rc = ffi::sqlite3_vfs_register(Box::leak(Box::new(vfs)), 0);
            assert_eq!(rc, ffi::SQLITE_OK, "sqlite3_vfs_register");
        }
    });
}

/// Writes each shimmed file's durable bytes under `dest` (same file names).
fn materialize(src: &Path, dest: &Path) {
    let all = files().lock().unwrap_or_else(|p| p.into_inner());
    for (path, img) in all.iter() {
        let p = PathBuf::from(path);
        if p.parent() != Some(src) {
            continue;
        }
        let name = p.file_name().expect("a file name");
        std::fs::write(dest.join(name), &lock(img).durable).expect("write durable image");
    }
}

fn options(vfs: Option<&str>) -> SqliteOptions {
    SqliteOptions {
        vfs: vfs.map(str::to_owned),
        busy_timeout: Duration::from_millis(500),
        log: LogOptions {
            seal_rows: 40,
            seal_after_ms: 5,
            // One device per slice: power is lost between slices too.
            slice_budget: Duration::ZERO,
            slice_step: 1,
            ..LogOptions::default()
        },
        ..SqliteOptions::default()
    }
}

const DEVICES: usize = 6;

async fn one_seed(seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    files().lock().unwrap_or_else(|p| p.into_inner()).clear();
    CRASHED.store(false, Ordering::SeqCst);
    OPS.store(0, Ordering::SeqCst);
    CRASH_AT.store(u64::MAX, Ordering::SeqCst);

    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("furrow.db"), options(Some("furrow-lossy")))
        .expect("open on the lossy VFS");
    let mut keys = Vec::new();
    for d in 0..DEVICES {
        let id = format!("p{d}");
        store.create_device(&id, [3; 32]).await.unwrap();
        keys.push(store.device_auth(&id).await.unwrap().unwrap().key);
    }
    // Provisioning is durable; the power goes somewhere in what follows.
    let base = OPS.load(Ordering::SeqCst);
    CRASH_AT.store(base + rng.gen_range(5..1_500), Ordering::SeqCst);
    let (mut sent, mut acked) = ([0u64; DEVICES], [0u64; DEVICES]);
    for _ in 0..5_000 {
        let mut records = Vec::new();
        let mut top = [0u64; DEVICES];
        for _ in 0..rng.gen_range(1..30) {
            let d = rng.gen_range(0..DEVICES);
            sent[d] += 1;
            top[d] = sent[d];
            records.push(TelemetryRecord {
                device: keys[d],
                seq: sent[d],
                timestamp_ms: 1_000 + sent[d],
                received_ms: 1_000 + sent[d],
                content_type: 1,
                payload: Bytes::from(format!("[{}]", sent[d])),
            });
        }
        let batch = Batch {
            records,
            rejections: vec![],
            reports: Vec::new(),
        };
        if store.append(Arc::new(batch)).await.is_err() {
            break; // the power went
        }
        for d in 0..DEVICES {
            acked[d] = acked[d].max(top[d]);
        }
        if rng.gen_bool(0.2) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    assert!(
        CRASHED.load(Ordering::SeqCst),
        "seed {seed}: the power never went"
    );
    drop(store);
    // Let the store's threads meet the dead disk and stop.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let after = tempfile::tempdir().unwrap();
    materialize(dir.path(), after.path());
    let store = SqliteStore::open(after.path().join("furrow.db"), options(None))
        .unwrap_or_else(|e| panic!("seed {seed}: the durable files do not open: {e}"));
    let all = TelemetryRange {
        to_seq: u64::MAX,
        ..TelemetryRange::default()
    };
    for d in 0..DEVICES {
        let id = format!("p{d}");
        let last = store.device_seqs(keys[d]).await.unwrap().stored;
        assert!(
            last >= acked[d] && last <= sent[d],
            "seed {seed}, {id}: last_seq {last} outside [acked {}, sent {}]",
            acked[d],
            sent[d]
        );
        let got: Vec<u64> = store
            .telemetry(&id, all, 100_000)
            .await
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(
            got,
            (1..=last).collect::<Vec<_>>(),
            "seed {seed}, {id}: stored"
        );
        // It goes on after last_seq, and a repeat is not stored again.
        let next = |seq| TelemetryRecord {
            device: keys[d],
            seq,
            timestamp_ms: 9,
            received_ms: 9,
            content_type: 1,
            payload: Bytes::from_static(b"0"),
        };
        let batch = Batch {
            records: vec![next(last.max(1)), next(last + 1)],
            rejections: vec![],
            reports: Vec::new(),
        };
        store.append(Arc::new(batch)).await.unwrap();
        let n = store.telemetry(&id, all, 100_000).await.unwrap().len() as u64;
        assert_eq!(n, last + 1, "seed {seed}, {id}: after recovery");
    }
    eprintln!(
        "power-loss seed {seed}: lost at write or sync {} of the run, {} of {} readings acknowledged",
        CRASH_AT.load(Ordering::SeqCst) - base,
        acked.iter().sum::<u64>(),
        sent.iter().sum::<u64>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_at_random_writes_keeps_every_acknowledged_reading_once() {
    register();
    let seeds: Vec<u64> = match std::env::var("POWER_SEED") {
        Ok(s) => vec![s.parse().expect("POWER_SEED is a number")],
        Err(_) => (1..=12).collect(),
    };
    for seed in seeds {
        one_seed(seed).await;
    }
}
