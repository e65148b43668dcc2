//! The cluster zone in memory: Services and EndpointSlices digested into what DNS needs, and the
//! pure name → records logic over it. The watch feeds it; every query reads it, never the API.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The schema version of the Kubernetes DNS specification these records follow, served as
/// `dns-version.<zone>` TXT as the specification asks.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// `(namespace, name)`; Kubernetes names are lowercase DNS labels already, so queries are
/// lowercased and compared exactly.
type Key = (String, String);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port {
    /// Lowercase; empty for an unnamed port (which gets no SRV record).
    pub name: String,
    /// Lowercase, as it appears in `_<proto>`: `tcp`, `udp`, `sctp`.
    pub protocol: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceKind {
    /// `clusterIP` (all of `clusterIPs` for dual-stack); empty while not yet allocated.
    ClusterIp(Vec<IpAddr>),
    /// `clusterIP: None`: names resolve to the endpoints themselves.
    Headless,
    /// `type: ExternalName`: a CNAME to this name.
    ExternalName(String),
}

/// What DNS needs of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDigest {
    pub kind: ServiceKind,
    pub ports: Vec<Port>,
    pub publish_not_ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointDigest {
    pub addresses: Vec<IpAddr>,
    pub hostname: Option<String>,
    pub ready: bool,
}

/// What DNS needs of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceDigest {
    pub service: String,
    pub ports: Vec<Port>,
    pub endpoints: Vec<EndpointDigest>,
}

impl ServiceDigest {
    pub fn from_service(svc: &Service) -> ServiceDigest {
        let spec = svc.spec.clone().unwrap_or_default();
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(Port {
                    name: p.name.clone().unwrap_or_default().to_ascii_lowercase(),
                    protocol: p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase(),
                    port: u16::try_from(p.port).ok()?,
                })
            })
            .collect();
        let kind = if spec.type_.as_deref() == Some("ExternalName") {
            ServiceKind::ExternalName(spec.external_name.unwrap_or_default())
        } else {
            let ips: Vec<String> = match spec.cluster_ips.filter(|v| !v.is_empty()) {
                Some(ips) => ips,
                None => spec.cluster_ip.into_iter().collect(),
            };
            if ips.iter().any(|ip| ip.eq_ignore_ascii_case("None")) {
                ServiceKind::Headless
            } else {
                ServiceKind::ClusterIp(ips.iter().filter_map(|ip| ip.parse().ok()).collect())
            }
        };
        ServiceDigest {
            kind,
            ports,
            publish_not_ready: spec.publish_not_ready_addresses == Some(true),
        }
    }
}

impl SliceDigest {
    /// None for slices DNS cannot use: no owning Service label, or FQDN addresses.
    pub fn from_slice(slice: &EndpointSlice) -> Option<SliceDigest> {
        let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone();
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            return None;
        }
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(Port {
                    name: p.name.clone().unwrap_or_default().to_ascii_lowercase(),
                    protocol: p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase(),
                    port: u16::try_from(p.port?).ok()?,
                })
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .map(|e| EndpointDigest {
                addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                hostname: e.hostname.as_ref().map(|h| h.to_ascii_lowercase()),
                // The API says an unset `ready` means ready.
                ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            })
            .collect();
        Some(SliceDigest { service, ports, endpoints })
    }
}

/// One published endpoint of a Service, under its DNS name (`hostname`, or the dashed address
/// when it has none: the "unique, system-assigned identifier" the specification asks for).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Endpoint {
    addresses: BTreeSet<IpAddr>,
    ports: BTreeSet<Port>,
    /// Whether the name came from the endpoint's own `hostname` (those get PTR records).
    named: bool,
}

/// A Service with its slices folded in: everything a query about it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Derived {
    kind: ServiceKind,
    ports: Vec<Port>,
    endpoints: BTreeMap<String, Endpoint>,
}

impl Derived {
    fn new(svc: &ServiceDigest, slices: &[&SliceDigest]) -> Derived {
        let mut endpoints: BTreeMap<String, Endpoint> = BTreeMap::new();
        for slice in slices {
            for ep in &slice.endpoints {
                if !(ep.ready || svc.publish_not_ready) {
                    continue;
                }
                let Some(first) = ep.addresses.first() else { continue };
                let (host, named) = match &ep.hostname {
                    Some(h) if !h.is_empty() => (h.clone(), true),
                    _ => (dashed(first), false),
                };
                let entry = endpoints.entry(host).or_default();
                entry.addresses.extend(ep.addresses.iter().copied());
                entry.ports.extend(slice.ports.iter().cloned());
                entry.named |= named;
            }
        }
        Derived { kind: svc.kind.clone(), ports: svc.ports.clone(), endpoints }
    }

