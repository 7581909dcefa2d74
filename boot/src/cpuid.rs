//! CPUID normalization: turn the host-derived CPUID that KVM supports into what one vCPU of our
//! VM must report.
//!
//! The guest must see exactly `vcpu_count` CPUs, one thread per core, all in one package, with
//! APIC id = vCPU index; otherwise Linux builds a wrong topology (or misses CPUs) from the host
//! values. Vendor-specific topology leaves are rewritten for Intel and for AMD/Hygon. Leaves we
//! do not touch (e.g. the KVM paravirtual leaves at 0x4000_0000) stay as KVM gave them.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// CPU vendor, detected from leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVendor {
    /// "GenuineIntel".
    Intel,
    /// "AuthenticAMD".
    Amd,
    /// "HygonGenuine" (AMD-derived, uses the AMD leaves).
    Hygon,
    /// Anything else: only the vendor-neutral leaves are normalized.
    Other,
}

impl CpuVendor {
    fn uses_amd_leaves(self) -> bool {
        matches!(self, CpuVendor::Amd | CpuVendor::Hygon)
    }
}

// Leaf numbers.
const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

// Leaf 1 bits.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
const LEAF1_EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
const LEAF1_EBX_KEEP_MASK: u32 = 0x0000_ffff;

// Leaf 6 bits.
const LEAF6_EAX_TURBO_BOOST: u32 = 1 << 1;
const LEAF6_ECX_EPB: u32 = 1 << 3;

// Leaf 4 / 0x8000_001d fields.
const CACHE_TYPE_MASK: u32 = 0x1f;
const CACHE_LEVEL_SHIFT: u32 = 5;
const CACHE_LEVEL_MASK: u32 = 0x7;
const CACHE_SHARING_SHIFT: u32 = 14;
const CACHE_SHARING_MASK: u32 = 0xfff << CACHE_SHARING_SHIFT;
const LEAF4_CORES_SHIFT: u32 = 26;
const LEAF4_CORES_MASK: u32 = 0x3f << LEAF4_CORES_SHIFT;

// Leaf 0xb / 0x1f level types.
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

// AMD bits.
const EXT_ECX_CMP_LEGACY: u32 = 1 << 1;
const AMD_NC_MASK: u32 = 0xff;
const AMD_APIC_ID_SIZE_SHIFT: u32 = 12;
const AMD_APIC_ID_SIZE_MASK: u32 = 0xf << AMD_APIC_ID_SIZE_SHIFT;

/// Detects the CPU vendor from leaf 0 of `cpuid`.
pub fn cpu_vendor(cpuid: &CpuId) -> CpuVendor {
    let Some(leaf0) = cpuid.as_slice().iter().find(|e| e.function == LEAF_VENDOR) else {
        return CpuVendor::Other;
    };
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    id[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => CpuVendor::Intel,
        b"AuthenticAMD" => CpuVendor::Amd,
        b"HygonGenuine" => CpuVendor::Hygon,
        _ => CpuVendor::Other,
    }
}

