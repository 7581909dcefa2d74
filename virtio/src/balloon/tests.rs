//! virtio-balloon tests through mock queues: inflate, deflate and reporting with hostile page
//! lists, the statistics protocol, `actual` and its rate-limited report, the target, and the
//! state contract.

use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::test_rig::*;

/// The rig's guest memory (64 MiB) in 4 KiB pages.
const RAM_PAGES: u64 = 0x400_0000 / PAGE_SIZE;
/// A page well away from the rings and the rig's buffers.
const PAGE: u64 = 0x200_0000 / PAGE_SIZE;

fn balloon(options: BalloonOptions) -> Balloon {
    let shared = BalloonShared::new(RAM_PAGES * PAGE_SIZE, 0).unwrap();
    Balloon::new(shared, options).unwrap()
}

fn pfns(list: &[u64]) -> Vec<u8> {
    list.iter()
        .flat_map(|&p| (p as u32).to_le_bytes())
        .collect()
}

fn all() -> BalloonOptions {
    BalloonOptions {
        deflate_on_oom: true,
        free_page_reporting: true,
    }
}

#[test]
fn inflate_releases_pages_and_ignores_what_is_not_ram() {
    let mut dev = balloon(all());
    let mut r = Rig::new(4);
    r.activate(&mut dev);
    r.mem
        .write_slice(&[0xaa; 8192], GuestAddress(PAGE * PAGE_SIZE))
        .unwrap();
    // Two good pages, one twice, one past the end of RAM, one absurdly far.
    let list = pfns(&[PAGE, PAGE + 1, PAGE, RAM_PAGES, u64::from(u32::MAX)]);
    r.post(0, Some(&list), 0);
    dev.process_queue(0);
    assert_eq!(r.used(0), vec![(0, 0)]);
    assert_eq!(
        r.read(PAGE * PAGE_SIZE, 8192),
        vec![0; 8192],
        "released pages read as zero"
    );
    let c = dev.shared().counters();
    assert_eq!(
        (c.inflated_pages, c.duplicate_pages, c.invalid_pages),
        (2, 1, 2)
    );
    assert_eq!(dev.ballooned_pages(), 2);

    // Deflate one page that is in, one that is not: the second is counted and ignored.
    r.post(1, Some(&pfns(&[PAGE, PAGE + 7])), 0);
    dev.process_queue(1);
    assert_eq!(r.used(1).len(), 1);
    let c = dev.shared().counters();
    assert_eq!((c.deflated_pages, c.duplicate_pages), (1, 2));
    assert_eq!(dev.ballooned_pages(), 1);

    // A ragged buffer and an oversized one are bad requests, still returned.
    r.post(0, Some(&[1, 2, 3]), 0);
    r.post(0, Some(&vec![0u8; MAX_PFN_BYTES + 4]), 0);
    dev.process_queue(0);
    assert_eq!(r.used(0).len(), 2);
    assert_eq!(dev.shared().counters().bad_requests, 2);
}

#[test]
fn queues_are_numbered_by_the_negotiated_features() {
    // Without the statistics queue, reporting is queue 2.
    let mut dev = balloon(all());
    let mut r = Rig::new(4);
    let acked = dev.avail_features() & !feature(VIRTIO_BALLOON_F_STATS_VQ);
    r.activate_with(&mut dev, acked);
    r.mem
        .write_slice(&[0x55; 4096], GuestAddress(PAGE * PAGE_SIZE))
        .unwrap();
    r.post_writable_at(2, PAGE * PAGE_SIZE, 4096);
    dev.process_queue(2);
    assert_eq!(r.used(2), vec![(0, 0)]);
    assert_eq!(r.read(PAGE * PAGE_SIZE, 4096), vec![0; 4096]);
    assert_eq!(dev.shared().counters().reported_bytes, 4096);
    // Misaligned and out-of-RAM ranges are ignored.
    r.post_writable_at(2, PAGE * PAGE_SIZE + 1, 4096);
    r.post_writable_at(2, RAM_PAGES * PAGE_SIZE, 4096);
    dev.process_queue(2);
    assert_eq!(r.used(2).len(), 2);
    let c = dev.shared().counters();
    assert_eq!(
        (c.bad_requests, c.invalid_pages, c.reported_bytes),
        (1, 1, 4096)
    );
}

fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|&(t, v)| {
            let mut e = t.to_le_bytes().to_vec();
            e.extend_from_slice(&v.to_le_bytes());
            e
        })
        .collect()
}

