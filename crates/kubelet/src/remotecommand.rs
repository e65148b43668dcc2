//! The transports of `kubectl exec` and `kubectl attach`. One session (a process or an attached
//! container, see `server`) talks to the client through [`Transport`], which either protocol
//! provides:
//!
//! * WebSocket channels (`v5.channel.k8s.io`, `v4.channel.k8s.io`): every message starts with
//!   its channel — 0 stdin, 1 stdout, 2 stderr, 3 the final status, 4 terminal resizes, and in
//!   v5 255 to close a channel (the client's end of stdin).
//! * SPDY/3.1 (`Upgrade: SPDY/3.1`, kubectl before 1.30): the subprotocol is negotiated with the
//!   `X-Stream-Protocol-Version` header (v4, v3 or v2 `.channel.k8s.io`); the client then opens
//!   one stream per channel, each named by its `streamType` header (error, stdin, stdout, stderr,
//!   resize). The session starts once every stream the query asks for is open. Stdin ends with
//!   the stream's FIN; the resize stream carries JSON `{"Width":…,"Height":…}` objects; at the end
//!   the error stream carries the status (v4: a `Status` object, so the client learns the exit
//!   code; v2/v3: the failure's message, nothing on success) and every stream is finished.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use crate::spdy::{self, Frame};

/// The WebSocket subprotocols of exec and attach, preferred first.
pub const WS_PROTOCOLS: [&str; 3] = ["v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"];
/// The SPDY subprotocols of exec and attach (upstream's order: the first the client names wins).
pub const SPDY_PROTOCOLS: [&str; 3] =
    ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io"];

/// How long the client may take to open its streams (upstream's default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a finished session waits for the client to close the connection.
const LINGER: Duration = Duration::from_secs(5);

/// What the client sends.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    Stdin(Bytes),
    /// The client closed its stdin.
    StdinEnd,
    Resize {
        width: u16,
        height: u16,
    },
    /// The client went away.
    Gone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// The client side of one exec or attach session.
pub trait Transport: Send + 'static {
    /// The next input; cancel-safe (may be raced in `select!`). `Gone` once the client is.
    fn recv(&mut self) -> impl Future<Output = Input> + Send;
    /// Sends output; false when the client is gone.
    fn send(&mut self, to: Output, data: &[u8]) -> impl Future<Output = bool> + Send;
    /// Ends the session with `status` (a v1 `Status`, Success or Failure) and closes.
    fn finish(self, status: Value) -> impl Future<Output = ()> + Send;
}

/// A terminal size from the client, as JSON `{"Width": w, "Height": h}`.
fn size(v: &Value) -> Option<(u16, u16)> {
    let w = v["Width"].as_u64()?;
    let h = v["Height"].as_u64()?;
    Some((u16::try_from(w).ok()?, u16::try_from(h).ok()?))
}

// ---------------------------------------------------------------------------------------------
// WebSocket channels

pub struct Ws(pub WebSocket);

impl Transport for Ws {
    async fn recv(&mut self) -> Input {
        loop {
            match self.0.recv().await {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => match b[0] {
                    0 => return Input::Stdin(b.slice(1..)),
                    4 => {
                        let v = serde_json::from_slice::<Value>(&b[1..]).unwrap_or_default();
                        if let Some((width, height)) = size(&v) {
                            return Input::Resize { width, height };
                        }
                    }
                    255 if b.get(1) == Some(&0) => return Input::StdinEnd,
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Input::Gone,
                _ => {}
            }
        }
    }

    fn send(&mut self, to: Output, data: &[u8]) -> impl Future<Output = bool> + Send {
        let mut m = Vec::with_capacity(data.len() + 1);
        m.push(if to == Output::Stdout { 1 } else { 2 });
        m.extend_from_slice(data);
        async move { self.0.send(Message::Binary(m.into())).await.is_ok() }
    }

    async fn finish(mut self, status: Value) {
        let mut m = vec![3u8];
        m.extend_from_slice(status.to_string().as_bytes());
        let _ = self.0.send(Message::Binary(m.into())).await;
        // A normal closure: kubectl takes a close without one for an error.
        let _ =
            self.0.send(Message::Close(Some(CloseFrame { code: 1000, reason: "".into() }))).await;
    }
}

// ---------------------------------------------------------------------------------------------
// SPDY/3.1

/// An upgrade request for exec or attach, in either protocol.
pub enum Upgrade {
    Ws(WebSocketUpgrade),
    Spdy(SpdyUpgrade),
}

pub struct SpdyUpgrade {
    on_upgrade: hyper::upgrade::OnUpgrade,
    protocol: &'static str,
}

/// The comma-separated values of header `name`, trimmed, empty ones left out.
fn tokens(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()});
    (code, axum::Json(body)).into_response()
}