/// Number of APIC-id bits needed to number `count` cores: ceil(log2(count)).
fn core_id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// Normalizes `cpuid` (as returned by `KVM_GET_SUPPORTED_CPUID`) for vCPU `vcpu_id` of a VM with
/// `vcpu_count` vCPUs, modelled as one package of `vcpu_count` single-threaded cores whose APIC
/// ids are 0..vcpu_count.
///
/// - leaf 0x1: initial APIC id, addressable logical-processor count, HTT, hypervisor bit;
/// - leaf 0x4 (Intel): cores per package and threads sharing each cache;
/// - leaf 0x6: no turbo boost or energy-performance bias (not emulated);
/// - leaves 0xb and 0x1f: SMT level (1 thread) and core level (`vcpu_count` cores), x2APIC id;
/// - AMD/Hygon leaves 0x8000_0001 (CmpLegacy), 0x8000_0008 (NC, ApicIdSize),
///   0x8000_001d (threads sharing each cache) and 0x8000_001e (extended APIC id, core id).
///
/// The TSC-deadline bit of leaf 1 is left as KVM reported it; see [`set_tsc_deadline`].
/// A `vcpu_count` of 0 is treated as 1.
pub fn normalize_cpuid(cpuid: &mut CpuId, vcpu_id: u8, vcpu_count: u8) {
    let vendor = cpu_vendor(cpuid);
    let count = u32::from(vcpu_count.max(1));
    let apic_id = u32::from(vcpu_id);
    let shift = core_id_bits(count);
    // Number of APIC ids the package spans (a power of two, at most 256).
    let addressable = 1u32 << shift;

    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & LEAF1_EBX_KEEP_MASK)
                    | (apic_id << LEAF1_EBX_APIC_ID_SHIFT)
                    | (addressable.min(0xff) << LEAF1_EBX_LOGICAL_COUNT_SHIFT);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == CpuVendor::Intel => {
                normalize_cache_entry(entry, addressable);
                if entry.eax & CACHE_TYPE_MASK != 0 {
                    entry.eax = (entry.eax & !LEAF4_CORES_MASK)
                        | (((addressable - 1).min(0x3f)) << LEAF4_CORES_SHIFT);
                }
            }
            LEAF_THERMAL_POWER => {
                entry.eax &= !LEAF6_EAX_TURBO_BOOST;
                entry.ecx &= !LEAF6_ECX_EPB;
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                normalize_topology_entry(entry, apic_id, count, shift);
            }
            LEAF_EXT_FEATURES if vendor.uses_amd_leaves() => {
                if count > 1 {
                    entry.ecx |= EXT_ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !EXT_ECX_CMP_LEGACY;
                }
            }
            LEAF_AMD_ADDR_SIZES if vendor.uses_amd_leaves() => {
                entry.ecx = (entry.ecx & !(AMD_NC_MASK | AMD_APIC_ID_SIZE_MASK))
                    | (shift << AMD_APIC_ID_SIZE_SHIFT)
                    | (count - 1);
            }
            LEAF_AMD_CACHE_TOPOLOGY if vendor.uses_amd_leaves() => {
                normalize_cache_entry(entry, addressable);
            }
            LEAF_AMD_EXT_APIC_ID if vendor.uses_amd_leaves() => {
                // Extended APIC id; compute-unit (core) id with one thread per core; one node.
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }
}

/// Rewrites "threads sharing this cache" of a leaf 0x4 / 0x8000_001d subleaf: private L1/L2
/// (one thread per core), L3 and beyond shared by the whole package.
fn normalize_cache_entry(entry: &mut kvm_cpuid_entry2, addressable: u32) {
    if entry.eax & CACHE_TYPE_MASK == 0 {
        // "No more caches" terminator.
        return;
    }
    let level = (entry.eax >> CACHE_LEVEL_SHIFT) & CACHE_LEVEL_MASK;
    let sharing = if level >= 3 { addressable - 1 } else { 0 };
    entry.eax = (entry.eax & !CACHE_SHARING_MASK) | (sharing << CACHE_SHARING_SHIFT);
}

/// Rewrites one subleaf of leaf 0xb / 0x1f: subleaf 0 is the SMT level, subleaf 1 the core
/// level, everything above is the invalid terminator.
fn normalize_topology_entry(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, shift: u32) {
    let subleaf = entry.index;
    let (eax, ebx, level_type) = match subleaf {
        0 => (0, 1, LEVEL_TYPE_SMT),
        1 => (shift, count, LEVEL_TYPE_CORE),
        _ => (0, 0, LEVEL_TYPE_INVALID),
    };
    entry.eax = eax;
    entry.ebx = ebx;
    entry.ecx = (level_type << 8) | (subleaf & 0xff);
    entry.edx = apic_id;
}

