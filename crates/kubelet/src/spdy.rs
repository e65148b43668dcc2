//! SPDY/3.1 framing, as far as `kubectl port-forward`, `exec` and `attach` need it (the server
//! side).
//!
//! A frame is an 8-byte header and a payload. Control frames start with the control bit, the
//! version (3) and a type; data frames with a 31-bit stream id. Both carry 8 bits of flags and a
//! 24-bit length. The name/value header blocks of SYN_STREAM, SYN_REPLY and HEADERS are one zlib
//! stream per direction per connection, started with the protocol's preset dictionary and
//! flushed (sync flush) at the end of every block, so both sides must see every block in order.
//!
//! Flow control (WINDOW_UPDATE) is parsed and ignored: the Go implementation kubectl uses
//! (moby/spdystream) neither sends nor honours windows.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The SPDY/3 header-compression dictionary (draft-mbelshe-httpbis-spdy-00 §2.6.10.1).
pub const DICTIONARY: &[u8] = include_bytes!("spdy3.dict");

pub const FLAG_FIN: u8 = 0x01;

/// RST_STREAM status codes.
pub const PROTOCOL_ERROR: u32 = 1;
pub const REFUSED_STREAM: u32 = 3;

/// A decompressed header block stays below this (a port-forward block is ~60 bytes).
const MAX_HEADER_BLOCK: usize = 256 * 1024;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    #[error("invalid {0} frame")]
    Invalid(&'static str),
    #[error("header block: {0}")]
    Headers(String),
}

/// Name/value pairs in order; a name sent with NUL-separated values appears once per value.
pub type Headers = Vec<(String, String)>;

pub fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    /// (flags, id, value) triples.
    Settings {
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
    /// A control frame type this side does not know; skipped, as the draft asks.
    Unknown {
        frame_type: u16,
    },
}

/// Compresses outgoing header blocks: one zlib stream for the whole connection.
pub struct Deflater(Compress);

impl Default for Deflater {
    fn default() -> Self {
        Self::new()
    }
}

impl Deflater {
    pub fn new() -> Self {
        let mut c = Compress::new(Compression::best(), true);
        // Cannot fail for a fresh stream (only after data has been compressed).
        let _ = c.set_dictionary(DICTIONARY);
        Deflater(c)
    }

    /// `block` compressed and sync-flushed, so the peer can decode it without what follows.
    pub fn block(&mut self, block: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(block.len() + 64);
        let mut consumed = 0;
        loop {
            if out.capacity() - out.len() < 32 {
                out.reserve(256);
            }
            let before = self.0.total_in();
            let status = self.0.compress_vec(&block[consumed..], &mut out, FlushCompress::Sync);
            consumed += (self.0.total_in() - before) as usize;
            // A sync flush is complete once all input is in and the output was not filled up.
            match status {
                Ok(Status::Ok | Status::BufError | Status::StreamEnd)
                    if consumed == block.len() && out.len() < out.capacity() =>
                {
                    return out;
                }
                Ok(_) => {}
                // The in-memory compressor has nothing to fail on; keep what was produced.
                Err(_) => return out,
            }
        }
    }
}

/// Decompresses incoming header blocks: one zlib stream for the whole connection.
pub struct Inflater(Decompress);

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

impl Inflater {
    pub fn new() -> Self {
        Inflater(Decompress::new(true))
    }

    pub fn block(&mut self, compressed: &[u8]) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(compressed.len() * 4 + 64);
        let mut consumed = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            let before = self.0.total_in();
            let r = self.0.decompress_vec(&compressed[consumed..], &mut out, FlushDecompress::Sync);
            consumed += (self.0.total_in() - before) as usize;
            match r {
                Ok(_) => {
                    if consumed == compressed.len() && out.len() < out.capacity() {
                        return Ok(out);
                    }
                }
                Err(e) => match e.needs_dictionary() {
                    Some(id) if id == adler32(DICTIONARY) => {
                        self.0
                            .set_dictionary(DICTIONARY)
                            .map_err(|e| Error::Headers(e.to_string()))?;
                    }
                    Some(id) => {
                        return Err(Error::Headers(format!("unknown dictionary {id:#010x}")));
                    }
                    None => return Err(Error::Headers(e.to_string())),
                },
            }
            if out.len() > MAX_HEADER_BLOCK {
                return Err(Error::Headers("header block too large".into()));
            }
        }
    }
}