/// Upstream's SPDY subprotocol handshake: the first protocol the client names that the server
/// speaks; naming none is an error, naming only unknown ones a 403 listing the server's.
fn negotiate(h: &HeaderMap) -> Result<&'static str, Response> {
    let offered = tokens(h, "x-stream-protocol-version");
    if offered.is_empty() {
        return Err(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "unable to upgrade: X-Stream-Protocol-Version is required".into(),
        ));
    }
    if let Some(p) = offered.iter().find_map(|o| SPDY_PROTOCOLS.iter().find(|p| **p == o)) {
        return Ok(p);
    }
    let mut r = (
        StatusCode::FORBIDDEN,
        format!(
            "unable to upgrade: unable to negotiate protocol: client supports [{}], server accepts [{}]",
            offered.join(" "),
            SPDY_PROTOCOLS.join(" ")
        ),
    )
        .into_response();
    for p in SPDY_PROTOCOLS {
        r.headers_mut().append("x-accepted-stream-protocol-versions", HeaderValue::from_static(p));
    }
    Err(r)
}

impl Upgrade {
    /// The upgrade `req` asks for: a WebSocket, or SPDY/3.1 with a subprotocol both sides speak.
    pub async fn from_request(req: axum::extract::Request) -> Result<Upgrade, Response> {
        let (mut parts, _body) = req.into_parts();
        let upgrade: Vec<String> =
            tokens(&parts.headers, "upgrade").iter().map(|u| u.to_ascii_lowercase()).collect();
        if upgrade.iter().any(|u| u == "websocket") {
            let ws = WebSocketUpgrade::from_request_parts(&mut parts, &())
                .await
                .map_err(IntoResponse::into_response)?;
            return Ok(Upgrade::Ws(ws.protocols(WS_PROTOCOLS)));
        }
        let connection: Vec<String> =
            tokens(&parts.headers, "connection").iter().map(|c| c.to_ascii_lowercase()).collect();
        if !upgrade.iter().any(|u| u == "spdy/3.1") || !connection.iter().any(|c| c == "upgrade") {
            return Err(status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "Upgrade request required".into(),
            ));
        }
        let protocol = negotiate(&parts.headers)?;
        let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "unable to upgrade: the connection cannot be taken over".into(),
            ));
        };
        Ok(Upgrade::Spdy(SpdyUpgrade { on_upgrade, protocol }))
    }
}

/// The streams a session needs besides the error stream (which every session has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl SpdyUpgrade {
    /// Answers 101 and, on the upgraded connection, waits for the client's streams and runs
    /// `session` on them.
    pub fn serve<F, Fut>(self, wanted: Wanted, session: F) -> Response
    where
        F: FnOnce(Spdy) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let SpdyUpgrade { on_upgrade, protocol } = self;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(up) => {
                    let io = hyper_util::rt::TokioIo::new(up);
                    if let Some(t) = Spdy::accept(io, protocol, wanted).await {
                        session(t).await;
                    }
                }
                Err(e) => tracing::debug!("exec/attach upgrade: {e}"),
            }
        });
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("SPDY/3.1"));
        h.insert("x-stream-protocol-version", HeaderValue::from_static(protocol));
        r
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Error,
    Stdin,
    Stdout,
    Stderr,
    Resize,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "error" => Kind::Error,
            "stdin" => Kind::Stdin,
            "stdout" => Kind::Stdout,
            "stderr" => Kind::Stderr,
            "resize" => Kind::Resize,
            _ => return None,
        })
    }
}

