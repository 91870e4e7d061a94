//! JWT authentication of a route's requests (`auth.jwt`), before any backend
//! is contacted: where the token is read from, which keys verify it
//! (HS256, RS256, ES256, with ring), and the registered claims checked
//! (`exp` and `nbf` with a leeway, `iss`, `aud`). `alg: none`, and an
//! algorithm that is not its key's, are refused.
use std::{collections::BTreeMap, time::Duration};

use data_encoding::BASE64URL_NOPAD;
use ring::{hmac, signature};
use serde_json::{Map, Value};

/// Where a route reads its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `Authorization: Bearer <token>`.
    Header,
    /// A query parameter.
    Query(String),
    /// A cookie.
    Cookie(String),
    /// An entry of `Sec-WebSocket-Protocol` (browsers cannot set headers on
    /// a WebSocket): the first entry that has a JWT's shape.
    Subprotocol,
}

impl Source {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "header" => Ok(Source::Header),
            None if s == "subprotocol" => Ok(Source::Subprotocol),
            Some(("query", n)) if !n.is_empty() => Ok(Source::Query(n.to_string())),
            Some(("cookie", n)) if !n.is_empty() => Ok(Source::Cookie(n.to_string())),
            _ => Err(format!("{s:?} is not a token source (header, query:NAME, cookie:NAME or subprotocol)")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alg {
    Hs256,
    Rs256,
    Es256,
}

impl Alg {
    fn parse(s: &str) -> Option<Alg> {
        match s {
            "HS256" => Some(Alg::Hs256),
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            _ => None,
        }
    }
}

enum Material {
    Hmac(hmac::Key),
    /// Big-endian modulus and exponent.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// The uncompressed point (0x04, x, y).
    Ec(Vec<u8>),
}

pub struct Key {
    kid: Option<String>,
    alg: Alg,
    material: Material,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("kid", &self.kid).field("alg", &self.alg).finish_non_exhaustive()
    }
}

/// A route's JWT settings, keys loaded.
pub struct Jwt {
    keys: Vec<Key>,
    pub token_from: Vec<Source>,
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub leeway: Duration,
    /// Claim name -> request header set from it (and removed when the
    /// claim is absent, so a client cannot set it).
    pub claims_to_headers: BTreeMap<String, String>,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("keys", &self.keys.len())
            .field("token_from", &self.token_from)
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

/// The value of query parameter `name` (as written, not decoded).
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a hyper::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get_all(hyper::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(
        |c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then_some(v)
        },
    )
}

/// Why a request was refused: the cause counted, and what the client is told
/// (never the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Malformed,
    Algorithm,
    UnknownKey,
    Signature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
}

impl Denied {
    pub fn code(self) -> &'static str {
        match self {
            Denied::Missing => "jwt-missing",
            Denied::Malformed => "jwt-malformed",
            Denied::Algorithm => "jwt-algorithm",
            Denied::UnknownKey => "jwt-unknown-key",
            Denied::Signature => "jwt-signature",
            Denied::Expired => "jwt-expired",
            Denied::NotYetValid => "jwt-not-yet-valid",
            Denied::Issuer => "jwt-issuer",
            Denied::Audience => "jwt-audience",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Denied::Missing => "no token",
            Denied::Malformed => "the token is not a JWT",
            Denied::Algorithm => "the token's algorithm is not accepted",
            Denied::UnknownKey => "no key for the token",
            Denied::Signature => "the token's signature does not verify",
            Denied::Expired => "the token has expired",
            Denied::NotYetValid => "the token is not valid yet",
            Denied::Issuer => "the token's issuer is not accepted",
            Denied::Audience => "the token's audience is not accepted",
        }
    }

    /// The `WWW-Authenticate` value (RFC 6750 §3).
    pub fn challenge(self) -> String {
        match self {
            Denied::Missing => "Bearer realm=\"gateway\"".into(),
            other => {
                format!("Bearer realm=\"gateway\", error=\"invalid_token\", error_description=\"{}\"", other.describe())
            }
        }
    }
}

