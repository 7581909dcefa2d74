//! The source of a live migration: a worker thread that connects, sends guest RAM round after
//! round while the guest runs, asks the event loop for the switchover, sends the rest and the
//! machine state, and waits for the destination's answer.

use std::io::BufWriter;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::action::{MigrationInfo, MigrationParameters, MigrationStatus, RamStats};
use api::MigrationAddress;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::dirty::{self, DirtyLog, PageBitmap};
use super::wire::{self, StreamWriter, MAX_DATA_PAGES};
use super::Conn;
use crate::snapshot::format::{is_zero, PAGE_SIZE};
use virtio::GuestMemoryMmap;

/// How often the worker reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// The rate limit's accounting window (QEMU's is 100 ms too).
const RATE_WINDOW: Duration = Duration::from_millis(100);

/// What the worker tells the event loop.
#[derive(Debug)]
pub enum ToLoop {
    /// Where the migration stands (status `setup` or `active`).
    Progress(MigrationInfo),
    /// A round of sending memory began.
    Pass(u64),
    /// Stop the VM and send its state ([`Outgoing::send_state`]).
    Switchover,
    /// The migration ended: the final figures, or why it failed.
    Finished(Result<MigrationInfo, Failure>),
}

/// The event loop's answer to [`ToLoop::Switchover`].
#[derive(Debug)]
pub struct Handover {
    /// The machine state, serialised.
    pub state: Vec<u8>,
    /// When the vCPUs stopped: the downtime counts from here.
    pub stopped: Instant,
}

/// Why a migration ended without completing.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What went wrong (or "cancelled").
    pub reason: String,
    /// The user cancelled it.
    pub cancelled: bool,
}

/// A migration in progress, as the event loop holds it.
pub struct Outgoing {
    thread: Option<JoinHandle<()>>,
    cancel: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<Conn>>>,
    to_worker: Sender<Result<Handover, String>>,
    /// The worker's answer to a [`Handover`]: every page it sends was read.
    pages_read: Receiver<Result<(), String>>,
    /// What the worker reports; `wake` is written with each message.
    pub rx: Receiver<ToLoop>,
}

/// What the worker needs.
pub struct Job {
    /// The destination.
    pub to: MigrationAddress,
    /// The VM's configuration, serialised (the stream's CONF).
    pub config: Vec<u8>,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// The VM (for its dirty log).
    pub vm_fd: Arc<VmFd>,
    /// The parameters, read again at every step (they may change while it runs).
    pub params: Arc<Mutex<MigrationParameters>>,
    /// Written whenever the worker has a message for the event loop.
    pub wake: Arc<EventFd>,
    /// Extra dirty pages to OR in at each harvest (vhost's log), if any.
    pub extra_log: Option<Box<dyn Fn() -> Vec<PageBitmap> + Send>>,
}

impl Outgoing {
    /// Starts the worker.
    pub fn start(job: Job) -> Result<Outgoing, String> {
        let cancel = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Mutex::new(None));
        let (tx, rx) = channel();
        let (to_worker, from_loop) = channel();
        let (pages_read_tx, pages_read) = channel();
        let worker = Worker {
            job,
            cancel: cancel.clone(),
            conn: conn.clone(),
            tx,
            from_loop,
            pages_read: pages_read_tx,
            started: Instant::now(),
            stats: Stats::default(),
            last_progress: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("vmm-migrate".into())
            .spawn(move || worker.run())
            .map_err(|e| format!("cannot start the migration thread: {e}"))?;
        Ok(Outgoing {
            thread: Some(thread),
            cancel,
            conn,
            to_worker,
            pages_read,
            rx,
        })
    }

