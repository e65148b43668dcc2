//! ClusterIP and NodePort allocation by reservation keys in the store.
//!
//! Every ClusterIP and NodePort a Service holds has a key of its own,
//! `/registry/serviceallocations/clusterips/<ip>` or `…/nodeports/<port>`, whose value names the
//! owning Service (namespace, name, uid). A create or update claims the addresses it needs with
//! create-if-absent *before* the Service is written, so two writers (also two API servers on one
//! etcd) can never hand out the same one; a specified address whose key exists is refused with
//! upstream's 422. The Service write failing releases what was claimed; deleting a Service (or an
//! update dropping a port or the NodePort type) releases what it held. A random pick tries free
//! candidates one create at a time, so no create reads the other Services.
//!
//! No resource's list or watch prefix covers these keys (`/registry/services/specs/` is the
//! Services'). A crash between claim and write can leave a reservation no Service holds, and a
//! data dir written before these keys existed has Services without them: `repair` (run at server
//! start) reconciles the keys with the Services, for one list of each.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use rkube_api::resources;
use rkube_store::{ListOptions, ReadAt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::registry::Registry;
use crate::{Error, Result};

/// Every reservation key lives under this prefix.
pub const ALLOCATIONS_PREFIX: &str = "/registry/serviceallocations/";
const IP_PREFIX: &str = "/registry/serviceallocations/clusterips/";
const PORT_PREFIX: &str = "/registry/serviceallocations/nodeports/";
/// Random candidates tried before sweeping the range in order (which ends in "range is full").
const RANDOM_TRIES: u32 = 32;

fn ip_key(ip: &str) -> String {
    format!("{IP_PREFIX}{ip}")
}

fn port_key(port: i64) -> String {
    format!("{PORT_PREFIX}{port}")
}

/// The Service a reservation belongs to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

impl Owner {
    pub fn of(svc: &Value) -> Owner {
        let m = &svc["metadata"];
        let s = |f: &str| m[f].as_str().unwrap_or("").to_string();
        Owner { namespace: s("namespace"), name: s("name"), uid: s("uid") }
    }

    fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(raw: &[u8]) -> Option<Owner> {
        serde_json::from_slice(raw).ok()
    }
}

fn needs_node_ports(svc: &Value) -> bool {
    matches!(svc["spec"]["type"].as_str(), Some("NodePort" | "LoadBalancer"))
}

fn has_cluster_ip(svc: &Value) -> bool {
    svc["spec"]["type"].as_str() != Some("ExternalName")
}

/// The reservation keys a Service (as stored) holds: its ClusterIPs unless headless or
/// ExternalName, and its node ports when its type uses them.
pub fn held_keys(svc: &Value) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let spec = &svc["spec"];
    if has_cluster_ip(svc) {
        let ips = spec["clusterIPs"].as_array().into_iter().flatten().chain([&spec["clusterIP"]]);
        for ip in ips.filter_map(Value::as_str).filter(|ip| !ip.is_empty() && *ip != "None") {
            keys.insert(ip_key(ip));
        }
    }
    if needs_node_ports(svc) {
        for p in spec["ports"].as_array().into_iter().flatten() {
            if let Some(np) = p["nodePort"].as_i64().filter(|np| *np != 0) {
                keys.insert(port_key(np));
            }
        }
    }
    keys
}

enum Claim {
    /// The key was made now (or, in a dry run, is free).
    Made,
    /// The key already names this Service.
    Mine,
    Taken,
}

/// What [`Registry::repair_service_allocations`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    pub services: usize,
    pub reservations: usize,
    /// Reservations created for Services that held an address without one.
    pub created: usize,
    /// Reservations whose Service does not hold that address (any more) that were deleted.
    pub released: usize,
    /// Addresses held by two Services (only the first keeps the reservation).
    pub duplicates: usize,
}

