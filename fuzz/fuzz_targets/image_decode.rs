//! Fuzzes `crd::image::decode`: any bytes, and the same bytes with the prefix's
//! length and CRC made right (so mutations reach the body decoder). Decoding must not
//! panic, must allocate no more than `alloc_bound(body length)` at once, must reject in
//! one line, and what it accepts must encode back to the same bytes.
#![no_main]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

use libfuzzer_sys::fuzz_target;

/// Counts live and peak bytes (the fuzzer runs one input at a time).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// atomics (no allocation, no re-entry).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; ptr came from this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded; ptr came from this allocator with this layout.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PREFIX_LEN: usize = 24;

fn check(bytes: &[u8]) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let result = crd::image::decode(bytes, "fuzz.img");
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let body_len = bytes.len().saturating_sub(PREFIX_LEN) as u64;
    let bound = crd::image::alloc_bound(body_len);
    assert!(peak as u64 <= bound, "decoding {} bytes allocated {peak} (bound {bound})", bytes.len());
    match result {
        Ok(body) => {
            let again = crd::image::encode(&body).expect("a decoded image encodes");
            assert_eq!(crd::image::decode(&again, "again").expect("and decodes again"), body);
        }
        Err(e) => assert!(!e.to_string().contains('\n'), "a rejection in more than one line: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= PREFIX_LEN {
        let mut sealed = data.to_vec();
        sealed[..8].copy_from_slice(&crd::image::MAGIC);
        sealed[8..12].copy_from_slice(&crd::image::FORMAT_VERSION.to_le_bytes());
        let len = (sealed.len() - PREFIX_LEN) as u64;
        sealed[12..20].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&sealed[PREFIX_LEN..]);
        sealed[20..24].copy_from_slice(&crc.to_le_bytes());
        check(&sealed);
    }
});
