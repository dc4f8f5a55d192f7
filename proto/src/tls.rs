//! Mutual TLS on every gRPC hop, the identities it proves, and the authorization layer
//! that decides from them.
//!
//! One cluster CA signs every certificate. A certificate's subject says who holds it:
//!
//! | Organization (O) | Common name (CN) | identity |
//! |---|---|---|
//! | `mdcluster:nodes` | the node name (also a SAN DNS name) | the agent of that node |
//! | `mdcluster:server` | any (e.g. `mdserver`) | mdserver (every replica) |
//! | `mdcluster:admin` | the operator | an operator who may do everything |
//! | `mdcluster:viewer` | the operator | an operator who may only look |
//!
//! A node certificate must carry its node name as a SAN DNS name as well: mdserver checks
//! an agent's server certificate against the name of the node it means to call, so an
//! agent cannot pose as another node. Clients check mdserver's server certificate against
//! the host of the URL they dial (a SAN DNS name or IP address).
//!
//! This module owns: loading the PEM files ([`Tls`]) and reloading them when they change
//! on disk or on demand (SIGHUP), so certificates rotate without a restart; the server's
//! accept loop with bounded, time-limited handshakes ([`incoming`]); the client connector
//! that dials with the current files ([`Transport::channel`]); reading the caller's
//! [`Caller`] from its verified certificate; and the tower layer ([`AuthLayer`]) that
//! refuses a call with PERMISSION_DENIED before it reaches a handler, and writes one
//! audit line per administrative call.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Channel, Endpoint};

use crate::status::to_status;
use crate::v1::Errno;

/// Organization of node (agent) certificates.
pub const ORG_NODES: &str = "mdcluster:nodes";
/// Organization of mdserver's certificates.
pub const ORG_SERVER: &str = "mdcluster:server";
/// Organization of administrators' certificates.
pub const ORG_ADMIN: &str = "mdcluster:admin";
/// Organization of read-only operators' certificates.
pub const ORG_VIEWER: &str = "mdcluster:viewer";

/// Longest a TLS handshake may take on a server before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes a server runs at once; further connections wait in the backlog.
const MAX_HANDSHAKES: usize = 256;
/// Handshaken connections queued towards the gRPC server.
const ACCEPTED_QUEUE: usize = 64;

/// Errors of loading certificates and building TLS connections.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("read the {what} {}: {source}; check the path and its permissions", path.display())]
    Read {
        /// Which file (CA, certificate, key).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("the {what} {} is unusable: {reason}", path.display())]
    Pem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The files do not make a TLS configuration (e.g. the key does not match the
    /// certificate).
    #[error("TLS configuration from {cert} and {key}: {reason}")]
    Config {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// Why.
        reason: String,
    },
    /// A URL that cannot be dialled in this mode.
    #[error("{url}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// Who called, as proved by the client certificate (or nobody, with `--insecure`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The agent of this node.
    Node(String),
    /// mdserver (any replica), named by its CN.
    Server(String),
    /// An administrator (may do everything).
    Admin(String),
    /// A read-only operator.
    Viewer(String),
    /// No TLS (`--insecure`): every call is allowed, as in a trusted test network.
    Insecure,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Node(n) => write!(f, "node {n} (O={ORG_NODES})"),
            Caller::Server(n) => write!(f, "mdserver {n} (O={ORG_SERVER})"),
            Caller::Admin(n) => write!(f, "admin {n} (O={ORG_ADMIN})"),
            Caller::Viewer(n) => write!(f, "viewer {n} (O={ORG_VIEWER})"),
            Caller::Insecure => write!(f, "an unauthenticated caller (--insecure)"),
        }
    }
}