pub fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

/// The uncompressed name/value block: a count, then length-prefixed names and values (32-bit
/// big-endian lengths); several values of one name are joined with NUL.
pub fn encode_headers(h: &Headers) -> Vec<u8> {
    let mut grouped: Vec<(String, Vec<&str>)> = Vec::new();
    for (k, v) in h {
        let k = k.to_ascii_lowercase();
        match grouped.iter_mut().find(|(n, _)| *n == k) {
            Some((_, vs)) => vs.push(v),
            None => grouped.push((k, vec![v])),
        }
    }
    let mut out = Vec::new();
    out.put_u32(grouped.len() as u32);
    for (k, vs) in grouped {
        let v = vs.join("\0");
        out.put_u32(k.len() as u32);
        out.extend_from_slice(k.as_bytes());
        out.put_u32(v.len() as u32);
        out.extend_from_slice(v.as_bytes());
    }
    out
}

pub fn decode_headers(mut b: &[u8]) -> Result<Headers, Error> {
    let bad = |what: &str| Error::Headers(what.to_string());
    let take = |b: &mut &[u8]| -> Result<String, Error> {
        if b.len() < 4 {
            return Err(bad("truncated length"));
        }
        let n = b.get_u32() as usize;
        if b.len() < n {
            return Err(bad("truncated string"));
        }
        let s = String::from_utf8_lossy(&b[..n]).into_owned();
        b.advance(n);
        Ok(s)
    };
    if b.len() < 4 {
        return Err(bad("truncated count"));
    }
    let count = b.get_u32();
    let mut out = Vec::new();
    for _ in 0..count {
        let name = take(&mut b)?.to_ascii_lowercase();
        let value = take(&mut b)?;
        for v in value.split('\0') {
            out.push((name.clone(), v.to_string()));
        }
    }
    Ok(out)
}

/// Takes one whole frame off the front of `buf`; `None` until it has arrived.
pub fn parse(buf: &mut BytesMut, inflate: &mut Inflater) -> Result<Option<Frame>, Error> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = (u32::from_be_bytes([0, buf[5], buf[6], buf[7]])) as usize;
    if buf.len() < 8 + len {
        buf.reserve(8 + len - buf.len());
        return Ok(None);
    }
    let mut f = buf.split_to(8 + len).freeze();
    let first = f.get_u32();
    let flags = f.get_u8();
    f.advance(3);
    if first & 0x8000_0000 == 0 {
        return Ok(Some(Frame::Data { stream_id: first & 0x7fff_ffff, flags, data: f }));
    }
    let version = ((first >> 16) & 0x7fff) as u16;
    if version != 3 {
        return Err(Error::Version(version));
    }
    let id31 = |f: &mut Bytes, what| {
        if f.len() < 4 { Err(Error::Invalid(what)) } else { Ok(f.get_u32() & 0x7fff_ffff) }
    };
    let frame = match first as u16 {
        TYPE_SYN_STREAM => {
            if f.len() < 10 {
                return Err(Error::Invalid("SYN_STREAM"));
            }
            let stream_id = f.get_u32() & 0x7fff_ffff;
            let associated_to = f.get_u32() & 0x7fff_ffff;
            let priority = f.get_u8() >> 5;
            f.advance(1); // slot
            let headers = decode_headers(&inflate.block(&f)?)?;
            Frame::SynStream { stream_id, associated_to, priority, flags, headers }
        }
        TYPE_SYN_REPLY => {
            let stream_id = id31(&mut f, "SYN_REPLY")?;
            Frame::SynReply { stream_id, flags, headers: decode_headers(&inflate.block(&f)?)? }
        }
        TYPE_HEADERS => {
            let stream_id = id31(&mut f, "HEADERS")?;
            Frame::Headers { stream_id, flags, headers: decode_headers(&inflate.block(&f)?)? }
        }
        TYPE_RST_STREAM => {
            if f.len() != 8 {
                return Err(Error::Invalid("RST_STREAM"));
            }
            Frame::RstStream { stream_id: f.get_u32() & 0x7fff_ffff, status: f.get_u32() }
        }
        TYPE_SETTINGS => {
            if f.len() < 4 {
                return Err(Error::Invalid("SETTINGS"));
            }
            let n = f.get_u32() as usize;
            if f.len() != n * 8 {
                return Err(Error::Invalid("SETTINGS"));
            }
            let entries = (0..n)
                .map(|_| {
                    let fid = f.get_u32();
                    ((fid >> 24) as u8, fid & 0xff_ffff, f.get_u32())
                })
                .collect();
            Frame::Settings { entries }
        }
        TYPE_PING => {
            if f.len() != 4 {
                return Err(Error::Invalid("PING"));
            }
            Frame::Ping { id: f.get_u32() }
        }
        TYPE_GOAWAY => {
            if f.len() != 8 {
                return Err(Error::Invalid("GOAWAY"));
            }
            Frame::GoAway { last_good_stream_id: f.get_u32() & 0x7fff_ffff, status: f.get_u32() }
        }
        TYPE_WINDOW_UPDATE => {
            if f.len() != 8 {
                return Err(Error::Invalid("WINDOW_UPDATE"));
            }
            Frame::WindowUpdate {
                stream_id: f.get_u32() & 0x7fff_ffff,
                delta: f.get_u32() & 0x7fff_ffff,
            }
        }
        t => Frame::Unknown { frame_type: t },
    };
    Ok(Some(frame))
}

