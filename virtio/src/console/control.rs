//! The control messages of a MULTIPORT virtio-console (virtio 1.x, 5.3.6.2): a `{id: le32,
//! event: le16, value: le16}` header, followed for PORT_NAME by the port's name.

/// The guest's driver is ready (value 1) or failed (0).
pub const DEVICE_READY: u16 = 0;
/// A port exists (device to driver; also named PORT_ADD).
pub const DEVICE_ADD: u16 = 1;
/// A port went away (device to driver; ports are never removed here).
#[allow(dead_code)]
pub const DEVICE_REMOVE: u16 = 2;
/// The driver set up a port (value 1) or failed to (0).
pub const PORT_READY: u16 = 3;
/// The port is a console (device to driver).
pub const CONSOLE_PORT: u16 = 4;
/// The console's size changed (device to driver; no SIZE feature here).
#[allow(dead_code)]
pub const RESIZE: u16 = 5;
/// The other side opened (value 1) or closed (0) the port: both ways.
pub const PORT_OPEN: u16 = 6;
/// The port's name follows the header (device to driver).
pub const PORT_NAME: u16 = 7;

/// Size of the header.
pub const HEADER_LEN: usize = 8;

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlMsg {
    /// Port id.
    pub id: u32,
    /// Event.
    pub event: u16,
    /// Event value.
    pub value: u16,
    /// What follows the header (PORT_NAME's name).
    pub data: Vec<u8>,
}

impl ControlMsg {
    /// A message without data.
    pub fn new(id: u32, event: u16, value: u16) -> ControlMsg {
        ControlMsg {
            id,
            event,
            value,
            data: Vec::new(),
        }
    }

    /// PORT_NAME for port `id`: the name, NUL-terminated (as QEMU sends it).
    pub fn name(id: u32, name: &str) -> ControlMsg {
        let mut data = name.as_bytes().to_vec();
        data.push(0);
        ControlMsg {
            id,
            event: PORT_NAME,
            value: 1,
            data,
        }
    }

    /// The wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN + self.data.len());
        b.extend_from_slice(&self.id.to_le_bytes());
        b.extend_from_slice(&self.event.to_le_bytes());
        b.extend_from_slice(&self.value.to_le_bytes());
        b.extend_from_slice(&self.data);
        b
    }

    /// Decodes a message from the driver (its data, if any, is ignored: the driver sends none).
    pub fn decode(b: &[u8]) -> Option<ControlMsg> {
        if b.len() < HEADER_LEN {
            return None;
        }
        Some(ControlMsg::new(
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_are_nul_terminated() {
        let m = ControlMsg::new(3, PORT_OPEN, 1);
        assert_eq!(m.encode(), [3, 0, 0, 0, 6, 0, 1, 0]);
        assert_eq!(ControlMsg::decode(&m.encode()), Some(m));
        let n = ControlMsg::name(1, "org.qemu.guest_agent.0");
        let b = n.encode();
        assert_eq!(&b[..8], &[1, 0, 0, 0, 7, 0, 1, 0]);
        assert_eq!(&b[8..], b"org.qemu.guest_agent.0\0");
        assert_eq!(ControlMsg::decode(&[1, 2, 3]), None);
    }
}
