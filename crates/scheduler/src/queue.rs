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
    info: HashMap<String, (i64, i64)>,
    unschedulable: HashMap<String, Instant>,
    backoff: HashMap<String, (Instant, u32)>,
    /// Bumped by every move request; a pod whose cycle overlapped one is retried, not parked.
    move_seq: u64,
}

pub struct Queue {
    state: Mutex<State>,
    notify: Notify,
}

/// Unschedulable pods are retried at least this often even without a cluster change (upstream:
/// podMaxInUnschedulablePodsDuration, 5 minutes).
const UNSCHEDULABLE_RETRY: Duration = Duration::from_secs(300);

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
        st.info.insert(k.clone(), (prio, created));
        if st.unschedulable.contains_key(&k) || st.backoff.contains_key(&k) {
            return;
        }
        st.active.insert((-prio, created, k));
        drop(st);
        self.notify.notify_one();
    }

    pub async fn forget(&self, k: &str) {
        let mut st = self.state.lock().await;
        st.active.retain(|(_, _, x)| x != k);
        st.unschedulable.remove(k);
        st.backoff.remove(k);
        st.info.remove(k);
    }

    /// Parks a pod that fits nowhere until the cluster changes. `seen` is the move sequence at
    /// the start of its cycle: if something changed meanwhile, it goes straight back to active.
    pub async fn unschedulable(&self, k: &str, seen: u64) {
        let mut st = self.state.lock().await;
        if st.move_seq != seen {
            if let Some((p, c)) = st.info.get(k).copied() {
                st.active.insert((-p, c, k.to_string()));
            }
            drop(st);
            self.notify.notify_one();
            return;
        }
        st.unschedulable.insert(k.to_string(), Instant::now());
    }

    /// The current move sequence (taken when a scheduling cycle starts).
    pub async fn move_seq(&self) -> u64 {
        self.state.lock().await.move_seq
    }

    pub async fn backoff(&self, k: &str) {
        let mut st = self.state.lock().await;
        let attempts = st.backoff.get(k).map(|(_, a)| *a + 1).unwrap_or(1);
        let delay = Duration::from_secs(1 << (attempts - 1).min(3)).min(Duration::from_secs(10));
        st.backoff.insert(k.to_string(), (Instant::now() + delay, attempts));
    }

    /// Something changed that could help (a node added or updated, a pod gone): every
    /// unschedulable pod goes back to the active queue.
    pub async fn move_all_to_active(&self) {
        let mut st = self.state.lock().await;
        st.move_seq += 1;
        let keys: Vec<String> = st.unschedulable.drain().map(|(k, _)| k).collect();
        for k in keys {
            if let Some((p, c)) = st.info.get(&k).copied() {
                st.active.insert((-p, c, k));
            }
        }
        drop(st);
        self.notify.notify_one();
    }

    /// The next pod to schedule; waits for one.
    pub async fn pop(&self) -> Option<String> {
        loop {
            {
                let mut st = self.state.lock().await;
                let now = Instant::now();
                let due: Vec<String> = st
                    .backoff
                    .iter()
                    .filter(|(_, (t, _))| *t <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in due {
                    if let Some((p, c)) = st.info.get(&k).copied() {
                        st.active.insert((-p, c, k.clone()));
                    }
                    // Keep the attempt count for the next back-off, but the deadline is spent.
                    if let Some(b) = st.backoff.get_mut(&k) {
                        b.0 = now + Duration::from_secs(3600);
                    }
                }
                let stale: Vec<String> = st
                    .unschedulable
                    .iter()
                    .filter(|(_, t)| now.duration_since(**t) > UNSCHEDULABLE_RETRY)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in stale {
                    st.unschedulable.remove(&k);
                    if let Some((p, c)) = st.info.get(&k).copied() {
                        st.active.insert((-p, c, k));
                    }
                }
                if let Some(first) = st.active.iter().next().cloned() {
                    st.active.remove(&first);
                    return Some(first.2);
                }
            }
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
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
}
