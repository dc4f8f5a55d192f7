//! The mdcluster agent library: everything a node needs to own its arrays.
//!
//! # Layout
//! - [`format`](mod@format): the md v1.2 on-disk format (superblock, bitmap, member
//!   creation), pure code over byte buffers, with the device I/O kept in [`format::io`].
//! - [`mdstat`]: `/proc/mdstat` rendered byte for byte from status data.
//! - [`cluster`]: md-cluster on the lock service: lock names, messages, resync windows.
//! - [`blockdev`]: the [`blockdev::BlockDevice`] trait the NBD export serves.
//! - [`nbd`]: the NBD export (fixed newstyle server on unix sockets and TCP).
//! - [`iobuf`]: pooled, aligned I/O buffers (huge pages for large ones).
//! - [`directio`]: page-cache-free positional I/O on shared devices (`O_DIRECT`,
//!   aligned spans, read-modify-write), with the buffered fallback.
//! - [`fence`]: the node's fence gate, checked right before every member system call
//!   of a clustered array.
//! - [`reserve`]: storage-level fencing by SCSI/NVMe persistent reservations (the
//!   protocol, the block-layer ioctls, an in-memory double; members are probed only).
//! - [`lockport`]: the lock-service port (what the agent calls on its session, as a
//!   trait) and how sessions are opened; the gRPC lock client implements it.
//! - [`iotrace`]: the recording hook under every member write and flush (the
//!   crash-consistency checker; feature `io-trace`).
//! - [`raid`]: the RAID1 engine (members, fan-out, read balancing, failure,
//!   resync/recovery worker).
//! - [`bitmap`]: the in-memory write-intent bitmap of this node's slot.
//! - [`allow`]: the device allow-list (`--device-allow`), checked on every path.
//! - [`quote`]: long user input cut short in error messages (from `mdcluster-proto`).
//! - [`array`](mod@array): this node's arrays: registry, lifecycle, assembly, NBD exports.
//! - [`service`]: cluster mode: the gRPC agent service, the lock-service session,
//!   clustered join/leave, node-failure takeover, self-fencing, the event stream.

pub mod allow;
pub mod array;
pub mod bitmap;
pub mod blockdev;
pub mod cluster;
pub mod directio;
pub mod fence;
pub mod format;
pub mod iobuf;
pub mod iotrace;
pub mod lockport;
pub mod mdstat;
pub mod metrics;
pub mod nbd;
pub use mdcluster_proto::quote;
pub mod raid;
pub mod reserve;
pub mod service;
#[cfg(test)]
mod testloop;
