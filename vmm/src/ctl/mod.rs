//! `vmm ctl`: a client for people, over the REST API socket of a running VMM.
//!
//! The guest's figures and the typed agent operations (`metrics`, `domifaddr`, `fsinfo`,
//! `osinfo`, `fsfreeze`, `fsthaw`, `set-time`, `guest-shutdown`) print as tables the way virsh
//! prints them ([`guest`]).
//!
//! Live migration ([`migrate`]): `vmm ctl migrate URI [--wait]` starts one (with `--wait` it
//! follows it to the end and exits non-zero unless it completed), `migrate-incoming URI`,
//! `migrate-cancel`, and `migrate-params [--downtime-limit MS] [--max-bandwidth BYTES]`.
//!
//! Whole-VM snapshots inside the VM's qcow2 disks ([`savevm`]): `vmm ctl savevm TAG
//! [--overwrite] [--vmstate ID] [--devices ID,ID]`, `loadvm TAG`, `delvm TAG`, and `snapshots
//! [--json]`, printed as QEMU's `info snapshots`.
//!
//! `vmm ctl --api-socket PATH pause|resume|power-button|reset|shutdown|info|version|migration|
//! nics`, `vmm ctl --api-socket PATH snapshot|restore FILE`, `vmm ctl --api-socket PATH
//! set-link ID on|off` and `vmm ctl --api-socket PATH rate-limit ID [--rx-bps N] [--tx-bps N]
//! [--rx-pps N] [--tx-pps N]`, `vmm ctl --api-socket PATH agent COMMAND [ARGS-JSON]
//! [--timeout S]` (the guest agent's answer is printed) send one HTTP/1.1 request
//! (`Connection: close`), read the response with `httparse`, print the JSON of
//! `info`/`version`/`migration` indented, and turn every failure into one clear line and a
//! non-zero exit status. FILE, and the socket of a `unix:` migration URI, are made absolute
//! against the current directory first: the VMM's working directory is not ours.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

mod guest;
mod migrate;
mod savevm;

/// How long `vmm ctl` waits for the VMM.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Largest response accepted.
const MAX_RESPONSE: usize = 4 << 20;

