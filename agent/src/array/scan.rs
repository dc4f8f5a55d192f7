//! Finding an array's members, or one member, by UUID among the devices this node may
//! use, as `mdadm --assemble --scan` does. On shared storage every host may see the
//! same LUN under another path (`/dev/sdb` here, `/dev/sdc` there, its own
//! multipath or loop device), so a path recorded on one node means nothing on
//! another: what identifies a member is its superblock — the array UUID (`set_uuid`)
//! and the device UUID (`device_uuid`).
//!
//! This module owns:
//! - [`expand`]: the node's `--device-allow` globs expanded into the existing block
//!   devices and regular files they match (the same matching as
//!   [`crate::allow::glob_match`]: `*` stays within one path component; the walk
//!   starts at each pattern's literal directory, does not follow symlinked
//!   directories, and is bounded in depth and entries); every candidate, the preferred
//!   paths too, then passes [`DeviceAllow::check`] (symlinks and `..` resolved);
//! - [`select`] (pure): from probed candidates, the members of one array, each device
//!   once (two paths to one device are one member; two devices with one device UUID
//!   are refused as ambiguous);
//! - [`find_array`] / [`find_device`]: expand, probe each candidate's superblock,
//!   select.

use std::path::{Path, PathBuf};

use crate::allow::DeviceAllow;
use crate::format::fmt_uuid;
use crate::format::io::MetaDev;
use crate::format::superblock::{DevRole, Superblock, SB_BLOCK_BYTES};
use crate::format::SB_OFFSET_BYTES;

/// Most directory levels walked below a pattern's literal directory.
pub const MAX_DEPTH: usize = 6;
/// Most directory entries looked at for one expansion.
pub const MAX_ENTRIES: usize = 20_000;

/// Why a scan found nothing usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScanError {
    /// The node has no `--device-allow` pattern: there is nothing to scan.
    #[error("this agent has no --device-allow pattern, so it cannot look for {what} by UUID; give the member devices")]
    NoPatterns {
        /// What was looked for.
        what: String,
    },
    /// No allowed device holds it.
    #[error("no device under this agent's --device-allow patterns ({patterns}) holds {what}")]
    NotFound {
        /// What was looked for.
        what: String,
        /// The patterns, joined.
        patterns: String,
    },
    /// Two different devices carry the same device UUID.
    #[error("{} and {} are different devices with the same device UUID {device_uuid}; remove one from --device-allow or zero the copy", a.display(), b.display())]
    Ambiguous {
        /// The device UUID.
        device_uuid: String,
        /// One device.
        a: PathBuf,
        /// The other.
        b: PathBuf,
    },
}

/// What a candidate's superblock says, and which device it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The path the node may open (as matched by `--device-allow`).
    pub path: PathBuf,
    /// The device the path resolves to (symlinks followed): one device, one member.
    pub canonical: PathBuf,
    /// `set_uuid`.
    pub set_uuid: [u8; 16],
    /// `device_uuid`.
    pub device_uuid: [u8; 16],
}

/// The literal directory of a pattern: everything before the `/` that precedes its
/// first wildcard (`/dev/disk/by-id/wwn-*` → `/dev/disk/by-id`). `None` for a pattern
/// without a wildcard (it names one path) or a relative one.
pub fn literal_root(pattern: &str) -> Option<PathBuf> {
    let wild = pattern.find(['*', '?'])?;
    let cut = pattern[..wild].rfind('/')?;
    Some(PathBuf::from(if cut == 0 { "/" } else { &pattern[..cut] }))
}

/// Every existing block device or regular file (symlinks followed for the type) whose
/// path matches one of `patterns`, sorted, each path once.
pub fn expand(patterns: &[String]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut budget = MAX_ENTRIES;
    for p in patterns {
        match literal_root(p) {
            None => {
                let path = PathBuf::from(p);
                if is_candidate(&path) {
                    out.push(path);
                }
            }
            Some(root) => walk(&root, p, 0, &mut budget, &mut out),
        }
    }
    out.sort();
    out.dedup();
    out
}

fn is_candidate(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device() || m.is_file())
}

fn walk(dir: &Path, pattern: &str, depth: usize, budget: &mut usize, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if *budget == 0 {
            tracing::warn!(pattern, "device scan stopped after {MAX_ENTRIES} entries");
            return;
        }
        *budget -= 1;
        let path = e.path();
        let s = path.to_string_lossy();
        if super::glob_match(pattern, &s) && is_candidate(&path) {
            out.push(path.clone());
        }
        // A real directory only (no symlinked ones: no loops), and only while the
        // pattern can still match below it.
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && depth + 1 < MAX_DEPTH && prefix_may_match(pattern, &s) {
            walk(&path, pattern, depth + 1, budget, out);
        }
    }
}

/// Whether some path below directory `dir` could match `pattern`: the pattern's
/// literal part agrees with `dir/`, and the pattern reaches below it (a `*` crosses
/// `/` with wildcards matching within one component: it needs more `/` than `dir` has).
fn prefix_may_match(pattern: &str, dir: &str) -> bool {
    let d = format!("{dir}/");
    let lit = &pattern[..pattern.find(['*', '?']).unwrap_or(pattern.len())];
    let agrees = lit.starts_with(&d) || d.starts_with(lit);
    agrees && pattern.matches('/').count() > dir.matches('/').count()
}

