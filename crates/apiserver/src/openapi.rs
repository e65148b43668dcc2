//! OpenAPI v3 (and a v2 index) generated from the resource table: every operation carries its
//! `x-kubernetes-group-version-kind` and the `fieldValidation` parameter, which is how kubectl
//! learns that the server validates fields itself (`kubectl apply --validate=strict`).

use rkube_api::resources::{self, ResourceInfo};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub mod v2_proto;

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") }
}

fn param(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}})
}

/// Upstream's operation ids: `readAppsV1NamespacedDeploymentStatus`, `listCoreV1Node`.
fn operation_id(r: &ResourceInfo, verb: &str, sub: &str) -> String {
    let cap = |s: &str| {
        let mut c = s.chars();
        c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
    };
    let group = if r.group.is_empty() { "core" } else { r.group.split('.').next().unwrap_or("") };
    let ns = if r.namespaced { "Namespaced" } else { "" };
    format!("{verb}{}{}{ns}{}{}", cap(group), cap(r.version), r.kind, cap(sub))
}

fn op(r: &ResourceInfo, verb: &str, action: &str) -> Value {
    op_on(r, verb, action, "")
}

fn op_on(r: &ResourceInfo, verb: &str, action: &str, sub: &str) -> Value {
    let mut params = vec![param("pretty")];
    if matches!(action, "post" | "put" | "patch") {
        params.push(param("dryRun"));
        params.push(param("fieldManager"));
        params.push(param("fieldValidation"));
    }
    if action == "patch" {
        params.push(param("force"));
    }
    json!({
        "operationId": operation_id(r, verb, sub),
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{}", schema_name(r))}}}}},
    })
}

fn schema_name(r: &ResourceInfo) -> String {
    let g = if r.group.is_empty() {
        "core".to_string()
    } else {
        r.group.split('.').next().unwrap_or(r.group).to_string()
    };
    format!("io.k8s.api.{g}.{}.{}", r.version, r.kind)
}

