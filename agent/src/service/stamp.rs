//! The superblock of a device about to be added to an array (md-cluster's add: the
//! sender writes it before NEWDISK names the device to the other nodes, who find it by
//! its device UUID): a device already holding a superblock of the array keeps its
//! identity; a blank one gets the array's superblock, copied from a live member, with
//! a free device number, a new device UUID and no role.

use std::path::{Path, PathBuf};

use mdcluster_proto::v1::Errno;

use crate::format::io::{read_member, DeviceError};

/// A device about to be added, as NEWDISK names it.
#[derive(Debug, Clone, Copy)]
pub(super) struct NewDevice {
    pub(super) device_uuid: [u8; 16],
    pub(super) dev_number: u32,
    /// Its superblock was written just now (erased again when the add is rejected).
    pub(super) stamped: bool,
}

/// Why a device to be added could not be given its superblock.
#[derive(Debug, thiserror::Error)]
pub(super) enum StampError {
    /// The device holds a member of another array.
    #[error("{} holds a member of another array ({uuid}); zero it first (mdctl zero-superblock) if it is no longer used", path.display())]
    OtherArray {
        /// The device.
        path: PathBuf,
        /// The other array's UUID.
        uuid: String,
    },
    /// No live member's superblock could be read as the template.
    #[error("no live member's superblock could be read to copy for the new device")]
    NoTemplate,
    /// Every device number is taken.
    #[error("no free device number")]
    NoDevNumber,
    /// The device is smaller than the array's members need.
    #[error("{} is too small for the array", path.display())]
    TooSmall {
        /// The device.
        path: PathBuf,
    },
    /// Opening the device or writing its superblock failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl StampError {
    pub(super) fn errno(&self) -> Errno {
        match self {
            StampError::OtherArray { .. } => Errno::Ebusy,
            StampError::NoDevNumber | StampError::TooSmall { .. } => Errno::Einval,
            StampError::NoTemplate | StampError::Device(_) => Errno::Eio,
        }
    }
}

/// See [`Node::identify_new_device`](super::Node::identify_new_device) (blocking part). `uuid_here` is the array UUID
/// as text, `template_from` the live members to copy the superblock from, `used` the
/// device numbers the array knows; `fence` gates the superblock write.
pub(super) fn stamp_new_device(
    dev: &Path,
    uuid_here: &str,
    template_from: &[PathBuf],
    used: &[u32],
    fence: Option<crate::fence::FenceTicket>,
) -> Result<NewDevice, StampError> {
    use crate::format::superblock::{feature, DevRole, MAX_DEV_LIMIT};
    if let Some(sb) = crate::array::scan::read_superblock(dev) {
        if crate::format::fmt_uuid(&sb.set_uuid) == uuid_here {
            return Ok(NewDevice {
                device_uuid: sb.device_uuid,
                dev_number: sb.dev_number,
                stamped: false,
            });
        }
        return Err(StampError::OtherArray {
            path: dev.to_owned(),
            uuid: crate::format::fmt_uuid(&sb.set_uuid),
        });
    }
    let template = template_from
        .iter()
        .find_map(|p| read_member(p).ok().map(|m| m.sb))
        .ok_or(StampError::NoTemplate)?;
    let dev_number = (0..MAX_DEV_LIMIT)
        .find(|d| !used.contains(d) && template.role_of(*d) == DevRole::Spare)
        .ok_or(StampError::NoDevNumber)?;
    let file = crate::format::io::MetaDev::open_fenced(dev, true, fence)?;
    let bytes = file.size();
    let mut sb = template.clone();
    sb.dev_number = dev_number;
    sb.device_uuid = *uuid::Uuid::new_v4().as_bytes();
    sb.data_size = (bytes / 512).saturating_sub(sb.data_offset);
    sb.feature_map &= !feature::RECOVERY_OFFSET;
    sb.recovery_offset = 0;
    if sb.data_size < sb.size {
        return Err(StampError::TooSmall {
            path: dev.to_owned(),
        });
    }
    crate::format::io::write_superblock(&file, &sb)?;
    Ok(NewDevice {
        device_uuid: sb.device_uuid,
        dev_number,
        stamped: true,
    })
}
