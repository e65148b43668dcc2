//! The retry delays every rkube watch uses.

use std::time::Duration;

/// Retry delays for a broken watch: 200 ms doubling to at most 2 s, reset once events flow.
/// kube-rs's default climbs to 30 s and resets only after 120 s without an error; a watch the
/// server closes as too slow a few times in a burst would then leave the store stale for half
/// a minute — long enough for the node lifecycle controller to read healthy nodes' Leases as
/// expired.
#[derive(Default)]
pub struct WatchBackoff(Option<Duration>);

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let next =
            self.0.map_or(Duration::from_millis(200), |d| (d * 2).min(Duration::from_secs(2)));
        self.0 = Some(next);
        Some(next)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn watch_retries_back_off_to_two_seconds_and_start_over_after_a_reset() {
        let mut b = WatchBackoff::default();
        let first: Vec<u64> = (&mut b).take(6).map(|d| d.as_millis() as u64).collect();
        assert_eq!(first, vec![200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(200)));
    }
}
