//! Answers as JSON: the envelope every answer has (`ok`, `seq`, or the error) and the shapes
//! of artifacts and entries in them. A leaf of the interface: the protocol's requests and the
//! cache operations both answer through it.

use std::future::Future;
use std::pin::Pin;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use indexmap::IndexMap;
use serde_json::{json, Map, Value};

use crate::actor::{Ack, Answer};
use crate::core::model::{Artifact, DynamoCacheEntry, PrecompileCacheEntry};

/// The answer to a request, as JSON (without the id).
pub type AnswerFuture = Pin<Box<dyn Future<Output = Value> + Send>>;

/// An answer known at once.
pub fn ready(value: Value) -> AnswerFuture {
    Box::pin(std::future::ready(value))
}

/// Renders an answer: `{"ok":true,"seq"?:N,…}` or `{"ok":false,"error":{kind,message}}`.
pub fn render<T>(answer: Answer<T>, value: impl FnOnce(T) -> Value) -> Value {
    match answer {
        Ok(Ack { seq, value: v }) => {
            let mut out = Map::new();
            out.insert("ok".into(), Value::Bool(true));
            if let Some(seq) = seq {
                out.insert("seq".into(), json!(seq));
            }
            if let Value::Object(fields) = value(v) {
                out.extend(fields);
            }
            Value::Object(out)
        }
        // A retry of a request applied before: a success, saying so.
        Err(crate::actor::error::ContextError::AlreadyApplied { request_id, taken }) => {
            let mut out = json!({ "ok": true, "already_applied": true, "request_id": request_id });
            if let Some(a) = taken {
                // A retried take: the artifact the first one took, as the first answer had it.
                out["artifact"] = artifact_json(&a);
            }
            out
        }
        Err(e) => failed(e.kind(), &e.to_string()),
    }
}

/// A failure's answer.
pub fn failed(kind: &str, message: &str) -> Value {
    json!({ "ok": false, "error": { "kind": kind, "message": message } })
}

/// Puts the request's id first in its answer.
pub fn with_id(id: Option<Value>, answer: Value) -> Value {
    match (id, answer) {
        (Some(id), Value::Object(fields)) => {
            let mut out = Map::new();
            out.insert("id".into(), id);
            out.extend(fields);
            Value::Object(out)
        }
        (_, answer) => answer,
    }
}

/// An artifact as JSON.
pub fn artifact_json(a: &Artifact) -> Value {
    json!({ "key": a.key, "kind": a.kind, "content_b64": B64.encode(&a.content) })
}

/// A dynamo cache entry as JSON (bytes as base64).
pub fn entry_json(e: &DynamoCacheEntry) -> Value {
    let codes: Vec<Value> = e
        .codes
        .iter()
        .map(|c| {
            json!({
                "backend_ids": c.backend_ids,
                "python_module": c.python_module,
                "function_names": c.function_names,
                "code_source": c.code_source,
                "install_to_global": c.install_to_global,
                "has_compile_id": c.has_compile_id,
                "bypassed": c.bypassed,
                "bypass_reason": c.bypass_reason,
                "payload_b64": B64.encode(&c.payload),
            })
        })
        .collect();
    let mut entry = json!({
        "fn_name": e.fn_name,
        "fn_first_lineno": e.fn_first_lineno,
        "device_type": e.device_type,
        "system_info": e.system_info,
        "source_info": e.source_info,
        "codes": codes,
    });
    // Only when present, so answers about entries without it read as they always did.
    if !e.extra.is_empty() {
        entry["extra_b64"] = json!(B64.encode(&e.extra));
    }
    entry
}

/// A stitched entry as JSON.
pub fn stitched_json(e: &PrecompileCacheEntry<Artifact>) -> Value {
    let backends: IndexMap<&String, Value> = e
        .backends
        .iter()
        .map(|(k, a)| (k, artifact_json(a)))
        .collect();
    json!({ "dynamo": entry_json(&e.dynamo), "backends": backends })
}
