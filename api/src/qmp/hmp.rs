//! The human monitor commands reachable through QMP's `human-monitor-command`, with HMP's text
//! output (QEMU's `monitor_puts` turns every `\n` into `\r\n`).
//!
//! Supported: `info status|cpus|version|kvm|name`, `stop` (`s`), `cont` (`c`),
//! `system_powerdown`, `system_reset`, `quit` (`q`). Anything else prints what QEMU prints.

use crate::action::{ActionError, VersionInfo, VmInfo, VmState, VmmAction};

/// A parsed HMP command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HmpCommand {
    /// Answered at once with this text.
    Text(String),
    /// Needs the VM's info first.
    Info(InfoKind),
    /// Runs an action; prints nothing on success, `Error: ...` on failure.
    Action(VmmAction),
}

/// `info` subcommands that need the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InfoKind {
    /// `info status`.
    Status,
    /// `info cpus`.
    Cpus,
}

/// Converts HMP's `\n` line ends to the `\r\n` the monitor sends.
pub(crate) fn crlf(text: &str) -> String {
    text.replace('\n', "\r\n")
}

const INFO_HELP: &str = "\
info cpus  -- show infos for each CPU
info kvm  -- show KVM information
info name  -- show the current VM name
info status  -- show the current VM status (running|paused)
info version  -- show the version of QEMU
";

/// Parses `line` as HMP does: a command name, then its arguments.
pub(crate) fn parse(line: &str) -> HmpCommand {
    let mut words = line.split_whitespace();
    let Some(name) = words.next() else {
        return HmpCommand::Text(String::new());
    };
    let rest: Vec<&str> = words.collect();
    let no_args = |cmd: HmpCommand, canonical: &str| {
        if rest.is_empty() {
            cmd
        } else {
            HmpCommand::Text(crlf(&format!(
                "{canonical}: extraneous characters at the end of line\n"
            )))
        }
    };
    match name {
        "info" | "i" => match rest.as_slice() {
            [] => HmpCommand::Text(crlf(INFO_HELP)),
            ["status"] => HmpCommand::Info(InfoKind::Status),
            ["cpus"] => HmpCommand::Info(InfoKind::Cpus),
            ["version"] => {
                let v = VersionInfo::current();
                HmpCommand::Text(crlf(&format!("{}\n", v.version)))
            }
            ["kvm"] => HmpCommand::Text(crlf("kvm support: enabled\n")),
            // We have no VM name: QEMU prints nothing then.
            ["name"] => HmpCommand::Text(String::new()),
            [sub, ..] if ["status", "cpus", "version", "kvm", "name"].contains(sub) => {
                HmpCommand::Text(crlf("info: extraneous characters at the end of line\n"))
            }
            [sub, ..] => HmpCommand::Text(crlf(&format!("unknown command: 'info {sub}'\n"))),
        },
        "stop" | "s" => no_args(HmpCommand::Action(VmmAction::Pause), "stop"),
        "cont" | "c" => no_args(HmpCommand::Action(VmmAction::Resume), "cont"),
        "system_powerdown" => no_args(
            HmpCommand::Action(VmmAction::PowerButton),
            "system_powerdown",
        ),
        "system_reset" => no_args(HmpCommand::Action(VmmAction::Reset), "system_reset"),
        "quit" | "q" => no_args(HmpCommand::Action(VmmAction::Shutdown), "quit"),
        other => HmpCommand::Text(crlf(&format!("unknown command: '{other}'\n"))),
    }
}

/// `info status` / `info cpus` output. `current_cpu` is the monitor's CPU (marked `*`).
pub(crate) fn info_text(kind: InfoKind, vm: &VmInfo, current_cpu: i64) -> String {
    let text = match kind {
        InfoKind::Status => match vm.state {
            VmState::Running => "VM status: running\n".to_string(),
            VmState::Paused => "VM status: paused\n".to_string(),
            other => format!(
                "VM status: paused ({})\n",
                super::commands::run_state(other)
            ),
        },
        InfoKind::Cpus => vm
            .vcpus
            .iter()
            .map(|c| {
                let mark = if i64::from(c.index) == current_cpu {
                    '*'
                } else {
                    ' '
                };
                format!(
                    "{mark} CPU #{}: thread_id={}\n",
                    c.index,
                    c.thread_id.unwrap_or(0)
                )
            })
            .collect(),
    };
    crlf(&text)
}

