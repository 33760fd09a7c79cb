//! Reading a body up to a limit without buffering more than the limit, and
//! handing response bodies to hyper so a break comes after the bytes before
//! it ([`HoldBreak`]). (Upstream responses are not read here: they stream,
//! see `proxy::live`.)

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

/// A response body on its way to the client, whose break (an error) is
/// held back for one poll. hyper's server sends what it has buffered (the
/// head, the bytes before the break) when the body is pending, and drops it
/// when the error comes in the same turn: without this, a client could get
/// a bare abort where the upstream had sent a head and bytes, depending on
/// how the reads fell. Applied once, where the proxy hands responses to
/// hyper, whatever produced the body.
pub struct HoldBreak {
    body: Body,
    held: Option<BoxError>,
}

impl HoldBreak {
    pub fn new(body: Body) -> Self {
        HoldBreak { body, held: None }
    }
}

impl http_body::Body for HoldBreak {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        if let Some(e) = self.held.take() {
            return Poll::Ready(Some(Err(e)));
        }
        match std::pin::Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.held = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
