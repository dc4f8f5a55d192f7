//! A throwaway PKI for TLS tests, made with the `openssl` command-line tool: a CA, a
//! server certificate for 127.0.0.1 and localhost, a client certificate, and a second,
//! unrelated CA (for "wrong CA" cases). Every key is ECDSA P-256, valid for two days.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::tools::run_timeout;

/// The PEM files of a test PKI; they live in the directory given to [`Pki::generate`].
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate.
    pub ca: PathBuf,
    /// Server certificate (subjectAltName IP:127.0.0.1, DNS:localhost), signed by `ca`.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// Client certificate (CN = the name given), signed by `ca`.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// A CA that signed nothing here.
    pub other_ca: PathBuf,
}

/// Runs `openssl ARGS` in `dir`; fails with its stderr.
fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = run_timeout(
        Command::new("openssl").current_dir(dir).args(args),
        Duration::from_secs(60),
    );
    if !out.status.success() {
        bail!(
            "openssl {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A new ECDSA P-256 key and self-signed certificate (a CA) named `name`.
fn ca(dir: &Path, name: &str) -> anyhow::Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    )
}

/// A new key and a certificate `name` with subject `subj` (`/O=.../CN=...`) signed by
/// `ca` with the extensions `ext`.
fn leaf(dir: &Path, ca: &str, name: &str, subj: &str, ext: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join(format!("{name}.ext")), ext).context("write extensions")?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            subj,
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-days",
            "2",
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
    )
}

impl Pki {
    /// Makes the PKI in `dir`; the client certificate's CN is `client_cn`.
    pub fn generate(dir: &Path, client_cn: &str) -> anyhow::Result<Pki> {
        ca(dir, "ca")?;
        ca(dir, "other-ca")?;
        leaf(
            dir,
            "ca",
            "server",
            "/CN=etcd",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )?;
        leaf(
            dir,
            "ca",
            "client",
            &format!("/CN={client_cn}"),
            "extendedKeyUsage=clientAuth\n",
        )?;
        Ok(Pki {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other-ca.crt"),
        })
    }
}

/// The three PEM files of one identity of the cluster PKI.
#[derive(Debug, Clone)]
pub struct Ident {
    /// The CA the holder trusts.
    pub ca: PathBuf,
    /// Its certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl Ident {
    /// `--tls-ca CA --tls-cert CERT --tls-key KEY`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--tls-ca".into(),
            self.ca.display().to_string(),
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

/// A cluster PKI for mutual TLS on the gRPC hops (openssl CLI, ECDSA P-256, two days):
/// one cluster CA; mdserver (`O=mdcluster:server`, SAN 127.0.0.1/localhost); one
/// certificate per node (`O=mdcluster:nodes`, CN and SAN DNS = the node); an admin and
/// a viewer; and an admin certificate from an unrelated CA.
#[derive(Debug, Clone)]
pub struct ClusterPki {
    dir: PathBuf,
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// mdserver.
    pub server: Ident,
    /// node1, node2, ... in order.
    pub nodes: Vec<Ident>,
    /// An operator with O=mdcluster:admin.
    pub admin: Ident,
    /// An operator with O=mdcluster:viewer.
    pub viewer: Ident,
    /// An admin certificate signed by another CA (which it also trusts).
    pub foreign_admin: Ident,
}

impl ClusterPki {
    /// Makes the PKI in `dir` for `nodes` nodes (node1..nodeN).
    pub fn generate(dir: &Path, nodes: usize) -> anyhow::Result<ClusterPki> {
        ca(dir, "ca")?;
        ca(dir, "other-ca")?;
        let mut p = ClusterPki {
            dir: dir.to_owned(),
            ca: dir.join("ca.crt"),
            server: Ident {
                ca: dir.join("ca.crt"),
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            nodes: Vec::new(),
            admin: Ident {
                ca: dir.join("ca.crt"),
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            viewer: Ident {
                ca: dir.join("ca.crt"),
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            foreign_admin: Ident {
                ca: dir.join("other-ca.crt"),
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
        };
        p.server = p.issue(
            "ca",
            "mdserver",
            "/O=mdcluster:server/CN=mdserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:mdserver\n\
             extendedKeyUsage=serverAuth,clientAuth\n",
        )?;
        for i in 1..=nodes {
            let n = format!("node{i}");
            let id = p.node_cert(&n, &n)?;
            p.nodes.push(id);
        }
        p.admin = p.issue(
            "ca",
            "admin",
            "/O=mdcluster:admin/CN=alice",
            "extendedKeyUsage=clientAuth\n",
        )?;
        p.viewer = p.issue(
            "ca",
            "viewer",
            "/O=mdcluster:viewer/CN=victor",
            "extendedKeyUsage=clientAuth\n",
        )?;
        p.foreign_admin = p.issue(
            "other-ca",
            "foreign-admin",
            "/O=mdcluster:admin/CN=mallory",
            "extendedKeyUsage=clientAuth\n",
        )?;
        Ok(p)
    }

    /// A (new) node certificate for `node` in files named `file.crt`/`file.key`.
    pub fn node_cert(&self, file: &str, node: &str) -> anyhow::Result<Ident> {
        self.issue(
            "ca",
            file,
            &format!("/O=mdcluster:nodes/CN={node}"),
            &format!("subjectAltName=DNS:{node}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        )
    }

    /// Issues a certificate with subject `subj` and extensions `ext`, signed by `ca`
    /// (`ca` or `other-ca`), in `name.crt`/`name.key`.
    pub fn issue(&self, ca: &str, name: &str, subj: &str, ext: &str) -> anyhow::Result<Ident> {
        let dir = &self.dir;
        leaf(dir, ca, name, subj, ext)?;
        Ok(Ident {
            ca: dir.join(format!("{ca}.crt")),
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        })
    }
}
