//! The wire side: UDP and TCP listeners, hostile-input-safe parsing, and the answer to each
//! query, from the in-memory zone or relayed from an upstream resolver.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::CNAME;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::forward::Forwarder;
use crate::index::{Answer, Index};

/// Queries answered at once over UDP; past this, packets are dropped (clients retry) rather
/// than queued without bound.
const UDP_IN_FLIGHT_MAX: usize = 1024;
/// Open TCP connections; past this, new ones are closed at once.
const TCP_CONNECTIONS_MAX: usize = 256;
/// A TCP client idle this long between queries is disconnected (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The UDP payload we offer (DNS flag day 2020: no fragmentation on real networks).
const UDP_PAYLOAD_MAX: u16 = 1232;
/// Links of a CNAME chain we follow (a loop of ExternalNames must end).
const CNAME_CHAIN_MAX: usize = 8;
/// Plain DNS over UDP without EDNS.
const UDP_PAYLOAD_MIN: u16 = 512;

/// Answers one raw query: from the zone, or through the forwarder.
pub(crate) struct Handler {
    pub(crate) index: Arc<RwLock<Index>>,
    pub(crate) forwarder: Forwarder,
}

impl Handler {
    /// The raw response to `packet`, or None when no response is owed: too short to carry an
    /// ID, or itself a response (answering those would let us be used as a reflector).
    pub(crate) async fn handle(&self, packet: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let [id_hi, id_lo, flags, ..] = *packet else { return None };
        if packet.len() < 12 || flags & 0x80 != 0 {
            return None;
        }
        let request = match Message::from_vec(packet) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("malformed query: {e}");
                return Some(formerr(id_hi, id_lo, flags));
            }
        };
        let id = request.metadata.id;
        if request.metadata.op_code != OpCode::Query {
            return encode(self.error(&request, ResponseCode::NotImp), tcp, &request);
        }
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            // We speak EDNS version 0 only; the client should retry with it (RFC 6891 §6.1.3).
            return encode(self.error(&request, ResponseCode::BADVERS), tcp, &request);
        }
        let [query] = request.queries.as_slice() else {
            return encode(self.error(&request, ResponseCode::FormErr), tcp, &request);
        };

        let (answer, soa) = {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            let ours = index.zone().zone_of(query.name()) || is_reverse(query.name());
            if ours && query.query_class() != DNSClass::IN {
                // The cluster zone exists only in class IN; CHAOS and friends are not ours.
                return encode(self.error(&request, ResponseCode::Refused), tcp, &request);
            }
            let answer = match ours {
                true => index.resolve(query.name(), query.query_type()),
                false => Answer::NotOurs,
            };
            (answer, index.soa())
        };
        let mut response = self.error(&request, ResponseCode::NoError);
        match answer {
            Answer::NotOurs => return self.forward(packet, &request, query, tcp).await,
            Answer::NotReady => response.metadata.response_code = ResponseCode::ServFail,
            Answer::NxDomain => {
                response.metadata.authoritative = true;
                response.metadata.response_code = ResponseCode::NXDomain;
                response.authorities.push(soa);
            }
            Answer::Records { answers, additionals } => {
                response.metadata.authoritative = true;
                if answers.is_empty() {
                    response.authorities.push(soa);
                }
                response.answers = self.chase(answers, query.query_type()).await;
                response.additionals = additionals;
            }
        }
        tracing::debug!(id, name = %query.name(), qtype = %query.query_type(),
            rcode = %response.metadata.response_code, answers = response.answers.len(), "answered");
        encode(response, tcp, &request)
    }

    /// Follows an ExternalName's CNAME to addresses, as CoreDNS does: stub resolvers (glibc,
    /// musl) do not ask again for a CNAME's target, so an answer ending in a bare CNAME would
    /// leave the pod without an address. Targets in the zone come from the index, others from
    /// the upstreams; a target that cannot be resolved leaves the CNAME alone.
    async fn chase(&self, mut answers: Vec<Record>, qtype: RecordType) -> Vec<Record> {
        if matches!(qtype, RecordType::CNAME | RecordType::ANY) {
            return answers;
        }
        let mut seen: Vec<Name> = Vec::new();
        for _ in 0..CNAME_CHAIN_MAX {
            let Some(RData::CNAME(CNAME(target))) = answers.last().map(|r| &r.data) else {
                break;
            };
            let target = target.to_lowercase();
            if seen.contains(&target) {
                break;
            }
            seen.push(target.clone());
            let in_zone = {
                let index = self.index.read().unwrap_or_else(|e| e.into_inner());
                index.zone().zone_of(&target).then(|| index.resolve(&target, qtype))
            };
            match in_zone {
                Some(Answer::Records { answers: more, .. }) if !more.is_empty() => {
                    answers.extend(more);
                }
                Some(_) => break,
                None => {
                    answers.extend(self.lookup_upstream(&target, qtype).await);
                    break;
                }
            }
        }
        answers
    }

    /// Our own question to the upstreams (for a CNAME target); its answers, or none.
    async fn lookup_upstream(&self, name: &Name, qtype: RecordType) -> Vec<Record> {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name.clone(), qtype));
        let Ok(packet) = m.to_vec() else { return Vec::new() };
        match self.forwarder.forward(&packet, &m, false).await {
            Ok(raw) => Message::from_vec(&raw).map(|m| m.answers).unwrap_or_default(),
            Err(e) => {
                tracing::debug!(%name, "resolve CNAME target: {e}");
                Vec::new()
            }
        }
    }

    /// A response echoing the request's ID, flags and question, with `code`.
    fn error(&self, request: &Message, code: ResponseCode) -> Message {
        let mut r = Message::response(request.metadata.id, request.metadata.op_code);
        r.metadata.recursion_desired = request.metadata.recursion_desired;
        r.metadata.recursion_available = true;
        r.metadata.checking_disabled = request.metadata.checking_disabled;
        r.metadata.response_code = code;
        r.queries = request.queries.clone();
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(UDP_PAYLOAD_MAX);
            r.set_edns(edns);
        }
        r
    }

    async fn forward(
        &self,
        packet: &[u8],
        request: &Message,
        query: &Query,
        tcp: bool,
    ) -> Option<Vec<u8>> {
        match self.forwarder.forward(packet, request, tcp).await {
            Ok(raw) if tcp || raw.len() <= udp_limit(request) => Some(raw),
            // Too big for the client's UDP: say so (TC), so it asks again over TCP.
            Ok(raw) => match Message::from_vec(&raw) {
                Ok(m) => encode(m.truncate(), false, request),
                Err(_) => encode(self.error(request, ResponseCode::ServFail), false, request),
            },
            Err(e) => {
                tracing::debug!(name = %query.name(), "forward failed: {e}");
                encode(self.error(request, ResponseCode::ServFail), tcp, request)
            }
        }
    }
}

