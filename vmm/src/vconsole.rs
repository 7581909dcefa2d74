//! The host ends of the virtio-console (`console` and `channels`), opened once per VMM process:
//! a guest reboot builds a new device over the same sockets, so a connected client stays
//! connected. Each incarnation's device reports the guest opening and closing its ports on the
//! event bus (QMP's VSERPORT_CHANGE). With `"agent": true` one more port, the QEMU guest
//! agent's, is joined to the VMM's own agent client ([`crate::agent`]) by a socket pair.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use api::controller::EventBus;
use api::{SerialConfig, VmConfig, VmEvent};
use devices::chardev::{self, ChannelSocket, ReadOutcome, StdinRaw};
use virtio::console::{Console, PortBackend, PortConfig, StreamBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::agent::{AgentClient, AgentWorker, AGENT_PORT_NAME};
use crate::console::EscapeFilter;
use crate::lock;
use crate::net::IdentifiedDevice;

/// The registry id of the virtio-console device.
pub const DEVICE_ID: &str = "virtio-console";
/// The id of the console port (QMP's VSERPORT_CHANGE).
pub const CONSOLE_PORT_ID: &str = "console0";
/// The id of the built-in agent's port.
pub const AGENT_PORT_ID: &str = "agent";

/// Errors opening a console or channel backend (the user's to fix: exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum VconsoleError {
    /// The console's file could not be opened.
    #[error("console: cannot open {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// A socket could not be set up.
    #[error("{what}: {source}")]
    Socket {
        /// `console` or `channel ID`.
        what: String,
        /// Why.
        source: chardev::ChardevError,
    },
    /// The terminal could not be put in raw mode.
    #[error("console: cannot set up the terminal: {0}")]
    Terminal(#[source] chardev::ChardevError),
    /// The device model refused the ports.
    #[error("console: {0}")]
    Device(String),
}

/// A backend shared by the devices of successive incarnations.
struct Shared(Arc<Mutex<Box<dyn PortBackend>>>);

impl PortBackend for Shared {
    fn fds(&self) -> Vec<RawFd> {
        lock(&self.0).fds()
    }
    fn accept(&mut self) -> io::Result<bool> {
        lock(&self.0).accept()
    }
    fn connected(&self) -> bool {
        lock(&self.0).connected()
    }
    fn read(&mut self, buf: &mut [u8]) -> ReadOutcome {
        lock(&self.0).read(buf)
    }
    fn write(&mut self, buf: &[u8]) -> Option<usize> {
        lock(&self.0).write(buf)
    }
    unsafe fn write_iov(&mut self, iov: &[libc::iovec]) -> Option<usize> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { lock(&self.0).write_iov(iov) }
    }
    fn release(&mut self) {
        lock(&self.0).release()
    }
}

/// The console on our stdin/stdout (raw mode on a terminal, `Ctrl-A x` quits).
struct StdioPort {
    _raw: Option<StdinRaw>,
    escapes: EscapeFilter,
    /// stdin can be watched (not a regular file or /dev/null) and has not ended.
    input: bool,
    quit: Arc<EventFd>,
}

impl PortBackend for StdioPort {
    fn fds(&self) -> Vec<RawFd> {
        match self.input {
            true => vec![io::stdin().as_raw_fd()],
            false => Vec::new(),
        }
    }
    fn connected(&self) -> bool {
        true
    }
    fn read(&mut self, buf: &mut [u8]) -> ReadOutcome {
        if !self.input {
            return ReadOutcome::WouldBlock;
        }
        // Escapes can only shrink the input: read at most what fits after filtering.
        match chardev::read_fd(io::stdin().as_fd(), buf) {
            Ok(ReadOutcome::Data(n)) => {
                let (bytes, quit) = self.escapes.filter(&buf[..n]);
                if quit {
                    let _ = self.quit.write(1);
                }
                buf[..bytes.len()].copy_from_slice(&bytes);
                if bytes.is_empty() {
                    // Only an escape was typed; nothing for the guest.
                    ReadOutcome::WouldBlock
                } else {
                    ReadOutcome::Data(bytes.len())
                }
            }
            Ok(ReadOutcome::WouldBlock) => ReadOutcome::WouldBlock,
            Ok(ReadOutcome::Closed) | Err(_) => {
                // End of input: stop reading, keep the console's output going.
                self.input = false;
                ReadOutcome::WouldBlock
            }
        }
    }
    fn write(&mut self, buf: &[u8]) -> Option<usize> {
        let mut out = io::stdout().lock();
        let _ = out.write_all(buf).and_then(|()| out.flush());
        Some(buf.len())
    }
}

/// Console output appended to a file; no input.
struct FilePort(File);

impl PortBackend for FilePort {
    fn fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    fn connected(&self) -> bool {
        true
    }
    fn read(&mut self, _buf: &mut [u8]) -> ReadOutcome {
        ReadOutcome::WouldBlock
    }
    fn write(&mut self, buf: &[u8]) -> Option<usize> {
        if let Err(e) = self.0.write_all(buf) {
            log::warn!("virtio-console: console file: {e}");
        }
        Some(buf.len())
    }
}