/// `vmm ctl` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// The running VMM's API socket (its --api-socket).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// A `vmm ctl` command.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum CtlCommand {
    /// Stop the vCPUs.
    Pause,
    /// Restart the vCPUs.
    Resume,
    /// Press the ACPI power button (clean guest shutdown).
    PowerButton,
    /// Hardware reset.
    Reset,
    /// Stop the VM now; the VMM exits.
    Shutdown,
    /// Show the VM's state, configuration and vCPUs.
    Info,
    /// Show the VMM's version.
    Version,
    /// Save the VM's state to FILE; the VM stays paused afterwards (`resume` continues it).
    Snapshot {
        /// The state file to write (created or truncated).
        #[arg(value_name = "FILE")]
        path: PathBuf,
    },
    /// Restore the VM from FILE, into a VMM started to wait for it (`--incoming defer`).
    Restore {
        /// The state file written by `snapshot`.
        #[arg(value_name = "FILE")]
        path: PathBuf,
    },
    /// Show the status and statistics of the live migration in progress, or of the last
    /// migration, snapshot or restore.
    Migration,
    /// Start a live migration to a VMM waiting for it at URI (see `migrate-incoming`); the VM
    /// stays paused here once the destination has it.
    Migrate {
        /// Where the destination listens: tcp:HOST:PORT, tcp:[IPV6]:PORT or unix:PATH.
        #[arg(value_name = "URI")]
        uri: String,
        /// Follow the migration to its end; the exit status is non-zero unless it completed.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel the live migration in progress (the VM goes on here); nothing to cancel is fine.
    MigrateCancel,
    /// Show the migration parameters, or change those given.
    MigrateParams {
        /// The longest the guest may be stopped for the last round, ms (QEMU's downtime-limit).
        #[arg(long, value_name = "MS")]
        downtime_limit: Option<u64>,
        /// The most bytes per second to send, 0 for no limit (QEMU's max-bandwidth).
        #[arg(long, value_name = "BYTES")]
        max_bandwidth: Option<u64>,
    },
    /// Receive a live migration at URI, into a VMM started to wait for it (`--incoming defer`).
    MigrateIncoming {
        /// Where to listen: tcp:HOST:PORT (an empty HOST or 0: every address) or unix:PATH.
        #[arg(value_name = "URI")]
        uri: String,
    },
    /// Take a whole-VM snapshot TAG inside the VM's qcow2 disks (QEMU's savevm): the VM state
    /// into one disk, an internal snapshot of every writable disk. The VM goes on afterwards.
    Savevm {
        /// The snapshot's name.
        #[arg(value_name = "TAG")]
        tag: String,
        /// Replace a snapshot of that name (as QEMU's HMP savevm does); without it, an
        /// existing one is an error (as QMP's snapshot-save).
        #[arg(long)]
        overwrite: bool,
        /// The disk (its id) that keeps the VM state; the first writable qcow2 disk by default.
        #[arg(long, value_name = "ID")]
        vmstate: Option<String>,
        /// The disks (their ids, comma-separated) to snapshot; every writable disk by default.
        #[arg(long, value_name = "ID,ID", value_delimiter = ',')]
        devices: Option<Vec<String>>,
    },
    /// Go back to the whole-VM snapshot TAG (QEMU's loadvm): every disk reverts to it and the
    /// VM continues from its state.
    Loadvm {
        /// The snapshot's name.
        #[arg(value_name = "TAG")]
        tag: String,
        /// The disk (its id) that keeps the VM state; the first writable qcow2 disk by default.
        #[arg(long, value_name = "ID")]
        vmstate: Option<String>,
        /// The disks (their ids, comma-separated) to revert; every writable disk by default.
        #[arg(long, value_name = "ID,ID", value_delimiter = ',')]
        devices: Option<Vec<String>>,
    },
    /// Delete the whole-VM snapshot TAG from the disks (QEMU's delvm).
    Delvm {
        /// The snapshot's name.
        #[arg(value_name = "TAG")]
        tag: String,
        /// The disks (their ids, comma-separated); every writable disk by default.
        #[arg(long, value_name = "ID,ID", value_delimiter = ',')]
        devices: Option<Vec<String>>,
    },
    /// List the internal snapshots of the VM's disks, as QEMU's `info snapshots` does.
    Snapshots {
        /// Print the JSON answer (every disk and its snapshots) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// List the network cards (like `virsh domiflist`), with link state and counters.
    Nics,
    /// Change a network card's rate limits while it runs. A direction named by an option is
    /// replaced as a whole (bytes and frames per second; 0 removes that bucket); the other
    /// direction is kept.
    RateLimit {
        /// The NIC's id (see `nics`).
        #[arg(value_name = "ID")]
        id: String,
        /// Bytes per second the guest may receive.
        #[arg(long, value_name = "N")]
        rx_bps: Option<u64>,
        /// Frames per second the guest may receive.
        #[arg(long, value_name = "N")]
        rx_pps: Option<u64>,
        /// Bytes per second the guest may send.
        #[arg(long, value_name = "N")]
        tx_bps: Option<u64>,
        /// Frames per second the guest may send.
        #[arg(long, value_name = "N")]
        tx_pps: Option<u64>,
    },
    /// Run a QEMU guest agent command in the guest (like `virsh qemu-agent-command`) and
    /// print its answer; the VM needs the built-in agent channel (`--agent`).
    Agent {
        /// The agent command, e.g. guest-ping, guest-network-get-interfaces, guest-get-fsinfo.
        #[arg(value_name = "COMMAND")]
        command: String,
        /// Its arguments as a JSON object, e.g. '{"path": "/etc/hostname", "mode": "r"}'.
        #[arg(value_name = "ARGS-JSON")]
        arguments: Option<String>,
        /// Seconds to wait for the answer (default 10).
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
    },
    /// Show the VM's figures: CPU, memory, load, network, disks and filesystems (memory, load
    /// and filesystems need the guest agent).
    Metrics {
        /// Print the JSON answer instead of a table.
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// Print Prometheus' text format (what `GET /metrics` serves).
        #[arg(long)]
        prometheus: bool,
    },
    /// The guest's interfaces and addresses, from its agent (like `virsh domifaddr --source
    /// agent`).
    Domifaddr,
    /// The guest's mounted filesystems with their usage, from its agent (like `virsh
    /// domfsinfo`).
    Fsinfo,
    /// The guest's OS, from its agent (like `virsh guestinfo --os`).
    Osinfo,
    /// Freeze the guest's filesystems through its agent (before a disk snapshot).
    Fsfreeze,
    /// Thaw the guest's filesystems.
    Fsthaw,
    /// Set the guest's clock through its agent: to the host's clock, or to --time-ns (after a
    /// restore, like `virsh domtime --sync`).
    SetTime {
        /// Nanoseconds since the Unix epoch.
        #[arg(long, value_name = "NS")]
        time_ns: Option<u64>,
    },
    /// Shut the guest down through its agent (like `virsh shutdown --mode agent`); the VMM
    /// exits 0 when the guest has powered off.
    GuestShutdown {
        /// powerdown, reboot or halt.
        #[arg(long, default_value = "powerdown", value_parser = ["powerdown", "reboot", "halt"])]
        mode: String,
    },
    /// Show the balloon and the guest's memory statistics, or ask the guest to keep TARGET
    /// MiB of RAM (like `virsh setmem`; QMP `balloon`).
    Balloon {
        /// MiB of RAM the guest should keep.
        #[arg(value_name = "TARGET-MIB", conflicts_with = "stats_interval")]
        target_mib: Option<u64>,
        /// Seconds between two requests for the guest's memory statistics (0: none).
        #[arg(long, value_name = "S")]
        stats_interval: Option<u32>,
        /// Print the JSON answer instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set a network card's link up or down (QMP `set_link`).
    SetLink {
        /// The NIC's id (see `nics`).
        #[arg(value_name = "ID")]
        id: String,
        /// on or off.
        #[arg(value_name = "on|off", value_parser = ["on", "off"])]
        state: String,
    },
}

impl CtlCommand {
    /// The HTTP method and path of the command.
    pub fn route(&self) -> (&'static str, &'static str) {
        match self {
            CtlCommand::Pause => ("PUT", "/vm/pause"),
            CtlCommand::Resume => ("PUT", "/vm/resume"),
            CtlCommand::PowerButton => ("PUT", "/vm/power-button"),
            CtlCommand::Reset => ("PUT", "/vm/reset"),
            CtlCommand::Shutdown => ("PUT", "/vm/shutdown"),
            CtlCommand::Info => ("GET", "/vm"),
            CtlCommand::Version => ("GET", "/version"),
            CtlCommand::Snapshot { .. } => ("PUT", "/vm/snapshot"),
            CtlCommand::Restore { .. } => ("PUT", "/vm/restore"),
            CtlCommand::Migration => ("GET", "/vm/migration"),
            CtlCommand::Migrate { .. } => ("PUT", "/vm/migrate"),
            CtlCommand::MigrateCancel => ("PUT", "/vm/migrate/cancel"),
            CtlCommand::MigrateParams {
                downtime_limit: None,
                max_bandwidth: None,
            } => ("GET", "/vm/migrate/parameters"),
            CtlCommand::MigrateParams { .. } => ("PUT", "/vm/migrate/parameters"),
            CtlCommand::MigrateIncoming { .. } => ("PUT", "/vm/migrate/incoming"),
            CtlCommand::Savevm { .. } => ("PUT", "/vm/savevm"),
            CtlCommand::Loadvm { .. } => ("PUT", "/vm/loadvm"),
            CtlCommand::Delvm { .. } => ("PUT", "/vm/delvm"),
            CtlCommand::Snapshots { .. } => ("GET", "/vm/snapshots"),
            CtlCommand::Nics => ("GET", "/vm"),
            CtlCommand::SetLink { .. } => ("PUT", "/vm/set-link"),
            CtlCommand::RateLimit { .. } => ("PUT", "/vm/net-rate-limit"),
            CtlCommand::Agent { .. } => ("PUT", "/vm/agent"),
            CtlCommand::Metrics {
                prometheus: true, ..
            } => ("GET", "/metrics"),
            CtlCommand::Metrics { .. } => ("GET", "/vm/metrics"),
            CtlCommand::Domifaddr => ("GET", "/vm/agent/interfaces"),
            CtlCommand::Fsinfo => ("GET", "/vm/agent/filesystems"),
            CtlCommand::Osinfo => ("GET", "/vm/agent/os"),
            CtlCommand::Fsfreeze => ("PUT", "/vm/agent/fsfreeze"),
            CtlCommand::Fsthaw => ("PUT", "/vm/agent/fsthaw"),
            CtlCommand::SetTime { .. } => ("PUT", "/vm/agent/set-time"),
            CtlCommand::GuestShutdown { .. } => ("PUT", "/vm/agent/shutdown"),
            CtlCommand::Balloon {
                target_mib: Some(_),
                ..
            } => ("PUT", "/vm/balloon"),
            CtlCommand::Balloon {
                stats_interval: Some(_),
                ..
            } => ("PUT", "/vm/balloon/stats-interval"),
            CtlCommand::Balloon { .. } => ("GET", "/vm/balloon"),
        }
    }

    /// The request body: the state file of `snapshot` and `restore` (and the socket of a
    /// `unix:` migration URI) made absolute against the current directory.
    pub fn body(&self) -> Result<Option<String>, CtlError> {
        match self {
            CtlCommand::Snapshot { path } | CtlCommand::Restore { path } => {
                let path = absolute(path)?;
                let Some(text) = path.to_str() else {
                    return Err(CtlError::BadPath {
                        path,
                        reason: "not valid UTF-8 (the API takes JSON strings)".into(),
                    });
                };
                Ok(Some(serde_json::json!({ "path": text }).to_string()))
            }
            CtlCommand::Agent {
                command,
                arguments,
                timeout,
            } => {
                let mut body = serde_json::json!({ "execute": command });
                if let Some(a) = arguments {
                    let v: serde_json::Value = serde_json::from_str(a)
                        .map_err(|e| CtlError::BadArgs(format!("ARGS-JSON is not JSON: {e}")))?;
                    if !v.is_object() {
                        return Err(CtlError::BadArgs("ARGS-JSON must be a JSON object".into()));
                    }
                    body["arguments"] = v;
                }
                if let Some(t) = timeout {
                    body["timeout"] = (*t).into();
                }
                Ok(Some(body.to_string()))
            }
            CtlCommand::Migrate { uri, .. } | CtlCommand::MigrateIncoming { uri } => {
                migrate::uri_body(uri).map(Some)
            }
            CtlCommand::MigrateParams {
                downtime_limit,
                max_bandwidth,
            } if downtime_limit.is_some() || max_bandwidth.is_some() => Ok(Some(
                migrate::parameters_body(*downtime_limit, *max_bandwidth),
            )),
            CtlCommand::Savevm {
                tag,
                overwrite,
                vmstate,
                devices,
            } => Ok(Some(savevm::body(
                tag,
                vmstate.as_deref(),
                devices.as_deref(),
                *overwrite,
            ))),
            CtlCommand::Loadvm {
                tag,
                vmstate,
                devices,
            } => Ok(Some(savevm::body(
                tag,
                vmstate.as_deref(),
                devices.as_deref(),
                false,
            ))),
            CtlCommand::Delvm { tag, devices } => {
                Ok(Some(savevm::body(tag, None, devices.as_deref(), false)))
            }
            CtlCommand::SetTime { time_ns: Some(ns) } => {
                Ok(Some(serde_json::json!({ "time_ns": ns }).to_string()))
            }
            CtlCommand::Balloon {
                target_mib: Some(t),
                ..
            } => Ok(Some(serde_json::json!({ "target_mib": t }).to_string())),
            CtlCommand::Balloon {
                stats_interval: Some(s),
                ..
            } => Ok(Some(
                serde_json::json!({ "stats_interval_s": s }).to_string(),
            )),
            CtlCommand::GuestShutdown { mode } => {
                Ok(Some(serde_json::json!({ "mode": mode }).to_string()))
            }
            CtlCommand::SetLink { id, state } => Ok(Some(
                serde_json::json!({ "id": id, "up": state == "on" }).to_string(),
            )),
            CtlCommand::RateLimit {
                id,
                rx_bps,
                rx_pps,
                tx_bps,
                tx_pps,
            } => {
                let bucket = |rate: Option<u64>| match rate {
                    Some(n) if n > 0 => serde_json::json!({"size": n, "refill_time": 1000}),
                    _ => serde_json::Value::Null,
                };
                let mut body = serde_json::json!({ "id": id });
                if rx_bps.is_some() || rx_pps.is_some() {
                    body["rx_rate_limiter"] =
                        serde_json::json!({"bandwidth": bucket(*rx_bps), "ops": bucket(*rx_pps)});
                }
                if tx_bps.is_some() || tx_pps.is_some() {
                    body["tx_rate_limiter"] =
                        serde_json::json!({"bandwidth": bucket(*tx_bps), "ops": bucket(*tx_pps)});
                }
                if body.get("rx_rate_limiter").is_none() && body.get("tx_rate_limiter").is_none() {
                    return Err(CtlError::BadArgs(
                        "give at least one of --rx-bps, --rx-pps, --tx-bps, --tx-pps".into(),
                    ));
                }
                Ok(Some(body.to_string()))
            }
            _ => Ok(None),
        }
    }
}

/// `path` as an absolute path: relative paths are taken from the current directory, whose
/// real path (symlinks resolved) is used when the parent directory exists. The file itself need
/// not exist (a snapshot creates it).
fn absolute(path: &Path) -> Result<PathBuf, CtlError> {
    let bad = |reason: String| CtlError::BadPath {
        path: path.to_path_buf(),
        reason,
    };
    let Some(name) = path.file_name() else {
        return Err(bad("names no file".into()));
    };
    let joined = std::path::absolute(path).map_err(|e| bad(e.to_string()))?;
    let parent = match joined.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => return Ok(joined),
    };
    match parent.canonicalize() {
        Ok(dir) => Ok(dir.join(name)),
        // Let the VMM report a missing directory, with the path the user meant.
        Err(_) => Ok(joined),
    }
}

/// Why `vmm ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Nothing at the socket path.
    #[error("{0}: no such socket (is the VMM running with --api-socket {0}?)")]
    NoSocket(PathBuf),
    /// A socket file nobody listens on.
    #[error("{0}: connection refused (the VMM is not running)")]
    Refused(PathBuf),
    /// Any other connect error.
    #[error("{path}: cannot connect: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("talking to the VMM: {0}")]
    Io(#[from] std::io::Error),
    /// The answer is not HTTP as we know it.
    #[error("malformed response from the VMM: {0}")]
    BadResponse(String),
    /// A state file path that cannot be sent.
    #[error("{}: {reason}", path.display())]
    BadPath {
        /// The path as given.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The command's arguments do not make a request.
    #[error("{0}")]
    BadArgs(String),
    /// The VMM refused or failed: its message and the status.
    #[error("{message} (HTTP {status})")]
    Http {
        /// The HTTP status.
        status: u16,
        /// The server's `error` message.
        message: String,
    },
    /// A migration followed with `--wait` failed (the VMM's reason).
    #[error("the migration failed: {0}")]
    MigrationFailed(String),
    /// A migration followed with `--wait` was cancelled.
    #[error("the migration was cancelled; the VM goes on here")]
    MigrationCancelled,
}

/// A response: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtlResponse {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Sends one request (with an optional JSON body) to the API socket and reads the response.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<CtlResponse, CtlError> {
    request_waiting(socket, method, path, body, TIMEOUT)
}

/// [`request`] that waits up to `wait` for the answer.
pub fn request_waiting(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    wait: Duration,
) -> Result<CtlResponse, CtlError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CtlError::NoSocket(socket.to_path_buf()),
        std::io::ErrorKind::ConnectionRefused => CtlError::Refused(socket.to_path_buf()),
        _ => CtlError::Connect {
            path: socket.to_path_buf(),
            source: e,
        },
    })?;
    stream.set_read_timeout(Some(wait))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let body = body.unwrap_or_default();
    let content_type = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         {content_type}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(resp) = parse_response(&buf)? {
            return Ok(resp);
        }
        if buf.len() > MAX_RESPONSE {
            return Err(CtlError::BadResponse("response too large".into()));
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(CtlError::BadResponse(if buf.is_empty() {
                    "the connection closed without an answer".into()
                } else {
                    "the connection closed mid-response".into()
                }))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// A complete final response at the front of `buf` (interim 1xx responses are skipped).
fn parse_response(buf: &[u8]) -> Result<Option<CtlResponse>, CtlError> {
    let mut rest = buf;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(CtlError::BadResponse(e.to_string())),
        };
        let status = resp.code.unwrap_or(0);
        if (100..200).contains(&status) {
            rest = &rest[n..];
            continue;
        }
        let mut len = 0usize;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                len = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| CtlError::BadResponse("invalid Content-Length".into()))?;
            }
        }
        if rest.len() < n + len {
            return Ok(None);
        }
        return Ok(Some(CtlResponse {
            status,
            body: rest[n..n + len].to_vec(),
        }));
    }
}

