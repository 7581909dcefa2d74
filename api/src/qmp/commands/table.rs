//! The command table: every QMP command with its arguments (qapi/*.json), and their checks in
//! QEMU's order and words (`qmp_dispatch` and the QObject input visitor).

use serde_json::{Map, Value};

use super::CommandError;
use crate::qmp::{migration, migration::params};

#[derive(Clone, Copy)]
pub(super) enum ArgType {
    Str,
    Int,
    Bool,
    StrList,
    /// Any array (its elements are checked by the command).
    Array,
    /// Checked by this function, given the argument's name and value.
    Custom(fn(&str, &Value) -> Result<(), CommandError>),
    /// Any JSON value (checked by the command).
    Any,
}

#[derive(Clone, Copy)]
pub(super) struct Arg {
    pub(super) name: &'static str,
    pub(super) ty: ArgType,
    pub(super) required: bool,
}

const NO_ARGS: &[Arg] = &[];

/// Every command, with its arguments (qapi/*.json).
pub(super) const COMMANDS: &[(&str, &[Arg])] = &[
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
        "set_link",
        &[
            Arg {
                name: "name",
                ty: ArgType::Str,
                required: true,
            },
            Arg {
                name: "up",
                ty: ArgType::Bool,
                required: true,
            },
        ],
    ),
    (
        "migrate",
        &[
            Arg {
                name: "uri",
                ty: ArgType::Str,
                required: false,
            },
            Arg {
                name: "channels",
                ty: ArgType::Array,
                required: false,
            },
            Arg {
                name: "detach",
                ty: ArgType::Bool,
                required: false,
            },
            Arg {
                name: "resume",
                ty: ArgType::Bool,
                required: false,
            },
        ],
    ),
    (
        "migrate-incoming",
        &[
            Arg {
                name: "uri",
                ty: ArgType::Str,
                required: false,
            },
            Arg {
                name: "channels",
                ty: ArgType::Array,
                required: false,
            },
            Arg {
                name: "exit-on-error",
                ty: ArgType::Bool,
                required: false,
            },
        ],
    ),
    ("query-migrate", NO_ARGS),
    (
        "query-blockstats",
        &[Arg {
            name: "query-nodes",
            ty: ArgType::Bool,
            required: false,
        }],
    ),
    (
        "migrate-set-capabilities",
        &[Arg {
            name: "capabilities",
            ty: ArgType::Custom(migration::check_capability_list),
            required: true,
        }],
    ),
    ("query-migrate-capabilities", NO_ARGS),
    ("migrate-set-parameters", &SET_PARAMETERS_ARGS),
    ("query-migrate-parameters", NO_ARGS),
    ("migrate_cancel", NO_ARGS),
    // Not a QEMU name (QEMU 10 has only `migrate_cancel`); accepted for clients that spell
    // every command in kebab-case.
    ("migrate-cancel", NO_ARGS),
    (
        "balloon",
        &[Arg {
            name: "value",
            ty: ArgType::Int,
            required: true,
        }],
    ),
    ("query-balloon", NO_ARGS),
    (
        "qom-list",
        &[Arg {
            name: "path",
            ty: ArgType::Str,
            required: true,
        }],
    ),
    (
        "qom-get",
        &[
            Arg {
                name: "path",
                ty: ArgType::Str,
                required: true,
            },
            Arg {
                name: "property",
                ty: ArgType::Str,
                required: true,
            },
        ],
    ),
    (
        "qom-set",
        &[
            Arg {
                name: "path",
                ty: ArgType::Str,
                required: true,
            },
            Arg {
                name: "property",
                ty: ArgType::Str,
                required: true,
            },
            Arg {
                name: "value",
                ty: ArgType::Any,
                required: true,
            },
        ],
    ),
    ("snapshot-save", &SNAPSHOT_ARGS),
    ("snapshot-load", &SNAPSHOT_ARGS),
    ("snapshot-delete", &SNAPSHOT_DELETE_ARGS),
    ("query-jobs", NO_ARGS),
    (
        "job-dismiss",
        &[Arg {
            name: "id",
            ty: ArgType::Str,
            required: true,
        }],
    ),
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

/// `snapshot-save`'s and `snapshot-load`'s members, all mandatory (qapi/migration.json).
const SNAPSHOT_ARGS: [Arg; 4] = [
    Arg {
        name: "job-id",
        ty: ArgType::Str,
        required: true,
    },
    Arg {
        name: "tag",
        ty: ArgType::Str,
        required: true,
    },
    Arg {
        name: "vmstate",
        ty: ArgType::Str,
        required: true,
    },
    Arg {
        name: "devices",
        ty: ArgType::StrList,
        required: true,
    },
];

/// `snapshot-delete`'s: no `vmstate`.
const SNAPSHOT_DELETE_ARGS: [Arg; 3] = [SNAPSHOT_ARGS[0], SNAPSHOT_ARGS[1], SNAPSHOT_ARGS[3]];

/// `migrate-set-parameters`' members: every `MigrateSetParameters` member QEMU 10.1 knows, each
/// checked as QEMU's visitor checks its type ([`params::check_member`]).
const SET_PARAMETERS_ARGS: [Arg; params::QEMU_PARAMETERS.len()] = member_args();

const fn member_args<const N: usize>() -> [Arg; N] {
    let mut out = [Arg {
        name: "",
        ty: ArgType::Any,
        required: false,
    }; N];
    let mut i = 0;
    while i < N {
        out[i] = Arg {
            name: params::QEMU_PARAMETERS[i].name,
            ty: ArgType::Custom(params::check_member),
            required: false,
        };
        i += 1;
    }
    out
}

/// The names of all commands, as `query-commands` lists them.
pub fn command_names() -> impl Iterator<Item = &'static str> {
    COMMANDS.iter().map(|(n, _)| *n)
}

/// Checks `args` against `schema` in QEMU's order: each declared member (missing, wrong type),
/// then members nobody declared.
pub(super) fn validate(schema: &[Arg], args: &Map<String, Value>) -> Result<(), CommandError> {
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
            ArgType::Bool if !v.is_boolean() => return Err(type_err(arg.name, "boolean")),
            ArgType::Array if !v.is_array() => return Err(type_err(arg.name, "array")),
            ArgType::Custom(check) => check(arg.name, v)?,
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
