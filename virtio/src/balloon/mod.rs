//! virtio-balloon (virtio 1.x, 5.5): the guest gives memory back to the host on request
//! (inflate), takes it again (deflate), reports its free memory on its own (free page
//! reporting), and sends its memory statistics when asked.
//!
//! Queues are numbered the way Linux and QEMU number them, packed by the negotiated features:
//! inflate 0, deflate 1, then statistics if STATS_VQ, then free page reporting if REPORTING.
//! Page numbers are 4 KiB frames whatever the guest's page size. Pages put in the balloon and
//! ranges reported free are released on the host at once (MADV_DONTNEED on anonymous memory;
//! a private file mapping, i.e. memory restored from a snapshot file, gets fresh anonymous
//! pages mapped over it, since MADV_DONTNEED would read the file back). A page outside guest
//! RAM, put in twice or taken out without being in is counted and ignored: the guest can cost
//! itself its memory, never the VMM its stability. Deflating needs nothing from the host (a
//! page faults back in when touched); MUST_TELL_HOST is honoured as the driver waits for each
//! deflate buffer to be returned.
//!
//! Statistics follow QEMU: the driver posts one buffer, the device keeps it and gives it back
//! every `stats_interval_s` seconds to ask for fresh figures; unknown tags are ignored.
//! The driver's `actual` is reported through [`BalloonShared`]'s listener (QMP BALLOON_CHANGE),
//! at most once a second: changes within a second are folded into one, sent at its end.

mod persist;
mod shared;
#[cfg(test)]
mod tests;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use devices::persist::RestoreError;
use event_manager::EventSet;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryRegion, Permissions};
use vmm_sys_util::timerfd::TimerFd;

pub use persist::BalloonState;
pub use shared::{
    BalloonCountersSnapshot, BalloonShared, ChangeListener, GuestStats, TargetError, NR_STATS,
};

use crate::device::{
    feature, notify_used, queue_states, ActivateContext, ActivateError, GuestMemoryMmap,
    VirtioDevice, VirtioDeviceState, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// virtio device type of a balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Feature bit: the driver tells the host before using deflated pages.
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
/// Feature bit: the statistics queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Feature bit: the guest deflates on its own when out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit: free page reporting.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// The unit of the page numbers.
pub const PAGE_SIZE: u64 = 4096;
/// Queue size (the reporting queue needs at least 32).
const QUEUE_SIZE: u16 = 128;
/// `num_pages` and `actual`.
const CONFIG_LEN: usize = 8;
/// Bytes of one statistic (`le16 tag, le64 value`, packed).
const STAT_LEN: usize = 10;
/// Most bytes read from an inflate or deflate buffer (Linux sends at most 256 page numbers);
/// more is counted as a bad request and ignored.
const MAX_PFN_BYTES: usize = 64 << 10;
/// Most bytes of statistics read (16 tags are 160 bytes).
const MAX_STATS_BYTES: usize = 4096;
/// The shortest interval between two BALLOON_CHANGE reports.
const CHANGE_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// What the balloon offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonOptions {
    /// Offer DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
}

/// The queues in use, by the indices the negotiated features give them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    stats: Option<u16>,
    reporting: Option<u16>,
}

impl Layout {
    fn of(features: u64) -> Layout {
        let has = |bit: u32| features & feature(bit) != 0;
        let stats = has(VIRTIO_BALLOON_F_STATS_VQ).then_some(2);
        let next = 2 + u16::from(stats.is_some());
        Layout {
            stats,
            reporting: has(VIRTIO_BALLOON_F_REPORTING).then_some(next),
        }
    }
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<Option<Queue>>,
    layout: Layout,
}

/// Queue `index` of `queues`, if the driver enabled it.
fn queue_mut(queues: &mut [Option<Queue>], index: u16) -> Option<&mut Queue> {
    queues.get_mut(usize::from(index)).and_then(Option::as_mut)
}

