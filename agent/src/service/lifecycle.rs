//! The lifecycle of an array on this node: create (write the members, then assemble),
//! assemble (also of an array recorded in the state file, from the members this node
//! sees), stop, and shutdown of every array. Each runs as one operation per array
//! ([`Node::begin`]) on a spawned task, and a clustered array joins or leaves the cluster
//! through its slot lock ([`super::join`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mdcluster_proto::status::WireError;
use mdcluster_proto::v1 as pb;
use mdcluster_proto::v1::Errno;

use super::cluster_array::ClusterArray;
use super::{join, lock, message, resync, runtime, short_name, Meta, Node};
use crate::array::service::Service;
use crate::format::create::{BitmapMode, CreateSpec};
use crate::format::io::read_member;

impl Node {
    /// Writes a new array's members (like `mdadm --create`) and assembles it here.
    pub async fn create(
        self: &Arc<Self>,
        req: pb::CreateArrayRequest,
    ) -> Result<pb::ArrayStatus, WireError> {
        let name = short_name(&req.name).to_owned();
        let guard = self.begin(&name, "create")?;
        let me = self.clone();
        self.detached(&name.clone(), async move {
            let _guard = guard;
            me.create_locked(&name, req).await
        })
        .await
    }

    async fn create_locked(
        self: &Arc<Self>,
        name: &str,
        req: pb::CreateArrayRequest,
    ) -> Result<pb::ArrayStatus, WireError> {
        if let Some(s) = self.find(name) {
            let st = s
                .registry()
                .lookup(name)
                .map(|i| i.state.to_string())
                .unwrap_or_default();
            return Err(self.err(
                Errno::Eexist,
                name,
                format!("array {name} already exists here ({st}); stop it first"),
            ));
        }
        let members: Vec<PathBuf> = req.members.iter().map(PathBuf::from).collect();
        self.check_count(name, members.len())?;
        let resolved = self.check_allowed(name, &members)?;
        let bitmap = match req.bitmap.as_str() {
            "none" => BitmapMode::None,
            "internal" | "" => BitmapMode::Internal,
            "clustered" => BitmapMode::Clustered,
            other => {
                return Err(self.err(
                    Errno::Einval,
                    name,
                    format!("--bitmap {other:?}: use none, internal or clustered"),
                ))
            }
        };
        let mut spec = CreateSpec::new(
            if req.md_name.is_empty() {
                name
            } else {
                &req.md_name
            },
            req.raid_devices,
            req.spare_devices,
            bitmap,
        );
        if req.level != 0 {
            spec.level = req.level;
        }
        if req.nodes != 0 {
            spec.nodes = Some(req.nodes);
        }
        spec.cluster_name = req.cluster_name.clone();
        spec.size_kib = req.size_kib;
        spec.assume_clean = req.assume_clean;
        if req.bitmap_chunk_kib != 0 {
            spec.bitmap_chunk = Some(req.bitmap_chunk_kib.saturating_mul(1024));
        }
        if bitmap == BitmapMode::Clustered && self.session().is_none() {
            return Err(self.err(Errno::Eio, name, "a clustered array needs a session with mdserver, and this agent has none (standalone or disconnected)"));
        }
        // The resolved paths are what gets written (see crate::allow).
        let paths = resolved;
        let force = req.force;
        let written = tokio::task::spawn_blocking(move || {
            crate::format::io::create_members(&spec, &paths, force).map(|_| ())
        })
        .await
        .map_err(|e| self.err(Errno::Eio, name, format!("create task failed: {e}")))?;
        if let Err(e) = written {
            // The error says what to do (DeviceError::InUse carries the hint once).
            return Err(self.err(e.errno(), name, format!("create {name}: {e}")));
        }
        self.assemble_locked(name, &members).await
    }

    /// Assembles `name` from `members` here.
    pub async fn assemble(
        self: &Arc<Self>,
        name: &str,
        members: Vec<PathBuf>,
    ) -> Result<pb::ArrayStatus, WireError> {
        let name = short_name(name).to_owned();
        let guard = self.begin(&name, "assemble")?;
        let me = self.clone();
        self.detached(&name.clone(), async move {
            let _guard = guard;
            me.assemble_locked(&name, &members).await
        })
        .await
    }

