//! Per-resource rules applied before an object is stored: defaulting, system fields, validation
//! and what an update may change — upstream's "strategy" step, on `serde_json::Value` objects.

use rkube_api::resources::ResourceInfo;
use serde_json::{Value, json};

use crate::{Error, Result};

pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && !s.contains('.') && is_dns1123_subdomain(s)
}

/// Resources whose spec changes bump `metadata.generation`.
fn has_generation(r: &ResourceInfo) -> bool {
    matches!(r.group, "apps" | "policy" | "discovery.k8s.io")
        || matches!(r.plural, "services" | "namespaces" | "nodes")
}

fn kind_name(r: &ResourceInfo) -> &'static str {
    r.kind
}

/// Validates object metadata and names; returns 422 Invalid with upstream's wording.
pub fn validate(r: &ResourceInfo, o: &Value) -> Result<()> {
    let name = o["metadata"]["name"].as_str().unwrap_or("");
    let mut causes: Vec<(String, String)> = Vec::new();
    let name_ok = match r.plural {
        "namespaces" | "services" => is_dns1123_label(name),
        "nodes" | "events" | "leases" | "componentstatuses" => {
            !name.is_empty() && !name.contains('/') && name.len() <= 253
        }
        _ => is_dns1123_subdomain(name),
    };
    if !name_ok {
        let rule = if matches!(r.plural, "namespaces" | "services") {
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        } else {
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        };
        causes.push((
            "metadata.name".into(),
            if name.is_empty() {
                "Required value: name or generateName is required".into()
            } else {
                format!("Invalid value: \"{name}\": {rule}")
            },
        ));
    }
    for (field, map) in
        [("labels", &o["metadata"]["labels"]), ("annotations", &o["metadata"]["annotations"])]
    {
        if !(map.is_null() || map.is_object()) {
            causes.push((format!("metadata.{field}"), "Invalid value: must be a map".into()));
        } else if let Some(m) = map.as_object() {
            for (k, v) in m {
                if !v.is_string() {
                    causes.push((
                        format!("metadata.{field}.{k}"),
                        "Invalid value: must be a string".into(),
                    ));
                }
            }
        }
    }
    match (r.group, r.plural) {
        ("", "pods") => validate_pod_spec(&o["spec"], "spec", &mut causes),
        ("apps", "deployments") | ("apps", "replicasets") | ("apps", "daemonsets") => {
            let sel = &o["spec"]["selector"];
            if !sel.is_object() {
                causes.push(("spec.selector".into(), "Required value".into()));
            } else {
                let selector = crate::selector::LabelSelector::from_object(sel);
                if selector.is_empty() {
                    causes.push((
                        "spec.selector".into(),
                        "Invalid value: empty selector is invalid for deployment".into(),
                    ));
                } else if !selector.matches(&o["spec"]["template"]["metadata"]["labels"]) {
                    causes.push((
                        "spec.template.metadata.labels".into(),
                        format!(
                            "Invalid value: {}: `selector` does not match template `labels`",
                            o["spec"]["template"]["metadata"]["labels"]
                        ),
                    ));
                }
            }
            if o["spec"]["replicas"].as_i64().is_some_and(|n| n < 0) {
                causes.push((
                    "spec.replicas".into(),
                    "Invalid value: must be greater than or equal to 0".into(),
                ));
            }
            validate_pod_spec(&o["spec"]["template"]["spec"], "spec.template.spec", &mut causes);
        }
        _ => {}
    }
    if causes.is_empty() { Ok(()) } else { Err(Error::invalid(kind_name(r), name, causes)) }
}

fn validate_pod_spec(spec: &Value, at: &str, causes: &mut Vec<(String, String)>) {
    let containers = spec["containers"].as_array();
    match containers {
        None => causes.push((format!("{at}.containers"), "Required value".into())),
        Some(list) if list.is_empty() => {
            causes.push((format!("{at}.containers"), "Required value".into()))
        }
        Some(list) => {
            let mut names = std::collections::HashSet::new();
            for (i, c) in list.iter().enumerate() {
                match c["name"].as_str() {
                    Some(n) if is_dns1123_label(n) => {
                        if !names.insert(n.to_string()) {
                            causes.push((format!("{at}.containers[{i}].name"), format!("Duplicate value: \"{n}\"")));
                        }
                    }
                    Some(n) => causes.push((format!("{at}.containers[{i}].name"), format!("Invalid value: \"{n}\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'"))),
                    None => causes.push((format!("{at}.containers[{i}].name"), "Required value".into())),
                }
                if c["image"].as_str().is_none_or(|s| s.trim().is_empty()) {
                    causes.push((format!("{at}.containers[{i}].image"), "Required value".into()));
                }
            }
        }
    }
}

