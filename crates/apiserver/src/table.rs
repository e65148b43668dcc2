//! Server-side printing: turns objects into `meta.k8s.io/v1` Tables with upstream's columns, so
//! `kubectl get` prints the same table it prints against Kubernetes.

use jiff::Timestamp;
use serde_json::{Value, json};

/// Upstream's `duration.HumanDuration`: "5s", "3m20s", "4h", "2d3h", "400d", "3y10d".
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let s = secs.max(0);
    let (m, h) = (s / 60, s / 3600);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 { format!("{m}m") } else { format!("{m}m{}s", s % 60) }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 { format!("{h}h") } else { format!("{h}h{}m", m % 60) }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 { format!("{}d", h / 24) } else { format!("{}d{}h", h / 24, h % 24) }
    } else if h < 24 * 365 * 2 {
        format!("{}d", h / 24)
    } else if h < 24 * 365 * 8 {
        let y = h / (24 * 365);
        let d = (h / 24) - y * 365;
        if d == 0 { format!("{y}y") } else { format!("{y}y{d}d") }
    } else {
        format!("{}y", h / (24 * 365))
    }
}

fn age(ts: Option<&Value>) -> String {
    match ts.and_then(Value::as_str).and_then(|s| s.parse::<Timestamp>().ok()) {
        Some(t) => human_duration(Timestamp::now().as_second() - t.as_second()),
        None => "<unknown>".into(),
    }
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    Some(cur)
}

fn str_or<'a>(v: &'a Value, path: &[&str], default: &'a str) -> &'a str {
    s(v, path).and_then(Value::as_str).filter(|x| !x.is_empty()).unwrap_or(default)
}

fn col(name: &str, ty: &str, priority: i64, description: &str) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
}

/// Column definitions for a resource's table.
pub fn columns(plural: &str, group: &str) -> Vec<Value> {
    let c = |n: &str, p: i64| col(n, "string", p, "");
    let name = col("Name", "string", 0, "Name must be unique within a namespace.");
    let age = c("Age", 0);
    match (group, plural) {
        ("", "pods") => vec![
            name,
            c("Ready", 0),
            c("Status", 0),
            col("Restarts", "string", 0, ""),
            age,
            c("IP", 1),
            c("Node", 1),
            c("Nominated Node", 1),
            c("Readiness Gates", 1),
        ],
        ("", "nodes") => vec![
            name,
            c("Status", 0),
            c("Roles", 0),
            age,
            c("Version", 0),
            c("Internal-IP", 1),
            c("External-IP", 1),
            c("OS-Image", 1),
            c("Kernel-Version", 1),
            c("Container-Runtime", 1),
        ],
        ("", "namespaces") => vec![name, c("Status", 0), age],
        ("", "services") => vec![
            name,
            c("Type", 0),
            c("Cluster-IP", 0),
            c("External-IP", 0),
            c("Port(s)", 0),
            age,
            c("Selector", 1),
        ],
        ("", "endpoints") => vec![name, c("Endpoints", 0), age],
        ("", "configmaps") => vec![name, col("Data", "integer", 0, ""), age],
        ("", "secrets") => vec![name, c("Type", 0), col("Data", "integer", 0, ""), age],
        ("", "serviceaccounts") => vec![name, col("Secrets", "integer", 0, ""), age],
        ("", "componentstatuses") => vec![name, c("Status", 0), c("Message", 0), c("Error", 0)],
        ("", "events") | ("events.k8s.io", "events") => vec![
            c("Last Seen", 0),
            c("Type", 0),
            c("Reason", 0),
            c("Object", 0),
            c("Subobject", 1),
            c("Source", 1),
            c("Message", 0),
            c("First Seen", 1),
            col("Count", "integer", 1, ""),
            col("Name", "string", 1, ""),
        ],
        ("apps", "deployments") => vec![
            name,
            c("Ready", 0),
            col("Up-to-date", "integer", 0, ""),
            col("Available", "integer", 0, ""),
            age,
            c("Containers", 1),
            c("Images", 1),
            c("Selector", 1),
        ],
        ("apps", "replicasets") => vec![
            name,
            col("Desired", "integer", 0, ""),
            col("Current", "integer", 0, ""),
            col("Ready", "integer", 0, ""),
            age,
            c("Containers", 1),
            c("Images", 1),
            c("Selector", 1),
        ],
        ("coordination.k8s.io", "leases") => vec![name, c("Holder", 0), age],
        ("apps", "daemonsets") => vec![
            name,
            col("Desired", "integer", 0, ""),
            col("Current", "integer", 0, ""),
            col("Ready", "integer", 0, ""),
            col("Up-to-date", "integer", 0, ""),
            col("Available", "integer", 0, ""),
            c("Node Selector", 0),
            age,
            c("Containers", 1),
            c("Images", 1),
            c("Selector", 1),
        ],
        ("", "replicationcontrollers") => vec![
            name,
            col("Desired", "integer", 0, ""),
            col("Current", "integer", 0, ""),
            col("Ready", "integer", 0, ""),
            age,
            c("Containers", 1),
            c("Images", 1),
            c("Selector", 1),
        ],
        ("scheduling.k8s.io", "priorityclasses") => vec![
            name,
            col("Value", "integer", 0, ""),
            c("Global-Default", 0),
            age,
            c("PreemptionPolicy", 0),
        ],
        ("discovery.k8s.io", "endpointslices") => {
            vec![name, c("AddressType", 0), c("Ports", 0), c("Endpoints", 0), age]
        }
        ("policy", "poddisruptionbudgets") => vec![
            name,
            c("Min Available", 0),
            c("Max Unavailable", 0),
            col("Allowed Disruptions", "integer", 0, ""),
            age,
        ],
        _ => vec![name, age],
    }
}