    /// Assembles `name` from the cluster's record: `recorded` are the paths another
    /// node saw, `uuid` the array UUID. Where a recorded path is not allowed here, does
    /// not exist or holds other data, the members are found by UUID among this node's
    /// `--device-allow` devices ([`crate::array::scan`]).
    pub async fn assemble_recorded(
        self: &Arc<Self>,
        name: &str,
        recorded: Vec<PathBuf>,
        uuid: &str,
    ) -> Result<pb::ArrayStatus, WireError> {
        let members = self.members_here(name, recorded, uuid).await?;
        self.assemble(name, members).await
    }

    /// This node's paths of array `uuid`'s members: `recorded` when each is allowed
    /// here and holds a member of that array, else a scan of the allowed devices.
    async fn members_here(
        &self,
        name: &str,
        recorded: Vec<PathBuf>,
        uuid: &str,
    ) -> Result<Vec<PathBuf>, WireError> {
        let Some(set_uuid) = crate::format::parse_uuid(uuid) else {
            return Err(self.err(
                Errno::Einval,
                name,
                format!(
                    "array UUID {uuid:?} is not of the form xxxxxxxx:xxxxxxxx:xxxxxxxx:xxxxxxxx"
                ),
            ));
        };
        // The record comes from etcd: bounded before each path is probed.
        self.check_count(name, recorded.len())?;
        let allow = self.cfg.registry.device_allow.clone();
        let node = self.cfg.node.clone();
        let found = tokio::task::spawn_blocking(move || {
            let allowed = |p: &Path| allow.check(p).is_ok();
            let fits = recorded.iter().all(|p| {
                allowed(p)
                    && crate::array::scan::read_superblock(p).is_some_and(|sb| sb.set_uuid == set_uuid)
            });
            if fits || allow.allows_any() {
                return Ok(recorded);
            }
            let found = crate::array::scan::find_array(&set_uuid, &allow, &recorded)?;
            tracing::info!(node = %node, recorded = ?recorded, found = ?found, "members found by array UUID");
            let missing = crate::array::scan::missing_active_of(&found);
            if !missing.is_empty() {
                return Err(MembersHere::Missing { found, missing });
            }
            Ok(found)
        })
        .await
        .map_err(|e| self.err(Errno::Eio, name, format!("device scan task failed: {e}")))?;
        found.map_err(|e: MembersHere| {
            self.err(
                e.errno(),
                name,
                format!("assemble {name} from the cluster's record: {e}"),
            )
        })
    }

