//! Loading plugins (shared libraries speaking the ABI of `plugins/pcx-plugin-abi`) and calling
//! them safely. All of pcx's `unsafe` lives here.
//!
//! A library is loaded with `RTLD_NOW | RTLD_LOCAL` by canonical path and never unloaded
//! while the process runs (its code may be running on another thread, and values it made may
//! be alive). Every check happens before any kind is registered: magic, struct size, ABI
//! version, target triple, non-null pointers, sane lengths, kind names. A plugin's failure at
//! run time (error status, panic, nonsense output, output over the limit) becomes a
//! [`PluginError`] naming the plugin, its version and the kind; the host goes on.

use std::cell::Cell;
use std::ffi::c_void;
use std::path::{Path, PathBuf};

use pcx_plugin_abi::{
    AfterDeserializationFn, DescribeFn, DropValueFn, EditFn, EntryFn, PcxBytes, PcxErrorBuf,
    PcxSink, PluginDescriptor, Status, ABI_MAJOR, CAP_EDIT, ENTRY_SYMBOL, MAGIC, STATUS_OK,
    STATUS_OUTPUT_LIMIT, STATUS_PANIC,
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

/// What went wrong with a plugin, loading or calling it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    #[error("no plugin serves artifact kind `{kind}` (backend {backend}); plugin directory: {plugin_dir}")]
    NoPlugin {
        kind: String,
        backend: String,
        plugin_dir: String,
    },
    #[error("plugin directory {dir} does not exist")]
    DirMissing { dir: PathBuf },
    #[error("cannot read plugin directory {dir}: {message}")]
    DirUnreadable { dir: PathBuf, message: String },
    #[error("plugin {path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("plugin {path}: outside the plugin directory {dir}")]
    OutsideDir { path: PathBuf, dir: PathBuf },
    #[error("plugin {path}: cannot be loaded: {message}")]
    Open { path: PathBuf, message: String },
    #[error("plugin {path}: has no entry symbol pcx_plugin_entry_v1 (not a pcx plugin, or built for another ABI major)")]
    NoEntry { path: PathBuf },
    #[error("plugin {path}: its entry returned a null descriptor")]
    NullDescriptor { path: PathBuf },
    #[error("plugin {path}: descriptor is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("plugin {path}: speaks ABI {major}.{minor}; this pcx speaks {host_major}.x with x >= {host_min_minor}")]
    Abi {
        path: PathBuf,
        major: u16,
        minor: u16,
        host_major: u16,
        host_min_minor: u16,
    },
    #[error("plugin {path}: built for target {target}, this pcx is {host}")]
    Target {
        path: PathBuf,
        target: String,
        host: String,
    },
    #[error("plugin {path} claims the built-in kind `eager`")]
    ClaimsEager { path: PathBuf },
    #[error("kind `{kind}` is claimed by two plugins: {first} and {second}")]
    KindTwice {
        kind: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("plugin {plugin} {version} failed on kind `{kind}`: {message}")]
    Failed {
        plugin: String,
        version: String,
        kind: String,
        message: String,
    },
    #[error("plugin {plugin} {version} panicked on kind `{kind}`: {message}")]
    Panicked {
        plugin: String,
        version: String,
        kind: String,
        message: String,
    },
    #[error("plugin {plugin} {version} wrote more than {limit} bytes for kind `{kind}`")]
    OutputLimit {
        plugin: String,
        version: String,
        kind: String,
        limit: usize,
    },
    #[error("plugin {plugin} {version} has no edit named `{op}` (it has: {available})")]
    NoSuchEdit {
        plugin: String,
        version: String,
        op: String,
        available: String,
    },
    #[error("plugin {plugin} {version} did not return within {deadline_ms} ms on kind `{kind}` (plugin_call_timeout_ms): the call was abandoned and the plugin is quarantined until pcx restarts")]
    TimedOut {
        plugin: String,
        version: String,
        kind: String,
        deadline_ms: u64,
    },
    #[error("plugin {plugin} {version} is quarantined until pcx restarts (a call to it did not return within plugin_call_timeout_ms): kind `{kind}` is not served")]
    Quarantined {
        plugin: String,
        version: String,
        kind: String,
    },
    #[error("pcx is shutting down: the call to plugin {plugin} {version} on kind `{kind}` was abandoned")]
    Abandoned {
        plugin: String,
        version: String,
        kind: String,
    },
    #[error("plugin calls cannot be made: the plugin thread could not be started: {message}")]
    NoThread { message: String },
    #[error("{what} {path} is writable by {by} (mode {mode:04o}): whoever can write it can run code as pcx; refused (chmod go-w {path})")]
    Writable {
        what: &'static str,
        path: PathBuf,
        mode: u32,
        by: &'static str,
    },
    #[error("{what} {path} is owned by uid {owner} (mode {mode:04o}), neither this user (uid {uid}) nor root: whoever owns it can run code as pcx; refused")]
    ForeignOwner {
        what: &'static str,
        path: PathBuf,
        mode: u32,
        owner: u32,
        uid: u32,
    },
    #[error("plugin {path}: loading it crashed a check process with signal {signal} ({name}); not loaded, pcx would have crashed the same way")]
    CheckCrashed {
        path: PathBuf,
        signal: i32,
        name: &'static str,
    },
    #[error("plugin {path}: loading it in a check process did not finish within {deadline_ms} ms (plugin_call_timeout_ms; does a constructor loop?); not loaded")]
    CheckTimedOut { path: PathBuf, deadline_ms: u64 },
    #[error("plugin {path}: could not be checked in a child process first: {message}; not loaded")]
    CheckFailed { path: PathBuf, message: String },
}

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

