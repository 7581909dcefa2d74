//! virtio-console with MULTIPORT (virtio 1.x, 5.3): an optional console port (`hvc0` in a Linux
//! guest) and named ports ("channels", /dev/virtio-ports/NAME), each with a host end
//! ([`PortBackend`]): a unix socket we listen on, stdio, a file, or a peer of the VMM's own.
//!
//! Queues: port 0's pair (0, 1), the control pair (2: to the driver, 3: from it), then port
//! *n*'s pair at 2n+2, 2n+3. The control protocol runs in the order of QEMU's virtio-serial-bus:
//! the driver's DEVICE_READY is answered with a DEVICE_ADD per port; the driver's PORT_READY
//! for a port with CONSOLE_PORT (for the console), PORT_NAME (for a named port) and PORT_OPEN
//! (when a host peer is attached); PORT_OPEN follows the host peer as it comes and goes. The
//! guest opening or closing its end (its PORT_OPEN) is reported through the [`PortEvents`]
//! callback (QMP's VSERPORT_CHANGE). Control messages wait in a queue, never dropped, while the
//! driver has no buffer posted; a guest that floods the control queue with bogus messages
//! (unknown events, unknown ports) only has them counted and ignored.
//!
//! The data path of each port is in [`port`]: backpressure both ways, nothing lost while a
//! peer is attached, output discarded while none is.

mod control;
mod persist;
mod port;

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Arc;

use devices::persist::RestoreError;
use event_manager::EventSet;
use virtio_queue::{Queue, QueueState};

pub use control::ControlMsg;
pub use persist::{ConsolePortState, ConsoleState};
pub use port::{PortBackend, StreamBackend, MAX_CHAIN_BYTES, READ_CHUNK};

use crate::device::{
    feature, ActivateContext, ActivateError, GuestMemoryMmap, VirtioDevice, VirtioDeviceState,
    VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use port::{PortData, Progress};

/// virtio device type of a console.
pub const VIRTIO_ID_CONSOLE: u32 = 3;
/// Feature bit: ports beyond port 0, and the control queues.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the control queue to the driver.
pub const CTRL_RX: u16 = 2;
/// Index of the control queue from the driver.
pub const CTRL_TX: u16 = 3;
/// Most control bytes read from one chain of the driver (messages are 8 bytes).
const MAX_CTRL_IN: usize = 64;

/// The receive queue (host to guest) of port `id`; the transmit queue is the next one.
pub fn rx_queue(id: u32) -> u16 {
    if id == 0 {
        0
    } else {
        (2 * id + 2) as u16
    }
}

/// The port a data queue belongs to, and whether it is the receive queue.
fn port_of_queue(q: u16) -> Option<(u32, bool)> {
    match q {
        0 | 1 => Some((0, q == 0)),
        CTRL_RX | CTRL_TX => None,
        _ => Some((u32::from(q / 2) - 1, q.is_multiple_of(2))),
    }
}

/// The guest opened (true) or closed its end of a port: `(label, open)`.
pub type PortEvents = Box<dyn Fn(&str, bool) + Send>;

/// One port as configured.
pub struct PortConfig {
    /// Port id (0 only for the console; named ports from 1).
    pub id: u32,
    /// The id the VMM knows the port by (QMP's VSERPORT_CHANGE `id`), e.g. `channel0`.
    pub label: String,
    /// The name the guest sees (/dev/virtio-ports/NAME); none for a console.
    pub name: Option<String>,
    /// The port is a console (`hvc0`).
    pub console: bool,
    /// Its host end.
    pub backend: Box<dyn PortBackend>,
}

/// Where the driver and the device stand on a port (reset with the device).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Proto {
    /// The driver set the port up (PORT_READY 1).
    ready: bool,
    /// The guest has its end open (its PORT_OPEN).
    guest_open: bool,
    /// The last PORT_OPEN value sent to the driver.
    host_open_told: bool,
}

struct Port {
    id: u32,
    label: String,
    name: Option<String>,
    console: bool,
    backend: Box<dyn PortBackend>,
    proto: Proto,
    data: PortData,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<Option<Queue>>,
}

/// Counters of a console device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleCounters {
    /// Control messages from the driver that were ignored (unknown event or port, too short).
    pub bogus_control: u64,
    /// Control messages to the driver that were dropped because too many were waiting.
    pub control_dropped: u64,
}

/// The virtio-console device.
pub struct Console {
    ports: Vec<Port>,
    max_ports: u32,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    active: Option<Active>,
    /// The driver said DEVICE_READY.
    device_ready: bool,
    ctrl_out: VecDeque<ControlMsg>,
    on_change: Option<PortEvents>,
    fds_changed: bool,
    /// Peers left: their fds may be closed once the event loop stopped watching them.
    release_pending: bool,
    /// A restored state waiting for the activation.
    restored: bool,
    counters: ConsoleCounters,
}

