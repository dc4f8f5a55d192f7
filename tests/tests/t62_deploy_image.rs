//! t62: the container image really builds, with no image registry: `deploy/image/build.sh`
//! makes a minimal Debian base (debootstrap + `podman import`), builds `deploy/Dockerfile`
//! (target `prebuilt`, the binaries of this build) with podman on vfs storage, and checks
//! the image: the three binaries run from it, its default user is not root, and mdserver
//! run from the image serves `mdctl nodes` against a real etcd and exits 0 on SIGTERM.

use std::process::Command;
use std::time::{Duration, Instant};

use mdcluster_tests::etcd::{free_port, Etcd};
use mdcluster_tests::tools::{run_timeout, target_dir};

#[test]
fn dockerfile_builds_on_a_local_base_and_the_image_serves() {
    let etcd = Etcd::start_with(true).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/image/build.sh");
    let t = Instant::now();
    let out = run_timeout(
        Command::new(&script)
            .env("BIN_DIR", target_dir())
            .env("IMAGE", "localhost/mdcluster:t62")
            .env("SMOKE_ETCD", etcd.url())
            .env("SMOKE_PORT", free_port().unwrap().to_string()),
        Duration::from_secs(900),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("build.sh took {:?}:\n{stdout}", t.elapsed());
    assert!(
        out.status.success(),
        "build.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for b in ["mdserver", "mdagent", "mdctl"] {
        assert!(
            stdout.contains(&format!("image: {b} in the image: {b} 0.")),
            "{b}:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("image: default user 65532:65532"),
        "{stdout}"
    );
    assert!(
        stdout.contains("image: mdctl nodes answered by mdserver in the image"),
        "{stdout}"
    );
    assert!(
        stdout.contains("image: mdserver exit status after SIGTERM: 0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("image: OK: localhost/mdcluster:t62"),
        "{stdout}"
    );
}
