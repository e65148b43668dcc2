//! The Services and EndpointSlices the proxy's watches report, filed by Service, with the
//! Services whose objects changed since the loop last looked: so a change costs the loop what
//! changed, not a pass over every object.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;

use crate::rules::service_of;

/// Shared between the two watch tasks (writers) and the proxy's loop (reader).
#[derive(Default)]
pub(crate) struct Cache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Services by `namespace/name`.
    services: HashMap<String, Arc<Service>>,
    /// Slices by the Service they belong to (`namespace/service`), then by slice name.
    slices: HashMap<String, BTreeMap<String, Arc<EndpointSlice>>>,
    /// The Service each slice (`namespace/name`) is filed under.
    slice_owner: HashMap<String, String>,
    /// Services whose objects changed since the last [`Cache::take`].
    dirty: HashSet<String>,
    /// Everything may have changed (a watch listed afresh): the next take returns everything.
    all_dirty: bool,
    /// The highest resourceVersion among the events taken in.
    newest: u64,
    /// Objects of a listing in progress (between `Init` and `InitDone`).
    listing_services: Option<Vec<Arc<Service>>>,
    listing_slices: Option<Vec<Arc<EndpointSlice>>>,
    services_listed: bool,
    slices_listed: bool,
}

/// What changed, as [`Cache::take`] returns it.
pub(crate) enum Taken {
    /// Everything (after a listing): every Service and every slice.
    All { services: Vec<Arc<Service>>, slices: Vec<Arc<EndpointSlice>> },
    /// These Services (`namespace/name`), each with its Service (None: gone) and its slices.
    Changed(Vec<Objects>),
}

/// A Service's key (`namespace/name`), the Service (None: none) and its slices.
pub(crate) type Objects = (String, Option<Arc<Service>>, Vec<Arc<EndpointSlice>>);