/// Sets or clears the TSC-deadline timer bit (leaf 1 ECX bit 24). `KVM_GET_SUPPORTED_CPUID` does
/// not report it; the vmm sets it when `KVM_CAP_TSC_DEADLINE_TIMER` is available.
pub fn set_tsc_deadline(cpuid: &mut CpuId, enabled: bool) {
    for entry in cpuid.as_mut_slice() {
        if entry.function == LEAF_FEATURES {
            if enabled {
                entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
            } else {
                entry.ecx &= !LEAF1_ECX_TSC_DEADLINE;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, 0x4 | 0xb | 0x1f | 0x8000_001d) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            padding: [0; 3],
        }
    }

    fn vendor_leaf(vendor: &[u8; 12]) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        entry(0, 0, [0x1f, word(0), word(8), word(4)])
    }

    /// A host with 16 threads (8 cores x 2 threads), APIC id 0x0e, like KVM would report.
    fn intel_cpuid() -> CpuId {
        CpuId::from_entries(&[
            vendor_leaf(b"GenuineIntel"),
            // Leaf 1: APIC id 0x0e, 16 logical, CLFLUSH 8, brand 0; HTT set; no hypervisor bit.
            entry(1, 0, [0x000906ea, 0x0e10_0800, 0x7ffa_fbbf, 0xbfeb_fbff]),
            // Leaf 4: L1d (shared by 2), L1i, L2 (2), L3 (16), terminator; 8 cores.
            entry(4, 0, [0x1c00_4121, 0x01c0_003f, 0x3f, 0]),
            entry(4, 1, [0x1c00_4122, 0x01c0_003f, 0x3f, 0]),
            entry(4, 2, [0x1c00_4143, 0x00c0_003f, 0x3ff, 0]),
            entry(4, 3, [0x1c03_c163, 0x03c0_003f, 0x2fff, 6]),
            entry(4, 4, [0, 0, 0, 0]),
            entry(6, 0, [0x77, 0x2, 0x9, 0]),
            entry(0xb, 0, [1, 2, 0x100, 0x0e]),
            entry(0xb, 1, [4, 16, 0x201, 0x0e]),
            entry(0xb, 2, [0, 0, 2, 0x0e]),
            entry(0x1f, 0, [1, 2, 0x100, 0x0e]),
            entry(0x1f, 1, [4, 16, 0x201, 0x0e]),
            entry(0x1f, 2, [5, 16, 0x502, 0x0e]),
            entry(0x1f, 3, [0, 0, 3, 0x0e]),
            entry(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            entry(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
            entry(0x8000_0008, 0, [0x3027, 0, 0, 0]),
        ])
        .unwrap()
    }

    fn amd_cpuid() -> CpuId {
        CpuId::from_entries(&[
            vendor_leaf(b"AuthenticAMD"),
            entry(1, 0, [0x00a20f10, 0x0510_0800, 0x7ed8_320b, 0x178b_fbff]),
            entry(4, 0, [0x1234, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 0x75c2_37ff, 0x2fd3_fbff]),
            entry(0x8000_0008, 0, [0x3030, 0x0, 0x0000_700f, 0]),
            entry(0x8000_001d, 0, [0x121, 0x01c0_003f, 0x3f, 0]),
            entry(0x8000_001d, 1, [0x122, 0x01c0_003f, 0x3f, 0]),
            entry(0x8000_001d, 2, [0x143, 0x01c0_003f, 0x3ff, 2]),
            entry(0x8000_001d, 3, [0x0001_c163, 0x03c0_003f, 0x7fff, 1]),
            entry(0x8000_001d, 4, [0, 0, 0, 0]),
            entry(0x8000_001e, 0, [0x0b, 0x0105, 0x0, 0]),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn vendor_detection() {
        assert_eq!(cpu_vendor(&intel_cpuid()), CpuVendor::Intel);
        assert_eq!(cpu_vendor(&amd_cpuid()), CpuVendor::Amd);
        let hygon = CpuId::from_entries(&[vendor_leaf(b"HygonGenuine")]).unwrap();
        assert_eq!(cpu_vendor(&hygon), CpuVendor::Hygon);
        let other = CpuId::from_entries(&[vendor_leaf(b"VIA VIA VIA ")]).unwrap();
        assert_eq!(cpu_vendor(&other), CpuVendor::Other);
        let empty = CpuId::new(0).unwrap();
        assert_eq!(cpu_vendor(&empty), CpuVendor::Other);
    }

    #[test]
    fn core_bits() {
        assert_eq!(core_id_bits(0), 0);
        assert_eq!(core_id_bits(1), 0);
        assert_eq!(core_id_bits(2), 1);
        assert_eq!(core_id_bits(3), 2);
        assert_eq!(core_id_bits(4), 2);
        assert_eq!(core_id_bits(5), 3);
        assert_eq!(core_id_bits(255), 8);
    }

    #[test]
    fn intel_leaf1() {
        let mut cpuid = intel_cpuid();
        normalize_cpuid(&mut cpuid, 2, 3);
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 2, "initial APIC id");
        assert_eq!(
            (leaf1.ebx >> 16) & 0xff,
            4,
            "addressable logical processors"
        );
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size and brand kept");
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(leaf1.eax, 0x000906ea);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut cpuid = intel_cpuid();
        normalize_cpuid(&mut cpuid, 0, 1);
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 0);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 1);
        assert_eq!(leaf1.edx & LEAF1_EDX_HTT, 0);
        let core = find(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx), (0, 1));
    }

    #[test]
    fn zero_vcpus_is_one() {
        let mut a = intel_cpuid();
        let mut b = intel_cpuid();
        normalize_cpuid(&mut a, 0, 0);
        normalize_cpuid(&mut b, 0, 1);
        assert_eq!(a, b);
    }

    #[test]
    fn intel_leaf4() {
        let mut cpuid = intel_cpuid();
        normalize_cpuid(&mut cpuid, 1, 4);
        for sub in 0..3 {
            let e = find(&cpuid, 4, sub);
            assert_eq!((e.eax >> 14) & 0xfff, 0, "L1/L2 private, subleaf {sub}");
            assert_eq!(e.eax >> 26, 3, "cores per package - 1, subleaf {sub}");
            assert_eq!(e.eax & 0x3fff, find(&intel_cpuid(), 4, sub).eax & 0x3fff);
        }
        let l3 = find(&cpuid, 4, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3, "L3 shared by the package");
        assert_eq!(find(&cpuid, 4, 4).eax, 0, "terminator untouched");
    }

    #[test]
    fn extended_topology() {
        let mut cpuid = intel_cpuid();
        normalize_cpuid(&mut cpuid, 5, 6);
        for leaf in [0xb, 0x1f] {
            let smt = find(&cpuid, leaf, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
            let core = find(&cpuid, leaf, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
            let end = find(&cpuid, leaf, 2);
            assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 5));
        }
        // The host's extra "die" level and its terminator both become invalid levels.
        let end = find(&cpuid, 0x1f, 3);
        assert_eq!((end.eax, end.ebx, end.ecx & 0xff00), (0, 0, 0));
    }

    #[test]
    fn leaf6_and_paravirt_leaves() {
        let mut cpuid = intel_cpuid();
        normalize_cpuid(&mut cpuid, 0, 2);
        let leaf6 = find(&cpuid, 6, 0);
        assert_eq!(leaf6.eax, 0x75);
        assert_eq!(leaf6.ecx, 0x1);
        assert_eq!(
            find(&cpuid, 0x4000_0000, 0),
            find(&intel_cpuid(), 0x4000_0000, 0)
        );
    }

    #[test]
    fn intel_does_not_touch_amd_leaves() {
        let mut cpuid = intel_cpuid();
        normalize_cpuid(&mut cpuid, 0, 4);
        assert_eq!(
            find(&cpuid, 0x8000_0001, 0),
            find(&intel_cpuid(), 0x8000_0001, 0)
        );
        assert_eq!(
            find(&cpuid, 0x8000_0008, 0),
            find(&intel_cpuid(), 0x8000_0008, 0)
        );
    }

    #[test]
    fn amd_leaves() {
        let mut cpuid = amd_cpuid();
        normalize_cpuid(&mut cpuid, 3, 4);
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.edx & LEAF1_EDX_HTT, 0);
        assert_ne!(find(&cpuid, 0x8000_0001, 0).ecx & EXT_ECX_CMP_LEGACY, 0);
        let sizes = find(&cpuid, 0x8000_0008, 0);
        assert_eq!(sizes.ecx & 0xff, 3, "NC = cores - 1");
        assert_eq!((sizes.ecx >> 12) & 0xf, 2, "ApicIdSize");
        assert_eq!(sizes.ecx & 0xffff_0000, 0);
        assert_eq!(sizes.eax, 0x3030);
        for sub in 0..3 {
            assert_eq!((find(&cpuid, 0x8000_001d, sub).eax >> 14) & 0xfff, 0);
        }
        assert_eq!((find(&cpuid, 0x8000_001d, 3).eax >> 14) & 0xfff, 3);
        let ext = find(&cpuid, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx, ext.edx), (3, 3, 0, 0));
        // Leaf 4 is reserved on AMD: untouched.
        assert_eq!(find(&cpuid, 4, 0).eax, 0x1234);
    }

    #[test]
    fn amd_single_vcpu_clears_cmp_legacy() {
        let mut cpuid = amd_cpuid();
        normalize_cpuid(&mut cpuid, 0, 1);
        assert_eq!(find(&cpuid, 0x8000_0001, 0).ecx & EXT_ECX_CMP_LEGACY, 0);
        assert_eq!(find(&cpuid, 0x8000_0008, 0).ecx & 0xf0ff, 0);
    }

    #[test]
    fn tsc_deadline() {
        let mut cpuid = intel_cpuid();
        set_tsc_deadline(&mut cpuid, true);
        assert_ne!(find(&cpuid, 1, 0).ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        normalize_cpuid(&mut cpuid, 0, 2);
        assert_ne!(find(&cpuid, 1, 0).ecx & LEAF1_ECX_TSC_DEADLINE, 0, "kept");
        set_tsc_deadline(&mut cpuid, false);
        assert_eq!(find(&cpuid, 1, 0).ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }
}
