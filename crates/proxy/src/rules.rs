//! Services and EndpointSlices → the nftables transactions of the proxy's table: one that replaces
//! the whole table (`render`, `Model::ruleset`), and one that changes only what differs from the
//! previous content (`changes`). Pure and deterministic (everything sorted), so the same objects
//! give the same text and the caller can skip an apply when nothing changed.
//!
//! The layout follows upstream kube-proxy's nftables mode (pkg/proxy/nftables): verdict maps keyed
//! by `address . protocol . port` send new connections to a per-service-port chain, which picks an
//! endpoint at random and DNATs to it (`dnat to numgen random mod N map { … }`). Unlike upstream
//! there is a chain per endpoint only for ClientIP affinity (upstream always has one): the kernel
//! re-checks every chain reachable from the base chains on each change that adds a jump or a
//! DNAT, and at 10,000 Services the endpoint chains made that check 4 times longer. Hairpin
//! traffic (a pod reaching itself through a Service) is therefore recognised after DNAT, by its
//! source and destination both being the same endpoint (set `hairpin`), and masqueraded. Filter
//! chains that run before DNAT reject (or drop) traffic to Services without usable endpoints. As
//! upstream, the table is replaced whole on start (and periodically, by the caller), and
//! otherwise diffed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::cidr::Ipv4Cidr;

/// The packet mark bit that asks `nat-postrouting` to masquerade (upstream's default, 1 << 14).
pub const MASQUERADE_MARK: u32 = 0x4000;
/// The EndpointSlice label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A Service with this label is handled by the proxy it names, never by this one (upstream
/// kube-proxy ignores them the same way).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default and bounds (as the API validates).
const AFFINITY_TIMEOUT_DEFAULT_SECONDS: i32 = 10800;
const AFFINITY_TIMEOUT_MAX_SECONDS: i32 = 86400;
/// nft names (chains, sets) are at most 255 bytes (NFT_NAME_MAXLEN 256 with the NUL).
const NFT_NAME_LEN_MAX: usize = 255;

/// What the rules depend on besides the API objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulesConfig {
    /// Name of the `ip` family table this proxy owns, replaced whole on every apply.
    pub table: String,
    /// This node's name: endpoints whose `nodeName` equals it are local (traffic policy Local).
    pub node_name: String,
    /// Pod addresses; traffic to a ClusterIP from outside it is masqueraded (so replies come
    /// back through this node). `None`: only hairpin and external traffic is masqueraded.
    pub cluster_cidr: Option<Ipv4Cidr>,
    /// Restrict NodePorts to local addresses in these prefixes; empty means every local address
    /// except 127.0.0.0/8 (upstream's `--nodeport-addresses` default in nftables mode).
    pub nodeport_cidrs: Vec<Ipv4Cidr>,
    /// Masquerade all traffic to ClusterIPs (upstream `--masquerade-all`).
    pub masquerade_all: bool,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            table: "rkube".into(),
            node_name: String::new(),
            cluster_cidr: None,
            nodeport_cidrs: Vec::new(),
            masquerade_all: false,
        }
    }
}

/// One rendered transaction and what had to be left out of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    /// Input for `nft -f -`: creates the table if missing, deletes it, and defines it anew, all
    /// in one atomic transaction.
    pub text: String,
    /// Objects (or parts) that were skipped because they were malformed or conflicted, one
    /// sentence each, sorted; for the caller to log.
    pub skipped: Vec<String>,
    /// The ClientIP affinity sets `text` defines, with their timeout in seconds.
    pub affinity_sets: BTreeMap<String, i32>,
    /// Every way a UDP packet can reach an endpoint through these rules. UDP flows have no end,
    /// so when a pair disappears its conntrack entries must be deleted, or packets of the flow
    /// keep going to the old endpoint.
    pub udp_backends: BTreeSet<UdpBackend>,
}

/// Where a UDP client sends: a Service address and port, or a NodePort on any local address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UdpFront {
    Address(SocketAddrV4),
    NodePort(u16),
}

/// A UDP front and one endpoint the rules may DNAT it to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UdpBackend {
    pub front: UdpFront,
    pub endpoint: SocketAddrV4,
}

/// One client's live affinity entry, as read back from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinityEntry {
    pub client: Ipv4Addr,
    /// Time left before the entry lapses.
    pub expires: Duration,
}

impl Ruleset {
    /// `text` with `live` affinity entries written into the sets that still exist, so that
    /// replacing the table does not forget which client sticks to which endpoint (the sets are
    /// keyed by endpoint, so an entry only comes back while its endpoint is still in use).
    /// Entries keep their remaining time, capped at the set's (possibly new) timeout.
    pub fn text_with_affinity(&self, live: &BTreeMap<String, Vec<AffinityEntry>>) -> String {
        let mut inserts: Vec<(usize, String)> = Vec::new();
        for (name, timeout) in &self.affinity_sets {
            let Some(entries) = live.get(name) else { continue };
            let cap = u64::try_from(*timeout).unwrap_or(0);
            let mut elems: Vec<(Ipv4Addr, u64)> = entries
                .iter()
                .map(|e| (e.client, e.expires.as_secs().min(cap)))
                .filter(|(_, secs)| *secs > 0)
                .collect();
            elems.sort();
            elems.dedup_by_key(|(ip, _)| *ip);
            if elems.is_empty() {
                continue;
            }
            let head = format!("\tset {name} {{\n");
            let Some(start) = self.text.find(&head) else { continue };
            let Some(end) = self.text[start..].find("\n\t}\n") else { continue };
            let list: Vec<String> =
                elems.iter().map(|(ip, secs)| format!("{ip} expires {secs}s")).collect();
            inserts.push((start + end, format!("\n\t\telements = {{ {} }}", list.join(", "))));
        }
        inserts.sort();
        let mut out = String::with_capacity(self.text.len() + inserts.len() * 64);
        let mut at = 0;
        for (pos, insert) in inserts {
            out.push_str(&self.text[at..pos]);
            out.push_str(&insert);
            at = pos;
        }
        out.push_str(&self.text[at..]);
        out
    }
}

/// The live entries of the affinity sets in `nft -j list table` output, by set name. Anything
/// unexpected in the JSON is passed over: losing affinity is better than not applying.
pub fn affinity_from_json(json: &str) -> BTreeMap<String, Vec<AffinityEntry>> {
    let mut out: BTreeMap<String, Vec<AffinityEntry>> = BTreeMap::new();
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(json) else { return out };
    for item in doc["nftables"].as_array().into_iter().flatten() {
        let set = &item["set"];
        let Some(name) = set["name"].as_str().filter(|n| n.starts_with("affinity-")) else {
            continue;
        };
        for e in set["elem"].as_array().into_iter().flatten() {
            let elem = &e["elem"];
            let client = elem["val"].as_str().and_then(|v| v.parse::<Ipv4Addr>().ok());
            let expires = elem["expires"].as_u64();
            if let (Some(client), Some(secs)) = (client, expires) {
                out.entry(name.to_string())
                    .or_default()
                    .push(AffinityEntry { client, expires: Duration::from_secs(secs) });
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// The API's protocol string (absent means TCP); `None` for anything else.
    fn parse(s: Option<&str>) -> Option<Proto> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }

    pub(crate) fn nft(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

/// One rule of a per-Service chain: the few shapes the renderer produces, kept structured so
/// they can be written as nft text (`Display`) or encoded as netlink expressions (`crate::nl`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Rule {
    /// `update @SET { ip saddr }` (ClientIP affinity: remember this client).
    RememberClient(String),
    /// `meta l4proto P dnat to A:PORT`.
    Dnat(Proto, Ipv4Addr, u16),
    /// `meta l4proto P dnat to numgen random mod N map { 0 : A . PORT, … }`: one of the
    /// endpoints at random, DNATed in place (no chain per endpoint).
    DnatPick(Proto, Vec<(Ipv4Addr, u16)>),
    /// `ip daddr A P dport N [ip saddr != C] jump mark-for-masquerade`.
    MarkServiceTraffic { ip: Ipv4Addr, proto: Proto, port: u16, unless_from: Option<Ipv4Cidr> },
    /// `ip saddr @SET goto CHAIN` (ClientIP affinity: a remembered client's endpoint).
    StickyGoto { set: String, chain: String },
    /// `numgen random mod N vmap { 0 : goto C0, … }`: one of the chains at random.
    Pick(Vec<String>),
    /// `ip saddr C goto CHAIN`.
    FromGoto(Ipv4Cidr, String),
    /// `fib saddr type local jump mark-for-masquerade`.
    LocalMark,
    /// `fib saddr type local goto CHAIN`.
    LocalGoto(String),
    /// `jump mark-for-masquerade`.
    Mark,
    /// `goto CHAIN`.
    Goto(String),
    /// `ip saddr != { R, … } drop`.
    DropUnlessFrom(Vec<Ipv4Cidr>),
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MARK: &str = "jump mark-for-masquerade";
        match self {
            Rule::RememberClient(set) => write!(f, "update @{set} {{ ip saddr }}"),
            Rule::Dnat(proto, ip, port) => {
                write!(f, "meta l4proto {} dnat to {ip}:{port}", proto.nft())
            }
            Rule::DnatPick(proto, eps) => {
                write!(
                    f,
                    "meta l4proto {} dnat to numgen random mod {} map {{ ",
                    proto.nft(),
                    eps.len()
                )?;
                for (i, (ip, port)) in eps.iter().enumerate() {
                    let sep = if i + 1 < eps.len() { ", " } else { "" };
                    write!(f, "{i} : {ip} . {port}{sep}")?;
                }
                write!(f, " }}")
            }
            Rule::MarkServiceTraffic { ip, proto, port, unless_from } => {
                write!(f, "ip daddr {ip} {} dport {port}", proto.nft())?;
                if let Some(c) = unless_from {
                    write!(f, " ip saddr != {c}")?;
                }
                write!(f, " {MARK}")
            }
            Rule::StickyGoto { set, chain } => write!(f, "ip saddr @{set} goto {chain}"),
            Rule::Pick(chains) => {
                write!(f, "numgen random mod {} vmap {{ ", chains.len())?;
                for (i, c) in chains.iter().enumerate() {
                    let sep = if i + 1 < chains.len() { ", " } else { "" };
                    write!(f, "{i} : goto {c}{sep}")?;
                }
                write!(f, " }}")
            }
            Rule::FromGoto(c, chain) => write!(f, "ip saddr {c} goto {chain}"),
            Rule::LocalMark => write!(f, "fib saddr type local {MARK}"),
            Rule::LocalGoto(chain) => write!(f, "fib saddr type local goto {chain}"),
            Rule::Mark => write!(f, "{MARK}"),
            Rule::Goto(chain) => write!(f, "goto {chain}"),
            Rule::DropUnlessFrom(ranges) => {
                let r: Vec<String> = ranges.iter().map(ToString::to_string).collect();
                write!(f, "ip saddr != {{ {} }} drop", r.join(", "))
            }
        }
    }
}

/// One endpoint address and port for one Service port, with its EndpointSlice conditions.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Endpoint {
    ip: Ipv4Addr,
    port: u16,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

impl Endpoint {
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// One port of one Service, normalised: everything the rules for it need.
#[derive(Clone, Debug)]
struct ServicePort {
    namespace: String,
    name: String,
    port_name: String,
    proto: Proto,
    cluster_ip: Ipv4Addr,
    port: u16,
    node_port: Option<u16>,
    /// `spec.externalIPs` and load-balancer ingress IPs: "external" destinations.
    external_ips: Vec<Ipv4Addr>,
    /// The load-balancer ingress IPs among them, and who may use them
    /// (`loadBalancerSourceRanges`; empty: everyone).
    lb_ips: Vec<Ipv4Addr>,
    source_ranges: Vec<Ipv4Cidr>,
    affinity_timeout_seconds: Option<i32>,
    external_policy_local: bool,
    internal_policy_local: bool,
}

impl ServicePort {
    /// `ns/name/proto/portname`: unique per Service port and valid inside nft identifiers.
    fn base(&self) -> String {
        format!("{}/{}/{}/{}", self.namespace, self.name, self.proto.nft(), self.port_name)
    }

    fn externally_accessible(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty()
    }
}

/// Endpoints per Service (namespace, name), then per Service port (port name, protocol), keyed
/// by address and port so the same endpoint in two slices counts once.
type EndpointIndex =
    BTreeMap<(String, String), BTreeMap<(String, Proto), BTreeMap<(Ipv4Addr, u16), Endpoint>>>;

/// Renders the transaction for `services` and `slices` as seen from node `config.node_name`.
///
/// # Guarantees
/// - The output depends only on the inputs' content, not their order: everything is sorted.
/// - A malformed object never fails the whole render: it is left out and named in `skipped`.
///   Names that could not be nft identifiers are refused here, so one bad object cannot make
///   the whole transaction fail in `nft`.
///
/// # Caveats
/// - IPv4 only: IPv6 addresses are ignored (they belong in an `ip6` table).
/// - The table is replaced whole, so ClientIP affinity entries live in the kernel must be
///   carried over by the caller (`Ruleset::text_with_affinity`); existing connections are
///   unaffected either way (conntrack keeps their NAT).
/// - Not implemented: health-check node ports, topology hints.
pub fn render<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    config: &RulesConfig,
) -> Ruleset {
    render_model(services, slices, config).ruleset(config)
}

/// What the proxy's table holds besides its fixed skeleton (base chains, dispatch chains, the
/// maps' declarations), as [`render`] computes it: the input to both a full transaction
/// ([`Model::ruleset`]) and an incremental one ([`Model::update`], [`change`]).
///
/// Kept per Service (a part: its chains and the map entries it claims, with the versions of
/// the objects it was rendered from) and merged (every map key with each Service claiming it,
/// every set element with how many Services use it). [`Model::update_services`] re-renders only
/// the Services it is given, and only when their objects changed, and adjusts the merged maps
/// by their entries alone: a change costs what the changed Services hold, not what the table
/// holds.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Per Service (`namespace/name`): what it contributes on its own. Its chains are only
    /// here; its map entries are merged into `merged`.
    parts: BTreeMap<String, Arc<Part>>,
    merged: Merged,
    /// As [`Ruleset::skipped`], each sentence with how many times it is said.
    skipped: BTreeMap<String, usize>,
    /// What the parts were rendered with: a different configuration reuses none of them.
    config: Option<RulesConfig>,
}

/// Two models are equal when they would write the same table, whatever they were rendered
/// from.
impl PartialEq for Model {
    fn eq(&self, other: &Model) -> bool {
        self.merged == other.merged
            && self.skipped == other.skipped
            && self.parts.len() == other.parts.len()
            && self.parts.iter().zip(&other.parts).all(|((ka, a), (kb, b))| {
                ka == kb && (Arc::ptr_eq(a, b) || (a.tables == b.tables && a.skipped == b.skipped))
            })
    }
}

impl Eq for Model {}

/// One Service's contribution (or, without the Service, what its slices had to report).
#[derive(Debug, Default)]
struct Part {
    /// The Service's resourceVersion (None: no Service), then each of its slices' name and
    /// resourceVersion in name order; None when some object has no version (never reused then).
    inputs: Option<Inputs>,
    tables: Tables,
    skipped: Vec<String>,
}

/// A Service's resourceVersion (None: no Service), and its slices' names and versions.
type Inputs = (Option<String>, Vec<(String, String)>);

impl Part {
    /// Contributes nothing at all.
    fn is_empty(&self) -> bool {
        self.skipped.is_empty() && self.tables == Tables::default()
    }
}

/// One Service as the caller sees it now, for [`Model::update_services`]: its key
/// (`namespace/name`), the Service (None: there is none, or no longer) and every EndpointSlice
/// labelled with its name.
pub type ServiceObjects<'a> = (String, Option<&'a Service>, Vec<&'a EndpointSlice>);

/// A map's keys, each with every part claiming it (part key → verdict and owner, for
/// reports). The first claimant in part-key order has the key; the others are reported.
type Claims<K> = BTreeMap<K, BTreeMap<String, (String, String)>>;

type AddrKey = (Ipv4Addr, Proto, u16);
type PortKey = (Proto, u16);

/// The parts' map and set entries merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Merged {
    service_ips: Claims<AddrKey>,
    no_endpoint_services: Claims<AddrKey>,
    service_nodeports: Claims<PortKey>,
    no_endpoint_nodeports: Claims<PortKey>,
    firewall_ips: Claims<AddrKey>,
    /// Set elements with the number of parts using each.
    cluster_ips: BTreeMap<Ipv4Addr, usize>,
    hairpin: BTreeMap<Ipv4Addr, usize>,
    udp_backends: BTreeMap<UdpBackend, usize>,
    /// Affinity set name → timeout in seconds (a name holds its Service's, so one part each).
    affinity_sets: BTreeMap<String, i32>,
}