/// Every schema of the served kinds and what they reference, generated once from the
/// k8s-openapi types (their schemars support), names as upstream's (`io.k8s.api.core.v1.Pod`).
fn all_schemas() -> &'static serde_json::Map<String, Value> {
    static SCHEMAS: std::sync::OnceLock<serde_json::Map<String, Value>> =
        std::sync::OnceLock::new();
    SCHEMAS.get_or_init(|| {
        use k8s_openapi::api;
        let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
        macro_rules! gen_all {
            ($($t:ty),* $(,)?) => { $( let _ = generator.subschema_for::<$t>(); )* };
        }
        gen_all!(
            api::core::v1::Namespace,
            api::core::v1::Pod,
            api::core::v1::Node,
            api::core::v1::Service,
            api::core::v1::Endpoints,
            api::core::v1::Event,
            api::core::v1::ConfigMap,
            api::core::v1::Secret,
            api::core::v1::ServiceAccount,
            api::core::v1::ComponentStatus,
            api::core::v1::ReplicationController,
            api::apps::v1::Deployment,
            api::apps::v1::ReplicaSet,
            api::apps::v1::DaemonSet,
            api::coordination::v1::Lease,
            api::discovery::v1::EndpointSlice,
            api::events::v1::Event,
            api::scheduling::v1::PriorityClass,
            api::policy::v1::PodDisruptionBudget,
        );
        let mut defs = generator.take_definitions(true);
        // The list strategies of upstream's Go struct tags, which kubectl's client-side apply
        // reads from the schema to build strategic merge patches.
        const STRATEGIES: &[(&str, &str, Option<&str>, &str)] = &[
            ("io.k8s.api.core.v1.PodSpec", "containers", Some("name"), "merge"),
            ("io.k8s.api.core.v1.PodSpec", "initContainers", Some("name"), "merge"),
            ("io.k8s.api.core.v1.PodSpec", "ephemeralContainers", Some("name"), "merge"),
            ("io.k8s.api.core.v1.PodSpec", "volumes", Some("name"), "merge,retainKeys"),
            ("io.k8s.api.core.v1.PodSpec", "imagePullSecrets", Some("name"), "merge"),
            ("io.k8s.api.core.v1.PodSpec", "hostAliases", Some("ip"), "merge"),
            (
                "io.k8s.api.core.v1.PodSpec",
                "topologySpreadConstraints",
                Some("topologyKey"),
                "merge",
            ),
            ("io.k8s.api.core.v1.Container", "ports", Some("containerPort"), "merge"),
            ("io.k8s.api.core.v1.Container", "env", Some("name"), "merge"),
            ("io.k8s.api.core.v1.Container", "volumeMounts", Some("mountPath"), "merge"),
            ("io.k8s.api.core.v1.Container", "volumeDevices", Some("devicePath"), "merge"),
            ("io.k8s.api.core.v1.EphemeralContainer", "env", Some("name"), "merge"),
            ("io.k8s.api.core.v1.EphemeralContainer", "volumeMounts", Some("mountPath"), "merge"),
            ("io.k8s.api.core.v1.PodStatus", "conditions", Some("type"), "merge"),
            ("io.k8s.api.core.v1.NodeStatus", "conditions", Some("type"), "merge"),
            ("io.k8s.api.core.v1.NodeStatus", "addresses", Some("type"), "merge"),
            ("io.k8s.api.core.v1.ServiceSpec", "ports", Some("port"), "merge"),
            ("io.k8s.api.apps.v1.DeploymentStatus", "conditions", Some("type"), "merge"),
            ("io.k8s.api.apps.v1.ReplicaSetStatus", "conditions", Some("type"), "merge"),
            ("io.k8s.api.apps.v1.DaemonSetStatus", "conditions", Some("type"), "merge"),
            (
                "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
                "ownerReferences",
                Some("uid"),
                "merge",
            ),
            ("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", "finalizers", None, "merge"),
        ];
        for (schema, field, key, strategy) in STRATEGIES {
            if let Some(prop) = defs
                .get_mut(*schema)
                .and_then(|s| s.get_mut("properties"))
                .and_then(|p| p.get_mut(*field))
                .and_then(Value::as_object_mut)
            {
                prop.insert("x-kubernetes-patch-strategy".into(), json!(strategy));
                if let Some(k) = key {
                    prop.insert("x-kubernetes-patch-merge-key".into(), json!(k));
                    prop.insert("x-kubernetes-list-type".into(), json!("map"));
                    prop.insert("x-kubernetes-list-map-keys".into(), json!([k]));
                }
            }
        }
        for r in resources::RESOURCES {
            if let Some(schema) = defs.get_mut(&schema_name(r)).and_then(Value::as_object_mut) {
                schema.insert(
                    "x-kubernetes-group-version-kind".into(),
                    json!([{"group": r.group, "version": r.version, "kind": r.kind}]),
                );
            }
        }
        defs
    })
}

