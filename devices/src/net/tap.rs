//! A Linux tap device (`/dev/net/tun` with `IFF_TAP`), opened for virtio-net: frames carry a
//! 12-byte virtio-net header (`IFF_VNET_HDR` + `TUNSETVNETHDRSZ`), fds are non-blocking, and a
//! multiqueue tap (`IFF_MULTI_QUEUE`) gives one fd per queue pair.
//!
//! [`Tap::open`] attaches to an existing interface or creates it. An interface this process
//! created is not persistent: the kernel removes it when its last fd closes, so a VMM that exits
//! (or crashes) leaves nothing behind. Whether we created it is reported so callers can tell the
//! user, and bring it up.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Length of the virtio-net header on the tap (`struct virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Longest interface name, without the terminating NUL.
pub const IFNAME_MAX: usize = libc::IFNAMSIZ - 1;

/// `TUN_F_*` offload flags for [`Tap::set_offload`].
pub mod offload {
    /// The peer may hand over frames with partial checksums.
    pub const CSUM: u32 = 0x01;
    /// TCP over IPv4 segmentation offload.
    pub const TSO4: u32 = 0x02;
    /// TCP over IPv6 segmentation offload.
    pub const TSO6: u32 = 0x04;
    /// TSO with the ECN bit.
    pub const TSO_ECN: u32 = 0x08;
    /// UDP fragmentation offload.
    pub const UFO: u32 = 0x10;
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

// _IOW('T', n, int) / _IOW('T', n, unsigned int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or has characters an interface name cannot have.
    #[error("`{0}` is not a valid interface name (1-15 characters, no '/', ':' or spaces)")]
    BadName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    /// Creating or attaching the interface was refused for lack of privilege.
    #[error(
        "no permission to {action} tap `{name}` (needs CAP_NET_ADMIN, or a tap owned by this user)"
    )]
    Permission {
        /// "create" or "open".
        action: &'static str,
        /// Interface name.
        name: String,
    },
    /// Another process holds the (single-queue) tap.
    #[error("tap `{0}` is busy (another process has it open)")]
    Busy(String),
    /// The interface exists with flags that do not fit (not a tap, or not multiqueue when
    /// several queues are asked for).
    #[error("cannot attach {queues} queue(s) to `{name}`: {reason}")]
    Mismatch {
        /// Interface name.
        name: String,
        /// Queues asked for.
        queues: usize,
        /// What does not fit.
        reason: String,
    },
    /// Another ioctl failed.
    #[error("tap `{name}`: {what}: {source}")]
    Ioctl {
        /// Interface name.
        name: String,
        /// Which step.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// `struct ifreq` reduced to what the tun ioctls use: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        for (d, s) in r.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        r
    }

    fn name(&self) -> String {
        // SAFETY: `name` is NUL-terminated: at most IFNAMSIZ-1 bytes are ever written into it
        // by us, and the kernel writes a NUL-terminated name.
        unsafe { CStr::from_ptr(self.name.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Checks a Linux interface name.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// Whether a network interface called `name` exists on the host.
pub fn interface_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// One queue of a tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// The queues of an opened tap, and whether this process created the interface.
#[derive(Debug)]
pub struct OpenedTap {
    /// One per queue pair, in order.
    pub queues: Vec<Tap>,
    /// The interface did not exist before: the kernel removes it when the last fd closes.
    pub created: bool,
}

impl Tap {
    /// Opens (or creates) tap `name` with `queues` queues (`IFF_MULTI_QUEUE` when more than
    /// one), each non-blocking with a [`VNET_HDR_LEN`]-byte virtio-net header.
    pub fn open(name: &str, queues: usize) -> Result<OpenedTap, TapError> {
        if !valid_ifname(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        let existed = interface_exists(name);
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if queues > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut out = Vec::with_capacity(queues.max(1));
        for _ in 0..queues.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::OpenTun)?;
            let mut req = IfReq::new(name, flags);
            // SAFETY: TUNSETIFF reads and writes an ifreq; `req` is one, alive for the call.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
            if r < 0 {
                let e = io::Error::last_os_error();
                return Err(match e.raw_os_error() {
                    Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission {
                        action: if existed { "open" } else { "create" },
                        name: name.to_string(),
                    },
                    Some(libc::EBUSY) => TapError::Busy(name.to_string()),
                    Some(libc::EINVAL) if existed => TapError::Mismatch {
                        name: name.to_string(),
                        queues,
                        reason: if queues > 1 {
                            "it is not a multiqueue tap (create it with `ip tuntap add ... \
                             multi_queue`), or not a tap"
                                .into()
                        } else {
                            "it is a multiqueue tap or not a tap".into()
                        },
                    },
                    _ => TapError::Ioctl {
                        name: name.to_string(),
                        what: "TUNSETIFF",
                        source: e,
                    },
                });
            }
            let tap = Tap {
                file,
                name: req.name(),
            };
            tap.set_vnet_hdr_len()?;
            out.push(tap);
        }
        Ok(OpenedTap {
            queues: out,
            created: !existed,
        })
    }

    fn ioctl_int(
        &self,
        what: &'static str,
        req: libc::c_ulong,
        val: libc::c_int,
    ) -> Result<(), TapError> {
        // SAFETY: these tun ioctls read one int through the pointer, which is valid for the call.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), req, &val as *const libc::c_int) };
        if r < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        self.ioctl_int(
            "TUNSETVNETHDRSZ",
            TUNSETVNETHDRSZ,
            VNET_HDR_LEN as libc::c_int,
        )
    }

    /// Tells the kernel which offloads the reader (the guest) accepts: a combination of
    /// [`offload`] flags (0: the kernel completes checksums and segments before handing frames
    /// over).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // TUNSETOFFLOAD takes the value itself, not a pointer.
        // SAFETY: no memory is passed.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "TUNSETOFFLOAD",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Attaches (`true`) or detaches this queue of a multiqueue tap: the kernel steers frames
    /// only to attached queues.
    pub fn set_queue_enabled(&self, enabled: bool) -> Result<(), TapError> {
        let mut req = IfReq::new(
            "",
            if enabled {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
        );
        // SAFETY: TUNSETQUEUE reads an ifreq; `req` is one, alive for the call.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETQUEUE, &mut req as *mut IfReq) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // Attaching an attached queue (or detaching a detached one) is EINVAL: already so.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "TUNSETQUEUE",
                source: e,
            });
        }
        Ok(())
    }

    /// The interface name (as the kernel reports it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another fd for the same queue (the queue stays attached while either is open).
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// Reads one frame (virtio-net header first); `WouldBlock` when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (virtio-net header first); `WouldBlock` when the tap's queue is full.
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Sets interface `name` up (as `ip link set NAME up` does).
pub fn set_link_up(name: &str) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut req = IfReq::new(name, 0);
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS read and write an ifreq; `req` is one.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tap can be created here (root with /dev/net/tun); otherwise the test says so.
    fn can_create(probe: &str) -> bool {
        let ok = Tap::open(probe, 1).is_ok();
        if !ok {
            eprintln!("skipped: this host cannot create taps (no /dev/net/tun or CAP_NET_ADMIN)");
        }
        ok
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_ifname("tap0"));
        assert!(valid_ifname("a234567890abcde"));
        assert!(!valid_ifname("a234567890abcdef"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname("a b"));
        assert!(!valid_ifname(".."));
        assert!(matches!(
            Tap::open("bad/name", 1),
            Err(TapError::BadName(_))
        ));
    }

    #[test]
    fn create_is_not_persistent_and_multiqueue_works() {
        if !can_create("vmmtst-p0") {
            return;
        }
        let t = Tap::open("vmmtst-mq0", 2).unwrap();
        assert!(t.created);
        assert_eq!(t.queues.len(), 2);
        assert_eq!(t.queues[0].name(), "vmmtst-mq0");
        assert!(interface_exists("vmmtst-mq0"));
        t.queues[1].set_queue_enabled(false).unwrap();
        t.queues[1].set_queue_enabled(true).unwrap();
        t.queues[0]
            .set_offload(offload::CSUM | offload::TSO4 | offload::TSO6)
            .unwrap();
        // A second process (here: a second open) cannot add a single-queue fd to it.
        assert!(matches!(
            Tap::open("vmmtst-mq0", 1),
            Err(TapError::Mismatch { .. })
        ));
        let mut q = t.queues.into_iter().next().unwrap();
        let mut buf = [0u8; 2048];
        // Down: nothing to read, never blocks.
        assert_eq!(
            q.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(q);
        assert!(
            !interface_exists("vmmtst-mq0"),
            "a tap we created outlived its fds"
        );
    }

    #[test]
    fn single_queue_tap_is_busy_for_a_second_opener() {
        if !can_create("vmmtst-p1") {
            return;
        }
        let t = Tap::open("vmmtst-busy0", 1).unwrap();
        assert!(matches!(
            Tap::open("vmmtst-busy0", 1),
            Err(TapError::Busy(_))
        ));
        let c = t.queues[0].try_clone().unwrap();
        drop(t);
        assert!(interface_exists("vmmtst-busy0"), "a clone keeps the tap");
        drop(c);
        assert!(!interface_exists("vmmtst-busy0"));
    }
}
