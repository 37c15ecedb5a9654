//! PyTorch's own artifact kinds for pcx: `torch.bundled_aot_autograd` (AOTAutograd's
//! `BundledAOTAutogradCacheArtifact`, what `torch.compile` records) and `torch.pickle` (any
//! other pickled backend artifact), as `pcx.torch` stores them: the artifact pickled whole.
//!
//! `after_deserialization` cannot build the Python object (only torch, in Python, can); it
//! checks that the bytes are one well-formed pickle, without running it ([`pickle::read`]),
//! that a `torch.bundled_aot_autograd` one is made from that class, and hands the bytes back
//! unchanged with a description (`protocol`, `class`, `size`, `opcodes`). pcx runs it when an
//! artifact is recorded too, so content that is not what its kind says is refused at record,
//! not found at load in another process.

pub mod pickle;

use pcx_plugin_abi::sdk::{Description, Plugin};

/// The class AOTAutograd's bundled artifacts are made from (torch 2.10).
pub const BUNDLED_CLASS: &str =
    "torch._functorch._aot_autograd.aot_autograd_result.BundledAOTAutogradCacheArtifact";

/// The largest pickle accepted (pcx's own `max_content_bytes` is usually the tighter bound).
pub const MAX_BYTES: usize = 1 << 32;

/// The checked bytes and their description.
pub struct Ready {
    pub bytes: Vec<u8>,
    pub json: String,
}

/// Checks `input` for `kind`; gives its description.
pub fn check(kind: &str, input: &[u8]) -> Result<String, String> {
    if input.len() > MAX_BYTES {
        return Err(format!(
            "the pickle is {} bytes, over {MAX_BYTES}",
            input.len()
        ));
    }
    let s = pickle::read(input).map_err(|e| format!("not a well-formed pickle: {e}"))?;
    if kind == "torch.bundled_aot_autograd" && s.class.as_deref() != Some(BUNDLED_CLASS) {
        return Err(format!(
            "a torch.bundled_aot_autograd artifact must be a pickled {BUNDLED_CLASS}; this \
             pickle is made from {} (record it as torch.pickle if that is what it is)",
            s.class.as_deref().unwrap_or("no class")
        ));
    }
    let class = match &s.class {
        Some(c) => format!("\"{}\"", c.replace('\\', "\\\\").replace('"', "\\\"")),
        None => "null".into(),
    };
    Ok(format!(
        "{{\"protocol\":{},\"class\":{class},\"size\":{},\"opcodes\":{}}}",
        s.protocol,
        input.len(),
        s.opcodes
    ))
}

pub struct TorchPickle;

impl Plugin for TorchPickle {
    type Value = Ready;
    const NAME: &'static str = "torch-pickle";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const KINDS: &'static [&'static str] = &["torch.bundled_aot_autograd", "torch.pickle"];
    const EDITS: &'static [&'static str] = &[];

    fn after_deserialization(kind: &str, input: &[u8]) -> Result<Ready, String> {
        let json = check(kind, input)?;
        Ok(Ready {
            bytes: input.to_vec(),
            json,
        })
    }

    fn describe(ready: &Ready) -> Result<Description<'_>, String> {
        Ok(Description {
            bytes: ready.bytes.as_slice().into(),
            json: ready.json.as_str().into(),
        })
    }

    fn edit(_kind: &str, op: &str, _args: &[u8], _content: &[u8]) -> Result<Vec<u8>, String> {
        Err(format!(
            "torch-pickle has no edit named `{op}` (it has none)"
        ))
    }
}

pcx_plugin_abi::export_plugin!(TorchPickle);
