//! The configuration parser: every input is a config or an error that
//! names what is wrong, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = gateway::config::Config::parse(&text, std::path::Path::new("fuzz.yaml")) {
        assert!(!e.to_string().trim().is_empty(), "an empty error for {text:?}");
    }
});
