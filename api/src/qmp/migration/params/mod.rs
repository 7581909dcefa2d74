//! The migration parameters (QEMU's `MigrationParameters`, qapi/migration.json): QMP's
//! `migrate-set-parameters` and `query-migrate-parameters`, HMP's `migrate_set_parameter` and
//! `info migrate_parameters`, and QEMU's number parsers for the HMP values.
//!
//! This VMM implements `downtime-limit` and `max-bandwidth` ([`MigrationParameters`]). QEMU
//! 10.1's other parameters are known as well: their values are type-checked as QEMU checks them,
//! `query-migrate-parameters` reports them with the constant QEMU has by default (which is what
//! this VMM does: no TLS, no multifd, no throttling, no XBZRLE, no postcopy, no announce
//! tuning), and setting one to that value is accepted and changes nothing. Any other value is
//! refused, naming the parameter, the way a capability may be switched off but not on.

use serde_json::{Map, Value};

use crate::action::{MigrationParameters, MigrationParametersUpdate, VmmAction};
use crate::qmp::commands::CommandError;

/// A parameter's QAPI type, as QMP's input visitor checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    /// `uint8`.
    U8,
    /// `uint32`.
    U32,
    /// `uint64` or `size` (the same to QMP; HMP parses a `size` with its suffixes).
    U64,
    /// `bool`.
    Bool,
    /// `StrOrNull`: the TLS strings, `null` meaning the empty string.
    StrOrNull,
    /// An enum, with its member names.
    Enum(&'static [&'static str]),
    /// `block-bitmap-mapping`'s list of objects.
    Array,
}

/// What a parameter is in this VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// [`MigrationParameters::downtime_limit_ms`].
    DowntimeLimit,
    /// [`MigrationParameters::max_bandwidth`].
    MaxBandwidth,
    /// Not implemented: fixed at QEMU's default, which is what this VMM does.
    Fixed(Fixed),
    /// Not implemented, and left out of QEMU's answer while unset (`block-bitmap-mapping`).
    Absent,
}

/// A fixed parameter's value (QEMU's default, migration/options.c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fixed {
    /// A number.
    Num(u64),
    /// A boolean.
    Bool(bool),
    /// A string or an enum member's name.
    Str(&'static str),
}

impl Fixed {
    fn json(self) -> Value {
        match self {
            Fixed::Num(n) => n.into(),
            Fixed::Bool(b) => b.into(),
            Fixed::Str(s) => s.into(),
        }
    }

    /// Whether `v` (type-checked) sets this very value; `null` resets a TLS string to "".
    fn is(self, v: &Value) -> bool {
        match self {
            Fixed::Num(n) => uint64(v) == Some(n),
            Fixed::Bool(b) => v.as_bool() == Some(b),
            Fixed::Str(s) => v.as_str() == Some(s) || (s.is_empty() && v.is_null()),
        }
    }
}

/// One of QEMU's migration parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Param {
    /// QEMU's name.
    pub(crate) name: &'static str,
    /// Its type.
    pub(crate) ty: Ty,
    /// What it is here.
    pub(crate) kind: Kind,
}

const fn fixed(name: &'static str, ty: Ty, value: Fixed) -> Param {
    Param {
        name,
        ty,
        kind: Kind::Fixed(value),
    }
}

const fn num(name: &'static str, ty: Ty, n: u64) -> Param {
    fixed(name, ty, Fixed::Num(n))
}

/// `MultiFDCompression` (`zstd`, `qatzip`, `qpl` and `uadk` exist in QEMU builds that have them).
const MULTIFD_COMPRESSION: &[&str] = &["none", "zlib", "zstd", "qatzip", "qpl", "uadk"];
/// `MigMode`.
const MIG_MODE: &[&str] = &["normal", "cpr-reboot", "cpr-transfer"];
/// `ZeroPageDetection`.
const ZERO_PAGE_DETECTION: &[&str] = &["none", "legacy", "multifd"];

