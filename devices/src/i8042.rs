//! The i8042 PS/2 keyboard controller, emulated far enough for Linux's probe and for
//! `reboot=k`: the controller resets the machine (writes the reset EventFd) on command 0xFE or on
//! an output-port write (0xD1) with bit 0 clear.
//!
//! Bus layout: ONE device spanning ports 0x60..=0x64 ([`I8042_PORT_LEN`] = 5, relative offsets
//! 0 = data port 0x60, 4 = status/command port 0x64). Offsets 1..=3 (0x61 system control port B,
//! normally claimed first by KVM's in-kernel PIT, and the unused 0x62/0x63) read as zero and
//! ignore writes.
//!
//! Model: status register (output-buffer-full, system flag, command/data, keyboard unlocked,
//! aux data), controller command byte (0x20/0x60), self tests (0xAA → 0x55, 0xAB/0xA9 → 0x00),
//! port enable/disable (0xA7/0xA8/0xAD/0xAE), output port (0xD0/0xD1), writes to the output
//! buffer (0xD2 keyboard, 0xD3 aux loopback), and a keyboard with no keys that answers the
//! commands the Linux atkbd driver sends (ACK 0xFA, reset → 0xAA, get ID → 0xAB 0x83, echo).
//! Responses raise IRQ 1 through an optional [`InterruptLine`] when the command byte enables it.
//! There is no mouse: the aux port's loopback works, but an aux IRQ is never raised, so Linux
//! gives up on it after one short wait (boot with `i8042.noaux` to skip even that).
//!
//! State ([`Persist`]): status, command byte, output port, what the next data byte means, and
//! the output queue. The reset EventFd and the interrupt line are constructor arguments.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;
use crate::persist::{Persist, RestoreError};

/// First port of the controller (the data port).
pub const I8042_PORT_BASE: u64 = 0x60;
/// Length of the controller's bus range (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

// Status register bits.
const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;
const STATUS_AUX_DATA: u8 = 0x20;

// Controller command byte bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xA7;
const CMD_AUX_ENABLE: u8 = 0xA8;
const CMD_AUX_TEST: u8 = 0xA9;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_KBD_TEST: u8 = 0xAB;
const CMD_KBD_DISABLE: u8 = 0xAD;
const CMD_KBD_ENABLE: u8 = 0xAE;
const CMD_READ_INPUT_PORT: u8 = 0xC0;
const CMD_READ_OUTPUT_PORT: u8 = 0xD0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xD1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xD2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xD3;
const CMD_WRITE_AUX_DEVICE: u8 = 0xD4;
const CMD_PULSE_RESET: u8 = 0xFE;

// Keyboard commands and replies (port 0x60).
const KBD_SET_LEDS: u8 = 0xED;
const KBD_ECHO: u8 = 0xEE;
const KBD_SCANCODE_SET: u8 = 0xF0;
const KBD_GET_ID: u8 = 0xF2;
const KBD_SET_RATE: u8 = 0xF3;
const KBD_RESET: u8 = 0xFF;
const KBD_ACK: u8 = 0xFA;
const KBD_SELF_TEST_OK: u8 = 0xAA;
const KBD_ID: [u8; 2] = [0xAB, 0x83];

const SELF_TEST_OK: u8 = 0x55;
/// Output port: bit 0 high = reset line not asserted, bit 1 = A20 enabled.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;
const OUTPUT_PORT_RESET_LINE: u8 = 0x01;

/// Bytes queued for the guest; far more than any command sequence produces.
pub const OUTPUT_QUEUE_LEN: usize = 16;

/// What the next byte written to the data port means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataTarget {
    /// A command for the keyboard.
    Keyboard,
    /// The argument of a keyboard command that takes one.
    KeyboardArgument(u8),
    /// The argument of a controller command.
    Controller(u8),
}

/// The i8042 controller; see the module documentation.
pub struct I8042 {
    reset_evt: EventFd,
    kbd_irq: Option<Arc<dyn InterruptLine>>,
    status: u8,
    ctr: u8,
    output_port: u8,
    target: DataTarget,
    /// Bytes for the guest, each with whether it came from the aux port.
    output: VecDeque<(u8, bool)>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("status", &self.status)
            .field("ctr", &self.ctr)
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

impl I8042 {
    /// Creates the controller; `reset_evt` is written when the guest resets the machine.
    pub fn new(reset_evt: EventFd) -> I8042 {
        I8042 {
            reset_evt,
            kbd_irq: None,
            status: STATUS_SYS | STATUS_UNLOCKED,
            ctr: CTR_KBD_INT | CTR_SYS | CTR_XLATE | CTR_AUX_DISABLE,
            output_port: OUTPUT_PORT_DEFAULT,
            target: DataTarget::Keyboard,
            output: VecDeque::new(),
        }
    }

