//! What this node shows of its arrays, by lookups that never allocate: names, the
//! status of one or all arrays, the mdstat text and the engine figures behind it, the
//! resync speed limits, and the NBD [`Exports`] of the node.

use std::path::Path;
use std::sync::Arc;

use mdcluster_proto::status::WireError;
use mdcluster_proto::v1 as pb;
use mdcluster_proto::v1::Errno;

use super::{lock, short_name, Node};
use crate::array::{ArrayInfo, ArrayState};
use crate::mdstat::{self, ArrayStat, BitmapStat, SyncStat};
use crate::nbd::{ClientInfo, Exports, OpenError, OpenExport};
use crate::raid::{MemberState, SpeedLimits};

impl Node {
    /// Every array name here, in any state.
    pub fn names(&self) -> Vec<String> {
        self.registry().map(|r| r.names()).unwrap_or_default()
    }

    /// The status of `name` here (pure lookup).
    pub fn get(&self, name: &str) -> Result<pb::ArrayStatus, WireError> {
        let name = short_name(name);
        match self.info(name) {
            Some((info, service)) => Ok(self.status_of(&info, &service.socket_path(name))),
            None => Err(self.err(
                Errno::Enoent,
                name,
                format!("no array named {name} on this node"),
            )),
        }
    }

    /// Every array here.
    pub fn list(&self) -> Vec<pb::ArrayStatus> {
        self.names()
            .iter()
            .filter_map(|n| self.get(n).ok())
            .collect()
    }

    /// This node's `/proc/mdstat` (active and stopping arrays).
    pub fn mdstat(&self) -> String {
        let stats: Vec<ArrayStat> = self
            .names()
            .iter()
            .filter_map(|n| self.info(n))
            .filter_map(|(i, _)| self.stat_of(&i))
            .collect();
        mdstat::render(&stats)
    }

    /// Sets the speed limits of `name`, or of every array and the default when `name`
    /// is empty.
    pub fn set_speed(
        self: &Arc<Self>,
        name: &str,
        limits: SpeedLimits,
    ) -> Result<Vec<String>, WireError> {
        let name = short_name(name);
        if limits.min_kib_s == 0 || limits.min_kib_s > limits.max_kib_s {
            return Err(self.err(
                Errno::Einval,
                name,
                format!(
                    "speed limits min {} max {} KiB/s: need 0 < min <= max",
                    limits.min_kib_s, limits.max_kib_s
                ),
            ));
        }
        let names = if name.is_empty() {
            *lock(&self.speed) = limits;
            self.names()
        } else {
            vec![name.to_owned()]
        };
        let mut changed = Vec::new();
        for n in names {
            let Some((_, s)) = self.info(&n) else {
                if !name.is_empty() {
                    return Err(self.err(
                        Errno::Enoent,
                        &n,
                        format!("no array named {n} on this node"),
                    ));
                }
                continue;
            };
            match s.registry().set_speed(&n, limits) {
                Ok(()) => changed.push(n),
                Err(e) if name.is_empty() => tracing::debug!(array = %n, "speed not set: {e}"),
                Err(e) => return Err(self.err(e.errno(), &n, e)),
            }
        }
        Ok(changed)
    }

