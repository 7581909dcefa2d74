//! The hardware-reduced ACPI power-management block at ports 0x600..=0x602: the sleep control
//! register (0x600), the sleep status register (0x601) and the reset register (0x602), as the
//! FADT's `SLEEP_CONTROL_REG`, `SLEEP_STATUS_REG` and `RESET_REG` describe them.
//!
//! - Sleep control: a write with SLP_EN (bit 5) set and SLP_TYP (bits 2..=4) equal to
//!   [`S5_SLEEP_TYPE`] (the value the DSDT's `_S5` package must advertise) powers the VM off by
//!   writing the `exit` EventFd. Other sleep states are not supported and are ignored.
//! - Reset: writing [`RESET_VALUE`] (the FADT's `RESET_VALUE`) writes the `reset` EventFd.
//! - Reads return 0 (in the status register: WAK_STS clear, which Linux never waits on for S5).
//! - State ([`Persist`]): none; [`AcpiPmState`] is empty so every device has an entry in a
//!   snapshot.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::persist::{Persist, RestoreError};

/// Port of the sleep control register (the block's base).
pub const ACPI_PM_PORT_BASE: u64 = 0x600;
/// Length of the block's bus range.
pub const ACPI_PM_PORT_LEN: u64 = 3;
/// SLP_TYP value meaning S5 (soft off).
pub const S5_SLEEP_TYPE: u8 = 5;
/// Value to write to the reset register to reset the VM.
pub const RESET_VALUE: u8 = 1;

const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = 1;
const RESET: u64 = 2;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The ACPI sleep/reset registers; see the module documentation.
#[derive(Debug)]
pub struct AcpiPmDevice {
    exit_evt: EventFd,
    reset_evt: EventFd,
}

impl AcpiPmDevice {
    /// Creates the block; `exit_evt` is written on S5, `reset_evt` on a reset request.
    pub fn new(exit_evt: EventFd, reset_evt: EventFd) -> AcpiPmDevice {
        AcpiPmDevice {
            exit_evt,
            reset_evt,
        }
    }

    fn signal(evt: &EventFd, what: &str) {
        log::info!("acpi: guest requested {what}");
        if let Err(e) = evt.write(1) {
            log::error!("acpi: cannot signal {what}: {e}");
        }
    }
}

/// The saved state of an [`AcpiPmDevice`]: the registers hold nothing between accesses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {}

impl Persist for AcpiPmDevice {
    type State = AcpiPmState;

    fn save(&self) -> AcpiPmState {
        AcpiPmState {}
    }

    fn restore(&mut self, _state: &AcpiPmState) -> Result<(), RestoreError> {
        Ok(())
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            log::debug!("acpi: ignored {}-byte write at {offset}", data.len());
            return;
        };
        match offset {
            SLEEP_CONTROL => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
                    Self::signal(&self.exit_evt, "power off (S5)");
                } else {
                    log::debug!("acpi: ignored sleep control write {value:#x}");
                }
            }
            RESET if *value == RESET_VALUE => Self::signal(&self.reset_evt, "a reset"),
            SLEEP_STATUS | RESET => log::debug!("acpi: ignored write {value:#x} at {offset}"),
            _ => log::debug!("acpi: ignored write at offset {offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (AcpiPmDevice, EventFd, EventFd) {
        let exit = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = AcpiPmDevice::new(exit.try_clone().unwrap(), reset.try_clone().unwrap());
        (dev, exit, reset)
    }

    #[test]
    fn s5_writes_the_exit_event() {
        let (mut dev, exit, reset) = device();
        // SLP_TYP = 5, SLP_EN: what Linux's acpi_hw_legacy_sleep / reduced sleep writes.
        dev.write(SLEEP_CONTROL, &[SLP_EN | (5 << 2)]);
        assert_eq!(exit.read().unwrap(), 1);
        assert!(reset.read().is_err());
    }

    #[test]
    fn other_sleep_writes_are_ignored() {
        let (mut dev, exit, _) = device();
        dev.write(SLEEP_CONTROL, &[5 << 2]); // no SLP_EN
        dev.write(SLEEP_CONTROL, &[SLP_EN | (3 << 2)]); // S3
        dev.write(SLEEP_CONTROL, &[SLP_EN | (5 << 2), 0]); // wrong size
        dev.write(SLEEP_STATUS, &[0xff]);
        assert!(exit.read().is_err());
    }

    #[test]
    fn reset_register() {
        let (mut dev, exit, reset) = device();
        dev.write(RESET, &[2]);
        assert!(reset.read().is_err());
        dev.write(RESET, &[RESET_VALUE]);
        assert_eq!(reset.read().unwrap(), 1);
        assert!(exit.read().is_err());
    }

    #[test]
    fn state_round_trip() {
        let (src, _, _) = device();
        let (mut dst, exit, _) = device();
        let state = crate::persist::assert_round_trip(&src, &mut dst);
        assert_eq!(serde_json::to_string(&state).unwrap(), "{}");
        // The restored block still powers off through its own EventFd.
        dst.write(SLEEP_CONTROL, &[SLP_EN | (5 << 2)]);
        assert_eq!(exit.read().unwrap(), 1);
    }

    #[test]
    fn reads_return_zero() {
        let (mut dev, _, _) = device();
        for offset in 0..3 {
            let mut d = [0xaau8; 1];
            dev.read(offset, &mut d);
            assert_eq!(d, [0]);
        }
        let mut wide = [0xaau8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
    }
}