/// Fills system fields and defaults of a new object.
pub fn prepare_create(r: &ResourceInfo, o: &mut Value, default_toleration_seconds: i64) {
    let meta = &mut o["metadata"];
    meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
    meta["creationTimestamp"] = json!(now_rfc3339());
    if let Some(m) = meta.as_object_mut() {
        m.remove("resourceVersion");
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
        m.remove("selfLink");
    }
    if has_generation(r) {
        o["metadata"]["generation"] = json!(1);
    }
    match (r.group, r.plural) {
        ("", "pods") => {
            default_pod_spec(&mut o["spec"]);
            add_default_tolerations(&mut o["spec"], default_toleration_seconds);
            let qos = qos_class(&o["spec"]);
            o["status"] = json!({"phase": "Pending", "qosClass": qos});
            // A gated pod says why it waits (upstream's applySchedulingGatedCondition).
            if o["spec"]["schedulingGates"].as_array().is_some_and(|g| !g.is_empty()) {
                o["status"]["conditions"] = json!([{
                    "type": "PodScheduled", "status": "False", "reason": "SchedulingGated",
                    "message": "Scheduling is blocked due to non-empty scheduling gates",
                    "lastProbeTime": null, "lastTransitionTime": now_rfc3339(),
                }]);
            }
        }
        ("", "namespaces") => {
            o["spec"] = json!({"finalizers": ["kubernetes"]});
            o["status"] = json!({"phase": "Active"});
        }
        ("", "services") => default_service(&mut o["spec"]),
        ("", "nodes") if !o["status"].is_object() => {
            o["status"] = json!({});
        }
        ("", "secrets") => {
            if o["type"].is_null() {
                o["type"] = json!("Opaque");
            }
            // stringData is write-only: folded into data as base64.
            if let Some(sd) = o.get("stringData").and_then(Value::as_object).cloned() {
                use base64::Engine;
                for (k, v) in sd {
                    let b = base64::engine::general_purpose::STANDARD
                        .encode(v.as_str().unwrap_or("").as_bytes());
                    o["data"][k] = json!(b);
                }
                if let Some(m) = o.as_object_mut() {
                    m.remove("stringData");
                }
            }
        }
        ("apps", "deployments") => {
            let spec = &mut o["spec"];
            set_default(spec, "replicas", json!(1));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "progressDeadlineSeconds", json!(600));
            if spec["strategy"]["type"].is_null() {
                spec["strategy"]["type"] = json!("RollingUpdate");
            }
            if spec["strategy"]["type"] == "RollingUpdate" {
                set_default(&mut spec["strategy"]["rollingUpdate"], "maxUnavailable", json!("25%"));
                set_default(&mut spec["strategy"]["rollingUpdate"], "maxSurge", json!("25%"));
            }
            default_pod_spec(&mut spec["template"]["spec"]);
            o["status"] = json!({});
        }
        ("apps", "daemonsets") => {
            if o["spec"]["updateStrategy"]["type"].is_null() {
                o["spec"]["updateStrategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}});
            }
            set_default(&mut o["spec"], "revisionHistoryLimit", json!(10));
            default_pod_spec(&mut o["spec"]["template"]["spec"]);
            o["status"] = json!({"currentNumberScheduled": 0, "desiredNumberScheduled": 0, "numberMisscheduled": 0, "numberReady": 0});
        }
        ("apps", "replicasets") => {
            set_default(&mut o["spec"], "replicas", json!(1));
            default_pod_spec(&mut o["spec"]["template"]["spec"]);
            o["status"] = json!({"replicas": 0});
        }
        ("scheduling.k8s.io", "priorityclasses") => {
            set_default(o, "preemptionPolicy", json!("PreemptLowerPriority"));
        }
        _ => {}
    }
}

fn set_default(obj: &mut Value, key: &str, v: Value) {
    if !obj.is_object() {
        *obj = json!({});
    }
    if obj[key].is_null() {
        obj[key] = v;
    }
}

pub fn default_pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "enableServiceLinks", json!(true));
    for list in ["initContainers", "containers"] {
        if let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs {
                if !c.is_object() {
                    continue;
                }
                set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
                set_default(c, "terminationMessagePolicy", json!("File"));
                set_default(c, "resources", json!({}));
                if c["imagePullPolicy"].is_null() {
                    let image = c["image"].as_str().unwrap_or("");
                    let tag = image.rsplit('/').next().unwrap_or("");
                    let latest =
                        !image.contains('@') && (!tag.contains(':') || tag.ends_with(":latest"));
                    c["imagePullPolicy"] = json!(if latest { "Always" } else { "IfNotPresent" });
                }
                // Limits without requests default the requests, as upstream.
                if let Some(limits) = c["resources"]["limits"].as_object().cloned() {
                    for (k, v) in limits {
                        if c["resources"]["requests"][&k].is_null() {
                            c["resources"]["requests"][&k] = v;
                        }
                    }
                }
                if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports {
                        set_default(p, "protocol", json!("TCP"));
                    }
                }
            }
        }
    }
}

