//! t62: the container image really builds, with no image registry and no network inside
//! the build: `deploy/image/build.sh` makes a minimal Debian base (debootstrap +
//! `podman import`) and a builder image (the base + gcc, protoc and this machine's Rust
//! toolchain), and builds `deploy/Dockerfile` with podman on vfs storage twice:
//! - target `runtime` (the default): the workspace compiled inside the build, release
//!   profile, crates from `cargo vendor` in the context (offline);
//! - target `prebuilt`: the binaries of this build copied in.
//!
//! Each image is checked with `podman run` (runc here: crun refuses this machine's hybrid
//! cgroups, and podman's raised rlimits are refused too; build.sh picks what works): the
//! three binaries run from it, its default user is not root, and mdserver run from the
//! image serves `mdctl nodes` against a real etcd and exits 0 on SIGTERM.

use std::process::Command;
use std::time::{Duration, Instant};

use mdcluster_tests::etcd::{free_port, Etcd};
use mdcluster_tests::tools::{bin, run_timeout, target_dir};

#[test]
fn dockerfile_builds_from_source_and_prebuilt_and_the_images_serve() {
    let etcd = Etcd::start_with(true).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/image/build.sh");
    let t = Instant::now();
    let out = run_timeout(
        Command::new(&script)
            .env("TARGETS", "runtime prebuilt")
            .env("BIN_DIR", target_dir())
            .env("MDCTL", bin("mdctl"))
            .env("IMAGE", "localhost/mdcluster:t62")
            .env("SMOKE_ETCD", etcd.url())
            .env("SMOKE_PORT", free_port().unwrap().to_string()),
        Duration::from_secs(2400),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("build.sh took {:?}:\n{stdout}", t.elapsed());
    assert!(
        out.status.success(),
        "build.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // The in-image build really compiled, with the release profile.
    assert!(
        stdout.contains("Finished `release` profile [optimized"),
        "{stdout}"
    );
    assert!(
        stdout.contains("image: containers run with podman run"),
        "{stdout}"
    );
    for (target, image) in [
        ("runtime", "localhost/mdcluster:t62"),
        ("prebuilt", "localhost/mdcluster:t62-prebuilt"),
    ] {
        for b in ["mdserver", "mdagent", "mdctl"] {
            assert!(
                stdout.contains(&format!("image: {target}: {b} in the image: {b} 0.")),
                "{target} {b}:\n{stdout}"
            );
        }
        for line in [
            format!("image: {target}: checks (podman)"),
            format!("image: {target}: default user 65532:65532"),
            format!("image: {target}: runs as uid 65532"),
            format!("image: {target}: mdctl nodes answered by mdserver in the image"),
            format!("image: {target}: mdserver exit status after SIGTERM: 0"),
            format!("image: OK: {target}: {image}"),
        ] {
            assert!(stdout.contains(&line), "{line:?} missing:\n{stdout}");
        }
    }
}