impl Registry {
    async fn claim(&self, key: &str, owner: &Owner, dry_run: bool) -> Result<Claim> {
        // A few rounds: the key can be released between a refused create and the read.
        for _ in 0..3 {
            let existing = if dry_run {
                self.store.get(key, ReadAt::Latest).await?
            } else {
                match self.store.create(key, owner.encode()).await {
                    Ok(_) => return Ok(Claim::Made),
                    Err(rkube_store::Error::AlreadyExists) => {
                        self.store.get(key, ReadAt::Latest).await?
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            match existing {
                None if dry_run => return Ok(Claim::Made),
                None => continue,
                Some(kv) if Owner::decode(&kv.value).as_ref() == Some(owner) => {
                    return Ok(Claim::Mine);
                }
                Some(_) => return Ok(Claim::Taken),
            }
        }
        Ok(Claim::Taken)
    }

    /// Deletes those of `keys` that still name `owner` (best effort: what a failure leaves
    /// behind, the next repair removes).
    pub(crate) async fn release<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a String>,
        owner: &Owner,
    ) {
        for key in keys {
            let kv = match self.store.get(key, ReadAt::Latest).await {
                Ok(Some(kv)) => kv,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("releasing {key}: {e}");
                    continue;
                }
            };
            if Owner::decode(&kv.value).as_ref() != Some(owner) {
                continue;
            }
            match self.store.delete(key, Some(kv.mod_revision)).await {
                Ok(_) | Err(rkube_store::Error::NotFound | rkube_store::Error::Conflict { .. }) => {
                }
                Err(e) => tracing::warn!("releasing {key}: {e}"),
            }
        }
    }

    /// Fills in and claims the ClusterIP and node ports of Service `o` being created (`old`
    /// `None`) or updated from `old`. Returns the reservations made, which the caller releases
    /// if its write fails; on error nothing stays claimed. A dry run claims nothing.
    pub(crate) async fn allocate_service(
        &self,
        o: &mut Value,
        old: Option<&Value>,
        dry_run: bool,
    ) -> Result<Vec<String>> {
        let owner = Owner::of(o);
        let mut made = Vec::new();
        match self.allocate_into(o, old, dry_run, &owner, &mut made).await {
            Ok(()) => Ok(made),
            Err(e) => {
                self.release(&made, &owner).await;
                Err(e)
            }
        }
    }

    async fn allocate_into(
        &self,
        o: &mut Value,
        old: Option<&Value>,
        dry_run: bool,
        owner: &Owner,
        made: &mut Vec<String>,
    ) -> Result<()> {
        let held = old.map(held_keys).unwrap_or_default();
        // Keys this request already covers (and, in a dry run, pretends to have made).
        let mut picked: BTreeSet<String> = BTreeSet::new();
        let name = owner.name.clone();
        if has_cluster_ip(o) {
            match o["spec"]["clusterIP"].as_str() {
                Some("None") => o["spec"]["clusterIPs"] = json!(["None"]),
                Some(ip) if !ip.is_empty() => {
                    let ip = ip.to_string();
                    let key = ip_key(&ip);
                    if !held.contains(&key) {
                        self.claim_specified(&key, owner, dry_run, made, || {
                            Error::invalid(
                                "Service",
                                &name,
                                vec![(
                                    "spec.clusterIPs".into(),
                                    format!(
                                        "Invalid value: []string{{\"{ip}\"}}: failed to allocate IP {ip}: provided IP is already allocated"
                                    ),
                                )],
                            )
                        })
                        .await?;
                    }
                    picked.insert(key);
                    o["spec"]["clusterIPs"] = json!([ip]);
                }
                _ => {
                    let (base, bits) = self.service_cidr;
                    let size = 1u64 << (32 - u32::from(bits.min(32)));
                    // Neither the network address nor the broadcast address.
                    let usable = size.saturating_sub(2);
                    if usable == 0 {
                        return Err(Error::internal("no ClusterIP left in the service range"));
                    }
                    let first = (owner.namespace == "default" && owner.name == "kubernetes")
                        .then_some(0u64);
                    let ip = self
                        .pick(usable, first, owner, dry_run, &mut picked, made, |i| {
                            ip_key(
                                &std::net::Ipv4Addr::from(base.wrapping_add(1 + i as u32))
                                    .to_string(),
                            )
                        })
                        .await?
                        .ok_or_else(|| Error::internal("no ClusterIP left in the service range"))?;
                    let ip = std::net::Ipv4Addr::from(base.wrapping_add(1 + ip as u32)).to_string();
                    o["spec"]["clusterIP"] = json!(ip);
                    o["spec"]["clusterIPs"] = json!([ip]);
                }
            }
        }
        if needs_node_ports(o) {
            let (lo, hi) = self.node_port_range;
            let span = u64::from(hi.saturating_sub(lo)) + 1;
            let n = o["spec"]["ports"].as_array().map_or(0, Vec::len);
            for i in 0..n {
                match o["spec"]["ports"][i]["nodePort"].as_i64() {
                    Some(np) if np != 0 => {
                        let key = port_key(np);
                        if held.contains(&key) || picked.contains(&key) {
                            continue;
                        }
                        self.claim_specified(&key, owner, dry_run, made, || {
                            Error::invalid(
                                "Service",
                                &name,
                                vec![(
                                    format!("spec.ports[{i}].nodePort"),
                                    format!(
                                        "Invalid value: {np}: provided port is already allocated"
                                    ),
                                )],
                            )
                        })
                        .await?;
                        picked.insert(key);
                    }
                    _ => {
                        let off = self
                            .pick(span, None, owner, dry_run, &mut picked, made, |i| {
                                port_key(i64::from(lo) + i as i64)
                            })
                            .await?
                            .ok_or_else(|| Error::internal("no NodePort left"))?;
                        o["spec"]["ports"][i]["nodePort"] = json!(i64::from(lo) + off as i64);
                    }
                }
            }
        }
        Ok(())
    }

    /// Claims `key`, an address the Service names itself: `taken()` is the error when another
    /// Service holds it. A key made (not in a dry run) is recorded in `made`.
    async fn claim_specified(
        &self,
        key: &str,
        owner: &Owner,
        dry_run: bool,
        made: &mut Vec<String>,
        taken: impl FnOnce() -> Error,
    ) -> Result<()> {
        match self.claim(key, owner, dry_run).await? {
            Claim::Made if !dry_run => made.push(key.to_string()),
            Claim::Made | Claim::Mine => {}
            Claim::Taken => return Err(taken()),
        }
        Ok(())
    }

    /// Claims a free one of `count` candidates (`key(i)` for `i < count`): `first` if given,
    /// then random ones, then every one in order from a random start. Returns its index, or
    /// `None` when all are taken.
    #[allow(clippy::too_many_arguments)]
    async fn pick(
        &self,
        count: u64,
        first: Option<u64>,
        owner: &Owner,
        dry_run: bool,
        picked: &mut BTreeSet<String>,
        made: &mut Vec<String>,
        key: impl Fn(u64) -> String,
    ) -> Result<Option<u64>> {
        let start = rand::random_range(0..count);
        let candidates = first
            .into_iter()
            .chain((0..RANDOM_TRIES.min(count as u32)).map(|_| rand::random_range(0..count)))
            .chain((0..count).map(|i| (start + i) % count));
        for i in candidates {
            let k = key(i);
            if picked.contains(&k) {
                continue;
            }
            match self.claim(&k, owner, dry_run).await? {
                Claim::Made => {
                    if !dry_run {
                        made.push(k.clone());
                    }
                    picked.insert(k);
                    return Ok(Some(i));
                }
                // Held by this very Service already (an update): not a free address for
                // another of its ports.
                Claim::Mine | Claim::Taken => {}
            }
        }
        Ok(None)
    }

    /// Reconciles the reservation keys with the Services: creates the missing ones (a data
    /// dir from before reservations, or a crash) and deletes those no Service holds (a crash
    /// between claim and write). One list of Services and one of reservations.
    pub async fn repair_service_allocations(&self) -> Result<RepairReport> {
        let svc =
            resources::find("", "v1", "services").ok_or_else(|| Error::internal("no services"))?;
        let services = self.store.list(&svc.key_prefix(None), ListOptions::default()).await?;
        let reservations = self.store.list(ALLOCATIONS_PREFIX, ListOptions::default()).await?;
        let mut report = RepairReport {
            services: services.items.len(),
            reservations: reservations.items.len(),
            ..Default::default()
        };
        // Who should hold each key, from the Services.
        let mut wanted: BTreeMap<String, Owner> = BTreeMap::new();
        for kv in &services.items {
            let Ok(s) = serde_json::from_slice::<Value>(&kv.value) else { continue };
            let owner = Owner::of(&s);
            for key in held_keys(&s) {
                match wanted.get(&key) {
                    Some(first) if *first != owner => {
                        report.duplicates += 1;
                        tracing::warn!(
                            "{key} is held by both {}/{} and {}/{}",
                            first.namespace,
                            first.name,
                            owner.namespace,
                            owner.name
                        );
                    }
                    Some(_) => {}
                    None => {
                        wanted.insert(key, owner.clone());
                    }
                }
            }
        }
        let existing: BTreeMap<&str, &rkube_store::KeyValue> =
            reservations.items.iter().map(|kv| (kv.key.as_str(), kv)).collect();
        for (key, owner) in &wanted {
            match existing.get(key.as_str()) {
                None => match self.store.create(key, owner.encode()).await {
                    Ok(_) => report.created += 1,
                    Err(rkube_store::Error::AlreadyExists) => {}
                    Err(e) => return Err(e.into()),
                },
                Some(kv) if Owner::decode(&kv.value).as_ref() != Some(owner) => {
                    // Another Service's leftover (or a garbled value) where this one holds it.
                    let still_theirs = match Owner::decode(&kv.value) {
                        Some(them) => self.holds(&them, key).await?,
                        None => false,
                    };
                    if !still_theirs {
                        match self.store.update(key, owner.encode(), kv.mod_revision).await {
                            Ok(_) => report.created += 1,
                            Err(
                                rkube_store::Error::Conflict { .. } | rkube_store::Error::NotFound,
                            ) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Some(_) => {}
            }
        }
        for kv in &reservations.items {
            if wanted.contains_key(&kv.key) {
                continue;
            }
            // Looked at again: a Service written since the list keeps its reservation.
            if let Some(owner) = Owner::decode(&kv.value)
                && self.holds(&owner, &kv.key).await?
            {
                continue;
            }
            match self.store.delete(&kv.key, Some(kv.mod_revision)).await {
                Ok(_) => report.released += 1,
                Err(rkube_store::Error::Conflict { .. } | rkube_store::Error::NotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(report)
    }

    /// Whether `owner`'s Service (same uid) exists now and holds `key`.
    async fn holds(&self, owner: &Owner, key: &str) -> Result<bool> {
        let svc =
            resources::find("", "v1", "services").ok_or_else(|| Error::internal("no services"))?;
        let Some(kv) =
            self.store.get(&svc.key(Some(&owner.namespace), &owner.name), ReadAt::Latest).await?
        else {
            return Ok(false);
        };
        let Ok(s) = serde_json::from_slice::<Value>(&kv.value) else { return Ok(false) };
        Ok(Owner::of(&s) == *owner && held_keys(&s).contains(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{DeleteParams, encode};
    use rkube_api::resources::ResourceInfo;
    use std::sync::Arc;

    fn services() -> &'static ResourceInfo {
        resources::find("", "v1", "services").unwrap()
    }

    async fn registry() -> Arc<Registry> {
        let reg = Registry::new(Arc::new(rkube_store::memory::MemoryStore::new()), 300);
        let ns = resources::find("", "v1", "namespaces").unwrap();
        reg.create(ns, None, json!({"metadata": {"name": "default"}}), false).await.unwrap();
        Arc::new(reg)
    }

    fn svc(name: &str, spec: Value) -> Value {
        json!({"metadata": {"name": name}, "spec": spec})
    }

    async fn create(reg: &Registry, name: &str, spec: Value) -> Result<Value> {
        reg.create(services(), Some("default"), svc(name, spec), false).await
    }

    /// Every reservation key with the Service (`ns/name`) it names.
    async fn reservations(reg: &Registry) -> BTreeMap<String, String> {
        let page = reg.store.list(ALLOCATIONS_PREFIX, ListOptions::default()).await.unwrap();
        page.items
            .iter()
            .map(|kv| {
                let o = Owner::decode(&kv.value).unwrap();
                (kv.key.clone(), format!("{}/{}", o.namespace, o.name))
            })
            .collect()
    }

    fn message(e: Error) -> (u16, String) {
        let (code, status) = e.to_status();
        (code, status["message"].as_str().unwrap_or("").to_string())
    }

    async fn delete(reg: &Registry, name: &str) {
        let dp = DeleteParams {
            grace_period: None,
            propagation: "Background".into(),
            precondition_uid: None,
            precondition_rv: None,
            dry_run: false,
        };
        reg.delete(services(), Some("default"), name, &dp).await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_creates_get_distinct_addresses_each_reserved_for_its_service() {
        let mut reg = registry().await;
        // 400 Services in 510 addresses and 200 node ports in 250: random picks collide often.
        {
            let r = Arc::get_mut(&mut reg).unwrap();
            r.service_cidr = (u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)), 23);
            r.node_port_range = (30000, 30249);
        }
        let tasks: Vec<_> = (0..400)
            .map(|i| {
                let reg = reg.clone();
                tokio::spawn(async move {
                    let spec = if i % 2 == 0 {
                        json!({"type": "NodePort", "ports": [{"port": 80}]})
                    } else {
                        json!({"ports": [{"port": 80}]})
                    };
                    create(&reg, &format!("s{i}"), spec).await.unwrap()
                })
            })
            .collect();
        let mut ips = BTreeSet::new();
        let mut ports = BTreeSet::new();
        let mut want = BTreeMap::new();
        for t in tasks {
            let s = t.await.unwrap();
            let name = format!("default/{}", s["metadata"]["name"].as_str().unwrap());
            let ip = s["spec"]["clusterIP"].as_str().unwrap().to_string();
            assert_eq!(s["spec"]["clusterIPs"], json!([ip]));
            assert!(ip.starts_with("10.96.0.") || ip.starts_with("10.96.1."), "{ip}");
            assert!(ips.insert(ip.clone()), "{ip} handed out twice");
            want.insert(ip_key(&ip), name.clone());
            if let Some(np) = s["spec"]["ports"][0]["nodePort"].as_i64() {
                assert!((30000..=30249).contains(&np), "{np}");
                assert!(ports.insert(np), "node port {np} handed out twice");
                want.insert(port_key(np), name);
            }
        }
        assert_eq!((ips.len(), ports.len()), (400, 200));
        // The `default/kubernetes` Service is not made here: exactly the Services' keys.
        assert_eq!(reservations(&reg).await, want);
    }

    #[tokio::test]
    async fn specified_addresses_in_use_are_refused_and_freed_by_delete() {
        let reg = registry().await;
        let spec = |ip: &str, np: i64| json!({"type": "NodePort", "clusterIP": ip, "ports": [{"port": 80, "nodePort": np}]});
        create(&reg, "a", spec("10.96.0.50", 30080)).await.unwrap();
        let (code, msg) = message(create(&reg, "b", spec("10.96.0.50", 30081)).await.unwrap_err());
        assert_eq!(code, 422);
        assert_eq!(
            msg,
            "Service \"b\" is invalid: spec.clusterIPs: Invalid value: []string{\"10.96.0.50\"}: failed to allocate IP 10.96.0.50: provided IP is already allocated"
        );
        let (code, msg) = message(create(&reg, "b", spec("10.96.0.51", 30080)).await.unwrap_err());
        assert_eq!(code, 422);
        assert_eq!(
            msg,
            "Service \"b\" is invalid: spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated"
        );
        // b's refused attempts left nothing claimed (10.96.0.51 was claimed before the port).
        let only_a: BTreeMap<String, String> = [
            (ip_key("10.96.0.50"), "default/a".to_string()),
            (port_key(30080), "default/a".to_string()),
        ]
        .into();
        assert_eq!(reservations(&reg).await, only_a);
        delete(&reg, "a").await;
        assert!(reservations(&reg).await.is_empty());
        let b = create(&reg, "b", spec("10.96.0.50", 30080)).await.unwrap();
        assert_eq!(b["spec"]["clusterIP"], "10.96.0.50");
        assert_eq!(reservations(&reg).await.len(), 2);
    }

    #[tokio::test]
    async fn failed_creates_and_dry_runs_reserve_nothing() {
        let reg = registry().await;
        // Invalid: refused before anything is claimed.
        let err = create(&reg, "Not_A_Label", json!({"clusterIP": "10.96.0.9", "ports": []}))
            .await
            .unwrap_err();
        assert_eq!(message(err).0, 422);
        assert!(reservations(&reg).await.is_empty());
        // The write itself failing (the name is taken) releases what was claimed for it.
        create(&reg, "a", json!({"type": "NodePort", "ports": [{"port": 80}]})).await.unwrap();
        let before = reservations(&reg).await;
        let err = create(
            &reg,
            "a",
            json!({"type": "NodePort", "clusterIP": "10.96.0.9", "ports": [{"port": 80, "nodePort": 30999}]}),
        )
        .await
        .unwrap_err();
        assert_eq!(message(err).0, 409);
        assert_eq!(reservations(&reg).await, before);
        // A dry run fills in the addresses, checks specified ones, and claims none.
        let dry = reg
            .create(
                services(),
                Some("default"),
                svc("d", json!({"type": "NodePort", "ports": [{"port": 80}, {"port": 81}]})),
                true,
            )
            .await
            .unwrap();
        assert!(dry["spec"]["clusterIP"].as_str().is_some_and(|ip| ip.starts_with("10.")));
        let (p0, p1) = (&dry["spec"]["ports"][0]["nodePort"], &dry["spec"]["ports"][1]["nodePort"]);
        assert!(p0.is_i64() && p1.is_i64() && p0 != p1, "{p0} {p1}");
        let taken = before.keys().find(|k| k.starts_with(IP_PREFIX)).unwrap();
        let taken_ip = taken.strip_prefix(IP_PREFIX).unwrap();
        let err = reg
            .create(services(), Some("default"), svc("d", json!({"clusterIP": taken_ip})), true)
            .await
            .unwrap_err();
        assert_eq!(message(err).0, 422);
        assert_eq!(reservations(&reg).await, before);
    }

    #[tokio::test]
    async fn updates_claim_what_they_add_and_release_what_they_drop() {
        let reg = registry().await;
        let a = create(&reg, "a", json!({"clusterIP": "10.96.0.7", "ports": [{"port": 80}]}))
            .await
            .unwrap();
        assert_eq!(reservations(&reg).await.len(), 1);
        let update = |spec: Value| {
            let reg = reg.clone();
            async move {
                reg.guaranteed_update(
                    services(),
                    Some("default"),
                    "a",
                    false,
                    |old| {
                        let mut new = old.clone();
                        new["spec"] = spec.clone();
                        Ok(new)
                    },
                    None,
                )
                .await
            }
        };
        // To NodePort with two ports: both get a node port, claimed for `a`.
        let np = update(
            json!({"type": "NodePort", "ports": [{"port": 80}, {"port": 81, "nodePort": 30081}]}),
        )
        .await
        .unwrap();
        assert_eq!(np["spec"]["clusterIP"], a["spec"]["clusterIP"]);
        let p0 = np["spec"]["ports"][0]["nodePort"].as_i64().unwrap();
        assert_eq!(np["spec"]["ports"][1]["nodePort"], 30081);
        let keys = |ks: &[String]| -> BTreeMap<String, String> {
            ks.iter().map(|k| (k.clone(), "default/a".to_string())).collect()
        };
        assert_eq!(
            reservations(&reg).await,
            keys(&[ip_key("10.96.0.7"), port_key(p0), port_key(30081)])
        );
        // Another Service cannot take a port `a` holds, also not by an update.
        create(&reg, "b", json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30090}]}))
            .await
            .unwrap();
        let err = update(json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30090}]}))
            .await
            .unwrap_err();
        assert_eq!(message(err).0, 422);
        // Dropping a port releases its node port; the one left (carried over) stays.
        update(json!({"type": "NodePort", "ports": [{"port": 80}]})).await.unwrap();
        let mut want = keys(&[ip_key("10.96.0.7"), port_key(p0)]);
        want.extend(reservations(&reg).await.into_iter().filter(|(_, o)| o == "default/b"));
        assert_eq!(reservations(&reg).await, want);
        // Back to ClusterIP: no node ports any more.
        let back = update(json!({"type": "ClusterIP", "ports": [{"port": 80}]})).await.unwrap();
        assert!(back["spec"]["ports"][0]["nodePort"].is_null(), "{back}");
        assert_eq!(reservations(&reg).await.values().filter(|o| *o == "default/a").count(), 1);
        // A finalizer holds the deletion back, and the addresses with it.
        update(json!({"type": "ClusterIP", "ports": [{"port": 80}]})).await.unwrap();
        reg.guaranteed_update(
            services(),
            Some("default"),
            "a",
            false,
            |old| {
                let mut new = old.clone();
                new["metadata"]["finalizers"] = json!(["example.com/hold"]);
                Ok(new)
            },
            None,
        )
        .await
        .unwrap();
        delete(&reg, "a").await;
        assert!(reservations(&reg).await.contains_key(&ip_key("10.96.0.7")));
        reg.guaranteed_update(
            services(),
            Some("default"),
            "a",
            false,
            |old| {
                let mut new = old.clone();
                new["metadata"]["finalizers"] = json!([]);
                Ok(new)
            },
            None,
        )
        .await
        .unwrap();
        assert!(
            reg.store
                .get(&services().key(Some("default"), "a"), ReadAt::Latest)
                .await
                .unwrap()
                .is_none()
        );
        assert!(reservations(&reg).await.values().all(|o| o == "default/b"));
    }

