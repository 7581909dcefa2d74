//! The human monitor commands reachable through QMP's `human-monitor-command`, with HMP's text
//! output (QEMU's `monitor_puts` turns every `\n` into `\r\n`).
//!
//! Supported: `info status|cpus|version|kvm|name|migrate|migrate_capabilities|
//! migrate_parameters|network|blockstats|balloon|snapshots`, `help` (`?`), `stop` (`s`), `cont`
//! (`c`), `system_powerdown`, `system_reset`, `quit` (`q`), `balloon`, `set_link NAME on|off`,
//! the migration commands of [`migration`]: `migrate [-d] [-r] URI`, `migrate_incoming URI`,
//! `migrate_cancel`, `migrate_set_capability NAME on|off`, `migrate_set_parameter NAME VALUE`,
//! and the whole-VM snapshots of [`savevm`]: `savevm [TAG]`, `loadvm TAG`, `delvm TAG`.
//! Anything else prints what QEMU prints. Arguments are split at white space (QEMU's quoted
//! strings are not parsed).

mod migration;
mod savevm;

use super::commands::{unexpected, vm_info, CommandError};
use super::migration::{action_error_text, capability_states, params};
use crate::action::{ActionError, VersionInfo, VmInfo, VmState, VmmAction};
use crate::controller::Reply;
use crate::VmmResponse;

/// A parsed HMP command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HmpCommand {
    /// Answered at once with this text.
    Text(String),
    /// Needs an answer from the VMM first ([`InfoKind::action`]).
    Info(InfoKind),
    /// Runs an action; prints nothing on success, `Error: ...` on failure.
    Action(VmmAction),
    /// Runs an action; prints this text on success, `Error: ...` on failure.
    ActionThen(VmmAction, &'static str),
}

/// `info` subcommands that need the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InfoKind {
    /// `info status`.
    Status,
    /// `info cpus`.
    Cpus,
    /// `info migrate`.
    Migrate,
    /// `info migrate_capabilities`.
    MigrateCapabilities,
    /// `info migrate_parameters`.
    MigrateParameters,
    /// `info network`.
    Network,
    /// `info blockstats`.
    Blockstats,
    /// `info balloon`.
    Balloon,
    /// `info snapshots`.
    Snapshots,
}

impl InfoKind {
    /// The query whose answer the text is made of.
    pub(crate) fn action(self) -> VmmAction {
        match self {
            InfoKind::Status | InfoKind::Cpus | InfoKind::Network => VmmAction::GetVmInfo,
            InfoKind::Migrate => VmmAction::QueryMigrate,
            InfoKind::MigrateCapabilities => VmmAction::GetMigrationCapabilities,
            InfoKind::MigrateParameters => VmmAction::GetMigrationParameters,
            InfoKind::Blockstats => VmmAction::QueryBlockStats,
            InfoKind::Balloon => VmmAction::GetBalloon,
            InfoKind::Snapshots => VmmAction::ListVmSnapshots,
        }
    }
}

/// Converts HMP's `\n` line ends to the `\r\n` the monitor sends.
pub(crate) fn crlf(text: &str) -> String {
    text.replace('\n', "\r\n")
}

const INFO_HELP: &str = "\
info balloon  -- show balloon information
info blockstats  -- show block device statistics
info cpus  -- show infos for each CPU
info kvm  -- show KVM information
info migrate [-a] -- show migration status (-a: all, dump all status)
info migrate_capabilities  -- show current migration capabilities
info migrate_parameters  -- show current migration parameters
info name  -- show the current VM name
info network  -- show the network state
info snapshots  -- show the currently saved VM snapshots
info status  -- show the current VM status (running|paused)
info version  -- show the version of QEMU
";

/// `info` subcommands that take no arguments.
const INFO_NO_ARGS: &[&str] = &[
    "status",
    "cpus",
    "version",
    "kvm",
    "name",
    "migrate_capabilities",
    "migrate_parameters",
    "network",
    "blockstats",
    "balloon",
    "snapshots",
];

/// `line` up to the end of its `n`-th word: what QEMU repeats in "Try \"help ...\"".
fn first_words(line: &str, n: usize) -> &str {
    let mut end = 0;
    let mut rest = line;
    for _ in 0..n {
        let start = rest.len() - rest.trim_start().len();
        let len = rest[start..]
            .find(char::is_whitespace)
            .unwrap_or(rest.len() - start);
        end += start + len;
        rest = &line[end..];
    }
    &line[..end]
}

