//! The upstream: a pooled hyper-util client as a tower `Service`.
//!
//! It points each request at the upstream, strips hop-by-hop headers both ways
//! and bounds the wait for the response head by `upstream_timeout`. One client
//! (one connection pool) serves every request; cloning the service is cheap.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::strip_hop_by_hop;
use crate::error::UpstreamError;
use crate::Body;

#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Body>,
    scheme: Scheme,
    authority: Authority,
    timeout: Duration,
}

impl Upstream {
    /// A client for `base` (`http://host:port`).
    pub fn new(base: &Uri, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout.min(Duration::from_secs(5))));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            // Enough idle connections to keep a busy sidecar from reconnecting.
            .pool_max_idle_per_host(1024)
            .build(connector);
        Upstream {
            client,
            scheme: base.scheme().cloned().unwrap_or(Scheme::HTTP),
            authority: base
                .authority()
                .cloned()
                .expect("config checks the upstream has a host"),
            timeout,
        }
    }
}

impl tower::Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(pq);
        match Uri::from_parts(parts) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => {
                return Box::pin(async move { Err(UpstreamError::Unreachable(e.to_string())) })
            }
        }
        strip_hop_by_hop(req.headers_mut());
        // The framing sent upstream is the body's own: a Content-Length that
        // disagrees with it (a client that sent both Content-Length and
        // chunked) would desynchronise the pooled upstream connection.
        match req.body().size_hint().exact() {
            Some(n) if n > 0 || req.headers().contains_key(header::CONTENT_LENGTH) => {
                req.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
            Some(_) => {}
            None => {
                req.headers_mut().remove(header::CONTENT_LENGTH);
            }
        }
        // The client speaks HTTP/1.1 to the upstream whatever the caller used.
        *req.version_mut() = Version::HTTP_11;
        let timeout = self.timeout;
        let fut = self.client.request(req);
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Err(_) => Err(UpstreamError::Timeout(timeout)),
                // Only a failed connect proves nothing was sent; any other
                // client error may come after the request was written.
                Ok(Err(e)) if e.is_connect() => Err(UpstreamError::Unreachable(error_chain(&e))),
                Ok(Err(e)) => Err(UpstreamError::Failed(error_chain(&e))),
                Ok(Ok(resp)) => {
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    // The client's connection speaks its own version: an
                    // upstream answering HTTP/1.0 must not turn an HTTP/1.1
                    // client's status line (and keep-alive) into 1.0.
                    parts.version = Version::HTTP_11;
                    Ok(Response::from_parts(
                        parts,
                        body.map_err(Into::into).boxed(),
                    ))
                }
            }
        })
    }
}

/// An error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