/// Why a console cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Two ports share an id or a name, or a port id does not fit the rules.
    #[error("console ports: {0}")]
    Ports(String),
}

impl Console {
    /// A console with `ports` (ids unique; 0 only for a console port; names unique).
    pub fn new(ports: Vec<PortConfig>) -> Result<Console, ConsoleError> {
        let mut ports: Vec<Port> = ports
            .into_iter()
            .map(|p| Port {
                id: p.id,
                label: p.label,
                name: p.name,
                console: p.console,
                backend: p.backend,
                proto: Proto::default(),
                data: PortData::default(),
            })
            .collect();
        ports.sort_by_key(|p| p.id);
        for w in ports.windows(2) {
            if w[0].id == w[1].id {
                return Err(ConsoleError::Ports(format!(
                    "port id {} used twice",
                    w[0].id
                )));
            }
        }
        for (i, p) in ports.iter().enumerate() {
            if p.console != (p.id == 0) {
                return Err(ConsoleError::Ports(format!(
                    "port {}: port 0 is the console's and only the console's",
                    p.id
                )));
            }
            if p.id > 1023 {
                return Err(ConsoleError::Ports(format!(
                    "port id {} is too large",
                    p.id
                )));
            }
            if let Some(n) = &p.name {
                if n.is_empty() || ports[..i].iter().any(|q| q.name.as_ref() == Some(n)) {
                    return Err(ConsoleError::Ports(format!(
                        "port name `{n}` empty or used twice"
                    )));
                }
            }
        }
        let max_ports = ports.last().map_or(1, |p| p.id + 1).max(1);
        let queue_sizes = vec![QUEUE_SIZE; 2 * (max_ports as usize + 1)];
        Ok(Console {
            ports,
            max_ports,
            queue_sizes,
            avail_features: feature(VIRTIO_CONSOLE_F_MULTIPORT)
                | feature(VIRTIO_RING_F_EVENT_IDX)
                | feature(VIRTIO_RING_F_INDIRECT_DESC),
            active: None,
            device_ready: false,
            ctrl_out: VecDeque::new(),
            on_change: None,
            fds_changed: false,
            release_pending: false,
            restored: false,
            counters: ConsoleCounters::default(),
        })
    }

    /// Reports the guest opening and closing its ends of the ports to `f`.
    pub fn set_port_events(&mut self, f: PortEvents) {
        self.on_change = Some(f);
    }

    /// The counters.
    pub fn counters(&self) -> ConsoleCounters {
        self.counters
    }

    /// Per port: (label, guest has it open, host peer attached).
    pub fn port_status(&self) -> Vec<(String, bool, bool)> {
        self.ports
            .iter()
            .map(|p| (p.label.clone(), p.proto.guest_open, p.backend.connected()))
            .collect()
    }

    /// The most control messages waiting for the driver (far above what the protocol needs:
    /// four per port per DEVICE_READY/PORT_READY round).
    fn ctrl_capacity(&self) -> usize {
        64 + 8 * self.ports.len()
    }

    fn send_ctrl(&mut self, msg: ControlMsg) {
        if self.ctrl_out.len() >= self.ctrl_capacity() {
            if self.counters.control_dropped == 0 {
                log::warn!("virtio-console: the guest does not take control messages; dropping");
            }
            self.counters.control_dropped += 1;
            return;
        }
        self.ctrl_out.push_back(msg);
    }

    /// Tells the driver whether port `i`'s host peer is attached, if that changed.
    fn tell_host_open(&mut self, i: usize) {
        let p = &self.ports[i];
        let connected = p.backend.connected();
        if p.proto.ready && p.proto.host_open_told != connected {
            let id = p.id;
            self.ports[i].proto.host_open_told = connected;
            self.send_ctrl(ControlMsg::new(
                id,
                control::PORT_OPEN,
                u16::from(connected),
            ));
        }
    }

    fn port_index(&self, id: u32) -> Option<usize> {
        self.ports.iter().position(|p| p.id == id)
    }

