//! `vmm ctl migrate URI [--wait]`, `migrate-incoming URI`, `migrate-cancel` and
//! `migrate-params`: the request bodies, following a migration to its end (`--wait` polls
//! `GET /vm/migrate`), and what is printed.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{absolute, request, CtlError, TIMEOUT};

/// How often `--wait` asks where the migration stands.
const POLL: Duration = Duration::from_millis(200);

/// The `{"uri": ...}` body; the socket of a `unix:` URI is made absolute against the current
/// directory first (the VMM's working directory is not ours). Anything else goes as it is: the
/// VMM checks it.
pub(super) fn uri_body(uri: &str) -> Result<String, CtlError> {
    let uri = match uri.strip_prefix("unix:") {
        Some(path) if !path.is_empty() => {
            let path = absolute(Path::new(path))?;
            match path.to_str() {
                Some(p) => format!("unix:{p}"),
                None => {
                    return Err(CtlError::BadPath {
                        path,
                        reason: "not valid UTF-8 (the API takes JSON strings)".into(),
                    })
                }
            }
        }
        _ => uri.to_string(),
    };
    Ok(json!({ "uri": uri }).to_string())
}

/// The body of `migrate-params` with options: the members given.
pub(super) fn parameters_body(downtime_limit: Option<u64>, max_bandwidth: Option<u64>) -> String {
    let mut body = json!({});
    if let Some(ms) = downtime_limit {
        body["downtime_limit_ms"] = ms.into();
    }
    if let Some(bytes) = max_bandwidth {
        body["max_bandwidth"] = bytes.into();
    }
    body.to_string()
}

/// `GET /vm/migrate/parameters`' answer, as QEMU's `info migrate_parameters` prints these two.
pub(super) fn parameters_text(v: &Value) -> String {
    let max = v["max_bandwidth"].as_u64().unwrap_or(0);
    let limit = if max == 0 {
        " (no limit)".to_string()
    } else if max & ((1 << 20) - 1) == 0 {
        format!(" ({} MiB/s)", max >> 20)
    } else {
        String::new()
    };
    format!(
        "downtime-limit: {} ms\nmax-bandwidth: {max} bytes/second{limit}",
        v["downtime_limit_ms"]
    )
}

/// What `migrate` prints once the VMM has started the migration: that it started, or, with
/// `--wait`, its outcome once it is over (an error unless it completed).
pub(super) fn started(socket: &Path, uri: &str, wait: bool) -> Result<String, CtlError> {
    if !wait {
        return Ok(format!(
            "Migration to {uri} started; `vmm ctl migration` shows how it goes"
        ));
    }
    let since = Instant::now();
    loop {
        let info = query(socket)?;
        match info["status"].as_str().unwrap_or("none") {
            "completed" => return Ok(completed(uri, &info)),
            "failed" => {
                return Err(CtlError::MigrationFailed(
                    info["error_desc"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .to_string(),
                ))
            }
            "cancelled" => return Err(CtlError::MigrationCancelled),
            // The VMM answered once the migration started: "none" for long means it never did.
            "none" if since.elapsed() > TIMEOUT => {
                return Err(CtlError::BadResponse("the VMM reports no migration".into()))
            }
            _ => std::thread::sleep(POLL),
        }
    }
}

/// `GET /vm/migrate`.
fn query(socket: &Path) -> Result<Value, CtlError> {
    let resp = request(socket, "GET", "/vm/migrate", None)?;
    let v: Value = serde_json::from_slice(&resp.body)
        .map_err(|e| CtlError::BadResponse(format!("GET /vm/migrate: {e}")))?;
    if resp.status != 200 {
        return Err(CtlError::Http {
            status: resp.status,
            message: v["error"].as_str().unwrap_or_default().to_string(),
        });
    }
    Ok(v)
}

/// The summary of a completed migration.
fn completed(uri: &str, info: &Value) -> String {
    let ms = |k: &str| match info[k].as_u64() {
        Some(n) => format!("{n} ms"),
        None => "?".into(),
    };
    let sent = info["ram"]["transferred"].as_u64().unwrap_or(0);
    format!(
        "Migration to {uri} completed in {} (downtime {}, {:.1} MiB sent); the VM stays paused \
         here (post_migrate)",
        ms("total_time_ms"),
        ms("downtime_ms"),
        sent as f64 / f64::from(1 << 20),
    )
}