/// The paths to probe: the `preferred` ones `allow` allows, then every device its
/// patterns expand to that passes the check too (symlinks and `..` resolved).
fn candidates(allow: &DeviceAllow, preferred: &[PathBuf]) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = preferred.to_vec();
    paths.extend(expand(allow.patterns()));
    paths.retain(|p| allow.check(p).is_ok());
    paths
}

/// The members of array `uuid` among `probes`, in the order given (put preferred
/// paths first), each device once: paths to the same device (same `canonical`) count
/// once; different devices with one device UUID are refused.
pub fn select(uuid: &[u8; 16], probes: &[Probe]) -> Result<Vec<PathBuf>, ScanError> {
    let mut kept: Vec<&Probe> = Vec::new();
    for p in probes.iter().filter(|p| &p.set_uuid == uuid) {
        if kept.iter().any(|k| k.canonical == p.canonical) {
            continue;
        }
        if let Some(k) = kept.iter().find(|k| k.device_uuid == p.device_uuid) {
            return Err(ScanError::Ambiguous {
                device_uuid: fmt_uuid(&p.device_uuid),
                a: k.path.clone(),
                b: p.path.clone(),
            });
        }
        kept.push(p);
    }
    Ok(kept.into_iter().map(|p| p.path.clone()).collect())
}

/// The device numbers the newest superblock gives an active role that no found device
/// has: `newest_active` are those device numbers, `found` the found devices' numbers.
/// A scan that misses one would assemble the array degraded — and fail the missing
/// member on every node — only because this node does not see it.
pub fn missing_active(newest_active: &[u32], found: &[u32]) -> Vec<u32> {
    newest_active
        .iter()
        .copied()
        .filter(|d| !found.contains(d))
        .collect()
}

/// [`missing_active`] over the superblocks of `paths` (found by a scan): the newest
/// one (most events) says which device numbers are active.
pub fn missing_active_of(paths: &[PathBuf]) -> Vec<u32> {
    let sbs: Vec<Superblock> = paths.iter().filter_map(|p| read_superblock(p)).collect();
    let Some(newest) = sbs.iter().max_by_key(|sb| sb.events) else {
        return Vec::new();
    };
    let active: Vec<u32> = (0..newest.dev_roles.len() as u32)
        .filter(|d| matches!(newest.role_of(*d), DevRole::Active(_)))
        .collect();
    let found: Vec<u32> = sbs.iter().map(|sb| sb.dev_number).collect();
    missing_active(&active, &found)
}

/// Reads the superblock of each path (those without a valid one are left out).
pub fn probe(paths: &[PathBuf]) -> Vec<Probe> {
    paths
        .iter()
        .filter_map(|p| {
            let sb = read_superblock(p)?;
            let canonical = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            Some(Probe {
                path: p.clone(),
                canonical,
                set_uuid: sb.set_uuid,
                device_uuid: sb.device_uuid,
            })
        })
        .collect()
}

/// The superblock of `path` as it is on the device, past this host's page cache
/// ([`MetaDev`]: `O_DIRECT` where the device allows it): another node may have written
/// it since this node last read the device (a NEWDISK's new member). `None` without a
/// valid superblock. Only the superblock: a device just given one by a NEWDISK's
/// sender has no bitmap yet.
pub fn read_superblock(path: &Path) -> Option<Superblock> {
    let dev = MetaDev::open(path, false).ok()?;
    let block = dev.read_at(SB_OFFSET_BYTES, SB_BLOCK_BYTES).ok()?;
    Superblock::parse(&block).ok()
}

/// The members of array `uuid` among the devices `patterns` allow, `preferred` paths
/// first (e.g. the recorded ones, when allowed here). Blocking (reads superblocks).
pub fn find_array(
    uuid: &[u8; 16],
    allow: &DeviceAllow,
    preferred: &[PathBuf],
) -> Result<Vec<PathBuf>, ScanError> {
    let what = format!("a member of array {}", fmt_uuid(uuid));
    if allow.patterns().is_empty() {
        return Err(ScanError::NoPatterns { what });
    }
    let paths = candidates(allow, preferred);
    let found = select(uuid, &probe(&paths))?;
    if found.is_empty() {
        return Err(ScanError::NotFound {
            what,
            patterns: crate::quote::cut(&allow.patterns().join(", ")),
        });
    }
    Ok(found)
}

