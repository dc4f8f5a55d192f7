//! Member operations on an array (`mdctl manage`: fail, remove, add, add-spare,
//! re-add) and the role-count part of `mdctl grow`. On a clustered array each change
//! runs under the token lock with an acknowledged METADATA_UPDATED
//! ([`super::message`]); a device about to be added gets its superblock first
//! ([`super::stamp`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mdcluster_proto::status::WireError;
use mdcluster_proto::v1 as pb;
use mdcluster_proto::v1::Errno;

use super::stamp::{stamp_new_device, NewDevice};
use super::{lock, message, short_name, takeover, Node};
use crate::format::io::read_member;
use crate::raid::{MemberState, MetaWrite};

impl Node {
    /// Member operations on `name`, in order (`mdctl manage`, like `mdadm --manage`).
    /// On a clustered array each change goes through the token lock and an
    /// acknowledged METADATA_UPDATED ([`message::round`]); the first failing operation
    /// ends the request (the earlier ones stay applied) with an error naming it.
    pub async fn manage(
        self: &Arc<Self>,
        name: &str,
        ops: Vec<pb::ManageOp>,
    ) -> Result<pb::ArrayStatus, WireError> {
        let name = short_name(name).to_owned();
        if ops.is_empty() {
            return Err(self.err(
                Errno::Einval,
                &name,
                "manage: give at least one of --fail/--remove/--add/--add-spare/--re-add",
            ));
        }
        let guard = self.begin(&name, "manage")?;
        let me = self.clone();
        self.detached(&name.clone(), async move {
            let _guard = guard;
            for (i, op) in ops.iter().enumerate() {
                me.manage_one(&name, op).await.map_err(|e| {
                    if i > 0 {
                        e.context(&format!(
                            "operations before {} {} were applied",
                            op.action, op.device
                        ))
                    } else {
                        e
                    }
                })?;
            }
            me.get(&name)
        })
        .await
    }

    async fn manage_one(self: &Arc<Self>, name: &str, op: &pb::ManageOp) -> Result<(), WireError> {
        let Some((info, service)) = self.info(name) else {
            return Err(self.err(
                Errno::Enoent,
                name,
                format!("no array named {name} on this node"),
            ));
        };
        let dev = PathBuf::from(&op.device);
        let kind = match op.action.as_str() {
            "fail" => crate::cluster::MsgType::MetadataUpdated,
            "remove" => crate::cluster::MsgType::Remove,
            "add" | "add-spare" | "re-add" => return self.manage_add(name, op).await,
            other => {
                return Err(self.err(
                    Errno::Einval,
                    name,
                    format!("manage: unknown operation {other:?}: use fail, remove, add, add-spare or re-add"),
                ))
            }
        };
        let Some(raid) = info.raid.as_ref() else {
            return Err(self.err(
                Errno::Ebusy,
                name,
                format!("array {name} is {}, not active", info.state),
            ));
        };
        let Some(member) = raid
            .members
            .iter()
            .find(|m| Path::new(&m.path) == dev && !m.removed)
        else {
            return Err(self.err(
                Errno::Enoent,
                name,
                format!("{} is not a member of {name} here", op.device),
            ));
        };
        let dev_number = member.dev_number;
        let registry = service.registry().clone();
        let clustered = lock(&self.meta)
            .get(name)
            .is_some_and(|m| m.bitmap_kind == Some("clustered"));
        let membership = self.cluster(name);
        // A clustered array's change runs in a token round.
        let write = if clustered {
            MetaWrite::UnderToken
        } else {
            MetaWrite::Local
        };
        let change = {
            let name = name.to_owned();
            let dev = dev.clone();
            let me = self.clone();
            async move {
                // The re-check under the token.
                let state = me.info(&name).and_then(|(i, _)| i.raid).and_then(|r| {
                    r.members
                        .iter()
                        .find(|m| Path::new(&m.path) == dev && !m.removed)
                        .map(|m| m.state)
                });
                let Some(state) = state else {
                    return Ok(message::Change::Unchanged);
                };
                if kind == crate::cluster::MsgType::Remove {
                    let done = registry
                        .remove_member(&name, &dev, write)
                        .await
                        .map_err(|e| me.err(e.errno(), &name, e))?;
                    if !done {
                        return Err(me.err(
                            Errno::Ebusy,
                            &name,
                            format!("{} is active in {name} ({state:?}): fail it first (--fail {} --remove {})", dev.display(), dev.display(), dev.display()),
                        ));
                    }
                    return Ok(message::Change::Applied);
                }
                if state == MemberState::Faulty {
                    return Ok(message::Change::Unchanged);
                }
                registry
                    .fail_member(&name, &dev, write)
                    .await
                    .map_err(|e| me.err(e.errno(), &name, e))?;
                let now_faulty = me.info(&name).and_then(|(i, _)| i.raid).is_some_and(|r| {
                    r.members.iter().any(|m| {
                        Path::new(&m.path) == dev && !m.removed && m.state == MemberState::Faulty
                    })
                });
                if !now_faulty {
                    return Err(me.err(
                        Errno::Ebusy,
                        &name,
                        format!(
                            "{} is the last in-sync member of {name}: not failing it",
                            dev.display()
                        ),
                    ));
                }
                Ok(message::Change::Applied)
            }
        };
        if !clustered {
            change.await?;
            return Ok(());
        }
        let (Some(m), Some(session)) = (membership, self.session()) else {
            return Err(self.err(
                Errno::Eio,
                name,
                "a clustered array needs a session with mdserver and a bitmap slot; this node has none",
            ));
        };
        let mut msg = crate::cluster::ClusterMsg::new(kind, m.slot());
        msg.raid_slot = dev_number;
        let array = name.to_owned();
        let device = op.device.clone();
        let action = op.action.clone();
        message::round(
            m.target(&session, &self.cfg.node),
            msg,
            self.cfg.timings.round_deadline,
            change,
            async move {
                // A failed or removed member cannot be taken back without a recovery;
                // the nodes that refused keep their view until their next message.
                tracing::error!(array = %array, member = %device, action = %action, "not acknowledged by every node; it stays applied here");
            },
        )
        .await?;
        Ok(())
    }

