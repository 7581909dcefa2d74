//! Disk configuration: the `disks` entries of the config file and the `--disk` flag.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// A name for the disk, unique within the VM (defaults to `disk<N>`).
    #[serde(default)]
    pub id: Option<String>,
    /// Image file or host block device.
    pub path: PathBuf,
    /// Image format.
    #[serde(default)]
    pub format: DiskFormat,
    /// Refuse guest writes (the image is opened read-only).
    #[serde(default)]
    pub read_only: bool,
    /// Host cache mode, as QEMU names them.
    #[serde(default)]
    pub cache: CacheMode,
    /// Serial number the guest sees (at most 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
}

/// Disk image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    /// The file is the disk.
    #[default]
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

/// Host cache modes, with QEMU's names and meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Host page cache; guest flushes reach the disk (QEMU's default).
    #[default]
    Writeback,
    /// O_DIRECT: bypass the host page cache.
    None,
    /// Host page cache, guest flushes ignored: fast, loses data on a host crash.
    Unsafe,
}

/// Longest serial the virtio-blk GET_ID request can return.
pub const DISK_SERIAL_MAX: usize = 20;

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;

    /// Parses `--disk path=P[,format=raw|qcow2][,readonly=on|off][,cache=writeback|none|unsafe]
    /// [,serial=S][,id=I]`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::Invalid {
            field: "disk",
            reason,
        };
        let mut disk = DiskConfig {
            id: None,
            path: PathBuf::new(),
            format: DiskFormat::Raw,
            read_only: false,
            cache: CacheMode::Writeback,
            serial: None,
        };
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("`{part}` is not KEY=VALUE")))?;
            match k {
                "path" => disk.path = v.into(),
                "id" => disk.id = Some(v.to_string()),
                "serial" => disk.serial = Some(v.to_string()),
                "format" => {
                    disk.format = match v {
                        "raw" => DiskFormat::Raw,
                        "qcow2" => DiskFormat::Qcow2,
                        _ => return Err(bad(format!("format `{v}` is not raw or qcow2"))),
                    }
                }
                "readonly" | "read_only" => {
                    disk.read_only = match v {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(bad(format!("readonly `{v}` is not on or off"))),
                    }
                }
                "cache" => {
                    disk.cache = match v {
                        "writeback" => CacheMode::Writeback,
                        "none" => CacheMode::None,
                        "unsafe" => CacheMode::Unsafe,
                        _ => {
                            return Err(bad(format!(
                                "cache `{v}` is not writeback, none or unsafe"
                            )))
                        }
                    }
                }
                _ => return Err(bad(format!("unknown key `{k}`"))),
            }
        }
        if disk.path.as_os_str().is_empty() {
            return Err(bad("path=... is required".into()));
        }
        Ok(disk)
    }
}
