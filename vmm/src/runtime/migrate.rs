//! The event loop's side of saving the VM: a snapshot to a file (QMP `migrate "file:..."`),
//! and a live migration's start, progress, switchover, end and cancel (the rounds themselves
//! run on the worker of [`crate::migration::source`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use api::action::{MigrationInfo, MigrationStatus, RamStats};
use api::{ActionError, MigrationAddress, VmEvent, VmState};
use vmm_sys_util::eventfd::EventFd;

use super::{Control, PAUSE_TIMEOUT};
use crate::lock;
use crate::migration::dirty::PageBitmap;
use crate::migration::source::{Failure, Handover, Job, Outgoing, ToLoop};
use crate::snapshot::MachineState;
use crate::VmmError;
use virtio::dirty_log::VhostLog;

/// A live migration from this incarnation, and where its switchover stands.
pub(super) struct OutgoingState {
    /// Written by the worker with each message; watched by the event loop.
    pub(super) wake: Arc<EventFd>,
    running: Option<Outgoing>,
    /// The VM was stopped for the switchover at this time; whether it ran before.
    switched: Option<(Instant, bool)>,
    /// The disks were handed over to a destination (at a switchover) and not taken back.
    storage_handed_over: bool,
    /// vhost logs its writes to guest memory for the running migration.
    vhost_log: bool,
}

impl OutgoingState {
    pub(super) fn new() -> Result<OutgoingState, VmmError> {
        Ok(OutgoingState {
            wake: Arc::new(
                EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| VmmError::EventLoop(format!("cannot create an eventfd: {e}")))?,
            ),
            running: None,
            switched: None,
            storage_handed_over: false,
            vhost_log: false,
        })
    }
}

impl Control {
    /// QEMU's refusal of a second migration while one runs.
    pub(super) fn refuse_during_migration(&self) -> Result<(), ActionError> {
        match self.outgoing.running {
            Some(_) => Err(ActionError::Refused {
                action: "migrate",
                reason: "There's a migration process in progress".into(),
                kind: api::Refusal::NotNow,
            }),
            None => Ok(()),
        }
    }

    /// Stops the vCPUs (if running) and lets the devices finish their work and flush.
    pub(super) fn stop_and_flush(&mut self, was_running: bool) -> Result<(), String> {
        if was_running {
            if !self.vm.control.pause(&self.vm.threads, PAUSE_TIMEOUT) {
                return Err("the vCPUs did not stop in time".into());
            }
            self.bus.publish(VmEvent::Stop);
        }
        for (id, dev) in self.vm.registry.virtio() {
            lock(dev)
                .quiesce()
                .map_err(|e| format!("device `{id}`: cannot flush: {e}"))?;
        }
        Ok(())
    }

    /// Stops the vCPUs (if running), lets the devices finish and flush, and takes every state.
    pub(super) fn take_state(&mut self, was_running: bool) -> Result<MachineState, String> {
        self.stop_and_flush(was_running)?;
        let vcpus = self
            .vm
            .control
            .collect_states(self.msr_index.clone(), PAUSE_TIMEOUT)?;
        let vm = crate::snapshot::cpu::save_vm(self.vm.vm.fd()).map_err(|e| e.to_string())?;
        let devices = self.vm.registry.save();
        Ok(MachineState { vcpus, vm, devices })
    }

    /// Lets the vCPUs run again after a failed save or migration, if they ran before.
    pub(super) fn run_again(&mut self, was_running: bool) {
        if was_running && self.state.get() == VmState::Running {
            self.vm.control.resume();
            self.bus.publish(VmEvent::Resume);
        }
    }

    /// Saves the VM to `path` (QMP `migrate "file:..."`): stops the vCPUs, lets the devices
    /// finish their work and flush, takes every state, writes the file. The VM stays paused
    /// afterwards; on failure it runs again if it was running.
    pub(super) fn snapshot(&mut self, path: &Path, state: VmState) -> Result<(), String> {
        let started = Instant::now();
        let was_running = state == VmState::Running;
        self.migration.set(MigrationInfo {
            status: MigrationStatus::Setup,
            ..Default::default()
        });
        let result = self.write_snapshot(path, was_running, started);
        // Devices that stopped for the save (vhost-net's rings) run again, whatever happened;
        // the vCPUs stay as said above.
        for (_, dev) in self.vm.registry.virtio() {
            lock(dev).resume();
        }
        match result {
            Ok(info) => {
                self.migration.set(info);
                Ok(())
            }
            Err(reason) => {
                self.run_again(was_running);
                self.migration.set(MigrationInfo {
                    status: MigrationStatus::Failed,
                    error_desc: Some(reason.clone()),
                    ..Default::default()
                });
                Err(reason)
            }
        }
    }

