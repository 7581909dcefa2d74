//! The state machine's rules and the actions' names and errors.

use super::*;

#[test]
fn pause_resume_transitions() {
    assert_eq!(
        VmState::Running.check(&VmmAction::Pause),
        Ok(VmState::Paused)
    );
    assert_eq!(
        VmState::Paused.check(&VmmAction::Resume),
        Ok(VmState::Running)
    );
    assert!(matches!(
        VmState::Paused.check(&VmmAction::Pause),
        Err(ActionError::InvalidState { .. })
    ));
    assert!(VmState::Running.check(&VmmAction::Resume).is_err());
}

#[test]
fn shutting_down_refuses_all_but_queries() {
    for a in [
        VmmAction::Pause,
        VmmAction::Resume,
        VmmAction::PowerButton,
        VmmAction::Reset,
        VmmAction::Shutdown,
    ] {
        assert!(VmState::ShuttingDown.check(&a).is_err(), "{a:?}");
    }
    assert_eq!(
        VmState::ShuttingDown.check(&VmmAction::GetVmInfo),
        Ok(VmState::ShuttingDown)
    );
}

fn snapshot() -> VmmAction {
    VmmAction::Snapshot {
        path: "/tmp/vm.state".into(),
    }
}

fn restore() -> VmmAction {
    VmmAction::Restore {
        path: "/tmp/vm.state".into(),
    }
}

#[test]
fn snapshot_leaves_the_vm_post_migrate_and_resume_continues_it() {
    for from in [VmState::Running, VmState::Paused] {
        assert_eq!(from.check(&snapshot()), Ok(VmState::PostMigrate), "{from}");
    }
    for from in [
        VmState::Created,
        VmState::Incoming,
        VmState::PostMigrate,
        VmState::ShuttingDown,
    ] {
        assert_eq!(
            from.check(&snapshot()),
            Err(ActionError::InvalidState {
                action: "snapshot",
                state: from
            }),
            "{from}"
        );
    }
    let pm = VmState::PostMigrate;
    assert_eq!(pm.check(&VmmAction::Resume), Ok(VmState::Running));
    assert!(pm.check(&VmmAction::Pause).is_err());
    assert_eq!(pm.check(&VmmAction::Reset), Ok(pm));
    assert_eq!(pm.check(&VmmAction::PowerButton), Ok(pm));
    assert_eq!(pm.check(&VmmAction::Shutdown), Ok(VmState::ShuttingDown));
    assert_eq!(
        pm.check(&restore()).unwrap_err().to_string(),
        "cannot restore while the VM is post_migrate"
    );
}

#[test]
fn incoming_accepts_only_restore_queries_capabilities_and_shutdown() {
    let inc = VmState::Incoming;
    assert_eq!(inc.check(&restore()), Ok(VmState::Running));
    let caps = VmmAction::SetMigrationCapabilities(vec![MigrationCapabilityState {
        capability: MigrationCapability::Events,
        state: true,
    }]);
    for same in [
        VmmAction::GetVmInfo,
        VmmAction::GetVersion,
        VmmAction::QueryMigrate,
        VmmAction::GetMigrationCapabilities,
        caps,
    ] {
        assert_eq!(inc.check(&same), Ok(inc), "{same:?}");
    }
    assert_eq!(inc.check(&VmmAction::Shutdown), Ok(VmState::ShuttingDown));
    for refused in [
        VmmAction::Pause,
        VmmAction::Resume,
        VmmAction::Reset,
        VmmAction::PowerButton,
        snapshot(),
    ] {
        assert!(
            matches!(
                inc.check(&refused),
                Err(ActionError::InvalidState {
                    state: VmState::Incoming,
                    ..
                })
            ),
            "{refused:?}"
        );
    }
    // Restore is for a VMM that waits for it, nothing else.
    for from in [
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::ShuttingDown,
    ] {
        assert!(from.check(&restore()).is_err(), "{from}");
    }
}

#[test]
fn migration_queries_in_every_state_capabilities_until_shutdown() {
    let set = VmmAction::SetMigrationCapabilities(vec![]);
    for s in [
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Incoming,
        VmState::PostMigrate,
    ] {
        assert_eq!(s.check(&VmmAction::QueryMigrate), Ok(s));
        assert_eq!(s.check(&VmmAction::GetMigrationCapabilities), Ok(s));
        assert_eq!(s.check(&set), Ok(s));
    }
    let sd = VmState::ShuttingDown;
    assert_eq!(sd.check(&VmmAction::QueryMigrate), Ok(sd));
    assert!(sd.check(&set).is_err());
}

#[test]
fn migration_names_match_qemu() {
    assert_eq!(j(&MigrationStatus::Completed), "\"completed\"");
    assert_eq!(MigrationStatus::default(), MigrationStatus::None);
    assert_eq!(MigrationStatus::Active.as_str(), "active");
    let cap: MigrationCapabilityState =
        serde_json::from_str(r#"{"capability": "events", "state": true}"#).unwrap();
    assert_eq!(cap.capability, MigrationCapability::Events);
    assert!(cap.state);
    assert_eq!(j(&cap), r#"{"capability":"events","state":true}"#);
    assert!(serde_json::from_str::<MigrationCapabilityState>(
        r#"{"capability": "xbzrle", "state": true}"#
    )
    .is_err());
    assert_eq!(j(&VmState::PostMigrate), "\"post_migrate\"");
    assert_eq!(VmState::Incoming.to_string(), "incoming");
    assert_eq!(snapshot().name(), "snapshot");
    assert_eq!(restore().name(), "restore");
}

fn j<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

#[test]
fn error_messages_name_action_and_state() {
    let e = VmState::Paused.check(&VmmAction::Pause).unwrap_err();
    assert_eq!(e.to_string(), "cannot pause while the VM is paused");
}

#[test]
fn shutdown_cause_names_match_qemu() {
    assert_eq!(
        serde_json::to_string(&ShutdownCause::GuestShutdown).unwrap(),
        "\"guest-shutdown\""
    );
    assert!(ShutdownCause::GuestReset.by_guest());
    assert!(!ShutdownCause::HostQmpQuit.by_guest());
}

#[test]
fn version_is_parsed() {
    let v = VersionInfo::current();
    assert_eq!(v.version, env!("CARGO_PKG_VERSION"));
}
