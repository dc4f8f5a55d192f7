//! t22: mdserver reaches etcd over TLS with a client certificate and a password.
//!
//! A real etcd serves clients over TLS only and requires client certificates signed by
//! the test CA (`--client-cert-auth`); authentication is enabled, and mdserver's user may
//! touch only `/mdcluster/`. The client certificate's CN names no etcd user, so only the
//! password can authenticate mdserver. Then:
//! - with the right CA, certificate, key, user and password file, mdserver serves: a
//!   session opens, a lock is taken and released, `mdctl nodes` lists the node;
//! - a wrong CA, no client certificate, a wrong password, an `http://` endpoint with TLS
//!   and an `https://` endpoint without it each stop mdserver with an error that names
//!   the etcd endpoint and says what to check.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mdcluster_proto::lock_client::{Mode, Wait};
use mdcluster_tests::etcd::{free_port, Etcd};
use mdcluster_tests::pki::Pki;
use mdcluster_tests::server::{session, MdServer, ServerOpts};
use mdcluster_tests::tools::{bin, run_timeout};

const USER: &str = "mdserver";
const PASSWORD: &str = "s3cret-pw";

/// Runs mdserver with `args` (after --listen and --etcd-connect-timeout 3s), expects it
/// to fail within 60 s, and returns its stderr.
fn mdserver_fails(etcd: &str, args: &[&str]) -> String {
    let t = Instant::now();
    let out = run_timeout(
        Command::new(bin("mdserver"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", free_port().unwrap()))
            .arg("--etcd")
            .arg(etcd)
            .arg("--etcd-connect-timeout")
            .arg("3s")
            .args(args)
            .env("RUST_LOG", "error")
            .env("RUST_BACKTRACE", "0"),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "mdserver {args:?} ({:?}, {}):\n{stderr}",
        t.elapsed(),
        out.status
    );
    assert!(!out.status.success(), "mdserver {args:?} must fail");
    stderr
}

#[test]
fn mdserver_reaches_etcd_over_tls_with_a_client_certificate_and_a_password() {
    let dir = tempfile::Builder::new()
        .prefix("mdcluster-t22")
        .tempdir()
        .unwrap();
    // The CN names no etcd user: with --client-cert-auth, etcd would take a CN that
    // names a user as that user, and the password would prove nothing.
    let pki = Pki::generate(dir.path(), "mdcluster-client").unwrap();
    let etcd = Etcd::start_tls(&pki).unwrap();
    let url = etcd.url();
    assert!(url.starts_with("https://"), "{url}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(etcd.enable_auth(&pki, USER, PASSWORD, "/mdcluster/"))
        .unwrap();
    let password_file = dir.path().join("etcd-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (ca, cert, key, other_ca, pw) = (
        s(&pki.ca),
        s(&pki.client_cert),
        s(&pki.client_key),
        s(&pki.other_ca),
        s(&password_file),
    );

    eprintln!("--- the right CA, certificate, key, user and password: mdserver serves");
    let server = MdServer::start(
        &url,
        ServerOpts {
            extra_args: [
                "--etcd-cacert",
                &ca,
                "--etcd-cert",
                &cert,
                "--etcd-key",
                &key,
                "--etcd-user",
                USER,
                "--etcd-password-file",
                &pw,
            ]
            .map(String::from)
            .to_vec(),
            ..ServerOpts::default()
        },
    )
    .expect("mdserver over TLS");
    let urls = vec![server.url()];
    rt.block_on(async {
        let (sess, _rx) = session(&urls, "node1", Duration::from_secs(3))
            .await
            .expect("a session through mdserver over TLS");
        let g = sess
            .acquire(
                "tls-lock",
                Mode::Exclusive,
                Wait::Queue(Duration::from_secs(10)),
            )
            .await
            .expect("acquire");
        assert!(g.token > 0, "{g:?}");
        sess.release("tls-lock", g.token).await.expect("release");
        let out = run_timeout(
            Command::new(bin("mdctl"))
                .arg("--server")
                .arg(server.url())
                .arg("--json")
                .arg("nodes"),
            Duration::from_secs(30),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "mdctl nodes: {stdout}");
        assert!(stdout.contains("\"node1\""), "{stdout}");
        sess.close().await.expect("close");
    });
    drop(server);

    eprintln!("--- a CA that did not sign etcd's certificate");
    let e = mdserver_fails(
        &url,
        &[
            "--etcd-cacert",
            &other_ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
            "--etcd-user",
            USER,
            "--etcd-password-file",
            &pw,
        ],
    );
    assert!(
        e.contains(&format!("failed to connect to etcd at {url}")),
        "{e}"
    );
    assert!(e.contains("UnknownIssuer"), "{e}");
    assert!(e.contains("--etcd-cacert is the CA that signed"), "{e}");

    eprintln!("--- no client certificate (etcd requires one)");
    let e = mdserver_fails(
        &url,
        &[
            "--etcd-cacert",
            &ca,
            "--etcd-user",
            USER,
            "--etcd-password-file",
            &pw,
        ],
    );
    assert!(
        e.contains(&format!("failed to connect to etcd at {url}")),
        "{e}"
    );
    assert!(e.contains("etcd accepts the client certificate"), "{e}");

    eprintln!("--- a wrong password");
    let bad = dir.path().join("bad-password");
    std::fs::write(&bad, "not-it\n").unwrap();
    let e = mdserver_fails(
        &url,
        &[
            "--etcd-cacert",
            &ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
            "--etcd-user",
            USER,
            "--etcd-password-file",
            bad.to_str().unwrap(),
        ],
    );
    assert!(
        e.contains(&format!("failed to connect to etcd at {url}")),
        "{e}"
    );
    assert!(e.contains("authentication failed"), "{e}");
    assert!(e.contains("the user and password (--etcd-user)"), "{e}");

    eprintln!("--- endpoint schemes that do not match the TLS settings: refused at once");
    let plain = url.replacen("https://", "http://", 1);
    let e = mdserver_fails(&plain, &["--etcd-cacert", &ca]);
    assert!(
        e.contains(&format!("endpoint {plain} is not https://")),
        "{e}"
    );
    let e = mdserver_fails(&url, &[]);
    assert!(
        e.contains(&format!("endpoint {url} is https:// but no CA is given")),
        "{e}"
    );
    assert!(e.contains("--etcd-cacert"), "{e}");
    eprintln!("--- a password over http:// is refused before anything is sent");
    let e = mdserver_fails(&plain, &["--etcd-user", USER, "--etcd-password-file", &pw]);
    assert!(
        e.contains("refusing to send the etcd password of user mdserver") && e.contains(&plain),
        "{e}"
    );
    let e = mdserver_fails(&url, &["--etcd-cacert", &pw]);
    assert!(e.contains("holds no PEM \"CERTIFICATE\" block"), "{e}");
    drop(etcd);
}
