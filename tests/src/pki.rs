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

/// A new key and a certificate `name` signed by `ca` with the extensions `ext`.
fn leaf(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) -> anyhow::Result<()> {
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
            &format!("/CN={cn}"),
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
            "etcd",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )?;
        leaf(
            dir,
            "ca",
            "client",
            client_cn,
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
