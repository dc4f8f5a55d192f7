//! The acknowledged message round of a clustered array (RFC 0001 "Messages"): the
//! sender side under the `token` lock, and the receiver side that applies what a
//! message says.
//!
//! Sender ([`round`]):
//! 1. take `md/<uuid>/token` exclusive, queued for at most the deadline (ETIMEDOUT
//!    names the holder): one sender per array at a time, as md-cluster's token;
//! 2. run the caller's change (e.g. mark a member faulty and write the superblocks);
//!    it may answer "nothing to do" (the re-check under the token);
//! 3. publish the [`ClusterMsg`] on the array's channel with the time left of the
//!    deadline;
//! 4. every joined node acked positively: done. A negative ack or a missing ack: the
//!    caller's rollback runs and the result is EIO naming every node and its reason;
//! 5. release `token` (always, also on errors).
//!
//! Receiver ([`apply`]): a decoded message is applied to the running engine, and the
//! result is the ack — `Err(reason)` is a negative ack. METADATA_UPDATED re-reads the
//! superblock and applies role changes (a member faulty in the superblock is failed
//! here too); RESYNCING installs the sender's window ([`Raid1::set_remote_resync_window`],
//! sectors → bytes); REMOVE removes the member (`raid_slot` = its `dev_number`) here
//! too; BITMAP_NEEDS_SYNC is handled by [`super::takeover::needs_sync`].
//! NEWDISK ([`apply_on`]) names the new device by its device UUID (the sender wrote
//! its superblock first; the sender's path is in the `token` lock's value block, a
//! hint only): this node finds its own path of that device among the devices it may
//! use (`--device-allow`), and acks only when it can open it and it is not a member
//! here; the METADATA_UPDATED that follows attaches it (its superblock read, not
//! written).
//! A METADATA_UPDATED whose superblock has another size resizes this node's bitmap
//! slot (and shrinks the capacity at once); CHANGE_CAPACITY shows a grown capacity
//! ([`crate::array::reshape`]).
//! RE_ADD (a re-add: NEWDISK, RE_ADD, the sender gathers every slot's bits, then
//! METADATA_UPDATED attaches the member) is acked when the member is not active here.
//! BITMAP_RESIZE (RAID10 reshapes only) and unknown types are answered with a negative
//! ack naming the type, so a sender never believes a change was applied when it was
//! not.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mdcluster_proto::lock_client::{Mode, Session, Wait};
use mdcluster_proto::status::WireError;
use mdcluster_proto::v1::Errno;
use tokio::time::Instant;

use super::{lock, Node};
use crate::array::{reshape, AddHow};
use crate::cluster::{channel, token_lock, ClusterMsg, MsgType};
use crate::format::io::{read_member_bounded, DeviceError, META_READ_TIMEOUT};
use crate::format::superblock::ROLE_FAULTY;
use crate::raid::{MemberState, Raid1};

/// The default deadline of one message round (md-cluster's `WAIT_DLM_LOCK_TIMEOUT`).
pub const ROUND_DEADLINE: Duration = Duration::from_secs(30);

/// What the change under the token decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Applied locally: publish the message.
    Applied,
    /// Nothing to change (the re-check under the token): no message.
    Unchanged,
}

fn lock_err(e: mdcluster_proto::lock_client::LockClientError, what: &str) -> WireError {
    let errno = match e.errno() {
        Errno::Unspecified => Errno::Eio,
        x => x,
    };
    WireError::new(errno, what.to_owned(), format!("{what}: {e}"))
}

/// Who sends, for which array.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// This node's lock-service session.
    pub session: &'a Session,
    /// This node's name.
    pub node: &'a str,
    /// The array's name here.
    pub array: &'a str,
    /// The array's UUID.
    pub uuid: &'a [u8; 16],
}

