//! TLS client settings the proxy's upstreams and the trace exporter share:
//! rustls on ring (no OpenSSL), the webpki roots, and a PEM file of more
//! CAs where one is given. (The store keeps its own, for PostgreSQL: it sits
//! below everything but the core, the metrics and the checker.)

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// The one crypto provider (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The webpki roots, and every certificate of `ca_file`; an error names
/// the file (`<path>: <why>`).
pub fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let why = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| why(&e))? {
            roots.add(cert.map_err(|e| why(&e))?).map_err(|e| why(&e))?;
        }
    }
    Ok(roots)
}

/// A client config trusting [`roots`] of `ca_file`, without a client
/// certificate.
pub fn client(ca_file: Option<&Path>) -> Result<ClientConfig, String> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca_file)?)
        .with_no_client_auth())
}
