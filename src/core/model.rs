//! The precompile context's data: plain values and pure functions, no IO.
//!
//! These mirror PyTorch's `torch/_dynamo/package.py` types closely enough that a reader of
//! either can find the other; the differences are the documented fixes in
//! `reference/SEMANTICS.md` (an entry must have at least one code; a stitch never mutates the
//! recorded entry).

use std::fmt;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

/// A backend artifact's key, e.g. `__compiled_fn_3_5b0c…`.
pub type BackendId = String;

/// The kind PyTorch calls `EagerCacheArtifact`: `after_deserialization` is the identity.
pub const EAGER_KIND: &str = "eager";

/// The most characters a bypass reason keeps (PyTorch's limit).
pub const MAX_BYPASS_REASON_CHARS: usize = 2048;

/// A blake3 digest of artifact content: the address of the content in the blob store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Lower-case hex, the form shown to people and in JSON.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

// Digests are stored as MessagePack binary (32 bytes), not as an array of 32 integers.
impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    /// Read in place: every record and snapshot holds digests, and a buffer for each was a
    /// tenth of a snapshot's decoding.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Bytes32;
        impl<'de> serde::de::Visitor<'de> for Bytes32 {
            type Value = Digest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 32-byte blake3 digest")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Digest, E> {
                v.try_into()
                    .map(Digest)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Digest, A::Error> {
                let mut out = [0u8; 32];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(33, &self));
                }
                Ok(Digest(out))
            }
        }
        d.deserialize_bytes(Bytes32)
    }
}

/// A backend artifact with its content: what callers record and get back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    pub key: BackendId,
    pub kind: String,
    pub content: Vec<u8>,
}

/// What the state keeps of an artifact: its kind and where its content lives.
///
/// Content is read from the blob store on demand, so the state's size does not grow with the
/// size of the artifacts (compiled kernels are megabytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    pub kind: String,
    pub digest: Digest,
    pub size: u64,
}

/// Versions of the software that produced an entry; a mismatch on load is an error.
///
/// Unknown fields are refused (here and in [`SourceInfo`] and [`InlinedSource`]): clients
/// send these as they are, so a misspelt field would be dropped without a word. Records are
/// written by these same types, so no stored one carries a field they lack.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemInfo {
    #[serde(default)]
    pub python_version: String,
    #[serde(default)]
    pub torch_version: String,
    #[serde(default)]
    pub toolkit_version: Option<String>,
    #[serde(default)]
    pub triton_version: Option<String>,
    #[serde(default)]
    pub gpu_name: Option<String>,
}

impl SystemInfo {
    /// The device types whose toolkit, Triton and GPU are compared (torch 2.10's
    /// `SystemInfo.CHECK_GPUS`).
    pub const CHECK_GPUS: [&'static str; 2] = ["cuda", "xpu"];

    /// PyTorch 2.10's `SystemInfo.check_compatibility`, with its messages: `self` is the
    /// package's info, `current` the loader's. Python and torch versions always; for `cuda`
    /// and `xpu` also the toolkit, Triton (skipped when the loader has none: torch's `(0, 0)`,
    /// which a client sends as null or `"(0, 0)"`) and the GPU name (skipped when the loader's
    /// is null). torch also raises when the device is not available in the loading process;
    /// pcx cannot know that, so the client checks it.
    pub fn check_compatibility(
        &self,
        current: &SystemInfo,
        device_type: &str,
    ) -> Result<(), String> {
        let none = |v: &Option<String>| v.clone().unwrap_or_else(|| "None".into());
        if self.python_version != current.python_version {
            return Err(format!(
                "Compile package was created with a different Python version: {}",
                self.python_version
            ));
        }
        if self.torch_version != current.torch_version {
            return Err(format!(
                "Compile package was created with a different PyTorch version: {}",
                self.torch_version
            ));
        }
        if Self::CHECK_GPUS.contains(&device_type) {
            if self.toolkit_version != current.toolkit_version {
                return Err(format!(
                    "Compile package was created with a different toolkit version: {}",
                    none(&self.toolkit_version)
                ));
            }
            let loader_has_triton = current
                .triton_version
                .as_deref()
                .is_some_and(|t| t != "(0, 0)");
            if loader_has_triton && self.triton_version != current.triton_version {
                return Err(format!(
                    "Compile package was created with a different Triton version: {}",
                    none(&self.triton_version)
                ));
            }
            if current.gpu_name.is_some() && self.gpu_name != current.gpu_name {
                return Err(format!(
                    "Compile package was created with different GPU: cached={}, current={}",
                    none(&self.gpu_name),
                    none(&current.gpu_name)
                ));
            }
        }
        Ok(())
    }
}

/// One inlined source file of an entry, with its checksum.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InlinedSource {
    pub module: String,
    pub firstlineno: i64,
    pub lastlineno: i64,
    pub checksum: String,
}

