//! A data channel on a unix socket, one client at a time, with nothing lost either way (like
//! libvirt's `<channel type='unix'><source mode='bind'/>` on QEMU's chardev socket server): the
//! host end of a virtio-console port.
//!
//! Unlike the serial console's socket ([`super::UnixSocketConsole`]), which drops output a slow
//! client cannot take, a channel exerts backpressure: [`ChannelSocket::write`] takes what the
//! socket takes and tells the caller to wait for writability (the caller keeps the rest). A
//! client that connects while another one is served waits in the listen backlog, as with
//! QEMU's server socket, and is taken when the first one leaves.
//!
//! Fd lifetime: when the client goes, its stream moves to a retired slot and stays open until
//! [`ChannelSocket::drop_retired`], so the event loop can stop watching the fd before it is
//! closed (and its number reused).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::unix_socket::{send_iov_nonblocking, send_nonblocking};
use super::{read_stream, ChardevError, ReadOutcome, SocketListener};

/// A unix socket channel serving one client at a time.
#[derive(Debug)]
pub struct ChannelSocket {
    listener: SocketListener,
    client: Option<UnixStream>,
    retired: Vec<UnixStream>,
}

impl ChannelSocket {
    /// Creates the socket at `path` (mode 0600, see [`SocketListener`]) and starts listening.
    pub fn bind(path: impl AsRef<Path>) -> Result<ChannelSocket, ChardevError> {
        Ok(ChannelSocket {
            listener: SocketListener::bind(path)?,
            client: None,
            retired: Vec::new(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.listener.path()
    }

    /// The fds to watch: the listener, and the client's while one is attached.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.listener.fd()];
        fds.extend(self.client.as_ref().map(AsRawFd::as_raw_fd));
        fds
    }

    /// Whether a client is attached.
    pub fn connected(&self) -> bool {
        self.client.is_some()
    }

    /// Takes a waiting client when none is attached; true when one was taken.
    pub fn accept(&mut self) -> io::Result<bool> {
        if self.client.is_some() {
            return Ok(false);
        }
        self.client = self.listener.accept()?;
        Ok(self.client.is_some())
    }

    /// Reads client input without blocking; [`ReadOutcome::Closed`] when there is no client
    /// or it just left (its stream is retired).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<ReadOutcome> {
        let Some(stream) = self.client.as_mut() else {
            return Ok(ReadOutcome::Closed);
        };
        match read_stream(stream, buf) {
            Ok(ReadOutcome::Closed) => {
                self.retire();
                Ok(ReadOutcome::Closed)
            }
            Err(e) => {
                log::debug!("channel {}: client gone: {e}", self.path().display());
                self.retire();
                Ok(ReadOutcome::Closed)
            }
            r => r,
        }
    }

    /// Sends what the socket takes now: the bytes sent (fewer than `buf.len()`, maybe 0, when the
    /// client is slow: wait for the fd to be writable). `None` when there is no client or it
    /// just left (its stream is retired).
    pub fn write(&mut self, buf: &[u8]) -> Option<usize> {
        let stream = self.client.as_ref()?;
        match send_nonblocking(stream.as_raw_fd(), buf) {
            Ok(n) => Some(n),
            Err(e) => {
                log::debug!("channel {}: client gone: {e}", self.path().display());
                self.retire();
                None
            }
        }
    }

    /// [`ChannelSocket::write`] from several buffers at once (one `sendmsg`).
    ///
    /// # Safety
    /// Every iovec must name memory valid for reads of its length for the duration of the call.
    pub unsafe fn write_iov(&mut self, iov: &[libc::iovec]) -> Option<usize> {
        let stream = self.client.as_ref()?;
        // SAFETY: the caller's guarantee, passed on.
        match unsafe { send_iov_nonblocking(stream.as_raw_fd(), iov) } {
            Ok(n) => Some(n),
            Err(e) => {
                log::debug!("channel {}: client gone: {e}", self.path().display());
                self.retire();
                None
            }
        }
    }

    /// Lets go of the client (as if it had left).
    pub fn disconnect(&mut self) {
        self.retire();
    }

    fn retire(&mut self) {
        if let Some(s) = self.client.take() {
            self.retired.push(s);
        }
    }

    /// Closes the streams of clients that left (once their fds are no longer watched).
    pub fn drop_retired(&mut self) {
        self.retired.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    fn channel() -> (TempDir, ChannelSocket) {
        let dir = TempDir::new().unwrap();
        let ch = ChannelSocket::bind(dir.as_path().join("ch.sock")).unwrap();
        (dir, ch)
    }

    #[test]
    fn one_client_at_a_time_the_next_one_waits_then_is_served() {
        let (_dir, mut ch) = channel();
        let mode = std::fs::metadata(ch.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!ch.accept().unwrap(), "nobody connected yet");
        let mut a = UnixStream::connect(ch.path()).unwrap();
        let mut b = UnixStream::connect(ch.path()).unwrap();
        assert!(ch.accept().unwrap());
        assert_eq!(ch.fds().len(), 2);
        assert!(
            !ch.accept().unwrap(),
            "the second client waits in the backlog"
        );
        a.write_all(b"from a").unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(ch.read(&mut buf).unwrap(), ReadOutcome::Data(6));
        assert_eq!(&buf[..6], b"from a");
        drop(a);
        assert_eq!(ch.read(&mut buf).unwrap(), ReadOutcome::Closed);
        assert!(!ch.connected());
        assert_eq!(ch.fds().len(), 1);
        ch.drop_retired();
        assert!(ch.accept().unwrap(), "the waiting client is served next");
        b.write_all(b"from b").unwrap();
        assert_eq!(ch.read(&mut buf).unwrap(), ReadOutcome::Data(6));
        assert_eq!(ch.write(b"hello b"), Some(7));
        let mut got = [0u8; 7];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello b");
    }

    #[test]
    fn a_slow_client_gets_backpressure_not_loss() {
        let (_dir, mut ch) = channel();
        let mut c = UnixStream::connect(ch.path()).unwrap();
        assert!(ch.accept().unwrap());
        let chunk = vec![0x5au8; 64 << 10];
        let mut sent = 0usize;
        // Fill the socket until it pushes back.
        loop {
            match ch.write(&chunk) {
                Some(n) if n == chunk.len() => sent += n,
                Some(n) => {
                    sent += n;
                    break;
                }
                None => panic!("client reported gone"),
            }
            assert!(sent < 64 << 20, "the socket never pushed back");
        }
        assert_eq!(
            ch.write(&chunk),
            Some(0),
            "still full: nothing taken, nothing lost"
        );
        let mut got = vec![0u8; sent];
        c.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&b| b == 0x5a));
        assert!(
            ch.write(&chunk).unwrap() > 0,
            "drained: it takes data again"
        );
    }

    #[test]
    fn writes_without_a_client_say_so() {
        let (_dir, mut ch) = channel();
        assert_eq!(ch.write(b"x"), None);
        let c = UnixStream::connect(ch.path()).unwrap();
        assert!(ch.accept().unwrap());
        drop(c);
        assert_eq!(ch.read(&mut [0u8; 4]).unwrap(), ReadOutcome::Closed);
        assert_eq!(ch.write(b"x"), None);
        assert!(!ch.connected());
    }
}