    /// Hands waiting control messages to the driver.
    fn flush_ctrl(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(q) = a.queues[usize::from(CTRL_RX)].as_mut() else {
            return;
        };
        let mut used = false;
        let mut rechecked = false;
        while let Some(msg) = self.ctrl_out.front() {
            match port::put_chain(q, &a.mem, &msg.encode()) {
                Ok(true) => {
                    used = true;
                    rechecked = false;
                    self.ctrl_out.pop_front();
                }
                // No buffer: ask to be told when the driver posts one.
                Ok(false) => match port::look_again(q, &a.mem, &mut rechecked) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        log::warn!("virtio-console: control queue: {e}");
                        break;
                    }
                },
                Err(e) => {
                    log::warn!("virtio-console: control queue: {e}");
                    break;
                }
            }
        }
        if used {
            signal(a, CTRL_RX);
        }
    }

    /// Handles the driver's control messages.
    fn run_ctrl_in(&mut self) {
        let mut msgs = Vec::new();
        {
            let Some(a) = self.active.as_mut() else {
                return;
            };
            let Some(q) = a.queues[usize::from(CTRL_TX)].as_mut() else {
                return;
            };
            let mut rechecked = false;
            loop {
                match port::take_chain(q, &a.mem, MAX_CTRL_IN) {
                    Ok(Some(b)) => {
                        rechecked = false;
                        msgs.push(b)
                    }
                    Ok(None) => match port::look_again(q, &a.mem, &mut rechecked) {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            log::warn!("virtio-console: control queue: {e}");
                            break;
                        }
                    },
                    Err(e) => {
                        log::warn!("virtio-console: control queue: {e}");
                        break;
                    }
                }
                // Bounded work per notification; the rest on the next pass.
                if msgs.len() >= 4096 {
                    break;
                }
            }
            if !msgs.is_empty() {
                signal(a, CTRL_TX);
            }
        }
        for b in msgs {
            match ControlMsg::decode(&b) {
                Some(m) => self.handle_ctrl(m),
                None => self.counters.bogus_control += 1,
            }
        }
        self.flush_ctrl();
    }

    fn handle_ctrl(&mut self, m: ControlMsg) {
        match m.event {
            control::DEVICE_READY => {
                if m.value != 1 {
                    log::warn!("virtio-console: the guest's driver failed to start");
                    return;
                }
                self.device_ready = true;
                let ids: Vec<u32> = self.ports.iter().map(|p| p.id).collect();
                for id in ids {
                    self.send_ctrl(ControlMsg::new(id, control::DEVICE_ADD, 1));
                }
            }
            control::PORT_READY => {
                let Some(i) = self.port_index(m.id) else {
                    self.counters.bogus_control += 1;
                    return;
                };
                if m.value != 1 {
                    log::warn!("virtio-console: the guest could not set up port {}", m.id);
                    return;
                }
                let p = &mut self.ports[i];
                p.proto.ready = true;
                p.proto.host_open_told = false;
                let (id, console, name) = (p.id, p.console, p.name.clone());
                if console {
                    self.send_ctrl(ControlMsg::new(id, control::CONSOLE_PORT, 1));
                }
                if let Some(n) = name {
                    self.send_ctrl(ControlMsg::name(id, &n));
                }
                self.tell_host_open(i);
            }
            control::PORT_OPEN => {
                let Some(i) = self.port_index(m.id) else {
                    self.counters.bogus_control += 1;
                    return;
                };
                let open = m.value != 0;
                let p = &mut self.ports[i];
                if p.proto.guest_open != open {
                    p.proto.guest_open = open;
                    if let Some(f) = &self.on_change {
                        f(&p.label, open);
                    }
                }
                if open {
                    self.run_port(i);
                }
            }
            _ => self.counters.bogus_control += 1,
        }
    }

    /// Moves data both ways on port `i` as far as it goes; handles the peer leaving.
    fn run_port(&mut self, i: usize) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let p = &mut self.ports[i];
        let rxq = usize::from(rx_queue(p.id));
        let mut progress = Progress::default();
        let had_peer = p.backend.connected();
        if let Some(tx) = a.queues.get_mut(rxq + 1).and_then(Option::as_mut) {
            if let Err(e) = p
                .data
                .drain_tx(p.backend.as_mut(), tx, &a.mem, &mut progress)
            {
                log::warn!("virtio-console: port {}: {e}", p.label);
            }
        }
        if p.proto.guest_open && !progress.hung_up && p.backend.connected() {
            if let Some(rx) = a.queues.get_mut(rxq).and_then(Option::as_mut) {
                if let Err(e) = p
                    .data
                    .fill_rx(p.backend.as_mut(), rx, &a.mem, &mut progress)
                {
                    log::warn!("virtio-console: port {}: {e}", p.label);
                }
            }
        }
        if progress.tx_used {
            signal(a, rxq as u16 + 1);
        }
        if progress.rx_used {
            signal(a, rxq as u16);
        }
        if progress.hung_up && had_peer {
            self.peer_left(i);
        }
    }

    /// Port `i`'s peer went away: tell the guest, forget what it had sent, serve the next
    /// waiting peer.
    fn peer_left(&mut self, i: usize) {
        log::info!(
            "virtio-console: port {}: host peer left",
            self.ports[i].label
        );
        self.fds_changed = true;
        self.release_pending = true;
        let p = &mut self.ports[i];
        p.data.clear_input();
        self.tell_host_open(i);
        self.accept(i);
    }

    /// Takes a peer waiting on port `i`'s backend.
    fn accept(&mut self, i: usize) {
        match self.ports[i].backend.accept() {
            Ok(true) => {
                log::info!(
                    "virtio-console: port {}: host peer attached",
                    self.ports[i].label
                );
                self.fds_changed = true;
                self.tell_host_open(i);
                self.flush_ctrl();
                self.run_port(i);
            }
            Ok(false) => {}
            Err(e) => log::warn!("virtio-console: port {}: accept: {e}", self.ports[i].label),
        }
    }

    fn release_peers(&mut self) {
        if std::mem::take(&mut self.release_pending) {
            for p in &mut self.ports {
                p.backend.release();
            }
        }
    }

    /// Each watched fd's port, in [`VirtioDevice::backend_fds`] order.
    fn fd_ports(&self) -> Vec<(RawFd, usize)> {
        self.ports
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.backend.fds().into_iter().map(move |fd| (fd, i)))
            .collect()
    }
}