impl Caller {
    /// The identity a certificate (DER) proves. The certificate must already be verified
    /// against the cluster CA (the TLS handshake did that).
    pub fn of_certificate(der: &[u8]) -> Result<Caller, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("the client certificate cannot be parsed: {e}"))?;
        let one = |what: &str, mut it: Box<dyn Iterator<Item = Result<String, String>> + '_>| {
            let first = it.next().transpose()?;
            if it.next().is_some() {
                return Err(format!("the client certificate has more than one {what}"));
            }
            first.ok_or_else(|| format!("the client certificate has no {what}"))
        };
        let text = |a: &x509_parser::x509::AttributeTypeAndValue<'_>| {
            a.as_str()
                .map(str::to_owned)
                .map_err(|e| format!("a subject field is not text: {e}"))
        };
        let org = one(
            "Organization (O)",
            Box::new(cert.subject().iter_organization().map(text)),
        )?;
        let cn = one(
            "Common Name (CN)",
            Box::new(cert.subject().iter_common_name().map(text)),
        )?;
        match org.as_str() {
            ORG_NODES => {
                let sans: Vec<String> = match cert.subject_alternative_name() {
                    Ok(Some(ext)) => ext
                        .value
                        .general_names
                        .iter()
                        .filter_map(|g| match g {
                            x509_parser::extensions::GeneralName::DNSName(d) => {
                                Some((*d).to_owned())
                            }
                            _ => None,
                        })
                        .collect(),
                    Ok(None) => Vec::new(),
                    Err(e) => return Err(format!("the SAN extension cannot be parsed: {e}")),
                };
                if !sans.iter().any(|s| s == &cn) {
                    return Err(format!(
                        "the node certificate of {cn} does not carry {cn} as a SAN DNS name"
                    ));
                }
                Ok(Caller::Node(cn))
            }
            ORG_SERVER => Ok(Caller::Server(cn)),
            ORG_ADMIN => Ok(Caller::Admin(cn)),
            ORG_VIEWER => Ok(Caller::Viewer(cn)),
            other => Err(format!(
                "the certificate of {cn} has Organization {other:?}, none of {ORG_NODES}, \
                 {ORG_SERVER}, {ORG_ADMIN}, {ORG_VIEWER}"
            )),
        }
    }

    /// The caller of a request that went through [`AuthLayer`] (None: it did not, which
    /// handlers treat as a refusal).
    pub fn of_request<T>(req: &tonic::Request<T>) -> Option<&Caller> {
        req.extensions().get::<Caller>()
    }

    /// The node this caller is the agent of.
    pub fn node(&self) -> Option<&str> {
        match self {
            Caller::Node(n) => Some(n),
            _ => None,
        }
    }
}

/// The three PEM files of one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA (one or more certificates: during a CA rotation, old and new).
    pub ca: PathBuf,
    /// This identity's certificate chain (leaf first).
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// What identifies a version of the files on disk.
type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [&files.ca, &files.cert, &files.key]
        .iter()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| {
                (
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                    m.ino(),
                )
            })
        })
        .collect()
}

struct Loaded {
    stamp: Stamp,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// The TLS state of one process: its files and the configurations built from them,
/// rebuilt when the files change (checked at each new connection) or on [`Tls::reload`].
/// A reload that fails keeps the previous configuration and logs why.
pub struct Tls {
    files: TlsFiles,
    loaded: RwLock<Loaded>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<Loaded, TlsError> {
    // Stamp first: a change while reading is seen at the next check.
    let stamp = stamp(files);
    let mut roots = RootCertStore::empty();
    for c in certs("CA certificate", &files.ca)? {
        roots.add(c).map_err(|e| TlsError::Pem {
            what: "CA certificate",
            path: files.ca.clone(),
            reason: e.to_string(),
        })?;
    }
    let roots = Arc::new(roots);
    let chain = certs("certificate", &files.cert)?;
    let key_pem = read("private key", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        what: "private key",
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    let config_err = |e: &dyn fmt::Display| TlsError::Config {
        cert: files.cert.display().to_string(),
        key: files.key.display().to_string(),
        reason: e.to_string(),
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| config_err(&e))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| config_err(&e))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(&e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| config_err(&e))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        stamp,
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

impl Tls {
    /// Loads `files`; fails if they do not make a usable configuration.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TlsError> {
        let loaded = build(&files)?;
        Ok(Arc::new(Tls {
            files,
            loaded: RwLock::new(loaded),
        }))
    }

    /// The files.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Re-reads the files now (SIGHUP). On error the previous configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = build(&self.files)?;
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
        Ok(())
    }

    /// Reloads if a file changed on disk since the last load.
    fn refresh(&self) {
        let changed = {
            let l = self.loaded.read().unwrap_or_else(|e| e.into_inner());
            l.stamp != stamp(&self.files)
        };
        if changed {
            if let Err(e) = self.reload() {
                // Keep serving with the previous files; a half-written rotation completes
                // later and is picked up then.
                tracing::warn!(
                    "TLS files changed but cannot be loaded (keeping the previous ones): {e}"
                );
                let mut l = self.loaded.write().unwrap_or_else(|e| e.into_inner());
                l.stamp = stamp(&self.files);
            }
        }
    }

    /// The server configuration for a new connection.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.refresh();
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .server
            .clone()
    }

    /// The client configuration for a new connection.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.refresh();
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .client
            .clone()
    }

    /// Reloads on every SIGHUP for as long as the runtime runs.
    pub fn reload_on_sighup(self: &Arc<Self>) {
        use tokio::signal::unix::{signal, SignalKind};
        let tls = self.clone();
        match signal(SignalKind::hangup()) {
            Ok(mut s) => {
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        if let Err(e) = tls.reload() {
                            tracing::error!(
                                "SIGHUP: TLS reload failed, keeping the previous certificates: {e}"
                            );
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(
                "cannot catch SIGHUP ({e}): certificates reload when their files change"
            ),
        }
    }
}

/// How a process talks gRPC: mutual TLS with its files, or plain text (`--insecure`).
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plain HTTP/2; nothing is authenticated.
    Insecure,
    /// Mutual TLS.
    Tls(Arc<Tls>),
}