/// The schemas `roots` reference, transitively.
fn reachable(roots: &[String]) -> serde_json::Map<String, Value> {
    let all = all_schemas();
    let mut out = serde_json::Map::new();
    let mut todo: Vec<String> = roots.to_vec();
    while let Some(name) = todo.pop() {
        if out.contains_key(&name) {
            continue;
        }
        let Some(schema) = all.get(&name) else { continue };
        let mut refs = Vec::new();
        collect_refs(schema, &mut refs);
        out.insert(name, schema.clone());
        todo.extend(refs);
    }
    out
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(r) = m
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix("#/components/schemas/"))
            {
                out.push(r.to_string());
            }
            m.values().for_each(|x| collect_refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

/// The OpenAPI v3 document of one group/version.
pub fn group_version_doc(group: &str, version: &str) -> Option<Value> {
    let list: Vec<&ResourceInfo> =
        resources::RESOURCES.iter().filter(|r| r.group == group && r.version == version).collect();
    if list.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    let mut roots = Vec::new();
    for r in list {
        let base = format!("/{}", gv_path(group, version));
        let (collection, item) = if r.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", r.plural),
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.plural),
            )
        } else {
            (format!("{base}/{}", r.plural), format!("{base}/{}/{{name}}", r.plural))
        };
        let path_param = |name: &str| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "uniqueItems": true}});
        let ns_params: Vec<Value> =
            if r.namespaced { vec![path_param("namespace")] } else { vec![] };
        let mut item_params = vec![path_param("name")];
        item_params.extend(ns_params.iter().cloned());
        let mut coll = json!({"get": op(r, "list", "list"), "parameters": ns_params});
        if r.verbs.contains(&"create") {
            coll["post"] = op(r, "create", "post");
        }
        paths.insert(collection, coll);
        let mut it = json!({"get": op(r, "read", "get"), "parameters": item_params});
        if r.verbs.contains(&"update") {
            it["put"] = op(r, "replace", "put");
            it["patch"] = op(r, "patch", "patch");
            it["delete"] = op(r, "delete", "delete");
        }
        paths.insert(item.clone(), it);
        for sub in r.subresources {
            if matches!(*sub, "status" | "scale") {
                paths.insert(
                    format!("{item}/{sub}"),
                    json!({"get": op_on(r, "read", "get", sub), "put": op_on(r, "replace", "put", sub), "patch": op_on(r, "patch", "patch", sub), "parameters": item_params}),
                );
            }
        }
        roots.push(schema_name(r));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0-rkube"},
        "paths": paths,
        "components": {"schemas": reachable(&roots)},
    }))
}

pub fn hash(doc: &Value) -> String {
    hash_bytes(&serde_json::to_vec(doc).unwrap_or_default())
}

pub fn hash_bytes(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().take(32).map(|b| format!("{b:02X}")).collect()
}

/// `/openapi/v3`: the index of group/version documents, each with a content hash.
pub fn v3_root() -> Value {
    let mut paths = serde_json::Map::new();
    for (g, versions) in resources::groups() {
        for v in versions {
            if let Some(doc) = group_version_doc(g, v) {
                let p = gv_path(g, v);
                paths.insert(
                    p.clone(),
                    json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", hash(&doc))}),
                );
            }
        }
    }
    json!({"paths": paths})
}

/// Removes the fields of `obj` its schema does not know — upstream never stores them — and
/// names them as upstream does for `fieldValidation`: `spec.containers[0].imagee`. Maps
/// (`additionalProperties`) and free-form objects accept any key.
pub fn prune_unknown_fields(r: &ResourceInfo, obj: &mut Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(schema) = all_schemas().get(&schema_name(r)) {
        walk(schema, obj, "", &mut out);
    }
    out
}

fn resolve(schema: &Value) -> &Value {
    let mut cur = schema;
    for _ in 0..8 {
        if let Some(r) = cur
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/components/schemas/"))
        {
            match all_schemas().get(r) {
                Some(s) => cur = s,
                None => return cur,
            }
        } else if let Some(first) =
            cur.get("allOf").and_then(Value::as_array).and_then(|a| a.first())
        {
            cur = first;
        } else {
            return cur;
        }
    }
    cur
}

