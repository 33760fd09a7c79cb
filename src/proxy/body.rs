//! A body that replays already-read chunks, then streams the rest.
//!
//! Used when an upstream response outgrows `max_response_body`: the record is
//! stored without the body and the client gets what was buffered followed by
//! the remainder, without buffering it all.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

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
