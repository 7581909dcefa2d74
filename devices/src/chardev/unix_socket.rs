//! A console served on a unix socket, one client at a time (like QEMU's
//! `-serial unix:PATH,server,nowait`).
//!
//! - The socket file is created with mode 0600 before it starts listening, so no other user can
//!   connect even briefly. A stale socket left by a dead process is replaced; a regular file (or
//!   anything that is not a socket) and a socket some live process listens on are errors. The
//!   file is removed on drop, if it is still ours.
//! - A second client while one is connected is accepted, sent [`BUSY_MESSAGE`] and closed.
//! - Guest output goes to the client through [`ConsoleOutput`] with non-blocking sends: when the
//!   client is slow (EAGAIN) or gone, output is dropped; a vCPU never waits on a client.
//! - Client input is read by the VMM's event loop with [`UnixSocketConsole::read_client`].
//!
//! Fd lifetime: after [`ReadOutcome::Closed`] the client fd stays open (reported by
//! [`UnixSocketConsole::client_fd`]) until the next client replaces it or
//! [`UnixSocketConsole::close_client`] is called, so the event loop can deregister it from epoll
//! first. All fds are non-blocking and close-on-exec.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{lock, ChardevError, ReadOutcome};

/// The line sent to a client that connects while another one is attached.
pub const BUSY_MESSAGE: &[u8] = b"console busy: another client is connected\n";

/// Listen backlog: connections beyond the first are only accepted to be turned away.
const BACKLOG: libc::c_int = 4;

/// The connected client, shared between the console (event loop) and its output sinks (vCPUs).
#[derive(Debug, Default)]
struct ClientSlot {
    stream: Option<UnixStream>,
    /// False once the client is known to be gone (EOF, EPIPE); the fd may still be open.
    connected: bool,
}

impl ClientSlot {
    /// Whether a client is attached and has not hung up. Checks the socket, so a client that
    /// left without us noticing yet does not block the next one.
    fn is_live(&mut self) -> bool {
        let Some(stream) = &self.stream else {
            return false;
        };
        if !self.connected {
            return false;
        }
        let mut pfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd; a zero timeout never blocks.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        if ready > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            self.connected = false;
        }
        self.connected
    }
}

/// Sends as much of `buf` as the socket takes right now; returns the bytes sent, or the error
/// that shows the peer is gone.
fn send_nonblocking(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < buf.len() {
        let rest = &buf[sent..];
        // SAFETY: `rest` is valid for reads of `rest.len()` bytes. MSG_NOSIGNAL turns a closed
        // peer into EPIPE instead of SIGPIPE; MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::send(
                fd,
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            // `n` is non-negative and at most `rest.len()`.
            sent += n as usize;
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => break,
            _ => return Err(err),
        }
    }
    Ok(sent)
}

