//! The socket server's wire format, pure: frames are a 4-byte big-endian length followed by
//! one MessagePack value; requests and answers are the same maps as `pcx batch`'s JSON lines
//! (same keys), except that bytes travel as MessagePack binary instead of base64 text.
//!
//! Conversion is by key: a field whose name ends in `_b64` holds bytes. On the way in, binary
//! becomes base64 text (text is accepted as is, so a client may send either); on the way out,
//! such a field's base64 text becomes binary. Everything else maps one to one, and binary
//! anywhere else is refused: turned into base64 text, a key sent as bytes (`b"k"` from
//! Python) would be stored under the key `aw==`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rmpv::Value as Mp;
use serde_json::Value as Json;

/// The length prefix's size.
pub const HEADER_LEN: usize = 4;

/// Why a frame's body is not a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame is not valid MessagePack: {0}")]
    NotMsgpack(String),
    #[error("frame holds {0} bytes after its MessagePack value")]
    Trailing(usize),
    #[error("frame holds a value JSON cannot carry: {0}")]
    Unrepresentable(String),
    #[error(
        "field `{field}` holds binary, but only fields named `*_b64` carry bytes; send it as text"
    )]
    Binary { field: String },
    #[error("{0} bytes are more than one frame can carry (its 4-byte length goes to 4 GiB)")]
    TooLong(usize),
}

impl WireError {
    /// The `error.kind` of the answer to a frame refused for this: a frame that is well-formed
    /// MessagePack but holds binary where text belongs is a request of the wrong shape.
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::Binary { .. } => "invalid_request",
            WireError::TooLong(_) => "too_large",
            _ => "bad_frame",
        }
    }

    /// The error as seen from the value that holds the field: its path gains `outer`, a map
    /// key (`entry`) or an index (`[0]`). Built on the way out of a refusal, so conversion
    /// costs nothing for paths when all is well.
    fn within(self, outer: &str) -> WireError {
        match self {
            WireError::Binary { field } => WireError::Binary {
                field: crate::interface::shape::field_path(outer, &field),
            },
            other => other,
        }
    }
}

/// The body length a frame header announces.
pub fn body_len(header: [u8; HEADER_LEN]) -> u64 {
    u64::from(u32::from_be_bytes(header))
}

/// A frame: the length prefix and the MessagePack body of `value`; refused when the body is
/// longer than the prefix can say ([`frame_header`]).
pub fn encode_frame(value: &Mp) -> Result<Vec<u8>, WireError> {
    let mut body = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut body, value);
    let header = frame_header(body.len())?;
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// The length prefix of a body of `len` bytes. Longer than 4 GiB it is refused: written as
/// `len as u32` it wrapped, and the reader took the bytes past the announced length (a
/// long `log` answer, or the content of a request `pcx client` sent) for the frames after it.
pub fn frame_header(len: usize) -> Result<[u8; HEADER_LEN], WireError> {
    u32::try_from(len)
        .map(u32::to_be_bytes)
        .map_err(|_| WireError::TooLong(len))
}

/// Decodes one answer frame's body from a server (trusted: no bound on its size, so a `log`
/// of a long history comes through whole).
pub fn decode_answer(body: &[u8]) -> Result<Mp, WireError> {
    let mut rest = body;
    let value =
        rmpv::decode::read_value(&mut rest).map_err(|e| WireError::NotMsgpack(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Trailing(rest.len()));
    }
    Ok(value)
}

/// Decodes one request frame's body (exactly one MessagePack value), from an untrusted
/// client: strict and bounded.
pub fn decode_body(body: &[u8]) -> Result<Mp, WireError> {
    // A first walk with rmp_serde: refuses the reserved marker 0xc1 anywhere (rmpv's reader
    // takes it for nil) and bounds the number of values and the nesting before rmpv builds
    // the tree, keeping text that is not UTF-8 apart from binary.
    crate::interface::shape::check(&mut rmp_serde::Deserializer::new(body))
        .map_err(|e| WireError::NotMsgpack(e.to_string()))?;
    decode_answer(body)
}

/// MessagePack → the JSON the protocol parses; the binary of `*_b64` fields becomes base64
/// text, binary anywhere else is refused naming its field.
pub fn to_json(value: Mp) -> Result<Json, WireError> {
    to_json_field(value, false).map_err(|e| match e {
        WireError::Binary { field } if field.is_empty() => WireError::Binary {
            field: "(the whole frame)".into(),
        },
        e => e,
    })
}

fn to_json_field(value: Mp, bytes: bool) -> Result<Json, WireError> {
    Ok(match value {
        Mp::Nil => Json::Null,
        Mp::Boolean(b) => Json::Bool(b),
        Mp::Integer(i) => {
            if let Some(u) = i.as_u64() {
                Json::from(u)
            } else if let Some(s) = i.as_i64() {
                Json::from(s)
            } else {
                return Err(WireError::Unrepresentable(format!("integer {i}")));
            }
        }
        Mp::F32(f) => serde_json::Number::from_f64(f64::from(f))
            .map(Json::Number)
            .ok_or_else(|| WireError::Unrepresentable(format!("float {f}")))?,
        Mp::F64(f) => serde_json::Number::from_f64(f)
            .map(Json::Number)
            .ok_or_else(|| WireError::Unrepresentable(format!("float {f}")))?,
        Mp::String(s) => match s.into_str() {
            Some(s) => Json::String(s),
            None => {
                return Err(WireError::Unrepresentable(
                    "a string that is not UTF-8".into(),
                ))
            }
        },
        Mp::Binary(b) if bytes => Json::String(B64.encode(b)),
        Mp::Binary(_) => {
            return Err(WireError::Binary {
                field: String::new(),
            })
        }
        Mp::Array(items) => Json::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| to_json_field(v, bytes).map_err(|e| e.within(&format!("[{i}]"))))
                .collect::<Result<_, _>>()?,
        ),
        Mp::Map(pairs) => {
            let mut map = serde_json::Map::new();
            for (k, v) in pairs {
                let Mp::String(k) = k else {
                    return Err(WireError::Unrepresentable(format!(
                        "a map key that is not a string ({k})"
                    )));
                };
                let Some(k) = k.into_str() else {
                    return Err(WireError::Unrepresentable(
                        "a map key that is not UTF-8".into(),
                    ));
                };
                let v = to_json_field(v, k.ends_with("_b64")).map_err(|e| e.within(&k))?;
                map.insert(k, v);
            }
            Json::Object(map)
        }
        Mp::Ext(t, _) => return Err(WireError::Unrepresentable(format!("extension type {t}"))),
    })
}

