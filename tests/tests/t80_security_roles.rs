//! t80: operators' roles come from their certificates. A `viewer` certificate
//! (O=mdcluster:viewer) runs the reads (`mdstat`, `nodes`, `detail`) but `stop` exits 9
//! (EPERM) with a sentence that says what was refused and why, and the array keeps
//! running; an `admin` certificate stops it, and the agent writes one audit line naming
//! mdserver's identity for that stop. No operator sees a session id.

use mdcluster_tests::cluster::ClusterBuilder;
use mdcluster_tests::pki::ClusterPki;
use mdcluster_tests::standalone::member_files;

#[test]
fn a_viewer_reads_but_cannot_stop() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ClusterPki::generate(dir.path(), 1).unwrap();
    let c = ClusterBuilder::new(1).tls(&pki).start().unwrap();
    let m = member_files(c.path(), "m", 2, 32 << 20);
    let ms: Vec<String> = m.iter().map(|p| p.display().to_string()).collect();
    c.mdctl_ok(&[
        "--node",
        "node1",
        "create",
        "md0",
        "--raid-devices",
        "2",
        "--bitmap",
        "internal",
        "--assume-clean",
        &ms[0],
        &ms[1],
    ]);

    let viewer = |args: &[&str]| {
        let o = c.mdctl_as(&pki.viewer, args);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    eprintln!("--- the viewer reads");
    let (code, out, err) = viewer(&["--node", "node1", "mdstat"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("md0 : active"), "{out}");
    let (code, out, err) = viewer(&["detail", "md0"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("node1"), "{out}");
    let (code, out, err) = viewer(&["--json", "nodes"]);
    assert_eq!(code, Some(0), "{err}");
    let nodes: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!("{nodes}");
    let list = nodes
        .as_array()
        .or(nodes["nodes"].as_array())
        .expect("a node list");
    assert!(!list.is_empty(), "{out}");
    for n in list {
        assert_eq!(
            n["session_id"], 0,
            "a session id shown to an operator: {out}"
        );
    }

    eprintln!("--- the viewer cannot stop");
    let (code, out, err) = viewer(&["--node", "node1", "stop", "md0"]);
    eprintln!("{err}");
    assert_eq!(code, Some(9), "stdout: {out}\nstderr: {err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains("viewer victor"), "{err}");
    assert!(err.contains("Stop needs an admin certificate"), "{err}");
    let out = c.mdctl_ok(&["--node", "node1", "mdstat"]);
    assert!(
        out.contains("md0 : active"),
        "the array must keep running: {out}"
    );

    eprintln!("--- the admin can, and the agent audits it");
    c.mdctl_ok(&["--node", "node1", "stop", "md0"]);
    let out = c.mdctl_ok(&["--node", "node1", "mdstat"]);
    assert!(!out.contains("md0 : active"), "{out}");
    let log = c.agents[0].log_text();
    let audits: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("audit: permitted") && l.contains("AgentService/Stop"))
        .collect();
    assert_eq!(audits.len(), 1, "one audit line for the stop:\n{log}");
    assert!(audits[0].contains("mdserver mdserver"), "{}", audits[0]);
}
