//! The vmm's user-facing contracts: the JSON configuration schema and its validation.
//!
//! This crate is a leaf: it knows nothing of KVM or devices. The `vmm` builder is the one place
//! that turns these types into device constructor arguments.

pub mod action;
pub mod config;
pub mod controller;

pub use action::{
    ActionError, ShutdownCause, VcpuInfo, VersionInfo, VmEvent, VmInfo, VmState, VmmAction,
    VmmResponse,
};
pub use config::{
    BootConfig, ConfigError, MachineConfig, OnReboot, QmpEndpoint, SerialConfig, VmConfig,
    MAX_VCPUS, MIN_MEMORY_MIB,
};
