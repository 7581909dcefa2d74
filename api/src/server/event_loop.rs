//! The door thread: one epoll over the door's listeners, its non-blocking clients, the wake-up
//! of replies and events, and a stop EventFd. The thread never blocks on the VMM: actions are
//! submitted with a callback that queues the reply in the door's [`Inbox`] and wakes the epoll.
//!
//! Replies and events reach the door through one queue, in the order the VMM thread produced
//! them: the reply callback (which runs on the VMM thread) first moves any event already
//! published into the queue, then its reply. The same queue carries the door's own notices
//! (QMP's job events) to its other clients, and the replies to actions submitted for no client
//! in particular ([`Ctx::submit_detached`]), which the door turns into notices for all.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::listener::{Listener, Stream};
use super::{Flow, Limits, Protocol, ServerError, Session};
use crate::action::VmmAction;
use crate::controller::{ControllerHandle, EventReceiver, Reply, TimedEvent};

const TOKEN_STOP: u64 = 0;
const TOKEN_INBOX: u64 = 1;
const TOKEN_EVENTS: u64 = 2;
const TOKEN_LISTENER: u64 = 16;
const TOKEN_CLIENT: u64 = 1 << 20;

/// How often timeouts are checked while clients are connected.
const TICK_MS: i32 = 200;
/// How long accepting pauses after an accept error such as EMFILE.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Something a door tells every one of its clients on its own, not a VM event (QMP's job
/// events); each session decides whether and how to send it ([`Session::on_notice`]).
pub(crate) type Notice = serde_json::Value;

/// Runs on the door thread with the reply to an action no client waits for
/// ([`Ctx::submit_detached`]); the notices it returns go to every client.
pub(crate) type DetachedFn = Box<dyn FnOnce(Reply) -> Vec<Notice> + Send>;

/// Something for the door from the VMM thread (or from one of its own sessions).
enum Incoming {
    Reply(u64, Reply),
    Event(TimedEvent),
    /// Notices for every client but `from`, which has sent them already.
    Notices {
        from: u64,
        notices: Vec<Notice>,
    },
    /// The reply to a detached action, and what to make of it.
    Detached(DetachedFn, Reply),
}

struct InboxState {
    queue: VecDeque<Incoming>,
    events: Option<EventReceiver>,
}

impl InboxState {
    fn pull_events(&mut self) {
        if let Some(rx) = &self.events {
            for e in rx.drain() {
                self.queue.push_back(Incoming::Event(e));
            }
        }
    }
}

/// Replies and events on their way to the door thread, in order.
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    waker: EventFd,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called on the VMM thread by the reply callback (and by sessions for their notices):
    /// events already published go first, so that the door sees everything in order.
    fn push(&self, item: Incoming) {
        {
            let mut s = self.lock();
            s.pull_events();
            s.queue.push_back(item);
        }
        // A failed write means the counter is saturated: readable anyway.
        let _ = self.waker.write(1);
    }

    fn take(&self) -> VecDeque<Incoming> {
        let _ = self.waker.read();
        let mut s = self.lock();
        s.pull_events();
        std::mem::take(&mut s.queue)
    }
}

/// What a session can do besides writing output: submit an action for its client.
pub(crate) struct Ctx<'a> {
    controller: &'a ControllerHandle,
    inbox: &'a Arc<Inbox>,
    client: u64,
}

impl Ctx<'_> {
    /// Submits `action`; the session's `on_reply` gets the result.
    pub(crate) fn submit(&mut self, action: VmmAction) {
        let inbox = Arc::clone(self.inbox);
        let client = self.client;
        self.controller.submit(
            action,
            Box::new(move |r| inbox.push(Incoming::Reply(client, r))),
        );
    }

    /// Submits `action` for no client in particular: the session goes on at once, and `then`
    /// runs on the door thread with the reply (even if this client has left by then); the
    /// notices it returns go to every client.
    pub(crate) fn submit_detached(&mut self, action: VmmAction, then: DetachedFn) {
        let inbox = Arc::clone(self.inbox);
        self.controller.submit(
            action,
            Box::new(move |r| inbox.push(Incoming::Detached(then, r))),
        );
    }

    /// Sends `notices` to every other client of the door (this session has written them to its
    /// own output already), after whatever the door has queued for them so far.
    pub(crate) fn broadcast(&mut self, notices: Vec<Notice>) {
        if !notices.is_empty() {
            self.inbox.push(Incoming::Notices {
                from: self.client,
                notices,
            });
        }
    }

    /// Whether a restore went through a door already (see
    /// [`ControllerHandle::restore_started`]).
    pub(crate) fn restore_started(&self) -> bool {
        self.controller.restore_started()
    }
}

