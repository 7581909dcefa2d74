//! What the two front doors (QMP and the REST API) share: binding their sockets, and one
//! epoll connection loop per door thread that multiplexes listeners, non-blocking clients, the
//! controller's replies and the VM's events, with the limits that keep one bad client from
//! hurting the VM or the other clients.
//!
//! A door plugs in its wire protocol through [`Protocol`] and [`Session`].

mod event_loop;
mod listener;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::controller::{Reply, TimedEvent};

pub(crate) use event_loop::{spawn, Ctx, DoorThread, Notice};
pub(crate) use listener::{bind_tcp, bind_unix};

/// Why a front door could not start. Returned synchronously by `start`, so the VMM can refuse to
/// run with a door it was asked for.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process accepts connections on this socket.
    #[error("{0}: a running process is already listening on this socket")]
    SocketInUse(PathBuf),
    /// The path exists and is not a socket: we never delete user files.
    #[error("{0}: the path exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The path cannot be a unix socket address.
    #[error("{path}: not usable as a unix socket path: {reason}")]
    BadUnixPath {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Creating, binding or listening on the unix socket failed.
    #[error("cannot listen on unix socket {path}: {source}")]
    BindUnix {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `HOST:PORT` does not parse or resolve.
    #[error("invalid TCP address `{addr}`: {reason}")]
    BadTcpAddress {
        /// The address as given.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Binding the TCP address failed (e.g. the port is in use).
    #[error("cannot listen on tcp:{addr}: {source}")]
    BindTcp {
        /// The address as given.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// No endpoint to listen on.
    #[error("no endpoint to listen on")]
    NoEndpoint,
    /// epoll/eventfd setup or the thread spawn failed.
    #[error("cannot start the {door} server: {source}")]
    Setup {
        /// Which door.
        door: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Per-door limits. Every client is bounded in memory and time.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connected clients at most; one more is told why and disconnected.
    pub max_clients: usize,
    /// Largest request (a QMP JSON object, an HTTP head + body) in bytes; a larger one gets an
    /// error and the client is disconnected.
    pub max_message: usize,
    /// Largest backlog of unsent output per client (a client that never reads is disconnected).
    pub max_output: usize,
    /// A client that leaves a request half-sent, or does not read its output, for this long is
    /// disconnected.
    pub stall_timeout: Duration,
    /// A client with nothing in flight for this long is disconnected (`None`: never; QMP clients
    /// legitimately wait for events for hours).
    pub idle_timeout: Option<Duration>,
    /// At shutdown, how long to keep writing what is already queued (the final SHUTDOWN event).
    pub flush_timeout: Duration,
}

impl Limits {
    /// The QMP monitor's defaults.
    pub fn qmp() -> Limits {
        Limits {
            max_clients: 128,
            max_message: 64 << 10,
            max_output: 256 << 10,
            stall_timeout: Duration::from_secs(10),
            idle_timeout: None,
            flush_timeout: Duration::from_secs(2),
        }
    }

    /// The REST API's defaults.
    pub fn http() -> Limits {
        Limits {
            idle_timeout: Some(Duration::from_secs(300)),
            ..Limits::qmp()
        }
    }
}

/// What a session wants after handling input or a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Keep going.
    Continue,
    /// Stop reading, send what is queued, then disconnect.
    Close,
}

/// One client's protocol state.
pub(crate) trait Session: Send + 'static {
    /// Handles the complete requests at the front of `input` (removing them), appending answers
    /// to `out`. Must stop at a request that needs the VMM ([`Ctx::submit`]) until its reply.
    fn process(&mut self, input: &mut Vec<u8>, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) -> Flow;
    /// The reply to the action this session submitted.
    fn on_reply(&mut self, reply: Reply, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) -> Flow;
    /// A VM event.
    fn on_event(&mut self, event: &TimedEvent, out: &mut Vec<u8>);
    /// A notice of the door itself ([`Ctx::broadcast`], [`Ctx::submit_detached`]); ignored
    /// unless the protocol has any.
    fn on_notice(&mut self, _notice: &Notice, _out: &mut Vec<u8>) {}
    /// Whether an action is in flight (no further request is handled until it is answered).
    fn busy(&self) -> bool;
    /// `input` reached [`Limits::max_message`] without a complete request: say so in `out`.
    fn overflow(&mut self, out: &mut Vec<u8>);
}

/// A door's wire protocol.
pub(crate) trait Protocol: Send + 'static {
    /// Per-client state.
    type S: Session;
    /// The door's name, for errors.
    const NAME: &'static str;
    /// A new client: its session, and the greeting (if any) in `out`.
    fn open(&self, out: &mut Vec<u8>) -> Self::S;
    /// What a client refused for the connection cap is told.
    fn refusal(&self, max_clients: usize) -> Vec<u8>;
}
