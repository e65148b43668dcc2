//! The generic registry: create/get/list/update/delete/watch of any resource over the `Store`,
//! with resourceVersion = store revision and optimistic concurrency (guaranteed update).

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use rkube_api::resources::{self, ResourceInfo};
use rkube_store::{ListOptions, ReadAt, Revision, Store, WatchEvent};
use serde_json::{Value, json};

use crate::allocation::{self, held_keys};
use crate::partial;
use crate::selector::{FieldSelector, LabelSelector};
use crate::strategy;
use crate::{Error, Result};

/// Who is writing in the current request, for field ownership (`metadata.managedFields`).
#[derive(Clone, Debug)]
pub struct Writer {
    pub manager: String,
    /// A server-side apply computes ownership itself.
    pub apply: bool,
}

tokio::task_local! {
    pub static WRITER: Writer;
}

fn writer() -> Option<Writer> {
    WRITER.try_with(|w| w.clone()).ok()
}

pub struct Registry {
    pub store: Arc<dyn Store>,
    pub default_toleration_seconds: i64,
    pub service_cidr: (u32, u8),
    pub node_port_range: (u16, u16),
    /// Decoded watch objects shared by this registry's watchers. Per registry, never global:
    /// (key, revision) names an object only within one store, and tests run several API
    /// servers in one process.
    watch_objects: Arc<std::sync::Mutex<WatchObjects>>,
}

/// `group/resource` as upstream names objects in messages: `pods`, `deployments.apps`.
pub fn qualified(r: &ResourceInfo) -> String {
    if r.group.is_empty() { r.plural.to_string() } else { format!("{}.{}", r.plural, r.group) }
}

pub fn decode(kv_value: &[u8], rev: Revision) -> Result<Value> {
    let mut v: Value = serde_json::from_slice(kv_value)
        .map_err(|e| Error::internal(format!("stored object is not JSON: {e}")))?;
    v["metadata"]["resourceVersion"] = json!(rev.0.to_string());
    Ok(v)
}

/// A stored object's JSON with its resourceVersion spliced into `metadata`, without decoding it:
/// what a plain LIST returns for each item. `None` if the bytes do not have the shape `encode`
/// writes (then the caller decodes).
pub fn splice_resource_version(raw: &[u8], rev: Revision) -> Option<Vec<u8>> {
    let at = metadata_body_start(raw)?;
    let rv = format!("\"resourceVersion\":\"{}\"", rev.0);
    let empty = raw.get(at..)?.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let mut out = Vec::with_capacity(raw.len() + rv.len() + 1);
    out.extend_from_slice(&raw[..at]);
    out.extend_from_slice(rv.as_bytes());
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(&raw[at..]);
    Some(out)
}

/// A stored object as GET returns it: byte for byte `serde_json::to_vec(&decode(raw, rev))`
/// (resourceVersion last in `metadata`, where `decode` adds it), built by splicing instead of
/// decoding and re-encoding. `None` when the bytes are not the compact form `encode` writes, or
/// already carry a resourceVersion (then the caller decodes).
pub fn with_resource_version(raw: &[u8], rev: Revision) -> Option<Vec<u8>> {
    let (close, empty) = metadata_end(raw)?;
    let mut out = Vec::with_capacity(raw.len() + 40);
    out.extend_from_slice(&raw[..close]);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(b"\"resourceVersion\":\"");
    out.extend_from_slice(rev.0.to_string().as_bytes());
    out.push(b'"');
    out.extend_from_slice(&raw[close..]);
    Some(out)
}

/// For compact JSON (no whitespace outside strings) whose top level is an object with exactly
/// one `metadata` key holding an object without a `resourceVersion` key: the offset of that
/// object's closing `}` and whether it is empty. `None` for anything else.
fn metadata_end(raw: &[u8]) -> Option<(usize, bool)> {
    if raw.first() != Some(&b'{') {
        return None;
    }
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    // Where the string being read started, when it is a key of the top level or of metadata.
    let mut key_start: Option<usize> = None;
    let mut last = 0u8; // the last structural character
    let mut meta_open: Option<usize> = None; // offset of metadata's `{`
    let mut found: Option<(usize, bool)> = None;
    let mut pending_meta = false; // the last top-level key read was "metadata"
    for (i, &b) in raw.iter().enumerate() {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
                if let Some(start) = key_start.take() {
                    let key = &raw[start..=i];
                    if depth == 1 {
                        if key == b"\"metadata\"" {
                            if found.is_some() || meta_open.is_some() {
                                return None; // a second metadata key
                            }
                            pending_meta = true;
                        }
                    } else if key == b"\"resourceVersion\"" {
                        return None;
                    }
                }
            }
            continue;
        }
        match b {
            b'"' => {
                in_str = true;
                let is_key = matches!(last, b'{' | b',');
                let in_meta = depth == 2 && meta_open.is_some() && found.is_none();
                if is_key && (depth == 1 || in_meta) {
                    key_start = Some(i);
                }
                last = b'"';
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if pending_meta && depth == 2 {
                    if b != b'{' {
                        return None;
                    }
                    meta_open = Some(i);
                }
                pending_meta = pending_meta && depth == 1;
            }
            b'}' | b']' => {
                if depth == 2
                    && let Some(open) = meta_open
                    && found.is_none()
                {
                    found = Some((i, open + 1 == i));
                }
                depth = depth.checked_sub(1)?;
            }
            b' ' | b'\n' | b'\r' | b'\t' => return None,
            b':' => {}
            _ => pending_meta = pending_meta && depth != 1,
        }
        last = b;
    }
    if depth != 0 || in_str {
        return None;
    }
    found
}

