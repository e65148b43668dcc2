//! Decoding only part of a JSON object: the fields a set of dotted paths name, everything else
//! skipped without being built. Watch fan-out filters every written object by its watchers'
//! selectors, which read a handful of fields (labels, `spec.nodeName`, `status.phase`…); a pod's
//! managed fields, containers and conditions, most of its bytes, need never become a `Value`.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The fields to keep, as a tree: a node without children keeps its whole subtree.
#[derive(Debug, Default, Clone)]
pub struct Paths(Vec<(String, Paths)>);

impl Paths {
    /// From dotted paths (`metadata.labels`, `spec.nodeName`).
    pub fn new<'a>(paths: impl IntoIterator<Item = &'a str>) -> Paths {
        let mut root = Paths::default();
        'paths: for p in paths {
            let mut node = &mut root;
            for seg in p.split('.') {
                let at = match node.0.iter().position(|(k, _)| k == seg) {
                    Some(at) => at,
                    None => {
                        node.0.push((seg.to_string(), Paths::default()));
                        node.0.len() - 1
                    }
                };
                node = &mut node.0[at].1;
                // A shorter path keeps this whole subtree already.
                if node.whole() {
                    continue 'paths;
                }
            }
            // The whole subtree, whatever longer paths asked for below it.
            *node = Paths(vec![(String::new(), Paths::default())]);
        }
        root
    }

    /// Whether this node keeps its whole subtree.
    fn whole(&self) -> bool {
        self.0.iter().any(|(k, _)| k.is_empty())
    }

    fn child(&self, key: &str) -> Option<&Paths> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, c)| c)
    }
}

/// The object in `raw` with only the fields `paths` names (objects on the way kept as objects,
/// anything else at a non-final step kept as it is).
pub fn decode(raw: &[u8], paths: &Paths) -> serde_json::Result<Value> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let v = Partial(paths).deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

struct Partial<'p>(&'p Paths);

impl<'de> DeserializeSeed<'de> for Partial<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        if self.0.whole() {
            return serde::Deserialize::deserialize(d);
        }
        d.deserialize_any(self)
    }
}

/// An object key, borrowed from the input when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Visitor<'de> for Partial<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(Key(k)) = m.next_key::<Key>()? {
            match self.0.child(&k) {
                Some(c) => {
                    let v = m.next_value_seed(Partial(c))?;
                    out.insert(k.into_owned(), v);
                }
                None => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Value, A::Error> {
        // A path through an array names nothing: its items are skipped.
        while s.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Value::Null)
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_the_named_fields_are_kept() {
        let pod = json!({
            "metadata": {"name": "p", "namespace": "d", "labels": {"app": "web", "x\"y": "1"},
                "managedFields": [{"manager": "kubectl"}], "annotations": {"a": "b"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}], "hostNetwork": true},
            "status": {"phase": "Running", "conditions": [{"type": "Ready"}]},
            "source": {"component": "kubelet", "host": "n1"},
        });
        let raw = serde_json::to_vec(&pod).unwrap();
        let paths = Paths::new([
            "metadata.name",
            "metadata.namespace",
            "metadata.labels",
            "spec.nodeName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "source",
        ]);
        let v = decode(&raw, &paths).unwrap();
        assert_eq!(
            v,
            json!({
                "metadata": {"name": "p", "namespace": "d", "labels": {"app": "web", "x\"y": "1"}},
                "spec": {"nodeName": "n1", "hostNetwork": true},
                "status": {"phase": "Running"},
                "source": {"component": "kubelet", "host": "n1"},
            })
        );
        // A path through something that is not an object keeps that value as it is; through
        // an array, nothing.
        let odd = br#"{"metadata":"x","spec":[1,2],"status":null}"#;
        assert_eq!(
            decode(odd, &paths).unwrap(),
            json!({"metadata": "x", "spec": null, "status": null})
        );
        // A shorter path wins over a longer one, in either order.
        let p2 = Paths::new(["metadata.labels.app", "metadata"]);
        assert_eq!(decode(&raw, &p2).unwrap()["metadata"], pod["metadata"]);
        let p3 = Paths::new(["metadata", "metadata.labels.app"]);
        assert_eq!(decode(&raw, &p3).unwrap()["metadata"], pod["metadata"]);
        // Bad JSON is an error, not a partial value.
        assert!(decode(b"{\"metadata\":{", &paths).is_err());
        assert!(decode(b"{} x", &paths).is_err());
    }
}