    /// Asks the worker to stop: it ends with a cancelled [`Failure`] soon.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            c.shutdown();
        }
    }

    /// Answers [`ToLoop::Switchover`] with the stopped VM's state. Returns once the worker has
    /// taken the last dirty pages and read every one it sends (or why it could not): the VM's
    /// devices must not write guest memory until then, or the destination would get memory
    /// that the state does not describe. The event loop waits that long, as QEMU's holds its
    /// big lock through the completion; a destination that stops reading fails the wait after
    /// [`super::STALL_TIMEOUT`].
    pub fn send_state(&self, handover: Handover) -> Result<(), String> {
        self.to_worker
            .send(Ok(handover))
            .map_err(|_| "the migration worker is gone".to_string())?;
        self.pages_read
            .recv()
            .unwrap_or_else(|_| Err("the migration worker ended".into()))
    }

    /// Answers [`ToLoop::Switchover`] with why the VM could not be stopped or its state taken.
    pub fn abort_switchover(&self, reason: String) {
        let _ = self.to_worker.send(Err(reason));
    }

    /// Waits for the worker to end (after [`ToLoop::Finished`] or [`Outgoing::cancel`]).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.cancel();
            self.abort_switchover("the migration was dropped".into());
            let _ = t.join();
        }
    }
}

#[derive(Default)]
struct Stats {
    setup: Duration,
    syncs: u64,
    zero_pages: u64,
    data_pages: u64,
    /// Pages still to send in this round.
    remaining: u64,
    dirty_rate: u64,
    expected_downtime_ms: Option<u64>,
    /// Bytes per second measured over the last round.
    bandwidth: f64,
    /// Bytes sent after the switchover.
    downtime_bytes: u64,
}

struct Worker {
    job: Job,
    cancel: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<Conn>>>,
    tx: Sender<ToLoop>,
    from_loop: Receiver<Result<Handover, String>>,
    pages_read: Sender<Result<(), String>>,
    started: Instant,
    stats: Stats,
    last_progress: Instant,
}

/// Limits the bytes sent per window to the bandwidth parameter.
struct RateLimit {
    window: Instant,
    sent: u64,
}

type Writer = StreamWriter<BufWriter<Conn>>;

