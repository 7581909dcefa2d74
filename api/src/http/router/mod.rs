//! The REST API's routes, what each turns into, and the HTTP responses (JSON bodies, errors as
//! `{"error": "..."}`). `api/openapi.json` documents exactly [`ROUTES`] (a test checks it). The
//! live-migration bodies are in `migration.rs`, the whole-VM snapshots' in `savevm.rs`.

mod migration;
mod savevm;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::action::{ActionError, AgentVerb, GuestShutdownMode, Refusal, VmmAction, VmmResponse};
use crate::controller::Reply;

/// One operation of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /vm`: state, configuration, vCPUs.
    GetVm,
    /// `GET /version`.
    GetVersion,
    /// `PUT /vm/pause`.
    Pause,
    /// `PUT /vm/resume`.
    Resume,
    /// `PUT /vm/power-button`.
    PowerButton,
    /// `PUT /vm/reset`.
    Reset,
    /// `PUT /vm/shutdown`.
    Shutdown,
    /// `PUT /vm/snapshot` with `{"path": "/absolute/file"}`.
    Snapshot,
    /// `PUT /vm/restore` with `{"path": "/absolute/file"}`.
    Restore,
    /// `GET /vm/migration`: the last migration's, snapshot's or restore's status and statistics.
    GetMigration,
    /// `PUT /vm/migrate` with `{"uri": "tcp:HOST:PORT" | "unix:/path"}`: start a live migration.
    Migrate,
    /// `GET /vm/migrate`: the same as `GET /vm/migration`.
    GetMigrate,
    /// `PUT /vm/migrate/cancel`: cancel the live migration in progress, if any.
    MigrateCancel,
    /// `PUT /vm/migrate/incoming` with `{"uri": ...}`: receive a live migration there.
    MigrateIncoming,
    /// `GET /vm/migrate/parameters`: `{"downtime_limit_ms": N, "max_bandwidth": N}`.
    GetMigrationParameters,
    /// `PUT /vm/migrate/parameters` with either or both of those members.
    SetMigrationParameters,
    /// `PUT /vm/set-link` with `{"id": "net0", "up": false}` (QMP `set_link`).
    SetLink,
    /// `PUT /vm/net-rate-limit` with `{"id": "net0", "tx_rate_limiter": {...}}`.
    NetRateLimit,
    /// `PUT /vm/agent` with `{"execute": "guest-ping", "arguments": {...}, "timeout": 10}`:
    /// the guest agent's answer, `{"return": ...}` (200).
    Agent,
    /// `GET /vm/agent/interfaces`: the guest's interfaces and addresses, from the agent.
    AgentInterfaces,
    /// `GET /vm/agent/filesystems`: mounted filesystems with used and total bytes.
    AgentFilesystems,
    /// `GET /vm/agent/os`: the guest's OS.
    AgentOs,
    /// `PUT /vm/agent/fsfreeze`: freeze the guest's filesystems, `{"frozen": N}`.
    AgentFsFreeze,
    /// `PUT /vm/agent/fsthaw`: thaw them, `{"thawed": N}`.
    AgentFsThaw,
    /// `PUT /vm/agent/set-time` with an optional `{"time_ns": N}` (the host's clock if absent).
    AgentSetTime,
    /// `PUT /vm/agent/shutdown` with an optional `{"mode": "powerdown|reboot|halt"}`.
    AgentShutdown,
    /// `GET /vm/metrics`: the VM's figures (JSON).
    GetMetrics,
    /// `GET /metrics`: the same in Prometheus' text format.
    Prometheus,
    /// `GET /vm/balloon`: the balloon and the guest's memory statistics.
    GetBalloon,
    /// `PUT /vm/balloon` with `{"target_mib": N}`: the RAM the guest should keep.
    SetBalloon,
    /// `PUT /vm/balloon/stats-interval` with `{"stats_interval_s": N}` (0: no polling).
    BalloonStatsInterval,
    /// `PUT /vm/savevm` with `{"tag": "s1", "vmstate": "disk0", "devices": [...],
    /// "overwrite": false}` (all but `tag` optional): a whole-VM snapshot inside the qcow2 disks.
    SaveVm,
    /// `PUT /vm/loadvm` with `{"tag": "s1", "vmstate": ..., "devices": ...}`: go back to it.
    LoadVm,
    /// `PUT /vm/delvm` with `{"tag": "s1", "devices": ...}`: delete it from the disks.
    DelVm,
    /// `GET /vm/snapshots`: every snapshot-capable disk and its internal snapshots.
    ListVmSnapshots,
}