struct OpenPort {
    id: u32,
    label: String,
    name: Option<String>,
    console: bool,
    backend: Arc<Mutex<Box<dyn PortBackend>>>,
}

/// The virtio-console's ports, for the life of the VMM process.
pub struct ConsoleBackends {
    ports: Vec<OpenPort>,
    bus: EventBus,
    agent: Option<AgentHandle>,
}

/// The built-in agent channel: the VMM's client, and whether the guest has its end open.
#[derive(Clone)]
pub struct AgentHandle {
    /// The client, on its worker thread.
    pub worker: Arc<AgentWorker>,
    /// The guest has the port open (qemu-ga runs on it).
    pub connected: Arc<AtomicBool>,
}

impl ConsoleBackends {
    /// Opens the console and every channel `cfg` names; None when it has neither. `quit` is
    /// written when the user types `Ctrl-A x` on a stdio console.
    pub fn open(
        cfg: &VmConfig,
        quit: Arc<EventFd>,
        bus: EventBus,
    ) -> Result<Option<ConsoleBackends>, VconsoleError> {
        if !cfg.has_virtio_console() {
            return Ok(None);
        }
        let mut ports = Vec::new();
        let console: Option<Box<dyn PortBackend>> = match &cfg.console {
            None | Some(SerialConfig::Off) => None,
            Some(SerialConfig::Stdio) => {
                let raw = StdinRaw::enter().map_err(VconsoleError::Terminal)?;
                if raw.is_some() {
                    eprintln!("vmm: virtio console on this terminal; Ctrl-A x quits");
                }
                Some(Box::new(StdioPort {
                    escapes: EscapeFilter::new(raw.is_some()),
                    _raw: raw,
                    input: chardev::is_pollable(io::stdin().as_fd()),
                    quit,
                }))
            }
            Some(SerialConfig::File { path }) => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| VconsoleError::File {
                        path: path.display().to_string(),
                        source,
                    })?;
                Some(Box::new(FilePort(f)))
            }
            Some(SerialConfig::Socket { path }) => {
                Some(Box::new(ChannelSocket::bind(path).map_err(|source| {
                    VconsoleError::Socket {
                        what: "console".into(),
                        source,
                    }
                })?))
            }
        };
        if let Some(b) = console {
            ports.push(OpenPort {
                id: 0,
                label: CONSOLE_PORT_ID.into(),
                name: None,
                console: true,
                backend: Arc::new(Mutex::new(b)),
            });
        }
        for (i, c) in cfg.channels.iter().enumerate() {
            let id = cfg.channel_id(i);
            let sock = ChannelSocket::bind(&c.socket).map_err(|source| VconsoleError::Socket {
                what: format!("channel `{id}`"),
                source,
            })?;
            ports.push(OpenPort {
                id: i as u32 + 1,
                label: id,
                name: Some(c.name.clone()),
                console: false,
                backend: Arc::new(Mutex::new(Box::new(sock))),
            });
        }
        let agent = match cfg.agent {
            false => None,
            true => {
                let (ours, theirs) = UnixStream::pair().map_err(|e| {
                    VconsoleError::Device(format!("agent channel: socketpair: {e}"))
                })?;
                let worker = AgentClient::new(ours)
                    .and_then(AgentWorker::start)
                    .map_err(|e| VconsoleError::Device(format!("agent client: {e}")))?;
                let backend = StreamBackend::new(theirs)
                    .map_err(|e| VconsoleError::Device(format!("agent channel: {e}")))?;
                ports.push(OpenPort {
                    id: cfg.channels.len() as u32 + 1,
                    label: AGENT_PORT_ID.into(),
                    name: Some(AGENT_PORT_NAME.into()),
                    console: false,
                    backend: Arc::new(Mutex::new(Box::new(backend))),
                });
                Some(AgentHandle {
                    worker: Arc::new(worker),
                    connected: Arc::new(AtomicBool::new(false)),
                })
            }
        };
        Ok(Some(ConsoleBackends { ports, bus, agent }))
    }

    /// The built-in agent channel, if the VM has one.
    pub fn agent(&self) -> Option<AgentHandle> {
        self.agent.clone()
    }

    /// A fresh virtio-console device over the same backends, with its id.
    pub fn device(&self) -> Result<IdentifiedDevice, VconsoleError> {
        let ports = self
            .ports
            .iter()
            .map(|p| PortConfig {
                id: p.id,
                label: p.label.clone(),
                name: p.name.clone(),
                console: p.console,
                backend: Box::new(Shared(p.backend.clone())),
            })
            .collect();
        let mut dev = Console::new(ports).map_err(|e| VconsoleError::Device(e.to_string()))?;
        let bus = self.bus.clone();
        let agent = self.agent.as_ref().map(|a| a.connected.clone());
        dev.set_port_events(Box::new(move |id: &str, open: bool| {
            if id == AGENT_PORT_ID {
                if let Some(c) = &agent {
                    c.store(open, Ordering::SeqCst);
                }
            }
            bus.publish(VmEvent::VserportChange {
                id: id.to_string(),
                open,
            })
        }));
        Ok((DEVICE_ID.to_string(), Box::new(dev)))
    }
}
