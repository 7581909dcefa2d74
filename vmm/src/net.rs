//! The VM's network cards on the host side: their taps, opened once per VMM process (a guest
//! reboot builds new virtio-net devices over the same taps, so a tap we created keeps its
//! bridge membership and address), the `script` / `downscript` runs, and the handles the
//! control plane reaches a NIC through (link state, counters).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use std::sync::Mutex;
use std::time::Duration;

use api::config::{parse_mac, RateLimiterConfig, TokenBucketConfig};
use api::{NetConfig, VmConfig};
use devices::net::{Tap, TapError};
use devices::rate_limiter::BucketConfig;
use virtio::net::{DirectionLimit, Net, NetOptions, NetRateLimits, NetShared};

/// Errors setting up a NIC: each names the NIC and is the user's to fix (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
    /// The tap could not be opened or created.
    #[error("net: NIC `{id}`: {source}")]
    Tap {
        /// NIC id.
        id: String,
        /// Why.
        source: TapError,
    },
    /// vhost-net was asked for and cannot be had.
    #[error("net.vhost: NIC `{id}`: {reason}")]
    Vhost {
        /// NIC id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The script failed or could not run.
    #[error("net.{which}: NIC `{id}`: `{} {tap}` {reason}", script.display())]
    Script {
        /// NIC id.
        id: String,
        /// "script" or "downscript".
        which: &'static str,
        /// The script.
        script: PathBuf,
        /// The tap's name (its argument).
        tap: String,
        /// What happened.
        reason: String,
    },
    /// The device model refused the configuration.
    #[error("net: NIC `{id}`: {reason}")]
    Device {
        /// NIC id.
        id: String,
        /// Why.
        reason: String,
    },
}

/// A virtio device model with its stable id.
pub type IdentifiedDevice = (String, Box<dyn virtio::VirtioDevice>);

/// What the control plane knows about one NIC.
#[derive(Clone)]
pub struct NicHandle {
    /// The NIC's id.
    pub id: String,
    /// The tap's name.
    pub tap: String,
    /// Its MAC address.
    pub mac: [u8; 6],
    /// Queue pairs.
    pub queues: u16,
    /// vhost-net in use.
    pub vhost: bool,
    /// Link state and counters.
    pub shared: Arc<NetShared>,
    /// The rate limits as configured now (rx, tx), as the user gave them.
    pub limits: Arc<Mutex<(Option<RateLimiterConfig>, Option<RateLimiterConfig>)>>,
}

fn bucket(b: &TokenBucketConfig) -> BucketConfig {
    BucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst,
        refill_time: Duration::from_millis(b.refill_time),
    }
}

fn direction(r: &Option<RateLimiterConfig>) -> DirectionLimit {
    DirectionLimit {
        bandwidth: r.as_ref().and_then(|r| r.bandwidth.as_ref()).map(bucket),
        ops: r.as_ref().and_then(|r| r.ops.as_ref()).map(bucket),
    }
}

impl NicHandle {
    /// Replaces the limits of the directions given (`Some`); the device applies them at once.
    pub fn set_rate_limits(&self, rx: Option<RateLimiterConfig>, tx: Option<RateLimiterConfig>) {
        let mut l = crate::lock(&self.limits);
        if rx.is_some() {
            l.0 = rx;
        }
        if tx.is_some() {
            l.1 = tx;
        }
        self.shared.set_rate_limits(NetRateLimits {
            rx: direction(&l.0),
            tx: direction(&l.1),
        });
    }
}

struct Nic {
    handle: NicHandle,
    taps: Vec<Tap>,
    mtu: Option<u16>,
    downscript: Option<PathBuf>,
}

/// Every NIC of the VM, for the life of the VMM process. Dropping it runs the downscripts and
/// closes the taps (a tap this process created then disappears).
pub struct NetBackends {
    nics: Vec<Nic>,
}

