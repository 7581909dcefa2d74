//! Shared test scaffolding: a fake VMM thread (drains the controller inbox, keeps a `VmState`,
//! answers, publishes events on an `EventBus` the way the real VMM does; a snapshot writes a
//! small marker file and a restore reads it back; whole-VM snapshots live in a list per fake
//! disk, with QEMU's errors) and small QMP and HTTP clients over real sockets.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::controller::{action_channel, ControllerHandle, EventBus, EventReceiver};
use api::{
    ActionError, DiskSnapshots, MigrationCapability, MigrationCapabilityState, MigrationInfo,
    MigrationParameters, MigrationStatus, RamStats, ShutdownCause, VcpuInfo, VersionInfo, VmConfig,
    VmEvent, VmInfo, VmSnapshotInfo, VmSnapshotRequest, VmState, VmmAction, VmmResponse,
};
use serde_json::Value;

/// How long a test waits for any single answer.
pub const WAIT: Duration = Duration::from_secs(5);

/// A fresh directory for this test's sockets.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("api-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// What the fake VMM writes as a "state file".
pub const FAKE_STATE: &[u8] = b"FAKE-VMM-STATE v1\n";

/// The fake's migration side: capabilities, parameters and the last migration.
#[derive(Default)]
struct Migration {
    events: bool,
    params: MigrationParameters,
    info: MigrationInfo,
}

impl Migration {
    /// Publishes MIGRATION events (when the capability is on) and records the outcome.
    fn run(&mut self, bus: &EventBus, result: Result<(), String>, with_stats: bool) {
        let publish = |s| {
            if self.events {
                bus.publish(VmEvent::Migration(s));
            }
        };
        publish(MigrationStatus::Setup);
        publish(MigrationStatus::Active);
        self.info = match result {
            Ok(()) => MigrationInfo {
                status: MigrationStatus::Completed,
                total_time_ms: with_stats.then_some(12),
                setup_time_ms: with_stats.then_some(1),
                downtime_ms: with_stats.then_some(11),
                ram: with_stats.then(|| RamStats {
                    transferred: FAKE_STATE.len() as u64,
                    remaining: 0,
                    total: 256 << 20,
                    duplicate: 65_536,
                    normal: 0,
                    normal_bytes: 0,
                    mbps: 1.25,
                    pages_per_second: 0,
                    dirty_pages_rate: 0,
                    dirty_sync_count: 1,
                    downtime_bytes: FAKE_STATE.len() as u64,
                }),
                ..MigrationInfo::default()
            },
            Err(e) => MigrationInfo {
                status: MigrationStatus::Failed,
                error_desc: Some(e),
                ..MigrationInfo::default()
            },
        };
        publish(self.info.status);
    }

    fn publish(&self, bus: &EventBus, status: MigrationStatus) {
        if self.events {
            bus.publish(VmEvent::Migration(status));
        }
    }
}

