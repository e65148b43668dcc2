//! In-place changes to the proxy's table sent straight to nf_tables over netlink, one batch
//! (one atomic transaction) per change.
//!
//! Why not `nft -f`: before every transaction that adds a rule or an element, nft reads every
//! chain and set of the table into its cache; at 10,000 Services (60,000 chains) that listing
//! alone takes the kernel about half a second. A batch built here names chains and sets and
//! lets the kernel resolve them, so a change costs what the kernel needs to commit it.
//!
//! Only the steps of [`Change`] are encoded (chains, rules of the per-Service shapes, elements
//! of the skeleton's maps, affinity sets). The skeleton itself and every full replace still go
//! through `nft -f`; a change holding a rule this module cannot encode
//! ([`Error::Unsupported`]) goes there too.
//!
//! Messages follow the nf_tables netlink API (`linux/netfilter/nf_tables.h`): attributes in
//! network byte order unless the expression works on host-order values (numgen, fib).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol};

use crate::cidr::Ipv4Cidr;
use crate::rules::{Change, Elem, Op, Proto, Rule};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink: {0}")]
    Io(#[from] nix::Error),
    #[error("netlink: enter network namespace {path}: {source}")]
    Netns { path: PathBuf, source: std::io::Error },
    #[error("a rule netlink does not encode here: {0}")]
    Unsupported(String),
    #[error("nf_tables refused {what}: {errno}")]
    Refused { what: String, errno: nix::Error },
    #[error("nf_tables did not answer within {0:?}")]
    Timeout(Duration),
    #[error("netlink: malformed reply")]
    Malformed,
    #[error("netlink: {0}")]
    Join(String),
}

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_APPEND: u16 = 0x800;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NFPROTO_IPV4: u8 = 2;

// Attribute numbers (enum nft_*_attributes).
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_TIMEOUT: u16 = 11;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
/// nft's data type numbers, kept with a set so `nft list` prints its keys.
const NFT_TYPE_INTEGER: u32 = 4;
const NFT_TYPE_IPADDR: u32 = 7;
/// `ipv4_addr . inet_service` (nft concatenates type numbers 6 bits each).
const NFT_TYPE_IPADDR_SERVICE: u32 = (7 << 6) | 13;
/// Set user data (libnftnl's TLV): the key byte order, host-endian for numgen's values.
const NFTNL_UDATA_SET_KEYBYTEORDER: u8 = 0;
const NFT_BYTEORDER_HOST_ENDIAN: u32 = 1;

const NF_DROP: i32 = 0;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
/// The second 32-bit word of register 1 (NFT_REG32_00 is 8).
const NFT_REG32_01: u32 = 9;
const NF_NAT_RANGE_MAP_IPS: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_L4PROTO: u32 = 16;
const NFT_NG_RANDOM: u32 = 1;
const NFT_NAT_DNAT: u32 = 1;
const NFT_DYNSET_OP_UPDATE: u32 = 1;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_SADDR: u32 = 1;
const RTN_LOCAL: u32 = 2;

/// The name template of a rule's anonymous map (the kernel numbers it).
const ANONYMOUS_MAP: &str = "__map%d";
/// What marks packets for masquerading (a skeleton chain).
const MARK_CHAIN: &str = "mark-for-masquerade";

/// Batches beyond this many messages go to nft instead: every message is acknowledged, and
/// the acknowledgements must fit the socket's receive buffer.
pub const MAX_MESSAGES: usize = 20_000;

/// A netlink message buffer: nlmsghdr, nfgenmsg, then attributes (4-byte aligned).
#[derive(Default)]
struct Buf {
    b: Vec<u8>,
}

