//! The TLS record gate in front of rustls, under random chunking: reads
//! never cross a record end, and `resting` is true exactly between records
//! (where a hot upgrade may take the session).
#![no_main]
use libfuzzer_sys::fuzz_target;

mod chunked;

fuzz_target!(|data: &[u8]| {
    // [records][early][chunks][reads], the first byte saying how many records.
    let Some((&n, rest)) = data.split_first() else { return };
    let mut rest = rest;
    let mut wire = Vec::new();
    let mut ends = Vec::new();
    for _ in 0..n % 16 {
        let [typ, a, b, tail @ ..] = rest else { break };
        rest = tail;
        let len = usize::from(u16::from_be_bytes([*a, *b])) % 3000;
        wire.extend_from_slice(&[*typ, 3, 3, (len >> 8) as u8, len as u8]);
        wire.extend((0..len).map(|i| i as u8));
        ends.push(wire.len());
    }
    let Some((&early, rest)) = rest.split_first() else { return };
    let (chunks, reads) = rest.split_at(rest.len() / 2);
    chunked::drive::<gateway::fuzzing::Records>(&wire, usize::from(early) * 11, chunks, reads, &ends, &ends);
});