    pub(super) async fn assemble_locked(
        self: &Arc<Self>,
        name: &str,
        members: &[PathBuf],
    ) -> Result<pb::ArrayStatus, WireError> {
        if let Some(s) = self.find(name) {
            let st = s
                .registry()
                .lookup(name)
                .map(|i| i.state.to_string())
                .unwrap_or_default();
            return Err(self.err(
                Errno::Eexist,
                name,
                format!("array {name} is already assembled here ({st})"),
            ));
        }
        if members.is_empty() {
            return Err(self.err(Errno::Einval, name, "no member devices given"));
        }
        self.check_count(name, members.len())?;
        self.check_allowed(name, members)?;
        let first = self.read_any(name, members).await?;
        // The same members already assembled under another name (in any slot's
        // registry): EBUSY, before a slot lock is taken for them.
        let claim = self
            .cfg
            .registry
            .claims
            .hold(first.sb.set_uuid, name)
            .map_err(|holder| {
                let e = crate::array::claimed_error(name, &first.sb.set_uuid, &holder);
                self.err(Errno::Ebusy, name, e)
            })?;
        let sb = &first.sb;
        let mut meta = Meta {
            level: sb.level,
            ctime: sb.ctime & 0xff_ffff_ffff,
            events: sb.events,
            utime: sb.utime & 0xff_ffff_ffff,
            ..Meta::default()
        };
        if let Some(b) = first.bitmap.first() {
            meta.bitmap_kind = Some(if b.sb.is_clustered() {
                "clustered"
            } else {
                "internal"
            });
            meta.slots = b.sb.slots();
            meta.chunk_bytes = u64::from(b.sb.chunksize);
            meta.chunks = b.sb.chunks();
            meta.cluster_name = b.sb.cluster_name.clone();
        }
        let clustered = meta.bitmap_kind == Some("clustered");
        let membership = if clustered {
            let Some(session) = self.session() else {
                return Err(self.err(Errno::Eio, name, "a clustered array needs a session with mdserver, and this agent has none; check that mdserver is reachable"));
            };
            let fence = self.fence.ticket();
            let m = join::join(
                &session,
                name,
                &self.cfg.node,
                members,
                &first,
                fence,
                &self.cfg.timings,
            )
            .await
            .map_err(|e| e.context(&format!("node {}: join {name}", self.cfg.node)))?;
            Some((m, session.id()))
        } else {
            None
        };
        meta.slot = membership.as_ref().map_or(0, |(m, _)| m.slot);
        let service = self.service();
        lock(&self.meta).insert(name.to_owned(), meta.clone());
        match service.assemble_in_slot(name, members, meta.slot).await {
            Ok(_) => {
                if let Some((m, joined_on)) = membership {
                    let window = m.remote_window;
                    let slot = m.slot;
                    let paths = self
                        .raid_of(name)
                        .map_or_else(|| members.to_vec(), |(_, p)| p);
                    let arr = ClusterArray::new(&self.cfg.node, name, m, meta.slots, paths);
                    if !self.hold_if_session(&arr, joined_on) {
                        return Err(self.undo_lost_assemble(&service, name, slot).await);
                    }
                    if let Some((raid, _)) = self.raid_of(name) {
                        if let Some((lo, hi)) = window {
                            // Just assembled: no write of this node is in flight yet.
                            if let Err(e) = raid
                                .set_remote_resync_window(Some((lo * 512, hi * 512)))
                                .await
                            {
                                tracing::warn!("{e}");
                            }
                        }
                        raid.set_sync_gate(Some(Arc::new(resync::ClusterGate::new(
                            self,
                            arr.clone(),
                        ))));
                        raid.set_meta_gate(Some(Arc::new(message::MetaRound::new(self, &arr))));
                    }
                }
                // The registry's entry holds the claim until the array stops.
                claim.keep();
                let speed = *lock(&self.speed);
                let _ = service.registry().set_speed(name, speed);
                self.save_state();
                self.get(name)
            }
            Err(e) => {
                lock(&self.meta).remove(name);
                if let (Some((m, joined_on)), Some(session)) = (membership, self.session()) {
                    // The slot lock went with a lost session: nothing to release.
                    if session.id() == joined_on {
                        join::leave(&session, &m, false, &self.cfg.timings).await;
                    }
                }
                Err(self.err(e.errno(), name, e))
            }
        }
    }

    /// Records `arr` as joined if the session its slot lock was
    /// taken on (`joined_on`) is still the node's, unexpired — checked before and after
    /// the record. The session keeper clears the session before it checks the joined
    /// arrays for self-fencing, so an array is either seen by that check (and the node
    /// fences itself) or refused here: never left running without its slot lock.
    fn hold_if_session(&self, arr: &Arc<ClusterArray>, joined_on: i64) -> bool {
        let alive = || {
            self.session().is_some_and(|s| {
                s.id() == joined_on && tokio::time::Instant::now() < s.fence_deadline()
            })
        };
        if !alive() {
            return false;
        }
        let name = arr.name();
        lock(&self.clustered).insert(name.to_owned(), arr.clone());
        if alive() {
            return true;
        }
        lock(&self.clustered).remove(name);
        false
    }

