//! The receiver side of md-cluster as a sans-IO state machine: what a received message
//! means for this node's copy of one clustered array.
//!
//! [`Engine`] is plain data, one per clustered array on this node (held by the array's
//! `service::ClusterArray`). It never reads a disk, calls the lock service or looks at
//! a clock: [`Engine::handle`] takes an [`Event`] (a message with this node's view of
//! the array, or the result of a command it asked for) and answers the [`Command`]s to
//! carry out, in order. The runtime (`service::message::apply`) executes them against
//! the lock client and the RAID engine; a command that asks a question
//! ([`Command::ReadNewestSuperblock`], [`Command::FindNewDisk`],
//! [`Command::RemoveMember`], [`Command::AttachDevice`]) is the last of its list and its
//! answer comes back as the next event. Every list ends in [`Command::Ack`] or
//! [`Command::Nack`] once the message is fully applied, and a command the runtime
//! cannot carry out is answered with [`Nack::Failed`] by the runtime itself.
//!
//! What each message does here (md-cluster's `process_recvd_msg`):
//! - METADATA_UPDATED: re-read the superblocks into this node's copies, read the newest
//!   one, grow the roles to its `raid_disks`, fail every member faulty there, follow its
//!   size (the bitmap slot resized, a smaller capacity at once); when it carries a
//!   device UUID (an add) and a NEWDISK was confirmed before, attach that device (read,
//!   not written); attached as recovering, its recovery belongs to the sender while the
//!   sender lives ([`Engine::remote_recovery`]);
//! - RESYNCING(lo, hi): install the sender's window (sectors → bytes, checked), (0, 0)
//!   clears it;
//! - NEWDISK: find this node's path of the device by its device UUID; ack when it is
//!   not an active member here, and remember it for the METADATA_UPDATED that follows;
//! - RE_ADD(dev): ack when that member is not active here;
//! - REMOVE(dev): remove the member here too (refused when it is active here);
//! - BITMAP_NEEDS_SYNC: recover the sender's slot once it released it;
//! - CHANGE_CAPACITY: read the newest superblock and show its grown size;
//! - RESYNCING_START: nothing to do;
//! - BITMAP_RESIZE and undecodable messages: a negative ack naming the type.

use std::path::PathBuf;

use super::msg::{ClusterMsg, MsgError, MsgType};
use super::nack::Nack;
use crate::raid::{MemberState, RaidStatus};

/// One member as this node's engine has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// Its path here.
    pub path: PathBuf,
    /// Its `dev_number`.
    pub dev_number: u32,
    /// Its state here.
    pub state: MemberState,
    /// Removed (a tombstone).
    pub removed: bool,
}

impl MemberView {
    /// Faulty or removed: no I/O goes to it, its superblock is not current.
    pub fn is_out(&self) -> bool {
        self.removed || self.state == MemberState::Faulty
    }
}

/// This node's view of the array when an event arrives (engine index order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayView {
    /// The number of roles here.
    pub raid_disks: u32,
    /// The members, indexed as the engine indexes them.
    pub members: Vec<MemberView>,
}

impl ArrayView {
    /// The view of a running engine's status.
    pub fn of(status: &RaidStatus) -> ArrayView {
        ArrayView {
            raid_disks: status.raid_disks,
            members: status
                .members
                .iter()
                .map(|m| MemberView {
                    path: PathBuf::from(&m.path),
                    dev_number: m.dev_number,
                    state: m.state,
                    removed: m.removed,
                })
                .collect(),
        }
    }

    /// Engine indexes of the members that are out (faulty or removed).
    pub fn out_indexes(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].is_out())
            .collect()
    }

    /// Paths of the members that are out.
    pub fn out_paths(&self) -> Vec<PathBuf> {
        self.members
            .iter()
            .filter(|m| m.is_out())
            .map(|m| m.path.clone())
            .collect()
    }

    /// The member with `dev_number` that is not removed.
    pub fn by_dev_number(&self, dev_number: u32) -> Option<&MemberView> {
        self.members
            .iter()
            .find(|m| m.dev_number == dev_number && !m.removed)
    }

    /// Whether `path` is an active member (neither removed nor faulty).
    pub fn is_active_member(&self, path: &std::path::Path) -> bool {
        self.members.iter().any(|m| !m.is_out() && m.path == path)
    }
}

