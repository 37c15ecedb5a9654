//! The allocator pcx's programs use, and how their memory is tuned.
//!
//! mimalloc: sled allocates and frees a node copy on every insert, and the system allocator
//! was a sixth of W1's profile. Transparent huge pages are turned off for the process: where
//! the system has them "always" on, every first touch of a fresh 2 MiB region (mimalloc gives
//! each thread its own pages, sled has eight IO threads) makes the kernel clear all 2 MiB,
//! and in W1 that clearing was about half of the actor thread's time (perf:
//! `clear_page_erms`). Without it W1 ran in 1.66–1.74 s instead of 1.85–2.38 s, with less
//! memory. Only the binaries do this; a program embedding pcx keeps its own settings.

/// The global allocator of `pcx` and `pcx-bench`.
pub type Allocator = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process (Linux; a no-op where refused).
pub fn small_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only this process's
    // memory policy for later faults.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pages_are_off_afterwards() {
        small_pages();
        // SAFETY: reads this process's flag.
        let flag = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(flag, 1, "PR_GET_THP_DISABLE reads {flag}");
    }
}
