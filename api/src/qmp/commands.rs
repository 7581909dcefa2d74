//! QMP request dispatch, as QEMU's `qmp_dispatch` does it: request shape checks, capabilities
//! negotiation, the command table with argument validation (QEMU's error texts), each command,
//! and the VM events as QMP events.
//!
//! [`Monitor`] is the protocol state of one client, free of I/O: a request either gets an
//! answer at once or needs a [`VmmAction`], whose reply completes it.

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::events::event_json;
use super::hmp::{self, HmpCommand};
use crate::action::{ActionError, VersionInfo, VmInfo, VmState, VmmAction};
use crate::controller::{Reply, TimedEvent};
use crate::VmmResponse;

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
    fn generic(desc: impl Into<String>) -> CommandError {
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
        CommandError::generic(e.to_string())
    }
}

#[derive(Debug, Clone, Copy)]
enum ArgType {
    Str,
    Int,
    StrList,
}

struct Arg {
    name: &'static str,
    ty: ArgType,
    required: bool,
}

const NO_ARGS: &[Arg] = &[];

/// Every command, with its arguments (qapi/*.json).
const COMMANDS: &[(&str, &[Arg])] = &[
    (
        "qmp_capabilities",
        &[Arg {
            name: "enable",
            ty: ArgType::StrList,
            required: false,
        }],
    ),
    ("query-version", NO_ARGS),
    ("query-commands", NO_ARGS),
    ("query-status", NO_ARGS),
    ("query-name", NO_ARGS),
    ("query-kvm", NO_ARGS),
    ("query-cpus-fast", NO_ARGS),
    ("stop", NO_ARGS),
    ("cont", NO_ARGS),
    ("system_reset", NO_ARGS),
    ("system_powerdown", NO_ARGS),
    ("quit", NO_ARGS),
    (
        "human-monitor-command",
        &[
            Arg {
                name: "command-line",
                ty: ArgType::Str,
                required: true,
            },
            Arg {
                name: "cpu-index",
                ty: ArgType::Int,
                required: false,
            },
        ],
    ),
];

/// The names of all commands, as `query-commands` lists them.
pub fn command_names() -> impl Iterator<Item = &'static str> {
    COMMANDS.iter().map(|(n, _)| *n)
}

/// Checks `args` against `schema` in QEMU's order: each declared member (missing, wrong type),
/// then members nobody declared.
fn validate(schema: &[Arg], args: &Map<String, Value>) -> Result<(), CommandError> {
    let type_err = |name: &str, expected: &str| {
        CommandError::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    };
    for arg in schema {
        let Some(v) = args.get(arg.name) else {
            if arg.required {
                return Err(CommandError::generic(format!(
                    "Parameter '{}' is missing",
                    arg.name
                )));
            }
            continue;
        };
        match arg.ty {
            ArgType::Str if !v.is_string() => return Err(type_err(arg.name, "string")),
            ArgType::Int if !(v.is_i64() || v.is_u64()) => {
                return Err(type_err(arg.name, "integer"))
            }
            ArgType::StrList => {
                let Some(items) = v.as_array() else {
                    return Err(type_err(arg.name, "array"));
                };
                if let Some(i) = items.iter().position(|x| !x.is_string()) {
                    return Err(type_err(&format!("{}[{i}]", arg.name), "string"));
                }
            }
            _ => {}
        }
    }
    if let Some(extra) = args.keys().find(|k| !schema.iter().any(|a| a.name == *k)) {
        return Err(CommandError::generic(format!(
            "Parameter '{extra}' is unexpected"
        )));
    }
    Ok(())
}

/// QEMU's `RunState` name for our state.
pub(crate) fn run_state(state: VmState) -> &'static str {
    match state {
        VmState::Created => "prelaunch",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::ShuttingDown => "shutdown",
    }
}

