//! The SNI peek against rustls's own parsing of the same bytes: where
//! rustls accepts a ClientHello, the peek finds the same server name; every
//! prefix of the input is "incomplete" or gives the whole input's answer.
#![no_main]
use gateway::fuzzing::{client_hello, Hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = client_hello(data);
    // Up to 64 prefixes, evenly spread, and the ones just short of the end.
    let step = (data.len() / 64).max(1);
    for n in (0..data.len()).step_by(step).chain(data.len().saturating_sub(3)..data.len()) {
        match client_hello(&data[..n]) {
            Hello::Incomplete => {}
            early => assert_eq!(early, whole, "the first {n} of {} bytes answer otherwise", data.len()),
        }
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = data;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    if let Ok(Some(accepted)) = acceptor.accept() {
        let name = accepted.client_hello().server_name().map(str::to_owned);
        match &whole {
            Hello::Sni(ours) if name.is_none() || *ours == name => {}
            other => panic!("rustls reads server name {name:?}, the peek {other:?}"),
        }
    }
});