/// What the newest superblock of the members says (the one with the most events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewestSuperblock {
    /// Its `raid_disks`.
    pub raid_disks: u32,
    /// The array size in sectors.
    pub size: u64,
    /// The device numbers whose role is faulty there.
    pub faulty: Vec<u32>,
}

/// What happened, as the engine needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A decoded message from node `from`; `view` is `None` when the array is joined
    /// but its engine is not running here.
    Message {
        /// The message.
        msg: ClusterMsg,
        /// The publishing node.
        from: String,
        /// This node's view of the array.
        view: Option<ArrayView>,
    },
    /// A message that could not be decoded.
    Undecodable(MsgError),
    /// The answer to [`Command::ReadNewestSuperblock`].
    Superblock {
        /// What it says.
        sb: NewestSuperblock,
        /// This node's view now.
        view: ArrayView,
    },
    /// The answer to [`Command::FindNewDisk`]: this node's path of the device (found
    /// and opened).
    NewDiskFound {
        /// The path here.
        path: PathBuf,
        /// This node's view now (`None`: not running).
        view: Option<ArrayView>,
    },
    /// The answer to [`Command::RemoveMember`]: `false` when the engine refused (the
    /// member is active here).
    Removed(bool),
    /// The answer to [`Command::AttachDevice`]: the device is attached, recovering
    /// (a role to recover) or not (a spare).
    Attached {
        /// It was attached as recovering.
        recovering: bool,
    },
}

/// What the runtime carries out, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Re-read the members' superblocks into this node's copies (another node wrote
    /// them), skipping the engine indexes in `skip` (faulty or removed here).
    ReloadSuperblocks {
        /// Engine indexes not to read.
        skip: Vec<usize>,
    },
    /// Read the newest superblock of the members but those in `skip`, each read
    /// bounded; answer with [`Event::Superblock`].
    ReadNewestSuperblock {
        /// Paths not to read (faulty or removed here).
        skip: Vec<PathBuf>,
    },
    /// Grow the number of roles to this (no write: following the sender).
    GrowRaidDisks(u32),
    /// Fail this member here (no write: following the sender).
    FailMember {
        /// The member's path here.
        path: PathBuf,
    },
    /// Follow the array size (sectors): resize this node's bitmap slot, shrink the
    /// capacity at once, grow it only when `expose`.
    FollowSize {
        /// The size in the newest superblock, sectors.
        sectors: u64,
        /// Show a grown capacity now (CHANGE_CAPACITY).
        expose: bool,
    },
    /// Find this node's path of the device with this device UUID among the devices it
    /// may use (the sender's path, in the token lock's value, first; all zero: the
    /// sender's path only) and open it; answer with [`Event::NewDiskFound`].
    FindNewDisk {
        /// The device UUID NEWDISK carries.
        device_uuid: [u8; 16],
    },
    /// Attach this device (its superblock read, not written); answer with
    /// [`Event::Attached`].
    AttachDevice {
        /// The device's path here.
        path: PathBuf,
    },
    /// Remove this member here; answer with [`Event::Removed`].
    RemoveMember {
        /// Its path here.
        path: PathBuf,
    },
    /// Install the remote resync window (array bytes); `None` clears it.
    SetRemoteWindow(Option<(u64, u64)>),
    /// Recover bitmap slot `slot` once `from` released it (BITMAP_NEEDS_SYNC): runs on
    /// its own, after the ack.
    RecoverSlotWhenReleased {
        /// The slot.
        slot: u32,
        /// The node that left it dirty.
        from: String,
    },
    /// Acknowledge the message.
    Ack,
    /// Refuse it.
    Nack(Nack),
}

/// The message being applied and what the engine learned of it so far.
#[derive(Debug, Clone)]
struct Round {
    msg: ClusterMsg,
    /// REMOVE: the member asked for.
    member: Option<MemberView>,
}

