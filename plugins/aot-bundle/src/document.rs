//! The `example.aot_bundle` document: reading it (validating every byte, borrowing every
//! string and kernel) and writing it.
//!
//! The reader is a single pass over the bytes, written for this one shape rather than
//! through a generic deserializer: a load calls it once per backend, and a generic pass
//! (with a tree for `meta`) cost about as much again as the whole rest of a load.

use serde::Deserialize;

/// The only document version this plugin reads.
pub const FORMAT_VERSION: u64 = 1;

/// One compiled kernel, borrowed from the document's bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel<'a> {
    pub name: &'a str,
    pub code: &'a [u8],
}

/// The document, borrowed from its bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Bundle<'a> {
    pub format_version: u64,
    pub guards_expr: Option<&'a str>,
    pub precompile_backend_id: Option<&'a str>,
    pub kernels: Vec<Kernel<'a>>,
    /// The `meta` map as it was written (checked to be one well-formed MessagePack map).
    pub meta: &'a [u8],
}

fn not_msgpack(what: &str) -> String {
    format!("example.aot_bundle content is not valid MessagePack: {what}")
}

fn malformed(what: &str) -> String {
    format!("example.aot_bundle content is malformed: {what}")
}

#[cold]
fn not_utf8(what: &str) -> String {
    malformed(&format!("{what} is not UTF-8"))
}

fn version_error(v: u64) -> String {
    format!("example.aot_bundle format_version {v} is not supported (this plugin reads {FORMAT_VERSION})")
}

/// Reads and validates a document: a map with exactly the five fields (in any order), the
/// version first checked among them. When the document is broken, a readable
/// `format_version` other than 1 is what the error names: a newer writer's document is
/// reported as such, not as garbage.
pub fn decode(bytes: &[u8]) -> Result<Bundle<'_>, String> {
    match bytes.first() {
        None | Some(0xc1) => return Err(not_msgpack("no document")),
        Some(0x80..=0x8f | 0xde | 0xdf) => {}
        Some(_) => return Err("example.aot_bundle content must be a MessagePack map".into()),
    }
    let fields = match read_fields(bytes) {
        Ok(fields) => fields,
        Err(e) => {
            #[derive(Deserialize)]
            struct Version {
                format_version: Option<u64>,
            }
            return Err(match rmp_serde::from_slice::<Version>(bytes) {
                Ok(Version {
                    format_version: Some(v),
                }) if v != FORMAT_VERSION => version_error(v),
                _ => e,
            });
        }
    };
    let missing = |f: &str| format!("example.aot_bundle content is missing field `{f}`");
    let format_version = fields
        .format_version
        .ok_or_else(|| missing("format_version"))?;
    if format_version != FORMAT_VERSION {
        return Err(version_error(format_version));
    }
    Ok(Bundle {
        format_version,
        guards_expr: fields.guards_expr.ok_or_else(|| missing("guards_expr"))?,
        precompile_backend_id: fields
            .precompile_backend_id
            .ok_or_else(|| missing("precompile_backend_id"))?,
        kernels: fields.kernels.ok_or_else(|| missing("kernels"))?,
        meta: fields.meta.ok_or_else(|| missing("meta"))?,
    })
}

/// The fields as read; `None` for one not (yet) seen.
#[derive(Default)]
struct Fields<'a> {
    format_version: Option<u64>,
    guards_expr: Option<Option<&'a str>>,
    precompile_backend_id: Option<Option<&'a str>>,
    kernels: Option<Vec<Kernel<'a>>>,
    meta: Option<&'a [u8]>,
}

/// Sets a field once: a second occurrence is refused.
fn once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), String> {
    if slot.is_some() {
        return Err(malformed(&format!("duplicate field `{name}`")));
    }
    *slot = Some(value);
    Ok(())
}

fn read_fields(bytes: &[u8]) -> Result<Fields<'_>, String> {
    let mut r = Reader { bytes, pos: 0 };
    let mut f = Fields::default();
    for _ in 0..r.map_len("the document")? {
        // Names are matched as bytes: a known name is ASCII, so only an unknown one needs
        // reading as text (for the message).
        match r.name("a field name")? {
            b"format_version" => {
                let v = r.uint("field `format_version`")?;
                once(&mut f.format_version, "format_version", v)?;
            }
            b"guards_expr" => {
                let v = r.str_or_nil("field `guards_expr`")?;
                once(&mut f.guards_expr, "guards_expr", v)?;
            }
            b"precompile_backend_id" => {
                let v = r.str_or_nil("field `precompile_backend_id`")?;
                once(&mut f.precompile_backend_id, "precompile_backend_id", v)?;
            }
            b"kernels" => {
                let v = r.kernels()?;
                once(&mut f.kernels, "kernels", v)?;
            }
            b"meta" => {
                let start = r.pos;
                r.map_len("field `meta`")?;
                r.pos = start;
                r.skip()?;
                once(&mut f.meta, "meta", &bytes[start..r.pos])?;
            }
            other => {
                return Err(malformed(&format!(
                    "unknown field `{}` (the fields are format_version, guards_expr, precompile_backend_id, kernels, meta)",
                    String::from_utf8_lossy(other)
                )))
            }
        }
    }
    if r.pos != bytes.len() {
        return Err(not_msgpack(&format!(
            "{} bytes after the document",
            bytes.len() - r.pos
        )));
    }
    Ok(f)
}

