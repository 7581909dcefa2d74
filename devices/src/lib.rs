//! Everything in the VMM that is not virtio: the port-I/O and MMIO [`bus`], the legacy PC
//! platform devices ([`serial`], [`i8042`], [`cmos`]), the ACPI power-management blocks
//! ([`acpi_pm`], [`ged`]), the [`interrupt`] line abstraction they signal through, the
//! host-side character backends ([`chardev`]) behind the consoles, the tap behind virtio-net
//! ([`net`]), and the state contract
//! ([`persist`]) every device implements for snapshots.
//!
//! This is a leaf crate: it knows nothing of KVM. Devices raise interrupts through
//! [`interrupt::InterruptLine`] objects and ask the VMM for power transitions through EventFds;
//! the `vmm` crate wires those to irqfds and to its event loop.

pub mod acpi_pm;
pub mod block;
pub mod bus;
pub mod chardev;
pub mod cmos;
pub mod ged;
pub mod i8042;
pub mod interrupt;
pub mod net;
pub mod pci;
pub mod persist;
pub mod rate_limiter;
pub mod serial;
