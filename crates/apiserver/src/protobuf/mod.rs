//! Decoding of Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`), which
//! kubectl's typed clients send: `kubectl create deployment|namespace|configmap|secret|service …`.
//!
//! The wire format is upstream's: the magic `k8s\0`, then a `runtime.Unknown` envelope holding the
//! apiVersion/kind and the object's own protobuf bytes. Objects are decoded generically into JSON
//! with a table of message field numbers (`messages.txt`, generated from the `k8s-pb` crate by
//! `tools/gen-protobuf-table.py`); field names come from the OpenAPI schemas the server already
//! serves, so the JSON is exactly what a JSON client would have sent and runs through the same
//! pipeline (defaulting, validation, admission).
//!
//! Go's protobuf encoder writes every non-pointer field, so empty strings and zero timestamps are
//! dropped as JSON's `omitempty` would; pointers (e.g. `replicas: 0`) arrive only when set.

use base64::Engine;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::OnceLock;

const MAGIC: &[u8] = b"k8s\0";

/// Non-pointer Go fields with `omitempty` that kubectl's typed objects always carry: their zero
/// value is dropped as JSON would, so a created object reads back as upstream's does. (Pointer
/// fields such as `replicas` or `terminationGracePeriodSeconds` keep an explicit 0.)
const OMIT_ZERO: &[&str] = &[
    "stdin",
    "stdinOnce",
    "tty",
    "hostNetwork",
    "hostPID",
    "hostIPC",
    "hostPort",
    "nodePort",
    "generation",
    "minReadySeconds",
    "paused",
    "publishNotReadyAddresses",
    "healthCheckNodePort",
    "observedGeneration",
];
const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

fn err<T>(msg: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(msg.into()))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scalar {
    String,
    Int32,
    Int64,
    Bool,
    Bytes,
    Double,
}

#[derive(Debug)]
enum Kind {
    Scalar(Scalar),
    Message(String),
    Map(Box<Kind>),
}

#[derive(Debug)]
struct Field {
    snake: String,
    kind: Kind,
    repeated: bool,
}

type Messages = HashMap<String, HashMap<u32, Field>>;

fn table() -> &'static Messages {
    static TABLE: OnceLock<Messages> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut out: Messages = HashMap::new();
        let mut current: Option<String> = None;
        for line in include_str!("messages.txt").lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix("M ") {
                current = Some(name.to_string());
                out.entry(name.to_string()).or_default();
                continue;
            }
            let parts: Vec<&str> = line.split(' ').collect();
            let (Some(msg), [tag, snake, kind, rest @ ..]) = (&current, parts.as_slice()) else {
                continue;
            };
            let Ok(tag) = tag.parse::<u32>() else { continue };
            let repeated = kind.ends_with('*');
            let kind = kind.trim_end_matches('*');
            let scalar = |k: &str| match k {
                "string" => Some(Scalar::String),
                "int32" => Some(Scalar::Int32),
                "int64" => Some(Scalar::Int64),
                "bool" => Some(Scalar::Bool),
                "bytes" => Some(Scalar::Bytes),
                "double" => Some(Scalar::Double),
                _ => None,
            };
            let kind = match (kind, rest.first()) {
                ("message", Some(t)) => Kind::Message(t.to_string()),
                ("map:message", Some(t)) => Kind::Map(Box::new(Kind::Message(t.to_string()))),
                (k, _) if k.starts_with("map:") => match scalar(&k[4..]) {
                    Some(s) => Kind::Map(Box::new(Kind::Scalar(s))),
                    None => continue,
                },
                (k, _) => match scalar(k) {
                    Some(s) => Kind::Scalar(s),
                    None => continue,
                },
            };
            if let Some(fields) = out.get_mut(msg) {
                fields.insert(tag, Field { snake: snake.to_string(), kind, repeated });
            }
        }
        out
    })
}

/// The JSON name of a field, from the message's OpenAPI schema (`pod_ip` → `podIP`); `None` when
/// the schema has no such property, which for a message field means a Go embedded struct whose
/// fields are inlined into the parent (`LocalObjectReference`, `ProbeHandler`, `VolumeSource`).
fn json_name(message: &str, snake: &str) -> Option<String> {
    let folded: String = snake.chars().filter(|c| *c != '_').collect();
    match crate::openapi::schema_properties(message) {
        Some(props) => props.keys().find(|k| k.eq_ignore_ascii_case(&folded)).cloned(),
        None => Some(camel(snake)),
    }
}

