//! Loading plugins (shared libraries speaking the ABI of `plugins/pcx-plugin-abi`) and calling
//! them safely. All of pcx's `unsafe` lives in this file.
//!
//! A library is loaded with `RTLD_NOW | RTLD_LOCAL` by canonical path and never unloaded
//! while the process runs (its code may be running on another thread, and values it made may
//! be alive). On Linux what is loaded is a private, sealed copy of the file's bytes (a
//! `memfd`), so a library overwritten in place while pcx runs does not change the code pcx is
//! running (the new file is loaded at the next start). Every check happens before any kind is registered: magic, struct size, ABI
//! version, target triple, non-null pointers, sane lengths, kind names. A plugin's failure at
//! run time (error status, panic, nonsense output, output over the limit) becomes a
//! [`PluginError`] naming the plugin, its version and the kind; the host goes on.

use std::cell::Cell;
use std::ffi::c_void;
use std::path::{Path, PathBuf};

use pcx_plugin_abi::{
    AfterDeserializationFn, DescribeFn, DropValueFn, EditFn, EntryFn, PcxBytes, PcxErrorBuf,
    PcxSink, PluginDescriptor, Status, ABI_MAJOR, CAP_EDIT, ENTRY_SYMBOL, MAGIC, STATUS_ERROR,
    STATUS_OK, STATUS_OUTPUT_LIMIT, STATUS_PANIC,
};

/// The oldest ABI minor this host accepts.
pub const MIN_ABI_MINOR: u16 = 0;
/// The target triple this host was built for; a plugin must match it.
pub const HOST_TARGET: &str = pcx_plugin_abi::TARGET;
/// At most this many kinds or edits per plugin.
const MAX_NAMES: usize = 64;
/// At most this many bytes in a plugin's name, version or target.
const MAX_LABEL: usize = 256;
/// The error text a plugin may write.
const ERROR_CAP: usize = 4096;
/// The largest JSON description accepted.
const MAX_DESCRIPTION: usize = 1 << 20;

mod description;
mod error;
mod trust;

pub use description::{Described, JsonObject};
pub use error::PluginError;
use trust::check_elf_extent;
pub use trust::{candidates, check_trusted};

/// A loaded, validated plugin.
pub struct LoadedPlugin {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub target: String,
    pub kinds: Vec<String>,
    pub edits: Vec<String>,
    after_deserialization: AfterDeserializationFn,
    describe: DescribeFn,
    drop_value: DropValueFn,
    edit: Option<EditFn>,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("kinds", &self.kinds)
            .finish()
    }
}

/// True for a kind (or edit) name pcx accepts: `[a-z0-9_.-]{1,64}`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

/// Loads the library at `path` and validates its descriptor. Registers nothing.
pub fn load(path: &Path) -> Result<LoadedPlugin, PluginError> {
    load_with_min_minor(path, MIN_ABI_MINOR)
}