/// Runs `cmd` against `socket`: the text to print on success (empty for actions).
pub fn execute(socket: &Path, cmd: &CtlCommand) -> Result<String, CtlError> {
    let (method, path) = cmd.route();
    let body = cmd.body()?;
    // An agent command may take its whole timeout: wait a little longer than that.
    let wait = match cmd {
        CtlCommand::Agent { timeout, .. } => TIMEOUT.max(Duration::from_secs(
            timeout.unwrap_or(10).saturating_add(10),
        )),
        CtlCommand::Savevm { .. } | CtlCommand::Loadvm { .. } => savevm::SAVEVM_TIMEOUT,
        _ => TIMEOUT,
    };
    let resp = request_waiting(socket, method, path, body.as_deref(), wait)?;
    let json: Option<serde_json::Value> = serde_json::from_slice(&resp.body).ok();
    if !(200..300).contains(&resp.status) {
        let message = json
            .as_ref()
            .and_then(|v| v.get("error"))
            .and_then(|e| e.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&resp.body).trim().to_string());
        return Err(CtlError::Http {
            status: resp.status,
            message,
        });
    }
    match cmd {
        CtlCommand::Metrics {
            prometheus: true, ..
        } => return Ok(String::from_utf8_lossy(&resp.body).trim_end().to_string()),
        CtlCommand::Migrate { uri, wait } => return migrate::started(socket, uri, *wait),
        _ => {}
    }
    Ok(match json {
        Some(v) if *cmd == CtlCommand::Nics => nics_table(&v),
        Some(v) if matches!(cmd, CtlCommand::MigrateParams { .. }) => migrate::parameters_text(&v),
        Some(v) if matches!(cmd, CtlCommand::Snapshots { .. }) => {
            savevm::snapshots_text(&v, matches!(cmd, CtlCommand::Snapshots { json: true }))?
        }
        Some(v) => match guest::table(cmd, &v) {
            Some(text) => text,
            None if matches!(cmd, CtlCommand::Agent { .. }) => {
                serde_json::to_string_pretty(&v["return"]).unwrap_or_default()
            }
            None => serde_json::to_string_pretty(&v).unwrap_or_default(),
        },
        None => String::new(),
    })
}

