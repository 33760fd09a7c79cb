//! How idemgate speaks TLS to PostgreSQL: the URL's `sslmode` in libpq's
//! spellings, and the rustls client config that verifies the server.
//!
//! tokio-postgres knows `disable`, `prefer` and `require`; libpq's URLs
//! also say `verify-ca` and `verify-full`, and a URL that works with
//! `psql` should work here. Both are read as `require` with a verified
//! certificate. idemgate verifies the chain in every mode that uses TLS
//! (libpq, by default, checks nothing below `verify-ca`): `verify-ca`
//! leaves out only the host name, for a server reached by an address its
//! certificate does not name.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// What a TLS connection checks of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// The chain to a trusted root and the host name (every mode but
    /// `verify-ca`).
    Full,
    /// The chain only (`sslmode=verify-ca`).
    Chain,
}

/// Parses a PostgreSQL URL (or key=value string), reading libpq's
/// `sslmode=verify-ca` and `verify-full` as tokio-postgres's `require`.
pub fn parse(url: &str) -> Result<(tokio_postgres::Config, Verify), String> {
    let mut verify = Verify::Full;
    let mut text = url.to_owned();
    for (mode, check) in [("verify-full", Verify::Full), ("verify-ca", Verify::Chain)] {
        let given = format!("sslmode={mode}");
        // Only a whole parameter: not, say, inside a password.
        let found = text.match_indices(&given).map(|(at, _)| at).find(|&at| {
            let before = text[..at].chars().next_back();
            let after = text[at + given.len()..].chars().next();
            matches!(before, None | Some('?' | '&' | ' '))
                && matches!(after, None | Some('&' | ' '))
        });
        if let Some(at) = found {
            text.replace_range(at..at + given.len(), "sslmode=require");
            verify = check;
        }
    }
    match text.parse() {
        Ok(config) => Ok((config, verify)),
        // "invalid connection string" alone does not say which part.
        Err(e) => Err(match std::error::Error::source(&e) {
            Some(why) => format!("{e}: {why}"),
            None => e.to_string(),
        }),
    }
}

/// A rustls client config trusting the webpki roots and, given, the CAs
/// of `ca_file`, checking what `verify` says. (The roots are read as
/// `crate::tls` reads them for upstreams; the store sits below that
/// module, so it keeps its own: `tests/architecture.rs`.)
pub fn client_config(
    ca_file: Option<&Path>,
    verify: Verify,
) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs =
            CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    Ok(match verify {
        Verify::Full => builder.with_root_certificates(roots),
        Verify::Chain => {
            let chain = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| e.to_string())?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(chain)))
        }
    }
    .with_no_client_auth())
}

/// The webpki verifier without its host-name check. It checks the chain
/// first and the name last, so a name error means the chain held.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// What to do about a certificate the connection could not verify, for
/// an error's text (empty when the error is another).
pub fn hint(error: &str) -> &'static str {
    if error.contains("invalid peer certificate") {
        " (the server's TLS certificate was not verified: give its CA in store.ca_file; \
         sslmode=verify-ca if the certificate does not name the host in the URL; \
         sslmode=disable connects without TLS)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_verify_modes_are_read_as_require() {
        use tokio_postgres::config::SslMode;
        for (url, verify) in [
            ("postgres://a@h/db?sslmode=verify-full", Verify::Full),
            (
                "postgres://a@h/db?sslmode=verify-ca&connect_timeout=2",
                Verify::Chain,
            ),
            ("host=h user=a sslmode=verify-ca", Verify::Chain),
        ] {
            let (config, v) = parse(url).unwrap();
            assert_eq!(config.get_ssl_mode(), SslMode::Require, "{url}");
            assert_eq!(v, verify, "{url}");
        }
        // A password that only looks like the parameter is left alone.
        let (config, v) = parse("postgres://a:sslmode=verify-ca@h/db").unwrap();
        assert_eq!(config.get_password(), Some(&b"sslmode=verify-ca"[..]));
        assert_eq!((config.get_ssl_mode(), v), (SslMode::Prefer, Verify::Full));
        let (config, v) = parse("postgres://a@h/db").unwrap();
        assert_eq!((config.get_ssl_mode(), v), (SslMode::Prefer, Verify::Full));
        let (config, _) = parse("postgres://a@h/db?sslmode=disable").unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn a_bad_url_says_which_part() {
        let e = parse("postgres://a@h/db?sslmode=sometimes").unwrap_err();
        assert!(e.contains("sslmode"), "{e}");
        let e = parse("postgres://a@h/db?sslrootcert=/x.pem").unwrap_err();
        assert!(e.contains("sslrootcert"), "{e}");
    }
}
