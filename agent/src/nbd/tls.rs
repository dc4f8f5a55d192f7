//! TLS for the NBD TCP export (the protocol's `NBD_OPT_STARTTLS`, as qemu-nbd and
//! nbdkit do it): the server's certificate and key, and the CA that every client
//! certificate must chain to. A client without a certificate signed by that CA does
//! not get past the TLS handshake; before TLS, every option except `NBD_OPT_STARTTLS`
//! and `NBD_OPT_ABORT` is answered `NBD_REP_ERR_TLS_REQD` (so not even the export
//! list is shown), and `NBD_OPT_EXPORT_NAME` closes the connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("read the NBD TLS {what} {}: {source}", path.display())]
    Pem {
        /// "CA", "certificate" or "key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM file holds no certificate.
    #[error("the NBD TLS {what} {} holds no certificate", path.display())]
    Empty {
        /// "CA" or "certificate".
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the material (bad CA, key not matching the certificate...).
    #[error("build the NBD TLS configuration: {0}")]
    Config(String),
}

/// The TLS side of the NBD TCP listener. Cheap to clone.
#[derive(Clone)]
pub struct NbdTls {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NbdTls(x509, client certificates required)")
    }
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        what,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

impl NbdTls {
    /// From PEM files: `ca` (the CA client certificates must chain to), `cert` (this
    /// server's certificate chain) and `key` (its private key).
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<NbdTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let mut roots = RootCertStore::empty();
        for c in certs("CA", ca)? {
            roots.add(c).map_err(config)?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let chain = certs("certificate", cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem {
            what: "key",
            path: key.to_owned(),
            source,
        })?;
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(config)?;
        Ok(NbdTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        })
    }

    pub(crate) fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }
}
