use std::io::Cursor;

use virtio::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::*;

fn empty_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 64 << 10),
        (GuestAddress(1 << 20), 32 << 10),
    ])
    .unwrap()
}

fn memory() -> GuestMemoryMmap {
    let mem = empty_memory();
    mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
    mem.write_slice(&[0xaa; 4096], GuestAddress((1 << 20) + 0x3000))
        .unwrap();
    mem.write_obj(0x55u8, GuestAddress(0xffff)).unwrap();
    mem
}

fn stream() -> Vec<u8> {
    let mut c = Cursor::new(Vec::new());
    let stats = write_stream(&mut c, b"{\"c\":1}", b"{\"s\":2}", &memory()).unwrap();
    assert_eq!(stats.total, 96 << 10);
    assert_eq!(stats.data_pages, 3);
    assert_eq!(stats.zero_pages, 24 - 3);
    c.into_inner()
}

#[test]
fn round_trip_lazy_layout_and_eager_read() {
    let bytes = stream();
    let parsed = parse(&mut Cursor::new(&bytes), bytes.len() as u64).unwrap();
    assert_eq!(parsed.config, b"{\"c\":1}");
    assert_eq!(parsed.state, b"{\"s\":2}");
    assert_eq!(parsed.memory.data_offset % PAGE_SIZE, 0);
    assert_eq!(
        parsed.memory.regions,
        vec![
            MemRegion {
                gpa: 0,
                len: 64 << 10
            },
            MemRegion {
                gpa: 1 << 20,
                len: 32 << 10
            }
        ]
    );
    // The page data is where the layout says.
    let off = parsed.memory.data_offset as usize;
    assert_eq!(&bytes[off + 0x1000..off + 0x1005], b"hello");
    // Eager read into fresh memory gives the same contents.
    let mut r = Cursor::new(&bytes);
    let (_, _, layout) = parse_metadata(&mut r).unwrap();
    r.set_position(layout.data_offset);
    let fresh = empty_memory();
    read_memory(&mut r, &layout, &fresh).unwrap();
    let mut buf = [0u8; 5];
    fresh.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
    assert_eq!(&buf, b"hello");
    assert_eq!(fresh.read_obj::<u8>(GuestAddress(0xffff)).unwrap(), 0x55);
    assert_eq!(
        fresh
            .read_obj::<u8>(GuestAddress((1 << 20) + 0x3fff))
            .unwrap(),
        0xaa
    );
}

#[test]
fn every_truncation_is_refused() {
    let bytes = stream();
    let mut cuts: Vec<usize> = (0..200).collect();
    cuts.extend([bytes.len() / 2, bytes.len() - 17, bytes.len() - 1]);
    for cut in cuts {
        let part = &bytes[..cut];
        let r = parse(&mut Cursor::new(part), part.len() as u64);
        assert!(r.is_err(), "cut at {cut} accepted");
    }
}

#[test]
fn a_flipped_byte_in_the_metadata_is_caught() {
    let bytes = stream();
    let parsed = parse(&mut Cursor::new(&bytes), bytes.len() as u64).unwrap();
    for at in 0..parsed.memory.data_offset as usize {
        let mut b = bytes.clone();
        b[at] ^= 0x40;
        assert!(
            parse(&mut Cursor::new(&b), b.len() as u64).is_err(),
            "flip at {at} accepted"
        );
    }
}

#[test]
fn a_flipped_byte_in_memory_is_caught_when_read_eagerly() {
    let mut bytes = stream();
    let parsed = parse(&mut Cursor::new(&bytes), bytes.len() as u64).unwrap();
    bytes[parsed.memory.data_offset as usize + 0x1001] ^= 1;
    let mut r = Cursor::new(&bytes);
    let (_, _, layout) = parse_metadata(&mut r).unwrap();
    r.set_position(layout.data_offset);
    let fresh = empty_memory();
    assert!(matches!(
        read_memory(&mut r, &layout, &fresh),
        Err(FormatError::Checksum(_))
    ));
}

fn with_header(version: u32, flags: u32) -> Vec<u8> {
    let mut b = stream();
    b[12..16].copy_from_slice(&version.to_le_bytes());
    b[16..20].copy_from_slice(&flags.to_le_bytes());
    let c = crc32fast::hash(&b[..20]);
    b[20..24].copy_from_slice(&c.to_le_bytes());
    b
}

#[test]
fn newer_versions_and_foreign_files_are_refused_clearly() {
    let newer = FORMAT_VERSION + 1;
    let b = with_header(newer, 0);
    let e = parse(&mut Cursor::new(&b), b.len() as u64).unwrap_err();
    assert!(matches!(e, FormatError::NewerVersion { found } if found == newer));
    assert!(e.to_string().contains("newer"), "{e}");
    // Every older version is still read.
    for older in 1..FORMAT_VERSION {
        let b = with_header(older, 0);
        assert!(
            parse(&mut Cursor::new(&b), b.len() as u64).is_ok(),
            "version {older}"
        );
    }
    let b = with_header(1, 1);
    assert!(matches!(
        parse(&mut Cursor::new(&b), b.len() as u64),
        Err(FormatError::Malformed(_))
    ));
    let junk = b"QFI\xfb\0\0\0\x03 this is a qcow2 image, not a state file".to_vec();
    assert!(matches!(
        parse(&mut Cursor::new(&junk), junk.len() as u64),
        Err(FormatError::BadMagic)
    ));
}

#[test]
fn huge_lengths_are_refused_before_allocating() {
    let mut b = stream();
    // CONF's length field sits right after the 24-byte header and its 4-byte tag.
    b[28..36].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        parse(&mut Cursor::new(&b), b.len() as u64),
        Err(FormatError::Malformed(_))
    ));
}
