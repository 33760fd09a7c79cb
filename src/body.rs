//! Body helpers: reading a body up to a limit without buffering more than
//! the limit, and a body that replays already-read chunks then streams the
//! rest (for an upstream response that outgrew `max_response_body`: the
//! record is stored without the body and the client gets all of it).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::{Body, BoxError};

pin_project_lite::pin_project! {
    pub struct Prefixed {
        prefix: VecDeque<Bytes>,
        #[pin]
        rest: Body,
    }
}

impl Prefixed {
    pub fn new(prefix: Vec<Bytes>, rest: Body) -> Self {
        Prefixed {
            prefix: prefix.into(),
            rest,
        }
    }
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(chunk) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        this.rest.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.prefix.iter().map(|b| b.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + buffered);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + buffered);
        }
        hint
    }
}

/// A body read up to a limit.
pub(crate) enum Read {
    Whole(Bytes),
    /// Over the limit: the chunks read so far and the unread rest.
    Overflow(Vec<Bytes>, Body),
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
                return Ok(Read::Overflow(chunks, body));
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
