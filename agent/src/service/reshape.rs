//! `mdctl grow --size` on the node that asks (md-cluster's `update_size`): the local
//! steps are [`crate::array::reshape`]'s; this module runs them under the array's
//! `token` lock with the two acknowledged messages of md-cluster:
//!
//! 1. take `token`; re-read the size under it (another node may have changed it);
//! 2. grow: bitmap resized with the new area's bits on disk, superblocks written;
//!    shrink: capacity, superblocks, bitmap;
//! 3. METADATA_UPDATED: every joined node re-reads the superblock and resizes its own
//!    bitmap slot (a node whose members do not hold the new size refuses: the grow is
//!    undone here and a second METADATA_UPDATED takes the others back);
//! 4. CHANGE_CAPACITY: every node shows the new capacity; then this node does, and a
//!    grown array resyncs its new area on one node (the `resync` lock);
//! 5. release `token`.
//!
//! A non-clustered array runs step 2 and shows the size at once.
//!
//! `mdctl grow --bitmap` ([`Node::grow_bitmap`]) is a stop, a rewrite of the on-disk
//! bitmap, and an assemble, under the array's one-operation guard.

use std::sync::Arc;

use mdcluster_proto::status::WireError;
use mdcluster_proto::v1::Errno;

use super::message;
use super::{lock, Node};
use crate::array::{reshape, ArrayError};
use crate::cluster::slot_lock;
use crate::cluster::{ClusterMsg, MsgType};
use crate::format::create::DEFAULT_NODES;
use crate::format::rebitmap::{set_bitmap, NewBitmap};
use crate::format::SECTOR;
use crate::lockport::{Mode, Wait};
use crate::raid::MetaWrite;

impl Node {
    fn array_err(&self, name: &str, e: ArrayError) -> WireError {
        self.err(e.errno(), name, e)
    }

    /// `grow --size KIB|max`: see the module doc.
    pub(super) async fn grow_size(
        self: &Arc<Self>,
        name: &str,
        want: &str,
    ) -> Result<(), WireError> {
        let Some((_, service)) = self.info(name) else {
            return Err(self.err(
                Errno::Enoent,
                name,
                format!("no array named {name} on this node"),
            ));
        };
        let (raid, att) = service
            .registry()
            .active_parts(name)
            .map_err(|e| self.array_err(name, e))?;
        let sectors = if want == "max" {
            reshape::max_sectors(&raid)
        } else {
            let kib: u64 = want.parse().map_err(|_| {
                self.err(
                    Errno::Einval,
                    name,
                    format!("--size {want:?}: give a size in KiB (digits) or max"),
                )
            })?;
            kib.checked_mul(2)
                .ok_or_else(|| self.err(Errno::Einval, name, format!("--size {want}: too large")))?
        };
        reshape::check_size(&raid, sectors).map_err(|e| self.array_err(name, e))?;
        let clustered = lock(&self.meta)
            .get(name)
            .is_some_and(|m| m.bitmap_kind == Some("clustered"));
        if !clustered {
            let old = att.size_sectors();
            if sectors > old {
                reshape::prepare_grow(&raid, &att, sectors, MetaWrite::Local)
                    .await
                    .map_err(|e| self.array_err(name, e))?;
                reshape::expose(&raid, &att, old);
            } else if sectors < old {
                reshape::shrink(&raid, &att, sectors, MetaWrite::Local)
                    .await
                    .map_err(|e| self.array_err(name, e))?;
            }
            return Ok(());
        }
        let (Some(m), Some(session)) = (self.cluster(name), self.session()) else {
            return Err(self.err(
                Errno::Eio,
                name,
                "a clustered array needs a session with mdserver and a bitmap slot; this node has none",
            ));
        };
        let to = m.target(&session, &self.cfg.node);
        let end = tokio::time::Instant::now() + self.cfg.timings.round_deadline;
        let hold = message::take_token(to, self.cfg.timings.round_deadline).await?;
        let out = async {
            // Under the token: the size now (another node may have changed it).
            let old = att.size_sectors();
            if sectors == old {
                return Ok(());
            }
            let grows = sectors > old;
            if grows {
                reshape::prepare_grow(&raid, &att, sectors, MetaWrite::UnderToken)
                    .await
                    .map_err(|e| self.array_err(name, e))?;
            } else {
                reshape::shrink(&raid, &att, sectors, MetaWrite::UnderToken)
                    .await
                    .map_err(|e| self.array_err(name, e))?;
            }
            let mut updated = ClusterMsg::new(MsgType::MetadataUpdated, m.slot());
            updated.high = sectors;
            if let Err(e) = message::publish_acked(to, updated, message::left(end)).await {
                if grows {
                    reshape::undo_grow(&raid, &att, old, MetaWrite::UnderToken).await;
                    let mut back = ClusterMsg::new(MsgType::MetadataUpdated, m.slot());
                    back.high = old;
                    // Its own deadline: the first round may have used all of ours.
                    if let Err(e2) =
                        message::publish_acked(to, back, self.cfg.timings.round_deadline).await
                    {
                        tracing::error!(array = %name, "taking the other nodes back to the old size: {e2}");
                    }
                    return Err(e.context(&format!(
                        "--size {} KiB undone (the array keeps {} KiB)",
                        sectors / 2,
                        old / 2
                    )));
                }
                return Err(e.context(&format!(
                    "the array was shrunk to {} KiB on node {}; the nodes named did not follow — stop and assemble it there",
                    sectors / 2,
                    self.cfg.node
                )));
            }
            // Slots no node holds follow too (under their lock, no-queue): a node that
            // joins later, or takes one over, reads them at the new size.
            self.resize_free_slots(&session, name, &m, sectors).await;
            let mut capacity = ClusterMsg::new(MsgType::ChangeCapacity, m.slot());
            capacity.high = sectors;
            let shown = message::publish_acked(to, capacity, message::left(end)).await;
            // The superblocks and every acked node have the new size: show it here too.
            reshape::expose(&raid, &att, old);
            shown.map_err(|e| {
                e.context(&format!(
                    "{} KiB is in the superblocks; the nodes named show the new capacity after a stop and assemble",
                    sectors / 2
                ))
            })
        }
        .await;
        message::release_token(to, hold).await;
        tracing::info!(array = %name, size_kib = raid.size() / SECTOR / 2, ok = out.is_ok(), "grow --size");
        out
    }
}