impl Model {
    /// The full transaction that replaces the table with this content.
    pub fn ruleset(&self, config: &RulesConfig) -> Ruleset {
        Ruleset {
            text: self.merged.write(config, &self.chains()),
            skipped: self.skipped(),
            affinity_sets: self.merged.affinity_sets.clone(),
            udp_backends: self.udp_backends(),
        }
    }

    /// As [`Ruleset::skipped`].
    pub fn skipped(&self) -> Vec<String> {
        self.skipped.keys().cloned().collect()
    }

    /// As [`Ruleset::udp_backends`].
    pub fn udp_backends(&self) -> BTreeSet<UdpBackend> {
        self.merged.udp_backends.keys().copied().collect()
    }

    /// Services (and other objects' groups) the model holds something for.
    pub fn service_count(&self) -> usize {
        self.parts.len()
    }

    /// Chains beyond the fixed skeleton: one per Service port policy, and per endpoint in use by
    /// a Service with ClientIP affinity.
    pub fn chain_count(&self) -> usize {
        self.parts.values().map(|p| p.tables.chains.len()).sum()
    }

    /// Every chain of every part, sorted by name.
    fn chains(&self) -> BTreeMap<&String, &Vec<Rule>> {
        self.parts.values().flat_map(|p| p.tables.chains.iter()).collect()
    }

    /// Brings the model to `services` and `slices` (all there are), rendering again only
    /// Services whose objects' resourceVersions changed (objects without one always are).
    /// Returns the steps that turn a table holding the model as it was into one holding it as
    /// it is now (see [`change`]), or None when the table must be replaced whole. Costs a pass
    /// over every object; [`Model::update_services`] costs only what changed.
    pub fn update<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        config: &RulesConfig,
    ) -> Option<Change> {
        let mut by_service: BTreeMap<String, (Option<&Service>, Vec<&EndpointSlice>)> =
            BTreeMap::new();
        // Objects no Service can be found for: only reported (under the key "").
        let mut loose_slices: Vec<&EndpointSlice> = Vec::new();
        let mut loose_services = 0;
        for svc in services {
            match (svc.metadata.namespace.as_deref(), svc.metadata.name.as_deref()) {
                (Some(ns), Some(name)) => {
                    by_service.entry(format!("{ns}/{name}")).or_default().0 = Some(svc)
                }
                _ => loose_services += 1,
            }
        }
        for slice in slices {
            let meta = &slice.metadata;
            match (meta.namespace.as_deref(), service_of(slice)) {
                (Some(ns), Some(svc)) => {
                    by_service.entry(format!("{ns}/{svc}")).or_default().1.push(slice)
                }
                // Slices without the label belong to no Service (someone's own bookkeeping).
                (Some(_), None) => {}
                (None, _) => loose_slices.push(slice),
            }
        }
        let gone: Vec<String> = self
            .parts
            .keys()
            .filter(|k| !k.is_empty() && !by_service.contains_key(k.as_str()))
            .cloned()
            .collect();
        let mut loose = render_part(None, &loose_slices, config);
        loose.inputs = None;
        loose.skipped.extend(std::iter::repeat_n(
            "Service without namespace or name".to_string(),
            loose_services,
        ));
        let loose = (!loose.is_empty()).then(|| Arc::new(loose));
        let all = by_service
            .into_iter()
            .map(|(key, (svc, slices))| (key, svc, slices))
            .chain(gone.into_iter().map(|key| (key, None, Vec::new())));
        self.apply(all, Some(loose), config)
    }

    /// [`Model::update`] for the Services named in `changed` only: each is rendered again unless
    /// its objects have the versions it was rendered from, and one that no longer has a Service
    /// or slices leaves the model. Services not named are left as they are, so the caller must
    /// name every Service whose Service or EndpointSlice objects changed, appeared or went (a
    /// slice that moved to another Service: both).
    ///
    /// A configuration other than the model's empties the model first and returns None.
    pub fn update_services<'a>(
        &mut self,
        changed: impl IntoIterator<Item = ServiceObjects<'a>>,
        config: &RulesConfig,
    ) -> Option<Change> {
        self.apply(changed, None, config)
    }

    /// The work of [`Model::update`] and [`Model::update_services`]; `loose` (when given)
    /// replaces the part of objects belonging to no Service.
    fn apply<'a>(
        &mut self,
        changed: impl IntoIterator<Item = ServiceObjects<'a>>,
        loose: Option<Option<Arc<Part>>>,
        config: &RulesConfig,
    ) -> Option<Change> {
        let reset = self.config.as_ref() != Some(config);
        if reset {
            *self = Model { config: Some(config.clone()), ..Model::default() };
        }
        let mut delta = Delta::default();
        for (key, svc, mut slices) in changed {
            slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
            let old = self.parts.get(&key);
            if old.is_some_and(|p| same_inputs(p, svc, &slices)) {
                continue;
            }
            let part = render_part(svc, &slices, config);
            let part = (!part.is_empty()).then(|| Arc::new(part));
            if old.is_none() && part.is_none() {
                continue;
            }
            self.set_part(&key, part, &mut delta);
        }
        if let Some(loose) = loose {
            self.set_part("", loose, &mut delta);
        }
        let change = delta.finish(&self.merged);
        if reset { None } else { change }
    }

    /// Puts `new` in place of part `key` (None: removes it), noting in `delta` what that changes
    /// in the table.
    fn set_part(&mut self, key: &str, new: Option<Arc<Part>>, delta: &mut Delta) {
        let old = match &new {
            Some(p) => self.parts.insert(key.to_string(), Arc::clone(p)),
            None => self.parts.remove(key),
        };
        if let (Some(o), Some(n)) = (&old, &new)
            && Arc::ptr_eq(o, n)
        {
            return;
        }
        delta.chains(
            old.as_deref().map(|p| &p.tables.chains),
            new.as_deref().map(|p| &p.tables.chains),
        );
        if let Some(o) = &old {
            self.contribute(key, o, false, delta);
        }
        if let Some(n) = &new {
            self.contribute(key, n, true, delta);
        }
    }

    /// Adds (`add`) or withdraws part `key`'s map entries, set elements and reports.
    fn contribute(&mut self, key: &str, part: &Part, add: bool, d: &mut Delta) {
        for s in &part.skipped {
            say(&mut self.skipped, s, add);
        }
        let (m, t, sk) = (&mut self.merged, &part.tables, &mut self.skipped);
        reclaim(&mut m.service_ips, &t.service_ips, key, add, &mut d.service_ips, sk);
        reclaim(
            &mut m.service_nodeports,
            &t.service_nodeports,
            key,
            add,
            &mut d.service_nodeports,
            sk,
        );
        reclaim(
            &mut m.no_endpoint_services,
            &t.no_endpoint_services,
            key,
            add,
            &mut d.no_endpoint_services,
            sk,
        );
        reclaim(&mut m.firewall_ips, &t.firewall_ips, key, add, &mut d.firewall_ips, sk);
        reclaim(
            &mut m.no_endpoint_nodeports,
            &t.no_endpoint_nodeports,
            key,
            add,
            &mut d.no_endpoint_nodeports,
            sk,
        );
        count(&mut m.cluster_ips, &t.cluster_ips, add, &mut d.cluster_ips);
        count(&mut m.hairpin, &t.hairpin, add, &mut d.hairpin);
        count(&mut m.udp_backends, &t.udp_backends, add, &mut d.udp_backends);
        for (name, timeout) in &t.affinity_sets {
            d.affinity_sets
                .entry(name.clone())
                .or_insert_with(|| m.affinity_sets.get(name).copied());
            if add {
                m.affinity_sets.insert(name.clone(), *timeout);
            } else {
                m.affinity_sets.remove(name);
            }
        }
    }
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
pub fn service_of(slice: &EndpointSlice) -> Option<&str> {
    slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).map(String::as_str)
}

/// Counts `message` once more (`add`) or once less in `skipped`.
fn say(skipped: &mut BTreeMap<String, usize>, message: &str, add: bool) {
    if add {
        *skipped.entry(message.to_string()).or_default() += 1;
    } else if let Some(n) = skipped.get_mut(message) {
        *n -= 1;
        if *n == 0 {
            skipped.remove(message);
        }
    }
}

/// The verdict key `k` has in the table: its first claimant's.
fn winner<K: Ord>(claims: &Claims<K>, k: &K) -> Option<String> {
    claims.get(k).and_then(|c| c.values().next()).map(|(v, _)| v.clone())
}

/// What claimants of `k` other than the first are told.
fn conflicts<K: std::fmt::Debug>(
    k: &K,
    claimants: &BTreeMap<String, (String, String)>,
) -> Vec<String> {
    let mut it = claimants.values();
    let Some((_, first)) = it.next() else { return Vec::new() };
    it.map(|(_, owner)| format!("{owner}: {k:?} is already used by {first}")).collect()
}

/// Adds (`add`) or withdraws part `part`'s claims on the keys of `from`, noting in `touched`
/// each key's verdict before it was first touched, and keeping the reports of keys two parts
/// claim current in `skipped`.
fn reclaim<K: Ord + Copy + std::fmt::Debug>(
    claims: &mut Claims<K>,
    from: &BTreeMap<K, (String, String)>,
    part: &str,
    add: bool,
    touched: &mut BTreeMap<K, Option<String>>,
    skipped: &mut BTreeMap<String, usize>,
) {
    for (k, (verdict, owner)) in from {
        touched.entry(*k).or_insert_with(|| winner(claims, k));
        let claimants = claims.entry(*k).or_default();
        for m in conflicts(k, claimants) {
            say(skipped, &m, false);
        }
        if add {
            claimants.insert(part.to_string(), (verdict.clone(), owner.clone()));
        } else {
            claimants.remove(part);
        }
        for m in conflicts(k, claimants) {
            say(skipped, &m, true);
        }
        if claimants.is_empty() {
            claims.remove(k);
        }
    }
}

/// Counts every element of `from` once more (`add`) or once less in `set`, noting in `touched`
/// whether each was in the set before it was first touched.
fn count<K: Ord + Copy>(
    set: &mut BTreeMap<K, usize>,
    from: &BTreeSet<K>,
    add: bool,
    touched: &mut BTreeMap<K, bool>,
) {
    for k in from {
        touched.entry(*k).or_insert_with(|| set.contains_key(k));
        if add {
            *set.entry(*k).or_default() += 1;
        } else if let Some(n) = set.get_mut(k) {
            *n -= 1;
            if *n == 0 {
                set.remove(k);
            }
        }
    }
}

/// [`render`] without writing the text, for callers that may only need [`changes`].
pub fn render_model<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    config: &RulesConfig,
) -> Model {
    render_model_from(&Model::default(), services, slices, config)
}

/// [`render_model`], reusing the parts of `prev` whose Service and EndpointSlices have the
/// same resourceVersions as now (objects without one are always rendered afresh). Copies
/// `prev`: [`Model::update`] changes a model in place.
pub fn render_model_from<'a>(
    prev: &Model,
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    config: &RulesConfig,
) -> Model {
    let mut model = prev.clone();
    let _ = model.update(services, slices, config);
    model
}