/// What QEMU prints when a command's arguments do not parse: the reason, then where to look.
fn bad_args(reason: &str, line: &str, words: usize) -> HmpCommand {
    HmpCommand::Text(crlf(&format!(
        "{reason}\nTry \"help {}\" for more information\n",
        first_words(line, words)
    )))
}

/// What a command that failed prints (QEMU's `hmp_handle_error`).
fn error_text(desc: &str) -> HmpCommand {
    HmpCommand::Text(crlf(&format!("Error: {desc}\n")))
}

/// Parses `line` as HMP does: a command name, then its arguments.
pub(crate) fn parse(line: &str) -> HmpCommand {
    let mut words = line.split_whitespace();
    let Some(name) = words.next() else {
        return HmpCommand::Text(String::new());
    };
    let rest: Vec<&str> = words.collect();
    // QEMU's command names include their aliases ("stop|s"); parse errors print them whole.
    let no_args = |cmd: HmpCommand, qemu_name: &str| {
        if rest.is_empty() {
            cmd
        } else {
            bad_args(
                &format!("{qemu_name}: extraneous characters at the end of line"),
                line,
                1,
            )
        }
    };
    match name {
        "info" | "i" => parse_info(line, &rest),
        "stop" | "s" => no_args(HmpCommand::Action(VmmAction::Pause), "stop|s"),
        "cont" | "c" => no_args(HmpCommand::Action(VmmAction::Resume), "cont|c"),
        "system_powerdown" => no_args(
            HmpCommand::Action(VmmAction::PowerButton),
            "system_powerdown",
        ),
        "system_reset" => no_args(HmpCommand::Action(VmmAction::Reset), "system_reset"),
        "quit" | "q" => no_args(HmpCommand::Action(VmmAction::Shutdown), "quit|q"),
        "help" | "?" => help(&rest),
        "migrate" => migration::parse_migrate(line, &rest),
        "migrate_incoming" => migration::parse_incoming(line, &rest),
        "migrate_cancel" => no_args(
            HmpCommand::Action(VmmAction::MigrateCancel),
            "migrate_cancel",
        ),
        "migrate_set_capability" => migration::parse_set_capability(line, &rest),
        "migrate_set_parameter" => migration::parse_set_parameter(line, &rest),
        "savevm" => savevm::parse_savevm(line, &rest),
        "loadvm" => savevm::parse_loadvm(line, &rest),
        "delvm" => savevm::parse_delvm(line, &rest),
        "balloon" => match rest.as_slice() {
            [] => bad_args("balloon: integer expected", line, 1),
            [size] => match parse_mib(size) {
                Some(0) => error_text("Parameter 'value' expects a size"),
                Some(bytes) => HmpCommand::Action(VmmAction::SetBalloon {
                    target: bytes,
                    clamp: true,
                }),
                None if size.starts_with('-') => error_text("enter a positive value"),
                None => bad_args("balloon: invalid size", line, 1),
            },
            _ => bad_args("balloon: extraneous characters at the end of line", line, 1),
        },
        "set_link" => match rest.as_slice() {
            [] => bad_args("set_link: string expected", line, 1),
            [_] => bad_args("Expected 'on' or 'off'", line, 1),
            [name, state] => match *state {
                "on" | "off" => HmpCommand::Action(VmmAction::SetLink {
                    id: name.to_string(),
                    up: *state == "on",
                }),
                _ => bad_args("Expected 'on' or 'off'", line, 1),
            },
            _ => bad_args(
                "set_link: extraneous characters at the end of line",
                line,
                1,
            ),
        },
        other => HmpCommand::Text(crlf(&format!("unknown command: '{other}'\n"))),
    }
}