impl Buf {
    fn msg(&mut self, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let start = self.b.len();
        self.b.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by `end`
        self.b.extend_from_slice(&ty.to_ne_bytes());
        self.b.extend_from_slice(&flags.to_ne_bytes());
        self.b.extend_from_slice(&seq.to_ne_bytes());
        self.b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        self.b.push(family);
        self.b.push(0); // NFNETLINK_V0
        self.b.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    /// Patches the length of the message or attribute that starts at `start`.
    fn end_msg(&mut self, start: usize) {
        let len = u32::try_from(self.b.len() - start).unwrap_or(u32::MAX);
        self.b[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        while !self.b.len().is_multiple_of(4) {
            self.b.push(0);
        }
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.b.extend_from_slice(&len.to_ne_bytes());
        self.b.extend_from_slice(&ty.to_ne_bytes());
        self.b.extend_from_slice(data);
        self.pad();
    }

    fn str(&mut self, ty: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(ty, &v);
    }

    fn u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Buf)) {
        let start = self.b.len();
        self.b.extend_from_slice(&0u16.to_ne_bytes());
        self.b.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        f(self);
        let len = u16::try_from(self.b.len() - start).unwrap_or(u16::MAX);
        self.b[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn value(&mut self, ty: u16, data: &[u8]) {
        self.nest(ty, |b| b.attr(NFTA_DATA_VALUE, data));
    }

    fn verdict(&mut self, ty: u16, code: i32, chain: Option<&str>) {
        self.nest(ty, |b| {
            b.nest(NFTA_DATA_VERDICT, |b| {
                b.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
                if let Some(c) = chain {
                    b.str(NFTA_VERDICT_CHAIN, c);
                }
            })
        });
    }

    fn expr(&mut self, name: &str, f: impl FnOnce(&mut Buf)) {
        self.nest(NFTA_LIST_ELEM, |b| {
            b.str(NFTA_EXPR_NAME, name);
            b.nest(NFTA_EXPR_DATA, f);
        });
    }

    // Expressions. Values go through register 1 (and 2 for a DNAT port).

    fn payload(&mut self, base: u32, offset: u32, len: u32) {
        self.expr("payload", |b| {
            b.u32(1, NFT_REG_1); // NFTA_PAYLOAD_DREG
            b.u32(2, base);
            b.u32(3, offset);
            b.u32(4, len);
        });
    }

    fn cmp(&mut self, op: u32, data: &[u8]) {
        self.expr("cmp", |b| {
            b.u32(1, NFT_REG_1); // NFTA_CMP_SREG
            b.u32(2, op);
            b.value(3, data); // NFTA_CMP_DATA
        });
    }

    fn ip_saddr(&mut self) {
        self.payload(NFT_PAYLOAD_NETWORK_HEADER, 12, 4);
    }

    fn ip_daddr(&mut self) {
        self.payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4);
    }

    /// `ip saddr C` (`op` EQ) or `ip saddr != C` (NEQ).
    fn saddr_in(&mut self, c: Ipv4Cidr, op: u32) {
        self.ip_saddr();
        let mask = Ipv4Cidr::mask(c.prefix_len());
        if mask != u32::MAX {
            self.expr("bitwise", |b| {
                b.u32(1, NFT_REG_1); // NFTA_BITWISE_SREG
                b.u32(2, NFT_REG_1); // NFTA_BITWISE_DREG
                b.u32(3, 4); // NFTA_BITWISE_LEN
                b.value(4, &mask.to_be_bytes()); // NFTA_BITWISE_MASK
                b.value(5, &[0; 4]); // NFTA_BITWISE_XOR
            });
        }
        self.cmp(op, &c.addr().octets());
    }

    fn l4proto(&mut self, proto: Proto) {
        self.expr("meta", |b| {
            b.u32(2, NFT_META_L4PROTO); // NFTA_META_KEY
            b.u32(1, NFT_REG_1); // NFTA_META_DREG
        });
        self.cmp(NFT_CMP_EQ, &[proto_number(proto)]);
    }

    fn fib_saddr_local(&mut self) {
        self.expr("fib", |b| {
            b.u32(1, NFT_REG_1); // NFTA_FIB_DREG
            b.u32(2, NFT_FIB_RESULT_ADDRTYPE);
            b.u32(3, NFTA_FIB_F_SADDR);
        });
        self.cmp(NFT_CMP_EQ, &RTN_LOCAL.to_ne_bytes());
    }

    fn immediate(&mut self, reg: u32, data: &[u8]) {
        self.expr("immediate", |b| {
            b.u32(1, reg); // NFTA_IMMEDIATE_DREG
            b.value(2, data); // NFTA_IMMEDIATE_DATA
        });
    }

    /// `numgen random mod n` looked up in the batch's anonymous map `id`, the result in `dreg`.
    fn random_lookup(&mut self, n: usize, id: u32, dreg: u32) {
        let modulus = u32::try_from(n).unwrap_or(u32::MAX);
        self.expr("numgen", |b| {
            b.u32(1, NFT_REG_1); // NFTA_NG_DREG
            b.u32(2, modulus); // NFTA_NG_MODULUS
            b.u32(3, NFT_NG_RANDOM); // NFTA_NG_TYPE
            b.u32(4, 0); // NFTA_NG_OFFSET
        });
        self.expr("lookup", |b| {
            b.str(1, ANONYMOUS_MAP); // NFTA_LOOKUP_SET
            b.u32(4, id); // NFTA_LOOKUP_SET_ID
            b.u32(2, NFT_REG_1); // NFTA_LOOKUP_SREG
            b.u32(3, dreg); // NFTA_LOOKUP_DREG
        });
    }

    /// `dnat to` the address in `addr` and the port in `port`; `range` spells the (one-value)
    /// range out as nft does for map lookups.
    fn dnat(&mut self, addr: u32, port: u32, range: bool) {
        self.expr("nat", |b| {
            b.u32(1, NFT_NAT_DNAT); // NFTA_NAT_TYPE
            b.u32(2, u32::from(NFPROTO_IPV4)); // NFTA_NAT_FAMILY
            b.u32(3, addr); // NFTA_NAT_REG_ADDR_MIN
            if range {
                b.u32(4, addr); // NFTA_NAT_REG_ADDR_MAX
            }
            b.u32(5, port); // NFTA_NAT_REG_PROTO_MIN
            if range {
                b.u32(6, port); // NFTA_NAT_REG_PROTO_MAX
                b.u32(7, NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED); // NFTA_NAT_FLAGS
            }
        });
    }

    fn jump_or_goto(&mut self, code: i32, chain: &str) {
        self.expr("immediate", |b| {
            b.u32(1, NFT_REG_VERDICT); // NFTA_IMMEDIATE_DREG
            b.verdict(2, code, Some(chain)); // NFTA_IMMEDIATE_DATA
        });
    }
}

fn proto_number(p: Proto) -> u8 {
    match p {
        Proto::Tcp => 6,
        Proto::Udp => 17,
        Proto::Sctp => 132,
    }
}

/// A verdict as the renderer writes it in a map (`drop`, `goto C`, `jump C`).
fn parse_verdict(v: &str) -> Result<(i32, Option<&str>), Error> {
    match v.split_once(' ') {
        None if v == "drop" => Ok((NF_DROP, None)),
        Some(("goto", c)) => Ok((NFT_GOTO, Some(c))),
        Some(("jump", c)) => Ok((NFT_JUMP, Some(c))),
        _ => Err(Error::Unsupported(format!("verdict {v:?}"))),
    }
}

/// Map keys as nf_tables stores concatenations: each field padded to 4 bytes.
fn key_bytes(e: &Elem) -> Vec<u8> {
    let mut k = Vec::with_capacity(12);
    let port = |k: &mut Vec<u8>, proto: Proto, port: u16| {
        k.extend_from_slice(&[proto_number(proto), 0, 0, 0]);
        k.extend_from_slice(&port.to_be_bytes());
        k.extend_from_slice(&[0, 0]);
    };
    match e {
        Elem::Addr((ip, proto, p), _) => {
            k.extend_from_slice(&ip.octets());
            port(&mut k, *proto, *p);
        }
        Elem::Port((proto, p), _) => port(&mut k, *proto, *p),
        Elem::Ip(ip) => k.extend_from_slice(&ip.octets()),
        Elem::Pair(ip) => {
            k.extend_from_slice(&ip.octets());
            k.extend_from_slice(&ip.octets());
        }
    }
    k
}

/// A change encoded as one batch, with what each message does (for errors).
pub struct Batch {
    bytes: Vec<u8>,
    /// Sequence number and description of each acknowledged message.
    messages: Vec<(u32, String)>,
    begin_seq: u32,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }
}

