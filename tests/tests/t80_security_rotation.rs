//! t80: certificates rotate without a restart. node1's agent certificate and key are
//! replaced on disk (a new key, the same node, the same CA); the agent, still the same
//! process, serves the new certificate on its next handshake (`openssl s_client` sees
//! the new fingerprint), mdserver keeps reaching it, and after mdserver restarts the
//! agent's session resumes over a new connection. A rotation that writes a broken file
//! keeps the previous certificate in use.

use std::process::Command;
use std::time::Duration;

use mdcluster_tests::cluster::ClusterBuilder;
use mdcluster_tests::pki::{ClusterPki, Ident};
use mdcluster_tests::tools::run_timeout;

/// SHA-256 fingerprint of the certificate in `pem` (openssl's form).
fn fingerprint_of(pem: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.pem");
    std::fs::write(&f, pem).unwrap();
    let out = run_timeout(
        Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(&f),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The fingerprint of the certificate the server at `addr` presents to `who` (checked
/// against `name`).
fn served_fingerprint(addr: &str, who: &Ident, name: &str) -> String {
    let out = run_timeout(
        Command::new("sh").arg("-c").arg(format!(
            "openssl s_client -connect {addr} -servername {name} -verify_hostname {name} \
             -verify_return_error -CAfile {} -cert {} -key {} -alpn h2 </dev/null 2>&1",
            who.ca.display(),
            who.cert.display(),
            who.key.display()
        )),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .unwrap_or_else(|| panic!("no certificate served by {addr}:\n{text}"));
    let end = text[start..]
        .find("-----END CERTIFICATE-----")
        .map(|e| start + e + "-----END CERTIFICATE-----".len())
        .unwrap();
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    fingerprint_of(&text[start..end])
}

fn file_fingerprint(p: &std::path::Path) -> String {
    fingerprint_of(&std::fs::read_to_string(p).unwrap())
}

#[test]
fn an_agent_certificate_replaced_on_disk_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ClusterPki::generate(dir.path(), 1).unwrap();
    let mut c = ClusterBuilder::new(1).tls(&pki).start().unwrap();
    let agent = c.agents[0].addr.clone();
    let pid = c.agents[0].pid().expect("agent pid");
    let node1 = pki.nodes[0].clone();
    let old = file_fingerprint(&node1.cert);
    assert_eq!(served_fingerprint(&agent, &pki.admin, "node1"), old);

    eprintln!("--- a new key and certificate for node1, written over the old files");
    let fresh = pki.node_cert("node1-new", "node1").unwrap();
    let new = file_fingerprint(&fresh.cert);
    assert_ne!(new, old);
    std::fs::copy(&fresh.key, &node1.key).unwrap();
    std::fs::copy(&fresh.cert, &node1.cert).unwrap();
    assert_eq!(served_fingerprint(&agent, &pki.admin, "node1"), new);
    assert_eq!(c.agents[0].pid(), Some(pid), "the agent must not restart");
    let out = c.mdctl_ok(&["--node", "node1", "mdstat"]);
    assert!(out.contains("Personalities"), "{out}");

    eprintln!("--- a broken certificate file: the agent keeps the one it has");
    std::fs::write(&node1.cert, "not a certificate\n").unwrap();
    assert_eq!(served_fingerprint(&agent, &pki.admin, "node1"), new);
    let log = c.agents[0].log_text();
    assert!(
        log.contains("TLS files changed but cannot be loaded"),
        "the failed reload must be logged:\n{log}"
    );
    std::fs::copy(&fresh.cert, &node1.cert).unwrap();

    eprintln!("--- mdserver restarts: the agent's session resumes over a new connection");
    c.server.kill();
    c.server.restart().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let o = c.mdctl(&["--node", "node1", "mdstat"]);
        if o.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node1 did not come back after mdserver restarted: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(c.agents[0].pid(), Some(pid), "the agent must not restart");
}
