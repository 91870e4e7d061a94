//! HTTP routing: the host a request is routed on is the host of the `Host`
//! forwarded with it; two `Host` headers are refused; a normalised path is
//! normal (normalising it again changes nothing), starts with `/`, has no
//! dot segments and no escapes of unreserved characters.
#![no_main]
use libfuzzer_sys::fuzz_target;

fn check_path(path: &str) {
    let Ok(n) = gateway::fuzzing::normalize_path(path) else { return };
    let Some(n) = n else { return };
    assert!(n.starts_with('/'), "{path:?} -> {n:?}");
    assert_eq!(gateway::fuzzing::normalize_path(&n), Ok(None), "{path:?} -> {n:?} is not normal");
    for seg in n[1..].split('/') {
        assert!(seg != "." && seg != "..", "{path:?} -> {n:?} keeps a dot segment");
    }
    let b = n.as_bytes();
    for (i, _) in n.match_indices('%') {
        let c = u8::from_str_radix(&n[i + 1..i + 3], 16).expect("a whole escape");
        assert!(!(c.is_ascii_alphanumeric() || b"-._~".contains(&c)), "{path:?} -> {n:?} keeps %{c:02X}");
        assert!(!b[i + 1..i + 3].iter().any(u8::is_ascii_lowercase), "{path:?} -> {n:?}: lower-case escape");
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The first line is the request target; the others are `Host` values
    // (or other headers, `name: value`).
    let mut lines = text.split('\n');
    let target = lines.next().unwrap_or("/");
    check_path(target);
    let mut req = hyper::Request::builder().uri(target);
    for l in lines {
        let (name, value) = l.split_once(':').unwrap_or(("host", l));
        req = req.header(name.trim(), value.trim());
    }
    let Ok(req) = req.body(()) else { return };
    let hosts = req.headers().get_all("host").iter().count();
    match gateway::fuzzing::request_target(&req) {
        Ok((host, forwarded)) => {
            assert!(hosts <= 1, "{hosts} Host headers accepted");
            match (&host, &forwarded) {
                (Some(h), Some(f)) => {
                    let a: hyper::http::uri::Authority = f.parse().expect("the forwarded Host parses");
                    assert_eq!(a.host().trim_end_matches('.').to_ascii_lowercase(), *h, "routed on {h}, forwarded {f}");
                }
                (Some(h), None) => panic!("routed on {h} with no Host forwarded"),
                (None, _) => {}
            }
        }
        Err(why) => assert!(!why.is_empty()),
    }
});
