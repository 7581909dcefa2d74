//! Guest boot for x86_64: the guest memory map, kernel/initrd/command-line loading, the Linux
//! zero page and e820 map, ACPI tables, initial vCPU registers and CPUID normalization.
//!
//! Everything here is a pure function over guest memory (`vm_memory`) and `kvm_bindings` data
//! types, so it is unit-testable without `/dev/kvm`; only the vmm crate issues KVM ioctls.

pub mod acpi;
pub mod cpuid;
pub mod decompress;
pub mod layout;
pub mod loader;
pub mod regs;
pub mod zeropage;
