//! Giving freed heap back to the operating system.
//!
//! RocksDB's flushes and compactions allocate and free tens of MiB at a time from
//! background threads. glibc keeps what they free in its arenas, so the resident set
//! keeps growing for millions of pulses after the state's live memory (bounded by
//! `aggregate.state_memory_mib`) has stopped growing. `malloc_trim(0)` returns every
//! whole free page of every arena; done about once a second it costs a few
//! milliseconds and keeps RSS close to live memory (see benches/stage2_memory.rs).
//!
//! glibc also raises its mmap threshold each time a large mmapped block is freed (up
//! to 32 MiB), after which RocksDB's write batches and compaction buffers come from
//! the arenas and fragment them. Fixing the threshold at 128 KiB keeps large blocks in
//! mmap, returned on free: peak RSS over 10M pulses fell from 225 to 204 MiB.

use std::time::{Duration, Instant};

/// How often [`HeapTrimmer::maybe_trim`] really trims.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// glibc's mmap threshold, fixed (see the module docs).
const MMAP_THRESHOLD: i32 = 128 << 10;

/// Trims the heap at most once per [`TRIM_INTERVAL`]; call it after each commit.
/// Creating one also fixes glibc's mmap threshold (process-wide).
#[derive(Debug)]
pub struct HeapTrimmer {
    last: Instant,
}

impl Default for HeapTrimmer {
    fn default() -> Self {
        fix_mmap_threshold();
        Self { last: Instant::now() }
    }
}

impl HeapTrimmer {
    pub fn maybe_trim(&mut self) {
        if self.last.elapsed() >= TRIM_INTERVAL {
            trim();
            self.last = Instant::now();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas; 0 = keep no extra padding.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators (musl, macOS) return memory on their own terms.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fix_mmap_threshold() {
    // SAFETY: mallopt only changes a glibc tunable; a refusal (0) leaves the default,
    // which is only a memory cost, so it is logged and ignored.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) } == 0 {
        tracing::warn!("glibc refused a fixed mmap threshold; resident memory may grow with fragmentation");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_mmap_threshold() {}

/// "heap in use X MiB, free in arenas Y MiB": live heap vs. what the allocator holds
/// free, to tell a leak from allocator retention (glibc only).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn heap_report() -> String {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value.
    let m = unsafe { libc::mallinfo2() };
    format!("heap in use {} MiB, free in arenas {} MiB", m.uordblks >> 20, m.fordblks >> 20)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn heap_report() -> String {
    "heap statistics unavailable on this platform".into()
}