/// The path of the device with `device_uuid` in array `uuid` among the devices
/// `patterns` allow, `preferred` first. Blocking (reads superblocks).
pub fn find_device(
    uuid: &[u8; 16],
    device_uuid: &[u8; 16],
    allow: &DeviceAllow,
    preferred: &[PathBuf],
) -> Result<PathBuf, ScanError> {
    let what = format!(
        "device {} of array {}",
        fmt_uuid(device_uuid),
        fmt_uuid(uuid)
    );
    if allow.patterns().is_empty() {
        return Err(ScanError::NoPatterns { what });
    }
    let paths = candidates(allow, preferred);
    let probes: Vec<Probe> = probe(&paths)
        .into_iter()
        .filter(|p| &p.device_uuid == device_uuid)
        .collect();
    select(uuid, &probes)?
        .into_iter()
        .next()
        .ok_or(ScanError::NotFound {
            what,
            patterns: crate::quote::cut(&allow.patterns().join(", ")),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(path: &str, canonical: &str, set: u8, dev: u8) -> Probe {
        Probe {
            path: path.into(),
            canonical: canonical.into(),
            set_uuid: [set; 16],
            device_uuid: [dev; 16],
        }
    }

    #[test]
    fn literal_root_is_the_directory_before_the_first_wildcard() {
        assert_eq!(
            literal_root("/dev/disk/by-id/wwn-*"),
            Some("/dev/disk/by-id".into())
        );
        assert_eq!(literal_root("/dev/sd?"), Some("/dev".into()));
        assert_eq!(literal_root("/x/n1/*"), Some("/x/n1".into()));
        assert_eq!(literal_root("/*"), Some("/".into()));
        assert_eq!(literal_root("/dev/sdb"), None);
        assert_eq!(literal_root("rel*"), None);
    }

    #[test]
    fn select_keeps_the_array_s_devices_once_in_the_order_given() {
        let a = [1u8; 16];
        let probes = vec![
            probe("/v/n2/m1", "/dev/loop7", 1, 11),
            probe("/v/n2/m0", "/dev/loop6", 1, 10),
            probe("/v/n2/other", "/dev/loop9", 2, 20),
            // The same device under a second allowed path: one member.
            probe("/dev/loop6", "/dev/loop6", 1, 10),
        ];
        assert_eq!(
            select(&a, &probes).unwrap(),
            vec![PathBuf::from("/v/n2/m1"), PathBuf::from("/v/n2/m0")]
        );
        assert_eq!(
            select(&[2u8; 16], &probes).unwrap(),
            vec![PathBuf::from("/v/n2/other")]
        );
        assert!(select(&[3u8; 16], &probes).unwrap().is_empty());
    }

    #[test]
    fn two_devices_with_one_device_uuid_are_ambiguous() {
        let probes = vec![
            probe("/dev/sdb", "/dev/sdb", 1, 10),
            probe("/dev/sdc", "/dev/sdc", 1, 10),
        ];
        let e = select(&[1u8; 16], &probes).unwrap_err();
        assert!(matches!(e, ScanError::Ambiguous { .. }), "{e}");
        assert!(e.to_string().contains("/dev/sdb") && e.to_string().contains("/dev/sdc"));
    }

    #[test]
    fn expand_walks_below_the_literal_directory_and_matches_like_device_allow() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("n1/sub")).unwrap();
        std::fs::create_dir_all(root.join("n2")).unwrap();
        for f in ["n1/m0", "n1/m1", "n1/sub/m2", "n2/m0", "n1/x0"] {
            std::fs::write(root.join(f), b"").unwrap();
        }
        std::os::unix::fs::symlink(root.join("n2/m0"), root.join("n1/link")).unwrap();
        // A symlinked directory is not walked (no loops).
        std::os::unix::fs::symlink(root.join("n1"), root.join("n1/sub/loop")).unwrap();
        let r = root.display();
        let got = expand(&[format!("{r}/n1/m*")]);
        assert_eq!(got, vec![root.join("n1/m0"), root.join("n1/m1")]);
        // `*` stays within one component, as glob_match does.
        let got = expand(&[format!("{r}/n1/*")]);
        assert_eq!(
            got,
            vec![
                root.join("n1/link"),
                root.join("n1/m0"),
                root.join("n1/m1"),
                root.join("n1/x0"),
            ]
        );
        let got = expand(&[format!("{r}/n1/*/*")]);
        assert_eq!(got, vec![root.join("n1/sub/m2")]);
        // A pattern without wildcard names one path; a missing one nothing.
        let got = expand(&[format!("{r}/n2/m0"), format!("{r}/n2/nope")]);
        assert_eq!(got, vec![root.join("n2/m0")]);
        for p in expand(&[format!("{r}/*")]) {
            assert!(super::super::glob_match(
                &format!("{r}/*"),
                &p.to_string_lossy()
            ));
        }
    }

    #[test]
    fn a_scan_that_misses_an_active_member_says_which() {
        assert!(missing_active(&[0, 1], &[1, 0]).is_empty());
        assert!(
            missing_active(&[0, 1], &[0, 1, 2]).is_empty(),
            "a spare extra is fine"
        );
        assert_eq!(missing_active(&[0, 1, 3], &[0, 2]), vec![1, 3]);
        assert!(missing_active_of(&[]).is_empty());
    }

    #[test]
    fn without_patterns_nothing_is_scanned() {
        let none = DeviceAllow::default();
        let e = find_array(&[1; 16], &none, &[]).unwrap_err();
        assert!(matches!(e, ScanError::NoPatterns { .. }));
        let e = find_device(&[1; 16], &[2; 16], &none, &[]).unwrap_err();
        assert!(e.to_string().contains("--device-allow"), "{e}");
    }
}
