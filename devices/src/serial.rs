//! The 8250/16550A UART at COM1 (port 0x3f8, 8 registers): `vm_superio::Serial` for the
//! register model, plus what a VMM needs around it:
//!
//! - Interrupts go out through an [`InterruptLine`] (an irqfd on GSI 4 in practice).
//! - Guest output goes to any `Write + Send` sink, wrapped in a [`LossyWriter`] so a vanished
//!   or full host side (EPIPE, ENOSPC, EAGAIN) drops output instead of failing the device.
//! - Host input is buffered in a bounded pending queue ([`INPUT_QUEUE_CAPACITY`]) in front of
//!   the 64-byte receive FIFO, and the FIFO is topped up from it after every guest register
//!   access. Long pastes therefore survive, and each refill of an empty FIFO raises the
//!   received-data interrupt. [`Serial::enqueue_input`] reports how much it accepted so the
//!   caller can apply backpressure; an optional EventFd tells it when room is back.
//!
//! Only single-byte accesses within the 8 registers are meaningful; anything else reads as
//! 0xff and writes are ignored.
//!
//! State ([`Persist`]): the UART registers and receive FIFO ([`SerialState`]) plus the pending
//! host input. The output sink, the interrupt line and the room EventFd are constructor
//! arguments.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::chardev::LossyWriter;
use crate::interrupt::InterruptLine;
use crate::persist::{Persist, RestoreError};

/// Number of UART registers (the length of its bus range).
pub const SERIAL_PORT_LEN: u64 = 8;

/// Host input buffered in front of the UART's FIFO, in bytes.
pub const INPUT_QUEUE_CAPACITY: usize = 64 * 1024;

/// Size of the UART's receive FIFO (16550A).
pub const UART_FIFO_SIZE: usize = 64;

/// Adapts an [`InterruptLine`] to `vm_superio`'s `Trigger`.
///
/// A failure is logged here (once per trigger object) and not reported to the UART: the
/// register update that came with it has happened either way, and an infallible trigger lets a
/// restore rebuild the UART without the risk of losing its output sink halfway.
struct LineTrigger {
    line: Arc<dyn InterruptLine>,
    warned: AtomicBool,
}

impl LineTrigger {
    fn new(line: Arc<dyn InterruptLine>) -> Self {
        LineTrigger {
            line,
            warned: AtomicBool::new(false),
        }
    }
}

impl Trigger for LineTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        if let Err(e) = self.line.trigger() {
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::warn!("serial: cannot raise the interrupt: {e}");
            }
        }
        Ok(())
    }
}

/// The guest output sink as the UART sees it: it never fails.
type OutputSink = LossyWriter<Box<dyn Write + Send>>;

type Uart = vm_superio::Serial<LineTrigger, NoEvents, OutputSink>;

/// An emulated 16550A serial port; see the module documentation.
pub struct Serial {
    uart: Uart,
    /// Host input not yet in the UART's FIFO.
    pending: VecDeque<u8>,
    capacity: usize,
    /// Written when room returns after `enqueue_input` had to refuse bytes.
    room_evt: Option<EventFd>,
    /// Whether `enqueue_input` refused bytes since the last room notification.
    input_refused: bool,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("pending", &self.pending.len())
            .field("fifo_free", &self.uart.fifo_capacity())
            .finish_non_exhaustive()
    }
}

impl Serial {
    /// Creates the UART, raising `interrupt` and writing guest output to `out`.
    pub fn new(interrupt: Arc<dyn InterruptLine>, out: Box<dyn Write + Send>) -> Serial {
        Self::with_input_capacity(interrupt, out, INPUT_QUEUE_CAPACITY)
    }

    /// Like [`Serial::new`] with a pending-input queue of `capacity` bytes.
    pub fn with_input_capacity(
        interrupt: Arc<dyn InterruptLine>,
        out: Box<dyn Write + Send>,
        capacity: usize,
    ) -> Serial {
        Serial {
            uart: vm_superio::Serial::new(LineTrigger::new(interrupt), LossyWriter::new(out)),
            pending: VecDeque::new(),
            capacity,
            room_evt: None,
            input_refused: false,
        }
    }