#[test]
fn statistics_are_kept_and_asked_for_again() {
    let mut dev = balloon(BalloonOptions::default());
    let mut r = Rig::new(3);
    r.activate(&mut dev);
    // Free memory, total memory, and a tag from a newer guest.
    r.post(
        2,
        Some(&stats_bytes(&[(4, 100 << 20), (5, 500 << 20), (40, 7)])),
        0,
    );
    dev.process_queue(2);
    assert!(r.used(2).is_empty(), "the device keeps the buffer");
    // With EVENT_IDX the driver notifies the next buffer only if the device said how far it got.
    assert_eq!(r.avail_event(2), 1);
    let s = dev.shared().stats();
    assert_eq!(s.get(4), Some(100 << 20));
    assert_eq!(s.get(5), Some(500 << 20));
    assert_eq!(s.get(0), None);
    assert!(s.last_update > 0);
    // Asking for fresh figures gives the buffer back.
    dev.request_stats();
    assert_eq!(r.used(2), vec![(0, 0)]);
    dev.request_stats();
    assert!(r.used(2).is_empty(), "nothing held, nothing returned");
    // A second buffer while one is held sends the first back.
    r.post(2, Some(&stats_bytes(&[(4, 1)])), 0);
    dev.process_queue(2);
    r.post(2, Some(&stats_bytes(&[(4, 2)])), 0);
    dev.process_queue(2);
    assert_eq!(r.used(2), vec![(1, 0)]);
    assert_eq!(dev.shared().stats().get(4), Some(2));
}

#[test]
fn target_and_actual() {
    let mut dev = balloon(BalloonOptions::default());
    let shared = dev.shared();
    let memory = RAM_PAGES * PAGE_SIZE;
    assert_eq!(shared.set_target(0), Err(TargetError::Zero));
    assert!(matches!(
        shared.set_target(memory + 1),
        Err(TargetError::TooLarge { .. })
    ));
    shared.set_target(memory - 16 * PAGE_SIZE).unwrap();
    let mut c = [0u8; 8];
    dev.read_config(0, &mut c);
    assert_eq!(u32::from_le_bytes([c[0], c[1], c[2], c[3]]), 16);
    assert_eq!(shared.target(), memory - 16 * PAGE_SIZE);

    // The driver's `actual`: reported at once, then at most once a second.
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    shared.set_listener(Box::new(move |actual| seen.lock().unwrap().push(actual)));
    dev.write_config(4, &8u32.to_le_bytes());
    dev.write_config(4, &16u32.to_le_bytes());
    dev.write_config(0, &99u32.to_le_bytes());
    assert_eq!(*calls.lock().unwrap(), vec![memory - 8 * PAGE_SIZE]);
    assert_eq!(shared.actual(), memory - 16 * PAGE_SIZE);
    dev.change_timer_fired();
    assert_eq!(calls.lock().unwrap().len(), 2);
    assert_eq!(calls.lock().unwrap()[1], memory - 16 * PAGE_SIZE);
    // The target is the host's; the driver's write there is ignored.
    dev.read_config(0, &mut c);
    assert_eq!(u32::from_le_bytes([c[0], c[1], c[2], c[3]]), 16);
}

#[test]
fn state_survives_save_restore_save() {
    let mut dev = balloon(all());
    let mut r = Rig::new(4);
    r.activate(&mut dev);
    r.post(0, Some(&pfns(&[PAGE, PAGE + 1, PAGE + 5])), 0);
    dev.process_queue(0);
    r.post(2, Some(&stats_bytes(&[(4, 123)])), 0);
    dev.process_queue(2);
    dev.shared().set_target(RAM_PAGES * PAGE_SIZE / 2).unwrap();
    dev.write_config(4, &3u32.to_le_bytes());
    let saved = dev.save_state();

    let mut fresh = balloon(all());
    fresh.restore_state(&saved).unwrap();
    assert_eq!(fresh.save_state(), saved);
    assert_eq!(fresh.ballooned_pages(), 3);
    assert_eq!(
        fresh.shared().actual(),
        RAM_PAGES * PAGE_SIZE - 3 * PAGE_SIZE
    );

    // A balloon offering other features, or for another memory size, refuses it.
    assert!(balloon(BalloonOptions::default())
        .restore_state(&saved)
        .is_err());
    let other = Balloon::new(BalloonShared::new(PAGE_SIZE * 64, 0).unwrap(), all()).unwrap();
    let mut other = other;
    assert!(other.restore_state(&saved).is_err());
    // Runs past the end of memory are refused.
    let VirtioDeviceState::Balloon(mut bad) = saved.clone() else {
        unreachable!()
    };
    bad.ballooned.push((RAM_PAGES - 1, 2));
    assert!(fresh
        .restore_state(&VirtioDeviceState::Balloon(bad))
        .is_err());
}