/// Every route: method, path, operation.
pub const ROUTES: &[(&str, &str, Route)] = &[
    ("GET", "/vm", Route::GetVm),
    ("GET", "/version", Route::GetVersion),
    ("PUT", "/vm/pause", Route::Pause),
    ("PUT", "/vm/resume", Route::Resume),
    ("PUT", "/vm/power-button", Route::PowerButton),
    ("PUT", "/vm/reset", Route::Reset),
    ("PUT", "/vm/shutdown", Route::Shutdown),
    ("PUT", "/vm/snapshot", Route::Snapshot),
    ("PUT", "/vm/restore", Route::Restore),
    ("GET", "/vm/migration", Route::GetMigration),
    ("PUT", "/vm/migrate", Route::Migrate),
    ("GET", "/vm/migrate", Route::GetMigrate),
    ("PUT", "/vm/migrate/cancel", Route::MigrateCancel),
    ("PUT", "/vm/migrate/incoming", Route::MigrateIncoming),
    (
        "GET",
        "/vm/migrate/parameters",
        Route::GetMigrationParameters,
    ),
    (
        "PUT",
        "/vm/migrate/parameters",
        Route::SetMigrationParameters,
    ),
    ("PUT", "/vm/set-link", Route::SetLink),
    ("PUT", "/vm/net-rate-limit", Route::NetRateLimit),
    ("PUT", "/vm/agent", Route::Agent),
    ("GET", "/vm/agent/interfaces", Route::AgentInterfaces),
    ("GET", "/vm/agent/filesystems", Route::AgentFilesystems),
    ("GET", "/vm/agent/os", Route::AgentOs),
    ("PUT", "/vm/agent/fsfreeze", Route::AgentFsFreeze),
    ("PUT", "/vm/agent/fsthaw", Route::AgentFsThaw),
    ("PUT", "/vm/agent/set-time", Route::AgentSetTime),
    ("PUT", "/vm/agent/shutdown", Route::AgentShutdown),
    ("GET", "/vm/metrics", Route::GetMetrics),
    ("GET", "/metrics", Route::Prometheus),
    ("GET", "/vm/balloon", Route::GetBalloon),
    ("PUT", "/vm/balloon", Route::SetBalloon),
    (
        "PUT",
        "/vm/balloon/stats-interval",
        Route::BalloonStatsInterval,
    ),
    ("PUT", "/vm/savevm", Route::SaveVm),
    ("PUT", "/vm/loadvm", Route::LoadVm),
    ("PUT", "/vm/delvm", Route::DelVm),
    ("GET", "/vm/snapshots", Route::ListVmSnapshots),
];

impl Route {
    /// Whether it changes something (PUT): its body is checked, and success is 204 (200 with
    /// the answer for an agent command).
    fn takes_body(self) -> bool {
        !matches!(
            self,
            Route::GetVm
                | Route::GetVersion
                | Route::GetMigration
                | Route::GetMigrate
                | Route::GetMigrationParameters
                | Route::AgentInterfaces
                | Route::AgentFilesystems
                | Route::AgentOs
                | Route::GetMetrics
                | Route::Prometheus
                | Route::GetBalloon
                | Route::ListVmSnapshots
        )
    }

    /// Whether a successful answer carries a body (200) rather than none (204).
    fn answers(self) -> bool {
        !self.takes_body()
            || matches!(
                self,
                Route::Agent | Route::AgentFsFreeze | Route::AgentFsThaw | Route::AgentSetTime
            )
    }
}

