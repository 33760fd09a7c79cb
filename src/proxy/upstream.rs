//! An upstream as a tower `Service`: plaintext HTTP/1.1 over connections
//! the request's own task drives (`driven.rs`), h2c and TLS (rustls; h2 or
//! HTTP/1.1 by ALPN) over hyper-util's pooled client.
//!
//! It points each request at the upstream, strips hop-by-hop headers both
//! ways and bounds the wait for the response head by the upstream's
//! timeout. One client (one connection pool) per upstream config; cloning
//! the service is cheap. TLS always verifies the server's certificate and
//! hostname (SNI on) against the webpki roots plus `upstream_ca_file`,
//! unless the loudly named `danger_accept_invalid_certs` says otherwise.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::driven::Pool;
use super::headers::strip_hop_by_hop;
use crate::config::{UpstreamConfig, UpstreamProtocol};
use crate::error::{error_chain, UpstreamError};
use crate::telemetry;
use crate::tls;
use crate::Body;

#[derive(Clone)]
pub struct Upstream {
    inner: Inner,
    timeout: Duration,
    /// Host and port, for the client span's `server.address` and
    /// `server.port` (none for a service given in code).
    origin: Option<Arc<(String, u16)>>,
}

/// The host and port of an upstream URI (the scheme's port if none).
fn origin(uri: &Uri) -> Option<Arc<(String, u16)>> {
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme() == Some(&Scheme::HTTPS) {
            443
        } else {
            80
        });
    Some(Arc::new((host.to_owned(), port)))
}

/// Every kind of upstream is small to clone and to move (a pointer or
/// two): a request carries its upstream through several futures, and
/// hyper-util's clients are large (measured: moving them inline cost about
/// 2 µs of memmove per covered request).
#[derive(Clone)]
enum Inner {
    /// A plaintext HTTP/1.1 upstream: connections driven by the request's
    /// own task (`driven.rs`).
    Driven(Pool),
    /// A TLS or h2c upstream: hyper-util's pooled client.
    Client(Arc<Clients>),
    /// Any service (tests drive the proxy against one).
    Service(tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, UpstreamError>),
}

/// A TLS or h2c upstream's clients.
struct Clients {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    /// HTTP/1.1 only, for upgrades (an h2 connection cannot switch
    /// protocols): the client itself where it speaks only HTTP/1.1, a
    /// second one where ALPN may choose h2, none for h2c.
    upgrades: Option<Client<HttpsConnector<HttpConnector>, Body>>,
    scheme: Scheme,
    authority: Authority,
}