/// The write side of a [`UnixSocketConsole`]: sends to the current client, drops output when
/// there is none or it cannot keep up. Writes never fail and never block.
#[derive(Debug, Clone)]
pub struct ConsoleOutput {
    slot: Arc<Mutex<ClientSlot>>,
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut slot = lock(&self.slot);
        if !slot.connected {
            return Ok(buf.len());
        }
        if let Some(stream) = &slot.stream {
            if let Err(e) = send_nonblocking(stream.as_raw_fd(), buf) {
                log::debug!("console client gone on write: {e}");
                slot.connected = false;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening unix socket serving one console client at a time.
#[derive(Debug)]
pub struct UnixSocketConsole {
    path: PathBuf,
    listener: UnixListener,
    /// (device, inode) of the socket file we created, to remove only our own file on drop.
    identity: (u64, u64),
    slot: Arc<Mutex<ClientSlot>>,
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

impl UnixSocketConsole {
    /// Creates the socket at `path` (mode 0600) and starts listening.
    pub fn bind(path: impl AsRef<Path>) -> Result<UnixSocketConsole, ChardevError> {
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
        Ok(UnixSocketConsole {
            path: path.to_path_buf(),
            listener: UnixListener::from(fd),
            identity,
            slot: Arc::default(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening fd, to watch for readability (a pending connection).
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The current client's fd, connected or hung up but not yet closed.
    pub fn client_fd(&self) -> Option<RawFd> {
        lock(&self.slot).stream.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Whether a client is attached and has not hung up.
    pub fn is_client_connected(&self) -> bool {
        lock(&self.slot).is_live()
    }

    /// Accepts pending connections. Returns the fd of the new client when one was attached
    /// (replacing, and closing, a previous client that had hung up); `None` when there was
    /// nothing to accept or the newcomers were turned away because a client is attached.
    pub fn accept_client(&mut self) -> io::Result<Option<RawFd>> {
        let mut attached = None;
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                    _ if attached.is_some() => break,
                    _ => return Err(e),
                },
            };
            let mut slot = lock(&self.slot);
            if slot.is_live() {
                log::info!(
                    "console {}: turning away a second client",
                    self.path.display()
                );
                let _ = send_nonblocking(stream.as_raw_fd(), BUSY_MESSAGE);
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!(
                    "console {}: cannot use new client: {e}",
                    self.path.display()
                );
                continue;
            }
            attached = Some(stream.as_raw_fd());
            slot.stream = Some(stream);
            slot.connected = true;
        }
        Ok(attached)
    }

    /// Reads client input without blocking. [`ReadOutcome::Closed`] means the client is gone
    /// (or there is none): stop polling its fd.
    pub fn read_client(&mut self, buf: &mut [u8]) -> io::Result<ReadOutcome> {
        let mut slot = lock(&self.slot);
        let Some(stream) = slot.stream.as_mut() else {
            return Ok(ReadOutcome::Closed);
        };
        if buf.is_empty() {
            return Ok(ReadOutcome::Data(0));
        }
        loop {
            return match stream.read(buf) {
                Ok(0) => {
                    slot.connected = false;
                    Ok(ReadOutcome::Closed)
                }
                Ok(n) => Ok(ReadOutcome::Data(n)),
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => Ok(ReadOutcome::WouldBlock),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                        slot.connected = false;
                        Ok(ReadOutcome::Closed)
                    }
                    _ => Err(e),
                },
            };
        }
    }

    /// Closes the client fd (after the caller stopped polling it).
    pub fn close_client(&mut self) {
        let mut slot = lock(&self.slot);
        slot.stream = None;
        slot.connected = false;
    }

    /// A writer for guest output that shares this console's client slot.
    pub fn output_sink(&self) -> ConsoleOutput {
        ConsoleOutput {
            slot: self.slot.clone(),
        }
    }
}

impl Drop for UnixSocketConsole {
    fn drop(&mut self) {
        // Only remove the file if it is still the socket we created.
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    fn wait_accept(console: &mut UnixSocketConsole) -> Option<RawFd> {
        // The connection is queued synchronously by connect(), so one accept is enough.
        console.accept_client().unwrap()
    }

    fn read_until(console: &mut UnixSocketConsole, want: usize) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < want && Instant::now() < deadline {
            match console.read_client(&mut buf).unwrap() {
                ReadOutcome::Data(n) => got.extend_from_slice(&buf[..n]),
                ReadOutcome::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                ReadOutcome::Closed => break,
            }
        }
        got
    }

    #[test]
    fn output_is_a_sendable_writer() {
        fn sink<W: Write + Send + 'static>(_: &W) {}
        let dir = TempDir::new().unwrap();
        let console = UnixSocketConsole::bind(dir.as_path().join("s")).unwrap();
        sink(&console.output_sink());
    }

    #[test]
    fn socket_mode_and_cleanup() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("console.sock");
        let console = UnixSocketConsole::bind(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(console.path(), path);
        // CLOEXEC and non-blocking listener.
        // SAFETY: fcntl queries on our own fd.
        let (fd_flags, fl_flags) = unsafe {
            (
                libc::fcntl(console.listener_fd(), libc::F_GETFD),
                libc::fcntl(console.listener_fd(), libc::F_GETFL),
            )
        };
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        assert_ne!(fl_flags & libc::O_NONBLOCK, 0);
        drop(console);
        assert!(!path.exists());
    }

    #[test]
    fn client_round_trip_disconnect_and_reconnect() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("c.sock");
        let mut console = UnixSocketConsole::bind(&path).unwrap();
        let mut out = console.output_sink();

        // No client: nothing to accept, reads say closed, output is dropped.
        assert_eq!(console.accept_client().unwrap(), None);
        assert_eq!(
            console.read_client(&mut [0; 4]).unwrap(),
            ReadOutcome::Closed
        );
        assert_eq!(out.write(b"lost").unwrap(), 4);

        let mut client = UnixStream::connect(&path).unwrap();
        let fd = wait_accept(&mut console).expect("client attached");
        assert_eq!(console.client_fd(), Some(fd));
        assert!(console.is_client_connected());
        // SAFETY: fcntl query on the client fd the console owns.
        let (fl, fdflags) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GETFD),
            )
        };
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        assert_ne!(fdflags & libc::FD_CLOEXEC, 0);

        // Guest -> client.
        out.write_all(b"login: ").unwrap();
        let mut buf = [0u8; 7];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"login: ");

