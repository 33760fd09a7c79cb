//! Bodies: reading one up to a limit without buffering more than the limit
//! ([`read_limited`], trailers kept); a body read whole, sent on with its
//! trailers ([`whole`]); a body whose first bytes were read, sent on whole
//! ([`Prefixed`]); and handing response bodies to hyper so a break comes
//! after the bytes before it ([`HoldBreak`]). (Upstream responses are not
//! read here: they stream, see `proxy::live`.)

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

use crate::{Body, BoxError};

/// A body read up to a limit.
pub(crate) enum Read {
    /// The bytes and the trailers that followed them, if any.
    Whole(Bytes, Option<HeaderMap>),
    /// Over the limit: reading stopped just past it.
    Overflow,
}

/// Reads `body` whole if it holds at most `max` bytes; stops just past
/// `max` otherwise, so an oversized body is never buffered whole.
pub(crate) async fn read_limited(mut body: Body, max: u64) -> Result<Read, BoxError> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total: u64 = 0;
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => {
                total += data.len() as u64;
                chunks.push(data);
                if total > max {
                    return Ok(Read::Overflow);
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(t);
                }
            }
        }
    }
    Ok(Read::Whole(concat(chunks, total), trailers))
}

/// The chunks as one buffer (the one chunk itself when there is one).
pub(crate) fn concat(mut chunks: Vec<Bytes>, total: u64) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut buf = BytesMut::with_capacity(total as usize);
            for c in chunks {
                buf.extend_from_slice(&c);
            }
            buf.freeze()
        }
    }
}

/// A complete body.
pub fn full(bytes: Bytes) -> Body {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed()
}

/// A body whose bytes are all here, with the trailers that follow them.
/// Without trailers it is a plain full body (its length known, so HTTP/1.1
/// sends `Content-Length`); with them its length is left unknown, so
/// HTTP/1.1 sends it chunked, the one framing that carries trailers.
pub fn whole(data: Bytes, trailers: Option<HeaderMap>) -> Body {
    match trailers {
        None => full(data),
        Some(t) => Whole {
            data: (!data.is_empty()).then_some(data),
            trailers: Some(t),
        }
        .boxed(),
    }
}

struct Whole {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl http_body::Body for Whole {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = SizeHint::new();
        hint.set_lower(self.data.as_ref().map_or(0, |d| d.len() as u64));
        hint
    }
}

/// A body whose first bytes were read already (`head`), then the rest of
/// it as it comes.
pub struct Prefixed {
    head: Option<Bytes>,
    rest: Body,
}

impl Prefixed {
    pub fn new(head: Bytes, rest: Body) -> Self {
        Prefixed {
            head: (!head.is_empty()).then_some(head),
            rest,
        }
    }
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + head);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + head);
        }
        hint
    }
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
