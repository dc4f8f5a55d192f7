//! t50: `tests/scripts/two-node.sh`, the two-node md_open reproducer driven only through
//! `mdctl`, run as it is (its own etcd, mdserver and two agents from the built
//! binaries). It must exit 0 and report every cycle, no hung client, and no lock left.

use std::process::Command;
use std::time::Duration;

use mdcluster_tests::tools::{run_timeout, target_dir};

#[test]
fn two_node_script_passes() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/two-node.sh");
    let out = run_timeout(
        Command::new(&script).env("BIN", target_dir()),
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "two-node.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("two-node: OK (10 cycles)"), "{stdout}");
    assert_eq!(stdout.matches("took").count(), 10, "{stdout}");
    assert!(stdout.contains(", 0 hung"), "{stdout}");
    assert!(stdout.contains("locks left in etcd: 0"), "{stdout}");
}