/// A cursor over a document's bytes. Every read checks bounds; nothing is allocated but
/// the kernels' list.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

// The reads are small and `#[inline]`, their messages built out of line (`#[cold]`): a
// read that returns through memory, as a `Result` carrying a `String` does when not
// inlined, cost more than the reading itself.
impl<'a> Reader<'a> {
    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let out = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(out)
            }
            _ => Err(self.ends_early(n)),
        }
    }

    #[cold]
    fn ends_early(&self, n: usize) -> String {
        not_msgpack(&format!(
            "it ends at byte {} inside a value that needs {n} more",
            self.bytes.len()
        ))
    }

    /// The next marker byte; the reserved 0xc1 is refused wherever it stands.
    #[inline]
    fn marker(&mut self) -> Result<u8, String> {
        match self.bytes.get(self.pos) {
            Some(&m) if m != 0xc1 => {
                self.pos += 1;
                Ok(m)
            }
            Some(_) => Err(not_msgpack(&format!(
                "reserved byte 0xc1 at byte {}",
                self.pos
            ))),
            None => Err(self.ends_early(1)),
        }
    }

    /// A big-endian unsigned number of `n` (1, 2, 4 or 8) bytes.
    #[inline]
    fn be(&mut self, n: usize) -> Result<u64, String> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    #[inline]
    fn len(&mut self, n: usize) -> Result<usize, String> {
        // At most 4 bytes: fits a usize on every platform pcx builds for.
        Ok(self.be(n)? as usize)
    }

    /// A type other than the one wanted, named with the marker just read.
    #[cold]
    fn wrong(&self, what: &str, wanted: &str) -> String {
        malformed(&format!(
            "{what} must be {wanted} (byte {} is 0x{:02x})",
            self.pos - 1,
            self.bytes[self.pos - 1]
        ))
    }

    /// A collection's length: `fix` is the high nibble of its short form (the length in the
    /// low one), `long` the markers of its 16- and 32-bit forms.
    #[inline]
    fn len_of(
        &mut self,
        what: &str,
        fix: u8,
        long: [u8; 2],
        wanted: &str,
    ) -> Result<usize, String> {
        match self.marker()? {
            m if m & 0xf0 == fix => Ok(usize::from(m & 0x0f)),
            m if m == long[0] => self.len(2),
            m if m == long[1] => self.len(4),
            _ => Err(self.wrong(what, wanted)),
        }
    }

    #[inline]
    fn map_len(&mut self, what: &str) -> Result<usize, String> {
        self.len_of(what, 0x80, [0xde, 0xdf], "a map")
    }

    #[inline]
    fn array_len(&mut self, what: &str) -> Result<usize, String> {
        self.len_of(what, 0x90, [0xdc, 0xdd], "an array")
    }

    /// A string's bytes, not yet checked to be UTF-8; `None` for nil.
    #[inline]
    fn raw_str_or_nil(&mut self, what: &str) -> Result<Option<&'a [u8]>, String> {
        let n = match self.marker()? {
            0xc0 => return Ok(None),
            m @ 0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => self.len(1)?,
            0xda => self.len(2)?,
            0xdb => self.len(4)?,
            _ => return Err(self.wrong(what, "a string")),
        };
        self.take(n).map(Some)
    }

    /// A name: a string, compared as bytes.
    #[inline]
    fn name(&mut self, what: &str) -> Result<&'a [u8], String> {
        self.raw_str_or_nil(what)?
            .ok_or_else(|| self.wrong(what, "a string"))
    }

    #[inline]
    fn str_or_nil(&mut self, what: &str) -> Result<Option<&'a str>, String> {
        match self.raw_str_or_nil(what)? {
            None => Ok(None),
            Some(b) => match std::str::from_utf8(b) {
                Ok(s) => Ok(Some(s)),
                Err(_) => Err(not_utf8(what)),
            },
        }
    }

    #[inline]
    fn str(&mut self, what: &str) -> Result<&'a str, String> {
        self.str_or_nil(what)?
            .ok_or_else(|| self.wrong(what, "a string"))
    }

    #[inline]
    fn bin(&mut self, what: &str) -> Result<&'a [u8], String> {
        let n = match self.marker()? {
            0xc4 => self.len(1)?,
            0xc5 => self.len(2)?,
            0xc6 => self.len(4)?,
            _ => return Err(self.wrong(what, "binary")),
        };
        self.take(n)
    }

    #[inline]
    fn uint(&mut self, what: &str) -> Result<u64, String> {
        match self.marker()? {
            m @ 0x00..=0x7f => Ok(u64::from(m)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            _ => Err(self.wrong(what, "a non-negative integer")),
        }
    }

    fn kernels(&mut self) -> Result<Vec<Kernel<'a>>, String> {
        let n = self.array_len("field `kernels`")?;
        // Each kernel takes at least 1 byte: a count beyond the bytes left is refused
        // before anything is allocated for it.
        let mut out = Vec::with_capacity(n.min(self.bytes.len() - self.pos));
        for i in 0..n {
            let (mut name, mut code) = (None, None);
            for _ in 0..self.map_len("a kernel")? {
                match self.name("a kernel's field name")? {
                    b"name" => once(&mut name, "name", self.str("a kernel's `name`")?)?,
                    b"code" => once(&mut code, "code", self.bin("a kernel's `code`")?)?,
                    other => {
                        return Err(malformed(&format!(
                            "kernel {i} has an unknown field `{}` (the fields are name, code)",
                            String::from_utf8_lossy(other)
                        )))
                    }
                }
            }
            let missing = |f: &str| malformed(&format!("kernel {i} is missing field `{f}`"));
            out.push(Kernel {
                name: name.ok_or_else(|| missing("name"))?,
                code: code.ok_or_else(|| missing("code"))?,
            });
        }
        Ok(out)
    }

    /// Steps over one value of any type, nested ones included, without recursion: a count
    /// of values still owed is kept, and each must take at least one byte, so a forged
    /// count ends at the end of the input.
    fn skip(&mut self) -> Result<(), String> {
        let mut owed: u64 = 1;
        while owed > 0 {
            owed -= 1;
            let m = self.marker()?;
            let data = match m {
                // Fixints, nil, false, true (0xc1 never gets here: `marker` refuses it).
                0x00..=0x7f | 0xe0..=0xff | 0xc0..=0xc3 => 0,
                0x80..=0x8f => {
                    owed += 2 * u64::from(m & 0x0f);
                    0
                }
                0x90..=0x9f => {
                    owed += u64::from(m & 0x0f);
                    0
                }
                0xa0..=0xbf => usize::from(m & 0x1f),
                0xc4 | 0xd9 => self.len(1)?,
                0xc5 | 0xda => self.len(2)?,
                0xc6 | 0xdb => self.len(4)?,
                // Extensions: a type byte, then the data.
                0xc7 => self.len(1)?.saturating_add(1),
                0xc8 => self.len(2)?.saturating_add(1),
                0xc9 => self.len(4)?.saturating_add(1),
                0xca => 4,
                0xcb => 8,
                0xcc | 0xd0 => 1,
                0xcd | 0xd1 => 2,
                0xce | 0xd2 => 4,
                0xcf | 0xd3 => 8,
                0xd4 => 2,
                0xd5 => 3,
                0xd6 => 5,
                0xd7 => 9,
                0xd8 => 17,
                0xdc => {
                    owed += self.be(2)?;
                    0
                }
                0xdd => {
                    owed += self.be(4)?;
                    0
                }
                0xde => {
                    owed += 2 * self.be(2)?;
                    0
                }
                0xdf => {
                    owed += 2 * self.be(4)?;
                    0
                }
            };
            self.take(data)?;
            let left = (self.bytes.len() - self.pos) as u64;
            if owed > left {
                return Err(not_msgpack(&format!(
                    "a collection promises {owed} more values but only {left} bytes are left"
                )));
            }
        }
        Ok(())
    }
}

