//! The control socket of a running `rkube up`: `rkube node crash|restore`, `rkube status` and
//! `rkube down` talk to the cluster process through it, one JSON request and answer per line.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Status,
    Crash { node: String },
    Restore { node: String },
    Add { node: String, extended_resources: Vec<String> },
    Snapshot { path: String },
    Stop,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Answer {
    pub fn ok(message: impl Into<String>) -> Self {
        Answer { ok: true, message: message.into(), status: None }
    }
    pub fn err(message: impl Into<String>) -> Self {
        Answer { ok: false, message: message.into(), status: None }
    }
}

/// What `rkube status` prints: the cluster's components and nodes as the cluster process sees them.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Status {
    pub ready: bool,
    pub server: String,
    pub data_dir: String,
    pub runtime: String,
    pub pid: u32,
    pub components: Vec<ComponentStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComponentStatus {
    pub name: String,
    pub healthy: bool,
    pub detail: String,
}

/// Sends one request and waits (bounded) for its answer.
pub async fn call(socket: &Path, request: &Request) -> Result<Answer> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!("no rkube cluster is running (no socket at {})", socket.display())
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    let mut answer = String::new();
    let mut reader = BufReader::new(read);
    tokio::time::timeout(Duration::from_secs(60), reader.read_line(&mut answer))
        .await
        .context("the cluster did not answer within 60 s")??;
    if answer.is_empty() {
        bail!("the cluster closed the control connection without an answer");
    }
    Ok(serde_json::from_str(&answer)?)
}

/// Binds the socket, replacing a stale one left by a process that died.
pub async fn bind(socket: &Path) -> Result<UnixListener> {
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            bail!(
                "another rkube cluster is already running here (socket {} answers)",
                socket.display()
            );
        }
        std::fs::remove_file(socket)?;
    }
    UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))
}

/// Reads one request line from an accepted connection and writes the handler's answer.
pub async fn serve_one<F, Fut>(stream: UnixStream, handler: F) -> Result<()>
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Answer>,
{
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(64 * 1024);
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await??;
    let answer = match serde_json::from_str::<Request>(&line) {
        Ok(request) => handler(request).await,
        Err(e) => Answer::err(format!("malformed control request: {e}")),
    };
    let mut out = serde_json::to_string(&answer)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_tagged_json_object() {
        let r = Request::Crash { node: "rkube-worker-1".into() };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"op":"crash","node":"rkube-worker-1"}"#);
        assert_eq!(serde_json::from_str::<Request>(r#"{"op":"stop"}"#).unwrap(), Request::Stop);
    }

    #[tokio::test]
    async fn a_request_round_trips_through_the_socket_and_garbage_gets_an_error() {
        let dir = std::env::temp_dir().join(format!("rkube-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let listener = bind(&sock).await.unwrap();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (s, _) = listener.accept().await.unwrap();
                serve_one(s, |req| async move {
                    match req {
                        Request::Crash { node } => Answer::ok(format!("crashed {node}")),
                        _ => Answer::err("no"),
                    }
                })
                .await
                .unwrap();
            }
        });
        let a = call(&sock, &Request::Crash { node: "n1".into() }).await.unwrap();
        assert!(a.ok);
        assert_eq!(a.message, "crashed n1");
        let mut raw = UnixStream::connect(&sock).await.unwrap();
        raw.write_all(b"{not json\n").await.unwrap();
        let mut buf = String::new();
        BufReader::new(raw).read_line(&mut buf).await.unwrap();
        let a: Answer = serde_json::from_str(&buf).unwrap();
        assert!(!a.ok && a.message.contains("malformed"));
        server.await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
