//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Every write records which manager set which fields, in upstream's `FieldsV1` form
//! (`f:<field>`, `k:{"name":"web"}` for list items with a merge key, `v:<value>` for set items,
//! `.` for an item's own presence). An apply (`application/apply-patch+yaml`) owns exactly the
//! fields it sends: a field another manager owns with a different value is a conflict (409 with
//! the fields and managers) unless `force=true` takes it over; fields the manager applied before
//! and applies no more are removed when nobody else owns them. Other writes (create, update,
//! patch) take ownership of the fields they change, operation `Update`.

use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

use crate::{Error, Result};

/// A field path: elements such as `f:spec`, `k:{"name":"web"}`, `v:"x"`, `.`.
type Path = Vec<String>;
type Set = BTreeSet<Path>;

/// Fields nobody owns: identity and bookkeeping the server sets.
fn ignored(path: &[String]) -> bool {
    match path {
        [f] => matches!(f.as_str(), "f:apiVersion" | "f:kind"),
        [m, f] if m == "f:metadata" => matches!(
            f.as_str(),
            "f:name"
                | "f:namespace"
                | "f:uid"
                | "f:resourceVersion"
                | "f:generation"
                | "f:creationTimestamp"
                | "f:deletionTimestamp"
                | "f:deletionGracePeriodSeconds"
                | "f:managedFields"
                | "f:selfLink"
        ),
        _ => false,
    }
}

/// The leaf paths of `v` (its field set), `json_path` being the dotted path the merge keys of
/// strategic merge are looked up by.
fn collect(v: &Value, prefix: &mut Path, json_path: &str, out: &mut Set) {
    let Value::Object(m) = v else {
        out.insert(prefix.clone());
        return;
    };
    if m.is_empty() && !prefix.is_empty() {
        out.insert(prefix.clone());
        return;
    }
    for (k, child) in m {
        prefix.push(format!("f:{k}"));
        if ignored(prefix) || (prefix.len() == 1 && k == "status") {
            prefix.pop();
            continue;
        }
        let child_json = if json_path.is_empty() { k.clone() } else { format!("{json_path}.{k}") };
        match child {
            Value::Array(items) if !items.is_empty() => {
                if let Some(key) = crate::patch::merge_key(json_path, k) {
                    for (i, item) in items.iter().enumerate() {
                        let id = json!({key: item.get(key).cloned().unwrap_or(Value::Null)});
                        prefix.push(format!("k:{id}"));
                        let mut dot = prefix.clone();
                        dot.push(".".into());
                        out.insert(dot);
                        collect(item, prefix, &format!("{child_json}[{i}]"), out);
                        prefix.pop();
                    }
                } else if crate::patch::merges_primitives(k) {
                    for item in items {
                        prefix.push(format!("v:{item}"));
                        out.insert(prefix.clone());
                        prefix.pop();
                    }
                } else {
                    out.insert(prefix.clone()); // an atomic list
                }
            }
            _ => collect(child, prefix, &child_json, out),
        }
        prefix.pop();
    }
}

/// The field set of an object; for the status subresource only `status`, otherwise all but it.
fn field_set(obj: &Value, subresource: Option<&str>) -> Set {
    let mut out = Set::new();
    match subresource {
        Some("status") => {
            if let Some(status) = obj.get("status") {
                let mut p = vec!["f:status".to_string()];
                collect(status, &mut p, "status", &mut out);
            }
        }
        _ => collect(obj, &mut Vec::new(), "", &mut out),
    }
    out
}

/// The value at `path` in `obj` (`None` when absent).
fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for el in path {
        if el == "." {
            return Some(cur);
        }
        if let Some(f) = el.strip_prefix("f:") {
            cur = cur.get(f)?;
        } else if let Some(k) = el.strip_prefix("k:") {
            let id: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur = cur.as_array()?.iter().find(|it| id.iter().all(|(k, v)| it.get(k) == Some(v)))?;
        } else if let Some(v) = el.strip_prefix("v:") {
            let want: Value = serde_json::from_str(v).ok()?;
            cur = cur.as_array()?.iter().find(|it| **it == want)?;
        } else {
            return None;
        }
    }
    Some(cur)
}

