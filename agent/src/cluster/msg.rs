//! The md-cluster messages and lock value blocks, on the wire.
//!
//! [`ClusterMsg`] is Linux md-cluster's `struct cluster_msg` (48 bytes, little-endian:
//! type, sender slot, low, high, device UUID, raid slot), published on the array's
//! message channel of the lock service. [`ResyncInfo`] is the `resync_info` a node keeps
//! in the value block of its `slot/N` lock: the window it is resyncing. Facts:
//! `docs/MD-CLUSTER.md` §3–4.

/// Size of an encoded [`ClusterMsg`] (44 bytes used, 4 of padding, as the kernel's).
pub const CLUSTER_MSG_BYTES: usize = 48;
/// Size of an encoded [`ResyncInfo`].
pub const RESYNC_INFO_BYTES: usize = 24;

/// The message types, numbered as in md-cluster (new ones are appended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MsgType {
    /// A superblock changed: re-read it (`raid_slot` = the member to read).
    MetadataUpdated = 0,
    /// The sender resyncs `[low, high)`; (0, 0) = finished.
    Resyncing = 1,
    /// A new disk (`uuid`, `raid_slot`): confirm that you see it.
    Newdisk = 2,
    /// Remove member `raid_slot`.
    Remove = 3,
    /// Member `raid_slot` is re-added: clear its faulty state.
    ReAdd = 4,
    /// The sender left with dirty bits: take over its slot and resync.
    BitmapNeedsSync = 5,
    /// The array size changed.
    ChangeCapacity = 6,
    /// The bitmap is resized to `high` sectors.
    BitmapResize = 7,
    /// A resync or recovery starts somewhere: stop waiting for it.
    ResyncingStart = 8,
}

impl MsgType {
    /// Decodes a message type number.
    pub fn from_raw(v: u32) -> Option<MsgType> {
        Some(match v {
            0 => MsgType::MetadataUpdated,
            1 => MsgType::Resyncing,
            2 => MsgType::Newdisk,
            3 => MsgType::Remove,
            4 => MsgType::ReAdd,
            5 => MsgType::BitmapNeedsSync,
            6 => MsgType::ChangeCapacity,
            7 => MsgType::BitmapResize,
            8 => MsgType::ResyncingStart,
            _ => return None,
        })
    }
}

/// Why a received message could not be decoded; sent back as a negative ack reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    /// Not 48 bytes.
    #[error("cluster message is {got} bytes, expected {CLUSTER_MSG_BYTES}")]
    Length {
        /// Bytes received.
        got: usize,
    },
    /// A type this node does not know (a newer sender): refused, never ignored.
    #[error("unknown cluster message type {0}; is a newer mdagent in the cluster?")]
    UnknownType(u32),
}

/// One md-cluster message (`struct cluster_msg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ClusterMsg {
    /// What it says.
    pub kind: MsgType,
    /// The sender's bitmap slot (0-based).
    pub slot: u32,
    /// Start sector (RESYNCING).
    pub low: u64,
    /// End sector or new size (RESYNCING, BITMAP_RESIZE).
    pub high: u64,
    /// Device UUID of a new disk (NEWDISK).
    pub uuid: [u8; 16],
    /// Member number (`dev_number`) concerned.
    pub raid_slot: u32,
}

impl ClusterMsg {
    /// A message of `kind` from `slot` with every other field zero.
    pub fn new(kind: MsgType, slot: u32) -> ClusterMsg {
        ClusterMsg {
            kind,
            slot,
            low: 0,
            high: 0,
            uuid: [0; 16],
            raid_slot: 0,
        }
    }

    /// Encodes as the kernel lays out `struct cluster_msg`.
    pub fn encode(&self) -> [u8; CLUSTER_MSG_BYTES] {
        let mut b = [0u8; CLUSTER_MSG_BYTES];
        b[0..4].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[4..8].copy_from_slice(&self.slot.to_le_bytes());
        b[8..16].copy_from_slice(&self.low.to_le_bytes());
        b[16..24].copy_from_slice(&self.high.to_le_bytes());
        b[24..40].copy_from_slice(&self.uuid);
        b[40..44].copy_from_slice(&self.raid_slot.to_le_bytes());
        b
    }

