//! Event-loop glue: [`VirtioPciDevice`] as an event-manager `MutEventSubscriber`.
//!
//! The subscriber is added once per device and stays for the device's lifetime. It always
//! watches the transport's state EventFd, written on activation and on reset; on that event it
//! reconciles its registrations: while the device is active it watches every queue EventFd (the
//! same EventFds the VMM registers as KVM ioeventfds) and the device's backend fds, and after a
//! reset it removes them all. Registrations are removed explicitly because epoll keeps an
//! entry alive as long as the file description is open, and the transport keeps the queue
//! EventFds open across resets.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::pci::VirtioPciDevice;

/// Token of the state EventFd.
const STATE_TOKEN: u32 = u32::MAX;
/// Tokens from here on are backend fds (by position); below are queue indices.
const BACKEND_TOKEN_BASE: u32 = 0x8000_0000;

impl VirtioPciDevice {
    /// The (fd, token) pairs that should be watched now.
    fn wanted_events(&self) -> Vec<(i32, u32, EventSet)> {
        use std::os::fd::AsRawFd;
        if !self.device.is_active() {
            return Vec::new();
        }
        let offloaded = self.device.offloaded_queues();
        let queues = self
            .queue_evts
            .iter()
            .enumerate()
            .filter(move |(i, _)| !offloaded.contains(&(*i as u16)))
            .map(|(i, e)| (e.as_raw_fd(), i as u32, EventSet::IN));
        let set = self.device.backend_events();
        let backends = self
            .device
            .backend_fds()
            .into_iter()
            .enumerate()
            .map(move |(i, fd)| (fd, BACKEND_TOKEN_BASE + i as u32, set));
        queues.chain(backends).collect()
    }

    fn sync_events(&mut self, ops: &mut EventOps) {
        let wanted = self.wanted_events();
        let was_idle = self.registered.is_empty();
        let mut kept = Vec::new();
        for (fd, token) in std::mem::take(&mut self.registered) {
            if wanted.iter().any(|w| (w.0, w.1) == (fd, token)) {
                kept.push((fd, token));
            } else if let Err(e) = ops.remove(Events::with_data_raw(fd, token, EventSet::IN)) {
                log::warn!("virtio-pci: unwatching fd {fd} failed: {e}");
            }
        }
        for &(fd, token, set) in &wanted {
            if kept.contains(&(fd, token)) {
                continue;
            }
            match ops.add(Events::with_data_raw(fd, token, set)) {
                Ok(()) => kept.push((fd, token)),
                Err(e) => log::error!("virtio-pci: watching fd {fd} failed: {e}"),
            }
        }
        self.registered = kept;
        if was_idle && !wanted.is_empty() {
            // Requests queued before the EventFds were watched are picked up here.
            for q in 0..self.queue_evts.len() {
                self.device.process_queue(q as u16);
            }
        }
    }

    /// Number of fds the subscriber currently watches besides its state EventFd (for tests).
    pub fn watched_fds(&self) -> usize {
        self.registered.len()
    }
}

impl MutEventSubscriber for VirtioPciDevice {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.state_evt,
            STATE_TOKEN,
            EventSet::IN,
        )) {
            log::error!("virtio-pci: watching the state EventFd failed: {e}");
        }
        self.sync_events(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            STATE_TOKEN => {
                let _ = self.state_evt.read();
                self.sync_events(ops);
            }
            t if t >= BACKEND_TOKEN_BASE => {
                if self.device.is_active() {
                    let idx = (t - BACKEND_TOKEN_BASE) as usize;
                    self.device.process_backend(idx, events.event_set());
                }
            }
            q => {
                if let Some(evt) = self.queue_evts.get(q as usize) {
                    // Non-blocking: a spurious wakeup reads nothing.
                    let _ = evt.read();
                }
                if self.device.is_active() {
                    self.device.process_queue(q as u16);
                }
            }
        }
        if self.device.backend_fds_changed() {
            self.sync_events(ops);
        }
    }
}
