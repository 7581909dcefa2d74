//! The host side of the serial console: the chosen backend (stdio, file, unix socket, off),
//! which outlives guest reboots, and the event-loop subscribers that carry host input into the
//! guest's UART.
//!
//! On a terminal, stdin is switched to raw mode so keys reach the guest unchanged; `Ctrl-A x`
//! quits the VMM (as in QEMU) and `Ctrl-A Ctrl-A` sends a literal `Ctrl-A`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use api::SerialConfig;
use devices::chardev::{self, ReadOutcome, StdinRaw, UnixSocketConsole};
use devices::serial::Serial;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::lock;

/// Errors opening a console backend.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The output file could not be opened.
    #[error("serial: cannot open {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The unix socket could not be set up.
    #[error("serial: {0}")]
    Socket(#[source] chardev::ChardevError),
    /// The terminal could not be put in raw mode.
    #[error("serial: cannot set up the terminal: {0}")]
    Terminal(#[source] chardev::ChardevError),
}

/// The serial console's host end. Created once per VMM process, reused across guest reboots.
pub enum SerialBackend {
    /// Our stdin/stdout; the guard restores the terminal when dropped.
    Stdio(Option<StdinRaw>),
    /// Output appended to a file.
    File(File),
    /// A unix socket server.
    Socket(Arc<Mutex<UnixSocketConsole>>),
    /// Nothing.
    Off,
}

/// The byte that starts a console escape (Ctrl-A).
pub(crate) const ESCAPE: u8 = 0x01;

impl SerialBackend {
    /// Opens the backend `cfg` names.
    pub fn open(cfg: &SerialConfig) -> Result<SerialBackend, ConsoleError> {
        Ok(match cfg {
            SerialConfig::Stdio => {
                let guard = StdinRaw::enter().map_err(ConsoleError::Terminal)?;
                if guard.is_some() {
                    eprintln!("vmm: serial console on this terminal; Ctrl-A x quits");
                }
                SerialBackend::Stdio(guard)
            }
            SerialConfig::File { path } => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ConsoleError::File {
                        path: path.display().to_string(),
                        source,
                    })?;
                SerialBackend::File(file)
            }
            SerialConfig::Socket { path } => {
                let console = UnixSocketConsole::bind(path).map_err(ConsoleError::Socket)?;
                SerialBackend::Socket(Arc::new(Mutex::new(console)))
            }
            SerialConfig::Off => SerialBackend::Off,
        })
    }

    /// A sink for guest output, for one VM incarnation.
    pub fn output(&self) -> Box<dyn Write + Send> {
        match self {
            SerialBackend::Stdio(_) => Box::new(chardev::StdoutSink),
            SerialBackend::File(f) => match f.try_clone() {
                Ok(f) => Box::new(f),
                Err(e) => {
                    eprintln!("vmm: serial file unusable, output dropped: {e}");
                    Box::new(io::sink())
                }
            },
            SerialBackend::Socket(console) => Box::new(lock(console).output_sink()),
            SerialBackend::Off => Box::new(io::sink()),
        }
    }

    /// The event-loop subscriber that feeds host input to `serial`, if this backend has input.
    /// `quit` is written when the user asks to quit from the console.
    pub fn input_subscriber(
        &self,
        serial: Arc<Mutex<Serial>>,
        quit: Arc<EventFd>,
    ) -> Option<Box<dyn MutEventSubscriber>> {
        match self {
            SerialBackend::Stdio(guard) => Some(Box::new(StdinInput {
                serial,
                quit,
                escapes: EscapeFilter::new(guard.is_some()),
                warned_full: false,
            })),
            SerialBackend::Socket(console) => Some(Box::new(SocketInput {
                serial,
                console: console.clone(),
            })),
            SerialBackend::File(_) | SerialBackend::Off => None,
        }
    }
}

/// Feeds bytes to the UART, dropping (with one warning) what does not fit in its input queue.
fn feed(serial: &Mutex<Serial>, bytes: &[u8], warned_full: &mut bool) {
    if bytes.is_empty() {
        return;
    }
    let taken = lock(serial).enqueue_input(bytes);
    if taken < bytes.len() && !*warned_full {
        *warned_full = true;
        eprintln!(
            "vmm: serial input queue full, {} bytes dropped",
            bytes.len() - taken
        );
    }
}

struct StdinInput {
    serial: Arc<Mutex<Serial>>,
    quit: Arc<EventFd>,
    escapes: EscapeFilter,
    warned_full: bool,
}

/// The console's `Ctrl-A` escapes on a terminal: `Ctrl-A x` quits, `Ctrl-A Ctrl-A` is a
/// literal `Ctrl-A`, anything else after `Ctrl-A` goes through as typed.
pub(crate) struct EscapeFilter {
    /// Whether escapes are interpreted (only on a terminal).
    enabled: bool,
    pending: bool,
}

impl EscapeFilter {
    pub(crate) fn new(enabled: bool) -> EscapeFilter {
        EscapeFilter {
            enabled,
            pending: false,
        }
    }