/// The offset just after the `{` that opens the top-level `"metadata"` object.
fn metadata_body_start(raw: &[u8]) -> Option<usize> {
    let (mut depth, mut i, mut in_str, mut esc) = (0usize, 0usize, false, false);
    let mut key_start = None;
    let mut last_token = 0u8; // the last structural character outside strings
    while i < raw.len() {
        let b = raw[i];
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
                if let Some(start) = key_start.take()
                    && &raw[start..=i] == b"\"metadata\""
                {
                    let mut j = i + 1;
                    while raw.get(j)?.is_ascii_whitespace() {
                        j += 1;
                    }
                    if raw[j] != b':' {
                        return None;
                    }
                    j += 1;
                    while raw.get(j)?.is_ascii_whitespace() {
                        j += 1;
                    }
                    return (raw[j] == b'{').then_some(j + 1);
                }
            }
        } else {
            match b {
                b'"' => {
                    in_str = true;
                    if depth == 1 && matches!(last_token, b'{' | b',') {
                        key_start = Some(i);
                    }
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => depth = depth.checked_sub(1)?,
                _ => {}
            }
            if !b.is_ascii_whitespace() && b != b'"' {
                last_token = b;
            }
        }
        i += 1;
    }
    None
}

/// The stored form of an object: its JSON without resourceVersion (the store's revision is it).
pub(crate) fn encode(v: &Value) -> Result<Bytes> {
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    let json = serde_json::to_vec(&v).map_err(|e| Error::internal(e.to_string()))?;
    // The store keeps every value in memory: trim the writer's spare capacity (up to half
    // of the buffer after its doubling growth) instead of keeping it for the object's life.
    Ok(Bytes::from(json.into_boxed_slice()))
}

#[derive(Default, Clone)]
pub struct ListParams {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<u32>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
}

impl ListParams {
    /// Whether a selector narrows the objects.
    pub fn is_filtered(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }

    /// Whether `obj` (whole, or only its selectable fields) passes the selectors.
    pub fn matches(&self, r: &ResourceInfo, obj: &Value) -> bool {
        self.labels.matches(&obj["metadata"]["labels"])
            && self.fields.matches(r.group, r.plural, obj)
    }
}

/// The fields of `r`'s objects that selectors read, for decoding only those.
fn selectable(r: &ResourceInfo) -> partial::Paths {
    partial::Paths::new(crate::selector::selectable_paths(r.group, r.plural))
}

/// The finalizer a `propagationPolicy: Foreground` delete puts on the owner.
pub const FOREGROUND_DELETION: &str = "foregroundDeletion";

pub struct DeleteParams {
    pub grace_period: Option<i64>,
    pub propagation: String,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

/// An event for a watcher: ADDED / MODIFIED / DELETED / BOOKMARK / ERROR with its object.
pub type WatchOut = (&'static str, Arc<SharedObject>);

/// One stored object as every watcher of it sees it, built once however many watchers deliver
/// it: its JSON (for a stored object, the stored bytes with the resourceVersion spliced in, never
/// decoded), the fields selectors read (decoded alone when a selective watcher asks), and the
/// whole decoded object only when something needs it all (a watch of tables).
pub struct SharedObject {
    json: OnceLock<Bytes>,
    value: OnceLock<Value>,
    selectable: OnceLock<Value>,
}

impl SharedObject {
    pub fn new(value: Value) -> Arc<SharedObject> {
        Arc::new(SharedObject {
            json: OnceLock::new(),
            value: OnceLock::from(value),
            selectable: OnceLock::new(),
        })
    }

    /// A stored object at `rev`; `None` if its bytes are not JSON.
    fn stored(raw: &[u8], rev: Revision) -> Option<Arc<SharedObject>> {
        match with_resource_version(raw, rev) {
            Some(json) => Some(Arc::new(SharedObject {
                json: OnceLock::from(Bytes::from(json)),
                value: OnceLock::new(),
                selectable: OnceLock::new(),
            })),
            None => decode(raw, rev).ok().map(SharedObject::new),
        }
    }

    /// The object serialized as JSON.
    pub fn json(&self) -> &Bytes {
        self.json.get_or_init(|| {
            Bytes::from(
                serde_json::to_vec(self.value.get().unwrap_or(&Value::Null)).unwrap_or_default(),
            )
        })
    }

    /// The whole object.
    pub fn value(&self) -> &Value {
        self.value.get_or_init(|| serde_json::from_slice(self.json()).unwrap_or(Value::Null))
    }

    /// At least the fields `paths` names (all of them, when the whole object is decoded already).
    fn selectable(&self, paths: &partial::Paths) -> &Value {
        if let Some(v) = self.value.get() {
            return v;
        }
        self.selectable.get_or_init(|| partial::decode(self.json(), paths).unwrap_or(Value::Null))
    }
}

/// The most recent watch objects by (key, revision), shared between watchers.
#[derive(Default)]
struct WatchObjects {
    map: std::collections::HashMap<(String, u64), Arc<SharedObject>>,
    /// Insertion order, with when: the oldest go first.
    order: std::collections::VecDeque<((String, u64), std::time::Instant)>,
    /// Whether the task that expires old entries runs.
    pruning: bool,
}

impl WatchObjects {
    /// Drops entries beyond the cap, and those older than `max_age`.
    fn prune(&mut self, max_age: std::time::Duration) {
        let now = std::time::Instant::now();
        while let Some((id, at)) = self.order.front() {
            if self.order.len() <= SHARED_WATCH_OBJECTS && now.duration_since(*at) < max_age {
                break;
            }
            self.map.remove(id);
            self.order.pop_front();
        }
    }
}

/// How many decoded objects watch fan-out keeps for watchers that lag behind the first one.
/// At 1,000 writes/s, 1,024 entries (one second) made 100 lagging watchers decode every event
/// again and fall further behind until closed; 8,192 keeps them sharing.
const SHARED_WATCH_OBJECTS: usize = 8192;
/// …and for how long: a decoded pod is several times its JSON, so after a burst the cache
/// (~150 MiB at 8,192 pods) empties within seconds instead of staying until the next one.
const SHARED_WATCH_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(10);

fn shared_object(
    cache: &Arc<std::sync::Mutex<WatchObjects>>,
    key: &str,
    value: &[u8],
    rev: Revision,
) -> Option<Arc<SharedObject>> {
    let id = (key.to_string(), rev.0);
    if let Some(o) = cache.lock().unwrap_or_else(|p| p.into_inner()).map.get(&id) {
        return Some(o.clone());
    }
    let obj = SharedObject::stored(value, rev)?;
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    if c.map.insert(id.clone(), obj.clone()).is_none() {
        c.order.push_back((id, std::time::Instant::now()));
        c.prune(SHARED_WATCH_MAX_AGE);
    }
    if !c.pruning {
        // Expire entries while the registry lives, also when no event arrives any more.
        c.pruning = true;
        let weak = Arc::downgrade(cache);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SHARED_WATCH_MAX_AGE / 4);
            loop {
                tick.tick().await;
                let Some(cache) = weak.upgrade() else { return };
                cache.lock().unwrap_or_else(|p| p.into_inner()).prune(SHARED_WATCH_MAX_AGE);
            }
        });
    }
    Some(obj)
}

