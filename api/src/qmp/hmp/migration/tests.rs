//! The HMP migration commands and their texts, against QEMU's.

use super::super::{action_then_text, info_reply, parse, InfoKind};
use super::*;
use crate::action::{
    ActionError, MigrationAddress, MigrationCapability, MigrationCapabilityState,
    MigrationParameters, MigrationParametersUpdate, RamStats, VmState,
};
use crate::VmmResponse;

fn text(cmd: HmpCommand) -> String {
    match cmd {
        HmpCommand::Text(t) => t,
        other => panic!("not text: {other:?}"),
    }
}

fn tcp(host: &str, port: u16) -> MigrationAddress {
    MigrationAddress::Tcp {
        host: host.into(),
        port,
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
        text(parse("migrate -d -r tcp:h:1")),
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
    assert!(text(parse("migrate exec:cat")).starts_with(
        "Error: the 'exec:' migration transport is not supported by this VMM; use \
         'tcp:HOST:PORT' or 'unix:PATH'"
    ));
    assert_eq!(
        text(parse("migrate tcp:nowhere")),
        "Error: error parsing address 'nowhere'\r\n"
    );
}

#[test]
fn live_migrate_goes_on_detached() {
    let live = VmmAction::Migrate {
        to: tcp("10.0.0.2", 4446),
    };
    assert_eq!(
        parse("migrate -d tcp:10.0.0.2:4446"),
        HmpCommand::Action(live.clone())
    );
    // Without -d QEMU would wait, but its monitor cannot here: it says so and goes on.
    assert_eq!(
        parse("migrate tcp:10.0.0.2:4446"),
        HmpCommand::ActionThen(live.clone(), DETACHED)
    );
    assert_eq!(
        action_then_text(&live, Ok(()), false, DETACHED),
        "terminal does not allow synchronous migration, continuing detached\r\n"
    );
    let refused = ActionError::InvalidState {
        action: "migrate",
        state: VmState::PostMigrate,
    };
    assert_eq!(
        action_then_text(&live, Err(refused), false, DETACHED),
        "Error: Can't migrate the vm that was paused due to previous migration\r\n"
    );
    assert_eq!(
        parse("migrate -d unix:/run/m.sock"),
        HmpCommand::Action(VmmAction::Migrate {
            to: MigrationAddress::Unix("/run/m.sock".into())
        })
    );
}

#[test]
fn incoming_and_cancel() {
    assert_eq!(
        parse("migrate_incoming file:/tmp/s"),
        HmpCommand::Action(VmmAction::Restore {
            path: "/tmp/s".into()
        })
    );
    assert_eq!(
        parse("migrate_incoming tcp:[::]:4446"),
        HmpCommand::Action(VmmAction::MigrateIncoming {
            from: tcp("::", 4446)
        })
    );
    assert_eq!(
        text(parse("migrate_incoming")),
        "migrate_incoming: string expected\r\n\
         Try \"help migrate_incoming\" for more information\r\n"
    );
    assert!(text(parse("migrate_incoming exec:cat")).starts_with("Error: the 'exec:'"));
    assert_eq!(
        parse("migrate_cancel"),
        HmpCommand::Action(VmmAction::MigrateCancel)
    );
    assert_eq!(
        text(parse("migrate_cancel now")),
        "migrate_cancel: extraneous characters at the end of line\r\n\
         Try \"help migrate_cancel\" for more information\r\n"
    );
}

#[test]
fn set_capability_parses_like_qemu() {
    assert_eq!(
        parse("migrate_set_capability events on"),
        HmpCommand::Action(VmmAction::SetMigrationCapabilities(vec![
            MigrationCapabilityState {
                capability: MigrationCapability::Events,
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
fn set_parameter_parses_like_qemu() {
    let set = |d: Option<u64>, b: Option<u64>| {
        HmpCommand::Action(VmmAction::SetMigrationParameters(
            MigrationParametersUpdate {
                downtime_limit_ms: d,
                max_bandwidth: b,
            },
        ))
    };
    assert_eq!(
        parse("migrate_set_parameter downtime-limit 100"),
        set(Some(100), None)
    );
    assert_eq!(
        parse("migrate_set_parameter max-bandwidth 64"),
        set(None, Some(64 << 20))
    );
    assert_eq!(
        parse("migrate_set_parameter max-bandwidth 10G"),
        set(None, Some(10 << 30))
    );
    assert_eq!(
        text(parse("migrate_set_parameter downtime-limit fast")),
        "Error: Parameter 'downtime-limit' expects a non-negative number below 2^64\r\n\
         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\r\n\
         and exabytes, respectively.\r\n"
    );
    assert_eq!(
        text(parse("migrate_set_parameter downtime-limit 3000000")),
        "Error: Parameter 'downtime_limit' expects an integer in the range of 0 to \
         (2000 * 1000) ms\r\n"
    );
    assert_eq!(
        text(parse("migrate_set_parameter max-bandwidth x")),
        "Error: Invalid size x\r\n"
    );
    assert_eq!(
        text(parse("migrate_set_parameter multifd-channels 4")),
        "Error: migration parameter 'multifd-channels' is not supported by this VMM (it \
         implements downtime-limit and max-bandwidth)\r\n"
    );
    assert_eq!(
        text(parse("migrate_set_parameter no-such 4")),
        "Error: invalid parameter value: no-such\r\n"
    );
    for line in [
        "migrate_set_parameter",
        "migrate_set_parameter downtime-limit",
    ] {
        assert_eq!(
            text(parse(line)),
            "migrate_set_parameter: string expected\r\n\
             Try \"help migrate_set_parameter\" for more information\r\n"
        );
    }
    assert!(text(parse("migrate_set_parameter downtime-limit 1 2"))
        .starts_with("migrate_set_parameter: extraneous characters at the end of line\r\n"));
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
    assert_eq!(
        parse("info migrate_parameters"),
        HmpCommand::Info(InfoKind::MigrateParameters)
    );
    assert_eq!(InfoKind::Migrate.action(), VmmAction::QueryMigrate);
    assert_eq!(
        InfoKind::MigrateParameters.action(),
        VmmAction::GetMigrationParameters
    );
    assert_eq!(
        text(parse("info migrate -x")),
        "migrate: unsupported option -x\r\nTry \"help info migrate\" for more information\r\n"
    );
    let help = text(parse("info"));
    assert!(
        help.contains("info migrate [-a] -- show migration status (-a: all, dump all status)\r\n")
    );
    assert!(help.contains("info migrate_capabilities  -- show current migration capabilities"));
    assert!(help.contains("info migrate_parameters  -- show current migration parameters\r\n"));
    let params = info_reply(
        InfoKind::MigrateParameters,
        Ok(VmmResponse::MigrationParameters(
            MigrationParameters::default(),
        )),
        0,
    )
    .unwrap();
    assert!(params.starts_with("announce-initial: 50 ms\r\nannounce-max: 550 ms\r\n"));
    assert!(params.contains("\r\nmax-bandwidth: 134217728 bytes/second\r\n"));
    assert!(params.contains("\r\ndowntime-limit: 300 ms\r\n"));
    assert!(params.ends_with("mode: normal\r\ndirect-io: off\r\n"));
    assert!(info_reply(InfoKind::MigrateParameters, Ok(VmmResponse::Done), 0).is_err());
}

#[test]
fn info_migrate_text_follows_qemu() {
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
    let cancelled = MigrationInfo {
        status: MigrationStatus::Cancelled,
        total_time_ms: Some(800),
        error_desc: Some("cancelled by the user".into()),
        ..MigrationInfo::default()
    };
    assert_eq!(
        migrate_text(&cancelled),
        "Status: \t\tcancelled\nTime (ms): \t\ttotal=800\n"
    );
    // A snapshot: stopped first, so one sync and every byte is downtime.
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
            dirty_pages_rate: 0,
            dirty_sync_count: 1,
            downtime_bytes: 139_264_000,
        }),
        ..MigrationInfo::default()
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
    // A live migration in its fourth round.
    let active = MigrationInfo {
        status: MigrationStatus::Active,
        total_time_ms: Some(4200),
        setup_time_ms: Some(5),
        expected_downtime_ms: Some(42),
        ram: Some(RamStats {
            transferred: 1 << 30,
            remaining: 12 << 20,
            total: 2 << 30,
            duplicate: 100,
            normal: 262_144,
            normal_bytes: 1 << 30,
            mbps: 2048.0,
            pages_per_second: 65_536,
            dirty_pages_rate: 1500,
            dirty_sync_count: 4,
            downtime_bytes: 0,
        }),
        ..MigrationInfo::default()
    };
    assert_eq!(
        migrate_text(&active),
        "Status: \t\tactive\n\
         Time (ms): \t\ttotal=4200, setup=5, exp_down=42\n\
         RAM info:\n\
         \x20 Throughput (Mbps): \t2048.00\n\
         \x20 Sizes: \t\tpagesize=4 KiB, total=2 GiB\n\
         \x20 Transfers: \t\ttransferred=1 GiB, remain=12 MiB\n\
         \x20   Channels: \t\tprecopy=1 GiB, multifd=0 B, postcopy=0 B\n\
         \x20   Page Types: \tnormal=262144, zero=100\n\
         \x20 Page Rates (pps): \ttransfer=65536, dirty=1500\n\
         \x20 Others: \t\tdirty_syncs=4\n"
    );
    let caps = info_reply(
        InfoKind::MigrateCapabilities,
        Ok(VmmResponse::MigrationCapabilities(vec![
            MigrationCapabilityState {
                capability: MigrationCapability::Events,
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