fn control(out: &mut BytesMut, frame_type: u16, flags: u8, payload: &[u8]) {
    out.put_u16(0x8003);
    out.put_u16(frame_type);
    out.put_u32((u32::from(flags) << 24) | payload.len() as u32);
    out.extend_from_slice(payload);
}

/// Appends `frame` to `out`, compressing its header block with `deflate`.
pub fn encode(frame: &Frame, deflate: &mut Deflater, out: &mut BytesMut) {
    let mut p = Vec::new();
    match frame {
        Frame::SynStream { stream_id, associated_to, priority, flags, headers } => {
            p.put_u32(*stream_id);
            p.put_u32(*associated_to);
            p.put_u8(priority << 5);
            p.put_u8(0);
            p.extend(deflate.block(&encode_headers(headers)));
            control(out, TYPE_SYN_STREAM, *flags, &p);
        }
        Frame::SynReply { stream_id, flags, headers } => {
            p.put_u32(*stream_id);
            p.extend(deflate.block(&encode_headers(headers)));
            control(out, TYPE_SYN_REPLY, *flags, &p);
        }
        Frame::Headers { stream_id, flags, headers } => {
            p.put_u32(*stream_id);
            p.extend(deflate.block(&encode_headers(headers)));
            control(out, TYPE_HEADERS, *flags, &p);
        }
        Frame::RstStream { stream_id, status } => {
            p.put_u32(*stream_id);
            p.put_u32(*status);
            control(out, TYPE_RST_STREAM, 0, &p);
        }
        Frame::Settings { entries } => {
            p.put_u32(entries.len() as u32);
            for (flags, id, value) in entries {
                p.put_u32((u32::from(*flags) << 24) | (id & 0xff_ffff));
                p.put_u32(*value);
            }
            control(out, TYPE_SETTINGS, 0, &p);
        }
        Frame::Ping { id } => control(out, TYPE_PING, 0, &id.to_be_bytes()),
        Frame::GoAway { last_good_stream_id, status } => {
            p.put_u32(*last_good_stream_id);
            p.put_u32(*status);
            control(out, TYPE_GOAWAY, 0, &p);
        }
        Frame::WindowUpdate { stream_id, delta } => {
            p.put_u32(*stream_id);
            p.put_u32(*delta);
            control(out, TYPE_WINDOW_UPDATE, 0, &p);
        }
        Frame::Data { stream_id, flags, data } => {
            out.put_u32(stream_id & 0x7fff_ffff);
            out.put_u32((u32::from(*flags) << 24) | data.len() as u32);
            out.extend_from_slice(data);
        }
        Frame::Unknown { .. } => {}
    }
}