    fn write_snapshot(
        &mut self,
        path: &Path,
        was_running: bool,
        started: Instant,
    ) -> Result<MigrationInfo, String> {
        let stopped = Instant::now();
        let setup = started.elapsed();
        self.migration.set(MigrationInfo {
            status: MigrationStatus::Active,
            setup_time_ms: Some(setup.as_millis() as u64),
            ..Default::default()
        });
        let machine = self.take_state(was_running)?;
        let write_started = Instant::now();
        let stats =
            crate::snapshot::save_to_file(path, &self.config, &machine, self.vm.vm.memory())
                .map_err(|e| e.to_string())?;
        let write_secs = write_started.elapsed().as_secs_f64().max(1e-6);
        let transferred = stats.data_pages * crate::snapshot::format::PAGE_SIZE;
        Ok(MigrationInfo {
            status: MigrationStatus::Completed,
            total_time_ms: Some(started.elapsed().as_millis() as u64),
            setup_time_ms: Some(setup.as_millis() as u64),
            downtime_ms: Some(stopped.elapsed().as_millis() as u64),
            expected_downtime_ms: None,
            ram: Some(RamStats {
                transferred,
                remaining: 0,
                total: stats.total,
                duplicate: stats.zero_pages,
                normal: stats.data_pages,
                normal_bytes: transferred,
                mbps: transferred as f64 * 8.0 / 1e6 / write_secs,
                pages_per_second: ((stats.data_pages + stats.zero_pages) as f64 / write_secs)
                    as u64,
                dirty_pages_rate: 0,
                dirty_sync_count: 1,
                downtime_bytes: transferred,
            }),
            error_desc: None,
        })
    }

    /// Starts a live migration to `to`; it goes on in the background.
    pub(super) fn start_migration(&mut self, to: &MigrationAddress) -> Result<(), String> {
        let extra_log = match self.vm.nics.iter().any(|n| n.vhost) {
            true => Some(self.start_vhost_log()?),
            false => None,
        };
        let config = serde_json::to_vec(&*self.config).map_err(|e| e.to_string())?;
        let job = Job {
            to: to.clone(),
            config,
            mem: self.vm.vm.memory().clone(),
            vm_fd: self.vm.vm.fd().clone(),
            params: self.migration.params(),
            wake: self.outgoing.wake.clone(),
            extra_log,
        };
        match Outgoing::start(job) {
            Ok(o) => {
                self.outgoing.running = Some(o);
                // As QEMU: once `migrate` answers, query-migrate no longer shows the last
                // migration's outcome.
                self.migration.set(MigrationInfo {
                    status: MigrationStatus::Setup,
                    ..Default::default()
                });
                Ok(())
            }
            Err(e) => {
                self.stop_vhost_log();
                Err(e)
            }
        }
    }

    /// Has vhost log what its kernel workers write to guest memory; returns the harvest.
    fn start_vhost_log(&mut self) -> Result<Box<dyn Fn() -> Vec<PageBitmap> + Send>, String> {
        let mem = self.vm.vm.memory().clone();
        let log = Arc::new(
            VhostLog::new(&mem).map_err(|e| format!("cannot map vhost's dirty log: {e}"))?,
        );
        self.outgoing.vhost_log = true;
        let failed = self.vm.registry.virtio().find_map(|(id, dev)| {
            lock(dev)
                .set_dirty_log(Some(log.clone()))
                .err()
                .map(|e| format!("device `{id}`: cannot start vhost's dirty log: {e}"))
        });
        if let Some(e) = failed {
            self.stop_vhost_log();
            return Err(e);
        }
        Ok(Box::new(move || log.harvest(&mem)))
    }

    /// Stops vhost's dirty log, if it runs.
    fn stop_vhost_log(&mut self) {
        if !std::mem::take(&mut self.outgoing.vhost_log) {
            return;
        }
        for (id, dev) in self.vm.registry.virtio() {
            if let Err(e) = lock(dev).set_dirty_log(None) {
                log::warn!("device `{id}`: cannot stop vhost's dirty log: {e}");
            }
        }
    }

    /// `migrate_cancel`: the worker stops and the VM goes on; nothing to do without one.
    pub(super) fn cancel_migration(&mut self) {
        if let Some(o) = &self.outgoing.running {
            self.migration.set(MigrationInfo {
                status: MigrationStatus::Cancelling,
                ..Default::default()
            });
            o.cancel();
        }
    }

