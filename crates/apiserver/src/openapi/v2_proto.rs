//! The OpenAPI v2 document in gnostic's protobuf form (`openapi.v2.Document`,
//! `application/com.github.proto-openapi.spec.v2@v1.0+protobuf`), which is the only form of
//! `/openapi/v2` that client-go asks for: kubectl up to 1.27 reads it for `apply` and `explain`.
//!
//! The encoder walks the Swagger 2.0 JSON that [`super::v2_doc`] builds and writes the fields
//! gnostic's OpenAPIv2.proto defines for what that JSON holds; `x-` keys become `NamedAny`
//! vendor extensions whose value is YAML (JSON is YAML, so the JSON text is written).

use serde_json::{Map, Value};

/// A protobuf message being written.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, field: u32, wire: u8) {
        self.varint(((field as u64) << 3) | wire as u64);
    }
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn string(&mut self, field: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(field, s.as_bytes());
        }
    }
    fn str_of(&mut self, field: u32, v: Option<&Value>) {
        if let Some(s) = v.and_then(Value::as_str) {
            self.string(field, s);
        }
    }
    fn strings(&mut self, field: u32, v: Option<&Value>) {
        for s in v.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
            self.bytes(field, s.as_bytes());
        }
    }
    fn boolean(&mut self, field: u32, v: Option<&Value>) {
        if v.and_then(Value::as_bool) == Some(true) {
            self.key(field, 0);
            self.varint(1);
        }
    }
    fn int(&mut self, field: u32, v: Option<&Value>) {
        if let Some(n) = v.and_then(Value::as_i64).filter(|n| *n != 0) {
            self.key(field, 0);
            self.varint(n as u64);
        }
    }
    fn double(&mut self, field: u32, v: Option<&Value>) {
        if let Some(n) = v.and_then(Value::as_f64) {
            self.key(field, 1);
            self.0.extend_from_slice(&n.to_le_bytes());
        }
    }
    fn message(&mut self, field: u32, m: Msg) {
        self.bytes(field, &m.0);
    }
}

/// `Any { yaml = 2 }`.
fn any(v: &Value) -> Msg {
    let mut m = Msg::default();
    m.string(2, &serde_json::to_string(v).unwrap_or_default());
    m
}

/// Every `x-` key of `obj` as `NamedAny` entries of `field`.
fn vendor_extensions(out: &mut Msg, field: u32, obj: &Map<String, Value>) {
    for (k, v) in obj.iter().filter(|(k, _)| k.starts_with("x-")) {
        let mut named = Msg::default();
        named.string(1, k);
        named.message(2, any(v));
        out.message(field, named);
    }
}

fn schema(s: &Value) -> Msg {
    let mut m = Msg::default();
    let Some(o) = s.as_object() else { return m };
    m.str_of(1, o.get("$ref"));
    m.str_of(2, o.get("format"));
    m.str_of(3, o.get("title"));
    m.str_of(4, o.get("description"));
    if let Some(d) = o.get("default") {
        m.message(5, any(d));
    }
    m.double(6, o.get("multipleOf"));
    m.double(7, o.get("maximum"));
    m.boolean(8, o.get("exclusiveMaximum"));
    m.double(9, o.get("minimum"));
    m.boolean(10, o.get("exclusiveMinimum"));
    m.int(11, o.get("maxLength"));
    m.int(12, o.get("minLength"));
    m.str_of(13, o.get("pattern"));
    m.int(14, o.get("maxItems"));
    m.int(15, o.get("minItems"));
    m.boolean(16, o.get("uniqueItems"));
    m.int(17, o.get("maxProperties"));
    m.int(18, o.get("minProperties"));
    m.strings(19, o.get("required"));
    for e in o.get("enum").and_then(Value::as_array).into_iter().flatten() {
        m.message(20, any(e));
    }
    match o.get("additionalProperties") {
        Some(Value::Bool(b)) => {
            let mut item = Msg::default();
            item.key(2, 0);
            item.varint(*b as u64);
            m.message(21, item);
        }
        Some(v @ Value::Object(_)) => {
            let mut item = Msg::default();
            item.message(1, schema(v));
            m.message(21, item);
        }
        _ => {}
    }
    match o.get("type") {
        Some(Value::String(t)) => {
            let mut item = Msg::default();
            item.string(1, t);
            m.message(22, item);
        }
        Some(t @ Value::Array(_)) => {
            let mut item = Msg::default();
            item.strings(1, Some(t));
            m.message(22, item);
        }
        _ => {}
    }
    match o.get("items") {
        Some(Value::Array(list)) => {
            let mut item = Msg::default();
            list.iter().for_each(|s| item.message(1, schema(s)));
            m.message(23, item);
        }
        Some(v @ Value::Object(_)) => {
            let mut item = Msg::default();
            item.message(1, schema(v));
            m.message(23, item);
        }
        _ => {}
    }
    for s in o.get("allOf").and_then(Value::as_array).into_iter().flatten() {
        m.message(24, schema(s));
    }
    if let Some(props) = o.get("properties").and_then(Value::as_object) {
        let mut p = Msg::default();
        for (name, s) in props {
            let mut named = Msg::default();
            named.string(1, name);
            named.message(2, schema(s));
            p.message(1, named);
        }
        m.message(25, p);
    }
    m.str_of(26, o.get("discriminator"));
    m.boolean(27, o.get("readOnly"));
    if let Some(e) = o.get("example") {
        m.message(30, any(e));
    }
    vendor_extensions(&mut m, 31, o);
    m
}