/// QEMU 10.1's `MigrateSetParameters` members in its order (also `MigrationParameters`' and
/// `MigrationParameter`'s), with their types and QEMU's defaults.
pub(crate) const QEMU_PARAMETERS: [Param; 29] = [
    num("announce-initial", Ty::U64, 50),
    num("announce-max", Ty::U64, 550),
    num("announce-rounds", Ty::U64, 5),
    num("announce-step", Ty::U64, 100),
    num("throttle-trigger-threshold", Ty::U8, 50),
    num("cpu-throttle-initial", Ty::U8, 20),
    num("cpu-throttle-increment", Ty::U8, 10),
    fixed("cpu-throttle-tailslow", Ty::Bool, Fixed::Bool(false)),
    fixed("tls-creds", Ty::StrOrNull, Fixed::Str("")),
    fixed("tls-hostname", Ty::StrOrNull, Fixed::Str("")),
    fixed("tls-authz", Ty::StrOrNull, Fixed::Str("")),
    Param {
        name: "max-bandwidth",
        ty: Ty::U64,
        kind: Kind::MaxBandwidth,
    },
    num("avail-switchover-bandwidth", Ty::U64, 0),
    Param {
        name: "downtime-limit",
        ty: Ty::U64,
        kind: Kind::DowntimeLimit,
    },
    num("x-checkpoint-delay", Ty::U32, 20_000),
    num("multifd-channels", Ty::U8, 2),
    num("xbzrle-cache-size", Ty::U64, 64 << 20),
    num("max-postcopy-bandwidth", Ty::U64, 0),
    num("max-cpu-throttle", Ty::U8, 99),
    fixed(
        "multifd-compression",
        Ty::Enum(MULTIFD_COMPRESSION),
        Fixed::Str("none"),
    ),
    num("multifd-zlib-level", Ty::U8, 1),
    num("multifd-qatzip-level", Ty::U8, 1),
    num("multifd-zstd-level", Ty::U8, 1),
    Param {
        name: "block-bitmap-mapping",
        ty: Ty::Array,
        kind: Kind::Absent,
    },
    num("x-vcpu-dirty-limit-period", Ty::U64, 1000),
    num("vcpu-dirty-limit", Ty::U64, 1),
    fixed("mode", Ty::Enum(MIG_MODE), Fixed::Str("normal")),
    fixed(
        "zero-page-detection",
        Ty::Enum(ZERO_PAGE_DETECTION),
        Fixed::Str("multifd"),
    ),
    fixed("direct-io", Ty::Bool, Fixed::Bool(false)),
];

/// The parameter named `name`.
fn find(name: &str) -> Option<&'static Param> {
    QEMU_PARAMETERS.iter().find(|p| p.name == name)
}

/// A QMP `uint64`: QEMU takes a negative integer as its two's complement (for compatibility).
fn uint64(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_i64().map(|i| i as u64))
}

/// The type check of a `migrate-set-parameters` member, in QEMU's words (its QObject input
/// visitor: `uintN` and `size` go through `uint64` first, then the range).
pub(crate) fn check_member(name: &str, v: &Value) -> Result<(), CommandError> {
    let Some(p) = find(name) else {
        return Ok(());
    };
    let type_err = |expected: &str| {
        Err(CommandError::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        )))
    };
    let expects = |what: &str| {
        Err(CommandError::generic(format!(
            "Parameter '{name}' expects {what}"
        )))
    };
    match p.ty {
        Ty::U8 | Ty::U32 | Ty::U64 => match uint64(v) {
            None => expects("uint64"),
            Some(n) if p.ty == Ty::U8 && n > u64::from(u8::MAX) => expects("uint8"),
            Some(n) if p.ty == Ty::U32 && n > u64::from(u32::MAX) => expects("uint32"),
            Some(_) => Ok(()),
        },
        Ty::Bool if !v.is_boolean() => type_err("boolean"),
        Ty::StrOrNull if !(v.is_string() || v.is_null()) => type_err("StrOrNull"),
        Ty::Enum(names) => match v.as_str() {
            None => type_err("string"),
            Some(s) if !names.contains(&s) => Err(CommandError::generic(format!(
                "Parameter '{name}' does not accept value '{s}'"
            ))),
            Some(_) => Ok(()),
        },
        Ty::Array => match v.as_array() {
            None => type_err("array"),
            Some(items) => match items.iter().position(|i| !i.is_object()) {
                Some(i) => Err(CommandError::generic(format!(
                    "Invalid parameter type for '{name}[{i}]', expected: object"
                ))),
                None => Ok(()),
            },
        },
        Ty::Bool | Ty::StrOrNull => Ok(()),
    }
}

/// Why a parameter this VMM does not implement cannot be changed.
fn not_supported(name: &str) -> CommandError {
    CommandError::generic(format!(
        "migration parameter '{name}' is not supported by this VMM (it implements \
         downtime-limit and max-bandwidth)"
    ))
}