fn is_reverse(name: &Name) -> bool {
    let arpa = |s: &str| Name::from_ascii(s).is_ok_and(|z| z.zone_of(name));
    arpa("in-addr.arpa.") || arpa("ip6.arpa.")
}

/// The largest UDP response this client accepts.
fn udp_limit(request: &Message) -> usize {
    let payload = request.edns.as_ref().map_or(UDP_PAYLOAD_MIN, |e| e.max_payload());
    usize::from(payload.max(UDP_PAYLOAD_MIN))
}

/// Serializes `response`; over UDP, one that does not fit the client's limit goes out
/// truncated (TC set, records dropped) so the client retries over TCP. Over TCP the limit is
/// the 64 KiB the framing allows (a headless Service with thousands of endpoints).
fn encode(response: Message, tcp: bool, request: &Message) -> Option<Vec<u8>> {
    let bytes = match response.to_vec() {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("encode DNS response: {e}");
            let mut fail = Message::error_msg(
                response.metadata.id,
                response.metadata.op_code,
                ResponseCode::ServFail,
            );
            fail.queries = response.queries.clone();
            return fail.to_vec().ok();
        }
    };
    let limit = if tcp { usize::from(u16::MAX) } else { udp_limit(request) };
    if bytes.len() <= limit {
        return Some(bytes);
    }
    response.truncate().to_vec().ok()
}

/// FORMERR for a query we could not parse: only the header is trusted (ID, opcode, RD), the
/// question is left out since it may be what was malformed.
fn formerr(id_hi: u8, id_lo: u8, flags: u8) -> Vec<u8> {
    // QR=1, opcode and RD copied; RA=1, RCODE=1 (FORMERR); all counts zero.
    let mut out = vec![id_hi, id_lo, 0x80 | (flags & 0x79), 0x81];
    out.extend_from_slice(&[0; 8]);
    out
}