/// The cells of one object's row, matching `columns`.
pub fn cells(plural: &str, group: &str, o: &Value) -> Vec<Value> {
    let name = json!(str_or(o, &["metadata", "name"], ""));
    let created = s(o, &["metadata", "creationTimestamp"]);
    let age_v = json!(age(created));
    match (group, plural) {
        ("", "pods") => pod_cells(o, name, age_v),
        ("", "nodes") => node_cells(o, name, age_v),
        ("", "namespaces") => vec![name, json!(str_or(o, &["status", "phase"], "")), age_v],
        ("", "services") => service_cells(o, name, age_v),
        ("", "endpoints") => {
            let mut eps = Vec::new();
            for subset in s(o, &["subsets"]).and_then(Value::as_array).into_iter().flatten() {
                let ports: Vec<i64> = subset["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["port"].as_i64())
                    .collect();
                for a in subset["addresses"].as_array().into_iter().flatten() {
                    let ip = a["ip"].as_str().unwrap_or("");
                    if ports.is_empty() {
                        eps.push(ip.to_string());
                    }
                    for p in &ports {
                        eps.push(format!("{ip}:{p}"));
                    }
                }
            }
            let text = if eps.is_empty() {
                "<none>".to_string()
            } else if eps.len() > 3 {
                format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
            } else {
                eps.join(",")
            };
            vec![name, json!(text), age_v]
        }
        ("", "configmaps") => {
            let n = o["data"].as_object().map_or(0, |m| m.len())
                + o["binaryData"].as_object().map_or(0, |m| m.len());
            vec![name, json!(n), age_v]
        }
        ("", "secrets") => {
            let n = o["data"].as_object().map_or(0, |m| m.len());
            vec![name, json!(str_or(o, &["type"], "Opaque")), json!(n), age_v]
        }
        ("", "serviceaccounts") => {
            vec![name, json!(o["secrets"].as_array().map_or(0, |a| a.len())), age_v]
        }
        ("", "componentstatuses") => {
            let cond =
                o["conditions"].as_array().and_then(|a| a.first()).cloned().unwrap_or_default();
            let healthy = cond["status"].as_str() == Some("True");
            vec![
                name,
                json!(if healthy { "Healthy" } else { "Unhealthy" }),
                json!(cond["message"].as_str().unwrap_or("")),
                json!(cond["error"].as_str().unwrap_or("")),
            ]
        }
        ("", "events") | ("events.k8s.io", "events") => event_cells(o, group),
        ("apps", "deployments") => {
            let (containers, images) = containers_images(s(o, &["spec", "template", "spec"]));
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    o["status"]["readyReplicas"].as_i64().unwrap_or(0),
                    o["spec"]["replicas"].as_i64().unwrap_or(0)
                )),
                json!(o["status"]["updatedReplicas"].as_i64().unwrap_or(0)),
                json!(o["status"]["availableReplicas"].as_i64().unwrap_or(0)),
                age_v,
                json!(containers),
                json!(images),
                json!(selector_text(&o["spec"]["selector"])),
            ]
        }
        ("apps", "replicasets") => {
            let (containers, images) = containers_images(s(o, &["spec", "template", "spec"]));
            vec![
                name,
                json!(o["spec"]["replicas"].as_i64().unwrap_or(0)),
                json!(o["status"]["replicas"].as_i64().unwrap_or(0)),
                json!(o["status"]["readyReplicas"].as_i64().unwrap_or(0)),
                age_v,
                json!(containers),
                json!(images),
                json!(selector_text(&o["spec"]["selector"])),
            ]
        }
        ("coordination.k8s.io", "leases") => {
            vec![name, json!(str_or(o, &["spec", "holderIdentity"], "")), age_v]
        }
        ("apps", "daemonsets") => {
            let (containers, images) = containers_images(s(o, &["spec", "template", "spec"]));
            let st = &o["status"];
            let n = |k: &str| json!(st[k].as_i64().unwrap_or(0));
            let node_sel = o["spec"]["template"]["spec"]["nodeSelector"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|x| !x.is_empty())
                .unwrap_or_else(|| "<none>".into());
            vec![
                name,
                n("desiredNumberScheduled"),
                n("currentNumberScheduled"),
                n("numberReady"),
                n("updatedNumberScheduled"),
                n("numberAvailable"),
                json!(node_sel),
                age_v,
                json!(containers),
                json!(images),
                json!(selector_text(&o["spec"]["selector"])),
            ]
        }
        ("", "replicationcontrollers") => {
            let (containers, images) = containers_images(s(o, &["spec", "template", "spec"]));
            let sel = o["spec"]["selector"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                name,
                json!(o["spec"]["replicas"].as_i64().unwrap_or(1)),
                json!(o["status"]["replicas"].as_i64().unwrap_or(0)),
                json!(o["status"]["readyReplicas"].as_i64().unwrap_or(0)),
                age_v,
                json!(containers),
                json!(images),
                json!(sel),
            ]
        }
        ("scheduling.k8s.io", "priorityclasses") => vec![
            name,
            json!(o["value"].as_i64().unwrap_or(0)),
            json!(o["globalDefault"].as_bool().unwrap_or(false).to_string()),
            age_v,
            json!(str_or(o, &["preemptionPolicy"], "PreemptLowerPriority")),
        ],
        ("discovery.k8s.io", "endpointslices") => {
            let ports: Vec<String> = o["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["port"].as_i64().map(|x| x.to_string()))
                .collect();
            let eps: Vec<String> = o["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                .filter_map(|a| a.as_str().map(String::from))
                .collect();
            vec![
                name,
                json!(str_or(o, &["addressType"], "")),
                json!(if ports.is_empty() { "<unset>".into() } else { ports.join(",") }),
                json!(if eps.is_empty() { "<unset>".into() } else { eps.join(",") }),
                age_v,
            ]
        }
        ("policy", "poddisruptionbudgets") => vec![
            name,
            json!(
                o["spec"]["minAvailable"]
                    .as_str()
                    .map(String::from)
                    .or(o["spec"]["minAvailable"].as_i64().map(|i| i.to_string()))
                    .unwrap_or("N/A".into())
            ),
            json!(
                o["spec"]["maxUnavailable"]
                    .as_str()
                    .map(String::from)
                    .or(o["spec"]["maxUnavailable"].as_i64().map(|i| i.to_string()))
                    .unwrap_or("N/A".into())
            ),
            json!(o["status"]["disruptionsAllowed"].as_i64().unwrap_or(0)),
            age_v,
        ],
        _ => vec![name, age_v],
    }
}