/// Encodes `change` for table `ip TABLE`; sequence numbers start at `seq`.
pub fn encode(change: &Change, table: &str, seq: u32) -> Result<Batch, Error> {
    let mut e = Encoder { b: Buf::default(), seq, messages: Vec::new(), set_id: 0, table };
    let begin_seq = e.next_seq();
    let s = e.b.msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin_seq, 0, NFNL_SUBSYS_NFTABLES);
    e.b.end_msg(s);
    for op in &change.ops {
        match op {
            Op::AddAffinitySet { name, timeout } => {
                let id = e.new_set_id();
                let ms = u64::try_from(*timeout).unwrap_or(0).saturating_mul(1000);
                e.message(NFT_MSG_NEWSET, NLM_F_CREATE, format!("add set {name}"), |b| {
                    b.str(NFTA_SET_TABLE, table);
                    b.str(NFTA_SET_NAME, name);
                    b.u32(NFTA_SET_FLAGS, NFT_SET_TIMEOUT | NFT_SET_EVAL);
                    b.u32(NFTA_SET_KEY_TYPE, NFT_TYPE_IPADDR);
                    b.u32(NFTA_SET_KEY_LEN, 4);
                    b.u32(NFTA_SET_ID, id);
                    b.attr(NFTA_SET_TIMEOUT, &ms.to_be_bytes());
                    Ok(())
                })?;
            }
            Op::AddChain(name) => {
                e.named(NFT_MSG_NEWCHAIN, NLM_F_CREATE, NFTA_CHAIN_NAME, name, "add chain")?
            }
            // Deleting a chain's rules without naming one flushes it.
            Op::FlushChain(name) => {
                e.named(NFT_MSG_DELRULE, 0, NFTA_RULE_CHAIN, name, "flush chain")?
            }
            Op::DeleteChain(name) => {
                e.named(NFT_MSG_DELCHAIN, 0, NFTA_CHAIN_NAME, name, "delete chain")?
            }
            Op::DeleteSet(name) => e.named(NFT_MSG_DELSET, 0, NFTA_SET_NAME, name, "delete set")?,
            Op::AddRule { chain, rule } => {
                // A random pick needs its anonymous map first, filled, then bound by the rule's
                // lookup (the kernel frees it with the rule).
                let map = match rule {
                    Rule::DnatPick(_, eps) => Some(e.anonymous_map(
                        &format!("the endpoint map of chain {chain}"),
                        Some((NFT_TYPE_IPADDR_SERVICE, 8)),
                        eps.len(),
                        |b, i| {
                            let (ip, port) = eps[i];
                            let mut data = [0u8; 8];
                            data[..4].copy_from_slice(&ip.octets());
                            data[4..6].copy_from_slice(&port.to_be_bytes());
                            b.value(NFTA_SET_ELEM_DATA, &data);
                        },
                    )?),
                    Rule::Pick(chains) => Some(e.anonymous_map(
                        &format!("the random pick map of chain {chain}"),
                        None,
                        chains.len(),
                        |b, i| b.verdict(NFTA_SET_ELEM_DATA, NFT_GOTO, Some(&chains[i])),
                    )?),
                    _ => None,
                };
                let flags = NLM_F_CREATE | NLM_F_APPEND;
                e.message(NFT_MSG_NEWRULE, flags, format!("add rule {chain} {rule}"), |b| {
                    b.str(NFTA_RULE_TABLE, table);
                    b.str(NFTA_RULE_CHAIN, chain);
                    let mut result = Ok(());
                    b.nest(NFTA_RULE_EXPRESSIONS, |b| result = encode_rule(b, rule, map));
                    result
                })?;
            }
            Op::Elements { add, set, elems } => {
                let (m, flags, verb) = if *add {
                    (NFT_MSG_NEWSETELEM, NLM_F_CREATE, "add")
                } else {
                    (NFT_MSG_DELSETELEM, 0, "delete")
                };
                let what = format!("{verb} {} elements of {set}", elems.len());
                e.message(m, flags, what, |b| {
                    b.str(NFTA_SET_ELEM_LIST_TABLE, table);
                    b.str(NFTA_SET_ELEM_LIST_SET, set);
                    let mut result = Ok(());
                    b.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                        for el in elems {
                            b.nest(NFTA_LIST_ELEM, |b| {
                                b.value(NFTA_SET_ELEM_KEY, &key_bytes(el));
                                let verdict = match el {
                                    Elem::Addr(_, v) | Elem::Port(_, v) => v.as_deref(),
                                    Elem::Ip(_) | Elem::Pair(_) => None,
                                };
                                if let Some(v) = verdict.filter(|_| *add) {
                                    match parse_verdict(v) {
                                        Ok((code, chain)) => {
                                            b.verdict(NFTA_SET_ELEM_DATA, code, chain)
                                        }
                                        Err(err) => result = Err(err),
                                    }
                                }
                            });
                        }
                    });
                    result
                })?;
            }
        }
    }
    let end_seq = e.next_seq();
    let s = e.b.msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end_seq, 0, NFNL_SUBSYS_NFTABLES);
    e.b.end_msg(s);
    Ok(Batch { bytes: e.b.b, messages: e.messages, begin_seq })
}

