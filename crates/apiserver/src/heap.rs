//! Returning freed heap memory to the system.
//!
//! glibc's allocator keeps memory freed by the program in its arenas for reuse, and gives back
//! only what lies at the top of an arena. A burst of requests (large LIST bodies, many decoded
//! objects, watch buffers) leaves the arenas at their peak size with long-lived objects (stored
//! values) scattered through them, so the process would keep its peak footprint after the burst.
//! `malloc_trim` releases every whole free page inside the arenas; the server runs it every few
//! seconds.
#![allow(unsafe_code)]

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often freed pages are released.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Releases free heap pages to the system now (glibc on Linux; elsewhere a no-op).
pub fn trim() {
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
