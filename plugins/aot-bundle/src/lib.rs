//! The `example.aot_bundle` kind: an example plugin, modelled on PyTorch's
//! `BundledAOTAutogradCacheArtifact` but not its format (PyTorch's real artifacts are pickles,
//! served by `plugins/torch-pickle`); named `example.` so nobody takes it for torch's.
//!
//! Content is a MessagePack map
//! `{format_version: 1, guards_expr: str|nil, precompile_backend_id: str|nil,
//!   kernels: [{name: str, code: bin}], meta: map}`.
//! `after_deserialization` validates it and drops `guards_expr` (as PyTorch does once the
//! guards are installed), and builds the re-encoded document and its JSON summary, which
//! `describe` hands over. The edit
//! `clear_backend_id` sets `precompile_backend_id` to nil, as PyTorch's AOTAutograd save path.

mod document;

pub use document::{decode, encode, Bundle, Kernel, FORMAT_VERSION};

use pcx_plugin_abi::sdk::{Description, Plugin};

/// Appends `s` as a JSON string. Names are nearly always plain identifiers: those are
/// copied whole; only a string holding a quote, backslash or control character is escaped
/// character by character.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    if s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
    } else {
        out.push_str(s);
    }
    out.push('"');
}

/// Appends `n` in decimal (`write!` costs more than the rest of the summary together).
fn json_uint(out: &mut String, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// The JSON summary of a document:
/// `{format_version, precompile_backend_id, kernel_count, kernel_names, total_code_bytes}`.
pub fn summary(bundle: &Bundle) -> String {
    let names: usize = bundle.kernels.iter().map(|k| k.name.len() + 3).sum();
    let mut out = String::with_capacity(160 + names);
    out.push_str("{\"format_version\":");
    // The version is 1 (decode refuses others); written as read all the same.
    match usize::try_from(bundle.format_version) {
        Ok(v) => json_uint(&mut out, v),
        Err(_) => out.push_str(&bundle.format_version.to_string()),
    }
    out.push_str(",\"precompile_backend_id\":");
    match bundle.precompile_backend_id {
        Some(id) => json_str(&mut out, id),
        None => out.push_str("null"),
    }
    out.push_str(",\"kernel_count\":");
    json_uint(&mut out, bundle.kernels.len());
    out.push_str(",\"kernel_names\":[");
    for (i, k) in bundle.kernels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_str(&mut out, k.name);
    }
    out.push_str("],\"total_code_bytes\":");
    json_uint(&mut out, bundle.kernels.iter().map(|k| k.code.len()).sum());
    out.push('}');
    out
}

/// The ready-to-use value: the document as re-encoded without its guards, and its JSON
/// summary. Both are built while the input is at hand, so the value keeps no copy of it and
/// `describe` only hands them over.
pub struct Ready {
    pub bytes: Vec<u8>,
    pub json: String,
}

/// The plugin.
pub struct AotBundle;

impl Plugin for AotBundle {
    type Value = Ready;
    const NAME: &'static str = "aot-bundle";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const KINDS: &'static [&'static str] = &["example.aot_bundle"];
    const EDITS: &'static [&'static str] = &["clear_backend_id"];

    /// Validates the document and drops `guards_expr`, as PyTorch does once the guards are
    /// installed.
    fn after_deserialization(_kind: &str, input: &[u8]) -> Result<Ready, String> {
        let mut bundle = decode(input)?;
        bundle.guards_expr = None;
        Ok(Ready {
            bytes: encode(&bundle, input.len())?,
            json: summary(&bundle),
        })
    }