fn camel(snake: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// One raw protobuf field as read from the wire.
enum Raw<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32,
    Bytes(&'a [u8]),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..70).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else { return err("truncated varint") };
            self.pos += 1;
            if shift == 63 && b > 1 {
                return err("varint overflows 64 bits");
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        err("varint too long")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let Some(end) = end else { return err("truncated field") };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn next(&mut self) -> Result<Option<(u32, Raw<'a>)>, DecodeError> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let tag =
            u32::try_from(key >> 3).map_err(|_| DecodeError("field number too large".into()))?;
        if tag == 0 {
            return err("field number 0");
        }
        let raw = match key & 7 {
            0 => Raw::Varint(self.varint()?),
            1 => {
                let b = self.take(8)?;
                Raw::Fixed64(u64::from_le_bytes(b.try_into().unwrap_or_default()))
            }
            2 => {
                let n = usize::try_from(self.varint()?)
                    .map_err(|_| DecodeError("length too large".into()))?;
                Raw::Bytes(self.take(n)?)
            }
            5 => {
                self.take(4)?;
                Raw::Fixed32
            }
            w => return err(format!("unsupported wire type {w}")),
        };
        Ok(Some((tag, raw)))
    }
}

fn scalar_value(s: Scalar, raw: &Raw) -> Result<Value, DecodeError> {
    Ok(match (s, raw) {
        (Scalar::String, Raw::Bytes(b)) => Value::String(
            std::str::from_utf8(b).map_err(|_| DecodeError("string is not UTF-8".into()))?.into(),
        ),
        (Scalar::Bytes, Raw::Bytes(b)) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        // proto2 int32 is a sign-extended varint: the cast keeps the low 32 bits.
        (Scalar::Int32, Raw::Varint(v)) => json!(*v as i64 as i32),
        (Scalar::Int64, Raw::Varint(v)) => json!(*v as i64),
        (Scalar::Bool, Raw::Varint(v)) => json!(*v != 0),
        (Scalar::Double, Raw::Fixed64(v)) => json!(f64::from_bits(*v)),
        _ => return err("field has the wrong wire type"),
    })
}

/// The values of a repeated scalar, packed (one length-delimited run) or not.
fn scalar_values(s: Scalar, raw: &Raw) -> Result<Vec<Value>, DecodeError> {
    match (s, raw) {
        (Scalar::Int32 | Scalar::Int64 | Scalar::Bool, Raw::Bytes(b)) => {
            let mut r = Reader::new(b);
            let mut out = Vec::new();
            while r.pos < b.len() {
                out.push(scalar_value(s, &Raw::Varint(r.varint()?))?);
            }
            Ok(out)
        }
        (Scalar::Double, Raw::Bytes(b)) => {
            if b.len() % 8 != 0 {
                return err("packed doubles of a bad length");
            }
            b.chunks_exact(8)
                .map(|c| {
                    scalar_value(
                        s,
                        &Raw::Fixed64(u64::from_le_bytes(c.try_into().unwrap_or_default())),
                    )
                })
                .collect()
        }
        _ => Ok(vec![scalar_value(s, raw)?]),
    }
}

fn format_time(seconds: i64, nanos: i64, micro: bool) -> Value {
    // Go's zero time.Time, which the encoder sends as an empty message or year 1.
    if (seconds == 0 && nanos == 0) || seconds == -62_135_596_800 {
        return Value::Null;
    }
    let Ok(ts) = jiff::Timestamp::new(seconds, nanos as i32) else { return Value::Null };
    if micro {
        Value::String(format!("{}", ts.strftime("%Y-%m-%dT%H:%M:%S.%6fZ")))
    } else {
        Value::String(format!("{}", ts.strftime("%Y-%m-%dT%H:%M:%SZ")))
    }
}

fn format_duration(nanos: i64) -> String {
    if nanos % 1_000_000_000 == 0 {
        format!("{}s", nanos / 1_000_000_000)
    } else if nanos % 1_000_000 == 0 {
        format!("{}ms", nanos / 1_000_000)
    } else {
        format!("{nanos}ns")
    }
}

/// The integer fields of a small well-known message (Time, IntOrString, Duration) by tag.
fn small_fields(buf: &[u8]) -> Result<HashMap<u32, Raw<'_>>, DecodeError> {
    let mut r = Reader::new(buf);
    let mut out = HashMap::new();
    while let Some((tag, raw)) = r.next()? {
        out.insert(tag, raw);
    }
    Ok(out)
}

fn int_of(f: &HashMap<u32, Raw>, tag: u32) -> i64 {
    match f.get(&tag) {
        Some(Raw::Varint(v)) => *v as i64,
        _ => 0,
    }
}

/// A message as JSON. Well-known messages get their JSON forms (Quantity and IntOrString as
/// scalars, Time as RFC 3339, RawExtension and FieldsV1 as embedded JSON).
fn message(name: &str, buf: &[u8], depth: usize) -> Result<Value, DecodeError> {
    if depth > MAX_DEPTH {
        return err("the object is nested too deeply");
    }
    match name {
        "io.k8s.apimachinery.pkg.apis.meta.v1.Time"
        | "io.k8s.apimachinery.pkg.apis.meta.v1.MicroTime" => {
            let f = small_fields(buf)?;
            return Ok(format_time(int_of(&f, 1), int_of(&f, 2), name.ends_with("MicroTime")));
        }
        "io.k8s.apimachinery.pkg.apis.meta.v1.Duration" => {
            let f = small_fields(buf)?;
            return Ok(Value::String(format_duration(int_of(&f, 1))));
        }
        "io.k8s.apimachinery.pkg.util.intstr.IntOrString" => {
            let f = small_fields(buf)?;
            return Ok(if int_of(&f, 1) == 1 {
                match f.get(&3) {
                    Some(raw @ Raw::Bytes(_)) => scalar_value(Scalar::String, raw)?,
                    _ => Value::String(String::new()),
                }
            } else {
                json!(int_of(&f, 2) as i32)
            });
        }
        "io.k8s.apimachinery.pkg.api.resource.Quantity" => {
            let f = small_fields(buf)?;
            return match f.get(&1) {
                Some(raw @ Raw::Bytes(_)) => scalar_value(Scalar::String, raw),
                _ => Ok(Value::String("0".into())),
            };
        }
        "io.k8s.apimachinery.pkg.runtime.RawExtension"
        | "io.k8s.apimachinery.pkg.apis.meta.v1.FieldsV1" => {
            let f = small_fields(buf)?;
            return match f.get(&1) {
                Some(Raw::Bytes(b)) if b.starts_with(MAGIC) => decode_object(b, depth + 1),
                Some(Raw::Bytes(b)) if !b.is_empty() => serde_json::from_slice(b)
                    .map_err(|e| DecodeError(format!("embedded JSON is malformed: {e}"))),
                _ => Ok(Value::Null),
            };
        }
        _ => {}
    }
    let Some(fields) = table().get(name) else {
        return err(format!("no protobuf schema for {name}"));
    };
    let mut out = Map::new();
    let mut r = Reader::new(buf);
    while let Some((tag, raw)) = r.next()? {
        let Some(field) = fields.get(&tag) else { continue }; // unknown fields are skipped, as proto2 does
        let key = json_name(name, &field.snake);
        match (&field.kind, key) {
            (Kind::Message(t), None) => {
                // A Go embedded struct: its fields belong to this object.
                let Raw::Bytes(b) = raw else {
                    return err("message field has the wrong wire type");
                };
                if let Value::Object(inner) = message(t, b, depth + 1)? {
                    out.extend(inner);
                }
            }
            (_, None) => {}
            (Kind::Scalar(s), Some(key)) => {
                if field.repeated {
                    let list = out.entry(key).or_insert_with(|| Value::Array(vec![]));
                    if let Value::Array(a) = list {
                        a.extend(scalar_values(*s, &raw)?);
                    }
                } else {
                    let v = scalar_value(*s, &raw)?;
                    let zero = v.as_str() == Some("")
                        || (OMIT_ZERO.contains(&key.as_str())
                            && (v == json!(0) || v == json!(false)));
                    if zero {
                        out.remove(&key);
                    } else {
                        out.insert(key, v);
                    }
                }
            }
            (Kind::Message(t), Some(key)) => {
                let Raw::Bytes(b) = raw else {
                    return err("message field has the wrong wire type");
                };
                let v = message(t, b, depth + 1)?;
                if field.repeated {
                    if let Value::Array(a) = out.entry(key).or_insert_with(|| Value::Array(vec![]))
                    {
                        a.push(v);
                    }
                } else if v.is_null() {
                    out.remove(&key);
                } else {
                    out.insert(key, v);
                }
            }
            (Kind::Map(value_kind), Some(key)) => {
                let Raw::Bytes(b) = raw else { return err("map entry has the wrong wire type") };
                let (k, v) = map_entry(value_kind, b, depth + 1)?;
                if let Value::Object(m) =
                    out.entry(key).or_insert_with(|| Value::Object(Map::new()))
                {
                    m.insert(k, v);
                }
            }
        }
    }
    Ok(Value::Object(out))
}

fn map_entry(value_kind: &Kind, buf: &[u8], depth: usize) -> Result<(String, Value), DecodeError> {
    let mut r = Reader::new(buf);
    let (mut key, mut value) = (String::new(), None);
    while let Some((tag, raw)) = r.next()? {
        match tag {
            1 => {
                if let Value::String(s) = scalar_value(Scalar::String, &raw)? {
                    key = s;
                }
            }
            2 => {
                value = Some(match (value_kind, &raw) {
                    (Kind::Scalar(s), _) => scalar_value(*s, &raw)?,
                    (Kind::Message(t), Raw::Bytes(b)) => message(t, b, depth)?,
                    _ => return err("map value has the wrong wire type"),
                })
            }
            _ => {}
        }
    }
    let value = value.unwrap_or_else(|| match value_kind {
        Kind::Scalar(Scalar::String | Scalar::Bytes) => Value::String(String::new()),
        Kind::Message(t) => message(t, &[], depth).unwrap_or(Value::Null),
        _ => Value::Null,
    });
    Ok((key, value))
}

/// The message of a kind: `apps/v1` `Deployment` → `io.k8s.api.apps.v1.Deployment`.
fn message_for(api_version: &str, kind: &str) -> Option<String> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let short = if group.is_empty() { "core" } else { group.split('.').next().unwrap_or(group) };
    [
        format!("io.k8s.api.{short}.{version}.{kind}"),
        format!("io.k8s.apimachinery.pkg.apis.meta.{version}.{kind}"),
    ]
    .into_iter()
    .find(|m| table().contains_key(m))
}

