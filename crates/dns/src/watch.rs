//! The watch caches: one kube-runtime watcher each on Services and EndpointSlices, applied to
//! the in-memory zone as events arrive, so queries never wait on the API.

use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::index::{Index, ServiceDigest, SliceDigest};

/// How one kind of object lands in the index.
trait Kind: Clone + std::fmt::Debug + Send + 'static {
    type Digest: Send;
    fn digest(&self) -> Option<Self::Digest>;
    fn apply(index: &mut Index, ns: &str, name: &str, digest: Option<Self::Digest>);
    fn replace(index: &mut Index, all: Vec<(String, String, Self::Digest)>);
}

impl Kind for Service {
    type Digest = ServiceDigest;
    fn digest(&self) -> Option<ServiceDigest> {
        Some(ServiceDigest::from_service(self))
    }
    fn apply(index: &mut Index, ns: &str, name: &str, digest: Option<ServiceDigest>) {
        match digest {
            Some(d) => index.apply_service(ns, name, d),
            None => index.delete_service(ns, name),
        }
    }
    fn replace(index: &mut Index, all: Vec<(String, String, ServiceDigest)>) {
        index.replace_services(all)
    }
}

impl Kind for EndpointSlice {
    type Digest = SliceDigest;
    fn digest(&self) -> Option<SliceDigest> {
        SliceDigest::from_slice(self)
    }
    fn apply(index: &mut Index, ns: &str, name: &str, digest: Option<SliceDigest>) {
        index.apply_slice(ns, name, digest)
    }
    fn replace(index: &mut Index, all: Vec<(String, String, SliceDigest)>) {
        index.replace_slices(all)
    }
}

/// Starts both watches; they run until `shutdown`.
pub(crate) fn start(client: Client, index: Arc<RwLock<Index>>, shutdown: CancellationToken) {
    tokio::spawn(run(Api::<Service>::all(client.clone()), index.clone(), shutdown.clone()));
    tokio::spawn(run(Api::<EndpointSlice>::all(client), index, shutdown));
}

fn serial_now() -> u32 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    u32::try_from(secs).unwrap_or(u32::MAX)
}

async fn run<K>(api: Api<K>, index: Arc<RwLock<Index>>, shutdown: CancellationToken)
where
    K: Kind + kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned + Sync,
{
    // A relist's objects, held until it is complete so queries never see half of one.
    let mut relist: Vec<(String, String, K::Digest)> = Vec::new();
    rkube_client::watch::follow(api, watcher::Config::default(), shutdown, move |event| {
        let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
        match event {
            Event::Init => relist.clear(),
            Event::InitApply(o) => {
                if let Some(d) = o.digest() {
                    let (ns, name) = key(&o);
                    relist.push((ns, name, d));
                }
            }
            Event::InitDone => {
                let mut ix = index.write().unwrap_or_else(|e| e.into_inner());
                K::replace(&mut ix, std::mem::take(&mut relist));
                ix.set_serial(serial_now());
                tracing::debug!(kind = %K::kind(&()), "watch: synced");
            }
            Event::Apply(o) => {
                let (ns, name) = key(&o);
                let d = o.digest();
                let mut ix = index.write().unwrap_or_else(|e| e.into_inner());
                K::apply(&mut ix, &ns, &name, d);
                ix.set_serial(serial_now());
            }
            Event::Delete(o) => {
                let (ns, name) = key(&o);
                let mut ix = index.write().unwrap_or_else(|e| e.into_inner());
                K::apply(&mut ix, &ns, &name, None);
                ix.set_serial(serial_now());
            }
        }
    })
    .await
}
