//! The receiver of a clustered array's messages: a delivered message goes to the
//! engine of the array whose channel it came on ([`crate::cluster::Engine`]), with this
//! node's view of the array; the commands it answers are carried out here in order
//! (re-read superblocks, fail or remove a member, attach a device, install a remote
//! resync window, follow the size, find a NEWDISK's device, recover a slot) and its
//! final [`Command::Ack`] or [`Command::Nack`] is the ack sent back. A command that
//! fails here ends the round with [`Nack::Failed`] naming what failed. The sender side
//! (token, publish, rollback) is [`super::message`].
//!
//! NEWDISK names the new device by its device UUID (the sender wrote its superblock
//! first; the sender's path is in the `token` lock's value block, a hint only): this
//! node finds its own path of that device among the devices it may use
//! (`--device-allow`) and opens it ([`find_new_disk`]). Engine changes made on a
//! message follow the sender ([`MetaWrite::Following`]): they write no superblock.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use super::cluster_array::ClusterArray;
use super::message::reload;
use super::Node;
use crate::array::{reshape, AddHow};
use crate::cluster::engine::{ArrayView, Command, Engine, Event, NewestSuperblock};
use crate::cluster::{channel, token_lock, ClusterMsg, Nack};
use crate::format::io::{read_member_bounded, DeviceError, META_READ_TIMEOUT};
use crate::format::superblock::ROLE_FAULTY;
use crate::raid::{MemberState, MetaWrite, Raid1};

/// A message delivered on `channel` by node `from`: decoded and applied to the array
/// joined here whose channel it is ([`apply_on`]); a channel of no array joined here
/// has nothing of ours to change (acked). `Err` is the negative ack.
pub async fn on_delivery(
    node: &Arc<Node>,
    channel_name: &str,
    from: &str,
    payload: &[u8],
) -> Result<(), Nack> {
    let joined = node
        .cluster_arrays()
        .into_iter()
        .find(|a| channel(a.uuid()) == channel_name);
    let msg = match ClusterMsg::decode(payload) {
        Ok(msg) => msg,
        Err(error) => {
            let cmds = match &joined {
                Some(a) => a.engine().handle(Event::Undecodable(error)),
                None => Engine::new(node.name(), "").handle(Event::Undecodable(error)),
            };
            return match cmds.into_iter().next() {
                Some(Command::Nack(n)) => Err(n),
                _ => Ok(()),
            };
        }
    };
    tracing::info!(channel = %channel_name, from, ?msg, "cluster message");
    match joined {
        Some(a) => apply_on(node, &a, from, msg).await,
        // Not joined (any more): nothing of ours to change.
        None => Ok(()),
    }
}

/// Applies message `msg` from node `from` to clustered array `arr` on `node`: its
/// engine's commands, carried out in order (see the module doc). `Err` is the negative
/// ack.
pub async fn apply_on(
    node: &Arc<Node>,
    arr: &Arc<ClusterArray>,
    from: &str,
    msg: ClusterMsg,
) -> Result<(), Nack> {
    run(&Host::Node { node, arr }, from, msg).await
}

/// Applies `msg` to a bare RAID engine `raid` of array `array` (members `members`) on
/// node `node`, without a node around it: no registry, no lock service, no state kept
/// between messages. The commands that need those (re-reading the superblock copies,
/// following the size, NEWDISK's device, attaching a device, recovering a slot) are
/// not carried out; everything else is, as [`apply_on`] does. `Err` is the negative ack.
pub async fn apply(
    node: &str,
    array: &str,
    raid: &Arc<Raid1>,
    members: &[PathBuf],
    msg: &ClusterMsg,
) -> Result<(), Nack> {
    let host = Host::Raid {
        node,
        array,
        raid,
        members,
        engine: Box::new(std::sync::Mutex::new(Engine::new(node, array))),
    };
    run(&host, "", *msg).await
}

/// Where a received message's commands are carried out.
enum Host<'a> {
    /// A clustered array joined on a node (its engine keeps state across messages).
    Node {
        node: &'a Arc<Node>,
        arr: &'a Arc<ClusterArray>,
    },
    /// A bare RAID engine.
    Raid {
        node: &'a str,
        array: &'a str,
        raid: &'a Arc<Raid1>,
        members: &'a [PathBuf],
        engine: Box<std::sync::Mutex<Engine>>,
    },
}

