//! Where a request acts: which named context (PyTorch's per-process `PrecompileContext`) and
//! which namespace of the shared dynamo cache (one per cache directory, tenant or job).
//!
//! One data directory holds many contexts and one dynamo cache with many namespaces, all in
//! one log and one hash chain. The context and namespace called `default` are what a data
//! directory held before either existed, so their events are stored exactly as they always
//! were; everything else is wrapped in [`crate::core::event::Event::Scoped`].

use serde::{Deserialize, Serialize};

/// The name of the default context and of the default namespace.
pub const DEFAULT: &str = "default";

/// A context and a namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scope {
    pub context: String,
    pub namespace: String,
    /// The client's id of the request being decided, if it gave one (not a place, but carried
    /// with the request's scope to the events it stages: [`crate::core::event::Event::Requested`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// A digest of the request that carried `request_id` (its op, fields, context and
    /// namespace): a retry must be the same request, and another request under the same id is
    /// refused instead of being answered "already applied".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_fingerprint: Option<crate::core::model::Digest>,
    /// Who sent the request, as the server's socket says (`unix socket: uid 1000, pid 4242`,
    /// `tcp 127.0.0.1:53422`), not as the client claims: recorded in the origin of the events
    /// it writes, so that a log written through one server still says who changed what. Not
    /// part of the request's fingerprint: a retry from another connection is the same request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

impl Default for Scope {
    fn default() -> Scope {
        Scope {
            context: DEFAULT.into(),
            namespace: DEFAULT.into(),
            request_id: None,
            request_fingerprint: None,
            peer: None,
        }
    }
}

impl Scope {
    /// Both default: events are stored unwrapped.
    pub fn is_default(&self) -> bool {
        self.context == DEFAULT && self.namespace == DEFAULT
    }
}

/// Whether `name` may name a context or a namespace: `[A-Za-z0-9_.:@+-]{1,128}` (printable,
/// no path separators or spaces, so it reads the same in a log line, a shell and a URL).
pub fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@+-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["default", "torch@host:123:456", "a", "x.y-z+1_2"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "a/b", "a b", "ä", &"x".repeat(129)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