/// A batch being encoded: its buffer, the last sequence number used, what each acknowledged
/// message does, and the last batch-local set id.
struct Encoder<'t> {
    b: Buf,
    seq: u32,
    messages: Vec<(u32, String)>,
    set_id: u32,
    table: &'t str,
}

impl Encoder<'_> {
    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn new_set_id(&mut self) -> u32 {
        self.set_id += 1;
        self.set_id
    }

    /// One acknowledged nf_tables message of type `m` (`flags` besides request and ack), its
    /// attributes written by `attrs`; `what` says what it does, in errors.
    fn message(
        &mut self,
        m: u16,
        flags: u16,
        what: String,
        attrs: impl FnOnce(&mut Buf) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let seq = self.next_seq();
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | m;
        let s = self.b.msg(ty, NLM_F_REQUEST | NLM_F_ACK | flags, seq, NFPROTO_IPV4, 0);
        attrs(&mut self.b)?;
        self.b.end_msg(s);
        self.messages.push((seq, what));
        Ok(())
    }

    /// A message naming one chain or set of the table.
    fn named(
        &mut self,
        m: u16,
        flags: u16,
        name_attr: u16,
        name: &str,
        verb: &str,
    ) -> Result<(), Error> {
        const _: () =
            assert!(NFTA_CHAIN_TABLE == NFTA_RULE_TABLE && NFTA_RULE_TABLE == NFTA_SET_TABLE);
        let table = self.table;
        self.message(m, flags, format!("{verb} {name}"), |b| {
            b.str(NFTA_CHAIN_TABLE, table);
            b.str(name_attr, name);
            Ok(())
        })
    }

    /// An anonymous constant map keyed `0..n` (host byte order, as numgen yields), mapping to
    /// data of `(type, length)` (None: verdicts), each element's data written by `data(b, i)`;
    /// returns its batch-local id for the rule's lookup.
    fn anonymous_map(
        &mut self,
        what: &str,
        data_type: Option<(u32, u32)>,
        n: usize,
        data: impl Fn(&mut Buf, usize),
    ) -> Result<u32, Error> {
        let (id, table) = (self.new_set_id(), self.table);
        self.message(NFT_MSG_NEWSET, NLM_F_CREATE, format!("add {what}"), |b| {
            b.str(NFTA_SET_TABLE, table);
            b.str(NFTA_SET_NAME, ANONYMOUS_MAP);
            b.u32(NFTA_SET_FLAGS, NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_MAP);
            b.u32(NFTA_SET_KEY_TYPE, NFT_TYPE_INTEGER);
            b.u32(NFTA_SET_KEY_LEN, 4);
            let (ty, len) = data_type.unwrap_or((NFT_DATA_VERDICT, 0));
            b.u32(NFTA_SET_DATA_TYPE, ty);
            if data_type.is_some() {
                b.u32(NFTA_SET_DATA_LEN, len);
            }
            b.u32(NFTA_SET_ID, id);
            let mut udata = vec![NFTNL_UDATA_SET_KEYBYTEORDER, 4];
            udata.extend_from_slice(&NFT_BYTEORDER_HOST_ENDIAN.to_ne_bytes());
            b.attr(NFTA_SET_USERDATA, &udata);
            Ok(())
        })?;
        self.message(NFT_MSG_NEWSETELEM, NLM_F_CREATE, format!("fill {what}"), |b| {
            b.str(NFTA_SET_ELEM_LIST_TABLE, table);
            b.str(NFTA_SET_ELEM_LIST_SET, ANONYMOUS_MAP);
            b.u32(NFTA_SET_ELEM_LIST_SET_ID, id);
            b.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                for i in 0..n {
                    let key = u32::try_from(i).unwrap_or(u32::MAX);
                    b.nest(NFTA_LIST_ELEM, |b| {
                        b.value(NFTA_SET_ELEM_KEY, &key.to_ne_bytes());
                        data(b, i);
                    });
                }
            });
            Ok(())
        })?;
        Ok(id)
    }
}

