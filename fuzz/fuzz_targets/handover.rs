//! The admin socket's input, from whoever may connect to it: the request
//! line, and the hand-over's wire messages (from a successor or predecessor
//! daemon). A line changes state (reload, hand-over) only if it is exactly
//! one of those words, whatever surrounds it; every message parses to a
//! value or an error, and the fields a new daemon decodes before touching a
//! socket (hex, TLS keys) give errors, never a panic.
#![no_main]
use gateway::control::admin::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = gateway::fuzzing::admin_request(data);
    let word = String::from_utf8_lossy(data);
    let word = word.trim();
    if r.changes_state() {
        assert!(word == "reload" || word == "handover", "{word:?} read as {r:?}");
    }
    if let Request::Unknown(w) = &r {
        assert_eq!(w, word);
    }
    gateway::fuzzing::handover(data);
});