impl Host<'_> {
    fn node_name(&self) -> &str {
        match self {
            Host::Node { node, .. } => node.name(),
            Host::Raid { node, .. } => node,
        }
    }

    fn array(&self) -> &str {
        match self {
            Host::Node { arr, .. } => arr.name(),
            Host::Raid { array, .. } => array,
        }
    }

    /// Feeds `event` to the engine (its lock never held across an await).
    fn handle(&self, event: Event) -> Vec<Command> {
        match self {
            Host::Node { arr, .. } => arr.engine().handle(event),
            Host::Raid { engine, .. } => engine
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .handle(event),
        }
    }

    fn abort(&self) {
        match self {
            Host::Node { arr, .. } => arr.engine().abort(),
            Host::Raid { engine, .. } => engine.lock().unwrap_or_else(|e| e.into_inner()).abort(),
        }
    }

    /// The running engine and its member paths.
    fn raid(&self) -> Result<(Arc<Raid1>, Vec<PathBuf>), Nack> {
        match self {
            Host::Node { node, arr } => node.raid_of(arr.name()).ok_or_else(|| self.not_active()),
            Host::Raid { raid, members, .. } => Ok(((*raid).clone(), members.to_vec())),
        }
    }

    fn view(&self) -> Option<ArrayView> {
        self.raid()
            .ok()
            .map(|(raid, _)| ArrayView::of(&raid.status()))
    }

    fn failed(&self, what: &str, error: impl ToString) -> Nack {
        Nack::Failed {
            node: self.node_name().to_owned(),
            array: self.array().to_owned(),
            what: what.to_owned(),
            error: error.to_string(),
        }
    }

    fn not_active(&self) -> Nack {
        Nack::NotActive {
            node: self.node_name().to_owned(),
            array: self.array().to_owned(),
        }
    }
}

/// The receiver loop: the message to the engine, then each command carried out in
/// order, each answer back to the engine, until an ack or a nack.
async fn run(host: &Host<'_>, from: &str, msg: ClusterMsg) -> Result<(), Nack> {
    let mut queue: VecDeque<Command> = host
        .handle(Event::Message {
            msg,
            from: from.to_owned(),
            view: host.view(),
        })
        .into();
    while let Some(cmd) = queue.pop_front() {
        match execute(host, cmd).await {
            Ok(Step::Done(r)) => return r,
            Ok(Step::Next) => {}
            Ok(Step::Answer(ev)) => queue.extend(host.handle(ev)),
            Err(n) => {
                host.abort();
                return Err(n);
            }
        }
    }
    Err(host.failed("applying a message", "the engine gave no answer"))
}

/// What carrying out one command led to.
enum Step {
    /// Go on with the next command.
    Next,
    /// The engine's question answered: feed it this event.
    Answer(Event),
    /// The ack to send.
    Done(Result<(), Nack>),
}

