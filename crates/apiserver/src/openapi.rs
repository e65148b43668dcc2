//! OpenAPI v3 (and a v2 index) generated from the resource table: every operation carries its
//! `x-kubernetes-group-version-kind` and the `fieldValidation` parameter, which is how kubectl
//! learns that the server validates fields itself (`kubectl apply --validate=strict`).

use rkube_api::resources::{self, ResourceInfo};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") }
}

fn param(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}})
}

fn op(r: &ResourceInfo, verb: &str, action: &str) -> Value {
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
        "operationId": format!("{verb}{}", r.kind),
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

/// The OpenAPI v3 document of one group/version.
pub fn group_version_doc(group: &str, version: &str) -> Option<Value> {
    let list: Vec<&ResourceInfo> =
        resources::RESOURCES.iter().filter(|r| r.group == group && r.version == version).collect();
    if list.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
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
        let mut coll = json!({"get": op(r, "list", "list")});
        if r.verbs.contains(&"create") {
            coll["post"] = op(r, "create", "post");
        }
        paths.insert(collection, coll);
        let mut it = json!({"get": op(r, "read", "get")});
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
                    json!({"get": op(r, "read", "get"), "put": op(r, "replace", "put"), "patch": op(r, "patch", "patch")}),
                );
            }
        }
        schemas.insert(
            schema_name(r),
            json!({
                "type": "object",
                "x-kubernetes-group-version-kind": [{"group": r.group, "version": r.version, "kind": r.kind}],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                },
            }),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0-rkube"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

pub fn hash(doc: &Value) -> String {
    let bytes = serde_json::to_vec(doc).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
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
