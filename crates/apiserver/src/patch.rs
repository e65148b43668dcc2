//! PATCH bodies applied to a stored object: JSON Patch (RFC 6902), JSON Merge Patch (RFC 7386),
//! strategic merge patch with upstream's list merge keys and directives, and apply patches.

use serde_json::{Map, Value};

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

/// Applies `body` to `current`.
pub fn apply_patch(current: &Value, ty: PatchType, body: &[u8]) -> Result<Value> {
    match ty {
        PatchType::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| Error::bad_request(format!("error decoding patch: {e}")))?;
            let mut doc = current.clone();
            json_patch::patch(&mut doc, &patch).map_err(|e| Error::Status {
                code: 422,
                reason: "Invalid",
                message: format!(
                    "the server rejected our request due to an error in our request: {e}"
                ),
                details: None,
            })?;
            Ok(doc)
        }
        PatchType::Merge => {
            let patch: Value = parse(body)?;
            let mut doc = current.clone();
            merge_patch(&mut doc, &patch);
            Ok(doc)
        }
        PatchType::Strategic | PatchType::Apply => {
            let patch: Value = if ty == PatchType::Apply {
                serde_yaml::from_slice(body)
                    .map_err(|e| Error::bad_request(format!("error decoding YAML: {e}")))?
            } else {
                parse(body)?
            };
            if !patch.is_object() {
                return Err(Error::bad_request("patch body must be a JSON object"));
            }
            Ok(strategic_merge(current, &patch, ""))
        }
    }
}

fn parse(body: &[u8]) -> Result<Value> {
    serde_json::from_slice(body)
        .map_err(|e| Error::bad_request(format!("error decoding patch: {e}")))
}

/// RFC 7386.
pub fn merge_patch(doc: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !doc.is_object() {
                *doc = Value::Object(Map::new());
            }
            let d = doc.as_object_mut().expect("just made an object");
            for (k, v) in p {
                if v.is_null() {
                    d.remove(k);
                } else {
                    merge_patch(d.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *doc = other.clone(),
    }
}

/// Merge key of a list field (by field name, as upstream's Go struct tags declare them).
pub(crate) fn merge_key(path: &str, field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "containerStatuses"
        | "initContainerStatuses"
        | "ephemeralContainerStatuses"
        | "resourceClaims" => "name",
        "ports" if path.ends_with("containers") || path.contains("ontainers[") => "containerPort",
        "ports" => "port",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "conditions" => "type",
        "addresses" if path.contains("status") => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "podIPs" | "hostIPs" => "ip",
        _ => return None,
    })
}

/// Primitive lists that merge (set union) instead of being replaced.
pub(crate) fn merges_primitives(field: &str) -> bool {
    field == "finalizers"
}

