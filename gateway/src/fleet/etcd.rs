//! A small client of etcd's v3 API through the JSON gateway every member
//! serves beside gRPC (`POST /v3/kv/range` and the rest, HTTP/1.1): what a
//! fleet needs and no more: read, put (plain, with a lease, or compared
//! against a revision), leases, and a watch that streams events.
//!
//! Keys and values travel base64-encoded, 64-bit numbers as JSON strings
//! (proto3's JSON mapping, which also leaves out fields at their zero
//! value). A call tries each endpoint in turn, starting from the last one
//! that answered, so that one member down costs one failed connect.
use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use bytes::Bytes;
use data_encoding::BASE64;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// How long one call may take against one member.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd member answered ({tried}): {last}")]
    Unreachable { tried: String, last: String },
    #[error("etcd at {endpoint}: {message}")]
    Refused { endpoint: String, message: String },
    #[error("etcd at {endpoint}: an answer that does not parse: {what}")]
    Garbled { endpoint: String, what: String },
    /// A watch's start revision was compacted away: read the key again.
    #[error("revision {0} was compacted")]
    Compacted(i64),
    #[error("the watch stream ended")]
    WatchEnded,
    /// Sent, and no answer: whether it was applied is not known.
    #[error("etcd at {endpoint}: {what}; whether the write was applied is not known")]
    Unknown { endpoint: String, what: String },
}

/// One key's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// How one attempt failed.
enum Failed {
    /// Surely not applied: try another member.
    NotSent(String),
    /// Maybe applied.
    Sent(String),
    /// The member answered no.
    Refused(EtcdError),
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Kv),
    Delete { key: String, mod_revision: i64 },
}

pub struct Etcd {
    endpoints: Vec<String>,
    /// Where the next call starts: the member that answered last.
    current: AtomicUsize,
}

fn b64(s: &[u8]) -> String {
    BASE64.encode(s)
}

/// An int64 as proto3's JSON writes it (a string), or missing (zero).
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The end of the range of keys that start with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the keyspace.
    vec![0]
}

impl Etcd {
    /// `endpoints`: `host:port` of each member.
    pub fn new(endpoints: Vec<String>) -> Self {
        Etcd { endpoints, current: AtomicUsize::new(0) }
    }

