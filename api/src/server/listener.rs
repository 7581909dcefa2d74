//! Listening sockets of the front doors: unix sockets created owner-only, with stale files
//! replaced and live ones refused, removed again on drop (only if the file is still ours), and
//! TCP listeners; plus the accepted [`Stream`]s.

use std::ffi::CString;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::ServerError;

/// A bound, listening, non-blocking socket.
pub(crate) enum Listener {
    /// A unix socket and the file it owns (removed when the listener is dropped).
    Unix(UnixListener, #[allow(dead_code)] SocketFile),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Accepts one pending connection, made non-blocking.
    pub(crate) fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(true)?;
                Ok(Stream::Unix(s))
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(true)?;
                // Replies are small and answer a request: do not wait to coalesce them.
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
        }
    }

    /// The listening fd, for epoll.
    pub(crate) fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// A connected client socket.
pub(crate) enum Stream {
    /// Over a unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Stream {
    /// The socket fd, for epoll.
    pub(crate) fn raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }

    /// Reads what is available.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    /// Writes what fits, without ever raising SIGPIPE on a peer that went away.
    pub(crate) fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: the fd is a connected socket owned by `self`; `buf` is valid for `buf.len()`
        // bytes for the duration of the call; send does not keep the pointer.
        let n = unsafe {
            libc::send(
                self.raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// A unix socket file we created: removed on drop if it is still the one we bound.
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Someone may have replaced the file since (another VMM on the same path): leave theirs.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Longest path that fits in `sockaddr_un.sun_path` with its NUL.
const SUN_PATH_MAX: usize = 107;

/// Binds a unix socket at `path`, owner-only (mode 0600 set before `listen`, so nobody else can
/// ever connect), non-blocking. A stale socket file (nobody accepting) is replaced; a live socket
/// or any other kind of file is an error.
pub(crate) fn bind_unix(path: &Path) -> Result<Listener, ServerError> {
    let err = |source: io::Error| ServerError::BindUnix {
        path: path.to_path_buf(),
        source,
    };
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() > SUN_PATH_MAX {
        return Err(ServerError::BadUnixPath {
            path: path.to_path_buf(),
            reason: format!("the length must be 1 to {SUN_PATH_MAX} bytes"),
        });
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::SocketInUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(err)?;
            }
            Err(e) => return Err(err(e)),
        },
        Ok(_) => return Err(ServerError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let cpath = CString::new(bytes).map_err(|_| ServerError::BadUnixPath {
        path: path.to_path_buf(),
        reason: "it contains a NUL byte".into(),
    })?;

    // SAFETY: plain socket(2) call; the returned fd is checked and then owned by `fd`.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    // SAFETY: sockaddr_un is plain old data; all-zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size (checked above).
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    let remove = || {
        let _ = std::fs::remove_file(path);
    };
    // Owner-only before listen(): until then a connect is refused, so no one slips in.
    // SAFETY: `cpath` is a valid NUL-terminated path.
    if unsafe { libc::chmod(cpath.as_ptr(), 0o600) } < 0 {
        let e = io::Error::last_os_error();
        remove();
        return Err(err(e));
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => {
            remove();
            return Err(err(e));
        }
    };
    // SAFETY: `fd` is a bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
        let e = io::Error::last_os_error();
        remove();
        return Err(err(e));
    }
    Ok(Listener::Unix(
        UnixListener::from(fd),
        SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// Binds a non-blocking TCP listener on `HOST:PORT` (the first address it resolves to).
pub(crate) fn bind_tcp(addr: &str) -> Result<(Listener, SocketAddr), ServerError> {
    let bad = |reason: String| ServerError::BadTcpAddress {
        addr: addr.to_string(),
        reason,
    };
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("it resolves to no address".into()))?;
    let listener = TcpListener::bind(sock).map_err(|source| ServerError::BindTcp {
        addr: addr.to_string(),
        source,
    })?;
    let local = listener.local_addr().unwrap_or(sock);
    listener
        .set_nonblocking(true)
        .map_err(|source| ServerError::BindTcp {
            addr: addr.to_string(),
            source,
        })?;
    Ok((Listener::Tcp(listener), local))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("api-listener-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn unix_socket_is_owner_only_and_removed_on_drop() {
        let p = tmp("a.sock");
        let l = bind_unix(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(l);
        assert!(!p.exists());
    }

    #[test]
    fn live_socket_is_refused_stale_one_replaced() {
        let p = tmp("b.sock");
        let l = bind_unix(&p).unwrap();
        let e = bind_unix(&p).err().unwrap();
        assert!(matches!(e, ServerError::SocketInUse(_)), "{e}");
        drop(l);
        // Stale: a socket file nobody listens on (std leaves the file behind on drop).
        let stale = std::os::unix::net::UnixListener::bind(&p).unwrap();
        drop(stale);
        assert!(p.exists());
        let l2 = bind_unix(&p).unwrap();
        drop(l2);
        assert!(!p.exists());
    }

    #[test]
    fn regular_file_is_not_replaced() {
        let p = tmp("c.sock");
        std::fs::write(&p, b"data").unwrap();
        let e = bind_unix(&p).err().unwrap();
        assert!(matches!(e, ServerError::NotASocket(_)), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn replaced_file_is_left_alone_on_drop() {
        let p = tmp("d.sock");
        let l = bind_unix(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"theirs").unwrap();
        drop(l);
        assert_eq!(std::fs::read(&p).unwrap(), b"theirs");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn tcp_errors_are_clear() {
        assert!(matches!(
            bind_tcp("not an address").err().unwrap(),
            ServerError::BadTcpAddress { .. }
        ));
        let (_l, addr) = bind_tcp("127.0.0.1:0").unwrap();
        let e = bind_tcp(&addr.to_string()).err().unwrap();
        assert!(matches!(e, ServerError::BindTcp { .. }), "{e}");
        assert!(e.to_string().contains(&addr.to_string()));
    }
}
