//! Names outside the cluster zone: the client's query relayed as-is to the host's resolvers
//! (UDP, then TCP when the answer was truncated), and their answer relayed back, with a short
//! cache in front (as CoreDNS's default `cache 30`): with `ndots:5` every external lookup from
//! a pod fans out over the search list, so the same questions repeat.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::{Error, Result};

/// Answers kept at most this long, whatever their TTL.
const CACHE_TTL_MAX: Duration = Duration::from_secs(30);
/// Cached answers at most; when full, new answers are not cached until old ones expire.
const CACHE_ENTRIES_MAX: usize = 10_000;

pub(crate) struct Forwarder {
    upstreams: Vec<SocketAddr>,
    /// Per upstream and attempt: each upstream is tried once, in order.
    timeout: Duration,
    cache: Cache,
}

impl Forwarder {
    pub(crate) fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Forwarder {
        Forwarder { upstreams, timeout, cache: Cache::default() }
    }

    /// The answer to `request` (`packet` raw), from the cache or an upstream, with the
    /// client's ID. `tcp`: the client asked over TCP, so ask over TCP too (any size fits).
    pub(crate) async fn forward(
        &self,
        packet: &[u8],
        request: &Message,
        tcp: bool,
    ) -> Result<Vec<u8>> {
        let Some(query) = request.queries.first() else {
            return Err(Error::Upstream("no question".into()));
        };
        let key = CacheKey::of(request, query);
        if let Some(hit) = self.cache.get(&key, request) {
            return Ok(hit);
        }
        let raw = self.exchange(packet, query, tcp).await?;
        self.cache.put(key, &raw);
        Ok(raw)
    }

    async fn exchange(&self, packet: &[u8], query: &Query, tcp: bool) -> Result<Vec<u8>> {
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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    name: String,
    qtype: RecordType,
    qclass: u16,
    /// Clients asking for DNSSEC records, or for unchecked answers, get answers of their own.
    dnssec_ok: bool,
    checking_disabled: bool,
}

impl CacheKey {
    fn of(request: &Message, query: &Query) -> CacheKey {
        CacheKey {
            name: query.name().to_ascii().to_ascii_lowercase(),
            qtype: query.query_type(),
            qclass: u16::from(query.query_class()),
            dnssec_ok: request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
            checking_disabled: request.metadata.checking_disabled,
        }
    }
}

struct CacheEntry {
    response: Message,
    stored: Instant,
    ttl: Duration,
}

#[derive(Default)]
struct Cache {
    entries: Mutex<HashMap<CacheKey, CacheEntry>>,
}

impl Cache {
    /// A cached answer re-addressed to `request`: its ID, its question (with its letter
    /// case, which some clients check), and the TTLs counted down by the time spent cached.
    fn get(&self, key: &CacheKey, request: &Message) -> Option<Vec<u8>> {
        let mut response = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let entry = entries.get(key)?;
            let age = entry.stored.elapsed();
            if age >= entry.ttl {
                entries.remove(key);
                return None;
            }
            let mut response = entry.response.clone();
            let age = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
            for r in response
                .answers
                .iter_mut()
                .chain(response.authorities.iter_mut())
                .chain(response.additionals.iter_mut())
            {
                r.ttl = r.ttl.saturating_sub(age);
            }
            response
        };
        response.metadata.id = request.metadata.id;
        response.queries = request.queries.clone();
        // OPT answers OPT: only a client that sent one gets one (RFC 6891 §6.1.1).
        response.edns = match request.edns {
            Some(_) => Some(response.edns.unwrap_or_default()),
            None => None,
        };
        response.to_vec().ok()
    }

    /// Keeps `raw` for its TTL (capped): positive answers for their smallest TTL, negative ones
    /// (NXDOMAIN, no data) for the SOA's negative TTL; truncated, failed or SOA-less negative
    /// answers are not kept.
    fn put(&self, key: CacheKey, raw: &[u8]) {
        let Ok(response) = Message::from_vec(raw) else { return };
        if response.metadata.truncation {
            return;
        }
        let ttl = match response.metadata.response_code {
            ResponseCode::NoError if !response.answers.is_empty() => {
                response.answers.iter().map(|r| r.ttl).min()
            }
            ResponseCode::NoError | ResponseCode::NXDomain => {
                response.authorities.iter().find_map(|r| match &r.data {
                    RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                    _ => None,
                })
            }
            _ => None,
        };
        let ttl = Duration::from_secs(u64::from(ttl.unwrap_or(0))).min(CACHE_TTL_MAX);
        if ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CACHE_ENTRIES_MAX {
            entries.retain(|_, e| e.stored.elapsed() < e.ttl);
            if entries.len() >= CACHE_ENTRIES_MAX {
                return;
            }
        }
        entries.insert(key, CacheEntry { response, stored: Instant::now(), ttl });
    }
}