    /// `mdctl grow ARRAY [--raid-devices N] [--add DEV]... [--size KIB|max]
    /// [--bitmap none|internal|clustered]` (RAID1, like `mdadm --grow`), in that order:
    /// the devices are added first (NEWDISK, as `manage --add`), then the number of
    /// roles grows under the token with METADATA_UPDATED (spares take the new roles and
    /// one node recovers them; shrinking is refused), then the size changes
    /// ([`Node::grow_size`]), then the bitmap ([`Node::grow_bitmap`]).
    pub async fn grow(
        self: &Arc<Self>,
        req: pb::GrowRequest,
    ) -> Result<pb::ArrayStatus, WireError> {
        let pb::GrowRequest {
            name,
            raid_devices,
            add,
            size,
            bitmap,
            nodes,
            cluster_name,
        } = req;
        let name = short_name(&name).to_owned();
        if raid_devices == 0 && add.is_empty() && size.is_empty() && bitmap.is_empty() {
            return Err(self.err(
                Errno::Einval,
                &name,
                "grow: nothing to change; give --raid-devices, --add, --size or --bitmap",
            ));
        }
        let guard = self.begin(&name, "grow")?;
        let me = self.clone();
        self.detached(&name.clone(), async move {
            let _guard = guard;
            for d in &add {
                let op = pb::ManageOp {
                    action: "add".into(),
                    device: d.clone(),
                };
                me.manage_add(&name, &op).await?;
            }
            if raid_devices != 0 {
                me.grow_roles(&name, raid_devices).await.map_err(|e| {
                    if add.is_empty() {
                        e
                    } else {
                        e.context(&format!("{} added", add.join(", ")))
                    }
                })?;
            }
            if !size.is_empty() {
                me.grow_size(&name, &size).await?;
            }
            if !bitmap.is_empty() {
                me.grow_bitmap(&name, &bitmap, nodes, &cluster_name).await?;
            }
            me.get(&name)
        })
        .await
    }

    async fn grow_roles(self: &Arc<Self>, name: &str, n: u32) -> Result<(), WireError> {
        let Some((raid, _)) = self.raid_of(name) else {
            return Err(self.err(
                Errno::Enoent,
                name,
                format!("no active array named {name} on this node"),
            ));
        };
        let cur = raid.raid_disks();
        if n < cur {
            return Err(self.err(
                Errno::Einval,
                name,
                format!("--raid-devices {n}: {name} has {cur}; shrinking is not supported"),
            ));
        }
        let clustered = lock(&self.meta)
            .get(name)
            .is_some_and(|m| m.bitmap_kind == Some("clustered"));
        // A clustered array's change runs in a token round.
        let write = if clustered {
            MetaWrite::UnderToken
        } else {
            MetaWrite::Local
        };
        let change = {
            let raid = raid.clone();
            let me = self.clone();
            let name = name.to_owned();
            async move {
                match raid.grow_raid_disks(n, write).await {
                    Ok(true) => Ok(message::Change::Applied),
                    Ok(false) => Ok(message::Change::Unchanged),
                    Err(e) => Err(me.err(Errno::Eio, &name, e)),
                }
            }
        };
        if !clustered {
            change.await?;
            return Ok(());
        }
        let (Some(m), Some(session)) = (self.cluster(name), self.session()) else {
            return Err(self.err(
                Errno::Eio,
                name,
                "a clustered array needs a session with mdserver and a bitmap slot; this node has none",
            ));
        };
        let msg =
            crate::cluster::ClusterMsg::new(crate::cluster::MsgType::MetadataUpdated, m.slot());
        let array = name.to_owned();
        message::round(
            m.target(&session, &self.cfg.node),
            msg,
            self.cfg.timings.round_deadline,
            change,
            async move {
                tracing::error!(array = %array, raid_disks = n, "grow not acknowledged by every node; it stays applied here");
            },
        )
        .await?;
        Ok(())
    }