/// The action a request submits, from its route and body, or the 400 response.
pub(crate) fn action(route: Route, body: &[u8]) -> Result<VmmAction, Response> {
    let plain = |a: VmmAction| check_body(route, body).map(|()| a);
    match route {
        Route::GetVm => plain(VmmAction::GetVmInfo),
        Route::GetVersion => plain(VmmAction::GetVersion),
        Route::Pause => plain(VmmAction::Pause),
        Route::Resume => plain(VmmAction::Resume),
        Route::PowerButton => plain(VmmAction::PowerButton),
        Route::Reset => plain(VmmAction::Reset),
        Route::Shutdown => plain(VmmAction::Shutdown),
        Route::GetMigration | Route::GetMigrate => plain(VmmAction::QueryMigrate),
        Route::Migrate => migration::uri_action(body, migration::Direction::Outgoing),
        Route::MigrateIncoming => migration::uri_action(body, migration::Direction::Incoming),
        Route::MigrateCancel => plain(VmmAction::MigrateCancel),
        Route::GetMigrationParameters => plain(VmmAction::GetMigrationParameters),
        Route::SetMigrationParameters => migration::parameters_action(body),
        Route::Snapshot => path_body(body).map(|path| VmmAction::Snapshot { path }),
        Route::Restore => path_body(body).map(|path| VmmAction::Restore { path }),
        Route::SetLink => set_link_body(body),
        Route::NetRateLimit => rate_limit_body(body),
        Route::Agent => agent_body(body),
        Route::AgentInterfaces => plain(VmmAction::AgentVerb(AgentVerb::Interfaces)),
        Route::AgentFilesystems => plain(VmmAction::AgentVerb(AgentVerb::Filesystems)),
        Route::AgentOs => plain(VmmAction::AgentVerb(AgentVerb::OsInfo)),
        Route::AgentFsFreeze => plain(VmmAction::AgentVerb(AgentVerb::FsFreeze)),
        Route::AgentFsThaw => plain(VmmAction::AgentVerb(AgentVerb::FsThaw)),
        Route::AgentSetTime => set_time_body(body),
        Route::AgentShutdown => agent_shutdown_body(body),
        Route::GetMetrics | Route::Prometheus => plain(VmmAction::GetMetrics),
        Route::GetBalloon => plain(VmmAction::GetBalloon),
        Route::SetBalloon => balloon_body(body),
        Route::BalloonStatsInterval => stats_interval_body(body),
        Route::SaveVm => savevm::save_body(body).map(VmmAction::SaveVm),
        Route::LoadVm => savevm::load_body(body).map(VmmAction::LoadVm),
        Route::DelVm => savevm::delete_body(body).map(VmmAction::DelVm),
        Route::ListVmSnapshots => plain(VmmAction::ListVmSnapshots),
    }
}

/// `{"target_mib": N}`: N MiB of RAM for the guest, at least 1.
fn balloon_body(body: &[u8]) -> Result<VmmAction, Response> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        target_mib: u64,
    }
    let b: Body = serde_json::from_slice(body)
        .map_err(|e| Response::error(400, format!("invalid request body: {e}")))?;
    if b.target_mib == 0 || b.target_mib > (1 << 24) {
        return Err(Response::error(
            400,
            "`target_mib` is the guest's RAM in MiB: at least 1, at most the VM's memory",
        ));
    }
    Ok(VmmAction::SetBalloon {
        target: b.target_mib << 20,
        clamp: false,
    })
}

/// `{"stats_interval_s": N}`, 0 to stop polling.
fn stats_interval_body(body: &[u8]) -> Result<VmmAction, Response> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        stats_interval_s: u32,
    }
    let b: Body = serde_json::from_slice(body)
        .map_err(|e| Response::error(400, format!("invalid request body: {e}")))?;
    if b.stats_interval_s > crate::config::MAX_STATS_INTERVAL_S {
        return Err(Response::error(
            400,
            format!(
                "`stats_interval_s` is out of range (0..={})",
                crate::config::MAX_STATS_INTERVAL_S
            ),
        ));
    }
    Ok(VmmAction::SetBalloonStatsInterval(b.stats_interval_s))
}