    /// Applies the escapes; returns the bytes for the guest and whether to quit.
    pub(crate) fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        if !self.enabled {
            return (input.to_vec(), false);
        }
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.pending {
                self.pending = false;
                match b {
                    b'x' | b'X' => return (out, true),
                    ESCAPE => out.push(ESCAPE),
                    other => {
                        out.push(ESCAPE);
                        out.push(other);
                    }
                }
            } else if b == ESCAPE {
                self.pending = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

impl StdinInput {
    fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        self.escapes.filter(input)
    }
}

impl MutEventSubscriber for StdinInput {
    fn init(&mut self, ops: &mut EventOps) {
        let stdin = io::stdin();
        if chardev::is_pollable(stdin.as_fd()) {
            if let Err(e) = ops.add(Events::new(&stdin, EventSet::IN)) {
                eprintln!("vmm: cannot watch stdin, console input disabled: {e}");
            }
            return;
        }
        // A regular file or /dev/null: epoll cannot watch it, and it is always ready. Feed what
        // fits in the UART's input queue now; there is nothing more to wait for.
        let mut buf = vec![0u8; devices::serial::INPUT_QUEUE_CAPACITY];
        let mut len = 0;
        while len < buf.len() {
            match chardev::read_fd(stdin.as_fd(), &mut buf[len..]) {
                Ok(ReadOutcome::Data(n)) if n > 0 => len += n,
                _ => break,
            }
        }
        let (bytes, _) = self.filter(&buf[..len]);
        feed(&self.serial, &bytes, &mut self.warned_full);
    }

    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        let stdin = io::stdin();
        match chardev::read_fd(stdin.as_fd(), &mut buf) {
            Ok(ReadOutcome::Data(n)) => {
                let (bytes, quit) = self.filter(&buf[..n]);
                feed(&self.serial, &bytes, &mut self.warned_full);
                if quit {
                    let _ = self.quit.write(1);
                }
            }
            Ok(ReadOutcome::WouldBlock) => {}
            Ok(ReadOutcome::Closed) => {
                // End of input (a closed pipe, a hung-up terminal): stop watching, keep running.
                let _ = ops.remove(Events::new(&stdin, EventSet::IN));
            }
            Err(e) => {
                eprintln!("vmm: stdin read failed, console input disabled: {e}");
                let _ = ops.remove(Events::new(&stdin, EventSet::IN));
            }
        }
    }
}

/// Data tag telling the listener's events from the client's.
const TAG_LISTENER: u32 = 0;
const TAG_CLIENT: u32 = 1;

struct SocketInput {
    serial: Arc<Mutex<Serial>>,
    console: Arc<Mutex<UnixSocketConsole>>,
}

impl MutEventSubscriber for SocketInput {
    fn init(&mut self, ops: &mut EventOps) {
        let console = lock(&self.console);
        let fd = console.listener_fd();
        if let Err(e) = ops.add(Events::with_data_raw(fd, TAG_LISTENER, EventSet::IN)) {
            eprintln!("vmm: cannot watch the serial socket: {e}");
        }
        if let Some(client) = console.client_fd() {
            let _ = ops.add(Events::with_data_raw(client, TAG_CLIENT, EventSet::IN));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut console = lock(&self.console);
        if events.data() == TAG_LISTENER {
            let old = console.client_fd();
            match console.accept_client() {
                Ok(Some(fd)) => {
                    if let Some(old) = old.filter(|&o| o != fd) {
                        let _ = ops.remove(Events::empty_raw(old));
                    }
                    if Some(fd) != old {
                        let _ = ops.add(Events::with_data_raw(fd, TAG_CLIENT, EventSet::IN));
                    }
                }
                Ok(None) => {}
                Err(e) => eprintln!("vmm: serial socket accept failed: {e}"),
            }
            return;
        }
        let fd = events.fd();
        let mut buf = [0u8; 1024];
        match console.read_client(&mut buf) {
            Ok(ReadOutcome::Data(n)) => {
                drop(console);
                let mut warned = true;
                feed(&self.serial, &buf[..n], &mut warned);
            }
            Ok(ReadOutcome::WouldBlock) => {}
            Ok(ReadOutcome::Closed) | Err(_) => {
                let _ = ops.remove(Events::empty_raw(fd));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(escapes: bool) -> StdinInput {
        let out: Box<dyn Write + Send> = Box::new(io::sink());
        let irq = Arc::new(devices::interrupt::EventFdLine::new().unwrap());
        StdinInput {
            serial: Arc::new(Mutex::new(Serial::new(irq, out))),
            quit: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            escapes: EscapeFilter::new(escapes),
            warned_full: false,
        }
    }

    #[test]
    fn ctrl_a_x_quits() {
        let mut i = input(true);
        assert_eq!(i.filter(b"ls\r\x01x"), (b"ls\r".to_vec(), true));
    }

    #[test]
    fn ctrl_a_ctrl_a_is_literal() {
        let mut i = input(true);
        assert_eq!(i.filter(b"\x01\x01a"), (b"\x01a".to_vec(), false));
        assert_eq!(i.filter(b"\x01"), (vec![], false));
        assert_eq!(i.filter(b"b"), (b"\x01b".to_vec(), false));
    }

    #[test]
    fn no_escapes_off_a_terminal() {
        let mut i = input(false);
        assert_eq!(i.filter(b"\x01x"), (b"\x01x".to_vec(), false));
    }
}
