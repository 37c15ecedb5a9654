//! What is checked about a library file before it is loaded at all: that nobody but pcx's
//! user or root can change it or its directories, and that an ELF file is whole (a truncated
//! one would be mapped and crash the process). Apart from the loader because these are plain
//! file checks, none of them `unsafe` beyond reading this process's user id (which stays in
//! the loader with the rest of the `unsafe`).

use std::path::{Path, PathBuf};

use super::error::PluginError;
use super::euid;

/// Refuses a 64-bit ELF file whose program headers or loadable segments reach past its end:
/// the system loader would map such a truncated library and then crash the process reading
/// the missing pages. Other files are left to the loader, which refuses them cleanly.
pub(super) fn check_elf_extent(path: &Path, len: u64) -> Result<(), PluginError> {
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