/// [`load`], accepting only ABI minor versions from `min_minor` on (a host that relies on a
/// field a later minor added raises it).
pub fn load_with_min_minor(path: &Path, min_minor: u16) -> Result<LoadedPlugin, PluginError> {
    let meta = std::fs::metadata(path).map_err(|e| PluginError::Open {
        path: path.into(),
        message: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(PluginError::NotAFile { path: path.into() });
    }
    check_elf_extent(path, meta.len())?;
    let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
    // SAFETY: loading a library runs its initialisers with this process's rights. The caller
    // only passes files from the configured plugin directory (or the file `plugins check`
    // was asked about, in a child process), by canonical path: the operator chose to trust it.
    // The private copy holds the same bytes.
    let open = |from: &Path| unsafe { libloading::os::unix::Library::open(Some(from), flags) };
    let copy = private_copy(path, meta.len());
    let library = match copy.map(|(at, file)| (open(&at), file)) {
        Some((Ok(library), file)) => {
            // Kept open for the life of the process, as the library is never unloaded: the
            // dynamic loader knows a library by the name it was opened by, and a closed
            // descriptor's number, reused for the next plugin's copy, would make it hand
            // back this library instead of loading that one.
            std::mem::forget(file);
            Ok(library)
        }
        // No copy (no memfd here), or one the system will not map executable: the file.
        _ => open(path),
    }
    .map_err(|e| PluginError::Open {
        path: path.into(),
        message: e.to_string(),
    })?;
    // Never unloaded: values and code of the plugin may outlive any handle we could drop.
    let library: &'static libloading::os::unix::Library = Box::leak(Box::new(library));
    // SAFETY: the symbol is declared by the ABI as `EntryFn`; a library exporting a symbol of
    // this versioned name with another type is not one we can defend against.
    let entry: EntryFn = unsafe { library.get::<EntryFn>(ENTRY_SYMBOL) }
        .map(|s| *s)
        .map_err(|_| PluginError::NoEntry { path: path.into() })?;
    // SAFETY: calling the entry function the ABI defines; it takes nothing.
    let ptr = unsafe { entry() };
    // SAFETY: `ptr` came from the plugin's entry and, if non-null, points to its static
    // descriptor; `validate` checks size and alignment before reading fields.
    unsafe { validate(path, ptr, min_minor) }
}

/// A private copy of the library at `path` (at most `len` bytes), sealed against writes, and
/// the path to load it by (`/proc/self/fd/N`, valid while the file lives): what the process
/// maps then cannot change if the file on disk is overwritten in place. `None` where memfds
/// are not available, or the file cannot be read (loading it by path then says why).
#[cfg(target_os = "linux")]
fn private_copy(path: &Path, len: u64) -> Option<(PathBuf, std::fs::File)> {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd};

    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(len)
        .read_to_end(&mut bytes)
        .ok()?;
    let name = c"pcx-plugin";
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new
    // descriptor or -1. MFD_EXEC (Linux 6.3) is asked for where `vm.memfd_noexec` would
    // otherwise forbid mapping it executable; older kernels refuse the flag (EINVAL).
    let mut fd = unsafe { libc::memfd_create(name.as_ptr(), flags | libc::MFD_EXEC) };
    if fd < 0 {
        // SAFETY: as above.
        fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    }
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created here and is owned by nothing else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(&bytes).ok()?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor this function owns, with integer arguments; a refusal
    // leaves the copy unsealed, still private to this process.
    let _ = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    Some((
        PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())),
        file,
    ))
}

#[cfg(not(target_os = "linux"))]
fn private_copy(_: &Path, _: u64) -> Option<(PathBuf, std::fs::File)> {
    None
}

