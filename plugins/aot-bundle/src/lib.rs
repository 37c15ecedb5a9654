//! The `bundled_aot_autograd` kind, modelled on PyTorch's `BundledAOTAutogradCacheArtifact`.
//!
//! Content is a MessagePack map
//! `{format_version: 1, guards_expr: str|nil, precompile_backend_id: str|nil,
//!   kernels: [{name: str, code: bin}], meta: map}`.
//! `after_deserialization` validates it and drops `guards_expr` (as PyTorch does once the
//! guards are installed); `describe` gives the re-encoded document and a summary. The edit
//! `clear_backend_id` sets `precompile_backend_id` to nil, as PyTorch's AOTAutograd save path.

use pcx_plugin_abi::sdk::{Description, Plugin};
use serde::{Deserialize, Serialize};

/// The only document version this plugin reads.
pub const FORMAT_VERSION: u64 = 1;

/// One compiled kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    pub name: String,
    #[serde(with = "serde_bytes")]
    pub code: Vec<u8>,
}

/// The bundled document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub format_version: u64,
    pub guards_expr: Option<String>,
    pub precompile_backend_id: Option<String>,
    pub kernels: Vec<Kernel>,
    pub meta: rmpv::Value,
}

/// Present-but-nil (`Some(None)`) told apart from absent (`None`).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The document as read, every field optional so that an absent one can be named.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default, deserialize_with = "present")]
    format_version: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    guards_expr: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    precompile_backend_id: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    kernels: Option<Vec<Kernel>>,
    #[serde(default, deserialize_with = "present")]
    meta: Option<rmpv::Value>,
}

fn version_error(v: u64) -> String {
    format!("bundled_aot_autograd format_version {v} is not supported (this plugin reads {FORMAT_VERSION})")
}

/// Reads and validates a document: a map with exactly the five fields, version 1 first.
/// One typed pass (rmp_serde refuses the reserved marker 0xc1); only when it fails is the
/// version read alone, so an unknown version is named as such.
pub fn decode(bytes: &[u8]) -> Result<Bundle, String> {
    let not_msgpack = |e: &dyn std::fmt::Display| {
        format!("bundled_aot_autograd content is not valid MessagePack: {e}")
    };
    match bytes.first() {
        None | Some(0xc1) => return Err(not_msgpack(&"no document")),
        // rmp_serde would also take an array for a struct: insist on a map.
        Some(0x80..=0x8f | 0xde | 0xdf) => {}
        Some(_) => return Err("bundled_aot_autograd content must be a MessagePack map".into()),
    }
    let mut de = rmp_serde::Deserializer::new(bytes);
    let raw = match Raw::deserialize(&mut de) {
        Ok(raw) => raw,
        Err(e) => {
            #[derive(Deserialize)]
            struct Version {
                format_version: Option<u64>,
            }
            if let Ok(Version {
                format_version: Some(v),
            }) = rmp_serde::from_slice::<Version>(bytes)
            {
                if v != FORMAT_VERSION {
                    return Err(version_error(v));
                }
            }
            return Err(match e {
                rmp_serde::decode::Error::Syntax(m) => {
                    format!("bundled_aot_autograd content is malformed: {m}")
                }
                e => not_msgpack(&e),
            });
        }
    };
    let rest = de.into_inner();
    if !rest.is_empty() {
        return Err(not_msgpack(&format!(
            "{} bytes after the document",
            rest.len()
        )));
    }
    let missing = |f: &str| format!("bundled_aot_autograd content is missing field `{f}`");
    let format_version = raw
        .format_version
        .ok_or_else(|| missing("format_version"))?;
    if format_version != FORMAT_VERSION {
        return Err(version_error(format_version));
    }
    let bundle = Bundle {
        format_version,
        guards_expr: raw.guards_expr.ok_or_else(|| missing("guards_expr"))?,
        precompile_backend_id: raw
            .precompile_backend_id
            .ok_or_else(|| missing("precompile_backend_id"))?,
        kernels: raw.kernels.ok_or_else(|| missing("kernels"))?,
        meta: raw.meta.ok_or_else(|| missing("meta"))?,
    };
    if !matches!(bundle.meta, rmpv::Value::Map(_)) {
        return Err("bundled_aot_autograd field `meta` must be a map".into());
    }
    Ok(bundle)
}

