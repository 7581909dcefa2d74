//! virtio crate (being built).
