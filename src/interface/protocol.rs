//! The JSON request/answer protocol that `pcx batch`, the CLI commands and the socket server
//! (through [`crate::interface::wire`]) speak. Parsing and answer building are pure; [`submit`] hands a request to the
//! context actor at once and returns the future of its answer, so callers can pipeline.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::actor::error::ContextError;
use crate::actor::{
    Audit, Clear, CompactLog, CreateCacheEntries, DumpDebugInfo, Edit, EditArtifact, ExportTo,
    GetArtifact, GetStats, InScope, LoadCacheEntry, RecordArtifact, RecordEntry, SaveToDynamoCache,
    TakeArtifact,
};
use crate::audit::query::{LogFilter, Query};
use crate::context::Context;
use crate::core::model::{Artifact, Digest, SystemInfo};
use crate::core::scope::{valid_name, Scope};
pub use crate::interface::answer::{
    artifact_json, entry_json, failed, ready, render, stitched_json, with_id, AnswerFuture,
};
use crate::interface::cache_protocol::{self, CacheOp};
use crate::interface::wire_request::eager;
pub use crate::interface::wire_request::{
    decode_b64, fields_of, RequestError, WireBackend, WireCacheEntry, WireCode, WireEdit,
    WireEntry, OPS,
};

/// One request.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    RecordArtifact {
        key: String,
        #[serde(default = "eager")]
        kind: String,
        content_b64: String,
    },
    RecordDynamoCacheEntry {
        key: String,
        entry: WireEntry,
    },
    EditArtifact {
        key: String,
        edit: WireEdit,
        /// Compare-and-set: the hex digest of the content the editor read (the `digest` that
        /// `serialize_artifact_by_key` answers); another content answers `conflict`.
        #[serde(default)]
        expected_digest: Option<String>,
    },
    SerializeArtifactByKey {
        key: String,
    },
    TakeArtifact {
        key: String,
    },
    Clear,
    DumpDebugInfo,
    /// `"trace": true` asks for the stitch's structured trace events in the answer.
    CreateCacheEntries {
        #[serde(default)]
        trace: bool,
    },
    SaveToDynamoCache {
        #[serde(default)]
        trace: bool,
    },
    LoadCacheEntry {
        key: String,
        #[serde(default)]
        system_info: Option<SystemInfo>,
    },
    /// Audit: events as log lines (all filters optional, bounds inclusive).
    Log {
        #[serde(flatten)]
        filter: LogFilter,
    },
    /// Audit: every event that touched a key.
    History {
        key: String,
    },
    /// Audit: the state right after an event (the latest when neither is given).
    State {
        #[serde(default)]
        at: Option<u64>,
        #[serde(default)]
        at_time: Option<String>,
        #[serde(default)]
        key: Option<String>,
    },
    /// Audit: what changed between two points.
    Diff {
        from: u64,
        to: u64,
    },
    /// Audit: walk and check the whole log.
    Verify,
    /// The whole log, as `pcx export` writes it, into the file `output` (an absolute path),
    /// written by whoever holds the context: a backup of a live server's log. Over a socket,
    /// only a client of the server's own user on its Unix socket may ask (the file is written
    /// with the server's rights).
    Export {
        output: String,
        #[serde(default)]
        content: crate::audit::export::ContentMode,
    },
    /// The log made to begin at event `before` (the events before it and the content only
    /// they used dropped, the state kept), as `pcx compact --before` does, while the context
    /// goes on serving. Over a socket, only a client of the server's own user on its Unix
    /// socket may ask (it deletes history).
    Compact {
        before: u64,
    },
    /// What the context has done since it started.
    Stats,
    /// Every context with something in it.
    ListContexts,
    /// The request's context and everything in it go.
    DropContext,
    /// One stitched entry into the request's namespace of the dynamo cache.
    PutCacheEntry {
        key: String,
        entry: WireCacheEntry,
    },
    /// A saved entry of the namespace, without side effects.
    GetCacheEntry {
        key: String,
    },
    DeleteCacheEntry {
        key: String,
    },
    ListCacheEntries,
    ClearDynamoCache,
    /// A request with `"context"` or `"namespace"` given: never read from the wire as such,
    /// made by [`parse_value`] from those fields.
    #[serde(skip)]
    Scoped {
        scope: Scope,
        request: Box<Request>,
    },
}