    fn describe(ready: &Ready) -> Result<Description<'_>, String> {
        Ok(Description {
            bytes: ready.bytes.as_slice().into(),
            json: ready.json.as_str().into(),
        })
    }

    fn edit(_kind: &str, op: &str, _args: &[u8], content: &[u8]) -> Result<Vec<u8>, String> {
        match op {
            "clear_backend_id" => {
                let mut bundle = decode(content)?;
                bundle.precompile_backend_id = None;
                encode(&bundle, content.len())
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
    use rmpv::Value;

    /// `meta` as written by a general MessagePack writer.
    const META: &[u8] = b"\x81\xa6device\xa3cpu";

    fn doc() -> Bundle<'static> {
        Bundle {
            format_version: 1,
            guards_expr: Some("L['x'].size()[0] == 4"),
            precompile_backend_id: Some("__compiled_fn_1"),
            kernels: vec![Kernel {
                name: "triton_poi_0",
                code: &[1, 2, 3],
            }],
            meta: META,
        }
    }

    fn bytes(bundle: &Bundle) -> Vec<u8> {
        encode(bundle, 0).unwrap()
    }

    fn write(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    /// A document as a general writer makes it, with `fields` in the order given.
    fn written(fields: Vec<(&str, Value)>) -> Vec<u8> {
        write(&Value::Map(
            fields.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        ))
    }

    fn standard_fields() -> Vec<(&'static str, Value)> {
        vec![
            ("format_version", 1.into()),
            ("guards_expr", "L['x'].size()[0] == 8".into()),
            ("precompile_backend_id", Value::Nil),
            (
                "kernels",
                Value::Array(vec![Value::Map(vec![
                    ("name".into(), "k0".into()),
                    ("code".into(), Value::Binary(vec![7; 300])),
                ])]),
            ),
            (
                "meta",
                Value::Map(vec![
                    ("device".into(), "cuda:0".into()),
                    ("num_warps".into(), 4.into()),
                    (
                        "nested".into(),
                        Value::Array(vec![
                            Value::F64(0.5),
                            Value::Boolean(true),
                            Value::Ext(3, vec![1, 2, 3, 4]),
                            (-70_000i64).into(),
                        ]),
                    ),
                ]),
            ),
        ]
    }

    #[test]
    fn after_deserialization_drops_guards_and_describes() {
        let v = AotBundle::after_deserialization("example.aot_bundle", &bytes(&doc())).unwrap();
        let d = AotBundle::describe(&v).unwrap();
        let json: serde_json::Value = serde_json::from_str(&d.json).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "format_version": 1,
                "precompile_backend_id": "__compiled_fn_1",
                "kernel_count": 1,
                "kernel_names": ["triton_poi_0"],
                "total_code_bytes": 3,
            })
        );
        assert_eq!(
            decode(&d.bytes).unwrap(),
            Bundle {
                guards_expr: None,
                ..doc()
            }
        );
    }

    #[test]
    fn a_document_written_elsewhere_is_read_and_written_back_byte_for_byte() {
        let original = written(standard_fields());
        let bundle = decode(&original).unwrap();
        assert_eq!(bundle.guards_expr, Some("L['x'].size()[0] == 8"));
        assert_eq!(bundle.precompile_backend_id, None);
        assert_eq!(bundle.kernels[0].name, "k0");
        assert_eq!(bundle.kernels[0].code, &[7; 300][..]);
        assert_eq!(
            rmpv::decode::read_value(&mut &bundle.meta[..]).unwrap(),
            standard_fields()[4].1
        );
        assert_eq!(bytes(&bundle), original);
    }

    #[test]
    fn fields_in_any_order_and_wider_encodings_are_read() {
        let mut fields = standard_fields();
        fields.reverse();
        let (reordered, standard) = (written(fields), written(standard_fields()));
        assert_ne!(reordered, standard);
        assert_eq!(decode(&reordered).unwrap(), decode(&standard).unwrap());
        // The version as a uint16 and a short name as a str8: still the same document.
        let wide = b"\x85\xaeformat_version\xcd\x00\x01\xabguards_expr\xc0\
            \xb5precompile_backend_id\xd9\x02id\xa7kernels\x90\xa4meta\x80";
        let b = decode(wide).unwrap();
        assert_eq!((b.format_version, b.precompile_backend_id), (1, Some("id")));
        assert_eq!((b.kernels.len(), b.meta), (0, &b"\x80"[..]));
    }

    #[test]
    fn summary_is_json_whatever_the_names_hold() {
        let odd = "a\"b\\c\nd\te\u{1}f\u{7f}é✓";
        let bundle = Bundle {
            precompile_backend_id: Some(odd),
            kernels: vec![
                Kernel {
                    name: odd,
                    code: &[0; 5],
                },
                Kernel {
                    name: "plain",
                    code: &[],
                },
            ],
            ..doc()
        };
        let json: serde_json::Value = serde_json::from_str(&summary(&bundle)).unwrap();
        assert_eq!(json["precompile_backend_id"], odd);
        assert_eq!(json["kernel_names"], serde_json::json!([odd, "plain"]));
        assert_eq!(json["total_code_bytes"], 5);
        let none = Bundle {
            precompile_backend_id: None,
            kernels: vec![],
            ..doc()
        };
        let json: serde_json::Value = serde_json::from_str(&summary(&none)).unwrap();
        assert_eq!(json["precompile_backend_id"], serde_json::Value::Null);
        assert_eq!(json["kernel_names"], serde_json::json!([]));
    }

    fn refused(bytes: &[u8], wanted: &str) {
        let e = decode(bytes).unwrap_err();
        assert!(e.contains(wanted), "{e:?} does not say {wanted:?}");
    }

    #[test]
    fn bad_documents_are_refused_clearly() {
        let mut v2 = doc();
        v2.format_version = 2;
        refused(&bytes(&v2), "format_version 2 is not supported");
        // A newer version is named even when the rest does not read.
        let mut fields = standard_fields();
        fields[0].1 = 2.into();
        fields[3].1 = "kernels in a newer shape".into();
        refused(&written(fields), "format_version 2 is not supported");
        refused(b"", "not valid MessagePack");
        refused(b"\x85\xa1", "not valid MessagePack");
        refused(b"\x92\x01\x02", "must be a MessagePack map");
        let mut fields = standard_fields();
        fields.remove(1);
        refused(&written(fields), "missing field `guards_expr`");
        let mut fields = standard_fields();
        fields.push(("guards_expr", Value::Nil));
        refused(&written(fields), "duplicate field `guards_expr`");
        let mut fields = standard_fields();
        fields.push(("extra", 1.into()));
        refused(&written(fields), "unknown field `extra`");
        let mut fields = standard_fields();
        fields[0].1 = (-1i64).into();
        refused(
            &written(fields),
            "`format_version` must be a non-negative integer",
        );
        let mut fields = standard_fields();
        fields[1].1 = 5.into();
        refused(&written(fields), "`guards_expr` must be a string");
        let mut fields = standard_fields();
        fields[4].1 = Value::Array(vec![]);
        refused(&written(fields), "`meta` must be a map");
        let mut fields = standard_fields();
        fields[3].1 = Value::Array(vec![Value::Map(vec![("name".into(), "k".into())])]);
        refused(&written(fields), "kernel 0 is missing field `code`");
        let mut fields = standard_fields();
        fields[3].1 = Value::Array(vec![Value::Map(vec![
            ("name".into(), "k".into()),
            ("code".into(), "not binary".into()),
        ])]);
        refused(&written(fields), "`code` must be binary");
        let mut fields = standard_fields();
        fields[1].1 = Value::Binary(vec![0xff, 0xfe]);
        refused(&written(fields), "`guards_expr` must be a string");
        let mut bad_utf8 = bytes(&doc());
        let at = bad_utf8.windows(4).position(|w| w == b"L['x").unwrap();
        bad_utf8[at] = 0xff;
        refused(&bad_utf8, "`guards_expr` is not UTF-8");
        for tail in [&b"\x00"[..], b"\xc1", b"\xa5ab"] {
            let mut trailing = bytes(&doc());
            trailing.extend_from_slice(tail);
            refused(&trailing, "after the document");
        }
    }

    #[test]
    fn forged_counts_are_refused_without_allocating_for_them() {
        // meta claims 2^32 - 1 entries; kernels claims 2^32 - 1 kernels.
        let forged_meta = Bundle {
            meta: b"\xdf\xff\xff\xff\xff",
            ..doc()
        };
        refused(&bytes(&forged_meta), "promises");
        let mut forged_kernels = bytes(&Bundle {
            kernels: vec![],
            ..doc()
        });
        let at = forged_kernels.iter().position(|&b| b == 0x90).unwrap();
        forged_kernels.splice(at..at + 1, *b"\xdd\xff\xff\xff\xff");
        refused(&forged_kernels, "a kernel must be a map");
    }

    /// Every prefix and every one-byte change of a document: never a panic, and whatever is
    /// accepted is well-formed MessagePack (a general reader agrees) that writes back to a
    /// document read the same way.
    #[test]
    fn every_prefix_and_every_byte_flip_is_refused_or_read_consistently() {
        let original = written(standard_fields());
        let check = |b: &[u8]| {
            if let Ok(bundle) = decode(b) {
                let mut rd = b;
                rmpv::decode::read_value(&mut rd).expect("accepted bytes are MessagePack");
                assert!(rd.is_empty(), "accepted bytes are one value");
                assert_eq!(decode(&bytes(&bundle)).unwrap(), bundle);
            }
        };
        for n in 0..original.len() {
            assert!(decode(&original[..n]).is_err(), "prefix of {n} bytes taken");
        }
        for i in 0..original.len() {
            for x in [0x01, 0x10, 0x80, 0xff] {
                let mut b = original.clone();
                b[i] ^= x;
                check(&b);
            }
        }
    }

    #[test]
    fn clear_backend_id_sets_it_to_nil_and_keeps_the_rest() {
        let bytes = bytes(&doc());
        let out = AotBundle::edit("example.aot_bundle", "clear_backend_id", &[], &bytes).unwrap();
        assert_eq!(
            decode(&out).unwrap(),
            Bundle {
                precompile_backend_id: None,
                ..doc()
            }
        );
        assert!(AotBundle::edit("example.aot_bundle", "nope", &[], &bytes).is_err());
    }
}