    /// Connects the keyboard interrupt (IRQ 1). Without it, replies are still readable by
    /// polling, which is all Linux's controller probe needs.
    pub fn set_kbd_interrupt(&mut self, line: Arc<dyn InterruptLine>) {
        self.kbd_irq = Some(line);
    }

    fn reset(&mut self) {
        log::info!("i8042: guest requested a system reset");
        if let Err(e) = self.reset_evt.write(1) {
            log::error!("i8042: cannot signal the reset: {e}");
        }
    }

    fn update_status(&mut self) {
        self.status &= !(STATUS_OBF | STATUS_AUX_DATA);
        if let Some(&(_, aux)) = self.output.front() {
            self.status |= STATUS_OBF;
            if aux {
                self.status |= STATUS_AUX_DATA;
            }
        }
    }

    /// Raises IRQ 1 for a keyboard byte at the head of the output queue, if enabled.
    fn signal(&self) {
        let Some(&(_, false)) = self.output.front() else {
            return;
        };
        if self.ctr & CTR_KBD_INT == 0 {
            return;
        }
        if let Some(line) = &self.kbd_irq {
            if let Err(e) = line.trigger() {
                log::warn!("i8042: cannot raise the keyboard interrupt: {e}");
            }
        }
    }

    fn push(&mut self, byte: u8, aux: bool) {
        if self.output.len() >= OUTPUT_QUEUE_LEN {
            log::debug!("i8042: output queue full, dropping {byte:#x}");
            return;
        }
        let was_empty = self.output.is_empty();
        self.output.push_back((byte, aux));
        self.update_status();
        if was_empty {
            self.signal();
        }
    }

    /// Controller replies replace anything stale, as Linux flushes before each command anyway.
    fn reply(&mut self, byte: u8) {
        self.output.clear();
        self.push(byte, false);
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.output.pop_front().map_or(0, |(b, _)| b);
        self.update_status();
        self.signal();
        byte
    }

    fn write_command(&mut self, cmd: u8) {
        self.status |= STATUS_CMD;
        self.target = DataTarget::Keyboard;
        match cmd {
            CMD_READ_CTR => self.reply(self.ctr),
            CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_BUFFER
            | CMD_WRITE_AUX_BUFFER
            | CMD_WRITE_AUX_DEVICE => self.target = DataTarget::Controller(cmd),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            CMD_AUX_TEST | CMD_KBD_TEST => self.reply(0x00),
            CMD_SELF_TEST => {
                self.status |= STATUS_SYS;
                self.reply(SELF_TEST_OK);
            }
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            CMD_READ_INPUT_PORT => self.reply(0x00),
            CMD_READ_OUTPUT_PORT => self.reply(self.output_port),
            CMD_PULSE_RESET => self.reset(),
            // Pulse output lines: only bit 0 (reset) matters, pulsed when its bit is clear.
            0xF0..=0xFD if cmd & 0x01 == 0 => self.reset(),
            0xF0..=0xFD => {}
            other => log::debug!("i8042: ignored controller command {other:#x}"),
        }
    }

    fn write_data(&mut self, value: u8) {
        self.status &= !STATUS_CMD;
        match std::mem::replace(&mut self.target, DataTarget::Keyboard) {
            DataTarget::Controller(CMD_WRITE_CTR) => {
                self.ctr = value;
                // The system flag in the status register follows the command byte.
                self.status = (self.status & !STATUS_SYS) | (value & CTR_SYS);
            }
            DataTarget::Controller(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_LINE == 0 {
                    self.reset();
                }
            }
            DataTarget::Controller(CMD_WRITE_KBD_BUFFER) => self.reply(value),
            DataTarget::Controller(CMD_WRITE_AUX_BUFFER) => {
                self.output.clear();
                self.push(value, true);
            }
            // No mouse: bytes for the aux device go nowhere (the driver times out).
            DataTarget::Controller(_) => {}
            DataTarget::KeyboardArgument(cmd) => self.keyboard_argument(cmd, value),
            DataTarget::Keyboard => self.keyboard_command(value),
        }
    }

