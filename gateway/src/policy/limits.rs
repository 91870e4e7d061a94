//! Admission of new clients, checked right after accept and before any
//! backend is contacted: CIDR deny/allow lists, concurrent-connection caps
//! (global, per listener, per source address) and new-connection rates
//! (token buckets, per listener and per source).
use crate::util::sync::Locked;
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Instant,
};

/// An IPv4 or IPv6 prefix, e.g. `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("{s:?} is not an address or CIDR prefix (write e.g. \"10.0.0.0/8\", \"192.0.2.7\" or \"2001:db8::/32\")")
        };
        let (a, l) = match s.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.parse::<u8>().ok().filter(|&n| n <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Self { addr, len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.len)) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - u32::from(self.len)) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A rate such as `100/s` or `600/m`: that many new connections (or
/// messages, or bytes) per period, with a burst of one period's worth.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: f64,
}

impl Rate {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a rate (write e.g. \"100/s\" or \"600/m\")");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let n: u32 = n.trim().parse().map_err(|_| bad())?;
        let secs = Self::period_secs(unit).ok_or_else(bad)?;
        if n == 0 {
            return Err(format!("{s:?} must allow at least one connection"));
        }
        Ok(Self { per_sec: f64::from(n) / secs, burst: f64::from(n) })
    }

    /// The seconds in a rate's period: `s`, `m` or `h`.
    pub fn period_secs(unit: &str) -> Option<f64> {
        match unit.trim() {
            "s" => Some(1.0),
            "m" => Some(60.0),
            "h" => Some(3600.0),
            _ => None,
        }
    }
}

/// The admission rules of one listener.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
    pub max_connections: Option<u32>,
    pub max_connections_per_source: Option<u32>,
    pub connection_rate: Option<Rate>,
    pub connection_rate_per_source: Option<Rate>,
    /// IPv6 sources count per prefix of this length (64 when unset): a
    /// host is given a /64, and takes any address in it.
    pub per_source_ipv6_prefix: Option<u8>,
}

/// What per-source limits count a client under: its IPv4 address, or its
/// IPv6 address cut to the prefix.
fn source_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let len = u32::from(v6_prefix.min(128));
                let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        },
        v4 => v4,
    }
}

/// A token bucket: a burst of `rate.burst`, refilled at `rate.per_sec`.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(rate: Rate) -> Self {
        Self { tokens: rate.burst, at: Instant::now() }
    }

    pub fn take(&mut self, rate: Rate, now: Instant) -> bool {
        self.take_n(rate, 1.0, now)
    }

    /// Takes `n` tokens. One take larger than the burst passes from a full
    /// bucket and leaves it in debt, so the rate holds on average.
    pub fn take_n(&mut self, rate: Rate, n: f64, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate.per_sec).min(rate.burst);
        self.at = now;
        if self.tokens >= n.min(rate.burst) {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// Why a client was turned away.
pub const CAUSES: [&str; 11] = [
    "denied",
    "global-max-connections",
    "max-connections",
    "max-connections-per-source",
    "rate-limit",
    "source-rate-limit",
    // Not admission, but a client turned away all the same: its TLS
    // handshake failed or timed out (listeners with `tls`).
    "tls-handshake",
    // An SNI route with mode reject, or no route for the name.
    "sni-reject",
    // The backend connect failed for want of descriptors or memory here
    // (EMFILE, ENFILE, ENOBUFS, ENOMEM): not counted against the backend.
    "local-resources",
    // `proxy_protocol`: a connection from a source not in `from`, and a
    // PROXY header that was missing, malformed, of the wrong version or
    // too slow.
    "proxy-source",
    "proxy-header",
];

/// Per-source rate buckets kept at most: past it the least recently seen
/// are forgotten (and start full again if they come back).
const MAX_TRACKED_SOURCES: usize = 65_536;

/// Live admission state of one listener.
pub struct Admission {
    rules: Rules,
    global: Arc<Global>,
    active: AtomicU64,
    per_source: Mutex<HashMap<IpAddr, u32>>,
    bucket: Mutex<Option<Bucket>>,
    source_buckets: Mutex<Recent<Bucket>>,
}

/// The daemon-wide cap on concurrent connections.
#[derive(Debug, Default)]
pub struct Global {
    pub max: Option<u64>,
    pub active: AtomicU64,
}

/// A map bounded to `cap` entries that forgets the least recently used
/// first, in two generations: a hit in the old one moves to the new one, and
/// when the new one holds half the cap it becomes the old one (what was old
/// is dropped). O(1) per lookup, no scans.
struct Recent<V> {
    cap: usize,
    new: HashMap<IpAddr, V>,
    old: HashMap<IpAddr, V>,
}

impl<V> Recent<V> {
    fn new(cap: usize) -> Self {
        Self { cap: cap.max(2), new: HashMap::new(), old: HashMap::new() }
    }

    fn get_or_insert_with(&mut self, k: IpAddr, make: impl FnOnce() -> V) -> &mut V {
        if !self.new.contains_key(&k) {
            if self.new.len() >= self.cap / 2 {
                self.old = std::mem::take(&mut self.new);
            }
            let v = self.old.remove(&k).unwrap_or_else(make);
            self.new.insert(k, v);
        }
        self.new.get_mut(&k).expect("inserted above")
    }

    fn len(&self) -> usize {
        self.new.len() + self.old.len()
    }
}

/// Takes one place under `max`, or none: no check-then-increment race lets
/// two clients both take the last place.
fn take(counter: &AtomicU64, max: Option<u64>) -> bool {
    match max {
        None => {
            counter.fetch_add(1, Relaxed);
            true
        }
        Some(max) => counter.fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1)).is_ok(),
    }
}