impl Registry {
    pub fn new(store: Arc<dyn Store>, default_toleration_seconds: i64) -> Registry {
        Registry {
            store,
            default_toleration_seconds,
            service_cidr: (u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)), 12),
            node_port_range: (30000, 32767),
            watch_objects: Default::default(),
        }
    }

    pub async fn get(&self, r: &ResourceInfo, ns: Option<&str>, name: &str) -> Result<Value> {
        let key = r.key(ns, name);
        match self.store.get(&key, ReadAt::Latest).await? {
            Some(kv) => decode(&kv.value, kv.mod_revision),
            None => Err(Error::not_found(&qualified(r), name)),
        }
    }

    /// GET without a Table: the object's JSON as `get` would serialize it, spliced from the
    /// stored bytes without decoding them.
    pub async fn get_json(
        &self,
        r: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Vec<u8>> {
        let key = r.key(ns, name);
        match self.store.get(&key, ReadAt::Latest).await? {
            Some(kv) => match with_resource_version(&kv.value, kv.mod_revision) {
                Some(json) => Ok(json),
                None => serde_json::to_vec(&decode(&kv.value, kv.mod_revision)?)
                    .map_err(|e| Error::internal(e.to_string())),
            },
            None => Err(Error::not_found(&qualified(r), name)),
        }
    }

    /// A LIST as stored JSON, each item with its resourceVersion spliced in and never decoded
    /// whole: selectors are matched on the few fields they read (decoded alone).
    pub async fn list_raw(
        &self,
        r: &ResourceInfo,
        ns: Option<&str>,
        p: &ListParams,
    ) -> Result<(Vec<Vec<u8>>, Value)> {
        let paths = p.is_filtered().then(|| selectable(r));
        self.list_with(r, ns, p, |kv| {
            if let Some(paths) = &paths {
                let fields = partial::decode(&kv.value, paths)
                    .map_err(|e| Error::internal(format!("stored object is not JSON: {e}")))?;
                if !p.matches(r, &fields) {
                    return Ok(None);
                }
            }
            Ok(Some(match splice_resource_version(&kv.value, kv.mod_revision) {
                Some(b) => b,
                None => serde_json::to_vec(&decode(&kv.value, kv.mod_revision)?)
                    .map_err(|e| Error::internal(e.to_string()))?,
            }))
        })
        .await
    }

    /// A LIST, each item decoded.
    pub async fn list(
        &self,
        r: &ResourceInfo,
        ns: Option<&str>,
        p: &ListParams,
    ) -> Result<(Vec<Value>, Value)> {
        self.list_with(r, ns, p, |kv| {
            let obj = decode(&kv.value, kv.mod_revision)?;
            Ok((!p.is_filtered() || p.matches(r, &obj)).then_some(obj))
        })
        .await
    }

    /// The items of a LIST (what `item` makes of each stored object it keeps) and the list's
    /// metadata. With a selector, pages are read until `limit` items are kept, as upstream does.
    async fn list_with<T>(
        &self,
        r: &ResourceInfo,
        ns: Option<&str>,
        p: &ListParams,
        mut item: impl FnMut(&rkube_store::KeyValue) -> Result<Option<T>>,
    ) -> Result<(Vec<T>, Value)> {
        let filtered = p.is_filtered();
        let mut at = match p.resource_version.as_deref() {
            Some(rv) if !rv.is_empty() && rv != "0" && p.continue_token.is_none() => {
                ReadAt::Exact(Revision(parse_rv(rv)?))
            }
            _ => ReadAt::Latest,
        };
        let prefix = r.key_prefix(ns);
        let mut items = Vec::new();
        let mut token = p.continue_token.clone();
        let revision;
        let mut remaining = None;
        loop {
            let page = self
                .store
                .list(&prefix, ListOptions { at, limit: p.limit, continue_token: token.clone() })
                .await
                .map_err(|e| match e {
                    // No new token is offered (upstream's text when it has none to give).
                    rkube_store::Error::Compacted { .. } if p.continue_token.is_some() => Error::gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ),
                    other => other.into(),
                })?;
            for kv in &page.items {
                items.extend(item(kv)?);
            }
            at = ReadAt::Exact(page.revision);
            token = page.continue_token.clone();
            if !filtered || token.is_none() || p.limit.is_some_and(|l| items.len() as u32 >= l) {
                revision = page.revision;
                if !filtered {
                    remaining = page.remaining;
                }
                break;
            }
        }
        let mut meta = json!({"resourceVersion": revision.0.to_string()});
        if let Some(t) = token {
            meta["continue"] = json!(t);
            if let Some(n) = remaining.filter(|n| *n > 0) {
                meta["remainingItemCount"] = json!(n);
            }
        }
        Ok((items, meta))
    }

    pub async fn create(
        &self,
        r: &ResourceInfo,
        ns: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value> {
        if !obj.is_object() {
            return Err(Error::bad_request("the body of the request was not a JSON object"));
        }
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        if let Some(ns) = ns {
            match obj["metadata"]["namespace"].as_str() {
                Some(n) if !n.is_empty() && n != ns => {
                    return Err(Error::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => obj["metadata"]["namespace"] = json!(ns),
            }
            self.require_namespace(ns).await?;
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        obj["apiVersion"] = json!(r.api_version());
        obj["kind"] = json!(r.kind);
        let generated = obj["metadata"]["name"].as_str().is_none_or(str::is_empty)
            && obj["metadata"]["generateName"].as_str().is_some_and(|g| !g.is_empty());
        for attempt in 0..8 {
            let mut o = obj.clone();
            if generated {
                o["metadata"]["name"] = json!(format!(
                    "{}{}",
                    o["metadata"]["generateName"].as_str().unwrap_or(""),
                    random_suffix()
                ));
            }
            strategy::prepare_create(r, &mut o, self.default_toleration_seconds);
            if r.plural == "pods" {
                self.admit_pod_priority(&mut o).await?;
            }
            strategy::validate(r, &o)?;
            if let Some(w) = writer().filter(|w| !w.apply) {
                crate::managed::record_update(&mut o, None, &w.manager, None);
            }
            let name = o["metadata"]["name"].as_str().unwrap_or("").to_string();
            let key = r.key(ns, &name);
            // A Service's ClusterIP and node ports are claimed before it is written, and
            // released again if the write fails.
            let claimed = if r.plural == "services" {
                self.allocate_service(&mut o, None, dry_run).await?
            } else {
                Vec::new()
            };
            if dry_run {
                if self.store.get(&key, ReadAt::Latest).await?.is_some() {
                    return Err(Error::already_exists(&qualified(r), &name));
                }
                return Ok(o);
            }
            let written = match encode(&o) {
                Ok(bytes) => self.store.create(&key, bytes).await.map_err(Error::from),
                Err(e) => Err(e),
            };
            let err = match written {
                Ok(rev) => {
                    o["metadata"]["resourceVersion"] = json!(rev.0.to_string());
                    return Ok(o);
                }
                Err(e) => e,
            };
            self.release(&claimed, &allocation::Owner::of(&o)).await;
            match err {
                Error::Store(rkube_store::Error::AlreadyExists) if generated && attempt < 7 => {
                    continue;
                }
                Error::Store(rkube_store::Error::AlreadyExists) => {
                    return Err(Error::already_exists(&qualified(r), &name));
                }
                e => return Err(e),
            }
        }
        Err(Error::internal("could not generate a unique name"))
    }

    async fn require_namespace(&self, ns: &str) -> Result<()> {
        let nsr = resources::find("", "v1", "namespaces")
            .ok_or_else(|| Error::internal("no namespaces"))?;
        match self.store.get(&nsr.key(None, ns), ReadAt::Latest).await? {
            None => Err(Error::not_found("namespaces", ns)),
            Some(kv) => {
                let o = decode(&kv.value, kv.mod_revision)?;
                if o["status"]["phase"] == "Terminating" {
                    return Err(Error::Status {
                        code: 403,
                        reason: "Forbidden",
                        message: format!(
                            "unable to create new content in namespace {ns} because it is being terminated"
                        ),
                        details: None,
                    });
                }
                Ok(())
            }
        }
    }

    /// Priority admission: `spec.priority` from `priorityClassName` (or the global default).
    async fn admit_pod_priority(&self, o: &mut Value) -> Result<()> {
        let pcr = resources::find("scheduling.k8s.io", "v1", "priorityclasses")
            .ok_or_else(|| Error::internal("no priorityclasses"))?;
        match o["spec"]["priorityClassName"].as_str().filter(|s| !s.is_empty()) {
            Some(name) => {
                let Some(kv) = self.store.get(&pcr.key(None, name), ReadAt::Latest).await? else {
                    return Err(Error::Status {
                        code: 403,
                        reason: "Forbidden",
                        message: format!(
                            "pods \"{}\" is forbidden: no PriorityClass with name {name} was found",
                            o["metadata"]["name"].as_str().unwrap_or("")
                        ),
                        details: None,
                    });
                };
                let pc: Value = decode(&kv.value, kv.mod_revision)?;
                o["spec"]["priority"] = pc["value"].clone();
                if o["spec"]["preemptionPolicy"].is_null() {
                    o["spec"]["preemptionPolicy"] = pc["preemptionPolicy"].clone();
                }
            }
            None => {
                if o["spec"]["priority"].is_null() {
                    o["spec"]["priority"] = json!(0);
                }
                if o["spec"]["preemptionPolicy"].is_null() {
                    o["spec"]["preemptionPolicy"] = json!("PreemptLowerPriority");
                }
            }
        }
        Ok(())
    }

    /// Replaces an object (PUT): optimistic concurrency on `metadata.resourceVersion` if given.
    pub async fn update(
        &self,
        r: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
        sub: Option<&str>,
        dry_run: bool,
    ) -> Result<Value> {
        if !obj.is_object() {
            return Err(Error::bad_request("the body of the request was not a JSON object"));
        }
        if obj["metadata"]["name"].as_str().is_some_and(|n| n != name) {
            return Err(Error::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                obj["metadata"]["name"].as_str().unwrap_or("")
            )));
        }
        if let Some(ns) = ns
            && obj["metadata"]["namespace"].as_str().is_some_and(|n| !n.is_empty() && n != ns)
        {
            return Err(Error::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let expected = match obj["metadata"]["resourceVersion"].as_str() {
            Some(rv) if !rv.is_empty() => Some(parse_rv(rv)?),
            _ => None,
        };
        obj["metadata"]["name"] = json!(name);
        self.guaranteed_update(
            r,
            ns,
            name,
            dry_run,
            |old| {
                if let Some(want) = expected
                    && old["metadata"]["resourceVersion"].as_str() != Some(&want.to_string())
                {
                    return Err(Error::conflict(&qualified(r), name));
                }
                Ok(obj.clone())
            },
            sub,
        )
        .await
    }

    /// Read–mutate–CAS loop: `mutate` gets the current object and returns the desired one.
    pub async fn guaranteed_update<F>(
        &self,
        r: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        dry_run: bool,
        mut mutate: F,
        sub: Option<&str>,
    ) -> Result<Value>
    where
        F: FnMut(&Value) -> Result<Value>,
    {
        let key = r.key(ns, name);
        for _ in 0..16 {
            let Some(kv) = self.store.get(&key, ReadAt::Latest).await? else {
                return Err(Error::not_found(&qualified(r), name));
            };
            let old = decode(&kv.value, kv.mod_revision)?;
            let mut new = mutate(&old)?;
            new["apiVersion"] = json!(r.api_version());
            new["kind"] = json!(r.kind);
            new["metadata"]["name"] = json!(name);
            if let Some(ns) = ns {
                new["metadata"]["namespace"] = json!(ns);
            }
            match sub {
                Some("status") => strategy::prepare_status_update(&mut new, &old),
                _ => strategy::prepare_update(r, &mut new, &old)?,
            }
            strategy::validate(r, &new)?;
            if let Some(w) = writer().filter(|w| !w.apply) {
                crate::managed::record_update(&mut new, Some(&old), &w.manager, sub);
            }
            let mut cmp_new = new.clone();
            let mut cmp_old = old.clone();
            cmp_new["metadata"]["resourceVersion"] = Value::Null;
            cmp_old["metadata"]["resourceVersion"] = Value::Null;
            let noop = cmp_new == cmp_old;
            if noop && !dry_run {
                // No-op updates do not write (and do not bump resourceVersion), as upstream.
                return Ok(old);
            }
            // A Service update claims the addresses it adds (a node port for a new port or a
            // change to type NodePort) before writing; what it drops is released after.
            let claimed = if r.plural == "services" && sub != Some("status") && !noop {
                self.allocate_service(&mut new, Some(&old), dry_run).await?
            } else {
                Vec::new()
            };
            if dry_run {
                return Ok(new);
            }
            let owner = (r.plural == "services").then(|| allocation::Owner::of(&new));
            let written = self.write_update(r, &key, name, &mut new, kv.mod_revision).await;
            if let Some(owner) = &owner {
                match &written {
                    // Gone: it holds nothing any more.
                    Ok(Written::Deleted) => {
                        let mut dropped = held_keys(&old);
                        dropped.extend(claimed);
                        self.release(&dropped, owner).await;
                    }
                    // Updated: it holds `new`'s keys only.
                    Ok(Written::Updated) => {
                        let kept = held_keys(&new);
                        let dropped: Vec<String> =
                            held_keys(&old).into_iter().filter(|k| !kept.contains(k)).collect();
                        self.release(&dropped, owner).await;
                    }
                    Ok(Written::Moved) | Err(_) => self.release(&claimed, owner).await,
                }
            }
            match written? {
                Written::Updated | Written::Deleted => return Ok(new),
                Written::Moved => continue,
            }
        }
        Err(Error::conflict(&qualified(r), name))
    }

    /// The write at the end of `guaranteed_update`.
    async fn write_update(
        &self,
        r: &ResourceInfo,
        key: &str,
        name: &str,
        new: &mut Value,
        expected: Revision,
    ) -> Result<Written> {
        // Removing the last finalizer of an object being deleted finishes the deletion.
        let finalizers_empty =
            new["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty());
        if new["metadata"]["deletionTimestamp"].is_string()
            && finalizers_empty
            && !(r.plural == "pods"
                && new["metadata"]["deletionGracePeriodSeconds"].as_i64().unwrap_or(0) > 0)
            && r.plural != "namespaces"
        {
            match self.store.delete(key, Some(expected)).await {
                Ok((rev, _)) => {
                    new["metadata"]["resourceVersion"] = json!(rev.0.to_string());
                    return Ok(Written::Deleted);
                }
                Err(rkube_store::Error::Conflict { .. }) => return Ok(Written::Moved),
                Err(e) => return Err(e.into()),
            }
        }
        match self.store.update(key, encode(new)?, expected).await {
            Ok(rev) => {
                new["metadata"]["resourceVersion"] = json!(rev.0.to_string());
                Ok(Written::Updated)
            }
            Err(rkube_store::Error::Conflict { .. }) => Ok(Written::Moved),
            Err(rkube_store::Error::NotFound) => Err(Error::not_found(&qualified(r), name)),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes an object, honouring finalizers and graceful pod termination. Returns the object
    /// as it is after the call and whether it is gone from the store.
    pub async fn delete(
        &self,
        r: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        p: &DeleteParams,
    ) -> Result<(Value, bool)> {
        let key = r.key(ns, name);
        for _ in 0..16 {
            let Some(kv) = self.store.get(&key, ReadAt::Latest).await? else {
                return Err(Error::not_found(&qualified(r), name));
            };
            let mut obj = decode(&kv.value, kv.mod_revision)?;
            if let Some(uid) = &p.precondition_uid
                && obj["metadata"]["uid"].as_str() != Some(uid)
            {
                return Err(Error::conflict_msg(
                    &qualified(r),
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        obj["metadata"]["uid"].as_str().unwrap_or("")
                    ),
                ));
            }
            if let Some(rv) = &p.precondition_rv
                && obj["metadata"]["resourceVersion"].as_str() != Some(rv)
            {
                return Err(Error::conflict_msg(
                    &qualified(r),
                    name,
                    &format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        obj["metadata"]["resourceVersion"].as_str().unwrap_or("")
                    ),
                ));
            }
            let has_finalizers =
                obj["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
            // Graceful pod deletion: a pod on a node gets time to stop; the kubelet finishes it.
            let graceful = r.plural == "pods" && {
                let bound = obj["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty());
                let terminal =
                    matches!(obj["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
                let grace = p
                    .grace_period
                    .or(obj["spec"]["terminationGracePeriodSeconds"].as_i64())
                    .unwrap_or(30);
                bound && !terminal && grace > 0
            };
            // Foreground propagation: the owner waits for its dependents (upstream puts the
            // finalizer on every kind; a pod being stopped gracefully keeps that path instead).
            let foreground = p.propagation == "Foreground" && r.plural != "namespaces" && !graceful;
            if r.plural == "namespaces" {
                if obj["status"]["phase"] == "Terminating" {
                    return Ok((obj, false));
                }
                obj["metadata"]["deletionTimestamp"] = json!(strategy::now_rfc3339());
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                obj["status"]["phase"] = json!("Terminating");
            } else if graceful {
                let grace = p
                    .grace_period
                    .or(obj["spec"]["terminationGracePeriodSeconds"].as_i64())
                    .unwrap_or(30);
                let current = obj["metadata"]["deletionGracePeriodSeconds"].as_i64();
                if current.is_some_and(|c| c <= grace) {
                    return Ok((obj, false));
                }
                let when = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(grace);
                obj["metadata"]["deletionTimestamp"] =
                    json!(when.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            } else if has_finalizers || foreground {
                let deleting = obj["metadata"]["deletionTimestamp"].is_string();
                let has_fg = obj["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == FOREGROUND_DELETION));
                if deleting && (!foreground || has_fg) {
                    return Ok((obj, false));
                }
                if !deleting {
                    obj["metadata"]["deletionTimestamp"] = json!(strategy::now_rfc3339());
                    obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                }
                if foreground && !has_fg {
                    // The garbage collector removes it once the blocking dependents are gone;
                    // until then the owner stays readable, with its deletionTimestamp.
                    match obj["metadata"]["finalizers"].as_array_mut() {
                        Some(f) => f.push(json!(FOREGROUND_DELETION)),
                        None => obj["metadata"]["finalizers"] = json!([FOREGROUND_DELETION]),
                    }
                }
            } else {
                if p.dry_run {
                    return Ok((obj, true));
                }
                match self.store.delete(&key, Some(kv.mod_revision)).await {
                    Ok(_) => {
                        if r.plural == "services" {
                            self.release(&held_keys(&obj), &allocation::Owner::of(&obj)).await;
                        }
                        return Ok((obj, true));
                    }
                    Err(rkube_store::Error::Conflict { .. }) => continue,
                    Err(rkube_store::Error::NotFound) => {
                        return Err(Error::not_found(&qualified(r), name));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if p.dry_run {
                return Ok((obj, false));
            }
            match self.store.update(&key, encode(&obj)?, kv.mod_revision).await {
                Ok(rev) => {
                    obj["metadata"]["resourceVersion"] = json!(rev.0.to_string());
                    return Ok((obj, false));
                }
                Err(rkube_store::Error::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::conflict(&qualified(r), name))
    }

    /// Watches a resource from `from` (exclusive). Events are filtered by the selectors, with
    /// upstream's transitions: an object leaving the selection is DELETED, entering it ADDED.
    pub async fn watch(
        &self,
        r: &'static ResourceInfo,
        ns: Option<String>,
        p: ListParams,
        from: Revision,
    ) -> Result<BoxStream<'static, WatchOut>> {
        let prefix = r.key_prefix(ns.as_deref());
        let stream = self.store.watch(&prefix, from).await?;
        let everything = !p.is_filtered();
        // Selectors read a few fields: only those are decoded (once, for every watcher).
        let paths = selectable(r);
        let matches = move |o: &SharedObject| everything || p.matches(r, o.selectable(&paths));
        let cache = self.watch_objects.clone();
        let out = stream.filter_map(move |ev| {
            let res: Option<WatchOut> = match ev {
                Ok(WatchEvent::Put { kv, prev }) => {
                    let Some(new) = shared_object(&cache, &kv.key, &kv.value, kv.mod_revision)
                    else {
                        return futures::future::ready(None);
                    };
                    let now = matches(&new);
                    // Without selectors the previous value need not be read at all.
                    let (existed, before) = match prev {
                        None => (false, false),
                        Some(_) if everything => (true, true),
                        // The previous value was usually decoded for the watchers when it
                        // was written: shared, it is not decoded again per selective watcher.
                        Some(p) => match shared_object(&cache, &p.key, &p.value, p.mod_revision) {
                            Some(old) => (true, matches(&old)),
                            None => (false, false),
                        },
                    };
                    match (existed, before, now) {
                        (false, _, true) => Some(("ADDED", new)),
                        (true, true, true) => Some(("MODIFIED", new)),
                        (true, false, true) => Some(("ADDED", new)),
                        (true, true, false) => Some(("DELETED", new)),
                        _ => None,
                    }
                }
                Ok(WatchEvent::Delete { revision, prev }) => {
                    match shared_object(&cache, &prev.key, &prev.value, revision) {
                        Some(old) if matches(&old) => Some(("DELETED", old)),
                        _ => None,
                    }
                }
                Ok(WatchEvent::Progress { revision }) => Some((
                    "BOOKMARK",
                    SharedObject::new(json!({
                        "kind": r.kind,
                        "apiVersion": r.api_version(),
                        "metadata": {"resourceVersion": revision.0.to_string()},
                    })),
                )),
                Err(rkube_store::Error::Compacted { .. }) => {
                    Some(("ERROR", SharedObject::new(gone_status())))
                }
                Err(e) => Some(("ERROR", SharedObject::new(Error::from(e).to_status().1))),
            };
            futures::future::ready(res)
        });
        Ok(out.boxed())
    }
}

/// How the write of an update went.
enum Written {
    Updated,
    /// The update removed the last finalizer of an object being deleted.
    Deleted,
    /// The object changed since it was read: read it again.
    Moved,
}

pub fn gone_status() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "too old resource version", "reason": "Expired", "code": 410})
}

pub fn parse_rv(rv: &str) -> Result<u64> {
    rv.parse::<u64>().map_err(|_| Error::bad_request(format!("invalid resource version: {rv}")))
}

/// Five characters from upstream's generateName alphabet (no vowels, no confusable digits).
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5).map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char).collect()
}

#[cfg(test)]
mod splice_tests {
    use super::*;

    #[test]
    fn resource_versions_are_spliced_into_stored_json() {
        for v in [
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "labels": {"metadata": "x"}}, "spec": {}}),
            json!({"metadata": {}, "data": {"k": "\"metadata\":{"}}),
            json!({"a": {"metadata": {"deep": 1}}, "b": "\\\"", "metadata": {"name": "n"}}),
        ] {
            let raw = encode(&v).unwrap();
            let spliced = splice_resource_version(&raw, Revision(42)).unwrap();
            let got: Value = serde_json::from_slice(&spliced).unwrap();
            assert_eq!(got, decode(&raw, Revision(42)).unwrap());
        }
        assert!(splice_resource_version(b"{\"spec\":{}}", Revision(1)).is_none());
        assert!(splice_resource_version(b"{\"metadata\":", Revision(1)).is_none());
    }

    #[test]
    fn get_json_is_byte_identical_to_decoding_and_encoding() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "default", "uid": "u-1",
                "labels": {"metadata": "x", "resourceVersion": "y"},
                "annotations": {"note": "\"metadata\":{ \\ \u{1}\u{e9}\u{1F600}"},
                "managedFields": [{"manager": "m", "fieldsV1": {"f:metadata": {}}}]},
            "spec": {"containers": [{"name": "c", "image": "i", "args": ["a,b", "{", "}"]}],
                "priority": -3, "weight": 0.25, "big": 12345678901234567890u64, "x": 1e300},
            "status": {"phase": "Running", "empty": {}, "list": []}});
        let cases = [
            pod,
            json!({"metadata": {}}),
            json!({"spec": {"metadata": {"resourceVersion": "1"}}, "metadata": {"name": "n"}}),
            json!({"data": {"k": "v"}, "metadata": {"name": "n"}, "z": [{"metadata": 1}]}),
        ];
        for v in cases {
            let raw = encode(&v).unwrap();
            let want = serde_json::to_vec(&decode(&raw, Revision(77)).unwrap()).unwrap();
            let got = with_resource_version(&raw, Revision(77)).expect("spliced");
            assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want));
        }
        // Shapes the splice must leave to the decoder.
        for raw in [
            &b"{\"metadata\":{\"name\":\"a\",\"resourceVersion\":\"5\"}}"[..],
            b"{\"metadata\": {\"name\":\"a\"}}",
            b"{\"metadata\":{},\"metadata\":{}}",
            b"{\"metadata\":null}",
            b"{\"spec\":{}}",
            b"{\"metadata\":{\"name\":\"a\"}",
            b"[]",
            b"",
        ] {
            assert!(
                with_resource_version(raw, Revision(1)).is_none(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}

#[cfg(test)]
mod watch_tests {
    use super::*;
    use futures::StreamExt;

    /// A selective watch sees an object entering its selection as ADDED, changing inside it as
    /// MODIFIED, leaving it as DELETED; writes outside it are not seen at all.
    #[tokio::test]
    async fn selective_watches_follow_objects_in_and_out_of_their_selection() {
        let reg = Registry::new(Arc::new(rkube_store::memory::MemoryStore::new()), 300);
        let r = rkube_api::resources::find("", "v1", "nodes").unwrap();
        let from = reg.store.current_revision().await.unwrap();
        let params = |sel: &str| ListParams {
            labels: crate::selector::LabelSelector::parse(sel).unwrap(),
            fields: Default::default(),
            limit: None,
            continue_token: None,
            resource_version: None,
        };
        let mut picked = reg.watch(r, None, params("pick=yes"), from).await.unwrap();
        let mut all = reg.watch(r, None, params(""), from).await.unwrap();
        let node = |labels: Value, note: &str| {
            json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "n1", "labels": labels, "annotations": {"note": note}}})
        };
        let set = |labels: Value, note: &'static str| {
            let reg = &reg;
            async move {
                reg.guaranteed_update(
                    r,
                    None,
                    "n1",
                    false,
                    |_| Ok(node(labels.clone(), note)),
                    None,
                )
                .await
                .unwrap();
            }
        };
        reg.create(r, None, node(json!({"pick": "no"}), "0"), false).await.unwrap();
        set(json!({"pick": "yes"}), "1").await;
        set(json!({"pick": "yes"}), "2").await;
        set(json!({"pick": "no"}), "3").await;
        set(json!({"pick": "no"}), "4").await;
        set(json!({"pick": "yes"}), "5").await;
        let next = async |s: &mut BoxStream<'static, WatchOut>| {
            let (kind, o) = tokio::time::timeout(std::time::Duration::from_secs(5), s.next())
                .await
                .expect("an event")
                .expect("the stream goes on");
            (kind, o.value()["metadata"]["annotations"]["note"].as_str().unwrap().to_string())
        };
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(next(&mut picked).await);
        }
        let want = [("ADDED", "1"), ("MODIFIED", "2"), ("DELETED", "3"), ("ADDED", "5")];
        assert_eq!(got, want.map(|(k, n)| (k, n.to_string())));
        let mut got = Vec::new();
        for _ in 0..6 {
            got.push(next(&mut all).await.0);
        }
        assert_eq!(got, ["ADDED", "MODIFIED", "MODIFIED", "MODIFIED", "MODIFIED", "MODIFIED"]);
    }

    #[tokio::test]
    async fn selective_lists_as_stored_json_are_the_decoded_lists() {
        let reg = Registry::new(Arc::new(rkube_store::memory::MemoryStore::new()), 300);
        let ns = rkube_api::resources::find("", "v1", "namespaces").unwrap();
        let d = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "d"}});
        reg.create(ns, None, d, false).await.unwrap();
        let r = rkube_api::resources::find("", "v1", "pods").unwrap();
        for (i, (app, node)) in
            [("web", "n1"), ("db", "n1"), ("web", "n2"), ("web", "n1"), ("db", "n2")]
                .into_iter()
                .enumerate()
        {
            let pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p{i}"), "namespace": "d", "labels": {"app": app},
                    "managedFields": [{"manager": "m", "fieldsV1": {"f:spec": {}}}]},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}});
            reg.create(r, Some("d"), pod, false).await.unwrap();
        }
        let params =
            |labels: &str, fields: &str, limit: Option<u32>, token: Option<String>| ListParams {
                labels: crate::selector::LabelSelector::parse(labels).unwrap(),
                fields: crate::selector::FieldSelector::parse(fields).unwrap(),
                limit,
                continue_token: token,
                resource_version: None,
            };
        for (labels, fields) in
            [("app=web", ""), ("", "spec.nodeName=n1"), ("app!=web", "spec.nodeName=n2"), ("", "")]
        {
            let (raw, raw_meta) =
                reg.list_raw(r, Some("d"), &params(labels, fields, None, None)).await.unwrap();
            let (decoded, meta) =
                reg.list(r, Some("d"), &params(labels, fields, None, None)).await.unwrap();
            let raw: Vec<Value> = raw.iter().map(|b| serde_json::from_slice(b).unwrap()).collect();
            assert_eq!(raw, decoded, "{labels} {fields}");
            assert_eq!(raw_meta, meta);
        }
        // Pages of one match each: the selector reads on until it has `limit` items.
        let (mut names, mut token) = (Vec::new(), None);
        loop {
            let (items, meta) =
                reg.list_raw(r, Some("d"), &params("app=web", "", Some(1), token)).await.unwrap();
            for b in items {
                let v: Value = serde_json::from_slice(&b).unwrap();
                names.push(v["metadata"]["name"].as_str().unwrap().to_string());
            }
            token = meta["continue"].as_str().map(String::from);
            if token.is_none() {
                break;
            }
        }
        assert_eq!(names, ["p0", "p2", "p3"]);
    }
}