/// The `token` lock held by this node: the fencing token and this node's local turn.
/// The lock service grants a second acquire of the same session at once (acquire is
/// idempotent per session), so two tasks of one node are serialized here first.
#[derive(Debug)]
pub struct TokenHold {
    /// The fencing token.
    pub token: u64,
    _local: tokio::sync::OwnedMutexGuard<()>,
}

/// Per array UUID, this node's turn on the token.
type Turns = std::sync::Mutex<std::collections::HashMap<[u8; 16], Arc<tokio::sync::Mutex<()>>>>;

/// This node's per-array turn on the token.
fn local_turn(uuid: &[u8; 16]) -> Arc<tokio::sync::Mutex<()>> {
    static TURNS: std::sync::OnceLock<Turns> = std::sync::OnceLock::new();
    let map = TURNS.get_or_init(Default::default);
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    m.entry(*uuid).or_default().clone()
}

/// Takes `to`'s array's `token` lock exclusive (this node's turn first), queued for at
/// most `deadline` in all; ETIMEDOUT names the holder.
pub async fn take_token(to: Target<'_>, deadline: Duration) -> Result<TokenHold, WireError> {
    let end = Instant::now() + deadline;
    let res = token_lock(to.uuid);
    let local = tokio::time::timeout(deadline, local_turn(to.uuid).lock_owned())
        .await
        .map_err(|_| {
            WireError::new(
                Errno::Etimedout,
                format!("array {}", to.array),
                format!(
                    "node {}: another operation of this node held the token lock {res} of array {} for {deadline:?}; retry",
                    to.node, to.array
                ),
            )
        })?;
    let g = to
        .session
        .acquire(&res, Mode::Exclusive, Wait::Queue(left(end)))
        .await
        .map_err(|e| {
            lock_err(
                e,
                &format!(
                    "node {}: taking the token lock {res} of array {}",
                    to.node, to.array
                ),
            )
        })?;
    crate::metrics::agent().lock_wait(
        "token",
        deadline.saturating_sub(end.saturating_duration_since(Instant::now())),
    );
    Ok(TokenHold {
        token: g.token,
        _local: local,
    })
}

/// Releases the token taken by [`take_token`] (failures are logged: the lock goes
/// with the session at the latest).
pub async fn release_token(to: Target<'_>, hold: TokenHold) {
    let res = token_lock(to.uuid);
    if let Err(e) = to.session.release(&res, hold.token).await {
        tracing::warn!(array = to.array, lock = %res, "release token: {e}");
    }
}

/// Publishes `msg` on `to`'s array channel and needs every joined node's positive ack
/// within `timeout`; else EIO naming each node that refused (with its reason) or did
/// not answer.
pub async fn publish_acked(
    to: Target<'_>,
    msg: ClusterMsg,
    timeout: Duration,
) -> Result<(), WireError> {
    let Target {
        session,
        node,
        array,
        uuid,
    } = to;
    let started = Instant::now();
    let o = session
        .publish(&channel(uuid), &msg.encode(), timeout)
        .await;
    crate::metrics::agent().token_round_outcome(array, &o, started.elapsed());
    let o = o.map_err(|e| {
        lock_err(
            e,
            &format!("node {node}: publishing {:?} for array {array}", msg.kind),
        )
    })?;
    if o.all_ok {
        tracing::info!(array, kind = ?msg.kind, acks = o.results.len(), "message acknowledged by every joined node");
        return Ok(());
    }
    let refused: Vec<String> = o
        .results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| {
            if r.answered {
                format!("node {} refused: {}", r.node, r.reason)
            } else {
                format!("node {} did not answer within {timeout:?}", r.node)
            }
        })
        .collect();
    Err(WireError::new(
        Errno::Eio,
        format!("array {array}"),
        format!(
            "node {node}: {:?} of array {array} was not acknowledged by every node ({})",
            msg.kind,
            refused.join("; ")
        ),
    ))
}

/// The time left until `end`, at least 100 ms.
pub fn left(end: Instant) -> Duration {
    end.saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100))
}

