//! Test support: a loop device over a file with direct I/O and a chosen logical block
//! size, detached on drop (needs root and `losetup`).

use std::path::{Path, PathBuf};

/// A loop device over a file, with direct I/O to the file and `sector` as its logical
/// block size; detached on drop.
pub(crate) struct Loop(pub(crate) PathBuf);

impl Loop {
    pub(crate) fn attach(file: &Path, sector: u32) -> Loop {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on", "--sector-size"])
            .arg(sector.to_string())
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}
