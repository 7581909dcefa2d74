//! Host-side character backends, shared by the 8250 serial port and (later) virtio-console:
//! output sinks ([`StdoutSink`], [`FileSink`], [`NullSink`], [`LossyWriter`]), the terminal
//! raw-mode guard for stdin ([`StdinRaw`], [`restore_terminal`]) with EOF-aware reads
//! ([`read_fd`]), and a single-client unix socket console ([`UnixSocketConsole`]).
//!
//! None of these ever block a vCPU on a peer: socket output is non-blocking and dropped when the
//! peer is slow or gone. (Stdout and files are ordinary blocking writes, like any program's.)

mod channel;
mod listener;
mod sinks;
mod terminal;
mod unix_socket;

use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

pub use channel::ChannelSocket;
pub use listener::SocketListener;
pub use sinks::{FileMode, FileSink, LossyWriter, NullSink, StdoutSink};
pub use terminal::{is_pollable, read_fd, restore_terminal, stdin_is_tty, StdinRaw};
pub use unix_socket::{send_iov_nonblocking, ConsoleOutput, UnixSocketConsole, BUSY_MESSAGE};

/// Errors setting up a character backend.
#[derive(Debug, thiserror::Error)]
pub enum ChardevError {
    /// A terminal attribute call failed.
    #[error("terminal: {op} failed: {source}")]
    Terminal {
        /// The failing call (`tcgetattr`, `tcsetattr`).
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Stdin is already in raw mode under another guard.
    #[error("terminal: stdin is already in raw mode (another console owns it)")]
    TerminalInUse,
    /// An output file could not be opened.
    #[error("cannot open {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A unix socket path does not fit in `sockaddr_un`.
    #[error("socket path {} is too long (max {max} bytes)", path.display())]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
        /// The longest usable path, in bytes.
        max: usize,
    },
    /// Something that is not a socket already exists at the socket path.
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    /// A live process is listening on the socket path.
    #[error("{} is in use by another running process", .0.display())]
    SocketInUse(PathBuf),
    /// A socket system call failed.
    #[error("socket {}: {op} failed: {source}", path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The failing step.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// The result of a non-blocking read from a character backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many bytes were read (non-zero unless the buffer was empty).
    Data(usize),
    /// The peer is gone (EOF or hang-up): stop polling this fd.
    Closed,
    /// Nothing to read right now.
    WouldBlock,
}

/// Reads what a non-blocking stream has: [`ReadOutcome::Closed`] on end of file or when the
/// peer reset the connection; other errors are returned.
pub fn read_stream(stream: &mut impl io::Read, buf: &mut [u8]) -> io::Result<ReadOutcome> {
    if buf.is_empty() {
        return Ok(ReadOutcome::Data(0));
    }
    loop {
        return match stream.read(buf) {
            Ok(0) => Ok(ReadOutcome::Closed),
            Ok(n) => Ok(ReadOutcome::Data(n)),
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => Ok(ReadOutcome::WouldBlock),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                    Ok(ReadOutcome::Closed)
                }
                _ => Err(e),
            },
        };
    }
}

/// Locks `m`, recovering the data if a previous holder panicked.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