/// Writes a document.
pub fn encode(bundle: &Bundle) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec_named(bundle).map_err(|e| format!("cannot encode bundled_aot_autograd: {e}"))
}

/// The plugin.
pub struct AotBundle;

impl Plugin for AotBundle {
    type Value = Bundle;
    const NAME: &'static str = "aot-bundle";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const KINDS: &'static [&'static str] = &["bundled_aot_autograd"];
    const EDITS: &'static [&'static str] = &["clear_backend_id"];

    fn after_deserialization(_kind: &str, input: &[u8]) -> Result<Bundle, String> {
        let mut bundle = decode(input)?;
        bundle.guards_expr = None;
        Ok(bundle)
    }

    fn describe(bundle: &Bundle) -> Result<Description, String> {
        /// The JSON description, written straight from a struct (no intermediate tree).
        #[derive(Serialize)]
        struct Summary<'a> {
            format_version: u64,
            precompile_backend_id: &'a Option<String>,
            kernel_count: usize,
            kernel_names: Vec<&'a str>,
            total_code_bytes: usize,
        }
        let summary = Summary {
            format_version: bundle.format_version,
            precompile_backend_id: &bundle.precompile_backend_id,
            kernel_count: bundle.kernels.len(),
            kernel_names: bundle.kernels.iter().map(|k| k.name.as_str()).collect(),
            total_code_bytes: bundle.kernels.iter().map(|k| k.code.len()).sum(),
        };
        let json = serde_json::to_string(&summary).map_err(|e| format!("cannot describe: {e}"))?;
        Ok(Description {
            bytes: encode(bundle)?,
            json,
        })
    }

    fn edit(_kind: &str, op: &str, _args: &[u8], content: &[u8]) -> Result<Vec<u8>, String> {
        match op {
            "clear_backend_id" => {
                let mut bundle = decode(content)?;
                bundle.precompile_backend_id = None;
                encode(&bundle)
            }
            other => Err(format!(
                "aot-bundle has no edit named `{other}` (it has: clear_backend_id)"
            )),
        }
    }
}

pcx_plugin_abi::export_plugin!(AotBundle);

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Bundle {
        Bundle {
            format_version: 1,
            guards_expr: Some("L['x'].size()[0] == 4".into()),
            precompile_backend_id: Some("__compiled_fn_1".into()),
            kernels: vec![Kernel {
                name: "triton_poi_0".into(),
                code: vec![1, 2, 3],
            }],
            meta: rmpv::Value::Map(vec![("device".into(), "cpu".into())]),
        }
    }

    #[test]
    fn after_deserialization_drops_guards_and_describes() {
        let bytes = encode(&doc()).unwrap();
        let v = AotBundle::after_deserialization("bundled_aot_autograd", &bytes).unwrap();
        assert_eq!(v.guards_expr, None);
        let d = AotBundle::describe(&v).unwrap();
        let json: serde_json::Value = serde_json::from_str(&d.json).unwrap();
        assert_eq!(json["kernel_count"], 1);
        assert_eq!(json["kernel_names"][0], "triton_poi_0");
        assert_eq!(json["total_code_bytes"], 3);
        assert_eq!(
            decode(&d.bytes).unwrap(),
            Bundle {
                guards_expr: None,
                ..doc()
            }
        );
    }

    #[test]
    fn bad_documents_are_refused_clearly() {
        let mut v2 = doc();
        v2.format_version = 2;
        assert!(decode(&encode(&v2).unwrap())
            .unwrap_err()
            .contains("format_version 2 is not supported"));
        assert!(decode(b"\x85\xa1")
            .unwrap_err()
            .contains("not valid MessagePack"));
        let missing =
            rmp_serde::to_vec_named(&serde_json::json!({"format_version": 1, "kernels": []}))
                .unwrap();
        assert!(decode(&missing)
            .unwrap_err()
            .contains("missing field `guards_expr`"));
    }

    #[test]
    fn clear_backend_id_sets_it_to_nil_and_keeps_the_rest() {
        let bytes = encode(&doc()).unwrap();
        let out = AotBundle::edit("bundled_aot_autograd", "clear_backend_id", &[], &bytes).unwrap();
        assert_eq!(
            decode(&out).unwrap(),
            Bundle {
                precompile_backend_id: None,
                ..doc()
            }
        );
        assert!(AotBundle::edit("bundled_aot_autograd", "nope", &[], &bytes).is_err());
    }
}
