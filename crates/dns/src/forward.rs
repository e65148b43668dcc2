//! Names outside the cluster zone: the client's query relayed as-is to the host's resolvers
//! (UDP, then TCP when the answer was truncated), and their answer relayed back.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::{Error, Result};

pub(crate) struct Forwarder {
    upstreams: Vec<SocketAddr>,
    /// Per upstream and attempt: each upstream is tried once, in order.
    timeout: Duration,
}

impl Forwarder {
    pub(crate) fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Forwarder {
        Forwarder { upstreams, timeout }
    }

    /// The upstream's raw answer to `packet` (whose question is `query`), with the client's ID.
    /// `tcp`: the client asked over TCP, so ask over TCP too (it can take any size).
    pub(crate) async fn forward(&self, packet: &[u8], query: &Query, tcp: bool) -> Result<Vec<u8>> {
        let [id_hi, id_lo, ..] = *packet else { return Err(Error::Upstream("short query".into())) };
        // A fresh random ID (and, per query, a fresh source port) upstream, so an off-path
        // attacker cannot guess its way into our answers by knowing the client's ID.
        let id: u16 = rand::random();
        let mut out = packet.to_vec();
        out[..2].copy_from_slice(&id.to_be_bytes());

        let mut last = Error::Upstream("no upstream resolvers configured".into());
        for upstream in &self.upstreams {
            let attempt = async {
                if !tcp {
                    let raw = udp_exchange(*upstream, &out, id, query).await?;
                    let truncated = raw.get(2).is_some_and(|f| f & 0x02 != 0);
                    if !truncated {
                        return Ok(raw);
                    }
                    // Truncated: the full answer over TCP, or, failing that, the truncated
                    // one (the client will retry over TCP itself).
                    return Ok(tcp_exchange(*upstream, &out, id, query).await.unwrap_or(raw));
                }
                tcp_exchange(*upstream, &out, id, query).await
            };
            match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(mut raw)) => {
                    raw[0] = id_hi;
                    raw[1] = id_lo;
                    return Ok(raw);
                }
                Ok(Err(e)) => last = e,
                Err(_) => last = Error::Upstream(format!("{upstream}: timed out")),
            }
            tracing::debug!(%upstream, "forward: {last}");
        }
        Err(last)
    }
}

/// Whether `raw` is the answer to our query: a response with our ID and our question.
/// Anything else (late answers to earlier queries, spoofing attempts) is ignored.
fn matches(raw: &[u8], id: u16, query: &Query) -> bool {
    let Ok(m) = Message::from_vec(raw) else { return false };
    m.metadata.id == id
        && m.metadata.message_type == hickory_proto::op::MessageType::Response
        && m.queries.first().is_some_and(|q| {
            same_name(q.name(), query.name())
                && q.query_type() == query.query_type()
                && q.query_class() == query.query_class()
        })
}

fn same_name(a: &hickory_proto::rr::Name, b: &hickory_proto::rr::Name) -> bool {
    let norm =
        |n: &hickory_proto::rr::Name| n.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    norm(a) == norm(b)
}

async fn udp_exchange(upstream: SocketAddr, out: &[u8], id: u16, query: &Query) -> Result<Vec<u8>> {
    let local: IpAddr = match upstream {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let io = |e: std::io::Error| Error::Upstream(format!("{upstream} (udp): {e}"));
    let socket = UdpSocket::bind((local, 0)).await.map_err(io)?;
    // Connected: the kernel drops datagrams from any other address.
    socket.connect(upstream).await.map_err(io)?;
    socket.send(out).await.map_err(io)?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = socket.recv(&mut buf).await.map_err(io)?;
        if matches(&buf[..n], id, query) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp_exchange(upstream: SocketAddr, out: &[u8], id: u16, query: &Query) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| Error::Upstream(format!("{upstream} (tcp): {e}"));
    let mut stream = TcpStream::connect(upstream).await.map_err(io)?;
    let len = u16::try_from(out.len()).map_err(|_| Error::Upstream("query too long".into()))?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(out);
    stream.write_all(&framed).await.map_err(io)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await.map_err(io)?;
    if !matches(&buf, id, query) {
        return Err(Error::Upstream(format!("{upstream} (tcp): answer does not match the query")));
    }
    Ok(buf)
}
