//! TLS configuration from PEM files (X.509, rustls with the ring provider).
//!
//! The server presents `server-cert.pem`/`server-key.pem`; with a client CA
//! it asks clients for a certificate and verifies it, but still admits
//! clients without one (they reach only exports without a secret, or with
//! one through `<name>/<secret>`).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;

use crate::error::{Error, ErrorKind, Result};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let v: std::result::Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::with_source(ErrorKind::Tls, format!("reading {}", path.display()), e))?
        .collect();
    let v = v.map_err(|e| {
        Error::with_source(ErrorKind::Tls, format!("parsing {}", path.display()), e)
    })?;
    if v.is_empty() {
        return Err(Error::new(
            ErrorKind::Tls,
            format!("no certificate in {}", path.display()),
        ));
    }
    Ok(v)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::with_source(ErrorKind::Tls, format!("reading key {}", path.display()), e)
    })
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    for c in certs(ca)? {
        r.add(c)
            .map_err(|e| Error::with_source(ErrorKind::Tls, format!("CA {}", ca.display()), e))?;
    }
    Ok(r)
}

/// A server configuration; `client_ca` enables client certificates.
pub fn server_config(
    cert: &Path,
    key_path: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>> {
    let b = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::with_source(ErrorKind::Tls, "tls versions", e))?;
    let b = match client_ca {
        None => b.with_no_client_auth(),
        Some(ca) => {
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| Error::with_source(ErrorKind::Tls, "client verifier", e))?;
            b.with_client_cert_verifier(v)
        }
    };
    let cfg = b
        .with_single_cert(certs(cert)?, key(key_path)?)
        .map_err(|e| {
            Error::with_source(ErrorKind::Tls, format!("certificate {}", cert.display()), e)
        })?;
    Ok(Arc::new(cfg))
}

/// A client configuration trusting `ca`, optionally presenting a certificate.
pub fn client_config(
    ca: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::with_source(ErrorKind::Tls, "tls versions", e))?
        .with_root_certificates(roots(ca)?);
    let cfg = match client_cert {
        None => b.with_no_client_auth(),
        Some((c, k)) => b.with_client_auth_cert(certs(c)?, key(k)?).map_err(|e| {
            Error::with_source(ErrorKind::Tls, format!("certificate {}", c.display()), e)
        })?,
    };
    Ok(Arc::new(cfg))
}

/// The server name a client checks the certificate against.
pub fn server_name(host: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(host.to_string())
        .map_err(|e| Error::with_source(ErrorKind::Tls, format!("server name {host}"), e))
}