/// Parses one request line; gives the request and its `"id"` (echoed in the answer).
pub fn parse(line: &[u8]) -> (Option<Value>, Result<Request, RequestError>) {
    // Count values and nesting before building a tree: a line of tiny values would take
    // fifty times its size in memory.
    if let Err(e) = crate::interface::shape::check(&mut serde_json::Deserializer::from_slice(line))
    {
        return (None, Err(RequestError::BadJson(e.to_string())));
    }
    match serde_json::from_slice(line) {
        Ok(v) => parse_value(v),
        Err(e) => (None, Err(RequestError::BadJson(e.to_string()))),
    }
}

/// Parses one request already decoded to a JSON value (the socket server's frames).
pub fn parse_value(value: Value) -> (Option<Value>, Result<Request, RequestError>) {
    let Value::Object(mut map) = value else {
        return (None, Err(RequestError::NotAnObject));
    };
    let id = map.remove("id");
    if let Some((field, number)) = id.as_ref().and_then(wide_number) {
        let field = crate::interface::shape::field_path("id", &field);
        return (None, Err(RequestError::WideNumber { field, number }));
    }
    if let Some((field, number)) = wide_number_in(&map) {
        return (id, Err(RequestError::WideNumber { field, number }));
    }
    let scope = match take_scope(&mut map) {
        Ok(Some(mut scope)) => {
            if scope.request_id.is_some() {
                scope.request_fingerprint = Some(fingerprint(&map, &scope));
            }
            Some(scope)
        }
        Ok(None) => None,
        Err(e) => return (id, Err(e)),
    };
    let request = match map.get("op") {
        None => Err(RequestError::MissingField("missing field `op`".into())),
        Some(Value::String(op)) if !OPS.contains(&op.as_str()) => {
            Err(RequestError::UnknownOp(op.clone()))
        }
        Some(Value::String(op)) => match unknown_field(op, &map) {
            Some(field) => {
                let takes = fields_of(op).unwrap_or_default();
                Err(RequestError::Invalid(format!(
                    "field `{field}` is not one `{op}` takes (it takes {}{}id, request_id, \
                     context and namespace); nothing was applied",
                    takes.join(", "),
                    if takes.is_empty() { "" } else { ", " }
                )))
            }
            None => serde_json::from_value(Value::Object(map)).map_err(|e| {
                let message = e.to_string();
                if message.starts_with("missing field") {
                    RequestError::MissingField(message)
                } else {
                    RequestError::Invalid(message)
                }
            }),
        },
        Some(other) => Err(RequestError::Invalid(format!(
            "`op` must be a string, not {other}"
        ))),
    };
    let request = match (request, scope) {
        (Ok(r), Some(scope)) => Ok(Request::Scoped {
            scope,
            request: Box::new(r),
        }),
        (r, _) => r,
    };
    (id, request)
}

/// The first field of `map` (`op`, and the fields every request may carry, already taken
/// out) that `op` does not take.
fn unknown_field(op: &str, map: &Map<String, Value>) -> Option<String> {
    let takes = fields_of(op)?;
    map.keys()
        .find(|k| k.as_str() != "op" && !takes.contains(&k.as_str()))
        .cloned()
}

