//! `kubectl port-forward` on the node: connections to a port inside a pod, carried over
//!
//! * SPDY/3.1 (`portforward.k8s.io`), either on the plain upgraded HTTP connection (`Upgrade:
//!   SPDY/3.1`, kubectl before 1.31) or tunnelled in WebSocket binary messages (subprotocol
//!   `SPDY/3.1+portforward.k8s.io`, kubectl 1.31+). Per forwarded connection the client opens an
//!   error stream and a data stream with the headers `streamtype`, `port` and `requestid`; the
//!   node dials the port in the pod and copies bytes; a failure is written on the error stream.
//! * the WebSocket channel protocol (`v4.channel.k8s.io`, kube-rs's `Api::portforward`): the
//!   ports come in the query, port i gets data channel 2i and error channel 2i+1, and each
//!   channel's first message carries its port (little-endian u16).
//!
//! Process-runtime pods share the node's network, so their ports are dialled on the node's
//! loopback; an OCI pod has its own network namespace and is dialled from inside it.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::spdy::{self, Frame};

/// The subprotocol of port forwarding over SPDY (the `X-Stream-Protocol-Version` header).
pub const PROTOCOL: &str = "portforward.k8s.io";
/// The same, tunnelled through a WebSocket.
pub const WS_SPDY_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

/// How long the two streams of one forwarded connection may arrive apart (upstream: 30 s).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a pod's ports are.
#[derive(Clone, Debug)]
pub struct Target {
    pub pod: String,
    pub uid: String,
    /// The pod's pinned network namespace; `None`: the node's own network.
    pub netns: Option<PathBuf>,
}

impl Target {
    /// A connection to `port` on the pod's loopback (IPv4 first, then IPv6), or the error text
    /// the client is shown.
    pub async fn dial(&self, port: u16) -> Result<TcpStream, String> {
        let r = match &self.netns {
            None => dial_here(port).await,
            Some(ns) => {
                let ns = ns.clone();
                let (tx, rx) = tokio::sync::oneshot::channel();
                // setns(2) changes the calling thread only: a thread of its own enters the
                // namespace, connects, and ends; the socket stays in the pod's network.
                let spawned =
                    std::thread::Builder::new().name("portforward-dial".into()).spawn(move || {
                        let r = (|| {
                            let f = std::fs::File::open(&ns).map_err(|e| {
                                format!("open network namespace {}: {e}", ns.display())
                            })?;
                            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                                .map_err(|e| format!("enter network namespace: {e}"))?;
                            dial_blocking(port)
                        })();
                        let _ = tx.send(r);
                    });
                match spawned {
                    Err(e) => Err(format!("start a thread: {e}")),
                    Ok(_) => match rx.await {
                        Ok(Ok(s)) => s
                            .set_nonblocking(true)
                            .map_err(|e| e.to_string())
                            .and_then(|_| TcpStream::from_std(s).map_err(|e| e.to_string())),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err("the dialling thread ended".into()),
                    },
                }
            }
        };
        r.map_err(|e| {
            let ns = match &self.netns {
                Some(p) => p.display().to_string(),
                None => "host".into(),
            };
            format!(
                "error forwarding port {port} to pod {}, uid {}: failed to connect to localhost:{port} inside namespace \"{ns}\", {e}",
                self.pod, self.uid
            )
        })
    }
}

/// Go's wording of a failed dial, which clients and users know: `dial tcp4 127.0.0.1:80:
/// connect: connection refused`.
fn dial_error(addr: SocketAddr, e: &std::io::Error) -> String {
    let net = if addr.is_ipv4() { "tcp4" } else { "tcp6" };
    let why = match e.raw_os_error() {
        Some(code) => {
            let d = nix::errno::Errno::from_raw(code).desc();
            let mut c = d.chars();
            match c.next() {
                Some(first) => first.to_lowercase().chain(c).collect(),
                None => d.to_string(),
            }
        }
        None if e.kind() == std::io::ErrorKind::TimedOut => "i/o timeout".into(),
        None => e.to_string(),
    };
    format!("dial {net} {addr}: connect: {why}")
}

fn loopbacks(port: u16) -> [SocketAddr; 2] {
    [(Ipv4Addr::LOCALHOST, port).into(), (Ipv6Addr::LOCALHOST, port).into()]
}

