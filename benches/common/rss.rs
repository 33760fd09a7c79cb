//! The bench process's resident memory, as the memory benches read it.

/// Resident set size in bytes, from `/proc/self/statm`.
pub fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}