/// The digest of a request that carries a request id: its op and fields as sent (`id` and
/// `request_id` aside; object keys sorted, so key order does not count) and its context and
/// namespace. A retry sends the same request, so gets the same digest from either transport
/// (the socket's binary fields arrive here as base64 text, as batch's do).
fn fingerprint(map: &Map<String, Value>, scope: &Scope) -> Digest {
    fn text(h: &mut blake3::Hasher, tag: u8, s: &str) {
        h.update(&[tag]);
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    fn object(h: &mut blake3::Hasher, map: &Map<String, Value>) {
        h.update(b"{");
        h.update(&(map.len() as u64).to_le_bytes());
        let mut fields: Vec<_> = map.iter().collect();
        fields.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in fields {
            text(h, b'k', k);
            value(h, v);
        }
    }
    fn value(h: &mut blake3::Hasher, v: &Value) {
        match v {
            Value::Null => {
                h.update(b"n");
            }
            Value::Bool(b) => {
                h.update(if *b { b"T" } else { b"F" });
            }
            Value::Number(n) => text(h, b'#', &n.to_string()),
            Value::String(s) => text(h, b's', s),
            Value::Array(items) => {
                h.update(b"[");
                h.update(&(items.len() as u64).to_le_bytes());
                items.iter().for_each(|item| value(h, item));
            }
            Value::Object(map) => object(h, map),
        }
    }
    let mut h = blake3::Hasher::new();
    h.update(b"pcx request fingerprint 1\0");
    text(&mut h, b'c', &scope.context);
    text(&mut h, b'n', &scope.namespace);
    object(&mut h, map);
    Digest(*h.finalize().as_bytes())
}

/// The longest client request id: room for a UUID, a host name and a counter.
const MAX_REQUEST_ID: usize = 256;

/// Takes `"context"`, `"namespace"` and `"request_id"` out of a request: `None` when none is
/// given.
fn take_scope(map: &mut Map<String, Value>) -> Result<Option<Scope>, RequestError> {
    let mut scope = Scope::default();
    let mut given = false;
    match map.remove("request_id") {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) if (1..=MAX_REQUEST_ID).contains(&id.len()) => {
            scope.request_id = Some(id);
            given = true;
        }
        Some(other) => {
            return Err(RequestError::Invalid(format!(
                "field `request_id` must be a string of 1 to {MAX_REQUEST_ID} bytes, not {other}"
            )))
        }
    }
    for (field, slot) in [
        ("context", &mut scope.context),
        ("namespace", &mut scope.namespace),
    ] {
        match map.remove(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(name)) if valid_name(&name) => {
                *slot = name;
                given = true;
            }
            Some(other) => {
                return Err(RequestError::Invalid(format!(
                    "field `{field}` must be a name of 1 to 128 characters from \
                     [A-Za-z0-9_.:@+-], not {other}"
                )))
            }
        }
    }
    Ok(given.then_some(scope))
}

/// 2^63: floats at least this large in magnitude cannot be told from an integer literal
/// beyond 64 bits, which serde_json reads as the nearest float.
const WIDE: f64 = 9_223_372_036_854_775_808.0;

/// The first number in `value` the protocol cannot carry exactly, with its path within
/// `value` and the number as read.
///
/// JSON numbers are read as 64-bit integers or as floats; a wider integer (an id of
/// 18446744073709551616) becomes the nearest float and would be echoed as one. It cannot be
/// echoed exactly either: the socket speaks MessagePack, whose integers are 64 bits (and
/// serde_json's `arbitrary_precision` would change how every number in the build is held and
/// compared). So such numbers are refused, on every path, wherever they are.
fn wide_number(value: &Value) -> Option<(String, String)> {
    match value {
        Value::Number(n) if n.is_f64() && n.as_f64().is_some_and(|f| f.abs() >= WIDE) => {
            Some((String::new(), n.to_string()))
        }
        Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| {
            wide_number(v).map(|(f, n)| {
                (
                    crate::interface::shape::field_path(&format!("[{i}]"), &f),
                    n,
                )
            })
        }),
        Value::Object(map) => wide_number_in(map),
        _ => None,
    }
}

fn wide_number_in(map: &Map<String, Value>) -> Option<(String, String)> {
    map.iter().find_map(|(k, v)| {
        wide_number(v).map(|(f, n)| (crate::interface::shape::field_path(k, &f), n))
    })
}

/// Hands `request` to the context now (so requests queue in order and commit together) and
/// returns the future of its answer.
pub fn submit(ctx: &Context, request: Request) -> AnswerFuture {
    submit_from(ctx, request, None)
}