/// The handle of a running door thread: stopping it flushes queued output and joins.
pub(crate) struct DoorThread {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl DoorThread {
    /// Stops the thread (after it delivered what the VMM already sent) and waits for it.
    pub(crate) fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for DoorThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a door thread serving `protocol` on `listeners`.
pub(crate) fn spawn<P: Protocol>(
    protocol: P,
    listeners: Vec<Listener>,
    controller: ControllerHandle,
    events: Option<EventReceiver>,
    limits: Limits,
) -> Result<DoorThread, ServerError> {
    let setup = |source: io::Error| ServerError::Setup {
        door: P::NAME,
        source,
    };
    let epoll = Epoll::new().map_err(setup)?;
    let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(setup)?);
    let events_fd = events.as_ref().map(|e| e.waker().as_raw_fd());
    let inbox = Arc::new(Inbox {
        state: Mutex::new(InboxState {
            queue: VecDeque::new(),
            events,
        }),
        waker: EventFd::new(libc::EFD_NONBLOCK).map_err(setup)?,
    });
    let add = |fd: RawFd, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    add(stop.as_raw_fd(), TOKEN_STOP).map_err(setup)?;
    add(inbox.waker.as_raw_fd(), TOKEN_INBOX).map_err(setup)?;
    if let Some(fd) = events_fd {
        add(fd, TOKEN_EVENTS).map_err(setup)?;
    }
    for (i, l) in listeners.iter().enumerate() {
        add(l.raw_fd(), TOKEN_LISTENER + i as u64).map_err(setup)?;
    }
    let door = Door {
        protocol,
        epoll,
        listeners,
        accept_paused_until: None,
        clients: HashMap::new(),
        next_id: TOKEN_CLIENT,
        controller,
        inbox,
        limits,
    };
    let thread = std::thread::Builder::new()
        .name(format!("{}-server", P::NAME))
        .spawn(move || door.run())
        .map_err(setup)?;
    Ok(DoorThread {
        stop,
        thread: Some(thread),
    })
}

struct Client<S> {
    stream: Stream,
    session: S,
    input: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    read_closed: bool,
    rdhup_seen: bool,
    /// The peer closed both ways; the fd is out of the epoll while a reply is awaited.
    hung_up: bool,
    closing: bool,
    /// Since when a request has been incomplete (reset whenever one completes).
    partial_since: Option<Instant>,
    /// Last time output made progress (or became pending).
    last_write: Instant,
    /// Last time anything happened on this connection.
    last_activity: Instant,
    interest: EventSet,
}

impl<S: Session> Client<S> {
    fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }

    fn wants_input(&self, max: usize) -> bool {
        !self.read_closed && !self.closing && !self.session.busy() && self.input.len() < max
    }

    fn interest(&self, max: usize) -> EventSet {
        let mut set = EventSet::empty();
        if self.wants_input(max) {
            set |= EventSet::IN;
        }
        if self.pending_out() > 0 {
            set |= EventSet::OUT;
        }
        if !self.rdhup_seen {
            set |= EventSet::READ_HANG_UP;
        }
        set
    }

