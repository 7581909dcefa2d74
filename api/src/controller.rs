//! The plumbing between the control plane's front doors (REST, QMP) and the VMM thread.
//!
//! A door submits a [`VmmAction`] through a [`ControllerHandle`] with a reply callback; the VMM
//! thread's event loop wakes on the [`ControllerInbox`]'s EventFd, executes the action, and calls
//! the callback with the result. VM events flow the other way through an [`EventBus`]: each door
//! subscribes and gets its own receiver plus an EventFd to poll.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use vmm_sys_util::eventfd::EventFd;

use crate::action::{ActionError, VmEvent, VmmAction, VmmResponse};

/// The result of an action.
pub type Reply = Result<VmmResponse, ActionError>;

/// Called once with the result of an action, on the VMM thread.
pub type ReplyFn = Box<dyn FnOnce(Reply) + Send>;

/// An action on its way to the VMM thread.
pub struct ActionRequest {
    /// What to do.
    pub action: VmmAction,
    /// Where the answer goes.
    pub reply: ReplyFn,
}

impl std::fmt::Debug for ActionRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActionRequest")
            .field("action", &self.action)
            .finish_non_exhaustive()
    }
}

/// A door's handle for submitting actions. Cheap to clone; clones share their state.
#[derive(Clone)]
pub struct ControllerHandle {
    tx: Sender<ActionRequest>,
    waker: Arc<EventFd>,
    /// A restore or an incoming live migration went through one of the doors (QEMU's
    /// `migrate-incoming` may run only once).
    restore_started: Arc<AtomicBool>,
}

impl ControllerHandle {
    /// Queues `action`; `reply` is called with the result on the VMM thread. If the VMM thread is
    /// gone, `reply` is called at once with [`ActionError::Unavailable`].
    pub fn submit(&self, action: VmmAction, reply: ReplyFn) {
        let incoming = matches!(
            action,
            VmmAction::Restore { .. } | VmmAction::MigrateIncoming { .. }
        );
        let reply: ReplyFn = if incoming {
            let started = Arc::clone(&self.restore_started);
            Box::new(move |r: Reply| {
                if r.is_ok() {
                    started.store(true, Ordering::SeqCst);
                }
                reply(r)
            })
        } else {
            reply
        };
        match self.tx.send(ActionRequest { action, reply }) {
            // A failed write means the counter is saturated: the inbox is readable anyway.
            Ok(()) => {
                let _ = self.waker.write(1);
            }
            Err(mpsc::SendError(req)) => (req.reply)(Err(ActionError::Unavailable)),
        }
    }

    /// Whether a [`VmmAction::Restore`] or [`VmmAction::MigrateIncoming`] submitted through this
    /// handle (or a clone) succeeded:
    /// QMP then answers a second `migrate-incoming` the way QEMU does ("already started")
    /// rather than "'-incoming' was not specified".
    pub fn restore_started(&self) -> bool {
        self.restore_started.load(Ordering::SeqCst)
    }
}

/// The VMM thread's end: an EventFd to poll and the queued requests.
pub struct ControllerInbox {
    rx: Receiver<ActionRequest>,
    waker: Arc<EventFd>,
}

impl ControllerInbox {
    /// The EventFd that becomes readable when requests are queued.
    pub fn waker(&self) -> &EventFd {
        &self.waker
    }

    /// Takes every queued request (clearing the EventFd first, so none is missed).
    pub fn drain(&self) -> Vec<ActionRequest> {
        let _ = self.waker.read();
        let mut out = Vec::new();
        loop {
            match self.rx.try_recv() {
                Ok(r) => out.push(r),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return out,
            }
        }
    }
}

/// Creates the two ends of the action channel.
pub fn action_channel() -> io::Result<(ControllerHandle, ControllerInbox)> {
    let waker = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let (tx, rx) = mpsc::channel();
    Ok((
        ControllerHandle {
            tx,
            waker: waker.clone(),
            restore_started: Arc::new(AtomicBool::new(false)),
        },
        ControllerInbox { rx, waker },
    ))
}

/// A VM event with the wall-clock time it happened (QMP events carry it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedEvent {
    /// What happened.
    pub event: VmEvent,
    /// When.
    pub at: SystemTime,
}

/// One subscriber's end of the event bus.
pub struct EventReceiver {
    rx: Receiver<TimedEvent>,
    waker: Arc<EventFd>,
}

impl EventReceiver {
    /// Readable when events are waiting.
    pub fn waker(&self) -> &EventFd {
        &self.waker
    }