    /// Addresses the bare service name resolves to.
    fn addresses(&self) -> BTreeSet<IpAddr> {
        match &self.kind {
            ServiceKind::ClusterIp(ips) => ips.iter().copied().collect(),
            ServiceKind::Headless => {
                self.endpoints.values().flat_map(|e| e.addresses.iter().copied()).collect()
            }
            ServiceKind::ExternalName(_) => BTreeSet::new(),
        }
    }

    /// Reverse names (relative to the zone) this Service owns: its ClusterIPs, and for a
    /// headless Service the endpoints that carry a hostname, as the specification lists.
    fn reverse(&self, svc: &str, ns: &str) -> Vec<(IpAddr, String)> {
        match &self.kind {
            ServiceKind::ClusterIp(ips) => {
                ips.iter().map(|ip| (*ip, format!("{svc}.{ns}.svc"))).collect()
            }
            ServiceKind::Headless => self
                .endpoints
                .iter()
                .filter(|(_, e)| e.named)
                .flat_map(|(host, e)| {
                    e.addresses.iter().map(move |ip| (*ip, format!("{host}.{svc}.{ns}.svc")))
                })
                .collect(),
            ServiceKind::ExternalName(_) => Vec::new(),
        }
    }
}

/// `10.1.2.3` → `10-1-2-3`; `fd00::1` → `fd00--1`, as pod and endpoint names spell addresses.
pub fn dashed(ip: &IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// The inverse of [`dashed`]; None unless the label is a well-formed address.
pub fn undashed(label: &str) -> Option<IpAddr> {
    // A label can hold any byte: `10.0.0.1` as one label is not a dashed address.
    if label.contains(['.', ':']) {
        return None;
    }
    if let Ok(v4) = label.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    label.replace('-', ":").parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// What the zone says about a question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// NOERROR with these records (answers may be empty: NODATA, answered with the SOA).
    Records { answers: Vec<Record>, additionals: Vec<Record> },
    /// The name does not exist (NXDOMAIN, with the SOA).
    NxDomain,
    /// The caches have not finished their first list: we cannot know (SERVFAIL, so that
    /// clients retry instead of caching a wrong NXDOMAIN).
    NotReady,
    /// Not a name of ours (a reverse name of an address the cluster does not own): forward it.
    NotOurs,
}

impl Answer {
    fn nodata() -> Answer {
        Answer::Records { answers: Vec::new(), additionals: Vec::new() }
    }
    fn answers(answers: Vec<Record>) -> Answer {
        Answer::Records { answers, additionals: Vec::new() }
    }
}

/// The in-memory zone.
///
/// # Guarantees
/// Queries see each Service together with all slices applied so far; a relist (`replace_*`)
/// swaps the whole set at once, so a query never sees half a relist.
#[derive(Debug)]
pub struct Index {
    zone: Name,
    ttl: u32,
    services: HashMap<Key, ServiceDigest>,
    slices: HashMap<Key, SliceDigest>,
    /// (namespace, service) → names of its slices.
    slices_of: HashMap<Key, BTreeSet<String>>,
    derived: HashMap<Key, Arc<Derived>>,
    reverse: HashMap<IpAddr, BTreeSet<String>>,
    /// Services per namespace, so `<ns>.svc.<zone>` is an empty non-terminal, not NXDOMAIN.
    namespaces: HashMap<String, usize>,
    services_synced: bool,
    slices_synced: bool,
    serial: u32,
}

impl Index {
    /// `zone` like `cluster.local`; `ttl` for every record (and the SOA's negative TTL).
    pub fn new(zone: &Name, ttl: Duration) -> Index {
        let mut zone = zone.to_lowercase();
        zone.set_fqdn(true);
        Index {
            zone,
            ttl: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_of: HashMap::new(),
            derived: HashMap::new(),
            reverse: HashMap::new(),
            namespaces: HashMap::new(),
            services_synced: false,
            slices_synced: false,
            serial: 1,
        }
    }

    pub fn zone(&self) -> &Name {
        &self.zone
    }

    pub fn ready(&self) -> bool {
        self.services_synced && self.slices_synced
    }

    /// Records that the zone changed at `serial` (the SOA serial: seconds since the epoch).
    pub fn set_serial(&mut self, serial: u32) {
        self.serial = serial.max(self.serial.wrapping_add(1));
    }

    pub fn apply_service(&mut self, ns: &str, name: &str, svc: ServiceDigest) {
        let key = (ns.to_string(), name.to_string());
        if self.services.insert(key.clone(), svc).is_none() {
            *self.namespaces.entry(key.0.clone()).or_default() += 1;
        }
        self.rederive(&key);
    }

    pub fn delete_service(&mut self, ns: &str, name: &str) {
        let key = (ns.to_string(), name.to_string());
        if self.services.remove(&key).is_some()
            && let Some(n) = self.namespaces.get_mut(ns)
        {
            *n -= 1;
            if *n == 0 {
                self.namespaces.remove(ns);
            }
        }
        self.rederive(&key);
    }

    /// A relist: the complete set of Services replaces what was known.
    pub fn replace_services(&mut self, all: Vec<(String, String, ServiceDigest)>) {
        let old: Vec<Key> = self.services.keys().cloned().collect();
        self.services.clear();
        self.namespaces.clear();
        for (ns, name, svc) in all {
            *self.namespaces.entry(ns.clone()).or_default() += 1;
            self.services.insert((ns, name), svc);
        }
        let keys: BTreeSet<Key> = old.into_iter().chain(self.services.keys().cloned()).collect();
        for key in keys {
            self.rederive(&key);
        }
        self.services_synced = true;
    }

    /// `slice` None: the slice was deleted, or is not one DNS can use.
    pub fn apply_slice(&mut self, ns: &str, name: &str, slice: Option<SliceDigest>) {
        let key = (ns.to_string(), name.to_string());
        let old = self.slices.remove(&key).map(|s| s.service);
        if let Some(old_svc) = &old {
            let svc_key = (ns.to_string(), old_svc.clone());
            if let Some(set) = self.slices_of.get_mut(&svc_key) {
                set.remove(name);
                if set.is_empty() {
                    self.slices_of.remove(&svc_key);
                }
            }
        }
        let new = slice.as_ref().map(|s| s.service.clone());
        if let Some(slice) = slice {
            self.slices_of
                .entry((ns.to_string(), slice.service.clone()))
                .or_default()
                .insert(name.to_string());
            self.slices.insert(key, slice);
        }
        for svc in old.into_iter().chain(new).collect::<BTreeSet<_>>() {
            self.rederive(&(ns.to_string(), svc));
        }
    }

    /// A relist of EndpointSlices.
    pub fn replace_slices(&mut self, all: Vec<(String, String, SliceDigest)>) {
        let mut touched: BTreeSet<Key> =
            self.slices.iter().map(|((ns, _), s)| (ns.clone(), s.service.clone())).collect();
        self.slices.clear();
        self.slices_of.clear();
        for (ns, name, slice) in all {
            let svc_key = (ns.clone(), slice.service.clone());
            self.slices_of.entry(svc_key.clone()).or_default().insert(name.clone());
            touched.insert(svc_key);
            self.slices.insert((ns, name), slice);
        }
        for key in touched {
            self.rederive(&key);
        }
        self.slices_synced = true;
    }

    /// Recomputes one Service's records and its reverse entries.
    fn rederive(&mut self, key: &Key) {
        let new = self.services.get(key).map(|svc| {
            let slices: Vec<&SliceDigest> = self
                .slices_of
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|n| self.slices.get(&(key.0.clone(), n.clone())))
                .collect();
            Arc::new(Derived::new(svc, &slices))
        });
        let old = match &new {
            Some(d) => self.derived.insert(key.clone(), d.clone()),
            None => self.derived.remove(key),
        };
        if old.as_deref() == new.as_deref() {
            return;
        }
        for (ip, name) in old.iter().flat_map(|d| d.reverse(&key.1, &key.0)) {
            if let Some(set) = self.reverse.get_mut(&ip) {
                set.remove(&name);
                if set.is_empty() {
                    self.reverse.remove(&ip);
                }
            }
        }
        for (ip, name) in new.iter().flat_map(|d| d.reverse(&key.1, &key.0)) {
            self.reverse.entry(ip).or_default().insert(name);
        }
    }

    /// The zone's SOA record (for answers to SOA, and the authority section of negative ones).
    pub fn soa(&self) -> Record {
        let mname = self.name_in_zone("ns.dns").unwrap_or_else(|| self.zone.clone());
        let rname = self.name_in_zone("hostmaster").unwrap_or_else(|| self.zone.clone());
        // refresh/retry/expire as CoreDNS sets them; the minimum (negative TTL) is our TTL.
        let soa = SOA::new(mname, rname, self.serial, 7200, 1800, 86400, self.ttl);
        Record::from_rdata(self.zone.clone(), self.ttl, RData::SOA(soa))
    }

    /// `relative` + the zone, as an absolute name.
    fn name_in_zone(&self, relative: &str) -> Option<Name> {
        Name::from_ascii(relative).ok()?.append_domain(&self.zone).ok()
    }

    /// Answers `qname`/`qtype`; `qname` must be inside the zone or a reverse (`.arpa`) name.
    pub fn resolve(&self, qname: &Name, qtype: RecordType) -> Answer {
        if !self.ready() {
            return Answer::NotReady;
        }
        if !self.zone.zone_of(qname) {
            return self.resolve_reverse(qname, qtype);
        }
        let labels: Vec<String> = qname
            .iter()
            .take(qname.iter().count().saturating_sub(self.zone.iter().count()))
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .collect();
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        let rec = |rdata: RData| Record::from_rdata(qname.clone(), self.ttl, rdata);
        match l.as_slice() {
            [] => match qtype {
                RecordType::SOA => Answer::answers(vec![self.soa()]),
                RecordType::NS => Answer::answers(
                    self.name_in_zone("ns.dns")
                        .map(|n| rec(RData::NS(NS(n))))
                        .into_iter()
                        .collect(),
                ),
                _ => Answer::nodata(),
            },
            ["dns-version"] => match qtype {
                RecordType::TXT | RecordType::ANY => {
                    Answer::answers(vec![rec(RData::TXT(TXT::new(vec![SCHEMA_VERSION.into()])))])
                }
                _ => Answer::nodata(),
            },
            // The nameserver the SOA and NS name: the kube-dns Service, when it exists.
            ["ns", "dns"] => {
                let addrs = self
                    .derived
                    .get(&("kube-system".to_string(), "kube-dns".to_string()))
                    .map(|d| d.addresses())
                    .unwrap_or_default();
                Answer::answers(address_records(qname, self.ttl, &addrs, qtype))
            }
            ["dns"] | ["svc"] | ["pod"] | [_, "pod"] => Answer::nodata(),
            [ns, "svc"] if self.namespaces.contains_key(*ns) => Answer::nodata(),
            [pod, _ns, "pod"] => match undashed(pod) {
                Some(ip) => Answer::answers(address_records(qname, self.ttl, &[ip].into(), qtype)),
                None => Answer::NxDomain,
            },
            [svc, ns, "svc"] => self.resolve_service(qname, ns, svc, qtype),
            [host, svc, ns, "svc"] => self.resolve_endpoint(qname, ns, svc, host, qtype),
            [port, proto, svc, ns, "svc"] => self.resolve_srv(qname, ns, svc, port, proto, qtype),
            _ => Answer::NxDomain,
        }
    }

    fn service(&self, ns: &str, svc: &str) -> Option<&Derived> {
        self.derived.get(&(ns.to_string(), svc.to_string())).map(|d| &**d)
    }

    fn resolve_service(&self, qname: &Name, ns: &str, svc: &str, qtype: RecordType) -> Answer {
        let Some(d) = self.service(ns, svc) else { return Answer::NxDomain };
        if let ServiceKind::ExternalName(target) = &d.kind {
            return self.cname(qname, target);
        }
        match qtype {
            RecordType::SRV => {
                let ports: Vec<&Port> = d.ports.iter().filter(|p| !p.name.is_empty()).collect();
                self.srv_answer(
                    qname,
                    ns,
                    svc,
                    d,
                    |p| ports.iter().any(|q| q.name == p.name && q.protocol == p.protocol),
                    &ports,
                )
            }
            _ => Answer::answers(address_records(qname, self.ttl, &d.addresses(), qtype)),
        }
    }

    fn resolve_endpoint(
        &self,
        qname: &Name,
        ns: &str,
        svc: &str,
        host: &str,
        qtype: RecordType,
    ) -> Answer {
        let Some(d) = self.service(ns, svc) else { return Answer::NxDomain };
        // `_<proto>.<svc>…` is an empty non-terminal above the service's SRV names.
        if let Some(proto) = host.strip_prefix('_') {
            return if d.ports.iter().any(|p| !p.name.is_empty() && p.protocol == proto) {
                Answer::nodata()
            } else {
                Answer::NxDomain
            };
        }
        match (&d.kind, d.endpoints.get(host)) {
            (ServiceKind::ExternalName(_), _) | (_, None) => Answer::NxDomain,
            (_, Some(ep)) => {
                Answer::answers(address_records(qname, self.ttl, &ep.addresses, qtype))
            }
        }
    }

    fn resolve_srv(
        &self,
        qname: &Name,
        ns: &str,
        svc: &str,
        port: &str,
        proto: &str,
        qtype: RecordType,
    ) -> Answer {
        let Some(d) = self.service(ns, svc) else { return Answer::NxDomain };
        let (Some(port), Some(proto)) = (port.strip_prefix('_'), proto.strip_prefix('_')) else {
            return Answer::NxDomain;
        };
        let wanted = |p: &Port| !p.name.is_empty() && p.name == port && p.protocol == proto;
        let ports: Vec<&Port> = d.ports.iter().filter(|p| wanted(p)).collect();
        if ports.is_empty() {
            return Answer::NxDomain;
        }
        if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
            return Answer::nodata();
        }
        self.srv_answer(qname, ns, svc, d, wanted, &ports)
    }

    /// SRV records for the service's `ports` (ClusterIP: one per port, to the service name;
    /// headless: one per endpoint and port, to the endpoint's name, with the endpoint's port
    /// numbers), and the address records of the targets in the additional section.
    fn srv_answer(
        &self,
        qname: &Name,
        ns: &str,
        svc: &str,
        d: &Derived,
        wanted: impl Fn(&Port) -> bool,
        ports: &[&Port],
    ) -> Answer {
        let mut targets: Vec<(Name, u16, BTreeSet<IpAddr>)> = Vec::new();
        match &d.kind {
            ServiceKind::ExternalName(target) => {
                if let Some(t) = absolute(target) {
                    targets.extend(ports.iter().map(|p| (t.clone(), p.port, BTreeSet::new())));
                }
            }
            ServiceKind::ClusterIp(_) => {
                if let Some(t) = self.name_in_zone(&format!("{svc}.{ns}.svc")) {
                    let addrs = d.addresses();
                    targets.extend(ports.iter().map(|p| (t.clone(), p.port, addrs.clone())));
                }
            }
            ServiceKind::Headless => {
                for (host, ep) in &d.endpoints {
                    let Some(t) = self.name_in_zone(&format!("{host}.{svc}.{ns}.svc")) else {
                        continue;
                    };
                    for p in ep.ports.iter().filter(|p| wanted(p)) {
                        targets.push((t.clone(), p.port, ep.addresses.clone()));
                    }
                }
            }
        }
        // Equal priority, weights sharing 100 as CoreDNS does, so clients spread load evenly.
        let weight = u16::try_from(100 / targets.len().max(1)).unwrap_or(1).max(1);
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        let mut seen = BTreeSet::new();
        for (target, port, addrs) in targets {
            answers.push(Record::from_rdata(
                qname.clone(),
                self.ttl,
                RData::SRV(SRV::new(0, weight, port, target.clone())),
            ));
            if seen.insert(target.clone()) {
                additionals.extend(address_records(&target, self.ttl, &addrs, RecordType::ANY));
            }
        }
        Answer::Records { answers, additionals }
    }

    fn cname(&self, qname: &Name, target: &str) -> Answer {
        match absolute(target) {
            Some(t) => Answer::answers(vec![Record::from_rdata(
                qname.clone(),
                self.ttl,
                RData::CNAME(CNAME(t)),
            )]),
            None => Answer::nodata(),
        }
    }

    /// PTR for the addresses the cluster owns; anything else is the upstream's business.
    fn resolve_reverse(&self, qname: &Name, qtype: RecordType) -> Answer {
        let Some(names) = reverse_ip(qname).and_then(|ip| self.reverse.get(&ip)) else {
            return Answer::NotOurs;
        };
        if !matches!(qtype, RecordType::PTR | RecordType::ANY) {
            return Answer::nodata();
        }
        Answer::answers(
            names
                .iter()
                .filter_map(|n| self.name_in_zone(n))
                .map(|n| Record::from_rdata(qname.clone(), self.ttl, RData::PTR(PTR(n))))
                .collect(),
        )
    }
}