/// Runs `script TAP`, as QEMU runs /etc/qemu-ifup.
fn run_script(
    id: &str,
    which: &'static str,
    script: &Path,
    tap: &str,
) -> Result<(), NetSetupError> {
    let err = |reason: String| NetSetupError::Script {
        id: id.to_string(),
        which,
        script: script.to_path_buf(),
        tap: tap.to_string(),
        reason,
    };
    let out = Command::new(script)
        .arg(tap)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| err(format!("could not run: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or("").trim();
        return Err(err(match (out.status.code(), last.is_empty()) {
            (Some(c), true) => format!("failed with status {c}"),
            (Some(c), false) => format!("failed with status {c}: {last}"),
            (None, _) => format!("was killed ({})", out.status),
        }));
    }
    Ok(())
}

impl NetBackends {
    /// Opens (or creates) every NIC's tap and runs its script. On error, what was opened so far
    /// is closed again (and the downscripts of NICs whose script ran are run).
    pub fn open(cfg: &VmConfig) -> Result<NetBackends, NetSetupError> {
        let mut out = NetBackends { nics: Vec::new() };
        for (i, n) in cfg.net.iter().enumerate() {
            let id = cfg.net_id(i);
            out.nics.push(open_one(&id, n)?);
        }
        Ok(out)
    }

    /// The NICs as the control plane sees them.
    pub fn handles(&self) -> Vec<NicHandle> {
        self.nics.iter().map(|n| n.handle.clone()).collect()
    }

    /// A fresh virtio-net device for each NIC, with its id, over new fds of the same taps.
    pub fn devices(&self) -> Result<Vec<IdentifiedDevice>, NetSetupError> {
        let mut out: Vec<IdentifiedDevice> = Vec::new();
        for n in &self.nics {
            let id = n.handle.id.clone();
            let fail = |reason: String| NetSetupError::Device {
                id: id.clone(),
                reason,
            };
            let taps = n
                .taps
                .iter()
                .map(Tap::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail(format!("cannot duplicate the tap fd: {e}")))?;
            let dev = Net::with_shared(
                taps,
                NetOptions {
                    mac: n.handle.mac,
                    mtu: n.mtu,
                    vhost: n.handle.vhost,
                },
                n.handle.shared.clone(),
            )
            .map_err(|e| fail(e.to_string()))?;
            out.push((id, Box::new(dev)));
        }
        Ok(out)
    }
}

fn open_one(id: &str, n: &NetConfig) -> Result<Nic, NetSetupError> {
    if n.vhost {
        let vhost_err = |reason: String| NetSetupError::Vhost {
            id: id.to_string(),
            reason,
        };
        if n.rx_rate_limiter.is_some() || n.tx_rate_limiter.is_some() {
            return Err(vhost_err(
                "rate limiting needs the VMM's own data path; use vhost=off with a rate limiter"
                    .into(),
            ));
        }
        // Opened (and closed) once here, so a host without vhost-net is an error at start,
        // never a silent fallback or a failure when the guest's driver comes up.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(virtio::net::vhost::VHOST_NET_PATH)
            .map_err(|e| {
                vhost_err(match e.kind() {
                    std::io::ErrorKind::NotFound => format!(
                        "this host has no {} (load the vhost_net module, or use vhost=off)",
                        virtio::net::vhost::VHOST_NET_PATH
                    ),
                    _ => format!("cannot open {}: {e}", virtio::net::vhost::VHOST_NET_PATH),
                })
            })?;
    }
    let mac = n
        .mac
        .as_deref()
        .and_then(parse_mac)
        .ok_or_else(|| NetSetupError::Device {
            id: id.to_string(),
            reason: "no MAC address (the configuration was not completed)".into(),
        })?;
    let opened =
        Tap::open(n.tap.as_deref().unwrap_or(""), usize::from(n.queues)).map_err(|source| {
            NetSetupError::Tap {
                id: id.to_string(),
                source,
            }
        })?;
    let name = opened
        .queues
        .first()
        .map(|t| t.name().to_string())
        .unwrap_or_default();
    if opened.created {
        // A tap we made is ours to bring up; an existing one is left as its owner set it.
        if let Err(e) = devices::net::tap::set_link_up(&name) {
            eprintln!("vmm: warning: NIC `{id}`: cannot set tap {name} up: {e}");
        }
    }
    let mut nic = Nic {
        handle: NicHandle {
            id: id.to_string(),
            tap: name.clone(),
            mac,
            queues: n.queues,
            vhost: n.vhost,
            shared: Arc::new(NetShared::new()),
            limits: Arc::new(Mutex::new((None, None))),
        },
        taps: opened.queues,
        mtu: n.mtu,
        downscript: None,
    };
    nic.handle
        .set_rate_limits(n.rx_rate_limiter, n.tx_rate_limiter);
    if let Some(script) = &n.script {
        run_script(id, "script", script, &name)?;
    }
    // Only once the script ran: a downscript undoes what its script did.
    nic.downscript = n.downscript.clone();
    Ok(nic)
}

impl Drop for Nic {
    fn drop(&mut self) {
        if let Some(script) = self.downscript.take() {
            // Before the fds close: the tap still exists for the downscript to act on.
            if let Err(e) = run_script(&self.handle.id, "downscript", &script, &self.handle.tap) {
                eprintln!("vmm: warning: {e}");
            }
        }
    }
}