/// DefaultTolerationSeconds admission: pods tolerate a not-ready/unreachable node for a while.
fn add_default_tolerations(spec: &mut Value, seconds: i64) {
    if !spec.is_object() {
        return;
    }
    let mut tols = spec["tolerations"].as_array().cloned().unwrap_or_default();
    for key in ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"] {
        let covered = tols.iter().any(|t| {
            let k = t["key"].as_str().unwrap_or("");
            let op = t["operator"].as_str().unwrap_or("Equal");
            let effect = t["effect"].as_str().unwrap_or("");
            (k == key || (k.is_empty() && op == "Exists"))
                && (effect.is_empty() || effect == "NoExecute")
        });
        if !covered {
            tols.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}));
        }
    }
    spec["tolerations"] = Value::Array(tols);
}

/// Guaranteed, Burstable or BestEffort, from the containers' requests and limits.
pub fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["initContainers"].as_array().into_iter().flatten())
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in &containers {
        let req = &c["resources"]["requests"];
        let lim = &c["resources"]["limits"];
        for res in ["cpu", "memory"] {
            if !req[res].is_null() || !lim[res].is_null() {
                any = true;
            }
            if lim[res].is_null() || (!req[res].is_null() && req[res] != lim[res]) {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn default_service(spec: &mut Value) {
    if !spec.is_object() {
        *spec = json!({});
    }
    set_default(spec, "type", json!("ClusterIP"));
    set_default(spec, "sessionAffinity", json!("None"));
    if spec["type"] != "ExternalName" {
        set_default(spec, "internalTrafficPolicy", json!("Cluster"));
        set_default(spec, "ipFamilies", json!(["IPv4"]));
        set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
    }
    if matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer")) {
        set_default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            set_default(p, "protocol", json!("TCP"));
            if p["targetPort"].is_null() || p["targetPort"] == 0 || p["targetPort"] == "" {
                p["targetPort"] = p["port"].clone();
            }
        }
    }
}

/// Carries over what an update of the main resource may not change; bumps generation.
pub fn prepare_update(r: &ResourceInfo, new: &mut Value, old: &Value) -> Result<()> {
    let name = old["metadata"]["name"].as_str().unwrap_or("");
    for f in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old["metadata"].get(f) {
            Some(v) => new["metadata"][f] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(f);
                }
            }
        }
    }
    if r.subresources.contains(&"status") && r.plural != "nodes" || r.plural == "namespaces" {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    match (r.group, r.plural) {
        ("", "pods") => {
            default_pod_spec(&mut new["spec"]);
            let mut a = new["spec"].clone();
            let mut b = old["spec"].clone();
            for spec in [&mut a, &mut b] {
                for list in ["containers", "initContainers"] {
                    if let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) {
                        for c in cs {
                            if let Some(m) = c.as_object_mut() {
                                m.remove("image");
                            }
                        }
                    }
                }
                if let Some(m) = spec.as_object_mut() {
                    m.remove("activeDeadlineSeconds");
                    m.remove("tolerations");
                    m.remove("schedulingGates");
                }
            }
            // Scheduling gates may only be removed, never added.
            let gates = |v: &Value| -> Vec<String> {
                v["spec"]["schedulingGates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|g| g["name"].as_str().map(String::from))
                    .collect()
            };
            let old_gates = gates(old);
            if let Some(added) = gates(new).into_iter().find(|g| !old_gates.contains(g)) {
                return Err(Error::invalid(
                    "Pod",
                    name,
                    vec![(
                        "spec.schedulingGates".into(),
                        format!(
                            "Forbidden: only deletion is allowed, but found new scheduling gate '{added}'"
                        ),
                    )],
                ));
            }
            if a != b {
                return Err(Error::invalid(
                    "Pod",
                    name,
                    vec![("spec".into(), "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)".into())],
                ));
            }
        }
        ("", "services") => {
            default_service(&mut new["spec"]);
            if new["spec"]["clusterIP"].is_null() || new["spec"]["clusterIP"] == "" {
                new["spec"]["clusterIP"] = old["spec"]["clusterIP"].clone();
                new["spec"]["clusterIPs"] = old["spec"]["clusterIPs"].clone();
            } else if new["spec"]["clusterIP"] != old["spec"]["clusterIP"] {
                return Err(Error::invalid(
                    "Service",
                    name,
                    vec![("spec.clusterIPs[0]".into(), "Invalid value: field is immutable".into())],
                ));
            }
            // Keep allocated node ports the update did not mention, while the type uses them
            // (a change to ClusterIP releases them).
            let uses_node_ports =
                matches!(new["spec"]["type"].as_str(), Some("NodePort" | "LoadBalancer"));
            if uses_node_ports
                && let (Some(nps), Some(ops)) = (
                    new.get_mut("spec")
                        .and_then(|s| s.get_mut("ports"))
                        .and_then(Value::as_array_mut),
                    old["spec"]["ports"].as_array(),
                )
            {
                for p in nps {
                    if p["nodePort"].is_null()
                        && let Some(op) = ops
                            .iter()
                            .find(|op| op["port"] == p["port"] && op["protocol"] == p["protocol"])
                    {
                        p["nodePort"] = op["nodePort"].clone();
                    }
                }
            }
        }
        ("apps", "deployments") | ("apps", "replicasets") | ("apps", "daemonsets") => {
            default_pod_spec(&mut new["spec"]["template"]["spec"]);
        }
        ("", "namespaces") => {
            new["spec"] = old["spec"].clone();
        }
        _ => {}
    }
    if has_generation(r) {
        let gen_now = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let changed = new.get("spec") != old.get("spec")
            || (r.plural == "priorityclasses" && new["value"] != old["value"]);
        new["metadata"]["generation"] = json!(if changed { gen_now + 1 } else { gen_now });
    }
    Ok(())
}

