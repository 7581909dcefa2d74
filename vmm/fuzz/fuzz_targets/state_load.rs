//! The VM state loader on arbitrary bytes: header, sections, checksums, the configuration and
//! machine state JSON, the memory layout. Whatever the input, it must return (Ok or a clear
//! error), never panic, hang or allocate without bound.
//!
//! Checksums stop most mutations at the door; the fuzzer also gets inputs whose checksums are
//! recomputed (`fix_crcs`), so the JSON and layout parsers behind them are reached. Seed it
//! with `seeds/` (the metadata of a real state file: a 128 MiB VM with a disk, paused at boot).

#![no_main]

use libfuzzer_sys::fuzz_target;

/// Recomputes the header and section checksums of a stream-shaped input, best effort.
fn fix_crcs(data: &mut [u8]) {
    if data.len() < 24 {
        return;
    }
    let c = crc32fast::hash(&data[..20]);
    data[20..24].copy_from_slice(&c.to_le_bytes());
    let mut off = 24usize;
    while off + 16 <= data.len() {
        let len = u64::from_le_bytes(data[off + 4..off + 12].try_into().unwrap()) as usize;
        let start = off + 16;
        let Some(end) = start.checked_add(len).filter(|&e| e <= data.len()) else {
            return;
        };
        let tag = &data[off..off + 4];
        if tag != b"MEMP" {
            let c = crc32fast::hash(&data[start..end]);
            data[off + 12..off + 16].copy_from_slice(&c.to_le_bytes());
        }
        off = end;
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = vmm::snapshot::check_bytes(data);
    if data.first() == Some(&0x89) {
        let mut fixed = data.to_vec();
        fix_crcs(&mut fixed);
        let _ = vmm::snapshot::check_bytes(&fixed);
        // Past the length check: the configuration, machine state and layout parsers.
        let _ = vmm::snapshot::check_metadata(&fixed);
    }
});