/// Serves UDP on `socket` until `shutdown`.
pub(crate) async fn serve_udp(
    socket: UdpSocket,
    handler: Arc<Handler>,
    shutdown: CancellationToken,
) {
    let socket = Arc::new(socket);
    let permits = Arc::new(Semaphore::new(UDP_IN_FLIGHT_MAX));
    let mut buf = vec![0u8; 65535];
    loop {
        let (len, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors from earlier sends surface here (ECONNREFUSED…): not fatal.
                    tracing::debug!("udp receive: {e}");
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "udp: too many queries in flight, dropped one");
            continue;
        };
        let packet = buf[..len].to_vec();
        let (socket, handler) = (socket.clone(), handler.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(resp) = handler.handle(&packet, false).await
                && let Err(e) = socket.send_to(&resp, peer).await
            {
                tracing::debug!(%peer, "udp send: {e}");
            }
        });
    }
}

/// Serves DNS over TCP (RFC 7766 framing: a two-byte length before each message).
pub(crate) async fn serve_tcp(
    listener: TcpListener,
    handler: Arc<Handler>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(TCP_CONNECTIONS_MAX));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("tcp accept: {e}");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "tcp: too many connections, closed one");
            continue;
        };
        let (handler, shutdown) = (handler.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = connection(stream, &handler) => if let Err(e) = r {
                    tracing::debug!(%peer, "tcp connection: {e}");
                }
            }
        });
    }
}

async fn connection(mut stream: TcpStream, handler: &Handler) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let mut packet = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut packet))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let Some(resp) = handler.handle(&packet, true).await else { continue };
        let Ok(n) = u16::try_from(resp.len()) else { continue };
        let mut framed = Vec::with_capacity(resp.len() + 2);
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&resp);
        stream.write_all(&framed).await?;
    }
}