/// The sources inlined into an entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    #[serde(default)]
    pub inlined_sources: Vec<InlinedSource>,
}

/// One code object of a dynamo cache entry (PyTorch's `_DynamoCodeCacheEntry`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DynamoCodeEntry {
    pub python_module: String,
    pub function_names: Vec<String>,
    pub backend_ids: Vec<BackendId>,
    pub code_source: Option<String>,
    pub install_to_global: bool,
    pub has_compile_id: bool,
    pub bypassed: bool,
    pub bypass_reason: Option<String>,
    /// Serialized bytecode and guards: opaque, never interpreted.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// One top-level function's dynamo cache entry (PyTorch's `_DynamoCacheEntry`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DynamoCacheEntry {
    pub codes: Vec<DynamoCodeEntry>,
    pub source_info: SourceInfo,
    pub device_type: String,
    pub system_info: SystemInfo,
    pub fn_name: Option<String>,
    pub fn_first_lineno: Option<i64>,
    /// What PyTorch's entry carries beyond the fields pcx reads (e.g. inlined sources' text,
    /// the exact `SystemInfo`), kept as opaque bytes so a load gives back exactly what was
    /// recorded. Absent from the encoding when empty, so entries without it are stored byte
    /// for byte as before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "serde_bytes")]
    pub extra: Vec<u8>,
}

/// An entry is rejected at record time when it cannot be stitched (PyTorch only fails later,
/// inside the stitch: a documented fix).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEntry {
    #[error("a dynamo cache entry needs at least one code; this one has none")]
    NoCodes,
    #[error("{field} is {size} bytes, over the limit of {limit} bytes (max_content_bytes)")]
    TooLarge {
        field: String,
        size: u64,
        limit: u64,
    },
}

impl DynamoCacheEntry {
    /// Checks the entry can be recorded.
    pub fn validate(&self) -> Result<(), InvalidEntry> {
        if self.codes.is_empty() {
            return Err(InvalidEntry::NoCodes);
        }
        Ok(())
    }

    /// Checks the entry's content against `limit` (`max_content_bytes`): each code's payload
    /// and source, and all of them together, as an artifact's content is. An entry is stored
    /// whole in its event and again in snapshots and the dynamo cache, so without a bound one
    /// 100 MiB payload grew a data directory by 506 MB. (Names and ids are bounded only by
    /// the request's size.)
    pub fn check_size(&self, limit: u64) -> Result<(), InvalidEntry> {
        let mut total: u64 = 0;
        for (i, code) in self.codes.iter().enumerate() {
            let source = code.code_source.as_deref().unwrap_or_default();
            for (name, size) in [
                ("payload", code.payload.len()),
                ("code_source", source.len()),
            ] {
                let size = size as u64;
                if size > limit {
                    return Err(InvalidEntry::TooLarge {
                        field: format!("codes[{i}].{name}"),
                        size,
                        limit,
                    });
                }
                total = total.saturating_add(size);
            }
        }
        let extra = self.extra.len() as u64;
        if extra > limit {
            return Err(InvalidEntry::TooLarge {
                field: "extra".into(),
                size: extra,
                limit,
            });
        }
        total = total.saturating_add(extra);
        if total > limit {
            return Err(InvalidEntry::TooLarge {
                field: "codes[*] and extra (payloads, sources and extra together)".into(),
                size: total,
                limit,
            });
        }
        Ok(())
    }