/// A `ParametersItem` holding a query or path `NonBodyParameter`, or a body parameter.
fn parameter(p: &Value) -> Msg {
    let o = p.as_object().cloned().unwrap_or_default();
    let mut param = Msg::default();
    match o.get("in").and_then(Value::as_str) {
        Some("body") => {
            let mut body = Msg::default();
            body.str_of(1, o.get("description"));
            body.str_of(2, o.get("name"));
            body.str_of(3, o.get("in"));
            body.boolean(4, o.get("required"));
            if let Some(s) = o.get("schema") {
                body.message(5, schema(s));
            }
            vendor_extensions(&mut body, 6, &o);
            param.message(1, body);
        }
        where_ => {
            // Query/form-data sub-schemas have `allowEmptyValue` at 5 and so sit one field
            // later than the path/header ones from `type` on.
            let (oneof, shift) = match where_ {
                Some("path") => (4, 0),
                Some("header") => (1, 0),
                Some("formData") => (2, 1),
                _ => (3, 1),
            };
            let mut sub = Msg::default();
            sub.boolean(1, o.get("required"));
            sub.str_of(2, o.get("in"));
            sub.str_of(3, o.get("description"));
            sub.str_of(4, o.get("name"));
            sub.boolean(5, o.get("allowEmptyValue").filter(|_| shift == 1));
            sub.str_of(5 + shift, o.get("type"));
            sub.str_of(6 + shift, o.get("format"));
            sub.boolean(19 + shift, o.get("uniqueItems"));
            vendor_extensions(&mut sub, 22 + shift, &o);
            let mut non_body = Msg::default();
            non_body.message(oneof, sub);
            param.message(2, non_body);
        }
    }
    let mut item = Msg::default();
    item.message(1, param);
    item
}

fn operation(op: &Map<String, Value>) -> Msg {
    let mut m = Msg::default();
    m.strings(1, op.get("tags"));
    m.str_of(2, op.get("summary"));
    m.str_of(3, op.get("description"));
    m.str_of(5, op.get("operationId"));
    m.strings(6, op.get("produces"));
    m.strings(7, op.get("consumes"));
    for p in op.get("parameters").and_then(Value::as_array).into_iter().flatten() {
        m.message(8, parameter(p));
    }
    if let Some(responses) = op.get("responses").and_then(Value::as_object) {
        let mut rs = Msg::default();
        for (code, r) in responses {
            let mut response = Msg::default();
            response.str_of(1, r.get("description"));
            if let Some(s) = r.get("schema") {
                let mut item = Msg::default();
                item.message(1, schema(s));
                response.message(2, item);
            }
            let mut value = Msg::default();
            value.message(1, response);
            let mut named = Msg::default();
            named.string(1, code);
            named.message(2, value);
            rs.message(1, named);
        }
        m.message(9, rs);
    }
    m.strings(10, op.get("schemes"));
    m.boolean(11, op.get("deprecated"));
    vendor_extensions(&mut m, 13, op);
    m
}

fn path_item(item: &Map<String, Value>) -> Msg {
    let mut m = Msg::default();
    for (method, field) in [
        ("get", 2),
        ("put", 3),
        ("post", 4),
        ("delete", 5),
        ("options", 6),
        ("head", 7),
        ("patch", 8),
    ] {
        if let Some(op) = item.get(method).and_then(Value::as_object) {
            m.message(field, operation(op));
        }
    }
    for p in item.get("parameters").and_then(Value::as_array).into_iter().flatten() {
        m.message(9, parameter(p));
    }
    vendor_extensions(&mut m, 10, item);
    m
}

/// Encodes a Swagger 2.0 document as `openapi.v2.Document`.
pub fn encode(doc: &Value) -> Vec<u8> {
    let mut m = Msg::default();
    m.str_of(1, doc.get("swagger"));
    if let Some(info) = doc.get("info") {
        let mut i = Msg::default();
        i.str_of(1, info.get("title"));
        i.str_of(2, info.get("version"));
        i.str_of(3, info.get("description"));
        m.message(2, i);
    }
    m.strings(5, doc.get("schemes"));
    m.strings(6, doc.get("consumes"));
    m.strings(7, doc.get("produces"));
    if let Some(paths) = doc.get("paths").and_then(Value::as_object) {
        let mut ps = Msg::default();
        for (path, item) in paths {
            let mut named = Msg::default();
            named.string(1, path);
            named.message(2, path_item(item.as_object().unwrap_or(&Map::new())));
            ps.message(2, named);
        }
        m.message(8, ps);
    }
    if let Some(defs) = doc.get("definitions").and_then(Value::as_object) {
        let mut ds = Msg::default();
        for (name, s) in defs {
            let mut named = Msg::default();
            named.string(1, name);
            named.message(2, schema(s));
            ds.message(1, named);
        }
        m.message(9, ds);
    }
    if let Some(o) = doc.as_object() {
        vendor_extensions(&mut m, 16, o);
    }
    m.0
}
