//! Decoding TELEMETRY allocates nothing per frame: the frame and its payload
//! are reference-counted slices of the read buffer.
//!
//! One test only in this file: the allocator counts process-wide while the
//! test's own thread has counting switched on.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use furrow_proto::message::encode_telemetry;
use furrow_proto::{FrameDecoder, Message};

/// Counts allocation calls (alloc, alloc_zeroed, realloc) made by threads
/// that switched counting on; forwards everything to the system allocator.
struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Const-initialised and without a destructor, so reading it from inside
    // the allocator never allocates or registers anything.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTING.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System`, which upholds the `GlobalAlloc`
// contract, with the caller's arguments unchanged; the counting around it
// touches only an atomic and a const thread-local `Cell`, neither of which
// allocates, so there is no re-entrancy.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded as received; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with
        // `layout`; the caller upholds the rest of `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const FRAMES: u64 = 1_000;

#[test]
fn decoding_telemetry_does_not_allocate_per_frame() {
    let payload = br#"{"t":21.5,"h":40.1,"p":1013.2,"ok":true}"#;
    let mut buf = BytesMut::new();
    for seq in 1..=FRAMES {
        encode_telemetry(seq, 1_763_683_200_000 + seq, 1, payload, &mut buf).unwrap();
    }
    let wire_len = buf.len();
    let dec = FrameDecoder::default();

    // Make sure counting works at all, so a broken counter cannot pass.
    COUNTING.with(|c| c.set(true));
    let probe = std::hint::black_box(vec![0u8; 16]);
    COUNTING.with(|c| c.set(false));
    drop(probe);
    assert_eq!(ALLOCS.swap(0, Ordering::SeqCst), 1, "the counter counts");

    let mut decoded = 0u64;
    let mut seq_sum = 0u64;
    let mut payload_bytes = 0usize;
    COUNTING.with(|c| c.set(true));
    while let Some(frame) = dec.decode(&mut buf).unwrap() {
        match Message::from_frame(frame).unwrap() {
            Message::Telemetry(t) => {
                decoded += 1;
                seq_sum += t.seq;
                payload_bytes += t.payload.len();
            }
            _ => unreachable!("only TELEMETRY was encoded"),
        }
    }
    COUNTING.with(|c| c.set(false));
    let allocs = ALLOCS.load(Ordering::SeqCst);

    assert_eq!(decoded, FRAMES);
    assert_eq!(seq_sum, FRAMES * (FRAMES + 1) / 2);
    assert_eq!(payload_bytes, payload.len() * FRAMES as usize);
    assert!(buf.is_empty());
    assert!(wire_len > 0);
    assert!(
        allocs <= 2,
        "{allocs} allocations while decoding {FRAMES} frames"
    );
}