    /// The union of every code's backend ids, in order of first appearance.
    pub fn backend_ids(&self) -> Vec<BackendId> {
        let mut seen = indexmap::IndexSet::new();
        for code in &self.codes {
            for id in &code.backend_ids {
                seen.insert(id.clone());
            }
        }
        seen.into_iter().collect()
    }

    /// PyTorch's `_DynamoCacheEntry.debug_info()`, field for field.
    pub fn debug_info(&self) -> EntryDebugInfo {
        EntryDebugInfo {
            num_codes: self.codes.len().to_string(),
            fn_name: self.fn_name.clone(),
            fn_first_lineno: self.fn_first_lineno,
            device_type: self.device_type.clone(),
            backend_ids: self.backend_ids(),
            key: None,
        }
    }
}

/// One entry's line in `debug_info`; `key` is added by `dump_debug_info` (and comes last).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryDebugInfo {
    pub num_codes: String,
    pub fn_name: Option<String>,
    pub fn_first_lineno: Option<i64>,
    pub device_type: String,
    pub backend_ids: Vec<BackendId>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key: Option<String>,
}

/// `dump_debug_info`'s answer: empty lists are left out, so an empty context gives `{}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugInfo {
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub dynamo: Vec<EntryDebugInfo>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub backends: Vec<BackendId>,
}

/// Builds `debug_info` from the two maps, in their order.
pub fn dump_debug_info<'a, A: 'a>(
    entries: impl IntoIterator<Item = (&'a String, &'a DynamoCacheEntry)>,
    artifacts: impl IntoIterator<Item = (&'a String, A)>,
) -> DebugInfo {
    DebugInfo {
        dynamo: entries
            .into_iter()
            .map(|(key, entry)| {
                let mut info = entry.debug_info();
                info.key = Some(key.clone());
                info
            })
            .collect(),
        backends: artifacts.into_iter().map(|(key, _)| key.clone()).collect(),
    }
}

/// A stitched entry: the dynamo entry (possibly with bypassed codes) and the backends it
/// references that were present, in order of first reference. `B` is what a backend is at
/// that point: a reference into the blob store, or content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrecompileCacheEntry<B> {
    pub dynamo: DynamoCacheEntry,
    pub backends: IndexMap<BackendId, B>,
}

/// A code that a stitch bypassed because one of its backends was missing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bypass {
    pub code_index: u32,
    pub missing_backend: BackendId,
}

/// The reason text PyTorch gives a bypassed code, cut to its limit.
pub fn bypass_reason(missing: &str) -> String {
    let reason = format!("backend artifact {missing} missing at save time");
    reason.chars().take(MAX_BYPASS_REASON_CHARS).collect()
}