/// Holds a client's place in the counters; released on drop.
pub struct Admitted {
    adm: Arc<Admission>,
    /// The key of its per-source count, when it holds one.
    source: Option<IpAddr>,
    listener: bool,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.listener {
            self.adm.active.fetch_sub(1, Relaxed);
            self.adm.global.active.fetch_sub(1, Relaxed);
        }
        if let Some(key) = self.source {
            let mut m = self.adm.per_source.locked();
            if let Some(n) = m.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&key);
                }
            }
        }
    }
}

impl Admission {
    pub fn new(rules: Rules, global: Arc<Global>) -> Self {
        let bucket = rules.connection_rate.map(Bucket::new);
        Self {
            rules,
            global,
            active: AtomicU64::new(0),
            per_source: Mutex::default(),
            bucket: Mutex::new(bucket),
            source_buckets: Mutex::new(Recent::new(MAX_TRACKED_SOURCES)),
        }
    }

    /// Admits `ip`, or says why not (one of [`CAUSES`]).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, &'static str> {
        let r = &self.rules;
        if r.deny.iter().any(|c| c.contains(ip)) || (!r.allow.is_empty() && !r.allow.iter().any(|c| c.contains(ip))) {
            return Err("denied");
        }
        let key = source_key(ip, r.per_source_ipv6_prefix.unwrap_or(64));
        // Places are taken as they are checked; a refusal further on gives
        // back what was taken when `held` drops.
        let mut held = Admitted { adm: self.clone(), source: None, listener: false };
        if !take(&self.global.active, self.global.max) {
            return Err("global-max-connections");
        }
        if !take(&self.active, r.max_connections.map(u64::from)) {
            self.global.active.fetch_sub(1, Relaxed);
            return Err("max-connections");
        }
        held.listener = true;
        if let Some(max) = r.max_connections_per_source {
            let mut m = self.per_source.locked();
            let n = m.entry(key).or_default();
            if *n >= max {
                return Err("max-connections-per-source");
            }
            *n += 1;
            held.source = Some(key);
        }
        let now = Instant::now();
        if let (Some(rate), Some(b)) = (r.connection_rate, self.bucket.locked().as_mut()) {
            if !b.take(rate, now) {
                return Err("rate-limit");
            }
        }
        if let Some(rate) = r.connection_rate_per_source {
            let mut m = self.source_buckets.locked();
            if !m.get_or_insert_with(key, || Bucket::new(rate)).take(rate, now) {
                return Err("source-rate-limit");
            }
        }
        Ok(held)
    }

    /// Sources with a rate bucket.
    pub fn tracked_sources(&self) -> usize {
        self.source_buckets.locked().len()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_bucket_lets_its_burst_through_then_holds_the_rate() {
        let rate = Rate { per_sec: 10.0, burst: 10.0 };
        let t0 = Instant::now();
        let mut b = Bucket::new(rate);
        assert!((0..10).all(|_| b.take(rate, t0)));
        assert!(!b.take(rate, t0));
        assert!(b.take(rate, t0 + std::time::Duration::from_millis(100)), "one token a tenth of a second later");
        // Bytes: one take larger than the burst passes from a full bucket
        // and leaves it in debt until the rate has paid for it.
        let bytes = Rate { per_sec: 1000.0, burst: 1000.0 };
        let mut b = Bucket::new(bytes);
        assert!(b.take_n(bytes, 3000.0, t0));
        assert!(!b.take_n(bytes, 1.0, t0 + std::time::Duration::from_secs(1)));
        assert!(b.take_n(bytes, 1.0, t0 + std::time::Duration::from_millis(2010)));
    }

    use super::*;

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.9.9.9".parse().unwrap()));
        let h = Cidr::parse("192.0.2.7").unwrap();
        assert!(h.contains("192.0.2.7".parse().unwrap()) && !h.contains("192.0.2.8".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "10.0.0/8", "x", "::/129", "10.0.0.0/-1"] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(Rate::parse("100/s").unwrap(), Rate { per_sec: 100.0, burst: 100.0 });
        assert_eq!(Rate::parse("60/m").unwrap().per_sec, 1.0);
        for bad in ["", "100", "0/s", "10/d", "x/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn caps_and_buckets() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let rules = Rules {
            max_connections: Some(3),
            max_connections_per_source: Some(2),
            deny: vec![Cidr::parse("10.0.0.9").unwrap()],
            ..Default::default()
        };
        let a = Arc::new(Admission::new(rules, Arc::new(Global::default())));
        let g1 = a.admit(ip).unwrap();
        let _g2 = a.admit(ip).unwrap();
        assert_eq!(a.admit(ip).err(), Some("max-connections-per-source"));
        let _g3 = a.admit(other).unwrap();
        assert_eq!(a.admit(other).err(), Some("max-connections"));
        drop(g1);
        let _g4 = a.admit(other).unwrap();
        assert_eq!(a.admit("10.0.0.9".parse().unwrap()).err(), Some("denied"));

        let rated = Arc::new(Admission::new(
            Rules { connection_rate: Some(Rate::parse("2/h").unwrap()), ..Default::default() },
            Arc::new(Global::default()),
        ));
        let _a = rated.admit(ip).unwrap();
        let _b = rated.admit(ip).unwrap();
        assert_eq!(rated.admit(ip).err(), Some("rate-limit"));

        // A refusal gives back every place it took.
        assert_eq!(a.active.load(Relaxed), 3);
        assert_eq!(*a.per_source.locked(), HashMap::from([(ip, 1), (other, 2)]));

        let global = Arc::new(Global { max: Some(1), active: AtomicU64::new(0) });
        let l1 = Arc::new(Admission::new(Rules::default(), global.clone()));
        let l2 = Arc::new(Admission::new(Rules::default(), global));
        let _held = l1.admit(ip).unwrap();
        assert_eq!(l2.admit(ip).err(), Some("global-max-connections"));
        assert_eq!(l2.active.load(Relaxed), 0);
    }

    #[test]
    fn ipv6_sources_count_per_prefix() {
        let rules = Rules { max_connections_per_source: Some(2), ..Default::default() };
        let a = Arc::new(Admission::new(rules.clone(), Arc::new(Global::default())));
        let _x = a.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        let _y = a.admit("2001:db8:1:2:ffff::9".parse().unwrap()).unwrap();
        // Same /64, another address: the same source.
        assert_eq!(a.admit("2001:db8:1:2::77".parse().unwrap()).err(), Some("max-connections-per-source"));
        assert!(a.admit("2001:db8:1:3::1".parse().unwrap()).is_ok());
        // A mapped IPv4 address is that IPv4 source.
        let _m = a.admit("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        let _v4 = a.admit("10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(a.admit("10.0.0.1".parse().unwrap()).err(), Some("max-connections-per-source"));
        // /128: every address its own.
        let exact =
            Arc::new(Admission::new(Rules { per_source_ipv6_prefix: Some(128), ..rules }, Arc::new(Global::default())));
        for i in 1..=4u16 {
            let ip = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i);
            let _h = exact.admit(ip.into()).unwrap();
        }
    }

    #[test]
    fn source_buckets_stay_bounded() {
        let rate = Rate::parse("1/h").unwrap();
        let a = Arc::new(Admission::new(
            Rules { connection_rate_per_source: Some(rate), ..Default::default() },
            Arc::new(Global::default()),
        ));
        // Four times the bound of distinct sources, each admitted once.
        for i in 0..(4 * MAX_TRACKED_SOURCES) as u32 {
            assert!(a.admit(std::net::Ipv4Addr::from(0x0a00_0000 + i).into()).is_ok());
        }
        assert!(a.tracked_sources() <= MAX_TRACKED_SOURCES, "{}", a.tracked_sources());
        // A recent source is still remembered (and still limited).
        let last: IpAddr = std::net::Ipv4Addr::from(0x0a00_0000 + 4 * MAX_TRACKED_SOURCES as u32 - 1).into();
        assert_eq!(a.admit(last).err(), Some("source-rate-limit"));
    }

    #[test]
    fn the_last_place_is_taken_once() {
        let a = Arc::new(Admission::new(
            Rules { max_connections: Some(1), ..Default::default() },
            Arc::new(Global::default()),
        ));
        for _ in 0..200 {
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let (w1, w2) = (a.clone(), a.clone());
            let (b1, b2) = (barrier.clone(), barrier);
            let admit = |adm: Arc<Admission>, b: Arc<std::sync::Barrier>| {
                move || {
                    b.wait();
                    adm.admit("10.0.0.1".parse().unwrap()).map(std::mem::forget).is_ok()
                }
            };
            let t1 = std::thread::spawn(admit(w1, b1));
            let t2 = std::thread::spawn(admit(w2, b2));
            let admitted = [t1.join().unwrap(), t2.join().unwrap()].iter().filter(|&&ok| ok).count();
            assert_eq!(admitted, 1);
            // The place forgotten above, handed back by hand.
            a.active.fetch_sub(1, Relaxed);
            a.global.active.fetch_sub(1, Relaxed);
        }
    }
}
