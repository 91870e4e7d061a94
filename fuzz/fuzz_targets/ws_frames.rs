//! The WebSocket frame gate in front of tungstenite, under random chunking:
//! reads never cross a frame end, and `resting` is true exactly between
//! whole messages (a data frame with FIN ends one; control frames inside a
//! fragmented message do not).
#![no_main]
use libfuzzer_sys::fuzz_target;

mod chunked;

const OPCODES: [u8; 6] = [0, 1, 2, 8, 9, 10];

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let mut rest = rest;
    let (mut wire, mut ends, mut resting) = (Vec::new(), Vec::new(), Vec::new());
    let mut fragmented = false;
    for _ in 0..n % 24 {
        let [b, l, tail @ ..] = rest else { break };
        rest = tail;
        let opcode = OPCODES[usize::from(*b) % OPCODES.len()];
        let fin = b & 0x80 != 0;
        let masked = b & 0x40 != 0;
        let len = usize::from(*l) * 9;
        wire.push(if fin { 0x80 } else { 0 } | opcode);
        let mask = if masked { 0x80 } else { 0 };
        match (b >> 3) & 3 {
            // The shortest form, or a longer one than needed (legal to frame).
            0 | 3 if len < 126 => wire.push(mask | len as u8),
            0 | 1 | 3 => {
                wire.push(mask | 126);
                wire.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                wire.push(mask | 127);
                wire.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            wire.extend_from_slice(&[1, 2, 3, 4]);
        }
        wire.extend((0..len).map(|i| i as u8));
        ends.push(wire.len());
        if opcode < 8 {
            fragmented = !fin;
        }
        if !fragmented {
            resting.push(wire.len());
        }
    }
    let Some((&early, rest)) = rest.split_first() else { return };
    let (chunks, reads) = rest.split_at(rest.len() / 2);
    chunked::drive::<gateway::fuzzing::Frames>(&wire, usize::from(early) * 7, chunks, reads, &ends, &resting);
});
