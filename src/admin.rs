//! The admin listener: health and readiness (metrics and the dedup API join
//! it later).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::error::{full, problem};
use crate::store::{AnyStore, Store};
use crate::Body;

/// How long `/readyz` waits for the store before calling it unready.
const READY_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Admin {
    store: AnyStore,
}

impl Admin {
    pub fn new(store: AnyStore) -> Self {
        Admin { store }
    }

    /// A hyper service over this admin.
    pub fn service(
        &self,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send,
    > + Clone
           + Send
           + 'static {
        let admin = self.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(admin.handle(req).await) }
        })
    }

    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => {
                match tokio::time::timeout(READY_TIMEOUT, self.store.ping()).await {
                    Ok(Ok(())) => text(StatusCode::OK, "ready\n"),
                    Ok(Err(e)) => problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not-ready",
                        "Not ready",
                        &e.to_string(),
                    ),
                    Err(_) => problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not-ready",
                        "Not ready",
                        "the store did not answer in time",
                    ),
                }
            }
            _ => problem(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "no such admin endpoint",
            ),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    resp
}