fn walk(schema: &Value, v: &mut Value, path: &str, out: &mut Vec<String>) {
    let schema = resolve(schema);
    match v {
        Value::Object(m) => {
            let Some(props) = schema.get("properties").and_then(Value::as_object) else {
                if let Some(extra) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                    for (k, x) in m.iter_mut() {
                        walk(extra, x, format!("{path}.{k}").trim_start_matches('.'), out);
                    }
                }
                return;
            };
            m.retain(|k, x| {
                let child = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match props.get(k) {
                    Some(ps) => walk(ps, x, &child, out),
                    None if path.is_empty() && (k == "apiVersion" || k == "kind") => {}
                    None => {
                        out.push(child);
                        return false;
                    }
                }
                true
            });
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, x) in items.iter_mut().enumerate() {
                    walk(item_schema, x, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// The properties of a schema by its upstream name, matched without regard to case
/// (`io.k8s.api.core.v1.PodIp` finds `io.k8s.api.core.v1.PodIP`).
pub fn schema_properties(name: &str) -> Option<&'static serde_json::Map<String, Value>> {
    static BY_LOWER: std::sync::OnceLock<std::collections::HashMap<String, &'static str>> =
        std::sync::OnceLock::new();
    let index = BY_LOWER.get_or_init(|| {
        all_schemas().keys().map(|k| (k.to_ascii_lowercase(), k.as_str())).collect()
    });
    let key = index.get(&name.to_ascii_lowercase())?;
    resolve(all_schemas().get(*key)?).get("properties").and_then(Value::as_object)
}

/// The OpenAPI v2 (Swagger 2.0) document of every served kind: the same operations and schemas
/// as v3, with v2's reference paths and parameter form, for clients that only read v2.
pub fn v2_doc() -> Value {
    let mut paths = serde_json::Map::new();
    let mut definitions = serde_json::Map::new();
    for (g, versions) in resources::groups() {
        for v in versions {
            let Some(doc) = group_version_doc(g, v) else { continue };
            for (path, item) in doc["paths"].as_object().into_iter().flatten() {
                let mut item = item.clone();
                v2_parameters(&mut item["parameters"]);
                for (_, op) in item.as_object_mut().into_iter().flatten() {
                    if op.get("responses").is_none() {
                        continue; // the path-level `parameters`
                    }
                    let schema =
                        op["responses"]["200"]["content"]["application/json"]["schema"].clone();
                    op["responses"] = json!({"200": {"description": "OK", "schema": schema}});
                    v2_parameters(&mut op["parameters"]);
                    op["consumes"] = json!(["*/*"]);
                    op["produces"] = json!(["application/json", "application/yaml"]);
                    op["schemes"] = json!(["https"]);
                }
                paths.insert(path.clone(), item);
            }
            for (name, schema) in doc["components"]["schemas"].as_object().into_iter().flatten() {
                definitions.insert(name.clone(), schema.clone());
            }
        }
    }
    let mut doc = json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0-rkube"},
        "paths": paths,
        "definitions": definitions,
    });
    to_v2(&mut doc);
    doc
}

/// v3 parameters carry a `schema`; v2's non-body parameters carry its type inline.
fn v2_parameters(params: &mut Value) {
    for p in params.as_array_mut().into_iter().flatten() {
        if let Some(m) = p.as_object_mut()
            && let Some(Value::Object(schema)) = m.remove("schema")
        {
            m.extend(schema);
        }
    }
}

/// v3 → v2 in place: `#/components/schemas/` references become `#/definitions/`, and keywords
/// v2 does not have are dropped.
fn to_v2(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("nullable");
            m.remove("writeOnly");
            // v2 readers take a `$ref` with siblings; v3's `allOf: [{$ref}]` wrapper is not
            // understood by them.
            if let Some(Value::Array(all)) = m.get("allOf")
                && let [Value::Object(only)] = all.as_slice()
                && let Some(r) = only.get("$ref").cloned()
            {
                m.remove("allOf");
                m.insert("$ref".into(), r);
            }
            if m.remove("x-kubernetes-int-or-string") == Some(Value::Bool(true)) {
                m.insert("type".into(), json!("string"));
                m.insert("format".into(), json!("int-or-string"));
            }
            if let Some(Value::String(r)) = m.get_mut("$ref")
                && let Some(name) = r.strip_prefix("#/components/schemas/")
            {
                *r = format!("#/definitions/{name}");
            }
            m.values_mut().for_each(to_v2);
        }
        Value::Array(a) => a.iter_mut().for_each(to_v2),
        _ => {}
    }
}