impl Upstream {
    /// A client for an upstream config: its TLS files are read now.
    pub fn from_config(u: &UpstreamConfig) -> Result<Self, String> {
        let connect_timeout = u.timeout.min(Duration::from_secs(5));
        if u.uri.scheme() != Some(&Scheme::HTTPS) && u.protocol != UpstreamProtocol::H2c {
            return Ok(Upstream {
                inner: Inner::Driven(Pool::new(
                    &u.uri,
                    connect_timeout,
                    u.max_idle,
                    u.idle_timeout,
                )?),
                timeout: u.timeout,
                origin: origin(&u.uri),
            });
        }
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        http.enforce_http(false);
        let tls = tls_config(u)?;
        let builder = || {
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
        };
        let connector = match u.protocol {
            // ALPN offers h2 and http/1.1 over TLS; plaintext stays 1.1.
            UpstreamProtocol::Auto => builder()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http.clone()),
            UpstreamProtocol::Http1 => builder().enable_http1().wrap_connector(http.clone()),
            UpstreamProtocol::H2c => builder().enable_http2().wrap_connector(http.clone()),
        };
        let mut client = Client::builder(TokioExecutor::new());
        client
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(u.idle_timeout)
            .pool_max_idle_per_host(u.max_idle);
        let upgrades = match u.protocol {
            UpstreamProtocol::H2c => None,
            UpstreamProtocol::Http1 => Some(client.build(connector.clone())),
            UpstreamProtocol::Auto => {
                Some(client.build(builder().enable_http1().wrap_connector(http)))
            }
        };
        if u.protocol == UpstreamProtocol::H2c {
            client.http2_only(true);
        }
        Ok(Upstream {
            inner: Inner::Client(Arc::new(Clients {
                client: client.build(connector),
                upgrades,
                scheme: u.uri.scheme().cloned().unwrap_or(Scheme::HTTP),
                authority: u
                    .uri
                    .authority()
                    .cloned()
                    .ok_or_else(|| format!("{} has no host", u.uri))?,
            })),
            timeout: u.timeout,
            origin: origin(&u.uri),
        })
    }

    /// Any service as the upstream, with `timeout` as its upstream timeout.
    pub fn from_service<S>(service: S, timeout: Duration) -> Self
    where
        S: tower::Service<Request<Body>, Response = Response<Body>, Error = UpstreamError>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Upstream {
            inner: Inner::Service(tower::util::BoxCloneSyncService::new(service)),
            timeout,
            origin: None,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// The rustls client config for `u`: roots, client certificate, verifier.
fn tls_config(u: &UpstreamConfig) -> Result<rustls::ClientConfig, String> {
    let provider = tls::provider();
    let roots = tls::roots(u.ca_file.as_deref()).map_err(|e| format!("upstream_ca_file {e}"))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match (&u.cert_file, &u.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("upstream_cert_file {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("upstream_key_file {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("upstream client certificate: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    if u.danger_accept_invalid_certs {
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(AcceptAny(provider)));
    }
    Ok(config)
}

/// `danger_accept_invalid_certs`: accepts any server certificate (the
/// handshake signatures are still checked, so the session is encrypted to
/// whoever answered).
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The future of one upstream call.
pub type UpstreamFuture =
    Pin<Box<dyn Future<Output = Result<Response<Body>, UpstreamError>> + Send>>;

impl tower::Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = UpstreamError;
    type Future = UpstreamFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if telemetry::in_sampled_request() {
            return self.traced(req);
        }
        self.send(req)
    }
}

impl Upstream {
    /// The call in a client span, whose context the request carries on
    /// (`traceparent`), and which notes the status the upstream gave.
    fn traced(&mut self, mut req: Request<Body>) -> UpstreamFuture {
        use tracing::field::Empty;
        use tracing::Instrument;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let method = req.method().clone();
        let (host, port) = self
            .origin
            .as_deref()
            .map_or(("", 0), |(h, p)| (h.as_str(), *p));
        let span = tracing::debug_span!(
            "upstream",
            otel.name = %method,
            otel.kind = "client",
            http.request.method = %method,
            server.address = host,
            server.port = port,
            http.response.status_code = Empty,
            error.type = Empty,
            otel.status_code = Empty,
        );
        telemetry::inject(&span.context(), req.headers_mut());
        let call = self.send(req);
        let noted = span.clone();
        Box::pin(
            async move {
                let result = call.await;
                match &result {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        noted.record("http.response.status_code", status);
                        if status >= 500 {
                            noted.record("error.type", status);
                            noted.record("otel.status_code", "ERROR");
                        }
                    }
                    Err(e) => {
                        noted.record("error.type", e.to_string());
                        noted.record("otel.status_code", "ERROR");
                    }
                }
                result
            }
            .instrument(span),
        )
    }

    fn send(&mut self, req: Request<Body>) -> UpstreamFuture {
        let timeout = self.timeout;
        match &mut self.inner {
            Inner::Service(svc) => Box::pin(tower::Service::call(svc, req)),
            Inner::Driven(pool) => {
                // Origin form, as HTTP/1.1 sends it to an origin server.
                let req = outbound(req, |pq| Ok(Uri::from(pq)));
                let pool = pool.clone();
                Box::pin(async move {
                    match tokio::time::timeout(timeout, pool.send(req?)).await {
                        Err(_) => Err(UpstreamError::Timeout(timeout)),
                        Ok(r) => r.map(as_received),
                    }
                })
            }
            Inner::Client(c) => {
                let req = outbound(req, absolute(&c.scheme, &c.authority));
                Box::pin(request(c.client.clone(), req, timeout))
            }
        }
    }
}

impl Upstream {
    /// Sends a request that asks to switch protocols, with its `Upgrade`
    /// and `Connection: upgrade`, on an HTTP/1.1 connection of its own: a
    /// `101` hands that connection over (`hyper::upgrade::on` the
    /// response). An h2c upstream gets it as a plain request, since HTTP/2
    /// has no upgrades.
    pub fn upgrade(&mut self, req: Request<Body>) -> UpstreamFuture {
        let timeout = self.timeout;
        let upgrade = req.headers().get(header::UPGRADE).cloned();
        let keep = move |req: Result<Request<Body>, UpstreamError>| {
            req.map(|mut req| {
                if let Some(u) = &upgrade {
                    req.headers_mut().insert(header::UPGRADE, u.clone());
                    req.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                }
                req
            })
        };
        let fut: UpstreamFuture = match &mut self.inner {
            Inner::Service(svc) => Box::pin(tower::Service::call(svc, req)),
            Inner::Driven(pool) => {
                let req = keep(outbound(req, |pq| Ok(Uri::from(pq))));
                let pool = pool.clone();
                Box::pin(async move {
                    match tokio::time::timeout(timeout, pool.upgrade(req?)).await {
                        Err(_) => Err(UpstreamError::Timeout(timeout)),
                        Ok(r) => r,
                    }
                })
            }
            Inner::Client(c) => {
                let req = outbound(req, absolute(&c.scheme, &c.authority));
                match &c.upgrades {
                    Some(h1) => Box::pin(request_raw(h1.clone(), keep(req), timeout)),
                    None => Box::pin(request_raw(c.client.clone(), req, timeout)),
                }
            }
        };
        Box::pin(async move {
            let resp = fut.await?;
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                return Ok(as_received(resp));
            }
            // The switch, as the client must see it.
            let upgrade = resp.headers().get(header::UPGRADE).cloned();
            let mut resp = as_received(resp);
            if let Some(u) = upgrade {
                resp.headers_mut().insert(header::UPGRADE, u);
            }
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            Ok(resp)
        })
    }
}