fn version(meta: &kube::api::ObjectMeta) -> u64 {
    meta.resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn key(meta: &kube::api::ObjectMeta) -> Option<String> {
    Some(format!("{}/{}", meta.namespace.as_deref()?, meta.name.as_deref()?))
}

/// The Service a slice is filed under; None for slices of no Service (no label).
fn owner(slice: &EndpointSlice) -> Option<String> {
    Some(format!("{}/{}", slice.metadata.namespace.as_deref()?, service_of(slice)?))
}

impl Cache {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain maps behind: still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether both watches have listed everything once.
    pub(crate) fn listed(&self) -> bool {
        let i = self.lock();
        i.services_listed && i.slices_listed
    }

    /// Takes in a Service watch event; true when it may change the rules.
    pub(crate) fn service_event(&self, event: Event<Service>) -> bool {
        let mut i = self.lock();
        let (svc, present) = match event {
            Event::Apply(s) => (s, true),
            Event::Delete(s) => (s, false),
            Event::Init => {
                i.listing_services = Some(Vec::new());
                return false;
            }
            Event::InitApply(s) => {
                if let Some(l) = i.listing_services.as_mut() {
                    l.push(Arc::new(s));
                }
                return false;
            }
            Event::InitDone => {
                let listed = i.listing_services.take().unwrap_or_default();
                let newest = listed.iter().map(|s| version(&s.metadata)).max().unwrap_or(0);
                i.newest = i.newest.max(newest);
                i.services =
                    listed.into_iter().filter_map(|s| Some((key(&s.metadata)?, s))).collect();
                i.all_dirty = true;
                i.services_listed = true;
                return true;
            }
        };
        let Some(k) = key(&svc.metadata) else { return false };
        i.newest = i.newest.max(version(&svc.metadata));
        if present {
            i.services.insert(k.clone(), Arc::new(svc));
        } else {
            i.services.remove(&k);
        }
        i.dirty.insert(k);
        true
    }

    /// Takes in an EndpointSlice watch event; true when it may change the rules.
    pub(crate) fn slice_event(&self, event: Event<EndpointSlice>) -> bool {
        let mut i = self.lock();
        let (slice, present) = match event {
            Event::Apply(s) => (s, true),
            Event::Delete(s) => (s, false),
            Event::Init => {
                i.listing_slices = Some(Vec::new());
                return false;
            }
            Event::InitApply(s) => {
                if let Some(l) = i.listing_slices.as_mut() {
                    l.push(Arc::new(s));
                }
                return false;
            }
            Event::InitDone => {
                let listed = i.listing_slices.take().unwrap_or_default();
                let newest = listed.iter().map(|s| version(&s.metadata)).max().unwrap_or(0);
                i.newest = i.newest.max(newest);
                i.slices.clear();
                i.slice_owner.clear();
                for s in listed {
                    if let Some(k) = key(&s.metadata) {
                        i.file(k, s);
                    }
                }
                i.all_dirty = true;
                i.slices_listed = true;
                return true;
            }
        };
        let Some(k) = key(&slice.metadata) else { return false };
        i.newest = i.newest.max(version(&slice.metadata));
        // Out of the Service it was filed under (its label may have changed), into its own.
        i.unfile(&k);
        if present {
            i.file(k, Arc::new(slice));
        }
        true
    }

    /// What changed since the last take, and the highest resourceVersion taken in so far.
    pub(crate) fn take(&self) -> (Taken, u64) {
        let mut i = self.lock();
        let newest = i.newest;
        if std::mem::take(&mut i.all_dirty) {
            i.dirty.clear();
            let services = i.services.values().cloned().collect();
            let slices = i.slices.values().flat_map(|m| m.values().cloned()).collect();
            return (Taken::All { services, slices }, newest);
        }
        let dirty = std::mem::take(&mut i.dirty);
        let changed = dirty
            .into_iter()
            .map(|k| {
                let svc = i.services.get(&k).cloned();
                let slices =
                    i.slices.get(&k).map(|m| m.values().cloned().collect()).unwrap_or_default();
                (k, svc, slices)
            })
            .collect();
        (Taken::Changed(changed), newest)
    }
}

impl Inner {
    /// Files slice `k` under its Service (slices of no Service are not kept).
    fn file(&mut self, k: String, slice: Arc<EndpointSlice>) {
        let Some(svc) = owner(&slice) else { return };
        let name = slice.metadata.name.clone().unwrap_or_default();
        self.slices.entry(svc.clone()).or_default().insert(name, slice);
        self.slice_owner.insert(k, svc.clone());
        self.dirty.insert(svc);
    }

    /// Takes slice `k` out of the Service it is filed under.
    fn unfile(&mut self, k: &str) {
        let Some(svc) = self.slice_owner.remove(k) else { return };
        let name = k.split_once('/').map_or(k, |(_, n)| n);
        if let Some(m) = self.slices.get_mut(&svc) {
            m.remove(name);
            if m.is_empty() {
                self.slices.remove(&svc);
            }
        }
        self.dirty.insert(svc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(name: &str, rv: u32) -> Service {
        serde_json::from_value(json!({"metadata": {"namespace": "d", "name": name,
            "resourceVersion": rv.to_string()}}))
        .expect("service")
    }

    fn slice(name: &str, service: &str, rv: u32) -> EndpointSlice {
        serde_json::from_value(json!({"metadata": {"namespace": "d", "name": name,
            "resourceVersion": rv.to_string(),
            "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "endpoints": []}))
        .expect("slice")
    }

    /// The keys of a `Taken::Changed`, sorted, each with its slice count.
    fn changed(t: Taken) -> Vec<(String, bool, usize)> {
        let Taken::Changed(mut v) = t else { panic!("expected only changes") };
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(k, s, sl)| (k, s.is_some(), sl.len())).collect()
    }

    #[test]
    fn a_listing_gives_everything_then_only_what_changed() {
        let c = Cache::default();
        assert!(!c.service_event(Event::Init));
        assert!(!c.service_event(Event::InitApply(svc("a", 1))));
        assert!(c.service_event(Event::InitDone));
        assert!(!c.listed(), "slices are not listed yet");
        c.slice_event(Event::Init);
        c.slice_event(Event::InitApply(slice("a-1", "a", 2)));
        assert!(c.slice_event(Event::InitDone));
        assert!(c.listed());
        let (t, newest) = c.take();
        assert!(
            matches!(t, Taken::All { ref services, ref slices } if services.len() == 1 && slices.len() == 1)
        );
        assert_eq!(newest, 2);
        assert!(changed(c.take().0).is_empty());
        // A new Service, and a slice that moves from a to b: a and b both change.
        c.service_event(Event::Apply(svc("b", 3)));
        c.slice_event(Event::Apply(slice("a-1", "b", 4)));
        let (t, newest) = c.take();
        assert_eq!(changed(t), [("d/a".into(), true, 0), ("d/b".into(), true, 1)]);
        assert_eq!(newest, 4);
        // Deletions.
        c.service_event(Event::Delete(svc("a", 5)));
        c.slice_event(Event::Delete(slice("a-1", "b", 6)));
        assert_eq!(changed(c.take().0), [("d/a".into(), false, 0), ("d/b".into(), true, 0)]);
    }
}