/// The expressions of one rule; `map` is the batch id of a pick's anonymous map.
fn encode_rule(b: &mut Buf, rule: &Rule, map: Option<u32>) -> Result<(), Error> {
    let need_map = || map.ok_or_else(|| Error::Unsupported(format!("{rule} without its map")));
    match rule {
        Rule::RememberClient(set) => {
            b.ip_saddr();
            b.expr("dynset", |b| {
                b.str(1, set); // NFTA_DYNSET_SET_NAME
                b.u32(3, NFT_DYNSET_OP_UPDATE); // NFTA_DYNSET_OP
                b.u32(4, NFT_REG_1); // NFTA_DYNSET_SREG_KEY
            });
        }
        Rule::Dnat(proto, ip, port) => {
            b.l4proto(*proto);
            b.immediate(NFT_REG_1, &ip.octets());
            b.immediate(NFT_REG_2, &port.to_be_bytes());
            b.dnat(NFT_REG_1, NFT_REG_2, false);
        }
        Rule::DnatPick(proto, eps) => {
            let id = need_map()?;
            b.l4proto(*proto);
            // Address in register 1, port in its second word.
            b.random_lookup(eps.len(), id, NFT_REG_1);
            b.dnat(NFT_REG_1, NFT_REG32_01, true);
        }
        Rule::MarkServiceTraffic { ip, proto, port, unless_from } => {
            b.ip_daddr();
            b.cmp(NFT_CMP_EQ, &ip.octets());
            b.l4proto(*proto);
            // The destination port sits at offset 2 in TCP, UDP and SCTP alike.
            b.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
            b.cmp(NFT_CMP_EQ, &port.to_be_bytes());
            if let Some(c) = unless_from {
                b.saddr_in(*c, NFT_CMP_NEQ);
            }
            b.jump_or_goto(NFT_JUMP, MARK_CHAIN);
        }
        Rule::StickyGoto { set, chain } => {
            b.ip_saddr();
            b.expr("lookup", |b| {
                b.str(1, set); // NFTA_LOOKUP_SET
                b.u32(2, NFT_REG_1); // NFTA_LOOKUP_SREG
            });
            b.jump_or_goto(NFT_GOTO, chain);
        }
        Rule::Pick(chains) => {
            let id = need_map()?;
            b.random_lookup(chains.len(), id, NFT_REG_VERDICT);
        }
        Rule::FromGoto(c, chain) => {
            b.saddr_in(*c, NFT_CMP_EQ);
            b.jump_or_goto(NFT_GOTO, chain);
        }
        Rule::LocalMark => {
            b.fib_saddr_local();
            b.jump_or_goto(NFT_JUMP, MARK_CHAIN);
        }
        Rule::LocalGoto(chain) => {
            b.fib_saddr_local();
            b.jump_or_goto(NFT_GOTO, chain);
        }
        Rule::Mark => b.jump_or_goto(NFT_JUMP, MARK_CHAIN),
        Rule::Goto(chain) => b.jump_or_goto(NFT_GOTO, chain),
        // An anonymous interval set: left to nft, which builds those (firewall chains change
        // only with a Service's loadBalancerSourceRanges, never with its endpoints).
        Rule::DropUnlessFrom(_) => return Err(Error::Unsupported(rule.to_string())),
    }
    Ok(())
}