impl Worker {
    fn tell(&self, msg: ToLoop) {
        if self.tx.send(msg).is_ok() {
            let _ = self.job.wake.write(1);
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn fail(&self, reason: String) -> Failure {
        let cancelled = self.cancelled();
        Failure {
            reason: if cancelled {
                "cancelled".into()
            } else {
                reason
            },
            cancelled,
        }
    }

    fn info(&self, status: MigrationStatus, transferred: u64) -> MigrationInfo {
        let s = &self.stats;
        let total: u64 = self.job.mem.iter().map(|r| r.len()).sum();
        let secs = self.started.elapsed().as_secs_f64().max(1e-6);
        MigrationInfo {
            status,
            total_time_ms: Some(self.started.elapsed().as_millis() as u64),
            setup_time_ms: Some(s.setup.as_millis() as u64),
            downtime_ms: None,
            expected_downtime_ms: s.expected_downtime_ms,
            ram: Some(RamStats {
                transferred,
                remaining: s.remaining * PAGE_SIZE,
                total,
                duplicate: s.zero_pages,
                normal: s.data_pages,
                normal_bytes: s.data_pages * PAGE_SIZE,
                mbps: s.bandwidth * 8.0 / 1e6,
                pages_per_second: ((s.zero_pages + s.data_pages) as f64 / secs) as u64,
                dirty_pages_rate: s.dirty_rate,
                dirty_sync_count: s.syncs,
                downtime_bytes: s.downtime_bytes,
            }),
            error_desc: None,
        }
    }

    fn run(mut self) {
        let result = self.migrate();
        self.tell(ToLoop::Finished(result));
    }

    fn migrate(&mut self) -> Result<MigrationInfo, Failure> {
        self.tell(ToLoop::Progress(MigrationInfo {
            status: MigrationStatus::Setup,
            ..Default::default()
        }));
        let conn = Conn::connect(&self.job.to).map_err(|e| self.fail(e))?;
        let keep = conn.try_clone().map_err(|e| self.fail(e.to_string()))?;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(keep);
        if self.cancelled() {
            return Err(self.fail(String::new()));
        }
        let mut w: Writer = StreamWriter::new(BufWriter::with_capacity(1 << 20, conn));
        let io = |e: std::io::Error| e.to_string();
        let regions = wire::layout(&self.job.mem);
        w.start(&self.job.config, &regions)
            .map_err(|e| self.fail(io(e)))?;
        let log = DirtyLog::start(self.job.vm_fd.clone(), self.job.mem.clone())
            .map_err(|e| self.fail(e))?;
        self.stats.setup = self.started.elapsed();
        // Round 1: everything (QEMU counts this as the first dirty-log sync too).
        let mut dirty: Vec<PageBitmap> = self
            .job
            .mem
            .iter()
            .map(|r| vec![u64::MAX; (r.len() / PAGE_SIZE).div_ceil(64) as usize])
            .collect();
        self.stats.syncs = 1;
        self.tell(ToLoop::Pass(1));
        let mut rate = RateLimit {
            window: Instant::now(),
            sent: 0,
        };
        loop {
            self.stats.remaining = dirty::count(&dirty);
            w.pass(self.stats.syncs).map_err(|e| self.fail(io(e)))?;
            self.tell(ToLoop::Progress(
                self.info(MigrationStatus::Active, w.bytes),
            ));
            let round_start = Instant::now();
            let bytes_before = w.bytes;
            self.send(&mut w, &dirty, Some(&mut rate))?;
            // The round ends when the destination has it all, not when the socket took it:
            // otherwise a backlog in the socket buffers would add to the downtime, and the
            // bandwidth measured would be the socket's, not the destination's.
            w.sync(self.stats.syncs).map_err(|e| self.fail(io(e)))?;
            wire::read_sync(w.get_mut().get_mut(), self.stats.syncs)
                .map_err(|e| self.fail(format!("the destination did not keep up: {e}")))?;
            let secs = round_start.elapsed().as_secs_f64().max(1e-3);
            self.stats.bandwidth = (w.bytes - bytes_before) as f64 / secs;
            dirty = self.harvest(&log)?;
            let pages = dirty::count(&dirty);
            self.stats.dirty_rate = (pages as f64 / secs) as u64;
            // What the switchover would send: these pages, at the bandwidth just measured.
            let expected = pages as f64 * PAGE_SIZE as f64 / self.stats.bandwidth.max(1.0);
            let expected_ms = (expected * 1000.0) as u64;
            self.stats.expected_downtime_ms = Some(expected_ms);
            self.stats.remaining = pages;
            let limit = self.params().downtime_limit_ms;
            if expected_ms <= limit {
                break;
            }
            if self.cancelled() {
                return Err(self.fail(String::new()));
            }
        }
        // The switchover: the event loop stops the VM, hands us its state and waits while we
        // take the last dirty pages and read them into the stream.
        self.tell(ToLoop::Switchover);
        let Handover { state, stopped } = match self.from_loop.recv() {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return Err(self.fail(e)),
            Err(_) => return Err(self.fail("the VM went away".into())),
        };
        let before = w.bytes;
        let switched = Instant::now();
        let sent = self.harvest(&log).and_then(|last| {
            dirty::merge(&mut dirty, &last);
            self.stats.remaining = dirty::count(&dirty);
            self.send(&mut w, &dirty, None)
        });
        let _ = self.pages_read.send(match &sent {
            Ok(()) => Ok(()),
            Err(f) => Err(f.reason.clone()),
        });
        sent?;
        w.finish(&state).map_err(|e| self.fail(io(e)))?;
        self.stats.downtime_bytes = w.bytes - before;
        self.stats.remaining = 0;
        log::info!(
            "migration: last {} pages and the state sent in {:?}",
            self.stats.downtime_bytes / PAGE_SIZE,
            switched.elapsed()
        );
        let answer = wire::read_answer(w.get_mut().get_mut()).map_err(|e| {
            self.fail(format!(
                "the destination did not confirm that it took the VM over: {e}"
            ))
        })?;
        if let Err(reason) = answer {
            return Err(self.fail(format!("the destination refused the VM: {reason}")));
        }
        // The destination starts the vCPUs as it answers: the guest was stopped this long.
        let downtime = stopped.elapsed();
        log::info!(
            "migration: the destination runs the VM, {:?} after the switchover, {downtime:?} \
             after the vCPUs stopped",
            switched.elapsed()
        );
        let _ = log.stop();
        let mut info = self.info(MigrationStatus::Completed, w.bytes);
        info.downtime_ms = Some(downtime.as_millis() as u64);
        Ok(info)
    }

    fn params(&self) -> MigrationParameters {
        *self.job.params.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn harvest(&mut self, log: &DirtyLog) -> Result<Vec<PageBitmap>, Failure> {
        let mut d = log.harvest().map_err(|e| self.fail(e))?;
        if let Some(extra) = &self.job.extra_log {
            dirty::merge(&mut d, &extra());
        }
        // Every sync starts a round (QEMU's MIGRATION_PASS carries the sync count).
        self.stats.syncs += 1;
        self.tell(ToLoop::Pass(self.stats.syncs));
        Ok(d)
    }

    /// Sends the pages `dirty` marks; rate-limited unless `rate` is `None` (the switchover).
    fn send(
        &mut self,
        w: &mut Writer,
        dirty: &[PageBitmap],
        mut rate: Option<&mut RateLimit>,
    ) -> Result<(), Failure> {
        let mut buf = vec![0u8; (MAX_DATA_PAGES as u64 * PAGE_SIZE) as usize];
        let regions: Vec<(u64, u64)> = self
            .job
            .mem
            .iter()
            .map(|r| (r.start_addr().0, r.len() / PAGE_SIZE))
            .collect();
        for (ri, &(base, pages)) in regions.iter().enumerate() {
            let Some(bits) = dirty.get(ri) else { continue };
            for (first, n) in dirty::runs(bits, pages, u64::from(MAX_DATA_PAGES)) {
                if self.cancelled() {
                    return Err(self.fail(String::new()));
                }
                let gpa = base + first * PAGE_SIZE;
                let bytes = (n * PAGE_SIZE) as usize;
                let chunk = &mut buf[..bytes];
                // The guest may be writing these pages now: whatever it writes after the
                // harvest is dirty again and goes in a later round.
                self.job
                    .mem
                    .read_slice(chunk, GuestAddress(gpa))
                    .map_err(|e| self.fail(format!("cannot read guest memory: {e}")))?;
                let before = w.bytes;
                self.send_chunk(w, gpa, chunk)?;
                self.stats.remaining = self.stats.remaining.saturating_sub(n);
                if let Some(rate) = rate.as_deref_mut() {
                    self.throttle(rate, w.bytes - before);
                }
                if self.last_progress.elapsed() >= PROGRESS_EVERY {
                    self.last_progress = Instant::now();
                    self.tell(ToLoop::Progress(
                        self.info(MigrationStatus::Active, w.bytes),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Sends a run of pages read at `gpa`: runs of zero pages as such, the others with data.
    fn send_chunk(&mut self, w: &mut Writer, gpa: u64, chunk: &[u8]) -> Result<(), Failure> {
        let page = PAGE_SIZE as usize;
        let pages = chunk.len() / page;
        let mut i = 0;
        while i < pages {
            let zero = is_zero(&chunk[i * page..(i + 1) * page]);
            let mut j = i + 1;
            while j < pages && is_zero(&chunk[j * page..(j + 1) * page]) == zero {
                j += 1;
            }
            let at = gpa + (i * page) as u64;
            let r = if zero {
                self.stats.zero_pages += (j - i) as u64;
                w.zero_pages(at, (j - i) as u32)
            } else {
                self.stats.data_pages += (j - i) as u64;
                w.data_pages(at, &chunk[i * page..j * page])
            };
            r.map_err(|e| self.fail(e.to_string()))?;
            i = j;
        }
        Ok(())
    }

    /// Sleeps as long as the bytes sent in this window exceed `max-bandwidth`.
    fn throttle(&self, rate: &mut RateLimit, bytes: u64) {
        let bw = self.params().max_bandwidth;
        if bw == 0 {
            return;
        }
        rate.sent += bytes;
        let allowed = Duration::from_secs_f64(rate.sent as f64 / bw as f64);
        let elapsed = rate.window.elapsed();
        if allowed > elapsed {
            let mut left = allowed - elapsed;
            while !left.is_zero() && !self.cancelled() {
                let step = left.min(Duration::from_millis(20));
                std::thread::sleep(step);
                left -= step;
            }
        }
        if rate.window.elapsed() >= RATE_WINDOW {
            rate.window = Instant::now();
            rate.sent = 0;
        }
    }
}