/// Every cause, for the counters.
pub const CAUSES: [Denied; 9] = [
    Denied::Missing,
    Denied::Malformed,
    Denied::Algorithm,
    Denied::UnknownKey,
    Denied::Signature,
    Denied::Expired,
    Denied::NotYetValid,
    Denied::Issuer,
    Denied::Audience,
];

fn b64(s: &str, what: &str) -> Result<Vec<u8>, String> {
    BASE64URL_NOPAD.decode(s.trim_end_matches('=').as_bytes()).map_err(|e| format!("{what}: not base64url ({e})"))
}

/// Keys from a JWKS document (RFC 7517): RSA (`n`, `e`), EC P-256 (`x`,
/// `y`) and oct (`k`) keys; each error names the key.
pub fn parse_jwks(text: &str) -> Result<Vec<Key>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let list = v.get("keys").and_then(Value::as_array).ok_or("no \"keys\" list")?;
    let mut keys = Vec::new();
    for (i, k) in list.iter().enumerate() {
        let at = |what: &str| format!("keys[{i}]: {what}");
        let s = |name: &str| k.get(name).and_then(Value::as_str);
        let kid = s("kid").map(String::from);
        if s("use").is_some_and(|u| u != "sig") {
            continue;
        }
        let alg = s("alg");
        let key = match s("kty") {
            Some("RSA") => {
                let n = b64(s("n").ok_or_else(|| at("an RSA key needs n"))?, &at("n"))?;
                let e = b64(s("e").ok_or_else(|| at("an RSA key needs e"))?, &at("e"))?;
                if n.len() < 256 {
                    return Err(at(&format!("an RSA key of {} bits; 2048 at least", n.len() * 8)));
                }
                Key { kid, alg: Alg::Rs256, material: Material::Rsa { n, e } }
            }
            Some("EC") => {
                if s("crv") != Some("P-256") {
                    return Err(at("only EC keys on P-256 (ES256) are accepted"));
                }
                let x = b64(s("x").ok_or_else(|| at("an EC key needs x"))?, &at("x"))?;
                let y = b64(s("y").ok_or_else(|| at("an EC key needs y"))?, &at("y"))?;
                if x.len() != 32 || y.len() != 32 {
                    return Err(at("x and y of a P-256 key are 32 bytes each"));
                }
                let mut point = vec![4];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Key { kid, alg: Alg::Es256, material: Material::Ec(point) }
            }
            Some("oct") => {
                let k = b64(s("k").ok_or_else(|| at("an oct key needs k"))?, &at("k"))?;
                Key { kid, alg: Alg::Hs256, material: Material::Hmac(hmac::Key::new(hmac::HMAC_SHA256, &k)) }
            }
            other => return Err(at(&format!("key type {other:?} is not RSA, EC or oct"))),
        };
        if let Some(a) = alg {
            if Alg::parse(a) != Some(key.alg) {
                return Err(at(&format!("alg {a:?} does not go with this key (RS256, ES256 or HS256)")));
            }
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err("no signing key".into());
    }
    Ok(keys)
}

/// An inline HS256 secret.
pub fn secret_key(secret: &[u8]) -> Vec<Key> {
    vec![Key { kid: None, alg: Alg::Hs256, material: Material::Hmac(hmac::Key::new(hmac::HMAC_SHA256, secret)) }]
}

impl Jwt {
    pub fn new(keys: Vec<Key>) -> Self {
        Jwt {
            keys,
            token_from: vec![Source::Header],
            issuer: None,
            audiences: Vec::new(),
            leeway: Duration::ZERO,
            claims_to_headers: BTreeMap::new(),
        }
    }

