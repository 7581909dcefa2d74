//! QMP request dispatch, as QEMU's `qmp_dispatch` does it: request shape checks, capabilities
//! negotiation, the command table with argument validation (QEMU's error texts; in [`table`]),
//! each command, and the VM events as QMP events.
//!
//! [`Monitor`] is the protocol state of one client, free of I/O: a request either gets an
//! answer at once or needs a [`VmmAction`], whose reply completes it.

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::balloon;
use super::events::event_json;
use super::hmp::{self, HmpCommand};
use super::jobs::{self, Jobs};
use super::migration::{self, params};
use crate::action::{ActionError, VersionInfo, VmInfo, VmState, VmmAction};
use crate::controller::{Reply, TimedEvent};
use crate::VmmResponse;

mod table;

pub use table::command_names;
use table::{validate, COMMANDS};

/// QEMU's error classes (`QapiErrorClass`). Only the first two are produced by our commands;
/// the others are part of the protocol's vocabulary for later commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    /// Every error that has no more specific class.
    GenericError,
    /// The command does not exist (or not in this mode).
    CommandNotFound,
    /// A device has no driver loaded.
    DeviceNotActive,
    /// The requested device was not found.
    DeviceNotFound,
    /// The KVM capability the command needs is missing.
    KVMMissingCap,
}

/// A command that failed, as QMP reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct CommandError {
    /// The error class.
    pub class: ErrorClass,
    /// The human-readable text.
    pub desc: String,
}

