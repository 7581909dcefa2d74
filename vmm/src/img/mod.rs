//! `vmm img`: disk image tooling for people used to qemu-img, with the same verbs, flags, size
//! suffixes and exit codes (create, info, check, convert, snapshot, resize), on top of the
//! `devices::block` engines.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use devices::block::qcow2::{self, CompressionType, CreateOptions};

/// Errors of the img subcommands (exit status 1, like qemu-img).
#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    /// The image engine failed.
    #[error("{0}")]
    Block(#[from] devices::block::Error),
    /// The qcow2 engine failed.
    #[error("{0}")]
    Qcow2(#[from] qcow2::Error),
    /// A host file operation failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A size argument did not parse.
    #[error("invalid size {0:?}: expected a number with an optional k/M/G/T/P/E suffix")]
    BadSize(String),
    /// An `-o` option is unknown or has a bad value.
    #[error("invalid option {0:?}")]
    BadOption(String),
    /// Anything else about how the command was used.
    #[error("{0}")]
    Usage(&'static str),
}

/// `vmm img` arguments.
#[derive(Debug, Clone, Args)]
pub struct ImgArgs {
    /// The operation.
    #[command(subcommand)]
    pub command: ImgCommand,
}

/// Output format of info/check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Text for people.
    Human,
    /// JSON like qemu-img's.
    Json,
}

/// What `check -r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RepairMode {
    /// Leaked clusters only.
    Leaks,
    /// Everything.
    All,
}

/// Formats we read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Fmt {
    /// Flat image.
    Raw,
    /// qcow2.
    Qcow2,
}

impl From<Fmt> for devices::block::ImageFormat {
    fn from(f: Fmt) -> Self {
        match f {
            Fmt::Raw => devices::block::ImageFormat::Raw,
            Fmt::Qcow2 => devices::block::ImageFormat::Qcow2,
        }
    }
}