/// What the connection's reader reports to the session.
enum Event {
    Opened(Kind, u32),
    Input(Input),
}

/// One exec or attach session on a SPDY connection.
pub struct Spdy {
    /// 2, 3 or 4 (`v4.channel.k8s.io`): how the final status is written.
    version: u8,
    events: mpsc::Receiver<Event>,
    /// Input that came before the last stream was open.
    early: VecDeque<Input>,
    out: mpsc::Sender<Frame>,
    error: u32,
    stdout: Option<u32>,
    stderr: Option<u32>,
    reader: AbortOnDropHandle<()>,
    writer: AbortOnDropHandle<()>,
}

impl Spdy {
    /// Starts the connection's reader and writer and waits until the client has opened the
    /// streams `wanted` names (and the error stream); `None` when it does not in time or leaves.
    async fn accept<S>(io: S, protocol: &str, wanted: Wanted) -> Option<Spdy>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let version = match protocol {
            "v4.channel.k8s.io" => 4,
            "v3.channel.k8s.io" => 3,
            _ => 2,
        };
        let (rd, wr) = tokio::io::split(io);
        let (out, out_rx) = mpsc::channel::<Frame>(64);
        let writer = AbortOnDropHandle::new(tokio::spawn(spdy::write_frames(wr, out_rx)));
        let (events_tx, mut events) = mpsc::channel(64);
        let reader =
            AbortOnDropHandle::new(tokio::spawn(read_frames(rd, out.downgrade(), events_tx)));
        // Upstream: a terminal has no stderr, and v2 has no resize stream.
        let mut need = vec![Kind::Error];
        for (on, kind) in [
            (wanted.stdin, Kind::Stdin),
            (wanted.stdout, Kind::Stdout),
            (wanted.stderr && !wanted.tty, Kind::Stderr),
            (wanted.tty && version >= 3, Kind::Resize),
        ] {
            if on {
                need.push(kind);
            }
        }
        let mut opened: HashMap<Kind, u32> = HashMap::new();
        let mut early = VecDeque::new();
        let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
        while !need.iter().all(|k| opened.contains_key(k)) {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(Event::Opened(kind, id))) => {
                    opened.insert(kind, id);
                }
                Ok(Some(Event::Input(i))) => early.push_back(i),
                Ok(None) => return None,
                Err(_) => {
                    tracing::info!(
                        "exec/attach: timed out waiting for the client to create streams"
                    );
                    return None;
                }
            }
        }
        Some(Spdy {
            version,
            events,
            early,
            out,
            error: opened[&Kind::Error],
            stdout: opened.get(&Kind::Stdout).copied(),
            stderr: opened.get(&Kind::Stderr).copied(),
            reader,
            writer,
        })
    }
}