/// A status update changes only `status` (upstream's status strategy).
pub fn prepare_status_update(new: &mut Value, old: &Value) {
    let status = new.get("status").cloned().unwrap_or(Value::Null);
    *new = old.clone();
    new["status"] = status;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> &'static ResourceInfo {
        rkube_api::resources::find("", "v1", "pods").unwrap()
    }

    #[test]
    fn defaulting_a_pod_adds_upstream_defaults_and_no_null_fields() {
        let mut o = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "nginx:1.26"}]}});
        prepare_create(pods(), &mut o, 300);
        let c = &o["spec"]["containers"][0];
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert!(c.get("ports").is_none(), "{c}");
        assert!(o["spec"].get("initContainers").is_none());
        assert_eq!(o["spec"]["tolerations"].as_array().unwrap().len(), 2);
        assert_eq!(o["status"]["qosClass"], "BestEffort");
        validate(pods(), &o).unwrap();
    }

    #[test]
    fn a_pod_without_an_image_is_invalid_with_the_field_path() {
        let o = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}});
        match validate(pods(), &o) {
            Err(Error::Status { code: 422, message, .. }) => {
                assert_eq!(
                    message,
                    "Pod \"p\" is invalid: spec.containers[0].image: Required value"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_gated_pod_says_so_and_its_gates_can_only_be_removed() {
        let mut o = json!({"metadata": {"name": "p"}, "spec": {"schedulingGates": [{"name": "a"}, {"name": "b"}],
            "containers": [{"name": "c", "image": "nginx:1.26"}]}});
        prepare_create(pods(), &mut o, 300);
        let c = &o["status"]["conditions"][0];
        assert_eq!(
            (c["type"].as_str(), c["status"].as_str()),
            (Some("PodScheduled"), Some("False"))
        );
        assert_eq!(c["reason"], "SchedulingGated");
        assert_eq!(c["message"], "Scheduling is blocked due to non-empty scheduling gates");
        let mut fewer = o.clone();
        fewer["spec"]["schedulingGates"] = json!([{"name": "b"}]);
        prepare_update(pods(), &mut fewer, &o).unwrap();
        let mut more = o.clone();
        more["spec"]["schedulingGates"] = json!([{"name": "a"}, {"name": "b"}, {"name": "z"}]);
        match prepare_update(pods(), &mut more, &o) {
            Err(Error::Status { code: 422, message, .. }) => {
                assert!(
                    message.contains("only deletion is allowed, but found new scheduling gate 'z'"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Other spec changes stay forbidden.
        let mut other = o.clone();
        other["spec"]["nodeName"] = json!("n1");
        assert!(prepare_update(pods(), &mut other, &o).is_err());
        let mut plain = json!({"metadata": {"name": "q"}, "spec": {"containers": [{"name": "c", "image": "nginx:1.26"}]}});
        prepare_create(pods(), &mut plain, 300);
        assert!(plain["status"].get("conditions").is_none());
    }
}