fn invalid(path: &Path, reason: impl Into<String>) -> PluginError {
    PluginError::Invalid {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Reads a UTF-8 label of at most `max` bytes.
///
/// # Safety
/// `b.ptr` must point to `b.len` readable bytes when non-null.
unsafe fn label(path: &Path, field: &str, b: PcxBytes, max: usize) -> Result<String, PluginError> {
    if b.len > max {
        return Err(invalid(
            path,
            format!("{field} is {} bytes long (at most {max})", b.len),
        ));
    }
    if b.ptr.is_null() && b.len > 0 {
        return Err(invalid(path, format!("{field} is a null pointer")));
    }
    // SAFETY: checked non-null with a sane length; the caller vouches for readability.
    let bytes = unsafe { b.as_slice() };
    String::from_utf8(bytes.to_vec()).map_err(|_| invalid(path, format!("{field} is not UTF-8")))
}

/// Reads an array of names.
///
/// # Safety
/// `ptr` must point to `count` `PcxBytes` when non-null and `count` is sane.
unsafe fn names(
    path: &Path,
    what: &str,
    ptr: *const PcxBytes,
    count: usize,
) -> Result<Vec<String>, PluginError> {
    if count > MAX_NAMES {
        return Err(invalid(
            path,
            format!("declares {count} {what} (at most {MAX_NAMES})"),
        ));
    }
    if count == 0 {
        return Ok(Vec::new());
    }
    if ptr.is_null() {
        return Err(invalid(path, format!("{what} is a null pointer")));
    }
    // SAFETY: non-null, count checked; the plugin's static array.
    let items = unsafe { std::slice::from_raw_parts(ptr, count) };
    let mut out = Vec::with_capacity(count);
    for (i, b) in items.iter().enumerate() {
        // SAFETY: each element is a slice in the plugin's static data.
        let name = unsafe { label(path, &format!("{what}[{i}]"), *b, 64) }?;
        if !valid_name(&name) {
            return Err(invalid(
                path,
                format!("{what}[{i}] `{name}` is not a valid name ([a-z0-9_.-]{{1,64}})"),
            ));
        }
        if out.contains(&name) {
            return Err(invalid(
                path,
                format!("{what}[{i}] `{name}` is listed twice"),
            ));
        }
        out.push(name);
    }
    Ok(out)
}

/// Checks a descriptor field by field.
///
/// # Safety
/// `ptr` is null or points to at least 12 readable bytes of a descriptor, and to
/// `struct_size` bytes if that is what it says.
unsafe fn validate(
    path: &Path,
    ptr: *const PluginDescriptor,
    min_minor: u16,
) -> Result<LoadedPlugin, PluginError> {
    if ptr.is_null() {
        return Err(PluginError::NullDescriptor { path: path.into() });
    }
    if (ptr as usize) % std::mem::align_of::<PluginDescriptor>() != 0 {
        return Err(invalid(path, "descriptor is misaligned"));
    }
    // Read the fixed head first: magic and size say whether the rest may be read.
    let head = ptr.cast::<u8>();
    let mut magic = [0u8; 8];
    // SAFETY: the caller guarantees the first 12 bytes are readable.
    unsafe { std::ptr::copy_nonoverlapping(head, magic.as_mut_ptr(), 8) };
    if magic != MAGIC {
        return Err(invalid(
            path,
            format!("wrong magic {magic:02x?} (expected \"PCXPLUG\\0\")"),
        ));
    }
    // SAFETY: as above; the size field follows the magic.
    let struct_size = unsafe { std::ptr::read_unaligned(head.add(8).cast::<u32>()) } as usize;
    let needed = std::mem::size_of::<PluginDescriptor>();
    if struct_size < needed {
        return Err(invalid(
            path,
            format!("struct_size {struct_size} is smaller than ABI 1.0's {needed} bytes"),
        ));
    }
    // SAFETY: the plugin declares at least `needed` bytes, and the pointer is aligned.
    let d = unsafe { &*ptr };
    if d.abi_major != ABI_MAJOR || d.abi_minor < min_minor {
        return Err(PluginError::Abi {
            path: path.into(),
            major: d.abi_major,
            minor: d.abi_minor,
            host_major: ABI_MAJOR,
            host_min_minor: min_minor,
        });
    }
    // SAFETY (this and the label/names calls below): the descriptor's slices point into the
    // plugin's static data; lengths are bounded before reading.
    let name = unsafe { label(path, "name", d.name, MAX_LABEL) }?;
    let version = unsafe { label(path, "version", d.version, MAX_LABEL) }?;
    let target = unsafe { label(path, "target", d.target, MAX_LABEL) }?;
    if name.is_empty() {
        return Err(invalid(path, "name is empty"));
    }
    if target != HOST_TARGET {
        return Err(PluginError::Target {
            path: path.into(),
            target,
            host: HOST_TARGET.into(),
        });
    }
    let (Some(after_deserialization), Some(describe), Some(drop_value)) =
        (d.after_deserialization, d.describe, d.drop_value)
    else {
        return Err(invalid(
            path,
            "after_deserialization, describe and drop_value must not be null",
        ));
    };
    let kinds = unsafe { names(path, "kinds", d.kinds, d.kind_count) }?;
    if kinds.is_empty() {
        return Err(invalid(path, "declares no kinds"));
    }
    let (edits, edit) = if d.capabilities & CAP_EDIT != 0 {
        let Some(edit) = d.edit else {
            return Err(invalid(
                path,
                "has the edit capability but a null edit function",
            ));
        };
        (
            unsafe { names(path, "edit_names", d.edit_names, d.edit_count) }?,
            Some(edit),
        )
    } else {
        (Vec::new(), None)
    };
    Ok(LoadedPlugin {
        path: path.into(),
        name,
        version,
        abi_major: d.abi_major,
        abi_minor: d.abi_minor,
        target,
        kinds,
        edits,
        after_deserialization,
        describe,
        drop_value,
        edit,
    })
}

/// A host buffer behind a [`PcxSink`], refusing bytes past `limit`.
struct SinkBuf {
    bytes: Vec<u8>,
    limit: usize,
    overflowed: bool,
    /// The length of a write the plugin made from a null pointer: bytes it said it gave but
    /// did not, so the output would be shorter than the plugin meant.
    null_write: Option<usize>,
}

unsafe extern "C" fn sink_write(ctx: *mut c_void, ptr: *const u8, len: usize) -> Status {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `ctx` is the `SinkBuf` this host made for this call and outlives it.
        let Some(buf) = (unsafe { ctx.cast::<SinkBuf>().as_mut() }) else {
            return STATUS_OUTPUT_LIMIT;
        };
        if ptr.is_null() && len > 0 {
            buf.null_write.get_or_insert(len);
            return STATUS_ERROR;
        }
        if buf.bytes.len().saturating_add(len) > buf.limit {
            buf.overflowed = true;
            return STATUS_OUTPUT_LIMIT;
        }
        // SAFETY: the plugin passes `len` readable bytes at `ptr`.
        buf.bytes
            .extend_from_slice(unsafe { PcxBytes { ptr, len }.as_slice() });
        STATUS_OK
    }));
    result.unwrap_or(STATUS_OUTPUT_LIMIT)
}