    /// Sends one request to the member at `endpoint`: its response, with
    /// the body still to read. An error says whether the request may have
    /// reached the member (`Sent`) or surely did not (`NotSent`).
    async fn request(endpoint: &str, path: &str, body: &Value) -> Result<hyper::Response<Incoming>, Failed> {
        let tcp = tokio::time::timeout(CALL_TIMEOUT, tokio::net::TcpStream::connect(endpoint))
            .await
            .map_err(|_| Failed::NotSent("connect timed out".into()))?
            .map_err(|e| Failed::NotSent(format!("connect: {e}")))?;
        tcp.set_nodelay(true).map_err(|e| Failed::NotSent(e.to_string()))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| Failed::NotSent(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, endpoint)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| Failed::NotSent(e.to_string()))?;
        tokio::time::timeout(CALL_TIMEOUT, send.send_request(req))
            .await
            .map_err(|_| Failed::Sent("no answer in time".into()))?
            .map_err(|e| Failed::Sent(e.to_string()))
    }

    /// One call with a whole JSON answer, trying each member in turn. A
    /// call that is not `idempotent` (a compare-and-swap, a lease grant)
    /// goes to the next member only when the last one surely did not get it
    /// or answered that it could not serve it.
    async fn call(&self, path: &str, body: Value, idempotent: bool) -> Result<Value, EtcdError> {
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..self.endpoints.len() {
            let at = (start + i) % self.endpoints.len();
            match Self::call_at(&self.endpoints[at], path, &body).await {
                Ok(v) => {
                    self.current.store(at, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(Failed::Refused(e)) => return Err(e),
                Err(Failed::Sent(e)) if !idempotent => {
                    return Err(EtcdError::Unknown { endpoint: self.endpoints[at].clone(), what: e })
                }
                Err(Failed::NotSent(e) | Failed::Sent(e)) => last = format!("{}: {e}", self.endpoints[at]),
            }
        }
        Err(EtcdError::Unreachable { tried: self.endpoints.join(", "), last })
    }

    /// One call to one member.
    async fn call_at(endpoint: &str, path: &str, body: &Value) -> Result<Value, Failed> {
        let resp = Self::request(endpoint, path, body).await?;
        let status = resp.status();
        let bytes = tokio::time::timeout(CALL_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| Failed::Sent("the answer did not come whole in time".into()))?
            .map_err(|e| Failed::Sent(e.to_string()))?
            .to_bytes();
        let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
            // Not the v3 JSON gateway (etcd before 3.4 answers 404 here):
            // another member may be.
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
            return Err(Failed::NotSent(format!("{status}: {text:?} (an etcd 3.4+ client URL?)")));
        };
        if !status.is_success() || v.get("error").is_some() {
            let message = v
                .get("message")
                .or_else(|| v.get("error").and_then(|e| e.get("message")))
                .and_then(Value::as_str)
                .map_or_else(|| format!("{status}: {v}"), String::from);
            // A member cut off from its quorum answers, but cannot serve:
            // another one may (and it did not apply the request).
            if message.contains("no leader") || status.is_server_error() {
                return Err(Failed::NotSent(message));
            }
            return Err(Failed::Refused(EtcdError::Refused { endpoint: endpoint.to_string(), message }));
        }
        Ok(v)
    }

    fn kvs(v: &Value) -> Vec<Kv> {
        let Some(list) = v.get("kvs").and_then(Value::as_array) else { return Vec::new() };
        list.iter()
            .map(|kv| Kv {
                key: String::from_utf8_lossy(&decode(kv.get("key"))).into_owned(),
                value: decode(kv.get("value")),
                mod_revision: kv.get("mod_revision").map_or(0, int),
            })
            .collect()
    }

    fn revision(v: &Value) -> i64 {
        v.get("header").and_then(|h| h.get("revision")).map_or(0, int)
    }

    /// The key's value (if any), and the store's revision.
    pub async fn get(&self, key: &str) -> Result<(Option<Kv>, i64), EtcdError> {
        let v = self.call("/v3/kv/range", json!({ "key": b64(key.as_bytes()) }), true).await?;
        Ok((Self::kvs(&v).into_iter().next(), Self::revision(&v)))
    }

    /// Every key under `prefix`, and the store's revision.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let body = json!({ "key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix)) });
        let v = self.call("/v3/kv/range", body, true).await?;
        Ok((Self::kvs(&v), Self::revision(&v)))
    }

    /// Puts `value` under `key`, with `lease` (0: none). The new revision.
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let mut body = json!({ "key": b64(key.as_bytes()), "value": b64(value) });
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        // A put of the same value again is harmless.
        Ok(Self::revision(&self.call("/v3/kv/put", body, true).await?))
    }

    /// Puts `value` under `key` only if the key's mod_revision is still
    /// `expect` (0: the key does not exist). `Ok(new revision)`, or
    /// `Err(the key's mod_revision now)` when it was not.
    pub async fn put_if(&self, key: &str, value: &[u8], expect: i64) -> Result<Result<i64, i64>, EtcdError> {
        let k = b64(key.as_bytes());
        let body = json!({
            "compare": [{ "key": k, "target": "MOD", "result": "EQUAL", "mod_revision": expect.to_string() }],
            "success": [{ "request_put": { "key": k, "value": b64(value) } }],
            "failure": [{ "request_range": { "key": k } }],
        });
        let v = self.call("/v3/kv/txn", body, false).await?;
        if v.get("succeeded").and_then(Value::as_bool) == Some(true) {
            return Ok(Ok(Self::revision(&v)));
        }
        let now = v
            .get("responses")
            .and_then(|r| r.get(0))
            .and_then(|r| r.get("response_range"))
            .map(|r| Self::kvs(r).first().map_or(0, |kv| kv.mod_revision))
            .unwrap_or(0);
        Ok(Err(now))
    }

    /// A new lease of `ttl`; its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let v = self.call("/v3/lease/grant", json!({ "TTL": ttl.as_secs().to_string() }), false).await?;
        match v.get("ID").map_or(0, int) {
            0 => Err(EtcdError::Garbled { endpoint: self.endpoints.join(", "), what: format!("no lease id in {v}") }),
            id => Ok(id),
        }
    }

    /// Renews a lease: false once it has expired (its keys are gone).
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, EtcdError> {
        let v = self.call("/v3/lease/keepalive", json!({ "ID": lease.to_string() }), true).await?;
        Ok(Self::alive(&v))
    }

    /// Renews a lease through one member only (the one serving a watch): an
    /// error means that member cannot serve, whatever the others do.
    pub async fn keep_alive_at(&self, endpoint: &str, lease: i64) -> Result<bool, EtcdError> {
        match Self::call_at(endpoint, "/v3/lease/keepalive", &json!({ "ID": lease.to_string() })).await {
            Ok(v) => Ok(Self::alive(&v)),
            Err(Failed::Refused(e)) => Err(e),
            Err(Failed::NotSent(e) | Failed::Sent(e)) => {
                Err(EtcdError::Unreachable { tried: endpoint.to_string(), last: e })
            }
        }
    }

    fn alive(v: &Value) -> bool {
        let result = v.get("result").unwrap_or(v);
        result.get("TTL").map_or(0, int) > 0
    }

    /// Ends a lease now, and with it its keys.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", json!({ "ID": lease.to_string() }), true).await.map(drop)
    }

    /// Watches `key` from revision `from` on.
    pub async fn watch(&self, key: &str, from: i64) -> Result<Watch, EtcdError> {
        let body = json!({ "create_request": { "key": b64(key.as_bytes()), "start_revision": from.to_string() } });
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..self.endpoints.len() {
            let at = (start + i) % self.endpoints.len();
            let endpoint = &self.endpoints[at];
            match Self::request(endpoint, "/v3/watch", &body).await {
                Ok(resp) if resp.status().is_success() => {
                    self.current.store(at, Ordering::Relaxed);
                    return Ok(Watch { body: resp.into_body(), buf: Vec::new(), endpoint: endpoint.clone() });
                }
                Ok(resp) => {
                    let status = resp.status();
                    let body = tokio::time::timeout(CALL_TIMEOUT, resp.into_body().collect()).await;
                    let text = body.ok().and_then(|b| b.ok()).map(|b| b.to_bytes()).unwrap_or_default();
                    last = format!("{endpoint}: {status}: {}", String::from_utf8_lossy(&text[..text.len().min(200)]));
                }
                Err(Failed::NotSent(e) | Failed::Sent(e)) => last = format!("{endpoint}: {e}"),
                Err(Failed::Refused(e)) => last = e.to_string(),
            }
        }
        Err(EtcdError::Unreachable { tried: self.endpoints.join(", "), last })
    }
}