async fn dial_here(port: u16) -> Result<TcpStream, String> {
    let [v4, v6] = loopbacks(port);
    let e4 = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(v4)).await {
        Ok(Ok(s)) => return Ok(s),
        Ok(Err(e)) => dial_error(v4, &e),
        Err(_) => dial_error(v4, &std::io::ErrorKind::TimedOut.into()),
    };
    let e6 = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(v6)).await {
        Ok(Ok(s)) => return Ok(s),
        Ok(Err(e)) => dial_error(v6, &e),
        Err(_) => dial_error(v6, &std::io::ErrorKind::TimedOut.into()),
    };
    Err(format!("IPv4: {e4} IPv6 {e6} "))
}

fn dial_blocking(port: u16) -> Result<std::net::TcpStream, String> {
    let [v4, v6] = loopbacks(port);
    let e4 = match std::net::TcpStream::connect_timeout(&v4, DIAL_TIMEOUT) {
        Ok(s) => return Ok(s),
        Err(e) => dial_error(v4, &e),
    };
    let e6 = match std::net::TcpStream::connect_timeout(&v6, DIAL_TIMEOUT) {
        Ok(s) => return Ok(s),
        Err(e) => dial_error(v6, &e),
    };
    Err(format!("IPv4: {e4} IPv6 {e6} "))
}

/// Copies between `sock` and one forwarded connection: `incoming` is what the client sends
/// (closed when it half-closes), `send` carries what the pod answers. Ends when the pod closes
/// its side or `cancel` fires.
async fn pump(
    sock: TcpStream,
    mut incoming: mpsc::Receiver<Bytes>,
    mut send: impl FnMut(Bytes) -> futures::future::BoxFuture<'static, bool>,
    cancel: CancellationToken,
) {
    let (mut rd, mut wr) = sock.into_split();
    let to_pod = async move {
        while let Some(b) = incoming.recv().await {
            if wr.write_all(&b).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
        // Keep the write half (and so the socket) open until the pod is done.
        std::future::pending::<()>().await;
    };
    let from_pod = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if !send(Bytes::copy_from_slice(&buf[..n])).await {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = to_pod => {}
        _ = from_pod => {}
        _ = cancel.cancelled() => {}
    }
}

// ---------------------------------------------------------------------------------------------
// SPDY/3.1

struct StreamIn {
    /// Data the client sends on this stream; dropped when it half-closes.
    tx: Option<mpsc::Sender<Bytes>>,
    /// Fired when the client resets the stream.
    reset: CancellationToken,
}

/// One half of a forwarded connection, waiting for its other half.
struct Half {
    id: u32,
    rx: mpsc::Receiver<Bytes>,
    reset: CancellationToken,
}

#[derive(Default)]
struct Pair {
    port: u16,
    data: Option<Half>,
    error: Option<Half>,
    since: Option<Instant>,
}

/// Serves one SPDY/3.1 port-forward connection until the client goes away.
pub async fn serve_spdy<S>(io: S, target: Arc<Target>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(io);
    let (out, out_rx) = mpsc::channel::<Frame>(64);
    let writer = tokio::spawn(spdy::write_frames(wr, out_rx));
    let mut inflate = spdy::Inflater::new();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut streams: HashMap<u32, StreamIn> = HashMap::new();
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    'conn: loop {
        loop {
            let frame = match spdy::parse(&mut buf, &mut inflate) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("port-forward: bad SPDY frame: {e}");
                    let _ = out.send(Frame::GoAway { last_good_stream_id: 0, status: 1 }).await;
                    break 'conn;
                }
            };
            match frame {
                Frame::SynStream { stream_id, flags, headers, .. } => {
                    let Some((kind, port, request)) = stream_headers(stream_id, &headers) else {
                        let _ = out
                            .send(Frame::RstStream { stream_id, status: spdy::REFUSED_STREAM })
                            .await;
                        continue;
                    };
                    let (tx, rx) = mpsc::channel(64);
                    let reset = CancellationToken::new();
                    let fin = flags & spdy::FLAG_FIN != 0;
                    streams.insert(
                        stream_id,
                        StreamIn { tx: (!fin).then_some(tx), reset: reset.clone() },
                    );
                    let _ =
                        out.send(Frame::SynReply { stream_id, flags: 0, headers: vec![] }).await;
                    let pair = pairs.entry(request.clone()).or_default();
                    pair.since.get_or_insert_with(Instant::now);
                    let slot = if kind == "data" { &mut pair.data } else { &mut pair.error };
                    if slot.is_some() {
                        // A second stream of one type for one request: refuse it.
                        streams.remove(&stream_id);
                        let _ = out
                            .send(Frame::RstStream { stream_id, status: spdy::PROTOCOL_ERROR })
                            .await;
                        continue;
                    }
                    *slot = Some(Half { id: stream_id, rx, reset });
                    if kind == "data" {
                        pair.port = port;
                    }
                    if pair.data.is_some() && pair.error.is_some() {
                        let Some(p) = pairs.remove(&request) else { continue };
                        let (Some(data), Some(error)) = (p.data, p.error) else { continue };
                        tasks.spawn(forward_spdy(target.clone(), p.port, data, error, out.clone()));
                    }
                }
                Frame::Data { stream_id, flags, data } => {
                    if let Some(s) = streams.get_mut(&stream_id) {
                        if !data.is_empty()
                            && let Some(tx) = &s.tx
                            && tx.send(data).await.is_err()
                        {
                            s.tx = None;
                        }
                        if flags & spdy::FLAG_FIN != 0 {
                            s.tx = None;
                        }
                    }
                }
                Frame::RstStream { stream_id, .. } => {
                    if let Some(s) = streams.remove(&stream_id) {
                        s.reset.cancel();
                    }
                }
                // Pings the client starts have odd ids; answer them with the same frame.
                Frame::Ping { id } if id % 2 == 1 => {
                    let _ = out.send(Frame::Ping { id }).await;
                }
                // SETTINGS, WINDOW_UPDATE (no flow control), HEADERS, GOAWAY (streams in
                // progress finish; the client closes the connection after them) and the rest.
                _ => {}
            }
        }
        tokio::select! {
            n = rd.read_buf(&mut buf) => {
                if !matches!(n, Ok(n) if n > 0) {
                    break;
                }
            }
            Some(done) = tasks.join_next() => {
                if let Ok((data_id, error_id)) = done {
                    streams.remove(&data_id);
                    streams.remove(&error_id);
                }
            }
            _ = sweep.tick() => {
                let stale: Vec<String> = pairs
                    .iter()
                    .filter(|(_, p)| p.since.is_some_and(|t| t.elapsed() > STREAM_CREATION_TIMEOUT))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in stale {
                    let Some(p) = pairs.remove(&k) else { continue };
                    if let Some(e) = &p.error {
                        let msg = format!("timed out waiting for the streams of request {k}");
                        let _ = out.send(Frame::Data { stream_id: e.id, flags: 0, data: msg.into() }).await;
                    }
                    for h in [p.data, p.error].into_iter().flatten() {
                        streams.remove(&h.id);
                        let _ = out.send(Frame::Data { stream_id: h.id, flags: spdy::FLAG_FIN, data: Bytes::new() }).await;
                    }
                }
            }
        }
    }
    // The client is gone: every forwarded connection ends with it.
    tasks.abort_all();
    drop(streams);
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// (stream type, port, request id) of a new stream, or `None` when they are missing or invalid.
fn stream_headers(stream_id: u32, h: &spdy::Headers) -> Option<(String, u16, String)> {
    let port: u16 = spdy::header(h, "port")?.parse().ok().filter(|p| *p > 0)?;
    let kind = spdy::header(h, "streamtype")?;
    if kind != "data" && kind != "error" {
        return None;
    }
    // Clients older than request ids send the error stream first and the data stream next,
    // so the data stream's id is the error stream's plus 2.
    let request = match spdy::header(h, "requestid") {
        Some(r) if !r.is_empty() => r.to_string(),
        _ if kind == "error" => format!("legacy-{stream_id}"),
        _ => format!("legacy-{}", stream_id.wrapping_sub(2)),
    };
    Some((kind.to_string(), port, request))
}