    /// Sets the EventFd written when the input queue has room again after
    /// [`Serial::enqueue_input`] accepted less than it was given. An event loop that stopped
    /// reading its input source on a short enqueue resumes on this event.
    pub fn set_input_room_evt(&mut self, evt: EventFd) {
        self.room_evt = Some(evt);
    }

    /// Queues host input for the guest; returns how many leading bytes of `bytes` were taken
    /// (fewer than `bytes.len()` when the queue is full; the rest is the caller's to retry or
    /// drop). Moves what fits into the UART FIFO right away, raising the RX interrupt if the
    /// guest enabled it.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.fill_fifo();
        // Straight into the FIFO when nothing is queued ahead (keeps the byte order).
        let mut taken = 0;
        if self.pending.is_empty() {
            let len = bytes.len().min(self.uart.fifo_capacity());
            taken = Self::push_to_uart(&mut self.uart, &bytes[..len]);
        }
        let rest = &bytes[taken..];
        let queued = rest
            .len()
            .min(self.capacity.saturating_sub(self.pending.len()));
        self.pending.extend(&rest[..queued]);
        taken += queued;
        if taken < bytes.len() {
            self.input_refused = true;
        }
        taken
    }

    /// Whether [`Serial::enqueue_input`] would take at least one byte now.
    pub fn has_input_room(&self) -> bool {
        self.pending.len() < self.capacity
    }

    /// Host input bytes waiting for room in the UART FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    /// Guest output bytes dropped because the sink failed.
    pub fn dropped_output_bytes(&self) -> u64 {
        self.uart.writer().dropped_bytes()
    }

    /// Moves pending input into the FIFO as far as it has room.
    fn fill_fifo(&mut self) {
        while !self.pending.is_empty() && self.uart.fifo_capacity() > 0 {
            let (front, _) = self.pending.as_slices();
            let chunk = &front[..front.len().min(self.uart.fifo_capacity())];
            let moved = Self::push_to_uart(&mut self.uart, chunk);
            if moved == 0 {
                // Loopback mode takes no host input; leave it queued.
                break;
            }
            self.pending.drain(..moved.min(self.pending.len()));
        }
        if self.input_refused && self.has_input_room() {
            self.input_refused = false;
            if let Some(evt) = &self.room_evt {
                if let Err(e) = evt.write(1) {
                    log::warn!("serial: cannot signal input room: {e}");
                }
            }
        }
    }

    /// Puts `chunk` (at most the FIFO's free space) in the UART's FIFO; returns how much it took.
    fn push_to_uart(uart: &mut Uart, chunk: &[u8]) -> usize {
        if chunk.is_empty() {
            return 0;
        }
        match uart.enqueue_raw_bytes(chunk) {
            Ok(n) => n,
            // Not reported by `LineTrigger`; the bytes would be in the FIFO already.
            Err(UartError::Trigger(_)) => chunk.len(),
            Err(UartError::FullFifo) | Err(UartError::IOError(_)) => 0,
        }
    }

    /// The register index of a valid single-byte access.
    fn register(offset: u64, len: usize) -> Option<u8> {
        if len != 1 || offset >= SERIAL_PORT_LEN {
            return None;
        }
        u8::try_from(offset).ok()
    }
}

/// The UART registers and receive FIFO, as `vm_superio::serial::SerialState` (which has no
/// serde support) names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartRegisters {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes in the receive FIFO, oldest first (at most [`UART_FIFO_SIZE`]).
    pub in_buffer: Vec<u8>,
}

/// The saved state of a [`Serial`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// The UART itself.
    pub uart: UartRegisters,
    /// Host input waiting for room in the FIFO, oldest first (at most the device's input
    /// capacity).
    pub pending: Vec<u8>,
}

impl Persist for Serial {
    type State = SerialState;

    fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            uart: UartRegisters {
                baud_divisor_low: s.baud_divisor_low,
                baud_divisor_high: s.baud_divisor_high,
                interrupt_enable: s.interrupt_enable,
                interrupt_identification: s.interrupt_identification,
                line_control: s.line_control,
                line_status: s.line_status,
                modem_control: s.modem_control,
                modem_status: s.modem_status,
                scratch: s.scratch,
                in_buffer: s.in_buffer,
            },
            pending: self.pending.iter().copied().collect(),
        }
    }

    /// Rebuilds the UART from the registers (re-raising an interrupt the saved IIR shows as
    /// pending and enabled, as `vm_superio` does) and keeps the output sink.
    fn restore(&mut self, state: &SerialState) -> Result<(), RestoreError> {
        let r = &state.uart;
        if r.in_buffer.len() > UART_FIFO_SIZE {
            return Err(RestoreError::invalid(
                "uart.in_buffer",
                format!(
                    "{} bytes in a {UART_FIFO_SIZE}-byte FIFO",
                    r.in_buffer.len()
                ),
            ));
        }
        if state.pending.len() > self.capacity {
            return Err(RestoreError::invalid(
                "pending",
                format!(
                    "{} bytes of input for a {}-byte queue",
                    state.pending.len(),
                    self.capacity
                ),
            ));
        }
        let uart_state = vm_superio::serial::SerialState {
            baud_divisor_low: r.baud_divisor_low,
            baud_divisor_high: r.baud_divisor_high,
            interrupt_enable: r.interrupt_enable,
            interrupt_identification: r.interrupt_identification,
            line_control: r.line_control,
            line_status: r.line_status,
            modem_control: r.modem_control,
            modem_status: r.modem_status,
            scratch: r.scratch,
            in_buffer: r.in_buffer.clone(),
        };
        let line = self.uart.interrupt_evt().line.clone();
        let placeholder = vm_superio::Serial::new(
            LineTrigger::new(line.clone()),
            LossyWriter::new(Box::new(io::sink()) as Box<dyn Write + Send>),
        );
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        // Cannot fail: the FIFO length is checked above and `LineTrigger` never reports.
        match vm_superio::Serial::from_state(&uart_state, LineTrigger::new(line), NoEvents, out) {
            Ok(uart) => self.uart = uart,
            Err(e) => log::error!("serial: restoring the UART failed, output is lost: {e}"),
        }
        self.pending = state.pending.iter().copied().collect();
        self.input_refused = false;
        Ok(())
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(reg) = Self::register(offset, data.len()) else {
            log::debug!("serial: ignored {}-byte read at {offset}", data.len());
            data.fill(0xff);
            return;
        };
        data[0] = self.uart.read(reg);
        self.fill_fifo();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(reg) = Self::register(offset, data.len()) else {
            log::debug!("serial: ignored {}-byte write at {offset}", data.len());
            return;
        };
        // The lossy sink never fails, the trigger never reports, a write never fills the FIFO.
        if let Err(e) = self.uart.write(reg, data[0]) {
            log::debug!("serial: register write failed: {e}");
        }
        self.fill_fifo();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::interrupt::tests::CountingLine;

    const RBR: u64 = 0;
    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const MCR: u64 = 4;
    const LSR: u64 = 5;

    const LSR_DR: u8 = 0x01;
    const LSR_THRE: u8 = 0x20;
    const LSR_TEMT: u8 = 0x40;
    const IER_RDA: u8 = 0x01;

    /// A sink shared with the test.
    #[derive(Clone, Default)]
    struct SharedSink(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Serial, Arc<CountingLine>, SharedSink) {
        let line = Arc::new(CountingLine::default());
        let sink = SharedSink::default();
        let serial = Serial::new(line.clone(), Box::new(sink.clone()));
        (serial, line, sink)
    }

    fn inb(s: &mut Serial, offset: u64) -> u8 {
        let mut d = [0u8];
        s.read(offset, &mut d);
        d[0]
    }

    #[test]
    fn thr_output_reaches_the_sink() {
        let (mut s, _, sink) = serial();
        for &b in b"Linux version" {
            s.write(THR, &[b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"Linux version");
    }

    #[test]
    fn lsr_reports_idle_transmitter_and_data_ready() {
        let (mut s, _, _) = serial();
        let lsr = inb(&mut s, LSR);
        assert_eq!(lsr & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        assert_eq!(lsr & LSR_DR, 0);
        s.enqueue_input(b"x");
        assert_ne!(inb(&mut s, LSR) & LSR_DR, 0);
        assert_eq!(inb(&mut s, RBR), b'x');
        assert_eq!(inb(&mut s, LSR) & LSR_DR, 0);
    }

    #[test]
    fn rbr_input_raises_the_interrupt_once_per_refill() {
        let (mut s, line, _) = serial();
        // Interrupts disabled: input is buffered but not signalled.
        assert_eq!(s.enqueue_input(b"a"), 1);
        assert_eq!(line.count(), 0);
        assert_eq!(inb(&mut s, RBR), b'a');

        s.write(IER, &[IER_RDA]);
        let before = line.count();
        assert_eq!(s.enqueue_input(b"abc"), 3);
        assert_eq!(line.count(), before + 1);
        // More data while the interrupt is still pending does not re-trigger.
        s.enqueue_input(b"d");
        assert_eq!(line.count(), before + 1);
        // IIR says "received data available".
        assert_eq!(inb(&mut s, IIR) & 0x0f, 0x04);
        let got: Vec<u8> = (0..4).map(|_| inb(&mut s, RBR)).collect();
        assert_eq!(got, b"abcd");
        assert_eq!(inb(&mut s, LSR) & LSR_DR, 0);
        assert_eq!(s.pending_input(), 0);
    }

    #[test]
    fn fifo_is_topped_up_from_pending_input() {
        let (mut s, line, _) = serial();
        s.write(IER, &[IER_RDA]);
        let input: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(s.enqueue_input(&input), input.len());
        assert_eq!(s.pending_input(), input.len() - 64);

        let mut got = Vec::new();
        while inb(&mut s, LSR) & LSR_DR != 0 {
            got.push(inb(&mut s, RBR));
        }
        assert_eq!(got, input);
        assert_eq!(s.pending_input(), 0);
        // Each refill after the guest emptied the RX condition raised a new interrupt.
        assert!(line.count() > 1);
    }

    #[test]
    fn input_queue_is_bounded_and_signals_room() {
        let line = Arc::new(CountingLine::default());
        let mut s = Serial::with_input_capacity(line, Box::new(io::sink()), 100);
        let room = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        s.set_input_room_evt(room.try_clone().unwrap());

        // 64 go straight to the FIFO, 100 wait, the rest is refused.
        assert_eq!(s.enqueue_input(&[b'z'; 300]), 164);
        assert!(!s.has_input_room());
        assert_eq!(s.enqueue_input(b"more"), 0);
        assert!(room.read().is_err(), "no room yet");

        inb(&mut s, RBR);
        assert!(s.has_input_room());
        assert_eq!(room.read().unwrap(), 1);
        assert_eq!(s.enqueue_input(b"ab"), 1);

        // The default queue holds 64 KiB.
        let (mut s, _, _) = serial();
        let big = vec![b'q'; INPUT_QUEUE_CAPACITY + 1000];
        assert_eq!(s.enqueue_input(&big), INPUT_QUEUE_CAPACITY + 64);
    }

    #[test]
    fn broken_sink_drops_output_without_failing() {
        struct Epipe;
        impl Write for Epipe {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::EPIPE))
            }
            fn flush(&mut self) -> io::Result<()> {
                Err(io::Error::from_raw_os_error(libc::EPIPE))
            }
        }
        let line = Arc::new(CountingLine::default());
        let mut s = Serial::new(line.clone(), Box::new(Epipe));
        s.write(IER, &[0x02]); // THR empty interrupt
        inb(&mut s, IIR); // acknowledge the one raised by enabling it
        let before = line.count();
        for &b in b"hello" {
            s.write(THR, &[b]);
            // The guest still gets its "transmitter empty" interrupt.
            inb(&mut s, IIR);
        }
        assert_eq!(s.dropped_output_bytes(), 5);
        assert_eq!(line.count(), before + 5);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut s, _, sink) = serial();
        s.enqueue_input(b"k");
        let mut wide = [0u8; 2];
        s.read(RBR, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        s.read(RBR, &mut []);
        let mut d = [0u8];
        s.read(8, &mut d);
        assert_eq!(d, [0xff]);
        s.read(u64::MAX, &mut d);
        s.write(THR, b"ab");
        s.write(9, b"a");
        s.write(THR, &[]);
        assert!(sink.0.lock().unwrap().is_empty());
        // The input byte was not consumed by any of that.
        assert_eq!(inb(&mut s, RBR), b'k');
    }

    const LCR: u64 = 3;
    const SCR: u64 = 7;

    /// The registers a guest can read without side effects, divisor latch included.
    fn visible_registers(s: &mut Serial) -> Vec<u8> {
        let lcr = inb(s, LCR);
        let mut regs = vec![lcr, inb(s, IER), inb(s, MCR), inb(s, LSR), inb(s, SCR)];
        s.write(LCR, &[lcr | 0x80]);
        regs.extend([inb(s, 0), inb(s, 1)]);
        s.write(LCR, &[lcr]);
        regs
    }

    #[test]
    fn state_round_trip_keeps_registers_fifo_and_pending_input() {
        let (mut src, _, _) = serial();
        // 8N1 at 9600 baud (divisor 12), a scratch value, RX interrupt on, 100 bytes of input.
        src.write(LCR, &[0x83]);
        src.write(0, &[12]);
        src.write(1, &[0]);
        src.write(LCR, &[0x03]);
        src.write(SCR, &[0x5a]);
        src.write(MCR, &[0x0b]);
        src.write(IER, &[IER_RDA]);
        let input: Vec<u8> = (0..100u8).collect();
        assert_eq!(src.enqueue_input(&input), 100);
        assert_eq!(inb(&mut src, RBR), 0);
        assert_eq!(src.pending_input(), 36 - 1);

        let line = Arc::new(CountingLine::default());
        let sink = SharedSink::default();
        let mut dst = Serial::new(line.clone(), Box::new(sink.clone()));
        let state = crate::persist::assert_round_trip(&src, &mut dst);
        assert_eq!(state.uart.in_buffer.len(), 64);
        // The RX interrupt the guest has not acknowledged yet is raised again.
        assert_eq!(line.count(), 1);

        assert_eq!(visible_registers(&mut dst), visible_registers(&mut src));
        assert_eq!(inb(&mut dst, IIR) & 0x0f, inb(&mut src, IIR) & 0x0f);
        let drain = |s: &mut Serial| {
            let mut got = Vec::new();
            while inb(s, LSR) & LSR_DR != 0 {
                got.push(inb(s, RBR));
            }
            got
        };
        assert_eq!(drain(&mut dst), input[1..]);
        assert_eq!(drain(&mut src), input[1..]);
        // Output goes to the restored device's own sink.
        dst.write(THR, b"!");
        assert_eq!(&*sink.0.lock().unwrap(), b"!");
    }

    #[test]
    fn restore_refuses_oversized_buffers() {
        let (src, _, _) = serial();
        let good = src.save();
        let line = Arc::new(CountingLine::default());
        let mut dst = Serial::with_input_capacity(line, Box::new(io::sink()), 10);

        let mut bad = good.clone();
        bad.uart.in_buffer = vec![0; UART_FIFO_SIZE + 1];
        assert!(matches!(
            dst.restore(&bad),
            Err(RestoreError::Invalid { ref field, .. }) if field == "uart.in_buffer"
        ));
        let mut bad = good.clone();
        bad.pending = vec![0; 11];
        assert!(matches!(
            dst.restore(&bad),
            Err(RestoreError::Invalid { ref field, .. }) if field == "pending"
        ));
        assert_eq!(dst.save(), good, "a refused state changes nothing");
    }

    #[test]
    fn loopback_mode_does_not_spin_on_pending_input() {
        let (mut s, _, _) = serial();
        s.write(MCR, &[0x10]); // loopback
        assert_eq!(s.enqueue_input(b"held"), 4);
        assert_eq!(s.pending_input(), 4);
        s.write(THR, b"L");
        assert_eq!(inb(&mut s, RBR), b'L');
        // Leaving loopback delivers the held input.
        s.write(MCR, &[0x08]);
        let got: Vec<u8> = (0..4).map(|_| inb(&mut s, RBR)).collect();
        assert_eq!(got, b"held");
    }
}