/// Absolute form, as hyper-util's client wants it.
fn absolute<'a>(
    scheme: &'a Scheme,
    authority: &'a Authority,
) -> impl FnOnce(PathAndQuery) -> Result<Uri, UpstreamError> + 'a {
    move |pq| {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(scheme.clone());
        parts.authority = Some(authority.clone());
        parts.path_and_query = Some(pq);
        Uri::from_parts(parts).map_err(|e| UpstreamError::Unreachable(e.to_string()))
    }
}

/// One request through hyper-util's client, its failure classified.
async fn request(
    client: Client<HttpsConnector<HttpConnector>, Body>,
    req: Result<Request<Body>, UpstreamError>,
    timeout: Duration,
) -> Result<Response<Body>, UpstreamError> {
    request_raw(client, req, timeout).await.map(as_received)
}

/// [`request`], the response as the upstream sent it.
async fn request_raw(
    client: Client<HttpsConnector<HttpConnector>, Body>,
    req: Result<Request<Body>, UpstreamError>,
    timeout: Duration,
) -> Result<Response<Body>, UpstreamError> {
    match tokio::time::timeout(timeout, client.request(req?)).await {
        Err(_) => Err(UpstreamError::Timeout(timeout)),
        // Only a failed connect proves nothing was sent; any other client
        // error may come after the request was written. A TLS handshake the
        // server refused (its certificate, or our client certificate) never
        // carried the request either.
        Ok(Err(e)) if e.is_connect() => Err(UpstreamError::Unreachable(tls_named(&e))),
        Ok(Err(e)) if refused_handshake(&e) => Err(UpstreamError::Unreachable(tls_named(&e))),
        Ok(Err(e)) => Err(UpstreamError::Failed(error_chain(&e))),
        Ok(Ok(resp)) => Ok(resp.map(|b| b.map_err(Into::into).boxed())),
    }
}

/// The request as it goes upstream: its URI made by `uri` from its path and
/// query, hop-by-hop headers gone (`TE: trailers` kept), framing its body's
/// own.
fn outbound(
    mut req: Request<Body>,
    uri: impl FnOnce(PathAndQuery) -> Result<Uri, UpstreamError>,
) -> Result<Request<Body>, UpstreamError> {
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = uri(pq)?;
    // `TE: trailers` is the one TE value a proxy passes on (RFC 9110
    // §10.1.4, RFC 9113 §8.2.2): gRPC servers require it.
    let trailers = req
        .headers()
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    strip_hop_by_hop(req.headers_mut());
    if trailers {
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
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
    // The client picks the upstream's version (ALPN, h2c); the caller's
    // own must not force one.
    *req.version_mut() = Version::HTTP_11;
    Ok(req)
}

/// The upstream's response as the proxy passes it on.
fn as_received(resp: Response<Body>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The client's connection speaks its own version: an upstream
    // answering HTTP/1.0 must not turn an HTTP/1.1 client's status line
    // (and keep-alive) into 1.0.
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, body)
}

/// Alerts that end a handshake: the server refused the session, so no
/// request on it reached the application (with TLS 1.3 the client may
/// already have written it, but the server never read it). Matched on
/// rustls' own wording, as hyper-rustls hands its errors over as text
/// inside `io::Error`s; the TLS tests pin it.
const REFUSED_HANDSHAKE: [&str; 8] = [
    "received fatal alert: CertificateRequired",
    "received fatal alert: BadCertificate",
    "received fatal alert: UnknownCA",
    "received fatal alert: CertificateUnknown",
    "received fatal alert: CertificateRevoked",
    "received fatal alert: CertificateExpired",
    "received fatal alert: HandshakeFailure",
    "received fatal alert: AccessDenied",
];

fn refused_handshake(e: &hyper_util::client::legacy::Error) -> bool {
    let chain = error_chain(e);
    REFUSED_HANDSHAKE.iter().any(|a| chain.contains(a))
}

/// The error chain, saying "TLS" when the handshake is what failed.
fn tls_named(e: &hyper_util::client::legacy::Error) -> String {
    let chain = error_chain(e);
    let tls = [
        "invalid peer certificate",
        "received fatal alert",
        "peer is incompatible",
        "peer misbehaved",
    ];
    if tls.iter().any(|t| chain.contains(t)) {
        format!("TLS handshake with the upstream failed: {chain}")
    } else {
        chain
    }
}