/// The `nics` of a `GET /vm` answer as a table, like `virsh domiflist` (with link state and
/// frame counters).
fn nics_table(vm: &serde_json::Value) -> String {
    let nics = vm
        .get("nics")
        .and_then(|n| n.as_array())
        .cloned()
        .unwrap_or_default();
    let mut out = format!(
        "{:<12} {:<6} {:<16} {:<15} {:<18} {:<5} {:>12} {:>12}\n",
        "Interface", "Type", "Source", "Model", "MAC", "Link", "RX packets", "TX packets"
    );
    out.push_str(&"-".repeat(101));
    for n in &nics {
        let s = |k: &str| n.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
        let c = |k: &str| {
            n.get("counters")
                .and_then(|c| c.get(k))
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        };
        let vhost = n.get("vhost").and_then(|v| v.as_bool()).unwrap_or(false);
        let link = match n.get("link_up").and_then(|v| v.as_bool()) {
            Some(true) => "up",
            Some(false) => "down",
            None => "-",
        };
        out.push_str(&format!(
            "\n{:<12} {:<6} {:<16} {:<15} {:<18} {:<5} {:>12} {:>12}",
            s("id"),
            if vhost { "vhost" } else { "tap" },
            s("tap"),
            s("model"),
            s("mac"),
            link,
            c("rx_packets"),
            c("tx_packets"),
        ));
    }
    out
}

