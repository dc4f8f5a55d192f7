//! Storage-level fencing: SCSI-3 / NVMe persistent reservations through Linux's generic
//! block PR ioctls (`linux/pr.h`), behind a trait with an in-memory double.
//!
//! The protocol (md-cluster has none; this is what a SAN-grade fence adds to the fence
//! gate of [`crate::fence`], which cannot stop a write already inside the kernel):
//!
//! - every node registers its **key** on every member (register-and-ignore: whatever it
//!   had registered before is replaced) and the first one reserves the device as
//!   **write-exclusive, registrants only**: from then on only registered nodes may
//!   write; a node that is not registered gets a reservation conflict from the device
//!   itself, whatever it has queued;
//! - the key is per node and slot, and its low bits are the **fencing token** of the
//!   node's slot lock ([`PrKey::new`]): a node that rejoins gets a new token, so a
//!   stale registration of an earlier incarnation is never the current one;
//! - a survivor that takes a dead node's slot over **preempts the dead node's key**
//!   first (the device drops that registration, and the reservation moves to the
//!   survivor if the dead node held it), then recovers the slot: a write the dead node
//!   issues later is refused by the device;
//! - a node that leaves unregisters.
//!
//! A device whose block driver does not implement PR (loop, most virtual disks, regular
//! files) answers `ENOTTY`/`EOPNOTSUPP`: [`probe`] reports it unsupported and the array
//! is fenced by the gate only, logged once per device. Devices that implement it: SCSI
//! disks (`sd`, including iSCSI and FC LUNs whose target supports SCSI-3 PR) and NVMe
//! namespaces with reservations.
//!
//! Wired into the agent per clustered array ([`ArrayPr`], held in the node's membership,
//! `service::join` and `service::takeover`): members are probed once when the node
//! joins the array; the joiner registers `PrKey::new(slot, token)` on every member
//! that takes reservations and publishes the key in its slot lock's value block
//! (`cluster::ResyncInfo::pr_key`); a survivor reads that key from the dead node's slot
//! lock and preempts it before it recovers the slot (no key published: it cannot fence
//! by storage, logged, the gate only); a leave unregisters. A write the device refuses
//! with a reservation conflict (`EBADE`) is fenced, never a member failure
//! ([`crate::fence::is_fenced`]).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A reservation key: the slot (high byte, plus one: never zero) and the fencing token
/// of the node's slot lock (low 56 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrKey(pub u64);

impl PrKey {
    /// The key of the node holding bitmap slot `slot` with slot-lock fencing token
    /// `token`.
    pub fn new(slot: u32, token: u64) -> PrKey {
        PrKey(((u64::from(slot) + 1) << 56) | (token & ((1 << 56) - 1)))
    }

    /// The slot this key belongs to.
    pub fn slot(self) -> u32 {
        ((self.0 >> 56) as u32).saturating_sub(1)
    }

    /// The fencing token this key carries.
    pub fn token(self) -> u64 {
        self.0 & ((1 << 56) - 1)
    }
}