/// Forwards one connection: dials the port, copies both ways, reports a failure on the error
/// stream, then closes both streams. Returns the stream ids for the bookkeeping.
async fn forward_spdy(
    target: Arc<Target>,
    port: u16,
    data: Half,
    error: Half,
    out: mpsc::Sender<Frame>,
) -> (u32, u32) {
    let (data_id, error_id) = (data.id, error.id);
    let reset = data.reset.clone();
    let dialled = tokio::select! {
        r = target.dial(port) => Some(r),
        _ = reset.cancelled() => None,
    };
    match dialled {
        Some(Ok(sock)) => {
            let o = out.clone();
            let send = move |b: Bytes| {
                let o = o.clone();
                let fut: futures::future::BoxFuture<'static, bool> = Box::pin(async move {
                    o.send(Frame::Data { stream_id: data_id, flags: 0, data: b }).await.is_ok()
                });
                fut
            };
            pump(sock, data.rx, send, reset).await;
        }
        Some(Err(msg)) => {
            tracing::info!("port-forward: {msg}");
            let _ = out.send(Frame::Data { stream_id: error_id, flags: 0, data: msg.into() }).await;
        }
        None => {}
    }
    for id in [error_id, data_id] {
        let _ = out
            .send(Frame::Data { stream_id: id, flags: spdy::FLAG_FIN, data: Bytes::new() })
            .await;
    }
    drop(error);
    (data_id, error_id)
}

