//! Writing a plugin in Rust: implement [`Plugin`] and call [`export_plugin!`](crate::export_plugin).
//!
//! ```ignore
//! struct Upper;
//! impl pcx_plugin_abi::sdk::Plugin for Upper {
//!     type Value = Vec<u8>;
//!     const NAME: &'static str = "upper";
//!     const VERSION: &'static str = "0.1.0";
//!     const KINDS: &'static [&'static str] = &["upper_text"];
//!     fn after_deserialization(_kind: &str, input: &[u8]) -> Result<Vec<u8>, String> {
//!         Ok(input.to_ascii_uppercase())
//!     }
//!     fn describe(v: &Vec<u8>) -> Result<Description<'_>, String> {
//!         Ok(Description { bytes: v.into(), json: format!("{{\"len\":{}}}", v.len()).into() })
//!     }
//! }
//! pcx_plugin_abi::export_plugin!(Upper);
//! ```
//!
//! The SDK wraps every callback in `catch_unwind`: a panic becomes [`STATUS_PANIC`] with its
//! message, never an unwind across the C boundary. Plugins must be built with
//! `panic = "unwind"` (the default); `export_plugin!` refuses to compile otherwise.

use std::borrow::Cow;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::{
    PcxBytes, PcxErrorBuf, PcxSink, PluginDescriptor, Status, ABI_MAJOR, ABI_MINOR, CAP_EDIT,
    MAGIC, STATUS_ERROR, STATUS_OK, STATUS_PANIC, TARGET,
};

/// A value's ready-to-use bytes and a JSON object (as text) describing it.
///
/// Both may borrow from the value: a plugin that builds them in `after_deserialization`
/// hands them over without a copy (the host copies them into its own buffers anyway).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Description<'a> {
    pub bytes: Cow<'a, [u8]>,
    pub json: Cow<'a, str>,
}

/// A plugin: the artifact kinds it serves and what it does with them.
pub trait Plugin: 'static {
    /// The ready-to-use value `after_deserialization` makes.
    type Value: 'static;
    const NAME: &'static str;
    const VERSION: &'static str;
    /// Kind names, `[a-z0-9_.-]{1,64}`.
    const KINDS: &'static [&'static str];
    /// Names of the edit operations offered.
    const EDITS: &'static [&'static str] = &[];

    /// Stored bytes → the value (validating them).
    fn after_deserialization(kind: &str, input: &[u8]) -> Result<Self::Value, String>;
    /// The value's ready-to-use bytes and its JSON description.
    fn describe(value: &Self::Value) -> Result<Description<'_>, String>;
    /// A named edit of stored content.
    fn edit(kind: &str, op: &str, args: &[u8], content: &[u8]) -> Result<Vec<u8>, String> {
        let _ = (kind, args, content);
        Err(format!("plugin {} has no edit named `{op}`", Self::NAME))
    }
}

/// A descriptor and the arrays it points into, kept together for the life of the process.
pub struct StaticDescriptor {
    descriptor: PluginDescriptor,
    _kinds: Vec<PcxBytes>,
    _edits: Vec<PcxBytes>,
}

// SAFETY: the descriptor only points at `'static` strings and at the two vectors owned by the
// same value, which is never mutated after it is built.
unsafe impl Send for StaticDescriptor {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for StaticDescriptor {}

impl StaticDescriptor {
    /// The pointer the entry symbol returns.
    pub fn as_ptr(&self) -> *const PluginDescriptor {
        &self.descriptor
    }
}

/// Builds `P`'s descriptor.
pub fn build<P: Plugin>() -> StaticDescriptor {
    let kinds: Vec<PcxBytes> = P::KINDS
        .iter()
        .map(|k| PcxBytes::new(k.as_bytes()))
        .collect();
    let edits: Vec<PcxBytes> = P::EDITS
        .iter()
        .map(|k| PcxBytes::new(k.as_bytes()))
        .collect();
    let has_edits = !edits.is_empty();
    let descriptor = PluginDescriptor {
        magic: MAGIC,
        struct_size: std::mem::size_of::<PluginDescriptor>() as u32,
        abi_major: ABI_MAJOR,
        abi_minor: ABI_MINOR,
        name: PcxBytes::new(P::NAME.as_bytes()),
        version: PcxBytes::new(P::VERSION.as_bytes()),
        target: PcxBytes::new(TARGET.as_bytes()),
        kinds: kinds.as_ptr(),
        kind_count: kinds.len(),
        capabilities: if has_edits { CAP_EDIT } else { 0 },
        after_deserialization: Some(after_deserialization::<P>),
        describe: Some(describe::<P>),
        drop_value: Some(drop_value::<P>),
        edit_names: if has_edits {
            edits.as_ptr()
        } else {
            std::ptr::null()
        },
        edit_count: edits.len(),
        edit: if has_edits { Some(edit::<P>) } else { None },
    };
    StaticDescriptor {
        descriptor,
        _kinds: kinds,
        _edits: edits,
    }
}

/// Writes `message` into the host's error buffer, cut at a character boundary to fit.
///
/// # Safety
/// `err` must be null or point to a valid [`PcxErrorBuf`] whose `ptr` has `cap` writable bytes.
pub unsafe fn write_error(err: *mut PcxErrorBuf, message: &str) {
    // SAFETY: the caller guarantees `err` is null or valid.
    let Some(err) = (unsafe { err.as_mut() }) else {
        return;
    };
    if err.ptr.is_null() {
        return;
    }
    let mut n = message.len().min(err.cap);
    while !message.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: `ptr` has `cap >= n` writable bytes, and the regions cannot overlap (the
    // message is the plugin's, the buffer the host's).
    unsafe { std::ptr::copy_nonoverlapping(message.as_ptr(), err.ptr, n) };
    err.len = n;
}

/// Writes `bytes` to a host sink.
///
/// # Safety
/// `sink` must be null or point to a valid [`PcxSink`].
pub unsafe fn write_sink(sink: *mut PcxSink, bytes: &[u8]) -> Status {
    // SAFETY: the caller guarantees `sink` is null or valid.
    let Some(sink) = (unsafe { sink.as_mut() }) else {
        return STATUS_ERROR;
    };
    let Some(write) = sink.write else {
        return STATUS_ERROR;
    };
    // SAFETY: the host's function accepts any pointer to `len` readable bytes.
    unsafe { write(sink.ctx, bytes.as_ptr(), bytes.len()) }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic without a message".into())
}

/// Runs `f` with panics caught; errors and panics go into `err`.
unsafe fn guarded(err: *mut PcxErrorBuf, f: impl FnOnce() -> Result<Status, String>) -> Status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(status)) => status,
        Ok(Err(message)) => {
            // SAFETY: `err` comes from the host, valid for this call.
            unsafe { write_error(err, &message) };
            STATUS_ERROR
        }
        Err(p) => {
            // SAFETY: as above.
            unsafe { write_error(err, &format!("plugin panicked: {}", panic_text(p.as_ref()))) };
            STATUS_PANIC
        }
    }
}

