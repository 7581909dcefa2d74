//! The VM's events as QMP events (qapi/run-state.json): STOP, RESUME, POWERDOWN, and RESET /
//! SHUTDOWN with `guest` and `reason` (QEMU's `ShutdownCause` names); MIGRATION with `status` and
//! MIGRATION_PASS with `pass` (qapi/migration.json); VSERPORT_CHANGE with `id` and `open`
//! (qapi/char.json); stamped with the time the VMM published them. [`qmp_event`] builds the
//! monitor's own events too (the jobs' JOB_STATUS_CHANGE).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::action::{ShutdownCause, VmEvent};
use crate::controller::TimedEvent;

fn cause_data(cause: ShutdownCause) -> Value {
    json!({"guest": cause.by_guest(), "reason": cause})
}

/// The QMP event object for `ev` (`data` only for events that have members, as QEMU does).
pub(crate) fn event_json(ev: &TimedEvent) -> Value {
    let (name, data) = match &ev.event {
        VmEvent::Stop => ("STOP", None),
        VmEvent::Resume => ("RESUME", None),
        VmEvent::Powerdown => ("POWERDOWN", None),
        VmEvent::Reset(c) => ("RESET", Some(cause_data(*c))),
        VmEvent::Shutdown(c) => ("SHUTDOWN", Some(cause_data(*c))),
        VmEvent::Migration(status) => ("MIGRATION", Some(json!({ "status": status }))),
        VmEvent::MigrationPass(pass) => ("MIGRATION_PASS", Some(json!({ "pass": pass }))),
        VmEvent::VserportChange { id, open } => {
            ("VSERPORT_CHANGE", Some(json!({"id": id, "open": open})))
        }
        VmEvent::BalloonChange { actual } => ("BALLOON_CHANGE", Some(json!({ "actual": actual }))),
    };
    qmp_event(name, data, ev.at)
}

/// A QMP event: `event`, `data` if any, and the `timestamp` of `at`.
pub(crate) fn qmp_event(name: &str, data: Option<Value>, at: SystemTime) -> Value {
    let (seconds, microseconds) = match at.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_micros())),
        Err(_) => (-1, -1),
    };
    let mut m = Map::new();
    m.insert("event".into(), name.into());
    if let Some(d) = data {
        m.insert("data".into(), d);
    }
    m.insert(
        "timestamp".into(),
        json!({"seconds": seconds, "microseconds": microseconds}),
    );
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::MigrationStatus;
    use std::time::Duration;

    #[test]
    fn events_map_to_qmp() {
        let at = UNIX_EPOCH + Duration::new(1_258_551_470, 802_384_000);
        let ev = |event| event_json(&TimedEvent { event, at });
        assert_eq!(
            ev(VmEvent::Powerdown),
            json!({"event": "POWERDOWN", "timestamp": {"seconds": 1_258_551_470i64, "microseconds": 802_384}})
        );
        assert_eq!(ev(VmEvent::Stop)["event"], "STOP");
        assert_eq!(ev(VmEvent::Resume)["event"], "RESUME");
        let r = ev(VmEvent::Reset(ShutdownCause::HostQmpSystemReset));
        assert_eq!(
            r["data"],
            json!({"guest": false, "reason": "host-qmp-system-reset"})
        );
        let s = ev(VmEvent::Shutdown(ShutdownCause::GuestShutdown));
        assert_eq!(s["event"], "SHUTDOWN");
        assert_eq!(
            s["data"],
            json!({"guest": true, "reason": "guest-shutdown"})
        );
        let m = ev(VmEvent::Migration(MigrationStatus::Completed));
        assert_eq!(
            m,
            json!({"event": "MIGRATION", "data": {"status": "completed"},
                   "timestamp": {"seconds": 1_258_551_470i64, "microseconds": 802_384}})
        );
        let p = ev(VmEvent::MigrationPass(3));
        assert_eq!(p["event"], "MIGRATION_PASS");
        assert_eq!(p["data"], json!({"pass": 3}));
        let v = ev(VmEvent::VserportChange {
            id: "channel0".into(),
            open: true,
        });
        assert_eq!(v["event"], "VSERPORT_CHANGE");
        assert_eq!(v["data"], json!({"id": "channel0", "open": true}));
    }
}