/// Whether `part` was rendered from `svc` and `slices` as they are now (by resourceVersion).
fn same_inputs(part: &Part, svc: Option<&Service>, slices: &[&EndpointSlice]) -> bool {
    let Some((svc_rv, slice_rvs)) = &part.inputs else { return false };
    svc.map(|s| s.metadata.resource_version.as_deref()) == svc_rv.as_ref().map(|v| Some(v.as_str()))
        && slice_rvs.len() == slices.len()
        && slice_rvs.iter().zip(slices).all(|((name, rv), s)| {
            s.metadata.name.as_deref() == Some(name.as_str())
                && s.metadata.resource_version.as_deref() == Some(rv.as_str())
        })
}

/// One Service's chains and map entries, from the Service and its slices alone (without the
/// Service: only what the slices had to report).
fn render_part(svc: Option<&Service>, slices: &[&EndpointSlice], config: &RulesConfig) -> Part {
    let inputs = (|| {
        let rv = match svc {
            Some(s) => Some(s.metadata.resource_version.clone()?),
            None => None,
        };
        let slice_rvs = slices
            .iter()
            .map(|s| Some((s.metadata.name.clone()?, s.metadata.resource_version.clone()?)))
            .collect::<Option<Vec<_>>>()?;
        Some((rv, slice_rvs))
    })();
    let mut skipped = Vec::new();
    let index = index_endpoints(slices.iter().copied(), &config.node_name, &mut skipped);
    let mut tables = Tables::default();
    let Some(svc) = svc else { return Part { inputs, tables, skipped } };
    let mut ports = service_ports(svc, &mut skipped);
    ports.sort_by(|a, b| (&a.port_name, a.proto).cmp(&(&b.port_name, b.proto)));
    let empty = BTreeMap::new();
    for sp in &ports {
        let eps = index
            .get(&(sp.namespace.clone(), sp.name.clone()))
            .and_then(|by_port| by_port.get(&(sp.port_name.clone(), sp.proto)))
            .unwrap_or(&empty);
        let eps: Vec<&Endpoint> = eps.values().collect();
        add_service_port(&mut tables, sp, &eps, config, &mut skipped);
    }
    Part { inputs, tables, skipped }
}
/// The transaction that turns a table holding `old` (as applied by [`Model::ruleset`] or by
/// earlier `changes`) into one holding `new`, touching only what differs, as upstream
/// kube-proxy's partial syncs do: map and set elements are added and deleted one by one, and
/// only chains whose rules differ are flushed and refilled. An empty string: nothing differs.
///
/// The order keeps every reference valid at each step of the (atomic) transaction: new sets
/// and chains are declared first, chains are filled, map elements are swapped, and only then
/// are chains no longer referenced flushed and deleted, and their affinity sets after them.
/// Affinity sets that stay keep their live entries, which a full replace would have to copy.
///
/// `None` when the change cannot be made in place and the table must be replaced whole: an
/// affinity set whose timeout changed (nft cannot alter a set's timeout).
pub fn changes(old: &Model, new: &Model, config: &RulesConfig) -> Option<String> {
    change(old, new).map(|c| c.text(&config.table))
}

/// An in-place change of the table, as [`changes`] describes it, kept as steps so it can be
/// written as nft text ([`Change::text`]) or sent over netlink (`crate::nl`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub(crate) ops: Vec<Op>,
    /// UDP front/endpoint pairs the rules no longer use, and newly use (see
    /// [`Ruleset::udp_backends`]).
    pub udp_gone: Vec<UdpBackend>,
    pub udp_came: Vec<UdpBackend>,
}

/// One step of a [`Change`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// A ClientIP affinity set: `ipv4_addr`, dynamic, entries lapse after `timeout` seconds.
    AddAffinitySet {
        name: String,
        timeout: i32,
    },
    AddChain(String),
    FlushChain(String),
    AddRule {
        chain: String,
        rule: Rule,
    },
    /// Elements added to (or, with `add` false, deleted from) one of the skeleton's sets/maps.
    Elements {
        add: bool,
        set: &'static str,
        elems: Vec<Elem>,
    },
    DeleteChain(String),
    DeleteSet(String),
}

/// A set or map element; the verdict is absent when deleting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    /// `address . protocol . port [: verdict]`.
    Addr((Ipv4Addr, Proto, u16), Option<String>),
    /// `protocol . port [: verdict]`.
    Port((Proto, u16), Option<String>),
    /// `address`.
    Ip(Ipv4Addr),
    /// `address . address` (the hairpin set: an endpoint talking to itself).
    Pair(Ipv4Addr),
}

impl std::fmt::Display for Elem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (key, verdict) = match self {
            Elem::Addr(k, v) => (addr_elem(k), v),
            Elem::Port(k, v) => (port_elem(k), v),
            Elem::Ip(ip) => return write!(f, "{ip}"),
            Elem::Pair(ip) => return write!(f, "{ip} . {ip}"),
        };
        match verdict {
            Some(v) => write!(f, "{key} : {v}"),
            None => write!(f, "{key}"),
        }
    }
}

impl Change {
    /// Nothing differs.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The change as input for `nft -f -` on table `ip TABLE`.
    pub fn text(&self, t: &str) -> String {
        let mut out = String::new();
        for op in &self.ops {
            let _ = match op {
                Op::AddAffinitySet { name, timeout } => writeln!(
                    out,
                    "add set ip {t} {name} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}"
                ),
                Op::AddChain(name) => writeln!(out, "add chain ip {t} {name}"),
                Op::FlushChain(name) => writeln!(out, "flush chain ip {t} {name}"),
                Op::AddRule { chain, rule } => writeln!(out, "add rule ip {t} {chain} {rule}"),
                Op::Elements { add, set, elems } => {
                    // One command per 1,000 elements (nft reads each command into memory
                    // whole; the bound keeps a mass change from making one huge line).
                    let verb = if *add { "add" } else { "delete" };
                    for chunk in elems.chunks(1000) {
                        let list: Vec<String> = chunk.iter().map(ToString::to_string).collect();
                        let _ =
                            writeln!(out, "{verb} element ip {t} {set} {{ {} }}", list.join(", "));
                    }
                    Ok(())
                }
                Op::DeleteChain(name) => writeln!(out, "delete chain ip {t} {name}"),
                Op::DeleteSet(name) => writeln!(out, "delete set ip {t} {name}"),
            };
        }
        out
    }
}

/// The steps [`changes`] writes out; `None` when the table must be replaced whole. Costs a
/// copy of `old`; the proxy's loop uses [`Model::update_services`], which changes a model in
/// place and returns the same steps.
pub fn change(old: &Model, new: &Model) -> Option<Change> {
    let mut m = old.clone();
    let mut delta = Delta::default();
    for (key, part) in &new.parts {
        if old.parts.get(key).is_none_or(|p| !Arc::ptr_eq(p, part)) {
            m.set_part(key, Some(Arc::clone(part)), &mut delta);
        }
    }
    for key in old.parts.keys().filter(|k| !new.parts.contains_key(*k)) {
        m.set_part(key, None, &mut delta);
    }
    delta.finish(&m.merged)
}

/// What parts put in place of others change in the table, gathered while the merged maps are
/// adjusted: chains as the parts' own chains differ, and for every map key and set element
/// touched its state before (compared at the end with its state after, so a key one part lets
/// go and another takes is one step, or none).
#[derive(Default)]
struct Delta {
    add_chains: Vec<Op>,
    fills: Vec<Op>,
    removed_chains: Vec<String>,
    service_ips: BTreeMap<AddrKey, Option<String>>,
    service_nodeports: BTreeMap<PortKey, Option<String>>,
    no_endpoint_services: BTreeMap<AddrKey, Option<String>>,
    firewall_ips: BTreeMap<AddrKey, Option<String>>,
    no_endpoint_nodeports: BTreeMap<PortKey, Option<String>>,
    cluster_ips: BTreeMap<Ipv4Addr, bool>,
    hairpin: BTreeMap<Ipv4Addr, bool>,
    udp_backends: BTreeMap<UdpBackend, bool>,
    affinity_sets: BTreeMap<String, Option<i32>>,
}

impl Delta {
    /// A part's chains `old` became `new`: chains that came are added, chains whose rules
    /// differ are flushed, and both filled; chains that went are removed at the end.
    fn chains(
        &mut self,
        old: Option<&BTreeMap<String, Vec<Rule>>>,
        new: Option<&BTreeMap<String, Vec<Rule>>>,
    ) {
        let empty = BTreeMap::new();
        let (oc, nc) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
        for (name, rules) in nc {
            match oc.get(name) {
                Some(before) if before == rules => continue,
                Some(_) => self.fills.push(Op::FlushChain(name.clone())),
                None => self.add_chains.push(Op::AddChain(name.clone())),
            }
            for r in rules {
                self.fills.push(Op::AddRule { chain: name.clone(), rule: r.clone() });
            }
        }
        self.removed_chains.extend(oc.keys().filter(|c| !nc.contains_key(*c)).cloned());
    }

    /// The steps, in an order that keeps every reference valid at each step of the (atomic)
    /// transaction; `m` is the merged state after. None: an affinity set's timeout changed.
    fn finish(self, m: &Merged) -> Option<Change> {
        let mut ops = Vec::new();
        let mut delete_sets = Vec::new();
        for (name, before) in &self.affinity_sets {
            match (before, m.affinity_sets.get(name)) {
                (Some(a), Some(b)) if a != b => return None,
                (None, Some(t)) => ops.push(Op::AddAffinitySet { name: name.clone(), timeout: *t }),
                (Some(_), None) => delete_sets.push(Op::DeleteSet(name.clone())),
                _ => {}
            }
        }
        ops.extend(self.add_chains);
        ops.extend(self.fills);
        map_ops(&mut ops, "service-ips", self.service_ips, &m.service_ips, Elem::Addr);
        map_ops(
            &mut ops,
            "service-nodeports",
            self.service_nodeports,
            &m.service_nodeports,
            Elem::Port,
        );
        map_ops(
            &mut ops,
            "no-endpoint-services",
            self.no_endpoint_services,
            &m.no_endpoint_services,
            Elem::Addr,
        );
        map_ops(&mut ops, "firewall-ips", self.firewall_ips, &m.firewall_ips, Elem::Addr);
        map_ops(
            &mut ops,
            "no-endpoint-nodeports",
            self.no_endpoint_nodeports,
            &m.no_endpoint_nodeports,
            Elem::Port,
        );
        set_ops(&mut ops, "cluster-ips", self.cluster_ips, &m.cluster_ips, Elem::Ip);
        set_ops(&mut ops, "hairpin", self.hairpin, &m.hairpin, Elem::Pair);
        // Flushed first, all of them: a chain about to go may still be the target of another
        // chain that goes too.
        for name in &self.removed_chains {
            ops.push(Op::FlushChain(name.clone()));
        }
        for name in self.removed_chains {
            ops.push(Op::DeleteChain(name));
        }
        ops.extend(delete_sets);
        let (mut udp_gone, mut udp_came) = (Vec::new(), Vec::new());
        for (b, before) in self.udp_backends {
            match (before, m.udp_backends.contains_key(&b)) {
                (true, false) => udp_gone.push(b),
                (false, true) => udp_came.push(b),
                _ => {}
            }
        }
        Some(Change { ops, udp_gone, udp_came })
    }
}

/// `delete element` for keys that went or whose verdict changed, then `add element` for keys
/// that came or changed (nft cannot overwrite a map element's verdict in place); `touched`
/// holds each key's verdict before.
fn map_ops<K: Ord + Copy>(
    ops: &mut Vec<Op>,
    map: &'static str,
    touched: BTreeMap<K, Option<String>>,
    claims: &Claims<K>,
    elem: fn(K, Option<String>) -> Elem,
) {
    let (mut gone, mut came) = (Vec::new(), Vec::new());
    for (k, before) in touched {
        let now = winner(claims, &k);
        if before == now {
            continue;
        }
        if before.is_some() {
            gone.push(elem(k, None));
        }
        if let Some(v) = now {
            came.push(elem(k, Some(v)));
        }
    }
    push_elements(ops, false, map, gone);
    push_elements(ops, true, map, came);
}

/// As [`map_ops`] for a set; `touched` holds whether each element was in it before.
fn set_ops<K: Ord + Copy>(
    ops: &mut Vec<Op>,
    set: &'static str,
    touched: BTreeMap<K, bool>,
    now: &BTreeMap<K, usize>,
    elem: fn(K) -> Elem,
) {
    let (mut gone, mut came) = (Vec::new(), Vec::new());
    for (k, before) in touched {
        match (before, now.contains_key(&k)) {
            (true, false) => gone.push(elem(k)),
            (false, true) => came.push(elem(k)),
            _ => {}
        }
    }
    push_elements(ops, false, set, gone);
    push_elements(ops, true, set, came);
}

fn push_elements(ops: &mut Vec<Op>, add: bool, set: &'static str, elems: Vec<Elem>) {
    if !elems.is_empty() {
        ops.push(Op::Elements { add, set, elems });
    }
}
/// A map key of `address . protocol . port`, as nft writes it.
fn addr_elem(k: &(Ipv4Addr, Proto, u16)) -> String {
    format!("{} . {} . {}", k.0, k.1.nft(), k.2)
}

/// A map key of `protocol . port`, as nft writes it.
fn port_elem(k: &(Proto, u16)) -> String {
    format!("{} . {}", k.0.nft(), k.1)
}

/// Which endpoints serve new connections, following upstream's CategorizeEndpoints: ready ones;
/// only when none is ready, the ones still serving while terminating (so a rolling update with
/// slow readiness does not drop traffic). `local` applies the same rule to this node's endpoints.
fn categorize<'e>(eps: &[&'e Endpoint]) -> (Vec<&'e Endpoint>, Vec<&'e Endpoint>) {
    let pick = |only_local: bool| -> Vec<&'e Endpoint> {
        let mine = || eps.iter().copied().filter(move |e| !only_local || e.local);
        let ready: Vec<_> = mine().filter(|e| e.ready).collect();
        if ready.is_empty() { mine().filter(|e| e.serving_terminating()).collect() } else { ready }
    };
    (pick(false), pick(true))
}