fn containers_images(spec: Option<&Value>) -> (String, String) {
    let list = spec.and_then(|s| s["containers"].as_array()).cloned().unwrap_or_default();
    let names: Vec<&str> = list.iter().filter_map(|c| c["name"].as_str()).collect();
    let images: Vec<&str> = list.iter().filter_map(|c| c["image"].as_str()).collect();
    (names.join(","), images.join(","))
}

/// `app=web,tier in (a,b)` as kubectl shows selectors.
pub fn selector_text(sel: &Value) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(m) = sel["matchLabels"].as_object() {
        for (k, v) in m {
            parts.push(format!("{k}={}", v.as_str().unwrap_or("")));
        }
    }
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let key = e["key"].as_str().unwrap_or("");
        let vals: Vec<&str> =
            e["values"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        match e["operator"].as_str().unwrap_or("") {
            "In" => parts.push(format!("{key} in ({})", vals.join(","))),
            "NotIn" => parts.push(format!("{key} notin ({})", vals.join(","))),
            "Exists" => parts.push(key.to_string()),
            "DoesNotExist" => parts.push(format!("!{key}")),
            _ => {}
        }
    }
    if parts.is_empty() { "<none>".into() } else { parts.join(",") }
}

fn pod_cells(o: &Value, name: Value, age_v: Value) -> Vec<Value> {
    let spec_containers = o["spec"]["containers"].as_array().map_or(0, |a| a.len());
    let statuses = o["status"]["containerStatuses"].as_array().cloned().unwrap_or_default();
    let ready = statuses.iter().filter(|c| c["ready"].as_bool() == Some(true)).count();
    let mut restarts: i64 = 0;
    let mut last_restart: Option<Timestamp> = None;
    for c in &statuses {
        restarts += c["restartCount"].as_i64().unwrap_or(0);
        if let Some(t) = c["lastState"]["terminated"]["finishedAt"]
            .as_str()
            .and_then(|t| t.parse::<Timestamp>().ok())
        {
            last_restart = Some(last_restart.map_or(t, |l: Timestamp| l.max(t)));
        }
    }
    let restarts_text = match (restarts, last_restart) {
        (n, Some(t)) if n > 0 => {
            format!("{n} ({} ago)", human_duration(Timestamp::now().as_second() - t.as_second()))
        }
        (n, _) => n.to_string(),
    };
    let node = str_or(o, &["spec", "nodeName"], "<none>");
    let ip = str_or(o, &["status", "podIP"], "<none>");
    let nominated = str_or(o, &["status", "nominatedNodeName"], "<none>");
    let gates = o["spec"]["readinessGates"].as_array().map_or(0, |a| a.len());
    let gates_text = if gates == 0 {
        "<none>".to_string()
    } else {
        let conds = o["status"]["conditions"].as_array().cloned().unwrap_or_default();
        let ok = o["spec"]["readinessGates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|g| {
                conds.iter().any(|c| {
                    c["type"] == g["conditionType"] && c["status"].as_str() == Some("True")
                })
            })
            .count();
        format!("{ok}/{gates}")
    };
    vec![
        name,
        json!(format!("{ready}/{spec_containers}")),
        json!(pod_status_reason(o)),
        json!(restarts_text),
        age_v,
        json!(ip),
        json!(node),
        json!(nominated),
        json!(gates_text),
    ]
}