/// A whole protobuf body (`k8s\0` + `runtime.Unknown`) as the JSON object it encodes.
pub fn decode_object(body: &[u8], depth: usize) -> Result<Value, DecodeError> {
    let Some(envelope) = body.strip_prefix(MAGIC) else {
        return err("the body does not start with the Kubernetes protobuf magic number");
    };
    let (mut api_version, mut kind, mut raw, mut encoding) =
        (String::new(), String::new(), &[][..], String::new());
    let mut r = Reader::new(envelope);
    while let Some((tag, field)) = r.next()? {
        match (tag, field) {
            (1, Raw::Bytes(tm)) => {
                let mut t = Reader::new(tm);
                while let Some((tag, f)) = t.next()? {
                    if let Value::String(s) = scalar_value(Scalar::String, &f)? {
                        match tag {
                            1 => api_version = s,
                            2 => kind = s,
                            _ => {}
                        }
                    }
                }
            }
            (2, Raw::Bytes(b)) => raw = b,
            (3, f) => {
                if let Value::String(s) = scalar_value(Scalar::String, &f)? {
                    encoding = s;
                }
            }
            _ => {}
        }
    }
    if !encoding.is_empty() {
        return err(format!("content encoding {encoding:?} is not supported"));
    }
    let Some(name) = message_for(&api_version, &kind) else {
        return err(format!("no protobuf schema for {api_version:?} {kind:?}"));
    };
    let mut obj = message(&name, raw, depth)?;
    if let Value::Object(m) = &mut obj {
        let mut head = Map::new();
        head.insert("apiVersion".into(), Value::String(api_version));
        head.insert("kind".into(), Value::String(kind));
        head.extend(std::mem::take(m));
        *m = head;
    }
    Ok(obj)
}

#[cfg(test)]
mod tests;
