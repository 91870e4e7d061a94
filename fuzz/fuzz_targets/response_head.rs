//! A backend's answer to a forwarded upgrade: a whole head gives its
//! status and length within the bytes read, its own bytes alone give the
//! same, every shorter prefix is incomplete; a 101 becomes the client's head
//! without a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    use gateway::fuzzing::response_head;
    if let Ok(Some((status, len))) = response_head(data) {
        assert!(len <= data.len());
        assert_eq!(response_head(&data[..len]), Ok(Some((status, len))));
        let step = (len / 32).max(1);
        for n in (0..len).step_by(step).chain(len.saturating_sub(2)..len) {
            assert!(matches!(response_head(&data[..n]), Ok(None)), "a whole head in {n} of its {len} bytes");
        }
    }
});