/// A stand-in for the VMM thread.
pub struct FakeVmm {
    pub bus: EventBus,
    pub state: Arc<Mutex<VmState>>,
    /// Every action received, in order.
    pub seen: Arc<Mutex<Vec<VmmAction>>>,
    /// Replies are held this long (to test clients that leave mid-command).
    pub delay: Arc<Mutex<Duration>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeVmm {
    /// Starts the fake VMM with a running VM; returns it and the handle the doors submit to.
    pub fn start() -> (FakeVmm, ControllerHandle) {
        FakeVmm::start_in(VmState::Running)
    }

    /// Starts the fake VMM in `state` (`Incoming`: waiting for a restore).
    pub fn start_in(initial: VmState) -> (FakeVmm, ControllerHandle) {
        let (handle, inbox) = action_channel().unwrap();
        let bus = EventBus::new();
        let state = Arc::new(Mutex::new(initial));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, st, sn, dl, sp) = (
            bus.clone(),
            state.clone(),
            seen.clone(),
            delay.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut mig = Migration::default();
            let mut disks = fake_disks();
            while !sp.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: inbox.waker().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 20) };
                for req in inbox.drain() {
                    sn.lock().unwrap().push(req.action.clone());
                    let d = *dl.lock().unwrap();
                    if !d.is_zero() {
                        std::thread::sleep(d);
                    }
                    let mut s = st.lock().unwrap();
                    let reply = match s.check(&req.action) {
                        Err(e) => Err(e),
                        Ok(next) => match migrate(&mut mig, &b, *s, &req.action)
                            .or_else(|| savevm(&mut disks, &b, *s, &req.action))
                        {
                            Some(Err(reason)) => Err(ActionError::Failed {
                                action: req.action.name(),
                                reason,
                            }),
                            Some(Ok(resp)) => {
                                *s = next;
                                Ok(resp)
                            }
                            None => {
                                *s = next;
                                // Like QEMU: the event goes out before the command's return.
                                match req.action {
                                    VmmAction::Pause => b.publish(VmEvent::Stop),
                                    VmmAction::Resume => b.publish(VmEvent::Resume),
                                    VmmAction::PowerButton => b.publish(VmEvent::Powerdown),
                                    VmmAction::Reset => {
                                        b.publish(VmEvent::Reset(ShutdownCause::HostQmpSystemReset))
                                    }
                                    _ => {}
                                }
                                Ok(match req.action {
                                    VmmAction::GetVmInfo => VmmResponse::VmInfo(Box::new(VmInfo {
                                        state: *s,
                                        nics: Vec::new(),
                                        agent: None,
                                        config: VmConfig::default(),
                                        vcpus: vec![
                                            VcpuInfo {
                                                index: 0,
                                                thread_id: Some(4242),
                                            },
                                            VcpuInfo {
                                                index: 1,
                                                thread_id: Some(4243),
                                            },
                                        ],
                                    })),
                                    VmmAction::GetVersion => {
                                        VmmResponse::Version(VersionInfo::current())
                                    }
                                    _ => VmmResponse::Done,
                                })
                            }
                        },
                    };
                    drop(s);
                    (req.reply)(reply);
                }
            }
        });
        (
            FakeVmm {
                bus,
                state,
                seen,
                delay,
                stop,
                thread: Some(thread),
            },
            handle,
        )
    }

    /// A new event subscriber (for a QMP server).
    pub fn events(&self) -> EventReceiver {
        self.bus.subscribe().unwrap()
    }

    pub fn state(&self) -> VmState {
        *self.state.lock().unwrap()
    }
}

/// The migration actions, as the real VMM carries them out (`None` for the others). Called after
/// the state check; the state changes only if this succeeds.
fn migrate(
    mig: &mut Migration,
    bus: &EventBus,
    state: VmState,
    action: &VmmAction,
) -> Option<Result<VmmResponse, String>> {
    Some(match action {
        VmmAction::Snapshot { path } => {
            if state == VmState::Running {
                bus.publish(VmEvent::Stop);
            }
            let written = std::fs::write(path, FAKE_STATE)
                .map_err(|e| format!("cannot write {}: {e}", path.display()));
            mig.run(bus, written.clone(), true);
            if written.is_err() && state == VmState::Running {
                // The VM goes on as before.
                bus.publish(VmEvent::Resume);
            }
            written.map(|()| VmmResponse::Done)
        }
        VmmAction::Restore { path } => {
            let read = match std::fs::read(path) {
                Ok(data) if data == FAKE_STATE => Ok(()),
                Ok(_) => Err(format!("{}: not a VM state file", path.display())),
                Err(e) => Err(format!("cannot read {}: {e}", path.display())),
            };
            mig.run(bus, read.clone(), false);
            if read.is_ok() {
                bus.publish(VmEvent::Resume);
            }
            read.map(|()| VmmResponse::Done)
        }
        VmmAction::QueryMigrate => Ok(VmmResponse::Migration(Box::new(mig.info.clone()))),
        VmmAction::SetMigrationCapabilities(caps) => {
            for c in caps {
                match c.capability {
                    MigrationCapability::Events => mig.events = c.state,
                }
            }
            Ok(VmmResponse::Done)
        }
        // A live migration starts and stays active (nobody listens) until it is cancelled.
        VmmAction::Migrate { .. } => {
            if mig.info.status == MigrationStatus::Active {
                return Some(Err("There's a migration process in progress".into()));
            }
            mig.publish(bus, MigrationStatus::Setup);
            mig.publish(bus, MigrationStatus::Active);
            mig.info = MigrationInfo {
                status: MigrationStatus::Active,
                total_time_ms: Some(5),
                setup_time_ms: Some(1),
                expected_downtime_ms: Some(mig.params.downtime_limit_ms / 2),
                ram: Some(RamStats {
                    transferred: 4096,
                    remaining: 256 << 20,
                    total: 256 << 20,
                    dirty_sync_count: 1,
                    ..RamStats::default()
                }),
                ..MigrationInfo::default()
            };
            Ok(VmmResponse::Done)
        }
        VmmAction::MigrateCancel => {
            if mig.info.status == MigrationStatus::Active {
                mig.publish(bus, MigrationStatus::Cancelling);
                mig.publish(bus, MigrationStatus::Cancelled);
                mig.info.status = MigrationStatus::Cancelled;
                mig.info.expected_downtime_ms = None;
            }
            Ok(VmmResponse::Done)
        }
        VmmAction::SetMigrationParameters(update) => {
            update.apply(&mut mig.params);
            Ok(VmmResponse::Done)
        }
        VmmAction::GetMigrationParameters => Ok(VmmResponse::MigrationParameters(mig.params)),
        VmmAction::GetMigrationCapabilities => Ok(VmmResponse::MigrationCapabilities(vec![
            MigrationCapabilityState {
                capability: MigrationCapability::Events,
                state: mig.events,
            },
        ])),
        _ => return None,
    })
}

