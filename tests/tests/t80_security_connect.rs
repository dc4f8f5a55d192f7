//! t80: with mutual TLS on every gRPC hop, nobody without a certificate from the cluster
//! CA gets a gRPC answer from mdserver or an agent, and an agent answers its agent
//! service only to mdserver.
//!
//! A one-node cluster runs with the rig's TLS mode (real etcd, mdserver, mdagent, mdctl
//! with the admin certificate). Then, against mdserver and against the agent:
//! - a plain-text client (no TLS) gets no answer;
//! - a TLS client without a certificate is refused in the handshake (`openssl s_client`
//!   sees the server's "certificate required" alert);
//! - a TLS client whose certificate comes from another CA is refused;
//! - mdctl with such a certificate fails to reach mdserver (exit 11);
//! - a valid admin certificate reaches the agent's health service but its agent service
//!   answers PERMISSION_DENIED (only mdserver may call it), while mdctl through mdserver
//!   works.

use std::process::Command;
use std::time::Duration;

use mdcluster_proto::tls::{Tls, TlsFiles, Transport};
use mdcluster_proto::v1::agent_service_client::AgentServiceClient;
use mdcluster_proto::v1::MdstatRequest;
use mdcluster_tests::cluster::ClusterBuilder;
use mdcluster_tests::pki::{ClusterPki, Ident};
use mdcluster_tests::tools::run_timeout;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn transport(who: &Ident) -> Transport {
    Transport::Tls(
        Tls::load(TlsFiles {
            ca: who.ca.clone(),
            cert: who.cert.clone(),
            key: who.key.clone(),
        })
        .expect("load the test certificates"),
    )
}

/// A health check of `addr` (`HOST:PORT`) over `t`, checking the server's certificate
/// against `name`; Err(the failure) unless it answered.
async fn health(t: &Transport, addr: &str, name: Option<&str>) -> Result<(), String> {
    let ep = t
        .endpoint(addr)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3));
    let ch = tokio::time::timeout(Duration::from_secs(10), t.connect(&ep, name))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e:?}"))?;
    tokio::time::timeout(
        Duration::from_secs(10),
        HealthClient::new(ch).check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .map_err(|_| "health check timed out".to_string())?
    .map(|_| ())
    .map_err(|s| format!("health: {s:?}"))
}

/// `openssl s_client` to `addr` trusting `ca`, presenting no certificate; its output.
fn s_client_without_certificate(addr: &str, ca: &std::path::Path) -> String {
    let out = run_timeout(
        Command::new("sh").arg("-c").arg(format!(
            "sleep 1 | openssl s_client -connect {addr} -CAfile {} -alpn h2 2>&1",
            ca.display()
        )),
        Duration::from_secs(30),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn no_certificate_or_a_foreign_one_reaches_no_grpc_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ClusterPki::generate(dir.path(), 1).unwrap();
    let c = ClusterBuilder::new(1).tls(&pki).start().unwrap();
    let server_addr = c.url().trim_start_matches("https://").to_owned();
    let agent_addr = c.agents[0].addr.clone();
    assert!(c.url().starts_with("https://"), "{}", c.url());

    eprintln!("--- positive control: the admin through mdserver");
    let out = c.mdctl_ok(&["nodes"]);
    assert!(out.contains("node1"), "{out}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let admin = transport(&pki.admin);
        let foreign = transport(&pki.foreign_admin);
        assert_eq!(health(&admin, &server_addr, None).await, Ok(()));
        assert_eq!(health(&admin, &agent_addr, Some("node1")).await, Ok(()));

        for (what, addr, name) in [
            ("mdserver", server_addr.as_str(), None),
            ("the agent", agent_addr.as_str(), Some("node1")),
        ] {
            eprintln!("--- {what}: plain text");
            let e = health(&Transport::Insecure, addr, None).await.unwrap_err();
            eprintln!("{e}");
            eprintln!("--- {what}: a certificate from another CA");
            let e = health(&foreign, addr, name).await.unwrap_err();
            eprintln!("{e}");
        }

        eprintln!("--- the agent service answers only mdserver's certificate");
        let ep = admin
            .endpoint(&agent_addr)
            .unwrap()
            .connect_timeout(Duration::from_secs(3));
        let ch = admin.connect(&ep, Some("node1")).await.unwrap();
        let st = AgentServiceClient::new(ch)
            .mdstat(MdstatRequest {})
            .await
            .unwrap_err();
        eprintln!("{st:?}");
        assert_eq!(st.code(), tonic::Code::PermissionDenied);
        assert!(st.message().contains("admin alice"), "{}", st.message());
        assert!(
            st.message().contains("only mdserver's certificate"),
            "{}",
            st.message()
        );
    });

    for (what, addr) in [("mdserver", &server_addr), ("the agent", &agent_addr)] {
        eprintln!("--- {what}: TLS without a client certificate");
        let out = s_client_without_certificate(addr, &pki.ca);
        eprintln!("{out}");
        assert!(
            out.contains("certificate required") || out.contains("alert number 116"),
            "{what} must refuse a client without a certificate:\n{out}"
        );
    }

    eprintln!("--- mdctl with a certificate from another CA");
    let o = c.mdctl_as(&pki.foreign_admin, &["mdstat"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    eprintln!("{stderr}");
    assert_eq!(o.status.code(), Some(11), "{stderr}");
    eprintln!("--- mdctl without TLS against the TLS port");
    let o = run_timeout(
        Command::new(mdcluster_tests::tools::bin("mdctl"))
            .args(["--insecure", "--server"])
            .arg(format!("http://{server_addr}"))
            .arg("mdstat"),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    eprintln!("{stderr}");
    // No gRPC answer: unreachable (11) or a broken HTTP/2 exchange (6), nothing printed.
    assert!(
        matches!(o.status.code(), Some(6 | 11)) && o.stdout.is_empty(),
        "{stderr}"
    );

    eprintln!("--- the cluster still works for the admin");
    let out = c.mdctl_ok(&["--node", "node1", "mdstat"]);
    assert!(out.contains("Personalities"), "{out}");
}