    fn read_input(&mut self, max: usize) -> io::Result<()> {
        let mut buf = [0u8; 16 << 10];
        while self.wants_input(max) {
            let room = buf.len().min(max - self.input.len());
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => self.read_closed = true,
                Ok(n) => {
                    self.input.extend_from_slice(&buf[..n]);
                    self.last_activity = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_out(&mut self) -> io::Result<()> {
        while self.pending_out() > 0 {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out_pos += n;
                    self.last_write = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos > self.out.len() / 2 {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(())
    }
}

struct Door<P: Protocol> {
    protocol: P,
    epoll: Epoll,
    listeners: Vec<Listener>,
    accept_paused_until: Option<Instant>,
    clients: HashMap<u64, Client<P::S>>,
    next_id: u64,
    controller: ControllerHandle,
    inbox: Arc<Inbox>,
    limits: Limits,
}

impl<P: Protocol> Door<P> {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let timeout = if self.clients.is_empty() && self.accept_paused_until.is_none() {
                -1
            } else {
                TICK_MS
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let mut stop = false;
            let mut inbox = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => stop = true,
                    TOKEN_INBOX | TOKEN_EVENTS => inbox = true,
                    t if t < TOKEN_CLIENT => self.accept((t - TOKEN_LISTENER) as usize),
                    id => self.on_client_event(id, ev.event_set()),
                }
            }
            if inbox || stop {
                self.dispatch_inbox();
            }
            if stop {
                break;
            }
            self.check_timers();
        }
        self.finish();
    }

    fn accept(&mut self, index: usize) {
        loop {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            match listener.accept() {
                Ok(mut stream) => {
                    if self.clients.len() >= self.limits.max_clients {
                        // Best effort: the socket is fresh, so the short refusal fits its buffer.
                        let _ = stream.write(&self.protocol.refusal(self.limits.max_clients));
                        continue;
                    }
                    self.add_client(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(_) => {
                    // Out of fds or similar: stop accepting for a moment rather than spin.
                    for l in &self.listeners {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            l.raw_fd(),
                            EpollEvent::default(),
                        );
                    }
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    fn add_client(&mut self, stream: Stream) {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = Vec::new();
        let session = self.protocol.open(&mut out);
        let now = Instant::now();
        let fd = stream.raw_fd();
        let client = Client {
            stream,
            session,
            input: Vec::new(),
            out,
            out_pos: 0,
            read_closed: false,
            rdhup_seen: false,
            hung_up: false,
            closing: false,
            partial_since: None,
            last_write: now,
            last_activity: now,
            interest: EventSet::IN | EventSet::READ_HANG_UP,
        };
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(client.interest, id),
            )
            .is_err()
        {
            return;
        }
        self.clients.insert(id, client);
        self.settle(id);
    }

    fn remove(&mut self, id: u64) {
        if let Some(c) = self.clients.remove(&id) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn on_client_event(&mut self, id: u64, set: EventSet) {
        let max = self.limits.max_message;
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if set.contains(EventSet::ERROR) {
            self.remove(id);
            return;
        }
        if set.contains(EventSet::HANG_UP) {
            // Closed both ways (a unix peer that wrote and left): what it sent before leaving is
            // still handled, the answers go nowhere. HUP stays reported, so stop watching.
            let _ = c.read_input(max);
            c.read_closed = true;
            c.hung_up = true;
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.raw_fd(),
                EpollEvent::default(),
            );
            self.settle(id);
            return;
        }
        if set.contains(EventSet::READ_HANG_UP) {
            c.rdhup_seen = true;
        }
        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP) && c.read_input(max).is_err() {
            self.remove(id);
            return;
        }
        self.settle(id);
    }

    /// Lets the session handle what it can, writes, and closes or re-arms the client.
    fn settle(&mut self, id: u64) {
        let limits = &self.limits;
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let mut ctx = Ctx {
            controller: &self.controller,
            inbox: &self.inbox,
            client: id,
        };
        if !c.closing && !c.session.busy() {
            let before = c.input.len();
            if c.session.process(&mut c.input, &mut c.out, &mut ctx) == Flow::Close {
                c.closing = true;
            }
            if c.input.len() != before {
                c.partial_since = None;
            }
            if !c.closing && !c.session.busy() {
                if c.input.len() >= limits.max_message {
                    c.session.overflow(&mut c.out);
                    c.closing = true;
                } else if c.read_closed {
                    // EOF: a half request left over can never complete.
                    c.closing = true;
                }
            }
        }
        // Pipelined input held back while busy is read again once the interest includes IN
        // (epoll is level-triggered).
        if c.input.iter().any(|b| !b.is_ascii_whitespace()) {
            c.partial_since.get_or_insert_with(Instant::now);
        } else {
            c.partial_since = None;
        }
        if c.hung_up {
            if !c.session.busy() {
                self.remove(id);
            }
            return;
        }
        let had_out = c.pending_out() > 0;
        let drop_it = c.pending_out() > limits.max_output
            || c.write_out().is_err()
            || (c.closing && c.pending_out() == 0);
        if drop_it {
            self.remove(id);
            return;
        }
        if !had_out && c.pending_out() > 0 {
            c.last_write = Instant::now();
        }
        let want = c.interest(limits.max_message);
        if want != c.interest {
            let fd = c.stream.raw_fd();
            c.interest = want;
            if self
                .epoll
                .ctl(ControlOperation::Modify, fd, EpollEvent::new(want, id))
                .is_err()
            {
                self.remove(id);
            }
        }
    }

    fn dispatch_inbox(&mut self) {
        let mut touched_all = false;
        for item in self.inbox.take() {
            match item {
                Incoming::Reply(id, reply) => {
                    let Some(c) = self.clients.get_mut(&id) else {
                        // The client left mid-command: nobody to tell.
                        continue;
                    };
                    let mut ctx = Ctx {
                        controller: &self.controller,
                        inbox: &self.inbox,
                        client: id,
                    };
                    c.last_activity = Instant::now();
                    if c.session.on_reply(reply, &mut c.out, &mut ctx) == Flow::Close {
                        c.closing = true;
                    }
                    self.settle(id);
                }
                Incoming::Event(ev) => {
                    for c in self.clients.values_mut() {
                        c.session.on_event(&ev, &mut c.out);
                    }
                    touched_all = true;
                }
                Incoming::Notices { from, notices } => {
                    self.notify(Some(from), &notices);
                    touched_all = true;
                }
                Incoming::Detached(then, reply) => {
                    let notices = then(reply);
                    self.notify(None, &notices);
                    touched_all = true;
                }
            }
        }
        if touched_all {
            let ids: Vec<u64> = self.clients.keys().copied().collect();
            for id in ids {
                self.settle(id);
            }
        }
    }

    /// Hands `notices` to every session but `except`'s.
    fn notify(&mut self, except: Option<u64>, notices: &[Notice]) {
        for (id, c) in self.clients.iter_mut() {
            if Some(*id) != except {
                for n in notices {
                    c.session.on_notice(n, &mut c.out);
                }
            }
        }
    }

    fn check_timers(&mut self) {
        let now = Instant::now();
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            for (i, l) in self.listeners.iter().enumerate() {
                let _ = self.epoll.ctl(
                    ControlOperation::Add,
                    l.raw_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_LISTENER + i as u64),
                );
            }
        }
        let stall = self.limits.stall_timeout;
        let idle = self.limits.idle_timeout;
        let expired: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| {
                if c.session.busy() {
                    return false;
                }
                let half_sent = c.partial_since.is_some_and(|t| now - t > stall);
                let not_reading = c.pending_out() > 0 && now - c.last_write > stall;
                let idle = idle.is_some_and(|t| {
                    c.input.is_empty() && c.pending_out() == 0 && now - c.last_activity > t
                });
                half_sent || not_reading || idle
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.remove(id);
        }
    }

    /// Stops accepting, writes what is queued (bounded by the flush timeout), then closes all.
    fn finish(&mut self) {
        for l in self.listeners.drain(..) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, l.raw_fd(), EpollEvent::default());
        }
        let deadline = Instant::now() + self.limits.flush_timeout;
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let done: Vec<u64> = self
                .clients
                .iter()
                .filter(|(_, c)| c.pending_out() == 0 || c.hung_up)
                .map(|(id, _)| *id)
                .collect();
            for id in done {
                self.remove(id);
            }
            let now = Instant::now();
            if self.clients.is_empty() || now >= deadline {
                break;
            }
            for (id, c) in self.clients.iter_mut() {
                c.interest = EventSet::OUT;
                let _ = self.epoll.ctl(
                    ControlOperation::Modify,
                    c.stream.raw_fd(),
                    EpollEvent::new(EventSet::OUT, *id),
                );
            }
            let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
            let n = match self.epoll.wait(ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            for ev in &events[..n] {
                let id = ev.data();
                let Some(c) = self.clients.get_mut(&id) else {
                    continue;
                };
                if ev.event_set().contains(EventSet::ERROR) || c.write_out().is_err() {
                    self.remove(id);
                }
            }
        }
        let ids: Vec<u64> = self.clients.keys().copied().collect();
        for id in ids {
            self.remove(id);
        }
    }
}