/// JSON → MessagePack; the text of `*_b64` fields becomes binary.
pub fn to_msgpack(value: &Json) -> Mp {
    to_msgpack_field(value, false)
}

fn to_msgpack_field(value: &Json, bytes: bool) -> Mp {
    match value {
        Json::Null => Mp::Nil,
        Json::Bool(b) => Mp::Boolean(*b),
        Json::Number(n) => {
            if let Some(u) = n.as_u64() {
                Mp::from(u)
            } else if let Some(i) = n.as_i64() {
                Mp::from(i)
            } else {
                Mp::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) if bytes => match B64.decode(s) {
            Ok(b) => Mp::Binary(b),
            Err(_) => Mp::from(s.as_str()),
        },
        Json::String(s) => Mp::from(s.as_str()),
        Json::Array(items) => Mp::Array(items.iter().map(|v| to_msgpack_field(v, bytes)).collect()),
        Json::Object(map) => Mp::Map(
            map.iter()
                .map(|(k, v)| {
                    (
                        Mp::from(k.as_str()),
                        to_msgpack_field(v, k.ends_with("_b64")),
                    )
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bytes_fields_travel_as_binary_and_come_back_as_base64() {
        let answer = json!({"ok": true, "artifact": {"key": "k", "content_b64": "AAEC"}, "seq": 3});
        let mp = to_msgpack(&answer);
        let Mp::Map(pairs) = &mp else {
            panic!("not a map")
        };
        let artifact = &pairs[1].1;
        let Mp::Map(a) = artifact else {
            panic!("artifact not a map")
        };
        assert_eq!(a[1].1, Mp::Binary(vec![0, 1, 2]));
        assert_eq!(to_json(mp).unwrap(), answer);
    }

    #[test]
    fn a_frame_round_trips_and_its_header_is_big_endian() {
        let frame = encode_frame(&to_msgpack(&json!({"op": "clear"}))).unwrap();
        let len = body_len([frame[0], frame[1], frame[2], frame[3]]);
        assert_eq!(len as usize, frame.len() - HEADER_LEN);
        assert_eq!(
            to_json(decode_body(&frame[HEADER_LEN..]).unwrap()).unwrap(),
            json!({"op": "clear"})
        );
    }

    #[test]
    fn a_body_longer_than_a_frame_can_announce_is_refused_not_wrapped() {
        assert_eq!(frame_header(u32::MAX as usize), Ok([0xff; 4]));
        let over = u32::MAX as usize + 1;
        assert_eq!(frame_header(over), Err(WireError::TooLong(over)));
        assert_eq!(WireError::TooLong(over).kind(), "too_large");
    }

    #[test]
    fn garbage_and_trailing_bytes_are_refused() {
        assert!(matches!(
            decode_body(b"\x92\x01"),
            Err(WireError::NotMsgpack(_))
        ));
        assert_eq!(decode_body(b"\x01\x02"), Err(WireError::Trailing(1)));
        assert!(to_json(Mp::Map(vec![(Mp::from(1), Mp::Nil)])).is_err());
    }

    #[test]
    fn binary_outside_a_bytes_field_is_refused_naming_the_field() {
        let request =
            to_msgpack(&json!({"op": "x", "entry": {"codes": [{}, {"ids": ["a", "b"]}]}}));
        let Mp::Map(mut pairs) = request else {
            panic!("not a map")
        };
        let Mp::Map(entry) = &mut pairs[1].1 else {
            panic!("entry not a map")
        };
        entry[0].1 = Mp::Array(vec![
            Mp::Map(vec![]),
            Mp::Map(vec![(
                Mp::from("ids"),
                Mp::Array(vec![Mp::from("a"), Mp::Binary(b"b".to_vec())]),
            )]),
        ]);
        let err = to_json(Mp::Map(pairs)).unwrap_err();
        assert_eq!(
            err,
            WireError::Binary {
                field: "entry.codes[1].ids[1]".into()
            }
        );
        assert_eq!(err.kind(), "invalid_request");
        let err = to_json(Mp::Binary(vec![1])).unwrap_err();
        assert!(err.to_string().contains("(the whole frame)"), "{err}");
        // Under a `*_b64` key, arrays of binary included, it is bytes.
        let ok = Mp::Map(vec![(
            Mp::from("parts_b64"),
            Mp::Array(vec![Mp::Binary(vec![0, 1, 2])]),
        )]);
        assert_eq!(to_json(ok).unwrap(), json!({"parts_b64": ["AAEC"]}));
    }
}
