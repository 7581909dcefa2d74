//! KVM's state structures in the state JSON as hex strings (`#[serde(with = "hex")]`).
//!
//! kvm-bindings serialises them as byte arrays, which JSON spells as arrays of numbers: a
//! number to parse for each byte (XSAVE alone is 4 KiB per vCPU), and 2 to 4 bytes of text.
//! A live migration's destination parses the state inside the downtime. As hex the same
//! state is 2 bytes of text per byte and one string to decode: half the parsing time
//! (a 2-vCPU state: 149 -> 70 us on the host).
//!
//! Reading accepts both spellings, so state written by format version 1 (arrays) still loads.
//! A string shorter or longer than the structure is zero-padded or cut, as kvm-bindings does
//! for arrays, so that a kernel that grows a structure at its end can read older state.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes};

const DIGITS: &[u8; 16] = b"0123456789abcdef";

fn encode(bytes: &[u8]) -> String {
    let mut s = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)]);
        s.push(DIGITS[usize::from(b & 0xf)]);
    }
    // Only ASCII digits were pushed.
    String::from_utf8(s).unwrap_or_default()
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn decode<E: de::Error>(s: &str) -> Result<Vec<u8>, E> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return Err(E::custom("a hex string of odd length"));
    }
    s.chunks_exact(2)
        .map(|p| match (nibble(p[0]), nibble(p[1])) {
            (Some(h), Some(l)) => Ok(h << 4 | l),
            _ => Err(E::custom(
                "a hex string with a character that is not a hex digit",
            )),
        })
        .collect()
}

/// A `T` of `bytes`, zero-padded or cut to its size.
fn from_bytes<T: FromBytes + IntoBytes>(bytes: &[u8]) -> T {
    let mut value = T::new_zeroed();
    let dst = value.as_mut_bytes();
    let n = bytes.len().min(dst.len());
    dst[..n].copy_from_slice(&bytes[..n]);
    value
}

/// One structure.
pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&encode(v.as_bytes()))
}

/// One structure, from a hex string or an array of byte values.
pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
where
    T: FromBytes + IntoBytes,
    D: Deserializer<'de>,
{
    struct V<T>(PhantomData<T>);
    impl<'de, T: FromBytes + IntoBytes> Visitor<'de> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a hex string or an array of bytes")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            Ok(from_bytes(&decode::<E>(s)?))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
            let mut value = T::new_zeroed();
            let dst = value.as_mut_bytes();
            let mut i = 0;
            // Bytes past the structure's end are read and dropped.
            while let Some(b) = seq.next_element::<u8>()? {
                if let Some(slot) = dst.get_mut(i) {
                    *slot = b;
                }
                i += 1;
            }
            Ok(value)
        }
    }
    d.deserialize_any(V(PhantomData))
}

/// A list of structures (CPUID entries, MSRs), as one hex string of all of them.
pub mod vec {
    use super::*;

    /// The list, concatenated.
    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        v: &[T],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(v.as_bytes()))
    }

    /// From a hex string whose length is a multiple of the structure's, or (format version 1)
    /// an array of structures each spelled as kvm-bindings does.
    pub fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
    where
        T: FromBytes + IntoBytes + Deserialize<'de>,
        D: Deserializer<'de>,
    {
        struct V<T>(PhantomData<T>);
        impl<'de, T: FromBytes + IntoBytes + Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a hex string or an array")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<T>, E> {
                let bytes = decode::<E>(s)?;
                let size = std::mem::size_of::<T>().max(1);
                if !bytes.len().is_multiple_of(size) {
                    return Err(E::custom(format!(
                        "{} bytes are not a whole number of {size}-byte entries",
                        bytes.len()
                    )));
                }
                Ok(bytes.chunks_exact(size).map(from_bytes).collect())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                // Bounded by the input's length: each element takes text to spell.
                let mut out = Vec::new();
                while let Some(v) = seq.next_element::<T>()? {
                    out.push(v);
                }
                Ok(out)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_msr_entry, kvm_regs};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Hex {
        #[serde(with = "super")]
        regs: kvm_regs,
        #[serde(with = "super::vec")]
        msrs: Vec<kvm_msr_entry>,
    }

    /// As format version 1 wrote it: kvm-bindings' own serialisation.
    #[derive(Serialize)]
    struct Arrays {
        regs: kvm_regs,
        msrs: Vec<kvm_msr_entry>,
    }

    fn sample() -> Hex {
        Hex {
            regs: kvm_regs {
                rax: 0x0123_4567_89ab_cdef,
                rip: 0xffff_ffff_8100_0000,
                rflags: 2,
                ..Default::default()
            },
            msrs: vec![
                kvm_msr_entry {
                    index: 0x10,
                    data: 12345,
                    ..Default::default()
                },
                kvm_msr_entry {
                    index: 0xc000_0080,
                    data: 0xd01,
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn hex_round_trips_and_is_smaller_than_arrays() {
        let v = sample();
        let hex = serde_json::to_string(&v).unwrap();
        assert!(hex.contains("\"regs\":\"efcdab8967452301"), "{hex}");
        let back: Hex = serde_json::from_str(&hex).unwrap();
        assert_eq!(back, v);
        let arrays = serde_json::to_string(&Arrays {
            regs: v.regs,
            msrs: v.msrs.clone(),
        })
        .unwrap();
        assert!(
            hex.len() < arrays.len(),
            "{} vs {}",
            hex.len(),
            arrays.len()
        );
    }

    #[test]
    fn version_1_arrays_still_read() {
        let v = sample();
        let arrays = serde_json::to_string(&Arrays {
            regs: v.regs,
            msrs: v.msrs.clone(),
        })
        .unwrap();
        let back: Hex = serde_json::from_str(&arrays).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn short_and_long_strings_are_padded_or_cut() {
        let short: Hex = serde_json::from_str(r#"{"regs":"01","msrs":""}"#).unwrap();
        assert_eq!(short.regs.rax, 1);
        assert!(short.msrs.is_empty());
        let long = format!(r#"{{"regs":"{}","msrs":""}}"#, "ff".repeat(1000));
        let cut: Hex = serde_json::from_str(&long).unwrap();
        assert_eq!(cut.regs.rflags, u64::MAX);
    }

    #[test]
    fn malformed_strings_are_refused() {
        for bad in [
            r#"{"regs":"0","msrs":""}"#,
            r#"{"regs":"zz","msrs":""}"#,
            r#"{"regs":"00","msrs":"00"}"#,
            r#"{"regs":7,"msrs":""}"#,
        ] {
            assert!(serde_json::from_str::<Hex>(bad).is_err(), "{bad}");
        }
    }
}