fn decode(v: Option<&Value>) -> Vec<u8> {
    v.and_then(Value::as_str).and_then(|s| BASE64.decode(s.as_bytes()).ok()).unwrap_or_default()
}

/// A watch's stream of JSON messages, one per batch of events.
pub struct Watch {
    body: Incoming,
    buf: Vec<u8>,
    endpoint: String,
}

impl Watch {
    /// The member serving it.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The next batch of events (the first message, which only says the
    /// watch was created, gives none). A member that loses its quorum keeps
    /// the stream open and silent: the caller bounds the wait.
    pub async fn next(&mut self) -> Result<Vec<Event>, EtcdError> {
        loop {
            let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            match values.next() {
                Some(Ok(v)) => {
                    let used = values.byte_offset();
                    self.buf.drain(..used);
                    return self.events(&v);
                }
                Some(Err(e)) if !e.is_eof() => {
                    return Err(EtcdError::Garbled { endpoint: self.endpoint.clone(), what: e.to_string() })
                }
                _ => {}
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    return Err(EtcdError::Garbled { endpoint: self.endpoint.clone(), what: e.to_string() })
                }
                None => return Err(EtcdError::WatchEnded),
            }
        }
    }

    fn events(&self, v: &Value) -> Result<Vec<Event>, EtcdError> {
        if let Some(e) = v.get("error") {
            return Err(EtcdError::Refused { endpoint: self.endpoint.clone(), message: e.to_string() });
        }
        let r = v.get("result").unwrap_or(v);
        let compacted = r.get("compact_revision").map_or(0, int);
        if compacted > 0 {
            return Err(EtcdError::Compacted(compacted));
        }
        if r.get("canceled").and_then(Value::as_bool) == Some(true) {
            return Err(EtcdError::WatchEnded);
        }
        let Some(events) = r.get("events").and_then(Value::as_array) else { return Ok(Vec::new()) };
        Ok(events
            .iter()
            .filter_map(|e| {
                let kv = e.get("kv")?;
                let key = String::from_utf8_lossy(&decode(kv.get("key"))).into_owned();
                let mod_revision = kv.get("mod_revision").map_or(0, int);
                Some(match e.get("type").and_then(Value::as_str) {
                    Some("DELETE") => Event::Delete { key, mod_revision },
                    _ => Event::Put(Kv { key, value: decode(kv.get("value")), mod_revision }),
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_where_its_keys_end() {
        assert_eq!(prefix_end("/gateway/nodes/"), b"/gateway/nodes0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn int64s_come_as_strings_or_not_at_all() {
        assert_eq!(int(&json!("42")), 42);
        assert_eq!(int(&json!(7)), 7);
        assert_eq!(int(&Value::Null), 0);
    }
}