/// Strategic merge patch: maps merge recursively, lists with a merge key merge element-wise,
/// other lists are replaced; `$patch`, `$retainKeys`, `$deleteFromPrimitiveList/…` and
/// `$setElementOrder/…` directives are honoured.
pub fn strategic_merge(current: &Value, patch: &Value, path: &str) -> Value {
    let Value::Object(p) = patch else { return patch.clone() };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut out = p.clone();
            out.remove("$patch");
            return Value::Object(out);
        }
        Some("delete") => return Value::Null,
        _ => {}
    }
    let mut out = match current {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    if let Some(keep) = p.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        out.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in p {
        if k.starts_with('$') {
            if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/")
                && let (Some(Value::Array(list)), Some(del)) = (out.get_mut(field), v.as_array())
            {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        let child_path = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
        if v.is_null() {
            out.remove(k);
            continue;
        }
        let cur = out.get(k).cloned().unwrap_or(Value::Null);
        let merged = match v {
            Value::Object(_) => strategic_merge(&cur, v, &child_path),
            Value::Array(items) => {
                if let Some(key) = merge_key(path, k) {
                    merge_list(&cur, items, key, &child_path)
                } else if merges_primitives(k) {
                    let mut list = cur.as_array().cloned().unwrap_or_default();
                    for x in items {
                        if !list.contains(x) {
                            list.push(x.clone());
                        }
                    }
                    Value::Array(list)
                } else {
                    Value::Array(
                        items.iter().filter(|x| !is_delete_directive(x)).cloned().collect(),
                    )
                }
            }
            other => other.clone(),
        };
        if merged.is_null() {
            out.remove(k);
        } else {
            out.insert(k.clone(), merged);
        }
    }
    // `$setElementOrder/<field>` reorders a merged list as the client asked.
    for (k, v) in p {
        if let (Some(field), Some(order)) = (k.strip_prefix("$setElementOrder/"), v.as_array())
            && let (Some(Value::Array(list)), Some(key)) =
                (out.get(field).cloned(), merge_key(path, field))
        {
            let mut ordered: Vec<Value> = Vec::new();
            for o in order {
                if let Some(item) = list.iter().find(|x| x.get(key) == o.get(key)) {
                    ordered.push(item.clone());
                }
            }
            for item in &list {
                if !ordered.contains(item) {
                    ordered.push(item.clone());
                }
            }
            out.insert(field.to_string(), Value::Array(ordered));
        }
    }
    Value::Object(out)
}

fn is_delete_directive(v: &Value) -> bool {
    v.get("$patch").and_then(Value::as_str) == Some("delete")
}

fn merge_list(current: &Value, patch_items: &[Value], key: &str, path: &str) -> Value {
    let mut list: Vec<Value> = current.as_array().cloned().unwrap_or_default();
    if patch_items.iter().any(|x| x.get("$patch").and_then(Value::as_str) == Some("replace")) {
        return Value::Array(
            patch_items.iter().filter(|x| x.get("$patch").is_none()).cloned().collect(),
        );
    }
    for item in patch_items {
        let Some(id) = item.get(key) else {
            list.push(item.clone());
            continue;
        };
        let pos = list.iter().position(|x| x.get(key) == Some(id));
        if is_delete_directive(item) {
            if let Some(i) = pos {
                list.remove(i);
            }
            continue;
        }
        match pos {
            Some(i) => list[i] = strategic_merge(&list[i], item, path),
            None => list.push(strategic_merge(&Value::Null, item, path)),
        }
    }
    Value::Array(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_removes_nulls_and_merges_maps() {
        let cur = json!({"a": {"b": 1, "c": 2}, "d": [1, 2]});
        let out = apply_patch(&cur, PatchType::Merge, br#"{"a": {"b": null, "e": 3}, "d": [3]}"#)
            .unwrap();
        assert_eq!(out, json!({"a": {"c": 2, "e": 3}, "d": [3]}));
    }

    #[test]
    fn strategic_merge_merges_containers_by_name_and_honours_delete() {
        let cur = json!({"spec": {"containers": [{"name": "a", "image": "x:1"}, {"name": "b", "image": "y:1"}]}});
        let patch = json!({"spec": {"containers": [{"name": "a", "image": "x:2"}, {"name": "b", "$patch": "delete"}]}});
        let out = strategic_merge(&cur, &patch, "");
        assert_eq!(out, json!({"spec": {"containers": [{"name": "a", "image": "x:2"}]}}));
    }

    #[test]
    fn json_patch_test_failure_is_an_error() {
        let cur = json!({"a": 1});
        assert!(
            apply_patch(&cur, PatchType::Json, br#"[{"op": "test", "path": "/a", "value": 2}]"#)
                .is_err()
        );
        let out =
            apply_patch(&cur, PatchType::Json, br#"[{"op": "replace", "path": "/a", "value": 2}]"#)
                .unwrap();
        assert_eq!(out, json!({"a": 2}));
    }

    /// A pod as kubectl's client-side apply would find it stored.
    fn pod() -> Value {
        json!({
            "metadata": {"name": "web", "labels": {"app": "web", "tier": "front"},
                         "finalizers": ["a.example/x", "b.example/y"]},
            "spec": {
                "containers": [
                    {"name": "app", "image": "nginx:1.26",
                     "ports": [{"containerPort": 80, "name": "http"}, {"containerPort": 443, "name": "https"}],
                     "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                     "volumeMounts": [{"name": "cfg", "mountPath": "/etc/app"}]},
                    {"name": "sidecar", "image": "busybox:1", "args": ["sleep", "3600"]}
                ],
                "volumes": [{"name": "cfg", "configMap": {"name": "app-cfg"}},
                            {"name": "data", "emptyDir": {}}],
                "imagePullSecrets": [{"name": "reg-a"}],
                "tolerations": [{"key": "k1", "operator": "Exists"}],
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}
            },
            "status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}]}
        })
    }

    fn smp(patch: Value) -> Value {
        strategic_merge(&pod(), &patch, "")
    }

    #[test]
    fn containers_ports_env_and_mounts_merge_by_their_keys() {
        let out = smp(json!({"spec": {"containers": [{
            "name": "app", "image": "nginx:1.27",
            "ports": [{"containerPort": 443, "name": "tls"}, {"containerPort": 8080}],
            "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}]
        }]}}));
        let app = &out["spec"]["containers"][0];
        assert_eq!(app["image"], "nginx:1.27");
        assert_eq!(
            app["ports"],
            json!([{"containerPort": 80, "name": "http"}, {"containerPort": 443, "name": "tls"}, {"containerPort": 8080}])
        );
        assert_eq!(
            app["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}])
        );
        assert_eq!(app["volumeMounts"].as_array().unwrap().len(), 2);
        assert_eq!(out["spec"]["containers"][1]["name"], "sidecar", "untouched containers stay");
    }

    #[test]
    fn volumes_pull_secrets_and_conditions_merge_by_name_and_type() {
        let out = smp(json!({
            "spec": {"volumes": [{"name": "cache", "emptyDir": {"medium": "Memory"}}],
                     "imagePullSecrets": [{"name": "reg-b"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }));
        let names: Vec<&str> = out["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["cfg", "data", "cache"]);
        assert_eq!(out["spec"]["imagePullSecrets"], json!([{"name": "reg-a"}, {"name": "reg-b"}]));
        assert_eq!(
            out["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}])
        );
    }

    #[test]
    fn lists_without_a_merge_key_are_replaced() {
        let out = smp(json!({"spec": {
            "tolerations": [{"key": "k2", "operator": "Exists"}],
            "containers": [{"name": "sidecar", "args": ["sleep", "10"]}]
        }}));
        assert_eq!(out["spec"]["tolerations"], json!([{"key": "k2", "operator": "Exists"}]));
        assert_eq!(out["spec"]["containers"][1]["args"], json!(["sleep", "10"]));
    }

    #[test]
    fn patch_delete_removes_a_list_element_or_a_map() {
        let out = smp(json!({"spec": {
            "containers": [{"name": "app", "env": [{"name": "A", "$patch": "delete"}]},
                           {"name": "sidecar", "$patch": "delete"}],
            "strategy": {"$patch": "delete"}
        }}));
        assert_eq!(out["spec"]["containers"].as_array().unwrap().len(), 1);
        assert_eq!(out["spec"]["containers"][0]["env"], json!([{"name": "B", "value": "2"}]));
        assert!(out["spec"].get("strategy").is_none());
    }

    #[test]
    fn patch_replace_replaces_a_whole_list_or_map() {
        let out = smp(json!({"spec": {
            "volumes": [{"$patch": "replace"}, {"name": "only", "emptyDir": {}}],
            "strategy": {"$patch": "replace", "type": "Recreate"}
        }}));
        assert_eq!(out["spec"]["volumes"], json!([{"name": "only", "emptyDir": {}}]));
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
    }

    #[test]
    fn patch_merge_is_the_default_and_leaves_no_directive_behind() {
        let out = smp(
            json!({"spec": {"strategy": {"$patch": "merge", "rollingUpdate": {"maxUnavailable": 0}}}}),
        );
        assert_eq!(
            out["spec"]["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
        );
    }

    #[test]
    fn set_element_order_reorders_merged_lists() {
        let out = smp(json!({"spec": {
            "$setElementOrder/containers": [{"name": "sidecar"}, {"name": "app"}],
            "containers": [{"name": "app", "image": "nginx:1.27"}]
        }}));
        let names: Vec<&str> = out["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["sidecar", "app"]);
        assert_eq!(out["spec"]["containers"][1]["image"], "nginx:1.27");
        assert!(out["spec"].as_object().unwrap().keys().all(|k| !k.starts_with('$')));
    }

    #[test]
    fn retain_keys_drops_fields_the_patch_does_not_keep() {
        // What kubectl sends when a volume changes its source (volumes are merge,retainKeys).
        let out = smp(json!({"spec": {"volumes": [
            {"name": "cfg", "$retainKeys": ["name", "secret"], "secret": {"secretName": "s"}}
        ]}}));
        assert_eq!(
            out["spec"]["volumes"][0],
            json!({"name": "cfg", "secret": {"secretName": "s"}})
        );
    }

    #[test]
    fn delete_from_primitive_list_removes_only_the_named_values() {
        let out = smp(
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a.example/x"], "finalizers": ["c.example/z"]}}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["b.example/y", "c.example/z"]));
    }

    #[test]
    fn null_removes_a_field_and_labels_merge() {
        let out = smp(json!({"metadata": {"labels": {"tier": null, "version": "2"}}}));
        assert_eq!(out["metadata"]["labels"], json!({"app": "web", "version": "2"}));
    }
}