/// Removes what `path` names from `obj`.
fn remove_at(obj: &mut Value, path: &[String]) {
    let (last, parent_path) = match path {
        [rest @ .., dot] if dot == "." => match rest {
            [parent @ .., item] => (item, parent),
            [] => return,
        },
        [parent @ .., last] => (last, parent),
        [] => return,
    };
    let mut cur = obj;
    for el in parent_path {
        let next = if let Some(f) = el.strip_prefix("f:") {
            cur.get_mut(f)
        } else if let Some(k) = el.strip_prefix("k:") {
            let Ok(id) = serde_json::from_str::<Map<String, Value>>(k) else { return };
            cur.as_array_mut()
                .and_then(|a| a.iter_mut().find(|it| id.iter().all(|(k, v)| it.get(k) == Some(v))))
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        if let (Ok(id), Some(a)) =
            (serde_json::from_str::<Map<String, Value>>(k), cur.as_array_mut())
        {
            a.retain(|it| !id.iter().all(|(k, v)| it.get(k) == Some(v)));
        }
    } else if let Some(v) = last.strip_prefix("v:")
        && let (Ok(want), Some(a)) = (serde_json::from_str::<Value>(v), cur.as_array_mut())
    {
        a.retain(|it| *it != want);
    }
}

fn to_fields_v1(set: &Set) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for el in path {
            let next = cur.entry(el.clone()).or_insert_with(|| json!({}));
            cur = next.as_object_mut().expect("field trees hold objects");
        }
    }
    Value::Object(root)
}

fn from_fields_v1(v: &Value, prefix: &mut Path, out: &mut Set) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                prefix.push(k.clone());
                from_fields_v1(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            if !prefix.is_empty() {
                out.insert(prefix.clone());
            }
        }
    }
}

/// Upstream's rendering of a path in messages: `.spec.containers[name="web"].image`.
fn display(path: &[String]) -> String {
    let mut s = String::new();
    for el in path {
        if let Some(f) = el.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = el.strip_prefix("k:") {
            let id: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = id.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = el.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        }
    }
    s
}

#[derive(Clone, Debug)]
struct Entry {
    raw: Map<String, Value>,
    fields: Set,
}

impl Entry {
    fn manager(&self) -> &str {
        self.raw.get("manager").and_then(Value::as_str).unwrap_or("")
    }
    fn operation(&self) -> &str {
        self.raw.get("operation").and_then(Value::as_str).unwrap_or("")
    }
    fn subresource(&self) -> Option<&str> {
        self.raw.get("subresource").and_then(Value::as_str).filter(|s| !s.is_empty())
    }
    fn same(&self, manager: &str, operation: &str, sub: Option<&str>) -> bool {
        self.manager() == manager && self.operation() == operation && self.subresource() == sub
    }
}

fn entries(obj: &Value) -> Vec<Entry> {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let raw = e.as_object()?.clone();
            let mut fields = Set::new();
            from_fields_v1(
                raw.get("fieldsV1").unwrap_or(&Value::Null),
                &mut Vec::new(),
                &mut fields,
            );
            Some(Entry { raw, fields })
        })
        .collect()
}

fn store_entries(obj: &mut Value, list: Vec<Entry>) {
    let out: Vec<Value> = list
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|mut e| {
            e.raw.insert("fieldsType".into(), json!("FieldsV1"));
            e.raw.insert("fieldsV1".into(), to_fields_v1(&e.fields));
            Value::Object(e.raw)
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if out.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(out));
        }
    }
}

fn new_entry(
    manager: &str,
    operation: &str,
    api_version: &str,
    sub: Option<&str>,
    fields: Set,
) -> Entry {
    let mut raw = Map::new();
    raw.insert("manager".into(), json!(manager));
    raw.insert("operation".into(), json!(operation));
    raw.insert("apiVersion".into(), json!(api_version));
    raw.insert("time".into(), json!(crate::strategy::now_rfc3339()));
    if let Some(s) = sub {
        raw.insert("subresource".into(), json!(s));
    }
    Entry { raw, fields }
}