    /// The identity every node confirms a device to be added by (NEWDISK carries its
    /// device UUID): a device that already holds a superblock of array `name` keeps
    /// its own; a device without a valid superblock gets one now — the array's, copied
    /// from a live member, with a free device number, a new device UUID and no role
    /// (a spare until the add gives it one). Runs under the token.
    async fn identify_new_device(
        &self,
        name: &str,
        dev: &Path,
        members: &[crate::raid::MemberStatus],
    ) -> Result<NewDevice, WireError> {
        let template_from: Vec<PathBuf> = members
            .iter()
            .filter(|m| !m.removed && m.state == MemberState::InSync)
            .map(|m| PathBuf::from(&m.path))
            .collect();
        let used: Vec<u32> = members.iter().map(|m| m.dev_number).collect();
        let uuid_here = self
            .info(name)
            .and_then(|(i, _)| i.identity)
            .map(|i| i.uuid)
            .unwrap_or_default();
        let dev = dev.to_owned();
        // Written under the array's ticket: a fenced node stamps nothing.
        let fence = self.raid_of(name).and_then(|(r, _)| r.fence_ticket());
        let r = tokio::task::spawn_blocking(move || {
            stamp_new_device(&dev, &uuid_here, &template_from, &used, fence)
        })
        .await
        .map_err(|e| {
            self.err(
                Errno::Eio,
                name,
                format!("device identity task failed: {e}"),
            )
        })?;
        r.map_err(|e| self.err(e.errno(), name, e))
    }

