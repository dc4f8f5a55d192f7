//! t80: the standalone agent's control socket is owner-only from the start and checks
//! its peer. A real standalone `mdagent` (as root): the socket is 0600 and root's; a
//! process of another user (uid 65534, `setpriv`) cannot open it; and even with the
//! mode opened up to 0666 by mistake, that user's connection gets one EPERM answer naming
//! its uid and nothing else, while root is still served.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use mdcluster_tests::standalone::Agent;
use mdcluster_tests::tools::run_timeout;

/// `{"op":"list"}` on `sock` as uid/gid 65534; the process's stdout and stderr.
fn list_as_nobody(sock: &std::path::Path) -> (String, String) {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.settimeout(10)\n\
         s.connect({:?})\n\
         s.sendall(b'{{\"op\":\"list\"}}\\n')\n\
         print(s.makefile().readline().strip())\n",
        sock.display().to_string()
    );
    let out = run_timeout(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
            ])
            .arg(script),
        Duration::from_secs(30),
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn list_as_root(sock: &std::path::Path) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"{\"op\":\"list\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

#[test]
fn the_control_socket_serves_only_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    // The run dir is world-searchable, so only the socket's own mode keeps others out.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = dir.path().join("run");
    let agent = Agent::start(&run, &[]);
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = agent.control();
    let md = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        md.mode() & 0o777,
        0o600,
        "control socket mode {:o}",
        md.mode()
    );
    assert_eq!(md.uid(), 0);
    let leftovers: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".mdagent-ctl"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    eprintln!("--- another user cannot open it");
    let (out, err) = list_as_nobody(&sock);
    eprintln!("{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("PermissionError"), "{err}");

    eprintln!("--- opened up by mistake: the peer check still refuses");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (out, err) = list_as_nobody(&sock);
    eprintln!("{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
        panic!("no JSON answer ({e}): {out} {err}");
    });
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["errno"], "EPERM", "{v}");
    assert!(v["error"].as_str().unwrap().contains("uid 65534"), "{v}");
    assert!(
        agent
            .log_text()
            .contains("control socket: refused uid 65534"),
        "{}",
        agent.log_text()
    );

    eprintln!("--- root is served");
    let line = list_as_root(&sock);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}
