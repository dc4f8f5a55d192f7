//! t40: arrays written by the real mdadm and kernel md (`tests/fixtures/mdadm`)
//! assemble in a standalone `mdagent` and serve their data: the first 4 MiB have the md5
//! the fixtures' README gives. After a clean stop `mdadm --examine` still reads the
//! members as a clean array and their data areas are identical.

use std::path::{Path, PathBuf};

use mdcluster_tests::standalone::{assert_members_identical, sh, Agent};
use mdcluster_tests::tools::unpack_fixture;
use serde_json::json;

const PATTERN_MD5: &str = "6bc1982b87625ea01127233a4ac407d8";

fn first_4mib_md5(agent: &Agent, name: &str, dir: &Path) -> String {
    let out = dir.join(format!("{name}.out"));
    sh(&[
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &agent.uri(name),
        out.to_str().unwrap(),
    ]);
    let cut = dir.join(format!("{name}.4m"));
    let data = std::fs::read(&out).unwrap();
    std::fs::write(&cut, &data[..4 << 20]).unwrap();
    sh(&["md5sum", cut.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn check(names: &[&str], array: &str, expect_spare: bool) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members: Vec<PathBuf> = names.iter().map(|n| unpack_fixture(n, d)).collect();
    let agent = Agent::start(&d.join("run"), &["--stop-grace", "2s"]);
    let info = agent.ok(json!({"op": "assemble", "name": array, "members": members}));
    assert_eq!(info["state"], "active", "{info}");
    assert_eq!(info["raid"]["size"].as_u64(), Some(15360 * 1024), "{info}");
    assert_eq!(info["raid"]["degraded"], false, "{info}");
    let states: Vec<String> = info["raid"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["state"].to_string())
        .collect();
    assert_eq!(
        states.iter().filter(|s| s.contains("in_sync")).count(),
        2,
        "{info}"
    );
    assert_eq!(
        states.iter().any(|s| s.contains("spare")),
        expect_spare,
        "{info}"
    );
    // Nothing to resync after mdadm's clean stop.
    assert_eq!(info["raid"]["sync"]["completed"], json!([]), "{info}");
    assert_eq!(first_4mib_md5(&agent, array, d), PATTERN_MD5);
    agent.ok(json!({"op": "stop", "name": array}));
    assert_members_identical(&members[..2]);
    for m in &members {
        let ex = sh(&["mdadm", "--examine", m.to_str().unwrap()]);
        assert!(ex.contains("State : clean"), "{ex}");
    }
}

#[test]
fn fixture_internal_bitmap_array_serves_its_data() {
    check(&["fx_a", "fx_b"], "fixa", false);
}

#[test]
fn fixture_array_with_spare_serves_its_data() {
    check(&["fx_c", "fx_d", "fx_e"], "fixb", true);
}
