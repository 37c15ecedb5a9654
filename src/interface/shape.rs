//! A cheap first look at untrusted input (a batch line, a socket frame) before a value tree
//! is built from it: counts values and nesting, so that a small input of many tiny values
//! (a list of a million nils, 1 byte each, would take some 40 MB as a tree) or one nested
//! past any real request is refused up front. Works with any serde deserializer.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// The most values one request may hold (a dynamo entry of a thousand codes of ten backend
/// ids is some twenty thousand).
pub const MAX_VALUES: usize = 200_000;
/// The deepest nesting one request may have (real ones are under ten).
pub const MAX_DEPTH: usize = 64;

/// How refusals name a field: `inner`'s path as seen from the value that holds it under
/// `outer`, a map key (`entry`) or an index (`[0]`): `entry.codes[0].payload_b64`. Paths are
/// built this way, from the inside out, only once something is refused.
pub fn field_path(outer: &str, inner: &str) -> String {
    if inner.is_empty() || inner.starts_with('[') {
        format!("{outer}{inner}")
    } else {
        format!("{outer}.{inner}")
    }
}

/// Walks the input once, without keeping it; errors if it holds more than [`MAX_VALUES`]
/// values or nests deeper than [`MAX_DEPTH`], or is not well formed.
pub fn check<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    let count = Cell::new(0);
    Walk {
        count: &count,
        depth: 0,
    }
    .deserialize(d)
}

struct Walk<'a> {
    count: &'a Cell<usize>,
    depth: usize,
}

impl Walk<'_> {
    fn bump<E: de::Error>(&self) -> Result<(), E> {
        self.count.set(self.count.get() + 1);
        if self.count.get() > MAX_VALUES {
            return Err(E::custom(format!("more than {MAX_VALUES} values")));
        }
        Ok(())
    }
    fn inner<E: de::Error>(&self) -> Result<Walk<'_>, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(Walk {
            count: self.count,
            depth: self.depth + 1,
        })
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! scalar {
    ($($name:ident: $t:ty),*) => {$(
        fn $name<E: de::Error>(self, _: $t) -> Result<(), E> { self.bump() }
    )*};
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }
    scalar!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128, visit_u128: u128,
            visit_f64: f64, visit_str: &str, visit_bytes: &[u8]);
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.bump()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.bump()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.inner()?.deserialize(d)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.inner()?.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.bump()?;
        let inner = self.inner()?;
        while seq
            .next_element_seed(Walk {
                count: inner.count,
                depth: inner.depth,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.bump()?;
        let inner = self.inner()?;
        while map
            .next_key_seed(Walk {
                count: inner.count,
                depth: inner.depth,
            })?
            .is_some()
        {
            map.next_value_seed(Walk {
                count: inner.count,
                depth: inner.depth,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_request_passes_and_a_flood_of_tiny_values_does_not() {
        let ok = br#"{"op":"record_dynamo_cache_entry","key":"e","entry":{"device_type":"cpu","codes":[{"backend_ids":["a","b"]}]}}"#;
        assert!(check(&mut serde_json::Deserializer::from_slice(ok)).is_ok());
        let flood = format!("[{}0]", "0,".repeat(MAX_VALUES));
        let err = check(&mut serde_json::Deserializer::from_str(&flood)).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let err = check(&mut serde_json::Deserializer::from_str(&deep)).unwrap_err();
        assert!(err.to_string().contains("deeper"), "{err}");
    }

    #[test]
    fn msgpack_floods_are_refused_before_a_tree_is_built() {
        // An array of 300,000 nils: 300 KB of input.
        let mut body = vec![0xdd];
        body.extend_from_slice(&300_000u32.to_be_bytes());
        body.extend(std::iter::repeat_n(0xc0, 300_000));
        let err = check(&mut rmp_serde::Deserializer::new(&body[..])).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        // The reserved marker is not MessagePack.
        assert!(check(&mut rmp_serde::Deserializer::new(&[0x91, 0xc1][..])).is_err());
    }
}
