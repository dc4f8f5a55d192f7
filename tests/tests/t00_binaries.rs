//! Every binary of the workspace answers `--help` and `--version`.

use std::process::Command;

use mdcluster_tests::tools::{bin, run_ok};

#[test]
fn every_binary_answers_help_and_version() {
    for name in ["mdctl", "mdserver", "mdagent"] {
        let help = run_ok(Command::new(bin(name)).arg("--help"));
        assert!(help.contains("Usage:"), "{name} --help:\n{help}");
        assert!(
            help.contains("--version"),
            "{name} --help lists --version:\n{help}"
        );
        let version = run_ok(Command::new(bin(name)).arg("--version"));
        assert_eq!(
            version.trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION")),
            "{name} --version"
        );
    }
    // Each mdctl command explains itself too.
    for cmd in ["examine", "examine-bitmap", "zero-superblock"] {
        let help = run_ok(Command::new(bin("mdctl")).args([cmd, "--help"]));
        assert!(help.contains("DEVICES"), "mdctl {cmd} --help:\n{help}");
    }
}