/// Binds UDP on `addr` and TCP on the same port (for port 0: the port UDP got, retried a few
/// times in the rare case TCP has it taken).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..8 {
        let udp = UdpSocket::bind(addr).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AddrInUse)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{EndpointDigest, ServiceDigest, ServiceKind, SliceDigest};
    use hickory_proto::op::MessageType;
    use hickory_proto::rr::rdata::A;
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A resolver on 127.0.0.1 that answers every A question with 192.0.2.1; with
    /// `truncate_udp`, its UDP answers are empty and truncated, so only TCP gets the record.
    pub(crate) async fn fake_upstream(truncate_udp: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let asked = Arc::new(AtomicUsize::new(0));
        let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = udp.local_addr().unwrap();
        fn answer(packet: &[u8], truncate: bool) -> Vec<u8> {
            let q = Message::from_vec(packet).unwrap();
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.metadata.recursion_available = true;
            r.queries = q.queries.clone();
            if truncate {
                r.metadata.truncation = true;
            } else {
                let name = q.queries[0].name().clone();
                r.answers.push(Record::from_rdata(
                    name,
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
                ));
            }
            r.to_vec().unwrap()
        }
        let counter = asked.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                counter.fetch_add(1, Ordering::Relaxed);
                let _ = udp.send_to(&answer(&buf[..n], truncate_udp), peer).await;
            }
        });
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                let mut len = [0u8; 2];
                if s.read_exact(&mut len).await.is_err() {
                    continue;
                }
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if s.read_exact(&mut q).await.is_err() {
                    continue;
                }
                let a = answer(&q, false);
                let mut framed = (a.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&a);
                let _ = s.write_all(&framed).await;
            }
        });
        (addr, asked)
    }

    fn handler(upstreams: Vec<SocketAddr>) -> Handler {
        let zone = Name::from_ascii("cluster.local").unwrap();
        let mut index = Index::new(&zone, Duration::from_secs(5));
        let mut services = vec![(
            "shop".to_string(),
            "web".to_string(),
            ServiceDigest {
                kind: ServiceKind::ClusterIp(vec!["10.96.0.20".parse().unwrap()]),
                ports: vec![],
                publish_not_ready: false,
            },
        )];
        services.push((
            "shop".into(),
            "many".into(),
            ServiceDigest { kind: ServiceKind::Headless, ports: vec![], publish_not_ready: false },
        ));
        index.replace_services(services);
        let endpoints = (0..200u8)
            .map(|i| EndpointDigest {
                addresses: vec![IpAddr::V4(Ipv4Addr::new(10, 1, 0, i))],
                hostname: None,
                ready: true,
            })
            .collect();
        index.replace_slices(vec![(
            "shop".into(),
            "many-1".into(),
            SliceDigest { service: "many".into(), ports: vec![], endpoints },
        )]);
        Handler {
            index: Arc::new(RwLock::new(index)),
            forwarder: Forwarder::new(upstreams, Duration::from_millis(300)),
        }
    }

    fn query(name: &str, t: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        if edns {
            m.set_edns(Edns::new());
        }
        m.to_vec().unwrap()
    }

    async fn ask(h: &Handler, packet: &[u8], tcp: bool) -> Message {
        Message::from_vec(&h.handle(packet, tcp).await.expect("a response")).expect("parses")
    }

    use std::net::IpAddr;

    #[tokio::test]
    async fn a_malformed_query_gets_formerr_with_its_id() {
        let h = handler(vec![]);
        // A header claiming one question, followed by a label running past the end.
        let mut packet = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        packet.extend_from_slice(&[0x3f, b'a', b'b']);
        let r = ask(&h, &packet, false).await;
        assert_eq!(r.metadata.id, 0xabcd);
        assert_eq!(r.metadata.message_type, MessageType::Response);
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        assert!(r.metadata.recursion_desired);
    }

    #[tokio::test]
    async fn cut_or_corrupted_queries_never_panic_and_get_formerr_or_an_answer() {
        let h = handler(vec![]);
        let good = query("_http._tcp.web.shop.svc.cluster.local.", RecordType::SRV, true);
        for len in 0..good.len() {
            if let Some(r) = h.handle(&good[..len], false).await {
                let r = Message::from_vec(&r).expect("responses parse");
                assert_eq!(r.metadata.id, 0x1234);
            }
        }
        // Every single-byte corruption (past the ID and flags), with a few values each.
        for at in 4..good.len() {
            for v in [0x00, 0x3f, 0xc0, 0xff] {
                let mut bad = good.clone();
                bad[at] = v;
                if let Some(r) = h.handle(&bad, false).await {
                    Message::from_vec(&r).expect("responses parse");
                }
            }
        }
    }

    #[tokio::test]
    async fn runts_and_responses_get_no_answer() {
        let h = handler(vec![]);
        assert!(h.handle(&[1, 2, 3], false).await.is_none());
        let mut response = query("web.shop.svc.cluster.local.", RecordType::A, false);
        response[2] |= 0x80;
        assert!(h.handle(&response, false).await.is_none());
    }

    #[tokio::test]
    async fn two_questions_are_formerr_and_other_opcodes_not_implemented() {
        let h = handler(vec![]);
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_ascii("a.cluster.local.").unwrap(), RecordType::A));
        m.add_query(Query::query(Name::from_ascii("b.cluster.local.").unwrap(), RecordType::A));
        let r = ask(&h, &m.to_vec().unwrap(), false).await;
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        let mut m = Message::query();
        m.metadata.op_code = OpCode::Status;
        let r = ask(&h, &m.to_vec().unwrap(), false).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
    }

    #[tokio::test]
    async fn an_edns_version_we_do_not_speak_gets_badvers() {
        let h = handler(vec![]);
        let mut m =
            Message::from_vec(&query("web.shop.svc.cluster.local.", RecordType::A, true)).unwrap();
        m.edns.as_mut().unwrap().set_version(1);
        let r = ask(&h, &m.to_vec().unwrap(), false).await;
        // 16 is BADVERS in an OPT-carrying response (BADSIG is its TSIG twin).
        assert_eq!(u16::from(r.metadata.response_code), 16);
        assert_eq!(r.edns.map(|e| e.version()), Some(0));
    }

    #[tokio::test]
    async fn an_answer_is_authoritative_and_echoes_the_question() {
        let h = handler(vec![]);
        let r = ask(&h, &query("Web.Shop.svc.cluster.local.", RecordType::A, false), false).await;
        assert_eq!(r.metadata.id, 0x1234);
        assert!(r.metadata.authoritative && r.metadata.recursion_available);
        assert_eq!(r.queries[0].name().to_ascii(), "Web.Shop.svc.cluster.local.");
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].ttl, 5);
    }

    #[tokio::test]
    async fn nxdomain_and_nodata_carry_the_soa_in_authority() {
        let h = handler(vec![]);
        let r = ask(&h, &query("gone.shop.svc.cluster.local.", RecordType::A, false), false).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(r.authorities.len(), 1);
        assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
        let r =
            ask(&h, &query("web.shop.svc.cluster.local.", RecordType::AAAA, false), false).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
    }

    #[tokio::test]
    async fn an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp() {
        let h = handler(vec![]);
        let packet = query("many.shop.svc.cluster.local.", RecordType::A, false);
        let r = ask(&h, &packet, false).await;
        assert!(r.metadata.truncation);
        assert!(r.answers.is_empty());
        let r = ask(&h, &packet, true).await;
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers.len(), 200);
        // With EDNS the client takes more, but 200 records still do not fit 1232 bytes.
        let r = ask(&h, &query("many.shop.svc.cluster.local.", RecordType::A, true), false).await;
        assert!(r.metadata.truncation);
        assert!(r.edns.is_some());
    }

    #[tokio::test]
    async fn an_external_name_is_followed_to_addresses_in_the_zone_or_upstream() {
        let (up, _) = fake_upstream(false).await;
        let h = handler(vec![up]);
        {
            let mut ix = h.index.write().unwrap();
            let ext = |target: &str| ServiceDigest {
                kind: ServiceKind::ExternalName(target.into()),
                ports: vec![],
                publish_not_ready: false,
            };
            ix.apply_service("shop", "out", ext("db.example.com"));
            ix.apply_service("shop", "in", ext("web.shop.svc.cluster.local"));
            ix.apply_service("shop", "loop", ext("loop.shop.svc.cluster.local"));
        }
        let data = |m: &Message| m.answers.iter().map(|r| r.data.to_string()).collect::<Vec<_>>();
        let r = ask(&h, &query("out.shop.svc.cluster.local.", RecordType::A, false), false).await;
        assert_eq!(data(&r), ["db.example.com.", "192.0.2.1"]);
        let r = ask(&h, &query("in.shop.svc.cluster.local.", RecordType::A, false), false).await;
        assert_eq!(data(&r), ["web.shop.svc.cluster.local.", "10.96.0.20"]);
        let r =
            ask(&h, &query("out.shop.svc.cluster.local.", RecordType::CNAME, false), false).await;
        assert_eq!(data(&r), ["db.example.com."]);
        let r = ask(&h, &query("loop.shop.svc.cluster.local.", RecordType::A, false), false).await;
        assert_eq!(r.answers.len(), 2, "a loop is followed once round, then given up");
    }

    #[tokio::test]
    async fn names_outside_the_zone_are_forwarded_with_the_client_id_restored() {
        let (up, _) = fake_upstream(false).await;
        let h = handler(vec![up]);
        let r = ask(&h, &query("example.com.", RecordType::A, false), false).await;
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.answers[0].data.to_string(), "192.0.2.1");
        // Reverse names the cluster does not own fall through to the upstream too.
        let r = ask(&h, &query("1.2.0.192.in-addr.arpa.", RecordType::PTR, false), false).await;
        assert_eq!(r.answers.len(), 1);
    }

    #[tokio::test]
    async fn repeated_questions_are_answered_from_the_cache_in_the_askers_case() {
        let (up, asked) = fake_upstream(false).await;
        let h = handler(vec![up]);
        let first = ask(&h, &query("www.example.com.", RecordType::A, false), false).await;
        let mut again = query("WWW.Example.com.", RecordType::A, false);
        again[..2].copy_from_slice(&[0x99, 0x88]);
        let second = ask(&h, &again, false).await;
        assert_eq!(asked.load(Ordering::Relaxed), 1, "the second answer came from the cache");
        assert_eq!(second.metadata.id, 0x9988);
        assert_eq!(second.queries[0].name().to_ascii(), "WWW.Example.com.");
        assert_eq!(second.answers[0].data, first.answers[0].data);
        assert!(second.answers[0].ttl <= 60);
        // Another type is another question.
        ask(&h, &query("www.example.com.", RecordType::AAAA, false), false).await;
        assert_eq!(asked.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_truncated_upstream_answer_is_fetched_again_over_tcp() {
        let (up, _) = fake_upstream(true).await;
        let h = handler(vec![up]);
        let r = ask(&h, &query("example.com.", RecordType::A, false), false).await;
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers[0].data.to_string(), "192.0.2.1");
    }

    #[tokio::test]
    async fn a_silent_upstream_is_skipped_and_then_servfail() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (good, _) = fake_upstream(false).await;
        let h = handler(vec![silent.local_addr().unwrap(), good]);
        let r = ask(&h, &query("example.com.", RecordType::A, false), false).await;
        assert_eq!(r.answers.len(), 1);
        let h = handler(vec![silent.local_addr().unwrap()]);
        let r = ask(&h, &query("example.com.", RecordType::A, false), false).await;
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(r.metadata.id, 0x1234);
    }
}
