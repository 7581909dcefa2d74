use super::*;
use vm_memory::GuestAddress;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x40_000),
        (GuestAddress(0x100_000), 0x20_000),
    ])
    .unwrap()
}

/// A stream with the header, a round of pages (data, zeros) and the state.
fn stream(pages: &[(u64, Option<Vec<u8>>)], state: &[u8]) -> Vec<u8> {
    let mem = memory();
    let mut w = StreamWriter::new(Vec::new());
    w.start(b"{\"conf\":1}", &layout(&mem)).unwrap();
    w.pass(1).unwrap();
    for (gpa, data) in pages {
        match data {
            Some(d) => w.data_pages(*gpa, d).unwrap(),
            None => w.zero_pages(*gpa, 1).unwrap(),
        }
    }
    w.finish(state).unwrap();
    let n = w.bytes;
    let v = w.get_mut().clone();
    assert_eq!(n, v.len() as u64, "the writer counts what it wrote");
    v
}

fn read_all(bytes: &[u8], mem: &GuestMemoryMmap) -> Result<Vec<Item>, FormatError> {
    let (mut r, conf, regions) = StreamReader::open(bytes)?;
    assert_eq!(conf, b"{\"conf\":1}");
    assert_eq!(regions, layout(mem));
    let mut items = Vec::new();
    while let Some(i) = r.next(mem)? {
        items.push(i);
    }
    assert_eq!(
        r.bytes,
        bytes.len() as u64,
        "the reader counts what it read"
    );
    Ok(items)
}

#[test]
fn pages_and_state_arrive_in_guest_memory() {
    let a = vec![0xaau8; 4096 * 2];
    let b = vec![0x5bu8; 4096];
    let bytes = stream(
        &[
            (0x1000, Some(a.clone())),
            (0x100_000 + 0x3000, Some(b.clone())),
            (0x2000, None),
        ],
        b"{\"state\":2}",
    );
    let mem = memory();
    // Something to be overwritten by the zero run.
    mem.write_slice(&[7u8; 4096], GuestAddress(0x2000)).unwrap();
    let items = read_all(&bytes, &mem).unwrap();
    assert_eq!(items[0], Item::Pass(1));
    assert_eq!(items.last(), Some(&Item::State(b"{\"state\":2}".to_vec())));
    let mut got = vec![0u8; 4096];
    mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
    assert_eq!(got, a[..4096]);
    mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
    assert_eq!(
        got,
        vec![0u8; 4096],
        "the zero run replaced the second data page"
    );
    mem.read_slice(&mut got, GuestAddress(0x103_000)).unwrap();
    assert_eq!(got, b);
}

/// Corrupts a valid stream with `f` and expects the reader to refuse it with `want` in the
/// message.
fn refused(f: impl FnOnce(&mut Vec<u8>), want: &str) {
    let mut bytes = stream(&[(0x1000, Some(vec![1u8; 4096]))], b"{}");
    f(&mut bytes);
    let e = read_all(&bytes, &memory())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains(want), "expected {want:?} in {e:?}");
}

/// Offset of the first PAGE section's header in a stream made by [`stream`].
fn page_at(bytes: &[u8]) -> usize {
    bytes.windows(4).position(|w| w == TAG_PAGE).unwrap()
}