    /// The token of a request, from the first source that has one.
    pub fn token<'a>(&self, headers: &'a hyper::HeaderMap, query: Option<&'a str>) -> Option<(String, &Source)> {
        self.token_from.iter().find_map(|src| {
            let t = match src {
                Source::Header => headers
                    .get_all(hyper::header::AUTHORIZATION)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                    .map(|t| t.trim().to_string()),
                Source::Query(name) => query_param(query, name).map(str::to_string),
                Source::Cookie(name) => cookie(headers, name).map(str::to_string),
                Source::Subprotocol => subprotocol_token(headers),
            };
            t.filter(|t| !t.is_empty()).map(|t| (t, src))
        })
    }

    /// Verifies `token` at `now` (seconds since the epoch): its claims.
    pub fn verify(&self, token: &str, now: u64) -> Result<Map<String, Value>, Denied> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(Denied::Malformed);
        };
        let header: Value = b64(h, "").ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(Denied::Malformed)?;
        let alg = header.get("alg").and_then(Value::as_str).and_then(Alg::parse).ok_or(Denied::Algorithm)?;
        let kid = header.get("kid").and_then(Value::as_str);
        let sig = b64(s, "").map_err(|_| Denied::Malformed)?;
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        let mut candidates =
            self.keys.iter().filter(|k| k.alg == alg && (kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid));
        let mut any = false;
        let verified = candidates.any(|k| {
            any = true;
            match &k.material {
                Material::Hmac(key) => hmac::verify(key, signed, &sig).is_ok(),
                Material::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
                    .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, &sig)
                    .is_ok(),
                Material::Ec(point) => signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(signed, &sig)
                    .is_ok(),
            }
        });
        if !verified {
            return Err(if any { Denied::Signature } else { Denied::UnknownKey });
        }
        let claims: Map<String, Value> =
            b64(p, "").ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(Denied::Malformed)?;
        let leeway = self.leeway.as_secs();
        let time = |name: &str| claims.get(name).map(|v| v.as_f64().map(|f| f as u64).ok_or(Denied::Malformed));
        if let Some(exp) = time("exp").transpose()? {
            if now >= exp.saturating_add(leeway) {
                return Err(Denied::Expired);
            }
        }
        if let Some(nbf) = time("nbf").transpose()? {
            if now.saturating_add(leeway) < nbf {
                return Err(Denied::NotYetValid);
            }
        }
        if let Some(iss) = &self.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(iss) {
                return Err(Denied::Issuer);
            }
        }
        if !self.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => self.audiences.contains(a),
                Some(Value::Array(list)) => {
                    list.iter().filter_map(Value::as_str).any(|a| self.audiences.iter().any(|x| x == a))
                }
                _ => false,
            };
            if !ok {
                return Err(Denied::Audience);
            }
        }
        Ok(claims)
    }
}

/// A `Sec-WebSocket-Protocol` entry with a JWT's shape (three base64url
/// parts), if any.
fn subprotocol_token(headers: &hyper::HeaderMap) -> Option<String> {
    headers
        .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|e| looks_like_jwt(e))
        .map(String::from)
}

