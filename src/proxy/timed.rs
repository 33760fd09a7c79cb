//! The upstream call as the proxy makes it, timed for
//! `idemgate_upstream_duration_seconds`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tower::Service;

use super::upstream::{Upstream, UpstreamFuture};
use crate::error::UpstreamError;
use crate::metrics::Metrics;
use crate::Body;

/// Calls the upstream, observing `idemgate_upstream_duration_seconds`.
pub(super) fn call_upstream(
    metrics: &Metrics,
    mut upstream: Upstream,
    req: Request<Body>,
) -> Timed {
    Timed {
        // The upstream is a pooled client, always ready: no poll_ready.
        inner: upstream.call(req),
        started: Instant::now(),
        histogram: metrics.upstream_duration.clone(),
    }
}

/// One upstream call, observed when it ends.
pub(super) struct Timed {
    inner: UpstreamFuture,
    started: Instant,
    histogram: prometheus::Histogram,
}

impl Future for Timed {
    type Output = Result<Response<Body>, UpstreamError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = std::task::ready!(self.inner.as_mut().poll(cx));
        self.histogram.observe(self.started.elapsed().as_secs_f64());
        Poll::Ready(out)
    }
}
