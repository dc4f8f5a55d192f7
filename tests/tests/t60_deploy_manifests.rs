//! t60: the deployment files against the real binaries.
//!
//! - The Kubernetes manifests validate offline, strictly, against the Kubernetes schemas
//!   (`deploy/kubernetes/validate.sh`, PyPI `kubernetes-validate`), and the pods'
//!   `checksum/config` matches the ConfigMap.
//! - The mdserver Deployment and the mdagent DaemonSet, run as processes with exactly
//!   their container's command, args and environment (downward API: node name and pod IP
//!   substituted; only listen addresses, mdserver's and etcd's URLs, the run directory and
//!   the device allow-list changed, each explicitly) form a cluster: two nodes register,
//!   a clustered mirror is created on one and assembled on the other, and SIGTERM (the
//!   kubelet's) stops every process with status 0 within the pod's grace period.
//! - The probes are real: every `grpc:` probe of the Deployment and the DaemonSet, made
//!   as the kubelet makes it, passes on the running processes; the agent's readiness
//!   follows its lock-service session (NOT_SERVING once mdserver is gone long enough for
//!   the session to be lost, SERVING again once a new one is open) while its liveness
//!   stays SERVING; mdserver's readiness (the lock service) turns NOT_SERVING when etcd is
//!   gone, its liveness does not.
//! - The etcd TLS and authentication settings that `configmap.yaml` documents (commented
//!   out), set as its comment says, with the Secrets' files where the Deployment mounts
//!   them, bring mdserver up against a real etcd that requires TLS, a client certificate
//!   and a password.
//! - The systemd units pass `systemd-analyze verify`, restart on failure (the agent's
//!   self-fencing exit 75 included), and every variable of their environment files,
//!   like every key of the ConfigMap, is one the binaries read.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mdcluster_tests::deploy::{
    deploy_dir, grpc_probe, ContainerSpec, GrpcProbe, Manifests, Proc, ServingStatus,
};
use mdcluster_tests::etcd::{free_port, Etcd};
use mdcluster_tests::pki::{ClusterPki, Pki};
use mdcluster_tests::tools::{bin, run_ok, run_timeout};
use serde::Deserialize;
use serde_json::Value;