    /// Decodes; an unknown type is an error (answer it with a negative ack).
    pub fn decode(b: &[u8]) -> Result<ClusterMsg, MsgError> {
        if b.len() != CLUSTER_MSG_BYTES {
            return Err(MsgError::Length { got: b.len() });
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let raw = u32_at(0);
        let kind = MsgType::from_raw(raw).ok_or(MsgError::UnknownType(raw))?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[24..40]);
        Ok(ClusterMsg {
            kind,
            slot: u32_at(4),
            low: u64_at(8),
            high: u64_at(16),
            uuid,
            raid_slot: u32_at(40),
        })
    }
}

/// What a node publishes in its slot lock's value block: its resync window (`hi == 0`
/// means no resync in progress) and its persistent-reservation key, so that a survivor
/// that takes the slot over can preempt exactly that key ([`crate::reserve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ResyncInfo {
    /// First sector of the window.
    pub lo: u64,
    /// End of the window (exclusive); 0 = none.
    pub hi: u64,
    /// The holder's reservation key ([`crate::reserve::PrKey`]); 0 = not published.
    pub pr_key: u64,
}

impl ResyncInfo {
    /// Encodes as three little-endian u64: lo, hi, pr_key.
    pub fn encode(&self) -> [u8; RESYNC_INFO_BYTES] {
        let mut b = [0u8; RESYNC_INFO_BYTES];
        b[..8].copy_from_slice(&self.lo.to_le_bytes());
        b[8..16].copy_from_slice(&self.hi.to_le_bytes());
        b[16..].copy_from_slice(&self.pr_key.to_le_bytes());
        b
    }

    /// Decodes; an empty or short value block (never written) means no resync, and
    /// one of 16 bytes (written before the key was published) no key.
    pub fn decode(b: &[u8]) -> ResyncInfo {
        let word = |i: usize| {
            b.get(i * 8..i * 8 + 8).map_or(0, |w| {
                let mut a = [0u8; 8];
                a.copy_from_slice(w);
                u64::from_le_bytes(a)
            })
        };
        if b.len() < 16 {
            return ResyncInfo::default();
        }
        ResyncInfo {
            lo: word(0),
            hi: word(1),
            pr_key: word(2),
        }
    }

    /// True when a resync window is published.
    pub fn active(&self) -> bool {
        self.hi > 0
    }

    /// True when `[lo, hi)` overlaps the window.
    pub fn overlaps(&self, lo: u64, hi: u64) -> bool {
        self.active() && lo < self.hi && self.lo < hi
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_the_kernels() {
        let m = ClusterMsg {
            kind: MsgType::Newdisk,
            slot: 3,
            low: 0x1122,
            high: 0x3344,
            uuid: [0xab; 16],
            raid_slot: 7,
        };
        let b = m.encode();
        assert_eq!(&b[0..4], &[2, 0, 0, 0]);
        assert_eq!(&b[4..8], &[3, 0, 0, 0]);
        assert_eq!(&b[8..10], &[0x22, 0x11]);
        assert_eq!(&b[16..18], &[0x44, 0x33]);
        assert_eq!(&b[24..40], &[0xab; 16]);
        assert_eq!(&b[40..44], &[7, 0, 0, 0]);
        assert_eq!(&b[44..], &[0; 4], "padding");
        assert_eq!(ClusterMsg::decode(&b), Ok(m));
    }

    #[test]
    fn unknown_types_and_lengths_are_refused() {
        let mut b = ClusterMsg::new(MsgType::ResyncingStart, 0).encode();
        assert_eq!(
            ClusterMsg::decode(&b).unwrap().kind,
            MsgType::ResyncingStart
        );
        b[0] = 9;
        assert_eq!(ClusterMsg::decode(&b), Err(MsgError::UnknownType(9)));
        assert_eq!(
            ClusterMsg::decode(&b[..44]),
            Err(MsgError::Length { got: 44 })
        );
        for v in 0..9 {
            assert_eq!(MsgType::from_raw(v).map(|t| t as u32), Some(v));
        }
    }

    #[test]
    fn resync_window() {
        let w = ResyncInfo {
            lo: 100,
            hi: 200,
            pr_key: 0x0200_0000_0000_0007,
        };
        assert_eq!(ResyncInfo::decode(&w.encode()), w);
        // A value written without the key (16 bytes): the window, no key.
        let old = ResyncInfo::decode(&w.encode()[..16]);
        assert_eq!((old.lo, old.hi, old.pr_key), (100, 200, 0));
        assert!(w.overlaps(150, 160) && w.overlaps(0, 101) && w.overlaps(199, 300));
        assert!(!w.overlaps(0, 100) && !w.overlaps(200, 300));
        let none = ResyncInfo::decode(&[]);
        assert!(!none.active() && !none.overlaps(0, u64::MAX));
    }
}
