//! The C ABI between pcx and its artifact-kind plugins (version 1), and a small SDK that turns
//! a plain Rust trait implementation into a plugin.
//!
//! # The ABI in one screen
//!
//! A plugin is a shared library exporting one symbol, [`ENTRY_SYMBOL`]
//! (`pcx_plugin_entry_v1`: the ABI major version is in the name), a C function taking nothing
//! and returning a pointer to a [`PluginDescriptor`] that stays valid for the life of the
//! process. The descriptor starts with [`MAGIC`] and its own size: the struct only ever grows
//! at the end, and a host reads only the fields that `struct_size` covers. Only plain C types
//! cross: byte slices ([`PcxBytes`]), opaque value handles, function pointers and integers.
//!
//! Memory: each side frees what it allocated. Bytes a plugin produces go through a
//! host-provided [`PcxSink`] (which enforces the host's size limit); error text goes into a
//! host-provided [`PcxErrorBuf`]; a value handle made by `after_deserialization` is released by
//! the plugin's own `drop_value`.
//!
//! Versioning: a host accepts a plugin whose major equals its own and whose minor is not
//! below the host's minimum. Minor versions only add fields at the end of the descriptor.
//! The C header with the same definitions is `include/pcx_plugin.h`.

use std::ffi::c_void;

pub mod sdk;

/// The first 8 bytes of every descriptor.
pub const MAGIC: [u8; 8] = *b"PCXPLUG\0";
/// The ABI major version: a plugin of another major is refused.
pub const ABI_MAJOR: u16 = 1;
/// The ABI minor version this crate writes.
pub const ABI_MINOR: u16 = 0;
/// The entry symbol, NUL-terminated, as `dlsym` wants it.
pub const ENTRY_SYMBOL: &[u8] = b"pcx_plugin_entry_v1\0";
/// The target triple this crate was compiled for.
pub const TARGET: &str = env!("PCX_PLUGIN_TARGET");

/// A callback's outcome.
pub type Status = i32;
/// Success.
pub const STATUS_OK: Status = 0;
/// Failure; the error buffer says why.
pub const STATUS_ERROR: Status = 1;
/// The plugin panicked (caught by the SDK); the error buffer has the message.
pub const STATUS_PANIC: Status = 2;
/// A sink refused bytes beyond the host's limit.
pub const STATUS_OUTPUT_LIMIT: Status = 3;

/// Capability flag: the plugin offers named edit operations.
pub const CAP_EDIT: u64 = 1;

/// A borrowed byte slice (UTF-8 where it holds a name). `ptr` may be null only if `len` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PcxBytes {
    pub ptr: *const u8,
    pub len: usize,
}

impl PcxBytes {
    /// A slice over `bytes` (which must outlive every use of the result).
    pub const fn new(bytes: &[u8]) -> PcxBytes {
        PcxBytes {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// The bytes.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes that live for `'a` (or `len` must be 0).
    pub unsafe fn as_slice<'a>(self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: the caller guarantees `ptr` points to `len` live bytes.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// Where a plugin writes output bytes: the host appends them to its own buffer and answers
/// [`STATUS_OUTPUT_LIMIT`] once the total would pass its limit.
#[repr(C)]
pub struct PcxSink {
    pub ctx: *mut c_void,
    pub write: Option<unsafe extern "C" fn(ctx: *mut c_void, ptr: *const u8, len: usize) -> Status>,
}

/// A host-owned buffer for error text: the plugin writes at most `cap` bytes of UTF-8 at
/// `ptr` and sets `len`.
#[repr(C)]
pub struct PcxErrorBuf {
    pub ptr: *mut u8,
    pub cap: usize,
    pub len: usize,
}

/// Stored bytes → the ready-to-use value. On success `*value_out` is a handle only the
/// plugin understands, released with `drop_value`.
pub type AfterDeserializationFn = unsafe extern "C" fn(
    kind: PcxBytes,
    input: PcxBytes,
    value_out: *mut *mut c_void,
    err: *mut PcxErrorBuf,
) -> Status;

/// A value's ready-to-use bytes (into `bytes_out`) and a JSON object describing it (into
/// `json_out`, UTF-8).
pub type DescribeFn = unsafe extern "C" fn(
    value: *const c_void,
    bytes_out: *mut PcxSink,
    json_out: *mut PcxSink,
    err: *mut PcxErrorBuf,
) -> Status;

/// Releases a value handle.
pub type DropValueFn = unsafe extern "C" fn(value: *mut c_void);

/// A named edit: `content` → new content (into `out`).
pub type EditFn = unsafe extern "C" fn(
    kind: PcxBytes,
    op: PcxBytes,
    args: PcxBytes,
    content: PcxBytes,
    out: *mut PcxSink,
    err: *mut PcxErrorBuf,
) -> Status;

/// The entry symbol's type.
pub type EntryFn = unsafe extern "C" fn() -> *const PluginDescriptor;

/// What a plugin is and can do (ABI 1.0). Fields are only ever added at the end.
#[repr(C)]
pub struct PluginDescriptor {
    pub magic: [u8; 8],
    /// `sizeof` this struct as the plugin was built: tells the host which fields exist.
    pub struct_size: u32,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub name: PcxBytes,
    pub version: PcxBytes,
    /// The target triple the plugin was built for (e.g. `x86_64-unknown-linux-gnu`).
    pub target: PcxBytes,
    /// The artifact kinds served: names matching `[a-z0-9_.-]{1,64}`.
    pub kinds: *const PcxBytes,
    pub kind_count: usize,
    /// [`CAP_EDIT`] and future flags.
    pub capabilities: u64,
    pub after_deserialization: Option<AfterDeserializationFn>,
    pub describe: Option<DescribeFn>,
    pub drop_value: Option<DropValueFn>,
    /// Names of the edit operations (meaningful with [`CAP_EDIT`]).
    pub edit_names: *const PcxBytes,
    pub edit_count: usize,
    pub edit: Option<EditFn>,
}
