//! Zones and eviction rate limits of the node lifecycle controller, as upstream: nodes are
//! grouped by zone; each zone's health (Normal, PartialDisruption, FullDisruption) sets how fast
//! its NotReady/unreachable nodes get NoExecute taints (which is what evicts their pods). When
//! every zone is fully disrupted — the control plane more likely lost the nodes than the nodes
//! died — tainting stops until a node is back. Pure and clock-injected; `nodes.rs` does the I/O.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Instant;

use k8s_openapi::api::core::v1::Node;

/// The limits of `--node-eviction-rate` and friends.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Nodes per second tainted in a healthy zone (upstream 0.1).
    pub eviction_rate: f64,
    /// Nodes per second in a partially disrupted zone of a large cluster (upstream 0.01).
    pub secondary_eviction_rate: f64,
    /// Share of NotReady nodes (at least three) that makes a zone partially disrupted (0.55).
    pub unhealthy_zone_threshold: f64,
    /// Above this many nodes a partially disrupted zone keeps the secondary rate; at or below
    /// it, tainting stops (upstream 50).
    pub large_cluster_size_threshold: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            eviction_rate: 0.1,
            secondary_eviction_rate: 0.01,
            unhealthy_zone_threshold: 0.55,
            large_cluster_size_threshold: 50,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZoneState {
    Initial,
    Normal,
    PartialDisruption,
    FullDisruption,
}

/// What changed in a pass, for the controller to log and act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Every node is NotReady: lifecycle NoExecute taints come off and none are added.
    EnteredFullDisruption,
    ExitedFullDisruption,
    Zone(String, ZoneState),
}

/// Upstream's zone key: region and zone labels, "" when a node has neither.
pub fn zone_key(node: &Node) -> String {
    // Borrowed: this runs for every node every second.
    let labels = node.metadata.labels.as_ref();
    let get = |k: &str, old: &str| {
        labels.and_then(|l| l.get(k).or(l.get(old))).map(String::as_str).unwrap_or_default()
    };
    let region = get("topology.kubernetes.io/region", "failure-domain.beta.kubernetes.io/region");
    let zone = get("topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone");
    if region.is_empty() && zone.is_empty() {
        String::new()
    } else {
        format!("{region}:\x00:{zone}")
    }
}

/// Nodes labelled to stay out of the zone health count.
pub fn excluded(node: &Node) -> bool {
    node.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key("node.kubernetes.io/exclude-disruption"))
}