/// [`submit`] for a request that came from `peer` (who the server's socket says sent it; see
/// [`Scope::peer`]), named in the origin of the events it writes.
pub fn submit_from(ctx: &Context, request: Request, peer: Option<&str>) -> AnswerFuture {
    let (mut scope, request) = match request {
        Request::Scoped { scope, request } => (scope, *request),
        request => (Scope::default(), request),
    };
    scope.peer = peer.map(str::to_string);
    submit_in(ctx, scope, request)
}

/// [`submit`], deciding the context's requests in `scope`.
fn submit_in(ctx: &Context, scope: Scope, request: Request) -> AnswerFuture {
    let addr = ctx.addr().clone();
    macro_rules! send {
        ($msg:expr, $render:expr) => {{
            let fut = addr.send($msg);
            Box::pin(async move {
                let answer = fut.await.unwrap_or(Err(ContextError::Closed));
                render(answer, $render)
            })
        }};
    }
    // The context's own requests, decided in the request's scope.
    macro_rules! send_in {
        ($msg:expr, $render:expr) => {
            send!(
                InScope {
                    scope: scope.clone(),
                    msg: $msg
                },
                $render
            )
        };
    }
    match request {
        Request::Scoped { request, .. } => submit_in(ctx, scope, *request),
        Request::ListContexts => cache_protocol::submit(&addr, scope, CacheOp::ListContexts),
        Request::DropContext => cache_protocol::submit(&addr, scope, CacheOp::DropContext),
        Request::PutCacheEntry { key, entry } => match entry.into_stitched() {
            Ok(entry) => {
                let entry = Box::new(entry);
                cache_protocol::submit(&addr, scope, CacheOp::Put { key, entry })
            }
            Err(e) => ready(refused(&e)),
        },
        Request::GetCacheEntry { key } => {
            cache_protocol::submit(&addr, scope, CacheOp::Get { key })
        }
        Request::DeleteCacheEntry { key } => {
            cache_protocol::submit(&addr, scope, CacheOp::Delete { key })
        }
        Request::ListCacheEntries => cache_protocol::submit(&addr, scope, CacheOp::List),
        Request::ClearDynamoCache => cache_protocol::submit(&addr, scope, CacheOp::Clear),
        Request::Log { filter } => send!(
            Audit {
                query: Query::Log(filter)
            },
            Value::Object
        ),
        Request::History { key } => send!(
            Audit {
                query: Query::History {
                    key,
                    within: (&scope).into()
                }
            },
            Value::Object
        ),
        Request::State { at, at_time, key } => {
            send!(
                Audit {
                    query: Query::State {
                        at,
                        at_time,
                        key,
                        within: (&scope).into()
                    }
                },
                Value::Object
            )
        }
        Request::Diff { from, to } => send!(
            Audit {
                query: Query::Diff {
                    from,
                    to,
                    within: (&scope).into()
                }
            },
            Value::Object
        ),
        Request::Stats => send!(GetStats {}, |s: crate::actor::Stats| {
            let per_flush = if s.flushes == 0 {
                0.0
            } else {
                s.events_appended as f64 / s.flushes as f64
            };
            let mut stats = serde_json::to_value(s).unwrap_or_default();
            stats["events_per_flush"] = json!(per_flush);
            json!({ "stats": stats })
        }),
        Request::Verify => send!(
            Audit {
                query: Query::Verify
            },
            Value::Object
        ),
        Request::Compact { before } => send!(CompactLog { before }, Value::Object),
        Request::Export { output, content } => {
            let output = std::path::PathBuf::from(output);
            if !output.is_absolute() {
                return ready(refused(&RequestError::Invalid(format!(
                    "`output` {} is not an absolute path: the file is written by the process \
                     that holds the context, whose working directory is not the client's",
                    output.display()
                ))));
            }
            send!(
                ExportTo {
                    output,
                    mode: content
                },
                Value::Object
            )
        }
        Request::RecordArtifact {
            key,
            kind,
            content_b64,
        } => match decode_b64("content_b64", &content_b64) {
            Ok(content) => send_in!(
                RecordArtifact {
                    artifact: Artifact { key, kind, content }
                },
                |_: ()| json!({})
            ),
            Err(e) => ready(refused(&e)),
        },
        Request::RecordDynamoCacheEntry { key, entry } => match entry.into_entry() {
            Ok(entry) => send_in!(RecordEntry { key, entry }, |_: ()| json!({})),
            Err(e) => ready(refused(&e)),
        },
        Request::EditArtifact {
            key,
            edit,
            expected_digest,
        } => {
            let (label, edit) = match edit {
                WireEdit::SetB64(b) => match decode_b64("edit.set_b64", &b) {
                    Ok(new) => ("set".to_string(), Edit::Apply(Box::new(move |_| Ok(new)))),
                    Err(e) => return ready(refused(&e)),
                },
                WireEdit::AppendB64(b) => match decode_b64("edit.append_b64", &b) {
                    Ok(suffix) => (
                        "append".to_string(),
                        Edit::Apply(Box::new(move |mut c: Vec<u8>| {
                            c.extend_from_slice(&suffix);
                            Ok(c)
                        })),
                    ),
                    Err(e) => return ready(refused(&e)),
                },
                WireEdit::Plugin { op, args_b64 } => {
                    match decode_b64("edit.plugin.args_b64", &args_b64) {
                        Ok(args) => (format!("plugin:{op}"), Edit::Plugin { op, args }),
                        Err(e) => return ready(refused(&e)),
                    }
                }
            };
            send_in!(
                EditArtifact {
                    key,
                    label,
                    edit,
                    expected: expected_digest
                },
                |_: ()| json!({})
            )
        }
        Request::SerializeArtifactByKey { key } => {
            send_in!(GetArtifact { key }, |a: Option<Artifact>| {
                // The digest is what a compare-and-set edit names as the content it read.
                let artifact = a.as_ref().map(|a| {
                    let mut v = artifact_json(a);
                    v["digest"] = json!(Digest::of(&a.content).to_hex());
                    v
                });
                json!({ "artifact": artifact })
            })
        }
        Request::TakeArtifact { key } => send_in!(TakeArtifact { key }, |a: Option<Artifact>| {
            json!({ "artifact": a.as_ref().map(artifact_json) })
        }),
        Request::Clear => send_in!(Clear {}, |_: ()| json!({})),
        Request::DumpDebugInfo => send_in!(DumpDebugInfo {}, |d| json!({ "debug_info": d })),
        Request::CreateCacheEntries { trace } => {
            send_in!(
                CreateCacheEntries { trace },
                move |s: crate::actor::Stitched| {
                    let entries: Map<String, Value> = s
                        .entries
                        .iter()
                        .map(|(k, e)| (k.clone(), stitched_json(e)))
                        .collect();
                    let mut answer = json!({ "debug_info": s.debug_info, "entries": entries });
                    if trace {
                        answer["trace"] = trace_json(&s.trace);
                    }
                    answer
                }
            )
        }
        Request::SaveToDynamoCache { trace } => {
            send_in!(
                SaveToDynamoCache { trace },
                move |s: crate::actor::Saved| {
                    let mut answer = json!({ "debug_info": s.debug_info, "saved": s.saved });
                    if trace {
                        answer["trace"] = trace_json(&s.trace);
                    }
                    answer
                }
            )
        }
        Request::LoadCacheEntry { key, system_info } => {
            send_in!(
                LoadCacheEntry { key, system_info },
                |l: crate::actor::Loaded| {
                    let deserialized: Map<String, Value> = l
                    .deserialized
                    .iter()
                    .map(|(id, d)| {
                        (
                            id.clone(),
                            json!({ "kind": d.kind, "plugin": d.served_by, "description": d.description, "content_b64": B64.encode(&d.content) }),
                        )
                    })
                    .collect();
                    {
                        let mut answer = json!({ "entry": stitched_json(&l.entry), "deserialized": deserialized, "saved_by": l.saved_by });
                        // Only in `system_check = "report"` mode, when the systems differ.
                        if let Some(m) = l.system_mismatch {
                            answer["system_mismatch"] = json!(m);
                        }
                        answer
                    }
                }
            )
        }
    }
}