/// A NETLINK_NETFILTER socket, in the proxy's network namespace.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// A socket in the current network namespace, or in the one at `netns` (e.g.
    /// `/run/netns/NAME`): the socket is made on a short-lived thread that enters it, and stays
    /// there after the thread is gone.
    pub fn open(netns: Option<&Path>) -> Result<Socket, Error> {
        let fd = match netns {
            None => raw_socket()?,
            Some(path) => {
                let path = path.to_path_buf();
                std::thread::spawn(move || -> Result<OwnedFd, Error> {
                    let ns = std::fs::File::open(&path)
                        .map_err(|source| Error::Netns { path: path.clone(), source })?;
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                        Error::Netns { path: path.clone(), source: std::io::Error::from(e) }
                    })?;
                    raw_socket()
                })
                .join()
                .map_err(|_| Error::Malformed)??
            }
        };
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Ok(Socket { fd, seq })
    }

    /// Sends `change` as one transaction and waits for the kernel's verdict on every message.
    /// Blocking (call it off the async runtime). Returns the batch's size in bytes.
    pub fn commit(
        &mut self,
        change: &Change,
        table: &str,
        timeout: Duration,
    ) -> Result<usize, Error> {
        let batch = encode(change, table, self.seq)?;
        self.seq = self.seq.wrapping_add(u32::try_from(batch.len() + 2).unwrap_or(0));
        if batch.is_empty() {
            return Ok(0);
        }
        let timeout = timeout.max(Duration::from_millis(1));
        let tv = nix::sys::time::TimeVal::new(
            i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            i64::from(timeout.subsec_micros()),
        );
        socket::setsockopt(&self.fd, socket::sockopt::ReceiveTimeout, &tv)?;
        let sent = socket::send(self.fd.as_raw_fd(), &batch.bytes, MsgFlags::empty())?;
        if sent != batch.bytes.len() {
            return Err(Error::Malformed);
        }
        let mut pending: std::collections::HashMap<u32, &str> =
            batch.messages.iter().map(|(s, what)| (*s, what.as_str())).collect();
        let mut first_error: Option<Error> = None;
        let mut buf = vec![0u8; 1 << 16];
        while !pending.is_empty() {
            let n = match socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(nix::Error::EAGAIN) => return Err(Error::Timeout(timeout)),
                Err(e) => return Err(e.into()),
            };
            let mut at = 0;
            while at + 16 <= n {
                let u32_at =
                    |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
                let len = usize::try_from(u32_at(at)).unwrap_or(0);
                if len < 16 || at + len > n {
                    return Err(Error::Malformed);
                }
                let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if ty == NLMSG_ERROR && len >= 16 + 4 + 16 {
                    let code = i32::from_ne_bytes([
                        buf[at + 16],
                        buf[at + 17],
                        buf[at + 18],
                        buf[at + 19],
                    ]);
                    // The header of the message this answers follows the code.
                    let seq = u32_at(at + 20 + 8);
                    if code != 0 && seq == batch.begin_seq {
                        // The batch as a whole was refused (e.g. out of memory).
                        return Err(Error::Refused {
                            what: "the batch".into(),
                            errno: nix::Error::from_raw(-code),
                        });
                    }
                    if let Some(what) = pending.remove(&seq)
                        && code != 0
                        && first_error.is_none()
                    {
                        first_error = Some(Error::Refused {
                            what: what.to_string(),
                            errno: nix::Error::from_raw(-code),
                        });
                    }
                }
                at += (len + 3) & !3;
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(batch.bytes.len()),
        }
    }
}