fn index_endpoints<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node_name: &str,
    skipped: &mut Vec<String>,
) -> EndpointIndex {
    let mut index = EndpointIndex::new();
    for slice in slices {
        // IPv6 and FQDN slices are not for an `ip` table.
        if slice.address_type != "IPv4" {
            continue;
        }
        let meta = &slice.metadata;
        let slice_name = meta.name.as_deref().unwrap_or("");
        let Some(ns) = meta.namespace.as_deref() else {
            skipped.push(format!("EndpointSlice {slice_name}: no namespace"));
            continue;
        };
        // Slices without the label belong to no Service (someone's own bookkeeping).
        let Some(svc) = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            continue;
        };
        let by_port = index.entry((ns.to_string(), svc.clone())).or_default();
        for p in slice.ports.iter().flatten() {
            let port_name = p.name.clone().unwrap_or_default();
            let Some(port) = p.port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0) else {
                skipped.push(format!(
                    "EndpointSlice {ns}/{slice_name} port {port_name:?}: no valid port number"
                ));
                continue;
            };
            let Some(proto) = Proto::parse(p.protocol.as_deref()) else {
                skipped.push(format!(
                    "EndpointSlice {ns}/{slice_name} port {port_name:?}: unknown protocol {:?}",
                    p.protocol.as_deref().unwrap_or("")
                ));
                continue;
            };
            let eps = by_port.entry((port_name, proto)).or_default();
            for ep in &slice.endpoints {
                // Upstream uses the first address only: the others are for the same backend.
                let Some(addr) = ep.addresses.first() else { continue };
                let Ok(ip) = addr.parse::<Ipv4Addr>() else {
                    skipped.push(format!(
                        "EndpointSlice {ns}/{slice_name}: address {addr:?} is not IPv4"
                    ));
                    continue;
                };
                let c = ep.conditions.as_ref();
                // Absent conditions mean "ready" (the API's documented default), and serving
                // defaults to ready for producers that predate the field.
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let e = Endpoint {
                    ip,
                    port,
                    ready,
                    serving: c.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
                };
                // The same address in two slices (during a slice rebalance): the ready copy wins.
                eps.entry((ip, port))
                    .and_modify(|old| {
                        if e.ready && !old.ready {
                            *old = e.clone()
                        }
                    })
                    .or_insert(e);
            }
        }
    }
    index
}

/// Whether `s` can sit inside an nft identifier: Kubernetes names are DNS labels, but a store
/// might still hold something odd, and one bad name must not break the whole transaction.
fn nft_safe(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn service_ports(svc: &Service, skipped: &mut Vec<String>) -> Vec<ServicePort> {
    let meta = &svc.metadata;
    let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
        skipped.push("Service without namespace or name".to_string());
        return Vec::new();
    };
    if meta.labels.as_ref().is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return Vec::new();
    }
    let Some(spec) = svc.spec.as_ref() else { return Vec::new() };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        return Vec::new();
    }
    if !nft_safe(ns) || !nft_safe(name) {
        skipped.push(format!("Service {ns}/{name}: name has characters nft names cannot hold"));
        return Vec::new();
    }
    // The first IPv4 of clusterIPs (dual-stack lists both families), else clusterIP.
    let candidates: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .chain(spec.cluster_ip.as_deref())
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .collect();
    let Some(cluster_ip) = candidates.iter().find_map(|ip| ip.parse::<Ipv4Addr>().ok()) else {
        // Headless (no cluster IP) and IPv6-only Services have nothing to proxy here.
        if let Some(bad) = candidates.iter().find(|ip| !ip.contains(':')) {
            skipped.push(format!("Service {ns}/{name}: clusterIP {bad:?} is not an address"));
        }
        return Vec::new();
    };
    let mut external_ips: Vec<Ipv4Addr> = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        match ip.parse::<Ipv4Addr>() {
            Ok(a) => external_ips.push(a),
            Err(_) if ip.contains(':') => {}
            Err(_) => skipped.push(format!("Service {ns}/{name}: externalIP {ip:?} is invalid")),
        }
    }
    let mut lb_ips: Vec<Ipv4Addr> = Vec::new();
    if type_ == "LoadBalancer" {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref());
        for ing in ingress.and_then(|lb| lb.ingress.as_ref()).into_iter().flatten() {
            // ipMode Proxy: the load balancer proxies to node ports itself, so the node must
            // not capture traffic to its address (upstream skips these too).
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(a) = ing.ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok()) {
                lb_ips.push(a);
            }
        }
    }
    lb_ips.sort();
    lb_ips.dedup();
    external_ips.extend(lb_ips.iter().copied());
    external_ips.sort();
    external_ips.dedup();
    let mut source_ranges: Vec<Ipv4Cidr> = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match r.parse::<Ipv4Cidr>() {
            Ok(c) => source_ranges.push(c),
            // IPv6 ranges are for the ip6 rules.
            Err(_) if r.contains(':') => {}
            Err(_) => skipped
                .push(format!("Service {ns}/{name}: loadBalancerSourceRange {r:?} is invalid")),
        }
    }
    source_ranges.sort();
    source_ranges.dedup();
    let affinity_timeout_seconds =
        (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(AFFINITY_TIMEOUT_DEFAULT_SECONDS)
                .clamp(1, AFFINITY_TIMEOUT_MAX_SECONDS)
        });
    let mut out = Vec::new();
    for p in spec.ports.iter().flatten() {
        let port_name = p.name.clone().unwrap_or_default();
        let what = format!("Service {ns}/{name} port {port_name:?}");
        if !nft_safe(&port_name) {
            skipped.push(format!("{what}: name has characters nft names cannot hold"));
            continue;
        }
        let Some(proto) = Proto::parse(p.protocol.as_deref()) else {
            skipped.push(format!(
                "{what}: unknown protocol {:?}",
                p.protocol.as_deref().unwrap_or("")
            ));
            continue;
        };
        let Some(port) = u16::try_from(p.port).ok().filter(|n| *n != 0) else {
            skipped.push(format!("{what}: port {} is out of range", p.port));
            continue;
        };
        let node_port = match p.node_port {
            Some(n) if matches!(type_, "NodePort" | "LoadBalancer") => {
                match u16::try_from(n).ok().filter(|n| *n != 0) {
                    Some(n) => Some(n),
                    None => {
                        skipped.push(format!("{what}: nodePort {n} is out of range"));
                        None
                    }
                }
            }
            _ => None,
        };
        let mut sp = ServicePort {
            namespace: ns.to_string(),
            name: name.to_string(),
            port_name,
            proto,
            cluster_ip,
            port,
            node_port,
            external_ips: external_ips.clone(),
            lb_ips: lb_ips.clone(),
            source_ranges: source_ranges.clone(),
            affinity_timeout_seconds,
            external_policy_local: false,
            internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        };
        // Local external policy only means something for traffic that arrives from outside.
        sp.external_policy_local =
            spec.external_traffic_policy.as_deref() == Some("Local") && sp.externally_accessible();
        // The longest name derived from the base is an affinity set with an endpoint suffix.
        if "affinity-".len() + sp.base().len() + "__255.255.255.255/65535".len() > NFT_NAME_LEN_MAX
        {
            skipped.push(format!("{what}: names too long for nft"));
            continue;
        }
        out.push(sp);
    }
    out
}

/// Everything the table will hold, collected per Service port and written out sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Tables {
    /// `address . proto . port` → verdict, with the Service that claimed the key first.
    service_ips: BTreeMap<(Ipv4Addr, Proto, u16), (String, String)>,
    no_endpoint_services: BTreeMap<(Ipv4Addr, Proto, u16), (String, String)>,
    service_nodeports: BTreeMap<(Proto, u16), (String, String)>,
    no_endpoint_nodeports: BTreeMap<(Proto, u16), (String, String)>,
    firewall_ips: BTreeMap<(Ipv4Addr, Proto, u16), (String, String)>,
    cluster_ips: BTreeSet<Ipv4Addr>,
    /// Affinity set name → timeout in seconds.
    affinity_sets: BTreeMap<String, i32>,
    udp_backends: BTreeSet<UdpBackend>,
    /// Every endpoint address some rule DNATs to: a packet from one of them to itself after
    /// DNAT (a pod reaching itself through a Service) is masqueraded, so the reply comes back
    /// from the Service address.
    hairpin: BTreeSet<Ipv4Addr>,
    /// Per-Service chains, in rule order.
    chains: BTreeMap<String, Vec<Rule>>,
}

/// Adds `key → verdict` unless another Service claimed the key first (two Services with the
/// same NodePort or external IP and port): nft would refuse the duplicate, and the sorted order
/// makes the winner stable.
fn claim<K: Ord + std::fmt::Debug>(
    map: &mut BTreeMap<K, (String, String)>,
    key: K,
    verdict: String,
    owner: &str,
    skipped: &mut Vec<String>,
) {
    match map.get(&key) {
        Some((_, first)) if first != owner => {
            skipped.push(format!("{owner}: {key:?} is already used by {first}"));
        }
        Some(_) => {}
        None => {
            map.insert(key, (verdict, owner.to_string()));
        }
    }
}

fn endpoint_chain(base: &str, ep: &Endpoint) -> String {
    format!("endpoint-{base}__{}/{}", ep.ip, ep.port)
}

fn affinity_set(base: &str, ep: &Endpoint) -> String {
    format!("affinity-{base}__{}/{}", ep.ip, ep.port)
}

/// The rules of a policy chain that spread connections over `eps`. With ClientIP affinity,
/// through a chain per endpoint (which remembers the client): clients with a live affinity
/// entry go back to their endpoint, everyone else gets one at random. Without, the endpoint is
/// picked and DNATed in one rule: fewer chains keep the kernel's check of the table, which it
/// repeats on every change, short.
fn policy_rules(base: &str, proto: Proto, eps: &[&Endpoint], affinity: bool) -> Vec<Rule> {
    if !affinity {
        return match eps {
            [ep] => vec![Rule::Dnat(proto, ep.ip, ep.port)],
            _ => vec![Rule::DnatPick(proto, eps.iter().map(|ep| (ep.ip, ep.port)).collect())],
        };
    }
    let mut rules = Vec::new();
    for ep in eps {
        rules.push(Rule::StickyGoto {
            set: affinity_set(base, ep),
            chain: endpoint_chain(base, ep),
        });
    }
    rules.push(Rule::Pick(eps.iter().map(|ep| endpoint_chain(base, ep)).collect()));
    rules
}

fn add_service_port(
    t: &mut Tables,
    sp: &ServicePort,
    eps: &[&Endpoint],
    config: &RulesConfig,
    skipped: &mut Vec<String>,
) {
    let base = sp.base();
    let owner = format!("Service {}/{} port {:?}", sp.namespace, sp.name, sp.port_name);
    let (cluster_eps, local_eps) = categorize(eps);
    let has_endpoints = !cluster_eps.is_empty();
    let accessible = sp.externally_accessible();
    // Cluster endpoints serve Cluster internal policy, and also external traffic even under
    // Local external policy: pods and the node itself are short-circuited to them.
    let uses_cluster = has_endpoints && (!sp.internal_policy_local || accessible);
    let uses_local =
        !local_eps.is_empty() && (sp.internal_policy_local || sp.external_policy_local);
    let cluster_chain = format!("service-{base}");
    let local_chain = format!("local-{base}");
    let external_chain = format!("external-{base}");
    let (internal_chain, has_internal) = if sp.internal_policy_local {
        (&local_chain, !local_eps.is_empty())
    } else {
        (&cluster_chain, has_endpoints)
    };
    let (external_policy_chain, has_external) = if sp.external_policy_local {
        (&local_chain, !local_eps.is_empty())
    } else {
        (&cluster_chain, has_endpoints)
    };
    // Even without local endpoints, external traffic from pods and from the node is still
    // short-circuited to the cluster endpoints through this chain.
    let uses_external_chain = has_endpoints && accessible;
    // No endpoints at all: reject, so clients fail at once. Endpoints exist but none this policy
    // may use: drop, as upstream does (the client is told nothing, as if the node were absent).
    let filter_verdict =
        if has_endpoints { "drop".to_string() } else { "goto reject-chain".to_string() };

    // Every endpoint some policy chain can pick (with affinity, each gets a chain).
    let mut used: BTreeSet<&Endpoint> = BTreeSet::new();
    if uses_cluster {
        used.extend(cluster_eps.iter().copied());
    }
    if uses_local {
        used.extend(local_eps.iter().copied());
    }
    if sp.proto == Proto::Udp {
        let mut fronts = vec![UdpFront::Address(SocketAddrV4::new(sp.cluster_ip, sp.port))];
        fronts.extend(
            sp.external_ips.iter().map(|ip| UdpFront::Address(SocketAddrV4::new(*ip, sp.port))),
        );
        fronts.extend(sp.node_port.map(UdpFront::NodePort));
        for front in fronts {
            for ep in &used {
                let endpoint = SocketAddrV4::new(ep.ip, ep.port);
                t.udp_backends.insert(UdpBackend { front, endpoint });
            }
        }
    }
    for ep in &used {
        // Hairpin: a pod reaching itself through the Service must see the reply come from the
        // Service, so its source is rewritten to the node (in nat-postrouting).
        t.hairpin.insert(ep.ip);
        if let Some(timeout) = sp.affinity_timeout_seconds {
            let set = affinity_set(&base, ep);
            let rules =
                vec![Rule::RememberClient(set.clone()), Rule::Dnat(sp.proto, ep.ip, ep.port)];
            t.affinity_sets.insert(set, timeout);
            t.chains.insert(endpoint_chain(&base, ep), rules);
        }
    }

    // Internal (ClusterIP) traffic from outside the pod network is masqueraded: it may be sent
    // to another node, whose replies must come back here to be un-NATed.
    if has_internal {
        let masq = |unless_from| Rule::MarkServiceTraffic {
            ip: sp.cluster_ip,
            proto: sp.proto,
            port: sp.port,
            unless_from,
        };
        let masq = if config.masquerade_all {
            Some(masq(None))
        } else {
            config.cluster_cidr.map(|c| masq(Some(c)))
        };
        t.chains.entry(internal_chain.clone()).or_default().extend(masq);
    }
    let affinity = sp.affinity_timeout_seconds.is_some();
    if uses_cluster {
        let rules = policy_rules(&base, sp.proto, &cluster_eps, affinity);
        t.chains.entry(cluster_chain.clone()).or_default().extend(rules);
    }
    if uses_local {
        let rules = policy_rules(&base, sp.proto, &local_eps, affinity);
        t.chains.entry(local_chain.clone()).or_default().extend(rules);
    }

    if uses_external_chain {
        let mut rules = Vec::new();
        if sp.external_policy_local {
            // Keep the client's address (no masquerade) for traffic from outside, except:
            // pods and the node itself have no reason to be limited to this node's endpoints.
            if let Some(c) = config.cluster_cidr {
                rules.push(Rule::FromGoto(c, cluster_chain.clone()));
            }
            // The node's own traffic must be masqueraded, or replies from another node's
            // endpoint would go to an address that is local there too.
            rules.push(Rule::LocalMark);
            rules.push(Rule::LocalGoto(cluster_chain.clone()));
        } else {
            // The endpoint may be on another node: masquerade so replies come back through us.
            rules.push(Rule::Mark);
        }
        if has_external {
            rules.push(Rule::Goto(external_policy_chain.clone()));
        }
        t.chains.insert(external_chain.clone(), rules);
    }

    // loadBalancerSourceRanges: checked before DNAT, on the load-balancer addresses only
    // (NodePorts and externalIPs are not subject to them, as upstream).
    if !sp.lb_ips.is_empty() && !sp.source_ranges.is_empty() {
        let fw_chain = format!("firewall-{base}");
        t.chains.insert(fw_chain.clone(), vec![Rule::DropUnlessFrom(sp.source_ranges.clone())]);
        for ip in &sp.lb_ips {
            let key = (*ip, sp.proto, sp.port);
            claim(&mut t.firewall_ips, key, format!("goto {fw_chain}"), &owner, skipped);
        }
    }

    // The maps that route new connections here, or filter them when nothing can serve them.
    let key = (sp.cluster_ip, sp.proto, sp.port);
    t.cluster_ips.insert(sp.cluster_ip);
    if has_internal {
        claim(&mut t.service_ips, key, format!("goto {internal_chain}"), &owner, skipped);
    } else {
        claim(&mut t.no_endpoint_services, key, filter_verdict.clone(), &owner, skipped);
    }
    for ip in &sp.external_ips {
        let key = (*ip, sp.proto, sp.port);
        if uses_external_chain {
            claim(&mut t.service_ips, key, format!("goto {external_chain}"), &owner, skipped);
        }
        if !has_external {
            claim(&mut t.no_endpoint_services, key, filter_verdict.clone(), &owner, skipped);
        }
    }
    if let Some(np) = sp.node_port {
        let key = (sp.proto, np);
        if uses_external_chain {
            claim(&mut t.service_nodeports, key, format!("goto {external_chain}"), &owner, skipped);
        }
        if !has_external {
            claim(&mut t.no_endpoint_nodeports, key, filter_verdict.clone(), &owner, skipped);
        }
    }
}