/// Structured trace events as an answer carries them: `[{"name","payload"}]`, for a client to
/// re-emit through PyTorch's `trace_structured`.
fn trace_json(events: &[crate::core::stitch::Structured]) -> Value {
    Value::Array(
        events
            .iter()
            .map(|t| json!({ "name": t.name, "payload": t.payload }))
            .collect(),
    )
}

/// The answer to a request refused before it reached the context.
pub fn refused(e: &RequestError) -> Value {
    failed(e.kind(), &e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of(line: &str) -> &'static str {
        match parse(line.as_bytes()).1 {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        }
    }

    #[test]
    fn every_op_says_which_fields_it_takes() {
        for op in OPS {
            assert!(fields_of(op).is_some(), "fields_of({op}) is missing");
        }
    }

    #[test]
    fn malformed_lines_get_their_own_error_kinds() {
        assert_eq!(kind_of("{not json"), "bad_json");
        assert_eq!(kind_of("[1,2]"), "bad_json");
        assert_eq!(kind_of(r#"{"op":"fly"}"#), "unknown_op");
        assert_eq!(kind_of(r#"{"key":"k"}"#), "missing_field");
        assert_eq!(
            kind_of(r#"{"op":"record_artifact","key":"k"}"#),
            "missing_field"
        );
        assert_eq!(
            kind_of(r#"{"op":"record_artifact","key":5,"content_b64":""}"#),
            "invalid_request"
        );
        assert_eq!(kind_of(r#"{"op":"clear"}"#), "ok");
    }

    #[test]
    fn the_id_is_taken_out_and_echoed_first() {
        let (id, req) = parse(br#"{"op":"clear","id":"a1"}"#);
        assert_eq!(req, Ok(Request::Clear));
        let answer = with_id(id, json!({"ok": true}));
        assert_eq!(answer.to_string(), r#"{"id":"a1","ok":true}"#);
    }

    #[test]
    fn numbers_beyond_64_bits_are_refused_naming_their_field() {
        let refused = |line: &str| match parse(line.as_bytes()) {
            (id, Err(RequestError::WideNumber { field, .. })) => (id, field),
            other => panic!("{line}: {other:?}"),
        };
        assert_eq!(
            refused(r#"{"op":"clear","id":18446744073709551616}"#),
            (None, "id".into())
        );
        assert_eq!(
            refused(r#"{"op":"clear","id":[0,{"a":-9223372036854775809}]}"#),
            (None, "id[1].a".into())
        );
        assert_eq!(
            refused(r#"{"op":"diff","id":"x","from":1e300,"to":2}"#),
            (Some(json!("x")), "from".into())
        );
        for fine in [
            r#"{"op":"clear","id":18446744073709551615}"#,
            r#"{"op":"clear","id":-9223372036854775808}"#,
            r#"{"op":"clear","id":1.5}"#,
            r#"{"op":"clear","id":-9.2e18}"#,
        ] {
            assert_eq!(parse(fine.as_bytes()).1, Ok(Request::Clear), "{fine}");
        }
    }

    #[test]
    fn bad_base64_in_a_payload_names_the_field() {
        let (_, req) = parse(
            br#"{"op":"record_dynamo_cache_entry","key":"e","entry":{"device_type":"cpu","codes":[{"backend_ids":[],"payload_b64":"!!"}]}}"#,
        );
        let Ok(Request::RecordDynamoCacheEntry { entry, .. }) = req else {
            panic!("parsed: {req:?}")
        };
        let err = entry.into_entry().unwrap_err();
        assert_eq!(err.kind(), "bad_base64");
        assert!(
            err.to_string().contains("entry.codes[0].payload_b64"),
            "{err}"
        );
    }
}
