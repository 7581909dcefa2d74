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
fn migrate_commands_parse_like_qemu() {
    let snap = |p: &str| HmpCommand::Action(VmmAction::Snapshot { path: p.into() });
    assert_eq!(parse("migrate file:/tmp/s"), snap("/tmp/s"));
    assert_eq!(parse("migrate -d file:/tmp/s"), snap("/tmp/s"));
    assert_eq!(
        text(parse("migrate -r file:/tmp/s")),
        "Error: Cannot resume if there is no paused migration\r\n"
    );
    assert_eq!(
        text(parse("migrate -d -r file:/tmp/s")),
        "Error: Cannot resume if there is no paused migration\r\n"
    );
    assert_eq!(
        text(parse("migrate -x file:/tmp/s")),
        "migrate: unsupported option -x\r\nTry \"help migrate\" for more information\r\n"
    );
    assert_eq!(
        text(parse("migrate")),
        "migrate: string expected\r\nTry \"help migrate\" for more information\r\n"
    );
    assert_eq!(
        text(parse("migrate -d")),
        "migrate: string expected\r\nTry \"help migrate\" for more information\r\n"
    );
    assert_eq!(
        text(parse("migrate file:/a file:/b")),
        "migrate: extraneous characters at the end of line\r\n\
         Try \"help migrate\" for more information\r\n"
    );
    assert_eq!(
        text(parse("migrate bogus:x")),
        "Error: unknown migration protocol: bogus:x\r\n"
    );
    assert!(text(parse("migrate tcp:0:4446")).starts_with("Error: the 'tcp:' migration"));
    assert_eq!(
        parse("migrate_incoming file:/tmp/s"),
        HmpCommand::Action(VmmAction::Restore {
            path: "/tmp/s".into()
        })
    );
    assert_eq!(
        text(parse("migrate_incoming")),
        "migrate_incoming: string expected\r\n\
         Try \"help migrate_incoming\" for more information\r\n"
    );
    assert!(text(parse("migrate_incoming exec:cat")).starts_with("Error: the 'exec:'"));
}

#[test]
fn set_capability_parses_like_qemu() {
    assert_eq!(
        parse("migrate_set_capability events on"),
        HmpCommand::Action(VmmAction::SetMigrationCapabilities(vec![
            crate::action::MigrationCapabilityState {
                capability: crate::action::MigrationCapability::Events,
                state: true,
            }
        ]))
    );
    assert_eq!(
        parse("migrate_set_capability xbzrle off"),
        HmpCommand::Action(VmmAction::SetMigrationCapabilities(vec![]))
    );
    assert_eq!(
        text(parse("migrate_set_capability xbzrle on")),
        "Error: capability 'xbzrle' is not supported by this VMM\r\n"
    );
    assert_eq!(
        text(parse("migrate_set_capability nope on")),
        "Error: invalid parameter value: nope\r\n"
    );
    assert_eq!(
        text(parse("migrate_set_capability events yes")),
        "Expected 'on' or 'off'\r\n\
         Try \"help migrate_set_capability\" for more information\r\n"
    );
    assert!(text(parse("migrate_set_capability"))
        .starts_with("migrate_set_capability: string expected\r\n"));
}

#[test]
fn info_migrate_subcommands() {
    assert_eq!(parse("info migrate"), HmpCommand::Info(InfoKind::Migrate));
    assert_eq!(
        parse("info migrate -a"),
        HmpCommand::Info(InfoKind::Migrate)
    );
    assert_eq!(
        parse("i migrate_capabilities"),
        HmpCommand::Info(InfoKind::MigrateCapabilities)
    );
    assert_eq!(InfoKind::Migrate.action(), VmmAction::QueryMigrate);
    assert_eq!(
        text(parse("info migrate -x")),
        "migrate: unsupported option -x\r\nTry \"help info migrate\" for more information\r\n"
    );
    let help = text(parse("info"));
    assert!(
        help.contains("info migrate [-a] -- show migration status (-a: all, dump all status)\r\n")
    );
    assert!(help.contains("info migrate_capabilities  -- show current migration capabilities"));
}

#[test]
fn info_migrate_text_follows_qemu() {
    use crate::action::{MigrationInfo, MigrationStatus, RamStats};
    assert_eq!(migrate_text(&MigrationInfo::default()), "");
    let failed = MigrationInfo {
        status: MigrationStatus::Failed,
        error_desc: Some("No space left on device".into()),
        ..MigrationInfo::default()
    };
    assert_eq!(
        migrate_text(&failed),
        "Status: \t\tfailed (No space left on device)\n"
    );
    let done = MigrationInfo {
        status: MigrationStatus::Completed,
        total_time_ms: Some(1523),
        setup_time_ms: Some(3),
        downtime_ms: Some(1520),
        ram: Some(RamStats {
            transferred: 139_264_000,
            remaining: 0,
            total: 268_435_456,
            duplicate: 31_540,
            normal: 33_996,
            normal_bytes: 139_247_616,
            mbps: 731.5432,
            pages_per_second: 22_365,
        }),
        error_desc: None,
    };
    assert_eq!(
        migrate_text(&done),
        "Status: \t\tcompleted\n\
         Time (ms): \t\ttotal=1523, setup=3, down=1520\n\
         RAM info:\n\
         \x20 Throughput (Mbps): \t731.54\n\
         \x20 Sizes: \t\tpagesize=4 KiB, total=256 MiB\n\
         \x20 Transfers: \t\ttransferred=133 MiB, remain=0 B\n\
         \x20   Channels: \t\tprecopy=0 B, multifd=0 B, postcopy=0 B\n\
         \x20   Page Types: \tnormal=33996, zero=31540\n\
         \x20 Page Rates (pps): \ttransfer=22365\n\
         \x20 Others: \t\tdirty_syncs=1, downtime_bytes=139264000\n"
    );
    let caps = info_reply(
        InfoKind::MigrateCapabilities,
        Ok(VmmResponse::MigrationCapabilities(vec![
            crate::action::MigrationCapabilityState {
                capability: crate::action::MigrationCapability::Events,
                state: true,
            },
        ])),
        0,
    )
    .unwrap();
    assert!(caps.starts_with("xbzrle: off\r\nrdma-pin-all: off\r\n"));
    assert!(caps.contains("\r\nevents: on\r\n"));
    assert!(caps.ends_with("mapped-ram: off\r\n"));
    assert!(info_reply(InfoKind::Migrate, Ok(VmmResponse::Done), 0).is_err());
}

#[test]
fn sizes_print_like_qemu() {
    assert_eq!(size_to_str(0), "0 B");
    assert_eq!(size_to_str(999), "999 B");
    assert_eq!(size_to_str(1000), "0.977 KiB");
    assert_eq!(size_to_str(1024), "1 KiB");
    assert_eq!(size_to_str(4096), "4 KiB");
    assert_eq!(size_to_str(1536), "1.5 KiB");
    assert_eq!(size_to_str(268_435_456), "256 MiB");
    assert_eq!(size_to_str(1_023_487), "999 KiB");
    assert_eq!(size_to_str(1_048_000), "0.999 MiB");
    assert_eq!(size_to_str(u64::MAX), "16 EiB");
    assert_eq!(fmt_g3(999.6), "1e+03");
    assert_eq!(fmt_g3(0.000_123_4), "0.000123");
    assert_eq!(fmt_g3(12.34), "12.3");
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
