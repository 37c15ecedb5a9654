//! What a plugin's `after_deserialization` hands back: the ready-to-use bytes and a JSON
//! description, kept as checked text ([`JsonObject`]) rather than a tree, since most loads
//! only pass it on. Apart from the loader because none of it is `unsafe` or ABI.

/// The ready-to-use bytes and JSON description a plugin gave.
#[derive(Clone, Debug, PartialEq)]
pub struct Described {
    pub bytes: Vec<u8>,
    pub description: JsonObject,
}

/// One JSON object, kept as its text. It is checked when made (UTF-8, one object, numbers
/// in range, nesting within serde_json's limit: whatever `serde_json::Value` would refuse),
/// without building a tree; the tree is built only when someone reads it. A load that only
/// hands the description on, as most do, pays for one walk over the text, not for a map
/// of strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonObject(String);

impl JsonObject {
    /// `text`, if it is one JSON object.
    pub fn parse(text: String) -> Option<JsonObject> {
        serde_json::from_str::<walk::Object>(&text).ok()?;
        Some(JsonObject(text))
    }

    /// `{"size":n}`: how the built-in `eager` kind describes its content.
    pub fn size(n: usize) -> JsonObject {
        JsonObject(format!("{{\"size\":{n}}}"))
    }

    /// The text, as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The object as a tree.
    pub fn value(&self) -> serde_json::Value {
        // Checked when made, so parsing again cannot fail; `Null` is never seen.
        serde_json::from_str(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for JsonObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for JsonObject {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(s)
    }
}

/// Walking JSON without keeping any of it.
mod walk {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    /// Any one JSON value.
    pub struct Any;
    /// One JSON object.
    pub struct Object;

    struct AnyVisitor;
    struct ObjectVisitor;

    impl<'de> Deserialize<'de> for Any {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Any, D::Error> {
            d.deserialize_any(AnyVisitor)
        }
    }

    impl<'de> Deserialize<'de> for Object {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Object, D::Error> {
            d.deserialize_any(ObjectVisitor)
        }
    }

    fn entries<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<Any, Any>()?.is_some() {}
        Ok(())
    }

    impl<'de> Visitor<'de> for ObjectVisitor {
        type Value = Object;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object, A::Error> {
            entries(map).map(|()| Object)
        }
    }

    impl<'de> Visitor<'de> for AnyVisitor {
        type Value = Any;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Any, E> {
            Ok(Any)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Any, E> {
            Ok(Any)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Any, E> {
            Ok(Any)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Any, E> {
            Ok(Any)
        }
        fn visit_str<E>(self, _: &str) -> Result<Any, E> {
            Ok(Any)
        }
        fn visit_unit<E>(self) -> Result<Any, E> {
            Ok(Any)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Any, A::Error> {
            while seq.next_element::<Any>()?.is_some() {}
            Ok(Any)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Any, A::Error> {
            entries(map).map(|()| Any)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JsonObject;
    use serde_json::json;

    fn parse(text: &str) -> Option<JsonObject> {
        JsonObject::parse(text.to_string())
    }

    #[test]
    fn a_json_object_is_kept_as_written_and_read_as_a_tree() {
        let text = r#" {"b": [1, -2, 3.5e2, true, null, "x\"y"], "a": {"c": {}}} "#;
        let o = parse(text).expect("an object");
        assert_eq!(o.as_str(), text);
        assert_eq!(
            o.value(),
            json!({"b": [1, -2, 350.0, true, null, "x\"y"], "a": {"c": {}}})
        );
        // Order as written (serde_json's preserve_order), in the tree and on the wire.
        let keys: Vec<String> = o.value().as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["b", "a"]);
        let wire = rmp_serde::to_vec_named(&o).unwrap();
        let back: serde_json::Value = rmp_serde::from_slice(&wire).unwrap();
        assert_eq!(back, o.value());
        assert_eq!(JsonObject::size(7).value(), json!({"size": 7}));
    }

    #[test]
    fn whatever_a_json_tree_would_refuse_is_refused() {
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        for bad in [
            "",
            "[]",
            "1",
            "\"{}\"",
            "null",
            "{",
            "{} {}",
            "{\"a\":1,}",
            "{\"a\":1e400}",
            "{\"a\":\"\\ud800\"}",
            "{a:1}",
            deep.as_str(),
        ] {
            assert!(parse(bad).is_none(), "accepted {bad:?}");
            assert!(
                serde_json::from_str::<serde_json::Value>(bad)
                    .ok()
                    .filter(serde_json::Value::is_object)
                    .is_none(),
                "serde_json takes {bad:?}: the check must too"
            );
        }
    }
}