/// Writes a document (fields in the order `decode` names them); `size` is a guess of its
/// length, to allocate once.
pub fn encode(bundle: &Bundle, size: usize) -> Result<Vec<u8>, String> {
    use rmp::encode::{
        write_array_len, write_bin, write_map_len, write_nil, write_str, write_uint,
    };
    fn opt_str(out: &mut Vec<u8>, s: Option<&str>) -> std::io::Result<()> {
        match s {
            Some(s) => write_str(out, s)?,
            None => write_nil(out)?,
        }
        Ok(())
    }
    let write = |out: &mut Vec<u8>| -> std::io::Result<()> {
        write_map_len(out, 5)?;
        write_str(out, "format_version")?;
        write_uint(out, bundle.format_version)?;
        write_str(out, "guards_expr")?;
        opt_str(out, bundle.guards_expr)?;
        write_str(out, "precompile_backend_id")?;
        opt_str(out, bundle.precompile_backend_id)?;
        write_str(out, "kernels")?;
        let n = u32::try_from(bundle.kernels.len())
            .map_err(|_| std::io::Error::other("more than 2^32 kernels"))?;
        write_array_len(out, n)?;
        for k in &bundle.kernels {
            write_map_len(out, 2)?;
            write_str(out, "name")?;
            write_str(out, k.name)?;
            write_str(out, "code")?;
            write_bin(out, k.code)?;
        }
        write_str(out, "meta")?;
        out.extend_from_slice(bundle.meta);
        Ok(())
    };
    let mut out = Vec::with_capacity(size);
    write(&mut out).map_err(|e| format!("cannot encode example.aot_bundle: {e}"))?;
    Ok(out)
}
