//! The facts `mdadm --examine` and `mdadm --examine-bitmap` report about a member, as
//! data ([`Examine`], [`ExamineBitmap`], serialisable for `--json`) and as text in
//! mdadm's layout.

use std::fmt::Write as _;

use serde::Serialize;

use super::bitmap::count_set;
use super::io::Member;
use super::superblock::{feature, time_secs, MAX_SECTOR};
use super::{fmt_uuid, SECTOR};

/// What `mdctl examine` reports about one member (the facts of `mdadm -E`).
#[derive(Debug, Clone, Serialize)]
pub struct Examine {
    /// The device examined.
    pub device: String,
    /// Superblock version, "1.2".
    pub version: String,
    /// `feature_map` as a hex string, e.g. "0x101".
    pub feature_map: String,
    /// Array UUID, mdadm style.
    pub array_uuid: String,
    /// "homehost:name".
    pub name: String,
    /// Cluster name (clustered bitmaps only).
    pub cluster_name: Option<String>,
    /// Creation time, seconds since the epoch.
    pub creation_time: u64,
    /// "raid1".
    pub raid_level: String,
    /// Number of active slots.
    pub raid_devices: u32,
    /// Sectors available for data on this member.
    pub avail_dev_size: u64,
    /// Array size in KiB.
    pub array_size_kib: u64,
    /// Used size per member in sectors.
    pub used_dev_size: u64,
    /// Data offset in sectors.
    pub data_offset: u64,
    /// Superblock offset in sectors.
    pub super_offset: u64,
    /// "clean" or "active".
    pub state: String,
    /// This member's UUID.
    pub device_uuid: String,
    /// Sectors from the superblock to the bitmap, when there is one.
    pub internal_bitmap_offset: Option<i32>,
    /// Last update, seconds since the epoch.
    pub update_time: u64,
    /// Stored checksum (verified on read).
    pub checksum: String,
    /// Event counter.
    pub events: u64,
    /// "Active device N", "spare", "faulty" or "journal".
    pub device_role: String,
    /// Index of this member in `dev_roles`.
    pub dev_number: u32,
    /// One letter per slot: 'A' active, '.' missing.
    pub array_state: String,
    /// Sector the resync has reached, when unfinished.
    pub resync_offset: Option<u64>,
    /// Sector the recovery of this member has reached, when it is recovering.
    pub recovery_offset: Option<u64>,
}

/// One bitmap slot as `mdctl examine-bitmap` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct SlotReport {
    /// Slot number (the node slot for clustered bitmaps).
    pub slot: u32,
    /// Events when written.
    pub events: u64,
    /// Events when bits were last cleared.
    pub events_cleared: u64,
    /// "OK" or "Out of date".
    pub state: String,
    /// Number of bits (chunks).
    pub bits: u64,
    /// Number of dirty bits.
    pub dirty: u64,
}

/// What `mdctl examine-bitmap` reports about one member (the facts of `mdadm -X`).
#[derive(Debug, Clone, Serialize)]
pub struct ExamineBitmap {
    /// The device examined.
    pub device: String,
    /// Bitmap version (4 internal, 5 clustered).
    pub version: u32,
    /// Array UUID from the bitmap.
    pub uuid: String,
    /// Bytes per bit.
    pub chunk_size: u32,
    /// Seconds before idle bits are cleared.
    pub daemon_sleep: u32,
    /// Write-behind limit (0 = normal).
    pub write_behind: u32,
    /// Sectors covered... reported in KiB like mdadm's "Sync Size".
    pub sync_size_kib: u64,
    /// Node slots (clustered only).
    pub cluster_nodes: Option<u32>,
    /// Cluster name (clustered only).
    pub cluster_name: Option<String>,
    /// Every slot.
    pub slots: Vec<SlotReport>,
}

impl Examine {
    /// Builds the report of a member read with [`super::io::read_member`].
    pub fn of(m: &Member) -> Examine {
        let sb = &m.sb;
        let cluster_name = m
            .bitmap
            .first()
            .filter(|s| s.sb.is_clustered() && s.sb.nodes > 0)
            .map(|s| s.sb.cluster_name.clone());
        let dirty = m
            .bitmap
            .iter()
            .any(|s| count_set(&s.bits, s.sb.chunks()) > 0);
        let clean = sb.resync_offset == MAX_SECTOR && !(sb.is_clustered() && dirty);
        Examine {
            device: m.path.display().to_string(),
            version: "1.2".into(),
            feature_map: format!("{:#x}", sb.feature_map),
            array_uuid: fmt_uuid(&sb.set_uuid),
            name: sb.name(),
            cluster_name,
            creation_time: time_secs(sb.ctime),
            raid_level: level_name(sb.level),
            raid_devices: sb.raid_disks,
            avail_dev_size: sb.data_size,
            array_size_kib: sb.size / 2,
            used_dev_size: sb.size,
            data_offset: sb.data_offset,
            super_offset: sb.super_offset,
            state: if clean {
                "clean".into()
            } else {
                "active".into()
            },
            device_uuid: fmt_uuid(&sb.device_uuid),
            internal_bitmap_offset: sb.has_bitmap().then_some(sb.bitmap_offset),
            update_time: time_secs(sb.utime),
            checksum: format!(
                "{:x}",
                super::superblock::checksum(&sb.encode(), sb.max_dev)
            ),
            events: sb.events,
            device_role: sb.role().to_string(),
            dev_number: sb.dev_number,
            array_state: sb.array_state(),
            resync_offset: (sb.resync_offset != MAX_SECTOR).then_some(sb.resync_offset),
            recovery_offset: (sb.feature_map & feature::RECOVERY_OFFSET != 0)
                .then_some(sb.recovery_offset),
        }
    }

