//! The HMP migration commands: `migrate [-d] [-r] URI`, `migrate_incoming URI`,
//! `migrate_cancel`, `migrate_set_capability NAME on|off`, `migrate_set_parameter NAME VALUE`,
//! and the text of `info migrate` and `info migrate_parameters` (QEMU 10.1's
//! migration/migration-hmp-cmds.c). The URIs and parameters are parsed as QMP parses them
//! ([`migration`]), so both doors take and refuse the same things.

use super::{bad_args, crlf, error_text, HmpCommand};
use crate::action::{MigrationInfo, MigrationStatus, VmmAction};
use crate::human::size_to_str;
use crate::qmp::migration::{self, params, Target};

/// What QEMU's `migrate` prints without `-d` when its monitor cannot wait (as under
/// `human-monitor-command`): the migration goes on, `info migrate` follows it.
const DETACHED: &str = "terminal does not allow synchronous migration, continuing detached\n";

/// `migrate [-d] [-r] URI` (QEMU's `detach:-d,resume:-r,uri:s`: the flags in that order).
pub(super) fn parse_migrate(line: &str, rest: &[&str]) -> HmpCommand {
    let mut i = 0;
    let (mut detach, mut resume) = (false, false);
    // Each flag in turn; a later flag is left for its turn, anything else is refused.
    for (flag, later) in [('d', "r"), ('r', "")] {
        let Some(opt) = rest.get(i).and_then(|w| w.strip_prefix('-')) else {
            continue;
        };
        let c = opt.chars().next().unwrap_or(' ');
        if c == flag {
            detach |= flag == 'd';
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
    match migration::parse_uri(uri) {
        Err(e) => error_text(&e.desc),
        Ok(_) if resume => error_text("Cannot resume if there is no paused migration"),
        // A snapshot is taken before the command returns: `-d` changes nothing.
        Ok(target @ Target::File(_)) => HmpCommand::Action(target.outgoing()),
        Ok(target) if detach => HmpCommand::Action(target.outgoing()),
        Ok(target) => HmpCommand::ActionThen(target.outgoing(), DETACHED),
    }
}

/// `migrate_incoming URI`.
pub(super) fn parse_incoming(line: &str, rest: &[&str]) -> HmpCommand {
    match rest {
        [] => bad_args("migrate_incoming: string expected", line, 1),
        [uri] => match migration::parse_uri(uri) {
            Ok(target) => HmpCommand::Action(target.incoming()),
            Err(e) => error_text(&e.desc),
        },
        _ => bad_args(
            "migrate_incoming: extraneous characters at the end of line",
            line,
            1,
        ),
    }
}

/// `migrate_set_capability NAME on|off`.
pub(super) fn parse_set_capability(line: &str, rest: &[&str]) -> HmpCommand {
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

/// `migrate_set_parameter NAME VALUE` (QEMU's `parameter:s,value:s`).
pub(super) fn parse_set_parameter(line: &str, rest: &[&str]) -> HmpCommand {
    match rest {
        [] | [_] => bad_args("migrate_set_parameter: string expected", line, 1),
        [name, value] => match params::hmp_set_action(name, value) {
            Ok(action) => HmpCommand::Action(action),
            Err(e) => HmpCommand::Text(crlf(&format!(
                "Error: {}\n{}",
                e.desc,
                e.hint.unwrap_or_default()
            ))),
        },
        _ => bad_args(
            "migrate_set_parameter: extraneous characters at the end of line",
            line,
            1,
        ),
    }
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
            let times = [
                ("setup", info.setup_time_ms),
                ("exp_down", info.expected_downtime_ms),
                ("down", info.downtime_ms),
            ];
            for (name, ms) in times {
                if let Some(ms) = ms {
                    out.push_str(&format!(", {name}={ms}"));
                }
            }
            out.push('\n');
        }
    }
    if let Some(ram) = &info.ram {
        // The same members as `query-migrate`'s (see `migration::ram_json`).
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
            "    Channels: \t\tprecopy={}, multifd={1}, postcopy={1}\n",
            size_to_str(migration::precopy_bytes(ram)),
            size_to_str(0),
        ));
        out.push_str(&format!(
            "    Page Types: \tnormal={}, zero={}\n",
            ram.normal, ram.duplicate
        ));
        out.push_str(&format!(
            "  Page Rates (pps): \ttransfer={}",
            ram.pages_per_second
        ));
        if ram.dirty_pages_rate != 0 {
            out.push_str(&format!(", dirty={}", ram.dirty_pages_rate));
        }
        out.push('\n');
        out.push_str(&format!(
            "  Others: \t\tdirty_syncs={}",
            ram.dirty_sync_count
        ));
        if ram.downtime_bytes != 0 {
            out.push_str(&format!(", downtime_bytes={}", ram.downtime_bytes));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