/// Carries out one engine command against the RAID engine and the lock client.
async fn execute(host: &Host<'_>, cmd: Command) -> Result<Step, Nack> {
    let name = host.array();
    let needs_node = |what: &str| {
        host.failed(
            what,
            "needs the node's registry and lock service, which a bare engine has not",
        )
    };
    match cmd {
        Command::Ack => Ok(Step::Done(Ok(()))),
        Command::Nack(n) => Ok(Step::Done(Err(n))),
        Command::ReloadSuperblocks { skip } => {
            // A bare engine's caller keeps its superblock copies itself.
            if let Host::Node { node, .. } = host {
                reload(node, name, skip)
                    .await
                    .map_err(|e| host.failed("re-reading the superblocks", e))?;
            }
            Ok(Step::Next)
        }
        Command::ReadNewestSuperblock { skip } => {
            let (raid, members) = host.raid()?;
            let sb = newest_superblock(host.node_name(), name, &members, &skip)
                .await
                .map_err(|e| host.failed("reading the superblock", e))?;
            let faulty = (0..sb.dev_roles.len())
                .filter(|&i| sb.dev_roles[i] == ROLE_FAULTY)
                .map(|i| i as u32)
                .collect();
            Ok(Step::Answer(Event::Superblock {
                sb: NewestSuperblock {
                    raid_disks: sb.raid_disks,
                    size: sb.size,
                    faulty,
                },
                view: ArrayView::of(&raid.status()),
            }))
        }
        Command::GrowRaidDisks(n) => {
            let (raid, _) = host.raid()?;
            raid.grow_raid_disks(n, MetaWrite::Following)
                .await
                .map_err(|e| host.failed(&format!("growing to {n} raid disks"), e))?;
            Ok(Step::Next)
        }
        Command::FailMember { path } => {
            let (raid, _) = host.raid()?;
            tracing::warn!(array = name, member = %path.display(), "faulty in the superblock: failing it here too");
            raid.fail_by_path(&path, MetaWrite::Following)
                .await
                .map_err(|e| host.failed(&format!("failing {}", path.display()), e))?;
            Ok(Step::Next)
        }
        Command::FollowSize { sectors, expose } => {
            let Host::Node { node, .. } = host else {
                // A bare engine's size is its caller's.
                return Ok(Step::Next);
            };
            let Some((_, service)) = node.info(name) else {
                return Err(host.not_active());
            };
            let (raid, att) = service
                .registry()
                .active_parts(name)
                .map_err(|e| host.failed("following the new size", e))?;
            reshape::follow(&raid, &att, sectors, expose)
                .await
                .map_err(|e| host.failed("following the new size", e))?;
            Ok(Step::Next)
        }
        Command::FindNewDisk { device_uuid } => {
            let Host::Node { node, arr } = host else {
                return Err(needs_node("NEWDISK"));
            };
            let path = find_new_disk(node, arr, device_uuid).await?;
            Ok(Step::Answer(Event::NewDiskFound {
                path,
                view: host.view(),
            }))
        }
        Command::AttachDevice { path } => {
            let Host::Node { node, .. } = host else {
                return Err(needs_node("attaching a device"));
            };
            let Some((_, service)) = node.info(name) else {
                return Err(host.not_active());
            };
            let added = service
                .registry()
                .add_member_with(name, &path, AddHow::Attach, MetaWrite::Following)
                .await
                .map_err(|e| {
                    host.failed(&format!("attaching the new device {}", path.display()), e)
                })?;
            let (raid, _) = host.raid()?;
            let recovering = raid
                .status()
                .members
                .get(added.index)
                .is_some_and(|m| matches!(m.state, MemberState::Recovering { .. }));
            Ok(Step::Answer(Event::Attached { recovering }))
        }
        Command::RemoveMember { path } => {
            let (raid, _) = host.raid()?;
            let done = raid
                .remove_by_path(&path, MetaWrite::Following)
                .await
                .map_err(|e| host.failed(&format!("removing {}", path.display()), e))?;
            Ok(Step::Answer(Event::Removed(done)))
        }
        Command::SetRemoteWindow(window) => {
            // Acknowledged once this node's writes in flight into the window ended.
            let (raid, _) = host.raid()?;
            raid.set_remote_resync_window(window)
                .await
                .map_err(|e| host.failed("installing the remote resync window", e))?;
            Ok(Step::Next)
        }
        Command::RecoverSlotWhenReleased { slot, from } => {
            let Host::Node { node, arr } = host else {
                tracing::warn!(
                    array = name,
                    slot,
                    "BITMAP_NEEDS_SYNC from {from}: a bare engine recovers no slot"
                );
                return Ok(Step::Next);
            };
            match node.session() {
                Some(session) => {
                    tokio::spawn(super::takeover::needs_sync(
                        (*node).clone(),
                        session,
                        (*arr).clone(),
                        slot,
                        from,
                    ));
                }
                None => {
                    tracing::warn!(array = name, slot, "BITMAP_NEEDS_SYNC from {from}: no session with mdserver; the slot is recovered when a node sees it dirty")
                }
            }
            Ok(Step::Next)
        }
    }
}

/// The superblock with the most events among `members`, skipping those in `skip` (the
/// engine has them as Faulty); each read is bounded by [`META_READ_TIMEOUT`], and a
/// member that does not answer fails the whole read (naming it) rather than letting
/// an older superblock win.
async fn newest_superblock(
    node: &str,
    array: &str,
    members: &[PathBuf],
    skip: &[PathBuf],
) -> Result<crate::format::superblock::Superblock, String> {
    let paths: Vec<PathBuf> = members
        .iter()
        .filter(|p| !skip.contains(p))
        .cloned()
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut best: Option<crate::format::superblock::Superblock> = None;
        let mut last = None;
        for p in &paths {
            match read_member_bounded(p, META_READ_TIMEOUT) {
                Ok(m) if best.as_ref().is_none_or(|b| m.sb.events > b.events) => best = Some(m.sb),
                Ok(_) => {}
                Err(e @ DeviceError::Unresponsive { .. }) => return Err(e.to_string()),
                Err(e) => last = Some(e.to_string()),
            }
        }
        best.ok_or_else(|| last.unwrap_or_else(|| "no readable member".to_owned()))
    })
    .await
    .map_err(|e| format!("node {node}: array {array}: reading the superblock: {e}"))?
    .map_err(|e| format!("node {node}: array {array}: reading the superblock: {e}"))
}