/// Reads the client's frames: answers new streams and pings, and turns stdin, its end and
/// resizes into events. Ends when the connection does.
async fn read_frames<R: AsyncRead + Unpin>(
    mut rd: R,
    out: mpsc::WeakSender<Frame>,
    events: mpsc::Sender<Event>,
) {
    let mut inflate = spdy::Inflater::new();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut kinds: HashMap<u32, Kind> = HashMap::new();
    let mut resize = Vec::new();
    // Sends a frame while the session still writes; after it finished, nothing is answered.
    let reply = |f: Frame| {
        let out = out.upgrade();
        async move {
            if let Some(out) = out {
                let _ = out.send(f).await;
            }
        }
    };
    // Events are dropped once the session no longer listens (it finished).
    let event = |e: Event| {
        let events = events.clone();
        async move {
            let _ = events.send(e).await;
        }
    };
    loop {
        loop {
            let frame = match spdy::parse(&mut buf, &mut inflate) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("exec/attach: bad SPDY frame: {e}");
                    reply(Frame::GoAway { last_good_stream_id: 0, status: spdy::PROTOCOL_ERROR })
                        .await;
                    return;
                }
            };
            match frame {
                Frame::SynStream { stream_id, flags, headers, .. } => {
                    let kind = spdy::header(&headers, "streamtype").and_then(Kind::parse);
                    let Some(kind) = kind else {
                        // Upstream refuses a stream without a type and ignores unknown types.
                        if spdy::header(&headers, "streamtype").is_none_or(str::is_empty) {
                            reply(Frame::RstStream { stream_id, status: spdy::REFUSED_STREAM })
                                .await;
                        } else {
                            reply(Frame::SynReply { stream_id, flags: 0, headers: vec![] }).await;
                        }
                        continue;
                    };
                    reply(Frame::SynReply { stream_id, flags: 0, headers: vec![] }).await;
                    kinds.insert(stream_id, kind);
                    event(Event::Opened(kind, stream_id)).await;
                    if kind == Kind::Stdin && flags & spdy::FLAG_FIN != 0 {
                        event(Event::Input(Input::StdinEnd)).await;
                    }
                }
                Frame::Data { stream_id, flags, data } => {
                    let fin = flags & spdy::FLAG_FIN != 0;
                    match kinds.get(&stream_id) {
                        Some(Kind::Stdin) => {
                            if !data.is_empty() {
                                event(Event::Input(Input::Stdin(data))).await;
                            }
                            if fin {
                                event(Event::Input(Input::StdinEnd)).await;
                            }
                        }
                        Some(Kind::Resize) => {
                            resize.extend_from_slice(&data);
                            for (width, height) in sizes(&mut resize) {
                                event(Event::Input(Input::Resize { width, height })).await;
                            }
                        }
                        _ => {}
                    }
                    if fin {
                        kinds.remove(&stream_id);
                    }
                }
                Frame::RstStream { stream_id, .. }
                    if kinds.get(&stream_id) == Some(&Kind::Stdin) =>
                {
                    kinds.remove(&stream_id);
                    event(Event::Input(Input::StdinEnd)).await;
                }
                // Pings the client starts have odd ids; answer them with the same frame.
                Frame::Ping { id } if id % 2 == 1 => reply(Frame::Ping { id }).await,
                // SETTINGS, WINDOW_UPDATE (no flow control), HEADERS, GOAWAY and the rest.
                _ => {}
            }
        }
        if !matches!(rd.read_buf(&mut buf).await, Ok(n) if n > 0) {
            return;
        }
    }
}

/// The terminal sizes complete in `buf` (a stream of JSON objects), taken off its front; what
/// is not valid JSON is dropped.
fn sizes(buf: &mut Vec<u8>) -> Vec<(u16, u16)> {
    let mut found = Vec::new();
    let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
    let used = loop {
        match it.next() {
            Some(Ok(v)) => found.extend(size(&v)),
            Some(Err(e)) if e.is_eof() => break it.byte_offset(),
            Some(Err(_)) => break buf.len(),
            None => break buf.len(),
        }
    };
    buf.drain(..used);
    found
}

impl Transport for Spdy {
    async fn recv(&mut self) -> Input {
        if let Some(i) = self.early.pop_front() {
            return i;
        }
        loop {
            match self.events.recv().await {
                Some(Event::Input(i)) => return i,
                // A stream opened after the session started is answered and ignored.
                Some(Event::Opened(..)) => {}
                None => return Input::Gone,
            }
        }
    }

    fn send(&mut self, to: Output, data: &[u8]) -> impl Future<Output = bool> + Send {
        let id = if to == Output::Stdout { self.stdout } else { self.stderr };
        let data = Bytes::copy_from_slice(data);
        async move {
            match id {
                Some(stream_id) => {
                    self.out.send(Frame::Data { stream_id, flags: 0, data }).await.is_ok()
                }
                // The client did not ask for this stream.
                None => true,
            }
        }
    }

