//! vhost-net: one receive/transmit queue pair handed to the kernel (`/dev/vhost-net`), which
//! moves frames between the guest's rings and the tap without our process.
//!
//! Per pair: one vhost-net instance (it drives exactly two vrings), given the guest memory table,
//! the rings' addresses and positions, the queues' notification EventFds as its kicks (the
//! transport stops watching those, see `VirtioDevice::offloaded_queues`), a call per queue, and
//! the tap as its backend. The call is the queue's MSI-X irqfd itself when the interrupt object
//! has one (the VMM detaches it from KVM while the guest masks the vector, and KVM delivers the
//! signal it held once it is attached again), so an interrupt never passes through our process;
//! otherwise (no vector) it is an EventFd the device relays through the interrupt object.
//! A restored VM's vCPUs exist before its devices are activated: an interrupt vhost raises as
//! soon as it starts must find the restored local APICs, not be overwritten by them.
//! Link down detaches the backend (frames stay in the tap, as QEMU stops vhost then). Dropping
//! the pair closes the vhost fd, which stops the rings; nothing else is left behind.

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::net::VhostNet;
use vhost::vhost_kern::net::Net as VhostNetFd;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::TapQueue;
use crate::device::{ActivateError, GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};
use crate::dirty_log::VhostLog;

/// Path of the vhost-net device.
pub const VHOST_NET_PATH: &str = "/dev/vhost-net";

/// One queue pair run by vhost-net.
pub struct VhostPair<T> {
    dev: VhostNetFd<Arc<GuestMemoryMmap>>,
    /// Index of the receive queue (the transmit queue is the next one).
    pub rx_index: u16,
    queues: [Queue; 2],
    calls: [EventFd; 2],
    /// The rings' kick EventFds (the transport's), written to make vhost look at the rings.
    kicks: [EventFd; 2],
    interrupt: Arc<dyn VirtioInterrupt>,
    tap: T,
    attached: bool,
    /// The features vhost was given (the acked ones it knows).
    features: u64,
}

/// What [`VhostPair::setup`] made: the vhost fd, the rings, the calls and the kicks.
type Started = (
    VhostNetFd<Arc<GuestMemoryMmap>>,
    [Queue; 2],
    [EventFd; 2],
    [EventFd; 2],
    u64,
);

/// vhost feature: log every write to guest memory (`VHOST_F_LOG_ALL`).
const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// vring flag: log the used ring's writes at `log_addr` (`VHOST_VRING_F_LOG`).
const VHOST_VRING_F_LOG: u32 = 1;

fn io(what: &'static str) -> impl Fn(vhost::Error) -> ActivateError {
    move |e| ActivateError::Io(std::io::Error::other(format!("vhost-net: {what}: {e}")))
}

