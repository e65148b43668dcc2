//! The API server's side of `kubectl logs`, `kubectl exec`, `kubectl attach` and
//! `kubectl port-forward`: find the pod's node, then relay the request to that node's kubelet
//! (an HTTP stream for logs; for exec, attach and port-forward a WebSocket relayed message by
//! message, or a plain SPDY/3.1 upgrade relayed byte for byte).

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use http::StatusCode;
use rkube_api::resources;
use serde_json::Value;
use tokio_tungstenite::tungstenite;

use crate::registry::Registry;
use crate::{Error, Result};

/// `http://<InternalIP>:<kubelet port>` of the node running `pod`, and the pod itself.
async fn kubelet_of(reg: &Registry, ns: &str, pod: &str) -> Result<(String, Value)> {
    let pods =
        resources::find("", "v1", "pods").ok_or_else(|| Error::internal("no pods resource"))?;
    let nodes =
        resources::find("", "v1", "nodes").ok_or_else(|| Error::internal("no nodes resource"))?;
    let p = reg.get(pods, Some(ns), pod).await?;
    let Some(node_name) = p["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) else {
        return Err(Error::bad_request(format!("pod {pod} does not have a host assigned")));
    };
    let node = reg.get(nodes, None, node_name).await?;
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"].as_u64().unwrap_or(0);
    let ip = node["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str())
        .unwrap_or("127.0.0.1")
        .to_string();
    if port == 0 {
        return Err(Error::status(
            503,
            "ServiceUnavailable",
            format!("the kubelet of node {node_name} does not serve logs or exec"),
        ));
    }
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip };
    Ok((format!("{host}:{port}"), p))
}

fn default_container(p: &Value, q: &HashMap<String, String>) -> Result<String> {
    if let Some(c) = q.get("container").filter(|c| !c.is_empty()) {
        // Upstream checks the name against every kind of container the pod has.
        let known = ["containers", "initContainers", "ephemeralContainers"].iter().any(|kind| {
            p["spec"][kind].as_array().into_iter().flatten().any(|x| x["name"] == c.as_str())
        });
        if !known {
            return Err(Error::bad_request(format!(
                "container {c} is not valid for pod {}",
                p["metadata"]["name"].as_str().unwrap_or("")
            )));
        }
        return Ok(c.clone());
    }
    let cs: Vec<&str> = p["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    match cs.as_slice() {
        [one] => Ok(one.to_string()),
        _ => Err(Error::bad_request(format!(
            "a container name must be specified for pod {}, choose one of: [{}]",
            p["metadata"]["name"].as_str().unwrap_or(""),
            cs.join(" ")
        ))),
    }
}

pub async fn logs(
    reg: &Registry,
    ns: &str,
    pod: &str,
    q: &HashMap<String, String>,
    raw_query: &str,
) -> Result<Response> {
    let (addr, p) = kubelet_of(reg, ns, pod).await?;
    let container = default_container(&p, q)?;
    let uri = format!("http://{addr}/containerLogs/{ns}/{pod}/{container}?{raw_query}");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Body>();
    let req =
        http::Request::get(&uri).body(Body::empty()).map_err(|e| Error::internal(e.to_string()))?;
    let resp = client.request(req).await.map_err(|e| {
        Error::status(
            503,
            "ServiceUnavailable",
            format!("connecting to the kubelet at {addr}: {e}"),
        )
    })?;
    let (parts, body) = resp.into_parts();
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = parts.status;
    let ct = if parts.status.is_success() { "text/plain" } else { "application/json" };
    out.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ct));
    Ok(out)
}