/// The STATUS column of `kubectl get pods`, computed as upstream's printer does.
pub fn pod_status_reason(o: &Value) -> String {
    let status = &o["status"];
    let mut reason =
        str_or(o, &["status", "reason"], str_or(o, &["status", "phase"], "Pending")).to_string();
    let init_specs = o["spec"]["initContainers"].as_array().map_or(0, |a| a.len());
    let mut initializing = false;
    for (i, c) in status["initContainerStatuses"].as_array().into_iter().flatten().enumerate() {
        let term = &c["state"]["terminated"];
        let waiting = &c["state"]["waiting"];
        if term.is_object() && term["exitCode"].as_i64() == Some(0) {
            continue;
        }
        if c["started"].as_bool() == Some(true) && c["ready"].as_bool() == Some(true) {
            continue; // a running sidecar
        }
        if term.is_object() {
            reason = match term["reason"].as_str() {
                Some(r) if !r.is_empty() => format!("Init:{r}"),
                _ => match term["signal"].as_i64() {
                    Some(sig) if sig != 0 => format!("Init:Signal:{sig}"),
                    _ => format!("Init:ExitCode:{}", term["exitCode"].as_i64().unwrap_or(0)),
                },
            };
        } else if let Some(r) =
            waiting["reason"].as_str().filter(|r| !r.is_empty() && *r != "PodInitializing")
        {
            reason = format!("Init:{r}");
        } else {
            reason = format!("Init:{i}/{init_specs}");
        }
        initializing = true;
        break;
    }
    if !initializing {
        let mut has_running = false;
        for c in status["containerStatuses"].as_array().into_iter().flatten().rev() {
            let waiting = &c["state"]["waiting"];
            let term = &c["state"]["terminated"];
            if let Some(r) = waiting["reason"].as_str().filter(|r| !r.is_empty()) {
                reason = r.to_string();
            } else if term.is_object() {
                reason = match term["reason"].as_str() {
                    Some(r) if !r.is_empty() => r.to_string(),
                    _ => match term["signal"].as_i64() {
                        Some(sig) if sig != 0 => format!("Signal:{sig}"),
                        _ => format!("ExitCode:{}", term["exitCode"].as_i64().unwrap_or(0)),
                    },
                };
            } else if c["ready"].as_bool() == Some(true) && c["state"]["running"].is_object() {
                has_running = true;
            }
        }
        if reason == "Completed" && has_running {
            let ready = status["conditions"].as_array().into_iter().flatten().any(|c| {
                c["type"].as_str() == Some("Ready") && c["status"].as_str() == Some("True")
            });
            reason = if ready { "Running".into() } else { "NotReady".into() };
        }
    }
    if o["metadata"]["deletionTimestamp"].is_string() {
        if status["reason"].as_str() == Some("NodeLost") {
            reason = "Unknown".into();
        } else {
            reason = "Terminating".into();
        }
    }
    reason
}