#[test]
fn hostile_streams_are_refused() {
    // A flipped byte in the page data.
    refused(
        |b| {
            let at = page_at(b) + 16 + PAGE_PREFIX + 100;
            b[at] ^= 1;
        },
        "checksum",
    );
    // The stream stops in the middle.
    refused(|b| b.truncate(b.len() - 30), "truncated");
    // A state file's header (no LIVE flag).
    refused(
        |b| {
            let h = format::header(0);
            b[..h.len()].copy_from_slice(&h);
        },
        "not a live migration stream",
    );
    // A section that claims more than a page run may hold.
    refused(
        |b| {
            let at = page_at(b) + 4;
            b[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        },
        "at most",
    );
    // An unknown section.
    refused(
        |b| {
            let at = page_at(b);
            b[at..at + 4].copy_from_slice(b"XXXX");
        },
        "unexpected section",
    );
}

/// A stream whose only page section is built by hand (valid crc), to test its contents.
fn with_page(gpa: u64, pages: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mem = memory();
    let mut w = StreamWriter::new(Vec::new());
    w.start(b"{\"conf\":1}", &layout(&mem)).unwrap();
    let mut payload = Vec::new();
    payload.extend_from_slice(&gpa.to_le_bytes());
    payload.extend_from_slice(&pages.to_le_bytes());
    payload.extend_from_slice(&kind.to_le_bytes());
    payload.extend_from_slice(data);
    format::write_section(w.get_mut(), TAG_PAGE, &payload).unwrap();
    w.finish(b"{}").unwrap();
    w.get_mut().clone()
}

#[test]
fn page_runs_must_lie_in_one_region_and_match_their_data() {
    let mem = memory();
    let err = |b: Vec<u8>| read_all(&b, &mem).map(|_| ()).unwrap_err().to_string();
    // Past the end of region 0 (0x40000) into the hole.
    assert!(err(with_page(0x3f_000, 2, 0, &[])).contains("outside guest RAM"));
    // Entirely in the hole, and beyond any region.
    assert!(err(with_page(0x80_000, 1, 1, &[0; 4096])).contains("outside guest RAM"));
    assert!(err(with_page(u64::MAX - 4095, 1, 0, &[])).contains("outside guest RAM"));
    // Not page-aligned; no pages; a bad kind; data that does not match the count.
    assert!(err(with_page(0x1001, 1, 0, &[])).contains("page run"));
    assert!(err(with_page(0x1000, 0, 0, &[])).contains("page run"));
    assert!(err(with_page(0x1000, 1, 7, &[])).contains("page kind"));
    assert!(err(with_page(0x1000, 2, 1, &[0; 4096])).contains("carries"));
    assert!(err(with_page(0x1000, 1, 0, &[0; 4096])).contains("carries"));
    // A run of zeros over 2 MiB of a 256 KiB region.
    assert!(err(with_page(0, 512, 0, &[])).contains("outside guest RAM"));
    // What is valid passes.
    assert!(read_all(&with_page(0x3f_000, 1, 1, &[9; 4096]), &mem).is_ok());
}

#[test]
fn nothing_but_the_end_follows_the_state() {
    let mem = memory();
    let mut w = StreamWriter::new(Vec::new());
    w.start(b"{\"conf\":1}", &layout(&mem)).unwrap();
    format::write_section(w.get_mut(), format::TAG_STAT, b"{}").unwrap();
    w.pass(2).unwrap();
    let e = read_all(w.get_mut(), &mem).unwrap_err().to_string();
    assert!(e.contains("after the machine state"), "{e}");

    let mut w = StreamWriter::new(Vec::new());
    w.start(b"{\"conf\":1}", &layout(&mem)).unwrap();
    format::write_section(w.get_mut(), TAG_END, &0u32.to_le_bytes()).unwrap();
    let e = read_all(w.get_mut(), &mem).unwrap_err().to_string();
    assert!(e.contains("before the machine state"), "{e}");
}

#[test]
fn the_destination_answers_once() {
    let mut v = Vec::new();
    send_answer(&mut v, Ok(())).unwrap();
    assert_eq!(read_answer(&mut &v[..]).unwrap(), Ok(()));
    let mut v = Vec::new();
    let long = "é".repeat(5000);
    send_answer(&mut v, Err(&long)).unwrap();
    let got = read_answer(&mut &v[..]).unwrap().unwrap_err();
    assert!(got.len() <= MAX_REASON as usize && long.starts_with(&got));
    // Anything else is refused, never trusted.
    let mut v = Vec::new();
    format::write_section(&mut v, *b"NOPE", b"").unwrap();
    assert!(read_answer(&mut &v[..]).is_err());
    assert!(read_answer(&mut &b"OKAY"[..]).is_err());
}

#[test]
fn syncs_come_back_with_their_number() {
    let mem = memory();
    let mut w = StreamWriter::new(Vec::new());
    w.start(b"{\"conf\":1}", &layout(&mem)).unwrap();
    w.sync(7).unwrap();
    w.finish(b"{}").unwrap();
    let items = read_all(w.get_mut(), &mem).unwrap();
    assert_eq!(items[0], Item::Sync(7));
    let mut back = Vec::new();
    send_sync(&mut back, 7).unwrap();
    assert!(read_sync(&mut &back[..], 7).is_ok());
    assert!(read_sync(&mut &back[..], 8)
        .unwrap_err()
        .to_string()
        .contains("out of step"));
    let mut fail = Vec::new();
    send_answer(&mut fail, Err("no room")).unwrap();
    let e = read_sync(&mut &fail[..], 7).unwrap_err().to_string();
    assert!(e.contains("gave up: no room"), "{e}");
}