/// `vmm ctl`'s main: prints the result, or one error line, and gives the exit status.
pub fn main(args: &CtlArgs) -> ExitCode {
    match execute(&args.api_socket, &args.command) {
        Ok(text) => {
            if !text.is_empty() {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmm ctl: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod cli_tests {
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn ctl_is_a_subcommand_and_vm_flags_still_parse() {
        let cli =
            Cli::try_parse_from(["vmm", "ctl", "--api-socket", "/run/a.sock", "info"]).unwrap();
        let Some(Command::Ctl(args)) = cli.command else {
            panic!("no ctl")
        };
        assert_eq!(args.api_socket.to_str(), Some("/run/a.sock"));
        assert_eq!(args.command, super::CtlCommand::Info);
        let cli = Cli::try_parse_from(["vmm", "--config", "vm.json", "--cpus", "2"]).unwrap();
        assert!(cli.command.is_none());
        assert!(
            Cli::try_parse_from(["vmm", "--cpus", "2", "ctl", "--api-socket", "x", "info"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["vmm", "ctl", "--api-socket", "x", "frob"]).is_err());
        let cli = Cli::try_parse_from([
            "vmm",
            "ctl",
            "--api-socket",
            "/run/a.sock",
            "snapshot",
            "/tmp/vm.state",
        ])
        .unwrap();
        let Some(Command::Ctl(args)) = cli.command else {
            panic!("no ctl")
        };
        assert_eq!(
            args.command,
            super::CtlCommand::Snapshot {
                path: "/tmp/vm.state".into()
            }
        );
        assert!(Cli::try_parse_from(["vmm", "ctl", "--api-socket", "x", "snapshot"]).is_err());
        assert!(Cli::try_parse_from(["vmm", "ctl", "--api-socket", "x", "restore"]).is_err());
        assert!(Cli::try_parse_from(["vmm", "ctl", "--api-socket", "x", "info", "extra"]).is_err());
    }
}
