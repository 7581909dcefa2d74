//! The state contract every device keeps for snapshots and migration: [`Persist`].
//!
//! Following Firecracker's split, a device's `save` returns plain serde data (its `State`), and
//! `restore` applies such data to a device freshly built from the same configuration and host
//! resources. Host resources (fds, guest memory, interrupt objects, output sinks) are constructor
//! arguments and never part of a state.
//!
//! A state may come from a hostile file or sender, so `restore` validates every value the guest
//! controlled as it would guest input, and checks that the state fits the device it is applied
//! to; on any error it returns a [`RestoreError`] and leaves the device as it was.
//!
//! `assert_round_trip` (feature `test-utils`) is the check every device's tests run, as
//! crosvm's `suspendable_virtio_tests!`: save, serialise, parse, restore into a fresh device, save
//! again, and compare.

/// Why saved state could not be applied.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// A value is out of range, or inconsistent with another one.
    #[error("{field}: {reason}")]
    Invalid {
        /// The offending field (a path such as `queues[0].size`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The state does not fit this device (another queue count, a disk whose size changed, ...).
    #[error("{0}")]
    Mismatch(String),
}

impl RestoreError {
    /// Shorthand for [`RestoreError::Invalid`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        RestoreError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`RestoreError::Mismatch`].
    pub fn mismatch(what: impl Into<String>) -> Self {
        RestoreError::Mismatch(what.into())
    }

    /// Prefixes the field (or the mismatch text) with `outer`, for errors of nested states.
    pub fn within(self, outer: &str) -> Self {
        match self {
            RestoreError::Invalid { field, reason } => RestoreError::Invalid {
                field: format!("{outer}.{field}"),
                reason,
            },
            RestoreError::Mismatch(m) => RestoreError::Mismatch(format!("{outer}: {m}")),
        }
    }
}

/// The state contract every device keeps; see the module documentation.
///
/// `save -> restore -> save` gives equal states.
pub trait Persist {
    /// The device's state: plain data, no host resources.
    type State: serde::Serialize + serde::de::DeserializeOwned + Clone + std::fmt::Debug + PartialEq;

    /// Captures the device's state.
    fn save(&self) -> Self::State;

    /// Applies `state` to this device, freshly built from the same configuration and host
    /// resources. Validates first: on error, the device is unchanged.
    fn restore(&mut self, state: &Self::State) -> Result<(), RestoreError>;
}

/// Saves `src`, checks that the state survives JSON serialisation, restores it into `fresh`,
/// saves `fresh` and checks both states are equal. Returns the state for further checks.
///
/// # Panics
///
/// On any difference or error: this is a test helper.
#[cfg(any(test, feature = "test-utils"))]
pub fn assert_round_trip<D: Persist>(src: &D, fresh: &mut D) -> D::State {
    let state = src.save();
    let json = serde_json::to_string(&state).expect("state serialises");
    let parsed: D::State = serde_json::from_str(&json).expect("state parses back");
    assert_eq!(parsed, state, "state changed through JSON");
    fresh.restore(&parsed).expect("state restores");
    let again = fresh.save();
    assert_eq!(again, state, "save -> restore -> save differs");
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_well_and_nest() {
        let e = RestoreError::invalid("size", "must be a power of two").within("queues[1]");
        assert_eq!(e.to_string(), "queues[1].size: must be a power of two");
        let m = RestoreError::mismatch("snapshot has 2 queues, device has 1").within("virtio");
        assert_eq!(m.to_string(), "virtio: snapshot has 2 queues, device has 1");
    }
}
