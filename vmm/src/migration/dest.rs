//! The destination of a live migration: a thread that waits for the source, creates the VM
//! (KVM VM, RAM, vCPUs) as soon as the stream says what it is, receives guest RAM straight
//! into it, then the machine state, and hands everything to the VMM thread, which finishes the
//! VM (state, devices) and answers the source through the [`Peer`].

use std::io::{BufReader, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use api::VmConfig;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::wire::{self, Item, StreamReader};
use super::{Conn, Listener};
use crate::kvm::Hypervisor;
use crate::snapshot::{self, MachineState};
use crate::vm::{GuestRam, Prebuilt};

/// The source, waiting to hear whether the VM runs here.
pub struct Peer(Conn);

impl Peer {
    /// Tells the source that the VM runs here: it may let go of it.
    pub fn confirm(mut self) -> std::io::Result<()> {
        wire::send_answer(&mut self.0, Ok(()))?;
        self.0.flush()
    }

    /// Tells the source that the VM could not be built here: it keeps running it.
    pub fn refuse(mut self, reason: &str) {
        let _ = wire::send_answer(&mut self.0, Err(reason));
    }
}

/// A VM that arrived whole.
pub struct Received {
    /// Its configuration.
    pub config: VmConfig,
    /// Its machine state.
    pub state: MachineState,
    /// The VM made for it, its RAM filled.
    pub prebuilt: Prebuilt,
    /// The source.
    pub peer: Peer,
    /// Bytes received.
    pub bytes: u64,
}

/// What the receiving thread reports.
pub enum FromReceiver {
    /// The source connected.
    Connected,
    /// The whole VM arrived, or why not.
    Done(Result<Box<Received>, String>),
}

/// A destination listening for, then receiving, a migration.
pub struct Incoming {
    thread: Option<JoinHandle<()>>,
    listener: Arc<Listener>,
    conn: Arc<Mutex<Option<Conn>>>,
    cancel: Arc<AtomicBool>,
    /// Written with each message.
    pub wake: Arc<EventFd>,
    /// What the thread reports.
    pub rx: Receiver<FromReceiver>,
}

impl Incoming {
    /// Starts receiving on `listener`.
    pub fn start(listener: Listener) -> Result<Incoming, String> {
        let listener = Arc::new(listener);
        let wake = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| format!("cannot create an eventfd: {e}"))?,
        );
        let conn = Arc::new(Mutex::new(None));
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel();
        let r = ReceiverThread {
            listener: listener.clone(),
            conn: conn.clone(),
            cancel: cancel.clone(),
            wake: wake.clone(),
            tx,
        };
        let thread = std::thread::Builder::new()
            .name("vmm-incoming".into())
            .spawn(move || r.run())
            .map_err(|e| format!("cannot start the migration thread: {e}"))?;
        Ok(Incoming {
            thread: Some(thread),
            listener,
            conn,
            cancel,
            wake,
            rx,
        })
    }

    /// The TCP port listened on.
    pub fn port(&self) -> Option<u16> {
        self.listener.port()
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.listener.shutdown();
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            c.shutdown();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct ReceiverThread {
    listener: Arc<Listener>,
    conn: Arc<Mutex<Option<Conn>>>,
    cancel: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    tx: Sender<FromReceiver>,
}

impl ReceiverThread {
    fn tell(&self, m: FromReceiver) {
        if self.tx.send(m).is_ok() {
            let _ = self.wake.write(1);
        }
    }

    fn run(self) {
        let conn = match self.listener.accept() {
            Ok(c) => c,
            Err(e) => {
                if !self.cancel.load(Ordering::SeqCst) {
                    self.tell(FromReceiver::Done(Err(format!(
                        "cannot accept the migration connection: {e}"
                    ))));
                }
                return;
            }
        };
        if let Ok(keep) = conn.try_clone() {
            *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(keep);
        }
        self.tell(FromReceiver::Connected);
        let result = receive(conn).map(Box::new);
        // The connection now belongs to the Peer: dropping `Incoming` must not shut it down.
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if !self.cancel.load(Ordering::SeqCst) {
            self.tell(FromReceiver::Done(result));
        }
    }
}

/// Receives a whole VM from `conn`. Everything is checked as a state file is; nothing the
/// source sends can make this allocate more than the VM's RAM plus one section.
fn receive(conn: Conn) -> Result<Received, String> {
    let started = Instant::now();
    let name = Path::new("<migration stream>");
    let mut answer_to = conn.try_clone().map_err(|e| e.to_string())?;
    let reader = BufReader::with_capacity(1 << 20, conn);
    let (mut reader, config_bytes, regions) =
        StreamReader::open(reader).map_err(|e| format!("the migration stream: {e}"))?;
    // The configuration comes first: it says how much RAM to prepare (checked before its
    // memory size is trusted to map any).
    let config = snapshot::decode_config(name, &config_bytes).map_err(|e| e.to_string())?;
    let layout = crate::snapshot::format::MemoryLayout {
        regions: regions.clone(),
        data_offset: 0,
        data_crc: 0,
    };
    snapshot::memory::check_layout(&layout, config.machine.memory_mib)
        .map_err(|e| format!("the migration stream: {e}"))?;
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|r| (GuestAddress(r.gpa), r.len as usize))
        .collect();
    let ram = GuestRam::take(&ranges).map_err(|e| format!("cannot map guest RAM: {e}"))?;
    // The VM and its vCPUs are made now, while the pages arrive, rather than in the downtime.
    let prebuilt = Hypervisor::open()
        .map_err(|e| e.to_string())
        .and_then(|hv| {
            Prebuilt::new(&hv, ram, config.machine.vcpus)
                .map_err(|e| format!("cannot create the VM: {e}"))
        });
    let prebuilt = match prebuilt {
        Ok(p) => p,
        Err(e) => {
            let _ = wire::send_answer(&mut { answer_to }, Err(&e));
            return Err(e);
        }
    };
    snapshot::warm_up_decoder(config.machine.vcpus);
    log::info!(
        "migration: the VM was created and the state decoder run once, {:?} after the \
         source connected",
        started.elapsed()
    );
    let result = (|| -> Result<MachineState, String> {
        let mem = prebuilt.vm.memory();
        let mut state_bytes = None;
        while let Some(item) = reader
            .next(mem)
            .map_err(|e| format!("the migration stream: {e}"))?
        {
            match item {
                Item::State(s) => state_bytes = Some(s),
                Item::Sync(n) => wire::send_sync(&mut answer_to, n)
                    .map_err(|e| format!("cannot answer the source: {e}"))?,
                Item::Pass(_) | Item::Pages { .. } => {}
            }
        }
        let state_bytes =
            state_bytes.ok_or_else(|| "the migration stream has no machine state".to_string())?;
        snapshot::decode_state(name, &config, &state_bytes).map_err(|e| e.to_string())
    })();
    match result {
        Ok(state) => {
            log::info!(
                "migration: received {} bytes in {:?}",
                reader.bytes,
                started.elapsed()
            );
            Ok(Received {
                config,
                state,
                prebuilt,
                peer: Peer(answer_to),
                bytes: reader.bytes,
            })
        }
        Err(e) => {
            // Dropping the VM gives its RAM back to the pool.
            drop(prebuilt);
            let _ = wire::send_answer(&mut { answer_to }, Err(&e));
            Err(e)
        }
    }
}