impl<T: TapQueue> VhostPair<T> {
    /// Starts vhost-net on `rx` (queue `rx_index`) and `tx` with their kick EventFds, over
    /// `tap`; the backend is attached only when `link_up`; `interrupt` signals the queues, and
    /// vhost signals them through its irqfds directly where it has them.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        mem: &GuestMemoryMmap,
        acked: u64,
        rx_index: u16,
        rx: (Queue, EventFd),
        tx: (Queue, EventFd),
        tap: T,
        link_up: bool,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) -> Result<VhostPair<T>, (ActivateError, T)> {
        let direct = [
            interrupt.notifier(VirtioInterruptType::Queue(rx_index)),
            interrupt.notifier(VirtioInterruptType::Queue(rx_index + 1)),
        ];
        match Self::setup(mem, acked, rx, tx, direct) {
            Ok((dev, queues, calls, kicks, features)) => {
                let mut p = VhostPair {
                    dev,
                    rx_index,
                    queues,
                    calls,
                    kicks,
                    interrupt: interrupt.clone(),
                    tap,
                    attached: false,
                    features,
                };
                if let Err(e) = p.set_attached(link_up) {
                    return Err((e, p.into_tap()));
                }
                Ok(p)
            }
            Err(e) => Err((e, tap)),
        }
    }

    fn setup(
        mem: &GuestMemoryMmap,
        acked: u64,
        rx: (Queue, EventFd),
        tx: (Queue, EventFd),
        direct: [Option<EventFd>; 2],
    ) -> Result<Started, ActivateError> {
        let dev = VhostNetFd::new(Arc::new(mem.clone())).map_err(io("open /dev/vhost-net"))?;
        dev.set_owner().map_err(io("set owner"))?;
        let supported = dev.get_features().map_err(io("get features"))?;
        // The ring and version bits vhost knows; the offload bits are the tap's business.
        let features = acked & supported;
        dev.set_features(features).map_err(io("set features"))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().raw_value(),
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            })
            .collect();
        dev.set_mem_table(&regions)
            .map_err(io("set memory table"))?;
        let new_call = || {
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| {
                ActivateError::Io(std::io::Error::other(format!("vhost-net: eventfd: {e}")))
            })
        };
        let calls = [new_call()?, new_call()?];
        let (rxq, rxk) = rx;
        let (txq, txk) = tx;
        for (i, (q, kick)) in [(&rxq, &rxk), (&txq, &txk)].into_iter().enumerate() {
            dev.set_vring_num(i, q.size())
                .map_err(io("set ring size"))?;
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: q.desc_table(),
                used_ring_addr: q.used_ring(),
                avail_ring_addr: q.avail_ring(),
                log_addr: None,
            };
            dev.set_vring_addr(i, &cfg)
                .map_err(io("set ring addresses"))?;
            dev.set_vring_base(i, q.next_avail())
                .map_err(io("set ring base"))?;
            // The irqfd when there is one; our relay otherwise (it then never fires).
            dev.set_vring_call(i, direct[i].as_ref().unwrap_or(&calls[i]))
                .map_err(io("set call eventfd"))?;
            dev.set_vring_kick(i, kick)
                .map_err(io("set kick eventfd"))?;
        }
        Ok((dev, [rxq, txq], calls, [rxk, txk], features))
    }

    /// Attaches (link up) or detaches (link down) the tap as both rings' backend. On attaching,
    /// both rings are kicked and both queues signalled once: a kick or an interrupt that came
    /// while the rings were stopped (or before a snapshot was taken) is not lost, as the guest
    /// would not send it again (with EVENT_IDX it may be waiting for exactly that one).
    pub fn set_attached(&mut self, attached: bool) -> Result<(), ActivateError> {
        if attached == self.attached {
            return Ok(());
        }
        // SAFETY: the tap's fd stays open for as long as `self.tap` lives; the File is never
        // dropped (ManuallyDrop), so the fd is not closed here.
        let file = ManuallyDrop::new(unsafe { File::from_raw_fd(self.tap.as_raw_fd()) });
        for i in 0..2 {
            self.dev
                .set_backend(i, attached.then_some(&*file))
                .map_err(io("set backend"))?;
        }
        self.attached = attached;
        if attached {
            for (i, kick) in self.kicks.iter().enumerate() {
                let _ = kick.write(1);
                let q = VirtioInterruptType::Queue(self.rx_index + i as u16);
                if let Err(e) = self.interrupt.trigger(q) {
                    log::warn!("virtio-net: signalling queue {q:?} failed: {e}");
                }
            }
        }
        Ok(())
    }

    /// Starts (`Some`) or stops vhost's dirty log: while it runs, every page the kernel
    /// writes (frames received, used rings) is marked in `log`, for a live migration. As QEMU
    /// does, on running rings: the log base, then the features, then each ring's addresses
    /// with its used ring to log.
    pub fn set_dirty_log(&mut self, log: Option<&VhostLog>) -> Result<(), ActivateError> {
        let mut features = self.features;
        if let Some(l) = log {
            self.dev
                .set_log_base(l.base(), None)
                .map_err(io("set log base"))?;
            features |= VHOST_F_LOG_ALL;
        }
        self.dev
            .set_features(features)
            .map_err(io("set features"))?;
        for (i, q) in self.queues.iter().enumerate() {
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: if log.is_some() { VHOST_VRING_F_LOG } else { 0 },
                desc_table_addr: q.desc_table(),
                used_ring_addr: q.used_ring(),
                avail_ring_addr: q.avail_ring(),
                log_addr: log.map(|_| q.used_ring()),
            };
            self.dev
                .set_vring_addr(i, &cfg)
                .map_err(io("set ring addresses"))?;
        }
        Ok(())
    }

    /// The call EventFds (receive, transmit), for the event loop to relay.
    pub fn calls(&self) -> [&EventFd; 2] {
        [&self.calls[0], &self.calls[1]]
    }

    /// Relays ring `which` (0: receive, 1: transmit)'s call as an interrupt.
    pub fn relay(&self, which: usize, interrupt: &Arc<dyn VirtioInterrupt>) {
        if self.calls[which].read().is_ok() {
            if let Err(e) =
                interrupt.trigger(VirtioInterruptType::Queue(self.rx_index + which as u16))
            {
                log::warn!("virtio-net: vhost interrupt relay failed: {e}");
            }
        }
    }

    /// Stops both rings for a snapshot: the tap is detached (vhost finishes what it was doing
    /// and touches guest memory no more), then the rings' positions are read back: vhost's
    /// next available index, and the used index it last published in guest memory. Until
    /// [`VhostPair::set_attached`] attaches the tap again, the queues' states are exact.
    pub fn stop(&mut self, mem: &GuestMemoryMmap) -> Result<(), ActivateError> {
        self.set_attached(false)?;
        for (i, q) in self.queues.iter_mut().enumerate() {
            let next_avail = self.dev.get_vring_base(i).map_err(io("get ring base"))?;
            let used = q.used_idx(mem, Ordering::Acquire).map_err(|e| {
                ActivateError::Io(std::io::Error::other(format!(
                    "vhost-net: reading ring {i}'s used index: {e}"
                )))
            })?;
            // vhost keeps a 16-bit index (split rings) in the low half.
            q.set_next_avail(next_avail as u16);
            q.set_next_used(used.0);
        }
        Ok(())
    }

    /// The rings' states: exact after [`VhostPair::stop`], as configured otherwise (vhost moves
    /// the positions in the kernel while it runs).
    pub fn queue_states(&self) -> [(u16, QueueState); 2] {
        [
            (self.rx_index, self.queues[0].state()),
            (self.rx_index + 1, self.queues[1].state()),
        ]
    }

    /// The tap.
    pub fn tap(&self) -> &T {
        &self.tap
    }

    /// Stops vhost (closing its fd) and gives the tap back.
    pub fn into_tap(self) -> T {
        self.tap
    }
}
