//! The VM's figures (`GET /vm/metrics`, `GET /metrics`, `query-blockstats`).
//!
//! What the host can see, the VMM measures itself: the CPU time of the vCPU threads (from
//! `/proc`), the disks' request counters ([`BlockStats`], kept by virtio-blk), the NICs' bytes
//! (our counters, or the tap's for vhost-net, whose frames never pass through us). A timer on
//! the VMM thread takes a [`Sample`] every `metrics.interval_s`; a request takes one more and
//! computes the rates against the last sample at least half an interval old, so one request
//! gives current figures.
//!
//! What only the guest knows (memory use, load, filesystems) comes from qemu-ga through the
//! built-in agent channel, asked by a [`GuestPoller`] thread while someone reads the metrics.
//! A request never waits on the guest for long: it takes the poller's last answer if it is
//! fresh, or waits at most [`GUEST_WAIT`] for a new one, and a figure it cannot have is null
//! with the reason.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use api::metrics::{BlockDeviceStats, DiskRates, DiskStats, NicRates, Partition, VmMetrics};
use serde_json::{json, Value};
use virtio::balloon::BalloonShared;
use virtio::block::{BlockStats, BlockStatsSnapshot};

use crate::agent::AgentWorker;
use crate::net::NicHandle;
use crate::vconsole::AgentHandle;

/// The longest a metrics request waits for the guest agent.
pub const GUEST_WAIT: Duration = Duration::from_millis(700);

/// How long one agent command of a poll may take.
const POLL_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Samples kept: enough to find one at least half an interval old.
const KEEP: usize = 4;

/// What the host measures at one instant.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    /// Per vCPU: its thread id and the CPU time it has used.
    vcpus: Vec<(i32, Option<u64>)>,
    disks: Vec<BlockStatsSnapshot>,
    /// Per NIC: bytes the guest received and sent.
    nics: Vec<Option<(u64, u64)>>,
}

/// The sampler and the figures' source, for the VMM process's life (across VM resets).
pub struct Meter {
    period: Duration,
    disks: Vec<(String, Arc<BlockStats>)>,
    nics: Vec<NicHandle>,
    samples: VecDeque<Sample>,
    guest: Option<GuestPoller>,
    balloon: Option<Arc<BalloonShared>>,
}

impl Meter {
    /// A meter over these disks (ids and counters, in slot order) and NICs, asking the guest
    /// through `agent` if the VM has one.
    pub fn new(
        period: Duration,
        disks: Vec<(String, Arc<BlockStats>)>,
        nics: Vec<NicHandle>,
        agent: Option<AgentHandle>,
        balloon: Option<Arc<BalloonShared>>,
    ) -> Meter {
        Meter {
            period,
            disks,
            nics,
            samples: VecDeque::new(),
            guest: agent.and_then(|a| GuestPoller::start(a, period).ok()),
            balloon,
        }
    }

    /// The sampling period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The disks' counters, in slot order (for the builder, which hands them to the devices).
    pub fn disk_stats(&self) -> Vec<Arc<BlockStats>> {
        self.disks.iter().map(|(_, s)| s.clone()).collect()
    }

