//! HMP parsing and output, against QEMU's texts.

use super::*;
use crate::action::VcpuInfo;
use crate::config::VmConfig;

fn vm(state: VmState) -> VmInfo {
    VmInfo {
        state,
        nics: Vec::new(),
        agent: None,
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
        HmpCommand::Text(
            "stop|s: extraneous characters at the end of line\r\n\
             Try \"help stop\" for more information\r\n"
                .into()
        )
    );
    assert_eq!(
        parse("  s  now"),
        HmpCommand::Text(
            "stop|s: extraneous characters at the end of line\r\n\
             Try \"help   s\" for more information\r\n"
                .into()
        )
    );
    assert_eq!(
        parse("info status now"),
        HmpCommand::Text(
            "status: extraneous characters at the end of line\r\n\
             Try \"help info status\" for more information\r\n"
                .into()
        )
    );
}

fn text(cmd: HmpCommand) -> String {
    match cmd {
        HmpCommand::Text(t) => t,
        other => panic!("not text: {other:?}"),
    }
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
        info_text(InfoKind::Status, &vm(VmState::PostMigrate), 0),
        "VM status: paused (postmigrate)\r\n"
    );
    assert_eq!(
        info_text(InfoKind::Status, &vm(VmState::Incoming), 0),
        "VM status: paused (inmigrate)\r\n"
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
    assert_eq!(action_text(&VmmAction::Pause, Err(paused), false), "");
    let post = ActionError::InvalidState {
        action: "pause",
        state: VmState::PostMigrate,
    };
    assert_eq!(action_text(&VmmAction::Pause, Err(post), false), "");
    let e = ActionError::InvalidState {
        action: "reset",
        state: VmState::ShuttingDown,
    };
    assert_eq!(
        action_text(&VmmAction::Reset, Err(e), false),
        "Error: cannot reset while the VM is shutting_down\r\n"
    );
    assert_eq!(action_text(&VmmAction::Reset, Ok(()), false), "");
    let restore = VmmAction::Restore { path: "/s".into() };
    let refused = || ActionError::InvalidState {
        action: "restore",
        state: VmState::Running,
    };
    assert_eq!(
        action_text(&restore, Err(refused()), false),
        "Error: '-incoming' was not specified on the command line\r\n"
    );
    assert_eq!(
        action_text(&restore, Err(refused()), true),
        "Error: The incoming migration has already been started\r\n"
    );
}

#[test]
fn help_lists_the_commands_as_qemu_does() {
    let all = text(parse("help"));
    assert_eq!(text(parse("?")), all);
    assert!(all.starts_with("balloon target -- request VM to change its memory allocation"));
    for line in [
        "migrate [-d] [-r] uri -- migrate to URI (using -d to not wait for completion)\r\n\
         \t\t\t -r to resume a paused postcopy migration\r\n",
        "migrate_cancel  -- cancel the current VM migration\r\n",
        "migrate_incoming uri -- Continue an incoming migration from an -incoming defer\r\n",
        "migrate_set_capability capability state -- Enable/Disable the usage of a capability \
         for migration\r\n",
        "migrate_set_parameter parameter value -- Set the parameter for migration\r\n",
        "stop|s  -- stop emulation\r\n",
        "help|? [cmd] -- show the help\r\n",
    ] {
        assert!(all.contains(line), "{line:?}");
    }
    // Sorted by name, as QEMU sorts its table.
    let names: Vec<&str> = all
        .lines()
        .filter(|l| !l.starts_with('\t'))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
    assert_eq!(
        text(parse("help migrate_cancel")),
        "migrate_cancel  -- cancel the current VM migration\r\n"
    );
    assert_eq!(text(parse("help s")), "stop|s  -- stop emulation\r\n");
    assert!(text(parse("help info")).contains("info migrate_parameters"));
    assert_eq!(
        text(parse("help info migrate_parameters")),
        "info migrate_parameters  -- show current migration parameters\r\n"
    );
    assert_eq!(text(parse("help frob")), "unknown command: 'frob'\r\n");
    assert_eq!(
        text(parse("help info frob")),
        "unknown command: 'info frob'\r\n"
    );
}
