//! The upstream call as the proxy makes it: through a boxed, timed future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tower::ServiceExt;

use super::layer::UpstreamService;
use crate::error::UpstreamError;
use crate::metrics::Metrics;
use crate::Body;

/// The future of one upstream call.
pub(super) type UpstreamFuture =
    Pin<Box<dyn Future<Output = Result<Response<Body>, UpstreamError>> + Send>>;

/// Calls the upstream, observing `idemgate_upstream_duration_seconds`.
/// Boxing outside any async body sidesteps a rustc limitation (it cannot
/// prove an associated future `Send` for every lifetime inside a spawned
/// generic task); it is one allocation next to a network round trip.
pub(super) fn call_upstream<S: UpstreamService>(
    metrics: &Metrics,
    inner: S,
    req: Request<Body>,
) -> UpstreamFuture {
    Box::pin(Timed {
        inner: inner.oneshot(req),
        started: Instant::now(),
        histogram: metrics.upstream_duration.clone(),
    })
}

pin_project_lite::pin_project! {
    /// Observes how long a future took. A named type rather than an async
    /// block, for the same rustc limitation as above.
    struct Timed<F> {
        #[pin]
        inner: F,
        started: Instant,
        histogram: prometheus::Histogram,
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        this.histogram.observe(this.started.elapsed().as_secs_f64());
        Poll::Ready(out)
    }
}