/// One acknowledged round for `to`'s array: token → `change` → publish `msg` → all
/// acked, or `rollback` and EIO. See the module doc.
pub async fn round<C, R>(
    to: Target<'_>,
    msg: ClusterMsg,
    deadline: Duration,
    change: C,
    rollback: R,
) -> Result<Change, WireError>
where
    C: Future<Output = Result<Change, WireError>>,
    R: Future<Output = ()>,
{
    let end = Instant::now() + deadline;
    let token = take_token(to, deadline).await?;
    let out = async {
        if crate::raid::under_token(change).await? == Change::Unchanged {
            return Ok(Change::Unchanged);
        }
        match publish_acked(to, msg, left(end)).await {
            Ok(()) => Ok(Change::Applied),
            Err(mut e) => {
                rollback.await;
                e.message = format!(
                    "{}; the change was rolled back where possible — check those nodes and retry",
                    e.message
                );
                Err(e)
            }
        }
    }
    .await;
    release_token(to, token).await;
    out
}

/// Applies a received message to clustered array `name` on `node`: NEWDISK is
/// confirmed here ([`newdisk`]), a METADATA_UPDATED that follows a confirmed NEWDISK
/// attaches the new device, everything else goes to [`apply`]. `Err` is the negative
/// ack's reason.
pub async fn apply_on(node: &Arc<Node>, name: &str, msg: &ClusterMsg) -> Result<(), String> {
    let me = node.name();
    if msg.kind == MsgType::Newdisk {
        return newdisk(node, name, msg).await;
    }
    let Some((raid, members)) = node.raid_of(name) else {
        return Err(format!("node {me}: array {name} is not active here"));
    };
    if msg.kind == MsgType::ChangeCapacity {
        return follow_size(node, name, &members, true).await;
    }
    // The sender wrote the superblocks: take them as they are on disk, then change the
    // engine without writing (md's `md_reload_sb` + `check_sb_changes`).
    if msg.kind == MsgType::MetadataUpdated {
        reload(node, name).await?;
    }
    crate::raid::following(apply_following(node, name, &raid, &members, msg)).await
}

async fn apply_following(
    node: &Arc<Node>,
    name: &str,
    raid: &Arc<Raid1>,
    members: &[PathBuf],
    msg: &ClusterMsg,
) -> Result<(), String> {
    let me = node.name();
    apply(me, name, raid, members, msg).await?;
    if msg.kind == MsgType::MetadataUpdated {
        follow_size(node, name, members, false).await?;
        // Only the METADATA_UPDATED of an add names the new device (its device UUID);
        // any other one drops a confirmation whose add did not happen.
        let pending = lock(&node.pending_disks).remove(name);
        if let Some(path) = pending.filter(|_| msg.uuid != [0u8; 16]) {
            let Some((_, service)) = node.info(name) else {
                return Err(format!("node {me}: array {name} is not active here"));
            };
            let added = service
                .registry()
                .add_member_with(name, &path, AddHow::Attach)
                .await
                .map_err(|e| {
                    format!(
                        "node {me}: array {name}: attaching the new device {}: {e}",
                        path.display()
                    )
                })?;
            let recovering = raid
                .status()
                .members
                .get(added.index)
                .is_some_and(|m| matches!(m.state, MemberState::Recovering { .. }));
            if recovering {
                // The sender recovers it; this node waits (PENDING) unless it dies.
                lock(&node.remote_recovery).insert(name.to_owned(), msg.slot);
            }
        }
    }
    Ok(())
}

