//! The migration vocabulary (qapi/migration.json): where a migration (a snapshot, a restore, a
//! live migration) stands, its figures, its capabilities, parameters and addresses.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where a migration (here: a snapshot to a file, or a restore from one) stands, with QEMU's
/// `MigrationStatus` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration has happened yet.
    #[default]
    None,
    /// Started: the VM is being stopped and the file opened.
    Setup,
    /// The state is being written (or read).
    Active,
    /// Finished.
    Completed,
    /// Something went wrong; see [`MigrationInfo::error_desc`].
    Failed,
    /// A cancel was asked for and is being carried out.
    Cancelling,
    /// Cancelled; the VM goes on where it was.
    Cancelled,
}

impl MigrationStatus {
    /// QEMU's name (`query-migrate`'s `status`, the MIGRATION event's `status`).
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
        }
    }
}

/// A migration capability this VMM implements (QEMU's `MigrationCapability` names). The doors
/// know QEMU's other capabilities and report them as off; setting one of them on is refused
/// before it reaches the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationCapability {
    /// Publish a [`VmEvent::Migration`] (QMP `MIGRATION` event) at each status change.
    Events,
}

impl MigrationCapability {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationCapability::Events => "events",
        }
    }
}

/// A capability and whether it is on: `{"capability": "events", "state": true}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationCapabilityState {
    /// Which capability.
    pub capability: MigrationCapability,
    /// On or off.
    pub state: bool,
}

/// What `QueryMigrate` reports, shaped after QEMU's `MigrationInfo`: times in milliseconds,
/// sizes in bytes. As in QEMU, a member is `None` when it does not apply: everything but
/// `status` before the first migration; only `status` (and `error_desc`) after a failure or on
/// the receiving side of a restore; times and `ram` once a snapshot completed.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct MigrationInfo {
    /// Where it stands.
    pub status: MigrationStatus,
    /// From the request to the end (QEMU `total-time`).
    pub total_time_ms: Option<u64>,
    /// From the request until the state started to be written (QEMU `setup-time`).
    pub setup_time_ms: Option<u64>,
    /// How long the guest was stopped for it (QEMU `downtime`), once completed.
    pub downtime_ms: Option<u64>,
    /// While active: how long the guest would be stopped if it switched over now, at the
    /// measured bandwidth (QEMU `expected-downtime`).
    pub expected_downtime_ms: Option<u64>,
    /// Guest memory statistics (QEMU `ram`).
    pub ram: Option<RamStats>,
    /// Why it failed (QEMU `error-desc`).
    pub error_desc: Option<String>,
}

/// Guest memory statistics of a migration (QEMU's `MigrationStats`, the members that apply).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct RamStats {
    /// Bytes written to the stream.
    pub transferred: u64,
    /// Bytes still to write (0 once completed).
    pub remaining: u64,
    /// Guest memory size in bytes.
    pub total: u64,
    /// Zero pages (QEMU `duplicate`): recorded, not written.
    pub duplicate: u64,
    /// Pages written in full (QEMU `normal`).
    pub normal: u64,
    /// Bytes of those pages (QEMU `normal-bytes`).
    pub normal_bytes: u64,
    /// Throughput in megabits per second (QEMU `mbps`).
    pub mbps: f64,
    /// Pages written per second (QEMU `pages-per-second`).
    pub pages_per_second: u64,
    /// Pages the guest dirtied per second in the last round (QEMU `dirty-pages-rate`).
    pub dirty_pages_rate: u64,
    /// Dirty-log syncs so far, one per round (QEMU `dirty-sync-count`).
    pub dirty_sync_count: u64,
    /// Bytes sent while the guest was stopped (QEMU `downtime-bytes`).
    pub downtime_bytes: u64,
}

/// Where a live migration goes to, or is received on: QEMU's `tcp:HOST:PORT` and
/// `unix:PATH` URIs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationAddress {
    /// A TCP address: a host name, an IPv4 address, or an IPv6 address (`[::1]` in a URI).
    Tcp {
        /// The host.
        host: String,
        /// The port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

impl MigrationAddress {
    /// Parses `tcp:HOST:PORT` or `unix:PATH`; `None` for any other scheme (the caller words
    /// the error for its door). A bad address in a known scheme is an `Err` with QEMU's text.
    pub fn parse(uri: &str) -> Option<Result<MigrationAddress, String>> {
        if let Some(rest) = uri.strip_prefix("tcp:") {
            return Some(
                parse_host_port(rest).map(|(host, port)| MigrationAddress::Tcp { host, port }),
            );
        }
        if let Some(path) = uri.strip_prefix("unix:") {
            if path.is_empty() {
                return Some(Err("unix: needs a socket path".into()));
            }
            if path.contains('\0') {
                return Some(Err("a socket path cannot contain NUL".into()));
            }
            return Some(Ok(MigrationAddress::Unix(PathBuf::from(path))));
        }
        None
    }
}

/// `HOST:PORT` or `[V6]:PORT` (QEMU's inet_parse); an empty host or `0` means any address.
fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        match rest.split_once("]:") {
            Some((h, p)) if !h.contains(['[', ']']) => (h, p),
            _ => return Err(format!("error parsing IPv6 address '{s}'")),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains([':', '[', ']']) => (h, p),
            _ => return Err(format!("error parsing address '{s}'")),
        }
    };
    // Digits only (no sign), as QEMU's inet_parse reads a port.
    let port: u16 = match port.len() {
        1..=5 if port.bytes().all(|b| b.is_ascii_digit()) => port.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("error parsing port in address '{s}'"))?;
    Ok((host.to_string(), port))
}

impl fmt::Display for MigrationAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationAddress::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// QEMU's default `downtime-limit`, ms.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// QEMU's largest `downtime-limit` (2000 s), ms.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;
/// QEMU's default `max-bandwidth`: 128 MiB/s.
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;

/// The migration parameters this VMM implements (QEMU's `MigrationParameters` members of the
/// same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationParameters {
    /// The longest the guest may be stopped at the switchover, ms (QEMU `downtime-limit`).
    pub downtime_limit_ms: u64,
    /// The most bytes per second to send, 0 for no limit (QEMU `max-bandwidth`).
    pub max_bandwidth: u64,
}

impl Default for MigrationParameters {
    fn default() -> Self {
        MigrationParameters {
            downtime_limit_ms: DEFAULT_DOWNTIME_LIMIT_MS,
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
        }
    }
}

/// A change to [`MigrationParameters`]: what is left out stays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationParametersUpdate {
    /// New `downtime-limit`, ms (at most [`MAX_DOWNTIME_LIMIT_MS`]).
    pub downtime_limit_ms: Option<u64>,
    /// New `max-bandwidth`, bytes per second.
    pub max_bandwidth: Option<u64>,
}

impl MigrationParametersUpdate {
    /// Checks the ranges, with QEMU's text (migration/options.c; every u64 is a valid
    /// `max-bandwidth` on a 64-bit host).
    pub fn check(&self) -> Result<(), String> {
        if self
            .downtime_limit_ms
            .is_some_and(|d| d > MAX_DOWNTIME_LIMIT_MS)
        {
            return Err(
                "Parameter 'downtime_limit' expects an integer in the range of 0 to \
                        (2000 * 1000) ms"
                    .into(),
            );
        }
        Ok(())
    }

    /// Applies the change.
    pub fn apply(&self, p: &mut MigrationParameters) {
        if let Some(d) = self.downtime_limit_ms {
            p.downtime_limit_ms = d;
        }
        if let Some(b) = self.max_bandwidth {
            p.max_bandwidth = b;
        }
    }
}
