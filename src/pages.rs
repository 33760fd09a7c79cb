//! How idemgate's process takes memory from the kernel: in 4 KiB pages,
//! not transparent huge pages.
//!
//! The allocator (mimalloc) asks for huge pages on its arenas, and where the
//! kernel backs them a 2 MiB page stays resident while any record on it
//! lives: records with short TTLs free their memory in scattered pieces,
//! so resident memory drifts far above the bytes the store holds (1 KiB
//! records living 2 s: 1.7× their bytes with huge pages, 1.5× without;
//! benches/RESULTS.md "Small records: no transparent huge pages"). A
//! sidecar is sized by its memory limit, so idemgate turns them off for its
//! own process at start (Redis does too, by default). What it gives
//! up is the TLB misses huge pages spare: about 1 % more CPU for a
//! pass-through, none measured for a new key; in the store alone with 10 M
//! records, replays 16–25 % slower (and 7 % less resident memory).

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`,
/// whatever `/sys/kernel/mm/transparent_hugepage/enabled` says); pages
/// already faulted in stay as they are, so call it first. Fails only where
/// the kernel refuses the call (before Linux 3.15, or a seccomp filter):
/// then memory is taken as the system's setting says.
pub fn small_pages_only() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}