/// Re-reads the members' superblocks into this node's copies (another node wrote them).
async fn reload(node: &Arc<Node>, name: &str) -> Result<(), String> {
    let me = node.name();
    let Some(att) = node
        .find(name)
        .and_then(|service| service.registry().attachment(name))
    else {
        return Err(format!("node {me}: array {name} is not here"));
    };
    let faulty = node
        .raid_of(name)
        .map(|(raid, _)| faulty_members(&raid))
        .unwrap_or_default();
    tokio::task::spawn_blocking(move || att.reload(&faulty))
        .await
        .map_err(|e| format!("node {me}: array {name}: reload task failed: {e}"))?
        .map_err(|e| format!("node {me}: array {name}: re-reading the superblocks: {e}"))
}

/// [`crate::raid::MetaGate`] of a clustered array: the engine's superblock writes go
/// under the `token` lock, start from the superblocks as they are on disk (re-read
/// once the token is held), and are announced with METADATA_UPDATED (md-cluster's
/// `metadata_update_start/finish`).
pub struct MetaRound {
    node: std::sync::Weak<Node>,
    array: String,
}

impl MetaRound {
    /// The gate of array `array` on `node`.
    pub fn new(node: &Arc<Node>, array: &str) -> MetaRound {
        MetaRound {
            node: Arc::downgrade(node),
            array: array.to_owned(),
        }
    }
}

impl crate::raid::MetaGate for MetaRound {
    fn round<'a>(
        &'a self,
        what: String,
        write: crate::blockdev::IoFuture<'a, ()>,
    ) -> crate::blockdev::IoFuture<'a, ()> {
        Box::pin(async move {
            let Some(node) = self.node.upgrade() else {
                return write.await;
            };
            let (Some(session), Some(m)) =
                (node.session(), lock(&node.held).get(&self.array).cloned())
            else {
                tracing::warn!(array = %self.array, what, "superblock write without the token: no session or slot");
                return write.await;
            };
            let to = Target {
                session: &session,
                node: node.name(),
                array: &self.array,
                uuid: &m.uuid,
            };
            let end = Instant::now() + ROUND_DEADLINE;
            let hold = match take_token(to, ROUND_DEADLINE).await {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::error!(array = %self.array, what, "superblock write without the token: {e}");
                    None
                }
            };
            if hold.is_some() {
                // Under the token nobody else writes the superblocks: start from what
                // is on disk (this node may have missed a METADATA_UPDATED).
                if let Err(e) = reload(&node, &self.array).await {
                    tracing::warn!(array = %self.array, what, "re-reading the superblocks before writing: {e}");
                }
            }
            let out = write.await;
            if let Some(hold) = hold {
                if out.is_ok() {
                    let msg = ClusterMsg::new(MsgType::MetadataUpdated, m.slot);
                    if let Err(e) = publish_acked(to, msg, left(end)).await {
                        tracing::warn!(array = %self.array, what, "superblock written; {e}");
                    }
                }
                release_token(to, hold).await;
            }
            out
        })
    }
}

/// The size in the newest superblock, followed here ([`reshape::follow`]): the bitmap
/// slot resized, a smaller capacity at once, a larger one at CHANGE_CAPACITY
/// (`expose`).
async fn follow_size(
    node: &Arc<Node>,
    name: &str,
    members: &[PathBuf],
    expose: bool,
) -> Result<(), String> {
    let me = node.name();
    let skip = node
        .raid_of(name)
        .map(|(raid, _)| faulty_paths(&raid))
        .unwrap_or_default();
    let sb = newest_superblock(me, name, members, &skip).await?;
    let Some((_, service)) = node.info(name) else {
        return Err(format!("node {me}: array {name} is not active here"));
    };
    let (raid, att) = service
        .registry()
        .active_parts(name)
        .map_err(|e| format!("node {me}: {e}"))?;
    reshape::follow(&raid, &att, sb.size, expose)
        .await
        .map(|_| ())
        .map_err(|e| format!("node {me}: following the new size: {e}"))
}

/// The superblock with the highest `events` among `members` (a member just failed is
/// not written any more).
/// Engine indexes of the members `raid` has as Faulty (or removed).
fn faulty_members(raid: &Raid1) -> Vec<usize> {
    raid.status()
        .members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.state == MemberState::Faulty || m.removed)
        .map(|(i, _)| i)
        .collect()
}

