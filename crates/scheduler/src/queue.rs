//! The scheduling queue: active pods by priority then age, a back-off for errors (1 s doubling to
//! 10 s), and an unschedulable set that waits for a cluster change instead of polling.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;

#[derive(Default)]
struct State {
    /// (−priority, creation, key): the BTreeSet's first element is the next pod.
    active: BTreeSet<(i64, i64, String)>,
    info: HashMap<String, Info>,
    unschedulable: HashMap<String, Instant>,
    /// Pods waiting out their back-off, with the instant it ends.
    backoff: HashMap<String, Instant>,
    /// Bumped by every move request; a pod whose cycle overlapped one is retried, not parked.
    move_seq: u64,
    last_flush: Option<Instant>,
}

#[derive(Clone, Copy)]
struct Info {
    prio: i64,
    created: i64,
    /// Failed scheduling attempts so far (upstream counts unschedulable ones too).
    attempts: u32,
    last_failure: Option<Instant>,
}

impl Info {
    fn entry(&self, k: &str) -> (i64, i64, String) {
        (-self.prio, self.created, k.to_string())
    }

    /// The end of this pod's back-off: 1 s after the first failure, doubling up to 10 s.
    fn backoff_until(&self) -> Option<Instant> {
        let last = self.last_failure?;
        Some(last + backoff_duration(self.attempts))
    }
}

pub fn backoff_duration(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(4);
    (INITIAL_BACKOFF * (1 << exp)).min(MAX_BACKOFF)
}

const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub struct Queue {
    state: Mutex<State>,
    notify: Notify,
}

/// Unschedulable pods are retried at least this often even without a cluster change (upstream:
/// podMaxInUnschedulablePodsDuration, 5 minutes, checked every 30 s).
const UNSCHEDULABLE_RETRY: Duration = Duration::from_secs(300);
const FLUSH_EVERY: Duration = Duration::from_secs(30);

impl State {
    /// A pod leaving the unschedulable set: to the back-off queue while its back-off runs,
    /// else straight to active (upstream's movePodsToActiveOrBackoffQueue).
    fn requeue(&mut self, k: String, now: Instant) {
        let Some(info) = self.info.get(&k).copied() else { return };
        match info.backoff_until().filter(|t| *t > now) {
            Some(t) => {
                self.backoff.insert(k, t);
            }
            None => {
                self.active.insert(info.entry(&k));
            }
        }
    }
}

impl Queue {
    pub fn new() -> Queue {
        Queue { state: Mutex::new(State::default()), notify: Notify::new() }
    }