/// The ready-to-use bytes and JSON description a plugin gave.
#[derive(Clone, Debug, PartialEq)]
pub struct Described {
    pub bytes: Vec<u8>,
    pub description: JsonObject,
}

/// One JSON object, kept as its text. It is checked when made (UTF-8, one object, numbers
/// in range, nesting within serde_json's limit: whatever `serde_json::Value` would refuse),
/// without building a tree; the tree is built only when someone reads it. A load that only
/// hands the description on, as most do, pays for one walk over the text, not for a map
/// of strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonObject(String);

impl JsonObject {
    /// `text`, if it is one JSON object.
    pub fn parse(text: String) -> Option<JsonObject> {
        serde_json::from_str::<walk::Object>(&text).ok()?;
        Some(JsonObject(text))
    }

    /// `{"size":n}`: how the built-in `eager` kind describes its content.
    pub fn size(n: usize) -> JsonObject {
        JsonObject(format!("{{\"size\":{n}}}"))
    }

    /// The text, as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The object as a tree.
    pub fn value(&self) -> serde_json::Value {
        // Checked when made, so parsing again cannot fail; `Null` is never seen.
        serde_json::from_str(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for JsonObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for JsonObject {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(s)
    }
}

/// Walking JSON without keeping any of it.
mod walk {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    /// Any one JSON value.
    pub struct Any;
    /// One JSON object.
    pub struct Object;

    struct AnyVisitor;
    struct ObjectVisitor;

    impl<'de> Deserialize<'de> for Any {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Any, D::Error> {
            d.deserialize_any(AnyVisitor)
        }
    }

    impl<'de> Deserialize<'de> for Object {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Object, D::Error> {
            d.deserialize_any(ObjectVisitor)
        }
    }

    fn entries<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<Any, Any>()?.is_some() {}
        Ok(())
    }

    impl<'de> Visitor<'de> for ObjectVisitor {
        type Value = Object;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object, A::Error> {
            entries(map).map(|()| Object)
        }
    }

    impl<'de> Visitor<'de> for AnyVisitor {
        type Value = Any;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Any, E> {
            Ok(Any)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Any, E> {
            Ok(Any)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Any, E> {
            Ok(Any)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Any, E> {
            Ok(Any)
        }
        fn visit_str<E>(self, _: &str) -> Result<Any, E> {
            Ok(Any)
        }
        fn visit_unit<E>(self) -> Result<Any, E> {
            Ok(Any)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Any, A::Error> {
            while seq.next_element::<Any>()?.is_some() {}
            Ok(Any)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Any, A::Error> {
            entries(map).map(|()| Any)
        }
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
    let library =
        unsafe { libloading::os::unix::Library::open(Some(path), flags) }.map_err(|e| {
            PluginError::Open {
                path: path.into(),
                message: e.to_string(),
            }
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

/// Refuses a 64-bit ELF file whose program headers or loadable segments reach past its end:
/// the system loader would map such a truncated library and then crash the process reading
/// the missing pages. Other files are left to the loader, which refuses them cleanly.
fn check_elf_extent(path: &Path, len: u64) -> Result<(), PluginError> {
    use std::io::{Read, Seek, SeekFrom};
    let truncated = |what: String| PluginError::Open {
        path: path.into(),
        message: format!("truncated library: {what}, but the file is {len} bytes"),
    };
    let io = |e: std::io::Error| PluginError::Open {
        path: path.into(),
        message: e.to_string(),
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = [0u8; 64];
    if len < 64 || f.read_exact(&mut h).is_err() || &h[..4] != b"\x7fELF" || h[4] != 2 {
        return Ok(());
    }
    let little = h[5] == 1;
    let u16_at = |b: &[u8], o: usize| {
        let a = [b[o], b[o + 1]];
        u64::from(if little {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        })
    };
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        if little {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        }
    };
    let (phoff, phentsize, phnum) = (u64_at(&h, 32), u16_at(&h, 54), u16_at(&h, 56));
    let (shoff, shentsize, shnum) = (u64_at(&h, 40), u16_at(&h, 58), u16_at(&h, 60));
    let ph_end = phoff.saturating_add(phentsize.saturating_mul(phnum));
    if ph_end > len {
        return Err(truncated(format!(
            "its program headers end at byte {ph_end}"
        )));
    }
    let sh_end = shoff.saturating_add(shentsize.saturating_mul(shnum));
    if shoff != 0 && sh_end > len {
        return Err(truncated(format!(
            "its section headers end at byte {sh_end}"
        )));
    }
    if phentsize < 56 {
        return Ok(());
    }
    let mut table = vec![0u8; (phentsize * phnum) as usize];
    f.seek(SeekFrom::Start(phoff)).map_err(io)?;
    f.read_exact(&mut table).map_err(io)?;
    for i in 0..phnum as usize {
        let ph = &table[i * phentsize as usize..];
        let p_type = u16_at(ph, 0) | (u16_at(ph, 2) << 16);
        let end = u64_at(ph, 8).saturating_add(u64_at(ph, 32));
        const PT_LOAD: u64 = 1;
        if p_type == PT_LOAD && end > len {
            return Err(truncated(format!("a loadable segment ends at byte {end}")));
        }
    }
    Ok(())
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
}

unsafe extern "C" fn sink_write(ctx: *mut c_void, ptr: *const u8, len: usize) -> Status {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `ctx` is the `SinkBuf` this host made for this call and outlives it.
        let Some(buf) = (unsafe { ctx.cast::<SinkBuf>().as_mut() }) else {
            return STATUS_OUTPUT_LIMIT;
        };
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
        if out.overflowed {
            return Err(self.overflow(kind, limit));
        }
        if status != STATUS_OK {
            return Err(self.failure(kind, status, &err));
        }
        Ok(out.bytes)
    }
}

/// This process's effective user id.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Refuses `path` (a plugin library or a directory above one) if anyone but this user or
/// root could change it: owned by another user, or writable by its group or by everyone.
/// A plugin runs as pcx, so whoever can write it (or swap it, through its directory) can run
/// code as pcx. Group-writable is refused too, as ssh refuses it for `~/.ssh` and
/// `authorized_keys` and PostgreSQL for its data directory; the sticky bit does not help, as
/// anyone could still add a library.
pub fn check_trusted(what: &'static str, path: &Path) -> Result<(), PluginError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| PluginError::Open {
        path: path.into(),
        message: e.to_string(),
    })?;
    let mode = meta.mode() & 0o7777;
    let uid = euid();
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(PluginError::ForeignOwner {
            what,
            path: path.into(),
            mode,
            owner: meta.uid(),
            uid,
        });
    }
    let by = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (false, false) => return Ok(()),
        (true, false) => "its group",
        (false, true) => "everyone",
        (true, true) => "its group and everyone",
    };
    Err(PluginError::Writable {
        what,
        path: path.into(),
        mode,
        by,
    })
}

/// Checks a candidate and every directory between it and the plugin directory (checked
/// already) with [`check_trusted`].
fn check_candidate(path: &Path, dir: &Path) -> Result<(), PluginError> {
    check_trusted("plugin", path)?;
    for parent in path.ancestors().skip(1).take_while(|p| *p != dir) {
        check_trusted("directory", parent)?;
    }
    Ok(())
}

/// The shared libraries in `dir` that are plugin candidates: regular files with the
/// platform's library extension, by canonical path, sorted. The directory and each library
/// must pass [`check_trusted`]: an untrusted directory refuses every library in it.
pub fn candidates(dir: &Path) -> Result<Vec<Result<PathBuf, PluginError>>, PluginError> {
    let canonical_dir = match dir.canonicalize() {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PluginError::DirMissing { dir: dir.into() })
        }
        Err(e) => {
            return Err(PluginError::DirUnreadable {
                dir: dir.into(),
                message: e.to_string(),
            })
        }
    };
    check_trusted("plugin directory", &canonical_dir)?;
    let listing = std::fs::read_dir(&canonical_dir).map_err(|e| PluginError::DirUnreadable {
        dir: dir.into(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| PluginError::DirUnreadable {
            dir: dir.into(),
            message: e.to_string(),
        })?;
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some(std::env::consts::DLL_EXTENSION) {
            continue;
        }
        out.push(match path.canonicalize() {
            Err(e) => Err(PluginError::Open {
                path: path.clone(),
                message: e.to_string(),
            }),
            Ok(c) if !c.starts_with(&canonical_dir) => Err(PluginError::OutsideDir {
                path: c,
                dir: canonical_dir.clone(),
            }),
            Ok(c) if !c.is_file() => Err(PluginError::NotAFile { path: c }),
            Ok(c) => check_candidate(&c, &canonical_dir).map(|()| c),
        });
    }
    out.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::JsonObject;
    use serde_json::json;

    fn parse(text: &str) -> Option<JsonObject> {
        JsonObject::parse(text.to_string())
    }

    #[test]
    fn a_json_object_is_kept_as_written_and_read_as_a_tree() {
        let text = r#" {"b": [1, -2, 3.5e2, true, null, "x\"y"], "a": {"c": {}}} "#;
        let o = parse(text).expect("an object");
        assert_eq!(o.as_str(), text);
        assert_eq!(
            o.value(),
            json!({"b": [1, -2, 350.0, true, null, "x\"y"], "a": {"c": {}}})
        );
        // Order as written (serde_json's preserve_order), in the tree and on the wire.
        let keys: Vec<String> = o.value().as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["b", "a"]);
        let wire = rmp_serde::to_vec_named(&o).unwrap();
        let back: serde_json::Value = rmp_serde::from_slice(&wire).unwrap();
        assert_eq!(back, o.value());
        assert_eq!(JsonObject::size(7).value(), json!({"size": 7}));
    }

    #[test]
    fn whatever_a_json_tree_would_refuse_is_refused() {
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        for bad in [
            "",
            "[]",
            "1",
            "\"{}\"",
            "null",
            "{",
            "{} {}",
            "{\"a\":1,}",
            "{\"a\":1e400}",
            "{\"a\":\"\\ud800\"}",
            "{a:1}",
            deep.as_str(),
        ] {
            assert!(parse(bad).is_none(), "accepted {bad:?}");
            assert!(
                serde_json::from_str::<serde_json::Value>(bad)
                    .ok()
                    .filter(serde_json::Value::is_object)
                    .is_none(),
                "serde_json takes {bad:?}: the check must too"
            );
        }
    }
}