    /// `--add`, `--add-spare`, `--re-add DEV` (md-cluster `add_new_disk`): under the
    /// token, the device path goes into the token's value block and NEWDISK asks every
    /// joined node to confirm it (one refusal rejects the disk, nothing written); then
    /// the device is added here (superblock written; a free role starts a recovery,
    /// which the `resync` lock gives to exactly one node) and METADATA_UPDATED makes
    /// every node attach it.
    async fn manage_add(self: &Arc<Self>, name: &str, op: &pb::ManageOp) -> Result<(), WireError> {
        let Some((info, service)) = self.info(name) else {
            return Err(self.err(
                Errno::Enoent,
                name,
                format!("no array named {name} on this node"),
            ));
        };
        let dev = PathBuf::from(&op.device);
        self.check_allowed(name, std::slice::from_ref(&dev))?;
        let Some(raid) = info.raid.as_ref() else {
            return Err(self.err(
                Errno::Ebusy,
                name,
                format!("array {name} is {}, not active", info.state),
            ));
        };
        // A member not removed (a failed one too) cannot be added again: md refuses it
        // the same way. Checked before anything is written or sent.
        if let Some(m) = raid
            .members
            .iter()
            .find(|m| !m.removed && Path::new(&m.path) == dev)
        {
            return Err(self.err(
                Errno::Ebusy,
                name,
                format!(
                    "--{} {}: it is still a member of {name} ({}); remove it first: mdctl manage {name} --remove {}",
                    op.action,
                    op.device,
                    m.state.name(),
                    op.device
                ),
            ));
        }
        let uuid_here = info
            .identity
            .as_ref()
            .map(|i| i.uuid.clone())
            .unwrap_or_default();
        let mut former_dev = None;
        if op.action == "re-add" {
            let p = dev.clone();
            let sb = tokio::task::spawn_blocking(move || read_member(&p).map(|m| m.sb))
                .await
                .map_err(|e| self.err(Errno::Eio, name, format!("read task failed: {e}")))?;
            former_dev = sb
                .ok()
                .filter(|sb| crate::format::fmt_uuid(&sb.set_uuid) == uuid_here)
                .map(|sb| sb.dev_number);
            if former_dev.is_none() {
                return Err(self.err(
                    Errno::Einval,
                    name,
                    format!(
                        "--re-add {}: it is not a former member of {name}; use --add",
                        op.device
                    ),
                ));
            }
        }
        let how = if op.action == "add-spare" {
            crate::array::AddHow::Spare
        } else {
            crate::array::AddHow::Add
        };
        let registry = service.registry().clone();
        let clustered = lock(&self.meta)
            .get(name)
            .is_some_and(|m| m.bitmap_kind == Some("clustered"));
        if !clustered {
            registry
                .add_member_with(name, &dev, how, MetaWrite::Local)
                .await
                .map_err(|e| self.err(e.errno(), name, e))?;
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
        let token = hold.token;
        let out = async {
            // Every node finds the device by its device UUID (each may see it under
            // another path): a device new to the array gets its superblock first, as
            // mdadm writes it before md's NEWDISK.
            let ident = self.identify_new_device(name, &dev, &raid.members).await?;
            session
                .write_value(&crate::cluster::token_lock(m.uuid()), token, op.device.as_bytes())
                .await
                .map_err(|e| self.err(Errno::Eio, name, format!("writing the new device's path into the token value: {e}")))?;
            let mut newdisk = crate::cluster::ClusterMsg::new(crate::cluster::MsgType::Newdisk, m.slot());
            newdisk.uuid = ident.device_uuid;
            newdisk.raid_slot = ident.dev_number;
            if let Err(e) = message::publish_acked(to, newdisk, message::left(end)).await {
                let undo = if ident.stamped {
                    let p = dev.clone();
                    match tokio::task::spawn_blocking(move || crate::format::io::zero_superblock(&p, true)).await {
                        Ok(Ok(())) => "nothing was left on it".to_owned(),
                        Ok(Err(z)) => format!("its new superblock could not be erased: {z}"),
                        Err(z) => format!("its new superblock could not be erased: {z}"),
                    }
                } else {
                    "nothing was written".to_owned()
                };
                return Err(e.context(&format!("device {} (device UUID {}) rejected ({undo})", op.device, crate::format::fmt_uuid(&ident.device_uuid))));
            }
            if let Some(dev_number) = former_dev {
                // md-cluster's re-add: RE_ADD, then gather every other node's bits (what
                // they wrote while the member was out) so the recovery copies them too.
                let mut readd = crate::cluster::ClusterMsg::new(crate::cluster::MsgType::ReAdd, m.slot());
                readd.raid_slot = dev_number;
                message::publish_acked(to, readd, message::left(end))
                    .await
                    .map_err(|e| e.context(&format!("re-add of {} refused (nothing was written)", op.device)))?;
                let slots = lock(&self.meta).get(name).map_or(0, |x| x.slots);
                let Some((engine, members)) = self.raid_of(name) else {
                    return Err(self.err(Errno::Enoent, name, format!("array {name} is no longer active here")));
                };
                let marked = takeover::gather_slots(name, &engine, &members, m.slot(), slots)
                    .await
                    .map_err(|e| self.err(Errno::Eio, name, format!("gathering the other nodes' bitmaps for the re-add: {e}")))?;
                tracing::info!(array = %name, device = %op.device, chunks = marked, "re-add: other slots' chunks marked for recovery");
            }
            let added = registry
                .add_member_with(name, &dev, how, MetaWrite::UnderToken)
                .await
                .map_err(|e| self.err(e.errno(), name, e))?;
            let dev_number = self
                .info(name)
                .and_then(|(i, _)| i.raid)
                .and_then(|r| r.members.get(added.index).map(|x| x.dev_number))
                .unwrap_or(0);
            let p = dev.clone();
            let device_uuid = tokio::task::spawn_blocking(move || read_member(&p).map(|m| m.sb.device_uuid))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or([0xff; 16]);
            let mut msg = crate::cluster::ClusterMsg::new(crate::cluster::MsgType::MetadataUpdated, m.slot());
            msg.raid_slot = dev_number;
            // Nonzero: this METADATA_UPDATED announces the device NEWDISK confirmed.
            msg.uuid = device_uuid;
            message::publish_acked(to, msg, message::left(end))
                .await
                .map_err(|e| e.context(&format!("{} was added on node {} but not attached on every node; stop and assemble the array there", op.device, self.cfg.node)))?;
            if former_dev.is_some() {
                // Every node writes to the member now; what they wrote between the first
                // gather and attaching it is only in their slots: gather again (the
                // recovery copies it, or a resync right after it).
                if let Some((engine, members)) = self.raid_of(name) {
                    let slots = lock(&self.meta).get(name).map_or(0, |x| x.slots);
                    match takeover::gather_slots(name, &engine, &members, m.slot(), slots).await {
                        Ok(n) => {
                            // Marked before the token is released: the recovery, which
                            // needs the token to start, plans with them.
                            tracing::info!(array = %name, device = %op.device, chunks = n, "re-add: gathered again after attach");
                        }
                        Err(e) => tracing::error!(array = %name, "re-add: second gather: {e}"),
                    }
                }
            }
            Ok(())
        }
        .await;
        message::release_token(to, hold).await;
        out
    }
}
