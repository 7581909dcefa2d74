//! A listening unix socket file, as the VMM's host-facing sockets need it (the serial console,
//! virtio-console ports): created with mode 0600 before it starts listening, so no other user can
//! connect even briefly; a stale socket left by a dead process is replaced, while a regular file
//! (or anything that is not a socket) and a socket some live process listens on are errors; the
//! file is removed on drop, if it is still ours. Non-blocking and close-on-exec.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::ChardevError;

/// Listen backlog: clients beyond the one being served wait here (or are turned away).
const BACKLOG: libc::c_int = 4;

/// A unix socket we listen on, removed when dropped.
#[derive(Debug)]
pub struct SocketListener {
    path: PathBuf,
    listener: UnixListener,
    /// (device, inode) of the socket file we created, to remove only our own file on drop.
    identity: (u64, u64),
}

impl SocketListener {
    /// Creates the socket at `path` (mode 0600) and starts listening.
    pub fn bind(path: impl AsRef<Path>) -> Result<SocketListener, ChardevError> {
        let path = path.as_ref();
        let (addr, addr_len) = sockaddr(path)?;
        clear_stale_socket(path)?;

        // SAFETY: plain syscall; the result is checked and immediately owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Err(last_err(path, "socket"));
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `addr` is a valid sockaddr_un of which `addr_len` bytes are used.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), addr_len) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EADDRINUSE) {
                ChardevError::SocketInUse(path.to_path_buf())
            } else {
                socket_err(path, "bind")(err)
            });
        }
        // Until listen() nobody can connect, so tightening the mode here leaves no window.
        let setup = || -> Result<(u64, u64), ChardevError> {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .map_err(socket_err(path, "chmod"))?;
            let meta = fs::symlink_metadata(path).map_err(socket_err(path, "stat"))?;
            // SAFETY: `fd` is a bound socket.
            if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } != 0 {
                return Err(last_err(path, "listen"));
            }
            Ok((meta.dev(), meta.ino()))
        };
        let identity = match setup() {
            Ok(identity) => identity,
            Err(e) => {
                let _ = fs::remove_file(path);
                return Err(e);
            }
        };
        Ok(SocketListener {
            path: path.to_path_buf(),
            listener: UnixListener::from(fd),
            identity,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening fd, to watch for readability (a pending connection).
    pub fn fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Accepts one pending connection, made non-blocking; `None` when there is none.
    pub fn accept(&self) -> io::Result<Option<UnixStream>> {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(true)?;
                    return Ok(Some(stream));
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(None),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                    _ => return Err(e),
                },
            }
        }
    }
}

impl Drop for SocketListener {
    fn drop(&mut self) {
        // Only remove the file if it is still the socket we created.
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

fn socket_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> ChardevError + 'a {
    move |source| ChardevError::Socket {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn last_err(path: &Path, op: &'static str) -> ChardevError {
    socket_err(path, op)(io::Error::last_os_error())
}

/// Makes `path` free for a new socket: nothing there, or a stale socket (removed).
fn clear_stale_socket(path: &Path) -> Result<(), ChardevError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(socket_err(path, "stat")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ChardevError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ChardevError::SocketInUse(path.to_path_buf())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            log::info!("replacing stale console socket {}", path.display());
            match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(socket_err(path, "remove stale socket")(e)),
            }
        }
        // Someone removed it between our stat and connect: the path is free.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(socket_err(path, "probe existing socket")(e)),
    }
}

/// Builds the `sockaddr_un` for `path` and its length.
fn sockaddr(path: &Path) -> Result<(libc::sockaddr_un, libc::socklen_t), ChardevError> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = OsStr::as_bytes(path.as_os_str());
    // Keep one byte for the terminating NUL.
    let max = addr.sun_path.len() - 1;
    if bytes.is_empty() || bytes.len() > max || bytes.contains(&0) {
        return Err(ChardevError::SocketPathTooLong {
            path: path.to_path_buf(),
            max,
        });
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // `len` is at most size_of::<sockaddr_un>(), far below socklen_t::MAX.
    Ok((addr, len as libc::socklen_t))
}