fn node_cells(o: &Value, name: Value, age_v: Value) -> Vec<Value> {
    let conds = o["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let mut status: Vec<String> = Vec::new();
    match conds.iter().find(|c| c["type"].as_str() == Some("Ready")) {
        Some(c) if c["status"].as_str() == Some("True") => status.push("Ready".into()),
        Some(_) => status.push("NotReady".into()),
        None => status.push("Unknown".into()),
    }
    if o["spec"]["unschedulable"].as_bool() == Some(true) {
        status.push("SchedulingDisabled".into());
    }
    let mut roles: Vec<String> = Vec::new();
    if let Some(labels) = o["metadata"]["labels"].as_object() {
        for (k, v) in labels {
            if let Some(role) = k.strip_prefix("node-role.kubernetes.io/") {
                if !role.is_empty() {
                    roles.push(role.to_string());
                }
            } else if k == "kubernetes.io/role"
                && let Some(r) = v.as_str().filter(|r| !r.is_empty())
            {
                roles.push(r.to_string());
            }
        }
    }
    roles.sort();
    roles.dedup();
    let addr = |t: &str| {
        o["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["type"].as_str() == Some(t))
            .and_then(|a| a["address"].as_str())
            .unwrap_or("<none>")
            .to_string()
    };
    let info = &o["status"]["nodeInfo"];
    let text = |v: &Value| v.as_str().filter(|x| !x.is_empty()).unwrap_or("<unknown>").to_string();
    vec![
        name,
        json!(status.join(",")),
        json!(if roles.is_empty() { "<none>".into() } else { roles.join(",") }),
        age_v,
        json!(info["kubeletVersion"].as_str().unwrap_or("")),
        json!(addr("InternalIP")),
        json!(addr("ExternalIP")),
        json!(text(&info["osImage"])),
        json!(text(&info["kernelVersion"])),
        json!(text(&info["containerRuntimeVersion"])),
    ]
}

fn service_cells(o: &Value, name: Value, age_v: Value) -> Vec<Value> {
    let ty = str_or(o, &["spec", "type"], "ClusterIP");
    let cluster_ip = str_or(o, &["spec", "clusterIP"], "<none>");
    let mut external: Vec<String> = o["spec"]["externalIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    for ing in o["status"]["loadBalancer"]["ingress"].as_array().into_iter().flatten() {
        if let Some(ip) = ing["ip"].as_str().or(ing["hostname"].as_str()) {
            external.push(ip.to_string());
        }
    }
    let external_text = match ty {
        "ExternalName" => str_or(o, &["spec", "externalName"], "<none>").to_string(),
        "LoadBalancer" if external.is_empty() => "<pending>".into(),
        _ if external.is_empty() => "<none>".into(),
        _ => external.join(","),
    };
    let ports: Vec<String> = o["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_i64() {
                Some(np) if np != 0 => format!("{}:{np}/{proto}", p["port"].as_i64().unwrap_or(0)),
                _ => format!("{}/{proto}", p["port"].as_i64().unwrap_or(0)),
            }
        })
        .collect();
    let selector = o["spec"]["selector"]
        .as_object()
        .map(|m| {
            m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>()
        })
        .filter(|v| !v.is_empty())
        .map(|v| v.join(","))
        .unwrap_or_else(|| "<none>".into());
    vec![
        name,
        json!(ty),
        json!(cluster_ip),
        json!(external_text),
        json!(if ports.is_empty() { "<none>".into() } else { ports.join(",") }),
        age_v,
        json!(selector),
    ]
}