/// `exec` and `attach`: upgrades the client's request to a WebSocket and relays frames to and
/// from the kubelet's handler of the same name.
pub async fn exec(
    reg: &Registry,
    ns: &str,
    pod: &str,
    sub: &str,
    req: http::Request<Body>,
    raw_query: &str,
    q: &HashMap<String, String>,
) -> Result<Response> {
    let (mut parts, _body) = req.into_parts();
    let upgrade = header_tokens(&parts.headers, "upgrade");
    if upgrade.iter().any(|u| u == "spdy/3.1") {
        // kubectl before 1.30: the upgraded connection is relayed to the kubelet as it is.
        let (addr, p) = kubelet_of(reg, ns, pod).await?;
        let container = default_container(&p, q)?;
        let path = format!("/{sub}/{ns}/{pod}/{container}?{raw_query}");
        return relay_spdy(&addr, &path, parts).await;
    }
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(_) => return Err(Error::bad_request("Upgrade request required")),
    };
    let (addr, p) = kubelet_of(reg, ns, pod).await?;
    let container = default_container(&p, q)?;
    let ws = ws.protocols([
        "v5.channel.k8s.io",
        "v4.channel.k8s.io",
        "v3.channel.k8s.io",
        "v2.channel.k8s.io",
        "channel.k8s.io",
    ]);
    let protocol = ws
        .selected_protocol()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("v4.channel.k8s.io")
        .to_string();
    let url = format!("ws://{addr}/{sub}/{ns}/{pod}/{container}?{raw_query}");
    let upstream = connect_kubelet(&addr, &url, &protocol).await?;
    Ok(relay(ws, upstream))
}

type KubeletSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket to the kubelet at `url` speaking `protocol`.
async fn connect_kubelet(addr: &str, url: &str, protocol: &str) -> Result<KubeletSocket> {
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(url)
        .map_err(|e| Error::internal(e.to_string()))?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_str(protocol).map_err(|e| Error::internal(e.to_string()))?,
    );
    let (upstream, _) = tokio_tungstenite::connect_async(request).await.map_err(|e| {
        Error::status(
            503,
            "ServiceUnavailable",
            format!("connecting to the kubelet at {addr}: {e}"),
        )
    })?;
    Ok(upstream)
}

/// Completes the client's upgrade and relays messages both ways until either side closes.
fn relay(ws: WebSocketUpgrade, upstream: KubeletSocket) -> Response {
    ws.on_upgrade(move |client| async move {
        let (mut up_tx, mut up_rx) = upstream.split();
        let (mut cl_tx, mut cl_rx) = client.split();
        let to_kubelet = async move {
            while let Some(Ok(m)) = cl_rx.next().await {
                let m = match m {
                    Message::Binary(b) => tungstenite::Message::Binary(b.to_vec().into()),
                    Message::Text(t) => tungstenite::Message::Text(t.as_str().to_string().into()),
                    Message::Close(_) => break,
                    _ => continue,
                };
                if up_tx.send(m).await.is_err() {
                    break;
                }
            }
            let _ = up_tx.close().await;
        };
        let to_client = async {
            while let Some(Ok(m)) = up_rx.next().await {
                let m = match m {
                    tungstenite::Message::Binary(b) => Message::Binary(b.to_vec().into()),
                    tungstenite::Message::Text(t) => Message::Text(t.as_str().to_string().into()),
                    tungstenite::Message::Close(_) => break,
                    _ => continue,
                };
                if cl_tx.send(m).await.is_err() {
                    break;
                }
            }
            let _ = cl_tx
                .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                    code: 1000,
                    reason: "".into(),
                })))
                .await;
        };
        // Everything the kubelet sends (the exit status last) must reach the client, so the
        // client-to-kubelet direction runs beside it and stops only when that one is done.
        let upstream_task = tokio::spawn(to_kubelet);
        to_client.await;
        upstream_task.abort();
    })
    .into_response()
}

/// The comma-separated, lower-cased values of header `name`.
fn header_tokens(h: &http::HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect()
}

