//! How devices raise interrupts without knowing about KVM: an [`InterruptLine`] trait object,
//! and its usual implementation [`EventFdLine`], whose EventFd the VMM registers as a KVM irqfd
//! for the device's GSI.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line a device can pulse (an edge, or a level assert + deassert as KVM's irqfd
/// does for a level-triggered pin).
pub trait InterruptLine: Send + Sync {
    /// Signals the interrupt.
    fn trigger(&self) -> io::Result<()>;
}

/// An [`InterruptLine`] backed by an EventFd (registered by the VMM as an irqfd).
#[derive(Debug)]
pub struct EventFdLine(pub EventFd);

impl EventFdLine {
    /// Creates a line with a fresh non-blocking EventFd.
    pub fn new() -> io::Result<Self> {
        Ok(EventFdLine(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    /// Wraps an existing EventFd.
    pub fn from_eventfd(evt: EventFd) -> Self {
        EventFdLine(evt)
    }

    /// The EventFd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl AsRawFd for EventFdLine {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl InterruptLine for EventFdLine {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts triggers; shared by the device tests of this crate.
    #[derive(Debug, Default)]
    pub(crate) struct CountingLine(AtomicUsize);

    impl CountingLine {
        pub(crate) fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl InterruptLine for CountingLine {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn eventfd_line_counts_triggers() {
        let line = EventFdLine::new().unwrap();
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(line.eventfd().read().unwrap(), 2);
        // Non-blocking: nothing pending is an error, not a hang.
        assert!(line.eventfd().read().is_err());
        assert!(line.as_raw_fd() >= 0);
    }
}