/// Records a create or a non-apply update by `manager`: it owns what it changed; others lose it.
/// An update that changes nothing leaves managedFields as they were.
pub fn record_update(new: &mut Value, old: Option<&Value>, manager: &str, sub: Option<&str>) {
    let api_version = new["apiVersion"].as_str().unwrap_or("v1").to_string();
    let mut list = match old {
        Some(o) => entries(o),
        None => entries(new),
    };
    let new_set = field_set(new, sub);
    let changed: Set = match old {
        None => new_set.clone(),
        Some(o) => new_set.iter().filter(|p| value_at(o, p) != value_at(new, p)).cloned().collect(),
    };
    let removed: Set = match old {
        None => Set::new(),
        Some(o) => field_set(o, sub).difference(&new_set).cloned().collect(),
    };
    if changed.is_empty() && removed.is_empty() {
        store_entries(new, list);
        return;
    }
    for e in &mut list {
        e.fields.retain(|p| !changed.contains(p) && !removed.contains(p));
    }
    match list.iter_mut().find(|e| e.same(manager, "Update", sub)) {
        Some(e) => {
            e.fields.extend(changed);
            e.raw.insert("time".into(), json!(crate::strategy::now_rfc3339()));
        }
        None => list.push(new_entry(manager, "Update", &api_version, sub, changed)),
    }
    store_entries(new, list);
}

/// Server-side apply of `applied` by `manager` onto `live` (`None` when creating).
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    sub: Option<&str>,
) -> Result<Value> {
    let api_version = applied["apiVersion"].as_str().unwrap_or("v1").to_string();
    let base = live.cloned().unwrap_or_else(|| json!({}));
    let mut list = entries(&base);
    let wanted = field_set(applied, sub);
    // Conflicts: fields another manager owns whose value would change.
    let mut conflicts: Vec<(String, String, String)> = Vec::new();
    for e in &list {
        if e.same(manager, "Apply", sub) {
            continue;
        }
        for p in e.fields.intersection(&wanted) {
            if p.last().is_some_and(|l| l == ".") {
                continue;
            }
            if value_at(&base, p) != value_at(applied, p) {
                let using = e.raw.get("apiVersion").and_then(Value::as_str).unwrap_or("");
                conflicts.push((e.manager().to_string(), using.to_string(), display(p)));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflict_error(&conflicts));
    }
    let previous: Set = list
        .iter()
        .find(|e| e.same(manager, "Apply", sub))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut merged = crate::patch::strategic_merge(&base, applied, "");
    // Forced or agreeing: the applier is now (co-)owner; forced fields leave their old owners.
    for e in &mut list {
        if !e.same(manager, "Apply", sub) {
            e.fields
                .retain(|p| !(wanted.contains(p) && value_at(&base, p) != value_at(applied, p)));
        }
    }
    // Fields this manager stopped applying go, unless someone else still owns them.
    let others: Set = list
        .iter()
        .filter(|e| !e.same(manager, "Apply", sub))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let owned =
        |prefix: &[String]| others.iter().chain(wanted.iter()).any(|o| o.starts_with(prefix));
    for p in previous.difference(&wanted) {
        if owned(p) {
            continue;
        }
        remove_at(&mut merged, p);
        // A list or map left empty by the removal goes too, unless somebody owns it.
        for n in (1..p.len()).rev() {
            let anc = &p[..n];
            let empty = match value_at(&merged, anc) {
                None => continue, // already gone with what was removed
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::Object(m)) => m.is_empty(),
                Some(_) => false,
            };
            if !empty || owned(anc) {
                break;
            }
            remove_at(&mut merged, anc);
        }
    }
    match list.iter_mut().find(|e| e.same(manager, "Apply", sub)) {
        Some(e) => {
            e.fields = wanted;
            e.raw.insert("time".into(), json!(crate::strategy::now_rfc3339()));
            e.raw.insert("apiVersion".into(), json!(api_version));
        }
        None => list.push(new_entry(manager, "Apply", &api_version, sub, wanted)),
    }
    store_entries(&mut merged, list);
    Ok(merged)
}