    fn keyboard_command(&mut self, cmd: u8) {
        self.output.clear();
        match cmd {
            KBD_ECHO => self.push(KBD_ECHO, false),
            KBD_RESET => {
                self.push(KBD_ACK, false);
                self.push(KBD_SELF_TEST_OK, false);
            }
            KBD_GET_ID => {
                self.push(KBD_ACK, false);
                for b in KBD_ID {
                    self.push(b, false);
                }
            }
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_RATE => {
                self.push(KBD_ACK, false);
                self.target = DataTarget::KeyboardArgument(cmd);
            }
            // Enable/disable scanning, set defaults, ...: a keyless keyboard just agrees.
            _ => self.push(KBD_ACK, false),
        }
    }

    fn keyboard_argument(&mut self, cmd: u8, arg: u8) {
        self.output.clear();
        self.push(KBD_ACK, false);
        if cmd == KBD_SCANCODE_SET && arg == 0 {
            // "Which set?": set 2, the one the controller translates.
            self.push(0x02, false);
        }
    }
}

/// One byte waiting in the controller's output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042OutputByte {
    /// The byte.
    pub byte: u8,
    /// Whether it came from the aux (mouse) port.
    pub aux: bool,
}

/// The saved state of an [`I8042`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Status register.
    pub status: u8,
    /// Controller command byte.
    pub ctr: u8,
    /// Output port.
    pub output_port: u8,
    /// What the next data-port write means.
    pub target: DataTarget,
    /// Bytes for the guest, oldest first (at most [`OUTPUT_QUEUE_LEN`]).
    pub output: Vec<I8042OutputByte>,
}

impl Persist for I8042 {
    type State = I8042State;

    fn save(&self) -> I8042State {
        I8042State {
            status: self.status,
            ctr: self.ctr,
            output_port: self.output_port,
            target: self.target,
            output: self
                .output
                .iter()
                .map(|&(byte, aux)| I8042OutputByte { byte, aux })
                .collect(),
        }
    }

