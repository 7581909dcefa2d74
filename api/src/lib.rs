//! The vmm's user-facing contracts: the JSON configuration schema and its validation, the
//! control plane's vocabulary ([`VmmAction`]), and its two front doors: the REST API
//! ([`http::ApiServer`]) and the QMP monitor ([`qmp::QmpServer`]).
//!
//! This crate is a leaf: it knows nothing of KVM or devices. The `vmm` builder is the one place
//! that turns these types into device constructor arguments.

pub mod action;
pub mod balloon;
pub mod config;
pub mod controller;
pub mod http;
pub mod human;
pub mod metrics;
pub mod qmp;
pub mod server;
pub mod snapshots;

pub use action::{
    ActionError, AgentInfo, AgentVerb, GuestShutdownMode, MigrationAddress, MigrationCapability,
    MigrationCapabilityState, MigrationInfo, MigrationParameters, MigrationParametersUpdate,
    MigrationStatus, RamStats, Refusal, ShutdownCause, VcpuInfo, VersionInfo, VmEvent, VmInfo,
    VmState, VmmAction, VmmResponse,
};
pub use config::{
    BalloonConfig, BootConfig, CacheMode, ChannelConfig, ConfigError, DiskConfig, DiskFormat,
    MachineConfig, MetricsConfig, NetConfig, OnReboot, QmpEndpoint, SerialConfig, VmConfig,
    MAX_VCPUS, MIN_MEMORY_MIB,
};
pub use snapshots::{DiskSnapshots, VmSnapshotInfo, VmSnapshotRequest};