fn parse_info(line: &str, rest: &[&str]) -> HmpCommand {
    let Some((sub, args)) = rest.split_first() else {
        return HmpCommand::Text(crlf(INFO_HELP));
    };
    let sub = *sub;
    if !INFO_NO_ARGS.contains(&sub) && sub != "migrate" {
        return HmpCommand::Text(crlf(&format!("unknown command: 'info {sub}'\n")));
    }
    // `info migrate [-a]`: -a adds QEMU's internals (globals, XBZRLE, throttling), none of
    // which exist here, so it prints the same.
    let args = if sub == "migrate" {
        match args.first() {
            Some(&"-a") => &args[1..],
            Some(opt) if opt.starts_with('-') => {
                let c = opt.chars().nth(1).unwrap_or(' ');
                return bad_args(&format!("migrate: unsupported option -{c}"), line, 2);
            }
            _ => args,
        }
    } else {
        args
    };
    if !args.is_empty() {
        return bad_args(
            &format!("{sub}: extraneous characters at the end of line"),
            line,
            2,
        );
    }
    match sub {
        "status" => HmpCommand::Info(InfoKind::Status),
        "cpus" => HmpCommand::Info(InfoKind::Cpus),
        "migrate" => HmpCommand::Info(InfoKind::Migrate),
        "migrate_capabilities" => HmpCommand::Info(InfoKind::MigrateCapabilities),
        "migrate_parameters" => HmpCommand::Info(InfoKind::MigrateParameters),
        "network" => HmpCommand::Info(InfoKind::Network),
        "blockstats" => HmpCommand::Info(InfoKind::Blockstats),
        "balloon" => HmpCommand::Info(InfoKind::Balloon),
        "snapshots" => HmpCommand::Info(InfoKind::Snapshots),
        "version" => {
            let v = VersionInfo::current();
            HmpCommand::Text(crlf(&format!("{}\n", v.version)))
        }
        "kvm" => HmpCommand::Text(crlf("kvm support: enabled\n")),
        // "name": we have no VM name, and QEMU prints nothing then.
        _ => HmpCommand::Text(String::new()),
    }
}

/// An HMP size of type `M`: MiB without a suffix, else K, M, G or T (powers of 1024).
fn parse_mib(s: &str) -> Option<u64> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "M"),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// The text of an `info` command from the VMM's answer to [`InfoKind::action`].
pub(crate) fn info_reply(kind: InfoKind, reply: Reply, cpu: i64) -> Result<String, CommandError> {
    match kind {
        InfoKind::Status | InfoKind::Cpus | InfoKind::Network => {
            vm_info(reply).map(|vm| info_text(kind, &vm, cpu))
        }
        InfoKind::Migrate => match reply {
            Ok(VmmResponse::Migration(info)) => Ok(crlf(&migration::migrate_text(&info))),
            other => Err(unexpected(other)),
        },
        InfoKind::MigrateCapabilities => match reply {
            Ok(VmmResponse::MigrationCapabilities(caps)) => Ok(crlf(
                &capability_states(&caps)
                    .into_iter()
                    .map(|(name, on)| format!("{name}: {}\n", if on { "on" } else { "off" }))
                    .collect::<String>(),
            )),
            other => Err(unexpected(other)),
        },
        InfoKind::MigrateParameters => match reply {
            Ok(VmmResponse::MigrationParameters(p)) => Ok(crlf(&params::info_text(&p))),
            other => Err(unexpected(other)),
        },
        InfoKind::Blockstats => match reply {
            Ok(VmmResponse::BlockStats(disks)) => Ok(crlf(&blockstats_text(&disks))),
            other => Err(unexpected(other)),
        },
        InfoKind::Balloon => match reply {
            Ok(VmmResponse::Balloon(b)) => {
                Ok(crlf(&format!("balloon: actual={}\n", b.actual_bytes >> 20)))
            }
            Err(e @ ActionError::NoBalloon) => Ok(crlf(&format!("Error: {e}\n"))),
            other => Err(unexpected(other)),
        },
        InfoKind::Snapshots => match reply {
            Ok(VmmResponse::VmSnapshots(disks)) => Ok(crlf(&crate::snapshots::info_text(&disks))),
            other => Err(unexpected(other)),
        },
    }
}

/// `info blockstats`: one line per disk, QEMU's members in QEMU's order.
fn blockstats_text(disks: &[crate::metrics::DiskStats]) -> String {
    disks
        .iter()
        .map(|d| {
            let s = &d.stats;
            format!(
                "{}: rd_bytes={} wr_bytes={} rd_operations={} wr_operations={} \
                 flush_operations={} wr_total_time_ns={} rd_total_time_ns={} \
                 flush_total_time_ns={} rd_merged={} wr_merged={} idle_time_ns={}\n",
                d.id,
                s.rd_bytes,
                s.wr_bytes,
                s.rd_operations,
                s.wr_operations,
                s.flush_operations,
                s.wr_total_time_ns,
                s.rd_total_time_ns,
                s.flush_total_time_ns,
                s.rd_merged,
                s.wr_merged,
                s.idle_time_ns.unwrap_or(0),
            )
        })
        .collect()
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
        // As QEMU's `hmp_info_network`: each NIC, then its backend indented under it.
        InfoKind::Network => vm
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let link = if n.link_up { "" } else { ",link=down" };
                format!(
                    "{id}: index={i},type=nic,model={model},macaddr={mac}{link}\n \\ {id}-tap: \
                     index={i},type=tap,ifname={tap},vhost={vhost},queues={q}\n",
                    id = n.id,
                    model = n.model,
                    mac = n.mac,
                    tap = n.tap,
                    vhost = if n.vhost { "on" } else { "off" },
                    q = n.queues,
                )
            })
            .collect(),
        InfoKind::Migrate
        | InfoKind::MigrateCapabilities
        | InfoKind::MigrateParameters
        | InfoKind::Blockstats
        | InfoKind::Balloon
        | InfoKind::Snapshots => String::new(),
    };
    crlf(&text)
}