/// Encodes frames in order (the header compressor is one stream) and writes them, coalescing
/// what is queued into one write; shuts the writing side down when every sender is gone.
pub async fn write_frames<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Frame>) {
    let mut deflate = Deflater::new();
    let mut buf = BytesMut::new();
    while let Some(f) = rx.recv().await {
        encode(&f, &mut deflate, &mut buf);
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(f) => encode(&f, &mut deflate, &mut buf),
                Err(_) => break,
            }
        }
        if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        buf.clear();
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(pairs: &[(&str, &str)]) -> Headers {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn dictionary_is_the_spdy3_one() {
        assert_eq!(DICTIONARY.len(), 1423);
        // The dictionary id a SPDY/3 zlib stream carries in its header (FDICT).
        assert_eq!(adler32(DICTIONARY), 0xe3c6_a7c2);
        assert!(DICTIONARY.starts_with(b"\0\0\0\x07options"));
        assert!(DICTIONARY.ends_with(b",enq=0."));
    }

    #[test]
    fn header_blocks_round_trip_through_one_zlib_stream_per_direction() {
        let mut d = Deflater::new();
        let mut i = Inflater::new();
        let blocks = [
            hs(&[("streamtype", "error"), ("port", "8080"), ("requestid", "0")]),
            hs(&[("streamtype", "data"), ("port", "8080"), ("requestid", "0")]),
            hs(&[]),
            hs(&[("streamtype", "data"), ("port", "8080"), ("requestid", "1")]),
        ];
        let mut sizes = Vec::new();
        for b in &blocks {
            let c = d.block(&encode_headers(b));
            sizes.push(c.len());
            assert_eq!(&decode_headers(&i.block(&c).unwrap()).unwrap(), b);
        }
        // The first block carries the zlib header with the dictionary id (FDICT set).
        let first = Deflater::new().block(&encode_headers(&blocks[0]));
        assert_eq!(first[0] & 0x0f, 8, "deflate");
        assert_eq!(u16::from_be_bytes([first[0], first[1]]) % 31, 0, "header check bits");
        assert_ne!(first[1] & 0x20, 0, "FDICT");
        assert_eq!(&first[2..6], &0xe3c6_a7c2u32.to_be_bytes());
        // Later blocks reuse the history: the repeat costs less than the first.
        assert!(sizes[3] < sizes[0], "{sizes:?}");
    }

    #[test]
    fn multiple_values_join_with_nul_and_names_are_lowercased() {
        let h = hs(&[("Port", "1"), ("port", "2"), ("x", "")]);
        let enc = encode_headers(&h);
        assert_eq!(&enc[..4], &2u32.to_be_bytes());
        assert_eq!(decode_headers(&enc).unwrap(), hs(&[("port", "1"), ("port", "2"), ("x", "")]));
        assert!(decode_headers(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']).is_err());
        assert!(decode_headers(&[0, 0]).is_err());
    }

    /// A header block made by zlib itself (Python's zlib 1.2.13, level 9, SPDY/3 dictionary,
    /// Z_SYNC_FLUSH): `streamtype: error`, `port: 80`, `requestid: 0`.
    const ZLIB_BLOCK: &[u8] = &[
        0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0x25, 0x3a, 0x70, 0x3a, 0x2b, 0x29, 0x4a, 0x4d,
        0xcc, 0x85, 0x16, 0x25, 0xac, 0xa9, 0xa0, 0x80, 0x86, 0x14, 0xcb, 0x45, 0xa0, 0x24, 0xcc,
        0x64, 0x61, 0x00, 0x24, 0x39, 0x8b, 0x20, 0x91, 0x98, 0x09, 0x4a, 0xdc, 0x8c, 0x06, 0x00,
        0x00, 0x00, 0x00, 0xff, 0xff,
    ];

    #[test]
    fn inflates_what_zlib_produces() {
        let mut i = Inflater::new();
        let h = decode_headers(&i.block(ZLIB_BLOCK).unwrap()).unwrap();
        assert_eq!(h, hs(&[("streamtype", "error"), ("port", "80"), ("requestid", "0")]));
        // Garbage is an error, not a panic.
        assert!(Inflater::new().block(&[0x78, 0xf9, 0, 0, 0, 0, 1, 2, 3]).is_err());
        assert!(Inflater::new().block(&[1, 2, 3, 4, 5]).is_err());
    }

    #[test]
    fn frames_round_trip_and_wait_for_whole_frames() {
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: hs(&[("streamtype", "error"), ("port", "80"), ("requestid", "0")]),
            },
            Frame::SynReply { stream_id: 1, flags: 0, headers: vec![] },
            Frame::Data { stream_id: 3, flags: FLAG_FIN, data: Bytes::from_static(b"GET /") },
            Frame::RstStream { stream_id: 3, status: 5 },
            Frame::Settings { entries: vec![(0, 7, 65536), (1, 4, 100)] },
            Frame::Ping { id: 1 },
            Frame::GoAway { last_good_stream_id: 5, status: 0 },
            Frame::Headers { stream_id: 5, flags: FLAG_FIN, headers: hs(&[("a", "b")]) },
            Frame::WindowUpdate { stream_id: 5, delta: 1000 },
        ];
        let mut d = Deflater::new();
        let mut wire = BytesMut::new();
        for f in &frames {
            encode(f, &mut d, &mut wire);
        }
        // Fed one byte at a time, the parser yields exactly the frames, in order.
        let mut i = Inflater::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(f) = parse(&mut buf, &mut i).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert!(buf.is_empty());
    }

    #[test]
    fn hand_built_frames_decode() {
        let mut i = Inflater::new();
        // PING id 7: control bit, version 3, type 6, length 4.
        let mut b = BytesMut::from(&[0x80, 0x03, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 7][..]);
        assert_eq!(parse(&mut b, &mut i).unwrap(), Some(Frame::Ping { id: 7 }));
        // DATA on stream 3 with FIN and 2 bytes.
        let mut b = BytesMut::from(&[0, 0, 0, 3, 0x01, 0, 0, 2, b'h', b'i'][..]);
        assert_eq!(
            parse(&mut b, &mut i).unwrap(),
            Some(Frame::Data { stream_id: 3, flags: FLAG_FIN, data: Bytes::from_static(b"hi") })
        );
        // SYN_STREAM carrying the zlib-made block, with the FIN flag.
        let mut p = vec![0x80, 0x03, 0x00, 0x01, 0x01];
        p.extend_from_slice(&((10 + ZLIB_BLOCK.len()) as u32).to_be_bytes()[1..]);
        p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x60, 0]);
        p.extend_from_slice(ZLIB_BLOCK);
        match parse(&mut BytesMut::from(&p[..]), &mut i).unwrap() {
            Some(Frame::SynStream {
                stream_id: 1, priority: 3, flags: FLAG_FIN, headers, ..
            }) => {
                assert_eq!(header(&headers, "port"), Some("80"))
            }
            other => panic!("{other:?}"),
        }
        // Wrong version, bad lengths, an unknown type.
        let mut b = BytesMut::from(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 7][..]);
        assert_eq!(parse(&mut b, &mut i), Err(Error::Version(2)));
        let mut b = BytesMut::from(&[0x80, 0x03, 0x00, 0x03, 0, 0, 0, 2, 0, 0][..]);
        assert_eq!(parse(&mut b, &mut i), Err(Error::Invalid("RST_STREAM")));
        let mut b = BytesMut::from(&[0x80, 0x03, 0x00, 0x0a, 0, 0, 0, 1, 9][..]);
        assert_eq!(parse(&mut b, &mut i).unwrap(), Some(Frame::Unknown { frame_type: 10 }));
    }
}