    #[tokio::test]
    async fn repair_migrates_services_without_reservations_and_drops_orphans() {
        let reg = registry().await;
        // Services as an older build wrote them: no reservation keys.
        for (name, uid, spec) in [
            (
                "old-a",
                "u-a",
                json!({"type": "ClusterIP", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "ports": [{"port": 80}]}),
            ),
            (
                "old-b",
                "u-b",
                json!({"type": "NodePort", "clusterIP": "10.96.0.21", "clusterIPs": ["10.96.0.21"], "ports": [{"port": 80, "nodePort": 30021}]}),
            ),
            (
                "old-h",
                "u-h",
                json!({"type": "ClusterIP", "clusterIP": "None", "clusterIPs": ["None"]}),
            ),
            ("old-x", "u-x", json!({"type": "ExternalName", "externalName": "example.com"})),
        ] {
            let o = json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "default", "uid": uid}, "spec": spec});
            reg.store
                .create(&services().key(Some("default"), name), encode(&o).unwrap())
                .await
                .unwrap();
        }
        // An orphan: claimed by a create that never wrote its Service.
        let gone = Owner { namespace: "default".into(), name: "never".into(), uid: "u-n".into() };
        reg.store.create(&ip_key("10.96.0.30"), gone.encode()).await.unwrap();
        // A stale one: `old-a`'s address, but naming a Service that is gone.
        reg.store.create(&port_key(30021), gone.encode()).await.unwrap();
        let report = reg.repair_service_allocations().await.unwrap();
        assert_eq!(
            report,
            RepairReport { services: 4, reservations: 2, created: 3, released: 1, duplicates: 0 }
        );
        let want: BTreeMap<String, String> = [
            (ip_key("10.96.0.20"), "default/old-a".to_string()),
            (ip_key("10.96.0.21"), "default/old-b".to_string()),
            (port_key(30021), "default/old-b".to_string()),
        ]
        .into();
        assert_eq!(reservations(&reg).await, want);
        // A second run finds nothing to do; the migrated addresses are now refused.
        let again = reg.repair_service_allocations().await.unwrap();
        assert_eq!((again.created, again.released), (0, 0));
        let err = create(&reg, "new", json!({"clusterIP": "10.96.0.21"})).await.unwrap_err();
        assert_eq!(message(err).0, 422);
        create(&reg, "new", json!({"clusterIP": "10.96.0.30"})).await.unwrap();
        // Deleting a migrated Service releases its reservations like any other.
        delete(&reg, "old-b").await;
        assert!(reservations(&reg).await.values().all(|o| o != "default/old-b"));
    }
}