    async fn finish(self, status: Value) {
        let Spdy { version, events, out, error, stdout, stderr, reader, writer, .. } = self;
        drop(events);
        let fin = |stream_id| Frame::Data { stream_id, flags: spdy::FLAG_FIN, data: Bytes::new() };
        for id in [stdout, stderr].into_iter().flatten() {
            let _ = out.send(fin(id)).await;
        }
        let payload = if version >= 4 {
            status.to_string()
        } else if status["status"] == "Success" {
            String::new()
        } else {
            status["message"].as_str().unwrap_or("error executing command").to_string()
        };
        if !payload.is_empty() {
            let _ =
                out.send(Frame::Data { stream_id: error, flags: 0, data: payload.into() }).await;
        }
        let _ = out.send(fin(error)).await;
        // The writer sends what is queued and shuts the connection's writing side; the
        // client then closes it, which the reader sees.
        drop(out);
        let _ = tokio::time::timeout(LINGER, writer).await;
        let _ = tokio::time::timeout(LINGER, reader).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn resize_objects_may_arrive_in_pieces() {
        let mut buf = br#"{"Width":80,"Height":24}{"Width":1"#.to_vec();
        assert_eq!(sizes(&mut buf), vec![(80, 24)]);
        buf.extend_from_slice(b"00,\"Height\":50}\n");
        assert_eq!(sizes(&mut buf), vec![(100, 50)]);
        assert!(sizes(&mut buf).is_empty());
        // Garbage is dropped, not kept forever.
        buf.extend_from_slice(b"nonsense");
        assert!(sizes(&mut buf).is_empty());
        assert!(buf.is_empty());
        // Values that are no size are skipped.
        buf.extend_from_slice(br#"{"Width":-1,"Height":2} {"Width":3,"Height":4}"#);
        assert_eq!(sizes(&mut buf), vec![(3, 4)]);
    }

    fn headers(kind: &str) -> spdy::Headers {
        vec![("streamtype".to_string(), kind.to_string())]
    }

    /// A client made from the frame codec: opens the streams, sends stdin and a resize, and
    /// reads what the session writes, over an in-memory pipe.
    #[tokio::test]
    async fn spdy_session_waits_for_streams_and_writes_the_status_last() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let wanted = Wanted { stdin: true, stdout: true, stderr: false, tty: true };
        let session = tokio::spawn(async move {
            let mut t = Spdy::accept(server, "v4.channel.k8s.io", wanted).await.unwrap();
            let mut got = Vec::new();
            loop {
                match t.recv().await {
                    Input::StdinEnd => break,
                    Input::Gone => panic!("client gone"),
                    i => got.push(i),
                }
            }
            assert!(t.send(Output::Stdout, b"out").await);
            // No stderr stream with a terminal: dropped, not an error.
            assert!(t.send(Output::Stderr, b"err").await);
            t.finish(serde_json::json!({"metadata": {}, "status": "Success"})).await;
            got
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut deflate = spdy::Deflater::new();
        let mut b = BytesMut::new();
        // A stream without a type is refused; an unknown type is answered and ignored.
        for (id, kind) in
            [(1, "error"), (3, "stdin"), (5, "stdout"), (7, ""), (9, "other"), (11, "resize")]
        {
            let headers = if kind.is_empty() { vec![] } else { headers(kind) };
            let f = Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers,
            };
            spdy::encode(&f, &mut deflate, &mut b);
        }
        for f in [
            Frame::Data { stream_id: 1, flags: spdy::FLAG_FIN, data: Bytes::new() },
            Frame::Ping { id: 1 },
            Frame::Data { stream_id: 11, flags: 0, data: Bytes::from_static(br#"{"Width":90,"#) },
            Frame::Data { stream_id: 11, flags: 0, data: Bytes::from_static(b"\"Height\":30}\n") },
            Frame::Data { stream_id: 3, flags: 0, data: Bytes::from_static(b"typed") },
            Frame::Data { stream_id: 3, flags: spdy::FLAG_FIN, data: Bytes::new() },
        ] {
            spdy::encode(&f, &mut deflate, &mut b);
        }
        wr.write_all(&b).await.unwrap();
        let mut inflate = spdy::Inflater::new();
        let mut inbuf = BytesMut::new();
        let mut frames = Vec::new();
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), rd.read_buf(&mut inbuf))
                .await
                .unwrap()
                .unwrap();
            while let Some(f) = spdy::parse(&mut inbuf, &mut inflate).unwrap() {
                frames.push(f);
            }
            if n == 0 {
                break;
            }
        }
        // The client closes its side too; the session then ends.
        wr.shutdown().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), session).await.unwrap().unwrap();
        assert_eq!(
            got,
            vec![
                Input::Resize { width: 90, height: 30 },
                Input::Stdin(Bytes::from_static(b"typed"))
            ]
        );
        let replies: Vec<u32> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::SynReply { stream_id, .. } => Some(*stream_id),
                _ => None,
            })
            .collect();
        assert_eq!(replies, vec![1, 3, 5, 9, 11]);
        assert!(frames.contains(&Frame::RstStream { stream_id: 7, status: spdy::REFUSED_STREAM }));
        assert!(frames.contains(&Frame::Ping { id: 1 }));
        let data: Vec<(u32, u8, Bytes)> = frames
            .into_iter()
            .filter_map(|f| match f {
                Frame::Data { stream_id, flags, data } => Some((stream_id, flags, data)),
                _ => None,
            })
            .collect();
        assert_eq!(
            data,
            vec![
                (5, 0, Bytes::from_static(b"out")),
                (5, spdy::FLAG_FIN, Bytes::new()),
                (1, 0, Bytes::from_static(br#"{"metadata":{},"status":"Success"}"#)),
                (1, spdy::FLAG_FIN, Bytes::new()),
            ]
        );
    }

    #[tokio::test]
    async fn v3_writes_only_a_failure_message_and_a_client_that_leaves_gets_no_session() {
        // v3: a failure is its message on the error stream.
        let (client, server) = tokio::io::duplex(64 * 1024);
        let wanted = Wanted { stdin: false, stdout: true, stderr: true, tty: false };
        let session = tokio::spawn(async move {
            let t = Spdy::accept(server, "v3.channel.k8s.io", wanted).await.unwrap();
            t.finish(serde_json::json!({"status": "Failure", "message": "boom"})).await;
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut deflate = spdy::Deflater::new();
        let mut b = BytesMut::new();
        for (id, kind) in [(1, "error"), (3, "stdout"), (5, "stderr")] {
            let f = Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: headers(kind),
            };
            spdy::encode(&f, &mut deflate, &mut b);
        }
        wr.write_all(&b).await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut all))
            .await
            .unwrap()
            .unwrap();
        drop((rd, wr));
        session.await.unwrap();
        let mut inflate = spdy::Inflater::new();
        let mut inbuf = BytesMut::from(&all[..]);
        let mut error = Vec::new();
        while let Some(f) = spdy::parse(&mut inbuf, &mut inflate).unwrap() {
            if let Frame::Data { stream_id: 1, data, .. } = f {
                error.extend_from_slice(&data);
            }
        }
        assert_eq!(error, b"boom");

        // A client that leaves before opening its streams: no session.
        let (client, server) = tokio::io::duplex(1024);
        drop(client);
        assert!(Spdy::accept(server, "v4.channel.k8s.io", wanted).await.is_none());
    }

    #[test]
    fn negotiation_follows_the_clients_order() {
        let mut h = HeaderMap::new();
        assert_eq!(negotiate(&h).unwrap_err().status(), StatusCode::BAD_REQUEST);
        h.append("x-stream-protocol-version", HeaderValue::from_static("v4.channel.k8s.io"));
        h.append("x-stream-protocol-version", HeaderValue::from_static("v3.channel.k8s.io"));
        assert_eq!(negotiate(&h).unwrap(), "v4.channel.k8s.io");
        let mut h = HeaderMap::new();
        h.insert("x-stream-protocol-version", HeaderValue::from_static("v9, v2.channel.k8s.io"));
        assert_eq!(negotiate(&h).unwrap(), "v2.channel.k8s.io");
        let mut h = HeaderMap::new();
        h.insert("x-stream-protocol-version", HeaderValue::from_static("channel.k8s.io"));
        let r = negotiate(&h).unwrap_err();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.headers().get_all("x-accepted-stream-protocol-versions").iter().count(), 3);
    }
}