impl Merged {
    /// The full transaction: this table's sets and maps, the skeleton, and `chains`.
    fn write(&self, config: &RulesConfig, chains: &BTreeMap<&String, &Vec<Rule>>) -> String {
        let table = &config.table;
        let mut out = String::new();
        // `add` then `delete` makes the delete succeed whether or not a table exists (first
        // start, or whatever a crashed proxy left), and the definition that follows rebuilds it:
        // nft applies the three as one transaction, so packets never see a half-built table.
        let _ = writeln!(out, "add table ip {table}");
        let _ = writeln!(out, "delete table ip {table}");
        let _ = writeln!(out, "table ip {table} {{");

        let addr_key = "ipv4_addr . inet_proto . inet_service";
        let port_key = "inet_proto . inet_service";
        // Each key with its first claimant's verdict.
        let elems = |m: &Claims<AddrKey>| -> Vec<String> {
            m.iter()
                .filter_map(|(k, c)| c.values().next().map(|(v, _)| (k, v)))
                .map(|(k, v)| format!("{} : {v}", addr_elem(k)))
                .collect()
        };
        let port_elems = |m: &Claims<PortKey>| -> Vec<String> {
            m.iter()
                .filter_map(|(k, c)| c.values().next().map(|(v, _)| (k, v)))
                .map(|(k, v)| format!("{} : {v}", port_elem(k)))
                .collect()
        };
        write_set(
            &mut out,
            "map",
            "service-ips",
            &format!("{addr_key} : verdict"),
            &[],
            &elems(&self.service_ips),
        );
        write_set(
            &mut out,
            "map",
            "service-nodeports",
            &format!("{port_key} : verdict"),
            &[],
            &port_elems(&self.service_nodeports),
        );
        write_set(
            &mut out,
            "map",
            "no-endpoint-services",
            &format!("{addr_key} : verdict"),
            &[],
            &elems(&self.no_endpoint_services),
        );
        write_set(
            &mut out,
            "map",
            "firewall-ips",
            &format!("{addr_key} : verdict"),
            &[],
            &elems(&self.firewall_ips),
        );
        write_set(
            &mut out,
            "map",
            "no-endpoint-nodeports",
            &format!("{port_key} : verdict"),
            &[],
            &port_elems(&self.no_endpoint_nodeports),
        );
        let ips: Vec<String> = self.cluster_ips.keys().map(ToString::to_string).collect();
        write_set(&mut out, "set", "cluster-ips", "ipv4_addr", &[], &ips);
        let pairs: Vec<String> = self.hairpin.keys().map(|ip| format!("{ip} . {ip}")).collect();
        write_set(&mut out, "set", "hairpin", "ipv4_addr . ipv4_addr", &[], &pairs);
        for (name, timeout) in &self.affinity_sets {
            let extra = ["flags dynamic,timeout".to_string(), format!("timeout {timeout}s")];
            write_set(&mut out, "set", name, "ipv4_addr", &extra, &[]);
        }

        // Filter chains run at dstnat-10, before DNAT, so they see the Service address.
        let base = |hook_type: &str, hook: &str, priority: i32| {
            format!("type {hook_type} hook {hook} priority {priority}; policy accept;")
        };
        let new = "ct state new";
        // `reject` is not allowed in prerouting on older kernels, so only the firewall (which
        // drops) is checked there; endpoint checks wait for input/forward/output.
        write_chain(
            &mut out,
            "filter-prerouting",
            Some(&base("filter", "prerouting", -110)),
            &[format!("{new} jump firewall-check")],
        );
        write_chain(
            &mut out,
            "filter-input",
            Some(&base("filter", "input", -110)),
            &[
                format!("{new} jump nodeport-endpoints-check"),
                format!("{new} jump service-endpoints-check"),
            ],
        );
        write_chain(
            &mut out,
            "filter-forward",
            Some(&base("filter", "forward", -110)),
            &[
                format!("{new} jump service-endpoints-check"),
                format!("{new} jump cluster-ips-check"),
            ],
        );
        write_chain(
            &mut out,
            "filter-output",
            Some(&base("filter", "output", -110)),
            &[format!("{new} jump service-endpoints-check"), format!("{new} jump firewall-check")],
        );
        // After DNAT (dstnat+10): whatever still goes to a ClusterIP matched no Service port.
        write_chain(
            &mut out,
            "filter-output-post-dnat",
            Some(&base("filter", "output", -90)),
            &[format!("{new} jump cluster-ips-check")],
        );
        write_chain(
            &mut out,
            "nat-prerouting",
            Some(&base("nat", "prerouting", -100)),
            &["jump services".to_string()],
        );
        write_chain(
            &mut out,
            "nat-output",
            Some(&base("nat", "output", -100)),
            &["jump services".to_string()],
        );
        write_chain(
            &mut out,
            "nat-postrouting",
            Some(&base("nat", "postrouting", 100)),
            &[
                // A pod that reached itself through a Service (after DNAT, source and
                // destination are its own address).
                "ct status dnat ip saddr . ip daddr @hairpin jump mark-for-masquerade".to_string(),
                "jump masquerading".to_string(),
            ],
        );

        // NodePorts answer on local addresses; never on loopback, which cannot be masqueraded
        // or routed back from another node.
        let mut node_addr = "fib daddr type local ip daddr != 127.0.0.0/8".to_string();
        if !config.nodeport_cidrs.is_empty() {
            let cidrs: Vec<String> =
                config.nodeport_cidrs.iter().map(ToString::to_string).collect();
            let _ = write!(node_addr, " ip daddr {{ {} }}", cidrs.join(", "));
        }
        write_chain(
            &mut out,
            "services",
            None,
            &[
                "ip daddr . meta l4proto . th dport vmap @service-ips".to_string(),
                format!("{node_addr} meta l4proto . th dport vmap @service-nodeports"),
            ],
        );
        write_chain(
            &mut out,
            "service-endpoints-check",
            None,
            &["ip daddr . meta l4proto . th dport vmap @no-endpoint-services".to_string()],
        );
        write_chain(
            &mut out,
            "nodeport-endpoints-check",
            None,
            &[format!("{node_addr} meta l4proto . th dport vmap @no-endpoint-nodeports")],
        );
        write_chain(
            &mut out,
            "cluster-ips-check",
            None,
            &["ip daddr @cluster-ips reject".to_string()],
        );
        write_chain(
            &mut out,
            "firewall-check",
            None,
            &["ip daddr . meta l4proto . th dport vmap @firewall-ips".to_string()],
        );
        write_chain(&mut out, "reject-chain", None, &["reject".to_string()]);
        write_chain(
            &mut out,
            "mark-for-masquerade",
            None,
            &[format!("meta mark set meta mark or {MASQUERADE_MARK:#x}")],
        );
        // Clear the bit before masquerading, so a packet that is forwarded again (e.g. into a
        // tunnel) is not masqueraded twice.
        write_chain(
            &mut out,
            "masquerading",
            None,
            &[
                format!("meta mark and {MASQUERADE_MARK:#x} == 0 return"),
                format!("meta mark set meta mark xor {MASQUERADE_MARK:#x}"),
                "masquerade fully-random".to_string(),
            ],
        );
        for (name, rules) in chains {
            let rules: Vec<String> = rules.iter().map(ToString::to_string).collect();
            write_chain(&mut out, name, None, &rules);
        }
        out.push_str("}\n");
        out
    }
}

fn write_set(
    out: &mut String,
    kind: &str,
    name: &str,
    type_: &str,
    extra: &[String],
    elements: &[String],
) {
    let _ = writeln!(out, "\t{kind} {name} {{");
    let _ = writeln!(out, "\t\ttype {type_}");
    for e in extra {
        let _ = writeln!(out, "\t\t{e}");
    }
    if !elements.is_empty() {
        let _ = writeln!(out, "\t\telements = {{");
        for (i, e) in elements.iter().enumerate() {
            let comma = if i + 1 < elements.len() { "," } else { "" };
            let _ = writeln!(out, "\t\t\t{e}{comma}");
        }
        let _ = writeln!(out, "\t\t}}");
    }
    let _ = writeln!(out, "\t}}");
}

