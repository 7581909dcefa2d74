//! The address-space bus that vCPU exits are dispatched on. One [`Bus`] instance models the
//! port-I/O space and another the MMIO space; each maps non-overlapping address ranges to
//! devices implementing [`BusDevice`].
//!
//! Concurrency model: the bus is shared between vCPU threads as `Arc<Bus>`. The range map sits
//! behind an `RwLock` that is only held for the lookup (a `BTreeMap` range search); the device's
//! own `Mutex` is taken after the map lock has been released, so a device handler may itself
//! change the bus (e.g. a PCI BAR move) without deadlocking, and two vCPUs touching different
//! devices never contend. A poisoned lock (a device panicked while holding it) is recovered
//! rather than propagated: one faulty access must not take down every vCPU.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

/// A device that can sit on a [`Bus`].
///
/// `offset` is relative to the base of the range the device was inserted at. `data` is the
/// access (1, 2, 4 or 8 bytes for guest accesses, but implementations must tolerate any
/// length, including 0, without panicking).
pub trait BusDevice: Send {
    /// Handles a guest read of `data.len()` bytes at `offset`; fills `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors changing the bus layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of length zero cannot hold a device.
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength {
        /// Requested base.
        base: u64,
    },
    /// `base + len` does not fit in the 64-bit address space.
    #[error("bus range at {base:#x} with length {len:#x} overflows the address space")]
    Overflow {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
    },
    /// The requested range intersects a range already on the bus.
    #[error(
        "bus range {base:#x}..{end:#x} overlaps the existing range \
         {existing_base:#x}..{existing_end:#x}"
    )]
    Overlap {
        /// Requested base.
        base: u64,
        /// Requested end (exclusive).
        end: u64,
        /// Base of the range already present.
        existing_base: u64,
        /// End (exclusive) of the range already present.
        existing_end: u64,
    },
    /// No range starts at the given base.
    #[error("no device on the bus at base {0:#x}")]
    NotFound(u64),
}

/// A shared, lockable bus device.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

struct BusEntry {
    len: u64,
    device: SharedBusDevice,
}

/// A map from address ranges to devices, safe to use from several vCPU threads at once.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, BusEntry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let map = self.ranges.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_list()
            .entries(map.iter().map(|(base, e)| *base..*base + e.len))
            .finish()
    }
}

