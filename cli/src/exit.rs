//! Exit codes of `mdctl`: one per error reason, so scripts can branch on them.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | any other failure |
//! | 2 | usage error (bad flags or arguments) |
//! | 3 | ENOENT: no such array, node, device or superblock |
//! | 4 | EBUSY: the array, device or lock is busy (retry later or stop the user) |
//! | 5 | EINVAL: the request is invalid |
//! | 6 | EIO: an I/O error on a device |
//! | 7 | ETIMEDOUT: a cluster operation did not finish before its deadline |
//! | 8 | EEXIST: the array or member already exists |
//! | 9 | EPERM: not allowed (device outside the allow-list, not authorised) |
//! | 10 | bad metadata: a superblock or bitmap is corrupt or of an unknown kind |
//! | 11 | mdserver unreachable (nothing answered at --server / MDCTL_SERVER) |
//!
//! Cluster commands take the code from the errno that crossed the hops
//! (agent → mdserver → mdctl, [`mdcluster_proto::status`]) and print its sentence.

use mdcluster_agent::format::io::DeviceError;
use mdcluster_agent::format::FormatError;

/// A failure with its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 3: ENOENT.
    NotFound = 3,
    /// 4: EBUSY.
    Busy = 4,
    /// 5: EINVAL.
    Invalid = 5,
    /// 6: EIO.
    Io = 6,
    /// 7: ETIMEDOUT.
    TimedOut = 7,
    /// 8: EEXIST.
    Exists = 8,
    /// 9: EPERM.
    Denied = 9,
    /// 10: corrupt or unknown metadata.
    BadMetadata = 10,
    /// 11: mdserver unreachable.
    Unreachable = 11,
    /// 1: any other failure.
    Other = 1,
}

impl Exit {
    /// The exit code for a device error.
    pub fn of_device_error(e: &DeviceError) -> Exit {
        match e {
            DeviceError::Open { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => Exit::NotFound,
                std::io::ErrorKind::PermissionDenied => Exit::Denied,
                _ => Exit::Io,
            },
            DeviceError::Io { .. } | DeviceError::Unresponsive { .. } => Exit::Io,
            DeviceError::InUse { .. } => Exit::Busy,
            DeviceError::Duplicate { .. } => Exit::Invalid,
            DeviceError::Format { source, .. } => match source {
                FormatError::NoSuperblock
                | FormatError::BadMagic { .. }
                | FormatError::NoBitmap => Exit::NotFound,
                FormatError::InvalidSpec(_) | FormatError::NameTooLong { .. } => Exit::Invalid,
                _ => Exit::BadMetadata,
            },
        }
    }

    /// The exit code for an errno that crossed the wire.
    pub fn of_errno(e: mdcluster_proto::v1::Errno) -> Exit {
        use mdcluster_proto::v1::Errno;
        match e {
            Errno::Enoent => Exit::NotFound,
            Errno::Ebusy => Exit::Busy,
            Errno::Einval => Exit::Invalid,
            Errno::Eio => Exit::Io,
            Errno::Etimedout => Exit::TimedOut,
            Errno::Eexist => Exit::Exists,
            Errno::Eperm => Exit::Denied,
            Errno::Unspecified => Exit::Other,
        }
    }

    /// The process exit code.
    pub fn code(self) -> i32 {
        self as i32
    }
}