impl Node {
    /// Rewrites the header of every bitmap slot no node holds to `sectors` (md-cluster's
    /// `update_size` takes them PW no-queue); a held slot's node did it itself.
    async fn resize_free_slots(
        &self,
        session: &crate::lockport::Session,
        name: &str,
        m: &super::cluster_array::ClusterArray,
        sectors: u64,
    ) {
        let slots = lock(&self.meta).get(name).map_or(0, |x| x.slots);
        let members = self.raid_of(name).map(|(_, p)| p).unwrap_or_default();
        for s in (0..slots).filter(|&s| s != m.slot()) {
            // A slot with dirty bits belongs to a node that died or left dirty: its
            // takeover (which must get the lock) brings it back; not ours to touch.
            let paths = members.clone();
            let dirty =
                tokio::task::spawn_blocking(move || crate::format::slots::is_dirty(&paths, s))
                    .await
                    .unwrap_or(true);
            if dirty {
                tracing::info!(array = %name, slot = s, "not resizing a slot with dirty bits; its takeover will");
                continue;
            }
            let res = slot_lock(m.uuid(), s);
            let Ok(g) = session.acquire(&res, Mode::Exclusive, Wait::NoQueue).await else {
                continue;
            };
            let paths = members.clone();
            let fence = self.raid_of(name).and_then(|(r, _)| r.fence_ticket());
            let done = tokio::task::spawn_blocking(move || {
                crate::format::slots::resize(&paths, s, sectors, fence)
            })
            .await;
            if !matches!(done, Ok(Ok(()))) {
                tracing::warn!(array = %name, slot = s, "resizing the unused slot: {done:?}");
            }
            if let Err(e) = session.release(&res, g.token).await {
                tracing::warn!(lock = %res, "releasing: {e}");
            }
        }
    }