    pub async fn add(&self, pod: &Pod) {
        let k = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or(""),
            pod.metadata.name.as_deref().unwrap_or("")
        );
        let prio = pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0) as i64;
        let created =
            pod.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()).unwrap_or(0);
        let mut st = self.state.lock().await;
        let info = match st.info.get(&k).copied() {
            Some(old) => {
                st.active.remove(&old.entry(&k));
                Info { prio, created, ..old }
            }
            None => Info { prio, created, attempts: 0, last_failure: None },
        };
        st.info.insert(k.clone(), info);
        if st.unschedulable.contains_key(&k) || st.backoff.contains_key(&k) {
            return;
        }
        st.active.insert(info.entry(&k));
        drop(st);
        self.notify.notify_one();
    }

    pub async fn forget(&self, k: &str) {
        let mut st = self.state.lock().await;
        if let Some(info) = st.info.remove(k) {
            st.active.remove(&info.entry(k));
        }
        st.unschedulable.remove(k);
        st.backoff.remove(k);
    }

    fn failed(st: &mut State, k: &str, now: Instant) {
        if let Some(i) = st.info.get_mut(k) {
            i.attempts += 1;
            i.last_failure = Some(now);
        }
    }

    /// Parks a pod that fits nowhere until the cluster changes. `seen` is the move sequence at
    /// the start of its cycle: if something changed meanwhile, it is requeued at once (through
    /// its back-off).
    pub async fn unschedulable(&self, k: &str, seen: u64) {
        let mut st = self.state.lock().await;
        let now = Instant::now();
        Self::failed(&mut st, k, now);
        if !st.info.contains_key(k) {
            return;
        }
        if st.move_seq != seen {
            st.requeue(k.to_string(), now);
            drop(st);
            self.notify.notify_one();
            return;
        }
        st.unschedulable.insert(k.to_string(), now);
    }

    /// The current move sequence (taken when a scheduling cycle starts).
    pub async fn move_seq(&self) -> u64 {
        self.state.lock().await.move_seq
    }

    /// A scheduling error (not a refusal): retry after the pod's back-off.
    pub async fn backoff(&self, k: &str) {
        let mut st = self.state.lock().await;
        let now = Instant::now();
        Self::failed(&mut st, k, now);
        let Some(info) = st.info.get(k).copied() else { return };
        st.active.remove(&info.entry(k));
        st.unschedulable.remove(k);
        st.backoff.insert(k.to_string(), info.backoff_until().unwrap_or(now));
        drop(st);
        self.notify.notify_one();
    }

    /// Something changed that could help (a node added or updated, a pod gone): every
    /// unschedulable pod goes back to the active queue, or to back-off if it is still backing
    /// off.
    pub async fn move_all_to_active(&self) {
        let mut st = self.state.lock().await;
        st.move_seq += 1;
        let now = Instant::now();
        let keys: Vec<String> = st.unschedulable.drain().map(|(k, _)| k).collect();
        for k in keys {
            st.requeue(k, now);
        }
        drop(st);
        self.notify.notify_one();
    }

    /// The next pod to schedule; waits for one.
    pub async fn pop(&self) -> Option<String> {
        loop {
            let mut wait = Duration::from_millis(500);
            {
                let mut st = self.state.lock().await;
                let now = Instant::now();
                if !st.backoff.is_empty() {
                    let due: Vec<String> = st
                        .backoff
                        .iter()
                        .filter(|(_, t)| **t <= now)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in due {
                        st.backoff.remove(&k);
                        if let Some(info) = st.info.get(&k).copied() {
                            st.active.insert(info.entry(&k));
                        }
                    }
                    if let Some(next) = st.backoff.values().min() {
                        wait = wait.min(next.saturating_duration_since(now));
                    }
                }
                if st.last_flush.is_none_or(|t| now.duration_since(t) >= FLUSH_EVERY) {
                    st.last_flush = Some(now);
                    let stale: Vec<String> = st
                        .unschedulable
                        .iter()
                        .filter(|(_, t)| now.duration_since(**t) > UNSCHEDULABLE_RETRY)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in stale {
                        st.unschedulable.remove(&k);
                        st.requeue(k, now);
                    }
                }
                if let Some(first) = st.active.pop_first() {
                    return Some(first.2);
                }
            }
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

impl Default for Queue {
    fn default() -> Self {
        Queue::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn pod(name: &str, prio: i32) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("d".into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                priority: Some(prio),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn higher_priority_pods_pop_first() {
        let q = Queue::new();
        q.add(&pod("low", 0)).await;
        q.add(&pod("high", 100)).await;
        assert_eq!(q.pop().await.as_deref(), Some("d/high"));
        assert_eq!(q.pop().await.as_deref(), Some("d/low"));
    }

    #[tokio::test]
    async fn a_cluster_change_during_a_cycle_retries_the_pod_instead_of_parking_it() {
        let q = Queue::new();
        q.add(&pod("gpu", 0)).await;
        let k = q.pop().await.unwrap();
        let seen = q.move_seq().await;
        q.move_all_to_active().await; // a node joined while the cycle ran
        q.unschedulable(&k, seen).await;
        assert_eq!(q.pop().await.as_deref(), Some("d/gpu"));
        // Without a change in between it is parked until the next move.
        let seen = q.move_seq().await;
        q.unschedulable(&k, seen).await;
        assert!(tokio::time::timeout(Duration::from_millis(700), q.pop()).await.is_err());
        q.move_all_to_active().await;
        assert_eq!(q.pop().await.as_deref(), Some("d/gpu"));
    }

    #[test]
    fn backoff_starts_at_one_second_and_doubles_to_ten() {
        let secs: Vec<u64> = (1..=6).map(|a| backoff_duration(a).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 10, 10]);
    }

    #[tokio::test]
    async fn a_pod_moved_back_waits_out_its_backoff_and_errors_back_off_longer_each_time() {
        let q = Queue::new();
        q.add(&pod("p", 0)).await;
        let k = q.pop().await.unwrap();
        // Two failed attempts: the second back-off is 2 s.
        let seen = q.move_seq().await;
        q.unschedulable(&k, seen).await;
        q.move_all_to_active().await;
        let t = Instant::now();
        assert_eq!(q.pop().await.as_deref(), Some("d/p"));
        assert!(t.elapsed() >= Duration::from_millis(990), "{:?}", t.elapsed());
        q.backoff(&k).await;
        let t = Instant::now();
        assert_eq!(q.pop().await.as_deref(), Some("d/p"));
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_millis(2600),
            "{waited:?}"
        );
        // Forgotten pods never come back.
        q.backoff(&k).await;
        q.forget(&k).await;
        assert!(tokio::time::timeout(Duration::from_secs(5), q.pop()).await.is_err());
    }
}