/// SPDY tunnelled in a WebSocket: binary messages are arbitrary slices of the byte stream.
pub async fn serve_spdy_over_websocket(socket: WebSocket, target: Arc<Target>) {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let session = tokio::spawn(serve_spdy(ours, target));
    let (mut rd, mut wr) = tokio::io::split(theirs);
    let (mut tx, mut rx) = socket.split();
    let inbound = async move {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Binary(b) if wr.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(Message::Close(Some(CloseFrame { code: 1000, reason: "".into() }))).await;
    };
    let inbound = tokio::spawn(inbound);
    outbound.await;
    // The session is over; give the client a moment to answer the close.
    let _ = tokio::time::timeout(Duration::from_secs(2), inbound).await;
    let _ = session.await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket channels (v4.channel.k8s.io)

/// The `ports` query parameters (repeatable, each a comma-separated list).
pub fn ports_from_query(raw: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for pair in raw.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "ports" {
            continue;
        }
        let v = v.replace("%2C", ",").replace("%2c", ",");
        if v.is_empty() {
            return Err("query parameter \"port\" cannot be empty".into());
        }
        for p in v.split(',') {
            let port: u16 = p.parse().map_err(|_| format!("unable to parse \"{v}\" as a port"))?;
            if port == 0 {
                return Err(format!("port \"{v}\" must be > 0"));
            }
            ports.push(port);
        }
    }
    if ports.is_empty() {
        return Err("query parameter \"port\" is required".into());
    }
    Ok(ports)
}

