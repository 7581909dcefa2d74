//! The console's own state: per port where the control protocol stands and the bytes in
//! flight (guest output not yet taken by the peer, host input not yet in a guest buffer), and
//! the control messages waiting for the driver. The peers themselves are not state: a restored
//! VMM listens again, and the guest is told (PORT_OPEN) whether a peer is attached there.

use devices::persist::RestoreError;
use serde::{Deserialize, Serialize};

use super::{control::ControlMsg, Console, Proto, MAX_CHAIN_BYTES, READ_CHUNK};
use crate::device::VirtioDeviceState;

/// One port's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsolePortState {
    /// Port id.
    pub id: u32,
    /// The name the guest sees (none for the console).
    pub name: Option<String>,
    /// Whether it is the console.
    pub console: bool,
    /// The driver had set it up.
    pub ready: bool,
    /// The guest had its end open.
    pub guest_open: bool,
    /// The last PORT_OPEN value the driver was sent.
    pub host_open_told: bool,
    /// Guest output the peer had not taken.
    pub pending_output: Vec<u8>,
    /// Host input not yet given to the guest.
    pub pending_input: Vec<u8>,
}

/// The saved state of a [`Console`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleState {
    /// The port count the driver was told.
    pub max_ports: u32,
    /// The driver had said DEVICE_READY.
    pub device_ready: bool,
    /// The ports, by id.
    pub ports: Vec<ConsolePortState>,
    /// Control messages waiting for the driver, encoded.
    pub control: Vec<Vec<u8>>,
}

impl Console {
    pub(super) fn console_state(&self) -> ConsoleState {
        ConsoleState {
            max_ports: self.max_ports,
            device_ready: self.device_ready,
            ports: self
                .ports
                .iter()
                .map(|p| ConsolePortState {
                    id: p.id,
                    name: p.name.clone(),
                    console: p.console,
                    ready: p.proto.ready,
                    guest_open: p.proto.guest_open,
                    host_open_told: p.proto.host_open_told,
                    pending_output: p.data.out[p.data.out_pos..].to_vec(),
                    pending_input: p.data.pending_input().to_vec(),
                })
                .collect(),
            control: self.ctrl_out.iter().map(ControlMsg::encode).collect(),
        }
    }

    pub(super) fn apply_console_state(
        &mut self,
        state: &VirtioDeviceState,
    ) -> Result<(), RestoreError> {
        let s = match state {
            VirtioDeviceState::Console(s) => s,
            other => {
                return Err(RestoreError::mismatch(format!(
                    "a {} device's state cannot be restored into a console",
                    other.kind()
                )))
            }
        };
        if s.max_ports != self.max_ports {
            return Err(RestoreError::mismatch(format!(
                "the console had {} ports, this one has {}",
                s.max_ports, self.max_ports
            )));
        }
        let ours: Vec<_> = self
            .ports
            .iter()
            .map(|p| (p.id, p.name.clone(), p.console))
            .collect();
        let theirs: Vec<_> = s
            .ports
            .iter()
            .map(|p| (p.id, p.name.clone(), p.console))
            .collect();
        if ours != theirs {
            return Err(RestoreError::mismatch(format!(
                "the console's ports changed: the snapshot has {theirs:?}, this console has {ours:?}"
            )));
        }
        let mut control = Vec::with_capacity(s.control.len());
        for b in &s.control {
            match ControlMsg::decode(b) {
                Some(mut m) => {
                    m.data = b[super::control::HEADER_LEN..].to_vec();
                    control.push(m);
                }
                None => {
                    return Err(RestoreError::invalid(
                        "control",
                        "a message shorter than its header",
                    ))
                }
            }
        }
        if control.len() > self.ctrl_capacity() {
            return Err(RestoreError::invalid(
                "control",
                "more messages than the device keeps",
            ));
        }
        for p in &s.ports {
            if p.pending_output.len() > MAX_CHAIN_BYTES || p.pending_input.len() > READ_CHUNK {
                return Err(RestoreError::invalid(
                    "ports",
                    format!("port {}: more bytes in flight than the device keeps", p.id),
                ));
            }
        }
        for (port, saved) in self.ports.iter_mut().zip(&s.ports) {
            port.proto = Proto {
                ready: saved.ready,
                guest_open: saved.guest_open,
                host_open_told: saved.host_open_told,
            };
            port.data.out = saved.pending_output.clone();
            port.data.out_pos = 0;
            port.data.set_pending_input(&saved.pending_input);
        }
        self.device_ready = s.device_ready;
        self.ctrl_out = control.into();
        self.restored = true;
        Ok(())
    }
}