    /// `grow --bitmap none|internal|clustered` (mdadm's `Grow_addbitmap`, md-cluster's
    /// "bitmap → none"): internal and clustered switch through none; to none from
    /// clustered only while no other node has the array (every other slot lock is
    /// taken no-queue and held for the switch, else EPERM). The switch runs as a stop
    /// here (refused with EBUSY while clients are connected, like `stop`), the
    /// superblocks and bitmap rewritten ([`crate::format::rebitmap`]), and an assemble
    /// (a clustered array joins with a slot); opens in between fail at once (ENOENT).
    pub(super) async fn grow_bitmap(
        self: &Arc<Self>,
        name: &str,
        kind: &str,
        nodes: u32,
        cluster_name: &str,
    ) -> Result<(), WireError> {
        let Some(meta) = lock(&self.meta).get(name).cloned() else {
            return Err(self.err(
                Errno::Enoent,
                name,
                format!("no array named {name} on this node"),
            ));
        };
        let cur = meta.bitmap_kind.unwrap_or("none");
        let want = match kind {
            "none" => NewBitmap::None,
            "internal" => NewBitmap::Internal,
            "clustered" => NewBitmap::Clustered {
                nodes: if nodes == 0 { DEFAULT_NODES } else { nodes },
                cluster_name: cluster_name.to_owned(),
            },
            other => {
                return Err(self.err(
                    Errno::Einval,
                    name,
                    format!("--bitmap {other:?}: give none, internal or clustered"),
                ))
            }
        };
        if cur == kind {
            return Ok(());
        }
        if cur != "none" && kind != "none" {
            return Err(self.err(
                Errno::Einval,
                name,
                format!("--bitmap {kind}: the bitmap is {cur}; switch through none (grow --bitmap none, then --bitmap {kind})"),
            ));
        }
        if want != NewBitmap::None && nodes == 1 && matches!(want, NewBitmap::Clustered { .. }) {
            return Err(self.err(
                Errno::Einval,
                name,
                "--nodes 1: a clustered bitmap needs at least 2 slots",
            ));
        }
        let Some((raid, members)) = self.raid_of(name) else {
            return Err(self.err(
                Errno::Ebusy,
                name,
                format!("array {name} is not active here"),
            ));
        };
        if raid.sync_busy() || raid.remote_resync_window().is_some() {
            return Err(self.err(
                Errno::Ebusy,
                name,
                format!("array {name} is resyncing or recovering; change the bitmap when it has finished"),
            ));
        }
        drop(raid);
        // To none from clustered: every other slot, held through the switch.
        let mut others = Vec::new();
        let session = self.session();
        let held = self.cluster(name);
        if let (Some(m), "clustered") = (&held, cur) {
            let Some(session) = &session else {
                return Err(self.err(Errno::Eio, name, "no session with mdserver"));
            };
            for s in (0..meta.slots).filter(|&s| s != m.slot()) {
                let res = slot_lock(m.uuid(), s);
                match session.acquire(&res, Mode::Exclusive, Wait::NoQueue).await {
                    Ok(g) => {
                        others.push((res, g.token));
                        let paths = members.clone();
                        let dirty = tokio::task::spawn_blocking(move || {
                            crate::format::slots::is_dirty(&paths, s)
                        })
                        .await
                        .unwrap_or(true);
                        if dirty {
                            release_all(session, &others).await;
                            return Err(self.err(
                                Errno::Ebusy,
                                name,
                                format!("can't change the bitmap of {name} to none: bitmap slot {s} has dirty bits of a node that stopped uncleanly; let its takeover resync them (or assemble on that node again), then retry"),
                            ));
                        }
                    }
                    Err(e) => {
                        release_all(session, &others).await;
                        let errno = if e.errno() == Errno::Ebusy {
                            Errno::Eperm
                        } else {
                            Errno::Eio
                        };
                        return Err(self.err(
                            errno,
                            name,
                            format!("can't change the bitmap of {name} to none: it is in use by more than one node (bitmap slot {s}: {e}); stop it on the other nodes first"),
                        ));
                    }
                }
            }
        }
        let out = async {
            self.stop_locked(name, false).await?;
            let paths = members.clone();
            let w = want.clone();
            let written = tokio::task::spawn_blocking(move || set_bitmap(&paths, &w))
                .await
                .map_err(|e| self.err(Errno::Eio, name, format!("bitmap task failed: {e}")));
            let written = match written {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(self.err(
                    if matches!(e, crate::format::io::DeviceError::Format { .. }) {
                        Errno::Einval
                    } else {
                        Errno::Eio
                    },
                    name,
                    format!("--bitmap {kind}: {e}"),
                )),
                Err(e) => Err(e),
            };
            // Back in service either way: with the new bitmap, or the old one.
            let back = self.assemble_locked(name, &members).await;
            written?;
            back.map(|_| ()).map_err(|e| {
                e.context(&format!(
                    "the bitmap is now {kind} on disk but the array did not come back"
                ))
            })
        }
        .await;
        if let Some(session) = &session {
            release_all(session, &others).await;
        }
        tracing::info!(array = %name, from = cur, to = kind, ok = out.is_ok(), "grow --bitmap");
        out
    }
}

async fn release_all(session: &crate::lockport::Session, held: &[(String, u64)]) {
    for (res, token) in held {
        if let Err(e) = session.release(res, *token).await {
            tracing::warn!(lock = %res, "releasing: {e}");
        }
    }
}
