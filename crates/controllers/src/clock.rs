//! The node lifecycle controller's clock: the system clock in production, or a manual one a test
//! moves forward, so upstream's 50 s grace period and 300 s tolerations are checked in
//! milliseconds of real time. Heartbeats (Lease `renewTime`, the Ready condition's
//! `lastHeartbeatTime`) and taints' `timeAdded` are wall-clock timestamps written into the API, so
//! whoever writes heartbeats in such a test must take their times from the same clock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<Manual>>);

#[derive(Debug)]
struct Manual {
    wall: jiff::Timestamp,
    mono: Instant,
    offset: Mutex<Duration>,
}

impl Clock {
    /// The system clock (the default).
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that stands at `start` until its handle moves it.
    pub fn manual(start: jiff::Timestamp) -> (Clock, ManualClock) {
        let m = Arc::new(Manual {
            wall: start,
            mono: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        });
        (Clock(Some(m.clone())), ManualClock(m))
    }

    fn offset(m: &Manual) -> Duration {
        *m.offset.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wall-clock now.
    pub fn now(&self) -> jiff::Timestamp {
        match &self.0 {
            None => jiff::Timestamp::now(),
            Some(m) => m.wall + Self::offset(m),
        }
    }

    /// Now as an API `Time`.
    pub fn time(&self) -> Time {
        Time(self.now())
    }

    /// Monotonic now (for rate limits).
    pub fn instant(&self) -> Instant {
        match &self.0 {
            None => Instant::now(),
            Some(m) => m.mono + Self::offset(m),
        }
    }
}

/// The handle that moves a manual [`Clock`].
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<Manual>);

impl ManualClock {
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut o = self.0.offset.lock().unwrap_or_else(|e| e.into_inner());
        *o += by;
    }

    /// Where the clock stands now.
    pub fn now(&self) -> jiff::Timestamp {
        self.0.wall + Clock::offset(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let start = jiff::Timestamp::from_second(1_000_000).expect("timestamp");
        let (clock, hand) = Clock::manual(start);
        let i0 = clock.instant();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(clock.now(), start);
        assert_eq!(clock.instant(), i0);
        hand.advance(Duration::from_secs(300));
        assert_eq!(clock.now().as_second(), 1_000_300);
        assert_eq!(hand.now(), clock.now());
        assert_eq!(clock.instant() - i0, Duration::from_secs(300));
        assert_eq!(clock.time().0.as_second(), 1_000_300);
    }
}