/// An optional JSON object body of type `T` (`{}` or nothing gives its defaults).
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Response::error(400, format!("invalid request body: {e}")))?;
    // serde would take a struct from an array too; a body is an object.
    if !v.is_object() {
        return Err(Response::error(
            400,
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_value(v)
        .map_err(|e| Response::error(400, format!("invalid request body: {e}")))
}

/// `{"time_ns": N}`, or nothing for the host's clock.
fn set_time_body(body: &[u8]) -> Result<VmmAction, Response> {
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[serde(default)]
        time_ns: Option<i64>,
    }
    let b: Body = optional_body(body)?;
    if b.time_ns.is_some_and(|t| t < 0) {
        return Err(Response::error(
            400,
            "`time_ns` is nanoseconds since the Unix epoch, not negative",
        ));
    }
    Ok(VmmAction::AgentVerb(AgentVerb::SetTime {
        time_ns: b.time_ns,
    }))
}

/// `{"mode": "powerdown|reboot|halt"}`, powerdown by default.
fn agent_shutdown_body(body: &[u8]) -> Result<VmmAction, Response> {
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[serde(default)]
        mode: GuestShutdownMode,
    }
    let b: Body = optional_body(body)?;
    Ok(VmmAction::AgentVerb(AgentVerb::Shutdown { mode: b.mode }))
}

/// The body of an agent command: QEMU's `{"execute", "arguments"}`, and a timeout in seconds.
fn agent_body(body: &[u8]) -> Result<VmmAction, Response> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        execute: String,
        #[serde(default)]
        arguments: Option<Value>,
        #[serde(default)]
        timeout: Option<u64>,
    }
    let b: Body = serde_json::from_slice(body)
        .map_err(|e| Response::error(400, format!("invalid request body: {e}")))?;
    if b.execute.is_empty() {
        return Err(Response::error(400, "`execute` must name an agent command"));
    }
    if b.arguments.as_ref().is_some_and(|a| !a.is_object()) {
        return Err(Response::error(400, "`arguments` must be an object"));
    }
    if b.timeout.is_some_and(|t| t == 0 || t > 3600) {
        return Err(Response::error(400, "`timeout` is seconds, 1 to 3600"));
    }
    Ok(VmmAction::AgentCommand {
        execute: b.execute,
        arguments: b.arguments,
        timeout: b.timeout,
    })
}

/// The body of net-rate-limit: the NIC's id and the limiters to replace.
fn rate_limit_body(body: &[u8]) -> Result<VmmAction, Response> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        id: String,
        #[serde(default)]
        rx_rate_limiter: Option<crate::config::RateLimiterConfig>,
        #[serde(default)]
        tx_rate_limiter: Option<crate::config::RateLimiterConfig>,
    }
    let b: Body = serde_json::from_slice(body)
        .map_err(|e| Response::error(400, format!("invalid request body: {e}")))?;
    if b.id.is_empty() {
        return Err(Response::error(400, "`id` must be a non-empty string"));
    }
    for (name, r) in [
        ("rx_rate_limiter", &b.rx_rate_limiter),
        ("tx_rate_limiter", &b.tx_rate_limiter),
    ] {
        if let Some(r) = r {
            r.validate()
                .map_err(|e| Response::error(400, format!("{name}: {e}")))?;
        }
    }
    Ok(VmmAction::SetNetRateLimit {
        id: b.id,
        rx: b.rx_rate_limiter,
        tx: b.tx_rate_limiter,
    })
}