/// The fake's disks that can hold snapshots: two qcow2 disks, `disk0` keeping the VM state.
pub const FAKE_DISKS: [&str; 2] = ["disk0", "disk1"];

/// The VM state size the fake records for a snapshot.
pub const FAKE_VM_STATE_SIZE: u64 = 64 << 20;

fn fake_disks() -> Vec<DiskSnapshots> {
    FAKE_DISKS
        .iter()
        .map(|d| DiskSnapshots {
            disk: d.to_string(),
            snapshots: Vec::new(),
        })
        .collect()
}

/// The whole-VM snapshot actions, as the real VMM carries them out, in QEMU's order of checks
/// and with its texts (`None` for the others). The VM stops (STOP) and goes on (RESUME) around
/// the work of `savevm` and `loadvm`, as under QEMU.
fn savevm(
    disks: &mut [DiskSnapshots],
    bus: &EventBus,
    state: VmState,
    action: &VmmAction,
) -> Option<Result<VmmResponse, String>> {
    let chosen = |req: &VmSnapshotRequest| -> Result<Vec<usize>, String> {
        match &req.devices {
            None => Ok((0..FAKE_DISKS.len()).collect()),
            Some(list) if list.is_empty() => {
                Err("At least one device is required for snapshot".into())
            }
            Some(list) => list
                .iter()
                .map(|d| {
                    FAKE_DISKS
                        .iter()
                        .position(|f| f == d)
                        .ok_or_else(|| format!("No block device node '{d}'"))
                })
                .collect(),
        }
    };
    let vmstate = |req: &VmSnapshotRequest, chosen: &[usize]| -> Result<usize, String> {
        match &req.vmstate {
            None => Ok(chosen[0]),
            Some(v) => chosen
                .iter()
                .copied()
                .find(|i| FAKE_DISKS[*i] == v.as_str())
                .ok_or_else(|| format!("vmstate block device '{v}' does not exist")),
        }
    };
    let has = |d: &DiskSnapshots, tag: &str| d.snapshots.iter().any(|s| s.tag == tag);
    let stop_go = |work: &mut dyn FnMut()| {
        if state == VmState::Running {
            bus.publish(VmEvent::Stop);
        }
        work();
        if state == VmState::Running {
            bus.publish(VmEvent::Resume);
        }
    };
    Some(match action {
        VmmAction::SaveVm(req) => (|| {
            let which = chosen(req)?;
            let exists = which.iter().any(|i| has(&disks[*i], &req.tag));
            if exists && !req.overwrite {
                return Err(format!(
                    "Snapshot '{}' already exists in one or more devices",
                    req.tag
                ));
            }
            let vm = vmstate(req, &which)?;
            stop_go(&mut || {
                for i in &which {
                    let d = &mut disks[*i];
                    d.snapshots.retain(|s| s.tag != req.tag);
                    let id = d
                        .snapshots
                        .iter()
                        .filter_map(|s| s.id.parse::<u64>().ok())
                        .max()
                        .unwrap_or(0)
                        + 1;
                    d.snapshots.push(VmSnapshotInfo {
                        id: id.to_string(),
                        tag: req.tag.clone(),
                        vm_state_size: if *i == vm { FAKE_VM_STATE_SIZE } else { 0 },
                        date_sec: 1_700_000_000,
                        date_nsec: 0,
                        vm_clock_nsec: 1_500_000_000,
                    });
                }
            });
            Ok(VmmResponse::Done)
        })(),
        VmmAction::LoadVm(req) => (|| {
            let which = chosen(req)?;
            if !which.iter().all(|i| has(&disks[*i], &req.tag)) {
                return Err(format!(
                    "Snapshot '{}' does not exist in one or more devices",
                    req.tag
                ));
            }
            let vm = vmstate(req, &which)?;
            let size = disks[vm]
                .snapshots
                .iter()
                .find(|s| s.tag == req.tag)
                .map_or(0, |s| s.vm_state_size);
            if size == 0 {
                return Err(
                    "This is a disk-only snapshot. Revert to it  offline using qemu-img".into(),
                );
            }
            stop_go(&mut || {});
            Ok(VmmResponse::Done)
        })(),
        VmmAction::DelVm(req) => chosen(req).map(|which| {
            for i in which {
                disks[i].snapshots.retain(|s| s.tag != req.tag);
            }
            VmmResponse::Done
        }),
        VmmAction::ListVmSnapshots => Ok(VmmResponse::VmSnapshots(disks.to_vec())),
        _ => return None,
    })
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A QMP client over a real socket.
pub struct Qmp {
    reader: BufReader<Box<dyn Read + Send>>,
    writer: Box<dyn Write + Send>,
    /// Events received while waiting for answers.
    pub events: Vec<Value>,
}

impl Qmp {
    pub fn unix(path: &Path) -> Qmp {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let r = s.try_clone().unwrap();
        Qmp::new(Box::new(r), Box::new(s))
    }

    pub fn tcp(addr: SocketAddr) -> Qmp {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let r = s.try_clone().unwrap();
        Qmp::new(Box::new(r), Box::new(s))
    }

    fn new(r: Box<dyn Read + Send>, w: Box<dyn Write + Send>) -> Qmp {
        Qmp {
            reader: BufReader::new(r),
            writer: w,
            events: Vec::new(),
        }
    }

    /// Connects and checks the greeting; negotiates if asked.
    pub fn greeted(mut self, negotiate: bool) -> Qmp {
        let g = self.recv().expect("greeting");
        assert_eq!(g["QMP"]["capabilities"], serde_json::json!([]));
        if negotiate {
            let r = self.cmd(&serde_json::json!({"execute": "qmp_capabilities"}));
            assert_eq!(r, serde_json::json!({"return": {}}));
        }
        self
    }

    /// One line (must end in CRLF), parsed; `None` at EOF.
    pub fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => {
                assert!(line.ends_with("\r\n"), "not CRLF-terminated: {line:?}");
                assert!(line.is_ascii(), "not ASCII: {line:?}");
                Some(serde_json::from_str(&line).unwrap())
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read failed: {e}"),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()
    }

    /// The next non-event message (events are kept in `events`).
    pub fn answer(&mut self) -> Value {
        loop {
            let v = self.recv().expect("answer before EOF");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    pub fn cmd(&mut self, req: &Value) -> Value {
        self.send_raw(serde_json::to_string(req).unwrap().as_bytes())
            .unwrap();
        self.answer()
    }

    /// Waits for the event `name` (already received or next).
    pub fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let v = self.recv().unwrap_or_else(|| panic!("EOF before {name}"));
            if v["event"] == name {
                return v;
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// True if the server closes the connection (EOF or reset) within `WAIT`, skipping output.
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
        false
    }
}

/// An HTTP response as the tests see it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// An HTTP/1.1 client on the API socket, parsing responses with httparse.
pub struct Http {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

impl Http {
    pub fn connect(path: &Path) -> Http {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Http {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn request(&mut self, method: &str, path: &str) -> HttpResponse {
        let raw = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        self.send_raw(raw.as_bytes()).unwrap();
        self.response().expect("a response")
    }

    /// A request with a JSON body.
    pub fn request_body(&mut self, method: &str, path: &str, body: &str) -> HttpResponse {
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.send_raw(raw.as_bytes()).unwrap();
        self.response().expect("a response")
    }

    /// The next response, or `None` at EOF.
    pub fn response(&mut self) -> Option<HttpResponse> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = resp.parse(&self.buf) {
                let status = resp.code.unwrap();
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).to_string(),
                        )
                    })
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.parse().unwrap())
                    .unwrap_or(0);
                if self.buf.len() >= n + len {
                    let body = self.buf[n..n + len].to_vec();
                    self.buf.drain(..n + len);
                    return Some(HttpResponse {
                        status,
                        headers,
                        body,
                    });
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// True if the server closes the connection within `WAIT`.
    pub fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}