/// A virtio-balloon device.
pub struct Balloon {
    shared: Arc<BalloonShared>,
    avail_features: u64,
    queue_sizes: Vec<u16>,
    active: Option<Active>,
    /// Pages in the balloon, one bit per 4 KiB page of guest RAM (by guest frame number).
    ballooned: Vec<u64>,
    /// The statistics buffer the driver posted, kept until fresh figures are wanted.
    stats_head: Option<u16>,
    stats_timer: TimerFd,
    change_timer: TimerFd,
    last_change_event: Option<Instant>,
    change_pending: bool,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("active", &self.active.is_some())
            .field("features", &format_args!("{:#x}", self.avail_features))
            .finish()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Balloon {
    /// A balloon for the VM `shared` describes.
    pub fn new(shared: Arc<BalloonShared>, options: BalloonOptions) -> std::io::Result<Balloon> {
        let mut features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_BALLOON_F_MUST_TELL_HOST)
            | feature(VIRTIO_BALLOON_F_STATS_VQ);
        if options.deflate_on_oom {
            features |= feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
        }
        let mut queues = 3;
        if options.free_page_reporting {
            features |= feature(VIRTIO_BALLOON_F_REPORTING);
            queues += 1;
        }
        let pages = shared.memory_bytes().div_ceil(PAGE_SIZE);
        // A new device (a fresh boot or a reset VM) starts empty: the guest has all its memory
        // until its driver says otherwise. A restore puts the saved `actual` back.
        shared.set_actual_pages(0);
        Ok(Balloon {
            shared,
            avail_features: features,
            queue_sizes: vec![QUEUE_SIZE; queues],
            active: None,
            ballooned: vec![0; usize::try_from(pages.div_ceil(64)).unwrap_or(0)],
            stats_head: None,
            stats_timer: TimerFd::new().map_err(std::io::Error::from)?,
            change_timer: TimerFd::new().map_err(std::io::Error::from)?,
            last_change_event: None,
            change_pending: false,
        })
    }

    /// What the control plane holds.
    pub fn shared(&self) -> Arc<BalloonShared> {
        self.shared.clone()
    }

    /// Pages in the balloon now.
    pub fn ballooned_pages(&self) -> u64 {
        self.ballooned
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    fn is_ballooned(&self, pfn: u64) -> bool {
        self.ballooned
            .get((pfn / 64) as usize)
            .is_some_and(|w| w & (1 << (pfn % 64)) != 0)
    }

    fn set_ballooned(&mut self, pfn: u64, on: bool) {
        if let Some(w) = self.ballooned.get_mut((pfn / 64) as usize) {
            if on {
                *w |= 1 << (pfn % 64);
            } else {
                *w &= !(1 << (pfn % 64));
            }
        }
    }

    /// Arms the statistics timer for the current interval (disarms it for 0).
    fn arm_stats_timer(&mut self) {
        let secs = self.shared.stats_interval();
        let d = Duration::from_secs(u64::from(secs));
        let r = if secs == 0 {
            self.stats_timer.clear()
        } else {
            self.stats_timer.reset(d, Some(d))
        };
        if let Err(e) = r {
            log::warn!("virtio-balloon: statistics timer: {e}");
        }
    }

    /// Takes every buffer of queue `index` and hands its chains to `f` (with the queue's
    /// memory), returns them with used length 0 and signals the driver if it wants it.
    fn drain<F>(&mut self, index: u16, mut f: F)
    where
        F: FnMut(&mut Balloon, &GuestMemoryMmap, Vec<(GuestAddress, u32, bool)>),
    {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mem = a.mem.clone();
        let interrupt = a.interrupt.clone();
        let mut chains = Vec::new();
        let Some(q) = queue_mut(&mut a.queues, index) else {
            return;
        };
        let mut rechecked = false;
        loop {
            while let Some(chain) = q.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let descs: Vec<(GuestAddress, u32, bool)> = chain
                    .map(|d| (d.addr(), d.len(), d.is_write_only()))
                    .collect();
                chains.push((head, descs));
                rechecked = false;
            }
            match q.enable_notification(&mem) {
                Ok(true) if !std::mem::replace(&mut rechecked, true) => continue,
                _ => break,
            }
        }
        if chains.is_empty() {
            return;
        }
        let heads: Vec<u16> = chains.iter().map(|(h, _)| *h).collect();
        for (_, descs) in chains {
            f(self, &mem, descs);
        }
        let Some(q) = self
            .active
            .as_mut()
            .and_then(|a| queue_mut(&mut a.queues, index))
        else {
            return;
        };
        for head in heads {
            if let Err(e) = q.add_used(&mem, head, 0) {
                log::warn!("virtio-balloon: returning a buffer failed: {e}");
            }
        }
        notify_used(q, &mem, interrupt.as_ref(), index);
    }

