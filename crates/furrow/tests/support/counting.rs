//! A global allocator that counts one thread's live heap bytes and
//! allocations while counting is on: what the code under measurement holds,
//! without the allocator's fragmentation. Shared by
//! `tests/tls_handshake_memory.rs` and `examples/tls_memory.rs`; each binary
//! installs it with `#[global_allocator] static GLOBAL: counting::Counting =
//! counting::Counting;`.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static BYTES: Cell<i64> = const { Cell::new(0) };
    static ALLOCS: Cell<i64> = const { Cell::new(0) };
}

/// Forwards to the system allocator, counting this thread's calls while
/// [`on`] is set.
pub struct Counting;

fn note(bytes: i64, allocs: i64) {
    let _ = ON.try_with(|on| {
        if on.get() {
            BYTES.with(|b| b.set(b.get() + bytes));
            ALLOCS.with(|a| a.set(a.get() + allocs));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counting touches only const-initialised thread-locals of plain integers,
// so it never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as i64, 1);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as i64), -1);
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        note(new as i64 - layout.size() as i64, 0);
        // SAFETY: forwarded with the caller's arguments.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

/// Turns counting on or off for this thread.
pub fn on(counting: bool) {
    ON.with(|c| c.set(counting));
}

/// This thread's counted live bytes and allocations so far.
pub fn counted() -> (i64, i64) {
    (BYTES.with(Cell::get), ALLOCS.with(Cell::get))
}