fn event_cells(o: &Value, group: &str) -> Vec<Value> {
    let (last, first, count, source, obj) = if group == "events.k8s.io" {
        (
            o.get("deprecatedLastTimestamp")
                .filter(|v| v.is_string())
                .or(o.get("eventTime"))
                .or(o["metadata"].get("creationTimestamp")),
            o.get("deprecatedFirstTimestamp").filter(|v| v.is_string()).or(o.get("eventTime")),
            o["series"]["count"].as_i64().or(o["deprecatedCount"].as_i64()).unwrap_or(1),
            str_or(o, &["reportingController"], ""),
            &o["regarding"],
        )
    } else {
        (
            o.get("lastTimestamp")
                .filter(|v| v.is_string())
                .or(o.get("eventTime").filter(|v| v.is_string()))
                .or(o["metadata"].get("creationTimestamp")),
            o.get("firstTimestamp")
                .filter(|v| v.is_string())
                .or(o.get("eventTime").filter(|v| v.is_string())),
            o["count"].as_i64().or(o["series"]["count"].as_i64()).unwrap_or(1),
            o["source"]["component"]
                .as_str()
                .filter(|s| !s.is_empty())
                .or(o["reportingComponent"].as_str())
                .unwrap_or(""),
            &o["involvedObject"],
        )
    };
    let source_text = match o["source"]["host"].as_str().filter(|h| !h.is_empty()) {
        Some(host) if group != "events.k8s.io" => format!("{source}, {host}"),
        _ => source.to_string(),
    };
    let last_seen =
        if count > 1 { format!("{} (x{count} over {})", age(last), age(first)) } else { age(last) };
    let object = format!(
        "{}/{}",
        obj["kind"].as_str().unwrap_or("").to_lowercase(),
        obj["name"].as_str().unwrap_or("")
    );
    vec![
        json!(last_seen),
        json!(str_or(o, &["type"], "")),
        json!(str_or(o, &["reason"], "")),
        json!(object),
        json!(obj["fieldPath"].as_str().unwrap_or("")),
        json!(source_text),
        json!(o["message"].as_str().or(o["note"].as_str()).unwrap_or("").trim()),
        json!(age(first)),
        json!(count),
        json!(str_or(o, &["metadata", "name"], "")),
    ]
}

/// What a row carries besides its cells (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Include {
        match s {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

pub fn row(plural: &str, group: &str, o: &Value, include: Include) -> Value {
    let mut r = json!({"cells": cells(plural, group, o)});
    match include {
        Include::None => {}
        Include::Metadata => {
            r["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": o["metadata"].clone(),
            })
        }
        Include::Object => r["object"] = o.clone(),
    }
    r
}

/// A whole Table for a list of objects.
pub fn table(
    plural: &str,
    group: &str,
    items: &[Value],
    list_meta: Value,
    include: Include,
    with_columns: bool,
) -> Value {
    let rows: Vec<Value> = items.iter().map(|o| row(plural, group, o, include)).collect();
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "rows": rows,
    });
    if with_columns {
        t["columnDefinitions"] = Value::Array(columns(plural, group));
    } else {
        t["columnDefinitions"] = Value::Array(vec![]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_like_upstream() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 5 * 60), "3h5m");
        assert_eq!(human_duration(10 * 3600), "10h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(400 * 86400), "400d");
    }

    #[test]
    fn pod_status_shows_terminating_and_waiting_reasons() {
        let p = json!({"status": {"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        assert_eq!(pod_status_reason(&p), "CrashLoopBackOff");
        let p = json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}, "status": {"phase": "Running"}});
        assert_eq!(pod_status_reason(&p), "Terminating");
        let p = json!({"status": {"phase": "Succeeded", "containerStatuses": [{"state": {"terminated": {"reason": "Completed", "exitCode": 0}}}]}});
        assert_eq!(pod_status_reason(&p), "Completed");
    }

    #[test]
    fn node_roles_come_from_role_labels() {
        let n = json!({"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}, "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}});
        let c = node_cells(&n, json!("n"), json!("1s"));
        assert_eq!(c[1], json!("NotReady"));
        assert_eq!(c[2], json!("control-plane"));
    }
}