impl SinkBuf {
    fn new(limit: usize) -> SinkBuf {
        SinkBuf {
            bytes: Vec::new(),
            limit,
            overflowed: false,
            null_write: None,
        }
    }
    fn sink(&mut self) -> PcxSink {
        PcxSink {
            ctx: (self as *mut SinkBuf).cast(),
            write: Some(sink_write),
        }
    }
}

thread_local! {
    /// This thread's buffer for plugin error text, kept between calls: a call that succeeds
    /// (nearly every one) neither allocates nor clears one.
    static ERROR_BUF: Cell<Option<Box<[u8; ERROR_CAP]>>> = const { Cell::new(None) };
}

/// A host buffer for a plugin's error text (the thread's, or a new one when that is in use).
struct ErrorText {
    bytes: Option<Box<[u8; ERROR_CAP]>>,
    raw: PcxErrorBuf,
}

impl ErrorText {
    fn new() -> ErrorText {
        let bytes = ERROR_BUF
            .try_with(Cell::take)
            .ok()
            .flatten()
            .unwrap_or_else(|| Box::new([0; ERROR_CAP]));
        ErrorText {
            bytes: Some(bytes),
            raw: PcxErrorBuf {
                ptr: std::ptr::null_mut(),
                cap: ERROR_CAP,
                len: 0,
            },
        }
    }

    /// The buffer to hand to a plugin, valid while `self` lives (the bytes are boxed).
    fn buf(&mut self) -> *mut PcxErrorBuf {
        self.raw.ptr = self
            .bytes
            .as_mut()
            .map_or(std::ptr::null_mut(), |b| b.as_mut_ptr());
        self.raw.len = 0;
        &mut self.raw
    }

    fn text(&self) -> String {
        let n = self.raw.len.min(ERROR_CAP);
        let written = self.bytes.as_ref().map_or(&[][..], |b| &b[..n]);
        let text = String::from_utf8_lossy(written).into_owned();
        if text.is_empty() {
            "(no message)".into()
        } else {
            text
        }
    }
}

impl Drop for ErrorText {
    fn drop(&mut self) {
        if let Some(bytes) = self.bytes.take() {
            // Gone only while the thread itself is going away.
            let _ = ERROR_BUF.try_with(|c| c.set(Some(bytes)));
        }
    }
}

impl LoadedPlugin {
    fn failure(&self, kind: &str, status: Status, err: &ErrorText) -> PluginError {
        let (plugin, version, kind, message) = (
            self.name.clone(),
            self.version.clone(),
            kind.to_string(),
            err.text(),
        );
        if status == STATUS_PANIC {
            PluginError::Panicked {
                plugin,
                version,
                kind,
                message,
            }
        } else {
            PluginError::Failed {
                plugin,
                version,
                kind,
                message: format!("{message} (status {status})"),
            }
        }
    }