/// `kubectl port-forward`: the client's upgraded connection is carried through to the pod's
/// kubelet unchanged — a WebSocket (SPDY tunnelled in it, or port-forward channels) relayed
/// message by message with the negotiated subprotocol, or a plain `Upgrade: SPDY/3.1`
/// connection relayed byte for byte after the kubelet has agreed to it.
pub async fn portforward(
    reg: &Registry,
    ns: &str,
    pod: &str,
    req: http::Request<Body>,
    raw_query: &str,
) -> Result<Response> {
    let (mut parts, _body) = req.into_parts();
    let upgrade = header_tokens(&parts.headers, "upgrade");
    if upgrade.iter().any(|u| u == "websocket") {
        let ws = WebSocketUpgrade::from_request_parts(&mut parts, &())
            .await
            .map_err(|e| Error::bad_request(e.body_text()))?;
        let ws =
            ws.protocols(["SPDY/3.1+portforward.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"]);
        let Some(protocol) =
            ws.selected_protocol().and_then(|v| v.to_str().ok()).map(str::to_string)
        else {
            return Err(Error::bad_request(
                "port-forward over a WebSocket needs the subprotocol SPDY/3.1+portforward.k8s.io or v4.channel.k8s.io",
            ));
        };
        let (addr, _) = kubelet_of(reg, ns, pod).await?;
        let url = format!("ws://{addr}/portForward/{ns}/{pod}?{raw_query}");
        let upstream = connect_kubelet(&addr, &url, &protocol).await?;
        return Ok(relay(ws, upstream));
    }
    if !upgrade.iter().any(|u| u == "spdy/3.1") {
        return Err(Error::bad_request("Upgrade request required"));
    }
    let (addr, _) = kubelet_of(reg, ns, pod).await?;
    relay_spdy(&addr, &format!("/portForward/{ns}/{pod}?{raw_query}"), parts).await
}

/// A plain `Upgrade: SPDY/3.1` request (exec, attach, port-forward of kubectl before 1.30/1.31):
/// asks the kubelet at `addr` for the same upgrade on `path` with the client's subprotocols and,
/// once it agrees, relays the two upgraded connections byte for byte. A refusal goes back as it
/// is.
async fn relay_spdy(addr: &str, path: &str, mut parts: http::request::Parts) -> Result<Response> {
    let unavailable = |e: &dyn std::fmt::Display| {
        Error::status(
            503,
            "ServiceUnavailable",
            format!("connecting to the kubelet at {addr}: {e}"),
        )
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| unavailable(&e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| unavailable(&e))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut up = http::Request::builder()
        .method(parts.method.clone())
        .uri(path)
        .header(http::header::HOST, addr)
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::UPGRADE, "SPDY/3.1");
    for v in parts.headers.get_all("x-stream-protocol-version") {
        up = up.header("x-stream-protocol-version", v);
    }
    let up = up.body(Body::empty()).map_err(|e| Error::internal(e.to_string()))?;
    let mut resp = sender.send_request(up).await.map_err(|e| unavailable(&e))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The kubelet's refusal (a Status, or a protocol mismatch) goes back as it is.
        let (rp, body) = resp.into_parts();
        let mut out = Response::new(Body::new(body));
        *out.status_mut() = rp.status;
        for name in [
            http::header::CONTENT_TYPE,
            http::HeaderName::from_static("x-accepted-stream-protocol-versions"),
        ] {
            if let Some(v) = rp.headers.get(&name) {
                out.headers_mut().insert(name, v.clone());
            }
        }
        return Ok(out);
    }
    let Some(client_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(Error::internal("the client connection cannot be upgraded"));
    };
    let kubelet_upgrade = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let (Ok(client), Ok(kubelet)) = (client_upgrade.await, kubelet_upgrade.await) else {
            return;
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut kubelet = hyper_util::rt::TokioIo::new(kubelet);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut kubelet).await;
    });
    let mut out = Response::new(Body::empty());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for name in ["connection", "upgrade", "x-stream-protocol-version"] {
        if let Some(v) = resp.headers().get(name) {
            out.headers_mut().insert(http::HeaderName::from_static(name), v.clone());
        }
    }
    Ok(out)
}

pub fn unsupported(sub: &str) -> Response {
    let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("the {sub} subresource is not supported by rkube yet"), "reason": "MethodNotAllowed", "code": 405});
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}