    /// The session that held `name`'s slot lock was lost while the engine started: the
    /// engine is fenced first (no superblock or bitmap write from then on: a survivor
    /// may already be taking the slot over), then stopped with clients forced off. If
    /// it cannot be stopped, the engine would run on unseen by the fencing watchdog
    /// (the array was never recorded as joined): the node fences itself (exit).
    async fn undo_lost_assemble(&self, service: &Service, name: &str, slot: u32) -> WireError {
        tracing::error!(array = %name, slot, "session lost during assemble; stopping the array again without writing metadata");
        if let Some((raid, _)) = self.raid_of(name) {
            raid.fence();
        }
        let stopped = service.stop(name, true).await;
        if let Err(e) = &stopped {
            if service.registry().lookup(name).is_ok() {
                runtime::fence_now(
                    self,
                    &format!("{name} (slot {slot})"),
                    &format!("the session holding the slot lock was lost during the assemble and the array could not be stopped ({e})"),
                );
            }
        }
        lock(&self.meta).remove(name);
        let left = match stopped {
            Ok(_) => "it was stopped again without writing metadata".to_owned(),
            Err(e) => format!("it is gone, its stop reported: {e}"),
        };
        self.err(
            Errno::Eio,
            name,
            format!(
                "assemble {name}: the session with mdserver was lost after bitmap slot {slot} was taken, so the slot lock is gone; {left}; assemble again once the node's session is back"
            ),
        )
    }

    /// Stops `name` here (`docs/LIFECYCLE.md` §2 rule 4), then leaves the cluster for it.
    pub async fn stop(self: &Arc<Self>, name: &str, force: bool) -> Result<(), WireError> {
        let name = short_name(name).to_owned();
        let guard = self.begin(&name, "stop")?;
        let me = self.clone();
        self.detached(&name.clone(), async move {
            let _guard = guard;
            me.stop_locked(&name, force).await
        })
        .await
    }

    pub(super) async fn stop_locked(
        self: &Arc<Self>,
        name: &str,
        force: bool,
    ) -> Result<(), WireError> {
        let Some(service) = self.find(name) else {
            return Err(self.err(
                Errno::Enoent,
                name,
                format!("no array named {name} on this node"),
            ));
        };
        let members: Vec<PathBuf> = service
            .registry()
            .lookup(name)
            .ok()
            .and_then(|i| i.identity)
            .map(|id| id.members)
            .unwrap_or_default();
        // A last look, so a sync that ended just before the stop is still reported.
        self.observe(name);
        let r = service.stop(name, force).await;
        if service.registry().lookup(name).is_err() {
            lock(&self.meta).remove(name);
            self.save_state();
            let held = lock(&self.clustered).remove(name);
            if let (Some(arr), Some(session)) = (held, self.session()) {
                // Whether our slot is still dirty on disk after the engine's stop.
                let slot = arr.slot();
                let dirty = tokio::task::spawn_blocking(move || {
                    members
                        .iter()
                        .filter_map(|p| read_member(p).ok())
                        .any(|mm| crate::format::slots::dirty_chunks(&mm, slot) > 0)
                })
                .await
                .unwrap_or(true);
                join::leave(&session, arr.membership(), dirty, &self.cfg.timings).await;
            }
        }
        r.map(|_| ()).map_err(|e| self.err(e.errno(), name, e))
    }

    /// Stops every array (agent shutdown), forcing clients off, and leaves the cluster
    /// for each. The array list is kept: a restarted agent assembles them again.
    pub async fn shutdown(self: &Arc<Self>) {
        let saved = std::fs::read(self.state_path()).ok();
        for name in self.names() {
            if let Err(e) = self.stop(&name, true).await {
                tracing::error!(array = %name, "failed to stop at shutdown: {e}");
            }
        }
        if let Some(s) = self.service.get() {
            s.shutdown().await;
        }
        if let Some(saved) = saved {
            if let Err(e) = std::fs::write(self.state_path(), saved) {
                tracing::warn!("restoring the array list: {e}");
            }
        }
    }
}

/// Why the members of a recorded array were not found on this node.
#[derive(Debug, thiserror::Error)]
enum MembersHere {
    /// The scan found nothing usable.
    #[error(transparent)]
    Scan(#[from] crate::array::scan::ScanError),
    /// The scan found some members, not every active one.
    #[error("the devices under this agent's --device-allow patterns hold only {} of its members ({}); active device number(s) {missing:?} are not seen here — not assembling it degraded; give the member devices to do that", found.len(), found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    Missing {
        /// What was found.
        found: Vec<PathBuf>,
        /// Active device numbers not found.
        missing: Vec<u32>,
    },
}

impl MembersHere {
    fn errno(&self) -> Errno {
        match self {
            MembersHere::Scan(crate::array::scan::ScanError::Ambiguous { .. }) => Errno::Einval,
            _ => Errno::Enoent,
        }
    }
}