fn conflict_error(conflicts: &[(String, String, String)]) -> Error {
    let n = conflicts.len();
    let message = if n == 1 {
        let (m, v, f) = &conflicts[0];
        format!("Apply failed with 1 conflict: conflict with \"{m}\" using {v}: {f}")
    } else {
        let mut s = format!("Apply failed with {n} conflicts: ");
        let mut by_manager: Vec<(&str, &str, Vec<&str>)> = Vec::new();
        for (m, v, f) in conflicts {
            match by_manager.iter_mut().find(|(bm, bv, _)| bm == m && bv == v) {
                Some(x) => x.2.push(f),
                None => by_manager.push((m, v, vec![f])),
            }
        }
        let parts: Vec<String> = by_manager
            .iter()
            .map(|(m, v, fs)| {
                let lines: Vec<String> = fs.iter().map(|f| format!("- {f}")).collect();
                format!("conflicts with \"{m}\" using {v}:\n{}", lines.join("\n"))
            })
            .collect();
        s.push_str(&parts.join("\n"));
        s
    };
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(m, v, f)| {
            json!({"type": "FieldManagerConflict", "message": format!("conflict with \"{m}\" using {v}"), "field": f})
        })
        .collect();
    Error::Status {
        code: 409,
        reason: "Conflict",
        message,
        details: Some(json!({"causes": causes})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"app": "web"}},
               "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}},
                                     "spec": {"containers": [{"name": "web", "image": image}]}}}})
    }

    #[test]
    fn field_sets_use_upstream_path_elements() {
        let set = field_set(&deployment(2, "nginx"), None);
        let fields = to_fields_v1(&set);
        let c = &fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"];
        assert_eq!(c, &json!({".": {}, "f:image": {}, "f:name": {}}));
        assert!(fields["f:metadata"].get("f:name").is_none());
        assert_eq!(fields["f:spec"]["f:replicas"], json!({}));
    }

    #[test]
    fn a_second_applier_conflicts_and_force_takes_ownership() {
        let first = apply(None, &deployment(2, "nginx"), "alice", false, None).unwrap();
        // Same values: shared ownership, no conflict.
        let shared = apply(Some(&first), &deployment(2, "nginx"), "bob", false, None).unwrap();
        assert_eq!(entries(&shared).len(), 2);
        let err = apply(Some(&shared), &deployment(5, "nginx"), "bob", false, None).unwrap_err();
        match err {
            Error::Status { code: 409, message, .. } => assert_eq!(
                message,
                "Apply failed with 1 conflict: conflict with \"alice\" using apps/v1: .spec.replicas"
            ),
            other => panic!("{other:?}"),
        }
        let forced = apply(Some(&shared), &deployment(5, "nginx"), "bob", true, None).unwrap();
        assert_eq!(forced["spec"]["replicas"], 5);
        let alice = entries(&forced).into_iter().find(|e| e.manager() == "alice").unwrap();
        assert!(!alice.fields.contains(&vec!["f:spec".to_string(), "f:replicas".to_string()]));
    }

    #[test]
    fn fields_a_manager_stops_applying_are_removed_unless_shared() {
        let mut with_env = deployment(2, "nginx");
        with_env["spec"]["template"]["spec"]["containers"][0]["env"] =
            json!([{"name": "A", "value": "1"}]);
        with_env["metadata"]["labels"]["tier"] = json!("front");
        let first = apply(None, &with_env, "alice", false, None).unwrap();
        let second = apply(Some(&first), &deployment(2, "nginx"), "alice", false, None).unwrap();
        assert!(
            second["spec"]["template"]["spec"]["containers"][0].get("env").is_none(),
            "{second}"
        );
        assert!(second["metadata"]["labels"].get("tier").is_none());
        assert_eq!(second["metadata"]["labels"]["app"], "web");
    }

    #[test]
    fn updates_take_what_they_change() {
        let first = apply(None, &deployment(2, "nginx"), "alice", false, None).unwrap();
        let mut scaled = first.clone();
        scaled["spec"]["replicas"] = json!(4);
        record_update(&mut scaled, Some(&first), "kubectl-scale", None);
        let list = entries(&scaled);
        let scale = list.iter().find(|e| e.manager() == "kubectl-scale").unwrap();
        assert_eq!(scale.fields, [vec!["f:spec".to_string(), "f:replicas".to_string()]].into());
        // Alice re-applying replicas: 2 now conflicts with the scaler.
        assert!(apply(Some(&scaled), &deployment(2, "nginx"), "alice", false, None).is_err());
        // A no-op update changes nothing.
        let mut same = scaled.clone();
        record_update(&mut same, Some(&scaled), "other", None);
        assert_eq!(same, scaled);
    }
}