impl Transport {
    /// The transport the `--tls-*`/`--insecure` flags ask for: exactly one of the three
    /// files set and `insecure`, or `insecure` alone. `who` names the binary for the
    /// warning and the errors.
    pub fn from_flags(
        who: &str,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        insecure: bool,
    ) -> Result<Transport, String> {
        match (ca, cert, key, insecure) {
            (None, None, None, true) => {
                tracing::warn!(
                    "{who}: --insecure: gRPC in plain text, no peer is authenticated; \
                     anyone who reaches this process controls the cluster"
                );
                Ok(Transport::Insecure)
            }
            (Some(ca), Some(cert), Some(key), false) => Tls::load(TlsFiles { ca, cert, key })
                .map(Transport::Tls)
                .map_err(|e| format!("{who}: {e}")),
            (_, _, _, true) => Err(format!(
                "{who}: --insecure and --tls-ca/--tls-cert/--tls-key exclude each other"
            )),
            _ => Err(format!(
                "{who}: give --tls-ca, --tls-cert and --tls-key (mutual TLS), \
                 or --insecure for plain text"
            )),
        }
    }

    /// True with TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// The endpoint for `url` (`https://HOST:PORT` or `HOST:PORT` with TLS, `http://...`
    /// or `HOST:PORT` without), to be tuned and passed to [`Transport::channel`].
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let bad = |reason: String| TlsError::Url {
            url: url.to_owned(),
            reason,
        };
        let rest = match url.split_once("://") {
            None => url,
            Some(("https", rest)) if self.is_tls() => rest,
            Some(("http", rest)) if !self.is_tls() => rest,
            Some(("http", _)) => {
                return Err(bad(
                    "an http:// URL with mutual TLS configured: use https:// (or --insecure \
                     for plain text)"
                        .into(),
                ))
            }
            Some(("https", _)) => {
                return Err(bad(
                    "an https:// URL with --insecure: give --tls-ca, --tls-cert and --tls-key"
                        .into(),
                ))
            }
            Some((scheme, _)) => return Err(bad(format!("unknown scheme {scheme}://"))),
        };
        // The TLS connector below does the TLS itself: tonic sees plain http.
        Endpoint::from_shared(format!("http://{rest}")).map_err(|e| bad(e.to_string()))
    }

    /// A lazily connecting channel over `ep`. With TLS each new connection uses the
    /// current files and checks the server's certificate against `server_name` (None:
    /// the URL's host).
    pub fn channel(&self, ep: &Endpoint, server_name: Option<&str>) -> Channel {
        match self {
            Transport::Insecure => ep.connect_lazy(),
            Transport::Tls(tls) => ep.connect_with_connector_lazy(Connector {
                tls: tls.clone(),
                server_name: server_name.map(str::to_owned),
            }),
        }
    }

    /// A connected channel (bounded by the endpoint's connect timeout), for one-shot
    /// clients.
    pub async fn connect(
        &self,
        ep: &Endpoint,
        server_name: Option<&str>,
    ) -> Result<Channel, tonic::transport::Error> {
        match self {
            Transport::Insecure => ep.connect().await,
            Transport::Tls(tls) => {
                ep.connect_with_connector(Connector {
                    tls: tls.clone(),
                    server_name: server_name.map(str::to_owned),
                })
                .await
            }
        }
    }
}

/// Dials TCP, then TLS with the current client configuration.
#[derive(Clone)]
struct Connector {
    tls: Arc<Tls>,
    server_name: Option<String>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let name = self.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| format!("no host in {uri}"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = name.unwrap_or_else(|| host.clone());
            let server_name = ServerName::try_from(name.clone())
                .map_err(|e| format!("{name} is not a valid TLS server name: {e}"))?;
            let stream = TlsConnector::from(tls.client_config())
                .connect(server_name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {host}:{port} (as {name}): {e}"))?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// The accepted, handshaken connections of `listener`, for
/// `serve_with_incoming[_shutdown]`. Handshakes run beside the accept loop, at most
/// [`MAX_HANDSHAKES`] at once, each bounded by [`HANDSHAKE_TIMEOUT`]; a failed one is
/// logged with the peer's address and dropped. The loop ends when the server drops the
/// stream.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Tls>,
) -> ReceiverStream<Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = handshakes.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = tx.closed() => break,
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => break,
            };
            let (tcp, peer): (TcpStream, SocketAddr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off a little, then go on.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, "TLS handshake refused: {e}");
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "TLS handshake not done within {HANDSHAKE_TIMEOUT:?}: dropped");
                    }
                }
                drop(permit);
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Serves only `health` (the standard gRPC health service) in plain text on `listener`
/// until `stop` completes: the port for probes that cannot speak mutual TLS (the
/// kubelet's `grpc:` probes). It answers SERVING / NOT_SERVING and nothing else.
pub async fn serve_plain_health<S>(
    listener: TcpListener,
    health: S,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, stop)
        .await
}