fn write_chain(out: &mut String, name: &str, hook: Option<&str>, rules: &[String]) {
    let _ = writeln!(out, "\tchain {name} {{");
    if let Some(h) = hook {
        let _ = writeln!(out, "\t\t{h}");
    }
    for r in rules {
        let _ = writeln!(out, "\t\t{r}");
    }
    let _ = writeln!(out, "\t}}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn svc(v: Value) -> Service {
        serde_json::from_value(v).expect("service json")
    }

    fn slice(v: Value) -> EndpointSlice {
        serde_json::from_value(v).expect("slice json")
    }

    fn config() -> RulesConfig {
        RulesConfig {
            table: "rkube".into(),
            node_name: "node-a".into(),
            cluster_cidr: Some("10.244.0.0/16".parse().expect("cidr")),
            nodeport_cidrs: Vec::new(),
            masquerade_all: false,
        }
    }

    /// A ClusterIP Service `default/web` on 10.96.0.50:80 (port name "http") plus `spec` extras.
    fn web(extra: Value) -> Service {
        let mut v = json!({
            "metadata": {"namespace": "default", "name": "web"},
            "spec": {"clusterIP": "10.96.0.50", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        });
        if let (Some(spec), Some(extra)) = (v["spec"].as_object_mut(), extra.as_object()) {
            for (k, x) in extra {
                spec.insert(k.clone(), x.clone());
            }
        }
        svc(v)
    }

    /// A slice for `default/web` port "http"/8080 with `(ip, node, ready, serving, terminating)`.
    fn web_slice(name: &str, eps: &[(&str, &str, bool, bool, bool)]) -> EndpointSlice {
        let eps: Vec<Value> = eps
            .iter()
            .map(|(ip, node, r, s, t)| {
                json!({"addresses": [ip], "nodeName": node,
                       "conditions": {"ready": r, "serving": s, "terminating": t}})
            })
            .collect();
        slice(json!({
            "metadata": {"namespace": "default", "name": name,
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": eps,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }))
    }

    fn ready(
        ip: &'static str,
        node: &'static str,
    ) -> (&'static str, &'static str, bool, bool, bool) {
        (ip, node, true, true, false)
    }

    fn render_one(services: &[Service], slices: &[EndpointSlice]) -> Ruleset {
        render(services, slices, &config())
    }

    /// The rules of chain `name` (without the braces), or None when the chain is absent.
    fn chain<'t>(text: &'t str, name: &str) -> Option<Vec<&'t str>> {
        let head = format!("\tchain {name} {{\n");
        let start = text.find(&head)? + head.len();
        let body = &text[start..];
        let end = body.find("\n\t}")?;
        Some(body[..end].lines().map(str::trim).collect())
    }

    /// The elements of set or map `name`.
    fn elements<'t>(text: &'t str, kind: &str, name: &str) -> Vec<&'t str> {
        let head = format!("\t{kind} {name} {{\n");
        let Some(start) = text.find(&head) else { return Vec::new() };
        let body = &text[start + head.len()..];
        let end = body.find("\n\t}").unwrap_or(body.len());
        let body = &body[..end];
        match body.find("elements = {") {
            Some(i) => body[i + "elements = {".len()..]
                .lines()
                .map(|l| l.trim().trim_end_matches(','))
                .filter(|l| !l.is_empty() && *l != "}")
                .collect(),
            None => Vec::new(),
        }
    }

    const SVC: &str = "service-default/web/tcp/http";
    const EP5: &str = "endpoint-default/web/tcp/http__10.244.1.5/8080";
    const EP6: &str = "endpoint-default/web/tcp/http__10.244.1.6/8080";

    #[test]
    fn the_transaction_replaces_the_whole_table_atomically() {
        let r = render_one(&[], &[]);
        assert!(
            r.text.starts_with("add table ip rkube\ndelete table ip rkube\ntable ip rkube {\n")
        );
        assert!(r.text.ends_with("}\n"));
        let custom = RulesConfig { table: "other".into(), ..config() };
        assert!(render(&[], &[], &custom).text.starts_with("add table ip other\n"));
    }

    #[test]
    fn base_chains_hook_nat_and_filter_at_upstream_priorities() {
        let t = render_one(&[], &[]).text;
        assert_eq!(
            chain(&t, "nat-prerouting").expect("chain"),
            ["type nat hook prerouting priority -100; policy accept;", "jump services"]
        );
        assert_eq!(
            chain(&t, "nat-output").expect("chain"),
            ["type nat hook output priority -100; policy accept;", "jump services"]
        );
        assert_eq!(
            chain(&t, "nat-postrouting").expect("chain"),
            [
                "type nat hook postrouting priority 100; policy accept;",
                "ct status dnat ip saddr . ip daddr @hairpin jump mark-for-masquerade",
                "jump masquerading"
            ]
        );
        assert_eq!(
            chain(&t, "filter-output").expect("chain"),
            [
                "type filter hook output priority -110; policy accept;",
                "ct state new jump service-endpoints-check",
                "ct state new jump firewall-check"
            ]
        );
        assert_eq!(
            chain(&t, "masquerading").expect("chain"),
            [
                "meta mark and 0x4000 == 0 return",
                "meta mark set meta mark xor 0x4000",
                "masquerade fully-random"
            ]
        );
    }

    #[test]
    fn a_cluster_ip_is_dnated_to_a_random_ready_endpoint() {
        let s = web_slice("web-1", &[ready("10.244.1.6", "node-b"), ready("10.244.1.5", "node-a")]);
        let r = render_one(&[web(json!({}))], &[s]);
        let t = &r.text;
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        assert_eq!(
            elements(t, "map", "service-ips"),
            [format!("10.96.0.50 . tcp . 80 : goto {SVC}")]
        );
        assert_eq!(
            chain(t, SVC).expect("service chain"),
            [
                "ip daddr 10.96.0.50 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
                "meta l4proto tcp dnat to numgen random mod 2 map { 0 : 10.244.1.5 . 8080, 1 : 10.244.1.6 . 8080 }",
            ]
        );
        // Without affinity the endpoint is DNATed in place: no chain per endpoint.
        assert!(chain(t, EP5).is_none());
        assert_eq!(elements(t, "set", "cluster-ips"), ["10.96.0.50"]);
        assert!(elements(t, "map", "no-endpoint-services").is_empty());
    }

    #[test]
    fn services_chain_dispatches_cluster_ips_and_node_ports_on_local_addresses() {
        let t = render_one(&[], &[]).text;
        assert_eq!(
            chain(&t, "services").expect("chain"),
            [
                "ip daddr . meta l4proto . th dport vmap @service-ips",
                "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
            ]
        );
    }

    #[test]
    fn nodeport_addresses_restrict_node_ports_to_those_prefixes() {
        let c = RulesConfig {
            nodeport_cidrs: vec![
                "192.168.0.0/16".parse().expect("cidr"),
                "10.0.0.1".parse().expect("cidr"),
            ],
            ..config()
        };
        let t = render(&[], &[], &c).text;
        let want = "fib daddr type local ip daddr != 127.0.0.0/8 ip daddr { 192.168.0.0/16, 10.0.0.1/32 } meta l4proto . th dport vmap";
        assert!(chain(&t, "services").expect("chain")[1].starts_with(want));
        assert!(chain(&t, "nodeport-endpoints-check").expect("chain")[0].starts_with(want));
    }

    #[test]
    fn a_node_port_goes_through_the_external_chain_which_masquerades() {
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-b")]);
        let svc = web(json!({"type": "NodePort",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}));
        let t = render_one(&[svc], &[s]).text;
        let ext = "external-default/web/tcp/http";
        assert_eq!(elements(&t, "map", "service-nodeports"), [format!("tcp . 30080 : goto {ext}")]);
        assert_eq!(
            chain(&t, ext).expect("external chain"),
            ["jump mark-for-masquerade".to_string(), format!("goto {SVC}")]
        );
        // ClusterIP traffic still goes straight to the service chain.
        assert_eq!(
            elements(&t, "map", "service-ips"),
            [format!("10.96.0.50 . tcp . 80 : goto {SVC}")]
        );
    }

    #[test]
    fn external_ips_and_load_balancer_ingress_are_external_destinations() {
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-b")]);
        let mut svc =
            web(json!({"type": "LoadBalancer", "externalIPs": ["192.0.2.10", "2001:db8::1"],
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}));
        svc.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [
                {"ip": "198.51.100.7"}, {"ip": "198.51.100.8", "ipMode": "Proxy"}, {"hostname": "lb.example"}
            ]}}))
            .expect("status"),
        );
        let r = render_one(&[svc], &[s]);
        let ext = "external-default/web/tcp/http";
        assert_eq!(
            elements(&r.text, "map", "service-ips"),
            [
                format!("10.96.0.50 . tcp . 80 : goto {SVC}"),
                format!("192.0.2.10 . tcp . 80 : goto {ext}"),
                format!("198.51.100.7 . tcp . 80 : goto {ext}"),
            ]
        );
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
    }

    #[test]
    fn load_balancer_source_ranges_drop_other_clients_of_the_ingress_ips_only() {
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-b")]);
        let mut svc = web(json!({"type": "LoadBalancer", "externalIPs": ["192.0.2.10"],
            "loadBalancerSourceRanges": ["203.0.113.0/24", "198.51.100.1/32", "2001:db8::/32"],
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}));
        svc.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}))
                .expect("status"),
        );
        let r = render_one(&[svc], &[s]);
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        let fw = "firewall-default/web/tcp/http";
        assert_eq!(
            elements(&r.text, "map", "firewall-ips"),
            [format!("198.51.100.7 . tcp . 80 : goto {fw}")]
        );
        assert_eq!(
            chain(&r.text, fw).expect("firewall chain"),
            ["ip saddr != { 198.51.100.1/32, 203.0.113.0/24 } drop"]
        );
        assert_eq!(
            chain(&r.text, "filter-prerouting").expect("chain"),
            [
                "type filter hook prerouting priority -110; policy accept;",
                "ct state new jump firewall-check"
            ]
        );
    }

    #[test]
    fn without_source_ranges_there_is_no_firewall() {
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-b")]);
        let mut svc = web(
            json!({"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
        );
        svc.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}))
                .expect("status"),
        );
        let t = render_one(&[svc], &[s]).text;
        assert!(elements(&t, "map", "firewall-ips").is_empty());
        assert!(chain(&t, "firewall-default/web/tcp/http").is_none());
    }

    #[test]
    fn session_affinity_client_ip_uses_a_timed_set_per_endpoint() {
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-a"), ready("10.244.1.6", "node-a")]);
        let svc = web(json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}));
        let t = render_one(&[svc], &[s]).text;
        let set5 = "affinity-default/web/tcp/http__10.244.1.5/8080";
        let set6 = "affinity-default/web/tcp/http__10.244.1.6/8080";
        assert!(t.contains(&format!(
            "\tset {set5} {{\n\t\ttype ipv4_addr\n\t\tflags dynamic,timeout\n\t\ttimeout 600s\n\t}}\n"
        )));
        let rules = chain(&t, SVC).expect("service chain");
        assert_eq!(rules[1], format!("ip saddr @{set5} goto {EP5}"));
        assert_eq!(rules[2], format!("ip saddr @{set6} goto {EP6}"));
        assert!(rules[3].starts_with("numgen random mod 2 vmap"));
        assert_eq!(
            chain(&t, EP5).expect("endpoint chain"),
            [
                format!("update @{set5} {{ ip saddr }}"),
                "meta l4proto tcp dnat to 10.244.1.5:8080".to_string()
            ]
        );
    }

    #[test]
    fn live_affinity_entries_are_carried_into_sets_that_still_exist() {
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-a")]);
        let svc = web(json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}));
        let r = render_one(&[svc], &[s]);
        let set5 = "affinity-default/web/tcp/http__10.244.1.5/8080";
        let entry = |ip: [u8; 4], secs| AffinityEntry {
            client: ip.into(),
            expires: Duration::from_secs(secs),
        };
        let live = BTreeMap::from([
            (
                set5.to_string(),
                vec![
                    entry([192, 168, 0, 9], 9000),
                    entry([10, 0, 0, 2], 30),
                    entry([10, 0, 0, 3], 0),
                ],
            ),
            // The endpoint went away: its set is gone, and so are its clients.
            (
                "affinity-default/web/tcp/http__10.244.1.6/8080".to_string(),
                vec![entry([10, 0, 0, 4], 30)],
            ),
        ]);
        let t = r.text_with_affinity(&live);
        assert!(t.contains(&format!(
            "\tset {set5} {{\n\t\ttype ipv4_addr\n\t\tflags dynamic,timeout\n\t\ttimeout 600s\n\t\telements = {{ 10.0.0.2 expires 30s, 192.168.0.9 expires 600s }}\n\t}}\n"
        )), "{t}");
        assert!(!t.contains("10.0.0.4") && !t.contains("10.0.0.3"));
        assert_eq!(r.text_with_affinity(&BTreeMap::new()), r.text);
    }

    #[test]
    fn affinity_entries_are_read_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "ip", "name": "rkube", "handle": 2}},
            {"set": {"family": "ip", "name": "affinity-d/s/tcp/__10.244.1.5/80", "table": "rkube",
                     "type": "ipv4_addr", "flags": ["timeout"], "timeout": 600,
                     "elem": [{"elem": {"val": "10.0.0.1", "expires": 299}}, "10.0.0.9"]}},
            {"set": {"family": "ip", "name": "cluster-ips", "table": "rkube", "type": "ipv4_addr",
                     "elem": ["10.96.0.1"]}}]}"#;
        let live = affinity_from_json(json);
        assert_eq!(live.len(), 1);
        assert_eq!(
            live["affinity-d/s/tcp/__10.244.1.5/80"],
            [AffinityEntry {
                client: Ipv4Addr::new(10, 0, 0, 1),
                expires: Duration::from_secs(299)
            }]
        );
        assert!(affinity_from_json("not json").is_empty());
    }

    #[test]
    fn session_affinity_without_config_lasts_three_hours() {
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-a")]);
        let t = render_one(&[web(json!({"sessionAffinity": "ClientIP"}))], &[s]).text;
        assert!(t.contains("timeout 10800s"));
    }

    #[test]
    fn hairpin_traffic_is_marked_for_masquerade_after_dnat() {
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-a"), ready("10.244.1.6", "node-b")]);
        let t = render_one(&[web(json!({}))], &[s]).text;
        // Every endpoint in use, paired with itself: after DNAT a packet from it to it is a pod
        // that reached itself through the Service.
        assert_eq!(
            elements(&t, "set", "hairpin"),
            ["10.244.1.5 . 10.244.1.5", "10.244.1.6 . 10.244.1.6"]
        );
        assert_eq!(
            chain(&t, "nat-postrouting").expect("chain")[1],
            "ct status dnat ip saddr . ip daddr @hairpin jump mark-for-masquerade"
        );
        assert_eq!(
            chain(&t, "mark-for-masquerade").expect("chain"),
            ["meta mark set meta mark or 0x4000"]
        );
    }

    #[test]
    fn without_a_cluster_cidr_cluster_ip_traffic_is_not_masqueraded() {
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-a")]);
        let c = RulesConfig { cluster_cidr: None, ..config() };
        let t = render(&[web(json!({}))], &[s], &c).text;
        assert_eq!(chain(&t, SVC).expect("chain"), ["meta l4proto tcp dnat to 10.244.1.5:8080"]);
    }

    #[test]
    fn masquerade_all_marks_every_cluster_ip_connection() {
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-a")]);
        let c = RulesConfig { masquerade_all: true, ..config() };
        let t = render(&[web(json!({}))], &[s], &c).text;
        assert_eq!(
            chain(&t, SVC).expect("chain")[0],
            "ip daddr 10.96.0.50 tcp dport 80 jump mark-for-masquerade"
        );
    }

    #[test]
    fn a_service_without_endpoints_is_rejected_before_dnat() {
        let svc = web(json!({"type": "NodePort",
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}));
        let t = render_one(&[svc], &[]).text;
        assert_eq!(
            elements(&t, "map", "no-endpoint-services"),
            ["10.96.0.50 . tcp . 80 : goto reject-chain"]
        );
        assert_eq!(
            elements(&t, "map", "no-endpoint-nodeports"),
            ["tcp . 30080 : goto reject-chain"]
        );
        assert!(elements(&t, "map", "service-ips").is_empty());
        assert!(chain(&t, SVC).is_none());
        assert_eq!(chain(&t, "reject-chain").expect("chain"), ["reject"]);
        assert_eq!(
            chain(&t, "service-endpoints-check").expect("chain"),
            ["ip daddr . meta l4proto . th dport vmap @no-endpoint-services"]
        );
    }

    #[test]
    fn not_ready_endpoints_count_as_no_endpoints() {
        let s = web_slice("web-1", &[("10.244.1.5", "node-a", false, false, false)]);
        let t = render_one(&[web(json!({}))], &[s]).text;
        assert_eq!(
            elements(&t, "map", "no-endpoint-services"),
            ["10.96.0.50 . tcp . 80 : goto reject-chain"]
        );
        assert!(chain(&t, EP5).is_none());
    }

    #[test]
    fn terminating_endpoints_are_not_used_while_a_ready_one_exists() {
        let s = web_slice(
            "web-1",
            &[ready("10.244.1.6", "node-a"), ("10.244.1.5", "node-a", false, true, true)],
        );
        let t = render_one(&[web(json!({}))], &[s]).text;
        assert_eq!(chain(&t, SVC).expect("chain")[1], "meta l4proto tcp dnat to 10.244.1.6:8080");
        assert_eq!(elements(&t, "set", "hairpin"), ["10.244.1.6 . 10.244.1.6"]);
    }

    #[test]
    fn serving_terminating_endpoints_are_used_when_none_is_ready() {
        let s = web_slice(
            "web-1",
            &[
                ("10.244.1.5", "node-a", false, true, true),
                ("10.244.1.6", "node-a", false, false, true),
            ],
        );
        let t = render_one(&[web(json!({}))], &[s]).text;
        assert_eq!(chain(&t, SVC).expect("chain")[1], "meta l4proto tcp dnat to 10.244.1.5:8080");
        assert_eq!(
            elements(&t, "set", "hairpin"),
            ["10.244.1.5 . 10.244.1.5"],
            "a terminating endpoint that no longer serves is never used"
        );
    }

    #[test]
    fn absent_conditions_mean_ready() {
        let s = slice(json!({
            "metadata": {"namespace": "default", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.5"]}],
            "ports": [{"name": "http", "port": 8080}]
        }));
        let t = render_one(&[web(json!({}))], &[s]).text;
        assert_eq!(chain(&t, SVC).expect("chain")[1], "meta l4proto tcp dnat to 10.244.1.5:8080");
    }

    #[test]
    fn external_traffic_policy_local_sends_node_ports_only_to_this_nodes_endpoints() {
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-a"), ready("10.244.2.9", "node-b")]);
        let svc = web(json!({"type": "NodePort", "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}));
        let t = render_one(&[svc], &[s]).text;
        let local = "local-default/web/tcp/http";
        let ext = "external-default/web/tcp/http";
        assert_eq!(
            chain(&t, ext).expect("external chain"),
            [
                format!("ip saddr 10.244.0.0/16 goto {SVC}"),
                "fib saddr type local jump mark-for-masquerade".to_string(),
                format!("fib saddr type local goto {SVC}"),
                format!("goto {local}"),
            ],
            "outside clients keep their address (no masquerade); pods and the node use every endpoint"
        );
        assert_eq!(
            chain(&t, local).expect("local chain"),
            ["meta l4proto tcp dnat to 10.244.1.5:8080"]
        );
        // The ClusterIP still spreads over both nodes.
        assert_eq!(
            chain(&t, SVC).expect("chain")[1],
            "meta l4proto tcp dnat to numgen random mod 2 map { 0 : 10.244.1.5 . 8080, 1 : 10.244.2.9 . 8080 }"
        );
    }

    #[test]
    fn external_traffic_policy_local_without_local_endpoints_drops_outside_traffic() {
        let s = web_slice("web-1", &[ready("10.244.2.9", "node-b")]);
        let svc = web(json!({"type": "NodePort", "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}));
        let t = render_one(&[svc], &[s]).text;
        assert_eq!(elements(&t, "map", "no-endpoint-nodeports"), ["tcp . 30080 : drop"]);
        let ext = chain(&t, "external-default/web/tcp/http")
            .expect("external chain stays for short-circuits");
        assert_eq!(ext.len(), 3, "no final goto: {ext:?}");
        assert!(elements(&t, "map", "no-endpoint-services").is_empty(), "ClusterIP is unaffected");
    }

    #[test]
    fn internal_traffic_policy_local_keeps_cluster_ip_traffic_on_this_node() {
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-a"), ready("10.244.2.9", "node-b")]);
        let t = render_one(&[web(json!({"internalTrafficPolicy": "Local"}))], &[s]).text;
        let local = "local-default/web/tcp/http";
        assert_eq!(
            elements(&t, "map", "service-ips"),
            [format!("10.96.0.50 . tcp . 80 : goto {local}")]
        );
        assert_eq!(
            chain(&t, local).expect("local chain"),
            [
                "ip daddr 10.96.0.50 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
                "meta l4proto tcp dnat to 10.244.1.5:8080",
            ]
        );
        assert!(chain(&t, SVC).is_none(), "no external access, so no cluster-wide chain");
    }

    #[test]
    fn internal_traffic_policy_local_without_local_endpoints_drops() {
        let s = web_slice("web-1", &[ready("10.244.2.9", "node-b")]);
        let t = render_one(&[web(json!({"internalTrafficPolicy": "Local"}))], &[s]).text;
        assert_eq!(elements(&t, "map", "no-endpoint-services"), ["10.96.0.50 . tcp . 80 : drop"]);
        assert!(elements(&t, "map", "service-ips").is_empty());
    }

    #[test]
    fn udp_and_sctp_ports_get_their_own_protocol() {
        let svc = svc(json!({
            "metadata": {"namespace": "kube-system", "name": "dns"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                {"name": "sig", "port": 2905, "protocol": "SCTP"}]}
        }));
        let s = slice(json!({
            "metadata": {"namespace": "kube-system", "name": "dns-1", "labels": {"kubernetes.io/service-name": "dns"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.0.3"]}],
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                      {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                      {"name": "sig", "port": 2905, "protocol": "SCTP"}]
        }));
        let t = render_one(&[svc], &[s]).text;
        assert_eq!(
            elements(&t, "map", "service-ips"),
            [
                "10.96.0.10 . tcp . 53 : goto service-kube-system/dns/tcp/dns-tcp",
                "10.96.0.10 . udp . 53 : goto service-kube-system/dns/udp/dns",
                "10.96.0.10 . sctp . 2905 : goto service-kube-system/dns/sctp/sig",
            ]
        );
        assert_eq!(
            chain(&t, "service-kube-system/dns/udp/dns").expect("chain")[1],
            "meta l4proto udp dnat to 10.244.0.3:53"
        );
        assert_eq!(
            chain(&t, "service-kube-system/dns/sctp/sig").expect("chain")[1],
            "meta l4proto sctp dnat to 10.244.0.3:2905"
        );
    }

    #[test]
    fn tcp_services_list_no_udp_backends() {
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-a")]);
        assert!(render_one(&[web(json!({}))], &[s]).udp_backends.is_empty());
    }

    #[test]
    fn udp_backends_list_every_front_and_endpoint_pair() {
        let svc = web(json!({"type": "NodePort", "externalIPs": ["192.0.2.1"],
            "ports": [{"name": "http", "port": 53, "protocol": "UDP", "nodePort": 30053}]}));
        let s = slice(json!({
            "metadata": {"namespace": "default", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.5"]}, {"addresses": ["10.244.1.6"]}],
            "ports": [{"name": "http", "port": 5353, "protocol": "UDP"}]
        }));
        let r = render_one(&[svc], &[s]);
        let ep = |last| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, last), 5353);
        let addr = |a: [u8; 4], p| UdpFront::Address(SocketAddrV4::new(a.into(), p));
        let want: BTreeSet<UdpBackend> =
            [addr([10, 96, 0, 50], 53), addr([192, 0, 2, 1], 53), UdpFront::NodePort(30053)]
                .into_iter()
                .flat_map(|front| [5, 6].map(|i| UdpBackend { front, endpoint: ep(i) }))
                .collect();
        assert_eq!(r.udp_backends, want);
    }

    #[test]
    fn endpoints_are_matched_to_service_ports_by_name_and_protocol() {
        let svc =
            web(json!({"ports": [{"name": "http", "port": 80}, {"name": "admin", "port": 81}]}));
        let s = web_slice("web-1", &[ready("10.244.1.5", "node-a")]); // only "http"
        let t = render_one(&[svc], &[s]).text;
        assert_eq!(
            elements(&t, "map", "no-endpoint-services"),
            ["10.96.0.50 . tcp . 81 : goto reject-chain"]
        );
        assert_eq!(
            elements(&t, "map", "service-ips"),
            [format!("10.96.0.50 . tcp . 80 : goto {SVC}")]
        );
    }

    #[test]
    fn endpoints_from_several_slices_are_merged_and_deduplicated() {
        let a = web_slice(
            "web-a",
            &[ready("10.244.1.5", "node-a"), ("10.244.1.6", "node-a", false, false, false)],
        );
        let b = web_slice("web-b", &[ready("10.244.1.6", "node-a")]);
        let t = render_one(&[web(json!({}))], &[a, b]).text;
        assert_eq!(
            chain(&t, SVC).expect("chain")[1],
            "meta l4proto tcp dnat to numgen random mod 2 map { 0 : 10.244.1.5 . 8080, 1 : 10.244.1.6 . 8080 }"
        );
    }

    #[test]
    fn output_is_identical_whatever_the_input_order() {
        let svcs = [
            web(json!({})),
            svc(json!({"metadata": {"namespace": "a", "name": "z"},
                "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 1}]}})),
        ];
        let slices = [
            web_slice("web-1", &[ready("10.244.1.6", "node-a"), ready("10.244.1.5", "node-b")]),
            web_slice("web-2", &[ready("10.244.1.7", "node-a")]),
        ];
        let one = render(&svcs, &slices, &config());
        let rev_svcs: Vec<Service> = svcs.iter().rev().cloned().collect();
        let rev_slices: Vec<EndpointSlice> = slices.iter().rev().cloned().collect();
        let two = render(&rev_svcs, &rev_slices, &config());
        assert_eq!(one, two);
        // Addresses sort numerically, not as strings.
        assert_eq!(elements(&one.text, "set", "cluster-ips"), ["10.96.0.9", "10.96.0.50"]);
    }

    #[test]
    fn headless_external_name_and_ipv6_services_are_ignored_silently() {
        let svcs = [
            svc(json!({"metadata": {"namespace": "d", "name": "headless"},
                "spec": {"clusterIP": "None", "ports": [{"port": 80}]}})),
            svc(json!({"metadata": {"namespace": "d", "name": "ext"},
                "spec": {"type": "ExternalName", "externalName": "example.com"}})),
            svc(json!({"metadata": {"namespace": "d", "name": "v6"},
                "spec": {"clusterIP": "fd00::10", "ports": [{"port": 80}]}})),
        ];
        let r = render_one(&svcs, &[]);
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        assert!(elements(&r.text, "set", "cluster-ips").is_empty());
    }

    #[test]
    fn services_that_name_another_proxy_are_left_to_it() {
        let mut s = web(json!({}));
        s.metadata.labels =
            Some([(SERVICE_PROXY_NAME_LABEL.to_string(), "other-proxy".to_string())].into());
        let slice = web_slice("web-1", &[ready("10.244.1.5", "node-a")]);
        let r = render_one(&[s], &[slice]);
        assert!(elements(&r.text, "set", "cluster-ips").is_empty());
        assert!(r.skipped.is_empty());
    }

    #[test]
    fn names_too_long_for_nft_are_skipped() {
        let long = svc(json!({"metadata": {"namespace": "n".repeat(120), "name": "s".repeat(120)},
            "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}}));
        let r = render_one(&[long], &[]);
        assert_eq!(r.skipped.len(), 1);
        assert!(r.skipped[0].ends_with("names too long for nft"), "{:?}", r.skipped);
    }

    #[test]
    fn a_large_cluster_renders_quickly() {
        // 2000 Services with 5 endpoints each: rendering must stay far below a sync period.
        let svcs: Vec<Service> = (0..2000u32)
            .map(|i| {
                svc(json!({"metadata": {"namespace": "ns", "name": format!("s{i}")},
                    "spec": {"clusterIP": Ipv4Addr::from(0x0a60_0000 + i).to_string(), "ports": [{"port": 80}]}}))
            })
            .collect();
        let slices: Vec<EndpointSlice> = (0..2000u32)
            .map(|i| {
                let eps: Vec<Value> = (0..5u32)
                    .map(|j| json!({"addresses": [Ipv4Addr::from(0x0af4_0000 + i * 5 + j).to_string()]}))
                    .collect();
                slice(json!({"metadata": {"namespace": "ns", "name": format!("s{i}-1"),
                        "labels": {"kubernetes.io/service-name": format!("s{i}")}},
                    "addressType": "IPv4", "endpoints": eps, "ports": [{"port": 8080}]}))
            })
            .collect();
        let start = std::time::Instant::now();
        let r = render_one(&svcs, &slices);
        let took = start.elapsed();
        assert_eq!(elements(&r.text, "map", "service-ips").len(), 2000);
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    #[test]
    fn a_change_among_ten_thousand_services_costs_only_that_service() {
        let c = config();
        let mk = |i: u32, first: u32| {
            let s = svc(
                json!({"metadata": {"namespace": "ns", "name": format!("s{i}"), "resourceVersion": "1"},
                "spec": {"clusterIP": Ipv4Addr::from(0x0a60_0000 + i).to_string(), "ports": [{"port": 80}]}}),
            );
            let eps: Vec<Value> = (0..5u32)
                .map(
                    |j| json!({"addresses": [Ipv4Addr::from(0x0af4_0000 + first + j).to_string()]}),
                )
                .collect();
            let sl = slice(
                json!({"metadata": {"namespace": "ns", "name": format!("s{i}-1"), "resourceVersion": first.to_string(),
                    "labels": {"kubernetes.io/service-name": format!("s{i}")}},
                "addressType": "IPv4", "endpoints": eps, "ports": [{"port": 8080}]}),
            );
            (s, sl)
        };
        let (svcs, slices): (Vec<Service>, Vec<EndpointSlice>) =
            (0..10_000u32).map(|i| mk(i, i * 5)).unzip();
        let mut m = model(&svcs, &slices);
        // Service 4242's five endpoints are all replaced.
        let (s, sl) = mk(4242, 60_000);
        let start = std::time::Instant::now();
        let ch = m
            .update_services([("ns/s4242".to_string(), Some(&s), vec![&sl])], &c)
            .expect("in place");
        let took = start.elapsed();
        let text = ch.text("rkube");
        // The Service's chain refilled (its two rules), five hairpin pairs out and five in:
        // nothing else.
        assert_eq!(text.lines().count(), 5, "{text}");
        assert_eq!(ch.ops.len(), 5, "{text}");
        assert!(took < Duration::from_millis(50), "took {took:?}");
        eprintln!("one Service changed among 10,000: {took:?}");
    }

    fn model(services: &[Service], slices: &[EndpointSlice]) -> Model {
        render_model(services, slices, &config())
    }

    /// `obj` with resourceVersion `rv`.
    fn versioned<T: k8s_openapi::Metadata<Ty = kube::api::ObjectMeta>>(mut obj: T, rv: u32) -> T {
        obj.metadata_mut().resource_version = Some(rv.to_string());
        obj
    }

    /// A NodePort Service `name` on 10.96.0.`i`, node port 30000, with one endpoint.
    fn np_service(name: &str, i: u8, rv: u32) -> (Service, EndpointSlice) {
        let s = svc(json!({"metadata": {"namespace": "default", "name": name},
            "spec": {"type": "NodePort", "clusterIP": format!("10.96.0.{i}"),
                     "ports": [{"name": "http", "port": 80, "nodePort": 30000}]}}));
        let mut sl = web_slice(&format!("{name}-1"), &[ready("10.244.1.5", "node-a")]);
        sl.metadata.labels = Some([(SERVICE_NAME_LABEL.to_string(), name.to_string())].into());
        (versioned(s, rv), versioned(sl, rv + 1))
    }

    #[test]
    fn only_services_whose_objects_changed_are_rendered_again() {
        let (a, a_slice) = np_service("a", 1, 10);
        let (b, b_slice) = np_service("b", 2, 20);
        let c = config();
        let first = render_model(&[a.clone(), b.clone()], &[a_slice.clone(), b_slice.clone()], &c);
        // Same versions: every part is reused, and nothing is to be done.
        let again = render_model_from(
            &first,
            &[a.clone(), b.clone()],
            &[a_slice.clone(), b_slice.clone()],
            &c,
        );
        assert!(first.parts.iter().zip(&again.parts).all(|((_, x), (_, y))| Arc::ptr_eq(x, y)));
        assert_eq!(change(&first, &again).map(|c| c.is_empty()), Some(true));
        // b's slice gets a second endpoint (new version): only b is rendered again, and the
        // change touches only b's chains.
        let mut b2 = b_slice.clone();
        b2.endpoints.push(b2.endpoints[0].clone());
        b2.endpoints[1].addresses = vec!["10.244.1.6".into()];
        let b2 = versioned(b2, 30);
        let next =
            render_model_from(&first, &[a.clone(), b.clone()], &[a_slice.clone(), b2.clone()], &c);
        assert!(Arc::ptr_eq(&first.parts["default/a"], &next.parts["default/a"]));
        assert!(!Arc::ptr_eq(&first.parts["default/b"], &next.parts["default/b"]));
        let text = changes(&first, &next, &c).expect("in place");
        assert!(text.contains("10.244.1.6 . 8080"), "{text}");
        assert!(!text.contains("default/a/"), "{text}");
        // What was reused equals a render from scratch, text and all.
        let fresh = render_model(&[a.clone(), b.clone()], &[a_slice.clone(), b2.clone()], &c);
        assert_eq!(next, fresh);
        assert_eq!(next.ruleset(&c).text, fresh.ruleset(&c).text);
        // Both claim node port 30000: a (first by name) has it. When a goes, b gets it,
        // although b itself did not change.
        assert!(next.skipped().iter().any(|s| s.contains("already used by Service default/a")));
        let without_a = render_model_from(&next, std::slice::from_ref(&b), &[a_slice, b2], &c);
        assert!(without_a.skipped().is_empty(), "{:?}", without_a.skipped());
        let text = changes(&next, &without_a, &c).expect("in place");
        assert!(
            text.contains("add element ip rkube service-nodeports { tcp . 30000 : goto external-default/b/tcp/http }"),
            "{text}"
        );
    }

    #[test]
    fn updating_only_changed_services_in_place_equals_rendering_everything() {
        let c = config();
        let (a, a_slice) = np_service("a", 1, 10);
        let (b, b_slice) = np_service("b", 2, 20);
        let mut m = model(&[a.clone(), b.clone()], &[a_slice.clone(), b_slice.clone()]);
        let before = m.clone();
        // a goes (its slice stays until collected): b takes over the node port a had.
        let ch = m
            .update_services([("default/a".to_string(), None, vec![&a_slice])], &c)
            .expect("in place");
        let fresh = model(std::slice::from_ref(&b), &[a_slice.clone(), b_slice.clone()]);
        assert_eq!(m, fresh);
        assert_eq!(Some(ch.text("rkube")), changes(&before, &fresh, &c));
        assert!(
            ch.text("rkube").contains("add element ip rkube service-nodeports { tcp . 30000 : goto external-default/b/tcp/http }"),
            "{}",
            ch.text("rkube")
        );
        assert!(m.skipped().is_empty(), "{:?}", m.skipped());
        // a comes back: the node port returns to it, and b is told again.
        let ch = m
            .update_services([("default/a".to_string(), Some(&a), vec![&a_slice])], &c)
            .expect("in place");
        assert_eq!(m, before);
        assert!(ch.text("rkube").contains("goto external-default/a/tcp/http"));
        assert_eq!(m.skipped().len(), 1);
        // b's endpoint moves; its hairpin pair follows, a's stays.
        let mut b2 = b_slice.clone();
        b2.endpoints[0].addresses = vec!["10.244.1.9".into()];
        let b2 = versioned(b2, 30);
        let ch = m.update_services([("default/b".to_string(), Some(&b), vec![&b2])], &c);
        let text = ch.expect("in place").text("rkube");
        assert!(
            text.contains("add element ip rkube hairpin { 10.244.1.9 . 10.244.1.9 }"),
            "{text}"
        );
        assert!(
            !text.contains("delete element ip rkube hairpin"),
            "a still uses 10.244.1.5: {text}"
        );
        assert_eq!(m, model(&[a.clone(), b.clone()], &[a_slice.clone(), b2.clone()]));
        // Nothing named, nothing changes; a named Service with the same versions is not redone.
        assert_eq!(m.update_services([], &c).map(|c| c.is_empty()), Some(true));
        let ch = m.update_services([("default/b".to_string(), Some(&b), vec![&b2])], &c);
        assert_eq!(ch.map(|c| c.is_empty()), Some(true));
    }

    #[test]
    fn unchanged_objects_need_no_incremental_change() {
        let m = model(&[web(json!({}))], &[web_slice("w1", &[ready("10.244.1.5", "node-a")])]);
        assert_eq!(changes(&m, &m.clone(), &config()).as_deref(), Some(""));
    }

    #[test]
    fn a_new_endpoint_rewrites_only_the_service_chain_and_the_hairpin_set() {
        let before = model(&[web(json!({}))], &[web_slice("w1", &[ready("10.244.1.5", "node-a")])]);
        let after = model(
            &[web(json!({}))],
            &[web_slice("w1", &[ready("10.244.1.5", "node-a"), ready("10.244.1.6", "node-a")])],
        );
        let text = changes(&before, &after, &config()).expect("in place");
        assert_eq!(
            text,
            format!(
                "flush chain ip rkube {SVC}\n\
                 add rule ip rkube {SVC} ip daddr 10.96.0.50 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade\n\
                 add rule ip rkube {SVC} meta l4proto tcp dnat to numgen random mod 2 map {{ 0 : 10.244.1.5 . 8080, 1 : 10.244.1.6 . 8080 }}\n\
                 add element ip rkube hairpin {{ 10.244.1.6 . 10.244.1.6 }}\n"
            )
        );
    }

    #[test]
    fn a_new_endpoint_of_a_sticky_service_adds_its_chain_before_the_service_chain_uses_it() {
        let sticky = web(json!({"sessionAffinity": "ClientIP"}));
        let before = model(
            std::slice::from_ref(&sticky),
            &[web_slice("w1", &[ready("10.244.1.5", "node-a")])],
        );
        let after = model(
            &[sticky],
            &[web_slice("w1", &[ready("10.244.1.5", "node-a"), ready("10.244.1.6", "node-a")])],
        );
        let text = changes(&before, &after, &config()).expect("in place");
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("add set ip rkube affinity-default/web/tcp/http__10.244.1.6/8080"),
            "{text}"
        );
        assert_eq!(lines[1], format!("add chain ip rkube {EP6}"));
        let flush = format!("flush chain ip rkube {SVC}");
        let refill = format!("add rule ip rkube {SVC} numgen random mod 2");
        let pos = |l: &str| lines.iter().position(|x| x.starts_with(l));
        assert!(pos(&flush).is_some_and(|f| pos(&refill).is_some_and(|r| f < r)), "{text}");
        assert!(
            !text.contains(&format!("ip rkube {EP5}")),
            "the unchanged endpoint chain is left alone: {text}"
        );
        assert!(
            text.contains(&format!(
                "add rule ip rkube {EP6} meta l4proto tcp dnat to 10.244.1.6:8080"
            )),
            "{text}"
        );
    }

    #[test]
    fn losing_the_last_endpoint_swaps_the_verdict_and_removes_chains_after_their_users() {
        let sticky = web(json!({"sessionAffinity": "ClientIP"}));
        let before = model(
            std::slice::from_ref(&sticky),
            &[web_slice("w1", &[ready("10.244.1.5", "node-a")])],
        );
        let after = model(&[sticky], &[]);
        let text = changes(&before, &after, &config()).expect("in place");
        let at = |s: &str| text.find(s).unwrap_or_else(|| panic!("{s:?} missing from {text}"));
        let unmap = at("delete element ip rkube service-ips { 10.96.0.50 . tcp . 80 }");
        at(
            "add element ip rkube no-endpoint-services { 10.96.0.50 . tcp . 80 : goto reject-chain }",
        );
        let delete_svc = at(&format!("delete chain ip rkube {SVC}\n"));
        let delete_ep = at(&format!("delete chain ip rkube {EP5}\n"));
        assert!(unmap < delete_svc && unmap < delete_ep, "{text}");
        assert!(at(&format!("flush chain ip rkube {SVC}\n")) < delete_ep, "{text}");
    }

    #[test]
    fn a_changed_affinity_timeout_needs_a_full_replace() {
        let eps = [web_slice("w1", &[ready("10.244.1.5", "node-a")])];
        let sticky = |secs: i32| {
            web(json!({"sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": secs}}}))
        };
        let (a, b) = (model(&[sticky(60)], &eps), model(&[sticky(120)], &eps));
        assert_eq!(changes(&a, &b, &config()), None);
        let plain = model(&[web(json!({}))], &eps);
        let text = changes(&plain, &a, &config()).expect("new sets can be added in place");
        assert!(text.starts_with("add set ip rkube affinity-"), "{text}");
        assert!(text.contains("timeout 60s"), "{text}");
    }

    #[test]
    fn dual_stack_services_use_their_ipv4_cluster_ip() {
        let s = svc(json!({"metadata": {"namespace": "d", "name": "ds"},
            "spec": {"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.77"], "ports": [{"port": 80}]}}));
        let t = render_one(&[s], &[]).text;
        assert_eq!(elements(&t, "set", "cluster-ips"), ["10.96.0.77"]);
    }

    #[test]
    fn malformed_objects_are_skipped_and_named_not_fatal() {
        let svcs = [
            svc(json!({"metadata": {"namespace": "d", "name": "badip"},
                "spec": {"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}})),
            svc(json!({"metadata": {"namespace": "d", "name": "badport"},
                "spec": {"clusterIP": "10.96.0.5", "ports": [{"name": "a", "port": 70000},
                    {"name": "b", "port": 80, "protocol": "ICMP"}, {"name": "c d", "port": 81}]}})),
            svc(json!({"metadata": {"namespace": "d", "name": "we ird"},
                "spec": {"clusterIP": "10.96.0.6", "ports": [{"port": 80}]}})),
            web(json!({})),
        ];
        let bad_slice = slice(json!({
            "metadata": {"namespace": "default", "name": "web-x", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["not-an-ip"]}, {"addresses": ["10.244.1.5"]}],
            "ports": [{"name": "http", "port": 8080}, {"name": "other", "port": 0}]
        }));
        let r = render_one(&svcs, &[bad_slice]);
        assert_eq!(r.skipped.len(), 7, "{:#?}", r.skipped);
        assert!(r.skipped.iter().any(|s| s.contains("10.96.0.300")));
        // The good parts are still there.
        assert_eq!(elements(&r.text, "set", "hairpin"), ["10.244.1.5 . 10.244.1.5"]);
        assert_eq!(elements(&r.text, "set", "cluster-ips"), ["10.96.0.50"]);
    }

    #[test]
    fn two_services_claiming_one_node_port_keep_the_first_in_name_order() {
        let mk = |name: &str, ip: &str| {
            svc(json!({"metadata": {"namespace": "d", "name": name},
                "spec": {"type": "NodePort", "clusterIP": ip, "ports": [{"port": 80, "nodePort": 30001}]}}))
        };
        let r = render_one(&[mk("b", "10.96.0.2"), mk("a", "10.96.0.1")], &[]);
        assert_eq!(
            elements(&r.text, "map", "no-endpoint-nodeports"),
            ["tcp . 30001 : goto reject-chain"]
        );
        assert_eq!(r.skipped.len(), 1);
        assert!(r.skipped[0].starts_with("Service d/b"), "{:?}", r.skipped);
    }

    #[test]
    fn slices_of_other_address_types_or_without_service_label_are_ignored() {
        let mut v6 = web_slice("web-6", &[ready("10.244.1.5", "node-a")]);
        v6.address_type = "IPv6".into();
        let mut unlabelled = web_slice("mine", &[ready("10.244.1.6", "node-a")]);
        unlabelled.metadata.labels = None;
        let t = render_one(&[web(json!({}))], &[v6, unlabelled]).text;
        assert_eq!(
            elements(&t, "map", "no-endpoint-services"),
            ["10.96.0.50 . tcp . 80 : goto reject-chain"]
        );
    }
}
