//! The vmm's user-facing contracts: the JSON configuration schema and its validation.
//!
//! This crate is a leaf: it knows nothing of KVM or devices. The `vmm` builder is the one place
//! that turns these types into device constructor arguments.

pub mod config;

pub use config::{
    BootConfig, ConfigError, MachineConfig, OnReboot, SerialConfig, VmConfig, MAX_VCPUS,
    MIN_MEMORY_MIB,
};
