//! Initial vCPU state for entering a Linux kernel directly in 64-bit long mode.
//!
//! This module owns the in-memory structures the CPU needs before the kernel takes over (a
//! minimal GDT, an empty IDT and identity page tables for the first 1 GiB) and the register
//! values that go with them. It only produces `kvm_bindings` data: the vmm crate applies them
//! with the vCPU ioctls.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START,
};

/// Errors while writing the boot-time CPU structures to guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// The GDT could not be written.
    #[error("failed to write the boot GDT to guest memory: {0}")]
    WriteGdt(#[source] GuestMemoryError),
    /// The IDT could not be written.
    #[error("failed to write the boot IDT to guest memory: {0}")]
    WriteIdt(#[source] GuestMemoryError),
    /// The page tables could not be written.
    #[error("failed to write the boot page tables to guest memory: {0}")]
    WritePageTables(#[source] GuestMemoryError),
    /// The reset-vector stub could not be written.
    #[error("failed to write the reset vector stub to guest memory: {0}")]
    WriteResetStub(#[source] GuestMemoryError),
}

/// Where an x86 CPU starts after a reset, and where Linux jumps (in real mode, `ljmp
/// $0xf000,$0xfff0`) when it reboots "through the BIOS".
pub const RESET_VECTOR: GuestAddress = GuestAddress(0xffff0);

/// Real-mode code at the reset vector: `mov dx, ACPI_RESET_PORT; mov al, ACPI_RESET_VALUE;
/// out dx, al; hlt; jmp $-1`.
///
/// We have no firmware, so without this a guest that reboots through the BIOS path would run
/// zeros forever. Linux takes that path on hardware-reduced ACPI machines without EFI, unless
/// the command line says `reboot=acpi` or `reboot=k`: it picks EFI reboot, which falls back to
/// the BIOS reset vector. The stub turns that into the ACPI reset the VMM handles.
pub fn reset_stub() -> [u8; 10] {
    let [lo, hi] = crate::layout::ACPI_RESET_PORT.to_le_bytes();
    [
        0xba,
        lo,
        hi, // mov dx, port (16-bit operand in real mode)
        0xb0,
        crate::layout::ACPI_RESET_VALUE, // mov al, value
        0xee,                            // out dx, al
        0xf4,                            // hlt
        0xeb,
        0xfd, // jmp back to hlt
        0x90,
    ]
}

/// Writes [`reset_stub`] at [`RESET_VECTOR`] (inside the reserved BIOS area of the e820 map).
pub fn write_reset_stub<M: GuestMemoryBackend>(mem: &M) -> Result<(), RegsError> {
    mem.write_slice(&reset_stub(), RESET_VECTOR)
        .map_err(RegsError::WriteResetStub)
}

// Control register and EFER bits.
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_PAGE_SIZE: u64 = 1 << 7;
const PAGE_TABLE_ENTRIES: usize = 512;
const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// GDT index of the 64-bit code segment.
const GDT_CODE_INDEX: u16 = 1;
/// GDT index of the data segment.
const GDT_DATA_INDEX: u16 = 2;
/// GDT index of the task-state segment.
const GDT_TSS_INDEX: u16 = 3;

/// Selector of the boot code segment.
pub const BOOT_CODE_SELECTOR: u16 = GDT_CODE_INDEX * 8;
/// Selector of the boot data segment.
pub const BOOT_DATA_SELECTOR: u16 = GDT_DATA_INDEX * 8;
/// Selector of the boot task-state segment.
pub const BOOT_TSS_SELECTOR: u16 = GDT_TSS_INDEX * 8;

/// The boot GDT: null, 64-bit code (0xa09b), data (0xc093) and TSS (0x808b), all flat.
const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

// MSR indices (Intel SDM vol. 4).
/// IA32_TIME_STAMP_COUNTER.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_STAR.
pub const MSR_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// IA32_CSTAR.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// IA32_FMASK (SYSCALL flag mask).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// IA32_KERNEL_GS_BASE.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast string operations enabled.
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// IA32_MTRR_DEF_TYPE bit 11: MTRRs enabled.
const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
const MTRR_MEM_TYPE_WB: u64 = 0x6;

// Local APIC register offsets and LVT delivery modes.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Builds a GDT descriptor from the access/flags word (`flags`, laid out as bits 8..16 and
/// 20..24 of the descriptor's upper dword), a base and a 20-bit limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// Decodes a GDT descriptor into the segment-register form KVM wants.
fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = bit(55);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the boot GDT at [`GDT_START`], an empty IDT at [`IDT_START`] and identity page tables
/// mapping the first 1 GiB with 2 MiB pages at [`PML4_START`], [`PDPTE_START`], [`PDE_START`].
pub fn setup_page_tables_and_gdt<M: GuestMemoryBackend>(mem: &M) -> Result<(), RegsError> {
    let gdt: Vec<u8> = BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GDT_START)
        .map_err(RegsError::WriteGdt)?;
    mem.write_obj(0u64, IDT_START)
        .map_err(RegsError::WriteIdt)?;

    // Whole pages are written so that stale entries (e.g. after a guest reboot) never survive.
    let mut pml4 = [0u64; PAGE_TABLE_ENTRIES];
    pml4[0] = PDPTE_START.0 | PTE_PRESENT | PTE_WRITABLE;
    let mut pdpte = [0u64; PAGE_TABLE_ENTRIES];
    pdpte[0] = PDE_START.0 | PTE_PRESENT | PTE_WRITABLE;
    let mut pde = [0u64; PAGE_TABLE_ENTRIES];
    for (i, entry) in pde.iter_mut().enumerate() {
        *entry = (i as u64 * HUGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE;
    }
    for (table, addr) in [(pml4, PML4_START), (pdpte, PDPTE_START), (pde, PDE_START)] {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, addr)
            .map_err(RegsError::WritePageTables)?;
    }
    Ok(())
}

/// Puts `sregs` (as read from a freshly created vCPU) into 64-bit long mode using the structures
/// written by [`setup_page_tables_and_gdt`]: flat segments from the boot GDT, GDTR/IDTR, paging
/// with CR3 = [`PML4_START`], PAE, and EFER.LME|LMA.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let code = segment_from_gdt(BOOT_GDT[GDT_CODE_INDEX as usize], GDT_CODE_INDEX);
    let data = segment_from_gdt(BOOT_GDT[GDT_DATA_INDEX as usize], GDT_DATA_INDEX);
    let tss = segment_from_gdt(BOOT_GDT[GDT_TSS_INDEX as usize], GDT_TSS_INDEX);

    sregs.gdt.base = GDT_START.0;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_START.0;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    // Assigned, not or-ed: the reset value of CR0 has CD|NW set, which we do not want.
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START.0;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// General-purpose registers at kernel entry (64-bit boot protocol): `rip` = entry point,
/// `rsp` = `rbp` = boot stack, `rsi` = zero page, `rflags` = only the reserved bit 1.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER.0,
        rbp: BOOT_STACK_POINTER.0,
        rsi: ZERO_PAGE_START.0,
        ..Default::default()
    }
}

