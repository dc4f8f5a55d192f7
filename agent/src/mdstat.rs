//! `/proc/mdstat`, byte for byte: the text Linux md prints for a node's arrays, rendered
//! from plain status data so that existing parsers and scripts read `mdctl mdstat`.
//!
//! The shapes follow the kernel's `md_seq_show`, `status_resync` and
//! `md_bitmap_status` (samples: `docs/LIFECYCLE.md` §3), plus the
//! md-cluster variants `resync=REMOTE` / `recovery=REMOTE`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Counters per in-memory bitmap page: a 4 KiB page of 16-bit counters.
pub const COUNTERS_PER_PAGE: u64 = 2048;

/// How the array is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Read-write.
    Active,
    /// Read-only.
    ReadOnly,
    /// Read-only until the first write (after an interrupted resync).
    AutoReadOnly,
}

/// One member as `/proc/mdstat` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStat {
    /// Device name without `/dev/` (e.g. "sda" or a file name).
    pub name: String,
    /// Its number in the superblock (`desc_nr`, the `[n]` after the name).
    pub desc_nr: u32,
    /// Active slot, if it has one.
    pub slot: Option<u32>,
    /// In sync in its slot (counts as 'U').
    pub in_sync: bool,
    /// Failed: printed with `(F)`.
    pub faulty: bool,
}

/// What kind of background work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncKind {
    /// Making mirrors identical after an unclean stop or at creation.
    Resync,
    /// Rebuilding a new or re-added member.
    Recovery,
    /// Reading and comparing.
    Check,
}

impl SyncKind {
    fn word(self) -> &'static str {
        match self {
            SyncKind::Resync => "resync",
            SyncKind::Recovery => "recovery",
            SyncKind::Check => "check",
        }
    }
}

/// The background-work line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SyncStat {
    /// Running here: progress in KiB and speed.
    Running {
        /// What runs.
        kind: SyncKind,
        /// KiB done.
        done_kib: u64,
        /// KiB in all.
        total_kib: u64,
        /// Current speed, KiB/s.
        speed_kib: u64,
    },
    /// Needed but waiting (another node holds the resync lock, or read-only).
    Pending,
    /// Another node is doing it.
    Remote(SyncKind),
}

/// The bitmap line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapStat {
    /// Number of chunks (bits).
    pub chunks: u64,
    /// Chunk size in bytes.
    pub chunk_bytes: u64,
}

/// One array as `/proc/mdstat` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArrayStat {
    /// "md0".
    pub name: String,
    /// How it runs.
    pub run_state: RunState,
    /// RAID level (1).
    pub level: i32,
    /// Members, any order (printed newest first, as the kernel does).
    pub members: Vec<MemberStat>,
    /// Array size in KiB ("blocks").
    pub blocks_kib: u64,
    /// Metadata version, "1.2".
    pub metadata: String,
    /// Active slots.
    pub raid_disks: u32,
    /// Background work, if any.
    pub sync: Option<SyncStat>,
    /// Bitmap, if any.
    pub bitmap: Option<BitmapStat>,
}

/// Renders a node's `/proc/mdstat`.
pub fn render(arrays: &[ArrayStat]) -> String {
    let mut s = String::from("Personalities : [raid1] \n");
    for a in arrays {
        render_array(&mut s, a);
    }
    s.push_str("unused devices: <none>\n");
    s
}