pub fn looks_like_jwt(s: &str) -> bool {
    s.split('.').count() == 3 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A claim as a header value: strings as they are, other values as JSON.
pub fn claim_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(secret: &[u8], header: &str, claims: &str) -> String {
        let signing =
            format!("{}.{}", BASE64URL_NOPAD.encode(header.as_bytes()), BASE64URL_NOPAD.encode(claims.as_bytes()));
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), signing.as_bytes());
        format!("{signing}.{}", BASE64URL_NOPAD.encode(tag.as_ref()))
    }

    #[test]
    fn hs256_claims_and_refusals() {
        let mut j = Jwt::new(secret_key(b"s3cret"));
        j.issuer = Some("https://id.test".into());
        j.audiences = vec!["chat".into()];
        j.leeway = Duration::from_secs(30);
        let h = r#"{"alg":"HS256","typ":"JWT"}"#;
        let good = hs(b"s3cret", h, r#"{"iss":"https://id.test","aud":["x","chat"],"exp":1000,"sub":"ann"}"#);
        assert_eq!(j.verify(&good, 900).unwrap()["sub"], "ann");
        assert_eq!(j.verify(&good, 1020).map(drop), Ok(()), "within the leeway");
        assert_eq!(j.verify(&good, 1030).map(drop), Err(Denied::Expired));
        let other = hs(b"wrong", h, r#"{"iss":"https://id.test","aud":"chat"}"#);
        assert_eq!(j.verify(&other, 0).map(drop), Err(Denied::Signature));
        let iss = hs(b"s3cret", h, r#"{"iss":"https://evil.test","aud":"chat"}"#);
        assert_eq!(j.verify(&iss, 0).map(drop), Err(Denied::Issuer));
        let aud = hs(b"s3cret", h, r#"{"iss":"https://id.test","aud":"mail"}"#);
        assert_eq!(j.verify(&aud, 0).map(drop), Err(Denied::Audience));
        let nbf = hs(b"s3cret", h, r#"{"iss":"https://id.test","aud":"chat","nbf":2000}"#);
        assert_eq!(j.verify(&nbf, 1000).map(drop), Err(Denied::NotYetValid));
        let none = format!("{}.{}.", BASE64URL_NOPAD.encode(br#"{"alg":"none"}"#), BASE64URL_NOPAD.encode(b"{}"));
        assert_eq!(j.verify(&none, 0).map(drop), Err(Denied::Algorithm));
        // An RS256 header over an HMAC key: no key of that algorithm.
        let confused = hs(b"s3cret", r#"{"alg":"RS256"}"#, r#"{"aud":"chat"}"#);
        assert_eq!(j.verify(&confused, 0).map(drop), Err(Denied::UnknownKey));
        assert_eq!(j.verify("a.b", 0).map(drop), Err(Denied::Malformed));
    }

    #[test]
    fn tokens_are_read_where_the_route_says() {
        let mut j = Jwt::new(secret_key(b"k"));
        j.token_from =
            vec![Source::Header, Source::Query("token".into()), Source::Cookie("session".into()), Source::Subprotocol];
        let mut h = hyper::HeaderMap::new();
        assert!(j.token(&h, None).is_none());
        assert_eq!(j.token(&h, Some("a=1&token=q.q.q")).map(|t| t.0), Some("q.q.q".into()));
        h.insert(hyper::header::COOKIE, "x=1; session=c.c.c".parse().unwrap());
        assert_eq!(j.token(&h, None).map(|t| t.0), Some("c.c.c".into()));
        h.insert(hyper::header::SEC_WEBSOCKET_PROTOCOL, "chat, s.s.s".parse().unwrap());
        h.remove(hyper::header::COOKIE);
        assert_eq!(j.token(&h, None).map(|t| t.0), Some("s.s.s".into()));
        h.insert(hyper::header::AUTHORIZATION, "Bearer h.h.h".parse().unwrap());
        assert_eq!(j.token(&h, None).map(|t| t.0), Some("h.h.h".into()), "the first source wins");
        assert_eq!(
            Source::parse("query:"),
            Err("\"query:\" is not a token source (header, query:NAME, cookie:NAME or subprotocol)".into())
        );
    }

    #[test]
    fn jwks_keys_are_checked() {
        assert!(parse_jwks(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","alg":"HS256"}]}"#).is_ok());
        assert!(parse_jwks(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","alg":"RS256"}]}"#)
            .unwrap_err()
            .contains("keys[0]"));
        assert!(parse_jwks(r#"{"keys":[{"kty":"EC","crv":"P-384","x":"AA","y":"AA"}]}"#)
            .unwrap_err()
            .contains("P-256"));
        assert!(parse_jwks(r#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#).unwrap_err().contains("2048"));
        assert!(parse_jwks(r#"{"keys":[]}"#).is_err());
        assert!(parse_jwks("nope").is_err());
    }
}
