//! The mdcluster agent library: everything a node needs to own its arrays.
//!
//! # Layout
//! - [`format`]: the md v1.2 on-disk format (superblock, bitmap, member creation), pure
//!   code over byte buffers, with the device I/O kept in [`format::io`].
//! - [`mdstat`]: `/proc/mdstat` rendered byte for byte from status data.
//! - [`cluster`]: md-cluster on the lock service: lock names, messages, resync windows.
//! - [`blockdev`]: the [`blockdev::BlockDevice`] trait the NBD export serves.
//! - [`nbd`]: the NBD export (fixed newstyle server on unix sockets and TCP).

pub mod blockdev;
pub mod cluster;
pub mod format;
pub mod mdstat;
pub mod nbd;
