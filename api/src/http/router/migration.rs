//! The request bodies of the live-migration routes: `{"uri": "tcp:HOST:PORT" | "unix:PATH"}`
//! for `PUT /vm/migrate` and `PUT /vm/migrate/incoming`, and the parameters of
//! `PUT /vm/migrate/parameters`. A `file:` URI is refused here: snapshots and restores have
//! routes of their own (`PUT /vm/snapshot`, `PUT /vm/restore`).

use std::path::Path;

use serde_json::Value;

use super::{optional_body, Response};
use crate::action::{
    MigrationAddress, MigrationParametersUpdate, VmmAction, MAX_DOWNTIME_LIMIT_MS,
};

/// Which way a URI body goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// `PUT /vm/migrate`: the destination to send to.
    Outgoing,
    /// `PUT /vm/migrate/incoming`: where to listen.
    Incoming,
}

/// The `{"uri": ...}` body of `PUT /vm/migrate` and `PUT /vm/migrate/incoming` as the action.
pub(super) fn uri_action(body: &[u8], direction: Direction) -> Result<VmmAction, Response> {
    let addr = uri_body(body, direction)?;
    Ok(match direction {
        Direction::Outgoing => VmmAction::Migrate { to: addr },
        Direction::Incoming => VmmAction::MigrateIncoming { from: addr },
    })
}

fn uri_body(body: &[u8], direction: Direction) -> Result<MigrationAddress, Response> {
    let bad = |msg: String| Response::error(400, msg);
    const SHAPE: &str = "{\"uri\": \"tcp:HOST:PORT\"} or {\"uri\": \"unix:/absolute/path\"}";
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(bad(format!("this request needs a JSON body: {SHAPE}")));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(m) = v else {
        return Err(bad(format!(
            "the request body must be a JSON object: {SHAPE}"
        )));
    };
    if let Some(k) = m.keys().find(|k| *k != "uri") {
        return Err(bad(format!(
            "unexpected field `{k}` in the request body (it takes `uri`)"
        )));
    }
    let uri = match m.get("uri") {
        None => return Err(bad("missing field `uri` in the request body".into())),
        Some(Value::String(u)) => u,
        Some(_) => return Err(bad("`uri` must be a string".into())),
    };
    if uri.starts_with("file:") {
        return Err(bad(match direction {
            Direction::Outgoing => "`file:` URIs are snapshots: use PUT /vm/snapshot with \
                                   {\"path\": \"/absolute/file\"}"
                .into(),
            Direction::Incoming => "`file:` URIs are restores: use PUT /vm/restore with \
                                   {\"path\": \"/absolute/file\"}"
                .into(),
        }));
    }
    match MigrationAddress::parse(uri) {
        None => Err(bad(format!(
            "`uri` must be `tcp:HOST:PORT`, `tcp:[IPV6]:PORT` or `unix:/absolute/path` (got \
             `{uri}`)"
        ))),
        Some(Err(e)) => Err(bad(format!("invalid `uri`: {e}"))),
        Some(Ok(MigrationAddress::Unix(p))) if !Path::new(&p).is_absolute() => Err(bad(format!(
            "the socket of a `unix:` URI must be an absolute path (got `{}`): the VMM's \
                 working directory is not the client's",
            p.display()
        ))),
        Some(Ok(addr)) => Ok(addr),
    }
}

/// `{"downtime_limit_ms": N, "max_bandwidth": N}`, each optional (an empty body changes
/// nothing).
pub(super) fn parameters_action(body: &[u8]) -> Result<VmmAction, Response> {
    let update: MigrationParametersUpdate = optional_body(body)?;
    if update
        .downtime_limit_ms
        .is_some_and(|d| d > MAX_DOWNTIME_LIMIT_MS)
    {
        return Err(Response::error(
            400,
            format!(
                "`downtime_limit_ms` must be at most {MAX_DOWNTIME_LIMIT_MS} (2000 s, QEMU's \
                 limit)"
            ),
        ));
    }
    // Whatever else QEMU checks, in its words.
    update
        .check()
        .map_err(|e| Response::error(400, e))
        .map(|()| VmmAction::SetMigrationParameters(update))
}
