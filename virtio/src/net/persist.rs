//! virtio-net's own part of a snapshot: what identifies the NIC (MAC, MTU, queue pairs, offered
//! features: a restore onto a NIC configured differently is refused), the link state, and the
//! settings the driver made through the control queue (active pairs, receive offloads), which
//! the next activation applies to the tap again. Frames in flight are not state: a frame read
//! from the tap and not yet delivered is lost, as on a real wire. Counters are host metrics and
//! start again from zero.

use devices::persist::RestoreError;
use serde::{Deserialize, Serialize};

use super::{format_mac, CtrlSettings, Net};
use crate::device::VirtioDeviceState;

/// The saved state of a [`Net`] device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// The MAC address, `52:54:00:12:34:56`.
    pub mac: String,
    /// The MTU the guest was told (0: none).
    pub mtu: u16,
    /// Queue pairs of the device.
    pub max_queue_pairs: u16,
    /// Features the device offered.
    pub avail_features: u64,
    /// Whether the link was up.
    pub link_up: bool,
    /// Queue pairs the driver had enabled.
    pub active_queue_pairs: u16,
    /// GUEST_* offload bits in use.
    pub guest_offloads: u64,
}

impl<T: super::TapQueue> Net<T> {
    pub(super) fn net_state(&self) -> NetState {
        let s = self.settings();
        NetState {
            mac: format_mac(&self.options.mac),
            mtu: self.options.mtu.unwrap_or(0),
            max_queue_pairs: self.max_pairs(),
            avail_features: self.avail_features,
            link_up: self.shared.link_up(),
            active_queue_pairs: s.active_pairs,
            guest_offloads: s.guest_offloads,
        }
    }

    /// Checks that `state` describes this NIC, then takes its link state and control settings.
    pub(super) fn apply_net_state(
        &mut self,
        state: &VirtioDeviceState,
    ) -> Result<(), RestoreError> {
        let saved = match state {
            VirtioDeviceState::Net(s) => s,
            other => {
                return Err(RestoreError::mismatch(format!(
                    "a {} device's state cannot be restored into a network device",
                    other.kind()
                )))
            }
        };
        let ours = self.net_state();
        let differs = |what: &str, a: String, b: String| {
            Err(RestoreError::mismatch(format!(
                "{what} changed: the snapshot has {a}, this NIC has {b}"
            )))
        };
        if saved.mac != ours.mac {
            return differs("MAC address", saved.mac.clone(), ours.mac);
        }
        if saved.mtu != ours.mtu {
            return differs("MTU", saved.mtu.to_string(), ours.mtu.to_string());
        }
        if saved.max_queue_pairs != ours.max_queue_pairs {
            return differs(
                "the number of queue pairs",
                saved.max_queue_pairs.to_string(),
                ours.max_queue_pairs.to_string(),
            );
        }
        if saved.avail_features != ours.avail_features {
            return differs(
                "the offered features",
                format!("{:#x}", saved.avail_features),
                format!("{:#x}", ours.avail_features),
            );
        }
        if saved.active_queue_pairs == 0 || saved.active_queue_pairs > saved.max_queue_pairs {
            return Err(RestoreError::invalid(
                "active_queue_pairs",
                format!(
                    "{} active queue pairs out of {}",
                    saved.active_queue_pairs, saved.max_queue_pairs
                ),
            ));
        }
        if saved.guest_offloads & !super::guest_offload_mask() != 0 {
            return Err(RestoreError::invalid(
                "guest_offloads",
                format!("{:#x} are not offload features", saved.guest_offloads),
            ));
        }
        self.shared
            .link_up
            .store(saved.link_up, std::sync::atomic::Ordering::SeqCst);
        self.restored = Some(CtrlSettings {
            active_pairs: saved.active_queue_pairs,
            guest_offloads: saved.guest_offloads,
        });
        Ok(())
    }
}