    /// Takes every waiting event, oldest first.
    pub fn drain(&self) -> Vec<TimedEvent> {
        let _ = self.waker.read();
        self.rx.try_iter().collect()
    }
}

struct Subscriber {
    tx: Sender<TimedEvent>,
    waker: Arc<EventFd>,
}

/// Broadcasts VM events to every subscribed door. Cheap to clone.
#[derive(Clone, Default)]
pub struct EventBus {
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
}

impl EventBus {
    /// A new, empty bus.
    pub fn new() -> EventBus {
        EventBus::default()
    }

    /// Adds a subscriber; events published from now on reach it.
    pub fn subscribe(&self) -> io::Result<EventReceiver> {
        let waker = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let (tx, rx) = mpsc::channel();
        self.lock().push(Subscriber {
            tx,
            waker: waker.clone(),
        });
        Ok(EventReceiver { rx, waker })
    }

    /// Sends `event` to every live subscriber, stamped with the current time; subscribers that
    /// went away are dropped.
    pub fn publish(&self, event: VmEvent) {
        let timed = TimedEvent {
            event,
            at: SystemTime::now(),
        };
        self.lock().retain(|s| {
            let alive = s.tx.send(timed.clone()).is_ok();
            if alive {
                let _ = s.waker.write(1);
            }
            alive
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        self.subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_reach_the_inbox_and_replies_come_back() {
        let (handle, inbox) = action_channel().unwrap();
        let (tx, rx) = mpsc::channel();
        handle.submit(
            VmmAction::Pause,
            Box::new(move |r| {
                tx.send(r).unwrap();
            }),
        );
        assert_eq!(inbox.waker().read().unwrap(), 1);
        let _ = inbox.waker().write(1);
        let reqs = inbox.drain();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].action, VmmAction::Pause);
        for r in reqs {
            (r.reply)(Ok(VmmResponse::Done));
        }
        assert_eq!(rx.recv().unwrap(), Ok(VmmResponse::Done));
        assert!(inbox.drain().is_empty());
    }

    #[test]
    fn submit_after_the_vmm_is_gone_answers_unavailable() {
        let (handle, inbox) = action_channel().unwrap();
        drop(inbox);
        let (tx, rx) = mpsc::channel();
        handle.submit(
            VmmAction::Resume,
            Box::new(move |r| {
                tx.send(r).unwrap();
            }),
        );
        assert_eq!(rx.recv().unwrap(), Err(ActionError::Unavailable));
    }

    #[test]
    fn a_successful_restore_is_remembered_by_every_clone() {
        let (handle, inbox) = action_channel().unwrap();
        let other = handle.clone();
        let restore = || VmmAction::Restore {
            path: "/tmp/x".into(),
        };
        handle.submit(restore(), Box::new(|_| {}));
        handle.submit(VmmAction::Resume, Box::new(|_| {}));
        for r in inbox.drain() {
            (r.reply)(Err(ActionError::Unavailable));
        }
        assert!(!other.restore_started(), "a failed restore does not count");
        handle.submit(VmmAction::Resume, Box::new(|_| {}));
        for r in inbox.drain() {
            (r.reply)(Ok(VmmResponse::Done));
        }
        assert!(!other.restore_started(), "only a restore counts");
        handle.submit(restore(), Box::new(|_| {}));
        for r in inbox.drain() {
            (r.reply)(Ok(VmmResponse::Done));
        }
        assert!(other.restore_started());
    }

    #[test]
    fn an_incoming_live_migration_counts_as_started() {
        let (handle, inbox) = action_channel().unwrap();
        let from = crate::MigrationAddress::Unix("/run/m.sock".into());
        handle.submit(VmmAction::MigrateIncoming { from }, Box::new(|_| {}));
        for r in inbox.drain() {
            (r.reply)(Ok(VmmResponse::Done));
        }
        assert!(handle.restore_started());
    }

    #[test]
    fn events_reach_every_live_subscriber() {
        let bus = EventBus::new();
        let a = bus.subscribe().unwrap();
        let b = bus.subscribe().unwrap();
        drop(b);
        bus.publish(VmEvent::Stop);
        bus.publish(VmEvent::Resume);
        let got: Vec<VmEvent> = a.drain().into_iter().map(|e| e.event).collect();
        assert_eq!(got, vec![VmEvent::Stop, VmEvent::Resume]);
        assert_eq!(bus.lock().len(), 1);
    }
}