    /// Takes the periodic sample; `tids` are the vCPU threads now (0: not started).
    pub fn tick(&mut self, tids: &[i32]) {
        let s = self.sample(tids);
        if self.samples.len() == KEEP {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    fn sample(&self, tids: &[i32]) -> Sample {
        Sample {
            at: Instant::now(),
            vcpus: tids.iter().map(|&t| (t, thread_cpu_ns(t))).collect(),
            disks: self.disks.iter().map(|(_, s)| s.snapshot()).collect(),
            nics: self.nics.iter().map(nic_bytes).collect(),
        }
    }

    /// Every disk's counters, in QEMU's shape.
    pub fn block_stats(&self) -> Vec<DiskStats> {
        self.disks
            .iter()
            .map(|(id, s)| DiskStats {
                id: id.clone(),
                stats: qemu_stats(&s.snapshot()),
            })
            .collect()
    }

    /// Answers a metrics request: the host's figures now, the guest's from the poller, which
    /// may take up to [`GUEST_WAIT`] (then `reply` is called on a thread of its own).
    pub fn request(&mut self, tids: &[i32], reply: Box<dyn FnOnce(VmMetrics) + Send>) {
        let mut m = self.host_figures(tids);
        let balloon = self.balloon.clone();
        let Some(poller) = &self.guest else {
            for f in GUEST_FIGURES {
                m.unavailable(
                    f,
                    "the VM has no guest agent channel (start it with --agent)",
                );
            }
            fill_from_balloon(&mut m, balloon.as_deref());
            return reply(m);
        };
        match poller.request() {
            Ok(result) => {
                fill_guest(&mut m, result);
                fill_from_balloon(&mut m, balloon.as_deref());
                reply(m)
            }
            Err(generation) => {
                let inner = poller.inner.clone();
                let spawned = thread::Builder::new()
                    .name("metrics-wait".into())
                    .spawn(move || {
                        let result = inner.wait(generation, GUEST_WAIT);
                        fill_guest(&mut m, result);
                        fill_from_balloon(&mut m, balloon.as_deref());
                        reply(m)
                    });
                if let Err(e) = spawned {
                    // The closure (and its reply) is gone with the failed spawn; the caller's
                    // channel sees it dropped and reports the VMM as unavailable.
                    eprintln!("vmm: metrics: cannot start a thread: {e}");
                }
            }
        }
    }

    /// The figures the host measures; the guest's are left null.
    fn host_figures(&self, tids: &[i32]) -> VmMetrics {
        let now = self.sample(tids);
        let mut m = VmMetrics {
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            ..Default::default()
        };
        let min_age = self.period / 2;
        let base = self
            .samples
            .iter()
            .rev()
            .find(|s| now.at.duration_since(s.at) >= min_age)
            .or_else(|| self.samples.front());
        let dt = base.map_or(0.0, |b| now.at.duration_since(b.at).as_secs_f64());
        m.interval_s = dt;
        m.disks = self
            .disks
            .iter()
            .zip(&now.disks)
            .enumerate()
            .map(|(i, ((id, _), cur))| {
                let prev = base.and_then(|b| b.disks.get(i));
                disk_rates(id, cur, prev, dt)
            })
            .collect();
        m.nics = self
            .nics
            .iter()
            .zip(&now.nics)
            .enumerate()
            .map(|(i, (nic, cur))| {
                let prev = base.and_then(|b| b.nics.get(i).copied().flatten());
                let (rx, tx) = cur.unwrap_or((0, 0));
                let rate = |c: u64, p: Option<u64>| match p {
                    Some(p) if dt > 0.0 => c.saturating_sub(p) as f64 / 1024.0 / dt,
                    _ => 0.0,
                };
                NicRates {
                    id: nic.id.clone(),
                    receive: rate(rx, prev.map(|p| p.0)),
                    transfer: rate(tx, prev.map(|p| p.1)),
                    rx_bytes: rx,
                    tx_bytes: tx,
                }
            })
            .collect();
        if base.is_none() || dt < 0.01 {
            let why = "the VM has just started: no earlier sample to compute rates against yet";
            for f in HOST_RATE_FIGURES.iter().chain(&DISK_RATE_FIGURES) {
                m.unavailable(f, why);
            }
            return m;
        }
        m.cpu_usage = cpu_usage(base.map(|b| &b.vcpus[..]).unwrap_or(&[]), &now.vcpus, dt);
        if m.cpu_usage.is_none() {
            m.unavailable(
                "cpuUsage",
                "the vCPU threads' CPU time cannot be read (or the VM was reset in the interval)",
            );
        }
        if self.nics.is_empty() {
            m.unavailable("networkReceive", "the VM has no network card");
            m.unavailable("networkTransfer", "the VM has no network card");
        } else {
            m.network_receive = Some(m.nics.iter().map(|n| n.receive).sum());
            m.network_transfer = Some(m.nics.iter().map(|n| n.transfer).sum());
        }
        if self.disks.is_empty() {
            for f in DISK_RATE_FIGURES {
                m.unavailable(f, "the VM has no disk");
            }
        } else {
            let sum = |f: fn(&DiskRates) -> f64| m.disks.iter().map(f).sum::<f64>();
            m.disk_read_request = Some(sum(|d| d.read_requests));
            m.disk_write_request = Some(sum(|d| d.write_requests));
            m.disk_read_rate = Some(sum(|d| d.read_rate));
            m.disk_write_rate = Some(sum(|d| d.write_rate));
            let (reads, read_ns, writes, write_ns) =
                self.disks.iter().zip(&now.disks).enumerate().fold(
                    (0u64, 0u64, 0u64, 0u64),
                    |acc, (i, (_, cur))| {
                        let prev = base
                            .and_then(|b| b.disks.get(i))
                            .copied()
                            .unwrap_or_default();
                        (
                            acc.0 + cur.rd_operations.saturating_sub(prev.rd_operations),
                            acc.1 + cur.rd_total_time_ns.saturating_sub(prev.rd_total_time_ns),
                            acc.2 + cur.wr_operations.saturating_sub(prev.wr_operations),
                            acc.3 + cur.wr_total_time_ns.saturating_sub(prev.wr_total_time_ns),
                        )
                    },
                );
            m.disk_read_delay = delay(read_ns, reads);
            m.disk_write_delay = delay(write_ns, writes);
            if m.disk_read_delay.is_none() {
                m.unavailable("diskReadDelay", "no read request in the interval");
            }
            if m.disk_write_delay.is_none() {
                m.unavailable("diskWriteDelay", "no write request in the interval");
            }
        }
        m
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if let Some(p) = self.guest.take() {
            p.stop();
        }
    }
}

/// The figures only the guest knows.
const GUEST_FIGURES: [&str; 5] = [
    "memUsage",
    "memUsageRate",
    "loadavg_5",
    "diskUsage",
    "diskPartition",
];

/// The disks' rate figures.
const DISK_RATE_FIGURES: [&str; 6] = [
    "diskReadRequest",
    "diskWriteRequest",
    "diskReadRate",
    "diskWriteRate",
    "diskReadDelay",
    "diskWriteDelay",
];

/// The figures computed over the interval besides the disks' ([`DISK_RATE_FIGURES`]).
const HOST_RATE_FIGURES: [&str; 3] = ["cpuUsage", "networkReceive", "networkTransfer"];

/// Milliseconds per request, if there was one.
fn delay(total_ns: u64, count: u64) -> Option<f64> {
    (count > 0).then(|| total_ns as f64 / count as f64 / 1e6)
}

fn disk_rates(
    id: &str,
    cur: &BlockStatsSnapshot,
    prev: Option<&BlockStatsSnapshot>,
    dt: f64,
) -> DiskRates {
    let p = prev.copied().unwrap_or_default();
    let per_s = |c: u64, p: u64| {
        if dt > 0.0 && prev.is_some() {
            c.saturating_sub(p) as f64 / dt
        } else {
            0.0
        }
    };
    let reads = cur.rd_operations.saturating_sub(p.rd_operations);
    let writes = cur.wr_operations.saturating_sub(p.wr_operations);
    DiskRates {
        id: id.to_string(),
        read_requests: per_s(cur.rd_operations, p.rd_operations),
        write_requests: per_s(cur.wr_operations, p.wr_operations),
        read_rate: per_s(cur.rd_bytes, p.rd_bytes) / 1024.0,
        write_rate: per_s(cur.wr_bytes, p.wr_bytes) / 1024.0,
        read_delay: delay(
            cur.rd_total_time_ns.saturating_sub(p.rd_total_time_ns),
            reads,
        ),
        write_delay: delay(
            cur.wr_total_time_ns.saturating_sub(p.wr_total_time_ns),
            writes,
        ),
        counters: qemu_stats(cur),
    }
}

/// vCPU time over wall time in percent of all vCPUs, from the vCPUs present (same thread) in
/// both samples.
fn cpu_usage(prev: &[(i32, Option<u64>)], cur: &[(i32, Option<u64>)], dt: f64) -> Option<f64> {
    let mut used = 0u64;
    let mut n = 0u32;
    for ((pt, pns), (ct, cns)) in prev.iter().zip(cur) {
        if let (true, Some(p), Some(c)) = (pt == ct && *ct > 0, pns, cns) {
            used += c.saturating_sub(*p);
            n += 1;
        }
    }
    (n > 0 && dt > 0.0).then(|| (used as f64 / 1e9 / dt / f64::from(n) * 100.0).min(100.0))
}

/// A thread's CPU time in nanoseconds: `schedstat`'s first field, or `stat`'s utime + stime.
fn thread_cpu_ns(tid: i32) -> Option<u64> {
    if tid <= 0 {
        return None;
    }
    let base = format!("/proc/self/task/{tid}");
    if let Ok(s) = std::fs::read_to_string(format!("{base}/schedstat")) {
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
            return Some(ns);
        }
    }
    let stat = std::fs::read_to_string(format!("{base}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks * 1_000_000_000 / hz as u64)
}

/// Bytes the guest received and sent on this NIC: our counters, or for vhost-net (whose
/// frames never pass through us) the tap's, read the other way round.
fn nic_bytes(n: &NicHandle) -> Option<(u64, u64)> {
    if n.vhost {
        let read = |f: &str| -> Option<u64> {
            std::fs::read_to_string(format!("/sys/class/net/{}/statistics/{f}", n.tap))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        return Some((read("tx_bytes")?, read("rx_bytes")?));
    }
    let c = n.shared.counters.snapshot();
    Some((c.rx_bytes, c.tx_bytes))
}

/// The counters under QEMU's names.
fn qemu_stats(s: &BlockStatsSnapshot) -> BlockDeviceStats {
    BlockDeviceStats {
        rd_bytes: s.rd_bytes,
        wr_bytes: s.wr_bytes,
        unmap_bytes: s.unmap_bytes,
        rd_operations: s.rd_operations,
        wr_operations: s.wr_operations,
        flush_operations: s.flush_operations,
        unmap_operations: s.unmap_operations,
        rd_total_time_ns: s.rd_total_time_ns,
        wr_total_time_ns: s.wr_total_time_ns,
        flush_total_time_ns: s.flush_total_time_ns,
        unmap_total_time_ns: s.unmap_total_time_ns,
        wr_highest_offset: s.wr_highest_offset,
        idle_time_ns: s.idle_time_ns,
        failed_rd_operations: s.failed_rd_operations,
        failed_wr_operations: s.failed_wr_operations,
        failed_flush_operations: s.failed_flush_operations,
        failed_unmap_operations: s.failed_unmap_operations,
        invalid_rd_operations: s.invalid_rd_operations,
        invalid_wr_operations: s.invalid_wr_operations,
        invalid_flush_operations: s.invalid_flush_operations,
        invalid_unmap_operations: s.invalid_unmap_operations,
        account_invalid: true,
        account_failed: true,
        ..Default::default()
    }
}

/// Memory figures from the balloon's statistics when the agent could not give them: total and
/// available memory, if the guest sent them within the last three polling intervals.
fn fill_from_balloon(m: &mut VmMetrics, balloon: Option<&BalloonShared>) {
    let Some(b) = balloon else {
        return;
    };
    if m.mem_usage.is_some() {
        return;
    }
    let stats = b.stats();
    let fresh = u64::from(b.stats_interval()).saturating_mul(3).max(10);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Tags 5 and 6: total and available memory, bytes.
    let (Some(total), Some(available)) = (stats.get(5), stats.get(6)) else {
        return;
    };
    if b.stats_interval() == 0 || now.saturating_sub(stats.last_update) > fresh || total == 0 {
        return;
    }
    let used = total.saturating_sub(available);
    m.mem_usage = Some(used as f64 / (1024.0 * 1024.0));
    m.mem_usage_rate = Some(used as f64 * 100.0 / total as f64);
    m.unavailable.remove("memUsage");
    m.unavailable.remove("memUsageRate");
}

/// What the guest agent told about the guest, each part with its own failure.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestFigures {
    /// MemTotal and MemAvailable, KiB.
    mem: Result<(u64, u64), String>,
    /// The 5-minute load average.
    load5: Result<f64, String>,
    /// Mounted disk filesystems.
    filesystems: Result<Vec<Partition>, String>,
}

fn fill_guest(m: &mut VmMetrics, figures: Result<GuestFigures, String>) {
    let g = match figures {
        Ok(g) => g,
        Err(why) => {
            for f in GUEST_FIGURES {
                m.unavailable(f, why.clone());
            }
            return;
        }
    };
    match g.mem {
        Ok((total, available)) if total > 0 => {
            let used = total.saturating_sub(available);
            m.mem_usage = Some(used as f64 / 1024.0);
            m.mem_usage_rate = Some(used as f64 * 100.0 / total as f64);
        }
        Ok(_) => {
            m.unavailable("memUsage", "the guest reported no memory");
            m.unavailable("memUsageRate", "the guest reported no memory");
        }
        Err(why) => {
            m.unavailable("memUsage", why.clone());
            m.unavailable("memUsageRate", why);
        }
    }
    match g.load5 {
        Ok(l) => m.loadavg_5 = Some(l),
        Err(why) => m.unavailable("loadavg_5", why),
    }
    match g.filesystems {
        Ok(parts) => {
            // A device mounted twice (bind mounts) counts once.
            let mut seen = std::collections::BTreeSet::new();
            m.disk_usage = Some(
                parts
                    .iter()
                    .filter(|p| seen.insert(p.device.clone()))
                    .map(|p| p.used_mb)
                    .sum(),
            );
            m.disk_partition = Some(parts);
        }
        Err(why) => {
            m.unavailable("diskUsage", why.clone());
            m.unavailable("diskPartition", why);
        }
    }
}

/// Asks qemu-ga for the guest's figures on a thread of its own, while someone reads them.
pub struct GuestPoller {
    inner: Arc<PollInner>,
    thread: Option<thread::JoinHandle<()>>,
}

struct PollInner {
    st: Mutex<PollState>,
    cv: Condvar,
    period: Duration,
    agent: AgentHandle,
}

#[derive(Default)]
struct PollState {
    stop: bool,
    /// A request is waiting for a fresh answer.
    want: bool,
    /// Poll every period until then (someone is reading the metrics).
    watched_until: Option<Instant>,
    /// Bumped at every answer.
    generation: u64,
    last: Option<(Instant, Result<GuestFigures, String>)>,
}

impl GuestPoller {
    fn start(agent: AgentHandle, period: Duration) -> std::io::Result<GuestPoller> {
        let inner = Arc::new(PollInner {
            st: Mutex::new(PollState::default()),
            cv: Condvar::new(),
            period,
            agent,
        });
        let i = inner.clone();
        let thread = thread::Builder::new()
            .name("guest-metrics".into())
            .spawn(move || i.run())?;
        Ok(GuestPoller {
            inner,
            thread: Some(thread),
        })
    }

    /// The last answer if it is fresh; otherwise asks for a new one and returns the
    /// generation to wait past.
    fn request(&self) -> Result<Result<GuestFigures, String>, u64> {
        use std::sync::atomic::Ordering;
        if !self.inner.agent.connected.load(Ordering::SeqCst) {
            return Ok(Err(NOT_CONNECTED.into()));
        }
        let mut st = crate::lock(&self.inner.st);
        let watch = (self.inner.period * 10).max(Duration::from_secs(60));
        st.watched_until = Some(Instant::now() + watch);
        if let Some((at, r)) = &st.last {
            if at.elapsed() <= self.inner.period + Duration::from_secs(1) {
                return Ok(r.clone());
            }
        }
        st.want = true;
        self.inner.cv.notify_all();
        Err(st.generation)
    }

    fn stop(mut self) {
        crate::lock(&self.inner.st).stop = true;
        self.inner.cv.notify_all();
        // The thread may be inside an agent command; it ends within that command's timeout,
        // or at once when the agent worker goes away with the VM.
        if let Some(t) = self.thread.take() {
            drop(t);
        }
    }
}

const NOT_CONNECTED: &str =
    "the guest agent is not connected (qemu-ga is not running in the guest)";

impl PollInner {
    fn run(&self) {
        let mut st = crate::lock(&self.st);
        loop {
            if st.stop {
                return;
            }
            let now = Instant::now();
            let watched = st.watched_until.is_some_and(|t| now < t);
            let age = st.last.as_ref().map(|(at, _)| now.duration_since(*at));
            let due = age.is_none_or(|a| a >= self.period);
            if st.want || (watched && due) {
                st.want = false;
                drop(st);
                let r = self.poll();
                st = crate::lock(&self.st);
                st.last = Some((Instant::now(), r));
                st.generation += 1;
                self.cv.notify_all();
                continue;
            }
            let wait = match (watched, age) {
                (true, Some(a)) => self.period.saturating_sub(a).max(Duration::from_millis(10)),
                _ => Duration::from_secs(3600),
            };
            st = self
                .cv
                .wait_timeout(st, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Waits up to `limit` for an answer newer than `generation`.
    fn wait(&self, generation: u64, limit: Duration) -> Result<GuestFigures, String> {
        let deadline = Instant::now() + limit;
        let mut st = crate::lock(&self.st);
        while st.generation == generation {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "the guest agent did not answer within {} ms",
                    limit.as_millis()
                ));
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        st.last
            .as_ref()
            .map_or_else(|| Err(NOT_CONNECTED.into()), |(_, r)| r.clone())
    }

    fn poll(&self) -> Result<GuestFigures, String> {
        use std::sync::atomic::Ordering;
        if !self.agent.connected.load(Ordering::SeqCst) {
            return Err(NOT_CONNECTED.into());
        }
        let w = &self.agent.worker;
        // The first command that fails for want of an agent ends the poll: the others would
        // only time out too.
        let meminfo = read_guest_file(w, "/proc/meminfo").map_err(|e| e.to_string())?;
        let mem = parse_meminfo(&meminfo);
        let load5 = read_guest_file(w, "/proc/loadavg")
            .map_err(|e| e.to_string())
            .and_then(|t| parse_loadavg(&t));
        let filesystems = w
            .call("guest-get-fsinfo", None, POLL_COMMAND_TIMEOUT)
            .map_err(|e| e.to_string())
            .and_then(|v| parse_fsinfo(&v));
        Ok(GuestFigures {
            mem,
            load5,
            filesystems,
        })
    }
}

/// A guest file's contents through guest-file-open/read/close (at most 64 KiB: /proc files).
fn read_guest_file(w: &AgentWorker, path: &str) -> Result<String, crate::agent::AgentError> {
    let t = POLL_COMMAND_TIMEOUT;
    let handle = w.call(
        "guest-file-open",
        Some(json!({"path": path, "mode": "r"})),
        t,
    )?;
    let read = w.call(
        "guest-file-read",
        Some(json!({"handle": handle, "count": 65536})),
        t,
    );
    let _ = w.call("guest-file-close", Some(json!({ "handle": handle })), t);
    let read = read?;
    let b64 = read.get("buf-b64").and_then(Value::as_str).unwrap_or("");
    Ok(String::from_utf8_lossy(&base64_decode(b64)).into_owned())
}

fn parse_meminfo(text: &str) -> Result<(u64, u64), String> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    match (field("MemTotal:"), field("MemAvailable:")) {
        (Some(t), Some(a)) => Ok((t, a)),
        _ => Err("the guest's /proc/meminfo has no MemTotal or MemAvailable".into()),
    }
}

fn parse_loadavg(text: &str) -> Result<f64, String> {
    text.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("the guest's /proc/loadavg is not understood: {text:?}"))
}

/// The filesystems with sizes from guest-get-fsinfo.
fn parse_fsinfo(v: &Value) -> Result<Vec<Partition>, String> {
    let list = v
        .as_array()
        .ok_or("guest-get-fsinfo did not answer a list")?;
    Ok(list
        .iter()
        .filter_map(|fs| {
            let used = fs.get("used-bytes")?.as_u64()?;
            let total = fs.get("total-bytes")?.as_u64()?;
            let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
            Some(Partition {
                mountpoint: fs.get("mountpoint")?.as_str()?.to_string(),
                device: fs.get("name")?.as_str()?.to_string(),
                fs_type: fs.get("type")?.as_str()?.to_string(),
                used_mb: mb(used),
                total_mb: mb(total),
                usage_percent: if total > 0 {
                    used as f64 * 100.0 / total as f64
                } else {
                    0.0
                },
            })
        })
        .collect())
}

/// Standard base64 (qemu-ga's `buf-b64`); bad characters are skipped.
fn base64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[cfg(test)]
mod tests;