fn render_array(s: &mut String, a: &ArrayStat) {
    let ro = match a.run_state {
        RunState::Active => "",
        RunState::ReadOnly => " (read-only)",
        RunState::AutoReadOnly => " (auto-read-only)",
    };
    let _ = write!(s, "{} : active{ro} raid{}", a.name, a.level);
    let mut members: Vec<&MemberStat> = a.members.iter().collect();
    members.sort_by_key(|m| std::cmp::Reverse(m.desc_nr));
    for m in members {
        let _ = write!(s, " {}[{}]", m.name, m.desc_nr);
        if m.faulty {
            s.push_str("(F)");
        } else if m.slot.is_none() {
            s.push_str("(S)");
        }
    }
    let working = (0..a.raid_disks)
        .map(|slot| {
            a.members
                .iter()
                .any(|m| m.slot == Some(slot) && m.in_sync && !m.faulty)
        })
        .collect::<Vec<bool>>();
    let up = working.iter().filter(|&&w| w).count();
    let flags: String = working.iter().map(|&w| if w { 'U' } else { '_' }).collect();
    let _ = write!(
        s,
        "\n      {} blocks super {} [{}/{}] [{}]",
        a.blocks_kib, a.metadata, a.raid_disks, up, flags
    );
    s.push_str("\n      ");
    match &a.sync {
        None => {}
        Some(SyncStat::Pending) => s.push_str("\tresync=PENDING\n      "),
        Some(SyncStat::Remote(kind)) => {
            let _ = write!(s, "\t{}=REMOTE\n      ", kind.word());
        }
        Some(SyncStat::Running {
            kind,
            done_kib,
            total_kib,
            speed_kib,
        }) => {
            render_progress(s, *kind, *done_kib, *total_kib, *speed_kib);
            s.push_str("\n      ");
        }
    }
    if let Some(b) = a.bitmap {
        let pages = b.chunks.div_ceil(COUNTERS_PER_PAGE);
        let _ = write!(
            s,
            "bitmap: {pages}/{pages} pages [{}KB], {}KB chunk",
            pages * 4,
            b.chunk_bytes / 1024
        );
        // md_bitmap_status ends its line; md_seq_show then ends the array's block.
        s.push('\n');
    }
    s.push('\n');
}