/// `migrate-set-parameters`' members (type-checked by [`check_member`]) as the change to make:
/// ours are taken, the others refused unless they keep their value; then QEMU's range checks.
pub(crate) fn set_action(args: &Map<String, Value>) -> Result<VmmAction, CommandError> {
    let mut update = MigrationParametersUpdate::default();
    for p in &QEMU_PARAMETERS {
        let Some(v) = args.get(p.name) else {
            continue;
        };
        match p.kind {
            Kind::DowntimeLimit => update.downtime_limit_ms = uint64(v),
            Kind::MaxBandwidth => update.max_bandwidth = uint64(v),
            Kind::Fixed(f) if f.is(v) => {}
            Kind::Fixed(_) | Kind::Absent => return Err(not_supported(p.name)),
        }
    }
    update.check().map_err(CommandError::generic)?;
    Ok(VmmAction::SetMigrationParameters(update))
}

/// `query-migrate-parameters`' answer: every member QEMU 10.1 reports, ours with their values.
pub(crate) fn query_json(ours: &MigrationParameters) -> Value {
    let mut m = Map::new();
    for p in &QEMU_PARAMETERS {
        let v = match p.kind {
            Kind::DowntimeLimit => ours.downtime_limit_ms.into(),
            Kind::MaxBandwidth => ours.max_bandwidth.into(),
            Kind::Fixed(f) => f.json(),
            Kind::Absent => continue,
        };
        m.insert(p.name.into(), v);
    }
    Value::Object(m)
}

/// `info migrate_parameters`' lines in QEMU 10.1's order (migration-hmp-cmds.c
/// `hmp_info_migrate_parameters`), each with its unit.
const HMP_LINES: &[(&str, &str)] = &[
    ("announce-initial", " ms"),
    ("announce-max", " ms"),
    ("announce-rounds", ""),
    ("announce-step", " ms"),
    ("throttle-trigger-threshold", ""),
    ("cpu-throttle-initial", ""),
    ("cpu-throttle-increment", ""),
    ("cpu-throttle-tailslow", ""),
    ("max-cpu-throttle", ""),
    ("tls-creds", ""),
    ("tls-hostname", ""),
    ("max-bandwidth", " bytes/second"),
    ("avail-switchover-bandwidth", " bytes/second"),
    ("downtime-limit", " ms"),
    ("x-checkpoint-delay", " ms"),
    ("multifd-channels", ""),
    ("multifd-compression", ""),
    ("zero-page-detection", ""),
    ("xbzrle-cache-size", " bytes"),
    ("max-postcopy-bandwidth", ""),
    ("tls-authz", ""),
    ("x-vcpu-dirty-limit-period", " ms"),
    ("vcpu-dirty-limit", " MB/s"),
    ("mode", ""),
    ("direct-io", ""),
];

/// `info migrate_parameters` (with `\n` line ends).
pub(crate) fn info_text(ours: &MigrationParameters) -> String {
    let all = query_json(ours);
    HMP_LINES
        .iter()
        .map(|(name, unit)| {
            let value = match &all[*name] {
                Value::Bool(b) => (if *b { "on" } else { "off" }).to_string(),
                Value::String(s) if find(name).is_some_and(|p| p.ty == Ty::StrOrNull) => {
                    format!("'{s}'")
                }
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            format!("{name}: {value}{unit}\n")
        })
        .collect()
}

/// Why `migrate_set_parameter` failed: QEMU's error, and the hint it prints after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HmpError {
    /// The error.
    pub(crate) desc: String,
    /// The lines QEMU adds (each ending in `\n`), if any.
    pub(crate) hint: Option<&'static str>,
}

impl From<CommandError> for HmpError {
    fn from(e: CommandError) -> HmpError {
        HmpError {
            desc: e.desc,
            hint: None,
        }
    }
}

/// QEMU's hint after a bad size (util/qemu-option.c `parse_option_size`).
const SIZE_HINT: &str = "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, \
                         peta-\nand exabytes, respectively.\n";