    /// A sink written from a null pointer (`what` names the sink), if one was.
    fn null_write(&self, kind: &str, what: &str, sink: &SinkBuf) -> Result<(), PluginError> {
        match sink.null_write {
            None => Ok(()),
            Some(len) => Err(PluginError::Failed {
                plugin: self.name.clone(),
                version: self.version.clone(),
                kind: kind.into(),
                message: format!(
                    "wrote {len} bytes from a null pointer into {what} (a length that lies)"
                ),
            }),
        }
    }

    fn overflow(&self, kind: &str, limit: usize) -> PluginError {
        PluginError::OutputLimit {
            plugin: self.name.clone(),
            version: self.version.clone(),
            kind: kind.into(),
            limit,
        }
    }

    /// Runs `after_deserialization` then `describe` on `input`, releasing the value after.
    /// Output over `limit` bytes is refused.
    pub fn deserialize(
        &self,
        kind: &str,
        input: &[u8],
        limit: usize,
    ) -> Result<Described, PluginError> {
        let mut err = ErrorText::new();
        let mut handle: *mut c_void = std::ptr::null_mut();
        // SAFETY: slices and buffers are valid for the call; the function pointer was checked
        // non-null when the plugin was loaded, and the library is never unloaded.
        let status = unsafe {
            (self.after_deserialization)(
                PcxBytes::new(kind.as_bytes()),
                PcxBytes::new(input),
                &mut handle,
                err.buf(),
            )
        };
        if status != STATUS_OK {
            return Err(self.failure(kind, status, &err));
        }
        if handle.is_null() {
            return Err(PluginError::Failed {
                plugin: self.name.clone(),
                version: self.version.clone(),
                kind: kind.into(),
                message: "after_deserialization reported success but gave no value".into(),
            });
        }
        let mut bytes = SinkBuf::new(limit);
        let mut json = SinkBuf::new(MAX_DESCRIPTION);
        let (mut bytes_sink, mut json_sink) = (bytes.sink(), json.sink());
        // SAFETY: `handle` is the plugin's live value; sinks point at buffers on this stack frame.
        let status = unsafe { (self.describe)(handle, &mut bytes_sink, &mut json_sink, err.buf()) };
        // SAFETY: released exactly once, by the plugin that made it.
        unsafe { (self.drop_value)(handle) };
        self.null_write(kind, "the bytes sink of describe", &bytes)?;
        self.null_write(kind, "the JSON sink of describe", &json)?;
        if bytes.overflowed {
            return Err(self.overflow(kind, limit));
        }
        if json.overflowed {
            return Err(self.overflow(kind, MAX_DESCRIPTION));
        }
        if status != STATUS_OK {
            return Err(self.failure(kind, status, &err));
        }
        let description = String::from_utf8(json.bytes)
            .ok()
            .and_then(JsonObject::parse)
            .ok_or_else(|| PluginError::Failed {
                plugin: self.name.clone(),
                version: self.version.clone(),
                kind: kind.into(),
                message: "describe did not give a JSON object".into(),
            })?;
        Ok(Described {
            bytes: bytes.bytes,
            description,
        })
    }

    /// Runs the named edit on `content`.
    pub fn edit(
        &self,
        kind: &str,
        op: &str,
        args: &[u8],
        content: &[u8],
        limit: usize,
    ) -> Result<Vec<u8>, PluginError> {
        let (Some(edit), true) = (self.edit, self.edits.iter().any(|e| e == op)) else {
            return Err(PluginError::NoSuchEdit {
                plugin: self.name.clone(),
                version: self.version.clone(),
                op: op.into(),
                available: if self.edits.is_empty() {
                    "none".into()
                } else {
                    self.edits.join(", ")
                },
            });
        };
        let mut err = ErrorText::new();
        let mut out = SinkBuf::new(limit);
        let mut sink = out.sink();
        // SAFETY: as in `deserialize`.
        let status = unsafe {
            edit(
                PcxBytes::new(kind.as_bytes()),
                PcxBytes::new(op.as_bytes()),
                PcxBytes::new(args),
                PcxBytes::new(content),
                &mut sink,
                err.buf(),
            )
        };
        self.null_write(kind, "the sink of edit", &out)?;
        if out.overflowed {
            return Err(self.overflow(kind, limit));
        }
        if status != STATUS_OK {
            return Err(self.failure(kind, status, &err));
        }
        Ok(out.bytes)
    }
}

/// This process's effective user id (for [`trust`]).
pub(super) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
