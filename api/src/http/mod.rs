//! The REST API: HTTP/1.1 + JSON on a unix socket, the way orchestrators embed Firecracker or
//! Cloud Hypervisor. Routes are in [`router::ROUTES`] and documented in `api/openapi.json`.
//!
//! Requests on one connection are answered in order (pipelining works: the next request is
//! read once the previous one is answered); connections are kept alive unless the client says
//! `Connection: close` or speaks HTTP/1.0. Request bodies need a Content-Length: chunked
//! bodies get 501 and the connection is closed.

mod request;
pub mod router;

use std::path::Path;

use crate::controller::{ControllerHandle, Reply, TimedEvent};
use crate::server::{self, Ctx, DoorThread, Flow, Limits, Protocol, ServerError, Session};
use request::{parse_head, Head, Parsed};
use router::{Response, Route};

pub use router::ROUTES;

/// Largest request head accepted (request line + headers).
const MAX_HEAD: usize = 16 << 10;

/// A running API server. Dropping it is the same as [`ApiServer::shutdown`].
pub struct ApiServer {
    thread: DoorThread,
}

impl ApiServer {
    /// Listens on the unix socket `path` (created mode 0600; a stale socket file is replaced, a
    /// live one or another kind of file is an error) and serves the API on a thread of its own.
    pub fn start(path: &Path, controller: ControllerHandle) -> Result<ApiServer, ServerError> {
        ApiServer::start_with_limits(path, controller, Limits::http())
    }

    /// [`ApiServer::start`] with explicit limits.
    pub fn start_with_limits(
        path: &Path,
        controller: ControllerHandle,
        limits: Limits,
    ) -> Result<ApiServer, ServerError> {
        let listener = server::bind_unix(path)?;
        let http = Http {
            max_body: limits.max_message,
            max_head: MAX_HEAD.min(limits.max_message),
        };
        let thread = server::spawn(http, vec![listener], controller, None, limits)?;
        Ok(ApiServer { thread })
    }

    /// Stops serving: responses already queued are still sent (up to the flush timeout), then
    /// clients are disconnected, the thread is joined and the socket file is removed.
    pub fn shutdown(mut self) {
        self.thread.stop();
    }
}

struct Http {
    max_head: usize,
    max_body: usize,
}

impl Protocol for Http {
    type S = HttpSession;
    const NAME: &'static str = "API";

    fn open(&self, _out: &mut Vec<u8>) -> HttpSession {
        HttpSession {
            max_head: self.max_head,
            max_body: self.max_body,
            head: None,
            continue_sent: false,
            pending: None,
        }
    }

    fn refusal(&self, max_clients: usize) -> Vec<u8> {
        let mut out = Vec::new();
        Response::error(
            503,
            format!("too many API connections (at most {max_clients}); try again later"),
        )
        .write(&mut out, true);
        out
    }
}

/// One HTTP connection.
struct HttpSession {
    max_head: usize,
    max_body: usize,
    /// The head of the request whose body is being received.
    head: Option<Head>,
    continue_sent: bool,
    /// The request waiting for the VMM, and whether to keep the connection afterwards.
    pending: Option<(Route, bool)>,
}

impl Session for HttpSession {
    fn process(&mut self, input: &mut Vec<u8>, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) -> Flow {
        while self.pending.is_none() {
            if self.head.is_none() {
                match parse_head(input, self.max_head, self.max_body) {
                    Ok(Parsed::Partial) => return Flow::Continue,
                    Ok(Parsed::Head(head, n)) => {
                        input.drain(..n);
                        self.head = Some(head);
                        self.continue_sent = false;
                    }
                    Err(e) => {
                        Response::error(e.status(), e.to_string()).write(out, true);
                        return Flow::Close;
                    }
                }
            }
            let Some(head) = self.head.as_ref() else {
                return Flow::Continue;
            };
            if input.len() < head.content_length {
                if head.expect_continue && !self.continue_sent {
                    out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    self.continue_sent = true;
                }
                return Flow::Continue;
            }
            let Some(head) = self.head.take() else {
                return Flow::Continue;
            };
            let body: Vec<u8> = input.drain(..head.content_length).collect();
            let routed = router::route(&head.method, &head.path)
                .and_then(|r| router::action(r, &body).map(|a| (r, a)));
            match routed {
                Ok((route, action)) => {
                    self.pending = Some((route, head.keep_alive));
                    ctx.submit(action);
                }
                Err(resp) => {
                    resp.write(out, !head.keep_alive);
                    if !head.keep_alive {
                        return Flow::Close;
                    }
                }
            }
        }
        Flow::Continue
    }

    fn on_reply(&mut self, reply: Reply, out: &mut Vec<u8>, _ctx: &mut Ctx<'_>) -> Flow {
        let Some((route, keep_alive)) = self.pending.take() else {
            return Flow::Continue;
        };
        router::respond(route, reply).write(out, !keep_alive);
        if keep_alive {
            Flow::Continue
        } else {
            Flow::Close
        }
    }

    fn on_event(&mut self, _event: &TimedEvent, _out: &mut Vec<u8>) {}

    fn busy(&self) -> bool {
        self.pending.is_some()
    }

    fn overflow(&mut self, out: &mut Vec<u8>) {
        Response::error(
            413,
            format!("request too large (at most {} bytes)", self.max_body),
        )
        .write(out, true);
    }
}