fn help(binary: &str) -> String {
    // clap wraps lines, also inside "[env: NAME=]": join the words again.
    run_ok(Command::new(bin(binary)).arg("--help"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn manifests_validate_offline_against_the_kubernetes_schemas() {
    let script = deploy_dir().join("kubernetes/validate.sh");
    let out = run_timeout(&mut Command::new(&script), Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "validate.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("validate: OK"), "{stdout}");
    for kind in [
        "statefulset/etcd",
        "deployment/mdserver",
        "daemonset/mdagent",
    ] {
        assert!(
            stdout.contains(&format!("passed for resource {kind}")),
            "{kind} not validated:\n{stdout}\n{stderr}"
        );
    }
}

#[test]
fn config_keys_and_unit_env_files_are_real_flags() {
    let server_help = help("mdserver");
    let agent_help = help("mdagent");
    let known = |k: &str| {
        k == "RUST_LOG"
            || server_help.contains(&format!("[env: {k}="))
            || agent_help.contains(&format!("[env: {k}="))
    };
    let m = Manifests::load().unwrap();
    for k in m.config_map("mdcluster-config").unwrap().keys() {
        assert!(known(k), "ConfigMap key {k} is read by no binary");
    }
    for (k, _) in documented_etcd_settings() {
        assert!(known(&k), "configmap.yaml documents {k}, read by no binary");
    }
    // Every variable the containers set (POD_IP only feeds $(POD_IP)).
    for (kind, name) in [("Deployment", "mdserver"), ("DaemonSet", "mdagent")] {
        let obj = m.get(kind, name).unwrap();
        for c in obj["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap()
        {
            for e in c["env"].as_sequence().into_iter().flatten() {
                let k = e["name"].as_str().unwrap();
                assert!(
                    k == "POD_IP" || known(k),
                    "{kind} {name}: {k} is read by no binary"
                );
            }
        }
    }
    for f in ["mdserver.env", "mdagent.env"] {
        let text = std::fs::read_to_string(deploy_dir().join("systemd").join(f)).unwrap();
        let keys: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
            .map(|l| l.split('=').next().unwrap().trim())
            .collect();
        assert!(keys.len() >= 3, "{f}: {keys:?}");
        for k in keys {
            assert!(known(k), "{f}: {k} is read by no binary");
        }
    }
}

#[test]
fn systemd_units_verify_and_restart_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let bindir = bin("mdagent").parent().unwrap().to_path_buf();
    for unit in ["mdserver.service", "mdagent.service"] {
        let text = std::fs::read_to_string(deploy_dir().join("systemd").join(unit)).unwrap();
        let has = |line: &str| text.lines().any(|l| l.trim() == line);
        assert!(has("Restart=on-failure"), "{unit}");
        assert!(
            text.lines().any(|l| l.starts_with("EnvironmentFile=")),
            "{unit}"
        );
        assert!(has("KillSignal=SIGTERM"), "{unit}");
        // Restart=on-failure restarts on any non-zero status; make sure 75 is not
        // excluded from it.
        assert!(!text.contains("RestartPreventExitStatus"), "{unit}");
        assert!(!text.contains("SuccessExitStatus"), "{unit}");
        // The units point at /usr/local/bin; verify them against the built binaries.
        let local = text.replace("/usr/local/bin", bindir.to_str().unwrap());
        std::fs::write(dir.path().join(unit), local).unwrap();
    }
    let agent = std::fs::read_to_string(deploy_dir().join("systemd/mdagent.service")).unwrap();
    assert!(
        agent.contains("DeviceAllow=block-* rw"),
        "agent must reach block devices"
    );
    assert!(!agent.contains("PrivateDevices=yes"), "agent must see /dev");
    let out = run_timeout(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg("--man=no")
            .arg(dir.path().join("mdserver.service"))
            .arg(dir.path().join("mdagent.service")),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("deploy"),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    assert!(
        !stderr.contains("Unknown key") && !stderr.contains("Unknown section"),
        "{stderr}"
    );
}

/// The cluster PKI of these tests (mdserver, node1, node2, an admin), made once per run
/// under the build directory.
fn pki() -> &'static ClusterPki {
    static PKI: std::sync::OnceLock<ClusterPki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let dir = mdcluster_tests::tools::target_dir().join("tmp/t60-pki");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ClusterPki::generate(&dir, 2).unwrap()
    })
}

/// Test-only change to mdserver's container: the Secret `mdserver-tls` as the kubelet
/// mounts it (a directory of the test instead of the mount path, holding the test
/// PKI's mdserver certificate under the Secret's keys), and a free loopback port for the
/// plain-text health listener. Returns that port; the probes must use the manifest's.
fn server_tls(srv: &mut ContainerSpec, dir: &Path) -> u16 {
    let mount = srv
        .secret_mounts
        .iter()
        .find(|m| m.secret == "mdserver-tls")
        .unwrap_or_else(|| panic!("the Deployment does not mount Secret mdserver-tls"))
        .clone();
    assert!(
        !mount.optional,
        "mdserver must not start without its certificate"
    );
    let local = dir.join("mdserver-tls");
    std::fs::create_dir_all(&local).unwrap();
    let p = pki();
    for (key, from) in [
        ("ca.crt", &p.ca),
        ("tls.crt", &p.server.cert),
        ("tls.key", &p.server.key),
    ] {
        std::fs::copy(from, local.join(key)).unwrap();
    }
    for k in ["MDSERVER_TLS_CA", "MDSERVER_TLS_CERT", "MDSERVER_TLS_KEY"] {
        let v = srv.env(k).unwrap_or_else(|| panic!("no {k}")).to_owned();
        let rest = v
            .strip_prefix(&format!("{}/", mount.path))
            .unwrap_or_else(|| panic!("{k}={v} is not in the mounted Secret"));
        assert!(
            local.join(rest).exists(),
            "{k}={v}: no such key in the Secret"
        );
        srv.override_env(k, local.join(rest).to_str().unwrap())
            .unwrap();
    }
    let hport = free_port().unwrap();
    srv.override_env("MDSERVER_HEALTH_LISTEN", &format!("127.0.0.1:{hport}"))
        .unwrap();
    // The metrics port too: several servers and agents share this host.
    let mport = free_port().unwrap();
    srv.override_env("MDSERVER_METRICS_LISTEN", &format!("127.0.0.1:{mport}"))
        .unwrap();
    hport
}

/// Test-only change to node`i`'s agent container: the host's /etc/mdcluster/tls
/// replaced by the test PKI's files of that node, and a free port on the pod IP for the
/// plain-text health listener. Returns that port.
fn agent_tls(a: &mut ContainerSpec, i: usize) -> u16 {
    let n = &pki().nodes[i - 1];
    for (k, v) in [
        ("MDAGENT_TLS_CA", &n.ca),
        ("MDAGENT_TLS_CERT", &n.cert),
        ("MDAGENT_TLS_KEY", &n.key),
    ] {
        assert!(
            a.env(k)
                .is_some_and(|p| p.starts_with("/etc/mdcluster/tls/")),
            "{k}: {:?}",
            a.env(k)
        );
        a.override_env(k, v.to_str().unwrap()).unwrap();
    }
    let hport = free_port().unwrap();
    a.override_env("MDAGENT_HEALTH_LISTEN", &format!("$(POD_IP):{hport}"))
        .unwrap();
    let mport = free_port().unwrap();
    a.override_env("MDAGENT_METRICS_LISTEN", &format!("$(POD_IP):{mport}"))
        .unwrap();
    hport
}

/// The `containerPort` of the port named `name` of the first container of the
/// workload in `deploy/kubernetes/<file>`.
fn named_port(file: &str, name: &str) -> Option<u16> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes")
        .join(file);
    let docs = std::fs::read_to_string(&path).unwrap();
    let port = serde_yaml::Deserializer::from_str(&docs).find_map(|d| {
        let v = serde_yaml::Value::deserialize(d).ok()?;
        v["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_sequence()?
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .map(|p| p as u16)
    });
    port
}

/// GET /metrics on `addr` until it answers 200 (the endpoint starts beside the gRPC
/// port), within 10 s: the body.
fn scrape(addr: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(b) = scrape_once(addr) {
            return Some(b);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scrape_once(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let (head, body) = r.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

fn mdctl(url: &str, args: &[&str]) -> std::process::Output {
    run_timeout(
        Command::new(bin("mdctl"))
            .env_remove("MDCTL_INSECURE")
            .arg("--server")
            .arg(url)
            .args(pki().admin.args())
            .args(args),
        Duration::from_secs(120),
    )
}

fn mdctl_ok(url: &str, args: &[&str]) -> String {
    let o = mdctl(url, args);
    assert!(
        o.status.success(),
        "mdctl {args:?}: {}\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn wait_nodes(url: &str, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = mdctl(url, &["--json", "nodes"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if v.as_array().is_some_and(|a| a.len() == n) {
            return v;
        }
        assert!(Instant::now() < deadline, "{n} nodes not live: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The container's probe of `kind`; panics if it has none or it is not `grpc:`.
fn probe(c: &ContainerSpec, kind: &str) -> GrpcProbe {
    c.grpc_probes
        .iter()
        .find(|p| p.kind == kind)
        .unwrap_or_else(|| panic!("no grpc {kind}: {:?}", c.grpc_probes))
        .clone()
}

/// The port of a listen address as the manifest writes it (`0.0.0.0:7481`).
fn port_of(listen: &str) -> u16 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

/// Makes `probe` against `addr` until it answers `want`, within `within`; returns the
/// time it took.
fn probe_until(addr: &str, probe: &GrpcProbe, want: ServingStatus, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let got = grpc_probe(addr, probe);
        if got == Ok(want) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "{} ({:?}) on {addr}: {got:?} after {within:?}, want {want:?}",
            probe.kind,
            probe.service
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn deployment_and_daemonset_as_written_form_a_cluster() {
    let dir = tempfile::Builder::new()
        .prefix("mdcluster-t60")
        .tempdir()
        .unwrap();
    let etcd = Etcd::start_with(true).unwrap();
    let m = Manifests::load().unwrap();

    eprintln!("--- mdserver from the Deployment");
    let mut srv = m
        .container("Deployment", "mdserver", "mdserver", &[])
        .unwrap();
    assert_eq!(srv.command, ["mdserver"]);
    assert_eq!(srv.env("MDSERVER_LISTEN"), Some("0.0.0.0:7480"));
    assert!(srv
        .env("MDSERVER_ETCD")
        .unwrap()
        .contains("etcd-0.etcd:2379"));
    // Test-only changes: a free loopback port instead of the pod's 7480, the test etcd
    // instead of the StatefulSet's members.
    let sport = free_port().unwrap();
    let srv_port = port_of(srv.env("MDSERVER_LISTEN").unwrap());
    srv.override_env("MDSERVER_LISTEN", &format!("127.0.0.1:{sport}"))
        .unwrap();
    srv.override_env("MDSERVER_ETCD", &etcd.url()).unwrap();
    let health_port = port_of(srv.env("MDSERVER_HEALTH_LISTEN").unwrap());
    // Metrics on, on the port the container names "metrics" (for a PodMonitor).
    assert_eq!(
        srv.env("MDSERVER_METRICS_LISTEN").map(port_of),
        named_port("mdserver.yaml", "metrics")
    );
    let hport = server_tls(&mut srv, dir.path());
    let mut server: Proc = srv
        .spawn(
            &dir.path().join("mdserver.log"),
            &[],
            "mdserver listening on",
        )
        .unwrap();
    let url = format!("https://127.0.0.1:{sport}");
    let scraped = scrape(srv.env("MDSERVER_METRICS_LISTEN").unwrap())
        .expect("mdserver serves /metrics as configured");
    assert!(scraped.contains("mdcluster_server_sessions"), "{scraped}");
    assert_ne!(
        health_port, srv_port,
        "the probes need a port without mutual TLS"
    );
    // The Deployment's probes, as the kubelet makes them (their port mapped to the test's).
    assert_eq!(srv.grpc_probes.len(), 3, "{:?}", srv.grpc_probes);
    assert_eq!(
        probe(&srv, "readinessProbe").service,
        "mdcluster.v1.LockService"
    );
    assert_eq!(probe(&srv, "livenessProbe").service, "");
    for p in &srv.grpc_probes {
        assert_eq!(p.port, health_port, "{p:?}");
        probe_until(
            &format!("127.0.0.1:{hport}"),
            p,
            ServingStatus::Serving,
            Duration::from_secs(10),
        );
    }

    eprintln!("--- two mdagents from the DaemonSet (downward API: node name, pod IP)");
    let mut agents: Vec<Proc> = Vec::new();
    let mut grace = Duration::ZERO;
    let mut advertised = Vec::new();
    for i in 1..=2 {
        let node = format!("node{i}");
        let ip = format!("127.0.0.{i}");
        let mut a = m
            .container(
                "DaemonSet",
                "mdagent",
                "mdagent",
                &[("spec.nodeName", &node), ("status.podIP", &ip)],
            )
            .unwrap();
        assert_eq!(a.command, ["mdagent"]);
        assert_eq!(a.env("MDAGENT_NODE"), Some(node.as_str()));
        assert_eq!(a.env("MDAGENT_ADVERTISE"), Some(&*format!("{ip}:7481")));
        assert_eq!(a.env("MDAGENT_SERVER"), Some("https://mdserver:7480"));
        let health_port = port_of(a.env("MDAGENT_HEALTH_LISTEN").unwrap());
        assert_eq!(
            a.env("MDAGENT_METRICS_LISTEN").map(port_of),
            named_port("mdagent.yaml", "metrics")
        );
        // Test-only changes: two agents share this host, so each listens on its own
        // loopback address and a free port (still advertised through $(POD_IP)); the
        // Service URL is the test mdserver; the run dir and the member glob are in the
        // test directory instead of the host's /run/mdcluster and /dev.
        let port = free_port().unwrap();
        a.override_env("MDAGENT_LISTEN", &format!("$(POD_IP):{port}"))
            .unwrap();
        a.override_env("MDAGENT_ADVERTISE", &format!("$(POD_IP):{port}"))
            .unwrap();
        a.override_env("MDAGENT_SERVER", &url).unwrap();
        let run = dir.path().join(format!("run-{node}"));
        a.override_env("MDAGENT_RUN_DIR", run.to_str().unwrap())
            .unwrap();
        let allow = format!("{}/disk*", dir.path().display());
        a.override_env("MDAGENT_DEVICE_ALLOW", &allow).unwrap();
        let hport = agent_tls(&mut a, i);
        grace = a.termination_grace;
        advertised.push(format!("{ip}:{port}"));
        agents.push(
            a.spawn(
                &dir.path().join(format!("{node}.log")),
                &[],
                "mdagent ready",
            )
            .unwrap(),
        );
        // The DaemonSet's probes, as the kubelet makes them on the pod IP: startup,
        // readiness (the agent service: a session is held) and liveness all pass.
        let ready = probe(&a, "readinessProbe");
        assert_eq!(ready.service, "mdcluster.v1.AgentService");
        assert_eq!(probe(&a, "livenessProbe").service, "");
        let maddr = a
            .env("MDAGENT_METRICS_LISTEN")
            .unwrap()
            .replace("$(POD_IP)", &ip);
        let scraped = scrape(&maddr).expect("the agent serves /metrics as configured");
        assert!(scraped.contains("mdcluster_session_state"), "{scraped}");
        for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let p = probe(&a, kind);
            assert_eq!(p.port, health_port, "{p:?}: the MDAGENT_HEALTH_LISTEN port");
            assert_eq!(
                grpc_probe(&format!("{ip}:{hport}"), &p),
                Ok(ServingStatus::Serving),
                "{node} {p:?}"
            );
        }
    }
    assert!(
        grace >= Duration::from_secs(35),
        "grace {grace:?} < drain timeout"
    );

    let nodes = wait_nodes(&url, 2);
    eprintln!("{nodes}");
    let text = nodes.to_string();
    for (i, addr) in advertised.iter().enumerate() {
        assert!(text.contains(&format!("node{}", i + 1)), "{text}");
        assert!(
            text.contains(addr.as_str()),
            "{addr} not registered: {text}"
        );
    }

    eprintln!("--- a clustered mirror created on node1, assembled on node2");
    let d0 = dir.path().join("disk0");
    let d1 = dir.path().join("disk1");
    for d in [&d0, &d1] {
        std::fs::File::create(d).unwrap().set_len(64 << 20).unwrap();
    }
    mdctl_ok(
        &url,
        &[
            "--node",
            "node1",
            "create",
            "md0",
            "--level",
            "1",
            "--raid-devices",
            "2",
            "--bitmap",
            "clustered",
            "--nodes",
            "4",
            "--assume-clean",
            d0.to_str().unwrap(),
            d1.to_str().unwrap(),
        ],
    );
    // Outside the allow-list from the ConfigMap-derived env: refused.
    let outside = tempfile::NamedTempFile::new().unwrap();
    outside.as_file().set_len(64 << 20).unwrap();
    let o = mdctl(
        &url,
        &[
            "--node",
            "node1",
            "create",
            "md1",
            "--level",
            "1",
            "--raid-devices",
            "2",
            "--bitmap",
            "internal",
            "--assume-clean",
            outside.path().to_str().unwrap(),
            d1.to_str().unwrap(),
        ],
    );
    eprintln!(
        "outside the allow-list: {}",
        String::from_utf8_lossy(&o.stderr).trim()
    );
    assert_eq!(
        o.status.code(),
        Some(9),
        "a member outside MDAGENT_DEVICE_ALLOW: EPERM expected"
    );
    mdctl_ok(&url, &["--node", "node2", "assemble", "md0"]);
    let d: Value = serde_json::from_str(&mdctl_ok(&url, &["--json", "detail", "md0"])).unwrap();
    let states: Vec<(String, String)> = d["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap_or_default().to_string(),
                n["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(states.len(), 2, "{d}");
    assert!(states.iter().all(|(_, s)| s == "active"), "{d}");
    let mdstat = mdctl_ok(&url, &["--node", "node2", "mdstat"]);
    assert!(mdstat.contains("md0 : active raid1"), "{mdstat}");
    assert!(
        Path::new(&dir.path().join("run-node2/md0.nbd")).exists(),
        "NBD socket in the DaemonSet's run dir"
    );

    eprintln!("--- SIGTERM as the kubelet sends it: clean exits within the grace period");
    for a in &mut agents {
        let t = Instant::now();
        let code = a.term(grace);
        assert_eq!(code, Some(0), "{} exit after SIGTERM", a.name);
        eprintln!("mdagent stopped in {:?}", t.elapsed());
    }
    // Stopped cleanly: the members' superblocks say clean.
    let ex = run_ok(Command::new(bin("mdctl")).arg("examine").arg(&d0));
    assert!(ex.contains("clean"), "{ex}");
    let srv_grace = m
        .container("Deployment", "mdserver", "mdserver", &[])
        .unwrap()
        .termination_grace;
    assert_eq!(
        server.term(srv_grace),
        Some(0),
        "mdserver exit after SIGTERM"
    );
    drop(etcd);
}

#[test]
fn agent_readiness_follows_its_session() {
    let dir = tempfile::Builder::new()
        .prefix("mdcluster-t60h")
        .tempdir()
        .unwrap();
    let etcd = Etcd::start_with(true).unwrap();
    let m = Manifests::load().unwrap();
    let sport = free_port().unwrap();
    // The health port stays the same across the restart below (as a pod's would).
    let shport = free_port().unwrap();
    let start_server = |log: &str| -> Proc {
        let mut srv = m
            .container("Deployment", "mdserver", "mdserver", &[])
            .unwrap();
        srv.override_env("MDSERVER_LISTEN", &format!("127.0.0.1:{sport}"))
            .unwrap();
        srv.override_env("MDSERVER_ETCD", &etcd.url()).unwrap();
        server_tls(&mut srv, dir.path());
        srv.override_env("MDSERVER_HEALTH_LISTEN", &format!("127.0.0.1:{shport}"))
            .unwrap();
        srv.spawn(&dir.path().join(log), &[], "mdserver listening on")
            .unwrap()
    };
    let mut server = start_server("mdserver.log");

    let mut a = m
        .container(
            "DaemonSet",
            "mdagent",
            "mdagent",
            &[("spec.nodeName", "node1"), ("status.podIP", "127.0.0.1")],
        )
        .unwrap();
    let port = free_port().unwrap();
    // Test-only changes as in the test above, and a 3 s session TTL instead of the
    // ConfigMap's 10 s so that the lost session shows sooner.
    a.override_env("MDAGENT_LISTEN", &format!("$(POD_IP):{port}"))
        .unwrap();
    a.override_env("MDAGENT_ADVERTISE", &format!("$(POD_IP):{port}"))
        .unwrap();
    a.override_env("MDAGENT_SERVER", &format!("https://127.0.0.1:{sport}"))
        .unwrap();
    let ahport = agent_tls(&mut a, 1);
    a.override_env("MDAGENT_RUN_DIR", dir.path().join("run").to_str().unwrap())
        .unwrap();
    a.override_env("MDAGENT_SESSION_TTL", "3s").unwrap();
    let mut agent = a
        .spawn(&dir.path().join("node1.log"), &[], "mdagent ready")
        .unwrap();
    let addr = format!("127.0.0.1:{ahport}");
    let agent_addr = format!("127.0.0.1:{port}");
    let ready = probe(&a, "readinessProbe");
    let live = probe(&a, "livenessProbe");
    assert_eq!(grpc_probe(&addr, &ready), Ok(ServingStatus::Serving));
    assert_eq!(grpc_probe(&addr, &live), Ok(ServingStatus::Serving));

    eprintln!("--- mdserver killed: the session is lost, the agent is not ready, still alive");
    server.kill9();
    let took = probe_until(
        &addr,
        &ready,
        ServingStatus::NotServing,
        Duration::from_secs(30),
    );
    eprintln!("readiness NOT_SERVING {took:?} after mdserver was killed");
    assert_eq!(grpc_probe(&addr, &live), Ok(ServingStatus::Serving));

    eprintln!("--- mdserver back: a new session, ready again");
    let mut server = start_server("mdserver2.log");
    let took = probe_until(
        &addr,
        &ready,
        ServingStatus::Serving,
        Duration::from_secs(60),
    );
    eprintln!("readiness SERVING {took:?} after mdserver restarted");
    assert_eq!(grpc_probe(&addr, &live), Ok(ServingStatus::Serving));
    let nodes = wait_nodes(&format!("https://127.0.0.1:{sport}"), 1);
    assert!(nodes.to_string().contains(&agent_addr), "{nodes}");

    assert_eq!(
        agent.term(a.termination_grace),
        Some(0),
        "mdagent after SIGTERM"
    );
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("health => NOT_SERVING"), "{log}");

    eprintln!("--- etcd killed: mdserver is not ready, still alive");
    let srv = m
        .container("Deployment", "mdserver", "mdserver", &[])
        .unwrap();
    let (ready, live) = (probe(&srv, "readinessProbe"), probe(&srv, "livenessProbe"));
    let saddr = format!("127.0.0.1:{shport}");
    assert_eq!(grpc_probe(&saddr, &ready), Ok(ServingStatus::Serving));
    let mut etcd = etcd;
    etcd.kill();
    let took = probe_until(
        &saddr,
        &ready,
        ServingStatus::NotServing,
        Duration::from_secs(30),
    );
    eprintln!("mdserver readiness NOT_SERVING {took:?} after etcd was killed");
    assert_eq!(grpc_probe(&saddr, &live), Ok(ServingStatus::Serving));
    assert_eq!(server.term(srv.termination_grace), Some(0));
}

/// The etcd settings that configmap.yaml documents as comments
/// (`  # MDSERVER_ETCD_CACERT: "/etc/..."`), in order.
fn documented_etcd_settings() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy_dir().join("kubernetes/configmap.yaml")).unwrap();
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("# MDSERVER_ETCD_"))
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| {
            (
                format!("MDSERVER_ETCD_{k}"),
                v.trim_matches('"').to_string(),
            )
        })
        .collect()
}

#[test]
fn deployment_reaches_a_tls_etcd_with_the_documented_settings() {
    let documented = documented_etcd_settings();
    let keys: Vec<&str> = documented.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "MDSERVER_ETCD_CACERT",
            "MDSERVER_ETCD_CERT",
            "MDSERVER_ETCD_KEY",
            "MDSERVER_ETCD_USER",
            "MDSERVER_ETCD_PASSWORD_FILE"
        ],
        "configmap.yaml's comment"
    );
    let dir = tempfile::Builder::new()
        .prefix("mdcluster-t60tls")
        .tempdir()
        .unwrap();
    std::fs::create_dir(dir.path().join("pki")).unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), "mdcluster-client").unwrap();
    let etcd = Etcd::start_tls(&pki).unwrap();
    let user = &documented[3].1;
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(etcd.enable_auth(&pki, user, "pw-from-secret", "/mdcluster/"))
        .unwrap();

    eprintln!(
        "--- the ConfigMap as deploy/README.md says: https endpoint, the settings uncommented"
    );
    let mut m = Manifests::load().unwrap();
    m.set_config("mdcluster-config", "MDSERVER_ETCD", &etcd.url())
        .unwrap();
    for (k, v) in &documented {
        m.set_config("mdcluster-config", k, v).unwrap();
    }
    let mut srv = m
        .container("Deployment", "mdserver", "mdserver", &[])
        .unwrap();
    // The Secrets, as the kubelet mounts them: one directory per Secret, a file per key.
    // Test-only change: each mount path is a directory of the test instead.
    let secrets = [
        (
            "mdserver-etcd-tls",
            vec![
                ("ca.crt", std::fs::read(&pki.ca).unwrap()),
                ("tls.crt", std::fs::read(&pki.client_cert).unwrap()),
                ("tls.key", std::fs::read(&pki.client_key).unwrap()),
            ],
        ),
        (
            "mdserver-etcd-auth",
            vec![("password", b"pw-from-secret\n".to_vec())],
        ),
    ];
    assert_eq!(srv.secret_mounts.len(), 3, "{:?}", srv.secret_mounts);
    let hport = server_tls(&mut srv, dir.path());
    let mut mounts = Vec::new();
    for (secret, files) in &secrets {
        let mount = srv
            .secret_mounts
            .iter()
            .find(|s| s.secret == *secret)
            .unwrap_or_else(|| panic!("the Deployment does not mount Secret {secret}"));
        assert!(mount.optional, "{mount:?}: the pod must start without it");
        let local = dir.path().join(secret);
        std::fs::create_dir(&local).unwrap();
        for (f, data) in files {
            std::fs::write(local.join(f), data).unwrap();
        }
        mounts.push((mount.path.clone(), local));
    }
    for (k, v) in &documented {
        assert_eq!(
            srv.env(k),
            Some(v.as_str()),
            "the Deployment does not pass {k}"
        );
        if k.as_str() == "MDSERVER_ETCD_USER" {
            continue;
        }
        let (mount, local) = mounts
            .iter()
            .find(|(mount, _)| v.starts_with(&format!("{mount}/")))
            .unwrap_or_else(|| panic!("{k}={v} is in no Secret the Deployment mounts"));
        let file = local.join(&v[mount.len() + 1..]);
        assert!(
            file.exists(),
            "{k}={v}: the Secret has no key {}",
            file.display()
        );
        srv.override_env(k, file.to_str().unwrap()).unwrap();
    }
    let sport = free_port().unwrap();
    srv.override_env("MDSERVER_LISTEN", &format!("127.0.0.1:{sport}"))
        .unwrap();
    let mut server = srv
        .spawn(
            &dir.path().join("mdserver.log"),
            &[],
            "mdserver listening on",
        )
        .unwrap();
    let url = format!("https://127.0.0.1:{sport}");
    let nodes = wait_nodes(&url, 0);
    eprintln!("mdctl nodes through the TLS etcd: {nodes}");
    probe_until(
        &format!("127.0.0.1:{hport}"),
        &probe(&srv, "readinessProbe"),
        ServingStatus::Serving,
        Duration::from_secs(10),
    );
    assert_eq!(server.term(srv.termination_grace), Some(0));
    drop(etcd);
}

#[test]
fn deploy_scripts_are_shellcheck_clean() {
    let d = deploy_dir();
    let scripts = [
        d.join("local/up.sh"),
        d.join("local/down.sh"),
        d.join("image/build.sh"),
        d.join("kubernetes/validate.sh"),
    ];
    for s in &scripts {
        let text = std::fs::read_to_string(s).unwrap();
        assert!(text.contains("set -euo pipefail"), "{}", s.display());
    }
    let out = run_timeout(
        Command::new("shellcheck").args(&scripts),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "shellcheck: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
