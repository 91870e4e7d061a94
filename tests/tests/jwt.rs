//! Authentication at the WebSocket upgrade and on plain HTTP requests, end
//! to end: `auth.jwt` with tokens minted by Python (`cryptography`, `hmac`;
//! tests/peers/mint_jwt.py), and `auth.external` against a small Python
//! authorization service (tests/peers/authz.py); presented by Python
//! `websockets` and curl, with a Node `ws`/`http` backend behind the route.
use std::process::Command;

use gateway_tests::*;

fn mint(args: &[&str]) -> String {
    let script = repo_path("tests/peers/mint_jwt.py");
    let out = Command::new("python3").arg(script).args(args).output().expect("python3");
    assert!(out.status.success(), "mint_jwt.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

const SECRET: &str = "an-hs256-secret-of-32-bytes-or-more";

fn claims(sub: Option<&str>, aud: &str, iss: &str, exp: i64) -> String {
    let t = now() as i64;
    let sub = sub.map(|s| format!("\"sub\":\"{s}\",")).unwrap_or_default();
    format!("{{{sub}\"aud\":\"{aud}\",\"iss\":\"{iss}\",\"iat\":{t},\"exp\":{}}}", t + exp)
}

/// The Python client's echo through `url`: its JSON answer.
fn ws(topo: &Topology, url: &str, extra: &[&str]) -> Value {
    let mut args = vec!["echo", url, "--sizes", "5,300"];
    args.extend_from_slice(extra);
    py_client(topo, &args)
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn jwt_guards_the_upgrade_and_plain_requests() {
    let topo = Topology::new();
    let backend = Peer::node_server(&topo, "b1");
    let keys = temp_dir("jwt-keys");
    mint(&["keys", keys.to_str().unwrap()]);
    let jwks = keys.join("jwks.json");
    let (rsa, ec) = (keys.join("rsa.pem"), keys.join("ec.pem"));
    let b = backend.addr;
    let listeners = format!(
        "  - name: w\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n    routes:\n\
         \x20     - path_prefix: /open\n        backends: [\"{b}\"]\n\
         \x20     - path_prefix: /secure\n        backends: [\"{b}\"]\n        auth:\n          jwt:\n\
         \x20           keys: {}\n            token_from: [header, \"query:token\", \"cookie:session\", subprotocol]\n\
         \x20           issuer: https://id.test\n            audiences: [chat]\n            leeway: 60s\n\
         \x20           claims_to_headers: {{ sub: X-User }}\n\
         \x20     - path_prefix: /hs\n        backends: [\"{b}\"]\n        auth:\n          jwt:\n\
         \x20           secret: \"{SECRET}\"\n",
        jwks.display()
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let at = gw.listener("w");
    let url = |path: &str| format!("ws://{at}{path}");

    // No auth on the route: as before.
    let v = ws(&topo, &url("/open"), &[]);
    assert!(v["error"].is_null(), "{v}");

    // No token: 401, and the backend never sees the request.
    let v = ws(&topo, &url("/secure"), &[]);
    assert!(v["error"].as_str().unwrap_or_default().contains("401"), "{v}");

    let good = claims(Some("ann"), "chat", "https://id.test", 300);
    let rs = mint(&["sign", "RS256", rsa.to_str().unwrap(), &good, "--kid", "r1"]);
    let es = mint(&["sign", "ES256", ec.to_str().unwrap(), &good, "--kid", "e1"]);
    let hs = mint(&["sign", "HS256", SECRET, &good]);
    // Each place the route reads a token from, each algorithm.
    let bearer = format!("Authorization:Bearer {rs}");
    let v = ws(&topo, &url("/secure"), &["--header", &bearer]);
    assert!(v["error"].is_null(), "RS256 in the header: {v}");
    let v = ws(&topo, &url(&format!("/secure?token={es}")), &[]);
    assert!(v["error"].is_null(), "ES256 in the query: {v}");
    let cookie = format!("Cookie:theme=dark; session={es}");
    let v = ws(&topo, &url("/secure"), &["--header", &cookie]);
    assert!(v["error"].is_null(), "ES256 in a cookie: {v}");
    // A browser's way: the token as a subprotocol entry. The backend never
    // sees it (it picks from what is left, or none).
    let protocols = format!("chat, {rs}");
    let v = ws(&topo, &url("/secure"), &["--protocol", &protocols]);
    assert!(v["error"].is_null(), "RS256 as a subprotocol: {v}");
    assert_ne!(v["protocol"].as_str(), Some(rs.as_str()), "{v}");
    // Node's `ws` as the client too: the header, the subprotocol, and a
    // refusal it sees as a 401 with the challenge.
    let node_bearer = format!("Authorization: Bearer {es}");
    let v = node_client(&topo, &[&url("/secure"), "--sizes", "5,70000", "--header", &node_bearer]);
    assert!(v["error"].is_null(), "Node, ES256 in the header: {v}");
    let v = node_client(&topo, &[&url("/secure"), "--sizes", "5", "--protocol", &format!("chat,{rs}")]);
    assert!(v["error"].is_null(), "Node, RS256 as a subprotocol: {v}");
    let v = node_client(&topo, &[&url("/secure"), "--sizes", "5"]);
    assert_eq!(v["error"], "HTTP 401", "{v}");
    assert!(v["www_authenticate"].as_str().unwrap_or_default().starts_with("Bearer realm=\"gateway\""), "{v}");
    let hs_bearer = format!("Authorization:Bearer {hs}");
    let v = ws(&topo, &url("/hs"), &["--header", &hs_bearer]);
    assert!(v["error"].is_null(), "HS256 with the inline secret: {v}");

    // Refusals, each for its own reason.
    let expired = mint(&[
        "sign",
        "RS256",
        rsa.to_str().unwrap(),
        &claims(Some("ann"), "chat", "https://id.test", -600),
        "--kid",
        "r1",
    ]);
    let in_leeway = mint(&[
        "sign",
        "RS256",
        rsa.to_str().unwrap(),
        &claims(Some("ann"), "chat", "https://id.test", -20),
        "--kid",
        "r1",
    ]);
    let wrong_aud =
        mint(&["sign", "ES256", ec.to_str().unwrap(), &claims(None, "mail", "https://id.test", 300), "--kid", "e1"]);
    let wrong_iss =
        mint(&["sign", "ES256", ec.to_str().unwrap(), &claims(None, "chat", "https://evil.test", 300), "--kid", "e1"]);
    let none = mint(&["sign", "none", "-", &good]);
    // The classic confusion: HS256 "signed" with the RSA public key's JWKS.
    let confused = mint(&["sign", "HS256", &std::fs::read_to_string(&jwks).unwrap(), &good]);
    let mut tampered = rs.clone();
    tampered.replace_range(tampered.len() - 6.., "AAAAAA");
    for (token, why) in [
        (&expired, "expired"),
        (&wrong_aud, "audience"),
        (&wrong_iss, "issuer"),
        (&none, "alg none"),
        (&confused, "HS256 with the public key"),
        (&tampered, "tampered signature"),
    ] {
        let h = format!("Authorization:Bearer {token}");
        let v = ws(&topo, &url("/secure"), &["--header", &h]);
        assert!(v["error"].as_str().unwrap_or_default().contains("401"), "{why}: {v}");
    }
    let h = format!("Authorization:Bearer {in_leeway}");
    assert!(ws(&topo, &url("/secure"), &["--header", &h])["error"].is_null(), "within the leeway");
    // HS256 on the RSA route, RS256 on the HS256 route: no key of that algorithm.
    assert!(ws(&topo, &url("/hs"), &["--header", &bearer])["error"].as_str().unwrap_or_default().contains("401"));

    // Plain HTTP on the same route: 401 with WWW-Authenticate, or through
    // with the claim as a header (a client's own X-User is replaced).
    let (status, head, _) = curl(&topo, &[&format!("http://{at}/secure/headers")]);
    assert_eq!(status, 401, "{head}");
    assert!(head.to_ascii_lowercase().contains("www-authenticate: bearer realm=\"gateway\""), "{head}");
    let expired_h = format!("Authorization: Bearer {expired}");
    let (status, head, _) = curl(&topo, &["-H", &expired_h, &format!("http://{at}/secure/headers")]);
    assert_eq!(status, 401, "{head}");
    assert!(head.contains("error=\"invalid_token\""), "{head}");
    let bearer_h = format!("Authorization: Bearer {rs}");
    let (status, head, body) =
        curl(&topo, &["-H", &bearer_h, "-H", "X-User: mallory", &format!("http://{at}/secure/headers")]);
    assert_eq!(status, 200, "{head}{body}");
    let seen: Value = serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(seen["headers"]["x-user"], "ann", "{seen}");
    let no_sub =
        mint(&["sign", "ES256", ec.to_str().unwrap(), &claims(None, "chat", "https://id.test", 300), "--kid", "e1"]);
    let h = format!("Authorization: Bearer {no_sub}");
    let (status, _, body) = curl(&topo, &["-H", &h, "-H", "X-User: mallory", &format!("http://{at}/secure/headers")]);
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(body.trim()).unwrap();
    assert!(seen["headers"]["x-user"].is_null(), "a forged X-User must not pass: {seen}");

    // Counted per route and cause; logged without the token.
    let l = gw.listener_stats("w");
    let denied = &l["route_refused"];
    for (key, at_least) in [
        ("*/secure jwt-missing", 2),
        ("*/secure jwt-expired", 2),
        ("*/secure jwt-audience", 1),
        ("*/secure jwt-issuer", 1),
        ("*/secure jwt-algorithm", 1),
        ("*/secure jwt-unknown-key", 1),
        ("*/secure jwt-signature", 1),
        ("*/hs jwt-unknown-key", 1),
    ] {
        assert!(denied[key].as_u64().unwrap_or(0) >= at_least, "{key} in {denied}");
    }
    let log = gw.log_text();
    assert!(log.contains("request refused by auth.jwt"), "{log}");
    for t in [&rs, &es, &hs, &expired] {
        assert!(!log.contains(t.as_str()), "a token in the log");
    }
    let _ = std::fs::remove_dir_all(&keys);
}

#[test]
#[cfg_attr(not(gateway_privileged), ignore = "needs root (network namespaces, BPF)")]
fn an_external_service_decides_and_its_refusals_reach_the_client() {
    let topo = Topology::new();
    let backend = Peer::node_server(&topo, "b1");
    let authz = Peer::start(
        &topo.backend,
        BACKEND_IP,
        "python3",
        &[repo_path("tests/peers/authz.py").to_str().unwrap(), "--listen", &format!("{BACKEND_IP}:0")],
    );
    // A port where nothing listens, for the service out of reach.
    let dead = topo.backend_listener().local_addr().unwrap();
    let b = backend.addr;
    let a = authz.addr;
    let route = |prefix: &str, url: &str, more: &str| {
        format!(
            "\x20     - path_prefix: {prefix}\n        backends: [\"{b}\"]\n        auth:\n          external:\n\
             \x20           url: {url}\n            timeout: 500ms\n            headers: [Authorization]\n\
             \x20           upstream_headers: [X-User-Id, X-Seen-Path, X-Seen-Forwarded-For]\n{more}"
        )
    };
    let listeners = format!(
        "  - name: w\n    bind: \"{GW_CLIENT_SIDE_IP}:0\"\n    protocol: websocket\n    routes:\n{}{}{}",
        route("/ext", &format!("http://{a}/check"), ""),
        route("/closed", &format!("http://{dead}/check"), ""),
        route("/open-on-failure", &format!("http://{dead}/check"), "            failure_mode_allow: true\n"),
    );
    let gw = Gateway::start(&topo, &GatewayConfig { listeners, extra: String::new() });
    let at = gw.listener("w");

    // Allowed: the upgrade goes through, and plain requests carry the
    // service's headers to the backend.
    let ok = ["--header", "Authorization:Bearer letmein"];
    let v = ws(&topo, &format!("ws://{at}/ext"), &ok);
    assert!(v["error"].is_null(), "{v}");
    let (status, head, body) = curl(
        &topo,
        &["-H", "Authorization: Bearer letmein", "-H", "X-User-Id: 7", &format!("http://{at}/ext/headers?q=1")],
    );
    assert_eq!(status, 200, "{head}{body}");
    let seen: Value = serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(seen["headers"]["x-user-id"], "42", "the service's header replaces the client's: {seen}");
    assert_eq!(seen["headers"]["x-seen-path"], "/check/ext/headers?q=1", "{seen}");
    assert_eq!(seen["headers"]["x-seen-forwarded-for"], CLIENT_IP, "{seen}");

    // Refused: the client gets the service's answer as it gave it.
    let v = ws(&topo, &format!("ws://{at}/ext"), &["--header", "Authorization:Bearer nope"]);
    assert!(v["error"].as_str().unwrap_or_default().contains("403"), "{v}");
    // The same with Node's `ws`.
    let v =
        node_client(&topo, &[&format!("ws://{at}/ext"), "--sizes", "5", "--header", "Authorization: Bearer letmein"]);
    assert!(v["error"].is_null(), "{v}");
    let v = node_client(&topo, &[&format!("ws://{at}/ext"), "--sizes", "5", "--header", "Authorization: Bearer nope"]);
    assert_eq!(v["error"], "HTTP 403", "{v}");
    let (status, head, body) = curl(&topo, &[&format!("http://{at}/ext/headers")]);
    assert_eq!(status, 403, "{head}");
    assert!(head.to_ascii_lowercase().contains("x-reason: nope"), "{head}");
    assert_eq!(body.trim(), "denied by authz");

    // Too slow, or out of reach: 503, unless the route fails open.
    let (status, head, _) = curl(&topo, &["-H", "Authorization: Bearer slow", &format!("http://{at}/ext/headers")]);
    assert_eq!(status, 503, "{head}");
    let (status, head, _) =
        curl(&topo, &["-H", "Authorization: Bearer letmein", &format!("http://{at}/closed/headers")]);
    assert_eq!(status, 503, "{head}");
    let (status, head, _) = curl(&topo, &[&format!("http://{at}/open-on-failure/headers")]);
    assert_eq!(status, 200, "{head}");

    let l = gw.listener_stats("w");
    let denied = &l["route_refused"];
    assert!(denied["*/ext external-denied"].as_u64() >= Some(3), "{denied}");
    assert!(denied["*/ext external-unavailable"].as_u64() >= Some(1), "{denied}");
    assert!(denied["*/closed external-unavailable"].as_u64() >= Some(1), "{denied}");
}