    /// Handles what the worker reported.
    pub(super) fn on_migration_events(&mut self) {
        let _ = self.outgoing.wake.read();
        loop {
            let Some(msg) = self
                .outgoing
                .running
                .as_ref()
                .and_then(|o| o.rx.try_recv().ok())
            else {
                return;
            };
            match msg {
                ToLoop::Progress(info) => {
                    if self.migration.status() != MigrationStatus::Cancelling {
                        self.migration.set(info);
                    }
                }
                ToLoop::Pass(n) => self.migration.pass(n),
                ToLoop::Switchover => {
                    if let Err(e) = self.switchover() {
                        // The worker reports the failure (ToLoop::Finished).
                        if let Some(o) = &self.outgoing.running {
                            o.abort_switchover(e);
                        }
                    }
                }
                ToLoop::Finished(result) => self.end_migration(result),
            }
        }
    }

    /// Stops the VM, hands the disks over and gives the worker the serialised state; returns
    /// once the worker has read the last dirty pages (see [`Outgoing::send_state`]).
    fn switchover(&mut self) -> Result<(), String> {
        let was_running = self.state.get() == VmState::Running;
        let t0 = Instant::now();
        self.outgoing.switched = Some((t0, was_running));
        let machine = self.take_state(was_running)?;
        let taken = t0.elapsed();
        self.outgoing.storage_handed_over = true;
        for (id, dev) in self.vm.registry.virtio() {
            lock(dev)
                .hand_over_storage()
                .map_err(|e| format!("device `{id}`: cannot hand its storage over: {e}"))?;
        }
        let state = serde_json::to_vec(&machine).map_err(|e| e.to_string())?;
        log::info!(
            "migration: switchover: VM stopped and its state taken in {taken:?}, {} bytes \
             ready in {:?}",
            state.len(),
            t0.elapsed()
        );
        // Nothing has written guest memory since the VM stopped (the vCPUs and vhost are
        // stopped, and this loop ran no device): the worker's last harvest, made now, holds
        // every write the state depends on, and nothing may write until it has read them.
        let handover = Handover { state, stopped: t0 };
        match &self.outgoing.running {
            Some(o) => o.send_state(handover),
            None => Err("the migration ended".into()),
        }
    }

    /// Takes the disks back after a hand-over and lets the devices run again.
    pub(super) fn take_back_storage(&mut self) -> Result<(), String> {
        if !self.outgoing.storage_handed_over {
            return Ok(());
        }
        for (id, dev) in self.vm.registry.virtio() {
            lock(dev)
                .take_back_storage()
                .map_err(|e| format!("device `{id}`: cannot take its storage back: {e}"))?;
        }
        self.outgoing.storage_handed_over = false;
        for (_, dev) in self.vm.registry.virtio() {
            lock(dev).resume();
        }
        Ok(())
    }

    /// The worker ended: the VM stays stopped here (completed), or goes on as before.
    fn end_migration(&mut self, result: Result<MigrationInfo, Failure>) {
        if let Some(o) = self.outgoing.running.take() {
            o.join();
        }
        self.stop_vhost_log();
        let switched = self.outgoing.switched.take();
        match result {
            Ok(mut info) => {
                info.expected_downtime_ms = None;
                self.state.set(VmState::PostMigrate);
                self.migration.set(info);
            }
            Err(f) => {
                let mut reason = f.reason;
                if let Some((_, was_running)) = switched {
                    match self.take_back_storage() {
                        Ok(()) => {
                            // Devices the switchover quiesced (vhost-net's rings) run again,
                            // whether or not it got as far as handing the disks over.
                            for (_, dev) in self.vm.registry.virtio() {
                                lock(dev).resume();
                            }
                            self.run_again(was_running)
                        }
                        Err(e) => {
                            // Someone holds the disks now (the destination may run the VM):
                            // running here too could corrupt them.
                            reason = format!("{reason}; the VM stays stopped here: {e}");
                            if was_running && self.state.get() == VmState::Running {
                                self.state.set(VmState::Paused);
                            }
                        }
                    }
                }
                log::warn!("migration: {reason}");
                self.migration.set(MigrationInfo {
                    status: if f.cancelled {
                        MigrationStatus::Cancelled
                    } else {
                        MigrationStatus::Failed
                    },
                    error_desc: (!f.cancelled).then_some(reason),
                    ..Default::default()
                });
            }
        }
    }

    /// The incarnation ends (reset, shutdown) during a migration: the worker is stopped.
    pub(super) fn abandon_migration(&mut self) {
        if let Some(o) = self.outgoing.running.take() {
            o.cancel();
            // A worker waiting for the switchover's state must not wait for a VM that is gone.
            o.abort_switchover("the VM was reset or shut down".into());
            o.join();
            self.stop_vhost_log();
            self.migration.set(MigrationInfo {
                status: MigrationStatus::Failed,
                error_desc: Some("the VM was reset or shut down during the migration".into()),
                ..Default::default()
            });
        }
    }
}
