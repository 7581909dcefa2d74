//! The QMP monitor: QEMU's machine protocol (`docs/interop/qmp-spec.rst`) on unix and TCP
//! sockets, so that QMP clients (libvirt, `qemu.qmp`, `socat` by hand) can drive the VM.
//!
//! Each client gets the greeting, stays in capabilities negotiation until `qmp_capabilities`,
//! then may run commands and receives every VM event. Requests of one client are answered in
//! order, one at a time (QEMU without the `oob` capability, which we do not offer). The
//! server's background jobs (`jobs`: the whole-VM snapshot commands) are shared by all its
//! clients, and so are their JOB_STATUS_CHANGE events.

mod balloon;
mod commands;
mod events;
mod framing;
mod hmp;
mod jobs;
mod migration;

use std::net::SocketAddr;

pub use commands::{command_names, CommandError, ErrorClass};

use crate::config::QmpEndpoint;
use crate::controller::{ControllerHandle, EventReceiver, Reply, TimedEvent};
use crate::server::{self, Ctx, DoorThread, Flow, Limits, Notice, Protocol, ServerError, Session};
use commands::{Monitor, Step};
use framing::{write_line, Frame, JsonFramer};
use jobs::Jobs;

/// A running QMP monitor. Dropping it is the same as [`QmpServer::shutdown`].
pub struct QmpServer {
    thread: DoorThread,
    tcp_addrs: Vec<SocketAddr>,
}

impl QmpServer {
    /// Listens on every endpoint and serves QMP on a thread of its own. Binding errors (a live
    /// socket or another file at the path, a bad address, a port in use) are returned here.
    pub fn start(
        endpoints: &[QmpEndpoint],
        controller: ControllerHandle,
        events: EventReceiver,
    ) -> Result<QmpServer, ServerError> {
        QmpServer::start_with_limits(endpoints, controller, events, Limits::qmp())
    }

    /// [`QmpServer::start`] with explicit limits.
    pub fn start_with_limits(
        endpoints: &[QmpEndpoint],
        controller: ControllerHandle,
        events: EventReceiver,
        limits: Limits,
    ) -> Result<QmpServer, ServerError> {
        if endpoints.is_empty() {
            return Err(ServerError::NoEndpoint);
        }
        let mut listeners = Vec::new();
        let mut tcp_addrs = Vec::new();
        for ep in endpoints {
            match ep {
                QmpEndpoint::Unix(path) => listeners.push(server::bind_unix(path)?),
                QmpEndpoint::Tcp(addr) => {
                    let (l, local) = server::bind_tcp(addr)?;
                    listeners.push(l);
                    tcp_addrs.push(local);
                }
            }
        }
        let qmp = Qmp {
            jobs: Jobs::default(),
        };
        let thread = server::spawn(qmp, listeners, controller, Some(events), limits)?;
        Ok(QmpServer { thread, tcp_addrs })
    }

    /// The bound TCP addresses, in endpoint order (useful with port 0).
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    /// Stops serving: events already published (the final SHUTDOWN) and replies already given
    /// are still sent, for up to the flush timeout; then clients are disconnected, the thread is
    /// joined and the socket files are removed.
    pub fn shutdown(mut self) {
        self.thread.stop();
    }
}

/// The QMP protocol, with the server's job list.
struct Qmp {
    jobs: Jobs,
}

impl Protocol for Qmp {
    type S = QmpSession;
    const NAME: &'static str = "QMP";

    fn open(&self, out: &mut Vec<u8>) -> QmpSession {
        write_line(out, &commands::greeting());
        QmpSession {
            framer: JsonFramer::default(),
            monitor: Monitor::with_jobs(self.jobs.clone()),
        }
    }

    fn refusal(&self, max_clients: usize) -> Vec<u8> {
        let mut out = Vec::new();
        write_line(
            &mut out,
            &commands::parse_error(format!(
                "too many QMP clients (at most {max_clients}); try again later"
            )),
        );
        out
    }
}

/// One QMP client: the input framer and the monitor state.
struct QmpSession {
    framer: JsonFramer,
    monitor: Monitor,
}

impl QmpSession {
    fn step(&mut self, step: Step, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) {
        match step {
            Step::Answer(v) => write_line(out, &v),
            Step::Submit(action) => ctx.submit(action),
            Step::Announce {
                events,
                answer,
                job,
            } => {
                for e in &events {
                    write_line(out, e);
                }
                ctx.broadcast(events);
                write_line(out, &answer);
                if let Some((id, action)) = job {
                    let jobs = self.monitor.jobs().clone();
                    ctx.submit_detached(
                        action,
                        Box::new(move |reply| jobs::snapshot::conclude(&jobs, &id, reply)),
                    );
                }
            }
        }
    }
}

impl Session for QmpSession {
    fn process(&mut self, input: &mut Vec<u8>, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) -> Flow {
        while !self.monitor.busy() {
            match self.framer.next(input) {
                None => break,
                Some(Frame::Error(desc)) => write_line(out, &commands::parse_error(desc)),
                Some(Frame::Value(v)) => {
                    let step = self.monitor.request(v);
                    self.step(step, out, ctx);
                }
            }
        }
        Flow::Continue
    }

    fn on_reply(&mut self, reply: Reply, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) -> Flow {
        self.monitor.set_restore_started(ctx.restore_started());
        let step = self.monitor.reply(reply);
        self.step(step, out, ctx);
        Flow::Continue
    }

    fn on_event(&mut self, event: &TimedEvent, out: &mut Vec<u8>) {
        if let Some(v) = self.monitor.event(event) {
            write_line(out, &v);
        }
    }

    fn on_notice(&mut self, notice: &Notice, out: &mut Vec<u8>) {
        if self.monitor.gets_events() {
            write_line(out, notice);
        }
    }

    fn busy(&self) -> bool {
        self.monitor.busy()
    }

    fn overflow(&mut self, out: &mut Vec<u8>) {
        write_line(
            out,
            &commands::parse_error("JSON token size limit exceeded".into()),
        );
    }
}
