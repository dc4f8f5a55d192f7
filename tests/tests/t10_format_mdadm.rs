//! The md v1.2 format against the real mdadm: members we write are read by
//! `mdadm --examine` / `--examine-bitmap` as the same array our `mdctl examine` reports,
//! and members mdadm and kernel md wrote (tests/fixtures/mdadm) read back with the
//! facts their README lists.

use std::path::{Path, PathBuf};
use std::process::Command;

use mdcluster_agent::format::create::{BitmapMode, CreateSpec};
use mdcluster_agent::format::io::create_members;
use mdcluster_tests::tools::{
    bin, key_values, run_ok, run_timeout, unpack_fixture, value_of, LoopDevice, CMD_TIMEOUT,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn blank(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
    p
}

/// `mdctl --json examine DEV` → the one report.
fn our_examine(dev: &Path) -> Value {
    let out = run_ok(
        Command::new(bin("mdctl"))
            .args(["--json", "examine"])
            .arg(dev),
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

fn our_examine_bitmap(dev: &Path) -> Value {
    let out = run_ok(
        Command::new(bin("mdctl"))
            .args(["--json", "examine-bitmap"])
            .arg(dev),
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

/// "15360 KiB (15.00 MiB 15.73 MB)" → 15360
fn leading_number(s: &str) -> u64 {
    s.split_whitespace().next().unwrap().parse().unwrap()
}

/// Compares mdadm --examine and --examine-bitmap with our report for one member.
fn compare_with_mdadm(dev: &Path) {
    let ours = our_examine(dev);
    let text = run_ok(Command::new("mdadm").arg("--examine").arg(dev));
    let kv = key_values(&text);
    let get = |k: &str| {
        value_of(&kv, k)
            .unwrap_or_else(|| panic!("mdadm -E has no {k:?}:\n{text}"))
            .to_string()
    };
    assert_eq!(
        get("Array UUID"),
        ours["array_uuid"].as_str().unwrap(),
        "{text}"
    );
    assert_eq!(get("Name"), ours["name"].as_str().unwrap(), "{text}");
    assert_eq!(get("Raid Level"), ours["raid_level"].as_str().unwrap());
    assert_eq!(get("Raid Devices"), ours["raid_devices"].to_string());
    assert_eq!(get("Device Role"), ours["device_role"].as_str().unwrap());
    assert_eq!(
        leading_number(&get("Data Offset")),
        ours["data_offset"].as_u64().unwrap()
    );
    assert_eq!(
        leading_number(&get("Array Size")),
        ours["array_size_kib"].as_u64().unwrap()
    );
    let used = value_of(&kv, "Used Dev Size")
        .map_or_else(|| leading_number(&get("Avail Dev Size")), leading_number);
    assert_eq!(used, ours["used_dev_size"].as_u64().unwrap());
    assert_eq!(get("Feature Map"), ours["feature_map"].as_str().unwrap());
    assert_eq!(get("Events"), ours["events"].to_string());
    assert_eq!(get("Device UUID"), ours["device_uuid"].as_str().unwrap());
    // mdadm verifies the checksum itself and says so.
    assert!(get("Checksum").ends_with("- correct"), "{text}");
    match ours["cluster_name"].as_str() {
        Some(c) => assert_eq!(get("Cluster Name"), c),
        None => assert!(value_of(&kv, "Cluster Name").is_none()),
    }
    if ours["internal_bitmap_offset"].is_null() {
        return;
    }
    let bm = our_examine_bitmap(dev);
    let lo = LoopDevice::attach_ro(dev);
    let text = run_ok(Command::new("mdadm").arg("--examine-bitmap").arg(&lo.path));
    let kv = key_values(&text);
    let get = |k: &str| {
        value_of(&kv, k)
            .unwrap_or_else(|| panic!("mdadm -X has no {k:?}:\n{text}"))
            .to_string()
    };
    assert_eq!(get("Version"), bm["version"].to_string());
    assert_eq!(get("UUID"), bm["uuid"].as_str().unwrap());
    let chunk = get("Chunksize");
    let (n, unit) = chunk.split_once(' ').unwrap();
    let mult = match unit {
        "MB" => MIB,
        "KB" => 1024,
        "B" => 1,
        u => panic!("unit {u}"),
    };
    assert_eq!(
        n.parse::<u64>().unwrap() * mult,
        bm["chunk_size"].as_u64().unwrap()
    );
    assert_eq!(
        leading_number(&get("Sync Size")),
        bm["sync_size_kib"].as_u64().unwrap()
    );
    if let Some(nodes) = bm["cluster_nodes"].as_u64() {
        assert_eq!(get("Cluster nodes").parse::<u64>().unwrap(), nodes);
        assert_eq!(get("Cluster name"), bm["cluster_name"].as_str().unwrap());
    }
    // "Bitmap : 16 bits (chunks), 16 dirty (100.0%)", one line per slot.
    let lines: Vec<(u64, u64)> = kv
        .iter()
        .filter(|(k, _)| k == "Bitmap")
        .map(|(_, v)| {
            let w: Vec<&str> = v.split_whitespace().collect();
            (w[0].parse().unwrap(), w[3].parse().unwrap())
        })
        .collect();
    let slots = bm["slots"].as_array().unwrap();
    assert_eq!(lines.len(), slots.len(), "slot count: {text}");
    for (i, (bits, dirty)) in lines.iter().enumerate() {
        assert_eq!(*bits, slots[i]["bits"].as_u64().unwrap(), "slot {i} bits");
        assert_eq!(
            *dirty,
            slots[i]["dirty"].as_u64().unwrap(),
            "slot {i} dirty"
        );
    }
}

struct Case {
    what: &'static str,
    devices: u32,
    spares: u32,
    bitmap: BitmapMode,
    nodes: Option<u32>,
    name: &'static str,
    size_kib: Option<u64>,
    assume_clean: bool,
    chunk: Option<u32>,
}

fn case(what: &'static str, bitmap: BitmapMode) -> Case {
    Case {
        what,
        devices: 2,
        spares: 0,
        bitmap,
        nodes: None,
        name: "node1:md0",
        size_kib: None,
        assume_clean: false,
        chunk: None,
    }
}

#[test]
fn members_we_write_read_the_same_in_mdadm() {
    let cases = [
        Case {
            nodes: Some(2),
            chunk: Some(MIB as u32),
            ..case("clustered, 2 nodes", BitmapMode::Clustered)
        },
        Case {
            assume_clean: true,
            ..case(
                "clustered, default 4 nodes, assume-clean",
                BitmapMode::Clustered,
            )
        },
        Case {
            chunk: Some(256 << 10),
            ..case("internal bitmap, 256 KiB chunk", BitmapMode::Internal)
        },
        case("no bitmap", BitmapMode::None),
        Case {
            spares: 1,
            ..case("internal bitmap with a spare", BitmapMode::Internal)
        },
        Case {
            name: "storehost:volume-with-long",
            ..case("named", BitmapMode::Clustered)
        },
        Case {
            size_kib: Some(40 * 1024),
            chunk: Some(4 << 20),
            ..case("explicit size", BitmapMode::Clustered)
        },
        Case {
            devices: 3,
            spares: 2,
            nodes: Some(3),
            ..case("3-way mirror, 2 spares", BitmapMode::Clustered)
        },
    ];
    for c in cases {
        eprintln!("--- {}", c.what);
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..c.devices + c.spares)
            .map(|i| blank(dir.path(), &format!("d{i}"), 64 * MIB + u64::from(i) * MIB))
            .collect();
        let mut spec = CreateSpec::new(c.name, c.devices, c.spares, c.bitmap);
        spec.nodes = c.nodes;
        if c.bitmap == BitmapMode::Clustered {
            spec.cluster_name = "testcluster".into();
        }
        spec.size_kib = c.size_kib;
        spec.assume_clean = c.assume_clean;
        spec.bitmap_chunk = c.chunk;
        create_members(&spec, &paths, false).unwrap();
        for (i, p) in paths.iter().enumerate() {
            compare_with_mdadm(p);
            let ours = our_examine(p);
            let role = if (i as u32) < c.devices {
                format!("Active device {i}")
            } else {
                "spare".into()
            };
            assert_eq!(
                ours["device_role"],
                role.as_str(),
                "{}: role of {}",
                c.what,
                p.display()
            );
            assert_eq!(ours["name"], c.name);
            let expect_fm = match c.bitmap {
                BitmapMode::Clustered => "0x101",
                BitmapMode::Internal => "0x1",
                BitmapMode::None => "0x0",
            };
            assert_eq!(ours["feature_map"], expect_fm);
            if let Some(kib) = c.size_kib {
                assert_eq!(ours["array_size_kib"], kib);
            }
            if c.bitmap != BitmapMode::None {
                let bm = our_examine_bitmap(p);
                let slots = bm["slots"].as_array().unwrap();
                let want_slots = match c.bitmap {
                    BitmapMode::Clustered => c.nodes.unwrap_or(4),
                    _ => 1,
                };
                assert_eq!(slots.len() as u32, want_slots, "{}", c.what);
                // Without --assume-clean the creating node's slot is all dirty, the others clean.
                let bits = slots[0]["bits"].as_u64().unwrap();
                let dirty0 = slots[0]["dirty"].as_u64().unwrap();
                assert_eq!(dirty0, if c.assume_clean { 0 } else { bits }, "{}", c.what);
                assert!(slots[1..].iter().all(|s| s["dirty"] == 0));
            }
        }
    }
}

/// Facts from tests/fixtures/mdadm/README.md.
#[test]
fn fixtures_written_by_mdadm_read_with_the_documented_facts() {
    let dir = tempfile::tempdir().unwrap();
    for (name, uuid, array_name, role, bitmap) in [
        (
            "fx_a",
            "e949d484:e147beef:6ff327b4:5d325eb9",
            "fixturehost:fixa",
            "Active device 0",
            true,
        ),
        (
            "fx_b",
            "e949d484:e147beef:6ff327b4:5d325eb9",
            "fixturehost:fixa",
            "Active device 1",
            true,
        ),
        (
            "fx_c",
            "8cf80e69:50f67531:7d77ee30:20ac44bb",
            "fixturehost:fixb",
            "Active device 0",
            false,
        ),
        (
            "fx_d",
            "8cf80e69:50f67531:7d77ee30:20ac44bb",
            "fixturehost:fixb",
            "Active device 1",
            false,
        ),
        (
            "fx_e",
            "8cf80e69:50f67531:7d77ee30:20ac44bb",
            "fixturehost:fixb",
            "spare",
            false,
        ),
    ] {
        let img = unpack_fixture(name, dir.path());
        let e = our_examine(&img);
        assert_eq!(e["array_uuid"], uuid, "{name}");
        assert_eq!(e["name"], array_name, "{name}");
        assert_eq!(e["raid_level"], "raid1");
        assert_eq!(e["raid_devices"], 2);
        assert_eq!(e["device_role"], role, "{name}");
        assert_eq!(e["array_size_kib"], 15360, "{name}");
        assert_eq!(e["data_offset"], 2048, "{name}");
        assert_eq!(e["state"], "clean", "{name}");
        assert_eq!(e["feature_map"], if bitmap { "0x1" } else { "0x0" });
        if bitmap {
            let bm = our_examine_bitmap(&img);
            assert_eq!(bm["version"], 4);
            assert_eq!(bm["chunk_size"], 64 * MIB);
            assert_eq!(bm["sync_size_kib"], 15360);
            assert_eq!(bm["slots"][0]["bits"], 1);
            assert_eq!(bm["slots"][0]["dirty"], 0);
        } else {
            // No bitmap: examine-bitmap says so and exits ENOENT (3).
            let out = run_timeout(
                Command::new(bin("mdctl")).arg("examine-bitmap").arg(&img),
                CMD_TIMEOUT,
            );
            assert_eq!(out.status.code(), Some(3));
            assert!(String::from_utf8_lossy(&out.stderr).contains("no write-intent bitmap"));
        }
        compare_with_mdadm(&img);
    }
}

#[test]
fn corrupt_and_zeroed_superblocks_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let a = blank(dir.path(), "a", 32 * MIB);
    let b = blank(dir.path(), "b", 32 * MIB);
    let spec = CreateSpec::new("h:md9", 2, 0, BitmapMode::Internal);
    create_members(&spec, &[a.clone(), b.clone()], false).unwrap();

    // One byte flipped inside the checksummed area: exit 10 and a message naming it.
    let mut bytes = std::fs::read(&a).unwrap();
    bytes[4096 + 300] ^= 0x40;
    std::fs::write(&a, &bytes).unwrap();
    let out = run_timeout(
        Command::new(bin("mdctl")).arg("examine").arg(&a),
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(10), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checksum mismatch") && err.contains(&a.display().to_string()),
        "{err}"
    );

    // Several devices: the good one is still reported, the exit code says one failed.
    let out = run_timeout(
        Command::new(bin("mdctl"))
            .args(["--json", "examine"])
            .arg(&a)
            .arg(&b),
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(10));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["exit_code"], 10);
    assert_eq!(v[1]["device_role"], "Active device 1");

    // zero-superblock erases it: mdadm agrees there is nothing left.
    run_ok(Command::new(bin("mdctl")).arg("zero-superblock").arg(&b));
    let out = run_timeout(Command::new("mdadm").arg("--examine").arg(&b), CMD_TIMEOUT);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No md superblock detected"),
        "{out:?}"
    );
    let out = run_timeout(
        Command::new(bin("mdctl")).arg("examine").arg(&b),
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(3), "no superblock is ENOENT");
    // Zeroing a device without a superblock needs --force.
    let out = run_timeout(
        Command::new(bin("mdctl")).arg("zero-superblock").arg(&b),
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(3));
    run_ok(
        Command::new(bin("mdctl"))
            .args(["zero-superblock", "--force"])
            .arg(&b),
    );

    // A missing device is ENOENT with the path in the message.
    let missing = dir.path().join("nope");
    let out = run_timeout(
        Command::new(bin("mdctl")).arg("examine").arg(&missing),
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}