fn failed(node: &Node, arr: &ClusterArray, what: &str, error: impl ToString) -> Nack {
    Nack::Failed {
        node: node.name().to_owned(),
        array: arr.name().to_owned(),
        what: what.to_owned(),
        error: error.to_string(),
    }
}

/// NEWDISK's device here: the message carries the new device's device UUID
/// (md-cluster's `cmsg.uuid`); the sender wrote its own path into the `token` lock's
/// value block. This node finds its own path of that device among the devices it may
/// use (`--device-allow`, [`crate::array::scan::find_device`]; the sender's path first,
/// if allowed here) and confirms it can open it. A NEWDISK without a device UUID (an
/// older sender) names the device by the sender's path only.
async fn find_new_disk(
    node: &Arc<Node>,
    arr: &ClusterArray,
    device_uuid: [u8; 16],
) -> Result<PathBuf, Nack> {
    let name = arr.name();
    let Some(session) = node.session() else {
        return Err(Nack::NoSession {
            node: node.name().to_owned(),
        });
    };
    let (value, _) = session
        .read_value(&token_lock(arr.uuid()))
        .await
        .map_err(|e| failed(node, arr, "reading the new device's path", e))?;
    let sender_path = String::from_utf8(value)
        .ok()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    let path = if device_uuid == [0u8; 16] {
        let path = sender_path.ok_or_else(|| Nack::Failed {
            node: node.name().to_owned(),
            array: name.to_owned(),
            what: "NEWDISK".into(),
            error: "no device UUID and no device path in the token value".into(),
        })?;
        node.check_allowed(name, std::slice::from_ref(&path))
            .map_err(|e| failed(node, arr, "NEWDISK", e.message))?;
        path
    } else {
        let allow = node.cfg.registry.device_allow.clone();
        let array = *arr.uuid();
        let preferred: Vec<PathBuf> = sender_path.into_iter().collect();
        tokio::task::spawn_blocking(move || {
            if allow.allows_any() {
                // Every path is allowed here: the sender's, if it is that device.
                return preferred
                    .into_iter()
                    .find(|p| {
                        crate::array::scan::read_superblock(p).is_some_and(|sb| {
                            sb.set_uuid == array && sb.device_uuid == device_uuid
                        })
                    })
                    .ok_or_else(|| {
                        format!(
                            "the device with device UUID {} is not at the sender's path here, and there is no --device-allow pattern to look for it",
                            crate::format::fmt_uuid(&device_uuid)
                        )
                    });
            }
            crate::array::scan::find_device(&array, &device_uuid, &allow, &preferred)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| failed(node, arr, "NEWDISK: device scan task", e))?
        .map_err(|e| failed(node, arr, "NEWDISK", e))?
    };
    let p = path.clone();
    tokio::task::spawn_blocking(move || crate::format::io::MetaDev::open(&p, true).map(|_| ()))
        .await
        .map_err(|e| failed(node, arr, "NEWDISK: open task", e))?
        .map_err(|e| failed(node, arr, "NEWDISK", e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::create::{BitmapMode, CreateSpec};
    use crate::format::io::create_members;
    use std::time::Duration;
    use tokio::time::Instant;

    /// A member whose reads block (a FIFO without a writer: its open blocks in the
    /// kernel) is skipped when the engine has it as Faulty, and bounds the read when it
    /// does not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn newest_superblock_skips_faulty_members_and_bounds_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for p in [&a, &b] {
            std::fs::File::create(p).unwrap().set_len(32 << 20).unwrap();
        }
        let spec = CreateSpec::new("host:md0", 2, 0, BitmapMode::None);
        create_members(&spec, &[a.clone(), b.clone()], false).unwrap();
        let dead = dir.path().join("dead-member");
        let c = std::ffi::CString::new(dead.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let members = vec![a.clone(), dead.clone(), b.clone()];
        let t = Instant::now();
        let sb = newest_superblock("n1", "md0", &members, std::slice::from_ref(&dead))
            .await
            .unwrap();
        assert_eq!(sb.raid_disks, 2);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let t = Instant::now();
        let e = newest_superblock("n1", "md0", &members, &[])
            .await
            .unwrap_err();
        let took = t.elapsed();
        assert!(e.contains("dead-member") && e.contains("node n1"), "{e}");
        assert!(
            took >= META_READ_TIMEOUT && took < META_READ_TIMEOUT + Duration::from_secs(5),
            "{took:?}"
        );
        // Unblock the thread still stuck in the open.
        let w = std::fs::OpenOptions::new().write(true).open(&dead).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(w);
    }
}