/// Stitches one entry (PyTorch's `PrecompileCacheEntry.from_cache_entry`) without touching
/// the recorded entry: the returned copy carries the bypass marks.
///
/// For each code, its backend ids are taken in order until the first missing one; that code is
/// then bypassed and the rest of its ids skipped. Other codes are unaffected.
pub fn stitch_entry<B: Clone>(
    entry: &DynamoCacheEntry,
    lookup: impl Fn(&str) -> Option<B>,
) -> (PrecompileCacheEntry<B>, Vec<Bypass>) {
    let mut dynamo = entry.clone();
    let mut backends = IndexMap::new();
    let mut bypasses = Vec::new();
    for (index, code) in dynamo.codes.iter_mut().enumerate() {
        for id in &code.backend_ids {
            match lookup(id) {
                Some(b) => {
                    backends.entry(id.clone()).or_insert(b);
                }
                None => {
                    code.bypassed = true;
                    code.bypass_reason = Some(bypass_reason(id));
                    bypasses.push(Bypass {
                        code_index: u32::try_from(index).unwrap_or(u32::MAX),
                        missing_backend: id.clone(),
                    });
                    break;
                }
            }
        }
    }
    (PrecompileCacheEntry { dynamo, backends }, bypasses)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(ids: &[&str]) -> DynamoCodeEntry {
        DynamoCodeEntry {
            backend_ids: ids.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn entry(codes: Vec<DynamoCodeEntry>) -> DynamoCacheEntry {
        DynamoCacheEntry {
            codes,
            device_type: "cpu".into(),
            fn_name: Some("f".into()),
            fn_first_lineno: Some(3),
            ..Default::default()
        }
    }

    #[test]
    fn debug_info_counts_codes_as_a_string_and_unions_backend_ids() {
        let e = entry(vec![code(&["b1", "b2"]), code(&["b3", "b1"])]);
        let info = e.debug_info();
        assert_eq!(info.num_codes, "2");
        assert_eq!(info.backend_ids, vec!["b1", "b2", "b3"]);
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(
            json,
            r#"{"num_codes":"2","fn_name":"f","fn_first_lineno":3,"device_type":"cpu","backend_ids":["b1","b2","b3"]}"#
        );
    }

    #[test]
    fn empty_debug_info_serializes_to_an_empty_object() {
        let empty: Vec<(&String, &DynamoCacheEntry)> = Vec::new();
        let arts: Vec<(&String, ())> = Vec::new();
        let info = dump_debug_info(empty, arts);
        assert_eq!(serde_json::to_string(&info).unwrap(), "{}");
    }

    #[test]
    fn a_missing_backend_bypasses_only_its_code_and_stops_scanning_it() {
        let e = entry(vec![
            code(&["b1", "b2"]),
            code(&["b1", "b3", "b2"]),
            code(&["b2"]),
        ]);
        let present = ["b1", "b2"];
        let (stitched, bypasses) =
            stitch_entry(&e, |id| present.contains(&id).then(|| id.to_string()));
        let flags: Vec<bool> = stitched.dynamo.codes.iter().map(|c| c.bypassed).collect();
        assert_eq!(flags, vec![false, true, false]);
        assert_eq!(
            stitched.dynamo.codes[1].bypass_reason.as_deref(),
            Some("backend artifact b3 missing at save time")
        );
        assert_eq!(
            stitched.backends.keys().collect::<Vec<_>>(),
            vec!["b1", "b2"]
        );
        assert_eq!(
            bypasses,
            vec![Bypass {
                code_index: 1,
                missing_backend: "b3".into()
            }]
        );
        // The recorded entry is untouched.
        assert!(e
            .codes
            .iter()
            .all(|c| !c.bypassed && c.bypass_reason.is_none()));
    }

    #[test]
    fn ids_after_the_missing_one_are_skipped_even_if_present() {
        let e = entry(vec![code(&["gone", "b1"])]);
        let (stitched, _) = stitch_entry(&e, |id| (id == "b1").then_some(()));
        assert!(stitched.backends.is_empty());
    }

    #[test]
    fn bypass_reason_is_cut_at_2048_chars() {
        let long = "x".repeat(5000);
        assert_eq!(
            bypass_reason(&long).chars().count(),
            MAX_BYPASS_REASON_CHARS
        );
    }

    #[test]
    fn an_entry_without_codes_is_invalid() {
        assert_eq!(entry(vec![]).validate(), Err(InvalidEntry::NoCodes));
        assert_eq!(entry(vec![code(&[])]).validate(), Ok(()));
    }

    #[test]
    fn an_entry_whose_content_is_over_the_limit_is_too_large() {
        let with = |payload: usize, source: Option<usize>| DynamoCodeEntry {
            payload: vec![0; payload],
            code_source: source.map(|n| "x".repeat(n)),
            ..Default::default()
        };
        assert_eq!(entry(vec![with(4, Some(4))]).check_size(8), Ok(()));
        let err = entry(vec![with(1, None), with(9, None)]).check_size(8);
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err(
                "codes[1].payload is 9 bytes, over the limit of 8 bytes (max_content_bytes)".into()
            )
        );
        let err = entry(vec![with(0, Some(9))]).check_size(8).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("codes[0].code_source is 9 bytes"),
            "{err}"
        );
        let err = entry(vec![with(5, None), with(4, None)])
            .check_size(8)
            .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "codes[*] and extra (payloads, sources and extra together) is 9 bytes"
            ),
            "{err}"
        );
        let mut big_extra = entry(vec![with(1, None)]);
        big_extra.extra = vec![0; 9];
        let err = big_extra.check_size(8).unwrap_err();
        assert!(err.to_string().starts_with("extra is 9 bytes"), "{err}");
        big_extra.extra = vec![0; 8];
        let err = big_extra.check_size(8).unwrap_err();
        assert!(err.to_string().contains("together) is 9 bytes"), "{err}");
    }

    #[test]
    fn torch_version_mismatch_uses_pytorchs_words() {
        let saved = SystemInfo {
            python_version: "3.11".into(),
            torch_version: "2.10".into(),
            ..Default::default()
        };
        let now = SystemInfo {
            torch_version: "2.9".into(),
            ..saved.clone()
        };
        assert_eq!(
            saved.check_compatibility(&now, "cpu"),
            Err("Compile package was created with a different PyTorch version: 2.10".into())
        );
        assert_eq!(saved.check_compatibility(&saved, "cuda"), Ok(()));
    }

    /// torch 2.10's `check_compatibility`: which fields count for which device, when Triton
    /// and the GPU name are skipped, and its words.
    #[test]
    fn the_system_check_follows_torch_2_10() {
        let saved = SystemInfo {
            python_version: "3.11".into(),
            torch_version: "2.10".into(),
            toolkit_version: Some("12.8".into()),
            triton_version: Some("(3, 4)".into()),
            gpu_name: Some("H100".into()),
        };
        let other = |f: &dyn Fn(&mut SystemInfo)| {
            let mut o = saved.clone();
            f(&mut o);
            o
        };
        // Toolkit, Triton and GPU count only for cuda and xpu.
        let new_toolkit = other(&|o| o.toolkit_version = Some("13.0".into()));
        assert_eq!(saved.check_compatibility(&new_toolkit, "cpu"), Ok(()));
        for device in ["cuda", "xpu"] {
            assert_eq!(
                saved.check_compatibility(&new_toolkit, device),
                Err("Compile package was created with a different toolkit version: 12.8".into())
            );
        }
        let new_triton = other(&|o| o.triton_version = Some("(3, 5)".into()));
        assert_eq!(
            saved.check_compatibility(&new_triton, "xpu"),
            Err("Compile package was created with a different Triton version: (3, 4)".into())
        );
        // A loader without Triton (torch's (0, 0)) does not compare it.
        for none in [None, Some("(0, 0)".into())] {
            let no_triton = other(&|o| o.triton_version = none.clone());
            assert_eq!(saved.check_compatibility(&no_triton, "cuda"), Ok(()));
        }
        let new_gpu = other(&|o| o.gpu_name = Some("A100".into()));
        assert_eq!(
            saved.check_compatibility(&new_gpu, "cuda"),
            Err("Compile package was created with different GPU: cached=H100, current=A100".into())
        );
        // A loader that names no GPU does not compare it.
        let no_gpu = other(&|o| o.gpu_name = None);
        assert_eq!(saved.check_compatibility(&no_gpu, "cuda"), Ok(()));
    }
}