pub async fn serve_channels(socket: WebSocket, ports: Vec<u16>, target: Arc<Target>) {
    let (mut tx, mut rx) = socket.split();
    let (out, mut out_rx) = mpsc::channel::<(u8, Bytes)>(64);
    // Every channel first names its port.
    for (i, port) in ports.iter().enumerate() {
        for ch in [2 * i as u8, 2 * i as u8 + 1] {
            let _ = out.send((ch, Bytes::copy_from_slice(&port.to_le_bytes()))).await;
        }
    }
    let writer = tokio::spawn(async move {
        while let Some((ch, b)) = out_rx.recv().await {
            let mut m = Vec::with_capacity(b.len() + 1);
            m.push(ch);
            m.extend_from_slice(&b);
            if tx.send(Message::Binary(m.into())).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Message::Close(Some(CloseFrame { code: 1000, reason: "".into() }))).await;
    });
    let cancel = CancellationToken::new();
    let mut inputs = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let (in_tx, in_rx) = mpsc::channel::<Bytes>(64);
        inputs.push(Some(in_tx));
        let (out, target, cancel) = (out.clone(), target.clone(), cancel.clone());
        tasks.spawn(async move {
            let data = 2 * i as u8;
            match target.dial(port).await {
                Ok(sock) => {
                    let send = move |b: Bytes| {
                        let o = out.clone();
                        let fut: futures::future::BoxFuture<'static, bool> =
                            Box::pin(async move { o.send((data, b)).await.is_ok() });
                        fut
                    };
                    pump(sock, in_rx, send, cancel).await;
                }
                Err(msg) => {
                    let _ = out.send((data + 1, msg.into())).await;
                }
            }
        });
    }
    drop(out);
    let reader = async {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Binary(b) if !b.is_empty() => {
                    let ch = b[0] as usize;
                    if ch.is_multiple_of(2)
                        && let Some(Some(tx)) = inputs.get(ch / 2)
                        && b.len() > 1
                        && tx.send(b.slice(1..)).await.is_err()
                    {
                        inputs[ch / 2] = None;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    tokio::select! {
        _ = reader => cancel.cancel(),
        _ = async { while tasks.join_next().await.is_some() {} } => {}
    }
    tasks.abort_all();
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> spdy::Headers {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn stream_headers_are_checked() {
        let ok = h(&[("streamtype", "data"), ("port", "8080"), ("requestid", "3")]);
        assert_eq!(stream_headers(5, &ok), Some(("data".into(), 8080, "3".into())));
        assert_eq!(stream_headers(5, &h(&[("streamtype", "data"), ("port", "0")])), None);
        assert_eq!(stream_headers(5, &h(&[("streamtype", "data"), ("port", "x")])), None);
        assert_eq!(stream_headers(5, &h(&[("streamtype", "other"), ("port", "1")])), None);
        assert_eq!(stream_headers(5, &h(&[("port", "1")])), None);
        // Without request ids, error stream n and data stream n+2 belong together.
        let e = stream_headers(1, &h(&[("streamtype", "error"), ("port", "1")])).unwrap();
        let d = stream_headers(3, &h(&[("streamtype", "data"), ("port", "1")])).unwrap();
        assert_eq!(e.2, d.2);
    }

    #[test]
    fn ports_query() {
        assert_eq!(ports_from_query("ports=80%2C1234").unwrap(), vec![80, 1234]);
        assert_eq!(ports_from_query("&ports=80&ports=81,82").unwrap(), vec![80, 81, 82]);
        assert!(ports_from_query("").is_err());
        assert!(ports_from_query("ports=0").is_err());
        assert!(ports_from_query("ports=http").is_err());
    }

    #[test]
    fn dial_errors_read_like_go() {
        let e = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(
            dial_error("127.0.0.1:9".parse().unwrap(), &e),
            "dial tcp4 127.0.0.1:9: connect: connection refused"
        );
        assert_eq!(
            dial_error("[::1]:9".parse().unwrap(), &e),
            "dial tcp6 [::1]:9: connect: connection refused"
        );
    }

    /// A client built from the frame codec drives the session over an in-memory pipe against
    /// a real listener on loopback: two forwarded connections, then a port nobody listens on.
    #[tokio::test]
    async fn spdy_session_forwards_and_reports_dial_errors() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let _ = s
                        .write_all(
                            format!("echo:{}", String::from_utf8_lossy(&buf[..n])).as_bytes(),
                        )
                        .await;
                });
            }
        });
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let target = Arc::new(Target { pod: "web".into(), uid: "u1".into(), netns: None });
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve_spdy(server, target));
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut deflate = spdy::Deflater::new();
        let mut inflate = spdy::Inflater::new();
        let mut inbuf = BytesMut::new();
        let mut next_id = 1u32;
        for (req, p, payload) in [("0", port, "hello"), ("1", port, "again"), ("2", closed, "x")] {
            let (eid, did) = (next_id, next_id + 2);
            next_id += 4;
            let mut b = BytesMut::new();
            for (id, kind) in [(eid, "error"), (did, "data")] {
                let headers =
                    h(&[("streamtype", kind), ("port", &p.to_string()), ("requestid", req)]);
                spdy::encode(
                    &Frame::SynStream {
                        stream_id: id,
                        associated_to: 0,
                        priority: 0,
                        flags: 0,
                        headers,
                    },
                    &mut deflate,
                    &mut b,
                );
            }
            spdy::encode(
                &Frame::Data { stream_id: eid, flags: spdy::FLAG_FIN, data: Bytes::new() },
                &mut deflate,
                &mut b,
            );
            spdy::encode(&Frame::Ping { id: 1 }, &mut deflate, &mut b);
            spdy::encode(
                &Frame::Data {
                    stream_id: did,
                    flags: 0,
                    data: Bytes::copy_from_slice(payload.as_bytes()),
                },
                &mut deflate,
                &mut b,
            );
            wr.write_all(&b).await.unwrap();
            // Read until both streams are finished.
            let (mut data, mut err) = (Vec::new(), Vec::new());
            let (mut data_fin, mut err_fin, mut replies, mut pong) = (false, false, 0, false);
            while !(data_fin && err_fin) {
                while let Some(f) = spdy::parse(&mut inbuf, &mut inflate).unwrap() {
                    match f {
                        Frame::SynReply { stream_id, .. }
                            if stream_id == eid || stream_id == did =>
                        {
                            replies += 1
                        }
                        Frame::Ping { id: 1 } => pong = true,
                        Frame::Data { stream_id, flags, data: d } => {
                            let fin = flags & spdy::FLAG_FIN != 0;
                            if stream_id == did {
                                data.extend_from_slice(&d);
                                data_fin |= fin;
                            }
                            if stream_id == eid {
                                err.extend_from_slice(&d);
                                err_fin |= fin;
                            }
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                if data_fin && err_fin {
                    break;
                }
                let n = tokio::time::timeout(Duration::from_secs(10), rd.read_buf(&mut inbuf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "session closed early");
            }
            assert_eq!(replies, 2);
            assert!(pong);
            if p == port {
                assert_eq!(String::from_utf8_lossy(&data), format!("echo:{payload}"));
                assert!(err.is_empty());
            } else {
                let msg = String::from_utf8_lossy(&err);
                assert!(
                    msg.starts_with(&format!("error forwarding port {closed} to pod web, uid u1:")),
                    "{msg}"
                );
                assert!(msg.contains("connection refused"), "{msg}");
            }
        }
    }
}
