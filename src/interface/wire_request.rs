//! The payloads of requests as they travel (bytes as base64), the operations' names, and the
//! error of a request refused before it reached the context. Apart from the protocol's parsing
//! and dispatch so each stays small; nothing here talks to the context.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use indexmap::IndexMap;
use serde::Deserialize;

use crate::actor::StitchedEntry;
use crate::core::model::{
    Artifact, DynamoCacheEntry, DynamoCodeEntry, PrecompileCacheEntry, SourceInfo, SystemInfo,
    EAGER_KIND, MAX_BYPASS_REASON_CHARS,
};

/// The operations, as named on the wire.
pub const OPS: &[&str] = &[
    "record_artifact",
    "record_dynamo_cache_entry",
    "edit_artifact",
    "serialize_artifact_by_key",
    "take_artifact",
    "clear",
    "dump_debug_info",
    "create_cache_entries",
    "save_to_dynamo_cache",
    "load_cache_entry",
    "log",
    "history",
    "state",
    "diff",
    "verify",
    "stats",
    "list_contexts",
    "drop_context",
    "put_cache_entry",
    "get_cache_entry",
    "delete_cache_entry",
    "list_cache_entries",
    "clear_dynamo_cache",
    "export",
    "compact",
];

/// The fields `op` takes besides `op` itself (and `id`, `request_id`, `context` and
/// `namespace`, which every request may carry); `None` for an op not in [`OPS`]. A field not
/// among them is refused: ignored, a misspelt `expected_digest`, `context` or `request_id`
/// would change what the request does without a word.
pub fn fields_of(op: &str) -> Option<&'static [&'static str]> {
    Some(match op {
        "record_artifact" => &["key", "kind", "content_b64"],
        "record_dynamo_cache_entry" | "put_cache_entry" => &["key", "entry"],
        "edit_artifact" => &["key", "edit", "expected_digest"],
        "serialize_artifact_by_key"
        | "take_artifact"
        | "history"
        | "get_cache_entry"
        | "delete_cache_entry" => &["key"],
        "clear" | "dump_debug_info" | "verify" | "stats" | "list_contexts" | "drop_context"
        | "list_cache_entries" | "clear_dynamo_cache" => &[],
        "create_cache_entries" | "save_to_dynamo_cache" => &["trace"],
        "load_cache_entry" => &["key", "system_info"],
        "log" => &["from", "to", "since", "until", "key", "event", "limit"],
        "state" => &["at", "at_time", "key"],
        "diff" => &["from", "to"],
        "export" => &["output", "content"],
        "compact" => &["before"],
        _ => return None,
    })
}

pub(crate) fn eager() -> String {
    EAGER_KIND.to_string()
}

/// An edit on the wire: replace the content, or append to it.
///
/// This type and the other `Wire*` types refuse fields they do not have, as [`fields_of`]
/// does for a request's own: a misspelt `bypassed` or `extra_b64` would otherwise be
/// dropped, and the entry stored would not be the one sent.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WireEdit {
    SetB64(String),
    AppendB64(String),
    /// A named edit of the plugin serving the artifact's kind.
    Plugin {
        op: String,
        #[serde(default)]
        args_b64: String,
    },
}

/// A dynamo cache entry on the wire (bytes as base64).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WireEntry {
    #[serde(default)]
    pub fn_name: Option<String>,
    #[serde(default)]
    pub fn_first_lineno: Option<i64>,
    pub device_type: String,
    #[serde(default)]
    pub system_info: SystemInfo,
    #[serde(default)]
    pub source_info: SourceInfo,
    pub codes: Vec<WireCode>,
    /// Opaque bytes kept with the entry (see [`DynamoCacheEntry::extra`]).
    #[serde(default)]
    pub extra_b64: Option<String>,
}

/// A stitched entry on the wire (`put_cache_entry`): the dynamo entry and its backends.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WireCacheEntry {
    pub dynamo: WireEntry,
    #[serde(default)]
    pub backends: IndexMap<String, WireBackend>,
}

/// One backend of a stitched entry on the wire.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WireBackend {
    #[serde(default = "eager")]
    pub kind: String,
    pub content_b64: String,
}

/// One code of an entry on the wire.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WireCode {
    pub backend_ids: Vec<String>,
    #[serde(default)]
    pub python_module: String,
    #[serde(default)]
    pub function_names: Vec<String>,
    #[serde(default)]
    pub code_source: Option<String>,
    #[serde(default)]
    pub install_to_global: bool,
    #[serde(default)]
    pub has_compile_id: bool,
    #[serde(default)]
    pub payload_b64: Option<String>,
    /// Recorded already bypassed (PyTorch's `bypass_current_entry`): stitching keeps it so.
    #[serde(default)]
    pub bypassed: bool,
    #[serde(default)]
    pub bypass_reason: Option<String>,
}

