//! Returning freed heap memory to the system.
//!
//! glibc's allocator keeps memory freed by the program in its arenas for reuse, and gives back
//! only what lies at the top of an arena. A burst of requests (large LIST bodies, many decoded
//! objects, watch buffers) leaves the arenas at their peak size with long-lived objects (stored
//! values) scattered through them, so the process would keep its peak footprint after the burst.
//! `malloc_trim` releases every whole free page inside the arenas; the server runs it every few
//! seconds.
//!
//! A program with another global allocator registers that allocator's release function with
//! [`set_release`] (the `rkube` binary uses mimalloc, whose idle threads would otherwise keep
//! pages whose purge is only due at their next allocation).
#![allow(unsafe_code)]

use std::sync::OnceLock;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often freed pages are released.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Makes [`trim`] call `release` instead of glibc's `malloc_trim` (set once, by the program that
/// chose the global allocator).
pub fn set_release(release: fn()) {
    let _ = RELEASE.set(release);
}

/// Releases free heap pages to the system now (the registered allocator's release, else glibc's
/// `malloc_trim` on Linux; elsewhere a no-op).
pub fn trim() {
    if let Some(release) = RELEASE.get() {
        return release();
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only walks the allocator's own free lists,
    // under the allocator's locks; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims every [`TRIM_EVERY`] on a blocking thread until `stop` is cancelled.
pub fn spawn_trimmer(stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    });
}