fn utf8<'a>(b: &'a [u8], what: &str) -> Result<&'a str, String> {
    std::str::from_utf8(b).map_err(|_| format!("{what} is not UTF-8"))
}

unsafe extern "C" fn after_deserialization<P: Plugin>(
    kind: PcxBytes,
    input: PcxBytes,
    value_out: *mut *mut c_void,
    err: *mut PcxErrorBuf,
) -> Status {
    // SAFETY: the host passes valid slices for the duration of the call and a valid out pointer.
    unsafe {
        guarded(err, || {
            let kind = utf8(kind.as_slice(), "kind")?;
            let value = P::after_deserialization(kind, input.as_slice())?;
            if value_out.is_null() {
                return Err("host passed a null value_out".into());
            }
            *value_out = Box::into_raw(Box::new(value)).cast();
            Ok(STATUS_OK)
        })
    }
}

unsafe extern "C" fn describe<P: Plugin>(
    value: *const c_void,
    bytes_out: *mut PcxSink,
    json_out: *mut PcxSink,
    err: *mut PcxErrorBuf,
) -> Status {
    // SAFETY: `value` is a handle this plugin made in `after_deserialization` and has not
    // dropped; sinks are valid for the call.
    unsafe {
        guarded(err, || {
            let value = value
                .cast::<P::Value>()
                .as_ref()
                .ok_or("host passed a null value")?;
            let d = P::describe(value)?;
            for (sink, bytes) in [(bytes_out, d.bytes.as_ref()), (json_out, d.json.as_bytes())] {
                let status = write_sink(sink, bytes);
                if status != STATUS_OK {
                    return Ok(status);
                }
            }
            Ok(STATUS_OK)
        })
    }
}

unsafe extern "C" fn drop_value<P: Plugin>(value: *mut c_void) {
    if value.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the handle was made by `Box::into_raw` in `after_deserialization` and the
        // host drops each handle once.
        drop(unsafe { Box::from_raw(value.cast::<P::Value>()) });
    }));
}

unsafe extern "C" fn edit<P: Plugin>(
    kind: PcxBytes,
    op: PcxBytes,
    args: PcxBytes,
    content: PcxBytes,
    out: *mut PcxSink,
    err: *mut PcxErrorBuf,
) -> Status {
    // SAFETY: the host passes valid slices and sink for the duration of the call.
    unsafe {
        guarded(err, || {
            let kind = utf8(kind.as_slice(), "kind")?;
            let op = utf8(op.as_slice(), "edit name")?;
            let new = P::edit(kind, op, args.as_slice(), content.as_slice())?;
            Ok(write_sink(out, &new))
        })
    }
}

/// Exports `$plugin` (a type implementing [`Plugin`]) as this library's plugin entry symbol.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[cfg(panic = "abort")]
        compile_error!(
            "pcx plugins must be built with panic = \"unwind\": a panic must become an error status, not abort the host"
        );

        /// The plugin entry symbol (ABI major 1).
        #[no_mangle]
        pub extern "C" fn pcx_plugin_entry_v1() -> *const $crate::PluginDescriptor {
            static DESCRIPTOR: ::std::sync::OnceLock<$crate::sdk::StaticDescriptor> = ::std::sync::OnceLock::new();
            DESCRIPTOR.get_or_init($crate::sdk::build::<$plugin>).as_ptr()
        }
    };
}
