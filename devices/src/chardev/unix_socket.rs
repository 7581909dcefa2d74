//! A console served on a unix socket, one client at a time (like QEMU's
//! `-serial unix:PATH,server,nowait`).
//!
//! - The socket file is made by [`SocketListener`] (mode 0600, stale sockets replaced, removed on
//!   drop if still ours).
//! - A second client while one is connected is accepted, sent [`BUSY_MESSAGE`] and closed.
//! - Guest output goes to the client through [`ConsoleOutput`] with non-blocking sends: when the
//!   client is slow (EAGAIN) or gone, output is dropped; a vCPU never waits on a client.
//! - Client input is read by the VMM's event loop with [`UnixSocketConsole::read_client`].
//!
//! Fd lifetime: after [`ReadOutcome::Closed`] the client fd stays open (reported by
//! [`UnixSocketConsole::client_fd`]) until the next client replaces it or
//! [`UnixSocketConsole::close_client`] is called, so the event loop can deregister it from epoll
//! first. All fds are non-blocking and close-on-exec.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{lock, read_stream, ChardevError, ReadOutcome, SocketListener};

/// The line sent to a client that connects while another one is attached.
pub const BUSY_MESSAGE: &[u8] = b"console busy: another client is connected\n";

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

/// Sends as much of the memory the iovecs name as the socket takes right now, in one
/// `sendmsg`; returns the bytes sent (0 when the socket is full), or the error that shows the
/// peer is gone.
///
/// # Safety
/// Every iovec must name memory valid for reads of its length for the duration of the call.
pub unsafe fn send_iov_nonblocking(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr().cast_mut();
    msg.msg_iovlen = iov.len() as _;
    loop {
        // SAFETY: `msg` names `iov`, which the caller guarantees readable; MSG_DONTWAIT never
        // blocks and MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            // `n` is non-negative and at most the iovecs' total.
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(err),
        }
    }
}

/// Sends as much of `buf` as the socket takes right now; returns the bytes sent, or the error
/// that shows the peer is gone.
pub(super) fn send_nonblocking(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < buf.len() {
        let rest = &buf[sent..];
        let iov = [libc::iovec {
            iov_base: rest.as_ptr().cast_mut().cast(),
            iov_len: rest.len(),
        }];
        // SAFETY: the iovec names `rest`, valid for reads of its length during the call.
        match unsafe { send_iov_nonblocking(fd, &iov) }? {
            0 => break,
            n => sent += n,
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
    listener: SocketListener,
    slot: Arc<Mutex<ClientSlot>>,
}

impl UnixSocketConsole {
    /// Creates the socket at `path` (mode 0600, see [`SocketListener`]) and starts listening.
    pub fn bind(path: impl AsRef<Path>) -> Result<UnixSocketConsole, ChardevError> {
        Ok(UnixSocketConsole {
            listener: SocketListener::bind(path)?,
            slot: Arc::default(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.listener.path()
    }

    /// The listening fd, to watch for readability (a pending connection).
    pub fn listener_fd(&self) -> RawFd {
        self.listener.fd()
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
                Ok(Some(stream)) => stream,
                Ok(None) => break,
                Err(_) if attached.is_some() => break,
                Err(e) => return Err(e),
            };
            let mut slot = lock(&self.slot);
            if slot.is_live() {
                log::info!(
                    "console {}: turning away a second client",
                    self.path().display()
                );
                let _ = send_nonblocking(stream.as_raw_fd(), BUSY_MESSAGE);
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
        let r = read_stream(stream, buf);
        if matches!(r, Ok(ReadOutcome::Closed)) {
            slot.connected = false;
        }
        r
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

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::os::unix::net::UnixListener;
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
