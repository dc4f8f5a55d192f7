//! The device allow-list (`--device-allow`): which paths this agent may open as members.
//!
//! This module owns the one decision every path that reaches the agent goes through
//! (create, assemble, add, re-add, spare, grow, NEWDISK, the UUID scan):
//!
//! - **Patterns** are absolute globs; `*` and `?` match within one path component
//!   (never `/`), and a pattern with a `.` or `..` component is refused at start.
//! - **A path is resolved first** (`..`, `.` and every symlink, like `realpath`). It is
//!   allowed when either
//!   1. its resolution matches a pattern, or
//!   2. the path as given matches a pattern, its directories are already resolved
//!      (no symlink and no `..` above the last component), and its last component is a
//!      symlink: an entry the operator's pattern names, such as udev's
//!      `/dev/disk/by-id/wwn-*` links.
//!
//!   and the resolution is a block device or a regular file. So
//!   `/dev/disk/by-id/../../sda`, a symlinked directory inside a pattern, and a
//!   symlink outside the patterns that points at a device are all refused.
//! - **An empty list** allows every path in standalone mode (the local control socket
//!   is the only way in) and **nothing** in cluster mode.
//! - A denial is `EPERM` naming the path, its resolution and the patterns; nothing is
//!   opened before the check.
//!
//! [`DeviceAllow::check`] returns the resolved path; the callers open that one where
//! they write (create). What remains between check and open: whoever can write a
//! directory on the resolved path (or the directory of a pattern-matched symlink) can
//! swap the entry in between; allowed directories must be writable only by root.

use std::path::{Component, Path, PathBuf};

use crate::quote::cut;

/// Whether an empty pattern list allows every path or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmptyList {
    /// Standalone: any path (the local control socket is the only way in).
    AllowsAny,
    /// Cluster mode: nothing (a remote request must never reach an unlisted device).
    AllowsNothing,
}

/// A refused path.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    /// The path does not resolve (missing, or a dangling symlink).
    #[error("{}: cannot resolve it ({reason}); give an existing device", cut(&path.display().to_string()))]
    Unresolvable {
        /// The path as given.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Not under the allow-list.
    #[error("{} (resolves to {}) is not allowed by this agent's --device-allow ({}){}", cut(&path.display().to_string()), cut(&resolved.display().to_string()), if patterns.is_empty() { "empty: in cluster mode an empty list allows nothing".to_owned() } else { cut(&patterns.join(", ")) }, why)]
    NotAllowed {
        /// The path as given.
        path: PathBuf,
        /// What it resolved to.
        resolved: PathBuf,
        /// The patterns.
        patterns: Vec<String>,
        /// Extra reason (e.g. not a block device), with a leading "; ".
        why: String,
    },
}

/// A bad pattern (refused at start).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("--device-allow {pattern:?}: {reason}")]
pub struct BadPattern {
    /// The pattern.
    pub pattern: String,
    /// Why.
    pub reason: &'static str,
}

/// The allow-list of one agent. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAllow {
    patterns: Vec<String>,
    empty: EmptyList,
}

impl Default for DeviceAllow {
    /// Standalone, no pattern: any path.
    fn default() -> Self {
        DeviceAllow {
            patterns: Vec::new(),
            empty: EmptyList::AllowsAny,
        }
    }
}