/// `migrate_set_parameter NAME VALUE` as QEMU's `hmp_migrate_set_parameter` parses VALUE (sizes
/// take suffixes, bytes by default but MiB for the bandwidths; integers take `0x`; booleans
/// `on`/`off`), then the same checks as `migrate-set-parameters`.
pub(crate) fn hmp_set_action(name: &str, text: &str) -> Result<VmmAction, HmpError> {
    let err = |desc: String| HmpError { desc, hint: None };
    let Some(p) = find(name) else {
        return Err(err(format!("invalid parameter value: {name}")));
    };
    let invalid_size = || err(format!("Invalid size {text}"));
    let value: Value = match p.ty {
        Ty::Array => {
            return Err(err(format!(
                "The {name} parameter can only be set through QMP"
            )))
        }
        Ty::U64 if matches!(name, "max-bandwidth" | "avail-switchover-bandwidth") => {
            match strtosz(text, 'M') {
                Ok(n) if n <= i64::MAX as u64 => n.into(),
                _ => return Err(invalid_size()),
            }
        }
        Ty::U64 => match strtosz(text, 'B') {
            Ok(n) if name == "xbzrle-cache-size" && n > i64::MAX as u64 => {
                return Err(invalid_size())
            }
            Ok(n) => n.into(),
            Err(SizeError::Range) => {
                return Err(err(format!(
                    "Value '{text}' is out of range for parameter '{name}'"
                )))
            }
            Err(SizeError::Invalid) => {
                return Err(HmpError {
                    desc: format!("Parameter '{name}' expects a non-negative number below 2^64"),
                    hint: Some(SIZE_HINT),
                })
            }
        },
        Ty::U8 | Ty::U32 => match strtou64(text) {
            None => return Err(err(format!("Parameter '{name}' expects uint64"))),
            Some(n) => n.into(),
        },
        Ty::Bool => match text {
            "on" | "yes" | "true" | "y" => true.into(),
            "off" | "no" | "false" | "n" => false.into(),
            _ => return Err(err(format!("Parameter '{name}' expects 'on' or 'off'"))),
        },
        Ty::StrOrNull | Ty::Enum(_) => text.into(),
    };
    check_member(name, &value)?;
    let mut args = Map::new();
    args.insert(name.into(), value);
    Ok(set_action(&args)?)
}

/// Why [`strtosz`] failed: QEMU's `-EINVAL` and `-ERANGE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SizeError {
    /// Not a size.
    Invalid,
    /// More than 2^64 - 1.
    Range,
}

/// QEMU's `qemu_strtosz` (util/cutils.c `do_strtosz`): decimal with an optional fraction and an
/// optional suffix (`default_suffix` when there is none; a fraction needs a unit above bytes,
/// rounded to the nearest byte), or `0x` hex without fraction or suffix. Leading white space is
/// skipped; anything after the number is an error.
pub(crate) fn strtosz(text: &str, default_suffix: char) -> Result<u64, SizeError> {
    let s = text.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (int_part, mut rest) = s.split_at(digits);
    let mut val: u64;
    let mut valf: u64 = 0;
    if int_part == "0" && (rest.starts_with('x') || rest.starts_with('X')) {
        let hex = &rest[1..];
        let end = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        rest = &hex[end..];
        if end == 0
            || rest.starts_with('.')
            || crate::human::suffix_shift(rest.chars().next()).is_some()
        {
            return Err(SizeError::Invalid);
        }
        val = u64::from_str_radix(&hex[..end], 16).map_err(|_| SizeError::Range)?;
    } else {
        val = match int_part {
            "" => 0,
            _ => int_part.parse().map_err(|_| SizeError::Range)?,
        };
        if let Some(after) = rest.strip_prefix('.') {
            let end = after
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after.len());
            if int_part.is_empty() && end == 0 {
                return Err(SizeError::Invalid);
            }
            let fraction: f64 = format!("0.{}", &after[..end]).parse().unwrap_or(0.0);
            rest = &after[end..];
            if fraction >= 1.0 {
                val = val.checked_add(1).ok_or(SizeError::Range)?;
            } else {
                // A 64-bit fixed-point fraction, non-zero for any non-zero fraction.
                valf = (fraction * 18_446_744_073_709_551_616.0) as u64;
                if valf == 0 && fraction > 0.0 {
                    valf = 1;
                }
            }
        } else if int_part.is_empty() {
            return Err(SizeError::Invalid);
        }
    }
    let shift = match crate::human::suffix_shift(rest.chars().next()) {
        Some(shift) => {
            rest = &rest[1..];
            shift
        }
        None => crate::human::suffix_shift(Some(default_suffix)).unwrap_or(0),
    };
    if !rest.is_empty() || (shift == 0 && valf != 0) {
        return Err(SizeError::Invalid);
    }
    // 64.64 fixed point times the unit, the fraction rounded half up.
    let frac = u128::from(valf) << shift;
    let total = (u128::from(val) << shift) + (frac >> 64) + ((frac >> 63) & 1);
    u64::try_from(total).map_err(|_| SizeError::Range)
}

/// QEMU's `qemu_strtou64` with base 0, as its string input visitor parses an integer: decimal,
/// `0x` hex or `0` octal, after optional white space and sign (a negative number wraps, as
/// `strtoull` does); the whole text must be the number.
pub(crate) fn strtou64(text: &str) -> Option<u64> {
    let s = text.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (digits, radix) = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (hex, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let n = u64::from_str_radix(digits, radix).ok()?;
    Some(if negative { n.wrapping_neg() } else { n })
}

#[cfg(test)]
mod tests;