/// Errors of a reservation operation.
#[derive(Debug, thiserror::Error)]
pub enum PrError {
    /// The device's driver does not implement persistent reservations.
    #[error("{}: persistent reservations are not supported by this device ({source}); it is fenced by the agent's fence gate only", path.display())]
    Unsupported {
        /// The device.
        path: PathBuf,
        /// ENOTTY or EOPNOTSUPP.
        source: io::Error,
    },
    /// The device refused the operation (a reservation conflict: the key is not
    /// registered, or another node holds the reservation).
    #[error("{}: {op} refused by the device: {source}", path.display())]
    Conflict {
        /// The device.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Reservation type: write exclusive, registrants only (`PR_WRITE_EXCLUSIVE_REG_ONLY`).
pub const PR_WRITE_EXCLUSIVE_REG_ONLY: u32 = 3;

/// Persistent-reservation operations on one device.
pub trait Reservations: Send + Sync {
    /// The device.
    fn path(&self) -> &Path;
    /// Registers `key`, replacing whatever this node had registered
    /// (register-and-ignore).
    fn register(&self, key: PrKey) -> Result<(), PrError>;
    /// Removes this node's registration of `key`.
    fn unregister(&self, key: PrKey) -> Result<(), PrError>;
    /// Reserves the device write-exclusive, registrants only, as `key`.
    fn reserve(&self, key: PrKey) -> Result<(), PrError>;
    /// As `mine`, removes `victim`'s registration (and takes the reservation if
    /// `victim` held it).
    fn preempt(&self, mine: PrKey, victim: PrKey) -> Result<(), PrError>;
    /// As `mine`, removes every registration and the reservation.
    fn clear(&self, mine: PrKey) -> Result<(), PrError>;
}

/// Joins a device: registers `key` and reserves the device unless a registrant holds
/// the reservation already (then this node writes as a registrant).
pub fn join_device(dev: &dyn Reservations, key: PrKey) -> Result<(), PrError> {
    dev.register(key)?;
    match dev.reserve(key) {
        Ok(()) | Err(PrError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Takes a dead node's slot over on a device: preempts `dead` as `mine` (before the
/// slot is recovered). A dead key that is not registered (any more) is fine.
pub fn take_over_device(dev: &dyn Reservations, mine: PrKey, dead: PrKey) -> Result<(), PrError> {
    match dev.preempt(mine, dead) {
        Ok(()) => Ok(()),
        Err(PrError::Conflict { .. }) if mine != dead => {
            // Not registered: nothing of the dead node's to remove, unless ours is
            // gone too (then the preempt must fail: register again first).
            dev.register(mine)?;
            dev.preempt(mine, dead).or(Ok(()))
        }
        Err(e) => Err(e),
    }
}

/// The reservation side of one clustered array on this node: the members that take
/// persistent reservations (opened once, at join) and those fenced by the gate only.
/// Every operation is applied to every reservation-capable member; a failure on one is
/// returned after the others were tried.
#[derive(Clone, Default)]
pub struct ArrayPr {
    devices: Vec<Arc<dyn Reservations>>,
    gate_only: Vec<PathBuf>,
}

impl std::fmt::Debug for ArrayPr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArrayPr")
            .field(
                "reservation",
                &self.devices.iter().map(|d| d.path()).collect::<Vec<_>>(),
            )
            .field("gate_only", &self.gate_only)
            .finish()
    }
}

impl ArrayPr {
    /// Probes the members of clustered array `array` once ([`probe`]) and opens those
    /// that take reservations; the others are logged (once per device) as fenced by the
    /// gate only. Blocking.
    pub fn probe(array: &str, members: &[PathBuf]) -> ArrayPr {
        let mut out = ArrayPr::default();
        for p in members {
            let opened = probe(p).and_then(|()| {
                BlockPr::open(p).map_err(|source| PrError::Unsupported {
                    path: p.clone(),
                    source,
                })
            });
            match opened {
                Ok(dev) => {
                    tracing::info!(array, device = %p.display(), "fenced by persistent reservation");
                    out.devices.push(Arc::new(dev));
                }
                Err(e) => {
                    report_once(array, p, &e);
                    out.gate_only.push(p.clone());
                }
            }
        }
        out
    }

    /// An array whose reservation-capable members are `devices` and whose other members
    /// are `gate_only` (tests substitute [`MemoryPr`]).
    pub fn with_devices(devices: Vec<Arc<dyn Reservations>>, gate_only: Vec<PathBuf>) -> ArrayPr {
        ArrayPr { devices, gate_only }
    }

    /// Whether any member takes reservations.
    pub fn any(&self) -> bool {
        !self.devices.is_empty()
    }

    /// How member `path` is fenced: `"reservation"` or `"gate only"`.
    pub fn fenced_by(&self, path: &Path) -> &'static str {
        if self.devices.iter().any(|d| d.path() == path) {
            "reservation"
        } else {
            "gate only"
        }
    }

    /// Members fenced by the gate only.
    pub fn gate_only(&self) -> &[PathBuf] {
        &self.gate_only
    }

    fn each(
        &self,
        mut f: impl FnMut(&dyn Reservations) -> Result<(), PrError>,
    ) -> Result<(), PrError> {
        let mut first = None;
        for d in &self.devices {
            if let Err(e) = f(d.as_ref()) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Join: registers `key` on every member and reserves each one nobody holds
    /// ([`join_device`]). Also after a new session (a new token: register-and-ignore
    /// replaces the old key).
    pub fn join(&self, key: PrKey) -> Result<(), PrError> {
        self.each(|d| join_device(d, key))
    }

    /// A takeover of a dead node's slot: preempts `dead` as `mine` on every member
    /// ([`take_over_device`]), then reserves where nobody holds the reservation (its
    /// holder may have left: unregistering released it), so that the preempted node's
    /// writes are refused.
    pub fn take_over(&self, mine: PrKey, dead: PrKey) -> Result<(), PrError> {
        self.each(|d| {
            take_over_device(d, mine, dead)?;
            match d.reserve(mine) {
                Ok(()) | Err(PrError::Conflict { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    /// Leave: unregisters `key` on every member.
    pub fn leave(&self, key: PrKey) -> Result<(), PrError> {
        self.each(|d| d.unregister(key))
    }
}

/// Generic block-layer PR ioctls (`linux/pr.h`) on a block device.
pub struct BlockPr {
    file: File,
    path: PathBuf,
}

#[repr(C)]
struct PrRegistration {
    old_key: u64,
    new_key: u64,
    flags: u32,
    pad: u32,
}

#[repr(C)]
struct PrReservation {
    key: u64,
    kind: u32,
    flags: u32,
}

#[repr(C)]
struct PrPreempt {
    old_key: u64,
    new_key: u64,
    kind: u32,
    flags: u32,
}

#[repr(C)]
struct PrClear {
    key: u64,
    flags: u32,
    pad: u32,
}

const PR_FL_IGNORE_KEY: u32 = 1;
/// `_IOW('p', nr, T)`.
const fn iow_p<T>(nr: u64) -> u64 {
    (1 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | ((b'p' as u64) << 8) | nr
}
const IOC_PR_REGISTER: u64 = iow_p::<PrRegistration>(200);
const IOC_PR_RESERVE: u64 = iow_p::<PrReservation>(201);
const IOC_PR_RELEASE: u64 = iow_p::<PrReservation>(202);
const IOC_PR_PREEMPT: u64 = iow_p::<PrPreempt>(203);
const IOC_PR_CLEAR: u64 = iow_p::<PrClear>(205);

impl BlockPr {
    /// Opens `path` (read-write: the kernel asks for it) for reservation ioctls.
    pub fn open(path: &Path) -> io::Result<BlockPr> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(BlockPr {
            file,
            path: path.to_owned(),
        })
    }

    fn ioctl<T>(&self, op: &'static str, req: u64, arg: &T) -> Result<(), PrError> {
        use std::os::fd::AsRawFd;
        // SAFETY: `req` is one of the PR ioctls, each of which reads one `T` (the
        // matching `linux/pr.h` struct, 16 bytes, repr(C)) through the valid pointer.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), req as libc::Ioctl, arg as *const T) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        Err(classify(&self.path, op, e))
    }
}

/// ENOTTY/EOPNOTSUPP (and EINVAL from drivers without PR on some kernels' files):
/// unsupported; anything else: the device refused.
fn classify(path: &Path, op: &'static str, e: io::Error) -> PrError {
    match e.raw_os_error() {
        Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP) => PrError::Unsupported {
            path: path.to_owned(),
            source: e,
        },
        _ => PrError::Conflict {
            path: path.to_owned(),
            op,
            source: e,
        },
    }
}

impl Reservations for BlockPr {
    fn path(&self) -> &Path {
        &self.path
    }

    fn register(&self, key: PrKey) -> Result<(), PrError> {
        let r = PrRegistration {
            old_key: 0,
            new_key: key.0,
            flags: PR_FL_IGNORE_KEY,
            pad: 0,
        };
        self.ioctl("register", IOC_PR_REGISTER, &r)
    }

    fn unregister(&self, key: PrKey) -> Result<(), PrError> {
        let r = PrRegistration {
            old_key: key.0,
            new_key: 0,
            flags: 0,
            pad: 0,
        };
        self.ioctl("unregister", IOC_PR_REGISTER, &r)
    }

    fn reserve(&self, key: PrKey) -> Result<(), PrError> {
        let r = PrReservation {
            key: key.0,
            kind: PR_WRITE_EXCLUSIVE_REG_ONLY,
            flags: 0,
        };
        self.ioctl("reserve", IOC_PR_RESERVE, &r)
    }

    fn preempt(&self, mine: PrKey, victim: PrKey) -> Result<(), PrError> {
        let r = PrPreempt {
            old_key: mine.0,
            new_key: victim.0,
            kind: PR_WRITE_EXCLUSIVE_REG_ONLY,
            flags: 0,
        };
        self.ioctl("preempt", IOC_PR_PREEMPT, &r)
    }

    fn clear(&self, mine: PrKey) -> Result<(), PrError> {
        let r = PrClear {
            key: mine.0,
            flags: 0,
            pad: 0,
        };
        self.ioctl("clear", IOC_PR_CLEAR, &r)
    }
}

/// Whether `path` takes persistent reservations. Side-effect free: a RELEASE with key
/// 0 (never a registered key) changes nothing on a device that implements PR (it is
/// refused or ignored), and a device that does not answers ENOTTY/EOPNOTSUPP.
pub fn probe(path: &Path) -> Result<(), PrError> {
    let dev = BlockPr::open(path).map_err(|source| PrError::Unsupported {
        path: path.to_owned(),
        source,
    })?;
    let r = PrReservation {
        key: 0,
        kind: PR_WRITE_EXCLUSIVE_REG_ONLY,
        flags: 0,
    };
    match dev.ioctl("probe", IOC_PR_RELEASE, &r) {
        Ok(()) | Err(PrError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Devices already reported as fenced by the gate only.
static REPORTED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// Probes the members of clustered array `array` and logs, once per device, each one
/// that is fenced by the fence gate only (no persistent reservations). Returns those
/// devices.
pub fn report_gate_only(array: &str, members: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in members {
        if let Err(e @ PrError::Unsupported { .. }) = probe(p) {
            report_once(array, p, &e);
            out.push(p.clone());
        }
    }
    out
}

/// Logs, once per device, that `p` of `array` is fenced by the fence gate only.
fn report_once(array: &str, p: &Path, e: &PrError) {
    let first = REPORTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(p.to_owned());
    if first {
        tracing::warn!(array, device = %p.display(), "fenced by the fence gate only: {e}");
    }
}

/// An in-memory device with SCSI-3 persistent-reservation semantics (registrations,
/// one write-exclusive-registrants-only reservation), shared by several "nodes" (each a
/// [`MemoryPr`] handle) — the test double of [`BlockPr`]. [`MemoryPr::write`] is a data
/// write as the device would judge it.
#[derive(Debug, Default)]
pub struct MemoryDevice {
    state: Mutex<MemState>,
}

#[derive(Debug, Default)]
struct MemState {
    /// Registered keys by the node (I_T nexus) that registered them.
    keys: HashMap<String, PrKey>,
    /// The reservation holder's key.
    holder: Option<PrKey>,
}

/// One node's handle on a [`MemoryDevice`].
#[derive(Debug, Clone)]
pub struct MemoryPr {
    dev: Arc<MemoryDevice>,
    node: String,
    path: PathBuf,
}

impl MemoryPr {
    /// Node `node`'s view of `dev`.
    pub fn new(dev: Arc<MemoryDevice>, node: &str) -> MemoryPr {
        MemoryPr {
            dev,
            node: node.to_owned(),
            path: PathBuf::from(format!("mem:{node}")),
        }
    }

    fn conflict(&self, op: &'static str) -> PrError {
        PrError::Conflict {
            path: self.path.clone(),
            op,
            source: io::Error::from_raw_os_error(libc::EBADE),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.dev.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A data write from this node: refused (a reservation conflict) while the device
    /// is reserved and this node is not registered.
    pub fn write(&self) -> Result<(), PrError> {
        let st = self.state();
        if st.holder.is_some() && !st.keys.contains_key(&self.node) {
            return Err(self.conflict("write"));
        }
        Ok(())
    }

    /// This node's registered key.
    pub fn registered(&self) -> Option<PrKey> {
        self.state().keys.get(&self.node).copied()
    }

    /// The reservation holder's key.
    pub fn holder(&self) -> Option<PrKey> {
        self.state().holder
    }
}

impl Reservations for MemoryPr {
    fn path(&self) -> &Path {
        &self.path
    }

    fn register(&self, key: PrKey) -> Result<(), PrError> {
        let mut st = self.state();
        let old = st.keys.insert(self.node.clone(), key);
        if st.holder.is_some() && st.holder == old {
            st.holder = Some(key);
        }
        Ok(())
    }

    fn unregister(&self, key: PrKey) -> Result<(), PrError> {
        let mut st = self.state();
        if st.keys.get(&self.node) != Some(&key) {
            return Err(self.conflict("unregister"));
        }
        st.keys.remove(&self.node);
        if st.holder == Some(key) {
            st.holder = None;
        }
        Ok(())
    }

    fn reserve(&self, key: PrKey) -> Result<(), PrError> {
        let mut st = self.state();
        if st.keys.get(&self.node) != Some(&key) {
            return Err(self.conflict("reserve"));
        }
        match st.holder {
            None => {
                st.holder = Some(key);
                Ok(())
            }
            Some(h) if h == key => Ok(()),
            Some(_) => Err(self.conflict("reserve")),
        }
    }

    fn preempt(&self, mine: PrKey, victim: PrKey) -> Result<(), PrError> {
        let mut st = self.state();
        if st.keys.get(&self.node) != Some(&mine) {
            return Err(self.conflict("preempt"));
        }
        let before = st.keys.len();
        st.keys.retain(|_, k| *k != victim);
        if st.holder == Some(victim) {
            st.holder = Some(mine);
        } else if st.keys.len() == before {
            return Err(self.conflict("preempt"));
        }
        Ok(())
    }

    fn clear(&self, mine: PrKey) -> Result<(), PrError> {
        let mut st = self.state();
        if st.keys.get(&self.node) != Some(&mine) {
            return Err(self.conflict("clear"));
        }
        st.keys.clear();
        st.holder = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_slot_and_token() {
        let k = PrKey::new(3, 0x1234_5678);
        assert_eq!((k.slot(), k.token()), (3, 0x1234_5678));
        assert_ne!(PrKey::new(0, 0).0, 0, "never the zero key");
        assert_ne!(PrKey::new(1, 7), PrKey::new(1, 8), "a rejoin has a new key");
        // linux/pr.h: struct pr_registration and pr_preempt are 24 bytes, the others 16.
        assert_eq!(IOC_PR_REGISTER, 0x4018_70c8);
        assert_eq!(IOC_PR_RESERVE, 0x4010_70c9);
        assert_eq!(IOC_PR_RELEASE, 0x4010_70ca);
        assert_eq!(IOC_PR_PREEMPT, 0x4018_70cb);
        assert_eq!(IOC_PR_CLEAR, 0x4010_70cd);
    }

    #[test]
    fn a_preempted_node_cannot_write_any_more() {
        let dev = Arc::new(MemoryDevice::default());
        let (n1, n2) = (
            MemoryPr::new(dev.clone(), "n1"),
            MemoryPr::new(dev.clone(), "n2"),
        );
        let (k1, k2) = (PrKey::new(0, 10), PrKey::new(1, 11));
        // Before any reservation anyone writes.
        n2.write().unwrap();
        join_device(&n1, k1).unwrap();
        join_device(&n2, k2).unwrap();
        assert_eq!(n1.holder(), Some(k1), "the first to join reserves");
        n1.write().unwrap();
        n2.write().unwrap();
        // node2 dies (or is paused); node1 takes its slot over: preempt first.
        take_over_device(&n1, k1, k2).unwrap();
        assert_eq!(n2.registered(), None);
        assert!(
            matches!(n2.write(), Err(PrError::Conflict { .. })),
            "the dead node's later write is refused by the device"
        );
        n1.write().unwrap();
        // A stranger that never registered cannot write either.
        let n3 = MemoryPr::new(dev.clone(), "n3");
        assert!(n3.write().is_err());
        // node2 rejoins with a new token: a new key, it writes again.
        join_device(&n2, PrKey::new(1, 12)).unwrap();
        n2.write().unwrap();
    }

    #[test]
    fn preempting_the_holder_moves_the_reservation() {
        let dev = Arc::new(MemoryDevice::default());
        let (n1, n2) = (
            MemoryPr::new(dev.clone(), "n1"),
            MemoryPr::new(dev.clone(), "n2"),
        );
        let (k1, k2) = (PrKey::new(0, 1), PrKey::new(1, 2));
        join_device(&n2, k2).unwrap();
        join_device(&n1, k1).unwrap();
        assert_eq!(n1.holder(), Some(k2));
        take_over_device(&n1, k1, k2).unwrap();
        assert_eq!(
            n1.holder(),
            Some(k1),
            "the survivor holds the reservation now"
        );
        assert!(n2.write().is_err());
        // The dead key again (a second survivor, or a retry): nothing to remove, fine.
        take_over_device(&n1, k1, k2).unwrap();
        // A node that is not registered cannot preempt anyone.
        assert!(n2.preempt(k2, k1).is_err());
        n1.write().unwrap();
    }

    #[test]
    fn a_stale_key_of_an_earlier_incarnation_is_not_the_current_one() {
        let dev = Arc::new(MemoryDevice::default());
        let (n1, n2) = (
            MemoryPr::new(dev.clone(), "n1"),
            MemoryPr::new(dev.clone(), "n2"),
        );
        let (k1, old2, new2) = (PrKey::new(0, 1), PrKey::new(1, 2), PrKey::new(1, 5));
        join_device(&n1, k1).unwrap();
        join_device(&n2, old2).unwrap();
        // node2 restarted and rejoined (register-and-ignore replaced its key).
        join_device(&n2, new2).unwrap();
        // A survivor preempting the old incarnation's key does not fence the new one.
        take_over_device(&n1, k1, old2).unwrap();
        n2.write().unwrap();
        assert_eq!(n2.registered(), Some(new2));
        n2.unregister(new2).unwrap();
        assert!(n2.write().is_err(), "left: no writes while reserved");
        n1.clear(k1).unwrap();
        n2.write().unwrap();
    }

    fn array(dev: &[Arc<MemoryDevice>], node: &str) -> (ArrayPr, Vec<MemoryPr>) {
        let h: Vec<MemoryPr> = dev.iter().map(|d| MemoryPr::new(d.clone(), node)).collect();
        let pr = ArrayPr::with_devices(
            h.iter()
                .map(|m| Arc::new(m.clone()) as Arc<dyn Reservations>)
                .collect(),
            vec![],
        );
        (pr, h)
    }

    #[test]
    fn an_array_joins_takes_over_and_leaves_on_every_member() {
        let devs = [
            Arc::new(MemoryDevice::default()),
            Arc::new(MemoryDevice::default()),
        ];
        let (a1, h1) = array(&devs, "n1");
        let (a2, h2) = array(&devs, "n2");
        let (a3, h3) = array(&devs, "n3");
        let (k1, k2, k3) = (PrKey::new(0, 40), PrKey::new(1, 41), PrKey::new(2, 42));
        a1.join(k1).unwrap();
        a2.join(k2).unwrap();
        a3.join(k3).unwrap();
        for i in 0..2 {
            assert_eq!(h1[i].registered(), Some(k1));
            assert_eq!(h2[i].registered(), Some(k2));
            assert_eq!(h1[i].holder(), Some(k1), "the first joiner reserves");
        }
        // The holder leaves: unregistered, and the reservation goes with it.
        a1.leave(k1).unwrap();
        for h in &h1 {
            assert_eq!(h.registered(), None);
            assert_eq!(h.holder(), None);
        }
        // n3 dies; n2 takes its slot over: n3 preempted, and the device reserved again
        // (an unreserved device would take anyone's write).
        a2.take_over(k2, k3).unwrap();
        for i in 0..2 {
            assert_eq!(h3[i].registered(), None);
            assert_eq!(h2[i].holder(), Some(k2));
            assert!(matches!(h3[i].write(), Err(PrError::Conflict { .. })));
            h2[i].write().unwrap();
        }
        // A rejoin with a new token registers the new key (register-and-ignore).
        let k3b = PrKey::new(2, 50);
        a3.join(k3b).unwrap();
        for h in &h3 {
            assert_eq!(h.registered(), Some(k3b));
            h.write().unwrap();
        }
        assert_eq!(a2.fenced_by(Path::new("mem:n2")), "reservation");
    }

    #[test]
    fn an_array_without_reservations_does_nothing() {
        let pr = ArrayPr::with_devices(vec![], vec![PathBuf::from("/dev/loop9")]);
        assert!(!pr.any());
        let k = PrKey::new(0, 1);
        pr.join(k).unwrap();
        pr.take_over(k, PrKey::new(1, 2)).unwrap();
        pr.leave(k).unwrap();
        assert_eq!(pr.fenced_by(Path::new("/dev/loop9")), "gate only");
        assert_eq!(pr.gate_only(), [PathBuf::from("/dev/loop9")]);
    }

    #[test]
    fn loop_devices_and_files_are_fenced_by_the_gate_only() {
        // A regular file answers ENOTTY.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m");
        std::fs::write(&f, vec![0u8; 1 << 20]).unwrap();
        assert!(matches!(probe(&f), Err(PrError::Unsupported { .. })));
        // A loop device (no PR ops in its driver): EOPNOTSUPP.
        let l = crate::testloop::Loop::attach(&f, 512);
        let e = probe(&l.0).unwrap_err();
        assert!(matches!(e, PrError::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("fence gate only"), "{e}");
        let dev = BlockPr::open(&l.0).unwrap();
        let e = join_device(&dev, PrKey::new(0, 1)).unwrap_err();
        assert!(matches!(e, PrError::Unsupported { .. }), "{e}");
        let gate_only = report_gate_only("md0", &[l.0.clone(), f.clone()]);
        assert_eq!(gate_only, vec![l.0.clone(), f.clone()]);
        // What a join sees: no member takes reservations, nothing is registered.
        let pr = ArrayPr::probe("md0", &[l.0.clone(), f.clone()]);
        assert!(!pr.any(), "{pr:?}");
        assert_eq!(pr.gate_only(), [l.0.clone(), f.clone()]);
        pr.join(PrKey::new(0, 1)).unwrap();
        assert_eq!(pr.fenced_by(&l.0), "gate only");
    }
}