/// A token bucket of burst 1 (upstream's eviction limiter); a rate of 0 accepts nothing.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64, now: Instant) -> Bucket {
        Bucket { rate, tokens: 1.0, last: now }
    }

    fn try_accept(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return false;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(1.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// As upstream's SwapLimiter: a new rate gets a fresh (full) bucket; the same rate keeps it.
    fn swap(&mut self, rate: f64, now: Instant) {
        if (rate - self.rate).abs() > f64::EPSILON {
            *self = Bucket::new(rate, now);
        }
    }
}

#[derive(Debug)]
struct Zone {
    state: ZoneState,
    bucket: Bucket,
    /// Nodes waiting for their NoExecute taint, first come first served.
    queue: VecDeque<String>,
}

/// Zone states and per-zone taint queues across passes.
#[derive(Debug)]
pub struct Disruption {
    limits: Limits,
    zones: BTreeMap<String, Zone>,
}

impl Disruption {
    pub fn new(limits: Limits) -> Disruption {
        Disruption { limits, zones: BTreeMap::new() }
    }

    /// Whether the whole cluster is in full disruption (tainting stopped).
    pub fn all_fully_disrupted(&self) -> bool {
        !self.zones.is_empty() && self.zones.values().all(|z| z.state == ZoneState::FullDisruption)
    }

    #[cfg(test)]
    pub fn state(&self, zone: &str) -> Option<ZoneState> {
        self.zones.get(zone).map(|z| z.state)
    }

    /// Upstream's ComputeZoneState over the Ready flags of a zone's nodes.
    pub fn zone_state(&self, ready: &[bool]) -> ZoneState {
        let ok = ready.iter().filter(|r| **r).count();
        let not = ready.len() - ok;
        if ok == 0 && not > 0 {
            ZoneState::FullDisruption
        } else if not > 2 && not as f64 / ready.len() as f64 >= self.limits.unhealthy_zone_threshold
        {
            ZoneState::PartialDisruption
        } else {
            ZoneState::Normal
        }
    }

    fn rate_for(&self, state: ZoneState, zone_size: usize) -> f64 {
        match state {
            ZoneState::Normal | ZoneState::Initial | ZoneState::FullDisruption => {
                self.limits.eviction_rate
            }
            ZoneState::PartialDisruption => {
                if zone_size > self.limits.large_cluster_size_threshold {
                    self.limits.secondary_eviction_rate
                } else {
                    0.0
                }
            }
        }
    }

    /// One health pass: `ready` maps each zone to its nodes' Ready flags (excluded nodes left
    /// out). Zones without nodes are forgotten.
    pub fn observe(
        &mut self,
        ready: &BTreeMap<String, Vec<bool>>,
        now: Instant,
    ) -> Vec<Transition> {
        let mut out = Vec::new();
        let new: BTreeMap<&String, ZoneState> =
            ready.iter().map(|(z, r)| (z, self.zone_state(r))).collect();
        for z in ready.keys() {
            let rate = self.limits.eviction_rate;
            self.zones.entry(z.clone()).or_insert_with(|| Zone {
                state: ZoneState::Initial,
                bucket: Bucket::new(rate, now),
                queue: VecDeque::new(),
            });
        }
        self.zones.retain(|z, _| ready.contains_key(z));
        let all_are = new.values().all(|s| *s == ZoneState::FullDisruption);
        let all_were = self.zones.values().all(|z| z.state == ZoneState::FullDisruption);
        if all_are && all_were {
            return out;
        }
        if all_are {
            for z in self.zones.values_mut() {
                z.bucket.swap(0.0, now);
                z.state = ZoneState::FullDisruption;
            }
            out.push(Transition::EnteredFullDisruption);
            return out;
        }
        if all_were {
            out.push(Transition::ExitedFullDisruption);
        }
        let names: Vec<String> = self.zones.keys().cloned().collect();
        for name in names {
            let state = new[&name];
            let size = ready.get(&name).map_or(0, Vec::len);
            let rate = self.rate_for(state, size);
            let Some(z) = self.zones.get_mut(&name) else { continue };
            if z.state == state && !all_were {
                continue;
            }
            z.bucket.swap(rate, now);
            if z.state != state {
                out.push(Transition::Zone(name.clone(), state));
            }
            z.state = state;
        }
        out
    }

    /// Queues a node of `zone` for its NoExecute taint (once).
    pub fn enqueue(&mut self, zone: &str, node: &str) {
        if let Some(z) = self.zones.get_mut(zone)
            && !z.queue.iter().any(|n| n == node)
        {
            z.queue.push_back(node.to_string());
        }
    }

    /// Forgets a queued node (it is Ready again, or gone).
    pub fn dequeue(&mut self, node: &str) {
        for z in self.zones.values_mut() {
            z.queue.retain(|n| n != node);
        }
    }

    /// Forgets queued nodes that no longer exist, so a deleted node spends no zone's turn.
    pub fn retain_nodes(&mut self, exists: impl Fn(&str) -> bool) {
        for z in self.zones.values_mut() {
            z.queue.retain(|n| exists(n));
        }
    }

    /// The queued nodes whose taint the zones' rates allow now, taken off their queues.
    pub fn take_allowed(&mut self, now: Instant) -> HashSet<String> {
        let mut out = HashSet::new();
        for z in self.zones.values_mut() {
            while !z.queue.is_empty() && z.bucket.try_accept(now) {
                if let Some(n) = z.queue.pop_front() {
                    out.insert(n);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn one_zone(flags: &[bool]) -> BTreeMap<String, Vec<bool>> {
        BTreeMap::from([(String::new(), flags.to_vec())])
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn zone_states_follow_upstreams_thresholds() {
        let d = Disruption::new(Limits::default());
        assert_eq!(d.zone_state(&[false, false]), ZoneState::FullDisruption);
        assert_eq!(d.zone_state(&[true, false, false]), ZoneState::Normal, "two is never partial");
        assert_eq!(d.zone_state(&[true, true, false, false, false]), ZoneState::PartialDisruption);
        assert_eq!(d.zone_state(&[true, true, true, false, false, false]), ZoneState::Normal);
        assert_eq!(d.zone_state(&[]), ZoneState::Normal);
    }

    #[test]
    fn a_healthy_zone_taints_one_node_at_once_then_one_every_ten_seconds() {
        let t0 = Instant::now();
        let mut d = Disruption::new(Limits::default());
        let flags = one_zone(&[true, true, true, true, true, false, false]);
        assert_eq!(d.observe(&flags, t0), [Transition::Zone(String::new(), ZoneState::Normal)]);
        for n in ["a", "b", "c"] {
            d.enqueue("", n);
        }
        d.enqueue("", "a");
        assert_eq!(d.take_allowed(t0), HashSet::from(["a".to_string()]));
        assert!(d.take_allowed(secs(t0, 5)).is_empty());
        assert_eq!(d.take_allowed(secs(t0, 10)), HashSet::from(["b".to_string()]));
        d.dequeue("c");
        assert!(d.take_allowed(secs(t0, 30)).is_empty(), "c came back before its turn");
        d.enqueue("", "deleted");
        d.enqueue("", "d");
        d.retain_nodes(|n| n != "deleted");
        assert_eq!(d.take_allowed(secs(t0, 40)), HashSet::from(["d".to_string()]));
    }

    #[test]
    fn full_disruption_stops_tainting_until_a_node_is_back() {
        let t0 = Instant::now();
        let mut d = Disruption::new(Limits::default());
        d.observe(&one_zone(&[true, true]), t0);
        assert_eq!(
            d.observe(&one_zone(&[false, false]), secs(t0, 1)),
            [Transition::EnteredFullDisruption]
        );
        assert!(d.all_fully_disrupted());
        assert_eq!(d.state(""), Some(ZoneState::FullDisruption));
        d.enqueue("", "a");
        assert!(d.take_allowed(secs(t0, 1000)).is_empty());
        // Staying down is not news.
        assert!(d.observe(&one_zone(&[false, false]), secs(t0, 1001)).is_empty());
        let back = d.observe(&one_zone(&[true, false]), secs(t0, 1002));
        assert_eq!(
            back,
            [Transition::ExitedFullDisruption, Transition::Zone(String::new(), ZoneState::Normal)]
        );
        assert!(!d.all_fully_disrupted());
        assert_eq!(d.state(""), Some(ZoneState::Normal));
        // What queued up while stopped goes first, at the normal rate again.
        d.enqueue("", "b");
        assert_eq!(d.take_allowed(secs(t0, 1002)), HashSet::from(["a".to_string()]));
        assert!(d.take_allowed(secs(t0, 1011)).is_empty());
        assert_eq!(d.take_allowed(secs(t0, 1012)), HashSet::from(["b".to_string()]));
    }

    #[test]
    fn one_fully_disrupted_zone_among_healthy_ones_keeps_the_normal_rate() {
        let t0 = Instant::now();
        let mut d = Disruption::new(Limits::default());
        let zones = BTreeMap::from([
            ("r:\x00:a".to_string(), vec![false, false]),
            ("r:\x00:b".to_string(), vec![true, true]),
        ]);
        let t = d.observe(&zones, t0);
        assert!(t.contains(&Transition::Zone("r:\x00:a".into(), ZoneState::FullDisruption)));
        assert!(!d.all_fully_disrupted());
        d.enqueue("r:\x00:a", "a1");
        d.enqueue("r:\x00:a", "a2");
        assert_eq!(d.take_allowed(t0).len(), 1);
        assert_eq!(d.take_allowed(secs(t0, 10)).len(), 1);
    }

    #[test]
    fn a_partially_disrupted_zone_stops_when_small_and_slows_down_when_large() {
        let t0 = Instant::now();
        let small = one_zone(&[true, false, false, false]);
        let mut d = Disruption::new(Limits::default());
        assert_eq!(
            d.observe(&small, t0),
            [Transition::Zone(String::new(), ZoneState::PartialDisruption)]
        );
        d.enqueue("", "x");
        assert!(d.take_allowed(secs(t0, 3600)).is_empty());

        let mut large_flags = vec![true; 20];
        large_flags.extend([false; 40]);
        let mut d = Disruption::new(Limits::default());
        d.observe(&one_zone(&large_flags), t0);
        for n in ["p", "q"] {
            d.enqueue("", n);
        }
        assert_eq!(d.take_allowed(t0).len(), 1);
        assert!(d.take_allowed(secs(t0, 99)).is_empty(), "0.01 nodes/s: one per 100 s");
        assert_eq!(d.take_allowed(secs(t0, 100)).len(), 1);
    }

    #[test]
    fn zones_come_from_region_and_zone_labels() {
        let node = |labels: serde_json::Value| -> Node {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n", "labels": labels}}))
                .expect("node")
        };
        assert_eq!(zone_key(&node(serde_json::json!({}))), "");
        assert_eq!(
            zone_key(&node(serde_json::json!({"topology.kubernetes.io/region": "eu",
                                               "topology.kubernetes.io/zone": "eu-1"}))),
            "eu:\x00:eu-1"
        );
    }
}