/// The receiver state of one clustered array on this node.
#[derive(Debug, Clone)]
pub struct Engine {
    node: String,
    array: String,
    round: Option<Round>,
    /// A device NEWDISK announced and this node confirmed, attached at the
    /// METADATA_UPDATED that follows.
    pending_disk: Option<PathBuf>,
    /// The bitmap slot of the node that added a member attached here as recovering:
    /// that node recovers it while it lives.
    remote_recovery: Option<u32>,
}

impl Engine {
    /// The engine of array `array` on node `node`, with nothing pending.
    pub fn new(node: &str, array: &str) -> Engine {
        Engine {
            node: node.to_owned(),
            array: array.to_owned(),
            round: None,
            pending_disk: None,
            remote_recovery: None,
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The array's name here.
    pub fn array(&self) -> &str {
        &self.array
    }

    /// The device confirmed by NEWDISK and not attached yet.
    pub fn pending_disk(&self) -> Option<&PathBuf> {
        self.pending_disk.as_ref()
    }

    /// The slot of the node recovering a member this node attached as recovering.
    pub fn remote_recovery(&self) -> Option<u32> {
        self.remote_recovery
    }

    /// That node's recovery ended (the member is in sync) or this node takes it over.
    pub fn clear_remote_recovery(&mut self) {
        self.remote_recovery = None;
    }

    fn not_active(&self) -> Command {
        Command::Nack(Nack::NotActive {
            node: self.node.clone(),
            array: self.array.clone(),
        })
    }

    /// A command failed in the runtime: the round ends (the runtime nacks with the
    /// failure).
    pub fn abort(&mut self) {
        self.round = None;
    }

    /// Takes one event, answers the commands to carry out (see the module doc).
    pub fn handle(&mut self, event: Event) -> Vec<Command> {
        match event {
            Event::Message { msg, from, view } => self.message(msg, from, view),
            Event::Undecodable(error) => {
                self.round = None;
                vec![Command::Nack(Nack::Undecodable {
                    node: self.node.clone(),
                    error,
                })]
            }
            Event::Superblock { sb, view } => self.superblock(sb, &view),
            Event::NewDiskFound { path, view } => {
                self.round = None;
                if view.is_some_and(|v| v.is_active_member(&path)) {
                    return vec![Command::Nack(Nack::AlreadyMember {
                        node: self.node.clone(),
                        array: self.array.clone(),
                        path,
                    })];
                }
                self.pending_disk = Some(path);
                vec![Command::Ack]
            }
            Event::Removed(done) => {
                let round = self.round.take();
                match (done, round.and_then(|r| r.member)) {
                    (false, Some(m)) => vec![Command::Nack(Nack::RemoveActive {
                        node: self.node.clone(),
                        array: self.array.clone(),
                        path: m.path,
                        dev_number: m.dev_number,
                        state: m.state,
                    })],
                    _ => vec![Command::Ack],
                }
            }
            Event::Attached { recovering } => {
                let round = self.round.take();
                if recovering {
                    // The sender recovers it; this node waits unless the sender dies.
                    self.remote_recovery = round.map(|r| r.msg.slot);
                }
                vec![Command::Ack]
            }
        }
    }

    fn message(&mut self, msg: ClusterMsg, from: String, view: Option<ArrayView>) -> Vec<Command> {
        self.round = None;
        let mut out = Vec::new();
        if msg.kind == MsgType::BitmapNeedsSync {
            // The slot is recovered whether or not the engine runs here now.
            out.push(Command::RecoverSlotWhenReleased {
                slot: msg.slot,
                from,
            });
        }
        if msg.kind == MsgType::Newdisk {
            self.round = Some(Round { msg, member: None });
            return vec![Command::FindNewDisk {
                device_uuid: msg.uuid,
            }];
        }
        let Some(view) = view else {
            out.push(self.not_active());
            return out;
        };
        match msg.kind {
            MsgType::MetadataUpdated => {
                self.round = Some(Round { msg, member: None });
                out.push(Command::ReloadSuperblocks {
                    skip: view.out_indexes(),
                });
                out.push(Command::ReadNewestSuperblock {
                    skip: view.out_paths(),
                });
            }
            MsgType::ChangeCapacity => {
                self.round = Some(Round { msg, member: None });
                out.push(Command::ReadNewestSuperblock {
                    skip: view.out_paths(),
                });
            }
            MsgType::Resyncing => {
                if msg.high == 0 {
                    out.push(Command::SetRemoteWindow(None));
                    out.push(Command::Ack);
                } else {
                    // Sectors from another node: checked before they become bytes.
                    match (msg.low.checked_mul(512), msg.high.checked_mul(512)) {
                        (Some(lo), Some(hi)) => {
                            out.push(Command::SetRemoteWindow(Some((lo, hi))));
                            out.push(Command::Ack);
                        }
                        _ => out.push(Command::Nack(Nack::WindowOverflow {
                            node: self.node.clone(),
                            array: self.array.clone(),
                            low: msg.low,
                            high: msg.high,
                        })),
                    }
                }
            }
            MsgType::BitmapNeedsSync | MsgType::ResyncingStart => out.push(Command::Ack),
            MsgType::Remove => match view.by_dev_number(msg.raid_slot) {
                // Already gone: nothing to do.
                None => out.push(Command::Ack),
                Some(m) => {
                    out.push(Command::RemoveMember {
                        path: m.path.clone(),
                    });
                    self.round = Some(Round {
                        msg,
                        member: Some(m.clone()),
                    });
                }
            },
            MsgType::ReAdd => match view.by_dev_number(msg.raid_slot) {
                Some(m) if m.state != MemberState::Faulty => {
                    out.push(Command::Nack(Nack::ReAddActive {
                        node: self.node.clone(),
                        array: self.array.clone(),
                        path: m.path.clone(),
                        dev_number: m.dev_number,
                        state: m.state,
                    }))
                }
                _ => out.push(Command::Ack),
            },
            MsgType::BitmapResize | MsgType::Newdisk => {
                out.push(Command::Nack(Nack::Unsupported {
                    node: self.node.clone(),
                    array: self.array.clone(),
                    kind: msg.kind,
                }))
            }
        }
        out
    }

    fn superblock(&mut self, sb: NewestSuperblock, view: &ArrayView) -> Vec<Command> {
        let Some(round) = self.round.clone() else {
            // Nothing asked for it (a runtime bug): refuse rather than guess.
            return vec![Command::Nack(Nack::Failed {
                node: self.node.clone(),
                array: self.array.clone(),
                what: "applying a superblock read".into(),
                error: "no message is being applied".into(),
            })];
        };
        if round.msg.kind == MsgType::ChangeCapacity {
            self.round = None;
            return vec![
                Command::FollowSize {
                    sectors: sb.size,
                    expose: true,
                },
                Command::Ack,
            ];
        }
        let mut out = Vec::new();
        if sb.raid_disks > view.raid_disks {
            out.push(Command::GrowRaidDisks(sb.raid_disks));
        }
        for m in view.members.iter().filter(|m| !m.removed) {
            if sb.faulty.contains(&m.dev_number) && m.state != MemberState::Faulty {
                out.push(Command::FailMember {
                    path: m.path.clone(),
                });
            }
        }
        out.push(Command::FollowSize {
            sectors: sb.size,
            expose: false,
        });
        // Only the METADATA_UPDATED of an add names the new device (its device UUID);
        // any other one drops a confirmation whose add did not happen.
        let pending = self.pending_disk.take();
        match pending.filter(|_| round.msg.uuid != [0u8; 16]) {
            Some(path) => out.push(Command::AttachDevice { path }),
            None => {
                self.round = None;
                out.push(Command::Ack);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(path: &str, dev_number: u32, state: MemberState) -> MemberView {
        MemberView {
            path: path.into(),
            dev_number,
            state,
            removed: false,
        }
    }

    /// Two in-sync members a (dev 0) and b (dev 1), a faulty c (dev 2), removed d (3).
    fn view() -> ArrayView {
        let mut d = member("/d", 3, MemberState::Spare);
        d.removed = true;
        ArrayView {
            raid_disks: 2,
            members: vec![
                member("/a", 0, MemberState::InSync),
                member("/b", 1, MemberState::InSync),
                member("/c", 2, MemberState::Faulty),
                d,
            ],
        }
    }

    fn msg(kind: MsgType) -> ClusterMsg {
        ClusterMsg::new(kind, 1)
    }

    fn engine() -> Engine {
        Engine::new("n2", "md0")
    }

    fn received(e: &mut Engine, m: ClusterMsg) -> Vec<Command> {
        e.handle(Event::Message {
            msg: m,
            from: "n1".into(),
            view: Some(view()),
        })
    }

    fn sb(raid_disks: u32, faulty: &[u32]) -> NewestSuperblock {
        NewestSuperblock {
            raid_disks,
            size: 65536,
            faulty: faulty.to_vec(),
        }
    }

    #[test]
    fn metadata_updated_reloads_then_follows_the_newest_superblock() {
        let mut e = engine();
        assert_eq!(
            received(&mut e, msg(MsgType::MetadataUpdated)),
            vec![
                Command::ReloadSuperblocks { skip: vec![2, 3] },
                Command::ReadNewestSuperblock {
                    skip: vec!["/c".into(), "/d".into()]
                },
            ]
        );
        // Nothing changed: the size is followed (a no-op when equal), acked.
        assert_eq!(
            e.handle(Event::Superblock {
                sb: sb(2, &[2]),
                view: view()
            }),
            vec![
                Command::FollowSize {
                    sectors: 65536,
                    expose: false
                },
                Command::Ack
            ]
        );
    }

    #[test]
    fn metadata_updated_fails_faulty_members_grows_roles_and_resizes() {
        let mut e = engine();
        received(&mut e, msg(MsgType::MetadataUpdated));
        let mut grown = sb(3, &[1, 2]);
        grown.size = 131072;
        assert_eq!(
            e.handle(Event::Superblock {
                sb: grown,
                view: view()
            }),
            vec![
                Command::GrowRaidDisks(3),
                Command::FailMember { path: "/b".into() },
                Command::FollowSize {
                    sectors: 131072,
                    expose: false
                },
                Command::Ack
            ],
            "b is failed here; c already is; a larger size is not shown before CHANGE_CAPACITY"
        );
    }

    #[test]
    fn newdisk_then_metadata_updated_attaches_the_device() {
        let mut e = engine();
        let mut nd = msg(MsgType::Newdisk);
        nd.uuid = [7; 16];
        assert_eq!(
            received(&mut e, nd),
            vec![Command::FindNewDisk {
                device_uuid: [7; 16]
            }]
        );
        assert_eq!(
            e.handle(Event::NewDiskFound {
                path: "/x".into(),
                view: Some(view())
            }),
            vec![Command::Ack]
        );
        assert_eq!(e.pending_disk(), Some(&PathBuf::from("/x")));
        let mut mu = msg(MsgType::MetadataUpdated);
        mu.uuid = [7; 16];
        received(&mut e, mu);
        assert_eq!(
            e.handle(Event::Superblock {
                sb: sb(2, &[2]),
                view: view()
            }),
            vec![
                Command::FollowSize {
                    sectors: 65536,
                    expose: false
                },
                Command::AttachDevice { path: "/x".into() }
            ]
        );
        assert_eq!(e.pending_disk(), None);
        // Attached as recovering: the sender (slot 1) recovers it while it lives.
        assert_eq!(
            e.handle(Event::Attached { recovering: true }),
            vec![Command::Ack]
        );
        assert_eq!(e.remote_recovery(), Some(1));
        e.clear_remote_recovery();
        assert_eq!(e.remote_recovery(), None);
    }

    #[test]
    fn a_spare_attached_is_nobodys_recovery() {
        let mut e = engine();
        let mut nd = msg(MsgType::Newdisk);
        nd.uuid = [7; 16];
        received(&mut e, nd);
        e.handle(Event::NewDiskFound {
            path: "/x".into(),
            view: None,
        });
        let mut mu = msg(MsgType::MetadataUpdated);
        mu.uuid = [7; 16];
        received(&mut e, mu);
        e.handle(Event::Superblock {
            sb: sb(2, &[]),
            view: view(),
        });
        assert_eq!(
            e.handle(Event::Attached { recovering: false }),
            vec![Command::Ack]
        );
        assert_eq!(e.remote_recovery(), None);
    }

    #[test]
    fn a_metadata_updated_without_device_uuid_drops_a_confirmed_newdisk() {
        let mut e = engine();
        received(&mut e, msg(MsgType::Newdisk));
        e.handle(Event::NewDiskFound {
            path: "/x".into(),
            view: Some(view()),
        });
        received(&mut e, msg(MsgType::MetadataUpdated));
        let cmds = e.handle(Event::Superblock {
            sb: sb(2, &[]),
            view: view(),
        });
        assert_eq!(cmds.last(), Some(&Command::Ack));
        assert!(!cmds
            .iter()
            .any(|c| matches!(c, Command::AttachDevice { .. })));
        assert_eq!(e.pending_disk(), None, "the add did not happen");
    }

    #[test]
    fn newdisk_of_an_active_member_is_refused() {
        let mut e = engine();
        received(&mut e, msg(MsgType::Newdisk));
        assert_eq!(
            e.handle(Event::NewDiskFound {
                path: "/a".into(),
                view: Some(view())
            }),
            vec![Command::Nack(Nack::AlreadyMember {
                node: "n2".into(),
                array: "md0".into(),
                path: "/a".into()
            })]
        );
        assert_eq!(e.pending_disk(), None);
        // A faulty member's path may come back.
        received(&mut e, msg(MsgType::Newdisk));
        assert_eq!(
            e.handle(Event::NewDiskFound {
                path: "/c".into(),
                view: Some(view())
            }),
            vec![Command::Ack]
        );
    }

    #[test]
    fn change_capacity_shows_the_new_size() {
        let mut e = engine();
        assert_eq!(
            received(&mut e, msg(MsgType::ChangeCapacity)),
            vec![Command::ReadNewestSuperblock {
                skip: vec!["/c".into(), "/d".into()]
            }]
        );
        let mut s = sb(2, &[]);
        s.size = 1 << 20;
        assert_eq!(
            e.handle(Event::Superblock {
                sb: s,
                view: view()
            }),
            vec![
                Command::FollowSize {
                    sectors: 1 << 20,
                    expose: true
                },
                Command::Ack
            ]
        );
    }

    #[test]
    fn resyncing_installs_and_clears_the_window_in_bytes() {
        let mut e = engine();
        let mut m = msg(MsgType::Resyncing);
        m.low = 8;
        m.high = 16;
        assert_eq!(
            received(&mut e, m),
            vec![Command::SetRemoteWindow(Some((4096, 8192))), Command::Ack]
        );
        assert_eq!(
            received(&mut e, msg(MsgType::Resyncing)),
            vec![Command::SetRemoteWindow(None), Command::Ack]
        );
        m.high = u64::MAX / 2;
        assert_eq!(
            received(&mut e, m),
            vec![Command::Nack(Nack::WindowOverflow {
                node: "n2".into(),
                array: "md0".into(),
                low: 8,
                high: u64::MAX / 2
            })]
        );
    }

    #[test]
    fn remove_removes_here_and_is_refused_for_an_active_member() {
        let mut e = engine();
        let mut m = msg(MsgType::Remove);
        m.raid_slot = 2;
        assert_eq!(
            received(&mut e, m),
            vec![Command::RemoveMember { path: "/c".into() }]
        );
        assert_eq!(e.handle(Event::Removed(true)), vec![Command::Ack]);
        m.raid_slot = 1;
        assert_eq!(
            received(&mut e, m),
            vec![Command::RemoveMember { path: "/b".into() }]
        );
        assert_eq!(
            e.handle(Event::Removed(false)),
            vec![Command::Nack(Nack::RemoveActive {
                node: "n2".into(),
                array: "md0".into(),
                path: "/b".into(),
                dev_number: 1,
                state: MemberState::InSync
            })]
        );
        // Already removed (d) or unknown: nothing to do.
        for dev in [3, 9] {
            m.raid_slot = dev;
            assert_eq!(received(&mut e, m), vec![Command::Ack]);
        }
    }

    #[test]
    fn re_add_is_acked_only_when_the_member_is_not_active_here() {
        let mut e = engine();
        let mut m = msg(MsgType::ReAdd);
        m.raid_slot = 2;
        assert_eq!(received(&mut e, m), vec![Command::Ack], "faulty here");
        m.raid_slot = 3;
        assert_eq!(received(&mut e, m), vec![Command::Ack], "removed here");
        m.raid_slot = 0;
        assert_eq!(
            received(&mut e, m),
            vec![Command::Nack(Nack::ReAddActive {
                node: "n2".into(),
                array: "md0".into(),
                path: "/a".into(),
                dev_number: 0,
                state: MemberState::InSync
            })]
        );
    }

    #[test]
    fn bitmap_needs_sync_recovers_the_senders_slot_after_the_ack() {
        let mut e = engine();
        let mut m = msg(MsgType::BitmapNeedsSync);
        m.slot = 3;
        assert_eq!(
            received(&mut e, m),
            vec![
                Command::RecoverSlotWhenReleased {
                    slot: 3,
                    from: "n1".into()
                },
                Command::Ack
            ]
        );
        // Not running here: the slot is still recovered (from disk), the ack says why not.
        assert_eq!(
            e.handle(Event::Message {
                msg: m,
                from: "n1".into(),
                view: None
            }),
            vec![
                Command::RecoverSlotWhenReleased {
                    slot: 3,
                    from: "n1".into()
                },
                Command::Nack(Nack::NotActive {
                    node: "n2".into(),
                    array: "md0".into()
                })
            ]
        );
    }

    #[test]
    fn resyncing_start_is_acked() {
        assert_eq!(
            received(&mut engine(), msg(MsgType::ResyncingStart)),
            vec![Command::Ack]
        );
    }

    #[test]
    fn bitmap_resize_and_undecodable_messages_are_refused() {
        let mut e = engine();
        assert_eq!(
            received(&mut e, msg(MsgType::BitmapResize)),
            vec![Command::Nack(Nack::Unsupported {
                node: "n2".into(),
                array: "md0".into(),
                kind: MsgType::BitmapResize
            })]
        );
        assert_eq!(
            e.handle(Event::Undecodable(MsgError::UnknownType(42))),
            vec![Command::Nack(Nack::Undecodable {
                node: "n2".into(),
                error: MsgError::UnknownType(42)
            })]
        );
    }

    #[test]
    fn messages_for_an_array_not_running_here_are_refused() {
        let mut e = engine();
        for kind in [
            MsgType::MetadataUpdated,
            MsgType::Resyncing,
            MsgType::Remove,
            MsgType::ReAdd,
            MsgType::ChangeCapacity,
        ] {
            assert_eq!(
                e.handle(Event::Message {
                    msg: msg(kind),
                    from: "n1".into(),
                    view: None
                }),
                vec![Command::Nack(Nack::NotActive {
                    node: "n2".into(),
                    array: "md0".into()
                })],
                "{kind:?}"
            );
        }
        // NEWDISK needs no running engine: the device is looked for all the same.
        assert_eq!(
            e.handle(Event::Message {
                msg: msg(MsgType::Newdisk),
                from: "n1".into(),
                view: None
            }),
            vec![Command::FindNewDisk {
                device_uuid: [0; 16]
            }]
        );
    }

    #[test]
    fn a_superblock_nobody_asked_for_is_refused() {
        let mut e = engine();
        let cmds = e.handle(Event::Superblock {
            sb: sb(2, &[]),
            view: view(),
        });
        assert!(matches!(
            cmds.as_slice(),
            [Command::Nack(Nack::Failed { .. })]
        ));
        // A round aborted by a failed command leaves nothing behind.
        received(&mut e, msg(MsgType::MetadataUpdated));
        e.abort();
        let cmds = e.handle(Event::Superblock {
            sb: sb(2, &[]),
            view: view(),
        });
        assert!(matches!(
            cmds.as_slice(),
            [Command::Nack(Nack::Failed { .. })]
        ));
    }
}
