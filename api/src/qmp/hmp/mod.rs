//! The human monitor commands reachable through QMP's `human-monitor-command`, with HMP's text
//! output (QEMU's `monitor_puts` turns every `\n` into `\r\n`).
//!
//! Supported: `info status|cpus|version|kvm|name|migrate|migrate_capabilities|network`, `stop`
//! (`s`), `cont` (`c`), `system_powerdown`, `system_reset`, `quit` (`q`), `migrate [-d] [-r]
//! URI`, `migrate_incoming URI`, `migrate_set_capability NAME on|off`, `set_link NAME on|off`. Anything else prints what QEMU
//! prints. Arguments are split at white space (QEMU's quoted strings are not parsed).

use super::commands::{unexpected, vm_info, CommandError};
use super::migration;
use crate::action::{
    ActionError, MigrationInfo, MigrationStatus, VersionInfo, VmInfo, VmState, VmmAction,
};
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
    /// `info network`.
    Network,
    /// `info blockstats`.
    Blockstats,
    /// `info balloon`.
    Balloon,
}

impl InfoKind {
    /// The query whose answer the text is made of.
    pub(crate) fn action(self) -> VmmAction {
        match self {
            InfoKind::Status | InfoKind::Cpus | InfoKind::Network => VmmAction::GetVmInfo,
            InfoKind::Migrate => VmmAction::QueryMigrate,
            InfoKind::MigrateCapabilities => VmmAction::GetMigrationCapabilities,
            InfoKind::Blockstats => VmmAction::QueryBlockStats,
            InfoKind::Balloon => VmmAction::GetBalloon,
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
info name  -- show the current VM name
info network  -- show the network state
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
    "network",
    "blockstats",
    "balloon",
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
        "migrate" => parse_migrate(line, &rest),
        "migrate_incoming" => match rest.as_slice() {
            [] => bad_args("migrate_incoming: string expected", line, 1),
            [uri] => match migration::parse_uri(uri) {
                Ok(path) => HmpCommand::Action(VmmAction::Restore { path }),
                Err(e) => error_text(&e.desc),
            },
            _ => bad_args(
                "migrate_incoming: extraneous characters at the end of line",
                line,
                1,
            ),
        },
        "migrate_set_capability" => parse_set_capability(line, &rest),
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
        "network" => HmpCommand::Info(InfoKind::Network),
        "blockstats" => HmpCommand::Info(InfoKind::Blockstats),
        "balloon" => HmpCommand::Info(InfoKind::Balloon),
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

/// `migrate [-d] [-r] URI` (QEMU's `detach:-d,resume:-r,uri:s`: the flags in that order).
fn parse_migrate(line: &str, rest: &[&str]) -> HmpCommand {
    let mut i = 0;
    let mut resume = false;
    // Each flag in turn; a later flag is left for its turn, anything else is refused.
    for (flag, later) in [('d', "r"), ('r', "")] {
        let Some(opt) = rest.get(i).and_then(|w| w.strip_prefix('-')) else {
            continue;
        };
        let c = opt.chars().next().unwrap_or(' ');
        if c == flag {
            resume |= flag == 'r';
            i += 1;
        } else if !later.contains(c) {
            return bad_args(&format!("migrate: unsupported option -{c}"), line, 1);
        }
    }
    let Some(uri) = rest.get(i) else {
        return bad_args("migrate: string expected", line, 1);
    };
    if rest.len() > i + 1 {
        return bad_args("migrate: extraneous characters at the end of line", line, 1);
    }
    // `-d` changes nothing: the snapshot is taken before the command returns.
    match migration::parse_uri(uri) {
        Err(e) => error_text(&e.desc),
        Ok(_) if resume => error_text("Cannot resume if there is no paused migration"),
        Ok(path) => HmpCommand::Action(VmmAction::Snapshot { path }),
    }
}

/// `migrate_set_capability NAME on|off`.
fn parse_set_capability(line: &str, rest: &[&str]) -> HmpCommand {
    let Some(name) = rest.first() else {
        return bad_args("migrate_set_capability: string expected", line, 1);
    };
    let state = match rest.get(1) {
        Some(&"on") => true,
        Some(&"off") => false,
        _ => return bad_args("Expected 'on' or 'off'", line, 1),
    };
    if rest.len() > 2 {
        return bad_args(
            "migrate_set_capability: extraneous characters at the end of line",
            line,
            1,
        );
    }
    if !migration::QEMU_CAPABILITIES.contains(name) {
        return error_text(&format!("invalid parameter value: {name}"));
    }
    match migration::capability_changes([(*name, state)]) {
        Ok(caps) => HmpCommand::Action(VmmAction::SetMigrationCapabilities(caps)),
        Err(e) => error_text(&e.desc),
    }
}

/// The text of an `info` command from the VMM's answer to [`InfoKind::action`].
pub(crate) fn info_reply(kind: InfoKind, reply: Reply, cpu: i64) -> Result<String, CommandError> {
    match kind {
        InfoKind::Status | InfoKind::Cpus | InfoKind::Network => {
            vm_info(reply).map(|vm| info_text(kind, &vm, cpu))
        }
        InfoKind::Migrate => match reply {
            Ok(VmmResponse::Migration(info)) => Ok(crlf(&migrate_text(&info))),
            other => Err(unexpected(other)),
        },
        InfoKind::MigrateCapabilities => match reply {
            Ok(VmmResponse::MigrationCapabilities(caps)) => Ok(crlf(
                &migration::capability_states(&caps)
                    .into_iter()
                    .map(|(name, on)| format!("{name}: {}\n", if on { "on" } else { "off" }))
                    .collect::<String>(),
            )),
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
        | InfoKind::Blockstats
        | InfoKind::Balloon => String::new(),
    };
    crlf(&text)
}

/// `info migrate` as QEMU 10.1 prints it (migration/migration-hmp-cmds.c `hmp_info_migrate`),
/// with `\n` line ends. Nothing before the first migration.
pub(crate) fn migrate_text(info: &MigrationInfo) -> String {
    let mut out = String::new();
    if info.status != MigrationStatus::None {
        out.push_str(&format!("Status: \t\t{}", info.status.as_str()));
        match &info.error_desc {
            Some(e) if info.status == MigrationStatus::Failed => out.push_str(&format!(" ({e})\n")),
            _ => out.push('\n'),
        }
        if let Some(total) = info.total_time_ms.filter(|t| *t != 0) {
            out.push_str(&format!("Time (ms): \t\ttotal={total}"));
            if let Some(setup) = info.setup_time_ms {
                out.push_str(&format!(", setup={setup}"));
            }
            if let Some(down) = info.downtime_ms {
                out.push_str(&format!(", down={down}"));
            }
            out.push('\n');
        }
    }
    if let Some(ram) = &info.ram {
        // The same derived members as `query-migrate` (see `migration::ram_json`).
        out.push_str("RAM info:\n");
        out.push_str(&format!("  Throughput (Mbps): \t{:.2}\n", ram.mbps));
        out.push_str(&format!(
            "  Sizes: \t\tpagesize={}, total={}\n",
            size_to_str(4096),
            size_to_str(ram.total)
        ));
        out.push_str(&format!(
            "  Transfers: \t\ttransferred={}, remain={}\n",
            size_to_str(ram.transferred),
            size_to_str(ram.remaining)
        ));
        out.push_str(&format!(
            "    Channels: \t\tprecopy={0}, multifd={0}, postcopy={0}\n",
            size_to_str(0)
        ));
        out.push_str(&format!(
            "    Page Types: \tnormal={}, zero={}\n",
            ram.normal, ram.duplicate
        ));
        out.push_str(&format!(
            "  Page Rates (pps): \ttransfer={}\n",
            ram.pages_per_second
        ));
        out.push_str("  Others: \t\tdirty_syncs=1");
        if ram.transferred != 0 {
            out.push_str(&format!(", downtime_bytes={}", ram.transferred));
        }
        out.push('\n');
    }
    out
}

/// QEMU's `size_to_str`: IEC units, switching up once the number reaches 1000, printed `%0.3g`.
fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let x = val as f64 / (1000.0 / 1024.0);
    // frexp's exponent: x = m * 2^e with m in [0.5, 1).
    let e = if x == 0.0 {
        0
    } else {
        ((x.to_bits() >> 52) & 0x7ff) as i32 - 1022
    };
    let i = ((e - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i])
}

/// C's `%0.3g`: three significant digits, trailing zeros dropped, exponent form outside
/// 1e-4..1e3.
fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let sci = format!("{v:.2e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: &str| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if (-4..3).contains(&exp) {
        trim(&format!("{v:.*}", (2 - exp) as usize))
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exp.abs())
    }
}

/// What an HMP action prints: nothing when it worked (or was a no-op, as `stop` on a paused VM
/// is in QEMU), `Error: ...` otherwise, in QEMU's words where it has them.
pub(crate) fn action_text(
    action: &VmmAction,
    result: Result<(), ActionError>,
    restore_started: bool,
) -> String {
    match result {
        Ok(()) => String::new(),
        Err(e) if super::commands::is_noop(action, &e) => String::new(),
        Err(e) => crlf(&format!(
            "Error: {}\n",
            migration::action_error_text(action, &e, restore_started)
        )),
    }
}

#[cfg(test)]
mod tests;