/// The `{"id": "net0", "up": true}` body of set-link.
fn set_link_body(body: &[u8]) -> Result<VmmAction, Response> {
    let bad = |msg: String| Response::error(400, msg);
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(m) = v else {
        return Err(bad(
            "the request body must be a JSON object: {\"id\": \"net0\", \"up\": true}".into(),
        ));
    };
    if let Some(k) = m.keys().find(|k| *k != "id" && *k != "up") {
        return Err(bad(format!(
            "unexpected field `{k}` in the request body (it takes `id` and `up`)"
        )));
    }
    let id = match m.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err(bad("`id` must be a non-empty string".into())),
        None => return Err(bad("missing field `id` in the request body".into())),
    };
    let up = match m.get("up") {
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("`up` must be true or false".into())),
        None => return Err(bad("missing field `up` in the request body".into())),
    };
    Ok(VmmAction::SetLink { id, up })
}

/// The `{"path": "/absolute/file"}` body of snapshot and restore. The path must be absolute:
/// the VMM's working directory is not the client's.
fn path_body(body: &[u8]) -> Result<PathBuf, Response> {
    let bad = |msg: String| Response::error(400, msg);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(bad(
            "this request needs a JSON body: {\"path\": \"/absolute/file\"}".into(),
        ));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(m) = v else {
        return Err(bad(
            "the request body must be a JSON object: {\"path\": \"/absolute/file\"}".into(),
        ));
    };
    if let Some(k) = m.keys().find(|k| *k != "path") {
        return Err(bad(format!(
            "unexpected field `{k}` in the request body (it takes `path`)"
        )));
    }
    let path = match m.get("path") {
        None => return Err(bad("missing field `path` in the request body".into())),
        Some(Value::String(p)) => p,
        Some(_) => return Err(bad("`path` must be a string".into())),
    };
    if path.contains('\0') {
        return Err(bad("`path` must not contain NUL".into()));
    }
    if !Path::new(path).is_absolute() {
        return Err(bad(format!(
            "`path` must be an absolute path (got `{path}`): the VMM's working directory is \
             not the client's"
        )));
    }
    Ok(PathBuf::from(path))
}

/// An HTTP response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    /// Status code.
    pub(crate) status: u16,
    /// JSON body, if any.
    pub(crate) body: Option<Value>,
    /// `Allow` header (405).
    pub(crate) allow: Option<String>,
    /// A plain-text body instead of JSON (Prometheus' format).
    pub(crate) text: Option<String>,
}

impl Response {
    /// An error with a JSON `{"error": msg}` body.
    pub(crate) fn error(status: u16, msg: impl Into<String>) -> Response {
        Response {
            status,
            body: Some(json!({ "error": msg.into() })),
            allow: None,
            text: None,
        }
    }

    fn ok(body: Value) -> Response {
        Response {
            status: 200,
            body: Some(body),
            allow: None,
            text: None,
        }
    }

    fn prometheus(text: String) -> Response {
        Response {
            status: 200,
            body: None,
            allow: None,
            text: Some(text),
        }
    }

    fn no_content() -> Response {
        Response {
            status: 204,
            body: None,
            allow: None,
            text: None,
        }
    }