fn render_progress(s: &mut String, kind: SyncKind, done: u64, total: u64, speed: u64) {
    // The kernel's arithmetic (`status_resync`), in sectors, so the figures match
    // /proc/mdstat exactly: per mille scaled down by 2^10, rounded down.
    let max_sectors = total.max(1) * 2;
    let resync = done.min(total) * 2;
    let res = ((resync >> 10) * 1000 / ((max_sectors >> 10) + 1)) as usize;
    let x = (res / 50).min(20);
    s.push('[');
    s.push_str(&"=".repeat(x));
    s.push('>');
    s.push_str(&".".repeat(20 - x));
    s.push_str("] ");
    let _ = write!(
        s,
        " {} ={:3}.{}% ({}/{})",
        kind.word(),
        res / 10,
        res % 10,
        resync / 2,
        max_sectors / 2
    );
    // Remaining time from sectors per second over the last mark (taken as 1 s).
    let db = speed * 2;
    let rt = ((max_sectors - resync) / (db / 32 + 1)) >> 5;
    let _ = write!(
        s,
        " finish={}.{}min speed={speed}K/sec",
        rt / 60,
        (rt % 60) / 6
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(
        name: &str,
        desc_nr: u32,
        slot: Option<u32>,
        in_sync: bool,
        faulty: bool,
    ) -> MemberStat {
        MemberStat {
            name: name.into(),
            desc_nr,
            slot,
            in_sync,
            faulty,
        }
    }

    fn array(members: Vec<MemberStat>, sync: Option<SyncStat>) -> ArrayStat {
        ArrayStat {
            name: "md0".into(),
            run_state: RunState::Active,
            level: 1,
            members,
            blocks_kib: 64512,
            metadata: "1.2".into(),
            raid_disks: 2,
            sync,
            bitmap: Some(BitmapStat {
                chunks: 63,
                chunk_bytes: 1 << 20,
            }),
        }
    }

    // Byte-for-byte samples of Linux 6.1 md/raid1 (provenance: docs/LIFECYCLE.md §3).
    #[test]
    fn resync_in_progress() {
        let a = array(
            vec![
                member("vda", 0, Some(0), true, false),
                member("vdb", 1, Some(1), true, false),
            ],
            Some(SyncStat::Running {
                kind: SyncKind::Resync,
                done_kib: 4224,
                total_kib: 64512,
                speed_kib: 2112,
            }),
        );
        assert_eq!(
            render(&[a]),
            "Personalities : [raid1] \n\
             md0 : active raid1 vdb[1] vda[0]\n      \
             64512 blocks super 1.2 [2/2] [UU]\n      \
             [=>...................]  resync =  6.2% (4224/64512) finish=0.4min speed=2112K/sec\n      \
             bitmap: 1/1 pages [4KB], 1024KB chunk\n\
             \n\
             unused devices: <none>\n"
        );
    }

    #[test]
    fn failed_member_spare_recovering() {
        let a = array(
            vec![
                member("vda", 0, Some(0), true, false),
                member("vdb", 1, Some(1), false, true),
                member("vdc", 2, Some(1), false, false),
            ],
            Some(SyncStat::Running {
                kind: SyncKind::Recovery,
                done_kib: 3584,
                total_kib: 64512,
                speed_kib: 3584,
            }),
        );
        assert_eq!(
            render(&[a]),
            "Personalities : [raid1] \n\
             md0 : active raid1 vdc[2] vdb[1](F) vda[0]\n      \
             64512 blocks super 1.2 [2/1] [U_]\n      \
             [=>...................]  recovery =  5.5% (3584/64512) finish=0.2min speed=3584K/sec\n      \
             bitmap: 1/1 pages [4KB], 1024KB chunk\n\
             \n\
             unused devices: <none>\n"
        );
    }

    #[test]
    fn degraded_and_pending() {
        let a = array(vec![member("vda", 0, Some(0), true, false)], None);
        assert_eq!(
            render(&[a]),
            "Personalities : [raid1] \n\
             md0 : active raid1 vda[0]\n      \
             64512 blocks super 1.2 [2/1] [U_]\n      \
             bitmap: 1/1 pages [4KB], 1024KB chunk\n\
             \n\
             unused devices: <none>\n"
        );
        let mut a = array(
            vec![
                member("vda", 0, Some(0), true, false),
                member("vdb", 1, Some(1), true, false),
            ],
            Some(SyncStat::Pending),
        );
        a.run_state = RunState::AutoReadOnly;
        let text = render(&[a]);
        assert!(text.contains("md0 : active (auto-read-only) raid1 vdb[1] vda[0]\n"));
        assert!(text.contains("[2/2] [UU]\n      \tresync=PENDING\n      bitmap: 1/1 pages"));
    }

    #[test]
    fn remote_spare_and_no_bitmap() {
        let mut a = array(
            vec![
                member("sda", 0, Some(0), true, false),
                member("sdb", 1, Some(1), true, false),
                member("sdc", 2, None, false, false),
            ],
            Some(SyncStat::Remote(SyncKind::Recovery)),
        );
        a.bitmap = None;
        let text = render(&[a]);
        assert_eq!(
            text,
            "Personalities : [raid1] \n\
             md0 : active raid1 sdc[2](S) sdb[1] sda[0]\n      \
             64512 blocks super 1.2 [2/2] [UU]\n      \
             \trecovery=REMOTE\n      \
             \n\
             unused devices: <none>\n"
        );
        assert_eq!(
            render(&[]),
            "Personalities : [raid1] \nunused devices: <none>\n"
        );
    }

    #[test]
    fn progress_bar_edges() {
        let mut s = String::new();
        render_progress(&mut s, SyncKind::Resync, 64512, 64512, 1000);
        assert!(
            s.starts_with("[===================>.]  resync = 99.2% (64512/64512) finish=0.0min"),
            "{s}"
        );
        let mut s = String::new();
        render_progress(&mut s, SyncKind::Resync, 0, 64512, 0);
        assert!(
            s.starts_with(
                "[>....................]  resync =  0.0% (0/64512) finish=67.2min speed=0K/sec"
            ),
            "{s}"
        );
    }
}