/// A or AAAA records (both for ANY) for `addrs` under `name`; none for other types.
fn address_records(
    name: &Name,
    ttl: u32,
    addrs: &BTreeSet<IpAddr>,
    qtype: RecordType,
) -> Vec<Record> {
    addrs
        .iter()
        .filter_map(|ip| match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(*v4))),
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(*v6))),
            _ => None,
        })
        .map(|rdata| Record::from_rdata(name.clone(), ttl, rdata))
        .collect()
}

/// An ExternalName target as an absolute name (it is written without the trailing dot).
fn absolute(name: &str) -> Option<Name> {
    let mut n = Name::from_ascii(name.trim_end_matches('.')).ok()?;
    n.set_fqdn(true);
    (!n.is_root()).then_some(n)
}

/// `4.3.2.1.in-addr.arpa.` → 1.2.3.4; the 32-nibble `ip6.arpa.` form → the IPv6 address.
/// None for partial (network) names and anything malformed.
pub fn reverse_ip(name: &Name) -> Option<IpAddr> {
    let labels: Vec<String> =
        name.iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect();
    let (digits, suffix) = labels.split_at(labels.len().checked_sub(2)?);
    match suffix.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["in-addr", "arpa"] if digits.len() == 4 => {
            let mut octets = [0u8; 4];
            for (o, d) in octets.iter_mut().zip(digits.iter().rev()) {
                if d.len() > 1 && d.starts_with('0') {
                    return None;
                }
                *o = d.parse().ok()?;
            }
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        ["ip6", "arpa"] if digits.len() == 32 => {
            let mut value: u128 = 0;
            for d in digits.iter().rev() {
                let [c] = d.as_bytes() else { return None };
                value = (value << 4) | u128::from(char::from(*c).to_digit(16)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(value)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{
        Endpoint as K8sEndpoint, EndpointConditions, EndpointPort,
    };
    use std::str::FromStr;

    fn svc(cluster_ip: &str, ports: &[(&str, &str, i32)]) -> ServiceDigest {
        let s = Service {
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p, port)| ServicePort {
                            name: (!n.is_empty()).then(|| n.to_string()),
                            protocol: Some(p.to_string()),
                            port: *port,
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        ServiceDigest::from_service(&s)
    }

    fn slice(
        service: &str,
        eps: &[(&str, Option<&str>, Option<bool>)],
        ports: &[(&str, i32)],
    ) -> SliceDigest {
        let mut s = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: eps
                .iter()
                .map(|(ip, host, ready)| K8sEndpoint {
                    addresses: vec![ip.to_string()],
                    hostname: host.map(String::from),
                    conditions: Some(EndpointConditions { ready: *ready, ..Default::default() }),
                    ..Default::default()
                })
                .collect(),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some(n.to_string()),
                        protocol: Some("TCP".into()),
                        port: Some(*p),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        };
        s.metadata.labels = Some([(SERVICE_NAME_LABEL.to_string(), service.to_string())].into());
        SliceDigest::from_slice(&s).expect("usable slice")
    }

    /// A synced index with a ClusterIP Service `web`, a headless `db` with two hostnamed
    /// endpoints and one not ready, and an ExternalName `ext`, all in `shop`.
    fn index() -> Index {
        let mut ix = Index::new(&Name::from_str("cluster.local").unwrap(), Duration::from_secs(5));
        ix.replace_services(vec![
            (
                "shop".into(),
                "web".into(),
                svc("10.96.0.20", &[("http", "TCP", 80), ("", "TCP", 8080)]),
            ),
            ("shop".into(), "db".into(), svc("None", &[("pg", "TCP", 5432)])),
        ]);
        ix.replace_slices(vec![(
            "shop".into(),
            "db-abc".into(),
            slice(
                "db",
                &[
                    ("10.1.0.5", Some("db-0"), Some(true)),
                    ("10.1.0.6", Some("db-1"), None),
                    ("10.1.0.7", None, Some(false)),
                ],
                &[("pg", 5432)],
            ),
        )]);
        let ext = Service {
            spec: Some(ServiceSpec {
                type_: Some("ExternalName".into()),
                external_name: Some("db.example.com".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        ix.apply_service("shop", "ext", ServiceDigest::from_service(&ext));
        ix
    }

    fn q(ix: &Index, name: &str, t: RecordType) -> Answer {
        ix.resolve(&Name::from_ascii(name).unwrap(), t)
    }

    /// The answer records' data as text, for compact assertions.
    fn data(a: &Answer) -> Vec<String> {
        match a {
            Answer::Records { answers, .. } => answers.iter().map(|r| r.data.to_string()).collect(),
            other => vec![format!("{other:?}")],
        }
    }

    #[test]
    fn a_cluster_ip_service_resolves_to_its_cluster_ip() {
        assert_eq!(
            data(&q(&index(), "web.shop.svc.cluster.local.", RecordType::A)),
            ["10.96.0.20"]
        );
    }

    #[test]
    fn names_are_case_insensitive_and_answers_keep_the_asked_case() {
        let a = q(&index(), "WeB.SHOP.svc.Cluster.Local.", RecordType::A);
        let Answer::Records { answers, .. } = &a else { panic!("{a:?}") };
        assert_eq!(answers[0].name.to_ascii(), "WeB.SHOP.svc.Cluster.Local.");
        assert_eq!(data(&a), ["10.96.0.20"]);
    }

    #[test]
    fn a_headless_service_resolves_to_its_ready_endpoints() {
        assert_eq!(
            data(&q(&index(), "db.shop.svc.cluster.local.", RecordType::A)),
            ["10.1.0.5", "10.1.0.6"]
        );
    }

    #[test]
    fn publish_not_ready_addresses_includes_unready_endpoints() {
        let mut ix = index();
        let mut d = svc("None", &[("pg", "TCP", 5432)]);
        d.publish_not_ready = true;
        ix.apply_service("shop", "db", d);
        assert_eq!(
            data(&q(&ix, "db.shop.svc.cluster.local.", RecordType::A)),
            ["10.1.0.5", "10.1.0.6", "10.1.0.7"]
        );
    }

    #[test]
    fn an_endpoint_hostname_resolves_under_its_service() {
        let ix = index();
        assert_eq!(data(&q(&ix, "db-1.db.shop.svc.cluster.local.", RecordType::A)), ["10.1.0.6"]);
        assert_eq!(q(&ix, "db-9.db.shop.svc.cluster.local.", RecordType::A), Answer::NxDomain);
    }

    #[test]
    fn an_external_name_service_is_a_cname() {
        assert_eq!(
            data(&q(&index(), "ext.shop.svc.cluster.local.", RecordType::A)),
            ["db.example.com."]
        );
    }

    #[test]
    fn srv_for_a_cluster_ip_service_targets_the_service_name_with_its_address_as_additional() {
        let a = q(&index(), "_http._tcp.web.shop.svc.cluster.local.", RecordType::SRV);
        assert_eq!(data(&a), ["0 100 80 web.shop.svc.cluster.local."]);
        let Answer::Records { additionals, .. } = &a else { panic!() };
        assert_eq!(additionals.len(), 1);
        assert_eq!(additionals[0].data.to_string(), "10.96.0.20");
    }

    #[test]
    fn srv_for_a_headless_service_targets_each_endpoint() {
        assert_eq!(
            data(&q(&index(), "_pg._tcp.db.shop.svc.cluster.local.", RecordType::SRV)),
            [
                "0 50 5432 db-0.db.shop.svc.cluster.local.",
                "0 50 5432 db-1.db.shop.svc.cluster.local."
            ]
        );
    }

    #[test]
    fn srv_for_the_bare_service_name_lists_its_named_ports_only() {
        assert_eq!(
            data(&q(&index(), "web.shop.svc.cluster.local.", RecordType::SRV)),
            ["0 100 80 web.shop.svc.cluster.local."]
        );
    }

    #[test]
    fn unknown_ports_and_services_are_nxdomain_and_the_proto_level_is_empty() {
        let ix = index();
        assert_eq!(
            q(&ix, "_ftp._tcp.web.shop.svc.cluster.local.", RecordType::SRV),
            Answer::NxDomain
        );
        assert_eq!(q(&ix, "nope.shop.svc.cluster.local.", RecordType::A), Answer::NxDomain);
        assert_eq!(q(&ix, "_tcp.web.shop.svc.cluster.local.", RecordType::SRV), Answer::nodata());
        assert_eq!(q(&ix, "_udp.web.shop.svc.cluster.local.", RecordType::SRV), Answer::NxDomain);
        assert_eq!(q(&ix, "a.b.c.d.e.f.cluster.local.", RecordType::A), Answer::NxDomain);
    }

    #[test]
    fn pod_names_answer_any_well_formed_address() {
        let ix = index();
        assert_eq!(
            data(&q(&ix, "10-244-1-7.anyns.pod.cluster.local.", RecordType::A)),
            ["10.244.1.7"]
        );
        assert_eq!(
            data(&q(&ix, "fd00--7.anyns.pod.cluster.local.", RecordType::AAAA)),
            ["fd00::7"]
        );
        assert_eq!(
            q(&ix, "10-244-1-999.anyns.pod.cluster.local.", RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(q(&ix, "web.anyns.pod.cluster.local.", RecordType::A), Answer::NxDomain);
    }

    #[test]
    fn aaaa_for_an_ipv4_only_name_is_empty_not_nxdomain() {
        let ix = index();
        assert_eq!(q(&ix, "web.shop.svc.cluster.local.", RecordType::AAAA), Answer::nodata());
        assert_eq!(q(&ix, "10-0-0-1.x.pod.cluster.local.", RecordType::AAAA), Answer::nodata());
    }

    #[test]
    fn intermediate_names_exist_without_records() {
        let ix = index();
        assert_eq!(q(&ix, "shop.svc.cluster.local.", RecordType::A), Answer::nodata());
        assert_eq!(q(&ix, "svc.cluster.local.", RecordType::A), Answer::nodata());
        assert_eq!(q(&ix, "empty.svc.cluster.local.", RecordType::A), Answer::NxDomain);
    }

    #[test]
    fn the_apex_has_an_soa_and_the_schema_version_is_published() {
        let ix = index();
        let soa = data(&q(&ix, "cluster.local.", RecordType::SOA));
        assert!(soa[0].starts_with("ns.dns.cluster.local. hostmaster.cluster.local. "), "{soa:?}");
        assert_eq!(data(&q(&ix, "dns-version.cluster.local.", RecordType::TXT)), ["1.1.0"]);
    }

    #[test]
    fn a_deleted_service_goes_nxdomain_and_its_ptr_with_it() {
        let mut ix = index();
        assert_eq!(
            data(&q(&ix, "20.0.96.10.in-addr.arpa.", RecordType::PTR)),
            ["web.shop.svc.cluster.local."]
        );
        ix.delete_service("shop", "web");
        assert_eq!(q(&ix, "web.shop.svc.cluster.local.", RecordType::A), Answer::NxDomain);
        assert_eq!(q(&ix, "20.0.96.10.in-addr.arpa.", RecordType::PTR), Answer::NotOurs);
    }

    #[test]
    fn named_headless_endpoints_have_ptr_records() {
        let ix = index();
        assert_eq!(
            data(&q(&ix, "5.0.1.10.in-addr.arpa.", RecordType::PTR)),
            ["db-0.db.shop.svc.cluster.local."]
        );
        assert_eq!(q(&ix, "7.0.1.10.in-addr.arpa.", RecordType::PTR), Answer::NotOurs);
    }

    #[test]
    fn slice_changes_update_the_service_and_a_slice_can_move_between_services() {
        let mut ix = index();
        ix.apply_slice(
            "shop",
            "db-abc",
            Some(slice("db", &[("10.1.0.9", None, None)], &[("pg", 5432)])),
        );
        assert_eq!(data(&q(&ix, "db.shop.svc.cluster.local.", RecordType::A)), ["10.1.0.9"]);
        assert_eq!(
            data(&q(&ix, "10-1-0-9.db.shop.svc.cluster.local.", RecordType::A)),
            ["10.1.0.9"]
        );
        ix.apply_service("shop", "db2", svc("None", &[]));
        ix.apply_slice("shop", "db-abc", Some(slice("db2", &[("10.1.0.9", None, None)], &[])));
        assert_eq!(q(&ix, "db.shop.svc.cluster.local.", RecordType::A), Answer::nodata());
        assert_eq!(data(&q(&ix, "db2.shop.svc.cluster.local.", RecordType::A)), ["10.1.0.9"]);
        ix.apply_slice("shop", "db-abc", None);
        assert_eq!(q(&ix, "db2.shop.svc.cluster.local.", RecordType::A), Answer::nodata());
    }

    #[test]
    fn a_relist_replaces_everything_known_before() {
        let mut ix = index();
        ix.replace_services(vec![("other".into(), "api".into(), svc("10.96.0.30", &[]))]);
        assert_eq!(q(&ix, "web.shop.svc.cluster.local.", RecordType::A), Answer::NxDomain);
        assert_eq!(q(&ix, "db.shop.svc.cluster.local.", RecordType::A), Answer::NxDomain);
        assert_eq!(data(&q(&ix, "api.other.svc.cluster.local.", RecordType::A)), ["10.96.0.30"]);
        assert_eq!(q(&ix, "shop.svc.cluster.local.", RecordType::A), Answer::NxDomain);
    }

    #[test]
    fn nothing_is_answered_before_both_caches_have_listed() {
        let mut ix = Index::new(&Name::from_str("cluster.local").unwrap(), Duration::from_secs(5));
        ix.replace_services(Vec::new());
        assert_eq!(q(&ix, "web.shop.svc.cluster.local.", RecordType::A), Answer::NotReady);
        ix.replace_slices(Vec::new());
        assert_eq!(q(&ix, "web.shop.svc.cluster.local.", RecordType::A), Answer::NxDomain);
    }

    #[test]
    fn reverse_names_parse_only_whole_addresses() {
        let n = |s: &str| Name::from_str(s).unwrap();
        assert_eq!(reverse_ip(&n("4.3.2.1.in-addr.arpa.")), Some("1.2.3.4".parse().unwrap()));
        assert_eq!(reverse_ip(&n("3.2.1.in-addr.arpa.")), None);
        assert_eq!(reverse_ip(&n("04.3.2.1.in-addr.arpa.")), None);
        let v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
        assert_eq!(reverse_ip(&n(v6)), Some("fd00::1".parse().unwrap()));
        assert_eq!(reverse_ip(&n("example.com.")), None);
    }

    #[test]
    fn dashed_addresses_round_trip() {
        for ip in ["10.0.0.1", "fd00::1", "2001:db8::a:b"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(undashed(&dashed(&ip)), Some(ip));
        }
        assert_eq!(undashed("1-2-3"), None);
        assert_eq!(undashed("10.0.0.1"), None);
        assert_eq!(undashed("fd00::1"), None);
    }
}