impl CommandError {
    pub(crate) fn generic(desc: impl Into<String>) -> CommandError {
        CommandError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    fn not_found(desc: impl Into<String>) -> CommandError {
        CommandError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

impl From<ActionError> for CommandError {
    fn from(e: ActionError) -> CommandError {
        match e {
            ActionError::NoBalloon => CommandError {
                class: ErrorClass::DeviceNotActive,
                desc: e.to_string(),
            },
            e => CommandError::generic(e.to_string()),
        }
    }
}

/// `query-blockstats`'s answer: QEMU's `BlockStats` per disk, the device named by its id and
/// its qdev path as `-device ...,id=ID` would give it.
pub(crate) fn blockstats_json(disks: &[crate::metrics::DiskStats]) -> Value {
    Value::Array(
        disks
            .iter()
            .map(|d| {
                json!({
                    "device": d.id,
                    "qdev": format!("/machine/peripheral/{}/virtio-backend", d.id),
                    "stats": d.stats,
                })
            })
            .collect(),
    )
}

/// QEMU's `RunState` name for our state.
pub(crate) fn run_state(state: VmState) -> &'static str {
    match state {
        VmState::Created => "prelaunch",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::ShuttingDown => "shutdown",
        VmState::Incoming => "inmigrate",
        VmState::PostMigrate => "postmigrate",
    }
}

/// QEMU's `stop` on a stopped VM (paused, or paused by a migration) and `cont` on a running
/// one succeed without doing anything; our state machine refuses them, so the monitor turns that
/// refusal back into success.
pub(crate) fn is_noop(action: &VmmAction, e: &ActionError) -> bool {
    matches!(
        (action, e),
        (
            VmmAction::Pause,
            ActionError::InvalidState {
                state: VmState::Paused | VmState::PostMigrate,
                ..
            }
        ) | (
            VmmAction::Resume,
            ActionError::InvalidState {
                state: VmState::Running,
                ..
            }
        )
    )
}

/// `query-version`'s answer (also the greeting's `version`).
pub(crate) fn version_json() -> Value {
    let v = VersionInfo::current();
    json!({"qemu": {"major": v.major, "minor": v.minor, "micro": v.micro}, "package": ""})
}

/// The greeting sent on connect.
pub(crate) fn greeting() -> Value {
    json!({"QMP": {"version": version_json(), "capabilities": []}})
}

fn response(id: Option<Value>, result: Result<Value, CommandError>) -> Value {
    let mut m = Map::new();
    match result {
        Ok(v) => m.insert("return".into(), v),
        Err(e) => m.insert("error".into(), json!({"class": e.class, "desc": e.desc})),
    };
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// An error reply for input that never became a request (no `id`).
pub(crate) fn parse_error(desc: String) -> Value {
    response(None, Err(CommandError::generic(desc)))
}

/// What the door must do next for a request.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    /// Send this response.
    Answer(Value),
    /// Run this action; its reply goes to [`Monitor::reply`].
    Submit(VmmAction),
    /// Send `events` to this client and every other one (this client gets them before
    /// `answer`, as QEMU emits a command's events before its return), then `answer`. With a
    /// `job`, run its action for nobody in particular: the reply concludes the job
    /// ([`jobs::snapshot::conclude`]), even if this client has gone by then.
    Announce {
        /// JOB_STATUS_CHANGE events.
        events: Vec<Value>,
        /// The command's response.
        answer: Value,
        /// The job's id and the action doing its work.
        job: Option<(String, VmmAction)>,
    },
}

/// How the monitor goes on with a command (see [`Step`]).
enum Dispatch {
    Answer(Value),
    Submit(VmmAction, Then),
    Announce {
        events: Vec<Value>,
        answer: Value,
        job: Option<(String, VmmAction)>,
    },
}

/// How a submitted action's reply completes the request.
#[derive(Debug)]
enum Then {
    Status,
    CpusFast,
    Action(VmmAction),
    QueryMigrate,
    MigrateCapabilities,
    MigrateParameters,
    BlockStats,
    Balloon(balloon::BalloonThen),
    /// `migrate-incoming` with bad arguments: QEMU checks the run state first, so the VM's
    /// state decides between its refusal and this error.
    IncomingRefused(CommandError),
    Hmp {
        cmd: HmpCommand,
        cpu: i64,
    },
    HmpCheckCpu {
        cmd: HmpCommand,
        cpu: i64,
    },
}

/// One client's QMP state.
#[derive(Debug, Default)]
pub(crate) struct Monitor {
    negotiated: bool,
    pending: Option<(Option<Value>, Then)>,
    /// A restore went through already (QEMU allows one `migrate-incoming`).
    restore_started: bool,
    /// The server's job list, shared with its other clients.
    jobs: Jobs,
}

impl Monitor {
    /// A monitor for a client of the server whose job list is `jobs`.
    pub(crate) fn with_jobs(jobs: Jobs) -> Monitor {
        Monitor {
            jobs,
            ..Monitor::default()
        }
    }

    /// The job list (for concluding a job when its action's reply arrives).
    pub(crate) fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    /// Tells the monitor whether a restore went through already (the door knows, through the
    /// controller); used to word a refused `migrate-incoming` as QEMU does.
    pub(crate) fn set_restore_started(&mut self, started: bool) {
        self.restore_started = started;
    }

    /// Whether a request waits for the VMM.
    pub(crate) fn busy(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether events are delivered (after `qmp_capabilities`).
    pub(crate) fn gets_events(&self) -> bool {
        self.negotiated
    }

    /// Handles one input value.
    pub(crate) fn request(&mut self, req: Value) -> Step {
        let Value::Object(obj) = req else {
            return Step::Answer(parse_error("QMP input must be a JSON object".into()));
        };
        let id = obj.get("id").cloned();
        match self.dispatch(&obj) {
            Ok(Dispatch::Answer(v)) => Step::Answer(response(id, Ok(v))),
            Ok(Dispatch::Submit(action, then)) => {
                self.pending = Some((id, then));
                Step::Submit(action)
            }
            Ok(Dispatch::Announce {
                events,
                answer,
                job,
            }) => Step::Announce {
                events,
                answer: response(id, Ok(answer)),
                job,
            },
            Err(mut e) => {
                if !self.negotiated && e.class == ErrorClass::CommandNotFound {
                    e.desc = "Expecting capabilities negotiation with 'qmp_capabilities'".into();
                }
                Step::Answer(response(id, Err(e)))
            }
        }
    }

    /// Completes the pending request with the VMM's reply.
    pub(crate) fn reply(&mut self, reply: Reply) -> Step {
        let Some((id, then)) = self.pending.take() else {
            // Nothing asked: cannot happen, and nothing to say.
            return Step::Answer(Value::Null);
        };
        let result = match then {
            Then::Status => vm_info(reply).map(|vm| {
                json!({
                    "running": vm.state == VmState::Running,
                    "singlestep": false,
                    "status": run_state(vm.state),
                })
            }),
            Then::CpusFast => vm_info(reply).map(|vm| cpus_fast(&vm)),
            Then::Action(action) => match reply {
                Ok(_) => Ok(json!({})),
                Err(e) if is_noop(&action, &e) => Ok(json!({})),
                Err(e @ ActionError::NoBalloon) => Err(e.into()),
                Err(e @ ActionError::DeviceNotFound(_)) => Err(CommandError {
                    class: ErrorClass::DeviceNotFound,
                    desc: e.to_string(),
                }),
                Err(e) => Err(CommandError::generic(migration::action_error_text(
                    &action,
                    &e,
                    self.restore_started,
                ))),
            },
            Then::QueryMigrate => match reply {
                Ok(VmmResponse::Migration(info)) => Ok(migration::migration_json(&info)),
                other => Err(unexpected(other)),
            },
            Then::Balloon(then) => balloon::reply(then, reply),
            Then::BlockStats => match reply {
                Ok(VmmResponse::BlockStats(disks)) => Ok(blockstats_json(&disks)),
                other => Err(unexpected(other)),
            },
            Then::MigrateCapabilities => match reply {
                Ok(VmmResponse::MigrationCapabilities(caps)) => {
                    Ok(migration::capabilities_json(&caps))
                }
                other => Err(unexpected(other)),
            },
            Then::MigrateParameters => match reply {
                Ok(VmmResponse::MigrationParameters(p)) => Ok(params::query_json(&p)),
                other => Err(unexpected(other)),
            },
            Then::IncomingRefused(err) => vm_info(reply).and_then(|vm| {
                Err(if vm.state == VmState::Incoming {
                    err
                } else {
                    CommandError::generic(migration::incoming_refusal(self.restore_started))
                })
            }),
            Then::Hmp { cmd, cpu } => match cmd {
                HmpCommand::Info(kind) => hmp::info_reply(kind, reply, cpu).map(Value::String),
                HmpCommand::Action(a) => Ok(Value::String(hmp::action_text(
                    &a,
                    reply.map(|_| ()),
                    self.restore_started,
                ))),
                HmpCommand::ActionThen(a, done) => Ok(Value::String(hmp::action_then_text(
                    &a,
                    reply.map(|_| ()),
                    self.restore_started,
                    done,
                ))),
                HmpCommand::Text(t) => Ok(Value::String(t)),
            },
            Then::HmpCheckCpu { cmd, cpu } => match vm_info(reply) {
                Err(e) => Err(e),
                Ok(vm) if cpu < 0 || cpu >= vm.vcpus.len() as i64 => Err(CommandError::generic(
                    "Parameter 'cpu-index' expects a CPU number",
                )),
                Ok(vm) => match cmd {
                    HmpCommand::Info(kind) if kind.action() == VmmAction::GetVmInfo => {
                        Ok(Value::String(hmp::info_text(kind, &vm, cpu)))
                    }
                    HmpCommand::Text(t) => Ok(Value::String(t)),
                    HmpCommand::Info(_) | HmpCommand::Action(_) | HmpCommand::ActionThen(..) => {
                        let action = hmp_action(&cmd);
                        self.pending = Some((id, Then::Hmp { cmd, cpu }));
                        return Step::Submit(action);
                    }
                },
            },
        };
        Step::Answer(response(id, result))
    }

    /// The QMP event for `ev`, if this client gets events.
    pub(crate) fn event(&self, ev: &TimedEvent) -> Option<Value> {
        self.negotiated.then(|| event_json(ev))
    }

    /// How the request goes on, or a command error.
    fn dispatch(&mut self, obj: &Map<String, Value>) -> Result<Dispatch, CommandError> {
        let mut command = None;
        let mut args = None;
        for (key, value) in obj {
            match key.as_str() {
                "execute" => match value {
                    Value::String(s) => command = Some(s.as_str()),
                    _ => {
                        return Err(CommandError::generic(
                            "QMP input member 'execute' must be a string",
                        ))
                    }
                },
                "arguments" => match value {
                    Value::Object(m) => args = Some(m),
                    _ => {
                        return Err(CommandError::generic(
                            "QMP input member 'arguments' must be an object",
                        ))
                    }
                },
                "id" => {}
                // `exec-oob` included: out-of-band execution is not offered, so never enabled.
                other => {
                    return Err(CommandError::generic(format!(
                        "QMP input member '{other}' is unexpected"
                    )))
                }
            }
        }
        let Some(command) = command else {
            return Err(CommandError::generic("QMP input lacks member 'execute'"));
        };
        let Some((_, schema)) = COMMANDS.iter().find(|(n, _)| *n == command) else {
            return Err(CommandError::not_found(format!(
                "The command {command} has not been found"
            )));
        };
        if !self.negotiated && command != "qmp_capabilities" {
            return Err(CommandError::not_found(""));
        }
        let empty = Map::new();
        let args = args.unwrap_or(&empty);
        validate(schema, args)?;
        if let Some((kind, id, action)) = jobs::snapshot::job(command, args) {
            let events = self.jobs.start(&id, kind)?;
            return Ok(Dispatch::Announce {
                events,
                answer: json!({}),
                job: Some((id, action)),
            });
        }
        match command {
            "query-jobs" => return Ok(Dispatch::Answer(self.jobs.query())),
            "job-dismiss" => {
                let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
                return Ok(Dispatch::Announce {
                    events: self.jobs.dismiss(id)?,
                    answer: json!({}),
                    job: None,
                });
            }
            _ => {}
        }
        Ok(match self.command(command, args)? {
            Ok(v) => Dispatch::Answer(v),
            Err((action, then)) => Dispatch::Submit(action, then),
        })
    }

    /// The commands answered at once or with one action: `Ok(answer)` or `Err(action to run)`.
    #[allow(clippy::type_complexity)]
    fn command(
        &mut self,
        command: &str,
        args: &Map<String, Value>,
    ) -> Result<Result<Value, (VmmAction, Then)>, CommandError> {
        let submit = |a: VmmAction, then: Then| Ok(Err((a, then)));
        match command {
            "qmp_capabilities" => self.capabilities(args).map(Ok),
            "query-version" => Ok(Ok(version_json())),
            "query-commands" => Ok(Ok(Value::Array(
                command_names().map(|n| json!({ "name": n })).collect(),
            ))),
            "query-name" => Ok(Ok(json!({}))),
            "query-kvm" => Ok(Ok(json!({"enabled": true, "present": true}))),
            "query-status" => submit(VmmAction::GetVmInfo, Then::Status),
            "query-cpus-fast" => submit(VmmAction::GetVmInfo, Then::CpusFast),
            "stop" => submit(VmmAction::Pause, Then::Action(VmmAction::Pause)),
            "cont" => submit(VmmAction::Resume, Then::Action(VmmAction::Resume)),
            "system_reset" => submit(VmmAction::Reset, Then::Action(VmmAction::Reset)),
            "system_powerdown" => {
                submit(VmmAction::PowerButton, Then::Action(VmmAction::PowerButton))
            }
            "quit" => submit(VmmAction::Shutdown, Then::Action(VmmAction::Shutdown)),
            "set_link" => {
                let action = VmmAction::SetLink {
                    id: args
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    up: args.get("up").and_then(Value::as_bool).unwrap_or(true),
                };
                submit(action.clone(), Then::Action(action))
            }
            "migrate" => {
                let action = migration::migrate_action(args)?;
                submit(action.clone(), Then::Action(action))
            }
            "migrate-incoming" => match migration::incoming_action(args) {
                Ok(action) => submit(action.clone(), Then::Action(action)),
                Err(e) => submit(VmmAction::GetVmInfo, Then::IncomingRefused(e)),
            },
            "migrate_cancel" | "migrate-cancel" => submit(
                VmmAction::MigrateCancel,
                Then::Action(VmmAction::MigrateCancel),
            ),
            "query-migrate" => submit(VmmAction::QueryMigrate, Then::QueryMigrate),
            // `query-nodes` would add the format nodes' own counters; ours are per device.
            "query-blockstats" => submit(VmmAction::QueryBlockStats, Then::BlockStats),
            "migrate-set-capabilities" => {
                let action = migration::set_capabilities_action(args)?;
                submit(action.clone(), Then::Action(action))
            }
            "query-migrate-capabilities" => submit(
                VmmAction::GetMigrationCapabilities,
                Then::MigrateCapabilities,
            ),
            "migrate-set-parameters" => {
                let action = params::set_action(args)?;
                submit(action.clone(), Then::Action(action))
            }
            "query-migrate-parameters" => {
                submit(VmmAction::GetMigrationParameters, Then::MigrateParameters)
            }
            "balloon" => submit(
                balloon::balloon_action(args)?,
                Then::Balloon(balloon::BalloonThen::Set),
            ),
            "query-balloon" => submit(
                VmmAction::GetBalloon,
                Then::Balloon(balloon::BalloonThen::Query),
            ),
            "qom-list" | "qom-get" | "qom-set" => Ok(balloon::qom(command, args)?
                .map_err(|(action, then)| (action, Then::Balloon(then)))),
            _ => self.hmp(args),
        }
    }

    fn capabilities(&mut self, args: &Map<String, Value>) -> Result<Value, CommandError> {
        if self.negotiated {
            return Err(CommandError::not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let enable = args.get("enable").and_then(Value::as_array);
        // `oob` is the only capability QEMU knows, and we do not offer it.
        if let Some(cap) = enable.and_then(|caps| caps.first()) {
            let cap = cap.as_str().unwrap_or_default();
            return Err(CommandError::generic(if cap == "oob" {
                "Capability 'oob' not available".to_string()
            } else {
                format!("Parameter 'enable[0]' does not accept value '{cap}'")
            }));
        }
        self.negotiated = true;
        Ok(json!({}))
    }

    #[allow(clippy::type_complexity)]
    fn hmp(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<Result<Value, (VmmAction, Then)>, CommandError> {
        let line = args
            .get("command-line")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let cmd = hmp::parse(line);
        if let Some(cpu) = args.get("cpu-index") {
            let cpu = cpu.as_i64().unwrap_or(-1);
            return Ok(Err((VmmAction::GetVmInfo, Then::HmpCheckCpu { cmd, cpu })));
        }
        match cmd {
            HmpCommand::Text(t) => Ok(Ok(Value::String(t))),
            HmpCommand::Info(_) | HmpCommand::Action(_) | HmpCommand::ActionThen(..) => {
                Ok(Err((hmp_action(&cmd), Then::Hmp { cmd, cpu: 0 })))
            }
        }
    }
}

/// The action an HMP command needs (`GetVmInfo` for one that needs none).
fn hmp_action(cmd: &HmpCommand) -> VmmAction {
    match cmd {
        HmpCommand::Info(kind) => kind.action(),
        HmpCommand::Action(a) | HmpCommand::ActionThen(a, _) => a.clone(),
        HmpCommand::Text(_) => VmmAction::GetVmInfo,
    }
}

/// A reply of the wrong kind, or the action's error.
pub(crate) fn unexpected(reply: Reply) -> CommandError {
    match reply {
        Ok(other) => CommandError::generic(format!("unexpected answer from the VMM: {other:?}")),
        Err(e) => e.into(),
    }
}

pub(crate) fn vm_info(reply: Reply) -> Result<Box<VmInfo>, CommandError> {
    match reply {
        Ok(VmmResponse::VmInfo(vm)) => Ok(vm),
        other => Err(unexpected(other)),
    }
}

/// `query-cpus-fast`: QEMU's `CpuInfoFast` for x86_64, one socket with one core per vCPU.
fn cpus_fast(vm: &VmInfo) -> Value {
    Value::Array(
        vm.vcpus
            .iter()
            .map(|c| {
                json!({
                    "cpu-index": c.index,
                    "qom-path": format!("/machine/unattached/device[{}]", c.index),
                    "thread-id": c.thread_id.unwrap_or(0),
                    "props": {"core-id": c.index, "thread-id": 0, "socket-id": 0},
                    "target": "x86_64",
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod migration_tests;
