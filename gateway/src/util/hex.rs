//! Hex text for bytes that travel in the hot upgrade's JSON messages (early
//! bytes, TLS keys).

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("odd-length hex ({} digits)", s.len()));
    }
    let digit = |i: usize| (s.as_bytes()[i] as char).to_digit(16).ok_or_else(|| format!("bad hex at {i}"));
    (0..s.len()).step_by(2).map(|i| Ok((digit(i)? * 16 + digit(i + 1)?) as u8)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&bytes)).unwrap(), bytes);
        assert_eq!(from_hex("ABcd").unwrap(), vec![0xab, 0xcd]);
        // Multi-byte characters of an even byte length used to split at a
        // non-boundary and panic.
        for bad in ["a", "zz", "0x", "aéb", "éa", "+1", "ab\u{3000}"] {
            assert!(from_hex(bad).is_err(), "{bad:?}");
        }
    }
}
