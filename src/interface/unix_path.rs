//! Unix socket paths of any length.
//!
//! A socket's address holds at most 107 bytes of path (`sun_path` is 108, its NUL included),
//! and a data directory deep in a CI workspace or a project tree easily has a longer
//! `DIR/pcx.sock`: binding and connecting failed ("path must be shorter than SUN_LEN"), so
//! such a directory could not be served at all. A longer path is reached through its
//! directory instead: `/proc/self/fd/N/NAME`, with N a descriptor open on that directory for
//! the duration of the call (Linux resolves the link to the directory itself). A path that
//! fits is used as it is.

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The most bytes of path a socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Calls `f` with `path`, or, when `path` is too long for a socket address, with a short
/// path that names the same file through a descriptor on its directory.
pub fn with_short_path<T>(path: &Path, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return f(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return f(path);
    };
    let dir = std::fs::File::open(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    let result = f(&short);
    drop(dir);
    result
}

/// Connects to the socket at `path`, whatever its length.
pub fn connect(path: &Path) -> io::Result<std::os::unix::net::UnixStream> {
    with_short_path(path, |p| std::os::unix::net::UnixStream::connect(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_longer_than_a_socket_address_binds_and_connects_through_its_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("x".repeat(120));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("s.sock");
        assert!(std::os::unix::net::UnixListener::bind(&path).is_err());
        let listener =
            with_short_path(&path, |p| std::os::unix::net::UnixListener::bind(p)).unwrap();
        assert!(
            std::fs::symlink_metadata(&path).is_ok(),
            "bound in the directory itself"
        );
        connect(&path).unwrap();
        assert!(listener.accept().is_ok());
    }
}