/// What a call needs, as a policy decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read or a call whose own handler checks ownership: not audited.
    Read,
    /// A change to the cluster: one audit line per call.
    Admin,
}

/// Decides from the gRPC method path (`/package.Service/Method`) and a verified caller:
/// `Err(why)` refuses.
pub type Policy = fn(&str, &Caller) -> Result<Access, String>;

/// A tower layer for `tonic::transport::Server::layer`: finds the caller from the TLS
/// connection (or [`Caller::Insecure`] without TLS), asks the policy, refuses with
/// PERMISSION_DENIED (errno EPERM, the method and the reason) or passes the call on with
/// the [`Caller`] in its extensions.
#[derive(Debug, Clone, Copy)]
pub struct AuthLayer {
    policy: Policy,
    tls: bool,
    service: &'static str,
}

impl AuthLayer {
    /// A layer for `service` (the process, for log lines) with `policy`; `tls` says the
    /// server runs mutual TLS (every call then has a verified certificate).
    pub fn new(service: &'static str, tls: bool, policy: Policy) -> AuthLayer {
        AuthLayer {
            policy,
            tls,
            service,
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, cfg: *self }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    cfg: AuthLayer,
}

fn caller_of<B>(req: &http::Request<B>, tls: bool) -> Result<(Caller, Option<SocketAddr>), String> {
    if !tls {
        let peer = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(|i| i.remote_addr());
        return Ok((Caller::Insecure, peer));
    }
    let info = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .ok_or("the connection is not TLS")?;
    let peer = info.get_ref().remote_addr();
    let certs = info
        .peer_certs()
        .ok_or("no client certificate was presented")?;
    let leaf = certs.first().ok_or("no client certificate was presented")?;
    Caller::of_certificate(leaf).map(|c| (c, peer))
}

impl<S, B, R> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let cfg = self.cfg;
        let decided = caller_of(&req, cfg.tls).and_then(|(caller, peer)| {
            (cfg.policy)(&method, &caller)
                .map(|a| (caller.clone(), peer, a))
                .map_err(|why| format!("{caller} may not call {method}: {why}"))
        });
        match decided {
            Err(why) => {
                tracing::warn!(service = cfg.service, %method, "denied: {why}");
                let status = to_status(Errno::Eperm, method, format!("permission denied: {why}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
            Ok((caller, peer, access)) => {
                if access == Access::Admin {
                    let peer = peer.map(|p| p.to_string()).unwrap_or_default();
                    tracing::info!(target: "audit", service = cfg.service, caller = %caller, %peer, %method, "audit: permitted");
                }
                req.extensions_mut().insert(caller);
                // The clone is the ready one's twin: swap so the ready one serves this call.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(req).await })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_no_identity() {
        assert!(Caller::of_certificate(b"not a certificate").is_err());
    }

    #[test]
    fn urls_follow_the_mode() {
        let insecure = Transport::Insecure;
        assert!(insecure.endpoint("http://127.0.0.1:1").is_ok());
        assert!(insecure.endpoint("127.0.0.1:1").is_ok());
        let e = insecure.endpoint("https://127.0.0.1:1").unwrap_err();
        assert!(e.to_string().contains("--tls-ca"), "{e}");
        assert!(insecure.endpoint("ftp://x:1").is_err());
    }

    #[test]
    fn flags_need_all_files_or_insecure() {
        let e = Transport::from_flags("t", None, None, None, false).unwrap_err();
        assert!(e.contains("--insecure"), "{e}");
        let e = Transport::from_flags("t", Some("a".into()), None, None, false).unwrap_err();
        assert!(e.contains("--tls-key"), "{e}");
        let e = Transport::from_flags("t", Some("a".into()), None, None, true).unwrap_err();
        assert!(e.contains("exclude"), "{e}");
        assert!(matches!(
            Transport::from_flags("t", None, None, None, true),
            Ok(Transport::Insecure)
        ));
        let e = Transport::from_flags(
            "t",
            Some("/nonexistent/ca.pem".into()),
            Some("/nonexistent/c.pem".into()),
            Some("/nonexistent/k.pem".into()),
            false,
        )
        .unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
