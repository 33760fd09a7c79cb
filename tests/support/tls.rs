//! A test PKI (a CA and certificates made with rcgen, written to temp
//! files) and a real upstream over TLS or h2c that counts its calls,
//! records the HTTP version of each, and answers gRPC-style requests with
//! trailers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Version};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A CA and a directory its files go to.
pub struct Pki {
    pub dir: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("idemgate-pki-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("idemgate test CA {name}"),
        );
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pki = Pki { dir, issuer };
        pki.write("ca.pem", &pki.issuer.pem());
        pki
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A certificate for `names` signed by the CA: (cert PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real upstream: TLS (with ALPN h2 and/or http/1.1, optionally
/// requiring a client certificate) or plaintext (HTTP/1.1 and h2c).
pub struct H2Upstream {
    pub addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    pub versions: Arc<Mutex<Vec<Version>>>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Tls<'a> {
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
    /// Require a client certificate signed by this CA (PEM).
    pub client_ca: Option<&'a str>,
    pub h2: bool,
}

impl H2Upstream {
    pub async fn start(tls: Option<Tls<'_>>) -> Self {
        let acceptor = tls.map(|t| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(t.cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap();
            let key = PrivateKeyDer::from_pem_slice(t.key_pem.as_bytes()).unwrap();
            let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap();
            let builder = match t.client_ca {
                Some(ca) => {
                    let mut roots = rustls::RootCertStore::empty();
                    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                        roots.add(c.unwrap()).unwrap();
                    }
                    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider,
                    )
                    .build()
                    .unwrap();
                    builder.with_client_cert_verifier(verifier)
                }
                None => builder.with_no_client_auth(),
            };
            let mut config = builder.with_single_cert(certs, key).unwrap();
            config.alpn_protocols = if t.h2 {
                vec![b"h2".to_vec(), b"http/1.1".to_vec()]
            } else {
                vec![b"http/1.1".to_vec()]
            };
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let versions = Arc::new(Mutex::new(Vec::new()));
        let (c, v) = (calls.clone(), versions.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (c, v, acceptor) = (c.clone(), v.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (c, v) = (c.clone(), v.clone());
                        async move { Ok::<_, Infallible>(answer(req, c, v).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(a) => {
                            let Ok(tls) = a.accept(stream).await else {
                                return;
                            };
                            let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        H2Upstream {
            addr,
            calls,
            versions,
            task,
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for H2Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: Request<Incoming>,
    calls: Arc<AtomicUsize>,
    versions: Arc<Mutex<Vec<Version>>>,
) -> Response<BoxBody<Bytes, Error>> {
    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
    versions.lock().unwrap().push(req.version());
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let delay = req
        .headers()
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0u64);
    let _ = req.into_body().collect().await;
    tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    if grpc {
        // A unary gRPC answer: a message, then the status in trailers.
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", "ok".parse().unwrap());
        let frames = vec![
            Ok::<_, Error>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let mut resp = Response::new(body);
        resp.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        return resp;
    }
    let body = http_body_util::Full::new(Bytes::from(format!("{{\"call\":{n}}}")))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = http::StatusCode::CREATED;
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp
}