    /// Renders in the layout of `mdadm --examine`.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{}:", self.device);
        let line = |s: &mut String, k: &str, v: &str| {
            let _ = writeln!(s, "{k:>15} : {v}");
        };
        line(&mut s, "Magic", "a92b4efc");
        line(&mut s, "Version", &self.version);
        line(&mut s, "Feature Map", &self.feature_map);
        line(&mut s, "Array UUID", &self.array_uuid);
        line(&mut s, "Name", &self.name);
        if let Some(c) = &self.cluster_name {
            line(&mut s, "Cluster Name", c);
        }
        line(&mut s, "Creation Time", &fmt_time(self.creation_time));
        line(&mut s, "Raid Level", &self.raid_level);
        line(&mut s, "Raid Devices", &self.raid_devices.to_string());
        s.push('\n');
        line(
            &mut s,
            "Avail Dev Size",
            &format!(
                "{} sectors{}",
                self.avail_dev_size,
                human(self.avail_dev_size * SECTOR)
            ),
        );
        line(
            &mut s,
            "Array Size",
            &format!(
                "{} KiB{}",
                self.array_size_kib,
                human(self.array_size_kib * 1024)
            ),
        );
        if self.used_dev_size != self.avail_dev_size {
            line(
                &mut s,
                "Used Dev Size",
                &format!(
                    "{} sectors{}",
                    self.used_dev_size,
                    human(self.used_dev_size * SECTOR)
                ),
            );
        }
        line(
            &mut s,
            "Data Offset",
            &format!("{} sectors", self.data_offset),
        );
        line(
            &mut s,
            "Super Offset",
            &format!("{} sectors", self.super_offset),
        );
        if let Some(r) = self.resync_offset {
            line(&mut s, "Resync Offset", &format!("{r} sectors"));
        }
        if let Some(r) = self.recovery_offset {
            line(&mut s, "Recovery Offset", &format!("{r} sectors"));
        }
        line(&mut s, "State", &self.state);
        line(&mut s, "Device UUID", &self.device_uuid);
        s.push('\n');
        if let Some(off) = self.internal_bitmap_offset {
            line(
                &mut s,
                "Internal Bitmap",
                &format!("{off} sectors from superblock"),
            );
        }
        line(&mut s, "Update Time", &fmt_time(self.update_time));
        line(&mut s, "Checksum", &format!("{} - correct", self.checksum));
        line(&mut s, "Events", &self.events.to_string());
        s.push('\n');
        let _ = writeln!(s, "{:>14} : {}", "Device Role", self.device_role);
        let _ = writeln!(
            s,
            "{:>14} : {} ('A' == active, '.' == missing, 'R' == replacing)",
            "Array State", self.array_state
        );
        s
    }
}

impl ExamineBitmap {
    /// Builds the report; `None` when the member has no bitmap.
    pub fn of(m: &Member) -> Option<ExamineBitmap> {
        let first = m.bitmap.first()?;
        let bm = &first.sb;
        let slots = m
            .bitmap
            .iter()
            .enumerate()
            .map(|(i, s)| SlotReport {
                slot: i as u32,
                events: s.sb.events,
                events_cleared: s.sb.events_cleared,
                state: if s.sb.state & super::bitmap::state::STALE != 0 {
                    "Out of date".into()
                } else {
                    "OK".into()
                },
                bits: s.sb.chunks(),
                dirty: count_set(&s.bits, s.sb.chunks()),
            })
            .collect();
        Some(ExamineBitmap {
            device: m.path.display().to_string(),
            version: bm.version,
            uuid: fmt_uuid(&bm.uuid),
            chunk_size: bm.chunksize,
            daemon_sleep: bm.daemon_sleep,
            write_behind: bm.write_behind,
            sync_size_kib: bm.sync_size / 2,
            cluster_nodes: bm.is_clustered().then_some(bm.nodes),
            cluster_name: bm.is_clustered().then(|| bm.cluster_name.clone()),
            slots,
        })
    }

