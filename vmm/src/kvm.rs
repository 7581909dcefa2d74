//! The host side of KVM: opening /dev/kvm, checking the API version and every capability the VMM
//! relies on, and recognising hosts where unmodified guests cannot run (PVM).

use std::path::Path;

use kvm_bindings::{CpuId, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// Errors opening or checking KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm could not be opened.
    #[error(
        "cannot open /dev/kvm: {0} (is the kvm module loaded and do you have access to /dev/kvm?)"
    )]
    Open(#[source] kvm_ioctls::Error),
    /// The kernel speaks another KVM API version.
    #[error("KVM API version {found} is not supported (need {KVM_API_VERSION})")]
    ApiVersion {
        /// What the kernel reported.
        found: i32,
    },
    /// A capability we rely on is missing.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID that KVM supports: {0}")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
}

/// Capabilities the VMM cannot work without, with the names users will search for.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// An opened, checked /dev/kvm.
pub struct Hypervisor {
    kvm: Kvm,
    max_vcpus: usize,
    tsc_deadline: bool,
}

impl Hypervisor {
    /// Opens /dev/kvm and checks the API version and required capabilities.
    pub fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let found = kvm.get_api_version();
        if found != KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion { found });
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        let max_vcpus = kvm.get_max_vcpus();
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        Ok(Hypervisor {
            kvm,
            max_vcpus,
            tsc_deadline,
        })
    }

    /// The opened /dev/kvm.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// KVM's limit on vCPUs per VM (KVM_CAP_MAX_VCPUS).
    pub fn max_vcpus(&self) -> usize {
        self.max_vcpus
    }

    /// Whether the in-kernel LAPIC emulates the TSC-deadline timer (KVM does not list the
    /// CPUID bit among the supported ones; it must be set when this capability is present).
    pub fn tsc_deadline(&self) -> bool {
        self.tsc_deadline
    }

    /// The CPUID leaves KVM can expose to guests.
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)
    }
}

/// True when the host's KVM is PVM (the `kvm_pvm` vendor module), which runs only
/// PVM-enlightened guest kernels at speed: unmodified Linux guests hang in emulation there.
pub fn host_is_pvm() -> bool {
    host_is_pvm_at(Path::new("/sys/module"))
}

fn host_is_pvm_at(sys_module: &Path) -> bool {
    sys_module.join("kvm_pvm").exists()
}

/// The one-line warning printed before booting on a PVM host.
pub const PVM_WARNING: &str = "warning: this host's KVM is PVM (kvm_pvm): unmodified Linux guests \
cannot run at speed here and will appear to hang; use the nested test box (see README)";

/// The host's physical memory in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total_mib(&text)
}

fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses() {
        let text = "MemTotal:       24576000 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_mem_total_mib(text), Some(24000));
        assert_eq!(parse_mem_total_mib("garbage"), None);
    }

    #[test]
    fn pvm_detection_looks_for_the_module() {
        let dir = std::env::temp_dir().join(format!("vmm-pvm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!host_is_pvm_at(&dir));
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert!(host_is_pvm_at(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