    /// The page numbers of an inflate or deflate buffer (its readable bytes, le32 each).
    fn page_numbers(&self, mem: &GuestMemoryMmap, descs: &[(GuestAddress, u32, bool)]) -> Vec<u64> {
        let mut bytes = Vec::new();
        for &(addr, len, write_only) in descs {
            if write_only {
                continue;
            }
            let len = len as usize;
            if bytes.len() + len > MAX_PFN_BYTES {
                self.shared
                    .counters
                    .bad_requests
                    .fetch_add(1, Ordering::Relaxed);
                return Vec::new();
            }
            let at = bytes.len();
            bytes.resize(at + len, 0);
            if mem.read_slice(&mut bytes[at..], addr).is_err() {
                self.shared
                    .counters
                    .bad_requests
                    .fetch_add(1, Ordering::Relaxed);
                return Vec::new();
            }
        }
        if bytes.len() % 4 != 0 {
            self.shared
                .counters
                .bad_requests
                .fetch_add(1, Ordering::Relaxed);
        }
        bytes
            .chunks_exact(4)
            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect()
    }

    fn inflate(&mut self, mem: &GuestMemoryMmap, descs: Vec<(GuestAddress, u32, bool)>) {
        let pfns = self.page_numbers(mem, &descs);
        let shared = self.shared.clone();
        let c = &shared.counters;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for pfn in pfns {
            let gpa = pfn * PAGE_SIZE;
            if !mem.check_range(
                GuestAddress(gpa),
                PAGE_SIZE as usize,
                Permissions::ReadWrite,
            ) {
                c.invalid_pages.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if self.is_ballooned(pfn) {
                c.duplicate_pages.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.set_ballooned(pfn, true);
            c.inflated_pages.fetch_add(1, Ordering::Relaxed);
            match runs.last_mut() {
                Some((start, n)) if *start + *n == pfn => *n += 1,
                _ => runs.push((pfn, 1)),
            }
        }
        for (start, n) in runs {
            release(mem, start * PAGE_SIZE, n * PAGE_SIZE);
        }
    }

    fn deflate(&mut self, mem: &GuestMemoryMmap, descs: Vec<(GuestAddress, u32, bool)>) {
        let shared = self.shared.clone();
        let c = &shared.counters;
        for pfn in self.page_numbers(mem, &descs) {
            if pfn >= self.ballooned.len() as u64 * 64 || !self.is_ballooned(pfn) {
                c.duplicate_pages.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.set_ballooned(pfn, false);
            c.deflated_pages.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn report(&mut self, mem: &GuestMemoryMmap, descs: Vec<(GuestAddress, u32, bool)>) {
        let c = &self.shared.counters;
        for (addr, len, _) in descs {
            let (gpa, len) = (addr.raw_value(), u64::from(len));
            if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
                c.bad_requests.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !mem.check_range(addr, len as usize, Permissions::ReadWrite) {
                c.invalid_pages
                    .fetch_add(len / PAGE_SIZE, Ordering::Relaxed);
                continue;
            }
            release(mem, gpa, len);
            c.reported_bytes.fetch_add(len, Ordering::Relaxed);
        }
    }

    /// The driver posted its statistics buffer: take the figures, keep the buffer.
    fn receive_stats(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(index) = a.layout.stats else {
            return;
        };
        let mem = a.mem.clone();
        let Some(q) = queue_mut(&mut a.queues, index) else {
            return;
        };
        let mut returned = false;
        let mut rechecked = false;
        loop {
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                // Publish how far we got (with EVENT_IDX the driver notifies only past it),
                // and look once more if a buffer came meanwhile.
                match q.enable_notification(&mem) {
                    Ok(true) if !std::mem::replace(&mut rechecked, true) => continue,
                    _ => break,
                }
            };
            rechecked = false;
            // A second buffer while one is held: the old one goes back (QEMU does the same).
            if let Some(old) = self.stats_head.replace(chain.head_index()) {
                let _ = q.add_used(&mem, old, 0);
                returned = true;
            }
            let mut bytes = Vec::new();
            for d in chain.filter(|d| !d.is_write_only()) {
                let len = (d.len() as usize).min(MAX_STATS_BYTES - bytes.len());
                let at = bytes.len();
                bytes.resize(at + len, 0);
                if mem.read_slice(&mut bytes[at..], d.addr()).is_err() {
                    bytes.truncate(at);
                    break;
                }
            }
            let mut values = vec![None; NR_STATS];
            for s in bytes.chunks_exact(STAT_LEN) {
                let tag = usize::from(u16::from_le_bytes([s[0], s[1]]));
                let mut v = [0u8; 8];
                v.copy_from_slice(&s[2..10]);
                // Tags this VMM does not know (a newer guest's) are ignored.
                if let Some(slot) = values.get_mut(tag) {
                    *slot = Some(u64::from_le_bytes(v));
                }
            }
            let mut st = self
                .shared
                .stats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            st.values = values;
            st.last_update = now_secs();
        }
        if returned {
            notify_used(q, &mem, a.interrupt.as_ref(), index);
        }
    }

    /// Gives the statistics buffer back: the driver refills it and posts it again.
    fn request_stats(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let (Some(index), Some(head)) = (a.layout.stats, self.stats_head) else {
            return;
        };
        let Some(q) = queue_mut(&mut a.queues, index) else {
            return;
        };
        self.stats_head = None;
        if let Err(e) = q.add_used(&a.mem, head, 0) {
            log::warn!("virtio-balloon: returning the statistics buffer failed: {e}");
            return;
        }
        notify_used(q, &a.mem, a.interrupt.as_ref(), index);
    }

    /// The driver changed `actual`: report it now, or at the end of the current second.
    fn actual_changed(&mut self) {
        let now = Instant::now();
        match self.last_change_event {
            Some(t) if now.duration_since(t) < CHANGE_EVENT_INTERVAL => {
                if !self.change_pending {
                    self.change_pending = true;
                    let left = CHANGE_EVENT_INTERVAL - now.duration_since(t);
                    if let Err(e) = self.change_timer.reset(left, None) {
                        log::warn!("virtio-balloon: change timer: {e}");
                    }
                }
            }
            _ => {
                self.last_change_event = Some(now);
                self.shared.notify_change();
            }
        }
    }

    fn change_timer_fired(&mut self) {
        if std::mem::take(&mut self.change_pending) {
            self.last_change_event = Some(Instant::now());
            self.shared.notify_change();
        }
    }
}

/// Gives guest memory `[gpa, gpa + len)` back to the host. The caller checked the range.
fn release(mem: &GuestMemoryMmap, gpa: u64, len: u64) {
    use vm_memory::GuestMemoryBackend as _;
    let mut done = 0u64;
    while done < len {
        let addr = GuestAddress(gpa + done);
        let Some(region) = mem.find_region(addr) else {
            return;
        };
        let offset = addr.raw_value() - region.start_addr().raw_value();
        let n = (len - done).min(region.len() - offset);
        let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(offset)) else {
            return;
        };
        let file_backed = region.file_offset().is_some();
        // `host..host + n` lies inside this region's mapping (checked against the region's
        // length above), which stays mapped for the VM's life.
        // SAFETY: replacing or dropping these pages changes guest memory only, and the guest
        // gave them up; no Rust reference points into guest memory.
        let r = unsafe {
            if file_backed {
                // A private file mapping (restored from a snapshot): fresh anonymous pages.
                let p = libc::mmap(
                    host.cast(),
                    n as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    -1
                } else {
                    0
                }
            } else {
                libc::madvise(host.cast(), n as usize, libc::MADV_DONTNEED)
            }
        };
        if r != 0 {
            log::warn!(
                "virtio-balloon: releasing {n} bytes at {:#x}: {}",
                addr.raw_value(),
                std::io::Error::last_os_error()
            );
        }
        // The pages read as zeros now, behind KVM's back: a live migration sends them again.
        vm_memory::bitmap::Bitmap::mark_dirty(&region.bitmap(), offset as usize, n as usize);
        done += n;
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; CONFIG_LEN];
        c[0..4].copy_from_slice(&self.shared.target_pages().to_le_bytes());
        c[4..8].copy_from_slice(&self.shared.actual_pages().to_le_bytes());
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            let idx = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(v) = idx.and_then(|i| c.get(i)) {
                *b = *v;
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4, 4 bytes) is the driver's to write.
        if offset != 4 || data.len() != 4 {
            log::debug!("virtio-balloon: ignoring a config write at {offset:#x}");
            return;
        }
        let pages = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        if self.shared.set_actual_pages(pages) {
            self.actual_changed();
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let layout = Layout::of(ctx.acked_features);
        let mut queues: Vec<Option<Queue>> = (0..self.queue_sizes.len()).map(|_| None).collect();
        for q in ctx.queues {
            if let Some(slot) = queues.get_mut(usize::from(q.index)) {
                *slot = Some(q.queue);
            }
        }
        for q in [Some(0), Some(1), layout.stats, layout.reporting]
            .into_iter()
            .flatten()
        {
            if queues.get(usize::from(q)).is_none_or(Option::is_none) {
                return Err(ActivateError::MissingQueue(q));
            }
        }
        *self
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(ctx.interrupt.clone());
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queues,
            layout,
        });
        self.arm_stats_timer();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.stats_head = None;
        // The guest's new driver starts with every page its own again; the target stays.
        self.ballooned.fill(0);
        self.shared.set_actual_pages(0);
        let _ = self.stats_timer.clear();
        *self
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: u16) {
        let Some(layout) = self.active.as_ref().map(|a| a.layout) else {
            return;
        };
        match index {
            0 => self.drain(0, Balloon::inflate),
            1 => self.drain(1, Balloon::deflate),
            i if Some(i) == layout.stats => self.receive_stats(),
            i if Some(i) == layout.reporting => self.drain(i, Balloon::report),
            _ => {}
        }
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        if self.active.is_none() {
            return Vec::new();
        }
        vec![
            self.stats_timer.as_raw_fd(),
            self.change_timer.as_raw_fd(),
            self.shared.wake.as_raw_fd(),
        ]
    }

    fn process_backend(&mut self, index: usize, _events: EventSet) {
        match index {
            0 => {
                let _ = self.stats_timer.wait();
                self.request_stats();
            }
            1 => {
                let _ = self.change_timer.wait();
                self.change_timer_fired();
            }
            _ => {
                let _ = self.shared.wake.read();
                self.arm_stats_timer();
                // A new interval asks for figures at once, as QEMU's does.
                if self.shared.stats_interval() > 0 {
                    self.request_stats();
                }
            }
        }
    }

    fn active_queue_states(&self) -> Vec<(u16, QueueState)> {
        self.active
            .as_ref()
            .map_or_else(Vec::new, |a| queue_states(&a.queues))
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Balloon(self.balloon_state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), RestoreError> {
        self.apply_balloon_state(state)
    }
}
