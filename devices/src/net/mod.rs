//! Host network backends: the [`tap`] device virtio-net frames go through.

pub mod tap;

pub use tap::{OpenedTap, Tap, TapError, VNET_HDR_LEN};
