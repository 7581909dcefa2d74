//! Live migration: pre-copy over TCP or a unix socket. The source sends all of guest RAM while
//! the guest runs, then what the guest (and the VMM, and vhost) dirtied meanwhile, round after
//! round, until what is left fits in the downtime limit at the measured bandwidth; then it
//! stops the VM, sends the rest and the machine state, and the destination runs the VM.
//!
//! The source's rounds run on a worker thread ([`source`]); the event loop keeps serving the
//! guest and the monitor, and does the switchover (pause, flush, hand the disks over, take the
//! state) when the worker asks. The destination receives on a thread of its own ([`dest`]) and
//! builds the VM from what arrived, as a restore from a state file does.

pub mod dest;
pub mod dirty;
pub mod source;
pub mod wire;

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use api::MigrationAddress;

/// How long a migration waits for the other side to take or send anything before it gives up.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the source tries to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A migration connection.
#[derive(Debug)]
pub enum Conn {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a unix socket.
    Unix(UnixStream),
}

impl Conn {
    /// Connects to a listening destination.
    pub fn connect(to: &MigrationAddress) -> Result<Conn, String> {
        let conn = match to {
            MigrationAddress::Tcp { host, port } => {
                let host = if host.is_empty() { "localhost" } else { host };
                let addrs = (host, *port)
                    .to_socket_addrs()
                    .map_err(|e| format!("address resolution failed for {host}:{port}: {e}"))?;
                let mut last = None;
                let mut found = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let s = found.ok_or_else(|| {
                    format!(
                        "Failed to connect to '{host}:{port}': {}",
                        last.map(|e| e.to_string())
                            .unwrap_or_else(|| "no address".into())
                    )
                })?;
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }
            MigrationAddress::Unix(path) => Conn::Unix(
                UnixStream::connect(path)
                    .map_err(|e| format!("Failed to connect to '{}': {e}", path.display()))?,
            ),
        };
        conn.set_timeouts(STALL_TIMEOUT)
            .map_err(|e| format!("cannot set up the migration socket: {e}"))?;
        Ok(conn)
    }

    /// Read and write timeouts: a peer that takes or sends nothing for that long is gone.
    pub fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    /// Shuts the connection down both ways: a thread blocked on it wakes with an error.
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A destination waiting for its source.
#[derive(Debug)]
pub enum Listener {
    /// On a TCP port.
    Tcp(TcpListener),
    /// On a unix socket, whose file is removed when this goes.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on `on`.
    pub fn bind(on: &MigrationAddress) -> Result<Listener, String> {
        match on {
            MigrationAddress::Tcp { host, port } => {
                // QEMU's `tcp:0:PORT` and `tcp::PORT` listen on every address.
                let host = match host.as_str() {
                    "" | "0" => "0.0.0.0",
                    h => h,
                };
                let l = TcpListener::bind((host, *port))
                    .map_err(|e| format!("Failed to bind socket {host}:{port}: {e}"))?;
                Ok(Listener::Tcp(l))
            }
            MigrationAddress::Unix(path) => {
                let l = UnixListener::bind(path)
                    .map_err(|e| format!("Failed to bind socket to {}: {e}", path.display()))?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    /// Waits for the source.
    pub fn accept(&self) -> io::Result<Conn> {
        let conn = match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }
            Listener::Unix(l, _) => Conn::Unix(l.accept()?.0),
        };
        conn.set_timeouts(STALL_TIMEOUT)?;
        Ok(conn)
    }

    /// Wakes a thread blocked in [`Listener::accept`] with an error.
    pub fn shutdown(&self) {
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        };
        // SAFETY: shutdown on a listening socket this value owns; it only wakes accept().
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }

    /// The TCP port listened on (for `tcp:HOST:0`).
    pub fn port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}
