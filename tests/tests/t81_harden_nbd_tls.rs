//! t81: the NBD TCP export over TLS (`NBD_OPT_STARTTLS`, x509, client certificates
//! verified against a CA), with the real clients:
//! - `nbdinfo` (libnbd, `nbds://...?tls-certificates=DIR`) and `qemu-io`
//!   (`tls-creds-x509`) reach the export with a client certificate of the CA, and write
//!   and read back data;
//! - without TLS, or with a certificate of another CA, both are refused, and the
//!   export list is not shown before TLS;
//! - `--nbd-tcp` without TLS flags and without `--nbd-insecure` does not start.
//!
//! The certificates are made with the `openssl` CLI.

use std::path::Path;
use std::process::Command;

use mdcluster_tests::etcd::free_port;
use mdcluster_tests::standalone::{member_files, Agent};
use mdcluster_tests::tools::{bin, run_timeout, CMD_TIMEOUT};
use serde_json::json;

fn openssl(dir: &Path, args: &[&str]) {
    let o = run_timeout(
        Command::new("openssl").current_dir(dir).args(args),
        CMD_TIMEOUT,
    );
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A CA in `dir` (ca-cert.pem, ca-key.pem) and one certificate signed by it:
/// `<name>-cert.pem`, `<name>-key.pem`, with `ext` as its extensions.
fn ca(dir: &Path, cn: &str) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

fn leaf(dir: &Path, name: &str, cn: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &format!("{name}-cert.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

const SERVER_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n";
const CLIENT_EXT: &str =
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";

fn run(args: &[&str]) -> (bool, String) {
    let o = run_timeout(Command::new(args[0]).args(&args[1..]), CMD_TIMEOUT);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[test]
fn nbd_over_tcp_with_tls_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    eprintln!("--- certificates: a CA with a server and a client certificate, and a rogue CA");
    let pki = d.join("pki");
    ca(&pki, "mdcluster test CA");
    leaf(&pki, "server", "localhost", SERVER_EXT);
    leaf(&pki, "client", "client1", CLIENT_EXT);
    let rogue = d.join("rogue");
    ca(&rogue, "rogue CA");
    leaf(&rogue, "client", "intruder", CLIENT_EXT);
    // The client directories libnbd and qemu read: ca-cert.pem (to verify the server),
    // client-cert.pem, client-key.pem.
    let good = d.join("good");
    let bad = d.join("bad");
    for (dst, src) in [(&good, &pki), (&bad, &rogue)] {
        std::fs::create_dir_all(dst).unwrap();
        std::fs::copy(pki.join("ca-cert.pem"), dst.join("ca-cert.pem")).unwrap();
        for f in ["client-cert.pem", "client-key.pem"] {
            std::fs::copy(src.join(f), dst.join(f)).unwrap();
        }
    }

    eprintln!("--- --nbd-tcp without TLS and without --nbd-insecure does not start");
    let (ok, out) = run(&[
        bin("mdagent").to_str().unwrap(),
        "--run-dir",
        d.join("run0").to_str().unwrap(),
        "--nbd-tcp",
        "127.0.0.1:0",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("--nbd-insecure") && out.contains("--nbd-tls-ca"),
        "{out}"
    );

    let port = free_port().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let agent = Agent::start(
        &d.join("run"),
        &[
            "--nbd-tcp",
            &format!("127.0.0.1:{port}"),
            "--nbd-tls-ca",
            &s(&pki.join("ca-cert.pem")),
            "--nbd-tls-cert",
            &s(&pki.join("server-cert.pem")),
            "--nbd-tls-key",
            &s(&pki.join("server-key.pem")),
        ],
    );
    let members = member_files(d, "m", 2, 32 << 20);
    agent.ok(json!({
        "op": "create", "name": "md0", "members": members, "raid_devices": 2,
        "bitmap": "internal", "assume_clean": true,
    }));

    eprintln!("--- nbdinfo with a client certificate of the CA");
    let tls_uri = format!(
        "nbds://127.0.0.1:{port}/md0?tls-certificates={}",
        good.display()
    );
    let (ok, out) = run(&["nbdinfo", &tls_uri]);
    eprintln!("{out}");
    assert!(ok, "nbdinfo over TLS: {out}");
    assert!(out.contains("export-size"), "{out}");
    let list_uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        good.display()
    );
    let (ok, out) = run(&["nbdinfo", "--list", &list_uri]);
    assert!(ok && out.contains("md0"), "nbdinfo --list over TLS: {out}");

    eprintln!("--- qemu-io with tls-creds-x509 writes and reads back");
    let creds = |dir: &Path| {
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        )
    };
    let image = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=md0,tls-creds=tls0"
    );
    let (ok, out) = run(&[
        "qemu-io",
        "--object",
        &creds(&good),
        "--image-opts",
        &image,
        "-c",
        "write -P 0xa5 1M 256k",
        "-c",
        "read -P 0xa5 1M 256k",
    ]);
    eprintln!("{out}");
    assert!(
        ok && !out.contains("Pattern verification failed"),
        "qemu-io over TLS: {out}"
    );

    eprintln!("--- refused: no TLS, or a certificate of another CA");
    let plain = format!("nbd://127.0.0.1:{port}/md0");
    let (ok, out) = run(&["nbdinfo", &plain]);
    eprintln!("plain nbdinfo: {out}");
    assert!(!ok, "nbdinfo without TLS was served: {out}");
    let (ok, out) = run(&["nbdinfo", "--list", &format!("nbd://127.0.0.1:{port}/")]);
    eprintln!("plain nbdinfo --list: {out}");
    assert!(
        !ok || !out.contains("md0"),
        "the export list was shown without TLS: {out}"
    );
    assert!(!out.contains("export-size"), "{out}");
    let rogue_uri = format!(
        "nbds://127.0.0.1:{port}/md0?tls-certificates={}",
        bad.display()
    );
    let (ok, out) = run(&["nbdinfo", &rogue_uri]);
    eprintln!("rogue nbdinfo: {out}");
    assert!(!ok, "a certificate of another CA was accepted: {out}");
    let (ok, out) = run(&["qemu-io", "-f", "raw", &plain, "-c", "read 0 4k"]);
    eprintln!("plain qemu-io: {out}");
    assert!(
        !ok || out.contains("Could not open") || out.contains("TLS"),
        "{out}"
    );
    assert!(
        !out.contains("read 4096/4096"),
        "qemu-io without TLS read data: {out}"
    );
    // qemu checks its own certificate against its CA file first, so its directory
    // holds the rogue CA, and it skips verifying the server: the server must refuse.
    let bad_qemu = d.join("bad-qemu");
    std::fs::create_dir_all(&bad_qemu).unwrap();
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(rogue.join(f), bad_qemu.join(f)).unwrap();
    }
    let (ok, out) = run(&[
        "qemu-io",
        "--object",
        &format!("{},verify-peer=off", creds(&bad_qemu)),
        "--image-opts",
        &image,
        "-c",
        "read 0 4k",
    ]);
    eprintln!("rogue qemu-io: {out}");
    assert!(!ok, "qemu-io with a rogue certificate was served: {out}");
    assert!(!out.contains("read 4096/4096"), "{out}");

    // The agent stays up and still serves the TLS client.
    let (ok, out) = run(&["nbdinfo", &tls_uri]);
    assert!(ok, "{out}");
    let log = agent.log_text();
    assert!(log.contains("NBD client connected over TLS"), "{log}");
}