/// Paths of the members `raid` has as Faulty (or removed).
fn faulty_paths(raid: &Raid1) -> Vec<PathBuf> {
    raid.status()
        .members
        .iter()
        .filter(|m| m.state == MemberState::Faulty || m.removed)
        .map(|m| PathBuf::from(&m.path))
        .collect()
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

/// NEWDISK: the message carries the new device's device UUID (md-cluster's
/// `cmsg.uuid`); the sender wrote its own path into the `token` lock's value block.
/// This node finds its own path of that device among the devices it may use
/// (`--device-allow`, [`crate::array::scan::find_device`]; the sender's path first, if
/// allowed here), confirms it can open it and that it is not a member here, then
/// remembers it for the METADATA_UPDATED that follows. A NEWDISK without a device UUID
/// (an older sender) names the device by the sender's path only.
async fn newdisk(node: &Arc<Node>, name: &str, msg: &ClusterMsg) -> Result<(), String> {
    let me = node.name();
    let Some(m) = node.membership(name) else {
        return Err(format!("node {me}: array {name} is not joined here"));
    };
    let Some(session) = node.session() else {
        return Err(format!("node {me}: no session with mdserver"));
    };
    let (value, _) = session
        .read_value(&token_lock(&m.uuid))
        .await
        .map_err(|e| format!("node {me}: reading the new device's path: {e}"))?;
    let sender_path = String::from_utf8(value)
        .ok()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    let path = if msg.uuid == [0u8; 16] {
        let path = sender_path.ok_or_else(|| {
            format!("node {me}: NEWDISK without a device path in the token value")
        })?;
        node.check_allowed(name, std::slice::from_ref(&path))
            .map_err(|e| e.message)?;
        path
    } else {
        let allow = node.cfg.registry.device_allow.clone();
        let (array, device) = (m.uuid, msg.uuid);
        let preferred: Vec<PathBuf> = sender_path.into_iter().collect();
        tokio::task::spawn_blocking(move || {
            if allow.allows_any() {
                // Every path is allowed here: the sender's, if it is that device.
                return preferred
                    .into_iter()
                    .find(|p| {
                        crate::array::scan::read_superblock(p)
                            .is_some_and(|sb| sb.set_uuid == array && sb.device_uuid == device)
                    })
                    .ok_or_else(|| {
                        format!(
                            "the device with device UUID {} is not at the sender's path here, and there is no --device-allow pattern to look for it",
                            crate::format::fmt_uuid(&device)
                        )
                    });
            }
            crate::array::scan::find_device(&array, &device, &allow, &preferred)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("node {me}: device scan task failed: {e}"))?
        .map_err(|e| format!("node {me}: array {name}: NEWDISK: {e}"))?
    };
    let p = path.clone();
    tokio::task::spawn_blocking(move || crate::format::io::MetaDev::open(&p, true).map(|_| ()))
        .await
        .map_err(|e| format!("node {me}: open task failed: {e}"))?
        .map_err(|e| format!("node {me}: {e}"))?;
    if let Some((raid, _)) = node.raid_of(name) {
        let here =
            raid.status().members.iter().any(|x| {
                !x.removed && x.state != MemberState::Faulty && Path::new(&x.path) == path
            });
        if here {
            return Err(format!(
                "node {me}: {} is already a member of {name} here",
                path.display()
            ));
        }
    }
    lock(&node.pending_disks).insert(name.to_owned(), path);
    Ok(())
}

/// Applies a received message to array `array`'s engine `raid` (members `members`);
/// `Err` is the negative ack's reason.
pub async fn apply(
    node: &str,
    array: &str,
    raid: &Raid1,
    members: &[PathBuf],
    msg: &ClusterMsg,
) -> Result<(), String> {
    match msg.kind {
        MsgType::MetadataUpdated => metadata_updated(node, array, raid, members).await,
        MsgType::Resyncing => {
            // Acknowledged once this node's writes in flight into the window ended.
            // Sectors from another node: checked before they become byte offsets.
            let window = if msg.high == 0 {
                None
            } else {
                match (msg.low.checked_mul(512), msg.high.checked_mul(512)) {
                    (Some(lo), Some(hi)) => Some((lo, hi)),
                    _ => {
                        return Err(format!(
                            "node {node}: array {array}: RESYNCING window {}..{} sectors does not fit 64-bit byte offsets",
                            msg.low, msg.high
                        ))
                    }
                }
            };
            raid.set_remote_resync_window(window)
                .await
                .map_err(|e| format!("node {node}: {e}"))
        }
        MsgType::BitmapNeedsSync | MsgType::ResyncingStart => Ok(()),
        MsgType::Remove => remove(node, array, raid, msg.raid_slot).await,
        MsgType::ReAdd => readd(node, array, raid, msg.raid_slot),
        other => Err(format!(
            "node {node}: array {array}: {other:?} is not supported by this mdagent yet"
        )),
    }
}

/// RE_ADD(dev_number): the sender brings a former member back (md's
/// `process_readd_disk`); here it must not be an active member (it was failed and
/// removed on every node), and the METADATA_UPDATED that follows attaches it.
fn readd(node: &str, array: &str, raid: &Raid1, dev_number: u32) -> Result<(), String> {
    let status = raid.status();
    match status
        .members
        .iter()
        .find(|m| m.dev_number == dev_number && !m.removed)
    {
        Some(m) if m.state != MemberState::Faulty => Err(format!(
            "node {node}: array {array}: member {} (device {dev_number}) is active here ({:?}); it cannot be re-added",
            m.path, m.state
        )),
        _ => Ok(()),
    }
}

/// REMOVE(dev_number): remove that member here too (it is faulty or a spare here, as
/// on the sender, whose METADATA_UPDATED came first). Already gone: nothing to do.
async fn remove(node: &str, array: &str, raid: &Raid1, dev_number: u32) -> Result<(), String> {
    let status = raid.status();
    let Some(m) = status
        .members
        .iter()
        .find(|m| m.dev_number == dev_number && !m.removed)
    else {
        return Ok(());
    };
    match raid.remove_by_path(Path::new(&m.path)).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "node {node}: array {array}: member {} (device {dev_number}) is active here ({:?}), not faulty; not removing it",
            m.path, m.state
        )),
        Err(e) => Err(format!("node {node}: array {array}: removing {}: {e}", m.path)),
    }
}

/// METADATA_UPDATED: read the newest superblock of the members, grow the number of
/// roles to its `raid_disks`, and fail here every member that is faulty there.
async fn metadata_updated(
    node: &str,
    array: &str,
    raid: &Raid1,
    members: &[PathBuf],
) -> Result<(), String> {
    let sb = newest_superblock(node, array, members, &faulty_paths(raid)).await?;
    if sb.raid_disks > raid.raid_disks() {
        raid.grow_raid_disks(sb.raid_disks).await.map_err(|e| {
            format!(
                "node {node}: array {array}: growing to {} raid disks: {e}",
                sb.raid_disks
            )
        })?;
    }
    let status = raid.status();
    for m in &status.members {
        let faulty = sb.dev_roles.get(m.dev_number as usize).copied() == Some(ROLE_FAULTY);
        if faulty && m.state != MemberState::Faulty {
            tracing::warn!(array, member = %m.path, "faulty in the superblock: failing it here too");
            raid.fail_by_path(Path::new(&m.path))
                .await
                .map_err(|e| format!("node {node}: array {array}: failing {}: {e}", m.path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::create::{BitmapMode, CreateSpec};
    use crate::format::io::create_members;

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