    fn restore(&mut self, state: &I8042State) -> Result<(), RestoreError> {
        if state.output.len() > OUTPUT_QUEUE_LEN {
            return Err(RestoreError::invalid(
                "output",
                format!(
                    "{} queued bytes, at most {OUTPUT_QUEUE_LEN}",
                    state.output.len()
                ),
            ));
        }
        let target_ok = match state.target {
            DataTarget::Keyboard => true,
            DataTarget::KeyboardArgument(cmd) => {
                matches!(cmd, KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_RATE)
            }
            DataTarget::Controller(cmd) => matches!(
                cmd,
                CMD_WRITE_CTR
                    | CMD_WRITE_OUTPUT_PORT
                    | CMD_WRITE_KBD_BUFFER
                    | CMD_WRITE_AUX_BUFFER
                    | CMD_WRITE_AUX_DEVICE
            ),
        };
        if !target_ok {
            return Err(RestoreError::invalid(
                "target",
                format!("{:?} is not a command that takes an argument", state.target),
            ));
        }
        // The output-buffer bits of the status register follow the queue.
        let mut expected = 0;
        if let Some(first) = state.output.first() {
            expected = STATUS_OBF | if first.aux { STATUS_AUX_DATA } else { 0 };
        }
        if state.status & (STATUS_OBF | STATUS_AUX_DATA) != expected {
            return Err(RestoreError::invalid(
                "status",
                format!(
                    "{:#04x} disagrees with the output queue ({} bytes)",
                    state.status,
                    state.output.len()
                ),
            ));
        }
        self.status = state.status;
        self.ctr = state.ctr;
        self.output_port = state.output_port;
        self.target = state.target;
        self.output = state.output.iter().map(|o| (o.byte, o.aux)).collect();
        Ok(())
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            DATA => self.read_data(),
            COMMAND => self.status,
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            return;
        };
        match offset {
            DATA => self.write_data(*value),
            COMMAND => self.write_command(*value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::tests::CountingLine;

    fn i8042() -> (I8042, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(reset.try_clone().unwrap()), reset)
    }

    fn inb(dev: &mut I8042, offset: u64) -> u8 {
        let mut d = [0u8];
        dev.read(offset, &mut d);
        d[0]
    }

    /// Sends a controller command the way Linux's i8042_command does and returns the reply.
    fn command(dev: &mut I8042, cmd: u8, arg: Option<u8>) -> Option<u8> {
        assert_eq!(inb(dev, COMMAND) & 0x02, 0, "input buffer must read empty");
        dev.write(COMMAND, &[cmd]);
        if let Some(arg) = arg {
            dev.write(DATA, &[arg]);
        }
        (inb(dev, COMMAND) & STATUS_OBF != 0).then(|| inb(dev, DATA))
    }

    #[test]
    fn reset_command_writes_the_reset_event() {
        let (mut dev, reset) = i8042();
        assert!(reset.read().is_err());
        dev.write(COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn output_port_write_with_bit0_clear_resets() {
        let (mut dev, reset) = i8042();
        assert_eq!(
            command(&mut dev, CMD_READ_OUTPUT_PORT, None),
            Some(OUTPUT_PORT_DEFAULT)
        );
        command(&mut dev, CMD_WRITE_OUTPUT_PORT, Some(0x03));
        assert!(reset.read().is_err());
        command(&mut dev, CMD_WRITE_OUTPUT_PORT, Some(0x02));
        assert_eq!(reset.read().unwrap(), 1);
        // Pulse command 0xFE-style variants with bit 0 clear reset too; 0xFF does not.
        dev.write(COMMAND, &[0xFF]);
        assert!(reset.read().is_err());
        dev.write(COMMAND, &[0xF0]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn linux_controller_probe_sequence() {
        let (mut dev, _) = i8042();
        // i8042_controller_check: status readable, flush leaves nothing.
        assert_ne!(inb(&mut dev, COMMAND), 0xff);
        assert_eq!(inb(&mut dev, COMMAND) & STATUS_OBF, 0);
        assert_eq!(inb(&mut dev, DATA), 0);
        // Self test.
        assert_eq!(command(&mut dev, CMD_SELF_TEST, None), Some(SELF_TEST_OK));
        assert_ne!(inb(&mut dev, COMMAND) & STATUS_SYS, 0);
        // Read, modify, write and re-read the command byte.
        let ctr = command(&mut dev, CMD_READ_CTR, None).unwrap();
        assert_eq!(ctr, CTR_KBD_INT | CTR_SYS | CTR_XLATE | CTR_AUX_DISABLE);
        assert_eq!(command(&mut dev, CMD_WRITE_CTR, Some(0x65)), None);
        assert_eq!(command(&mut dev, CMD_READ_CTR, None), Some(0x65));
        // Aux loopback echoes with the aux-data status bit; aux enable toggles the CTR bit.
        dev.write(COMMAND, &[CMD_WRITE_AUX_BUFFER]);
        dev.write(DATA, &[0x5a]);
        assert_eq!(
            inb(&mut dev, COMMAND) & (STATUS_OBF | STATUS_AUX_DATA),
            STATUS_OBF | STATUS_AUX_DATA
        );
        assert_eq!(inb(&mut dev, DATA), 0x5a);
        command(&mut dev, CMD_AUX_ENABLE, None);
        assert_eq!(
            command(&mut dev, CMD_READ_CTR, None).unwrap() & CTR_AUX_DISABLE,
            0
        );
        command(&mut dev, CMD_AUX_DISABLE, None);
        assert_ne!(
            command(&mut dev, CMD_READ_CTR, None).unwrap() & CTR_AUX_DISABLE,
            0
        );
        // Interface tests pass.
        assert_eq!(command(&mut dev, CMD_KBD_TEST, None), Some(0));
        assert_eq!(command(&mut dev, CMD_AUX_TEST, None), Some(0));
        // Nothing left behind.
        assert_eq!(inb(&mut dev, COMMAND) & STATUS_OBF, 0);
        assert_eq!(inb(&mut dev, DATA), 0);
    }

    #[test]
    fn keyboard_answers_atkbd_commands_with_interrupts() {
        let (mut dev, _) = i8042();
        let irq = Arc::new(CountingLine::default());
        dev.set_kbd_interrupt(irq.clone());

        dev.write(DATA, &[KBD_GET_ID]);
        assert_eq!(irq.count(), 1);
        let reply: Vec<u8> = (0..3).map(|_| inb(&mut dev, DATA)).collect();
        assert_eq!(reply, [KBD_ACK, 0xAB, 0x83]);
        // One interrupt per byte made available.
        assert_eq!(irq.count(), 3);

        dev.write(DATA, &[KBD_SET_LEDS]);
        assert_eq!(inb(&mut dev, DATA), KBD_ACK);
        dev.write(DATA, &[0x07]);
        assert_eq!(inb(&mut dev, DATA), KBD_ACK);
        dev.write(DATA, &[KBD_RESET]);
        assert_eq!(inb(&mut dev, DATA), KBD_ACK);
        assert_eq!(inb(&mut dev, DATA), KBD_SELF_TEST_OK);
        dev.write(DATA, &[KBD_ECHO]);
        assert_eq!(inb(&mut dev, DATA), KBD_ECHO);

        // With the interrupt disabled in the command byte, no IRQ.
        command(&mut dev, CMD_WRITE_CTR, Some(0));
        let before = irq.count();
        dev.write(DATA, &[0xF4]);
        assert_eq!(irq.count(), before);
        assert_eq!(inb(&mut dev, DATA), KBD_ACK);
    }

    #[test]
    fn state_round_trip_keeps_command_byte_and_queued_output() {
        let (mut src, _) = i8042();
        command(&mut src, CMD_WRITE_CTR, Some(0x65));
        command(&mut src, CMD_AUX_ENABLE, None);
        // A keyboard reset leaves ACK + self-test result queued; read neither yet.
        src.write(DATA, &[KBD_RESET]);
        // Then the controller waits for the argument of "write output port".
        src.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);

        let (mut dst, reset) = i8042();
        let irq = Arc::new(CountingLine::default());
        dst.set_kbd_interrupt(irq.clone());
        let state = crate::persist::assert_round_trip(&src, &mut dst);
        assert_eq!(state.output.len(), 2);
        assert_eq!(state.target, DataTarget::Controller(CMD_WRITE_OUTPUT_PORT));

        // The restored controller behaves as the original: same status, the pending output-port
        // write resets the machine, the queued bytes come out in order, then the command byte.
        assert_eq!(inb(&mut dst, COMMAND), inb(&mut src, COMMAND));
        dst.write(DATA, &[0x02]);
        assert_eq!(reset.read().unwrap(), 1);
        assert_eq!(inb(&mut dst, DATA), KBD_ACK);
        assert_eq!(inb(&mut dst, DATA), KBD_SELF_TEST_OK);
        assert_eq!(inb(&mut dst, COMMAND) & STATUS_OBF, 0);
        // 0x65 with the aux port enabled.
        assert_eq!(command(&mut dst, CMD_READ_CTR, None), Some(0x45));
        // IRQ 1 is raised through the restored device's own line.
        assert!(irq.count() > 0);
    }

    #[test]
    fn restore_refuses_inconsistent_states() {
        let (src, _) = i8042();
        let good = src.save();
        let (mut dst, _) = i8042();
        let bad_states = [
            I8042State {
                output: vec![
                    I8042OutputByte {
                        byte: 0,
                        aux: false
                    };
                    OUTPUT_QUEUE_LEN + 1
                ],
                status: good.status | STATUS_OBF,
                ..good.clone()
            },
            I8042State {
                target: DataTarget::Controller(CMD_SELF_TEST),
                ..good.clone()
            },
            I8042State {
                target: DataTarget::KeyboardArgument(KBD_RESET),
                ..good.clone()
            },
            I8042State {
                status: good.status | STATUS_OBF,
                ..good.clone()
            },
        ];
        for bad in &bad_states {
            assert!(dst.restore(bad).is_err(), "{bad:?}");
            assert_eq!(dst.save(), good);
        }
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (mut dev, reset) = i8042();
        let mut wide = [0u8; 2];
        dev.read(DATA, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        dev.write(COMMAND, &[CMD_PULSE_RESET, 0]);
        dev.write(COMMAND, &[]);
        assert!(reset.read().is_err());
        for offset in 1..=3 {
            assert_eq!(inb(&mut dev, offset), 0);
            dev.write(offset, &[0xfe]);
        }
        assert!(reset.read().is_err());
        // Unknown commands and a flood of keyboard bytes do not grow without bound.
        dev.write(COMMAND, &[0x01]);
        for _ in 0..100 {
            dev.write(DATA, &[KBD_GET_ID]);
        }
        assert!(dev.output.len() <= OUTPUT_QUEUE_LEN);
    }
}
