//! Small records packed into shared chunks, so that RSS follows the bytes
//! of live records rather than the allocator's size classes.
//!
//! An encoded record of under 16 KiB in a block of its own takes the
//! allocator's next size class (1,084 bytes take a 1,280-byte block, 18 %
//! more), and blocks freed at random through the allocator's pages keep
//! those pages resident (benches/RESULTS.md, "Design 5": 1 KiB records
//! held 2 s at 2.0× their bytes). Records of one time to live expire in
//! the order they were written, so here they are copied one after another
//! into a chunk kept for that TTL, each record a [`Bytes`] view of it; the
//! chunk goes back to the allocator whole when its last record leaves.
//!
//! What a chunk can hold on to: a record that leaves early (purged,
//! released) frees nothing until its neighbours expire, which is at most
//! its TTL after the chunk's last write; an open chunk's pages are
//! resident only as far as records were written into them.

use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use super::ttl_map::lock;

/// A chunk's size: large enough that a steady stream fills one in
/// milliseconds (the span of write times, and so of expiries, it holds),
/// small enough that an open chunk of a quiet TTL costs little, and no
/// larger than what mimalloc serves from its 512 KiB pages (blocks up to
/// about 84 KiB). Chunks of 128 KiB to 512 KiB share its 4 MiB pages (up to
/// 16 of 256 KiB on one), and a page is given back only when every chunk on
/// it has gone, while new chunks keep landing among the old: 1 KiB records
/// held 2 s sat at 1.46-1.50x their bytes with 256 KiB chunks, 1.41 with
/// 128 KiB, 1.37 with 1 MiB (pages of their own, purged a second after they
/// are freed), 1.32-1.34 with 32 or 64 KiB (benches/RESULTS.md, "Small
/// records: chunks of 64 KiB"). Records of about 13 KB, four to a chunk,
/// leave up to a fifth of it unused at its end; measured, they still sit
/// lower than in 256 KiB chunks (1.16 against 1.23).
const CHUNK: usize = 64 << 10;

/// Records this long and longer get blocks of their own (from 16 KiB the
/// store splits them by size class instead: `slot.rs`).
pub(super) const PACK_BELOW: usize = 16 << 10;

/// The most TTLs with a chunk open at once. TTLs come from the routes'
/// settings, so few are in use; a TTL beyond them takes a chunk left
/// unused for [`IDLE_MS`], or else its records get blocks of their own.
const OPEN: usize = 16;

/// How long a TTL's open chunk must go unused before another TTL takes it.
const IDLE_MS: u64 = 10_000;

/// The open chunks: one per TTL in use.
#[derive(Default)]
pub(super) struct Packer {
    open: Mutex<Vec<Open>>,
}

struct Open {
    ttl_ms: u64,
    /// When a record last went in (ms on the store's clock).
    used: u64,
    chunk: BytesMut,
}

impl Packer {
    /// `encoded` copied into the open chunk for `ttl_ms`, or `None` when it
    /// is too long to pack or every chunk is taken by a busy TTL.
    pub fn pack(&self, encoded: &[u8], ttl_ms: u64, now: u64) -> Option<Bytes> {
        if encoded.len() >= PACK_BELOW {
            return None;
        }
        let mut open = lock(&self.open);
        let i = match open.iter().position(|o| o.ttl_ms == ttl_ms) {
            Some(i) => i,
            None if open.len() < OPEN => {
                open.push(Open {
                    ttl_ms,
                    used: now,
                    chunk: BytesMut::new(),
                });
                open.len() - 1
            }
            None => {
                let (i, idle) = open
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, o)| o.used)
                    .map(|(i, o)| (i, o.used))?;
                if now.saturating_sub(idle) < IDLE_MS {
                    return None;
                }
                open[i] = Open {
                    ttl_ms,
                    used: now,
                    chunk: BytesMut::new(),
                };
                i
            }
        };
        let o = &mut open[i];
        o.used = now;
        if o.chunk.capacity() < encoded.len() {
            // The rest of a full chunk is dropped with this view of it; its
            // records keep the allocation until the last of them goes.
            o.chunk = BytesMut::with_capacity(CHUNK);
        }
        o.chunk.extend_from_slice(encoded);
        Some(o.chunk.split().freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_one_ttl_share_a_chunk_and_read_back_whole() {
        let packer = Packer::default();
        let a = packer.pack(b"first record", 2_000, 0).unwrap();
        let b = packer.pack(b"second", 2_000, 1).unwrap();
        let other = packer.pack(b"another ttl", 60_000, 1).unwrap();
        assert_eq!(&a[..], b"first record");
        assert_eq!(&b[..], b"second");
        assert_eq!(&other[..], b"another ttl");
        // b follows a in the same allocation; the other TTL has its own.
        assert!(follows(&a, &b));
        assert!(!follows(&b, &other));
    }

    /// Whether `b` starts where `a` ends: the next record of one chunk (a
    /// new chunk cannot start there, the old one's slack lies between).
    fn follows(a: &Bytes, b: &Bytes) -> bool {
        a.as_ptr() as usize + a.len() == b.as_ptr() as usize
    }

    #[test]
    fn a_record_that_does_not_fit_starts_a_new_chunk() {
        let packer = Packer::default();
        let big = vec![1u8; PACK_BELOW - 1];
        let mut views = Vec::new();
        for i in 0..(CHUNK / big.len() + 2) {
            let v = packer.pack(&big, 1_000, i as u64).unwrap();
            assert_eq!(&v[..], &big[..]);
            views.push(v);
        }
        let per_chunk = CHUNK / big.len();
        assert!(follows(&views[per_chunk - 2], &views[per_chunk - 1]));
        assert!(
            !follows(&views[per_chunk - 1], &views[per_chunk]),
            "the record past a full chunk's end is in a new one"
        );
        assert!(follows(&views[per_chunk], &views[per_chunk + 1]));
        assert!(packer.pack(&vec![0; PACK_BELOW], 1_000, 0).is_none());
    }

    #[test]
    fn a_ttl_beyond_the_open_chunks_takes_an_idle_one_or_none() {
        let packer = Packer::default();
        for ttl in 0..OPEN as u64 {
            assert!(packer.pack(b"r", ttl, 0).is_some());
        }
        assert!(packer.pack(b"r", 99, IDLE_MS - 1).is_none(), "all busy");
        for ttl in 1..OPEN as u64 {
            packer.pack(b"r", ttl, IDLE_MS).unwrap();
        }
        assert!(packer.pack(b"r", 99, IDLE_MS).is_some(), "TTL 0's was idle");
        assert!(packer.pack(b"r", 0, IDLE_MS).is_none(), "and it is gone");
        assert!(packer.pack(b"r", 99, IDLE_MS).is_some());
    }
}