/// A request the protocol refused before it reached the context.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request is not valid JSON: {0}")]
    BadJson(String),
    #[error("request must be a JSON object")]
    NotAnObject,
    #[error("unknown op `{0}`; known ops: {ops}", ops = OPS.join(", "))]
    UnknownOp(String),
    #[error("{0}")]
    MissingField(String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "field `{field}` holds a number beyond 64 bits (read as {number}): the protocol carries \
         integers from -9223372036854775808 to 18446744073709551615 and floats under 2^63 in \
         magnitude, so it could not come back exactly"
    )]
    WideNumber { field: String, number: String },
    #[error("field {field} is not valid base64: {message}")]
    BadBase64 { field: String, message: String },
    #[error("request line is {len} bytes, over the limit of {limit} bytes (max_request_bytes)")]
    TooLarge { len: u64, limit: u64 },
    #[error("frame is {len} bytes, over the limit of {limit} bytes (max_frame_bytes); closing the connection")]
    FrameTooLarge { len: u64, limit: u64 },
    #[error(
        "frame is {len} bytes, and the server could not get the memory to hold it (its \
         process is at its memory limit); closing the connection: send it again later"
    )]
    FrameUnaffordable { len: u64 },
    #[error(
        "frame of {len} bytes stalled: {received} bytes came, then none for {ms} ms \
         (frame_stall_timeout_ms), while it held its share of the server's frame memory; \
         closing the connection: send it again"
    )]
    FrameStalled { len: u64, received: u64, ms: u64 },
}

impl RequestError {
    pub fn kind(&self) -> &'static str {
        match self {
            RequestError::BadJson(_) | RequestError::NotAnObject => "bad_json",
            RequestError::UnknownOp(_) => "unknown_op",
            RequestError::MissingField(_) => "missing_field",
            RequestError::Invalid(_) | RequestError::WideNumber { .. } => "invalid_request",
            RequestError::BadBase64 { .. } => "bad_base64",
            RequestError::TooLarge { .. }
            | RequestError::FrameTooLarge { .. }
            | RequestError::FrameUnaffordable { .. } => "too_large",
            RequestError::FrameStalled { .. } => "frame_stalled",
        }
    }
}

pub fn decode_b64(field: &str, text: &str) -> Result<Vec<u8>, RequestError> {
    B64.decode(text).map_err(|e| RequestError::BadBase64 {
        field: field.to_string(),
        message: e.to_string(),
    })
}

impl WireEntry {
    /// The model's entry, with payloads decoded.
    pub fn into_entry(self) -> Result<DynamoCacheEntry, RequestError> {
        let codes = self
            .codes
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let payload = match c.payload_b64 {
                    Some(p) => decode_b64(&format!("entry.codes[{i}].payload_b64"), &p)?,
                    None => Vec::new(),
                };
                Ok(DynamoCodeEntry {
                    python_module: c.python_module,
                    function_names: c.function_names,
                    backend_ids: c.backend_ids,
                    code_source: c.code_source,
                    install_to_global: c.install_to_global,
                    has_compile_id: c.has_compile_id,
                    bypassed: c.bypassed,
                    bypass_reason: c.bypassed.then(|| {
                        let reason = c.bypass_reason.unwrap_or_default();
                        reason.chars().take(MAX_BYPASS_REASON_CHARS).collect()
                    }),
                    payload,
                })
            })
            .collect::<Result<_, RequestError>>()?;
        let extra = match self.extra_b64 {
            Some(e) => decode_b64("entry.extra_b64", &e)?,
            None => Vec::new(),
        };
        Ok(DynamoCacheEntry {
            extra,
            codes,
            source_info: self.source_info,
            device_type: self.device_type,
            system_info: self.system_info,
            fn_name: self.fn_name,
            fn_first_lineno: self.fn_first_lineno,
        })
    }
}

impl WireCacheEntry {
    /// The stitched entry, with every base64 field decoded.
    pub fn into_stitched(self) -> Result<StitchedEntry, RequestError> {
        let dynamo = self.dynamo.into_entry()?;
        let backends = self
            .backends
            .into_iter()
            .map(|(id, b)| {
                let content =
                    decode_b64(&format!("entry.backends.{id}.content_b64"), &b.content_b64)?;
                let artifact = Artifact {
                    key: id.clone(),
                    kind: b.kind,
                    content,
                };
                Ok((id, artifact))
            })
            .collect::<Result<_, RequestError>>()?;
        Ok(PrecompileCacheEntry { dynamo, backends })
    }
}
