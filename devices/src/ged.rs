//! The ACPI Generic Event Device (GED) used for the power button: the VMM calls
//! [`Ged::notify_power_button`], which latches bit 0 of the pending-event register and pulses
//! the GED's interrupt (edge, GSI 5 in our layout). The guest's `_EVT` method reads the one-byte
//! register at port 0x608; the read returns the pending bits and clears them, so each press is
//! reported exactly once even if several arrive before the guest looks.
//!
//! State ([`Persist`]): the pending-event bits. Restore does not pulse the interrupt again: it
//! was delivered when the event was latched, and the interrupt controller's state is saved with
//! the VM.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;
use crate::persist::{Persist, RestoreError};

/// Port of the pending-event register.
pub const GED_PORT_BASE: u64 = 0x608;
/// Length of the GED's bus range.
pub const GED_PORT_LEN: u64 = 1;

/// Events the GED reports; the value is the bit in the pending-event register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GedEvent {
    /// The power button was pressed (the DSDT's `_EVT` notifies `\_SB.PWRB` with 0x80).
    PowerButton = 1 << 0,
}

/// Every bit a [`GedEvent`] can latch.
const ALL_EVENTS: u8 = GedEvent::PowerButton as u8;

/// The generic event device; see the module documentation.
pub struct Ged {
    interrupt: Arc<dyn InterruptLine>,
    pending: u8,
}

impl std::fmt::Debug for Ged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ged")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl Ged {
    /// Creates the GED raising `interrupt`.
    pub fn new(interrupt: Arc<dyn InterruptLine>) -> Ged {
        Ged {
            interrupt,
            pending: 0,
        }
    }

    /// Latches `event` and raises the interrupt.
    pub fn notify(&mut self, event: GedEvent) -> io::Result<()> {
        self.pending |= event as u8;
        self.interrupt.trigger()
    }

    /// Reports a power-button press to the guest (ACPI shutdown request).
    pub fn notify_power_button(&mut self) -> io::Result<()> {
        self.notify(GedEvent::PowerButton)
    }

    /// Events latched and not yet read by the guest.
    pub fn pending(&self) -> u8 {
        self.pending
    }
}

/// The saved state of a [`Ged`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GedState {
    /// Events latched and not yet read by the guest ([`GedEvent`] bits).
    pub pending: u8,
}

impl Persist for Ged {
    type State = GedState;

    fn save(&self) -> GedState {
        GedState {
            pending: self.pending,
        }
    }

    fn restore(&mut self, state: &GedState) -> Result<(), RestoreError> {
        if state.pending & !ALL_EVENTS != 0 {
            return Err(RestoreError::invalid(
                "pending",
                format!("{:#04x} has bits of no known event", state.pending),
            ));
        }
        self.pending = state.pending;
        Ok(())
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = std::mem::take(&mut self.pending);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        log::debug!("ged: ignored {}-byte write at {offset}", data.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::tests::CountingLine;

    #[test]
    fn power_button_is_latched_and_read_clears() {
        let line = Arc::new(CountingLine::default());
        let mut ged = Ged::new(line.clone());
        let mut d = [0xffu8];
        ged.read(0, &mut d);
        assert_eq!(d, [0]);

        ged.notify_power_button().unwrap();
        ged.notify_power_button().unwrap();
        assert_eq!(line.count(), 2);
        assert_eq!(ged.pending(), 1);

        ged.read(0, &mut d);
        assert_eq!(d, [1]);
        ged.read(0, &mut d);
        assert_eq!(d, [0]);
    }

    #[test]
    fn state_round_trip_keeps_a_pending_event() {
        let mut src = Ged::new(Arc::new(CountingLine::default()));
        src.notify_power_button().unwrap();
        let line = Arc::new(CountingLine::default());
        let mut dst = Ged::new(line.clone());
        let state = crate::persist::assert_round_trip(&src, &mut dst);
        assert_eq!(state.pending, 1);
        assert_eq!(line.count(), 0, "no second interrupt for the same press");
        let mut d = [0u8];
        dst.read(0, &mut d);
        assert_eq!(d, [1]);
        dst.read(0, &mut d);
        assert_eq!(d, [0]);

        assert!(dst.restore(&GedState { pending: 0x82 }).is_err());
        assert_eq!(dst.pending(), 0);
    }

    #[test]
    fn writes_and_odd_reads_are_harmless() {
        let line = Arc::new(CountingLine::default());
        let mut ged = Ged::new(line);
        ged.notify(GedEvent::PowerButton).unwrap();
        ged.write(0, &[0]);
        assert_eq!(ged.pending(), 1);
        let mut d = [0xffu8];
        ged.read(1, &mut d);
        assert_eq!(d, [0]);
        assert_eq!(ged.pending(), 1);
        // A wider read at the register still reports and clears, zero-extended.
        let mut wide = [0xffu8; 4];
        ged.read(0, &mut wide);
        assert_eq!(wide, [1, 0, 0, 0]);
        ged.read(0, &mut []);
    }
}
