//! Every binary of the workspace answers `--help` and `--version`; mdagent raises its
//! soft limit of open files.

use std::process::Command;

use mdcluster_tests::standalone::Agent;
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

/// Started with a soft limit of 256 open files and a hard one of 8192 (`prlimit`, which
/// execs the agent), mdagent runs with 8192: hundreds of arrays need more than the usual
/// soft limit.
#[test]
fn mdagent_raises_its_soft_limit_of_open_files() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let agent = Agent::start_with(
        Command::new("prlimit")
            .arg("--nofile=256:8192")
            .arg(bin("mdagent")),
        &run,
        &[],
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, ["8192", "8192"], "{line}\nlog:\n{}", agent.log_text());
}