impl Socket {
    /// Whether `chain` exists in `table`: one GETCHAIN request for it by name, which the kernel
    /// answers from its hash of chains. (`nft list chain` reads every chain and set of the
    /// table first: seconds at 10,000 Services.) Blocking (call it off the async runtime).
    pub fn chain_exists(
        &mut self,
        table: &str,
        chain: &str,
        timeout: Duration,
    ) -> Result<bool, Error> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut b = Buf::default();
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN;
        let s = b.msg(ty, NLM_F_REQUEST | NLM_F_ACK, seq, NFPROTO_IPV4, 0);
        b.str(NFTA_CHAIN_TABLE, table);
        b.str(NFTA_CHAIN_NAME, chain);
        b.end_msg(s);
        let timeout = timeout.max(Duration::from_millis(1));
        let tv = nix::sys::time::TimeVal::new(
            i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            i64::from(timeout.subsec_micros()),
        );
        socket::setsockopt(&self.fd, socket::sockopt::ReceiveTimeout, &tv)?;
        if socket::send(self.fd.as_raw_fd(), &b.b, MsgFlags::empty())? != b.b.len() {
            return Err(Error::Malformed);
        }
        let mut found = false;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(nix::Error::EAGAIN) => return Err(Error::Timeout(timeout)),
                Err(e) => return Err(e.into()),
            };
            let mut at = 0;
            while at + 16 <= n {
                let u32_at =
                    |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
                let len = usize::try_from(u32_at(at)).unwrap_or(0);
                if len < 16 || at + len > n {
                    return Err(Error::Malformed);
                }
                let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let msg_seq = u32_at(at + 8);
                if ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN && msg_seq == seq {
                    found = true;
                } else if ty == NLMSG_ERROR && len >= 16 + 4 + 16 && u32_at(at + 20 + 8) == seq {
                    // The acknowledgement (code 0) or the refusal of this request ends it.
                    let code = i32::from_ne_bytes([
                        buf[at + 16],
                        buf[at + 17],
                        buf[at + 18],
                        buf[at + 19],
                    ]);
                    return match code {
                        0 => Ok(found),
                        c if -c == nix::Error::ENOENT as i32 => Ok(false),
                        c => Err(Error::Refused {
                            what: format!("get chain {chain}"),
                            errno: nix::Error::from_raw(-c),
                        }),
                    };
                }
                at += (len + 3) & !3;
            }
        }
    }
}