/// What an HMP action prints: nothing when it worked (or was a no-op, as `stop` on a paused VM
/// is in QEMU), `Error: ...` otherwise.
pub(crate) fn action_text(action: &VmmAction, result: Result<(), ActionError>) -> String {
    match result {
        Ok(()) => String::new(),
        Err(e) if super::commands::is_noop(action, &e) => String::new(),
        Err(e) => crlf(&format!("Error: {e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::VcpuInfo;
    use crate::config::VmConfig;

    fn vm(state: VmState) -> VmInfo {
        VmInfo {
            state,
            config: VmConfig::default(),
            vcpus: vec![
                VcpuInfo {
                    index: 0,
                    thread_id: Some(1234),
                },
                VcpuInfo {
                    index: 1,
                    thread_id: Some(1235),
                },
            ],
        }
    }

    #[test]
    fn parses_commands_and_aliases() {
        assert_eq!(parse("stop"), HmpCommand::Action(VmmAction::Pause));
        assert_eq!(parse("  c "), HmpCommand::Action(VmmAction::Resume));
        assert_eq!(parse("q"), HmpCommand::Action(VmmAction::Shutdown));
        assert_eq!(
            parse("system_powerdown"),
            HmpCommand::Action(VmmAction::PowerButton)
        );
        assert_eq!(parse("system_reset"), HmpCommand::Action(VmmAction::Reset));
        assert_eq!(parse("info status"), HmpCommand::Info(InfoKind::Status));
        assert_eq!(parse("info cpus"), HmpCommand::Info(InfoKind::Cpus));
        assert_eq!(parse(""), HmpCommand::Text(String::new()));
    }

    #[test]
    fn unknown_and_malformed_commands_print_qemu_text() {
        assert_eq!(
            parse("foo bar"),
            HmpCommand::Text("unknown command: 'foo'\r\n".into())
        );
        assert_eq!(
            parse("info foo"),
            HmpCommand::Text("unknown command: 'info foo'\r\n".into())
        );
        assert_eq!(
            parse("stop now"),
            HmpCommand::Text("stop: extraneous characters at the end of line\r\n".into())
        );
    }

    #[test]
    fn info_status_and_cpus_text() {
        assert_eq!(
            info_text(InfoKind::Status, &vm(VmState::Running), 0),
            "VM status: running\r\n"
        );
        assert_eq!(
            info_text(InfoKind::Status, &vm(VmState::Paused), 0),
            "VM status: paused\r\n"
        );
        assert_eq!(
            info_text(InfoKind::Status, &vm(VmState::ShuttingDown), 0),
            "VM status: paused (shutdown)\r\n"
        );
        assert_eq!(
            info_text(InfoKind::Cpus, &vm(VmState::Running), 0),
            "* CPU #0: thread_id=1234\r\n  CPU #1: thread_id=1235\r\n"
        );
        assert_eq!(
            info_text(InfoKind::Cpus, &vm(VmState::Running), 1),
            "  CPU #0: thread_id=1234\r\n* CPU #1: thread_id=1235\r\n"
        );
    }

    #[test]
    fn action_errors_are_printed_noops_are_silent() {
        let paused = ActionError::InvalidState {
            action: "pause",
            state: VmState::Paused,
        };
        assert_eq!(action_text(&VmmAction::Pause, Err(paused)), "");
        let e = ActionError::InvalidState {
            action: "reset",
            state: VmState::ShuttingDown,
        };
        assert_eq!(
            action_text(&VmmAction::Reset, Err(e)),
            "Error: cannot reset while the VM is shutting_down\r\n"
        );
        assert_eq!(action_text(&VmmAction::Reset, Ok(())), "");
    }
}