        // Client -> guest.
        assert_eq!(
            console.read_client(&mut [0; 4]).unwrap(),
            ReadOutcome::WouldBlock
        );
        client.write_all(b"root\n").unwrap();
        assert_eq!(read_until(&mut console, 5), b"root\n");

        // Disconnect: read sees Closed, output is dropped without error, fd kept until replaced.
        drop(client);
        assert_eq!(read_until(&mut console, 1), b"");
        assert_eq!(
            console.read_client(&mut [0; 4]).unwrap(),
            ReadOutcome::Closed
        );
        assert!(!console.is_client_connected());
        assert_eq!(out.write(b"nobody").unwrap(), 6);
        assert_eq!(console.client_fd(), Some(fd));

        // Reconnect: the new client replaces the old one and gets output again.
        let mut client = UnixStream::connect(&path).unwrap();
        assert!(wait_accept(&mut console).is_some());
        out.write_all(b"again").unwrap();
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"again");

        console.close_client();
        assert_eq!(console.client_fd(), None);
    }

    #[test]
    fn second_client_is_turned_away() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("c.sock");
        let mut console = UnixSocketConsole::bind(&path).unwrap();
        let _first = UnixStream::connect(&path).unwrap();
        let fd = wait_accept(&mut console).unwrap();

        let mut second = UnixStream::connect(&path).unwrap();
        assert_eq!(console.accept_client().unwrap(), None);
        let mut msg = Vec::new();
        second.read_to_end(&mut msg).unwrap();
        assert_eq!(msg, BUSY_MESSAGE);
        assert_eq!(console.client_fd(), Some(fd));
        assert!(console.is_client_connected());
    }

    #[test]
    fn vanished_client_is_replaced_even_before_its_eof_is_read() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("c.sock");
        let mut console = UnixSocketConsole::bind(&path).unwrap();
        let first = UnixStream::connect(&path).unwrap();
        let old = wait_accept(&mut console).unwrap();
        drop(first);
        let _second = UnixStream::connect(&path).unwrap();
        let new = wait_accept(&mut console).expect("replaces the dead client");
        assert_eq!(console.client_fd(), Some(new));
        assert!(console.is_client_connected());
        let _ = old;
    }

    #[test]
    fn slow_client_never_blocks_output() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("c.sock");
        let mut console = UnixSocketConsole::bind(&path).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        wait_accept(&mut console).unwrap();
        let mut out = console.output_sink();
        let chunk = [b'x'; 4096];
        let start = Instant::now();
        // Far more than any socket buffer; the client never reads.
        for _ in 0..2048 {
            assert_eq!(out.write(&chunk).unwrap(), chunk.len());
        }
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(console.is_client_connected());
    }

    #[test]
    fn stale_socket_replaced_live_socket_and_file_refused() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("c.sock");

        // A stale socket: bound by a listener that is gone, file left behind.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let console = UnixSocketConsole::bind(&path).unwrap();
        assert_eq!(
            fs::symlink_metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // The same path while that console is alive.
        assert!(matches!(
            UnixSocketConsole::bind(&path),
            Err(ChardevError::SocketInUse(_))
        ));
        drop(console);

        // A regular file is never replaced.
        fs::write(&path, b"precious").unwrap();
        let err = UnixSocketConsole::bind(&path).unwrap_err();
        assert!(matches!(err, ChardevError::NotASocket(_)));
        assert!(err.to_string().contains("not a socket"));
        assert_eq!(fs::read(&path).unwrap(), b"precious");

        // A path too long for sockaddr_un.
        let long = dir.as_path().join("x".repeat(200));
        assert!(matches!(
            UnixSocketConsole::bind(long),
            Err(ChardevError::SocketPathTooLong { .. })
        ));
    }

    #[test]
    fn drop_leaves_a_foreign_file_alone() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("c.sock");
        let console = UnixSocketConsole::bind(&path).unwrap();
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"someone else's").unwrap();
        drop(console);
        assert_eq!(fs::read(&path).unwrap(), b"someone else's");
    }
}