fn raw_socket() -> Result<OwnedFd, Error> {
    let fd = socket::socket(
        AddressFamily::Netlink,
        socket::SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    // Room for large batches and one acknowledgement per message; raising the limits needs
    // CAP_NET_ADMIN, which changing nftables needs anyway (the defaults do for small batches).
    let _ = socket::setsockopt(&fd, socket::sockopt::SndBufForce, &(16 << 20));
    let _ = socket::setsockopt(&fd, socket::sockopt::RcvBufForce, &(16 << 20));
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn concatenated_keys_pad_every_field_to_four_bytes() {
        let k = key_bytes(&Elem::Addr((Ipv4Addr::new(10, 96, 0, 1), Proto::Tcp, 443), None));
        assert_eq!(k, [10, 96, 0, 1, 6, 0, 0, 0, 1, 187, 0, 0]);
        assert_eq!(
            key_bytes(&Elem::Port((Proto::Udp, 30053), None)),
            [17, 0, 0, 0, 117, 101, 0, 0]
        );
    }

    #[test]
    fn verdicts_parse_and_others_are_refused() {
        assert_eq!(parse_verdict("drop").ok(), Some((NF_DROP, None)));
        assert_eq!(parse_verdict("goto reject-chain").ok(), Some((NFT_GOTO, Some("reject-chain"))));
        assert!(parse_verdict("accept").is_err());
    }

    #[test]
    fn messages_are_framed_and_a_firewall_rule_is_left_to_nft() {
        let change = Change {
            ops: vec![
                Op::AddChain("c".into()),
                Op::AddRule { chain: "c".into(), rule: Rule::Pick(vec!["a".into(), "b".into()]) },
            ],
            ..Change::default()
        };
        let batch = encode(&change, "rkube", 100).expect("encodes");
        // Chain, pick map, its elements, the rule; begin and end are not acknowledged.
        assert_eq!(batch.len(), 4);
        // Walk the messages by their lengths: they must tile the buffer exactly.
        let (mut at, mut count) = (0, 0);
        while at < batch.bytes.len() {
            let len = u32::from_ne_bytes(batch.bytes[at..at + 4].try_into().expect("4 bytes"));
            at += usize::try_from(len).expect("len");
            count += 1;
        }
        assert_eq!((at, count), (batch.bytes.len(), 6));
        let fw = Change {
            ops: vec![Op::AddRule {
                chain: "f".into(),
                rule: Rule::DropUnlessFrom(vec!["10.0.0.0/8".parse().expect("cidr")]),
            }],
            ..Change::default()
        };
        assert!(matches!(encode(&fw, "rkube", 1), Err(Error::Unsupported(_))));
    }
}