    /// Renders in the layout of `mdadm --examine-bitmap`.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String, k: &str, v: &str| {
            let _ = writeln!(s, "{k:>16} : {v}");
        };
        line(&mut s, "Filename", &self.device);
        line(&mut s, "Magic", "6d746962");
        line(&mut s, "Version", &self.version.to_string());
        line(&mut s, "UUID", &self.uuid);
        let single = self.cluster_nodes.is_none();
        if single {
            if let Some(slot) = self.slots.first() {
                line(&mut s, "Events", &slot.events.to_string());
                line(&mut s, "Events Cleared", &slot.events_cleared.to_string());
                line(&mut s, "State", &slot.state);
            }
        }
        line(&mut s, "Chunksize", &fmt_chunk(self.chunk_size));
        line(
            &mut s,
            "Daemon",
            &format!("{}s flush period", self.daemon_sleep),
        );
        let mode = if self.write_behind == 0 {
            "Normal".to_string()
        } else {
            format!("Allow write behind, max {}", self.write_behind)
        };
        line(&mut s, "Write Mode", &mode);
        line(
            &mut s,
            "Sync Size",
            &format!("{}{}", self.sync_size_kib, human(self.sync_size_kib * 1024)),
        );
        if let (Some(n), Some(name)) = (self.cluster_nodes, &self.cluster_name) {
            line(&mut s, "Cluster nodes", &n.to_string());
            line(&mut s, "Cluster name", name);
        }
        for slot in &self.slots {
            if !single {
                line(&mut s, "Node Slot", &slot.slot.to_string());
                line(&mut s, "Events", &slot.events.to_string());
                line(&mut s, "Events Cleared", &slot.events_cleared.to_string());
                line(&mut s, "State", &slot.state);
            }
            let pct = if slot.bits == 0 {
                0.0
            } else {
                slot.dirty as f64 * 100.0 / slot.bits as f64
            };
            line(
                &mut s,
                "Bitmap",
                &format!(
                    "{} bits (chunks), {} dirty ({pct:.1}%)",
                    slot.bits, slot.dirty
                ),
            );
        }
        s
    }
}

/// "raid1" for level 1, and so on.
pub fn level_name(level: i32) -> String {
    match level {
        -1 => "linear".into(),
        n => format!("raid{n}"),
    }
}

/// " (15.00 MiB 15.73 MB)", mdadm's human-readable size suffix.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes < 1 << 20 {
        return String::new();
    }
    let (bin, dec) = if bytes < 1 << 30 {
        (
            format!("{:.2} MiB", b / (1u64 << 20) as f64),
            format!("{:.2} MB", b / 1e6),
        )
    } else if bytes < 1 << 40 {
        (
            format!("{:.2} GiB", b / (1u64 << 30) as f64),
            format!("{:.2} GB", b / 1e9),
        )
    } else {
        (
            format!("{:.2} TiB", b / (1u64 << 40) as f64),
            format!("{:.2} TB", b / 1e12),
        )
    };
    format!(" ({bin} {dec})")
}

/// "64 MB", "1 MB", "512 KB": mdadm's chunk size wording.
pub fn fmt_chunk(bytes: u32) -> String {
    if bytes >= 1 << 20 {
        format!("{} MB", bytes >> 20)
    } else if bytes >= 1 << 10 {
        format!("{} KB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

/// Year, month (1-12), day, hour, minute, second of `secs` since the epoch (UTC), and
/// the weekday (0 = Thursday, the epoch's).
fn civil(secs: u64) -> (i64, usize, i64, u64, u64, u64, usize) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m as usize,
        d,
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        (days % 7) as usize,
    )
}

/// Formats seconds since the epoch like `ctime(3)` in UTC: "Tue Nov 24 17:17:30 2026".
pub fn fmt_time(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, m, d, h, mi, s, wd) = civil(secs);
    format!(
        "{} {} {d:2} {h:02}:{mi:02}:{s:02} {y}",
        DAYS[wd],
        MONTHS[m - 1],
    )
}

/// Formats milliseconds since the epoch as RFC 3339 in UTC with milliseconds:
/// "2026-11-24T17:17:30.822Z". Times before the epoch print as the epoch.
pub fn fmt_rfc3339_ms(ms: i64) -> String {
    let ms = ms.max(0) as u64;
    let (y, m, d, h, mi, s, _) = civil(ms / 1000);
    format!(
        "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_like_ctime() {
        // The fixture's creation time: 0x6b05c6aa.
        assert_eq!(fmt_time(0x6b05_c6aa), "Tue Nov 24 17:17:30 2026");
        assert_eq!(fmt_time(0), "Thu Jan  1 00:00:00 1970");
    }

    #[test]
    fn time_rfc3339_with_millis() {
        assert_eq!(
            fmt_rfc3339_ms(0x6b05_c6aa * 1000 + 822),
            "2026-11-24T17:17:30.822Z"
        );
        assert_eq!(fmt_rfc3339_ms(7), "1970-01-01T00:00:00.007Z");
        assert_eq!(fmt_rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn sizes() {
        assert_eq!(human(15360 * 1024), " (15.00 MiB 15.73 MB)");
        assert_eq!(fmt_chunk(64 << 20), "64 MB");
        assert_eq!(fmt_chunk(64 << 10), "64 KB");
    }
}