/// QEMU's `stop` on a stopped VM and `cont` on a running one succeed without doing anything;
/// our state machine refuses them, so the monitor turns that refusal back into success.
pub(crate) fn is_noop(action: &VmmAction, e: &ActionError) -> bool {
    matches!(
        (action, e),
        (
            VmmAction::Pause,
            ActionError::InvalidState {
                state: VmState::Paused,
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
}

/// How a submitted action's reply completes the request.
#[derive(Debug)]
enum Then {
    Status,
    CpusFast,
    Action(VmmAction),
    Hmp { cmd: HmpCommand, cpu: i64 },
    HmpCheckCpu { cmd: HmpCommand, cpu: i64 },
}

/// One client's QMP state.
#[derive(Debug, Default)]
pub(crate) struct Monitor {
    negotiated: bool,
    pending: Option<(Option<Value>, Then)>,
}

impl Monitor {
    /// Whether a request waits for the VMM.
    pub(crate) fn busy(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether events are delivered (after `qmp_capabilities`).
    #[cfg(test)]
    pub(crate) fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Handles one input value.
    pub(crate) fn request(&mut self, req: Value) -> Step {
        let Value::Object(obj) = req else {
            return Step::Answer(parse_error("QMP input must be a JSON object".into()));
        };
        let id = obj.get("id").cloned();
        match self.dispatch(&obj) {
            Ok(Ok(v)) => Step::Answer(response(id, Ok(v))),
            Ok(Err((action, then))) => {
                self.pending = Some((id, then));
                Step::Submit(action)
            }
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
                Err(e) => Err(e.into()),
            },
            Then::Hmp { cmd, cpu } => match (cmd, reply) {
                (HmpCommand::Info(kind), r) => {
                    vm_info(r).map(|vm| Value::String(hmp::info_text(kind, &vm, cpu)))
                }
                (HmpCommand::Action(a), r) => {
                    Ok(Value::String(hmp::action_text(&a, r.map(|_| ()))))
                }
                (HmpCommand::Text(t), _) => Ok(Value::String(t)),
            },
            Then::HmpCheckCpu { cmd, cpu } => match vm_info(reply) {
                Err(e) => Err(e),
                Ok(vm) if cpu < 0 || cpu >= vm.vcpus.len() as i64 => Err(CommandError::generic(
                    "Parameter 'cpu-index' expects a CPU number",
                )),
                Ok(vm) => match cmd {
                    HmpCommand::Info(kind) => Ok(Value::String(hmp::info_text(kind, &vm, cpu))),
                    HmpCommand::Text(t) => Ok(Value::String(t)),
                    HmpCommand::Action(a) => {
                        self.pending = Some((
                            id,
                            Then::Hmp {
                                cmd: HmpCommand::Action(a.clone()),
                                cpu,
                            },
                        ));
                        return Step::Submit(a);
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

    /// `Ok(Ok(answer))`, `Ok(Err(action to run))` or a command error.
    #[allow(clippy::type_complexity)]
    fn dispatch(
        &mut self,
        obj: &Map<String, Value>,
    ) -> Result<Result<Value, (VmmAction, Then)>, CommandError> {
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
            HmpCommand::Info(_) => Ok(Err((VmmAction::GetVmInfo, Then::Hmp { cmd, cpu: 0 }))),
            HmpCommand::Action(ref a) => Ok(Err((a.clone(), Then::Hmp { cmd, cpu: 0 }))),
        }
    }
}

fn vm_info(reply: Reply) -> Result<Box<VmInfo>, CommandError> {
    match reply {
        Ok(VmmResponse::VmInfo(vm)) => Ok(vm),
        Ok(other) => Err(CommandError::generic(format!(
            "unexpected answer from the VMM: {other:?}"
        ))),
        Err(e) => Err(e.into()),
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
mod tests {
    use super::*;
    use crate::action::VcpuInfo;
    use crate::action::VmEvent;
    use crate::config::VmConfig;
    use std::time::SystemTime;

    fn answer(step: Step) -> Value {
        match step {
            Step::Answer(v) => v,
            Step::Submit(a) => panic!("unexpected submit {a:?}"),
        }
    }

    fn negotiated() -> Monitor {
        let mut m = Monitor::default();
        let r = answer(m.request(json!({"execute": "qmp_capabilities"})));
        assert_eq!(r, json!({"return": {}}));
        assert!(m.negotiated());
        m
    }

    fn vm(state: VmState) -> Reply {
        Ok(VmmResponse::VmInfo(Box::new(VmInfo {
            state,
            config: VmConfig::default(),
            vcpus: vec![
                VcpuInfo {
                    index: 0,
                    thread_id: Some(77),
                },
                VcpuInfo {
                    index: 1,
                    thread_id: None,
                },
            ],
        })))
    }

    fn error(v: &Value) -> (&str, &str) {
        (
            v["error"]["class"].as_str().unwrap(),
            v["error"]["desc"].as_str().unwrap(),
        )
    }

    #[test]
    fn negotiation_mode_refuses_other_commands() {
        let mut m = Monitor::default();
        let r = answer(m.request(json!({"execute": "query-status", "id": [1, "x"]})));
        assert_eq!(
            error(&r),
            (
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        );
        assert_eq!(r["id"], json!([1, "x"]));
        let r = answer(m.request(json!({"execute": "no-such"})));
        assert_eq!(error(&r).0, "CommandNotFound");
        assert!(!m.negotiated());
        // No events before negotiation.
        let ev = TimedEvent {
            event: VmEvent::Stop,
            at: SystemTime::now(),
        };
        assert!(m.event(&ev).is_none());
        let m = negotiated();
        assert!(m.event(&ev).is_some());
    }

    #[test]
    fn capabilities_arguments() {
        let mut m = Monitor::default();
        let r = answer(
            m.request(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})),
        );
        assert_eq!(
            error(&r),
            ("GenericError", "Capability 'oob' not available")
        );
        let r = answer(
            m.request(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}})),
        );
        assert_eq!(
            error(&r).1,
            "Parameter 'enable[0]' does not accept value 'x'"
        );
        let r =
            answer(m.request(json!({"execute": "qmp_capabilities", "arguments": {"enable": [1]}})));
        assert_eq!(
            error(&r).1,
            "Invalid parameter type for 'enable[0]', expected: string"
        );
        let r =
            answer(m.request(json!({"execute": "qmp_capabilities", "arguments": {"enable": []}})));
        assert_eq!(r, json!({"return": {}}));
        let r = answer(m.request(json!({"execute": "qmp_capabilities"})));
        assert_eq!(
            error(&r),
            (
                "CommandNotFound",
                "Capabilities negotiation is already complete, command ignored"
            )
        );
    }

    #[test]
    fn request_shape_errors() {
        let mut m = negotiated();
        let cases = [
            (json!([1]), "QMP input must be a JSON object"),
            (
                json!({"execute": 1}),
                "QMP input member 'execute' must be a string",
            ),
            (
                json!({"execute": "stop", "arguments": []}),
                "QMP input member 'arguments' must be an object",
            ),
            (json!({"id": 3}), "QMP input lacks member 'execute'"),
            (
                json!({"execute": "stop", "foo": 1}),
                "QMP input member 'foo' is unexpected",
            ),
            (
                json!({"exec-oob": "stop", "id": 1}),
                "QMP input member 'exec-oob' is unexpected",
            ),
        ];
        for (req, desc) in cases {
            let r = answer(m.request(req.clone()));
            assert_eq!(error(&r), ("GenericError", desc), "{req}");
        }
        let r = answer(m.request(json!({"execute": "frobnicate", "id": "a"})));
        assert_eq!(
            r,
            json!({"error": {"class": "CommandNotFound",
                "desc": "The command frobnicate has not been found"}, "id": "a"})
        );
    }

    #[test]
    fn argument_validation() {
        let mut m = negotiated();
        let cases = [
            (
                json!({"execute": "stop", "arguments": {"now": true}}),
                "Parameter 'now' is unexpected",
            ),
            (
                json!({"execute": "human-monitor-command"}),
                "Parameter 'command-line' is missing",
            ),
            (
                json!({"execute": "human-monitor-command", "arguments": {"command-line": 5}}),
                "Invalid parameter type for 'command-line', expected: string",
            ),
            (
                json!({"execute": "human-monitor-command",
                       "arguments": {"command-line": "info status", "cpu-index": "0"}}),
                "Invalid parameter type for 'cpu-index', expected: integer",
            ),
            (
                json!({"execute": "human-monitor-command",
                       "arguments": {"command-line": "info status", "x": 1}}),
                "Parameter 'x' is unexpected",
            ),
        ];
        for (req, desc) in cases {
            let r = answer(m.request(req.clone()));
            assert_eq!(error(&r), ("GenericError", desc), "{req}");
            assert!(!m.busy());
        }
    }

    #[test]
    fn greeting_and_local_queries() {
        let g = greeting();
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        assert_eq!(g["QMP"]["version"]["package"], "");
        assert!(g["QMP"]["version"]["qemu"]["major"].is_u64());
        let mut m = negotiated();
        let r = answer(m.request(json!({"execute": "query-kvm", "id": 7})));
        assert_eq!(
            r,
            json!({"return": {"enabled": true, "present": true}, "id": 7})
        );
        let r = answer(m.request(json!({"execute": "query-name"})));
        assert_eq!(r, json!({"return": {}}));
        let r = answer(m.request(json!({"execute": "query-version"})));
        assert_eq!(r["return"], version_json());
        let r = answer(m.request(json!({"execute": "query-commands"})));
        let names: Vec<&str> = r["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"human-monitor-command"));
        assert_eq!(names.len(), COMMANDS.len());
    }

    #[test]
    fn status_and_cpus_via_the_vmm() {
        let mut m = negotiated();
        assert_eq!(
            m.request(json!({"execute": "query-status", "id": 1})),
            Step::Submit(VmmAction::GetVmInfo)
        );
        assert!(m.busy());
        let r = answer(m.reply(vm(VmState::Paused)));
        assert_eq!(
            r,
            json!({"return": {"running": false, "singlestep": false, "status": "paused"}, "id": 1})
        );
        assert!(!m.busy());
        m.request(json!({"execute": "query-cpus-fast"}));
        let r = answer(m.reply(vm(VmState::Running)));
        assert_eq!(
            r["return"][0],
            json!({"cpu-index": 0, "qom-path": "/machine/unattached/device[0]",
                   "thread-id": 77, "props": {"core-id": 0, "thread-id": 0, "socket-id": 0},
                   "target": "x86_64"})
        );
        assert_eq!(r["return"][1]["qom-path"], "/machine/unattached/device[1]");
    }

    #[test]
    fn actions_and_their_errors() {
        let mut m = negotiated();
        assert_eq!(
            m.request(json!({"execute": "stop"})),
            Step::Submit(VmmAction::Pause)
        );
        assert_eq!(
            answer(m.reply(Ok(VmmResponse::Done))),
            json!({"return": {}})
        );
        // stop on a paused VM is a no-op in QEMU.
        m.request(json!({"execute": "stop"}));
        let noop = ActionError::InvalidState {
            action: "pause",
            state: VmState::Paused,
        };
        assert_eq!(answer(m.reply(Err(noop))), json!({"return": {}}));
        m.request(json!({"execute": "system_reset", "id": 2}));
        let r = answer(m.reply(Err(ActionError::Unavailable)));
        assert_eq!(error(&r), ("GenericError", "the VMM is shutting down"));
        assert_eq!(r["id"], 2);
        assert_eq!(
            m.request(json!({"execute": "quit"})),
            Step::Submit(VmmAction::Shutdown)
        );
        assert_eq!(
            m.request(json!({"execute": "query-kvm"})),
            Step::Answer(json!({"return": {"enabled": true, "present": true}})),
            "local answers do not disturb the pending one"
        );
    }

    #[test]
    fn hmp_through_qmp() {
        let mut m = negotiated();
        let hmp = |line: &str| json!({"execute": "human-monitor-command", "arguments": {"command-line": line}});
        let r = answer(m.request(hmp("foo")));
        assert_eq!(r, json!({"return": "unknown command: 'foo'\r\n"}));
        assert_eq!(
            m.request(hmp("info status")),
            Step::Submit(VmmAction::GetVmInfo)
        );
        assert_eq!(
            answer(m.reply(vm(VmState::Running))),
            json!({"return": "VM status: running\r\n"})
        );
        assert_eq!(
            m.request(hmp("info cpus")),
            Step::Submit(VmmAction::GetVmInfo)
        );
        assert_eq!(
            answer(m.reply(vm(VmState::Running))),
            json!({"return": "* CPU #0: thread_id=77\r\n  CPU #1: thread_id=0\r\n"})
        );
        assert_eq!(
            m.request(hmp("system_powerdown")),
            Step::Submit(VmmAction::PowerButton)
        );
        assert_eq!(
            answer(m.reply(Ok(VmmResponse::Done))),
            json!({"return": ""})
        );
        // cpu-index: checked against the VM's vCPUs first.
        let mut req = hmp("info cpus");
        req["arguments"]["cpu-index"] = json!(1);
        assert_eq!(m.request(req), Step::Submit(VmmAction::GetVmInfo));
        assert_eq!(
            answer(m.reply(vm(VmState::Running))),
            json!({"return": "  CPU #0: thread_id=77\r\n* CPU #1: thread_id=0\r\n"})
        );
        let mut req = hmp("stop");
        req["arguments"]["cpu-index"] = json!(5);
        m.request(req);
        let r = answer(m.reply(vm(VmState::Running)));
        assert_eq!(error(&r).1, "Parameter 'cpu-index' expects a CPU number");
        let mut req = hmp("stop");
        req["arguments"]["cpu-index"] = json!(0);
        m.request(req);
        assert_eq!(
            m.reply(vm(VmState::Running)),
            Step::Submit(VmmAction::Pause)
        );
        assert_eq!(
            answer(m.reply(Ok(VmmResponse::Done))),
            json!({"return": ""})
        );
    }
}