/// Glob match where `*` and `?` match within one path component: `*` any run of
/// non-`/` bytes, `?` one non-`/` byte.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), path.as_bytes());
    // Iterative with one backtrack point per `*` (the classic wildcard matcher), and
    // the `*` may not extend over a `/`: bounded by p.len() * s.len() steps.
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && ((p[pi] == b'?' && s[si] != b'/') || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star.filter(|&(_, ss)| s[ss] != b'/') {
            star = Some((sp, ss + 1));
            pi = sp + 1;
            si = ss + 1;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

impl DeviceAllow {
    /// An allow-list of `patterns`; `empty` says what an empty list means.
    /// Empty strings are left out (`MDAGENT_DEVICE_ALLOW=` is an empty list).
    pub fn new(patterns: Vec<String>, empty: EmptyList) -> Result<DeviceAllow, BadPattern> {
        let patterns: Vec<String> = patterns.into_iter().filter(|p| !p.is_empty()).collect();
        for p in &patterns {
            let bad = |reason| BadPattern {
                pattern: p.clone(),
                reason,
            };
            if !p.starts_with('/') {
                return Err(bad("a pattern must be an absolute path"));
            }
            if Path::new(p)
                .components()
                .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
                || p.split('/').any(|c| c == "." || c == "..")
            {
                return Err(bad("a pattern may not contain . or .. components"));
            }
        }
        Ok(DeviceAllow { patterns, empty })
    }

    /// The patterns.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether every path is allowed (standalone without patterns).
    pub fn allows_any(&self) -> bool {
        self.patterns.is_empty() && self.empty == EmptyList::AllowsAny
    }

    /// Whether nothing is allowed (cluster mode without patterns).
    pub fn allows_nothing(&self) -> bool {
        self.patterns.is_empty() && self.empty == EmptyList::AllowsNothing
    }

    fn matches(&self, s: &str) -> bool {
        self.patterns.iter().any(|g| glob_match(g, s))
    }

    /// Checks `path` (see the module doc) and returns its resolution, the path to open.
    /// Blocking (resolves symlinks).
    pub fn check(&self, path: &Path) -> Result<PathBuf, Denied> {
        let resolved = match std::fs::canonicalize(path) {
            Ok(r) => r,
            // Any path is allowed: the open reports what is wrong with it.
            Err(_) if self.allows_any() => return Ok(path.to_owned()),
            // Only a path the patterns could name learns that it does not exist.
            Err(e) if self.matches(&path.to_string_lossy()) => {
                return Err(Denied::Unresolvable {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })
            }
            Err(e) => {
                return Err(Denied::NotAllowed {
                    path: path.to_owned(),
                    resolved: path.to_owned(),
                    patterns: self.patterns.clone(),
                    why: format!("; it does not resolve ({e})"),
                })
            }
        };
        let denied = |why: String| Denied::NotAllowed {
            path: path.to_owned(),
            resolved: resolved.clone(),
            patterns: self.patterns.clone(),
            why,
        };
        if self.allows_any() {
            return Ok(resolved);
        }
        let by_resolution = self.matches(&resolved.to_string_lossy());
        let by_name = !by_resolution && self.named_symlink(path);
        if !by_resolution && !by_name {
            return Err(denied(String::new()));
        }
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(&resolved) {
            Ok(m) if m.file_type().is_block_device() || m.is_file() => Ok(resolved),
            Ok(_) => Err(denied(
                "; it is neither a block device nor a regular file".into(),
            )),
            Err(e) => Err(denied(format!("; {e}"))),
        }
    }

    /// Rule 2 of the module doc: `path` matches a pattern as given, is absolute without
    /// `.`/`..`, its parent directory is already resolved, and it is a symlink.
    fn named_symlink(&self, path: &Path) -> bool {
        let s = path.to_string_lossy();
        if !path.is_absolute() || s.split('/').any(|c| c == "." || c == "..") || !self.matches(&s) {
            return false;
        }
        let Some(parent) = path.parent() else {
            return false;
        };
        std::fs::canonicalize(parent).is_ok_and(|p| p == parent)
            && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
    }

    /// Checks every path; the resolutions in order, or the first denial.
    pub fn check_all(&self, paths: &[PathBuf]) -> Result<Vec<PathBuf>, Denied> {
        paths.iter().map(|p| self.check(p)).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn list(dir: &Path, pats: &[&str]) -> DeviceAllow {
        DeviceAllow::new(
            pats.iter()
                .map(|p| p.replace("{d}", &dir.display().to_string()))
                .collect(),
            EmptyList::AllowsNothing,
        )
        .unwrap()
    }

    #[test]
    fn star_stays_in_one_component() {
        assert!(glob_match("/dev/disk/by-id/*", "/dev/disk/by-id/wwn-1"));
        assert!(!glob_match(
            "/dev/disk/by-id/*",
            "/dev/disk/by-id/../../sda"
        ));
        assert!(!glob_match("/tmp/disk*", "/tmp/disk0/x"));
        assert!(glob_match("/tmp/*/m?", "/tmp/n1/m0"));
        assert!(!glob_match("/tmp/?", "/tmp//"));
        assert!(glob_match("/a*b*c", "/axxbyyc"));
        assert!(!glob_match("/a*b*c", "/axxbyy/c"));
        assert!(glob_match("*", "abc"));
        assert!(!glob_match("*", "a/c"));
        // Bounded on adversarial input.
        let long = "a".repeat(10_000);
        assert!(!glob_match(&"*a".repeat(50), &format!("{long}/")));
    }

    #[test]
    fn bad_patterns_refused() {
        for p in ["relative/*", "/dev/../sd*", "/dev/./x"] {
            assert!(
                DeviceAllow::new(vec![p.into()], EmptyList::AllowsAny).is_err(),
                "{p}"
            );
        }
    }

    #[test]
    fn empty_list_by_mode() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("disk0");
        std::fs::write(&f, b"x").unwrap();
        assert!(DeviceAllow::default().check(&f).is_ok());
        let none = DeviceAllow::new(vec![String::new()], EmptyList::AllowsNothing).unwrap();
        assert!(none.allows_nothing());
        let e = none.check(&f).unwrap_err();
        assert!(e.to_string().contains("allows nothing"), "{e}");
    }

    #[test]
    fn resolution_decides() {
        let d = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir(dir.join("ok")).unwrap();
        std::fs::write(dir.join("ok/disk0"), b"x").unwrap();
        std::fs::write(dir.join("secret"), b"x").unwrap();
        std::fs::create_dir(dir.join("secretdir")).unwrap();
        std::fs::write(dir.join("secretdir/disk9"), b"x").unwrap();
        let a = list(&dir, &["{d}/ok/*"]);
        // Plain match.
        assert_eq!(
            a.check(&dir.join("ok/disk0")).unwrap(),
            dir.join("ok/disk0")
        );
        // `..` out of the allowed directory.
        let e = a.check(&dir.join("ok/../secret")).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("resolves to {}", dir.join("secret").display())),
            "{e}"
        );
        // `..` that lands inside is fine (its resolution matches).
        assert!(a.check(&dir.join("ok/../ok/disk0")).is_ok());
        // A symlinked directory inside the pattern's directory.
        symlink(dir.join("secretdir"), dir.join("ok/sub")).unwrap();
        assert!(a.check(&dir.join("ok/sub/disk9")).is_err());
        let a2 = list(&dir, &["{d}/ok/*/*"]);
        assert!(a2.check(&dir.join("ok/sub/disk9")).is_err());
        // A symlink outside the patterns pointing at a disallowed file.
        symlink(dir.join("secret"), dir.join("link")).unwrap();
        assert!(a.check(&dir.join("link")).is_err());
        // A symlink the pattern names (udev by-id style) is followed.
        symlink(dir.join("secret"), dir.join("ok/wwn-1")).unwrap();
        assert_eq!(a.check(&dir.join("ok/wwn-1")).unwrap(), dir.join("secret"));
        // A directory is not a device.
        let a3 = list(&dir, &["{d}/*"]);
        assert!(a3
            .check(&dir.join("secretdir"))
            .unwrap_err()
            .to_string()
            .contains("neither a block device"));
        // Missing: ENOENT where a pattern names it, EPERM elsewhere.
        assert!(matches!(
            a.check(&dir.join("ok/nope")),
            Err(Denied::Unresolvable { .. })
        ));
        assert!(matches!(
            a.check(&dir.join("nope")),
            Err(Denied::NotAllowed { .. })
        ));
    }
}