/// The qemu-img verbs we implement.
#[derive(Debug, Clone, Subcommand)]
pub enum ImgCommand {
    /// Create an image: create [-f FMT] [-b BACKING [-F FMT]] [-o OPTS] FILE [SIZE]
    Create {
        /// Image format.
        #[arg(short = 'f', value_enum, default_value = "raw")]
        fmt: Fmt,
        /// Backing file (relative names are relative to FILE's directory).
        #[arg(short = 'b')]
        backing: Option<String>,
        /// Backing file format.
        #[arg(short = 'F', value_enum)]
        backing_fmt: Option<Fmt>,
        /// Options: cluster_size, compat, refcount_bits, lazy_refcounts, compression_type,
        /// backing_file, backing_fmt.
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Quiet.
        #[arg(short = 'q')]
        quiet: bool,
        /// Image file.
        file: PathBuf,
        /// Virtual size (64M, 10G, ...); defaults to the backing file's size.
        size: Option<String>,
    },
    /// Show information about an image.
    Info {
        /// Image format (probed if absent).
        #[arg(short = 'f', value_enum)]
        fmt: Option<Fmt>,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Open even if in use (accepted for compatibility).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Image file.
        file: PathBuf,
    },
    /// Check an image for consistency. Exit: 0 clean, 2 corrupt, 3 leaks only, 1 failed.
    Check {
        /// Image format (probed if absent).
        #[arg(short = 'f', value_enum)]
        fmt: Option<Fmt>,
        /// Repair leaks or all problems.
        #[arg(short = 'r', value_enum)]
        repair: Option<RepairMode>,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Quiet.
        #[arg(short = 'q')]
        quiet: bool,
        /// Open even if in use (accepted for compatibility).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Image file.
        file: PathBuf,
    },
    /// Convert an image: convert [-c] [-f FMT] [-O FMT] [-o OPTS] [-p] SRC DST
    Convert {
        /// Compress the output (qcow2).
        #[arg(short = 'c')]
        compress: bool,
        /// Source format (probed if absent).
        #[arg(short = 'f', value_enum)]
        fmt: Option<Fmt>,
        /// Output format.
        #[arg(short = 'O', value_enum, default_value = "raw")]
        out_fmt: Fmt,
        /// Output options (as for create).
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        /// Quiet.
        #[arg(short = 'q')]
        quiet: bool,
        /// Open the source even if in use (accepted for compatibility).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Source image.
        src: PathBuf,
        /// Destination image.
        dst: PathBuf,
    },
    /// List, create, apply or delete internal snapshots.
    Snapshot {
        /// List snapshots.
        #[arg(short = 'l', group = "op")]
        list: bool,
        /// Create a snapshot.
        #[arg(short = 'c', group = "op")]
        create: Option<String>,
        /// Revert the disk to a snapshot.
        #[arg(short = 'a', group = "op")]
        apply: Option<String>,
        /// Delete a snapshot.
        #[arg(short = 'd', group = "op")]
        delete: Option<String>,
        /// Quiet.
        #[arg(short = 'q')]
        quiet: bool,
        /// Open even if in use (accepted for compatibility).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Image file.
        file: PathBuf,
    },
    /// Grow an image: resize FILE [+]SIZE
    Resize {
        /// Image format (probed if absent).
        #[arg(short = 'f', value_enum)]
        fmt: Option<Fmt>,
        /// Allow shrinking (raw only).
        #[arg(long)]
        shrink: bool,
        /// Quiet.
        #[arg(short = 'q')]
        quiet: bool,
        /// Image file.
        file: PathBuf,
        /// New size, or +SIZE / -SIZE relative to the current one.
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
}

/// Parses qemu-img sizes: bytes, or a number with k/K, M, G, T, P, E (binary) suffix.
pub fn parse_size(s: &str) -> Result<u64, ImgError> {
    let bad = || ImgError::BadSize(s.to_string());
    let t = s.trim();
    let (num, shift) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = api::human::suffix_shift(Some(c)).ok_or_else(bad)?;
            (&t[..t.len() - 1], shift)
        }
        _ => (t, 0),
    };
    if num.is_empty() || num.starts_with('-') || num.starts_with('+') {
        return Err(bad());
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes = v * (1u64 << shift) as f64;
    if !bytes.is_finite() || !(0.0..1.8e19).contains(&bytes) || bytes.fract() != 0.0 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Applies `-o key=value,...` options to qcow2 create options.
pub fn apply_options(o: &mut CreateOptions, opts: &[String]) -> Result<(), ImgError> {
    for item in opts
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let bad = || ImgError::BadOption(item.to_string());
        let (k, v) = item.split_once('=').ok_or_else(bad)?;
        match k {
            "cluster_size" => {
                let cs = parse_size(v)?;
                if !cs.is_power_of_two() {
                    return Err(bad());
                }
                o.cluster_bits = cs.trailing_zeros();
            }
            "compat" => {
                o.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(bad()),
                }
            }
            "refcount_bits" => {
                let b: u64 = v.parse().map_err(|_| bad())?;
                if !b.is_power_of_two() || b > 64 {
                    return Err(bad());
                }
                o.refcount_order = b.trailing_zeros();
            }
            "lazy_refcounts" => o.lazy_refcounts = matches!(v, "on" | "true" | "yes"),
            "compression_type" => {
                o.compression_type = match v {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => return Err(bad()),
                }
            }
            "backing_file" => o.backing_file = Some(v.to_string()),
            "backing_fmt" => o.backing_format = Some(v.to_string()),
            "size" => o.size = parse_size(v)?,
            "preallocation" if v == "off" => {}
            "extended_l2" if v == "off" => {}
            _ => return Err(bad()),
        }
    }
    Ok(())
}

/// Runs one img command and returns the process exit status.
pub fn run(args: &ImgArgs) -> ExitCode {
    match commands::run(args.command.clone()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vmm img: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu_img() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1G").is_err());
    }

    #[test]
    fn create_options() {
        let mut o = CreateOptions::new(0);
        apply_options(
            &mut o,
            &[
                "cluster_size=4k,compat=0.10".into(),
                "refcount_bits=16".into(),
            ],
        )
        .unwrap();
        assert_eq!((o.cluster_bits, o.version, o.refcount_order), (12, 2, 4));
        assert!(apply_options(&mut o, &["bogus=1".into()]).is_err());
        assert!(apply_options(&mut o, &["cluster_size=3000".into()]).is_err());
    }
}