    fn status_of(&self, info: &ArrayInfo, socket: &Path) -> pb::ArrayStatus {
        let meta = lock(&self.meta)
            .get(&info.name)
            .cloned()
            .unwrap_or_default();
        let mut st = pb::ArrayStatus {
            name: info.name.clone(),
            node: self.cfg.node.clone(),
            state: state_pb(info.state) as i32,
            uuid: info
                .identity
                .as_ref()
                .map(|i| i.uuid.clone())
                .unwrap_or_default(),
            md_name: info
                .identity
                .as_ref()
                .map(|i| i.md_name.clone())
                .unwrap_or_default(),
            level: meta.level,
            clients: info.clients.clone(),
            nbd_socket: socket.display().to_string(),
            nbd_tcp: self.cfg.nbd_tcp.clone().unwrap_or_default(),
            ctime_secs: meta.ctime,
            events: info.sb_events.map_or(meta.events, |e| e.0),
            utime_secs: info.sb_events.map_or(meta.utime, |e| e.1 & 0xff_ffff_ffff),
            cluster_name: meta.cluster_name.clone(),
            ..Default::default()
        };
        let pr = self.cluster(&info.name).map(|a| a.membership().pr.clone());
        if let Some(r) = &info.raid {
            st.raid_disks = r.raid_disks;
            st.size_bytes = r.size;
            st.degraded = r.degraded;
            st.members = r
                .members
                .iter()
                .filter(|m| !m.removed)
                .map(|m| {
                    let (state, off) = match m.state {
                        MemberState::InSync => ("in_sync", 0),
                        MemberState::Recovering { offset, .. } => ("recovering", offset),
                        MemberState::Spare => ("spare", 0),
                        MemberState::Faulty => ("faulty", 0),
                    };
                    pb::MemberInfo {
                        path: m.path.clone(),
                        dev_number: m.dev_number,
                        role: m.role.map(u32::from),
                        state: state.to_owned(),
                        recovery_offset: off,
                        fenced_by: pr
                            .as_ref()
                            .map_or("", |pr| pr.fenced_by(Path::new(&m.path)))
                            .to_owned(),
                    }
                })
                .collect();
            let s = &r.sync;
            st.sync = Some(pb::SyncInfo {
                kind: s
                    .kind
                    .map(|k| format!("{k:?}").to_lowercase())
                    .unwrap_or_default(),
                state: format!("{:?}", s.state).to_lowercase(),
                done_bytes: s.done_bytes,
                total_bytes: s.total_bytes,
                rate_kib_s: s.rate_kib_s,
                chunks_done: s.chunks_done,
                chunks_total: s.chunks_total,
                speed_min_kib_s: s.speed.min_kib_s,
                speed_max_kib_s: s.speed.max_kib_s,
                errors: s.errors,
                last_kind: s
                    .completed
                    .last()
                    .map(|c| format!("{:?}", c.kind).to_lowercase())
                    .unwrap_or_default(),
                last_chunks: s.completed.last().map_or(0, |c| c.chunks),
                last_interrupted: s.completed.last().is_some_and(|c| c.interrupted),
                runs: s.completed.len() as u64,
            });
            if let (Some(b), Some(kind)) = (&r.bitmap, meta.bitmap_kind) {
                st.bitmap = Some(pb::BitmapInfo {
                    kind: kind.to_owned(),
                    chunks: meta.chunks,
                    chunk_bytes: meta.chunk_bytes,
                    dirty_bits: b.dirty_bits,
                    needed: b.needed,
                    slot: meta.slot,
                    slots: meta.slots,
                });
            }
        }
        st
    }

    /// As the standalone agent shows it ([`crate::array::service::array_stat`]), plus
    /// the cluster's: another node's resync window, the level and bitmap geometry of
    /// the array's record.
    fn stat_of(&self, info: &ArrayInfo) -> Option<ArrayStat> {
        let raid = self.raid_of(&info.name).map(|(r, _)| r);
        let mut st = crate::array::service::array_stat(info, raid.as_deref())?;
        if st.sync.is_none() && raid.is_some_and(|r| r.remote_resync_window().is_some()) {
            st.sync = Some(SyncStat::Remote(mdstat::SyncKind::Resync));
        }
        let meta = lock(&self.meta)
            .get(&info.name)
            .cloned()
            .unwrap_or_default();
        st.level = if meta.level == 0 { 1 } else { meta.level };
        st.bitmap = meta.bitmap_kind.map(|_| BitmapStat {
            chunks: meta.chunks,
            chunk_bytes: meta.chunk_bytes,
        });
        Some(st)
    }
}

impl Exports for Node {
    fn list(&self) -> Vec<String> {
        self.registry()
            .map(|r| Exports::list(&**r))
            .unwrap_or_default()
    }

    fn open(&self, name: &str, client: &ClientInfo) -> Result<OpenExport, OpenError> {
        match self.find(name) {
            Some(s) => Exports::open(&**s.registry(), name, client),
            None => Err(OpenError::NotFound {
                name: name.to_owned(),
            }),
        }
    }
}

fn state_pb(s: ArrayState) -> pb::ArrayRunState {
    match s {
        ArrayState::Assembling => pb::ArrayRunState::Assembling,
        ArrayState::Active => pb::ArrayRunState::Active,
        ArrayState::Stopping => pb::ArrayRunState::Stopping,
    }
}