/// What an HMP action prints: nothing when it worked (or was a no-op, as `stop` on a paused VM
/// is in QEMU), `Error: ...` otherwise, in QEMU's words where it has them.
pub(crate) fn action_text(
    action: &VmmAction,
    result: Result<(), ActionError>,
    restore_started: bool,
) -> String {
    action_then_text(action, result, restore_started, "")
}

/// [`action_text`] for an action that prints `done` when it worked.
pub(crate) fn action_then_text(
    action: &VmmAction,
    result: Result<(), ActionError>,
    restore_started: bool,
    done: &str,
) -> String {
    match result {
        Ok(()) => crlf(done),
        Err(e) if super::commands::is_noop(action, &e) => String::new(),
        Err(e) => crlf(&format!(
            "Error: {}\n",
            action_error_text(action, &e, restore_started)
        )),
    }
}

/// QEMU's `help` lines (hmp-commands.hx: name, parameters, help) of the commands above, sorted
/// by name as QEMU sorts its table.
const HELP: &[(&str, &str)] = &[
    (
        "balloon",
        "balloon target -- request VM to change its memory allocation (in MB)\n",
    ),
    ("cont|c", "cont|c  -- resume emulation\n"),
    ("delvm", "delvm tag -- delete a VM snapshot from its tag\n"),
    ("help|?", "help|? [cmd] -- show the help\n"),
    (
        "info",
        "info [subcommand] -- show various information about the system state\n",
    ),
    (
        "loadvm",
        "loadvm tag -- restore a VM snapshot from its tag\n",
    ),
    (
        "migrate",
        "migrate [-d] [-r] uri -- migrate to URI (using -d to not wait for completion)\n\
         \t\t\t -r to resume a paused postcopy migration\n",
    ),
    (
        "migrate_cancel",
        "migrate_cancel  -- cancel the current VM migration\n",
    ),
    (
        "migrate_incoming",
        "migrate_incoming uri -- Continue an incoming migration from an -incoming defer\n",
    ),
    (
        "migrate_set_capability",
        "migrate_set_capability capability state -- Enable/Disable the usage of a capability \
         for migration\n",
    ),
    (
        "migrate_set_parameter",
        "migrate_set_parameter parameter value -- Set the parameter for migration\n",
    ),
    ("quit|q", "quit|q  -- quit the emulator\n"),
    (
        "savevm",
        "savevm tag -- save a VM snapshot. If no tag is provided, a new snapshot is created\n",
    ),
    (
        "set_link",
        "set_link name on|off -- change the link status of a network adapter\n",
    ),
    ("stop|s", "stop|s  -- stop emulation\n"),
    (
        "system_powerdown",
        "system_powerdown  -- send system power down event\n",
    ),
    ("system_reset", "system_reset  -- reset the system\n"),
];

/// `help [CMD]` (`?`): every command, one (with an alias), or `info`'s subcommands.
fn help(args: &[&str]) -> HmpCommand {
    let text = match args {
        [] => HELP.iter().map(|(_, text)| *text).collect(),
        ["info"] => INFO_HELP.to_string(),
        ["info", sub, ..] => match INFO_HELP
            .lines()
            .find(|l| l.strip_prefix("info ").and_then(|r| r.split(' ').next()) == Some(*sub))
        {
            Some(l) => format!("{l}\n"),
            None => format!("unknown command: 'info {sub}'\n"),
        },
        [cmd, ..] => match HELP
            .iter()
            .find(|(names, _)| names.split('|').any(|n| n == *cmd))
        {
            Some((_, text)) => text.to_string(),
            None => format!("unknown command: '{cmd}'\n"),
        },
    };
    HmpCommand::Text(crlf(&text))
}

#[cfg(test)]
mod tests;