    /// Appends the serialized response to `out`.
    pub(crate) fn write(&self, out: &mut Vec<u8>, close: bool) {
        let (content_type, body) = match (&self.body, &self.text) {
            (Some(b), _) => {
                let mut v = serde_json::to_vec(b).unwrap_or_default();
                v.push(b'\n');
                (Some("application/json"), v)
            }
            (None, Some(t)) => (
                Some("text/plain; version=0.0.4; charset=utf-8"),
                t.as_bytes().to_vec(),
            ),
            (None, None) => (None, Vec::new()),
        };
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nServer: vmm/{}\r\n",
            self.status,
            reason(self.status),
            env!("CARGO_PKG_VERSION")
        );
        if let Some(ct) = content_type {
            head.push_str(&format!(
                "Content-Type: {ct}\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        if let Some(allow) = &self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&body);
    }
}

/// The reason phrase of the statuses we send.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Finds the route for `method` and `path`, or the 404/405 response.
pub(crate) fn route(method: &str, path: &str) -> Result<Route, Response> {
    let mut allowed: Vec<&str> = Vec::new();
    for (m, p, r) in ROUTES {
        if *p == path {
            if *m == method {
                return Ok(*r);
            }
            allowed.push(m);
        }
    }
    if allowed.is_empty() {
        return Err(Response::error(404, format!("no such resource: {path}")));
    }
    let allow = allowed.join(", ");
    let mut resp = Response::error(
        405,
        format!("method {method} not allowed on {path} (allowed: {allow})"),
    );
    resp.allow = Some(allow);
    Err(resp)
}

/// Checks a request body: action routes accept none, or an empty JSON object; queries ignore it.
fn check_body(route: Route, body: &[u8]) -> Result<(), Response> {
    if !route.takes_body() || body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match serde_json::from_slice::<Value>(body) {
        Err(e) => Err(Response::error(
            400,
            format!("request body is not valid JSON: {e}"),
        )),
        Ok(Value::Object(m)) => match m.keys().next() {
            None => Ok(()),
            Some(k) => Err(Response::error(
                400,
                format!("unexpected field `{k}` in the request body (this request takes none)"),
            )),
        },
        Ok(_) => Err(Response::error(
            400,
            "the request body must be empty or a JSON object",
        )),
    }
}

/// The response to `route` given the VMM's reply.
pub(crate) fn respond(route: Route, reply: Reply) -> Response {
    match reply {
        Ok(VmmResponse::VmInfo(info)) if route == Route::GetVm => {
            Response::ok(serde_json::to_value(&info).unwrap_or(Value::Null))
        }
        Ok(VmmResponse::Version(v)) if route == Route::GetVersion => {
            Response::ok(serde_json::to_value(&v).unwrap_or(Value::Null))
        }
        Ok(VmmResponse::Migration(info))
            if matches!(route, Route::GetMigration | Route::GetMigrate) =>
        {
            Response::ok(serde_json::to_value(&info).unwrap_or(Value::Null))
        }
        Ok(VmmResponse::MigrationParameters(p)) if route == Route::GetMigrationParameters => {
            Response::ok(serde_json::to_value(p).unwrap_or(Value::Null))
        }
        Ok(VmmResponse::Agent(v)) if route == Route::Agent => {
            Response::ok(serde_json::json!({ "return": v }))
        }
        Ok(VmmResponse::Agent(v)) if route.answers() => Response::ok(v),
        Ok(VmmResponse::Agent(_)) if route == Route::AgentShutdown => Response::no_content(),
        Ok(VmmResponse::Metrics(m)) if route == Route::GetMetrics => {
            Response::ok(serde_json::to_value(&m).unwrap_or(Value::Null))
        }
        Ok(VmmResponse::Metrics(m)) if route == Route::Prometheus => {
            Response::prometheus(m.to_prometheus())
        }
        Ok(VmmResponse::Balloon(b)) if route == Route::GetBalloon => {
            Response::ok(serde_json::to_value(&b).unwrap_or(Value::Null))
        }
        Ok(VmmResponse::VmSnapshots(disks)) if route == Route::ListVmSnapshots => {
            Response::ok(serde_json::to_value(&disks).unwrap_or(Value::Null))
        }
        Ok(VmmResponse::Done) if route.takes_body() => Response::no_content(),
        Ok(other) => Response::error(500, format!("unexpected answer from the VMM: {other:?}")),
        Err(e @ ActionError::InvalidState { .. }) => Response::error(409, e.to_string()),
        Err(e @ ActionError::Failed { .. }) => Response::error(500, e.to_string()),
        Err(ref e @ ActionError::Refused { kind, .. }) => {
            let status = match kind {
                Refusal::BadArgument => 400,
                Refusal::NotNow => 409,
                Refusal::GuestTimeout => 504,
                Refusal::GuestError => 502,
            };
            Response::error(status, e.to_string())
        }
        Err(e @ ActionError::Unavailable) => Response::error(503, e.to_string()),
        Err(e @ ActionError::DeviceNotFound(_)) => Response::error(404, e.to_string()),
        Err(ActionError::NoBalloon) => Response::error(
            404,
            "the VM has no balloon device (start it with --balloon or \"balloon\": {})",
        ),
    }
}

#[cfg(test)]
mod tests;