/// FPU state at kernel entry: the x87 and SSE control words of a reset CPU (FNINIT values).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR values at kernel entry: syscall/sysenter MSRs and the TSC cleared, fast strings enabled
/// and MTRRs enabled with write-back as the default memory type.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let msr = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = lapic.regs[offset + i] as u8;
    }
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = b as std::os::raw::c_char;
    }
}

/// Configures the local APIC's LVT LINT0 as ExtINT and LINT1 as NMI (the PC wiring of the
/// legacy interrupt and NMI lines), keeping the other LVT bits (e.g. the mask) as they are.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let value = lapic_reg(lapic, offset);
        set_lapic_reg(
            lapic,
            offset,
            (value & !APIC_DELIVERY_MODE_MASK) | (mode << 8),
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reset_stub_writes_the_acpi_reset_register() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_reset_stub(&mem).unwrap();
        let mut code = [0u8; 10];
        mem.read_slice(&mut code, RESET_VECTOR).unwrap();
        assert_eq!(&code[..6], &[0xba, 0x02, 0x06, 0xb0, 0x01, 0xee]);
        // The stub must end before the 1 MiB boundary (real-mode segment 0xf000 ends there).
        assert!(RESET_VECTOR.0 + code.len() as u64 <= 0x10_0000);
    }

    use super::*;
    use vm_memory::{Address, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn gdt_entries_match_the_classic_encoding() {
        assert_eq!(BOOT_GDT[0], 0);
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segments_decode_from_gdt() {
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(code.selector, 0x8);
        assert_eq!(code.type_, 0xb);
        assert_eq!(
            (code.present, code.s, code.l, code.db, code.g),
            (1, 1, 1, 0, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.base, 0);
        assert_eq!(code.unusable, 0);

        let data = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(data.selector, 0x10);
        assert_eq!(data.type_, 0x3);
        assert_eq!(
            (data.present, data.s, data.l, data.db, data.g),
            (1, 1, 0, 1, 1)
        );

        let tss = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!(tss.selector, 0x18);
        assert_eq!(tss.type_, 0xb);
        assert_eq!((tss.present, tss.s), (1, 0));

        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn gdt_entry_encodes_base_and_limit() {
        let e = gdt_entry(0x4093, 0x1234_5678, 0xabcde);
        let seg = segment_from_gdt(e, 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.db, 1);
        assert_eq!(seg.g, 0);
    }

    #[test]
    fn tables_are_written() {
        let mem = mem();
        // Dirty the page tables first, as after a reboot.
        mem.write_obj(0xdead_beefu64, PML4_START.unchecked_add(8))
            .unwrap();
        setup_page_tables_and_gdt(&mem).unwrap();

        for (i, e) in BOOT_GDT.iter().enumerate() {
            let v: u64 = mem.read_obj(GDT_START.unchecked_add(i as u64 * 8)).unwrap();
            assert_eq!(v, *e);
        }
        assert_eq!(mem.read_obj::<u64>(IDT_START).unwrap(), 0);
        assert_eq!(mem.read_obj::<u64>(PML4_START).unwrap(), 0xa003);
        assert_eq!(mem.read_obj::<u64>(PML4_START.unchecked_add(8)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u64>(PDPTE_START).unwrap(), 0xb003);
        for i in 0..512u64 {
            let v: u64 = mem.read_obj(PDE_START.unchecked_add(i * 8)).unwrap();
            assert_eq!(v, (i << 21) | 0x83);
        }
    }

    #[test]
    fn tables_need_memory() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 0x1000)]).unwrap();
        assert!(matches!(
            setup_page_tables_and_gdt(&mem),
            Err(RegsError::WriteGdt(_))
        ));
    }

    #[test]
    fn sregs_enter_long_mode() {
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        long_mode_sregs(&mut sregs);
        assert_eq!(sregs.gdt.base, 0x500);
        assert_eq!(sregs.gdt.limit, 31);
        assert_eq!(sregs.idt.base, 0x520);
        assert_eq!(sregs.idt.limit, 7);
        assert_eq!(sregs.cs.selector, BOOT_CODE_SELECTOR);
        assert_eq!(sregs.cs.l, 1);
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(seg.selector, BOOT_DATA_SELECTOR);
        }
        assert_eq!(sregs.tr.selector, BOOT_TSS_SELECTOR);
        assert_eq!(sregs.cr0, 0x8000_0011);
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!(sregs.cr4, 0x20);
        assert_eq!(sregs.efer, 0x500);
    }

    #[test]
    fn regs_and_fpu() {
        let regs = boot_regs(GuestAddress(0x100_0200));
        assert_eq!(regs.rip, 0x100_0200);
        assert_eq!(regs.rsp, 0x8ff0);
        assert_eq!(regs.rbp, 0x8ff0);
        assert_eq!(regs.rsi, 0x7000);
        assert_eq!(regs.rflags, 2);
        assert_eq!(regs.rax, 0);

        let fpu = boot_fpu();
        assert_eq!(fpu.fcw, 0x37f);
        assert_eq!(fpu.mxcsr, 0x1f80);
    }

    #[test]
    fn msrs() {
        let msrs = boot_msr_entries();
        let get = |index| msrs.iter().find(|m| m.index == index).map(|m| m.data);
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        for index in [
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_CSTAR,
            MSR_KERNEL_GS_BASE,
            MSR_SYSCALL_MASK,
            MSR_LSTAR,
            MSR_IA32_TSC,
        ] {
            assert_eq!(get(index), Some(0), "MSR {index:#x}");
        }
        assert_eq!(msrs.len(), 11);
    }

    #[test]
    fn lint_delivery_modes() {
        let mut lapic = kvm_lapic_state::default();
        // Masked LVT entries with some delivery mode already set.
        set_lapic_reg(&mut lapic, APIC_LVT_LINT0, 0x1_0200);
        set_lapic_reg(&mut lapic, APIC_LVT_LINT1, 0x1_0000);
        set_lint(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT0), 0x1_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT1), 0x1_0400);
    }
}