/// Signals queue `q` if the driver wants to hear of it.
fn signal(a: &mut Active, q: u16) {
    if let Some(queue) = a.queues.get_mut(usize::from(q)).and_then(Option::as_mut) {
        crate::device::notify_used(queue, &a.mem, a.interrupt.as_ref(), q);
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols (u16), rows (u16), max_nr_ports (u32), emerg_wr (u32): only the port count is
        // offered (no SIZE, no EMERG_WRITE).
        let mut cfg = [0u8; 12];
        cfg[4..8].copy_from_slice(&self.max_ports.to_le_bytes());
        data.fill(0);
        if let Ok(off) = usize::try_from(offset) {
            if off < cfg.len() {
                let n = data.len().min(cfg.len() - off);
                data[..n].copy_from_slice(&cfg[off..off + n]);
            }
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-console: ignoring config write at {offset:#x}");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let mut queues: Vec<Option<Queue>> = (0..self.queue_sizes.len()).map(|_| None).collect();
        for q in ctx.queues {
            if let Some(slot) = queues.get_mut(usize::from(q.index)) {
                *slot = Some(q.queue);
            }
        }
        if ctx.acked_features & feature(VIRTIO_CONSOLE_F_MULTIPORT) == 0 {
            // Without MULTIPORT only port 0 exists and it is always open: the console, if any.
            for p in &mut self.ports {
                p.proto = Proto {
                    ready: p.id == 0,
                    guest_open: p.id == 0,
                    host_open_told: p.id == 0,
                };
            }
        } else {
            for q in [CTRL_RX, CTRL_TX] {
                if queues[usize::from(q)].is_none() {
                    return Err(ActivateError::MissingQueue(q));
                }
            }
        }
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queues,
        });
        if std::mem::take(&mut self.restored) {
            // The peers of the process that saved the state are not ours: tell the guest how
            // things stand here.
            for i in 0..self.ports.len() {
                self.tell_host_open(i);
            }
        }
        for i in 0..self.ports.len() {
            self.accept(i);
        }
        self.fds_changed = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.device_ready = false;
        self.restored = false;
        self.ctrl_out.clear();
        for p in &mut self.ports {
            if p.proto.guest_open {
                if let Some(f) = &self.on_change {
                    f(&p.label, false);
                }
            }
            p.proto = Proto::default();
            // Host input read ahead belonged to the old driver's session; guest output already
            // taken still goes to the peer.
            p.data.clear_input();
        }
        self.fds_changed = true;
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: u16) {
        self.release_peers();
        match index {
            CTRL_RX => self.flush_ctrl(),
            CTRL_TX => self.run_ctrl_in(),
            q => {
                if let Some((id, _)) = port_of_queue(q) {
                    if let Some(i) = self.port_index(id) {
                        self.run_port(i);
                    }
                }
                self.flush_ctrl();
            }
        }
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        self.fd_ports().into_iter().map(|(fd, _)| fd).collect()
    }

    fn backend_events(&self) -> EventSet {
        EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED
    }

    fn backend_fds_changed(&mut self) -> bool {
        std::mem::take(&mut self.fds_changed)
    }

    fn process_backend(&mut self, index: usize, _events: EventSet) {
        self.release_peers();
        let Some(&(_, i)) = self.fd_ports().get(index) else {
            return;
        };
        // A new peer (the listener's event), then data both ways (the peer's).
        self.accept(i);
        self.run_port(i);
        self.flush_ctrl();
    }

    fn active_queue_states(&self) -> Vec<(u16, QueueState)> {
        self.active
            .as_ref()
            .map_or_else(Vec::new, |a| crate::device::queue_states(&a.queues))
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Console(self.console_state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), RestoreError> {
        self.apply_console_state(state)
    }
}

#[cfg(test)]
mod tests;
