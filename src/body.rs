//! Reading a body up to a limit without buffering more than the limit.
//! (Upstream responses are not read here: they stream, see `proxy::live`.)

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::{Body, BoxError};

/// A body read up to a limit.
pub(crate) enum Read {
    Whole(Bytes),
    /// Over the limit: reading stopped just past it.
    Overflow,
}

/// Reads `body` whole if it holds at most `max` bytes; stops just past
/// `max` otherwise, so an oversized body is never buffered whole.
pub(crate) async fn read_limited(mut body: Body, max: u64) -> Result<Read, BoxError> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        // Trailers are neither forwarded from a buffered body nor stored.
        if let Ok(data) = frame?.into_data() {
            total += data.len() as u64;
            chunks.push(data);
            if total > max {
                return Ok(Read::Overflow);
            }
        }
    }
    Ok(Read::Whole(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut buf = BytesMut::with_capacity(total as usize);
            for c in chunks {
                buf.extend_from_slice(&c);
            }
            buf.freeze()
        }
    }))
}