/// Locks a device, recovering the guard if a previous holder panicked.
fn lock_device(device: &Mutex<dyn BusDevice>) -> MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| {
        log::warn!("bus: device lock was poisoned by a panic; recovering it");
        poisoned.into_inner()
    })
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base + len`.
    ///
    /// Fails if `len` is zero, if the range wraps past `u64::MAX`, or if it intersects a range
    /// already on the bus. Takes `&self` so devices can be added after the bus is shared.
    pub fn insert(&self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        let mut map = self.ranges.write().unwrap_or_else(PoisonError::into_inner);
        // The closest range starting at or below `base` must end at or before it, and the first
        // range starting above `base` must start at or after `end`.
        let below = map.range(..=base).next_back();
        let above = map.range(base..).next();
        for (&existing_base, entry) in below.into_iter().chain(above) {
            let existing_end = existing_base.saturating_add(entry.len);
            if existing_base < end && base < existing_end {
                return Err(BusError::Overlap {
                    base,
                    end,
                    existing_base,
                    existing_end,
                });
            }
        }
        map.insert(base, BusEntry { len, device });
        Ok(())
    }

    /// Removes the device whose range starts at `base` and returns it.
    pub fn remove(&self, base: u64) -> Result<SharedBusDevice, BusError> {
        let mut map = self.ranges.write().unwrap_or_else(PoisonError::into_inner);
        map.remove(&base)
            .map(|entry| entry.device)
            .ok_or(BusError::NotFound(base))
    }

    /// Finds the device covering `addr`; returns it with `addr`'s offset into its range.
    pub fn resolve(&self, addr: u64) -> Option<(u64, SharedBusDevice)> {
        let map = self.ranges.read().unwrap_or_else(PoisonError::into_inner);
        let (&base, entry) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then(|| (offset, entry.device.clone()))
    }

    /// Number of ranges on the bus.
    pub fn len(&self) -> usize {
        self.ranges
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether the bus has no device.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Dispatches a read at `addr` to the device covering it. Returns `false` (leaving `data`
    /// untouched) when no device is there; the caller then returns all-ones to the guest.
    ///
    /// Only the first byte of the access has to fall inside a device's range; an access that
    /// straddles the end is still given to that device, which sees the full length.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock_device(&device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write at `addr`. Returns `false` when no device is there (the write is then
    /// simply dropped by the caller).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock_device(&device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
        panic_on_write: bool,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            if self.panic_on_write {
                panic!("probe asked to panic");
            }
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn insert_rejects_zero_length_overflow_and_overlaps() {
        let bus = Bus::new();
        assert_eq!(
            bus.insert(probe(), 0x10, 0),
            Err(BusError::ZeroLength { base: 0x10 })
        );
        assert!(matches!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::Overflow { .. })
        ));
        bus.insert(probe(), 0x10, 0x10).unwrap();
        // Same base, inside, straddling either end, enclosing.
        for (base, len) in [(0x10, 1), (0x14, 2), (0x8, 0x9), (0x1f, 4), (0x0, 0x100)] {
            assert!(
                matches!(
                    bus.insert(probe(), base, len),
                    Err(BusError::Overlap { .. })
                ),
                "{base:#x}+{len:#x} should overlap"
            );
        }
        // Adjacent on both sides is fine.
        bus.insert(probe(), 0x8, 0x8).unwrap();
        bus.insert(probe(), 0x20, 0x1).unwrap();
        // The very top of the address space is usable.
        bus.insert(probe(), u64::MAX - 1, 1).unwrap();
        assert_eq!(bus.len(), 4);
    }

    #[test]
    fn lookup_dispatches_with_relative_offset() {
        let bus = Bus::new();
        let a = probe();
        let b = probe();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x400, 0x10).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.read(0x40f, &mut data));
        assert_eq!(data, [0xf]);
        // Gaps and the byte just past a range have no device.
        for addr in [0x0, 0x3f7, 0x410, u64::MAX] {
            data = [0xaa];
            assert!(!bus.read(addr, &mut data), "{addr:#x}");
            assert_eq!(data, [0xaa]);
            assert!(!bus.write(addr, &[1]));
        }

        assert!(bus.write(0x3f9, &[1, 2]));
        assert_eq!(a.lock().unwrap().last_write, Some((1, vec![1, 2])));
        assert!(b.lock().unwrap().last_write.is_none());
    }

    #[test]
    fn remove_frees_the_range() {
        let bus = Bus::new();
        bus.insert(probe(), 0x70, 2).unwrap();
        assert!(bus.remove(0x71).is_err());
        assert!(bus.remove(0x70).is_ok());
        assert!(bus.is_empty());
        assert!(!bus.read(0x70, &mut [0]));
        bus.insert(probe(), 0x70, 2).unwrap();
    }

    #[test]
    fn poisoned_device_is_recovered() {
        let bus = Arc::new(Bus::new());
        let dev = probe();
        dev.lock().unwrap().panic_on_write = true;
        bus.insert(dev.clone(), 0x60, 1).unwrap();

        let bus2 = bus.clone();
        let result = std::thread::spawn(move || bus2.write(0x60, &[1])).join();
        assert!(result.is_err(), "the device should have panicked");
        assert!(dev.is_poisoned());

        // The next accesses still reach the device instead of panicking.
        let mut data = [0u8; 1];
        assert!(bus.read(0x60, &mut data));
        dev.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .panic_on_write = false;
        assert!(bus.write(0x60, &[7]));
        let guard = dev.lock().unwrap_or_else(PoisonError::into_inner);
        assert_eq!(guard.last_write, Some((0, vec![7])));
    }

    #[test]
    fn concurrent_access_from_several_threads() {
        let bus = Arc::new(Bus::new());
        for i in 0..4u64 {
            bus.insert(probe(), i * 0x10, 0x10).unwrap();
        }
        let threads: Vec<_> = (0..4u64)
            .map(|i| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for n in 0..1000u64 {
                        let addr = i * 0x10 + n % 0x10;
                        let mut data = [0u8; 1];
                        assert!(bus.read(addr, &mut data));
                        assert_eq!(u64::from(data[0]), n % 0x10);
                        assert!(bus.write(addr, &data));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn device_may_change_the_bus_from_its_handler() {
        /// A device that inserts another one when written, as a PCI BAR move would.
        struct Mover(Arc<Bus>);
        impl BusDevice for Mover {
            fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
            fn write(&mut self, _offset: u64, _data: &[u8]) {
                let _ = self.0.insert(probe(), 0x1000, 4);
            }
        }
        let bus = Arc::new(Bus::new());
        bus.insert(Arc::new(Mutex::new(Mover(bus.clone()))), 0, 1)
            .unwrap();
        assert!(bus.write(0, &[1]));
        assert!(bus.read(0x1003, &mut [0]));
    }
}
