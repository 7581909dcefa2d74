//! The control queue: commands as `{class, command, data...}` in the readable part of a chain,
//! answered with one ack byte (`VIRTIO_NET_OK` / `VIRTIO_NET_ERR`) as the last writable byte.
//!
//! Handled: the number of active queue pairs (MQ), the guest's receive offloads
//! (CTRL_GUEST_OFFLOADS), and the acknowledgement of a link announcement (GUEST_ANNOUNCE).
//! Anything else, or a command whose feature was not negotiated, is answered with ERR.
//! Malformed chains are returned with nothing written.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::queue::QueueError;
use crate::device::GuestMemoryMmap;

/// Longest command accepted (the ones we handle are a few bytes).
const MAX_COMMAND: usize = 512;

/// A decoded control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtrlCommand {
    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET.
    SetQueuePairs(u16),
    /// VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET: the GUEST_* feature bits to use now.
    SetGuestOffloads(u64),
    /// VIRTIO_NET_CTRL_ANNOUNCE_ACK.
    AnnounceAck,
    /// Anything else: (class, command).
    Unsupported(u8, u8),
    /// A known command with the wrong amount of data.
    Malformed(u8, u8),
}

/// Decodes `class`, `command` and their data.
pub fn decode(bytes: &[u8]) -> Option<CtrlCommand> {
    let (&class, rest) = bytes.split_first()?;
    let (&cmd, data) = rest.split_first()?;
    let (class32, cmd32) = (u32::from(class), u32::from(cmd));
    Some(match (class32, cmd32) {
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => match <[u8; 2]>::try_from(data) {
            Ok(b) => CtrlCommand::SetQueuePairs(u16::from_le_bytes(b)),
            Err(_) => CtrlCommand::Malformed(class, cmd),
        },
        (VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET) => {
            match <[u8; 8]>::try_from(data) {
                Ok(b) => CtrlCommand::SetGuestOffloads(u64::from_le_bytes(b)),
                Err(_) => CtrlCommand::Malformed(class, cmd),
            }
        }
        (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) if data.is_empty() => {
            CtrlCommand::AnnounceAck
        }
        (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => {
            CtrlCommand::Malformed(class, cmd)
        }
        _ => CtrlCommand::Unsupported(class, cmd),
    })
}

/// Runs every available control chain through `apply` (which says whether the command
/// succeeded) and returns whether any chain was completed.
pub fn process(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut apply: impl FnMut(CtrlCommand) -> bool,
) -> Result<bool, QueueError> {
    let mut completed = false;
    loop {
        queue.disable_notification(mem)?;
        let mut this_pass = 0;
        while let Some(chain) = queue.iter(mem)?.next() {
            this_pass += 1;
            let head = chain.head_index();
            let mut cmd = Vec::new();
            let mut ack: Option<GuestAddress> = None;
            let mut ok = true;
            for desc in chain {
                if desc.is_write_only() {
                    if desc.len() > 0 {
                        // The ack is the last writable byte.
                        ack = desc
                            .addr()
                            .0
                            .checked_add(u64::from(desc.len()) - 1)
                            .map(GuestAddress);
                    }
                    continue;
                }
                let n = desc.len() as usize;
                if ack.is_some() || cmd.len() + n > MAX_COMMAND {
                    ok = false;
                    break;
                }
                let at = cmd.len();
                cmd.resize(at + n, 0);
                if mem.read_slice(&mut cmd[at..], desc.addr()).is_err() {
                    ok = false;
                    break;
                }
            }
            let mut used = 0;
            if let (true, Some(addr)) = (ok, ack) {
                let status = match decode(&cmd) {
                    Some(c) if apply(c) => VIRTIO_NET_OK,
                    Some(c) => {
                        log::debug!("virtio-net: control command {c:?} refused");
                        VIRTIO_NET_ERR
                    }
                    None => VIRTIO_NET_ERR,
                };
                if mem.write_obj(status as u8, addr).is_ok() {
                    used = 1;
                }
            }
            queue.add_used(mem, head, used)?;
            completed = true;
        }
        if !queue.enable_notification(mem)? || this_pass == 0 {
            break;
        }
    }
    Ok(completed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_linux_sends() {
        assert_eq!(decode(&[4, 0, 2, 0]), Some(CtrlCommand::SetQueuePairs(2)));
        assert_eq!(
            decode(&[5, 0, 0x82, 0, 0, 0, 0, 0, 0, 0]),
            Some(CtrlCommand::SetGuestOffloads(0x82))
        );
        assert_eq!(decode(&[3, 0]), Some(CtrlCommand::AnnounceAck));
        assert_eq!(decode(&[4, 0, 2]), Some(CtrlCommand::Malformed(4, 0)));
        assert_eq!(decode(&[3, 0, 1]), Some(CtrlCommand::Malformed(3, 0)));
        assert_eq!(decode(&[0, 0, 1]), Some(CtrlCommand::Unsupported(0, 0)));
        assert_eq!(decode(&[4]), None);
        assert_eq!(decode(&[]), None);
    }
}
