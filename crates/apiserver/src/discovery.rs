//! Discovery: `/api`, `/apis`, per-version resource lists, and aggregated discovery (v2 and
//! v2beta1) so kubectl learns every resource, short name and verb in one round trip.

use rkube_api::resources::{self, ResourceInfo};
use serde_json::{Value, json};

fn sub_kind(
    r: &ResourceInfo,
    sub: &str,
) -> (&'static str, &'static str, &'static str, Vec<&'static str>) {
    // (group, version, kind, verbs)
    match sub {
        "status" => (r.group, r.version, r.kind, vec!["get", "patch", "update"]),
        "scale" => ("autoscaling", "v1", "Scale", vec!["get", "patch", "update"]),
        "binding" => ("", "v1", "Binding", vec!["create"]),
        "eviction" => ("policy", "v1", "Eviction", vec!["create"]),
        "log" => ("", "v1", "Pod", vec!["get"]),
        "exec" => ("", "v1", "PodExecOptions", vec!["create", "get"]),
        "attach" => ("", "v1", "PodAttachOptions", vec!["create", "get"]),
        "portforward" => ("", "v1", "PodPortForwardOptions", vec!["create", "get"]),
        "proxy" if r.plural == "nodes" => {
            ("", "v1", "NodeProxyOptions", vec!["create", "delete", "get", "patch", "update"])
        }
        "proxy" => {
            ("", "v1", "ServiceProxyOptions", vec!["create", "delete", "get", "patch", "update"])
        }
        "finalize" => ("", "v1", "Namespace", vec!["update"]),
        "token" => ("authentication.k8s.io", "v1", "TokenRequest", vec!["create"]),
        _ => (r.group, r.version, r.kind, vec!["get"]),
    }
}

pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

pub fn api_group_list() -> Value {
    let groups: Vec<Value> = resources::groups()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, versions)| group_json(g, &versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn group_json(g: &str, versions: &[&str]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": vs,
        "preferredVersion": {"groupVersion": format!("{g}/{}", versions[0]), "version": versions[0]},
    })
}

pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let list: Vec<&ResourceInfo> =
        resources::RESOURCES.iter().filter(|r| r.group == group && r.version == version).collect();
    if list.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for r in list {
        let mut res = json!({
            "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": r.verbs,
        });
        if !r.short_names.is_empty() {
            res["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            res["categories"] = json!(r.categories);
        }
        out.push(res);
        for sub in r.subresources {
            let (g, v, kind, verbs) = sub_kind(r, sub);
            let mut s = json!({
                "name": format!("{}/{sub}", r.plural), "singularName": "", "namespaced": r.namespaced,
                "kind": kind, "verbs": verbs,
            });
            if g != r.group || v != r.version {
                s["group"] = json!(g);
                s["version"] = json!(v);
            }
            out.push(s);
        }
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}),
    )
}

/// `APIGroupDiscoveryList` for `/api` (core only) or `/apis` (every named group), in the
/// apidiscovery version the client asked for (`v2` or `v2beta1`).
pub fn aggregated(core: bool, version: &str) -> Value {
    let mut items = Vec::new();
    for (g, versions) in resources::groups() {
        if g.is_empty() != core {
            continue;
        }
        let vs: Vec<Value> = versions
            .iter()
            .map(|v| {
                let res: Vec<Value> = resources::RESOURCES
                    .iter()
                    .filter(|r| r.group == g && r.version == *v)
                    .map(|r| {
                        let subs: Vec<Value> = r
                            .subresources
                            .iter()
                            .map(|s| {
                                let (sg, sv, kind, verbs) = sub_kind(r, s);
                                json!({"subresource": s, "responseKind": {"group": sg, "version": sv, "kind": kind}, "verbs": verbs})
                            })
                            .collect();
                        let mut e = json!({
                            "resource": r.plural,
                            "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
                            "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                            "singularResource": r.singular,
                            "verbs": r.verbs,
                        });
                        if !r.short_names.is_empty() {
                            e["shortNames"] = json!(r.short_names);
                        }
                        if !r.categories.is_empty() {
                            e["categories"] = json!(r.categories);
                        }
                        if !subs.is_empty() {
                            e["subresources"] = json!(subs);
                        }
                        e
                    })
                    .collect();
                json!({"version": v, "resources": res, "freshness": "Current"})
            })
            .collect();
        items.push(json!({"metadata": {"name": g, "creationTimestamp": null}, "versions": vs}));
    }
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {},
        "items": items,
    })
}

/// Which aggregated discovery version an Accept header asks for, if any.
pub fn wants_aggregated(accept: &str) -> Option<&'static str> {
    for part in accept.split(',') {
        let p = part.replace(' ', "");
        if p.contains("as=APIGroupDiscoveryList") && p.contains("g=apidiscovery.k8s.io") {
            if p.contains("v=v2beta1") {
                return Some("v2beta1");
            }
            if p.contains("v=v2") {
                return Some("v2");
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregated_discovery_answers_in_the_first_version_the_client_lists() {
        let a = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(wants_aggregated(a), Some("v2"));
        assert_eq!(
            wants_aggregated(
                "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
            ),
            Some("v2beta1")
        );
        assert_eq!(wants_aggregated("application/json"), None);
        let core = aggregated(true, "v2");
        assert_eq!(core["items"][0]["versions"][0]["version"], "v1");
    }
}
