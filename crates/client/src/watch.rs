//! The one watch loop every rkube component runs: a kube-rs watcher that retries with
//! [`WatchBackoff`], logs what broke, and feeds each event to its consumer until shutdown.

use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

/// A resource rkube watches: typed (kube-rs knows its group, version and kind), decodable, and
/// movable between tasks.
pub trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + 'static
{
}

impl<T> Watched for T where
    T: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static
{
}

/// How long to wait before looking again for a resource the API server does not serve.
const NOT_SERVED_RETRY: Duration = Duration::from_secs(60);

/// The events of a watch on `api`, re-listing and re-watching whenever it breaks (errors are
/// logged, not yielded). A resource the API server does not serve is looked for again only
/// every minute instead of at the backoff's pace.
pub fn events<K: Watched>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = watcher::Event<K>> {
    watcher(api, config).backoff(WatchBackoff::default()).filter_map(|r| async move {
        match r {
            Ok(event) => Some(event),
            Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 404 => {
                tracing::debug!(kind = %K::kind(&()), "not served; looking again in a minute");
                tokio::time::sleep(NOT_SERVED_RETRY).await;
                None
            }
            // The backoff paces the retries; a restarting API server is news only when debugging.
            Err(e) => {
                tracing::debug!(kind = %K::kind(&()), "watch: {e}");
                None
            }
        }
    })
}

/// Feeds every event of a watch on `api` to `on_event` until `stop` (see [`events`]).
pub async fn follow<K: Watched>(
    api: Api<K>,
    config: watcher::Config,
    stop: CancellationToken,
    mut on_event: impl FnMut(watcher::Event<K>),
) {
    let mut events = std::pin::pin!(events(api, config));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            e = events.next() => match e {
                Some(e) => on_event(e),
                None => return,
            },
        }
    }
}

/// Retry delays for a broken watch: 200 ms doubling to at most 2 s, reset once events flow.
/// kube-rs's default climbs to 30 s and resets only after 120 s without an error; a watch that
/// breaks a few times (an API server restarting, a 410 after falling behind the watch cache's
/// window) would then leave the store stale for half a minute — long enough for the node
/// lifecycle controller to read healthy nodes' Leases as expired.
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
